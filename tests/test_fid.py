"""FID / KID statistics (``percov2_jax.metrics.fid``) against clean-fid's formulas.

Reference: ``clean_fid_frechet_distance`` and ``clean_fid_kernel_distance`` below are copied
from clean-fid 0.1.35 ``cleanfid/fid.py`` (``frechet_distance``, ``kernel_distance``; pytorch-fid
0.3.0's ``calculate_frechet_distance`` is identical). clean-fid itself cannot be imported here:
``cleanfid.fid`` imports ``cleanfid.utils``, which imports torchvision, which fails beside torch
2.13. The only change: no ``disp=False`` in ``sqrtm`` (deprecated in scipy 1.16, and it only
adds an error estimate). Independent checks: closed forms for diagonal covariances, and the
Gaussian identity FID = 0 for a set against itself.

Tolerances (float64): FID vs reference 1e-10 relative; diagonal closed form 1e-9 relative;
self-FID <= 1e-6 (measured -8.5e-14 at N=400, D=128; with N=40 < D the rank-deficient product
leaves -2.9e-6, bounded by 1e-6 * tr(sigma) = 6.3e-5);
KID vs reference: exact (same draws).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import linalg

from percov2_jax.metrics import fid as fid_lib
from percov2_jax.metrics.fid import feature_statistics, fid_from_features, frechet_distance, kernel_inception_distance


def clean_fid_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    tr_covmean = np.trace(covmean)
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean


def clean_fid_kernel_distance(feats1, feats2, num_subsets=100, max_subset_size=1000):
    n = feats1.shape[1]
    m = min(min(feats1.shape[0], feats2.shape[0]), max_subset_size)
    t = 0
    for _subset_idx in range(num_subsets):
        x = feats2[np.random.choice(feats2.shape[0], m, replace=False)]
        y = feats1[np.random.choice(feats1.shape[0], m, replace=False)]
        a = (x @ x.T / n + 1) ** 3 + (y @ y.T / n + 1) ** 3
        b = (x @ y.T / n + 1) ** 3
        t += (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
    kid = t / num_subsets / m
    return float(kid)


def features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """ReLU-like, correlated, non-negative features as pool3's, ``[n, d]`` float32."""
    rng = np.random.RandomState(seed)
    mix = np.random.RandomState(1234).normal(0, 1, (d, d)) / np.sqrt(d)  # fixed: one distribution
    return np.maximum(rng.normal(shift, 1, (n, d)) @ mix + 0.3, 0).astype(np.float32)


def test_feature_statistics():
    f = features(50, 16, seed=0)
    mu, sigma = feature_statistics(f)
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (16, 16)
    np.testing.assert_allclose(mu, np.mean(f.astype(np.float64), axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-12)
    centred = f.astype(np.float64) - mu
    np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-10)  # unbiased (N - 1)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(f[:1])


def test_frechet_distance_matches_clean_fid():
    s1, s2 = feature_statistics(features(300, 64, seed=1)), feature_statistics(features(300, 64, seed=2, shift=0.2))
    ours = frechet_distance(*s1, *s2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = clean_fid_frechet_distance(*s1, *s2)
    print(f"FID {ours:.6f} vs clean-fid formula {ref:.6f}")
    assert isinstance(ours, float) and ours > 0
    assert abs(ours - ref) <= 1e-10 * abs(ref)
    assert fid_from_features(features(300, 64, seed=1), features(300, 64, seed=2, shift=0.2)) == ours


def test_eigh_method_equals_sqrtm():
    """The fast symmetric-eigendecomposition trace equals scipy's sqrtm route: 1e-10 relative at
    full rank; with N < D the rank-deficient product leaves ~1e-6 absolute noise in either route
    (measured on the second case of this test's seeds: against a 40-digit mpmath value, eigh is
    off by 8.6e-7, sqrtm by 1.3e-6), so 1e-7 relative there."""
    for n, d, shift, tol in [(300, 64, 0.2, 1e-10), (40, 128, 0.5, 1e-7)]:
        f1, f2 = features(n, d, seed=6), features(n, d, seed=7, shift=shift)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = fid_from_features(f1, f2)
        fast = fid_from_features(f1, f2, method="eigh")
        print(f"FID n={n} d={d}: sqrtm {reference:.10f} eigh {fast:.10f}")
        assert abs(fast - reference) <= tol * abs(reference)
    g = features(40, 128, seed=5)
    assert abs(fid_from_features(g, g, method="eigh")) <= 1e-6 * np.trace(np.cov(g, rowvar=False))
    with pytest.raises(ValueError, match="FID method"):
        fid_from_features(g, g, method="svd")


def test_frechet_distance_closed_form():
    """Diagonal covariances: FID = |mu1 - mu2|^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2."""
    rng = np.random.RandomState(3)
    mu1, mu2 = rng.normal(0, 1, 32), rng.normal(0, 1, 32)
    v1, v2 = rng.uniform(0.1, 2, 32), rng.uniform(0.1, 2, 32)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    np.testing.assert_allclose(frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)), expected, rtol=1e-9)
    # 1-D statistics are promoted as clean-fid's atleast_1d / atleast_2d do.
    np.testing.assert_allclose(frechet_distance(1.0, 4.0, 0.0, 1.0), 1.0 + (2.0 - 1.0) ** 2, rtol=1e-12)
    with pytest.raises(ValueError, match="mismatched statistics"):
        frechet_distance(mu1, np.diag(v1), mu2[:5], np.diag(v2[:5]))


