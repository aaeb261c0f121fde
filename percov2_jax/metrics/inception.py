"""The FID InceptionV3 (pytorch-fid 0.3.0 ``fid_inception_v3``) in Flax linen, NHWC, up to pool3.

``FIDInceptionV3().apply({"params": p}, images) -> [B, 2048]`` float32 for images
``[B, 299, 299, 3]`` with values in [0, 255] (float; see ``input_scaling``). This is
pytorch-fid's ``InceptionV3(output_blocks=[3], resize_input=False)`` (the 2048-d output of the
final average pool, squeezed) with the TF ``inception-2015-12-05`` weights
(``pt_inception-2015-12-05-6726825d.pth``, loaded by ``percov2_jax.convert.inception_weights``).

Structure: torchvision's ``Inception3`` stem and blocks (every conv is ``BasicConv2d``: conv
without bias, BatchNorm eps 0.001 in inference mode, ReLU), with the FID patches of pytorch-fid:
the branch pools of ``Mixed_5b..5d`` (A), ``Mixed_6b..6e`` (C) and ``Mixed_7b`` (E) are
3x3/1 average pools with padding 1 that do *not* count the padding (TF semantics), and
``Mixed_7c``'s branch pool is a 3x3/1 max pool with padding 1. ``Mixed_6a`` (B) and
``Mixed_7a`` (D) are torchvision's, with 3x3/2 VALID max pools. The classifier ``fc`` is unused.

Input scaling (``input_scaling``):
- ``"clean_fid"`` (default; PerCo evaluates with clean-fid): ``(x - 128) / 128``, as clean-fid's
  ``InceptionV3W`` does before NVIDIA's torchscript copy of the same TF network.
- ``"pytorch_fid"``: ``2 * (x / 255) - 1``, pytorch-fid's ``normalize_input`` after clean-fid's
  ``legacy_pytorch`` ``x / 255``.
- ``"none"``: the input is already in the network's [-1, 1] range.

clean-fid's own network is NVIDIA's torchscript ``inception-2015-12-05.pt`` (StyleGAN2-ADA), a
second port of the same TF graph; only pytorch-fid's ``.pth`` has a converter here, and the two
have not been compared (neither file is available offline).

Resizing to 299x299 is separate: ``resize_bilinear`` is pytorch-fid's in-network resize
(``F.interpolate(mode="bilinear", align_corners=False)``, no antialiasing) in JAX;
``clean_fid_resize`` is clean-fid's "clean" mode resize (PIL bicubic on each float channel),
which runs on the host in numpy/PIL before the network.

Parameter names mirror pytorch-fid's state dict: ``Mixed_5b.branch1x1.conv.weight`` ->
``Mixed_5b/branch1x1/conv/kernel``, ``....bn.{weight,bias,running_mean,running_var}`` ->
``.../bn/{scale,bias,mean,var}`` (running statistics are frozen parameters, not a
``batch_stats`` collection: the network is only ever evaluated).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from percov2_jax.models.layers import Dtype

BN_EPS = 1e-3  # torchvision BasicConv2d
INPUT_SIZE = 299
FEATURE_DIM = 2048
INPUT_SCALINGS = ("clean_fid", "pytorch_fid", "none")


def _boxed(init, axes):
    return nn.with_logical_partitioning(init, axes)


class BatchNormInference(nn.Module):
    """torch ``BatchNorm2d`` in eval mode over the channel (last) axis, as torch's CPU kernel
    computes it: ``x * a + b`` with ``a = scale / sqrt(var + eps)``, ``b = bias - mean * a``."""

    features: int
    eps: float = BN_EPS
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape, axes = (self.features,), ("conv_out",)
        scale = self.param("scale", _boxed(nn.initializers.ones_init(), axes), shape, self.param_dtype)
        bias = self.param("bias", _boxed(nn.initializers.zeros_init(), axes), shape, self.param_dtype)
        mean = self.param("mean", _boxed(nn.initializers.zeros_init(), axes), shape, self.param_dtype)
        var = self.param("var", _boxed(nn.initializers.ones_init(), axes), shape, self.param_dtype)
        a = scale.astype(jnp.float32) / jnp.sqrt(var.astype(jnp.float32) + self.eps)
        b = bias.astype(jnp.float32) - mean.astype(jnp.float32) * a
        return (x.astype(jnp.float32) * a + b).astype(x.dtype)


class BasicConv2d(nn.Module):
    """torchvision ``BasicConv2d``: ``conv`` (no bias) -> ``bn`` (eps 0.001) -> ReLU.

    ``kernel`` and ``padding`` are (h, w) pairs; padding is symmetric, as torch's ``padding=``.
    """

    features: int
    kernel: tuple[int, int] = (1, 1)
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            tuple(self.kernel),
            strides=(self.stride, self.stride),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=_boxed(nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")),
            name="conv",
        )(x)
        x = BatchNormInference(self.features, param_dtype=self.param_dtype, name="bn")(x)
        return nn.relu(x)


def avg_pool_3x3_exclude_pad(x: jax.Array) -> jax.Array:
    """``F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)`` (TF's average pool)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def max_pool_3x3_same(x: jax.Array) -> jax.Array:
    """``F.max_pool2d(x, 3, stride=1, padding=1)`` (padding is -inf, as torch's)."""
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
    """``nn.MaxPool2d(3, stride=2)``: no padding, ``ceil_mode=False`` (VALID)."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class _InceptionBlock(nn.Module):
    """An Inception block: ``conv(name, x, ...)`` applies the ``BasicConv2d`` called ``name``."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def conv(self, name: str, x: jax.Array, features: int, kernel=(1, 1), stride: int = 1, padding=(0, 0)):
        return BasicConv2d(
            features, tuple(kernel), stride, tuple(padding), dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )(x)


class FIDInceptionA(_InceptionBlock):
    """``Mixed_5b..5d``: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool(excl. pad)-1x1; 224 + ``pool_features`` out."""

    pool_features: int = 32

    @nn.compact
    def __call__(self, x):
        b1 = self.conv("branch1x1", x, 64)
        b5 = self.conv("branch5x5_1", x, 48)
        b5 = self.conv("branch5x5_2", b5, 64, (5, 5), padding=(2, 2))
        b3 = self.conv("branch3x3dbl_1", x, 64)
        b3 = self.conv("branch3x3dbl_2", b3, 96, (3, 3), padding=(1, 1))
        b3 = self.conv("branch3x3dbl_3", b3, 96, (3, 3), padding=(1, 1))
        bp = self.conv("branch_pool", avg_pool_3x3_exclude_pad(x), self.pool_features)
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_InceptionBlock):
    """``Mixed_6a`` (grid 35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool 3x3/2; 480 + C_in out."""

    @nn.compact
    def __call__(self, x):
        b3 = self.conv("branch3x3", x, 384, (3, 3), stride=2)
        bd = self.conv("branch3x3dbl_1", x, 64)
        bd = self.conv("branch3x3dbl_2", bd, 96, (3, 3), padding=(1, 1))
        bd = self.conv("branch3x3dbl_3", bd, 96, (3, 3), stride=2)
        return jnp.concatenate([b3, bd, max_pool_3x3_stride2(x)], axis=-1)


