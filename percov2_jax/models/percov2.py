"""The PerCoV2 stage-1 model: hyper-encoder + VQ (the local code z_l) and the SD3 MM-DiT whose
patch embedding is widened to take the upsampled token features next to the noisy latent.

Token conditioning (docs/method.md §3.3, an inference: the paper does not state it):
the quantized hyper-latent ``[B, s_h, s_w, C]`` is nearest-upsampled to the latent grid and
concatenated to x_t, so the MM-DiT sees ``16 + C`` input channels. ``widen_patch_embedding``
turns pretrained SD3 weights into the widened layout by zero-filling the new input slices, so
the model equals pretrained SD3 at initialisation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from percov2_jax.models.hyper_encoder import HyperEncoder, HyperEncoderConfig
from percov2_jax.models.layers import Dtype
from percov2_jax.models.mmdit import SD3Transformer2DModel, SD3TransformerConfig
from percov2_jax.models.quantizer import CosineVectorQuantizer, QuantizerConfig

PATCH_KERNEL = ("pos_embed", "proj", "kernel")


@dataclasses.dataclass(frozen=True)
class PerCoV2Config:
    """``transformer`` is the *pretrained* SD3 config (``in_channels`` = latent channels); the
    model builds the widened one itself. ``learned_null_text`` adds a learned caption embedding
    for dropped captions (PerCo's choice) instead of the empty-prompt embedding (SD3's)."""

    transformer: SD3TransformerConfig
    hyper_encoder: HyperEncoderConfig
    quantizer: QuantizerConfig
    learned_null_text: bool = False
    text_length: int = 333  # 77 CLIP + 256 T5 tokens, the diffusers default; used by the learned null text

    def __post_init__(self):
        problems = []
        if self.hyper_encoder.in_channels != self.transformer.in_channels:
            problems.append(
                f"hyper_encoder.in_channels ({self.hyper_encoder.in_channels}) must equal the latent "
                f"channels transformer.in_channels ({self.transformer.in_channels})"
            )
        if self.quantizer.dim != self.hyper_encoder.out_channels:
            problems.append(
                f"quantizer.dim ({self.quantizer.dim}) must equal hyper_encoder.out_channels "
                f"({self.hyper_encoder.out_channels})"
            )
        if problems:
            raise ValueError("invalid PerCoV2Config: " + "; ".join(problems))

    @property
    def latent_channels(self) -> int:
        return self.transformer.in_channels

    @property
    def conditioned_transformer(self) -> SD3TransformerConfig:
        """The MM-DiT config with ``latent + token-feature`` input channels."""
        return dataclasses.replace(
            self.transformer,
            in_channels=self.latent_channels + self.hyper_encoder.out_channels,
            out_channels=self.transformer.out_channels,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "transformer": self.transformer.to_dict(),
            "hyper_encoder": self.hyper_encoder.to_dict(),
            "quantizer": self.quantizer.to_dict(),
            "learned_null_text": self.learned_null_text,
            "text_length": self.text_length,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PerCoV2Config:
        return cls(
            SD3TransformerConfig.from_dict(d["transformer"]),
            HyperEncoderConfig.from_dict(d["hyper_encoder"]),
            QuantizerConfig.from_dict(d["quantizer"]),
            bool(d.get("learned_null_text", False)),
            int(d.get("text_length", 333)),
        )


def upsample_tokens(features: jax.Array, height: int, width: int) -> jax.Array:
    """Nearest upsampling ``[B, s_h, s_w, C]`` -> ``[B, height, width, C]`` (integer factors only)."""
    b, sh, sw, c = features.shape
    if height % sh or width % sw or height // sh != width // sw:
        raise ValueError(f"latent grid {height}x{width} is not an equal integer multiple of the token grid {sh}x{sw}")
    f = height // sh
    return jnp.repeat(jnp.repeat(features, f, axis=1), f, axis=2)


class PerCoV2(nn.Module):
    """Params: ``hyper_encoder``, ``quantizer``, ``transformer`` (diffusers names), optionally
    ``null_text``; mutable collection ``vq_stats`` (codebook and EMA statistics)."""

    config: PerCoV2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_implementation: str | None = None

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.hyper_encoder = HyperEncoder(self.config.hyper_encoder, **kw)
        self.quantizer = CosineVectorQuantizer(self.config.quantizer, dtype=jnp.float32, param_dtype=self.param_dtype)
        self.transformer = SD3Transformer2DModel(
            self.config.conditioned_transformer,
            scan_layers=self.scan_layers,
            remat_policy=self.remat_policy,
            attention_implementation=self.attention_implementation,
            **kw,
        )
        if self.config.learned_null_text:
            t = self.config.transformer
            self.null_text = NullText(
                self.config.text_length, t.joint_attention_dim, t.pooled_projection_dim, param_dtype=self.param_dtype
            )

    def hyper_latent_tokens(self, latents: jax.Array, *, train: bool = False):
        """Latents ``[B, h, w, 16]`` -> ``QuantizerOutput`` (quantized features, int32 indices ``[B, s_h, s_w]``)."""
        return self.quantizer(self.hyper_encoder(latents).astype(jnp.float32), train=train)

    def token_features(self, indices: jax.Array) -> jax.Array:
        """Token indices ``[B, s_h, s_w]`` -> quantized features ``[B, s_h, s_w, C]`` (the decoder's side)."""
        return self.quantizer.decode_indices(indices)

    def velocity(
        self,
        noisy_latents: jax.Array,
        token_features: jax.Array,
        encoder_hidden_states: jax.Array,
        pooled_projections: jax.Array,
        timestep: jax.Array,
    ) -> jax.Array:
        """Predicted velocity ``[B, h, w, 16]`` for x_t ``[B, h, w, 16]`` and timestep ``[B]`` (sigma * 1000)."""
        _, h, w, _ = noisy_latents.shape
        cond = upsample_tokens(token_features, h, w).astype(noisy_latents.dtype)
        x = jnp.concatenate([noisy_latents, cond], axis=-1)
        return self.transformer(x, encoder_hidden_states, pooled_projections, timestep)

    def null_text_embeddings(self, batch: int):
        """The learned dropped-caption embeddings ``([B, L, D], [B, P])`` (``learned_null_text`` only)."""
        if not self.config.learned_null_text:
            raise ValueError("this PerCoV2 config has no learned null text (learned_null_text=False)")
        return self.null_text(batch)

    def __call__(
        self, latents, noisy_latents, encoder_hidden_states, pooled_projections, timestep, *, train: bool = False
    ):
        """Training forward: returns ``(velocity [B, h, w, 16], QuantizerOutput)``."""
        q = self.hyper_latent_tokens(latents, train=train)
        v = self.velocity(noisy_latents, q.quantized, encoder_hidden_states, pooled_projections, timestep)
        if self.config.learned_null_text and self.is_initializing():
            self.null_text(1)
        return v, q


class NullText(nn.Module):
    """A learned caption embedding used when the caption is dropped: ``[B, L, D]`` and ``[B, P]``."""

    length: int
    features: int
    pooled_features: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, batch: int):
        init = nn.initializers.normal(0.02)
        seq = self.param(
            "encoder_hidden_states",
            nn.with_logical_partitioning(init, (None, "cond_in")),
            (self.length, self.features),
            self.param_dtype,
        )
        pooled = self.param(
            "pooled_projections",
            nn.with_logical_partitioning(init, ("cond_in",)),
            (self.pooled_features,),
            self.param_dtype,
        )
        return (jnp.broadcast_to(seq, (batch,) + seq.shape), jnp.broadcast_to(pooled, (batch,) + pooled.shape))


