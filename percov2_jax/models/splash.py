"""Pallas TPU splash attention behind the ``[B, L, N, Hd]`` interface of ``dot_product_attention``.

Only the unmasked, unbiased, non-causal case is handled (what the MM-DiT joint attention
needs). The kernel works on ``[N, L, Hd]`` per batch row with ``L`` a multiple of 128, so
sequences are zero-padded and the padded keys are cut off with segment ids. ``Hd`` is
zero-padded to a multiple of 128 too (exact: it changes no logit, and the extra output columns
are zero and dropped), since the kernel is only exercised upstream with ``Hd`` of 128/256 and
maxdiffusion pads SD3's 64 the same way. On a machine without a TPU the same kernel runs in
Pallas interpret mode (slow, for tests only).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

LANES = 128  # the kernel's sequence tiles are multiples of this
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def _pad_to(length: int) -> int:
    return -(-length // LANES) * LANES


def _block(length: int) -> int:
    """Largest of 512/256/128 dividing ``length`` (a multiple of 128)."""
    return next(b for b in (512, 256, LANES) if length % b == 0)


def block_sizes(
    q_len: int, kv_len: int, block: int | splash_kernel.BlockSizes | None = None
) -> splash_kernel.BlockSizes:
    """Forward and backward tiles for padded lengths ``q_len``/``kv_len``. ``block`` overrides:
    an int is used for every tile (it must divide both lengths), a ``BlockSizes`` is used as is."""
    if isinstance(block, splash_kernel.BlockSizes):
        return block
    bq, bkv = (block, block) if block else (_block(q_len), _block(kv_len))
    if q_len % bq or kv_len % bkv or bkv % LANES:
        raise ValueError(
            f"splash block {block} must be a multiple of {LANES} dividing the padded lengths q={q_len}, kv={kv_len}"
        )
    return splash_kernel.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )


def _local_attention(q, k, v, *, kv_len: int, block, interpret: bool):
    """Kernel on one shard: ``q [b, Lq_pad, n, D]`` (already scaled), ``k, v [b, Lk_pad, n_kv, D]``.

    Key segment ids are 0 for the first ``kv_len`` keys and 1 for the padding; every query has
    id 0, so no query (real or padded) sees a padded key and no softmax row is empty. Padded
    query rows are finite and are dropped by the caller; their zero cotangent adds nothing to
    the key/value gradients.
    """
    q_len, num_heads = q.shape[1], q.shape[2]
    k_len = k.shape[1]
    mask = splash_mask.MultiHeadMask([splash_mask.FullMask((q_len, k_len)) for _ in range(num_heads)])
    kernel = splash_kernel.make_splash_mha(
        mask, block_sizes=block_sizes(q_len, k_len, block), head_shards=1, q_seq_shards=1, interpret=interpret
    )
    segments = splash_kernel.SegmentIds(
        q=jnp.zeros((q_len,), jnp.int32), kv=(jnp.arange(k_len) >= kv_len).astype(jnp.int32)
    )
    heads_first = lambda x: jnp.swapaxes(x, 0, 1)  # [L, N, Hd] <-> [N, L, Hd]
    one_row = lambda q1, k1, v1: heads_first(
        kernel(heads_first(q1), heads_first(k1), heads_first(v1), segment_ids=segments)
    )
    return jax.vmap(one_row)(q, k, v)


def _mesh_specs(mesh, batch: int, heads: int, kv_heads: int) -> P | None:
    """``[B, L, N, Hd]`` partition spec: batch over the data/fsdp axes, heads over tensor (each only
    if present and dividing the size evenly; otherwise that dimension stays whole per device)."""
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    batch_axes = tuple(a for a in BATCH_AXES if a in sizes)
    if math.prod(sizes[a] for a in batch_axes) == 1 or batch % math.prod(sizes[a] for a in batch_axes):
        batch_axes = ()
    head_axis = HEAD_AXIS if HEAD_AXIS in sizes and sizes[HEAD_AXIS] > 1 else None
    if head_axis and (heads % sizes[head_axis] or kv_heads % sizes[head_axis]):
        head_axis = None
    return P(batch_axes or None, None, head_axis, None)


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float | None = None,
    interpret: bool = False,
    block: int | splash_kernel.BlockSizes | None = None,
) -> jax.Array:
    """Full (unmasked) softmax attention ``[B, Lq, N, Hd] x [B, Lk, N_kv, Hd] -> [B, Lq, N, Hd]``.

    Any float dtype (the kernel accumulates in float32); the output has ``q``'s dtype.
    ``scale`` defaults to ``1/sqrt(Hd)`` and is folded into ``q``. ``N`` must be a multiple of
    ``N_kv``. ``interpret=True`` runs the Pallas kernel in interpret mode (any backend).
    ``block`` overrides the tile sizes (see ``block_sizes``). Differentiable (the kernel's own
    custom VJP). Inside a ``jax.set_mesh`` context the kernel runs per shard under
    ``shard_map``: batch split over ``data``/``fsdp``, heads over ``tensor``.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"splash attention wants [B, L, N, Hd] inputs, got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(f"incompatible q/k/v shapes for splash attention: {q.shape}, {k.shape}, {v.shape}")
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    q_pad, kv_pad = _pad_to(q_len), _pad_to(kv_len)
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, _pad_to(head_dim) - head_dim)))
    qs = pad((q * scale).astype(q.dtype), q_pad)
    ks, vs = pad(k, kv_pad), pad(v, kv_pad)
    block_sizes(q_pad, kv_pad, block)  # fail early, outside any shard_map, on a bad override

    local = lambda q1, k1, v1: _local_attention(q1, k1, v1, kv_len=kv_len, block=block, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        spec = _mesh_specs(mesh, batch, heads, kv_heads)
        local = jax.shard_map(local, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    out = local(qs, ks, vs)
    return out[:, :q_len, :, :head_dim].astype(q.dtype)
