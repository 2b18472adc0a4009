"""Set metrics between two samples of images or image features: pure functions.

Feature arrays are float ``(N, D)`` (any float dtype; computed in float64). Images are
float32 ``(N, C, H, W)`` in [0, 1]. Nothing here reads files or picks an extractor; the
filter stage does that and names the extractor next to every number.

- :func:`frechet_distance` / :func:`fid`: Fréchet distance of Gaussians fitted to the two
  feature sets (mean, covariance with ddof=1, like torchmetrics and pytorch-fid). The
  matrix square root term ``tr sqrt(S1 S2)`` is computed as ``sum sqrt(eig(A S2 A))`` with
  ``A = S1^1/2`` from a symmetric eigendecomposition: ``A S2 A`` is symmetric PSD and
  similar to ``S1 S2``, so the eigenvalues are real and the result stable, in float64.
- :func:`kid`: Kernel Inception Distance, the unbiased MMD^2 estimator with the polynomial
  kernel ``k(x, y) = (x.y / D + 1) ** 3``, averaged over random subsets (mean and
  population std over subsets, as torchmetrics).
- :func:`precision_recall`: Kynkäänniemi et al. (2019) k-NN manifolds; :func:`density_coverage`:
  Naeem et al. (2020).
- :func:`ms_ssim_diversity`: mean MS-SSIM over random pairs within one set (MONAI's
  ``compute_ms_ssim``); lower means more diverse. Scales that do not fit the image size
  are dropped and the remaining standard weights renormalised (:func:`ms_ssim_settings`).
- :func:`nearest_distances` / :func:`close_pairs`: chunked Euclidean nearest neighbours
  for the memorisation and near-duplicate filters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from generators.errors import DataError

#: pairwise distance blocks are computed this many rows at a time (memory ~ CHUNK x N x 8 bytes)
CHUNK_ROWS = 1024
#: KID precomputes the full kernel matrices when both sets have at most this many rows
FULL_GRAM_MAX_ROWS = 4096
#: the 5 standard MS-SSIM weights (Wang et al. 2003), finest scale first
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


# --------------------------------------------------------------------------- helpers
def _as_features(features: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise DataError(f"{name}: expected features of shape (N, D), got {array.shape}")
    if not np.isfinite(array).all():
        raise DataError(f"{name}: expected finite features, got NaN or infinity; check the extractor's input")
    return array


def _check_dims(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise DataError(f"expected two feature sets of the same dimension, got {a.shape[1]} and {b.shape[1]}")


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues -> 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


# --------------------------------------------------------------------------- FID
def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` (ddof=1), float64. Needs N >= 2."""
    x = _as_features(features, "features")
    if x.shape[0] < 2:
        raise DataError(f"expected at least 2 samples for a covariance, got {x.shape[0]}")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False, ddof=1))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2)`` of two Gaussians, float64 (>= 0
    up to round-off; tiny negative values are clipped to 0)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise DataError(
            f"expected means (D,) and covariances (D, D) of one D, got {mu1.shape}, {sigma1.shape}, "
            f"{mu2.shape}, {sigma2.shape}"
        )
    root1 = _sqrtm_psd(sigma1)
    product = root1 @ sigma2 @ root1
    trace_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)
    return max(value, 0.0)