def test_fid_of_a_set_with_itself_is_zero():
    f = features(400, 128, seed=4)
    value = fid_from_features(f, f)
    print(f"self-FID {value:.2e}")
    assert abs(value) <= 1e-6
    # Fewer samples than dimensions: rank-deficient covariances, complex noise in sqrtm.
    g = features(40, 128, seed=5)
    value = fid_from_features(g, g)
    print(f"self-FID, N < D: {value:.2e}")
    assert abs(value) <= 1e-6 * np.trace(np.cov(g, rowvar=False))


def test_singular_product_retries_with_offset(monkeypatch):
    calls = []
    real_sqrtm = fid_lib._sqrtm

    def flaky_sqrtm(a):
        calls.append(a.copy())
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(fid_lib, "_sqrtm", flaky_sqrtm)
    mu, sigma = np.zeros(3), np.diag([1.0, 2.0, 3.0])
    with pytest.warns(UserWarning, match="singular covariance product"):
        value = frechet_distance(mu, sigma, mu, sigma, eps=1e-3)
    np.testing.assert_allclose(calls[1], (sigma + 1e-3 * np.eye(3)) @ (sigma + 1e-3 * np.eye(3)))
    np.testing.assert_allclose(value, -2 * 3 * 1e-3, rtol=1e-9)  # tr(2S) - 2 tr(S + eps I)


def test_kid_matches_clean_fid():
    f1, f2 = features(120, 32, seed=6), features(90, 32, seed=7, shift=0.3)
    for subset_size in (1000, 50):
        np.random.seed(11)
        ref = clean_fid_kernel_distance(
            f1.astype(np.float64), f2.astype(np.float64), num_subsets=20, max_subset_size=subset_size
        )
        ours = kernel_inception_distance(f1, f2, num_subsets=20, max_subset_size=subset_size, seed=11)
        assert ours == ref, (subset_size, ours, ref)
    with pytest.raises(ValueError, match="KID expects"):
        kernel_inception_distance(f1, f2[:, :5])


def test_kid_is_unbiased():
    """Same distribution: KID averages to 0 over independent data sets (it can be negative);
    a shifted distribution is far above the spread."""
    same = np.array(
        [
            kernel_inception_distance(
                features(100, 32, seed=100 + k), features(100, 32, seed=200 + k), num_subsets=5, seed=k
            )
            for k in range(40)
        ]
    )
    shifted = np.array(
        [
            kernel_inception_distance(
                features(100, 32, seed=300 + k), features(100, 32, seed=400 + k, shift=0.3), num_subsets=5, seed=k
            )
            for k in range(5)
        ]
    )
    sem = same.std(ddof=1) / np.sqrt(len(same))
    print(f"KID same: mean {same.mean():.2e} +- {sem:.2e} (min {same.min():.2e}); shifted: {shifted.mean():.3e}")
    assert abs(same.mean()) <= 3 * sem
    assert same.min() < 0  # unbiased, not clipped
    assert shifted.min() > same.mean() + 10 * same.std()
