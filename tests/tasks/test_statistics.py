"""The retrain statistics against scipy, scikit-learn, hand-worked cases and seeded
coverage simulations: scores, intervals, the verdict rule and the power statement, and
the segmentation scores (Dice with absent classes, HD95)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats
from scipy.spatial.distance import directed_hausdorff
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from tasks import downstream
from tasks.statistics import (
    NO_EFFECT,
    NOT_TESTED_NO_SYNTHETIC,
    VERDICT_RULE,
    bootstrap_delta,
    confusion_matrix,
    decide,
    minimum_detectable_effect,
    power,
    scores_from_confusion,
    t_critical_95,
    t_interval,
)


# --------------------------------------------------------------------------- classification scores
def test_scores_on_a_hand_worked_imbalanced_case() -> None:
    """8 of class 0, 2 of class 1, everything predicted 0: accuracy 0.8 but balanced
    accuracy 0.5 (recall 1 and 0) and macro F1 (16/18 + 0) / 2."""
    y_true = np.array([0] * 8 + [1] * 2)
    scores = scores_from_confusion(confusion_matrix(y_true, np.zeros(10, np.int64), 2))
    assert float(scores["accuracy"]) == pytest.approx(0.8)
    assert float(scores["balanced_accuracy"]) == pytest.approx(0.5)
    assert float(scores["macro_f1"]) == pytest.approx(8 / 18)


@pytest.mark.parametrize("seed", range(6))
def test_scores_match_scikit_learn(seed: int) -> None:
    """Random labels over 6 classes: one never true (predicted only), one never predicted,
    one neither (it must not count in any average): the definitions in
    scores_from_confusion's docstring."""
    rng = np.random.default_rng(seed)
    y_true = rng.choice([0, 1, 2, 4], size=40, p=[0.55, 0.25, 0.15, 0.05])
    y_pred = np.where(rng.random(40) < 0.6, y_true, rng.choice([0, 1, 3], size=40))
    scores = scores_from_confusion(confusion_matrix(y_true, y_pred, 6))
    seen = sorted(set(y_true) | set(y_pred))
    assert float(scores["accuracy"]) == pytest.approx(accuracy_score(y_true, y_pred))
    with pytest.warns(UserWarning):  # scikit-learn warns about the class predicted but never true
        assert float(scores["balanced_accuracy"]) == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert float(scores["macro_f1"]) == pytest.approx(f1_score(y_true, y_pred, average="macro", labels=seen))


def test_scores_are_vectorised_over_resamples() -> None:
    rng = np.random.default_rng(3)
    stack = np.stack([confusion_matrix(rng.integers(0, 3, 30), rng.integers(0, 3, 30), 3) for _ in range(4)])
    batched = scores_from_confusion(stack)
    for i in range(4):
        single = scores_from_confusion(stack[i])
        for metric, values in batched.items():
            assert values[i] == pytest.approx(float(single[metric]))


# --------------------------------------------------------------------------- t-interval
@pytest.mark.parametrize("df", [1, 2, 3, 7, 29, 35, 119, 500])
def test_t_critical_value_is_scipys(df: int) -> None:
    assert t_critical_95(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), rel=1e-9)


def test_t_interval_matches_scipy() -> None:
    values = [0.12, -0.03, 0.08, 0.05]
    stats = t_interval(values)
    low, high = scipy_stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=scipy_stats.sem(values))
    assert (stats["ci95_low"], stats["ci95_high"]) == pytest.approx((low, high))
    assert stats["per_seed"] == values
    with pytest.raises(ValueError, match="df >= 1"):
        t_critical_95(0)


def test_t_interval_covers_the_true_mean_about_95_percent() -> None:
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(400):
        stats = t_interval(rng.normal(0.3, 0.1, size=4).tolist())
        covered += stats["ci95_low"] <= 0.3 <= stats["ci95_high"]
    assert 0.92 <= covered / 400 <= 0.98


# --------------------------------------------------------------------------- bootstrap
def _segmentation_outputs(real: list[np.ndarray], augmented: list[np.ndarray]) -> dict:
    return {
        "real_only": [{"dice": r, "hd95": np.zeros_like(r)} for r in real],
        "augmented": [{"dice": a, "hd95": np.zeros_like(a)} for a in augmented],
    }


