"""The Pallas splash-attention kernel (``implementation="splash"``) against XLA attention.

On CPU the kernel runs in Pallas interpret mode: the same kernel body (tiling, online softmax,
segment-id masking, custom VJP kernels) evaluated with ordinary XLA ops, so it checks the
wrapper's padding/scaling/layout and the kernel's numerics, not Mosaic compilation or speed.
Shapes are tiny and sequence lengths deliberately not multiples of 128.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xla_env

from percov2_jax.models import attention
from percov2_jax.models.splash import splash_attention

B, L, N, HD = 2, 200, 2, 64  # L pads to 256 (one 256 tile)
# float32 error observed on CPU is ~1e-6 of the output/gradient scale; 1e-5 leaves margin only
# for summation-order differences (the kernel accumulates blockwise with an online softmax).
RTOL_SCALE = 1e-5


def _qkv(seed=0, lq=L, lk=L):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(kq, (B, lq, N, HD), jnp.float32),
        jax.random.normal(kk, (B, lk, N, HD), jnp.float32),
        jax.random.normal(kv, (B, lk, N, HD), jnp.float32),
    )


def _reference(q, k, v, scale=None):
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")


def _close(actual, expected, rtol_scale=RTOL_SCALE):
    expected = np.asarray(expected)
    err = float(np.max(np.abs(np.asarray(actual) - expected)))
    assert err <= rtol_scale * float(np.max(np.abs(expected))), (err, float(np.max(np.abs(expected))))
    return err


@pytest.mark.parametrize("block", [None, 128])  # one 256 tile; two 128 tiles per axis
def test_forward_matches_xla(block):
    q, k, v = _qkv()
    out = jax.jit(lambda q, k, v: splash_attention(q, k, v, interpret=True, block=block))(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    _close(out, _reference(q, k, v))


def test_cross_lengths_and_scale():
    q, k, v = _qkv(1, lq=130, lk=70)  # Lq pads to 256, Lk to 128: padded queries see only real keys
    out = jax.jit(lambda q, k, v: splash_attention(q, k, v, scale=0.3, interpret=True))(q, k, v)
    assert np.all(np.isfinite(np.asarray(out)))
    _close(out, _reference(q, k, v, scale=0.3))


def test_gradients_match_xla():
    q, k, v = _qkv(2)
    w = jax.random.normal(jax.random.key(3), q.shape)  # a generic cotangent

    def loss(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)))

    got = loss(lambda q, k, v: splash_attention(q, k, v, interpret=True))(q, k, v)
    want = loss(_reference)(q, k, v)
    for name, g, r in zip("qkv", got, want):
        assert g.shape == r.shape, name
        _close(g, r)


def test_joint_attention_module():
    dim, heads, head_dim, n_img, n_ctx = 32, 2, 64, 96, 41  # 137 joint tokens
    kx, kc, kp = jax.random.split(jax.random.key(4), 3)
    x = jax.random.normal(kx, (B, n_img, dim))
    ctx = jax.random.normal(kc, (B, n_ctx, dim))
    make = lambda impl: attention.Attention(
        dim=dim, num_heads=heads, head_dim=head_dim, joint=True, qk_norm="rms_norm", implementation=impl
    )
    params = make(None).init(kp, x, ctx)
    ref_img, ref_ctx = jax.jit(make(None).apply)(params, x, ctx)
    img, out_ctx = jax.jit(make("splash").apply)(params, x, ctx)
    assert img.shape == (B, n_img, dim) and out_ctx.shape == (B, n_ctx, dim)
    _close(img, ref_img)
    _close(out_ctx, ref_ctx)


@pytest.mark.parametrize(
    "kwargs", [dict(mask=jnp.ones((L, L), bool)), dict(bias=jnp.zeros((1, N, L, L))), dict(is_causal=True)]
)
def test_splash_rejects_mask_bias_causal(kwargs):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="splash"):
        attention.dot_product_attention(q, k, v, "splash", **kwargs)


def test_bad_block_override():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="block"):
        splash_attention(q, k, v, interpret=True, block=192)


MESH_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from percov2_jax import sharding
    from percov2_jax.models import splash

    mesh = sharding.make_mesh(data=2, fsdp=1, tensor=2)
    keys = jax.random.split(jax.random.key(0), 4)
    spec = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    q, k, v = (jax.device_put(jax.random.normal(key, (2, 200, 2, 64)), spec) for key in keys[:3])
    w = jax.random.normal(keys[3], q.shape)
    local_shapes = []
    kernel_on_shard = splash._local_attention
    splash._local_attention = lambda q, *a, **kw: local_shapes.append(q.shape) or kernel_on_shard(q, *a, **kw)
    grads = lambda fn: jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)))(q, k, v)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda q, k, v: splash.splash_attention(q, k, v, interpret=True))(q, k, v)
        got = grads(lambda q, k, v: splash.splash_attention(q, k, v, interpret=True))
    want = grads(jax.nn.dot_product_attention)
    assert set(local_shapes) == {(1, 256, 1, 128)}, local_shapes  # one batch row, one head per device (Hd padded)
    rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
    errors = [rel(out, jax.nn.dot_product_attention(q, k, v))] + [rel(g, r) for g, r in zip(got, want)]
    assert max(errors) <= RTOL_SCALE, errors
    print("mesh ok", errors)
"""
).replace("RTOL_SCALE", repr(RTOL_SCALE))


