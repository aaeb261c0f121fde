"""Parity of the Flax CLIP text encoder and T5 encoder with transformers (torch, CPU), and their
converters (transformers folders, SD3 single files).

Reference: transformers ``CLIPTextModelWithProjection`` (a CLIP-L-like config: quick_gelu, legacy
``eos_token_id=2`` pooling; a bigG-like config: gelu, EOS-id pooling, projection width != hidden)
and ``T5EncoderModel`` (v1.1 gated-gelu, and original relu), every weight random.
Tolerances: float32 max |ours - ref| <= 1e-5 * max |ref| on every hidden state, the pooled
output and the projection; float64 <= 1e-10. transformers' ``T5LayerNorm`` takes its mean square
in float32 whatever the input dtype (we mirror that in ``layers.mean_square``), and torch and XLA
sum those float32 squares in different orders; the float64 T5 check therefore lifts that one
statistic to float64 on both sides (``lift_t5_mean_square``), so it compares everything else exactly.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch_reference import max_rel_error, randomize_
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from percov2_jax.convert import ConversionError, load_single_file, load_transformers_component
from percov2_jax.convert.safetensors_io import SafetensorsFile, write_safetensors
from percov2_jax.models import t5 as t5_lib

pytestmark = pytest.mark.parity  # against PyTorch reference models

F32_TOL = 1e-5
F64_TOL = 1e-10
VOCAB = 1000

CLIP_CONFIGS = {
    # CLIP-L/14-like: quick_gelu, legacy eos_token_id=2 pooling (argmax of the ids).
    "clip_l": dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=37,
        projection_dim=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=16,
        hidden_act="quick_gelu",
        bos_token_id=VOCAB - 2,
        eos_token_id=2,
        pad_token_id=VOCAB - 1,
    ),
    # bigG/14-like: gelu, pooling at the first EOS id, projection narrower than hidden.
    "clip_g": dict(
        vocab_size=VOCAB,
        hidden_size=40,
        intermediate_size=52,
        projection_dim=24,
        num_hidden_layers=3,
        num_attention_heads=5,
        max_position_embeddings=16,
        hidden_act="gelu",
        bos_token_id=VOCAB - 2,
        eos_token_id=VOCAB - 1,
        pad_token_id=0,
    ),
}
T5_CONFIGS = {
    "t5_v1_1": dict(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=3,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
    ),
    "t5_relu": dict(
        vocab_size=VOCAB,
        d_model=24,
        d_kv=6,
        d_ff=30,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="relu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
    ),
}


def _ids(seed: int, batch: int = 3, length: int = 12, eos: int = VOCAB - 1):
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, VOCAB - 3, (batch, length)).astype(np.int64)
    ids[:, 0] = VOCAB - 2  # BOS
    for b, end in enumerate([4, 8, length - 1][:batch]):
        ids[b, end] = eos
        ids[b, end + 1 :] = VOCAB - 1  # padding after the EOS
    return ids


@pytest.fixture(scope="module", params=list(CLIP_CONFIGS))
def clip_case(request, tmp_path_factory):
    model = randomize_(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_CONFIGS[request.param])), seed=71)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return dict(name=request.param, model=model, folder=folder)


@pytest.fixture(scope="module", params=list(T5_CONFIGS))
def t5_case(request, tmp_path_factory):
    model = randomize_(T5EncoderModel(T5Config(**T5_CONFIGS[request.param])), seed=72)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return dict(name=request.param, model=model, folder=folder)


def _compare_states(ours, ref, tol):
    """Every hidden state and the last hidden state (CLIP and T5 outputs alike)."""
    assert len(ours.hidden_states) == len(ref.hidden_states)
    for o, r in zip(ours.hidden_states, ref.hidden_states):
        assert max_rel_error(o, r.numpy()) <= tol
    assert max_rel_error(ours.last_hidden_state, ref.last_hidden_state.numpy()) <= tol


def _compare_clip(ours, ref, tol):
    _compare_states(ours, ref, tol)
    assert max_rel_error(ours.text_embeds, ref.text_embeds.numpy()) <= tol


@pytest.mark.parametrize("with_mask", [False, True])
def test_clip_parity_float32(clip_case, with_mask):
    ids = _ids(1)
    mask = (np.cumsum(ids == VOCAB - 1, axis=1) <= 1).astype(np.int64) if with_mask else None
    module, params = load_transformers_component(clip_case["folder"])
    ours = jax.jit(module.apply)({"params": params}, ids, mask)
    with torch.no_grad():
        ref = clip_case["model"](
            torch.from_numpy(ids),
            attention_mask=None if mask is None else torch.from_numpy(mask),
            output_hidden_states=True,
        )
    _compare_clip(ours, ref, F32_TOL)
    # The pooled output sits at the EOS token (legacy argmax or first EOS id).
    eos = ids.argmax(-1) if clip_case["name"] == "clip_l" else (ids == VOCAB - 1).argmax(-1)
    np.testing.assert_array_equal(np.asarray(ours.pooled), np.asarray(ours.last_hidden_state)[np.arange(3), eos])


def test_clip_exact_in_float64(clip_case):
    ids = _ids(2)
    with torch.no_grad():
        ref = copy.deepcopy(clip_case["model"]).double()(torch.from_numpy(ids), output_hidden_states=True)
    with jax.enable_x64(True):
        module, params = load_transformers_component(clip_case["folder"], dtype=jnp.float64, param_dtype=jnp.float64)
        ours = module.apply({"params": params}, ids)
        _compare_clip(ours, ref, F64_TOL)


@pytest.mark.parametrize("with_mask", [False, True])
def test_t5_parity_float32(t5_case, with_mask):
    ids = _ids(3, length=30)  # longer than max_distance / num_buckets: exercises the log buckets
    mask = (np.cumsum(ids == VOCAB - 1, axis=1) <= 1).astype(np.int64) if with_mask else None
    module, params = load_transformers_component(t5_case["folder"])
    ours = jax.jit(module.apply)({"params": params}, ids, mask)
    with torch.no_grad():
        ref = t5_case["model"](
            torch.from_numpy(ids),
            attention_mask=None if mask is None else torch.from_numpy(mask),
            output_hidden_states=True,
        )
    _compare_states(ours, ref, F32_TOL)


@pytest.fixture
def lift_t5_mean_square(monkeypatch):
    """Take T5's RMS-norm statistic in the input dtype on both sides (see the module docstring)."""
    import transformers.models.t5.modeling_t5 as reference

    from percov2_jax.models import layers

    def reference_forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    monkeypatch.setattr(reference.T5LayerNorm, "forward", reference_forward)
    monkeypatch.setattr(layers, "mean_square", lambda x: jnp.mean(jnp.square(x), axis=-1, keepdims=True))


