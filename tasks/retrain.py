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
(test-set noise). The verdict follows one rule, :data:`tasks.statistics.VERDICT_RULE`
(written into ``retrain.json`` as ``verdict_rule``): ``helped`` / ``hurt`` only when both
intervals lie above / below 0 on the primary metric, else ``no measurable effect``. Beside
it, ``power`` gives the minimum detectable effect (half-width of the wider interval) and a
sentence a report prints.

The comparison is not made, and the verdict says so, when it would mean nothing:

- ``not tested: no synthetic images reached the retrain``: no filtered synthetic row was
  chosen (e.g. the filter dropped all of them); the augmented runs are not trained;
- ``not tested: too little data``: ``tasks.preflight.preflight`` (when installed) found
  too few images per class and split, and the user opted in to go on anyway; its problems
  are copied under ``preflight``.

Two optional sweeps ask the same question under other conditions, each with its own
deltas, verdict and power, trained with ``sweep_seeds`` x ``sweep_steps``:

- ratio sweep (``ratios``): the full real train split plus ``ratio`` x as many synthetic
  rows, for every ratio, each compared with ratio 0 (real only, always run);
- low-data regime (``real_fractions``): a stratified fraction of the real train split
  (:func:`tasks.retrain_data.real_subset`; a different subset per seed, nested across
  fractions), real only vs plus ``synthetic_ratio`` x as many synthetic rows as real rows kept.

Synthetic rows are drawn from one seeded permutation per class
(:func:`tasks.retrain_data.pick_synthetic`), so larger ratios add rows to smaller ones. A
run is identified by its data, seed and steps (:class:`tasks.retrain_runs.Run`): a
condition that coincides with another is trained once and its result reused; runs go in
parallel in spawned workers (:func:`tasks.retrain_runs.execute_runs`), so the results do
not depend on ``threads``. Statistics live in :mod:`tasks.statistics`.

Volumes (``preprocess.dims: 3``; real rows ``(1, D, H, W)``): the same comparison with
3D networks trained on random crops of ``retrain.roi_size`` and test volumes (which may be
larger than the train rows) segmented with a gaussian sliding window (``retrain.sw_overlap``);
Dice and HD95 (voxels) are means over the foreground classes, and ``retrain.json`` gains a
``volumes`` block (:func:`volumes_block`): shapes, roi, overlap, whether the rows are
patches of one subject (copied from the real manifest), and per-class Dice/HD95 per setting.
The statements then count test volumes.

Writes to ``paths.metrics`` (DVC outputs kept in git, tasks/stages.py): ``retrain.json``
(what the report reads; sweep results under ``ratio_sweep`` and ``low_data``),
``retrain_seeds.csv`` (one row per seed and setting), ``retrain_ratios.csv`` (one row per
ratio and sweep seed) and
``retrain_fractions.csv`` (one row per fraction and sweep seed, both settings; empty
cells for runs not trained); a sweep that is off writes its CSV header only, so the DVC
outputs always exist.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from generators.shards import write_json_atomic
from tasks import downstream, statistics
from tasks.config import PipelineConfig
from tasks.paths import PipelinePaths
from tasks.report import write_text_atomic
from tasks.retrain_data import (
    check_synthetic,
    load_real,
    load_rows,
    mask_class_names,
    pick_synthetic,
    real_subset,
    synthetic_pool,
    validation_arrays,
    volume_provenance,
)
from tasks.retrain_runs import Run, RunInputs, RunMap, RunResult, execute_runs, volume_roi
from tasks.runtime import setup_torch

logger = logging.getLogger(__name__)

