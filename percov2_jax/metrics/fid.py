"""FID and KID from Inception pool3 features (``percov2_jax.metrics.inception``), in float64 numpy.

PerCo (SD) reports clean-fid's ``compute_fid`` / ``compute_kid``; these are their statistics
stages (clean-fid 0.1.35 ``fid_from_feats``, ``frechet_distance``, ``kernel_distance``;
pytorch-fid 0.3.0's ``calculate_frechet_distance`` is the same formula):

- ``feature_statistics``: mean and unbiased covariance (``np.cov(rowvar=False)``);
- ``frechet_distance``: ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))`` with scipy's ``sqrtm``,
  retried with ``eps * I`` added to both covariances when the product's root is not finite;
- ``kernel_inception_distance``: the unbiased MMD^2 with the cubic polynomial kernel
  ``k(x, y) = (x . y / d + 1)^3``, averaged over random subsets.

The features themselves come from ``FIDInceptionV3`` on 299x299 images; this file needs no JAX.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """``features [N, D]`` -> ``(mu [D], sigma [D, D])`` float64; ``sigma`` is ``np.cov(rowvar=False)``
    (normalised by ``N - 1``). ``N >= 2``."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_statistics expects [N >= 2, D] features, got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    # scipy >= 1.16 deprecates sqrtm's ``disp`` (clean-fid passes disp=False only to get the
    # result without the printed error estimate); singular products show up as non-finite roots.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(a)


FID_METHODS = ("sqrtm", "eigh")


def trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``Tr sqrtm(sigma1 @ sigma2)`` for symmetric PSD covariances through two symmetric
    eigendecompositions: with ``A = sigma1^(1/2)``, ``sigma1 sigma2`` is similar to the PSD matrix
    ``A sigma2 A``, so the trace is the sum of the roots of its eigenvalues (negative rounding
    noise clipped to 0). About 5x faster than scipy's ``sqrtm`` at D = 2048 (2.6 s vs 13.8 s on 2 cores) and free of its
    complex-noise retries."""
    w, v = np.linalg.eigh(sigma1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root @ sigma2 @ root
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "sqrtm") -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (float).

    ``method="sqrtm"`` (default) is clean-fid/pytorch-fid's: if ``sqrtm(sigma1 @ sigma2)`` is not
    finite, ``eps * I`` is added to both covariances and the root retaken; an imaginary part
    (numerical noise) is dropped, but a diagonal imaginary part above 1e-3 raises ``ValueError``.
    ``method="eigh"`` computes the same trace with `trace_sqrt_product_eigh` (agreement with
    ``sqrtm``: 1e-10 relative at full rank, 1e-7 with fewer samples than dimensions, where the
    eigh route is the closer of the two to a high-precision value; tests/test_fid.py).
    """
    if method not in FID_METHODS:
        raise ValueError(f"FID method must be one of {FID_METHODS}, got {method!r}")
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    if method == "eigh":
        return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product_eigh(sigma1, sigma2))
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        warnings.warn(
            f"FID: singular covariance product; adding {eps} to the diagonal of both covariances", stacklevel=2
        )
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm(sigma1 sigma2)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(features1, features2, method: str = "sqrtm") -> float:
    """FID between two feature sets ``[N1, D]``, ``[N2, D]`` (clean-fid ``fid_from_feats``)."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2), method=method)


def kernel_inception_distance(
    features1,
    features2,
    num_subsets: int = 100,
    max_subset_size: int = 1000,
    seed: int | np.random.RandomState | None = 0,
) -> float:
    """KID between feature sets ``[N1, D]`` and ``[N2, D]`` (clean-fid ``kernel_distance``).

    Each of ``num_subsets`` rounds draws ``m = min(N1, N2, max_subset_size)`` rows without
    replacement, first from ``features2`` (x) then from ``features1`` (y), and adds the unbiased
    MMD^2 estimate ``[sum_{i!=j} k(x_i,x_j) + k(y_i,y_j)] / (m (m-1)) - 2 sum_{i,j} k(x_i,y_j) / m^2``.

    ``seed`` seeds a ``np.random.RandomState`` (or is one); clean-fid draws from numpy's global
    generator, so ``np.random.seed(s); kernel_distance(...)`` equals ``seed=s`` here.
    """
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"KID expects [N1, D] and [N2, D] features, got {f1.shape} and {f2.shape}")
    rng = seed if isinstance(seed, np.random.RandomState) else np.random.RandomState(seed)
    d = f1.shape[1]
    m = min(f1.shape[0], f2.shape[0], max_subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {f1.shape[0]} and {f2.shape[0]}")
    total = 0.0
    for _ in range(num_subsets):
        x = f2[rng.choice(f2.shape[0], m, replace=False)]
        y = f1[rng.choice(f1.shape[0], m, replace=False)]
        a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
        b = (x @ y.T / d + 1) ** 3
        total += (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
    return float(total / num_subsets / m)
