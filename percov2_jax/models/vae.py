"""The SD3 VAE (diffusers ``AutoencoderKL``) in Flax linen, NHWC.

``encode(images [B, H, W, 3] in [-1, 1]) -> (mean, logvar)`` each ``[B, H/f, W/f, latent_channels]``
and ``decode(latents) -> images`` work on *unscaled* latents, exactly like diffusers;
``encode_to_latents`` / ``decode_latents`` add SD3's ``(z - shift_factor) * scaling_factor``.
Parameter names mirror diffusers (``encoder.down_blocks.0.resnets.1.conv1`` ->
``encoder/down_blocks_0/resnets_1/conv1``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from percov2_jax.models.attention import dot_product_attention
from percov2_jax.models.layers import Dtype, _boxed, config_from_dict, config_to_dict, dense, group_norm


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """Field names and defaults of diffusers' ``AutoencoderKL`` config.json.

    The SD3 release: block_out_channels (128, 256, 512, 512), layers_per_block 2,
    latent_channels 16, scaling_factor 1.5305, shift_factor 0.0609, no quant convs.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels", "latents_mean", "latents_std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        problems = []
        if set(self.down_block_types) - {"DownEncoderBlock2D"}:
            problems.append(f"only DownEncoderBlock2D is supported, got {self.down_block_types}")
        if set(self.up_block_types) - {"UpDecoderBlock2D"}:
            problems.append(f"only UpDecoderBlock2D is supported, got {self.up_block_types}")
        if not len(self.down_block_types) == len(self.up_block_types) == len(self.block_out_channels):
            problems.append("down_block_types, up_block_types and block_out_channels must have equal lengths")
        if self.act_fn != "silu":
            problems.append(f"only act_fn='silu' is supported, got {self.act_fn!r}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            problems.append(f"block_out_channels {bad} not divisible by norm_num_groups={self.norm_num_groups}")
        if problems:
            raise ValueError("invalid AutoencoderKLConfig: " + "; ".join(problems))

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AutoencoderKLConfig:
        """From a diffusers config.json dict; ``_``-prefixed keys are ignored, unknown keys raise."""
        return config_from_dict(cls, d, "AutoencoderKL")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self, "AutoencoderKL")


