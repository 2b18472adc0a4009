"""Set metrics (FID, KID, precision/recall, density/coverage, MS-SSIM), feature extractors
and their cache, the memorisation / near-duplicate filters and the quality gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from generators.errors import ConfigError, DataError, QualityGateError
from generators.shards import read_manifest, read_table
from tasks import features, quality_metrics
from tasks.config import PipelineConfig
from tasks.fid_inception import FidInceptionV3
from tasks.filter import filter_synthetic
from tasks.paths import PipelinePaths
from tasks.quality_report import quality_markdown
from tests.tasks.phantoms import write_real, write_synthetic_with_copies


def random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


class Identity(torch.nn.Module):
    """torchmetrics' ``feature=`` module over precomputed features."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


# --------------------------------------------------------------------------- FID
def test_fid_of_identical_sets_is_zero() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))
    assert quality_metrics.fid(x, x) == pytest.approx(0.0, abs=1e-8 * np.trace(np.cov(x.T)))
    wide = rng.normal(size=(20, 64))  # fewer samples than dimensions: singular covariance
    assert quality_metrics.fid(wide, wide) == pytest.approx(0.0, abs=1e-7)
    assert quality_metrics.fid(x, x + 1.0) == pytest.approx(16.0, rel=1e-9)  # a pure mean shift


def test_frechet_distance_matches_the_closed_form() -> None:
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    diagonal = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert quality_metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(diagonal, rel=1e-10)

    sigma1, sigma2 = random_spd(rng, 6), random_spd(rng, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * scipy.linalg.sqrtm(sigma1 @ sigma2).real)
    assert quality_metrics.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(reference, rel=1e-8)

    # two Gaussian feature sets: the sample FID converges to the Gaussians' distance
    x = rng.multivariate_normal(mu1, sigma1, size=40_000)
    y = rng.multivariate_normal(mu2, sigma2, size=40_000)
    assert quality_metrics.fid(x, y) == pytest.approx(reference, rel=0.03)


def test_fid_and_kid_agree_with_torchmetrics() -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    rng = np.random.default_rng(2)
    real = rng.normal(size=(300, 24)) @ rng.normal(size=(24, 24)) * 0.3
    synthetic = rng.normal(0.2, 1.1, size=(300, 24)) @ rng.normal(size=(24, 24)) * 0.3
    fid_tm = FrechetInceptionDistance(feature=Identity(24))
    fid_tm.update(torch.from_numpy(real), real=True)
    fid_tm.update(torch.from_numpy(synthetic), real=False)
    expected = float(fid_tm.compute())
    assert quality_metrics.fid(real, synthetic) == pytest.approx(expected, rel=1e-3, abs=1e-3)

    kid_tm = KernelInceptionDistance(feature=Identity(24), subsets=1, subset_size=300)  # every subset = whole set
    kid_tm.update(torch.from_numpy(real), real=True)
    kid_tm.update(torch.from_numpy(synthetic), real=False)
    mean, std = (float(v) for v in kid_tm.compute())
    mine = quality_metrics.kid(real, synthetic, subsets=3, subset_size=300)
    assert mine["mean"] == pytest.approx(mean, rel=1e-3, abs=1e-3)
    assert mine["std"] == pytest.approx(0.0, abs=1e-12) and std == 0.0
    assert mine["subset_size"] == 300


# --------------------------------------------------------------------------- KID
def test_kid_is_the_unbiased_estimator_on_a_small_case() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(4, 2)), rng.normal(size=(4, 2)) + 0.5

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return (a @ b / 2 + 1.0) ** 3

    m = 4
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    expected = xx + yy - 2 * xy
    result = quality_metrics.kid(x, y, subsets=5, subset_size=10)  # subsets are permutations of the whole sets
    assert result["mean"] == pytest.approx(expected, rel=1e-12)
    assert result["subset_size"] == 4 and result["std"] == pytest.approx(0.0, abs=1e-12)