def test_bootstrap_interval_covers_the_true_mean_about_95_percent() -> None:
    """400 simulated test sets of 40 per-image deltas ~ N(0.05, 0.2): the percentile
    bootstrap of the mean is a 95% interval (a 50% one would cover about half the time)."""
    rng = np.random.default_rng(1)
    covered = 0
    for k in range(400):
        real = rng.random(40)
        outputs = _segmentation_outputs([real], [real + rng.normal(0.05, 0.2, 40)])
        low, high = bootstrap_delta("segmentation", outputs, None, 2, seed=k, resamples=400)["dice"]
        covered += low <= 0.05 <= high
    assert 0.9 <= covered / 400 <= 0.99


def test_bootstrap_matches_scipys_percentile_bootstrap() -> None:
    """Classification: the accuracy delta of paired predictions is the mean of per-image
    correctness differences, so scipy.stats.bootstrap (percentile) gives the same interval
    up to resampling noise; the seed average uses both seeds."""
    rng = np.random.default_rng(2)
    y_true = rng.integers(0, 3, 120)
    real = [np.where(rng.random(120) < 0.6, y_true, (y_true + 1) % 3) for _ in range(2)]
    aug = [np.where(rng.random(120) < 0.75, y_true, (y_true + 1) % 3) for _ in range(2)]
    interval = bootstrap_delta("classification", {"real_only": real, "augmented": aug}, y_true, 3, seed=0)
    per_image = np.mean([(a == y_true).astype(float) - (r == y_true) for r, a in zip(real, aug, strict=True)], axis=0)
    reference = scipy_stats.bootstrap(
        (per_image,), np.mean, confidence_level=0.95, n_resamples=4000, method="percentile", random_state=5
    ).confidence_interval
    assert interval["accuracy"] == pytest.approx((reference.low, reference.high), abs=0.015)
    assert set(interval) == {"accuracy", "balanced_accuracy", "macro_f1"}


def test_bootstrap_hand_worked_extremes() -> None:
    y_true = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    wrong = (y_true + 1) % 3
    same = bootstrap_delta("classification", {"real_only": [wrong], "augmented": [wrong]}, y_true, 3, seed=0)
    assert all(bounds == (0.0, 0.0) for bounds in same.values())
    perfect = bootstrap_delta("classification", {"real_only": [wrong], "augmented": [y_true]}, y_true, 3, seed=0)
    assert perfect["balanced_accuracy"] == (1.0, 1.0) and perfect["accuracy"] == (1.0, 1.0)


# --------------------------------------------------------------------------- verdict and power
BOTH_ABOVE = {"mean": 0.1, "ci95_low": 0.01, "ci95_high": 0.2, "bootstrap_ci95_low": 0.02, "bootstrap_ci95_high": 0.1}


def test_verdict_needs_both_intervals() -> None:
    assert decide(BOTH_ABOVE, lower_is_better=False) == "helped"
    assert decide(BOTH_ABOVE, lower_is_better=True) == "hurt"
    # the seed interval includes 0, the bootstrap does not: not enough
    assert decide({**BOTH_ABOVE, "ci95_low": -0.05}, lower_is_better=False) == NO_EFFECT
    # the bootstrap includes 0, the seed interval does not: not enough
    assert decide({**BOTH_ABOVE, "bootstrap_ci95_low": -0.01}, lower_is_better=False) == NO_EFFECT
    below = {
        "mean": -0.1,
        "ci95_low": -0.3,
        "ci95_high": -0.02,
        "bootstrap_ci95_low": -0.2,
        "bootstrap_ci95_high": -0.01,
    }
    assert decide(below, lower_is_better=False) == "hurt"
    assert decide({**below, "ci95_high": 0.01}, lower_is_better=False) == NO_EFFECT
    # one seed: the bootstrap alone decides
    assert decide({**BOTH_ABOVE, "ci95_low": None, "ci95_high": None}, lower_is_better=False) == "helped"
    assert "BOTH" in VERDICT_RULE and "half-width of the wider" in VERDICT_RULE