class Conv2D(nn.Module):
    """NHWC convolution with ``layers.conv``'s parameters (kernel ``[kh, kw, in, out]``, bias). 1x1
    convs are a dot everywhere; on CPU two more shapes are computed the way XLA:CPU runs them
    fastest (``experiments/cpu_vae_profile.py`` measures them; on accelerators, unmeasured, they
    stay plain convolutions):

    - 1x1: a dot over the channels (XLA:CPU's YNNPACK ran the decoder's 64 -> 32 shortcut at
      256² as a convolution at a tenth of its matmul speed);
    - 3x3, stride 1, at most 4 input channels (``conv_in`` on RGB): the 9 shifted copies of the
      input side by side, then one dot (27 x out) instead of a 3-channel convolution;
    - ``upsample``: nearest-neighbour x2, then the conv, run as a sub-pixel convolution: one 2x2
      conv on the low-resolution input with 4 x out channels (one per output phase, their kernels
      sums of the 3x3 taps), then interleaved: 16 instead of 36 multiply-adds per input pixel,
      and the x4 upsampled map is never written;
    - anything else: ``lax.conv_general_dilated``, as ``nn.Conv``.
    """

    features: int
    kernel_size: int
    strides: int = 1
    padding: Any = ((1, 1), (1, 1))
    upsample: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, c, axes = self.kernel_size, x.shape[-1], (None, None, "conv_in", "conv_out")
        kernel = self.param(
            "kernel", _boxed(nn.initializers.lecun_normal(), axes), (k, k, c, self.features), self.param_dtype
        )
        bias = self.param(
            "bias", _boxed(nn.initializers.zeros_init(), ("conv_out",)), (self.features,), self.param_dtype
        )
        x, bias = x.astype(self.dtype), bias.astype(self.dtype)
        cpu = jax.default_backend() == "cpu"
        if self.upsample:
            if (k, self.strides, self.padding) != (3, 1, ((1, 1), (1, 1))):
                raise ValueError("Conv2D(upsample=True) is a 3x3 stride-1 conv with padding 1")
            if cpu:
                return _upsample_conv3x3(x, kernel, self.dtype) + bias
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        if k == 1 and self.strides == 1 and self.padding in ("VALID", "SAME", ((0, 0), (0, 0))):
            return jnp.dot(x, kernel[0, 0].astype(self.dtype)) + bias
        if cpu and k == 3 and self.strides == 1 and c <= 4 and self.padding == ((1, 1), (1, 1)):
            b, h, w, _ = x.shape
            padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
            patches = jnp.concatenate([padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=-1)
            return jnp.dot(patches, kernel.reshape(9 * c, self.features).astype(self.dtype)) + bias
        y = jax.lax.conv_general_dilated(
            x,
            kernel.astype(self.dtype),
            (self.strides, self.strides),
            self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + bias


def _upsample_conv3x3(x: jax.Array, kernel: jax.Array, dtype: Dtype) -> jax.Array:
    """``conv3x3(nearest_x2(x))`` with padding 1, as a 2x2 conv on ``x`` (padding 1) and an interleave.

    Output row ``2i + p`` sees input rows ``(i - 1, i)`` with taps ``(w0, w1 + w2)`` for ``p = 0``
    and rows ``(i, i + 1)`` with ``(w0 + w1, w2)`` for ``p = 1``; the 2x2 conv over the padded input
    gives, at row ``t``, rows ``(t - 1, t)``: phase ``p`` of row ``i`` is its row ``i + p``. The same
    holds for the columns.
    """
    b, h, w, c = x.shape
    out = kernel.shape[-1]

    def phases(k, axis):  # 3 taps along ``axis`` -> [2 phases, ..., 2 taps, ...]
        k0, k1, k2 = jnp.split(k, 3, axis=axis)
        return jnp.stack([jnp.concatenate([k0, k1 + k2], axis), jnp.concatenate([k0 + k1, k2], axis)])

    folded = phases(phases(kernel, 0), 2)  # [q, p, 2, 2, c, out]
    folded = jnp.transpose(folded, (2, 3, 4, 1, 0, 5)).reshape(2, 2, c, 4 * out)  # out channels (p, q, o)
    y = jax.lax.conv_general_dilated(
        x, folded.astype(dtype), (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    ).reshape(b, h + 1, w + 1, 2, 2, out)
    rows = [jnp.stack([y[:, p : p + h, q : q + w, p, q] for q in (0, 1)], axis=3) for p in (0, 1)]
    return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, out)


def conv(features: int, kernel_size: int, *, name: str | None, dtype: Dtype, param_dtype: Dtype, **kw) -> Conv2D:
    """A ``Conv2D`` (``strides``, ``padding``, ``upsample`` as keywords)."""
    return Conv2D(features, kernel_size, name=name, dtype=dtype, param_dtype=param_dtype, **kw)


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 -> GroupNorm -> SiLU -> conv3x3, plus (1x1-projected) input."""

    out_channels: int
    groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(group_norm(self.groups, name="norm1", **kw)(x))
        h = conv(self.out_channels, 3, padding=((1, 1), (1, 1)), name="conv1", **kw)(h)
        h = nn.silu(group_norm(self.groups, name="norm2", **kw)(h))
        h = conv(self.out_channels, 3, padding=((1, 1), (1, 1)), name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, padding="VALID", name="conv_shortcut", **kw)(x)
        return x + h


class Downsample2D(nn.Module):
    """Pad (0, 1) on the bottom/right, then a VALID stride-2 conv3x3 (diffusers ``padding=0``)."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(
            self.channels, 3, strides=2, padding="VALID", name="conv", dtype=self.dtype, param_dtype=self.param_dtype
        )(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2, then conv3x3 (run as a sub-pixel conv, see ``Conv2D``)."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return conv(self.channels, 3, upsample=True, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions, with a GroupNorm and a residual."""

    channels: int
    groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        t = group_norm(self.groups, name="group_norm", **kw)(x).reshape(b, h * w, 1, c)
        q = dense(c, ("conv_in", "conv_out"), name="to_q", **kw)(t)
        k = dense(c, ("conv_in", "conv_out"), name="to_k", **kw)(t)
        v = dense(c, ("conv_in", "conv_out"), name="to_v", **kw)(t)
        out = dot_product_attention(q, k, v).reshape(b, h * w, c)
        out = dense(c, ("conv_in", "conv_out"), name="to_out_0", **kw)(out)
        return x + out.reshape(b, h, w, c)


class MidBlock2D(nn.Module):
    channels: int
    groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ResnetBlock2D(self.channels, self.groups, name="resnets_0", **kw)(x)
        if self.add_attention:
            x = SpatialSelfAttention(self.channels, self.groups, name="attentions_0", **kw)(x)
        return ResnetBlock2D(self.channels, self.groups, name="resnets_1", **kw)(x)


class ResnetStage2D(nn.Module):
    """diffusers ``DownEncoderBlock2D`` / ``UpDecoderBlock2D``: ``num_layers`` resnets, then an
    optional resampler: ``"down"`` (stride-2, named ``downsamplers_0``) or ``"up"`` (x2, ``upsamplers_0``)."""

    out_channels: int
    num_layers: int
    groups: int
    resample: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, name=f"resnets_{j}", **kw)(x)
        if self.resample == "down":
            x = Downsample2D(self.out_channels, name="downsamplers_0", **kw)(x)
        elif self.resample == "up":
            x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x)
        return x


