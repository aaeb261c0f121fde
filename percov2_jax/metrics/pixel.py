"""Pixel metrics: PSNR, SSIM and MS-SSIM on NHWC image batches, one value per image.

SSIM and MS-SSIM follow Wang et al. (2003) as implemented by ``pytorch-msssim`` 1.0.0
(``pytorch_msssim.ssim`` / ``ms_ssim`` with ``size_average=False``), the reference most
compression papers use:

- an 11-tap Gaussian window (sigma 1.5) built and normalised in float32 as the reference does,
  applied separably over H then W with 'valid' borders, per channel;
- SSIM and the contrast-structure term ``cs`` averaged over each channel's valid map, then the
  per-image value is the mean over channels (for MS-SSIM: of the per-channel products);
- MS-SSIM: at each of the first L-1 scales ``relu(cs)``, then a 2x2 average pool with one zero
  row/column of padding in front of an odd side (torch ``avg_pool2d(kernel_size=2,
  padding=side % 2)``, zeros counted); at the last scale ``relu(ssim)``; result
  ``prod_i relu(cs_i)**w_i * relu(ssim_L)**w_L`` per channel, averaged over channels.
  ``ssim`` applies no ReLU unless ``nonnegative=True`` (the reference's ``nonnegative_ssim``).

Measured against pytorch-msssim 1.0.0 (tests/test_metrics_pixel.py: an astronaut crop and a
uniform-noise image with Gaussian noise, and a noise image against its negative; 177x194 and
176x192 for MS-SSIM, 64x48 for SSIM): max |difference| 1.6e-15 in float64 and 6e-8 in float32
from uint8 inputs (the tests allow 1e-10 and 1e-5). The Gaussian window is bit-equal to the
reference's float32 window for the default 11 / 1.5; this matters: a float32 window does not
sum to exactly 1, which biases the variances by about 1e-7 * E[x**2] and moves SSIM by a few
1e-6 at data_range 255. That is the whole difference from skimage's
``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=255, channel_axis=-1)``: skimage filters with reflected borders but averages only the
map cropped by (win_size - 1) / 2, exactly the valid region, and with a float64 window the two
agree to 4e-16; with the reference's window they differ by 3e-6. PSNR equals
``10 log10(max**2 / MSE)`` and skimage's ``peak_signal_noise_ratio`` per image to 1e-10.

Convention choices: integer and half-precision inputs are computed in float32, float32 and
float64 inputs in their own dtype (float64 needs ``jax_enable_x64``). The Gaussian filter is a
sum of shifted slices rather than a convolution, so its precision does not depend on the
backend's default convolution precision (bf16 passes on TPU) and it shards over the batch as
any elementwise op does. Unlike the reference, which warns and skips smoothing along a side
shorter than the window, a side shorter than the window is an error here; MS-SSIM's minimum
side is (win_size - 1) * 2**(L - 1) for L weights (the reference fixes 2**4; equal for the
default five weights).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _compute_dtype(a: jax.Array, b: jax.Array) -> jnp.dtype:
    """float64 or float32 when both inputs are already that precision, float32 otherwise."""
    dtype = jnp.result_type(a, b)
    if dtype in (jnp.float32, jnp.float64):
        return jnp.dtype(dtype)
    return jnp.dtype(jnp.float32)


def _cast(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Both images in the compute dtype (outside the jitted cores, so uint8 and float32 inputs
    share one compilation)."""
    dtype = _compute_dtype(a, b)
    return jnp.asarray(a, dtype), jnp.asarray(b, dtype)


def _check_images(a: jax.Array, b: jax.Array, name: str) -> None:
    if np.shape(a) != np.shape(b):
        raise ValueError(f"{name}: images must have the same shape, got {np.shape(a)} and {np.shape(b)}")
    if len(np.shape(a)) != 4:
        raise ValueError(f"{name}: expected images [B, H, W, C], got shape {np.shape(a)}")


def _check_positive(value: float, what: str, name: str) -> None:
    if not value > 0:
        raise ValueError(f"{name}: {what} must be positive, got {value}")


