"""LPIPS (Zhang et al. 2018; the ``lpips`` package, version 0.1) in Flax linen, NHWC.

``LPIPS(net="alex" | "vgg").apply({"params": p}, x, y) -> [B]`` float32 for images ``[B, H, W, 3]``
in [-1, 1]; this is ``lpips.LPIPS(net=...)(x, y, normalize=False)`` with ``spatial=False``
(which returns ``[B, 1, 1, 1]``), and torchmetrics' ``LearnedPerceptualImagePatchSimilarity``
per image. PerCo evaluates with AlexNet and trains with VGG.

Pipeline: scale the input channels ``(x - SHIFT) / SCALE``; run torchvision's ``features`` stack
(AlexNet or VGG16, ImageNet weights) on both images; at each of five ReLU taps, unit-normalise
along channels, take the squared difference, project it with the learned non-negative 1x1 head
``lin{k}``, average over space; sum the five taps.

Parameter names mirror the PyTorch checkpoints (``features.3.weight`` -> ``features_3/kernel``,
``lin0.model.1.weight`` -> ``lin0/model_1/kernel``); ``percov2_jax.convert.lpips_weights``
loads them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from percov2_jax.models.layers import Dtype, conv

# lpips v0.1 ``ScalingLayer``: maps [-1, 1] inputs to (roughly) ImageNet-normalised ones.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10  # lpips ``normalize_tensor``: x / (||x||_2 + eps)


@dataclasses.dataclass(frozen=True)
class Conv:
    features: int
    kernel: int
    stride: int
    padding: int


@dataclasses.dataclass(frozen=True)
class ReLU:
    pass


@dataclasses.dataclass(frozen=True)
class MaxPool:
    """torchvision ``MaxPool2d(window, stride)``: no padding, ``ceil_mode=False`` (VALID)."""

    window: int
    stride: int


Layer = Conv | ReLU | MaxPool


@dataclasses.dataclass(frozen=True)
class Backbone:
    """torchvision ``<model>.features`` as a list (index ``i`` owns ``features.{i}.*``), cut after
    the last tap, and the indices whose outputs LPIPS compares."""

    layers: tuple[Layer, ...]
    taps: tuple[int, ...]

    @property
    def tap_channels(self) -> tuple[int, ...]:
        return tuple(self._channels_at(t) for t in self.taps)

    def _channels_at(self, index: int) -> int:
        return next(l.features for l in reversed(self.layers[: index + 1]) if isinstance(l, Conv))


def _vgg16() -> Backbone:
    """torchvision ``vgg16().features`` (config "D"): 3x3 convs pad 1, 2x2/2 max pools."""
    layers: list[Layer] = []
    for block, (width, convs) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))):
        if block:
            layers.append(MaxPool(2, 2))
        for _ in range(convs):
            layers += [Conv(width, 3, 1, 1), ReLU()]
    return Backbone(tuple(layers), taps=(3, 8, 15, 22, 29))  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


BACKBONES: dict[str, Backbone] = {
    # torchvision ``alexnet().features`` minus its final max pool (index 12, after the last tap).
    "alex": Backbone(
        (
            Conv(64, 11, 4, 2),
            ReLU(),
            MaxPool(3, 2),
            Conv(192, 5, 1, 2),
            ReLU(),
            MaxPool(3, 2),
            Conv(384, 3, 1, 1),
            ReLU(),
            Conv(256, 3, 1, 1),
            ReLU(),
            Conv(256, 3, 1, 1),
            ReLU(),
        ),
        taps=(1, 4, 7, 9, 11),  # relu1 .. relu5
    ),
    "vgg": _vgg16(),
}


def channel_norm(features: jax.Array) -> jax.Array:
    """``sqrt(sum_c f^2)`` over the channel (last) axis, ``[..., 1]``.

    No guard at 0 is needed for gradients: the sum is 0 only where every channel of a ReLU tap
    is 0, and ReLU's gradient (a select) drops the NaN of ``sqrt'(0) * 0`` there.
    """
    return jnp.sqrt(jnp.sum(jnp.square(features), axis=-1, keepdims=True))


def normalized_difference(fx: jax.Array, fy: jax.Array, eps: float = NORM_EPS) -> jax.Array:
    """``fx / (|fx| + eps) - fy / (|fy| + eps)``, the difference of lpips' ``normalize_tensor``s.

    Written as ``(fx - fy * (|fx| + eps) / (|fy| + eps)) / (|fx| + eps)``: XLA turns the divisions
    into reciprocal multiplies and may contract ``fx * r - fy * r`` into an FMA, which leaves
    ~1e-15 for identical inputs; in this form the ratio is exactly 1 and the difference exactly 0.
    """
    dx = channel_norm(fx) + eps
    dy = channel_norm(fy) + eps
    return (fx - fy * (dx / dy)) / dx


class NetLinLayer(nn.Module):
    """lpips ``NetLinLayer``: ``model = [Dropout, Conv2d(C, 1, 1, bias=False)]``; dropout is
    the identity at evaluation, so only ``model.1`` (``model_1``) exists here."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.model_1 = nn.Conv(
            1,
            (1, 1),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.uniform(1.0), (None, None, "conv_in", "conv_out")),
        )

    def __call__(self, diff: jax.Array) -> jax.Array:
        """``[B, H, W, C] -> [B, H, W, 1]``."""
        return self.model_1(diff)