class FIDInceptionC(_InceptionBlock):
    """``Mixed_6b..6e``: factorised 7x7 branches of width ``channels_7x7``; 768 out."""

    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of the 1x7 and 7x1 convs
        b1 = self.conv("branch1x1", x, 192)
        b7 = self.conv("branch7x7_1", x, c7)
        b7 = self.conv("branch7x7_2", b7, c7, row[0], padding=row[1])
        b7 = self.conv("branch7x7_3", b7, 192, col[0], padding=col[1])
        bd = self.conv("branch7x7dbl_1", x, c7)
        bd = self.conv("branch7x7dbl_2", bd, c7, col[0], padding=col[1])
        bd = self.conv("branch7x7dbl_3", bd, c7, row[0], padding=row[1])
        bd = self.conv("branch7x7dbl_4", bd, c7, col[0], padding=col[1])
        bd = self.conv("branch7x7dbl_5", bd, 192, row[0], padding=row[1])
        bp = self.conv("branch_pool", avg_pool_3x3_exclude_pad(x), 192)
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_InceptionBlock):
    """``Mixed_7a`` (grid 17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool 3x3/2; 512 + C_in out."""

    @nn.compact
    def __call__(self, x):
        b3 = self.conv("branch3x3_1", x, 192)
        b3 = self.conv("branch3x3_2", b3, 320, (3, 3), stride=2)
        b7 = self.conv("branch7x7x3_1", x, 192)
        b7 = self.conv("branch7x7x3_2", b7, 192, (1, 7), padding=(0, 3))
        b7 = self.conv("branch7x7x3_3", b7, 192, (7, 1), padding=(3, 0))
        b7 = self.conv("branch7x7x3_4", b7, 192, (3, 3), stride=2)
        return jnp.concatenate([b3, b7, max_pool_3x3_stride2(x)], axis=-1)