def test_t5_exact_in_float64(t5_case, lift_t5_mean_square):
    ids = _ids(4, length=30)
    with torch.no_grad():
        ref = copy.deepcopy(t5_case["model"]).double()(torch.from_numpy(ids), output_hidden_states=True)
    with jax.enable_x64(True):
        module, params = load_transformers_component(t5_case["folder"], dtype=jnp.float64, param_dtype=jnp.float64)
        _compare_states(module.apply({"params": params}, ids), ref, F64_TOL)


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    for buckets, distance in [(32, 128), (8, 20), (64, 256)]:
        rel = torch.arange(300)[None, :] - torch.arange(300)[:, None]
        ref = T5Attention._relative_position_bucket(rel, True, buckets, distance).numpy()
        np.testing.assert_array_equal(t5_lib.relative_position_buckets(300, 300, buckets, distance), ref)


def test_bf16_compute_stays_close(t5_case):
    ids = _ids(5, length=20)
    f32, params = load_transformers_component(t5_case["folder"])
    bf16, _ = load_transformers_component(t5_case["folder"], dtype=jnp.bfloat16)
    out32 = f32.apply({"params": params}, ids).last_hidden_state
    out16 = bf16.apply({"params": params}, ids).last_hidden_state
    assert out16.dtype == jnp.bfloat16 and max_rel_error(out16, out32) <= 5e-2


# ---------------------------------------------------------------- converters -----------------