class LPIPS(nn.Module):
    """LPIPS distance with an AlexNet (``net="alex"``) or VGG16 (``net="vgg"``) backbone.

    ``dtype`` is the convolution compute dtype; normalisation, heads and the output are float32.
    """

    net: str = "alex"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if self.net not in BACKBONES:
            raise ValueError(f"LPIPS net must be one of {sorted(BACKBONES)}, got {self.net!r}")
        backbone = BACKBONES[self.net]
        for i, layer in enumerate(backbone.layers):
            if isinstance(layer, Conv):
                setattr(
                    self,
                    f"features_{i}",
                    conv(
                        layer.features,
                        layer.kernel,
                        strides=layer.stride,
                        padding=[(layer.padding, layer.padding)] * 2,
                        name=f"features_{i}",
                        dtype=self.dtype,
                        param_dtype=self.param_dtype,
                    ),
                )
        for k in range(len(backbone.taps)):
            setattr(self, f"lin{k}", NetLinLayer(dtype=jnp.float32, param_dtype=self.param_dtype, name=f"lin{k}"))

    def tap_features(self, images: jax.Array) -> list[jax.Array]:
        """Images ``[B, H, W, 3]`` in [-1, 1] -> the five ReLU tap activations ``[B, h_k, w_k, C_k]``."""
        backbone = BACKBONES[self.net]
        shift = jnp.asarray(SHIFT, jnp.float32)
        scale = jnp.asarray(SCALE, jnp.float32)
        h = ((images.astype(jnp.float32) - shift) / scale).astype(self.dtype)
        taps = []
        for i, layer in enumerate(backbone.layers[: backbone.taps[-1] + 1]):
            if isinstance(layer, Conv):
                h = getattr(self, f"features_{i}")(h)
            elif isinstance(layer, ReLU):
                h = nn.relu(h)
            else:
                h = nn.max_pool(h, (layer.window,) * 2, strides=(layer.stride,) * 2, padding="VALID")
            if i in backbone.taps:
                taps.append(h)
        return taps

    def __call__(self, x: jax.Array, y: jax.Array, per_tap: bool = False) -> Any:
        """``x, y [B, H, W, 3]`` in [-1, 1] -> distances ``[B]`` float32.

        With ``per_tap=True`` returns ``(distances [B], per_tap [B, 5])`` (lpips' ``retPerLayer``).
        """
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"LPIPS expects two [B, H, W, 3] images of equal shape, got {x.shape} and {y.shape}")
        # Separate backbone passes (not one over the concatenated batch, whose split may round
        # differently): LPIPS(x, x) is exactly 0.
        per_layer = []
        for k, (fx, fy) in enumerate(zip(self.tap_features(x), self.tap_features(y))):
            diff = jnp.square(normalized_difference(fx.astype(jnp.float32), fy.astype(jnp.float32)))
            per_layer.append(jnp.mean(getattr(self, f"lin{k}")(diff), axis=(1, 2, 3)))
        per_layer = jnp.stack(per_layer, axis=-1)
        total = jnp.sum(per_layer, axis=-1)
        return (total, per_layer) if per_tap else total