def fid(real: np.ndarray, synthetic: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N, D)``, ``(M, D)``."""
    real, synthetic = _as_features(real, "real"), _as_features(synthetic, "synthetic")
    _check_dims(real, synthetic)
    return frechet_distance(*feature_statistics(real), *feature_statistics(synthetic))


# --------------------------------------------------------------------------- KID
def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef: float = 1.0) -> np.ndarray:
    """``(x @ y.T / D + coef) ** degree``, float64 ``(N, M)``. In place, and the power as
    repeated products for small integer degrees (3x faster than ``**`` here); ``x @ x.T``
    goes to BLAS ``syrk`` (half the work of ``x @ y.T``)."""
    base = x @ y.T
    base /= x.shape[1]
    base += coef
    if degree == 1:
        return base
    if degree != int(degree) or not 2 <= degree <= 8:
        return base**degree
    out = base * base
    for _ in range(int(degree) - 2):
        out *= base
    return out


def mmd2_unbiased(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray) -> float:
    """Unbiased MMD^2 from kernel matrices ``(m, m)``, ``(n, n)``, ``(m, n)`` (m, n >= 2):
    mean of off-diagonal ``k_xx`` + mean of off-diagonal ``k_yy`` - 2 mean of ``k_xy``."""
    m, n = k_xx.shape[0], k_yy.shape[0]
    if m < 2 or n < 2:
        raise DataError(f"expected at least 2 samples per set for unbiased MMD, got {m} and {n}")
    return _mmd2_from_sums(k_xx.sum() - np.trace(k_xx), k_yy.sum() - np.trace(k_yy), k_xy.mean(), m, n)


def _mmd2_from_sums(xx_off_diagonal: float, yy_off_diagonal: float, xy_mean: float, m: int, n: int) -> float:
    """The unbiased MMD^2 from the off-diagonal sums of ``k_xx`` ``(m, m)`` and ``k_yy``
    ``(n, n)`` and the mean of ``k_xy``."""
    return float(xx_off_diagonal / (m * (m - 1)) + yy_off_diagonal / (n * (n - 1)) - 2.0 * xy_mean)


def _subset_mmd2(k_rr: np.ndarray, k_ss: np.ndarray, k_rs: np.ndarray, i: np.ndarray, j: np.ndarray) -> float:
    """:func:`mmd2_unbiased` of the kernel sub-matrices of rows ``i`` (real) and ``j``
    (synthetic), without copying them out: a block sum is ``w_i^T K w_j`` with 0/1 row
    indicators ``w`` (three mat-vecs over the full kernels instead of three fancy-index copies)."""
    m, n = len(i), len(j)
    w_i = np.zeros(k_rr.shape[0])
    w_i[i] = 1.0
    w_j = np.zeros(k_ss.shape[0])
    w_j[j] = 1.0
    return _mmd2_from_sums(
        w_i @ k_rr @ w_i - k_rr.diagonal()[i].sum(),
        w_j @ k_ss @ w_j - k_ss.diagonal()[j].sum(),
        (w_i @ k_rs @ w_j) / (m * n),
        m,
        n,
    )


def kid(
    real: np.ndarray,
    synthetic: np.ndarray,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
    degree: int = 3,
    coef: float = 1.0,
) -> dict[str, Any]:
    """KID: unbiased polynomial-kernel MMD^2 over ``subsets`` random subsets of
    ``min(subset_size, N, M)`` samples from each set (drawn without replacement within a
    subset, from ``numpy.random.default_rng(seed)``). Returns ``{"mean", "std" (population,
    over subsets), "subsets", "subset_size"}``; the mean can be slightly negative."""
    real, synthetic = _as_features(real, "real"), _as_features(synthetic, "synthetic")
    _check_dims(real, synthetic)
    size = min(subset_size, real.shape[0], synthetic.shape[0])
    if size < 2:
        raise DataError(f"expected at least 2 samples per set for KID, got {real.shape[0]} and {synthetic.shape[0]}")
    rng = np.random.default_rng(seed)
    scores = np.empty(subsets, dtype=np.float64)
    if max(real.shape[0], synthetic.shape[0]) <= FULL_GRAM_MAX_ROWS:  # kernels once, subsets by indexing
        k_rr = polynomial_kernel(real, real, degree, coef)
        k_ss = polynomial_kernel(synthetic, synthetic, degree, coef)
        k_rs = polynomial_kernel(real, synthetic, degree, coef)
        for s in range(subsets):
            i = rng.permutation(real.shape[0])[:size]
            j = rng.permutation(synthetic.shape[0])[:size]
            scores[s] = _subset_mmd2(k_rr, k_ss, k_rs, i, j)
    else:
        for s in range(subsets):
            x = real[rng.permutation(real.shape[0])[:size]]
            y = synthetic[rng.permutation(synthetic.shape[0])[:size]]
            scores[s] = mmd2_unbiased(
                polynomial_kernel(x, x, degree, coef),
                polynomial_kernel(y, y, degree, coef),
                polynomial_kernel(x, y, degree, coef),
            )
    return {"mean": float(scores.mean()), "std": float(scores.std()), "subsets": subsets, "subset_size": size}


# --------------------------------------------------------------------------- nearest neighbours
def pairwise_sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances float64 ``(N, M)``, clipped at 0."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    sq = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :] - 2.0 * (a @ b.T)
    return np.clip(sq, 0.0, None)


def nearest_distances(
    query: np.ndarray,
    reference: np.ndarray,
    query_groups: np.ndarray | None = None,
    reference_groups: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Distance from each query row ``(N, D)`` to its nearest reference row ``(M, D)``, and
    that row's index: float64 ``(N,)`` and int64 ``(N,)``. With groups (int64 ``(N,)`` and
    ``(M,)``), reference rows of the query row's own group are skipped (the same subject;
    the row itself when groups are row numbers); a row with nothing left gets inf and -1.
    Chunked over the query rows."""
    query, reference = np.asarray(query, np.float64), np.asarray(reference, np.float64)
    n = query.shape[0]
    distance = np.full(n, np.inf)
    index = np.full(n, -1, dtype=np.int64)
    if n == 0 or reference.shape[0] == 0:
        return distance, index
    for start in range(0, n, CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, n)
        sq = pairwise_sq_distances(query[start:stop], reference)
        if query_groups is not None and reference_groups is not None:
            sq[query_groups[start:stop, None] == reference_groups[None, :]] = np.inf
        best = np.argmin(sq, axis=1)
        best_sq = sq[np.arange(stop - start), best]
        finite = np.isfinite(best_sq)
        distance[start:stop] = np.where(finite, np.sqrt(np.where(finite, best_sq, 0.0)), np.inf)
        index[start:stop] = np.where(finite, best, -1)
    return distance, index


