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

Two optional sweeps ask the same question under other conditions, each with its own
deltas and verdict, trained with ``sweep_seeds`` x ``sweep_steps``:

- ratio sweep (``ratios``): the full real train split plus ``ratio`` x as many synthetic
  rows, for every ratio, each compared with ratio 0 (real only, always run);
- low-data regime (``real_fractions``): a stratified fraction of the real train split
  (:func:`real_subset`; a different subset per seed, nested across fractions), real only
  vs plus ``synthetic_ratio`` x as many synthetic rows as real rows kept.

Synthetic rows are drawn from one seeded permutation per class (:func:`select_synthetic`),
so larger ratios add rows to smaller ones. A run is identified by its data (real and
synthetic rows), seed and steps: a condition that coincides with another (ratio 0 and the
main ``real_only``, ``synthetic_ratio`` at fraction 1 and the main ``augmented``...) is
trained once and its result reused. Each run uses one torch thread on CPU and up to
``threads`` runs go in parallel in spawned worker processes (small networks scale far
better over runs than over intra-op threads), so the results do not depend on ``threads``.

Writes to ``paths.metrics``: ``retrain.json`` (DVC metrics; sweep results under
``ratio_sweep`` and ``low_data``), ``retrain_seeds.csv`` (DVC plot: one row per seed and
setting), ``retrain_ratios.csv`` (one row per ratio and sweep seed) and
``retrain_fractions.csv`` (one row per fraction and sweep seed, both settings); a sweep
that is off writes its CSV header only, so the DVC outputs always exist.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import multiprocessing
import pickle
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from generators.errors import DataError, SynthmedError
from generators.shards import BASE_COLUMNS, decode_table, iter_tables, read_table, write_json_atomic
from tasks import downstream
from tasks.config import PipelineConfig
from tasks.paths import PipelinePaths
from tasks.report import write_text_atomic
from tasks.runtime import setup_torch

logger = logging.getLogger(__name__)

