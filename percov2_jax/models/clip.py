"""The CLIP text encoder with projection (transformers ``CLIPTextModelWithProjection``) in Flax.

Covers CLIP-L/14 (``quick_gelu``) and OpenCLIP bigG/14 (``gelu``) as SD3 packages them
(``text_encoder``, ``text_encoder_2``). Parameter names mirror transformers
(``text_model.encoder.layers.3.self_attn.q_proj`` -> ``text_model/encoder/layers_3/self_attn/q_proj``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from percov2_jax.models.attention import dot_product_attention
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
class CLIPTextConfig:
    """The architecture fields of transformers' ``CLIPTextConfig`` (names and defaults as there)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407  # 2 selects the legacy pooling (argmax of the ids), as transformers does

    def __post_init__(self):
        activation(self.hidden_act)  # raises for unsupported activations
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CLIPTextConfig:
        return config_from_dict(cls, d, "CLIPTextModelWithProjection")

    @classmethod
    def from_transformers(cls, d: Mapping[str, Any]) -> CLIPTextConfig:
        """From a transformers config.json dict (its other, generic fields are not architecture).
        A full ``CLIPModel`` config's projection width is its top-level ``projection_dim``."""
        if "text_config" not in d:
            return config_from_transformers(cls, d)
        text = dict(d["text_config"])
        if "projection_dim" in d:
            text["projection_dim"] = d["projection_dim"]
        return config_from_transformers(cls, text)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self, "CLIPTextModelWithProjection")


@flax.struct.dataclass
class CLIPTextOutput:
    """``text_embeds [B, P]`` (projected pooled), ``pooled [B, D]``, ``last_hidden_state [B, T, D]``
    (after the final LayerNorm), ``hidden_states``: embeddings then every layer's output
    (``num_hidden_layers + 1`` arrays ``[B, T, D]``, before the final LayerNorm; SD3 uses ``[-2]``)."""

    text_embeds: jax.Array
    pooled: jax.Array
    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...]


class CLIPTextEmbeddings(nn.Module):
    """``token_embedding(ids) + position_embedding(arange(T))``: ``[B, T] -> [B, T, D]``."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        t = input_ids.shape[1]
        if t > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {t} exceeds max_position_embeddings={cfg.max_position_embeddings}")
        tokens = embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), name="token_embedding", **kw)(input_ids)
        positions = embed(
            cfg.max_position_embeddings, cfg.hidden_size, ("pos", "embed"), name="position_embedding", **kw
        )(jnp.arange(t)[None])
        return tokens + positions


class CLIPAttention(nn.Module):
    """Multi-head self-attention, scale ``1/sqrt(head_dim)``, optional key padding mask; causal
    for the text tower, bidirectional (``causal=False``) for the vision tower."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    implementation: str | None = None
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, t, d = x.shape
        n = cfg.num_attention_heads
        q, k, v = (dense(d, ("embed", "heads"), name=f"{p}_proj", **kw)(x).reshape(b, t, n, d // n) for p in "qkv")
        out = dot_product_attention(q, k, v, self.implementation, mask=mask, is_causal=self.causal)
        return dense(d, ("heads", "embed"), name="out_proj", **kw)(out.reshape(b, t, d))


class CLIPMLP(nn.Module):
    """``fc2(act(fc1(x)))``: ``[B, T, D] -> [B, T, D]``."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = activation(cfg.hidden_act)(dense(cfg.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(x))
        return dense(cfg.hidden_size, ("mlp", "embed"), name="fc2", **kw)(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm residual block: self-attention (causal unless ``causal=False``), then the MLP."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    implementation: str | None = None
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, name="layer_norm1", **kw)(x)
        x = x + CLIPAttention(cfg, implementation=self.implementation, causal=self.causal, name="self_attn", **kw)(
            h, mask
        )
        h = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, name="layer_norm2", **kw)(x)
        return x + CLIPMLP(cfg, name="mlp", **kw)(h)


class CLIPEncoder(nn.Module):
    """The layer stack; returns the input and every layer's output. ``causal=False``: the
    vision tower (``percov2_jax.models.clip_vision``)."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    implementation: str | None = None
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, ...]:
        states = [x]
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(
                self.config, self.dtype, self.param_dtype, self.implementation, self.causal, name=f"layers_{i}"
            )(x, mask)
            states.append(x)
        return tuple(states)


class CLIPTextTransformer(nn.Module):
    """Embeddings, the causal encoder, the final LayerNorm, and pooling at the EOS token."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = CLIPTextEmbeddings(cfg, name="embeddings", **kw)(input_ids)
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        hidden_states = CLIPEncoder(cfg, implementation=self.implementation, name="encoder", **kw)(x, mask)
        last = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, name="final_layer_norm", **kw)(hidden_states[-1])
        if cfg.eos_token_id == 2:  # legacy configs: the EOS token has the largest id
            eos = jnp.argmax(input_ids, axis=-1)
        else:  # the first EOS (the pad token may equal EOS)
            eos = jnp.argmax((input_ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = last[jnp.arange(input_ids.shape[0]), eos]
        return last, pooled, hidden_states


class CLIPTextModelWithProjection(nn.Module):
    """``__call__(input_ids [B, T] int, attention_mask [B, T] or None) -> CLIPTextOutput``.

    Without ``attention_mask`` (how SD3 calls it) every position attends causally to all
    earlier ones, padding included, exactly as transformers does.
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_implementation: str | None = None

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextOutput:
        cfg = self.config
        last, pooled, hidden_states = CLIPTextTransformer(
            cfg, self.dtype, self.param_dtype, self.attention_implementation, name="text_model"
        )(input_ids, attention_mask)
        text_embeds = dense(
            cfg.projection_dim,
            ("embed", "proj"),
            name="text_projection",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(pooled)
        return CLIPTextOutput(text_embeds, pooled, last, hidden_states)


def example_inputs(config: CLIPTextConfig, batch: int = 1):
    return (jnp.zeros((batch, 2), jnp.int32),)