class FIDInceptionE(_InceptionBlock):
    """``Mixed_7b`` (``pool="avg"``, pytorch-fid ``FIDInceptionE_1``) and ``Mixed_7c``
    (``pool="max"``, ``FIDInceptionE_2``): expanded 1x3/3x1 branches; 2048 out."""

    pool: str = "avg"

    @nn.compact
    def __call__(self, x):
        b1 = self.conv("branch1x1", x, 320)
        b3 = self.conv("branch3x3_1", x, 384)
        b3 = jnp.concatenate(
            [
                self.conv("branch3x3_2a", b3, 384, (1, 3), padding=(0, 1)),
                self.conv("branch3x3_2b", b3, 384, (3, 1), padding=(1, 0)),
            ],
            axis=-1,
        )
        bd = self.conv("branch3x3dbl_1", x, 448)
        bd = self.conv("branch3x3dbl_2", bd, 384, (3, 3), padding=(1, 1))
        bd = jnp.concatenate(
            [
                self.conv("branch3x3dbl_3a", bd, 384, (1, 3), padding=(0, 1)),
                self.conv("branch3x3dbl_3b", bd, 384, (3, 1), padding=(1, 0)),
            ],
            axis=-1,
        )
        pooled = avg_pool_3x3_exclude_pad(x) if self.pool == "avg" else max_pool_3x3_same(x)
        bp = self.conv("branch_pool", pooled, 192)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def scale_input(images: jax.Array, input_scaling: str) -> jax.Array:
    """[0, 255] images -> the network's [-1, 1] input (see the module docstring)."""
    x = images.astype(jnp.float32)
    if input_scaling == "clean_fid":
        return (x - 128.0) / 128.0
    if input_scaling == "pytorch_fid":
        return 2.0 * (x / 255.0) - 1.0
    if input_scaling == "none":
        return x
    raise ValueError(f"input_scaling must be one of {INPUT_SCALINGS}, got {input_scaling!r}")