def test_tied_t5_embedding_alias(t5_case, tmp_path):
    folder = tmp_path / "t5"
    folder.mkdir()
    (folder / "config.json").write_text((t5_case["folder"] / "config.json").read_text())
    state = dict(SafetensorsFile(t5_case["folder"] / "model.safetensors").items())
    state["encoder.embed_tokens.weight"] = state["shared.weight"]
    write_safetensors(folder / "model.safetensors", state)
    _, both = load_transformers_component(folder)
    _, ref = load_transformers_component(t5_case["folder"])
    np.testing.assert_array_equal(both["shared"]["embedding"], ref["shared"]["embedding"])
    state["encoder.embed_tokens.weight"] = state["shared.weight"] + 1
    write_safetensors(folder / "model.safetensors", state)
    with pytest.raises(ConversionError, match="should be tied"):
        load_transformers_component(folder)


def test_clip_strictness_and_position_ids(clip_case, tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "config.json").write_text((clip_case["folder"] / "config.json").read_text())
    state = dict(SafetensorsFile(clip_case["folder"] / "model.safetensors").items())
    state["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    write_safetensors(folder / "model.safetensors", state)
    load_transformers_component(folder)  # an arange buffer is accepted
    state["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None][:, ::-1].copy()
    write_safetensors(folder / "model.safetensors", state)
    with pytest.raises(ConversionError, match="position_ids is not arange"):
        load_transformers_component(folder)
    del state["text_model.embeddings.position_ids"], state["text_model.final_layer_norm.bias"]
    state["text_model.encoder.layers.0.mlp.fc3.weight"] = np.zeros((4, 4), np.float32)
    write_safetensors(folder / "model.safetensors", state)
    with pytest.raises(ConversionError) as info:
        load_transformers_component(folder)
    assert "text_model.encoder.layers.0.mlp.fc3.weight" in str(info.value)
    assert "text_model/final_layer_norm/bias" in str(info.value)


def test_single_file_text_encoders_agree_with_folders(tmp_path):
    """An SD3 single file bundling CLIP-L (without projection), CLIP-G and T5 converts to the same
    params as the transformers folders (CLIP-L with an identity projection, as diffusers)."""
    clip_l = CLIPTextModelWithProjection(
        CLIPTextConfig(
            **{
                **CLIP_CONFIGS["clip_l"],
                "hidden_size": 64,
                "intermediate_size": 70,
                "projection_dim": 64,
                "num_attention_heads": 1,
            }
        )
    )
    randomize_(clip_l, seed=73)
    with torch.no_grad():
        clip_l.text_projection.weight.copy_(torch.eye(64))
    clip_g = randomize_(
        CLIPTextModelWithProjection(
            CLIPTextConfig(
                **{**CLIP_CONFIGS["clip_g"], "hidden_size": 128, "num_attention_heads": 2, "eos_token_id": 2}
            )
        ),
        74,
    )
    t5 = randomize_(T5EncoderModel(T5Config(**T5_CONFIGS["t5_v1_1"])), seed=75)
    bundle = {}
    for name, prefix, model in [
        ("clip_l", "text_encoders.clip_l.transformer.", clip_l),
        ("clip_g", "text_encoders.clip_g.transformer.", clip_g),
        ("t5", "text_encoders.t5xxl.transformer.", t5),
    ]:
        model.save_pretrained(tmp_path / name)
        for k, v in model.state_dict().items():
            if prefix.endswith("clip_l.transformer.") and k == "text_projection.weight":
                continue  # SD3 single files carry no CLIP-L projection
            bundle[prefix + k] = v.numpy()
    write_safetensors(tmp_path / "sd3_with_text.safetensors", bundle)
    # Settings the weights do not determine (heads for these non-64-wide heads, bigG's activation).
    overrides = {
        "clip_l": {"num_attention_heads": 1, "eos_token_id": 2},
        "clip_g": {"num_attention_heads": 2, "hidden_act": "gelu"},
        "t5": {"relative_attention_max_distance": 20},
    }
    single = load_single_file(tmp_path / "sd3_with_text.safetensors", config_overrides=overrides)
    assert sorted(single) == ["clip_g", "clip_l", "t5"]
    for name in ("clip_l", "clip_g", "t5"):
        module, params = load_transformers_component(tmp_path / name)
        s_module, s_params = single[name]
        assert s_module.config == module.config, name
        jax.tree.map(np.testing.assert_array_equal, s_params, params)
