"""Pixel metrics (percov2_jax/metrics/pixel.py) against pytorch-msssim 1.0.0 and skimage.

Tolerances: SSIM and MS-SSIM equal pytorch-msssim to 1e-10 in float64 and 1e-5 in float32
(uint8 inputs); PSNR equals the formula and skimage to 1e-10 in float64. skimage's SSIM
averages the same valid region; it differs from pytorch-msssim only by its float64 window.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim as ref_ms_ssim
from pytorch_msssim import ssim as ref_ssim
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from percov2_jax.metrics import pixel

pytestmark = pytest.mark.parity  # against PyTorch reference models

F64_TOL = 1e-10
F32_TOL = 1e-5


def image_pairs(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [3, h, w, 3] references and degraded versions: an astronaut crop with noise, a
    uniform-noise image with noise, and a uniform-noise image against its negative (negative
    cs, so MS-SSIM's ReLU decides the value)."""
    rng = np.random.default_rng(seed)
    photo = skdata.astronaut()[60 : 60 + h, 140 : 140 + w]
    noise = rng.integers(0, 256, (h, w, 3))
    clean = np.stack([photo, noise, noise]).astype(np.float64)
    degraded = np.clip(clean + rng.normal(0, 12, clean.shape), 0, 255)
    degraded[2] = 255 - clean[2]
    return clean.astype(np.uint8), np.round(degraded).astype(np.uint8)


def torch_metric(fn, a: np.ndarray, b: np.ndarray, dtype: torch.dtype, **kw) -> np.ndarray:
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(dtype)
    with torch.no_grad():
        out = fn(nchw(a), nchw(b), data_range=255, size_average=False, **kw)
    return out.double().numpy()


def max_abs(x, ref) -> float:
    return float(np.max(np.abs(np.asarray(x, np.float64) - ref)))


def test_ms_ssim_float64_odd_and_even_sides():
    # H 177 -> 89 -> 45 -> 23 -> 12 pads at every pooling; W 194 -> 97 -> 49 -> 25 -> 13 pads
    # from the second one on.
    a, b = image_pairs(177, 194, seed=1)
    ref = torch_metric(ref_ms_ssim, a, b, torch.float64)
    assert ref[2] == 0.0 and 0.1 < ref[0] < 0.99 and 0.1 < ref[1] < 0.99
    with jax.enable_x64(True):
        out = pixel.ms_ssim(jnp.asarray(a, jnp.float64), jnp.asarray(b, jnp.float64))
        assert out.dtype == jnp.float64 and out.shape == (3,)
        err = max_abs(out, ref)
        same = pixel.ms_ssim(jnp.asarray(a, jnp.float64), jnp.asarray(a, jnp.float64))
    print(f"ms_ssim 177x194 float64 max abs error {err:.1e}")
    assert err <= F64_TOL
    np.testing.assert_allclose(np.asarray(same), 1.0, rtol=0, atol=F64_TOL)


def test_ms_ssim_float32_uint8():
    a, b = image_pairs(176, 192)
    ref = torch_metric(ref_ms_ssim, a, b, torch.float32)
    out = pixel.ms_ssim(a, b)  # uint8 in, computed in float32
    assert out.dtype == jnp.float32 and out.shape == (3,)
    err = max_abs(out, ref)
    print(f"ms_ssim 176x192 float32 (uint8 inputs) max abs error {err:.1e}")
    assert err <= F32_TOL
    np.testing.assert_array_equal(out, pixel.ms_ssim(a.astype(np.float32), b.astype(np.float32)))
    # uint8 images on [0, 1] with data_range 1 is the same metric.
    scaled = pixel.ms_ssim(a / np.float32(255), b / np.float32(255), data_range=1.0)
    np.testing.assert_allclose(scaled, out, atol=F32_TOL)


def test_avg_pool_matches_torch_padding():
    x = np.random.default_rng(2).normal(size=(2, 7, 10, 3))
    ref = F.avg_pool2d(torch.from_numpy(x.transpose(0, 3, 1, 2)), kernel_size=2, padding=[1, 0])
    with jax.enable_x64(True):
        out = np.asarray(pixel._avg_pool_2x2(jnp.asarray(x)))
    assert out.shape == (2, 4, 5, 3)
    np.testing.assert_allclose(out, ref.numpy().transpose(0, 2, 3, 1), rtol=0, atol=1e-15)


def test_gaussian_window_is_the_reference_window():
    """Bit-equal for the default window; within a float32 ulp for others (torch's sum order)."""
    from pytorch_msssim.ssim import _fspecial_gauss_1d

    ref = _fspecial_gauss_1d(11, 1.5).numpy().ravel()
    np.testing.assert_array_equal(pixel._gaussian_window(11, 1.5), ref)
    for size, sigma in [(7, 1.0), (3, 0.8), (21, 3.0)]:
        ref = _fspecial_gauss_1d(size, sigma).numpy().ravel()
        np.testing.assert_array_max_ulp(pixel._gaussian_window(size, sigma), ref, maxulp=1)


