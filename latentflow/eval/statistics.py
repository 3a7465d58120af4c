"""Feature statistics and the distances between them: the Frechet distance (FID, FD-DINOv2) and the kernel
distance (KID, an unbiased MMD^2 with the cubic polynomial kernel)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from latentflow.errors import LatentflowError


@dataclass
class FeatureStatistics:
    """Mean and covariance of a feature set (float64), optionally with the features themselves (for KID).

    Attributes:
        mu: (D,) mean feature.
        sigma: (D, D) unbiased covariance.
        num_images: number of images the statistics were computed from.
        features: (N, D) float32 features, or None when only the moments were kept.
    """

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int
    features: np.ndarray | None = None


def feature_statistics(features: np.ndarray, keep_features: bool = True) -> FeatureStatistics:
    """Moments of a feature matrix.

    Args:
        features: (N, D) features, N >= 2.
        keep_features: keep a float32 copy of the features (needed for KID).
    """
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] < 2:
        raise LatentflowError(f"need at least 2 feature vectors of shape (N, D); got shape {features.shape}")
    as64 = features.astype(np.float64)
    return FeatureStatistics(
        mu=as64.mean(axis=0),
        sigma=np.cov(as64, rowvar=False),
        num_images=int(features.shape[0]),
        features=features.astype(np.float32) if keep_features else None,
    )


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Principal square root of a symmetric positive semi-definite (D, D) matrix via its eigendecomposition."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((sigma1 sigma2)^(1/2)) for covariance matrices (D, D).

    sigma1 sigma2 is similar to the symmetric PSD matrix A = sigma1^(1/2) sigma2 sigma1^(1/2), so the eigenvalues
    agree and tr((sigma1 sigma2)^(1/2)) = sum_i sqrt(lambda_i(A)). This stays real and stable for the singular
    covariances one gets from fewer samples than dimensions.
    """
    root1 = _symmetric_sqrt(np.asarray(sigma1, dtype=np.float64))
    product = root1 @ np.asarray(sigma2, dtype=np.float64) @ root1
    eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
    return float(np.sqrt(np.clip(eigenvalues, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet (2-Wasserstein) distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    Args:
        mu1, mu2: (D,) means.
        sigma1, sigma2: (D, D) covariances.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    if mu1.shape != mu2.shape or np.shape(sigma1) != np.shape(sigma2):
        raise LatentflowError(
            f"feature statistics differ in dimension: {mu1.shape} vs {mu2.shape}; compare the same feature network"
        )
    mean_term = float(np.sum((mu1 - mu2) ** 2))
    trace_term = float(np.trace(sigma1) + np.trace(sigma2)) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return mean_term + trace_term


def trace_sqrt_product_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """tr((sigma1 sigma2)^(1/2)) straight from the features (N1, D) and (N2, D).

    With A_i the centred features scaled by 1/sqrt(N_i - 1), sigma_i = A_i^T A_i, and the non-zero eigenvalues of
    sigma1 sigma2 = A1^T (A1 A2^T) A2 are those of (A1 A2^T)(A1 A2^T)^T: the trace of the square root is the sum
    of the singular values (nuclear norm) of the (N1, N2) matrix A1 A2^T. Cheap when N1 N2 min(N1, N2) < D^3.
    """
    scaled = []
    for features in (features1, features2):
        as64 = np.asarray(features, np.float64)
        scaled.append((as64 - as64.mean(axis=0)) / np.sqrt(as64.shape[0] - 1))
    return float(np.linalg.svd(scaled[0] @ scaled[1].T, compute_uv=False).sum())


def frechet_distance_from_stats(stats1: FeatureStatistics, stats2: FeatureStatistics) -> float:
    """Frechet distance between two `FeatureStatistics`, via the features' nuclear norm when that is cheaper."""
    n1, n2, dim = stats1.num_images, stats2.num_images, stats1.mu.shape[0]
    have_features = stats1.features is not None and stats2.features is not None
    if not have_features or n1 * n2 * min(n1, n2) >= dim**3 or stats1.mu.shape != stats2.mu.shape:
        return frechet_distance(stats1.mu, stats1.sigma, stats2.mu, stats2.sigma)
    mean_term = float(np.sum((stats1.mu - stats2.mu) ** 2))
    cross = trace_sqrt_product_from_features(stats1.features, stats2.features)
    return mean_term + float(np.trace(stats1.sigma) + np.trace(stats2.sigma)) - 2.0 * cross


@dataclass
class KIDResult:
    """Kernel Inception Distance: mean and standard deviation of the unbiased MMD^2 over subsets."""

    mean: float
    std: float
    subset_size: int
    num_subsets: int


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x . y / D + 1)^3 for rows of x (m, D) and y (n, D) -> (m, n)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased estimate of MMD^2 with the cubic polynomial kernel between samples x (m, D) and y (m, D)."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.mean())


def kernel_inception_distance(
    features1: np.ndarray,
    features2: np.ndarray,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> KIDResult:
    """KID (Binkowski et al. 2018): unbiased MMD^2, cubic polynomial kernel, averaged over random subsets.

    Args:
        features1: (N1, D) features.
        features2: (N2, D) features.
        num_subsets: number of random subsets (drawn without replacement within a subset).
        subset_size: subset size, capped at half the smaller set (at least 2), so that subsets differ and the
            spread over them means something (subsets as large as a set would all be that set).
        seed: seed of the numpy generator choosing the subsets.
    """
    x, y = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    m = min(subset_size, max(2, min(x.shape[0], y.shape[0]) // 2))
    if m < 2:
        raise LatentflowError(f"KID needs at least 2 samples per set; got {x.shape[0]} and {y.shape[0]}")
    rng = np.random.default_rng(seed)
    values = [
        unbiased_mmd2(x[rng.choice(x.shape[0], m, replace=False)], y[rng.choice(y.shape[0], m, replace=False)])
        for _ in range(num_subsets)
    ]
    return KIDResult(float(np.mean(values)), float(np.std(values)), m, num_subsets)


@dataclass
class SampleMetrics:
    """Metrics of one sample set against a reference.

    Attributes:
        fid: Frechet distance on Inception features.
        kid: KID mean (None when the reference kept no features), kid_std its std over subsets.
        fd_dinov2: Frechet distance on DINOv2 features, or None.
        num_samples: number of generated images.
    """

    fid: float
    kid: float | None
    kid_std: float | None
    fd_dinov2: float | None
    num_samples: int


def compare_statistics(
    samples: dict[str, FeatureStatistics],
    reference: dict[str, FeatureStatistics],
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> SampleMetrics:
    """FID, KID and (where present) FD-DINOv2 of sample statistics against reference statistics."""
    inception_samples, inception_reference = samples["inception"], reference["inception"]
    kid = None
    if inception_samples.features is not None and inception_reference.features is not None:
        kid = kernel_inception_distance(
            inception_samples.features, inception_reference.features, kid_subsets, kid_subset_size, seed
        )
    fd_dinov2 = None
    if "dinov2" in samples and "dinov2" in reference:
        fd_dinov2 = frechet_distance_from_stats(samples["dinov2"], reference["dinov2"])
    return SampleMetrics(
        fid=frechet_distance_from_stats(inception_samples, inception_reference),
        kid=None if kid is None else kid.mean,
        kid_std=None if kid is None else kid.std,
        fd_dinov2=fd_dinov2,
        num_samples=inception_samples.num_images,
    )
