"""The PerCo hyper-encoder (ELIC-style, the official design of Nikolai10/PerCo ``src/hyper_encoder.py``).

Maps VAE latents ``[B, h, w, in_channels]`` to the continuous hyper-latent
``[B, h/f, w/f, out_channels]`` that the vector quantizer turns into tokens; ``f = latent_side /
hyper_side`` in {1, 2, 4, 8}. The layer list (PerCo's ``backbone``, N = ``channels``, M =
``out_channels``):

  0  1x1 conv in -> N, or 5x5 stride-2 conv if f = 8
  1-3  3 x ResidualBottleneckBlock(N)
  4  1x1 conv N -> N, or 5x5 stride-2 conv if f >= 4
  5-7  3 x ResidualBottleneckBlock(N)
  8  AttentionBlock(N)                     (CompressAI, Cheng et al. 2020 simplified)
  9  1x1 conv N -> N, or 5x5 stride-2 conv if f >= 2
  10-12 3 x ResidualBottleneckBlock(N)
  13 1x1 conv N -> M
  14 AttentionBlock(M)

Parameter names mirror the PyTorch module tree (``backbone.8.conv_b.3.weight`` ->
``backbone_8/conv_b_3/kernel``), so PerCo checkpoints convert with the generic rules
"weight -> kernel (OIHW -> HWIO)", "bias -> bias". At ``in_channels=4`` the parameter counts equal
PerCo's comment: 4,080,128 (f = 1) and 5,868,032 (f = 8).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from percov2_jax.models.layers import Dtype, config_from_dict, config_to_dict, conv

# Torch padding of each conv kind, written out so outputs match PyTorch for any input size
# (a stride-2 5x5 conv with padding 2 gives ceil(h / 2) rows, "SAME" would pad asymmetrically).
_PAD_5X5 = ((2, 2), (2, 2))
_PAD_3X3 = ((1, 1), (1, 1))


@dataclasses.dataclass(frozen=True)
class HyperEncoderConfig:
    """Hyper-encoder shape. PerCo names: ``channels`` = N, ``out_channels`` = M, ``hyper_side`` =
    ``cfg_ss`` (the token-grid side at a ``latent_side`` x ``latent_side`` latent, i.e. 512^2 images).

    PerCo (SD2.1) uses ``in_channels=4``; SD3 latents have 16 channels.
    """

    in_channels: int = 16
    channels: int = 192
    out_channels: int = 320
    latent_side: int = 64
    hyper_side: int = 8

    def __post_init__(self):
        problems = []
        for name in ("in_channels", "channels", "out_channels", "latent_side", "hyper_side"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if not problems:
            ratio = self.latent_side / self.hyper_side
            if ratio not in (1, 2, 4, 8):
                problems.append(
                    f"latent_side / hyper_side must be 1, 2, 4 or 8 (PerCo's 0 to 3 stride-2 convs), got "
                    f"{self.latent_side} / {self.hyper_side} = {ratio:g}"
                )
        if self.channels % 2 or self.out_channels % 2:
            problems.append(
                f"channels ({self.channels}) and out_channels ({self.out_channels}) must be even "
                "(the bottleneck blocks halve them)"
            )
        if problems:
            raise ValueError("invalid HyperEncoderConfig: " + "; ".join(problems))

    @property
    def num_downsamples(self) -> int:
        return int(math.log2(self.latent_side // self.hyper_side))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HyperEncoderConfig:
        """From a ``to_dict`` dict; ``_``-prefixed keys are ignored, unknown keys raise."""
        return config_from_dict(cls, d, "HyperEncoder")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self, "HyperEncoder")


def downsample_factor(config: HyperEncoderConfig) -> int:
    """Spatial reduction ``f`` of the hyper-encoder: latents ``[h, w]`` -> ``[h/f, w/f]``."""
    return 2**config.num_downsamples


def layer_plan(config: HyperEncoderConfig) -> tuple[tuple[str, int], ...]:
    """PerCo's ``backbone`` as ``(kind, out_channels)`` per index; kind in {"conv1x1", "down",
    "bottleneck", "attention"}. Stride-2 convs replace the 1x1 convs at indices 0, 4, 9 from the
    *last* one backwards: f = 2 uses index 9, f = 4 uses 4 and 9, f = 8 all three."""
    n, m, k = config.channels, config.out_channels, config.num_downsamples

    def maybe_down(needed: int) -> tuple[str, int]:
        return ("down" if k >= needed else "conv1x1", n)

    rbb = ("bottleneck", n)
    return (
        maybe_down(3),
        rbb,
        rbb,
        rbb,
        maybe_down(2),
        rbb,
        rbb,
        rbb,
        ("attention", n),
        maybe_down(1),
        rbb,
        rbb,
        rbb,
        ("conv1x1", m),
        ("attention", m),
    )


def _conv1x1(features: int, name: str, kw: dict) -> nn.Conv:
    return conv(features, 1, padding="VALID", name=name, **kw)


def _conv3x3(features: int, name: str, kw: dict) -> nn.Conv:
    return conv(features, 3, padding=_PAD_3X3, name=name, **kw)


class ResidualBottleneckBlock(nn.Module):
    """``x + conv1x1(relu(conv3x3(relu(conv1x1(x)))))`` with a C/2 bottleneck; names are the torch
    ``layers`` Sequential indices (``layers_0``, ``layers_2``, ``layers_4``; ReLUs at 1 and 3)."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        half = self.channels // 2
        h = nn.relu(_conv1x1(half, "layers_0", kw)(x))
        h = nn.relu(_conv3x3(half, "layers_2", kw)(h))
        return x + _conv1x1(self.channels, "layers_4", kw)(h)