def test_ssim_float64_float32():
    a, b = image_pairs(64, 48, seed=3)
    ref64 = torch_metric(ref_ssim, a, b, torch.float64)
    ref32 = torch_metric(ref_ssim, a, b, torch.float32)
    assert ref64[2] < 0  # no ReLU by default
    with jax.enable_x64(True):
        out64 = pixel.ssim(jnp.asarray(a, jnp.float64), jnp.asarray(b, jnp.float64))
        assert out64.dtype == jnp.float64 and out64.shape == (3,)
    out32 = pixel.ssim(a, b)
    assert out32.dtype == jnp.float32
    err64, err32 = max_abs(out64, ref64), max_abs(out32, ref32)
    print(f"ssim max abs error float64 {err64:.1e}, float32 {err32:.1e}")
    assert err64 <= F64_TOL and err32 <= F32_TOL
    nonneg = pixel.ssim(a, b, nonnegative=True)
    ref_nonneg = torch_metric(ref_ssim, a, b, torch.float32, nonnegative_ssim=True)
    assert float(nonneg[2]) == 0.0
    assert max_abs(nonneg, ref_nonneg) <= F32_TOL


def test_ssim_agrees_with_skimage():
    """skimage filters with reflected borders, then averages the map cropped by (win - 1) / 2:
    exactly the valid region. With a float64 window the two agree to 1e-10; pytorch-msssim's
    float32 window does not sum to 1 exactly, which moves SSIM by a few 1e-6."""
    a, b = image_pairs(64, 48, seed=3)
    a, b = a.astype(np.float64), b.astype(np.float64)
    sk = np.array(
        [
            structural_similarity(
                x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1
            )
            for x, y in zip(a, b)
        ]
    )
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    with jax.enable_x64(True):
        s, _ = pixel._ssim_and_cs(jnp.asarray(a), jnp.asarray(b), g / g.sum(), 2.55**2, 7.65**2)
        exact_window = s.mean(axis=-1)
        public = pixel.ssim(jnp.asarray(a), jnp.asarray(b))
    err_exact, err_public = max_abs(exact_window, sk), max_abs(public, sk)
    print(f"skimage vs float64 window {err_exact:.1e}, vs pytorch-msssim window {err_public:.1e}")
    assert err_exact <= F64_TOL
    assert err_public <= 2e-5


def test_psnr():
    a, b = image_pairs(64, 48, seed=4)
    with jax.enable_x64(True):
        out = np.asarray(pixel.psnr(jnp.asarray(a, jnp.float64), jnp.asarray(b, jnp.float64)))
    mse = ((a.astype(np.float64) - b) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(out, 10 * np.log10(255.0**2 / mse), rtol=0, atol=F64_TOL)
    sk = [peak_signal_noise_ratio(x, y, data_range=255) for x, y in zip(a, b)]
    np.testing.assert_allclose(out, sk, rtol=0, atol=F64_TOL)
    # uint8 inputs are subtracted in float32 (no wrap-around), and [0, 1] images with max 1.
    np.testing.assert_allclose(pixel.psnr(a, b), out, atol=1e-4)
    np.testing.assert_allclose(pixel.psnr(a / 255.0, b / 255.0, max_value=1.0), out, atol=1e-4)
    same = pixel.psnr(a, a)
    assert same.shape == (3,) and np.all(np.isposinf(same))


def test_jit_and_identical_images():
    a, _ = image_pairs(64, 48, seed=5)
    x = jnp.asarray(a, jnp.float32)
    np.testing.assert_allclose(jax.jit(pixel.ssim)(x, x), 1.0, atol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda u: pixel.psnr(u, u + 1.0))(x), 10 * np.log10(255**2), atol=1e-4)


def test_input_errors():
    x = np.zeros((1, 176, 192, 3), np.uint8)
    with pytest.raises(ValueError, match="same shape"):
        pixel.ms_ssim(x, x[:, :, :190])
    with pytest.raises(ValueError, match="same shape"):
        pixel.psnr(x, x[:, :10])
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        pixel.ssim(x[0], x[0])
    with pytest.raises(ValueError, match="larger than 160.*minimum 161"):
        pixel.ms_ssim(x[:, :160], x[:, :160])
    with pytest.raises(ValueError, match="larger than 96"):
        pixel.ms_ssim(x[:, :96], x[:, :96], win_size=7)
    with pytest.raises(ValueError, match="odd"):
        pixel.ssim(x, x, win_size=10)
    with pytest.raises(ValueError, match="at least win_size=11"):
        pixel.ssim(x[:, :10], x[:, :10])
    with pytest.raises(ValueError, match="data_range"):
        pixel.ms_ssim(x, x, data_range=0)
    with pytest.raises(ValueError, match="weights"):
        pixel.ms_ssim(x, x, weights=())