def close_pairs(points: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Index pairs ``(i, j)``, ``i < j``, of rows closer than ``threshold`` (strictly), sorted."""
    points = np.asarray(points, np.float64)
    pairs: list[tuple[int, int]] = []
    for start in range(0, points.shape[0], CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, points.shape[0])
        sq = pairwise_sq_distances(points[start:stop], points)
        rows, cols = np.nonzero(sq < threshold * threshold)
        rows = rows + start
        keep = cols > rows
        pairs.extend(zip(rows[keep].tolist(), cols[keep].tolist(), strict=True))
    return sorted(pairs)


def first_of_each_group(n: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    """bool ``(n,)``: greedy near-duplicate removal in index order. Row ``j`` is dropped when
    it is close to an earlier row that is kept; every other row is kept."""
    keep = np.ones(n, dtype=bool)
    earlier: dict[int, list[int]] = {}
    for i, j in pairs:
        earlier.setdefault(j, []).append(i)
    for j in range(n):
        if any(keep[i] for i in earlier.get(j, ())):
            keep[j] = False
    return keep


def kth_neighbour_radii(features: np.ndarray, k: int) -> np.ndarray:
    """float64 ``(N,)``: distance from each row to its k-th nearest other row. Needs N > k."""
    x = _as_features(features, "features")
    if x.shape[0] <= k:
        raise DataError(f"expected more than k={k} samples for k-NN radii, got {x.shape[0]}")
    radii = np.empty(x.shape[0])
    for start in range(0, x.shape[0], CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, x.shape[0])
        sq = pairwise_sq_distances(x[start:stop], x)
        sq[np.arange(stop - start), np.arange(start, stop)] = np.inf  # not its own neighbour
        radii[start:stop] = np.sqrt(np.partition(sq, k - 1, axis=1)[:, k - 1])
    return radii


def _ball_counts(query: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """int64 ``(N,)``: for each query row, how many balls ``(centres[i], radii[i])`` hold it."""
    counts = np.zeros(query.shape[0], dtype=np.int64)
    for start in range(0, query.shape[0], CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, query.shape[0])
        sq = pairwise_sq_distances(query[start:stop], centres)
        counts[start:stop] = (sq <= (radii * radii)[None, :]).sum(axis=1)
    return counts


def precision_recall(real: np.ndarray, synthetic: np.ndarray, *, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): precision = fraction of
    synthetic samples inside the real k-NN manifold (the union of balls around each real
    sample with radius its k-th neighbour distance); recall = the same with the roles
    swapped. Values in [0, 1]."""
    real, synthetic = _as_features(real, "real"), _as_features(synthetic, "synthetic")
    _check_dims(real, synthetic)
    real_radii, synthetic_radii = kth_neighbour_radii(real, k), kth_neighbour_radii(synthetic, k)
    precision = float((_ball_counts(synthetic, real, real_radii) > 0).mean())
    recall = float((_ball_counts(real, synthetic, synthetic_radii) > 0).mean())
    return {"precision": precision, "recall": recall}


def density_coverage(real: np.ndarray, synthetic: np.ndarray, *, k: int = 3) -> dict[str, float]:
    """Density and coverage (Naeem et al. 2020) with real k-NN balls: density = mean number
    of real balls holding a synthetic sample, divided by k (about 1 when the sets match,
    unbounded); coverage = fraction of real balls holding at least one synthetic sample."""
    real, synthetic = _as_features(real, "real"), _as_features(synthetic, "synthetic")
    _check_dims(real, synthetic)
    radii = kth_neighbour_radii(real, k)
    density = float(_ball_counts(synthetic, real, radii).sum() / (k * synthetic.shape[0]))
    nearest, _ = nearest_distances(real, synthetic)
    coverage = float((nearest <= radii).mean())
    return {"density": density, "coverage": coverage}


def compare_sets(
    real: np.ndarray,
    synthetic: np.ndarray,
    *,
    k: int = 3,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every set metric of two feature sets; a metric needing more samples than given is None.
    Keys: n_real, n_synthetic, fid, kid_mean, kid_std, kid_subsets, kid_subset_size,
    precision, recall, density, coverage, k."""
    real, synthetic = _as_features(real, "real"), _as_features(synthetic, "synthetic")
    n_real, n_syn = real.shape[0], synthetic.shape[0]
    result: dict[str, Any] = {
        "n_real": n_real,
        "n_synthetic": n_syn,
        "fid": None,
        "kid_mean": None,
        "kid_std": None,
        "kid_subsets": None,
        "kid_subset_size": None,
        "precision": None,
        "recall": None,
        "density": None,
        "coverage": None,
        "k": k,
    }
    if n_real >= 2 and n_syn >= 2:
        _check_dims(real, synthetic)
        result["fid"] = fid(real, synthetic)
        scores = kid(real, synthetic, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
        result.update(
            kid_mean=scores["mean"],
            kid_std=scores["std"],
            kid_subsets=scores["subsets"],
            kid_subset_size=scores["subset_size"],
        )
    if n_real > k and n_syn > k:
        result.update(precision_recall(real, synthetic, k=k))
        result.update(density_coverage(real, synthetic, k=k))
    return result


# --------------------------------------------------------------------------- MS-SSIM
@dataclass(frozen=True)
class MsSsimSettings:
    """The MS-SSIM configuration that fits an image size: ``scales`` (1-5) and their weights
    (the first ``scales`` standard weights, renormalised to sum to 1)."""

    kernel_size: int
    kernel_sigma: float
    scales: int
    weights: tuple[float, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "kernel_size": self.kernel_size,
            "kernel_sigma": self.kernel_sigma,
            "scales": self.scales,
            "standard_scales": len(MS_SSIM_WEIGHTS),
            "weights": list(self.weights),
        }


def ms_ssim_settings(height: int, width: int, kernel_size: int = 11, kernel_sigma: float = 1.5) -> MsSsimSettings:
    """The most scales (<= 5) that fit: the coarsest scale (the image halved ``scales - 1``
    times) must still hold the kernel, and MONAI's ``compute_ms_ssim`` must accept it (it
    checks ``min(H, W) // max(1, scales - 1) ** 2 > kernel_size - 1``). A 64x64 image with
    the standard 11-pixel kernel gets 3 scales, 32x32 gets 2, 16x16 gets 1 (plain SSIM).
    Raises DataError when even one scale does not fit."""
    side = min(height, width)
    scales = 0
    for n in range(len(MS_SSIM_WEIGHTS), 0, -1):
        if side // 2 ** (n - 1) >= kernel_size and side // max(1, n - 1) ** 2 > kernel_size - 1:
            scales = n
            break
    if scales == 0:
        raise DataError(
            f"expected images larger than the MS-SSIM kernel ({kernel_size} px), got {height}x{width}; "
            "lower quality.metrics.ms_ssim_kernel_size"
        )
    chosen = np.asarray(MS_SSIM_WEIGHTS[:scales], dtype=np.float64)
    weights = tuple(float(w) for w in chosen / chosen.sum())
    return MsSsimSettings(kernel_size, kernel_sigma, scales, weights)


def ms_ssim_pairs(
    a: np.ndarray, b: np.ndarray, settings: MsSsimSettings, *, batch_size: int = 256, device: str = "cpu"
) -> np.ndarray:
    """MS-SSIM of image pairs ``a[i]`` vs ``b[i]``: float32 ``(P, C, H, W)`` in [0, 1] each;
    returns float64 ``(P,)`` (1 for identical images), averaged over channels."""
    import torch
    from monai.metrics.regression import compute_ms_ssim

    values = []
    for start in range(0, a.shape[0], batch_size):
        x = torch.from_numpy(np.ascontiguousarray(a[start : start + batch_size], dtype=np.float32)).to(device)
        y = torch.from_numpy(np.ascontiguousarray(b[start : start + batch_size], dtype=np.float32)).to(device)
        score = compute_ms_ssim(
            x,
            y,
            spatial_dims=2,
            data_range=1.0,
            kernel_size=settings.kernel_size,
            kernel_sigma=settings.kernel_sigma,
            weights=settings.weights,
        )
        values.append(score.reshape(score.shape[0], -1).mean(dim=1).double().cpu().numpy())
    return np.concatenate(values) if values else np.zeros(0)


def ms_ssim_diversity(
    images: np.ndarray, settings: MsSsimSettings, *, pairs: int = 200, seed: int = 0, device: str = "cpu"
) -> dict[str, Any]:
    """Mean and std of MS-SSIM over random pairs of distinct images of one set (lower mean =
    more diverse). All pairs when there are at most ``pairs`` of them, else ``pairs`` pairs
    drawn with replacement from ``numpy.random.default_rng(seed)``. ``{"mean": None, ...}``
    with fewer than 2 images."""
    n = images.shape[0]
    if n < 2:
        return {"mean": None, "std": None, "n_pairs": 0}
    if n * (n - 1) // 2 <= pairs:
        first, second = np.triu_indices(n, k=1)
    else:
        rng = np.random.default_rng(seed)
        first = rng.integers(0, n, size=pairs)
        second = (first + rng.integers(1, n, size=pairs)) % n  # never the same image
    scores = ms_ssim_pairs(images[first], images[second], settings, device=device)
    return {"mean": float(scores.mean()), "std": float(scores.std()), "n_pairs": int(scores.size)}