def test_kid_is_unbiased_over_many_draws_from_one_distribution() -> None:
    rng = np.random.default_rng(4)
    unbiased, biased = [], []
    for _ in range(300):
        x, y = rng.normal(size=(25, 8)), rng.normal(size=(25, 8))
        k_xx, k_yy, k_xy = (quality_metrics.polynomial_kernel(a, b) for a, b in ((x, x), (y, y), (x, y)))
        unbiased.append(quality_metrics.mmd2_unbiased(k_xx, k_yy, k_xy))
        biased.append(k_xx.mean() + k_yy.mean() - 2 * k_xy.mean())  # the V-statistic, biased upwards
    unbiased, biased = np.asarray(unbiased), np.asarray(biased)
    standard_error = unbiased.std() / np.sqrt(unbiased.size)
    assert abs(unbiased.mean()) < 3 * standard_error
    assert biased.mean() > 10 * standard_error  # the check above would catch a biased estimator
    assert quality_metrics.kid(x, y + 3.0, subsets=10, subset_size=25)["mean"] > 20 * standard_error


# --------------------------------------------------------------------------- manifolds
def test_precision_recall_density_coverage() -> None:
    rng = np.random.default_rng(5)
    real = rng.normal(size=(300, 4))
    same = quality_metrics.compare_sets(real, rng.normal(size=(300, 4)), k=3, kid_subsets=5)
    assert same["precision"] > 0.9 and same["recall"] > 0.9
    assert 0.7 < same["density"] < 1.3 and same["coverage"] > 0.9
    far = quality_metrics.compare_sets(real, rng.normal(size=(300, 4)) + 20, k=3, kid_subsets=5)
    assert far["precision"] == 0.0 and far["recall"] == 0.0 and far["coverage"] == 0.0 and far["density"] == 0.0
    collapsed = quality_metrics.precision_recall(real, rng.normal(scale=0.05, size=(300, 4)), k=3)
    assert collapsed["precision"] == 1.0 and collapsed["recall"] < 0.2  # mode collapse: precise, no recall
    tiny = quality_metrics.compare_sets(real, real[:1], k=3)
    assert tiny["fid"] is None and tiny["precision"] is None and tiny["n_synthetic"] == 1


def test_nearest_neighbours_and_greedy_duplicate_removal() -> None:
    points = np.array([[0.0, 0.0], [0.0, 0.05], [5.0, 5.0], [0.0, 0.08], [9.0, 0.0]])
    distance, index = quality_metrics.nearest_distances(points, points, np.arange(5), np.arange(5))
    assert index.tolist() == [1, 3, 4, 1, 2]
    assert distance[0] == pytest.approx(0.05)
    groups = np.array([0, 0, 1, 0, 2])  # same group = skipped
    _, index = quality_metrics.nearest_distances(points, points, groups, groups)
    assert index.tolist() == [2, 2, 4, 2, 2]
    pairs = quality_metrics.close_pairs(points, 0.1)
    assert pairs == [(0, 1), (0, 3), (1, 3)]
    assert quality_metrics.first_of_each_group(5, pairs).tolist() == [True, False, True, False, True]
    # a chain a~b~c where a and c are far apart: b goes, c stays (it is close only to a dropped row)
    chain = quality_metrics.first_of_each_group(3, [(0, 1), (1, 2)])
    assert chain.tolist() == [True, False, True]


# --------------------------------------------------------------------------- MS-SSIM
def test_ms_ssim_scales_fall_back_for_small_images() -> None:
    assert quality_metrics.ms_ssim_settings(256, 256).scales == 5
    settings = quality_metrics.ms_ssim_settings(64, 64)
    assert settings.scales == 3 and sum(settings.weights) == pytest.approx(1.0)
    assert settings.weights[0] == pytest.approx(0.0448 / (0.0448 + 0.2856 + 0.3001))
    assert quality_metrics.ms_ssim_settings(32, 32).scales == 2
    assert quality_metrics.ms_ssim_settings(16, 16).scales == 1  # 8x8 would not hold the 11-px kernel
    assert quality_metrics.ms_ssim_settings(16, 16).weights == (1.0,)
    tiny = np.random.default_rng(5).uniform(size=(2, 1, 16, 16)).astype(np.float32)
    assert np.isfinite(
        quality_metrics.ms_ssim_pairs(tiny[:1], tiny[1:], quality_metrics.ms_ssim_settings(16, 16))
    ).all()
    with pytest.raises(DataError, match="lower quality.metrics.ms_ssim_kernel_size"):
        quality_metrics.ms_ssim_settings(8, 8)

    rng = np.random.default_rng(6)
    image = rng.uniform(size=(1, 1, 64, 64)).astype(np.float32)
    assert quality_metrics.ms_ssim_pairs(image, image, settings)[0] == pytest.approx(1.0, abs=1e-5)
    copies = quality_metrics.ms_ssim_diversity(np.repeat(image, 6, axis=0), settings, pairs=10)
    noise = quality_metrics.ms_ssim_diversity(rng.uniform(size=(6, 1, 64, 64)).astype(np.float32), settings, pairs=10)
    assert copies["mean"] == pytest.approx(1.0, abs=1e-5) and copies["n_pairs"] == 10
    assert noise["mean"] < 0.2  # independent noise images are diverse
    assert quality_metrics.ms_ssim_diversity(image, settings)["mean"] is None


