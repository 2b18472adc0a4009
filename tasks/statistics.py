"""Statistics of the retrain comparison: pure functions, no torch, no I/O.

- :func:`confusion_matrix` / :func:`scores_from_confusion`: accuracy, balanced accuracy and
  macro F1, vectorised over leading axes (bootstrap resamples);
- :func:`t_critical_95` / :func:`t_interval`: the 95% Student t-interval over seeds;
- :func:`bootstrap_delta`: the 95% percentile bootstrap over test images of the
  seed-averaged delta;
- :func:`decide` and :func:`power`: the verdict under :data:`VERDICT_RULE` and the minimum
  detectable effect (MDE) of the same intervals, with a sentence a report can print.

Arrays: predicted and true classes int64 ``(n,)``; confusion matrices int64 or float
``(..., K, K)`` (rows = truth); per-image segmentation scores float64 ``(n,)``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy import stats as scipy_stats

CLASSIFICATION_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
SEGMENTATION_METRICS = ("dice", "hd95")
#: metrics where a smaller value is better (everything else: larger is better)
LOWER_IS_BETTER = frozenset({"hd95"})
BOOTSTRAP_RESAMPLES = 2000
#: two-sided confidence of every interval here
CONFIDENCE = 0.95
#: percentiles of the bootstrap distribution that bound its 95% interval
BOOTSTRAP_PERCENTILES = (2.5, 97.5)

HELPED, HURT, NO_EFFECT = "helped", "hurt", "no measurable effect"
NOT_TESTED_NO_SYNTHETIC = "not tested: no synthetic images reached the retrain"
NOT_TESTED_TOO_LITTLE_DATA = "not tested: too little data"
#: real only scored the metric's best value on every seed: a gain cannot show (a loss still can)
NOT_TESTED_CEILING = "not tested: real only already scores the maximum"
#: the one rule that turns the two intervals into a verdict, and what the MDE means
VERDICT_RULE = (
    "helped (hurt) only when BOTH 95% intervals of the delta (real + synthetic minus real only) lie "
    "entirely above (below) zero on the primary metric (mirrored for lower-is-better metrics): the "
    "t-interval over training seeds and the percentile bootstrap over test images; with a single seed "
    "the bootstrap alone decides and training noise is not measured. Otherwise: no measurable effect. "
    "The minimum detectable effect (MDE) is the half-width of the wider of the two intervals: the "
    "smallest observed delta this test split and these seeds could call helped or hurt (a true effect "
    "of that size is detected only about half the time; about 1.4x the MDE is detected 80% of the time)."
)
METRIC_NAMES = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "macro_f1": "macro F1",
    "dice": "Dice",
    "hd95": "px HD95",
}


# --------------------------------------------------------------------------- classification scores
def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 ``(K, K)``: rows = true class, columns = predicted class."""
    flat = np.asarray(y_true).astype(np.int64) * num_classes + np.asarray(y_pred).astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores_from_confusion(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """accuracy, balanced accuracy and macro F1 from confusion matrices ``(..., K, K)``
    (vectorised over leading axes, e.g. bootstrap resamples). Balanced accuracy averages
    recall over classes present in the truth; macro F1 averages F1 over classes present
    in the truth or the prediction (scikit-learn's ``balanced_accuracy_score`` and
    ``f1_score(average="macro", labels=<those classes>)``). Values float64 in [0, 1]."""
    confusion = np.asarray(confusion).astype(np.float64)
    tp = np.diagonal(confusion, axis1=-2, axis2=-1)
    support = confusion.sum(axis=-1)
    predicted = confusion.sum(axis=-2)
    total = support.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = tp.sum(axis=-1) / total
        present = support > 0
        recall = np.where(present, tp / np.where(present, support, 1), 0.0)
        balanced = recall.sum(axis=-1) / present.sum(axis=-1)
        denominator = support + predicted
        seen = denominator > 0
        f1 = np.where(seen, 2 * tp / np.where(seen, denominator, 1), 0.0)
        macro_f1 = f1.sum(axis=-1) / seen.sum(axis=-1)
    return {"accuracy": accuracy, "balanced_accuracy": balanced, "macro_f1": macro_f1}


# --------------------------------------------------------------------------- intervals
def t_critical_95(df: int) -> float:
    """Two-sided 95% Student t critical value ``t_{0.975, df}`` for ``df >= 1`` (scipy)."""
    if df < 1:
        raise ValueError(f"expected df >= 1, got {df}")
    return float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, df))