SETTINGS = ("real_only", "augmented")
PRIMARY_METRIC = {"classification": "balanced_accuracy", "segmentation": "dice"}
BOOTSTRAP_RESAMPLES = statistics.BOOTSTRAP_RESAMPLES
RETRAIN_JSON = "retrain.json"
SEEDS_CSV = "retrain_seeds.csv"
RATIOS_CSV = "retrain_ratios.csv"
FRACTIONS_CSV = "retrain_fractions.csv"


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
    bootstrap interval over test images (see :func:`tasks.statistics.bootstrap_delta`)."""
    metrics = statistics.CLASSIFICATION_METRICS if task == "classification" else statistics.SEGMENTATION_METRICS
    outputs = {"real_only": [r.output for r in base], "augmented": [r.output for r in other]}
    boot = statistics.bootstrap_delta(task, outputs, y_true if task == "classification" else None, num_classes, seed)
    delta = {}
    for m in metrics:
        paired = [o.scores[m] - b.scores[m] for b, o in zip(base, other, strict=True)]
        delta[m] = {
            **statistics.t_interval(paired),
            "bootstrap_ci95_low": boot[m][0],
            "bootstrap_ci95_high": boot[m][1],
        }
    return delta


def untested_delta(metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The delta of a comparison that was not made: every number None (reports print n/a)."""
    return {
        m: {
            "mean": None,
            "ci95_low": None,
            "ci95_high": None,
            "per_seed": [],
            "bootstrap_ci95_low": None,
            "bootstrap_ci95_high": None,
        }
        for m in metrics
    }


