"""Joint (MM-DiT) attention and the feed-forward block (diffusers ``Attention`` with
``JointAttnProcessor2_0``, and ``FeedForward(activation_fn="gelu-approximate")``)."""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from percov2_jax.models.layers import Dtype, RMSNorm, dense


def pallas_interpret() -> bool:
    """Whether Pallas TPU kernels run in interpret mode: ``PERCOV2_PALLAS_INTERPRET`` = 1/0, or by
    default when the default backend is not a TPU (the planner sets 0 to compile for TPUs
    from a CPU host)."""
    value = os.environ.get("PERCOV2_PALLAS_INTERPRET", "auto")
    if value not in ("auto", "0", "1"):
        raise ValueError(f"PERCOV2_PALLAS_INTERPRET must be auto, 0 or 1, got {value!r}")
    return jax.default_backend() != "tpu" if value == "auto" else value == "1"


# cuDNN's fused attention takes these head sizes (multiples of 8 up to 128, and 256) in 16-bit
# floats; elsewhere "auto" keeps XLA's softmax attention.
_CUDNN_HEAD_DIMS = (*range(8, 129, 8), 256)


def auto_implementation(dtype, head_dim: int, backend: str | None = None) -> str | None:
    """What ``implementation="auto"`` runs: ``"cudnn"`` on a GPU for bfloat16/float16 inputs with
    a head size the kernel takes, else None (XLA's softmax attention). Measured on an H200 at
    SD3-medium size (docs/performance.md): the cuDNN kernel halves the MM-DiT forward, within
    bf16 rounding of XLA's result. TPUs keep XLA's attention: "splash" is a choice to make after
    measuring (`experiments/accelerator_bench.py`)."""
    backend = backend or jax.default_backend()
    if backend in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim in _CUDNN_HEAD_DIMS:
        return "cudnn"
    return None


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    implementation: str | None = None,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    scale: float | None = None,
    is_causal: bool = False,
) -> jax.Array:
    """Softmax attention ``[B, Lq, N, Hd] x [B, Lk, N, Hd] -> [B, Lq, N, Hd]``.

    ``scale`` defaults to ``1/sqrt(Hd)``; ``bias`` is added to the logits (broadcast to
    ``[B, N, Lq, Lk]``); ``mask`` (bool, True = attend) and ``is_causal`` restrict them.
    Goes through ``jax.nn.dot_product_attention`` (so cuDNN/TPU kernels can be chosen), except
    for float64 inputs: that function computes its softmax in float32, so float64 (used for
    exactness checks against the reference) takes a plain einsum path.
    ``implementation="splash"`` uses the Pallas TPU splash kernel (``models/splash.py``; no
    ``bias``/``mask``/``is_causal``), in interpret mode when the default backend is not TPU.
    ``"auto"``: `auto_implementation` chooses at trace time.
    """
    if implementation == "auto":
        implementation = auto_implementation(q.dtype, q.shape[-1])
    if implementation == "splash":
        if bias is not None or mask is not None or is_causal:
            raise ValueError(
                "implementation='splash' supports only unmasked attention: got "
                f"bias={bias is not None}, mask={mask is not None}, is_causal={is_causal}"
            )
        if q.dtype != jnp.float64:
            from percov2_jax.models.splash import splash_attention

            return splash_attention(q, k, v, scale=scale, interpret=pallas_interpret())
    elif q.dtype != jnp.float64:
        plain = bias is None and mask is None and not is_causal
        if implementation in (None, "xla") and plain and _cpu_chunks(q.shape[1], k.shape[1]):
            return _query_chunked(q, k, v, scale)
        if implementation == "cudnn" and (q.shape[1] % 2 or k.shape[1] % 2):
            return _padded_to_even(q, k, v, bias, mask, scale, is_causal, implementation)
        return jax.nn.dot_product_attention(
            q, k, v, bias=bias, mask=mask, scale=scale, is_causal=is_causal, implementation=implementation
        )
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    logits = jnp.einsum("bqnd,bknd->bnqk", q, k) * scale
    if bias is not None:
        logits = logits + bias
    allowed = jnp.ones(logits.shape[-2:], bool)
    if is_causal:
        allowed = jnp.tril(allowed)
    if mask is not None:
        allowed = allowed & mask
    logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
    return jnp.einsum("bnqk,bknd->bqnd", jax.nn.softmax(logits, axis=-1), v)