SETTINGS = ("real_only", "augmented")
PRIMARY_METRIC = {"classification": "balanced_accuracy", "segmentation": "dice"}
BOOTSTRAP_RESAMPLES = 2000
RETRAIN_JSON = "retrain.json"
SEEDS_CSV = "retrain_seeds.csv"
RATIOS_CSV = "retrain_ratios.csv"
FRACTIONS_CSV = "retrain_fractions.csv"
#: two-sided 95% Student t critical values by degrees of freedom; a df between entries
#: uses the next smaller one (a slightly wider, conservative interval)
T95 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    11: 2.201,
    12: 2.179,
    13: 2.160,
    14: 2.145,
    15: 2.131,
    16: 2.120,
    17: 2.110,
    18: 2.101,
    19: 2.093,
    20: 2.086,
    21: 2.080,
    22: 2.074,
    23: 2.069,
    24: 2.064,
    25: 2.060,
    26: 2.056,
    27: 2.052,
    28: 2.048,
    29: 2.045,
    30: 2.042,
    40: 2.021,
    60: 2.000,
    120: 1.980,
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
        for real_pred, aug_pred in zip(outputs["real_only"], outputs["augmented"], strict=True):
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
        return {m: tuple(float(v) for v in np.nanpercentile(d / seeds, [2.5, 97.5])) for m, d in sorted(deltas.items())}
    result = {}
    n = outputs["real_only"][0][downstream.SEGMENTATION_METRICS[0]].shape[0]
    index = rng.integers(0, n, size=(resamples, n))
    for metric in downstream.SEGMENTATION_METRICS:
        per_image = np.mean(
            [aug[metric] - real[metric] for real, aug in zip(outputs["real_only"], outputs["augmented"], strict=True)],
            axis=0,
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
def allocate(total: int, weights: dict[str, int], available: dict[str, int], *, warn: bool = True) -> dict[str, int]:
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
    if short and warn:
        logger.warning("not enough filtered synthetic images for %s; using all there are", short)
    return capped


def synthetic_pool(paths: PipelinePaths) -> dict[str, list[str]]:
    """Ids of the filtered synthetic rows by class label (``""``: unlabelled), both sorted."""
    table = read_table(paths.filtered, columns=["id", "label"])
    by_class: dict[str, list[str]] = {}
    for row_id, label in zip(table.column("id").to_pylist(), table.column("label").to_pylist(), strict=True):
        by_class.setdefault("" if label is None else str(label), []).append(row_id)
    return {label: sorted(ids) for label, ids in sorted(by_class.items())}


def pick_synthetic(
    pool: dict[str, list[str]], real_labels: Sequence[str], ratio: float, seed: int, *, warn: bool = True
) -> list[str]:
    """Ids (sorted) of ``round(ratio * len(real_labels))`` pool rows stratified by class in
    the proportions of ``real_labels``, capped by what the pool holds. Within a class the
    rows are a prefix of one permutation per class (classes in sorted order, numpy
    generator seeded with ``seed``), so a larger ratio or real set only adds rows."""
    weights: dict[str, int] = {}
    for label in real_labels:
        weights[label] = weights.get(label, 0) + 1
    quota = allocate(int(round(ratio * len(real_labels))), weights, {c: len(v) for c, v in pool.items()}, warn=warn)
    rng = np.random.default_rng(seed)
    chosen: list[str] = []
    for label, ids in pool.items():
        order = rng.permutation(len(ids))
        chosen.extend(ids[i] for i in order[: quota.get(label, 0)])
    return sorted(chosen)


def select_synthetic(paths: PipelinePaths, real_labels: list[str], ratio: float, seed: int) -> list[str]:
    """:func:`pick_synthetic` from the filtered dataset at ``paths.filtered``."""
    return pick_synthetic(synthetic_pool(paths), real_labels, ratio, seed)


def real_subset(
    labels: Sequence[str], subjects: Sequence[str], fraction: float, seed: int | Sequence[int]
) -> np.ndarray:
    """Sorted int64 indices of a deterministic stratified ``fraction`` of the rows.

    By class: ``max(1, floor(fraction * n_c + 0.5))`` of the ``n_c`` rows of each class (all
    of them at fraction 1). By subject, within a class: every prefix of the ranking takes
    from each subject in proportion to its rows (systematic sampling: the j-th row, in a
    random order, of a subject with ``n_s`` rows sits at ``(j + u_s) / n_s`` with ``u_s``
    uniform in [0, 1) per subject), so a small subset spreads over as many subjects as it
    can. The ranking depends on the rows and ``seed`` only, not on ``fraction``: subsets of
    one seed are nested (a smaller fraction's subset lies inside a larger one's).
    """
    if not 0 < fraction <= 1:
        raise DataError(f"expected a real fraction in (0, 1], got {fraction}; fix retrain.real_fractions")
    if len(labels) != len(subjects):
        raise DataError(f"expected one subject per row ({len(labels)}), got {len(subjects)}")
    label_array = np.asarray(labels, dtype=str)
    subject_array = np.asarray(subjects, dtype=str)
    rng = np.random.default_rng(seed)
    keep = [np.zeros(0, np.int64)]
    for label in sorted(set(label_array.tolist())):
        rows = np.flatnonzero(label_array == label)
        names, inverse, counts = np.unique(subject_array[rows], return_inverse=True, return_counts=True)
        offset = rng.random(len(names))
        rank = np.empty(len(rows))
        for k in range(len(names)):
            members = np.flatnonzero(inverse == k)
            rank[members] = rng.permutation(len(members))
        position = (rank + offset[inverse]) / counts[inverse]
        order = rows[np.lexsort((rng.random(len(rows)), position))]
        keep.append(order[: min(len(rows), max(1, math.floor(fraction * len(rows) + 0.5)))])
    return np.sort(np.concatenate(keep)).astype(np.int64)


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


def _validation_arrays(paths: PipelinePaths, task: str, classes: list[str], wanted: bool) -> dict[str, Any]:
    """``val_images``/``val_targets`` of the real val split for model selection, or
    nothing (final weights are used) when not wanted or the split is empty."""
    if not wanted or not downstream.dataset_labels(paths.real, ["val"]):
        if wanted:
            logger.warning("retrain.select_on_val: the real val split is empty; using each run's final weights")
        return {}
    val = downstream.load_labelled(paths.real, ["val"], classes)
    if task == "classification":
        keep = val.targets >= 0  # val labels unseen in train cannot be scored
        return {"val_images": val.images[keep], "val_targets": val.targets[keep]} if keep.any() else {}
    if val.masks is None:
        logger.warning("retrain.select_on_val: real val rows have no masks; using each run's final weights")
        return {}
    return {"val_images": val.images, "val_targets": val.masks}


def _load_real(paths: PipelinePaths, task: str):
    """Real train/test, validated, and the train rows' subjects. Returns
    ``(classes, train, test, subjects)``."""
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
    shape = tuple(train.images.shape[1:])
    if tuple(test.images.shape[1:]) != shape:
        raise DataError(f"{paths.real}: expected test images of shape {shape}, got {tuple(test.images.shape[1:])}")
    if task == "classification":
        if len(classes) < 2 or (train.targets < 0).any():
            raise DataError(
                f"{paths.real}: expected a class label on every real train row and >= 2 classes, got {classes}; "
                "label the data or use retrain.task: segmentation"
            )
        unknown = sorted({label for label, t in zip(test.labels, test.targets, strict=True) if t < 0})
        if unknown:
            raise DataError(f"{paths.real}: expected test labels among the train classes {classes}, got {unknown}")
    else:
        for name, part in (("real train", train), ("real test", test)):
            if part.masks is None:
                raise DataError(
                    f"{paths.real}: expected a mask on every {name} row for segmentation, found rows without; "
                    "ingest masks, or use retrain.task: classification"
                )
    table = read_table(paths.real, columns=["id", "subject"], splits=["train"])
    subject_of = dict(zip(table.column("id").to_pylist(), table.column("subject").to_pylist(), strict=True))
    subjects = ["" if subject_of.get(i) is None else str(subject_of[i]) for i in train.ids]
    return classes, train, test, subjects


def _check_synthetic(paths: PipelinePaths, task: str, synthetic: downstream.LabelledArrays, train, classes) -> None:
    """The synthetic rows a run may use must look like the real train rows."""
    shape = tuple(train.images.shape[1:])
    if len(synthetic) and tuple(synthetic.images.shape[1:]) != shape:
        raise DataError(
            f"{paths.filtered}: expected synthetic images of shape {shape} like the real train split, "
            f"got {tuple(synthetic.images.shape[1:])}; synthesize at preprocess.size with preprocess.channels"
        )
    if task == "classification":
        unknown = sorted({label for label, t in zip(synthetic.labels, synthetic.targets, strict=True) if t < 0})
        if unknown:
            raise DataError(
                f"{paths.filtered}: expected synthetic labels among the real classes {classes}, got {unknown}; "
                "synthesize with the real dataset's labels"
            )
    elif len(synthetic) and synthetic.masks is None:
        raise DataError(
            f"{paths.filtered}: expected a mask on every synthetic row for segmentation, found rows without; "
            "set generator.train.with_masks: true, or use retrain.task: classification"
        )


# --------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class Run:
    """One training run: rows of the real train split and of the synthetic pool (sorted
    index tuples), the seed and the optimizer steps. Equal runs give equal results."""

    real: tuple[int, ...]
    synthetic: tuple[int, ...]
    seed: int
    steps: int


@dataclass(frozen=True)
class RunInputs:
    """What every run reads (sent once to each worker). Images float32 ``(N, C, H, W)`` in
    [0, 1]; targets int64 ``(N,)`` class indices or ``(N, H, W)`` mask indices."""

    cfg: PipelineConfig
    classes: tuple[str, ...]
    num_classes: int
    device: str
    train_images: np.ndarray
    train_targets: np.ndarray
    pool_images: np.ndarray
    pool_targets: np.ndarray
    test_images: np.ndarray
    test_targets: np.ndarray
    val_images: np.ndarray | None = None  # for model selection only (retrain.select_on_val)
    val_targets: np.ndarray | None = None


@dataclass(frozen=True)
class RunResult:
    """``scores``: ``{metric: float}`` on the real test split; ``output``: what the bootstrap
    resamples (classification: predicted classes int64 ``(n_test,)``; segmentation:
    ``{metric: float64 (n_test,)}`` per image); ``time_s``: wall time (logs only)."""

    scores: dict[str, float]
    output: Any
    time_s: float


def train_and_test(inputs: RunInputs, run: Run) -> RunResult:
    """Train one network on ``run``'s rows with one torch thread (CPU) and score it on the test split."""
    started = time.perf_counter()
    spec = inputs.cfg.retrain
    setup_torch(inputs.cfg, run.seed)
    if inputs.device == "cpu":
        torch.set_num_threads(1)
    real = np.asarray(run.real, dtype=np.int64)
    synthetic = np.asarray(run.synthetic, dtype=np.int64)
    images = np.concatenate([inputs.train_images[real], inputs.pool_images[synthetic]])
    targets = np.concatenate([inputs.train_targets[real], inputs.pool_targets[synthetic]])
    model = downstream.build_network(spec.task, spec.network, images.shape[1], inputs.num_classes)
    model = downstream.train_model(
        model,
        images,
        targets,
        task=spec.task,
        steps=run.steps,
        batch_size=spec.batch_size,
        lr=spec.lr,
        seed=run.seed,
        augment=spec.augment,
        device=inputs.device,
        val=None if inputs.val_images is None else (inputs.val_images, inputs.val_targets),
        eval_every=spec.eval_every,
    )
    proba = downstream.predict_proba(model, inputs.test_images, batch_size=spec.batch_size, device=inputs.device)
    if spec.task == "classification":
        scores = downstream.evaluate_classification(inputs.test_targets, proba, list(inputs.classes))
        output: Any = proba.argmax(axis=1)
        scores = {m: scores[m] for m in downstream.CLASSIFICATION_METRICS}
    else:
        output = downstream.segmentation_scores(inputs.test_targets, proba.argmax(axis=1), inputs.num_classes)
        scores = {m: float(v.mean()) for m, v in output.items()}
    return RunResult(scores=scores, output=output, time_s=time.perf_counter() - started)


_WORKER_INPUTS: RunInputs | None = None


def _init_worker(inputs_file: str) -> None:
    """Load the pickled :class:`RunInputs` this stage wrote for its own workers."""
    global _WORKER_INPUTS
    with open(inputs_file, "rb") as handle:
        _WORKER_INPUTS = pickle.load(handle)  # noqa: S301 - written by this process a moment ago


def _run_in_worker(run: Run) -> RunResult:
    if _WORKER_INPUTS is None:
        raise RuntimeError("retrain worker started without its inputs")
    return train_and_test(_WORKER_INPUTS, run)


def execute_runs(inputs: RunInputs, runs: Sequence[Run], workers: int) -> dict[Run, RunResult]:
    """Every distinct run once: in this process when ``workers <= 1``, else in ``workers``
    spawned processes (longest runs first). Results do not depend on ``workers``."""
    batch = inputs.cfg.retrain.batch_size
    queue = sorted(dict.fromkeys(runs), key=lambda r: -r.steps * min(batch, len(r.real) + len(r.synthetic)))
    results: dict[Run, RunResult] = {}

    def record(run: Run, result: RunResult) -> None:
        results[run] = result
        logger.info(
            "run %d/%d: seed %d, %d real + %d synthetic, %d steps: %s (%.1f s)",
            len(results),
            len(queue),
            run.seed,
            len(run.real),
            len(run.synthetic),
            run.steps,
            ", ".join(f"{m}={v:.4f}" for m, v in result.scores.items()),
            result.time_s,
        )

    if workers <= 1 or len(queue) <= 1:
        for run in queue:
            record(run, train_and_test(inputs, run))
        return results
    # the arrays go through a file, not the spawn pipe: a worker that dies while starting
    # then breaks the pool (an error) instead of leaving this process blocked on the pipe
    with tempfile.TemporaryDirectory(prefix="synthmed-retrain-") as tmp:
        inputs_file = Path(tmp) / "inputs.pkl"
        with open(inputs_file, "wb") as handle:
            pickle.dump(inputs, handle, protocol=pickle.HIGHEST_PROTOCOL)
        pool = ProcessPoolExecutor(
            max_workers=min(workers, len(queue)),
            mp_context=multiprocessing.get_context("spawn"),  # fork after torch started threads can hang
            initializer=_init_worker,
            initargs=(str(inputs_file),),
        )
        try:
            futures = {pool.submit(_run_in_worker, run): run for run in queue}
            for future in as_completed(futures):
                record(futures[future], future.result())
        except BrokenProcessPool as exc:
            raise SynthmedError(
                f"a retrain worker process died ({exc}); expected it to finish: check memory, and that a "
                "script calling the stage guards it with `if __name__ == '__main__':`, or set threads: 1 "
                "to train in this process"
            ) from exc
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return results


# --------------------------------------------------------------------------- results
def compare(
    task: str,
    base: Sequence[RunResult],
    other: Sequence[RunResult],
    y_true: np.ndarray,
    num_classes: int,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """Paired per-seed delta ``other - base`` per metric: t-interval over seeds plus the
    bootstrap interval over test images (see :func:`bootstrap_delta`)."""
    metrics = downstream.CLASSIFICATION_METRICS if task == "classification" else downstream.SEGMENTATION_METRICS
    outputs = {"real_only": [r.output for r in base], "augmented": [r.output for r in other]}
    boot = bootstrap_delta(task, outputs, y_true if task == "classification" else None, num_classes, seed)
    delta = {}
    for m in metrics:
        paired = [o.scores[m] - b.scores[m] for b, o in zip(base, other, strict=True)]
        delta[m] = {**t_interval(paired), "bootstrap_ci95_low": boot[m][0], "bootstrap_ci95_high": boot[m][1]}
    return delta


def _stats(results: Sequence[RunResult], metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    return {m: t_interval([r.scores[m] for r in results]) for m in metrics}


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([f"{v:.6f}" if isinstance(v, float) else v for v in row])
    return buffer.getvalue()


def _number(value: float) -> str:
    """A ratio or fraction as CSV text: ``0.5``, ``1``, ``0.25``."""
    return f"{value:g}"


# --------------------------------------------------------------------------- stage
def retrain(cfg: PipelineConfig, paths: PipelinePaths) -> dict[str, Any]:
    """Train real-only vs real+synthetic for every seed (and the configured sweeps),
    evaluate on the real test split, write ``retrain.json`` and the three CSVs; returns
    the JSON's content."""
    started = time.perf_counter()
    spec = cfg.retrain
    task = spec.task
    metrics = downstream.CLASSIFICATION_METRICS if task == "classification" else downstream.SEGMENTATION_METRICS
    primary = PRIMARY_METRIC[task]
    lower = primary in downstream.LOWER_IS_BETTER
    classes, train, test, subjects = _load_real(paths, task)
    n_train = len(train)
    sweep_seeds = list(spec.sweep_seeds or spec.seeds)
    sweep_steps = spec.sweep_steps or spec.steps
    ratios = sorted({0.0, *spec.ratios}) if spec.ratios else []
    fractions = sorted(spec.real_fractions)

    # which rows every condition trains on (synthetic as ids until the pool is loaded)
    pool_ids = synthetic_pool(paths)
    main_ids = pick_synthetic(pool_ids, train.labels, spec.synthetic_ratio, cfg.seed)
    ratio_ids = {r: pick_synthetic(pool_ids, train.labels, r, cfg.seed, warn=False) for r in ratios}
    fraction_rows: dict[tuple[float, int], tuple[np.ndarray, list[str]]] = {}
    for fraction in fractions:
        for seed in sweep_seeds:
            subset = real_subset(train.labels, subjects, fraction, (cfg.seed, seed))
            labels = [train.labels[i] for i in subset]
            fraction_rows[fraction, seed] = (
                subset,
                pick_synthetic(pool_ids, labels, spec.synthetic_ratio, cfg.seed, warn=False),
            )
    wanted = set(main_ids).union(*ratio_ids.values(), *(ids for _, ids in fraction_rows.values()))
    pool = load_rows(paths, sorted(wanted), classes)
    _check_synthetic(paths, task, pool, train, classes)
    position = {row_id: i for i, row_id in enumerate(pool.ids)}

    def rows_of(ids: list[str]) -> tuple[int, ...]:
        return tuple(sorted(position[i] for i in ids))

    if task == "classification":
        train_y, test_y, pool_y = train.targets, test.targets, pool.targets
        num_classes = len(classes)
    else:
        train_y, test_y = train.masks, test.masks
        pool_y = pool.masks if len(pool) else np.zeros((0, *train.masks.shape[1:]), np.int64)
        num_classes = max(2, int(max(train_y.max(), test_y.max(), pool_y.max() if len(pool) else 0)) + 1)
    device = setup_torch(cfg)
    inputs = RunInputs(
        cfg=cfg,
        classes=tuple(classes),
        num_classes=num_classes,
        device=device,
        train_images=train.images,
        train_targets=train_y,
        pool_images=pool.images if len(pool) else np.zeros((0, *train.images.shape[1:]), np.float32),
        pool_targets=pool_y.astype(np.int64),
        test_images=test.images,
        test_targets=test_y,
        **_validation_arrays(paths, task, classes, spec.select_on_val),
    )

    everything = tuple(range(n_train))
    main = {
        (setting, seed): Run(everything, rows_of(main_ids) if setting == "augmented" else (), seed, spec.steps)
        for seed in spec.seeds
        for setting in SETTINGS
    }
    ratio_runs = {
        (r, seed): Run(everything, rows_of(ratio_ids[r]), seed, sweep_steps) for r in ratios for seed in sweep_seeds
    }
    fraction_runs = {
        (fraction, seed, setting): Run(
            tuple(int(i) for i in subset), rows_of(ids) if setting == "augmented" else (), seed, sweep_steps
        )
        for (fraction, seed), (subset, ids) in fraction_rows.items()
        for setting in SETTINGS
    }
    requested = [*main.values(), *ratio_runs.values(), *fraction_runs.values()]
    workers = max(1, cfg.threads) if device == "cpu" else 1
    logger.info(
        "retrain %s/%s: %d real train + %d synthetic (ratio %g), %d test; %d steps x batch %d, seeds %s; "
        "ratios %s, real fractions %s (sweeps: seeds %s, %d steps); %d distinct runs of %d on %d worker(s)",
        task,
        spec.network,
        n_train,
        len(main_ids),
        spec.synthetic_ratio,
        len(test),
        spec.steps,
        spec.batch_size,
        list(spec.seeds),
        ratios,
        fractions,
        sweep_seeds,
        sweep_steps,
        len(set(requested)),
        len(requested),
        min(workers, len(set(requested))),
    )
    results = execute_runs(inputs, requested, workers)

    def compared(base: list[Run], other: list[Run]) -> tuple[dict[str, Any], str]:
        delta = compare(task, [results[r] for r in base], [results[r] for r in other], test_y, num_classes, cfg.seed)
        return delta, decide(delta[primary], lower)

    per_setting = {s: [results[main[s, seed]] for seed in spec.seeds] for s in SETTINGS}
    delta, verdict = compared([main["real_only", s] for s in spec.seeds], [main["augmented", s] for s in spec.seeds])
    csv_rows = [
        [seed, s, *(results[main[s, seed]].scores[m] for m in metrics)] for seed in spec.seeds for s in SETTINGS
    ]

    ratio_conditions = []
    for r in ratios:
        runs = [ratio_runs[r, seed] for seed in sweep_seeds]
        condition: dict[str, Any] = {
            "ratio": r,
            "n_real": n_train,
            "n_synthetic": len(ratio_ids[r]),
            "n_synthetic_requested": int(round(r * n_train)),
            "effective_ratio": len(ratio_ids[r]) / n_train,
            "metrics": _stats([results[run] for run in runs], metrics),
            "delta": None,
            "verdict": None,
        }
        if r > 0:
            condition["delta"], condition["verdict"] = compared([ratio_runs[0.0, seed] for seed in sweep_seeds], runs)
        ratio_conditions.append(condition)
    ratio_csv = [
        [_number(r), seed, n_train, len(ratio_ids[r]), *(results[ratio_runs[r, seed]].scores[m] for m in metrics)]
        for r in ratios
        for seed in sweep_seeds
    ]

    fraction_conditions = []
    fraction_csv = []
    for fraction in fractions:
        base = [fraction_runs[fraction, seed, "real_only"] for seed in sweep_seeds]
        other = [fraction_runs[fraction, seed, "augmented"] for seed in sweep_seeds]
        condition_delta, condition_verdict = compared(base, other)
        subset, ids = fraction_rows[fraction, sweep_seeds[0]]  # sizes do not depend on the seed
        fraction_conditions.append(
            {
                "fraction": fraction,
                "n_real": len(subset),
                "n_synthetic": len(ids),
                "n_synthetic_requested": int(round(spec.synthetic_ratio * len(subset))),
                "real_only": _stats([results[r] for r in base], metrics),
                "augmented": _stats([results[r] for r in other], metrics),
                "delta": condition_delta,
                "verdict": condition_verdict,
            }
        )
        for seed, b, o in zip(sweep_seeds, base, other, strict=True):
            fraction_csv.append(
                [
                    _number(fraction),
                    seed,
                    len(b.real),
                    len(o.synthetic),
                    *(results[b].scores[m] for m in metrics),
                    *(results[o].scores[m] for m in metrics),
                ]
            )

    syn_counts: dict[str, int] = {}
    for row_id in main_ids:
        label = pool.labels[position[row_id]]
        syn_counts[label] = syn_counts.get(label, 0) + 1
    summary = downstream.round_floats(
        {
            "task": task,
            "network": spec.network,
            "primary_metric": primary,
            "lower_is_better": sorted(m for m in metrics if m in downstream.LOWER_IS_BETTER),
            "real_only": _stats(per_setting["real_only"], metrics),
            "augmented": _stats(per_setting["augmented"], metrics),
            "delta": delta,
            "verdict": verdict,
            "seeds": list(spec.seeds),
            "steps": spec.steps,
            "batch_size": spec.batch_size,
            "lr": spec.lr,
            "n_val_for_selection": 0 if inputs.val_images is None else int(len(inputs.val_images)),
            "eval_every": spec.eval_every,
            "synthetic_ratio": spec.synthetic_ratio,
            "n_real_train": n_train,
            "n_synthetic_used": len(main_ids),
            "n_test": len(test),
            "synthetic_used_per_class": dict(sorted(syn_counts.items())),
            "classes": classes,
            "num_classes": num_classes,
            "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
            "ratio_sweep": {
                "seeds": sweep_seeds if ratios else [],
                "steps": sweep_steps,
                "baseline_ratio": 0.0,
                "conditions": ratio_conditions,
            },
            "low_data": {
                "seeds": sweep_seeds if fractions else [],
                "steps": sweep_steps,
                "synthetic_ratio": spec.synthetic_ratio,
                "conditions": fraction_conditions,
            },
            "runs_requested": len(requested),
            "runs_trained": len(set(requested)),
        }
    )
    paths.metrics.mkdir(parents=True, exist_ok=True)
    write_json_atomic(summary, paths.metrics / RETRAIN_JSON)
    write_text_atomic(_csv(["seed", "setting", *metrics], csv_rows), paths.metrics / SEEDS_CSV)
    write_text_atomic(_csv(["ratio", "seed", "n_real", "n_synthetic", *metrics], ratio_csv), paths.metrics / RATIOS_CSV)
    fraction_header = ["fraction", "seed", "n_real", "n_synthetic", *(f"{s}_{m}" for s in SETTINGS for m in metrics)]
    write_text_atomic(_csv(fraction_header, fraction_csv), paths.metrics / FRACTIONS_CSV)
    d = summary["delta"][primary]
    logger.info(
        "retrain: %s delta %.4f (seeds CI %s..%s, bootstrap CI %.4f..%.4f): %s; %s; %d runs trained in %.1f s",
        primary,
        d["mean"],
        d["ci95_low"],
        d["ci95_high"],
        d["bootstrap_ci95_low"],
        d["bootstrap_ci95_high"],
        verdict,
        "; ".join(
            [f"ratio {_number(c['ratio'])}: {c['verdict']}" for c in ratio_conditions if c["verdict"]]
            + [f"fraction {_number(c['fraction'])}: {c['verdict']}" for c in fraction_conditions]
        )
        or "no sweeps",
        len(set(requested)),
        time.perf_counter() - started,
    )
    return summary