def untested_stats(metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The scores of a setting that was not trained: every number None."""
    return {m: {"mean": None, "ci95_low": None, "ci95_high": None, "per_seed": []} for m in metrics}


def run_preflight(cfg: PipelineConfig, paths: PipelinePaths) -> dict[str, Any] | None:
    """``{"passed": bool, "problems": [str, ...]}`` from ``tasks.preflight.preflight`` (which
    raises DataError on too little data unless the user opted in), or None when that
    module is not installed."""
    try:
        from tasks.preflight import preflight
    except ModuleNotFoundError as exc:
        if exc.name != "tasks.preflight":
            raise
        return None
    result = preflight(cfg, paths)
    return {"passed": bool(result["passed"]), "problems": [str(p) for p in result.get("problems", [])]}


def _stats(results: Sequence[RunResult], metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    return {m: statistics.t_interval([r.scores[m] for r in results]) for m in metrics}


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


@dataclass(frozen=True)
class Comparison:
    """How every condition is judged: ``other`` runs vs ``base`` runs (same seeds, in
    order) on the real test split, under :data:`tasks.statistics.VERDICT_RULE`.
    ``y_true``: the test targets (int64 ``(n_test,)`` classes or ``(n_test, H, W)`` masks);
    ``untested``: a verdict that replaces every judgement (too little data), else None;
    ``unit``: what a test row is in the power statements (``"volumes"`` for 3D data)."""

    task: str
    primary: str
    y_true: np.ndarray
    num_classes: int
    seed: int
    untested: str | None
    unit: str = "images"

    @property
    def metrics(self) -> tuple[str, ...]:
        return statistics.CLASSIFICATION_METRICS if self.task == "classification" else statistics.SEGMENTATION_METRICS

    def judge(
        self, base: Sequence[RunResult], other: Sequence[RunResult] | None
    ) -> tuple[dict[str, Any], str, dict[str, Any]]:
        """``(delta, verdict, power)``; ``other`` None: no synthetic row reached the runs,
        so nothing is compared ("not tested")."""
        n_test, n_seeds = int(self.y_true.shape[0]), len(base)
        if other is None:
            verdict = self.untested or statistics.NOT_TESTED_NO_SYNTHETIC
            return (
                untested_delta(self.metrics),
                verdict,
                statistics.power(None, verdict, self.primary, n_test, n_seeds, self.unit),
            )
        delta = compare(self.task, base, other, self.y_true, self.num_classes, self.seed)
        verdict = self.untested or statistics.decide(delta[self.primary], self.primary in statistics.LOWER_IS_BETTER)
        if verdict == statistics.NO_EFFECT and statistics.at_ceiling(
            self.primary, [r.scores[self.primary] for r in base]
        ):
            verdict = statistics.NOT_TESTED_CEILING  # "no effect, could detect 0.000" would mislead
        return delta, verdict, statistics.power(delta[self.primary], verdict, self.primary, n_test, n_seeds, self.unit)

    def ratio_condition(
        self, ratio: float, results: dict[float, list[RunResult]], n_synthetic: int, n_real: int
    ) -> dict[str, Any]:
        """One ratio of the ratio sweep, compared with ratio 0 (``results[0.0]``; ratio 0
        itself: no delta, verdict or power)."""
        condition: dict[str, Any] = {
            "ratio": ratio,
            "n_real": n_real,
            "n_synthetic": n_synthetic,
            "n_synthetic_requested": int(round(ratio * n_real)),
            "effective_ratio": n_synthetic / n_real,
            "metrics": _stats(results[ratio], self.metrics),
            "delta": None,
            "verdict": None,
            "power": None,
        }
        if ratio > 0:
            delta, condition["verdict"], condition["power"] = self.judge(
                results[0.0], results[ratio] if n_synthetic else None
            )
            condition["delta"] = delta if n_synthetic else None
        return condition

    def fraction_condition(self, base: list[RunResult], other: list[RunResult] | None) -> dict[str, Any]:
        """Both settings, delta, verdict and power of one real fraction of the low-data regime."""
        delta, verdict, power = self.judge(base, other)
        return {
            "real_only": _stats(base, self.metrics),
            "augmented": _stats(other, self.metrics) if other else untested_stats(self.metrics),
            "delta": delta,
            "verdict": verdict,
            "power": power,
        }


def per_class_block(
    names: Sequence[str], metrics: Sequence[str], base: Sequence[RunResult], other: Sequence[RunResult] | None
) -> dict[str, Any]:
    """Per foreground class (``names``, mask classes 1..K-1): each setting's t-interval over
    seeds of the class's mean Dice/HD95 over test volumes, and the paired per-seed delta
    ``augmented - real_only`` (t-interval only; the verdict is on the class mean). A setting
    not trained: every number None."""

    def stats(results: Sequence[RunResult]) -> dict[str, Any]:
        return {
            name: {m: statistics.t_interval([r.per_class[m][k] for r in results]) for m in metrics}
            for k, name in enumerate(names)
        }

    if other is None:
        untested = {name: untested_stats(metrics) for name in names}
        return {"real_only": stats(base), "augmented": untested, "delta": untested}
    delta = {
        name: {
            m: statistics.t_interval([o.per_class[m][k] - b.per_class[m][k] for b, o in zip(base, other, strict=True)])
            for m in metrics
        }
        for k, name in enumerate(names)
    }
    return {"real_only": stats(base), "augmented": stats(other), "delta": delta}


def _volume_augmentation(spec: Any) -> str:
    """What :func:`tasks.downstream.augment_volumes` does with ``retrain.augment``, in words."""
    if spec is None or max(spec.hflip_p, spec.brightness_contrast_p) == 0:
        return "random crops of roi_size only"
    limit = downstream.INTENSITY_LIMIT
    return (
        f"random crops of roi_size; a flip along each axis with probability {spec.hflip_p:g}; intensity "
        f"x * a + b (a in [{1 - limit:g}, {1 + limit:g}], b in [{-limit:g}, {limit:g}], image only) with "
        f"probability {spec.brightness_contrast_p:g}; no rotation"
    )


def volumes_block(
    paths: PipelinePaths,
    inputs: RunInputs,
    roi: Sequence[int],
    metrics: Sequence[str],
    base: Sequence[RunResult],
    other: Sequence[RunResult] | None,
) -> dict[str, Any]:
    """What a reader of a 3D comparison needs beside the scores: ``dims``; ``train_shape``,
    ``eval_shape`` (test) and ``val_shape`` (D, H, W; val None without selection);
    ``roi_size`` (training crops and sliding window), ``sw_overlap``, ``sw_mode``;
    ``spacing_mm`` and ``patches_of_one_subject`` (copied from the real manifest provenance,
    None when ingest did not record them: True means the rows are cubes of one volume, not
    independent subjects); ``hd95_unit``; ``augmentation`` (what the 3D augmentation does);
    segmentation: ``classes`` (foreground mask class names) and ``per_class``
    (:func:`per_class_block` of the main comparison), else None."""
    provenance = volume_provenance(paths)
    segmentation = inputs.cfg.retrain.task == "segmentation"
    names = mask_class_names(provenance, inputs.num_classes) if segmentation else None
    spacing = provenance.get("spacing_mm")
    return {
        "dims": 3,
        "train_shape": [int(v) for v in inputs.train_images.shape[2:]],
        "eval_shape": [int(v) for v in inputs.test_images.shape[2:]],
        "val_shape": None if inputs.val_images is None else [int(v) for v in inputs.val_images.shape[2:]],
        "roi_size": [int(v) for v in roi],
        "sw_overlap": float(inputs.cfg.retrain.sw_overlap),
        "sw_mode": "gaussian",
        "spacing_mm": None if spacing is None else [float(v) for v in spacing],
        "patches_of_one_subject": (
            None if provenance.get("patches_of_one_subject") is None else bool(provenance["patches_of_one_subject"])
        ),
        "hd95_unit": "voxels",
        "augmentation": _volume_augmentation(inputs.cfg.retrain.augment),
        "classes": names,
        "per_class": per_class_block(names, metrics, base, other) if segmentation else None,
    }


def _run_inputs(cfg: PipelineConfig, paths: PipelinePaths, classes: list[str], train, test, pool) -> RunInputs:
    """What every run reads: the real train/test arrays, the chosen synthetic rows and the
    val split for model selection; targets are class indices or masks by task."""
    if cfg.retrain.task == "classification":
        train_y, test_y, pool_y = train.targets, test.targets, pool.targets
        num_classes = len(classes)
    else:
        train_y, test_y = train.masks, test.masks
        pool_y = pool.masks if len(pool) else np.zeros((0, *train.masks.shape[1:]), np.int64)
        num_classes = max(2, int(max(train_y.max(), test_y.max(), pool_y.max() if len(pool) else 0)) + 1)
    return RunInputs(
        cfg=cfg,
        classes=tuple(classes),
        num_classes=num_classes,
        device=setup_torch(cfg),
        train_images=train.images,
        train_targets=train_y,
        pool_images=pool.images if len(pool) else np.zeros((0, *train.images.shape[1:]), np.float32),
        pool_targets=pool_y.astype(np.int64),
        test_images=test.images,
        test_targets=test_y,
        **validation_arrays(paths, cfg.retrain.task, classes, cfg.retrain.select_on_val),
    )


def _write(
    paths: PipelinePaths,
    summary: dict[str, Any],
    metrics: Sequence[str],
    seed_rows: list[list[Any]],
    ratio_rows: list[list[Any]],
    fraction_rows: list[list[Any]],
) -> None:
    """``retrain.json`` and the three CSVs under ``paths.metrics``."""
    paths.metrics.mkdir(parents=True, exist_ok=True)
    write_json_atomic(summary, paths.metrics / RETRAIN_JSON)
    write_text_atomic(_csv(["seed", "setting", *metrics], seed_rows), paths.metrics / SEEDS_CSV)
    write_text_atomic(
        _csv(["ratio", "seed", "n_real", "n_synthetic", *metrics], ratio_rows), paths.metrics / RATIOS_CSV
    )
    fraction_header = ["fraction", "seed", "n_real", "n_synthetic", *(f"{s}_{m}" for s in SETTINGS for m in metrics)]
    write_text_atomic(_csv(fraction_header, fraction_rows), paths.metrics / FRACTIONS_CSV)


# --------------------------------------------------------------------------- stage
def retrain(cfg: PipelineConfig, paths: PipelinePaths, run_many: RunMap | None = None) -> dict[str, Any]:
    """Train real-only vs real+synthetic for every seed (and the configured sweeps),
    evaluate on the real test split, write ``retrain.json`` and the three CSVs; returns
    the JSON's content. ``run_many`` (optional) trains the runs elsewhere, e.g. on a
    Dask cluster (``flows/scaleout.py``); the results do not depend on where."""
    started = time.perf_counter()
    preflight = run_preflight(cfg, paths)
    untested = statistics.NOT_TESTED_TOO_LITTLE_DATA if preflight is not None and not preflight["passed"] else None
    spec = cfg.retrain
    task = spec.task
    metrics = statistics.CLASSIFICATION_METRICS if task == "classification" else statistics.SEGMENTATION_METRICS
    primary = PRIMARY_METRIC[task]
    classes, train, test, subjects = load_real(paths, task)
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
    check_synthetic(paths, task, pool, train, classes)
    position = {row_id: i for i, row_id in enumerate(pool.ids)}

    def rows_of(ids: list[str]) -> tuple[int, ...]:
        return tuple(sorted(position[i] for i in ids))

    inputs = _run_inputs(cfg, paths, classes, train, test, pool)
    roi = volume_roi(inputs)  # volumes: checked here, before any training

    # a condition without synthetic rows is not trained twice: its augmented runs would
    # be its real-only runs, and comparing those with themselves tests nothing
    everything = tuple(range(n_train))
    main_settings = SETTINGS if main_ids else ("real_only",)
    main = {
        (setting, seed): Run(everything, rows_of(main_ids) if setting == "augmented" else (), seed, spec.steps)
        for seed in spec.seeds
        for setting in main_settings
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
        if setting == "real_only" or ids
    }
    requested = [*main.values(), *ratio_runs.values(), *fraction_runs.values()]
    workers = max(1, cfg.threads) if inputs.device == "cpu" else 1
    logger.info(
        "retrain %s/%s: %d real train + %d synthetic (ratio %g), %d test; %d steps x batch %d, seeds %s; "
        "ratios %s, real fractions %s (sweeps: seeds %s, %d steps); %d distinct runs of %d on %s",
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
        "the task runner's workers" if run_many else f"{min(workers, len(set(requested)))} worker(s)",
    )
    results = execute_runs(inputs, requested, workers, run_many, shared_dir=paths.state / "shared")

    comparison = Comparison(
        task,
        primary,
        inputs.test_targets,
        inputs.num_classes,
        cfg.seed,
        untested,
        "images" if roi is None else "volumes",
    )
    real_main = [results[main["real_only", s]] for s in spec.seeds]
    aug_main = [results[main["augmented", s]] for s in spec.seeds] if main_ids else None
    delta, verdict, main_power = comparison.judge(real_main, aug_main)
    csv_rows = [
        [seed, s, *(results[main[s, seed]].scores[m] for m in metrics)]
        for seed in spec.seeds
        for s in SETTINGS
        if (s, seed) in main
    ]

    ratio_results = {r: [results[ratio_runs[r, seed]] for seed in sweep_seeds] for r in ratios}
    ratio_conditions = [comparison.ratio_condition(r, ratio_results, len(ratio_ids[r]), n_train) for r in ratios]
    ratio_csv = [
        [_number(r), seed, n_train, len(ratio_ids[r]), *(results[ratio_runs[r, seed]].scores[m] for m in metrics)]
        for r in ratios
        for seed in sweep_seeds
    ]

    fraction_conditions = []
    fraction_csv = []
    for fraction in fractions:
        subset, ids = fraction_rows[fraction, sweep_seeds[0]]  # sizes do not depend on the seed
        base = [fraction_runs[fraction, seed, "real_only"] for seed in sweep_seeds]
        other = [fraction_runs[fraction, seed, "augmented"] for seed in sweep_seeds] if ids else None
        condition = comparison.fraction_condition(
            [results[r] for r in base], None if other is None else [results[r] for r in other]
        )
        fraction_conditions.append(
            {
                "fraction": fraction,
                "n_real": len(subset),
                "n_synthetic": len(ids),
                "n_synthetic_requested": int(round(spec.synthetic_ratio * len(subset))),
                **condition,
            }
        )
        for i, (seed, b) in enumerate(zip(sweep_seeds, base, strict=True)):
            o = other[i] if other else None
            fraction_csv.append(
                [
                    _number(fraction),
                    seed,
                    len(b.real),
                    len(o.synthetic) if o else 0,
                    *(results[b].scores[m] for m in metrics),
                    *(results[o].scores[m] if o else "" for m in metrics),
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
            "lower_is_better": sorted(m for m in metrics if m in statistics.LOWER_IS_BETTER),
            "real_only": _stats(real_main, metrics),
            "augmented": _stats(aug_main, metrics) if aug_main else untested_stats(metrics),
            "delta": delta,
            "verdict": verdict,
            "verdict_rule": statistics.VERDICT_RULE,
            "power": main_power,
            "preflight": preflight,
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
            "num_classes": inputs.num_classes,
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
            **({} if roi is None else {"volumes": volumes_block(paths, inputs, roi, metrics, real_main, aug_main)}),
        }
    )
    _write(paths, summary, metrics, csv_rows, ratio_csv, fraction_csv)
    logger.info(
        "retrain: %s; %s; %d runs trained in %.1f s",
        main_power["statement"],
        "; ".join(
            [f"ratio {_number(c['ratio'])}: {c['verdict']}" for c in ratio_conditions if c["verdict"]]
            + [f"fraction {_number(c['fraction'])}: {c['verdict']}" for c in fraction_conditions]
        )
        or "no sweeps",
        len(set(requested)),
        time.perf_counter() - started,
    )
    return summary