def _gaussian_window(win_size: int, sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian ``[win_size]`` float32, pytorch-msssim's window.

    The reference computes it in float32 with torch. Here exp and the sum are rounded from
    float64 (numpy's float32 exp and sum differ from torch's by an ulp): bit-equal for the
    default 11 / 1.5 window; other windows may differ by one float32 ulp where torch's
    reduction order rounds the sum differently.
    """
    coords = np.arange(win_size, dtype=np.float32) - np.float32(win_size // 2)
    arg = -(coords**2) / np.float32(2 * sigma**2)
    g = np.exp(arg.astype(np.float64)).astype(np.float32)
    return g / np.float32(g.astype(np.float64).sum())


def _blur_valid(x: jax.Array, window: np.ndarray) -> jax.Array:
    """Separable 'valid' Gaussian blur over axes -3 (H) and -2 (W).

    x: [..., H, W, C] float -> [..., H - n + 1, W - n + 1, C], n = len(window).
    """
    n = len(window)
    w = [jnp.asarray(v, x.dtype) for v in window]
    h = x.shape[-3] - n + 1
    out = w[0] * x[..., 0:h, :, :]
    for k in range(1, n):
        out = out + w[k] * x[..., k : k + h, :, :]
    width = out.shape[-2] - n + 1
    x = out
    out = w[0] * x[..., 0:width, :]
    for k in range(1, n):
        out = out + w[k] * x[..., k : k + width, :]
    return out


def _ssim_and_cs(x: jax.Array, y: jax.Array, window: np.ndarray, c1, c2):
    """Per-channel SSIM and contrast-structure means.

    x, y: [B, H, W, C] float; c1, c2: scalars. Returns (ssim, cs), each [B, C] in x's dtype.
    """
    stacked = jnp.stack([x, y, x * x, y * y, x * y])  # [5, B, H, W, C]: one blur for all moments
    mu1, mu2, xx, yy, xy = _blur_valid(stacked, window)
    mu1_sq = mu1 * mu1
    mu2_sq = mu2 * mu2
    mu1_mu2 = mu1 * mu2
    sigma1_sq = xx - mu1_sq
    sigma2_sq = yy - mu2_sq
    sigma12 = xy - mu1_mu2
    cs_map = (2 * sigma12 + c2) / (sigma1_sq + sigma2_sq + c2)
    ssim_map = ((2 * mu1_mu2 + c1) / (mu1_sq + mu2_sq + c1)) * cs_map
    return ssim_map.mean(axis=(1, 2)), cs_map.mean(axis=(1, 2))


def _avg_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 average pool, stride 2, with a zero row/column in front of an odd side (counted).

    Equals torch ``avg_pool2d(kernel_size=2, padding=[H % 2, W % 2])``: of the padding on both
    sides only the front one is ever read. x: [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C].
    """
    bsz, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (h % 2, 0), (w % 2, 0), (0, 0)))
    h2, w2 = (h + 1) // 2, (w + 1) // 2
    return x.reshape(bsz, h2, 2, w2, 2, c).mean(axis=(2, 4))


def _constants(data_range: float, k1: float, k2: float, dtype) -> tuple[jax.Array, jax.Array]:
    """C1, C2 computed in Python floats, then rounded to the compute dtype as torch does."""
    return (jnp.asarray((k1 * data_range) ** 2, dtype), jnp.asarray((k2 * data_range) ** 2, dtype))


def _check_window(win_size: int, sigma: float, name: str) -> None:
    if win_size < 1 or win_size % 2 != 1:
        raise ValueError(f"{name}: win_size must be a positive odd integer, got {win_size}")
    _check_positive(sigma, "sigma", name)


def psnr(a: jax.Array, b: jax.Array, max_value: float = 255.0) -> jax.Array:
    """Peak signal-to-noise ratio per image, ``10 log10(max_value**2 / MSE)``.

    Args:
      a, b: images [B, H, W, C], uint8/integer (computed in float32) or float32/float64 (computed
        in that dtype).
      max_value: peak value, 255 for uint8-range images, 1.0 for [0, 1] images.
    Returns:
      [B] PSNR in dB (MSE over H, W, C of each image); +inf for identical images.
    """
    _check_images(a, b, "psnr")
    _check_positive(max_value, "max_value", "psnr")
    x, y = _cast(a, b)
    return _psnr(x, y, jnp.asarray(float(max_value) ** 2, x.dtype))


@jax.jit
def _psnr(x: jax.Array, y: jax.Array, max_sq: jax.Array) -> jax.Array:
    diff = x - y
    mse = jnp.mean(diff * diff, axis=(1, 2, 3))
    return 10 * jnp.log10(max_sq / mse)