class Encoder(nn.Module):
    """Images ``[B, H, W, in]`` -> moments ``[B, H/f, W/f, 2 * latent_channels]``."""

    config: AutoencoderKLConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = len(cfg.block_out_channels)
        x = conv(cfg.block_out_channels[0], 3, padding=((1, 1), (1, 1)), name="conv_in", **kw)(x)
        for i, channels in enumerate(cfg.block_out_channels):
            x = ResnetStage2D(
                channels,
                cfg.layers_per_block,
                cfg.norm_num_groups,
                "down" if i < n - 1 else None,
                name=f"down_blocks_{i}",
                **kw,
            )(x)
        x = MidBlock2D(
            cfg.block_out_channels[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, name="mid_block", **kw
        )(x)
        x = nn.silu(group_norm(cfg.norm_num_groups, name="conv_norm_out", **kw)(x))
        return conv(2 * cfg.latent_channels, 3, padding=((1, 1), (1, 1)), name="conv_out", **kw)(x)


class Decoder(nn.Module):
    """Latents ``[B, h, w, latent_channels]`` -> images ``[B, h*f, w*f, out]``."""

    config: AutoencoderKLConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels = list(reversed(cfg.block_out_channels))
        x = conv(channels[0], 3, padding=((1, 1), (1, 1)), name="conv_in", **kw)(z)
        x = MidBlock2D(channels[0], cfg.norm_num_groups, cfg.mid_block_add_attention, name="mid_block", **kw)(x)
        for i, ch in enumerate(channels):
            x = ResnetStage2D(
                ch,
                cfg.layers_per_block + 1,
                cfg.norm_num_groups,
                "up" if i < len(channels) - 1 else None,
                name=f"up_blocks_{i}",
                **kw,
            )(x)
        x = nn.silu(group_norm(cfg.norm_num_groups, name="conv_norm_out", **kw)(x))
        return conv(cfg.out_channels, 3, padding=((1, 1), (1, 1)), name="conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
    """The KL autoencoder. Methods (use ``module.apply(variables, x, method=...)``):

    - ``encode(images) -> (mean, logvar)``: images ``[B, H, W, in_channels]`` in [-1, 1],
      H and W multiples of ``config.downsample_factor``; logvar clamped to [-30, 20].
    - ``decode(latents) -> images``: unscaled latents ``[B, h, w, latent_channels]``.
    - ``encode_to_latents(images, rng=None)``: scaled latents ``(z - shift) * scale`` from the
      mean (or a posterior sample when ``rng`` is given).
    - ``decode_latents(latents)``: ``decode(latents / scale + shift)``.
    ``__call__`` is ``decode(encode(x).mean)`` and is what ``init`` runs.
    """

    config: AutoencoderKLConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        if cfg.use_quant_conv:
            self.quant_conv = conv(2 * cfg.latent_channels, 1, padding="VALID", name=None, **kw)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv(cfg.latent_channels, 1, padding="VALID", name=None, **kw)

    def _check(self, x: jax.Array, channels: int, what: str, multiple: int):
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"{what} must be NHWC [B, H, W, {channels}], got shape {x.shape}")
        if x.shape[1] % multiple or x.shape[2] % multiple:
            raise ValueError(f"{what} height and width must be multiples of {multiple}, got {x.shape[1]}x{x.shape[2]}")

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        self._check(images, self.config.in_channels, "images", self.config.downsample_factor)
        moments = self.encoder(images.astype(self.dtype))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: jax.Array) -> jax.Array:
        self._check(latents, self.config.latent_channels, "latents", 1)
        z = latents.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def encode_to_latents(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """``[B, H, W, 3]`` images in [-1, 1] -> float32 diffusion latents ``[B, H/8, W/8, C]``: the
        posterior mean, or a sample with ``rng``, shifted and scaled."""
        mean, logvar = self.encode(images)
        # Sampled and scaled in float32 whatever the compute dtype: bf16 noise would be coarse.
        mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
        z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
        return scale_latents(z, self.config)

    def decode_latents(self, latents: jax.Array) -> jax.Array:
        return self.decode(unscale_latents(latents, self.config))

    def __call__(self, images: jax.Array) -> jax.Array:
        mean, _ = self.encode(images)
        return self.decode(mean)


def scale_latents(z: jax.Array, config: AutoencoderKLConfig) -> jax.Array:
    """Unscaled VAE latents -> diffusion latents: ``(z - shift_factor) * scaling_factor``."""
    return (z - (config.shift_factor or 0.0)) * config.scaling_factor


def unscale_latents(latents: jax.Array, config: AutoencoderKLConfig) -> jax.Array:
    """Diffusion latents -> unscaled VAE latents: ``latents / scaling_factor + shift_factor``."""
    return latents / config.scaling_factor + (config.shift_factor or 0.0)


def example_inputs(config: AutoencoderKLConfig, batch: int = 1):
    f = config.downsample_factor
    return (jnp.zeros((batch, f, f, config.in_channels), jnp.float32),)
