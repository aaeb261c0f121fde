"""Adaptive layer norms of the SD3 MM-DiT (diffusers ``normalization.py``).

All take the conditioning vector ``emb [B, D]`` and tokens ``x [B, L, D]``; the inner
LayerNorm has no affine parameters and eps 1e-6. Chunk orders follow diffusers exactly.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from percov2_jax.models.layers import Dtype, dense, layer_norm, modulate


def _modulation(dim: int, num_chunks: int, emb: jax.Array, dtype: Dtype, param_dtype: Dtype) -> list[jax.Array]:
    """``linear(silu(emb))`` split into ``num_chunks`` vectors ``[B, dim]`` (call inside a compact method)."""
    out = dense(num_chunks * dim, ("embed", "adaln"), name="linear", dtype=dtype, param_dtype=param_dtype)(nn.silu(emb))
    return jnp.split(out, num_chunks, axis=-1)


class AdaLayerNormZero(nn.Module):
    """Chunks (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp).

    Returns ``(x̂, gate_msa, shift_mlp, scale_mlp, gate_mlp)``.
    """

    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation(
            self.dim, 6, emb, self.dtype, self.param_dtype
        )
        return modulate(layer_norm(x), shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


class SD35AdaLayerNormZeroX(nn.Module):
    """Dual-attention variant with nine chunks (..., shift_msa2, scale_msa2, gate_msa2).

    Returns ``(x̂, gate_msa, shift_mlp, scale_mlp, gate_mlp, x̂2, gate_msa2)``.
    """

    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array):
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2, gate_msa2) = (
            _modulation(self.dim, 9, emb, self.dtype, self.param_dtype)
        )
        normed = layer_norm(x)
        return (
            modulate(normed, shift_msa, scale_msa),
            gate_msa,
            shift_mlp,
            scale_mlp,
            gate_mlp,
            modulate(normed, shift_msa2, scale_msa2),
            gate_msa2,
        )


class AdaLayerNormContinuous(nn.Module):
    """Two chunks in **(scale, shift)** order; returns ``x̂``."""

    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        scale, shift = _modulation(self.dim, 2, emb, self.dtype, self.param_dtype)
        return modulate(layer_norm(x), shift, scale)