# --------------------------------------------------------------------------- extractors
def test_feature_cache_computes_once_per_key(tmp_path: Path) -> None:
    extractor = features.random_extractor(1, seed=0)
    images = np.random.default_rng(7).uniform(size=(5, 1, 16, 16)).astype(np.float32)
    calls: list[int] = []

    def compute() -> np.ndarray:
        calls.append(1)
        return features.extract_features(extractor, images, normalisation="zscore", batch_size=2)

    cache = features.FeatureCache(tmp_path)
    kwargs = {"dataset_digest": "abc", "split": "train", "extractor": extractor, "ids": list("abcde")}
    first, hit1 = cache.features(normalisation="zscore", compute=compute, **kwargs)
    second, hit2 = cache.features(normalisation="zscore", compute=compute, **kwargs)
    assert (hit1, hit2, len(calls)) == (False, True, 1)
    assert np.array_equal(first, second) and first.shape == (5, extractor.dim)
    cache.features(normalisation="unit", compute=compute, **kwargs)  # another normalisation: another key
    assert len(calls) == 2
    for path in tmp_path.glob("*.npz"):
        path.write_bytes(b"broken")
    _, hit = cache.features(normalisation="zscore", compute=compute, **kwargs)
    assert not hit and len(calls) == 3
    # same seed -> same weights and digest; batching does not change the features
    again = features.random_extractor(1, seed=0)
    assert again.weights_sha256 == extractor.weights_sha256 != features.random_extractor(1, seed=1).weights_sha256
    whole = features.extract_features(again, images, normalisation="zscore", batch_size=64)
    np.testing.assert_allclose(whole, first, rtol=1e-5, atol=1e-6)


def test_normalisations() -> None:
    x = np.random.default_rng(8).uniform(size=(2, 3, 4, 4)).astype(np.float32)
    assert np.array_equal(features.normalise(x, "unit"), x)
    assert features.normalise(x, "symmetric").min() >= -1 and np.allclose(features.normalise(x, "symmetric"), 2 * x - 1)
    z = features.normalise(x, "zscore").reshape(2, -1)
    np.testing.assert_allclose(z.mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=1), 1, atol=1e-4)
    imagenet = features.normalise(x, "imagenet")
    assert imagenet[0, 0, 0, 0] == pytest.approx((x[0, 0, 0, 0] - 0.485) / 0.229)
    assert features.adapt_channels(x[:, :1], 3).shape == (2, 3, 4, 4)
    with pytest.raises(ConfigError, match="allowed: unit, symmetric, imagenet, zscore"):
        features.normalise(x, "minmax")


def test_inception_extractor_needs_local_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(features.INCEPTION_ENV, raising=False)
    with pytest.raises(ConfigError, match=r"pt_inception-2015-12-05-6726825d\.pth.*SYNTHMED_INCEPTION_WEIGHTS.*never"):
        features.resolve_inception_weights(None)
    monkeypatch.setenv(features.INCEPTION_ENV, str(tmp_path / "absent.pth"))
    with pytest.raises(ConfigError, match=r"\$SYNTHMED_INCEPTION_WEIGHTS: expected .* found none"):
        features.resolve_inception_weights(None)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ConfigError, match="different layout"):
        features.inception_extractor(features.resolve_inception_weights(str(wrong)))

    # a state dict in pytorch-fid's layout (torchvision Inception3, 1008 classes, no aux head);
    # the backbone has torchvision's 27,161,264 parameters minus the aux head and fc
    network = FidInceptionV3()
    assert sum(p.numel() for p in network.parameters()) == 21_785_568
    state = network.state_dict()
    state.update({"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)})
    weights = tmp_path / "custom.pth"
    torch.save(state, weights)
    monkeypatch.setenv(features.INCEPTION_ENV, str(weights))
    extractor = features.inception_extractor(features.resolve_inception_weights(None))
    assert extractor.name == "inception-v3-fid-architecture(custom-weights)"  # not the standard sha256
    assert extractor.default_normalisation == "symmetric" and extractor.dim == 2048
    grey = np.random.default_rng(9).uniform(size=(1, 1, 16, 16)).astype(np.float32)
    out = features.extract_features(extractor, grey, normalisation="symmetric")
    assert out.shape == (1, 2048) and np.isfinite(out).all()


# --------------------------------------------------------------------------- the stage
def stage_config(**quality: object) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "source": {"kind": "folder", "path": "x"},
            "threads": 2,
            "generator": {"train": {}},
            "synthesis": {"shard_rows": 8},
            "quality": {
                "label_consistency": {"enabled": False},
                "metrics": {"extractor": "random", "kid_subsets": 10, "ms_ssim_pairs": 30},
                # the two-sample test runs (its gate is on by default), on a small budget: it is
                # proven in tests/tasks/test_realism.py and test_filter.py
                "realism": {"folds": 2, "epochs": 3, "min_steps": 0, "bootstrap": 100},
                **quality,
            },
        }
    )


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory):
    """Real phantoms + synthetic phantoms with planted copies, filtered once."""
    paths = PipelinePaths(root=tmp_path_factory.mktemp("planted"), pipeline="t")
    write_real(paths.real)
    ids = write_synthetic_with_copies(paths.synthetic, paths.real)
    result = filter_synthetic(stage_config(), paths)
    return paths, ids, result


