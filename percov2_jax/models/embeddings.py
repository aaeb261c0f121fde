"""SD3 input embeddings: patchifier with the cropped sin-cos position table, and the
timestep + pooled-text conditioning vector (diffusers ``PatchEmbed`` and
``CombinedTimestepTextProjEmbeddings``)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from percov2_jax.models.layers import Dtype, _boxed, conv, dense


def sincos_pos_table(embed_dim: int, grid_size: int, base_size: int, interpolation_scale: float = 1.0) -> np.ndarray:
    """The SD3 2-D sin-cos position table ``[grid_size**2, embed_dim]`` (float32).

    Row-major over (row, col). The first half of the channels encodes the column (x), the
    second half the row (y); each half is ``[sin, cos]``. Grid coordinates are
    ``arange(M) / (M / base_size) / interpolation_scale`` in float32, frequencies in float64,
    exactly as diffusers' ``get_2d_sincos_pos_embed``.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4, got {embed_dim}")
    coords = (
        np.arange(grid_size, dtype=np.float32) / np.float32(grid_size / base_size) / np.float32(interpolation_scale)
    )
    cols, rows = np.meshgrid(coords, coords, indexing="xy")  # cols[i, j] = coords[j]

    def one_axis(pos: np.ndarray) -> np.ndarray:
        half = embed_dim // 4
        omega = np.arange(half, dtype=np.float64) / (embed_dim / 4.0)
        omega = 1.0 / 10000**omega
        out = np.outer(pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate([one_axis(cols), one_axis(rows)], axis=1)
    return table.astype(np.float32)


def crop_pos_table(table: jax.Array, max_size: int, height: int, width: int) -> jax.Array:
    """Centre crop of the ``[1, M*M, D]`` table to ``[1, height*width, D]``."""
    if height > max_size or width > max_size:
        raise ValueError(
            f"token grid {height}x{width} exceeds pos_embed_max_size={max_size}; "
            f"latents may be at most {max_size} patches on each side"
        )
    top = (max_size - height) // 2
    left = (max_size - width) // 2
    spatial = table.reshape(1, max_size, max_size, -1)[:, top : top + height, left : left + width, :]
    return spatial.reshape(1, height * width, -1)


class PatchEmbed(nn.Module):
    """Patchify NHWC latents ``[B, H, W, C]`` into tokens ``[B, (H/p)(W/p), D]`` plus positions.

    The position table is the parameter ``pos_embed`` of shape ``[1, M*M, D]`` (diffusers
    keeps it as a persistent buffer and it is loaded from checkpoints the same way); it is
    initialised to the sin-cos table. Training code should keep it frozen.
    """

    patch_size: int
    embed_dim: int
    pos_embed_max_size: int
    base_size: int
    interpolation_scale: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, latents: jax.Array) -> jax.Array:
        b, h, w, _ = latents.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not a multiple of patch_size={p}")
        x = conv(
            self.embed_dim,
            p,
            strides=p,
            padding="VALID",
            name="proj",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            axes=(None, None, "patch_in", "embed"),
        )(latents)
        x = x.reshape(b, (h // p) * (w // p), self.embed_dim)
        m = self.pos_embed_max_size

        def init_table(key, shape, dtype):
            del key
            table = sincos_pos_table(self.embed_dim, m, self.base_size, self.interpolation_scale)
            return jnp.asarray(table, dtype).reshape(shape)

        table = self.param(
            "pos_embed", _boxed(init_table, (None, "pos", "embed")), (1, m * m, self.embed_dim), self.param_dtype
        )
        pos = crop_pos_table(table, m, h // p, w // p)
        return (x + pos.astype(x.dtype)).astype(self.dtype)


def timestep_sinusoid(timesteps: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """``[B]`` timesteps (0..1000 scale) to ``[B, dim]`` float32 features, ``[cos, sin]`` order.

    diffusers ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)``.
    """
    half = dim // 2
    # Frequencies as a host constant: float32 exponents as in diffusers, exp in float64 rounded
    # once to float32, so every backend uses the same table (XLA's float32 exp differs from
    # torch's by one ulp on 17 of the 128 SD3 frequencies; this table on 2).
    exponent = (np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)) / np.float32(half)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TwoLayerEmbedder(nn.Module):
    """``linear_2(silu(linear_1(x)))``: diffusers ``TimestepEmbedding`` and
    ``PixArtAlphaTextProjection`` (act ``silu``) share this shape and these names."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = dense(self.features, ("cond_in", "mlp"), name="linear_1", **kw)(x)
        x = nn.silu(x)
        return dense(self.features, ("mlp", "embed"), name="linear_2", **kw)(x)


class CombinedTimestepTextProjEmbeddings(nn.Module):
    """``temb = TimestepEmbedding(sinusoid(t)) + TextProjection(pooled)``: ``[B, D]``."""

    embedding_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, timestep: jax.Array, pooled_projection: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        t_feat = timestep_sinusoid(timestep, 256).astype(self.dtype)
        t_emb = TwoLayerEmbedder(self.embedding_dim, name="timestep_embedder", **kw)(t_feat)
        p_emb = TwoLayerEmbedder(self.embedding_dim, name="text_embedder", **kw)(pooled_projection.astype(self.dtype))
        return t_emb + p_emb
