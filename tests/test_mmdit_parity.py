"""Parity of the Flax SD3 MM-DiT with diffusers' ``SD3Transformer2DModel`` (torch, CPU).

Reference: diffusers (the installed version), tiny random configs of SD3-medium, SD3.5-large
(qk-norm) and SD3.5-medium (dual attention + qk-norm), every weight random.
Tolerances:
- float32: max |ours - ref| <= 1e-5 * max |ref| (measured about 1e-6);
- float64 at t = 0: <= 1e-10 * max |ref| (measured about 1e-14). At t = 0 the float32 timestep
  sinusoid, which both sides compute in float32 by design, is exact, so this checks that the
  port is the same function, not merely close.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models import attention as d_attention
from diffusers.models import embeddings as d_emb
from diffusers.models import normalization as d_norm
from torch_reference import SD3_VARIANTS, flax_params_from_torch, max_rel_error, nchw, nhwc, randomize_, tiny_sd3

from percov2_jax.convert import load_diffusers_component
from percov2_jax.models import attention, embeddings, mmdit, normalization

pytestmark = pytest.mark.parity  # against PyTorch reference models

F32_TOL = 1e-5
F64_TOL = 1e-10
D = 16  # inner dim of the tiny models


def _inputs(seed: int = 1, batch: int = 2, height: int = 10, width: int = 14):
    rng = np.random.RandomState(seed)
    return dict(
        latents=rng.randn(batch, height, width, 16).astype(np.float32),
        context=rng.randn(batch, 5, 12).astype(np.float32),
        pooled=rng.randn(batch, 10).astype(np.float32),
        timestep=np.array([300.0, 800.0], np.float32)[:batch],
    )


def _torch_forward(model, x, timestep=None, double=False):
    conv = (lambda a: torch.from_numpy(a).double()) if double else torch.from_numpy
    t = x["timestep"] if timestep is None else timestep
    with torch.no_grad():
        out = model(
            conv(np.ascontiguousarray(x["latents"].transpose(0, 3, 1, 2))),
            conv(x["context"]),
            conv(x["pooled"]),
            conv(np.asarray(t, np.float32)),
        ).sample
    return nhwc(out)


# ---------------------------------------------------------------- embeddings -----------------


@pytest.mark.parametrize("dim,grid,base", [(16, 12, 8), (64, 192, 64), (1536, 24, 64)])
def test_sincos_table_matches_diffusers(dim, grid, base):
    ref = d_emb.get_2d_sincos_pos_embed(dim, grid, base_size=base, output_type="pt").float().numpy()
    ours = embeddings.sincos_pos_table(dim, grid, base)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


def test_timestep_sinusoid_matches_diffusers():
    t = np.linspace(0, 1000, 21).astype(np.float32)
    ref = d_emb.get_timestep_embedding(torch.from_numpy(t), 256, flip_sin_to_cos=True, downscale_freq_shift=0).numpy()
    ours = np.asarray(embeddings.timestep_sinusoid(jnp.asarray(t), 256))
    # Both compute in float32. Our frequency table is exp in float64 rounded once; torch's
    # float32 exp is one ulp off on 2 of 128 frequencies, which moves sin(t * f) by at most
    # t * ulp(f) <= 1000 * 2**-24 (about 6e-5).
    assert np.abs(ours - ref).max() <= 1000 * 2.0**-24
    np.testing.assert_allclose(ours[0], ref[0], rtol=0, atol=0)  # t = 0 is exact


def test_patch_embed_parity():
    ref_mod = randomize_(
        d_emb.PatchEmbed(height=16, width=16, patch_size=2, in_channels=16, embed_dim=D, pos_embed_max_size=12), seed=3
    )
    x = np.random.RandomState(0).randn(2, 10, 14, 16).astype(np.float32)
    ours_mod = embeddings.PatchEmbed(patch_size=2, embed_dim=D, pos_embed_max_size=12, base_size=8)
    params = flax_params_from_torch(ref_mod, ours_mod, jnp.asarray(x), prefix="pos_embed.")
    # The position table we initialise equals the buffer diffusers builds.
    init = ours_mod.init(jax.random.key(0), jnp.asarray(x))["params"]
    np.testing.assert_allclose(np.asarray(init["pos_embed"].unbox()), ref_mod.pos_embed.numpy(), atol=1e-6)
    with torch.no_grad():
        ref = ref_mod(nchw(x)).numpy()
    assert max_rel_error(ours_mod.apply({"params": params}, jnp.asarray(x)), ref) <= F32_TOL


def test_patch_embed_rejects_too_large_grid():
    mod = embeddings.PatchEmbed(patch_size=2, embed_dim=D, pos_embed_max_size=4, base_size=4)
    with pytest.raises(ValueError, match="exceeds pos_embed_max_size"):
        mod.init(jax.random.key(0), jnp.zeros((1, 10, 8, 4)))


def test_timestep_and_pooled_embedding_parity():
    ref_mod = randomize_(d_emb.CombinedTimestepTextProjEmbeddings(embedding_dim=D, pooled_projection_dim=10), seed=4)
    t = np.array([0.0, 417.0, 999.0], np.float32)
    pooled = np.random.RandomState(1).randn(3, 10).astype(np.float32)
    ours_mod = embeddings.CombinedTimestepTextProjEmbeddings(D)
    params = flax_params_from_torch(ref_mod, ours_mod, jnp.asarray(t), jnp.asarray(pooled), prefix="time_text_embed.")
    with torch.no_grad():
        ref = ref_mod(torch.from_numpy(t), torch.from_numpy(pooled)).numpy()
    assert max_rel_error(ours_mod.apply({"params": params}, jnp.asarray(t), jnp.asarray(pooled)), ref) <= F32_TOL


# ---------------------------------------------------------------- norms and blocks -----------


def _tokens(seed, length=7, batch=2):
    rng = np.random.RandomState(seed)
    return rng.randn(batch, length, D).astype(np.float32), rng.randn(batch, D).astype(np.float32)


@pytest.mark.parametrize("name", ["AdaLayerNormZero", "SD35AdaLayerNormZeroX", "AdaLayerNormContinuous"])
def test_adaptive_norm_parity(name):
    x, emb = _tokens(5)
    if name == "AdaLayerNormContinuous":
        ref_mod = d_norm.AdaLayerNormContinuous(D, D, elementwise_affine=False, eps=1e-6)
    else:
        ref_mod = getattr(d_norm, name)(D)
    randomize_(ref_mod, seed=6)
    ours_mod = getattr(normalization, name)(D)
    params = flax_params_from_torch(ref_mod, ours_mod, jnp.asarray(x), jnp.asarray(emb), prefix="norm_out.")
    with torch.no_grad():
        ref = (
            ref_mod(torch.from_numpy(x), torch.from_numpy(emb))
            if name == "AdaLayerNormContinuous"
            else ref_mod(torch.from_numpy(x), emb=torch.from_numpy(emb))
        )
    ours = ours_mod.apply({"params": params}, jnp.asarray(x), jnp.asarray(emb))
    ref = ref if isinstance(ref, tuple) else (ref,)
    ours = ours if isinstance(ours, tuple) else (ours,)
    assert len(ours) == len(ref)
    for o, r in zip(ours, ref):
        assert max_rel_error(o, r.numpy()) <= F32_TOL


BLOCKS = {
    "joint": dict(),
    "last_context_only": dict(context_pre_only=True),
    "dual_attention": dict(use_dual_attention=True),
    "qk_norm": dict(qk_norm="rms_norm"),
    "qk_norm_last": dict(qk_norm="rms_norm", context_pre_only=True),
}


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_joint_block_parity(kind):
    flags = BLOCKS[kind]
    ref_mod = randomize_(
        d_attention.JointTransformerBlock(dim=D, num_attention_heads=2, attention_head_dim=8, **flags), seed=7
    )
    h, temb = _tokens(8, length=9)
    c, _ = _tokens(9, length=4)
    ours_mod = mmdit.JointTransformerBlock(dim=D, num_attention_heads=2, attention_head_dim=8, **flags)
    args = (jnp.asarray(h), jnp.asarray(c), jnp.asarray(temb))
    params = flax_params_from_torch(ref_mod, ours_mod, *args, prefix="transformer_blocks.0.")
    with torch.no_grad():
        ref_c, ref_h = ref_mod(torch.from_numpy(h), torch.from_numpy(c), torch.from_numpy(temb))
    ours_c, ours_h = ours_mod.apply({"params": params}, *args)
    assert max_rel_error(ours_h, ref_h.numpy()) <= F32_TOL
    if flags.get("context_pre_only"):
        assert ref_c is None and ours_c is None
    else:
        assert max_rel_error(ours_c, ref_c.numpy()) <= F32_TOL


def test_attention_rejects_unknown_qk_norm():
    mod = attention.Attention(dim=D, num_heads=2, head_dim=8, qk_norm="layer_norm")
    with pytest.raises(ValueError, match="qk_norm"):
        mod.init(jax.random.key(0), jnp.zeros((1, 3, D)))


# ---------------------------------------------------------------- whole model ----------------


@pytest.fixture(scope="module", params=list(SD3_VARIANTS))
def sd3_case(request, tmp_path_factory):
    variant = request.param
    model = tiny_sd3(variant, seed=11)
    folder = tmp_path_factory.mktemp(variant)
    model.save_pretrained(folder)
    x = _inputs()
    return dict(variant=variant, model=model, folder=folder, x=x, ref=_torch_forward(model, x))


def _apply(module, params, x, timestep=None):
    t = x["timestep"] if timestep is None else timestep
    return np.asarray(jax.jit(module.apply)({"params": params}, x["latents"], x["context"], x["pooled"], t))


def test_full_model_parity_float32(sd3_case):
    module, params = load_diffusers_component(sd3_case["folder"])
    err = max_rel_error(_apply(module, params, sd3_case["x"]), sd3_case["ref"])
    assert err <= F32_TOL, f"{sd3_case['variant']}: relative error {err:.2e}"


def test_scan_layers_equals_loop(sd3_case):
    looped, p_loop = load_diffusers_component(sd3_case["folder"])
    scanned, p_scan = load_diffusers_component(sd3_case["folder"], scan_layers=True)
    assert any(k.endswith(tuple(f"_to_{i}" for i in range(10))) for k in p_scan), sorted(p_scan)
    out_loop, out_scan = _apply(looped, p_loop, sd3_case["x"]), _apply(scanned, p_scan, sd3_case["x"])
    assert max_rel_error(out_scan, out_loop) <= 1e-6
    assert max_rel_error(out_scan, sd3_case["ref"]) <= F32_TOL
    # Checkpoint surgery between the layouts is exact.
    restacked = mmdit.scan_block_params(p_loop, looped.config)
    jax.tree.map(np.testing.assert_array_equal, restacked, p_scan)
    jax.tree.map(np.testing.assert_array_equal, mmdit.unscan_block_params(p_scan, looped.config), p_loop)


def test_full_model_exact_in_float64(sd3_case):
    x = {k: v.astype(np.float64) for k, v in sd3_case["x"].items()}
    t0 = np.zeros(2)
    ref = _torch_forward(copy.deepcopy(sd3_case["model"]).double(), x, timestep=t0, double=True)
    with jax.enable_x64(True):
        module, params = load_diffusers_component(sd3_case["folder"], dtype=jnp.float64, param_dtype=jnp.float64)
        ours = np.asarray(module.apply({"params": params}, x["latents"], x["context"], x["pooled"], t0))
    assert ours.dtype == np.float64
    err = max_rel_error(ours, ref)
    assert err <= F64_TOL, f"{sd3_case['variant']}: float64 relative error {err:.2e}"


def test_remat_policy_does_not_change_outputs(sd3_case):
    module, params = load_diffusers_component(sd3_case["folder"], scan_layers=True, remat_policy="full")
    loss = lambda p: jnp.sum(
        module.apply({"params": p}, *(sd3_case["x"][k] for k in ("latents", "context", "pooled", "timestep"))) ** 2
    )
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    plain, _ = load_diffusers_component(sd3_case["folder"], scan_layers=True)
    ref_value = jnp.sum(jnp.asarray(_apply(plain, params, sd3_case["x"])) ** 2)
    assert abs(float(value) - float(ref_value)) <= 1e-5 * abs(float(ref_value))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_config_validation():
    with pytest.raises(ValueError, match="caption_projection_dim"):
        mmdit.SD3TransformerConfig(num_layers=2, attention_head_dim=8, num_attention_heads=2, caption_projection_dim=12)
    with pytest.raises(ValueError, match="unknown SD3Transformer2DModel config fields"):
        mmdit.SD3TransformerConfig.from_dict({"num_layers": 2, "not_a_field": 1})
    with pytest.raises(ValueError, match="dual_attention_layers"):
        mmdit.SD3TransformerConfig(
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            caption_projection_dim=16,
            dual_attention_layers=(1,),
        )


def test_block_layout():
    cfg = mmdit.SD3TransformerConfig(
        num_layers=24,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        dual_attention_layers=tuple(range(13)),
    )
    names = [r.name for r in mmdit.block_runs(cfg, scan_layers=True)]
    assert names == ["transformer_blocks_0_to_12", "transformer_blocks_13_to_22", "transformer_blocks_23"]
    assert len(mmdit.block_runs(cfg, scan_layers=False)) == 24
