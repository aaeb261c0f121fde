"""The CLIP vision tower with projection (transformers ``CLIPVisionModelWithProjection``) in Flax.

Used for the CLIP score (``percov2_jax.metrics.clip_score``); torchmetrics' default model is
OpenAI's ViT-L/14 (``openai/clip-vit-large-patch14``: ``quick_gelu``, 224 px, patch 14).

``pixel_values [B, H, W, C]`` (NHWC, already preprocessed, ``H = W = image_size``)
-> patch conv (no bias) -> ``[class_embedding, patches] + position_embedding``
-> ``pre_layrnorm`` -> bidirectional encoder -> ``last_hidden_state``;
``post_layernorm(last_hidden_state[:, 0])`` -> ``visual_projection`` (no bias) -> ``image_embeds``.

Parameter names mirror transformers (``vision_model.encoder.layers.3.self_attn.q_proj`` ->
``vision_model/encoder/layers_3/self_attn/q_proj``), so the text tower's rule table applies.
The encoder is the text tower's ``clip.CLIPEncoder`` with ``causal=False``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from percov2_jax.models.clip import CLIPEncoder
from percov2_jax.models.layers import (
    Dtype,
    LayerNorm,
    activation,
    config_from_dict,
    config_from_transformers,
    config_to_dict,
    dense,
    embed,
)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The architecture fields of transformers' ``CLIPVisionConfig`` (names and defaults as there)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"  # OpenAI CLIP; OpenCLIP / SigLIP-style exports use "gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        activation(self.hidden_act)  # raises for unsupported activations
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} not divisible by patch_size {self.patch_size}")

    @property
    def num_positions(self) -> int:
        """Patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CLIPVisionConfig:
        return config_from_dict(cls, d, "CLIPVisionModelWithProjection")

    @classmethod
    def from_transformers(cls, d: Mapping[str, Any]) -> CLIPVisionConfig:
        """From a transformers config.json dict: a ``CLIPVisionConfig`` or a full ``CLIPConfig``.

        In a ``CLIPConfig`` the projection width that ``CLIPModel.visual_projection`` uses is the
        top-level ``projection_dim``; ``vision_config.projection_dim`` may differ and is ignored.
        """
        if "vision_config" in d:
            vision = dict(d["vision_config"])
            if "projection_dim" in d:
                vision["projection_dim"] = d["projection_dim"]
            d = vision
        return config_from_transformers(cls, d)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self, "CLIPVisionModelWithProjection")


@flax.struct.dataclass
class CLIPVisionOutput:
    """``image_embeds [B, P]`` (projected), ``pooled [B, D]`` (``post_layernorm`` of the class
    token), ``last_hidden_state [B, 1 + N, D]`` (the encoder output, *not* post-normalised, as
    transformers), ``hidden_states``: the pre-normalised embeddings then every layer's output."""

    image_embeds: jax.Array
    pooled: jax.Array
    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...]


class CLIPVisionEmbeddings(nn.Module):
    """``[B, H, W, C] -> [B, 1 + (H/p)(W/p), D]``: class token then patches (row-major), plus positions."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = pixel_values.shape
        if (h, w) != (cfg.image_size, cfg.image_size) or c != cfg.num_channels:
            raise ValueError(
                f"pixel_values {pixel_values.shape} do not match the model's "
                f"[B, {cfg.image_size}, {cfg.image_size}, {cfg.num_channels}] (NHWC, preprocessed)"
            )
        x = nn.Conv(
            cfg.hidden_size,
            (cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",
            use_bias=False,
            name="patch_embedding",
            **kw,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, "conv_in", "embed")),
        )(pixel_values)
        x = x.reshape(b, -1, cfg.hidden_size)  # row-major patches, as torch's flatten(2)
        cls = self.param(
            "class_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
            (cfg.hidden_size,),
            self.param_dtype,
        )
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, cfg.hidden_size)), x], axis=1)
        positions = embed(cfg.num_positions, cfg.hidden_size, ("pos", "embed"), name="position_embedding", **kw)(
            jnp.arange(cfg.num_positions)[None]
        )
        return x + positions


class CLIPVisionTransformer(nn.Module):
    """transformers' ``CLIPVisionModel`` body: embeddings, ``pre_layrnorm``, encoder, pooled class token."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, pixel_values: jax.Array):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = CLIPVisionEmbeddings(cfg, name="embeddings", **kw)(pixel_values)
        x = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, name="pre_layrnorm", **kw)(x)  # sic, transformers' name
        hidden_states = CLIPEncoder(cfg, implementation=self.implementation, causal=False, name="encoder", **kw)(x)
        last = hidden_states[-1]
        pooled = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, name="post_layernorm", **kw)(last[:, 0])
        return last, pooled, hidden_states


class CLIPVisionModelWithProjection(nn.Module):
    """``__call__(pixel_values [B, H, W, C]) -> CLIPVisionOutput`` (``image_embeds [B, projection_dim]``)."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_implementation: str | None = None

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
        cfg = self.config
        last, pooled, hidden_states = CLIPVisionTransformer(
            cfg, self.dtype, self.param_dtype, self.attention_implementation, name="vision_model"
        )(pixel_values)
        image_embeds = dense(
            cfg.projection_dim,
            ("embed", "proj"),
            name="visual_projection",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(pooled)
        return CLIPVisionOutput(image_embeds, pooled, last, hidden_states)


def example_inputs(config: CLIPVisionConfig, batch: int = 1):
    return (jnp.zeros((batch, config.image_size, config.image_size, config.num_channels), jnp.float32),)