class ResidualUnit(nn.Module):
    """CompressAI AttentionBlock's inner unit: ``relu(x + conv1x1(relu(conv3x3(relu(conv1x1(x))))))``;
    names follow its ``conv`` Sequential (``conv_0``, ``conv_2``, ``conv_4``)."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        half = self.channels // 2
        h = nn.relu(_conv1x1(half, "conv_0", kw)(x))
        h = nn.relu(_conv3x3(half, "conv_2", kw)(h))
        h = _conv1x1(self.channels, "conv_4", kw)(h)
        return nn.relu(h + x)


class AttentionBlock(nn.Module):
    """CompressAI ``AttentionBlock(N)``: ``a * sigmoid(b) + x`` with ``a = conv_a(x)`` (3 residual
    units) and ``b = conv_b(x)`` (3 residual units, then a 1x1 conv ``conv_b_3``)."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        a = x
        for i in range(3):
            a = ResidualUnit(self.channels, name=f"conv_a_{i}", **kw)(a)
        b = x
        for i in range(3):
            b = ResidualUnit(self.channels, name=f"conv_b_{i}", **kw)(b)
        b = _conv1x1(self.channels, "conv_b_3", kw)(b)
        return a * nn.sigmoid(b) + x


class HyperEncoder(nn.Module):
    """PerCo's hyper-encoder backbone (the VQ is ``percov2_jax.models.quantizer``).

    ``__call__(latents [B, h, w, in_channels]) -> [B, ceil(h/f), ceil(w/f), out_channels]`` in
    ``dtype`` (``f = downsample_factor(config)``; exact h/f for h divisible by f, as for the
    64x64 SD3 latent of a 512^2 image or the 96x64 latent of a 768x512 Kodak image).
    Params ``backbone_{i}/...`` as in the module docstring.
    """

    config: HyperEncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, latents: jax.Array) -> jax.Array:
        cfg = self.config
        if latents.ndim != 4 or latents.shape[-1] != cfg.in_channels:
            raise ValueError(f"latents must be NHWC [B, h, w, {cfg.in_channels}], got shape {latents.shape}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = latents
        for i, (kind, features) in enumerate(layer_plan(cfg)):
            name = f"backbone_{i}"
            if kind == "conv1x1":
                x = _conv1x1(features, name, kw)(x)
            elif kind == "down":
                x = conv(features, 5, strides=2, padding=_PAD_5X5, name=name, **kw)(x)
            elif kind == "bottleneck":
                x = ResidualBottleneckBlock(features, name=name, **kw)(x)
            else:
                x = AttentionBlock(features, name=name, **kw)(x)
        return x