# On CPU, attention over long sequences runs in blocks of this many queries (see _query_chunked),
# from this many query-key pairs on; shorter ones keep jax.nn.dot_product_attention.
CPU_QUERY_CHUNK = 128
CPU_CHUNKED_FROM = 256 * 256


def _cpu_chunks(lq: int, lk: int) -> bool:
    return lq > CPU_QUERY_CHUNK and lq * lk >= CPU_CHUNKED_FROM and jax.default_backend() == "cpu"


def _query_chunked(q: jax.Array, k: jax.Array, v: jax.Array, scale: float | None) -> jax.Array:
    """Unmasked softmax attention ``[B, Lq, N, Hd]``, computed ``CPU_QUERY_CHUNK`` queries at a
    time (``lax.map``; the last block zero-padded and sliced off), float32 logits and softmax.

    Why: on XLA:CPU, ``jax.nn.dot_product_attention`` materialises every ``[B, N, Lq, Lk]`` logit
    before the softmax, which at thousands of tokens leaves the caches; a block of 128 queries'
    logits stays in them. Measured on 2 cores: 3-4x faster at 1,552 tokens with 4 heads of 16 (the
    demo codec's MM-DiT and prior at 768x512), 2x at 410 tokens with 6 heads of 64 (the CPU
    benchmark's sampling) and at 1,024 tokens with one head of 64 (a VAE mid-block); gradients
    within 10% either way below 1,000 tokens, 2x faster at 1,024. It equals the unblocked result to
    float32 rounding (tests/test_splash_attention.py).
    """
    b, lq, n, hd = q.shape
    c = CPU_QUERY_CHUNK
    blocks = -(-lq // c)
    scale = 1.0 / np.sqrt(hd) if scale is None else scale
    qt = jnp.pad(q, [(0, 0), (0, blocks * c - lq), (0, 0), (0, 0)]).reshape(b, blocks, c, n, hd)
    kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, N, Lk, Hd]

    def block(qb):  # [B, c, N, Hd] -> [B, N, c, Hd]
        logits = jnp.einsum("bqnd,bnkd->bnqk", qb, kt, preferred_element_type=jnp.float32) * scale
        weights = jnp.exp(logits - logits.max(-1, keepdims=True))
        out = jnp.einsum("bnqk,bnkd->bnqd", weights, vt.astype(jnp.float32))
        return out / weights.sum(-1, keepdims=True)

    out = jax.lax.map(block, jnp.moveaxis(qt, 1, 0))  # [blocks, B, N, c, Hd]
    out = jnp.transpose(out, (1, 0, 3, 2, 4)).reshape(b, blocks * c, n, hd)
    return out[:, :lq].astype(q.dtype)


def _padded_to_even(q, k, v, bias, mask, scale, is_causal, implementation):
    """``jax.nn.dot_product_attention`` over query and key lengths padded to even ones.

    cuDNN's fused kernel has no backward pass for an odd query or key length: jax raises
    ``NotImplementedError: Unsupported sequence length`` at the first training step, while the
    forward takes any length (SD3's joint sequence, 1,024 image + 333 text tokens, is odd). An odd
    query length gets one zero row, sliced off the output; an odd key length gets one zero key that
    the kernel's own padding mask (``key_value_seq_lengths``) hides, so every real query attends to
    exactly its keys and the result equals unpadded attention. ``bias``/``mask`` are padded to
    match (0 / attend on the extra query row, hidden on the extra key column).
    """
    b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    pq, pk = lq % 2, lk % 2

    def rows(x, amount):
        return jnp.pad(x, [(0, 0), (0, amount)] + [(0, 0)] * (x.ndim - 2)) if amount else x

    def logits_shaped(x, fill):
        if x is None:
            return None
        pads = [(0, 0)] * (x.ndim - 2)
        pads += [(0, pq if x.shape[-2] == lq else 0), (0, pk if x.shape[-1] == lk else 0)]
        return jnp.pad(x, pads, constant_values=fill)

    out = jax.nn.dot_product_attention(
        rows(q, pq),
        rows(k, pk),
        rows(v, pk),
        bias=logits_shaped(bias, 0),
        mask=None if mask is None else logits_shaped(mask, True),
        scale=scale,
        is_causal=is_causal,
        query_seq_lengths=jnp.full((b,), lq, jnp.int32),
        key_value_seq_lengths=jnp.full((b,), lk, jnp.int32),
        implementation=implementation,
    )
    return out[:, :lq]


