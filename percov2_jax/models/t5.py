"""The T5 encoder (transformers ``T5EncoderModel``) in Flax: T5 v1.1 / T5-XXL as SD3's ``text_encoder_3``.

Relative position buckets (shared by all layers, owned by block 0), RMS LayerNorm without bias,
no biases anywhere, unscaled attention logits, gated-GELU (v1.1) or ReLU (original T5)
feed-forward. Parameter names mirror transformers
(``encoder.block.0.layer.0.SelfAttention.q`` -> ``encoder/block_0/layer_0/SelfAttention/q``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from percov2_jax.models.attention import dot_product_attention
from percov2_jax.models.layers import (
    Dtype,
    RMSNorm,
    activation,
    config_from_dict,
    config_from_transformers,
    config_to_dict,
    dense,
    embed,
)

# feed_forward_proj -> (activation, gated); "gated-gelu" is T5 v1.1 (SD3's T5-XXL).
_FEED_FORWARD = {
    "relu": ("relu", False),
    "gelu": ("gelu_new", False),
    "gated-gelu": ("gelu_new", True),
    "gated-relu": ("relu", True),
}


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
    """The encoder fields of transformers' ``T5Config`` (names and defaults as there)."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    def __post_init__(self):
        if self.feed_forward_proj not in _FEED_FORWARD:
            raise ValueError(
                f"unsupported feed_forward_proj {self.feed_forward_proj!r}; supported: {sorted(_FEED_FORWARD)}"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> T5EncoderConfig:
        return config_from_dict(cls, d, "T5EncoderModel")

    @classmethod
    def from_transformers(cls, d: Mapping[str, Any]) -> T5EncoderConfig:
        """From a transformers config.json dict (decoder and generic fields are not read)."""
        return config_from_transformers(cls, d)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self, "T5EncoderModel")


@flax.struct.dataclass
class T5EncoderOutput:
    """``last_hidden_state [B, T, d_model]`` (after the final norm) and ``hidden_states``, as
    transformers returns them: the embeddings, the outputs of blocks ``0 .. n-2``, and last the
    final-normed output (``num_layers + 1`` arrays; the last block's raw output is not among them)."""

    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...]


def relative_position_buckets(
    query_length: int, key_length: int, num_buckets: int, max_distance: int, bidirectional: bool = True
) -> np.ndarray:
    """T5's bucket of ``key - query`` for every pair: ``[query_length, key_length]`` int32.

    Computed on the host in float32 with transformers' operation order, so the buckets are
    identical to the reference on every backend (the log-spaced buckets truncate values that
    are exact integers at some distances, where float rounding decides).
    """
    rel = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    out = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        out += (rel > 0).astype(rel.dtype) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    safe = np.maximum(rel, 1).astype(np.float32)
    large = (
        np.log(safe / np.float32(max_exact))
        / np.float32(math.log(max_distance / max_exact))
        * np.float32(num_buckets - max_exact)
    )
    large = np.minimum(max_exact + large.astype(rel.dtype), num_buckets - 1)
    return (out + np.where(is_small, rel, large)).astype(np.int32)


class T5Attention(nn.Module):
    """Self-attention with unscaled logits plus the relative position bias ``[1, H, T, T]``."""

    config: T5EncoderConfig
    has_relative_attention_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, position_bias: jax.Array | None, mask: jax.Array | None):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, t, _ = x.shape
        inner = cfg.num_heads * cfg.d_kv
        q, k, v = (
            dense(inner, ("embed", "heads"), name=p, use_bias=False, **kw)(x).reshape(b, t, cfg.num_heads, cfg.d_kv)
            for p in "qkv"
        )
        if position_bias is None:
            if not self.has_relative_attention_bias:
                raise ValueError("the first T5 block computes the position bias")
            buckets = relative_position_buckets(
                t, t, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
            )
            table = embed(
                cfg.relative_attention_num_buckets,
                cfg.num_heads,
                ("rel_buckets", None),
                name="relative_attention_bias",
                **kw,
            )
            position_bias = table(jnp.asarray(buckets)).transpose(2, 0, 1)[None]
        out = dot_product_attention(
            q, k, v, self.implementation, bias=position_bias.astype(q.dtype), mask=mask, scale=1.0
        )
        return dense(cfg.d_model, ("heads", "embed"), name="o", use_bias=False, **kw)(
            out.reshape(b, t, inner)
        ), position_bias


class T5DenseReluDense(nn.Module):
    """``wo(act(wi_0 x) * wi_1 x)`` (gated) or ``wo(act(wi x))``."""

    config: T5EncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
        act_name, gated = _FEED_FORWARD[cfg.feed_forward_proj]
        act = activation(act_name)
        if gated:
            h = act(dense(cfg.d_ff, ("embed", "mlp"), name="wi_0", **kw)(x)) * dense(
                cfg.d_ff, ("embed", "mlp"), name="wi_1", **kw
            )(x)
        else:
            h = act(dense(cfg.d_ff, ("embed", "mlp"), name="wi", **kw)(x))
        return dense(cfg.d_model, ("mlp", "embed"), name="wo", **kw)(h)


class _SelfAttentionLayer(nn.Module):
    """transformers ``T5LayerSelfAttention``: ``x + SelfAttention(layer_norm(x))``."""

    config: T5EncoderConfig
    has_relative_attention_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, x, position_bias, mask):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, axis_name="norm", name="layer_norm", **kw)(x)
        out, position_bias = T5Attention(
            cfg, self.has_relative_attention_bias, implementation=self.implementation, name="SelfAttention", **kw
        )(h, position_bias, mask)
        return x + out, position_bias


class _FeedForwardLayer(nn.Module):
    """transformers ``T5LayerFF``: ``x + DenseReluDense(layer_norm(x))``."""

    config: T5EncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, axis_name="norm", name="layer_norm", **kw)(x)
        return x + T5DenseReluDense(cfg, name="DenseReluDense", **kw)(h)


class T5Block(nn.Module):
    config: T5EncoderConfig
    has_relative_attention_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, x, position_bias, mask):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x, position_bias = _SelfAttentionLayer(
            self.config, self.has_relative_attention_bias, implementation=self.implementation, name="layer_0", **kw
        )(x, position_bias, mask)
        return _FeedForwardLayer(self.config, name="layer_1", **kw)(x), position_bias


class T5Stack(nn.Module):
    config: T5EncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, x, mask):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        states, position_bias = [x], None
        for i in range(cfg.num_layers):
            x, position_bias = T5Block(cfg, i == 0, implementation=self.implementation, name=f"block_{i}", **kw)(
                x, position_bias, mask
            )
            states.append(x)
        last = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, axis_name="norm", name="final_layer_norm", **kw)(x)
        return last, tuple(states[:-1]) + (last,)


class T5EncoderModel(nn.Module):
    """``__call__(input_ids [B, T] int, attention_mask [B, T] or None) -> T5EncoderOutput``.

    The token table is ``shared`` (transformers ties ``encoder.embed_tokens`` to it).
    """

    config: T5EncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_implementation: str | None = None

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> T5EncoderOutput:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), name="shared", **kw)(input_ids)
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        last, states = T5Stack(cfg, implementation=self.attention_implementation, name="encoder", **kw)(x, mask)
        return T5EncoderOutput(last, states)


def example_inputs(config: T5EncoderConfig, batch: int = 1):
    return (jnp.zeros((batch, 2), jnp.int32),)