def test_memorised_copies_of_real_train_images_are_dropped_and_counted(planted) -> None:
    paths, ids, result = planted
    quality = json.loads((paths.metrics / "quality.json").read_text())
    memo = quality["filters"]["memorisation"]
    assert quality["totals"]["dropped_memorised"] == len(ids.memorised) == 4
    assert memo["n_below_threshold"] == 4 and memo["threshold_source"] == "calibrated"
    assert memo["reference"]["kind"] == "nearest real train image of another subject"
    kept = read_table(paths.filtered)
    kept_ids = set(kept.column("id").to_pylist())
    assert kept_ids.isdisjoint(ids.memorised)
    assert set(ids.good) <= kept_ids  # fresh phantoms are not mistaken for copies
    assert min(kept.column("q_nn_real_distance").to_pylist()) >= memo["threshold"]
    assert result["totals"] == quality["totals"] and result["gate_passed"] is True


def test_near_duplicates_keep_only_the_first(planted) -> None:
    paths, ids, _ = planted
    quality = json.loads((paths.metrics / "quality.json").read_text())
    kept = read_table(paths.filtered)
    kept_ids = kept.column("id").to_pylist()
    group = sorted(ids.duplicate_group)
    assert [i for i in kept_ids if i in group] == group[:1]
    assert quality["totals"]["dropped_duplicate"] == len(group) - 1 == quality["filters"]["duplicates"]["n_dropped"]
    distance = dict(zip(kept_ids, kept.column("q_nn_synthetic_distance").to_pylist(), strict=True))
    assert distance[group[0]] == pytest.approx(0.0, abs=1e-6)  # its exact copy was dropped
    totals = quality["totals"]
    assert totals["generated"] == sum(v for k, v in totals.items() if k != "generated")


def test_set_metrics_name_their_extractor_and_cover_every_class(planted) -> None:
    paths, _, result = planted
    metrics = json.loads((paths.metrics / "quality.json").read_text())["set_metrics"]
    assert metrics["extractor"]["name"] == result["extractor"] == "random-init-densenet(seed=0)"
    assert metrics["extractor"]["normalisation"] == "zscore" and len(metrics["extractor"]["weights_sha256"]) == 64
    assert metrics["ms_ssim_settings"]["scales"] == 2  # 32x32 phantoms: 2 of 5 scales fit
    for name in ("kept", "generated", "real_val"):
        block = metrics["sets"][name]
        assert set(block["per_class"]) == {"disc", "ring", "square"}
        assert block["overall"]["fid"] >= 0 and 0 <= block["overall"]["precision"] <= 1
    kept = metrics["sets"]["kept"]["overall"]
    assert kept["n_real"] == 60 and kept["n_synthetic"] == read_manifest(paths.filtered)["rows"]
    assert 0 < kept["ms_ssim_mean"] < 1 and metrics["real_train_diversity"]["overall"]["ms_ssim_pairs"] == 30