def t_interval(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "ci95_low", "ci95_high", "per_seed"}``: the 95% t-interval of the mean,
    ``mean -/+ t_{0.975, n-1} * sd / sqrt(n)`` (sd with ddof=1); the bounds are None with
    fewer than 2 values."""
    array = np.asarray(values, dtype=np.float64)
    mean = float(array.mean())
    if array.size < 2:
        low = high = None
    else:
        half = t_critical_95(array.size - 1) * float(array.std(ddof=1)) / math.sqrt(array.size)
        low, high = mean - half, mean + half
    return {"mean": mean, "ci95_low": low, "ci95_high": high, "per_seed": [float(v) for v in array]}


def bootstrap_delta(
    task: str,
    outputs: dict[str, list[Any]],
    y_true: np.ndarray | None,
    num_classes: int,
    seed: int,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> dict[str, tuple[float, float]]:
    """Percentile 95% bootstrap over test images of the seed-averaged delta, per metric.

    classification: ``outputs[setting]`` = per-seed predicted classes int64 ``(n,)`` and
    ``y_true`` int64 ``(n,)``; every resample recomputes each metric on the resampled
    images (one set of resampled images for every seed and both settings: paired).
    segmentation: ``outputs[setting]`` = per-seed ``{metric: per-image float64 (n,)}`` and
    the resampled mean is used. ``setting`` is ``"real_only"`` and ``"augmented"``.
    Returns ``{metric: (low, high)}`` (float).
    """
    rng = np.random.default_rng(seed)
    if task == "classification":
        n = y_true.shape[0]
        index = rng.integers(0, n, size=(resamples, n))
        offsets = (np.arange(resamples) * num_classes * num_classes)[:, None]
        deltas: dict[str, np.ndarray] = {}
        for real_pred, aug_pred in zip(outputs["real_only"], outputs["augmented"], strict=True):
            per_setting = []
            for pred in (real_pred, aug_pred):
                flat = offsets + y_true[index] * num_classes + pred[index]
                confusion = np.bincount(flat.ravel(), minlength=resamples * num_classes**2)
                per_setting.append(scores_from_confusion(confusion.reshape(resamples, num_classes, num_classes)))
            for metric in CLASSIFICATION_METRICS:
                deltas[metric] = deltas.get(metric, 0) + per_setting[1][metric] - per_setting[0][metric]
        seeds = len(outputs["real_only"])
        return {
            m: tuple(float(v) for v in np.nanpercentile(d / seeds, BOOTSTRAP_PERCENTILES))
            for m, d in sorted(deltas.items())
        }
    result = {}
    n = outputs["real_only"][0][SEGMENTATION_METRICS[0]].shape[0]
    index = rng.integers(0, n, size=(resamples, n))
    for metric in SEGMENTATION_METRICS:
        per_image = np.mean(
            [aug[metric] - real[metric] for real, aug in zip(outputs["real_only"], outputs["augmented"], strict=True)],
            axis=0,
        )
        means = per_image[index].mean(axis=1)
        result[metric] = tuple(float(v) for v in np.percentile(means, BOOTSTRAP_PERCENTILES))
    return result


# --------------------------------------------------------------------------- verdict and power
def _intervals(delta: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """The intervals a delta has: ``{"seeds": (low, high), "test images": (low, high)}``."""
    found = {}
    for name, low_key, high_key in (
        ("seeds", "ci95_low", "ci95_high"),
        ("test images", "bootstrap_ci95_low", "bootstrap_ci95_high"),
    ):
        low, high = delta.get(low_key), delta.get(high_key)
        if low is not None and high is not None:
            found[name] = (float(low), float(high))
    return found


def decide(delta: dict[str, Any], lower_is_better: bool) -> str:
    """``helped`` / ``hurt`` / ``no measurable effect`` under :data:`VERDICT_RULE` from the
    seed t-interval (``ci95_low``/``ci95_high``) and the bootstrap interval
    (``bootstrap_ci95_low``/``bootstrap_ci95_high``) of a delta; a missing seed interval
    (one seed) defers to the bootstrap."""
    sign = -1.0 if lower_is_better else 1.0
    bounds = [tuple(sorted((sign * low, sign * high))) for low, high in _intervals(delta).values()]
    if bounds and all(low > 0 for low, _ in bounds):
        return HELPED
    if bounds and all(high < 0 for _, high in bounds):
        return HURT
    return NO_EFFECT


def at_ceiling(metric: str, values: Sequence[float]) -> bool:
    """True when every value is the metric's best possible one (1 for scores in [0, 1], 0 for
    lower-is-better distances): a comparison then has no room to show a gain."""
    best = 0.0 if metric in LOWER_IS_BETTER else 1.0
    return len(values) > 0 and all(abs(float(v) - best) <= 1e-9 for v in values)


def minimum_detectable_effect(delta: dict[str, Any]) -> tuple[float | None, str | None]:
    """``(mde, governing)``: the half-width of the wider 95% interval of ``delta`` (see
    :data:`VERDICT_RULE`) and which one it is (``"seeds"`` or ``"test images"``);
    ``(None, None)`` when the delta has no interval."""
    halves = {name: (high - low) / 2 for name, (low, high) in _intervals(delta).items()}
    if not halves:
        return None, None
    governing = max(halves, key=lambda name: (halves[name], name))
    return float(halves[governing]), governing


def power(
    delta: dict[str, Any] | None, verdict: str, metric: str, n_test: int, n_seeds: int, unit: str = "images"
) -> dict[str, Any]:
    """The power statement beside a verdict: ``{"metric", "mde", "interval_governing",
    "n_test", "n_seeds", "statement"}``. ``delta`` (one metric's, as :func:`decide` reads
    it) is None when no comparison was run: ``mde`` is then None. A "not tested" verdict
    with a delta (too little data) states the MDE but draws no conclusion. ``unit``: what
    the test rows are in the statement (``"volumes"`` for a 3D dataset)."""
    name = METRIC_NAMES.get(metric, metric)
    if unit == "volumes" and metric == "hd95":
        name = "voxel HD95"
    sample = f"{n_test} test {unit}, {n_seeds} seed{'s' if n_seeds != 1 else ''}"
    result: dict[str, Any] = {
        "metric": metric,
        "mde": None,
        "interval_governing": None,
        "n_test": n_test,
        "n_seeds": n_seeds,
    }
    if delta is None:
        result["statement"] = f"{verdict}: no comparison was made, so no effect size can be stated"
        return result
    mde, governing = minimum_detectable_effect(delta)
    result.update(mde=mde, interval_governing=governing)
    if verdict == NOT_TESTED_CEILING:
        result["statement"] = (
            f"{verdict}: real only scored the best possible {name} with every seed ({sample}), so no gain "
            "could show (a loss would have: the intervals stayed at zero)"
        )
        return result
    if verdict.startswith("not tested"):
        result["statement"] = f"{verdict}: the deltas are reported but not judged" + (
            f"; this test ({sample}) could only have detected a change of at least {mde:.3f} {name}"
            if mde is not None
            else ""
        )
        return result
    if mde is None:
        result["statement"] = f"{verdict}: no interval could be computed ({sample})"
        return result
    one_seed = "; one seed: training noise is not measured" if n_seeds < 2 else ""
    if verdict == NO_EFFECT:
        result["statement"] = (
            f"no measurable effect: this test ({sample}) could only have detected a change of at least "
            f"{mde:.3f} {name}{one_seed}"
        )
    else:
        result["statement"] = (
            f"{verdict}: {name} changed by {delta['mean']:+.3f}; this test ({sample}) detects changes of at "
            f"least {mde:.3f} {name}{one_seed}"
        )
    return result