def _heads(x: jax.Array, num_heads: int) -> jax.Array:
    """``[B, L, N*Hd]`` to ``[B, L, N, Hd]``."""
    b, l, d = x.shape
    x = x.reshape(b, l, num_heads, d // num_heads)
    return nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_heads", None))


class Attention(nn.Module):
    """Multi-head attention over image tokens, optionally joint with context tokens.

    With ``joint=True`` the context stream has its own ``add_{q,k,v}_proj`` and the
    sequences are concatenated **[image, context]** before one softmax attention; the
    context output goes through ``to_add_out`` unless ``context_pre_only``.

    Inputs ``[B, L_img, D]`` and ``[B, L_ctx, D]``; returns ``(img_out, ctx_out or None)``.
    ``implementation``: None or "xla" (XLA's softmax attention), "cudnn" (GPU flash attention through
    ``jax.nn.dot_product_attention``) or "splash" (the Pallas TPU kernel, ``models/splash.py``).
    """

    dim: int
    num_heads: int
    head_dim: int
    joint: bool = False
    context_pre_only: bool = False
    qk_norm: str | None = None
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array | None = None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.num_heads * self.head_dim
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"qk_norm must be None or 'rms_norm', got {self.qk_norm!r}")

        def project(prefix_q, prefix_k, prefix_v, x, norm_q, norm_k):
            q = _heads(dense(inner, ("embed", "heads"), name=prefix_q, **kw)(x), self.num_heads)
            k = _heads(dense(inner, ("embed", "heads"), name=prefix_k, **kw)(x), self.num_heads)
            v = _heads(dense(inner, ("embed", "heads"), name=prefix_v, **kw)(x), self.num_heads)
            if self.qk_norm == "rms_norm":
                q = RMSNorm(self.head_dim, name=norm_q, **kw)(q)
                k = RMSNorm(self.head_dim, name=norm_k, **kw)(k)
            return q, k, v

        q, k, v = project("to_q", "to_k", "to_v", hidden_states, "norm_q", "norm_k")
        n_img = hidden_states.shape[1]
        if self.joint:
            if encoder_hidden_states is None:
                raise ValueError("joint attention needs encoder_hidden_states")
            cq, ck, cv = project(
                "add_q_proj", "add_k_proj", "add_v_proj", encoder_hidden_states, "norm_added_q", "norm_added_k"
            )
            q = jnp.concatenate([q, cq], axis=1)
            k = jnp.concatenate([k, ck], axis=1)
            v = jnp.concatenate([v, cv], axis=1)

        out = dot_product_attention(q, k, v, self.implementation)
        b, l = out.shape[:2]
        out = out.reshape(b, l, inner)
        img = dense(self.dim, ("heads", "embed"), name="to_out_0", **kw)(out[:, :n_img])
        ctx = None
        if self.joint:
            ctx = out[:, n_img:]
            if not self.context_pre_only:
                ctx = dense(self.dim, ("heads", "embed"), name="to_add_out", **kw)(ctx)
        return img, ctx


class GELUProjection(nn.Module):
    """diffusers ``GELU(approximate="tanh")``: ``gelu_tanh(proj(x))``."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = dense(self.features, ("embed", "mlp"), name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_mlp"))
        return jax.nn.gelu(x, approximate=True)


class FeedForward(nn.Module):
    """``net_2(gelu_tanh(net_0.proj(x)))`` with hidden width ``4 * dim``: ``[B, L, D] -> [B, L, D]``."""

    dim: int
    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = GELUProjection(self.dim * self.mult, name="net_0", **kw)(x)
        return dense(self.dim, ("mlp", "embed"), name="net_2", **kw)(x)