def test_minimum_detectable_effect_is_the_wider_half_width() -> None:
    values = [0.02, 0.05, -0.01]
    seeds = t_interval(values)
    expected_seed_half = scipy_stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / np.sqrt(3)
    delta = {**seeds, "bootstrap_ci95_low": -0.03, "bootstrap_ci95_high": 0.09}
    mde, governing = minimum_detectable_effect(delta)
    assert governing == "seeds" and mde == pytest.approx(expected_seed_half)
    narrow_seeds = {**delta, "ci95_low": 0.0, "ci95_high": 0.02}
    assert minimum_detectable_effect(narrow_seeds) == (pytest.approx(0.06), "test images")
    assert minimum_detectable_effect({"ci95_low": None, "ci95_high": None}) == (None, None)


def test_power_statement() -> None:
    delta = {"mean": 0.01, "ci95_low": -0.2, "ci95_high": 0.22, "bootstrap_ci95_low": -0.1, "bootstrap_ci95_high": 0.1}
    result = power(delta, NO_EFFECT, "balanced_accuracy", 24, 3)
    assert result["mde"] == pytest.approx(0.21) and result["interval_governing"] == "seeds"
    assert result["statement"] == (
        "no measurable effect: this test (24 test images, 3 seeds) could only have detected a change of at "
        "least 0.210 balanced accuracy"
    )
    helped = power(BOTH_ABOVE, "helped", "dice", 10, 1)
    assert helped["statement"].startswith("helped: Dice changed by +0.100") and "one seed" in helped["statement"]
    untested = power(None, NOT_TESTED_NO_SYNTHETIC, "dice", 10, 2)
    assert untested["mde"] is None and untested["statement"].startswith(NOT_TESTED_NO_SYNTHETIC)


# --------------------------------------------------------------------------- segmentation scores
def test_dice_of_a_class_absent_from_both_masks_counts_as_1() -> None:
    """Documented convention (MONAI ``ignore_empty=False``): a foreground class empty in
    truth and prediction scores 1, empty in only one scores 0; the image's Dice averages
    the foreground classes 1..K-1."""
    truth = np.zeros((3, 16, 16), np.int64)
    truth[:, 4:10, 4:10] = 1
    pred = truth.copy()
    pred[1, 12:14, 12:14] = 2  # class 2 predicted, absent from the truth
    truth[2, 0:2, 0:2] = 2  # class 2 true, not predicted
    dice = downstream.segmentation_scores(truth, pred, 3)["dice"]
    assert dice.tolist() == pytest.approx([1.0, 0.5, 0.5])


def test_dice_matches_the_overlap_formula() -> None:
    rng = np.random.default_rng(4)
    truth = (rng.random((4, 16, 16)) < 0.4).astype(np.int64)
    pred = (rng.random((4, 16, 16)) < 0.5).astype(np.int64)
    expected = [2 * (t & p).sum() / (t.sum() + p.sum()) for t, p in zip(truth, pred, strict=True)]
    assert downstream.segmentation_scores(truth, pred, 2)["dice"] == pytest.approx(expected)


def test_hd95_is_the_95th_percentile_of_boundary_distances() -> None:
    """One true pixel, ten isolated predicted pixels (each its own boundary): HD95 is the
    95th percentile (numpy's linear interpolation) of the ten distances; the maximum is
    scipy's (symmetric) Hausdorff distance, the median far below both."""
    truth = np.zeros((1, 32, 32), np.int64)
    truth[0, 10, 10] = 1
    points = np.array([(4, 4), (4, 8), (20, 20), (26, 6), (14, 24), (8, 28), (28, 28), (18, 4), (24, 14), (6, 18)])
    pred = np.zeros_like(truth)
    pred[0, points[:, 0], points[:, 1]] = 1
    distances = np.hypot(*(points - 10).T)
    hd95 = float(downstream.segmentation_scores(truth, pred, 2)["hd95"][0])
    assert hd95 == pytest.approx(np.percentile(distances, 95), abs=1e-4)
    hausdorff = max(directed_hausdorff(points, [[10, 10]])[0], directed_hausdorff([[10, 10]], points)[0])
    assert np.percentile(distances, 50) + 5 < hd95 < hausdorff


def test_hd95_conventions_for_empty_classes() -> None:
    truth = np.zeros((2, 16, 16), np.int64)
    pred = np.zeros_like(truth)
    truth[1, 2:5, 2:5] = 1  # image 1: class 1 only in the truth
    hd95 = downstream.segmentation_scores(truth, pred, 2)["hd95"]
    assert hd95.tolist() == pytest.approx([0.0, np.hypot(16, 16)])
