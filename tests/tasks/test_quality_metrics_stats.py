"""Set metrics against brute-force formulas (scipy cdist): k-NN radii, precision/recall,
density/coverage across the 1,024-row chunk boundary, KID on the path above 4,096 rows,
and MS-SSIM pairs that never pair an image with itself."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from tasks import quality_metrics
from tasks.quality_metrics import (
    CHUNK_ROWS,
    FULL_GRAM_MAX_ROWS,
    close_pairs,
    density_coverage,
    kid,
    kth_neighbour_radii,
    ms_ssim_diversity,
    ms_ssim_pairs,
    ms_ssim_settings,
    nearest_distances,
    precision_recall,
)


def brute_radii(x: np.ndarray, k: int) -> np.ndarray:
    d = cdist(x, x)
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, k - 1]


@pytest.fixture(scope="module")
def sets() -> tuple[np.ndarray, np.ndarray]:
    """More rows than one chunk; the synthetic set shifted so coverage is neither 0 nor 1."""
    rng = np.random.default_rng(0)
    real = rng.normal(size=(CHUNK_ROWS + 76, 3))
    synthetic = rng.normal(size=(CHUNK_ROWS + 40, 3)) * 0.8 + np.array([0.9, 0.0, 0.0])
    return real, synthetic


def test_kth_neighbour_radii_across_the_chunk_boundary(sets) -> None:
    real, _ = sets
    for k in (1, 3):
        assert kth_neighbour_radii(real, k) == pytest.approx(brute_radii(real, k))


def test_precision_recall_density_coverage_match_the_definitions(sets) -> None:
    real, synthetic = sets
    k = 3
    real_r, syn_r = brute_radii(real, k), brute_radii(synthetic, k)
    d = cdist(synthetic, real)  # (M, N)
    inside = d <= real_r[None, :]
    expected_precision = inside.any(axis=1).mean()
    expected_recall = (cdist(real, synthetic) <= syn_r[None, :]).any(axis=1).mean()
    expected_density = inside.sum() / (k * synthetic.shape[0])
    expected_coverage = (d.min(axis=0) <= real_r).mean()  # real balls holding >= 1 synthetic sample
    pr = precision_recall(real, synthetic, k=k)
    dc = density_coverage(real, synthetic, k=k)
    assert pr["precision"] == pytest.approx(expected_precision)
    assert pr["recall"] == pytest.approx(expected_recall)
    assert dc["density"] == pytest.approx(expected_density)
    assert dc["coverage"] == pytest.approx(expected_coverage)
    assert 0.3 < expected_coverage < 0.97  # the case can tell a doubled radius apart


def test_nearest_distances_and_close_pairs_across_the_chunk_boundary(sets) -> None:
    real, synthetic = sets
    distance, index = nearest_distances(synthetic, real)
    d = cdist(synthetic, real)
    assert distance == pytest.approx(d.min(axis=1)) and (index == d.argmin(axis=1)).all()
    groups = np.arange(real.shape[0])  # skipping itself: the nearest other row
    own, _ = nearest_distances(real, real, groups, groups)
    assert own == pytest.approx(brute_radii(real, 1))
    threshold = 0.05
    dd = cdist(real, real)
    expected = sorted((int(i), int(j)) for i, j in zip(*np.nonzero(dd < threshold), strict=True) if i < j)
    assert close_pairs(real, threshold) == expected and expected


def direct_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / D + 1)^3, written out."""
    kernel = lambda a, b: (a @ b.T / a.shape[1] + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    kxx, kyy = kernel(x, x), kernel(y, y)
    return (
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        - 2 * kernel(x, y).mean()
    )


def test_kid_above_the_full_gram_limit_is_the_subset_mmd() -> None:
    """Both sets above FULL_GRAM_MAX_ROWS rows: the subset path. Each subset score is the
    unbiased MMD^2 of ``size`` real and ``size`` synthetic rows drawn as documented."""
    rng = np.random.default_rng(1)
    n = FULL_GRAM_MAX_ROWS + 10
    real = rng.normal(size=(n, 4))
    synthetic = rng.normal(size=(n, 4)) + 0.3
    result = kid(real, synthetic, subsets=3, subset_size=50, seed=7)
    draw = np.random.default_rng(7)
    expected = []
    for _ in range(3):
        i = draw.permutation(n)[:50]
        j = draw.permutation(n)[:50]
        expected.append(direct_mmd2(real[i], synthetic[j]))
    assert result["mean"] == pytest.approx(np.mean(expected), rel=1e-9)
    assert result["std"] == pytest.approx(np.std(expected), rel=1e-9)
    assert result["subset_size"] == 50 and result["mean"] > 0


def test_kid_agrees_with_torchmetrics_above_the_full_gram_limit() -> None:
    """torchmetrics' KID on the same features (Identity extractor): both average the
    unbiased MMD^2 over random subsets, so with many subsets the means agree closely."""
    import torch
    from torchmetrics.image.kid import KernelInceptionDistance

    class Identity(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    rng = np.random.default_rng(2)
    n = FULL_GRAM_MAX_ROWS + 10
    real = rng.normal(size=(n, 8))
    synthetic = rng.normal(size=(n, 8)) * 1.2 + 0.2
    ours = kid(real, synthetic, subsets=40, subset_size=200, seed=0)
    torch.manual_seed(0)
    metric = KernelInceptionDistance(feature=Identity(), subsets=40, subset_size=200, normalize=False)
    metric.update(torch.from_numpy(real).double(), real=True)
    metric.update(torch.from_numpy(synthetic).double(), real=False)
    theirs_mean, theirs_std = (float(v) for v in metric.compute())
    assert ours["mean"] == pytest.approx(theirs_mean, rel=0.1)
    assert ours["mean"] > 5 * max(ours["std"], theirs_std) / np.sqrt(40)  # a real difference, not noise


# --------------------------------------------------------------------------- MS-SSIM pairs
@pytest.fixture(scope="module")
def noise_images() -> np.ndarray:
    return np.random.default_rng(3).random((21, 1, 16, 16)).astype(np.float32)


def test_ms_ssim_random_pairs_never_pair_an_image_with_itself(noise_images, monkeypatch) -> None:
    """21 images = 210 pairs > 200: the random path. Recorded pairs hold distinct images
    (a unit check of the pairing with the scoring stubbed out; the real counterpart is the
    next test)."""
    seen: list[tuple[np.ndarray, np.ndarray]] = []

    def record(a, b, settings, **kwargs):
        seen.append((a, b))
        return np.zeros(a.shape[0])

    monkeypatch.setattr(quality_metrics, "ms_ssim_pairs", record)
    settings = ms_ssim_settings(16, 16)
    for seed in range(5):
        result = ms_ssim_diversity(noise_images, settings, pairs=200, seed=seed)
        assert result["n_pairs"] == 200
    assert len(seen) == 5
    for a, b in seen:
        assert not (a == b).reshape(a.shape[0], -1).all(axis=1).any()


def test_ms_ssim_diversity_is_the_mean_over_distinct_pairs(noise_images) -> None:
    settings = ms_ssim_settings(16, 16)
    first, second = np.triu_indices(len(noise_images), k=1)
    exhaustive = ms_ssim_pairs(noise_images[first], noise_images[second], settings)
    assert exhaustive.max() < 0.5  # independent noise: far from identical (1)
    sampled = ms_ssim_diversity(noise_images, settings, pairs=200, seed=0)
    assert sampled["mean"] == pytest.approx(exhaustive.mean(), abs=0.01)
    four = noise_images[:4]  # 6 pairs <= 200: every distinct pair once
    small = ms_ssim_diversity(four, settings, pairs=200)
    f, s = np.triu_indices(4, k=1)
    assert small["n_pairs"] == 6
    assert small["mean"] == pytest.approx(ms_ssim_pairs(four[f], four[s], settings).mean())
