"""The cosine-similarity EMA vector quantizer.

Reference: lucidrains' vector-quantize-pytorch **1.15.3** (the version pinned in PerCo's
requirements.txt), ``VectorQuantize(dim=320, codebook_size=16, codebook_dim=32,
use_cosine_sim=True)`` with its defaults (decay 0.8, eps 1e-5, no k-means, no dead-code
restarts), in training mode, on 2x4x6 = 48 tokens (so codes collect several tokens). Its
project_in/out weights and codebook buffers are copied into Flax; quantized output, indices,
commit loss and the EMA buffers are compared after one and after three training steps.
Tolerance: float32 max |ours - ref| <= 1e-5 * max |ref|; indices exactly.

The other tests check hand-computed EMA values, the straight-through gradient, decoding from
indices, the usage/perplexity metrics and dead-code restarts.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.core import meta
from torch_reference import max_rel_error

from percov2_jax.models import quantizer as vq

# vector-quantize-pytorch 1.15.3 decorates with the deprecated torch.cuda.amp.autocast.
pytestmark = [
    pytest.mark.parity,  # against PyTorch reference models
    pytest.mark.filterwarnings("ignore:.*torch.cuda.amp.autocast:FutureWarning"),
]

F32_TOL = 1e-5
TORCH_CFG = vq.QuantizerConfig(dim=320, codebook_size=16, codebook_dim=32)


def init_variables(config, shape, seed=0):
    module = vq.CosineVectorQuantizer(config)
    variables = module.init({"params": jax.random.key(seed)}, jnp.zeros(shape), train=False)
    return module, meta.unbox(variables)


def with_stats(variables, **stats):
    out = dict(variables)
    out["vq_stats"] = {**variables["vq_stats"], **{k: jnp.asarray(v, jnp.float32) for k, v in stats.items()}}
    return out


def train_step_fn(module):
    """One jitted training call, reused across steps: ``(variables, x, key) -> (output, new vq_stats)``."""

    @jax.jit
    def step(variables, x, key):
        out, updates = module.apply(variables, x, train=True, mutable=["vq_stats"], rngs={"vq": key})
        return out, updates["vq_stats"]

    return step


# ---- (a) parity with vector-quantize-pytorch -------------------------------------------------------


@pytest.fixture(scope="module")
def torch_case():
    from vector_quantize_pytorch import VectorQuantize

    torch.manual_seed(0)
    ref = VectorQuantize(dim=320, codebook_size=16, codebook_dim=32, use_cosine_sim=True).train()
    rs = np.random.RandomState(0)
    xs = [rs.randn(2, 4, 6, 320).astype(np.float32) for _ in range(3)]
    module, variables = init_variables(TORCH_CFG, (1, 1, 1, 320))
    cb = ref._codebook
    variables = {
        "params": {
            "project_in": {
                "kernel": jnp.asarray(ref.project_in.weight.detach().numpy().T),
                "bias": jnp.asarray(ref.project_in.bias.detach().numpy()),
            },
            "project_out": {
                "kernel": jnp.asarray(ref.project_out.weight.detach().numpy().T),
                "bias": jnp.asarray(ref.project_out.bias.detach().numpy()),
            },
        },
        "vq_stats": {
            "codebook": jnp.asarray(cb.embed[0].numpy()),
            "embed_avg": jnp.asarray(cb.embed_avg[0].numpy()),
            "cluster_size": jnp.asarray(cb.cluster_size[0].numpy()),
        },
    }
    return dict(ref=ref, xs=xs, module=module, variables=variables, step=train_step_fn(module))


def test_training_parity_with_vector_quantize_pytorch(torch_case):
    ref, variables, step = torch_case["ref"], torch_case["variables"], torch_case["step"]
    cb = ref._codebook
    for i, x in enumerate(torch_case["xs"]):
        with torch.no_grad():
            q_ref, ind_ref, loss_ref = ref(torch.from_numpy(x.reshape(2, 24, 320)))
        out, stats = step(variables, x, jax.random.key(i))
        variables = {"params": variables["params"], "vq_stats": stats}
        errors = {
            "quantized": max_rel_error(out.quantized, q_ref.numpy().reshape(x.shape)),
            "commit_loss": abs(float(out.commit_loss) - float(loss_ref[0])) / float(loss_ref[0]),
            "cluster_size": max_rel_error(stats["cluster_size"], cb.cluster_size[0].numpy()),
            "embed_avg": max_rel_error(stats["embed_avg"], cb.embed_avg[0].numpy()),
            "codebook": max_rel_error(stats["codebook"], cb.embed[0].numpy()),
        }
        print(f"step {i + 1}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
        np.testing.assert_array_equal(np.asarray(out.indices), ind_ref.numpy().reshape(2, 4, 6))
        assert out.indices.dtype == jnp.int32
        assert all(v <= F32_TOL for v in errors.values()), errors
        if i == 0:
            assert len(np.unique(ind_ref.numpy())) < ind_ref.numel()  # codes are shared: real EMA sums


def test_eval_parity_with_vector_quantize_pytorch(torch_case):
    ref, module = torch_case["ref"], torch_case["module"]
    variables = torch_case["variables"]
    from vector_quantize_pytorch import VectorQuantize

    frozen = VectorQuantize(dim=320, codebook_size=16, codebook_dim=32, use_cosine_sim=True).eval()
    frozen.project_in.load_state_dict(ref.project_in.state_dict())
    frozen.project_out.load_state_dict(ref.project_out.state_dict())
    frozen._codebook.embed.copy_(torch.from_numpy(np.array(variables["vq_stats"]["codebook"]))[None])
    x = torch_case["xs"][0]
    with torch.no_grad():
        q_ref, ind_ref, _ = frozen(torch.from_numpy(x.reshape(2, 24, 320)))
    out = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x)
    np.testing.assert_array_equal(np.asarray(out.indices), ind_ref.numpy().reshape(2, 4, 6))
    assert max_rel_error(out.quantized, q_ref.numpy().reshape(x.shape)) <= F32_TOL


# ---- (b) a hand-computed EMA step ------------------------------------------------------------------


def test_ema_step_by_hand():
    # dim == codebook_dim: no projections, as in the reference. Codes e1, e2; decay 0.8.
    config = vq.QuantizerConfig(dim=2, codebook_size=2, codebook_dim=2)
    module, variables = init_variables(config, (1, 1, 3, 2))
    assert "params" not in variables
    variables = with_stats(variables, codebook=[[1, 0], [0, 1]], embed_avg=[[1, 0], [0, 1]], cluster_size=[1, 1])
    x = jnp.array([[[[3.0, 4.0], [2.0, 0.0], [0.8, 0.6]]]])  # unit directions (.6,.8), (1,0), (.8,.6)
    out, stats = train_step_fn(module)(variables, x, jax.random.key(0))
    np.testing.assert_array_equal(out.indices, [[[1, 0, 0]]])
    np.testing.assert_allclose(out.quantized, [[[[0, 1], [1, 0], [1, 0]]]], atol=1e-7)
    # (|(.6,.8)-(0,1)|^2 + 0 + |(.8,.6)-(1,0)|^2) / 6 elements = 0.8 / 6
    np.testing.assert_allclose(out.commit_loss, 0.8 / 6, rtol=1e-6)
    # cluster_size: 1 + 0.2 * (counts - 1) with counts (2, 1)
    np.testing.assert_allclose(stats["cluster_size"], [1.2, 1.0], rtol=1e-6)
    # embed_avg: e + 0.2 * (sum - e); sums (1.8, 0.6) and (0.6, 0.8)
    expected_avg = np.array([[1.16, 0.12], [0.12, 0.96]])
    np.testing.assert_allclose(stats["embed_avg"], expected_avg, rtol=1e-6)
    # codebook: l2norm(embed_avg / laplace-smoothed size) = l2norm(embed_avg) (a positive row scale)
    np.testing.assert_allclose(
        stats["codebook"], expected_avg / np.linalg.norm(expected_avg, axis=1, keepdims=True), rtol=1e-6
    )


# ---- (c) straight-through gradient ---------------------------------------------------------------


def test_straight_through_gradient():
    config = vq.QuantizerConfig(dim=6, codebook_size=8, codebook_dim=3)
    module, variables = init_variables(config, (1, 2, 2, 6), seed=1)
    rs = np.random.RandomState(1)
    x, w = jnp.asarray(rs.randn(1, 2, 2, 6), jnp.float32), jnp.asarray(rs.randn(1, 2, 2, 6), jnp.float32)
    p = variables["params"]

    def through_quantizer(x, train):
        if train:
            out, _ = module.apply(variables, x, train=True, mutable=["vq_stats"])
        else:
            out = module.apply(variables, x, train=False)
        return jnp.sum(out.quantized * w)

    def identity_quantizer(x):  # project_out(l2norm(project_in(x))): quantization replaced by identity
        z = vq.l2norm(x @ p["project_in"]["kernel"] + p["project_in"]["bias"])
        return jnp.sum((z @ p["project_out"]["kernel"] + p["project_out"]["bias"]) * w)

    expected = jax.grad(identity_quantizer)(x)
    assert float(jnp.abs(expected).max()) > 0
    for train in (False, True):
        np.testing.assert_allclose(jax.grad(through_quantizer)(x, train), expected, rtol=1e-5, atol=1e-6)


# ---- (d) decoding from indices ---------------------------------------------------------------------


def test_decode_indices_equals_quantized(torch_case):
    module, variables = torch_case["module"], torch_case["variables"]
    x = torch_case["xs"][1]
    out = module.apply(variables, x, train=False)
    decoded = module.apply(variables, out.indices, method="decode_indices")
    assert decoded.shape == x.shape
    # quantized = project_out(z + (q - z)) differs from project_out(q) only by rounding
    assert max_rel_error(decoded, out.quantized) <= 1e-6
    with torch.no_grad():  # and both equal the reference's get_output_from_indices on the same codebook
        ref = torch_case["ref"]
        saved = ref._codebook.embed.clone()
        ref._codebook.embed.copy_(torch.from_numpy(np.array(variables["vq_stats"]["codebook"]))[None])
        expected = ref.get_output_from_indices(torch.from_numpy(np.array(out.indices)).long()).numpy()
        ref._codebook.embed.copy_(saved)
    assert max_rel_error(decoded, expected) <= F32_TOL


# ---- (e) usage and perplexity ----------------------------------------------------------------------


def test_usage_and_perplexity():
    config = vq.QuantizerConfig(dim=2, codebook_size=4, codebook_dim=2)
    module, variables = init_variables(config, (1, 1, 4, 2))
    variables = with_stats(variables, codebook=[[1, 0], [0, 1], [-1, 0], [0, -1]])
    x = jnp.array([[[[2.0, 0.1], [1.0, -0.2], [0.1, 3.0], [-1.0, 0.0]]]])  # codes 0, 0, 1, 2
    out = module.apply(variables, x, train=False)
    np.testing.assert_array_equal(out.indices, [[[0, 0, 1, 2]]])
    assert float(out.usage) == 0.75
    # p = (1/2, 1/4, 1/4, 0): entropy 1.5 ln 2, perplexity 2^1.5
    np.testing.assert_allclose(out.perplexity, 2**1.5, rtol=1e-6)
    assert set(out.metrics()) == {"vq_commit_loss", "vq_usage", "vq_perplexity"}
    usage, perplexity = vq.usage_and_perplexity(jnp.array([5.0, 5.0, 5.0, 5.0]))
    assert float(usage) == 1.0 and math.isclose(float(perplexity), 4.0, rel_tol=1e-6)


# ---- (f) dead-code restarts ------------------------------------------------------------------------


def test_dead_codes_restart_from_batch_vectors():
    eye = np.eye(3)
    codebook = np.concatenate([eye, -eye])  # six unit codes
    sizes = [10, 10, 10, 0.1, 0.1, 0.1]
    rs = np.random.RandomState(2)
    # Five tokens near codes 0-2 and three near code 4 (-e2): code 4's size becomes 0.08 + 0.2 * 3 = 0.68,
    # codes 3 and 5 decay to 0.08 < threshold 0.5 and are dead.
    x = np.concatenate([eye[[0, 1, 2, 0, 1]], -eye[[1, 1, 1]]]) + 0.05 * rs.randn(8, 3)
    x = jnp.asarray(x.reshape(1, 2, 4, 3), jnp.float32)
    runs = {}
    for threshold in (0.0, 0.5):
        config = vq.QuantizerConfig(dim=3, codebook_size=6, codebook_dim=3, dead_code_threshold=threshold)
        module, variables = init_variables(config, (1, 2, 4, 3))
        variables = with_stats(variables, codebook=codebook, embed_avg=codebook, cluster_size=sizes)
        runs[threshold] = train_step_fn(module)(variables, x, jax.random.key(3))
    (out0, plain), (out1, restarted) = runs[0.0], runs[0.5]
    np.testing.assert_array_equal(out0.indices, out1.indices)  # restarts act on the next step only
    np.testing.assert_array_equal(out1.indices.reshape(-1), [0, 1, 2, 0, 1, 4, 4, 4])
    dead = np.array([False, False, False, True, False, True])
    np.testing.assert_allclose(plain["cluster_size"], [8.4, 8.4, 8.2, 0.08, 0.68, 0.08], rtol=1e-6)
    for name in ("codebook", "embed_avg", "cluster_size"):  # live codes: exactly the plain EMA step
        np.testing.assert_array_equal(np.asarray(restarted[name])[~dead], np.asarray(plain[name])[~dead])
    batch = np.asarray(vq.l2norm(x.reshape(-1, 3)))
    new = np.asarray(restarted["codebook"])[dead]
    matches = [int(np.argmin(np.abs(batch - row).max(axis=1))) for row in new]
    np.testing.assert_allclose(new, batch[matches], atol=1e-7)  # each dead code is a batch vector
    assert len(set(matches)) == 2  # distinct vectors while dead codes <= tokens (reference: randperm)
    np.testing.assert_allclose(np.asarray(restarted["embed_avg"])[dead], 0.5 * new, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(restarted["cluster_size"])[dead], 0.5)


# ---- config, collections and errors ----------------------------------------------------------------


def test_variables_axes_and_initial_codebook():
    module = vq.CosineVectorQuantizer(vq.QuantizerConfig())
    boxed = jax.eval_shape(lambda: module.init({"params": jax.random.key(0)}, jnp.zeros((1, 2, 2, 320)), train=True))
    assert boxed["params"]["project_in"]["kernel"].names == ("vq_in", "code_dim")
    assert boxed["params"]["project_out"]["kernel"].names == ("code_dim", "vq_in")
    assert boxed["vq_stats"]["codebook"].names == ("codebook", "code_dim")
    assert boxed["vq_stats"]["embed_avg"].names == ("codebook", "code_dim")
    assert boxed["vq_stats"]["cluster_size"].names == ("codebook",)
    stats = meta.unbox(module.init({"params": jax.random.key(0)}, jnp.ones((1, 2, 2, 320)), train=True))["vq_stats"]
    assert stats["codebook"].shape == (256, 32)
    np.testing.assert_allclose(jnp.linalg.norm(stats["codebook"], axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(stats["embed_avg"], stats["codebook"])  # init with train=True: no EMA step
    np.testing.assert_array_equal(stats["cluster_size"], np.ones(256))


def test_train_needs_mutable_stats_and_config_checks():
    module, variables = init_variables(vq.QuantizerConfig(dim=8, codebook_size=4, codebook_dim=2), (1, 1, 1, 8))
    with pytest.raises(ValueError, match="mutable=\\['vq_stats'\\]"):
        module.apply(variables, jnp.ones((1, 1, 1, 8)), train=True)
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        module.apply(variables, jnp.ones((1, 1, 1, 7)), train=False)
    config = vq.QuantizerConfig(codebook_size=1024, dead_code_threshold=2.0)
    assert vq.QuantizerConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="decay"):
        vq.QuantizerConfig(decay=1.0)
    with pytest.raises(ValueError, match="unknown CosineVectorQuantizer config fields"):
        vq.QuantizerConfig.from_dict({"use_cosine_sim": True})