class FIDInceptionV3(nn.Module):
    """pytorch-fid's FID InceptionV3 up to pool3.

    ``dtype`` is the convolution compute dtype; BatchNorm and the pooled features are float32.
    """

    input_scaling: str = "clean_fid"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """``images [B, 299, 299, 3]`` (values per ``input_scaling``) -> pool3 features ``[B, 2048]`` float32.

        Other sizes run too (the network is convolutional up to the global pool) but give
        features that are not comparable with published FID statistics.
        """
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"FIDInceptionV3 expects [B, H, W, 3] images, got {images.shape}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = scale_input(images, self.input_scaling).astype(self.dtype)
        # Block 0: stem to maxpool1.
        x = BasicConv2d(32, (3, 3), stride=2, name="Conv2d_1a_3x3", **kw)(x)
        x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3", **kw)(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3", **kw)(x)
        x = max_pool_3x3_stride2(x)
        # Block 1: to maxpool2.
        x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1", **kw)(x)
        x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3", **kw)(x)
        x = max_pool_3x3_stride2(x)
        # Block 2: 35x35 and 17x17 grids.
        x = FIDInceptionA(pool_features=32, name="Mixed_5b", **kw)(x)
        x = FIDInceptionA(pool_features=64, name="Mixed_5c", **kw)(x)
        x = FIDInceptionA(pool_features=64, name="Mixed_5d", **kw)(x)
        x = InceptionB(name="Mixed_6a", **kw)(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = FIDInceptionC(channels_7x7=c7, name=name, **kw)(x)
        # Block 3: 8x8 grid and the global average pool (pool3).
        x = InceptionD(name="Mixed_7a", **kw)(x)
        x = FIDInceptionE(pool="avg", name="Mixed_7b", **kw)(x)
        x = FIDInceptionE(pool="max", name="Mixed_7c", **kw)(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


# ---------------------------------------------------------------------------------------------
# Resizing to 299x299.


def bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
    """``[out, in]`` float32 interpolation matrix of torch's ``F.interpolate(mode="bilinear",
    align_corners=False)`` along one axis, output size given (scale ``in / out``, no antialias).

    Source coordinate ``scale * (i + 0.5) - 0.5`` with ``scale = in / out``, clamped below at 0;
    the upper neighbour is clamped to the last pixel. Rounded as torch's float32 CPU kernel
    (``area_pixel_compute_source_index``, whose multiply-add is fused): float32 ``scale``, the
    source coordinate rounded once to float32, ``1 - lambda`` in float32. This matches torch's
    weights exactly on the sizes tested.
    """
    f32 = np.float32
    scale = np.float64(f32(f32(in_size) / f32(out_size)))
    src = np.maximum(scale * (np.arange(out_size) + 0.5) - 0.5, 0.0).astype(f32)  # exact product, one rounding
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo.astype(f32)
    w = np.zeros((out_size, in_size), f32)
    rows = np.arange(out_size)
    np.add.at(w, (rows, lo), f32(1) - frac)
    np.add.at(w, (rows, hi), frac)
    return w


def resize_bilinear(images: jax.Array, size: tuple[int, int] = (INPUT_SIZE, INPUT_SIZE)) -> jax.Array:
    """pytorch-fid's resize, ``F.interpolate(x, size, mode="bilinear", align_corners=False)``, on
    NHWC ``images [B, H, W, C]`` -> ``[B, size[0], size[1], C]`` float32 (any value range).

    Separable: two matrix products with ``bilinear_weights`` (exact float32 products, HIGHEST).
    """
    _, h, w, _ = images.shape
    wh = jnp.asarray(bilinear_weights(h, size[0]))
    ww = jnp.asarray(bilinear_weights(w, size[1]))
    x = images.astype(jnp.float32)
    x = jnp.einsum("oh,bhwc->bowc", wh, x, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("pw,bowc->bopc", ww, x, precision=jax.lax.Precision.HIGHEST)


def clean_fid_resize(image: np.ndarray, size: tuple[int, int] = (INPUT_SIZE, INPUT_SIZE)) -> np.ndarray:
    """clean-fid's "clean" mode resize on the host: ``image [H, W, 3]`` (uint8 or float in [0, 255])
    -> ``[size[0], size[1], 3]`` float32 in [0, 255].

    Each channel is resized as a float32 PIL image (mode "F") with ``Image.BICUBIC`` and clipped
    to [0, 255], without quantisation (clean-fid ``make_resizer("PIL", False, "bicubic", (299, 299))``).
    """
    from PIL import Image

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"clean_fid_resize expects one [H, W, 3] image, got {image.shape}")
    out_hw = (size[1], size[0])  # PIL sizes are (width, height)
    channels = [
        np.asarray(Image.fromarray(image[:, :, c].astype(np.float32)).resize(out_hw, Image.BICUBIC)) for c in range(3)
    ]
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.float32)