def test_gate_fails_after_writing_and_real_features_are_cached(planted, monkeypatch: pytest.MonkeyPatch) -> None:
    paths, _, _ = planted
    seen: list[int] = []
    original = features.extract_features

    def counting(extractor, images, **kwargs):
        seen.append(len(images))
        return original(extractor, images, **kwargs)

    monkeypatch.setattr(features, "extract_features", counting)
    (paths.metrics / "quality.json").unlink()
    cfg = stage_config(gate={"max_fid": 0.0, "max_memorised_fraction": 0.5})
    with pytest.raises(QualityGateError) as failure:
        filter_synthetic(cfg, paths)
    message = str(failure.value)
    assert "\n" not in message
    assert message.startswith("quality gate failed: fid ")
    assert "> max_fid 0 (extractor random-init-densenet(seed=0), normalisation zscore" in message
    assert "relax quality.gate.max_fid" in message and "outputs kept for inspection" in message
    assert "memorised_fraction" not in message  # that bound holds
    # real train (60) and val (18) features came from the cache: only the synthetic set was extracted
    assert seen == [read_manifest(paths.synthetic)["rows"]]
    quality = json.loads((paths.metrics / "quality.json").read_text())
    assert quality["gate"]["passed"] is False
    assert [c["bound_name"] for c in quality["gate"]["checks"] if not c["passed"]] == ["max_fid"]
    assert read_manifest(paths.filtered)["rows"] == quality["totals"]["kept"]

    markdown = quality_markdown(quality)
    assert "**random-init-densenet(seed=0)**" in markdown and "normalisation **zscore**" in markdown
    assert "| **overall** |" in markdown and "| fid |" in markdown
    assert "**FAILED: the synthetic set is REJECTED** (realism checks: passed)" in markdown
    assert "dropped (memorised)" in markdown and "2 of 5 scales fit" in markdown


def test_gate_config_needs_its_inputs() -> None:
    with pytest.raises(ValueError, match="gate.max_fid needs metrics.enabled"):
        stage_config(gate={"max_fid": 1.0}, metrics={"enabled": False})


def test_nearest_neighbour_filters_on_vectors() -> None:
    from tasks.config import DuplicateFilter, MemorisationFilter
    from tasks.nn_filters import (
        duplicate_filter,
        memorisation_filter,
        real_reference,
        space_vectors,
        subject_groups,
        threshold,
    )

    images = np.zeros((2, 1, 4, 4), np.float32)
    images[1] += 0.5
    vectors = space_vectors("pixel", images, None)
    assert np.linalg.norm(vectors[1] - vectors[0]) == pytest.approx(0.5)  # RMSE of the pixels

    groups, kind = subject_groups(["a", "a", "b", "c"])
    assert groups.tolist() == [0, 0, 1, 2] and kind == "nearest real train image of another subject"
    assert subject_groups(["a", "a"])[0].tolist() == [0, 1]  # one subject: any other image
    real = np.array([[0.0], [0.1], [1.0], [3.0]])
    reference = real_reference(real, groups)
    assert reference.tolist() == pytest.approx([1.0, 0.9, 0.9, 2.0])  # rows 0 and 1 share a subject
    calibrated = threshold(MemorisationFilter(calibration_quantile=0.0, calibration_scale=0.5), reference, kind)
    assert calibrated["threshold"] == pytest.approx(0.45) and calibrated["threshold_source"] == "calibrated"
    absolute = threshold(MemorisationFilter(max_distance=0.2), reference, kind)
    assert absolute["threshold"] == 0.2 and absolute["reference"]["n"] == 4

    # rows 0..4; row 3 is unscorable (not usable); row 1 copies a real vector
    usable = np.array([0, 1, 2, 4])
    memo = memorisation_filter(MemorisationFilter(), absolute, 5, usable, np.array([[2.0], [1.05], [5.0], [0.5]]), real)
    assert memo.keep.tolist() == [True, False, True, False, True]
    assert np.isnan(memo.column[3]) and memo.info["n_below_threshold"] == 1 and memo.info["n_scored"] == 4

    in_running = np.array([True, True, False, True, True])
    candidates = np.array([0, 1, 4])
    dup = duplicate_filter(DuplicateFilter(), absolute, 5, candidates, np.array([[0.0], [0.1], [0.05]]), in_running)
    # 0 kept, 1 and 4 close to it; 2 left to an earlier filter; 3 in the running but unscorable
    assert dup.keep.tolist() == [True, False, True, False, False]
    assert dup.info["n_dropped"] == 2 and dup.column[0] == pytest.approx(0.05) and np.isnan(dup.column[2])
