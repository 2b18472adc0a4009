"""Stage ``retrain``: does synthetic data help a downstream model?

For every seed in ``retrain.seeds`` the same network is trained twice with the same
budget (optimizer steps, batch size, learning rate, seed, initial weights):

- ``real_only``: the real train split;
- ``augmented``: the real train split plus filtered synthetic rows, subsampled
  deterministically to ``synthetic_ratio`` x (number of real train images), stratified by
  class in the real train proportions.

Both are evaluated on the real test split (classification: accuracy, balanced accuracy,
macro F1; segmentation: mean foreground Dice and HD95 in pixels). The effect is the paired
per-seed delta ``augmented - real_only`` with two 95% intervals: a t-interval across seeds
(training noise) and a percentile bootstrap over test images of the seed-averaged delta
(test-set noise). The verdict, on the primary metric, is ``helped`` when both intervals
lie above 0, ``hurt`` when both lie below 0 (for lower-is-better metrics: mirrored), else
``no measurable effect``; with a single seed only the bootstrap interval decides.

Writes ``metrics/retrain.json`` (DVC metrics) and ``metrics/retrain_seeds.csv`` (DVC plot:
one row per seed and setting).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from typing import Any

import numpy as np

from generators.errors import DataError
from generators.shards import BASE_COLUMNS, decode_table, iter_tables, read_table, write_json_atomic
from tasks import downstream
from tasks.config import PipelineConfig
from tasks.paths import PipelinePaths
from tasks.runtime import setup_torch

logger = logging.getLogger(__name__)

SETTINGS = ("real_only", "augmented")
PRIMARY_METRIC = {"classification": "balanced_accuracy", "segmentation": "dice"}
BOOTSTRAP_RESAMPLES = 2000
#: two-sided 95% Student t critical values by degrees of freedom; a df between entries
#: uses the next smaller one (a slightly wider, conservative interval)
T95 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
    10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
    18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060,
    26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980,
}


# --------------------------------------------------------------------------- statistics
def t_critical_95(df: int) -> float:
    """Two-sided 95% t critical value for ``df >= 1`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"expected df >= 1, got {df}")
    if df > 120:
        return 1.960
    return T95[max(k for k in T95 if k <= df)]


def t_interval(values: list[float]) -> dict[str, Any]:
    """``{"mean", "ci95_low", "ci95_high", "per_seed"}``: a 95% t-interval of the mean;
    the bounds are None with fewer than 2 values."""
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
    outputs: dict[str, list[np.ndarray]],
    y_true: np.ndarray | None,
    num_classes: int,
    seed: int,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> dict[str, tuple[float, float]]:
    """Percentile 95% bootstrap over test images of the seed-averaged delta, per metric.

    classification: ``outputs[setting]`` = per-seed predicted classes int64 ``(n,)`` and
    ``y_true`` int64 ``(n,)``; every resample recomputes each metric on the resampled
    images. segmentation: ``outputs[setting]`` = per-seed ``{metric: per-image float64 (n,)}``
    and the resampled mean is used. Returns ``{metric: (low, high)}``.
    """
    rng = np.random.default_rng(seed)
    if task == "classification":
        n = y_true.shape[0]
        index = rng.integers(0, n, size=(resamples, n))
        offsets = (np.arange(resamples) * num_classes * num_classes)[:, None]
        deltas: dict[str, np.ndarray] = {}
        for real_pred, aug_pred in zip(outputs["real_only"], outputs["augmented"]):
            per_setting = []
            for pred in (real_pred, aug_pred):
                flat = offsets + y_true[index] * num_classes + pred[index]
                confusion = np.bincount(flat.ravel(), minlength=resamples * num_classes**2)
                per_setting.append(
                    downstream.scores_from_confusion(confusion.reshape(resamples, num_classes, num_classes))
                )
            for metric in downstream.CLASSIFICATION_METRICS:
                deltas[metric] = deltas.get(metric, 0) + per_setting[1][metric] - per_setting[0][metric]
        seeds = len(outputs["real_only"])
        return {
            m: tuple(float(v) for v in np.nanpercentile(d / seeds, [2.5, 97.5])) for m, d in sorted(deltas.items())
        }
    result = {}
    n = outputs["real_only"][0][downstream.SEGMENTATION_METRICS[0]].shape[0]
    index = rng.integers(0, n, size=(resamples, n))
    for metric in downstream.SEGMENTATION_METRICS:
        per_image = np.mean(
            [aug[metric] - real[metric] for real, aug in zip(outputs["real_only"], outputs["augmented"])], axis=0
        )
        means = per_image[index].mean(axis=1)
        result[metric] = tuple(float(v) for v in np.percentile(means, [2.5, 97.5]))
    return result


def decide(delta: dict[str, Any], lower_is_better: bool) -> str:
    """``helped`` / ``hurt`` / ``no measurable effect`` from the seed t-interval and the
    bootstrap interval of a delta (a missing seed interval defers to the bootstrap)."""
    sign = -1.0 if lower_is_better else 1.0
    bounds = [(delta["ci95_low"], delta["ci95_high"]), (delta["bootstrap_ci95_low"], delta["bootstrap_ci95_high"])]
    bounds = [tuple(sorted((sign * low, sign * high))) for low, high in bounds if low is not None]
    if bounds and all(low > 0 for low, _ in bounds):
        return "helped"
    if bounds and all(high < 0 for _, high in bounds):
        return "hurt"
    return "no measurable effect"


# --------------------------------------------------------------------------- data
def allocate(total: int, weights: dict[str, int], available: dict[str, int]) -> dict[str, int]:
    """Split ``total`` over classes in proportion to ``weights`` (largest remainder, ties
    by class name), capped by ``available``; sorted by class."""
    weight_sum = sum(weights.values())
    if total <= 0 or weight_sum == 0:
        return {c: 0 for c in sorted(weights)}
    exact = {c: total * w / weight_sum for c, w in weights.items()}
    quota = {c: int(math.floor(v)) for c, v in exact.items()}
    leftover = total - sum(quota.values())
    for c in sorted(exact, key=lambda c: (-(exact[c] - quota[c]), c))[:leftover]:
        quota[c] += 1
    capped = {c: min(q, available.get(c, 0)) for c, q in sorted(quota.items())}
    short = {c: quota[c] - capped[c] for c in capped if capped[c] < quota[c]}
    if short:
        logger.warning("not enough filtered synthetic images for %s; using all there are", short)
    return capped


def select_synthetic(paths: PipelinePaths, real_labels: list[str], ratio: float, seed: int) -> list[str]:
    """Ids of the filtered synthetic rows to add (sorted): ``round(ratio * len(real_labels))``
    rows stratified by class, drawn with a numpy generator seeded with ``seed``."""
    table = read_table(paths.filtered, columns=["id", "label"])
    by_class: dict[str, list[str]] = {}
    for row_id, label in zip(table.column("id").to_pylist(), table.column("label").to_pylist()):
        by_class.setdefault("" if label is None else str(label), []).append(row_id)
    weights: dict[str, int] = {}
    for label in real_labels:
        weights[label] = weights.get(label, 0) + 1
    quota = allocate(int(round(ratio * len(real_labels))), weights, {c: len(v) for c, v in by_class.items()})
    rng = np.random.default_rng(seed)
    chosen: list[str] = []
    for label, count in quota.items():
        ids = sorted(by_class.get(label, []))
        chosen.extend(ids[i] for i in np.sort(rng.choice(len(ids), size=count, replace=False)))
    return sorted(chosen)


def load_rows(paths: PipelinePaths, ids: list[str], classes: list[str]) -> downstream.LabelledArrays:
    """Decode only the rows ``ids`` of the filtered dataset, one shard at a time."""
    wanted = set(ids)
    parts = []
    for table in iter_tables(paths.filtered, columns=list(BASE_COLUMNS)):
        keep = np.asarray([row_id in wanted for row_id in table.column("id").to_pylist()], dtype=bool)
        if keep.any():
            parts.append(decode_table(table.filter(keep)))
    if not parts:
        return downstream.LabelledArrays(np.zeros((0, 1, 1, 1), np.float32), [], np.zeros(0, np.int64), None, [])
    labels = ["" if a is None else str(a) for p in parts for a in p.labels]
    index = {name: i for i, name in enumerate(classes)}
    masks = None if any(p.masks is None for p in parts) else np.concatenate([p.masks for p in parts])
    return downstream.LabelledArrays(
        images=np.concatenate([p.images for p in parts]),
        labels=labels,
        targets=np.asarray([index.get(label, -1) for label in labels], dtype=np.int64),
        masks=masks,
        ids=[i for p in parts for i in p.ids],
    )


def _load_data(cfg: PipelineConfig, paths: PipelinePaths):
    """Real train/test and the synthetic subset, validated. Returns
    ``(classes, num_classes, train, test, synthetic)``."""
    spec = cfg.retrain
    counts = downstream.dataset_labels(paths.real, ["test"])
    if not counts:
        raise DataError(
            f"{paths.real}: expected a non-empty 'test' split for retrain, got none; "
            "set preprocess.split.test > 0 and rerun ingest"
        )
    classes = [label for label in downstream.dataset_labels(paths.real, ["train"]) if label]
    train = downstream.load_labelled(paths.real, ["train"], classes)
    test = downstream.load_labelled(paths.real, ["test"], classes)
    if len(train) < 2:
        raise DataError(f"{paths.real}: expected >= 2 real train images, got {len(train)}; ingest more data")
    synthetic_ids = select_synthetic(paths, train.labels, spec.synthetic_ratio, cfg.seed)
    synthetic = load_rows(paths, synthetic_ids, classes)
    shape = tuple(train.images.shape[1:])
    if len(synthetic) and tuple(synthetic.images.shape[1:]) != shape:
        raise DataError(
            f"{paths.filtered}: expected synthetic images of shape {shape} like the real train split, "
            f"got {tuple(synthetic.images.shape[1:])}; synthesize at preprocess.size with preprocess.channels"
        )
    if tuple(test.images.shape[1:]) != shape:
        raise DataError(f"{paths.real}: expected test images of shape {shape}, got {tuple(test.images.shape[1:])}")
    if spec.task == "classification":
        if len(classes) < 2 or (train.targets < 0).any():
            raise DataError(
                f"{paths.real}: expected a class label on every real train row and >= 2 classes, got {classes}; "
                "label the data or use retrain.task: segmentation"
            )
        unknown = sorted({label for label, t in zip(test.labels, test.targets) if t < 0})
        if unknown:
            raise DataError(f"{paths.real}: expected test labels among the train classes {classes}, got {unknown}")
        unknown = sorted({label for label, t in zip(synthetic.labels, synthetic.targets) if t < 0})
        if unknown:
            raise DataError(
                f"{paths.filtered}: expected synthetic labels among the real classes {classes}, got {unknown}; "
                "synthesize with the real dataset's labels"
            )
        return classes, len(classes), train, test, synthetic
    for name, part, where in (("real train", train, paths.real), ("real test", test, paths.real),
                              ("synthetic", synthetic, paths.filtered)):
        if len(part) and part.masks is None:
            raise DataError(
                f"{where}: expected a mask on every {name} row for segmentation, found rows without; "
                "ingest masks / set generator.train.with_masks: true, or use retrain.task: classification"
            )
    num_classes = int(max(train.masks.max(), test.masks.max(), synthetic.masks.max() if len(synthetic) else 0)) + 1
    return classes, max(num_classes, 2), train, test, synthetic


# --------------------------------------------------------------------------- stage
def _seeds_csv(rows: list[dict[str, Any]], metrics: tuple[str, ...]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["seed", "setting", *metrics])
    for row in rows:
        writer.writerow([row["seed"], row["setting"], *(f"{row[m]:.6f}" for m in metrics)])
    return buffer.getvalue()


def retrain(cfg: PipelineConfig, paths: PipelinePaths) -> dict[str, Any]:
    """Train real-only vs real+synthetic for every seed, evaluate on the real test split,
    write ``retrain.json`` and ``retrain_seeds.csv``; returns the JSON's content."""
    started = time.perf_counter()
    spec = cfg.retrain
    task = spec.task
    metrics = downstream.CLASSIFICATION_METRICS if task == "classification" else downstream.SEGMENTATION_METRICS
    classes, num_classes, train, test, synthetic = _load_data(cfg, paths)
    if task == "classification":
        train_y, test_y, syn_y = train.targets, test.targets, synthetic.targets
    else:
        empty = np.zeros((0, *train.masks.shape[1:]), np.int64)
        train_y, test_y = train.masks, test.masks
        syn_y = synthetic.masks if len(synthetic) else empty
    data = {
        "real_only": (train.images, train_y),
        "augmented": (
            np.concatenate([train.images, synthetic.images]) if len(synthetic) else train.images,
            np.concatenate([train_y, syn_y]) if len(synthetic) else train_y,
        ),
    }
    logger.info(
        "retrain %s/%s: %d real train + %d synthetic, %d test, %d steps x batch %d, seeds %s",
        task, spec.network, len(train), len(synthetic), len(test), spec.steps, spec.batch_size, list(spec.seeds),
    )

    values: dict[str, dict[str, list[float]]] = {s: {m: [] for m in metrics} for s in SETTINGS}
    outputs: dict[str, list[Any]] = {s: [] for s in SETTINGS}
    csv_rows: list[dict[str, Any]] = []
    for seed in spec.seeds:
        for setting in SETTINGS:
            images, targets = data[setting]
            device = setup_torch(cfg, seed)
            model = downstream.build_network(task, spec.network, images.shape[1], num_classes)
            model = downstream.train_model(
                model, images, targets, task=task, steps=spec.steps, batch_size=spec.batch_size,
                lr=spec.lr, seed=seed, augment=spec.augment, device=device,
            )
            proba = downstream.predict_proba(model, test.images, batch_size=spec.batch_size, device=device)
            if task == "classification":
                scores = downstream.evaluate_classification(test_y, proba, classes)
                outputs[setting].append(proba.argmax(axis=1))
            else:
                per_image = downstream.segmentation_scores(test_y, proba.argmax(axis=1), num_classes)
                scores = {m: float(v.mean()) for m, v in per_image.items()}
                outputs[setting].append(per_image)
            for m in metrics:
                values[setting][m].append(scores[m])
            csv_rows.append({"seed": seed, "setting": setting, **{m: scores[m] for m in metrics}})
            logger.info("seed %d %s: %s", seed, setting, ", ".join(f"{m}={scores[m]:.4f}" for m in metrics))

    boot = bootstrap_delta(task, outputs, test_y if task == "classification" else None, num_classes, cfg.seed)
    delta = {}
    for m in metrics:
        paired = [a - r for r, a in zip(values["real_only"][m], values["augmented"][m])]
        delta[m] = {**t_interval(paired), "bootstrap_ci95_low": boot[m][0], "bootstrap_ci95_high": boot[m][1]}
    primary = PRIMARY_METRIC[task]
    verdict = decide(delta[primary], primary in downstream.LOWER_IS_BETTER)
    syn_counts: dict[str, int] = {}
    for label in synthetic.labels:
        syn_counts[label] = syn_counts.get(label, 0) + 1
    summary = downstream.round_floats(
        {
            "task": task,
            "network": spec.network,
            "primary_metric": primary,
            "lower_is_better": sorted(m for m in metrics if m in downstream.LOWER_IS_BETTER),
            "real_only": {m: t_interval(values["real_only"][m]) for m in metrics},
            "augmented": {m: t_interval(values["augmented"][m]) for m in metrics},
            "delta": delta,
            "verdict": verdict,
            "seeds": list(spec.seeds),
            "steps": spec.steps,
            "batch_size": spec.batch_size,
            "lr": spec.lr,
            "synthetic_ratio": spec.synthetic_ratio,
            "n_real_train": len(train),
            "n_synthetic_used": len(synthetic),
            "n_test": len(test),
            "synthetic_used_per_class": dict(sorted(syn_counts.items())),
            "classes": classes,
            "num_classes": num_classes,
            "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
        }
    )
    paths.metrics.mkdir(parents=True, exist_ok=True)
    write_json_atomic(summary, paths.metrics / "retrain.json")
    (paths.metrics / "retrain_seeds.csv").write_text(_seeds_csv(csv_rows, metrics))
    d = summary["delta"][primary]
    logger.info(
        "retrain: %s delta %.4f (seeds CI %s..%s, bootstrap CI %.4f..%.4f): %s; took %.1f s",
        primary, d["mean"], d["ci95_low"], d["ci95_high"], d["bootstrap_ci95_low"], d["bootstrap_ci95_high"],
        verdict, time.perf_counter() - started,
    )
    return summary