def ssim(
    a: jax.Array,
    b: jax.Array,
    *,
    data_range: float = 255.0,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    nonnegative: bool = False,
) -> jax.Array:
    """Structural similarity per image (pytorch-msssim ``ssim``, ``size_average=False``).

    Args:
      a, b: images [B, H, W, C] with H, W >= win_size; uint8/integer (computed in float32) or
        float32/float64 (computed in that dtype).
      data_range: value range of the images (255 for uint8 range, 1.0 for [0, 1]).
      win_size, sigma: odd Gaussian window length and its standard deviation.
      k1, k2: stabilising constants, C1 = (k1 data_range)**2, C2 = (k2 data_range)**2.
      nonnegative: ReLU on each channel's SSIM (the reference's ``nonnegative_ssim``).
    Returns:
      [B] mean over channels of the mean SSIM over the valid map.
    """
    _check_images(a, b, "ssim")
    _check_window(win_size, sigma, "ssim")
    _check_positive(data_range, "data_range", "ssim")
    if min(np.shape(a)[1:3]) < win_size:
        raise ValueError(f"ssim: image sides must be at least win_size={win_size}, got H, W = {np.shape(a)[1:3]}")
    x, y = _cast(a, b)
    c1, c2 = _constants(data_range, k1, k2, x.dtype)
    s = _ssim_per_channel(x, y, c1, c2, win_size=win_size, sigma=sigma)
    if nonnegative:
        s = jax.nn.relu(s)
    return s.mean(axis=-1)


@functools.partial(jax.jit, static_argnames=("win_size", "sigma"))
def _ssim_per_channel(x, y, c1, c2, *, win_size, sigma):
    """[B, C] SSIM of each channel."""
    return _ssim_and_cs(x, y, _gaussian_window(win_size, sigma), c1, c2)[0]


def ms_ssim(
    a: jax.Array,
    b: jax.Array,
    *,
    data_range: float = 255.0,
    weights: Sequence[float] = MS_SSIM_WEIGHTS,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> jax.Array:
    """Multi-scale SSIM per image (pytorch-msssim ``ms_ssim``, ``size_average=False``).

    Args:
      a, b: images [B, H, W, C]; uint8/integer (computed in float32) or float32/float64
        (computed in that dtype). min(H, W) must exceed (win_size - 1) * 2**(L - 1), L =
        len(weights): 160 for the defaults, as the reference asserts.
      data_range: value range of the images (255 for uint8 range, 1.0 for [0, 1]).
      weights: per-scale exponents, finest first.
      win_size, sigma, k1, k2: as in ``ssim``.
    Returns:
      [B] mean over channels of ``prod_{i<L} relu(cs_i)**w_i * relu(ssim_L)**w_L``.
    """
    _check_images(a, b, "ms_ssim")
    _check_window(win_size, sigma, "ms_ssim")
    _check_positive(data_range, "data_range", "ms_ssim")
    weights = tuple(float(w) for w in weights)
    if not weights:
        raise ValueError("ms_ssim: weights must name at least one scale")
    levels = len(weights)
    min_side = (win_size - 1) * 2 ** (levels - 1)
    if min(np.shape(a)[1:3]) <= min_side:
        raise ValueError(
            f"ms_ssim: image sides must be larger than {min_side} for {levels} scales with "
            f"win_size={win_size} (minimum {min_side + 1}), got H, W = {np.shape(a)[1:3]}"
        )
    x, y = _cast(a, b)
    c1, c2 = _constants(data_range, k1, k2, x.dtype)
    return _ms_ssim(x, y, c1, c2, jnp.asarray(weights, x.dtype), win_size=win_size, sigma=sigma)


@functools.partial(jax.jit, static_argnames=("win_size", "sigma"))
def _ms_ssim(x, y, c1, c2, weights, *, win_size, sigma):
    """[B] MS-SSIM; weights [L] (L static from the shape)."""
    levels = weights.shape[0]
    window = _gaussian_window(win_size, sigma)
    terms = []
    for level in range(levels):  # static: the scales, not the batch
        s, cs = _ssim_and_cs(x, y, window, c1, c2)
        if level < levels - 1:
            terms.append(jax.nn.relu(cs))
            x, y = _avg_pool_2x2(x), _avg_pool_2x2(y)
    terms.append(jax.nn.relu(s))
    stacked = jnp.stack(terms)  # [L, B, C]
    return jnp.prod(stacked ** weights[:, None, None], axis=0).mean(axis=-1)