def widen_patch_embedding(transformer_params: Mapping[str, Any], extra_channels: int) -> dict[str, Any]:
    """Pretrained SD3 transformer params -> the widened layout: the patch-embedding kernel
    ``[p, p, 16, D]`` becomes ``[p, p, 16 + extra, D]`` with zeros in the new input slices."""
    params = jax.tree_util.tree_map(lambda x: x, dict(transformer_params))
    node = params
    for key in PATCH_KERNEL[:-1]:
        if key not in node:
            raise KeyError(f"transformer params have no {'/'.join(PATCH_KERNEL)}")
        node[key] = dict(node[key])
        node = node[key]
    kernel = node[PATCH_KERNEL[-1]]
    if kernel.ndim != 4:
        raise ValueError(f"{'/'.join(PATCH_KERNEL)} must be [p, p, C_in, D], got {kernel.shape}")
    pad = jnp.zeros(kernel.shape[:2] + (extra_channels,) + kernel.shape[3:], kernel.dtype)
    node[PATCH_KERNEL[-1]] = jnp.concatenate([kernel, pad], axis=2)
    return params


def example_inputs(config: PerCoV2Config, batch: int = 1, height: int = 64, width: int = 64, text_length: int = 8):
    """Zero inputs for ``init``: latents of an image ``height x width`` (pixels)."""
    h, w = height // 8, width // 8
    t = config.transformer
    latents = jnp.zeros((batch, h, w, config.latent_channels), jnp.float32)
    return (
        latents,
        latents,
        jnp.zeros((batch, text_length, t.joint_attention_dim), jnp.float32),
        jnp.zeros((batch, t.pooled_projection_dim), jnp.float32),
        jnp.zeros((batch,), jnp.float32),
    )


def count_params(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