@pytest.mark.slow
def test_shard_map_on_four_devices():
    """Under ``jax.set_mesh`` (data 2 x tensor 2 virtual CPU devices) the kernel runs per shard
    and the forward and gradients still match XLA attention."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        XLA_FLAGS=xla_env.xla_flags(4),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    )
    result = subprocess.run([sys.executable, "-c", MESH_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert "mesh ok" in result.stdout


def test_auto_chooses_cudnn_on_gpus_in_16_bit_floats_only():
    """The default ``"auto"``: cuDNN's kernel for bf16/fp16 on a GPU with a head size it takes,
    XLA's softmax attention for everything else; on CPU it is exactly XLA's result."""
    choose = attention.auto_implementation
    assert choose(jnp.bfloat16, 64, "gpu") == choose(jnp.float16, 128, "cuda") == "cudnn"
    assert choose(jnp.float32, 64, "gpu") is None and choose(jnp.bfloat16, 72 + 1, "gpu") is None
    assert choose(jnp.bfloat16, 64, "tpu") is None and choose(jnp.bfloat16, 64, "cpu") is None
    q, k, v = _qkv()
    np.testing.assert_array_equal(
        attention.dot_product_attention(q, k, v, "auto"), attention.dot_product_attention(q, k, v, None)
    )


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [(37, 37), (36, 21), (37, 20)])
def test_odd_lengths_padded_for_cudnn_equal_unpadded_attention(lengths, causal):
    """cuDNN's kernel has no backward pass for odd lengths, so its path pads them to even ones
    (a zero query row sliced off, a zero key hidden by the padding mask). The padded call, run
    here through XLA's kernel (which takes the same sequence-length arguments), must equal
    unpadded attention in value and in every gradient, with a boolean mask too."""
    lq, lk = lengths
    q, k, v = _qkv(3, lq=lq, lk=lk)
    mask = jax.random.bernoulli(jax.random.key(4), 0.7, (B, 1, lq, lk)).at[..., 0].set(True)
    cot = jax.random.normal(jax.random.key(5), q.shape)
    for m in (None, mask):
        is_causal = causal and lq == lk

        def plain(q, k, v, m=m, is_causal=is_causal):
            return jnp.vdot(cot, jax.nn.dot_product_attention(q, k, v, mask=m, is_causal=is_causal))

        def padded(q, k, v, m=m, is_causal=is_causal):
            out = attention._padded_to_even(q, k, v, None, m, None, is_causal, "xla")
            assert out.shape == q.shape
            return jnp.vdot(cot, out)

        want, got = jax.value_and_grad(plain, (0, 1, 2))(q, k, v), jax.value_and_grad(padded, (0, 1, 2))(q, k, v)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
        for g, w in zip(got[1], want[1], strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()))


def test_cpu_attention_in_query_blocks_equals_unblocked_attention():
    """Long unmasked sequences on CPU run in blocks of queries (``lax.map``); in value and gradients
    that equals ``jax.nn.dot_product_attention`` to float32 rounding, with a last partial block."""
    lq, lk = 600, 520  # 600 = 4 blocks of 128 + 88; 600 * 520 pairs take the blocked path
    assert attention._cpu_chunks(lq, lk) and not attention._cpu_chunks(64, 64)
    q, k, v = (x[:, :, :1, :16] for x in _qkv(6, lq=lq, lk=lk))
    fn = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, "auto", scale=0.3))
    assert "stablehlo.while" in fn.lower(q, k, v).as_text()  # the blocked path
    cot = jax.random.normal(jax.random.key(7), q.shape)
    want = jax.value_and_grad(lambda *a: jnp.vdot(cot, jax.nn.dot_product_attention(*a, scale=0.3)), (0, 1, 2))
    got = jax.value_and_grad(lambda *a: jnp.vdot(cot, fn(*a)), (0, 1, 2))
    (w, w_grads), (g, g_grads) = want(q, k, v), got(q, k, v)
    np.testing.assert_allclose(fn(q, k, v), jax.nn.dot_product_attention(q, k, v, scale=0.3), rtol=0, atol=2e-6)
    np.testing.assert_allclose(g, w, rtol=1e-5)
    for a, b in zip(g_grads, w_grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.abs(b).max()))
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    np.testing.assert_allclose(
        np.asarray(attention.dot_product_attention(*bf16, None), np.float32),
        np.asarray(jax.nn.dot_product_attention(*bf16), np.float32),
        rtol=0,
        atol=2e-2,
    )
