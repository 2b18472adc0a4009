"""The headline of a run, for DVC: ``metrics/<pipeline>/summary.json`` (the pipeline's only
DVC metrics file) and the small CSV files of its DVC plots, written by the report stage.

``quality.json`` and ``retrain.json`` hold every number a report needs (hundreds of nested
keys); declared as DVC metrics they made ``dvc exp show`` 400 columns wide. They stay
outputs the report reads. ``summary.json`` holds one object named after the pipeline
(``{"demo": {...}}``, so DVC's columns read ``demo.delta`` and stay unique when several
pipelines' summaries are shown together) with about a dozen keys with short names, values
rounded to 4 decimals, written in this order (not sorted): DVC shows metric columns in
the file's order, so the verdict, the delta with its interval and the two-sample AUC come
first, right after the experiment name (and the first screen of a plain ``dvc exp show``
holds them). ``dvc metrics diff`` prints one line per changed number;
``synthmed exp-show`` (flows/experiments.py) is the ``dvc exp show`` view that fits a
160-column terminal:

- ``verdict``: the report's verdict (``REJECTED`` when the quality gate failed, else the
  retrain verdict, e.g. ``no measurable effect``); ``metric``: the primary metric;
- ``delta``, ``delta_lo``, ``delta_hi``: augmented minus real only on the primary metric,
  mean over seeds with its 95% t-interval over seeds (None with one seed; the bootstrap
  interval over test images is in ``retrain.json`` and the report);
- ``real``, ``aug``: the primary metric's mean over seeds, real only and real + synthetic;
- ``auc``: two-sample AUC of kept synthetic vs real train (0.5 = indistinguishable);
  ``fid``: FID of the kept set on the set-metrics extractor named in ``extractor`` (not the
  label filter's classifier when the extractor is independent);
- ``kept``: fraction of generated images the filters kept; ``n_real``, ``n_syn``: real
  train images and synthetic images the augmented runs used (``n_syn``);
- ``generator``: the generator's ``id@version``.

A value that was not measured is ``null``. The plot files (``metrics/<p>/plots/``), one row
per point: ``ratio_sweep.csv`` (``ratio``, primary metric ``mean`` / ``lo`` / ``hi``),
``low_data.csv`` (``fraction``, ``real`` / ``real_lo`` / ``real_hi``, ``augmented`` /
``augmented_lo`` / ``augmented_hi``), ``realism.csv`` (``class``, ``auc``, ``lo``, ``hi``;
``overall`` first) and ``training.csv`` (``epoch`` and the generator's losses,
:data:`TRAINING_LOSSES`). Each file is written on every run, with a header and no rows
when there is nothing to plot, so DVC always finds the outputs it was promised.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

from tasks.config import PipelineConfig
from tasks.paths import PipelinePaths

log = logging.getLogger(__name__)

SUMMARY_NAME = "summary.json"
PLOTS_DIR = "plots"
RATIO_CSV = "ratio_sweep.csv"
LOW_DATA_CSV = "low_data.csv"
REALISM_CSV = "realism.csv"
TRAINING_CSV = "training.csv"
DIGITS = 4
#: per-epoch loss columns of ``history.csv`` by architecture (generators/architectures/*);
#: an architecture not listed (the controls, which do not train) gets ``loss``
TRAINING_LOSSES: dict[str, tuple[str, ...]] = {
    "cgan": ("loss_d", "loss_g"),
    "dcgan": ("loss_d", "loss_g"),
    "pix2pix": ("loss_d", "loss_g", "loss_l1"),
    "vae": ("loss", "loss_recon", "loss_kl"),
    "ddpm": ("loss",),
    "ldm": ("loss",),
}


#: the DVC plot ids of a pipeline ``p`` are ``p/<name>`` (:func:`plot_definitions`)
PLOT_NAMES = ("ratio-sweep", "low-data", "realism", "training")


def plot_ids(pipeline: str) -> list[str]:
    """``dvc plots`` targets of one pipeline, in :func:`plot_definitions`'s order."""
    return [f"{pipeline}/{name}" for name in PLOT_NAMES]


def summary_path(paths: PipelinePaths) -> Path:
    return paths.metrics / SUMMARY_NAME


def plot_paths(paths: PipelinePaths) -> list[Path]:
    """The four plot files, in the order of :func:`plot_definitions`."""
    return [paths.metrics / PLOTS_DIR / name for name in (RATIO_CSV, LOW_DATA_CSV, REALISM_CSV, TRAINING_CSV)]


def outputs(paths: PipelinePaths) -> list[Path]:
    """Everything this module writes: ``summary.json`` then the plot files."""
    return [summary_path(paths), *plot_paths(paths)]


def training_losses(cfg: PipelineConfig) -> tuple[str, ...]:
    """The loss columns of ``training.csv`` for this pipeline's generator."""
    train = cfg.generator.train
    return TRAINING_LOSSES.get(train.architecture, ("loss",)) if train is not None else ("loss",)


def plot_definitions(cfg: PipelineConfig, paths: PipelinePaths) -> list[dict[str, Any]]:
    """Top-level ``plots:`` entries of ``dvc.yaml`` (paths relative to the project root):
    each names its file, axes, template and title, so ``dvc plots show`` / ``dvc plots
    diff`` draw them without further settings. An interval is drawn as its two bounds."""
    ratio, low, realism, training = (p.relative_to(paths.root).as_posix() for p in plot_paths(paths))
    metric = "primary metric"  # retrain.json names it (summary.json: ``metric``)
    name = paths.pipeline
    return [
        {
            f"{name}/{PLOT_NAMES[0]}": {
                "title": f"{name}: {metric} vs synthetic:real ratio",
                "template": "linear",
                "x": "ratio",
                "y": {ratio: ["mean", "lo", "hi"]},
                "x_label": "synthetic:real ratio",
                "y_label": f"{metric} (mean, 95% CI over seeds)",
            }
        },
        {
            f"{name}/{PLOT_NAMES[1]}": {
                "title": f"{name}: real only vs real + synthetic, low-data regime",
                "template": "linear",
                "x": "fraction",
                "y": {low: ["real", "real_lo", "real_hi", "augmented", "augmented_lo", "augmented_hi"]},
                "x_label": "fraction of the real train split",
                "y_label": f"{metric} (mean, 95% CI over seeds)",
            }
        },
        {
            f"{name}/{PLOT_NAMES[2]}": {
                "title": f"{name}: two-sample AUC per class",
                "template": "bar_horizontal",
                "x": "auc",
                "y": {realism: "class"},
                "x_label": "two-sample AUC (0.5 = indistinguishable)",
                "y_label": "class",
            }
        },
        {
            f"{name}/{PLOT_NAMES[3]}": {
                "title": f"{name}: generator training losses",
                "template": "linear",
                "x": "epoch",
                "y": {training: list(training_losses(cfg))},
                "x_label": "epoch",
                "y_label": "loss",
            }
        },
    ]


def _num(value: Any) -> float | int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return round(value, DIGITS) if value == value and abs(value) != float("inf") else None
    return None


def _get(block: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(block, dict):
            return None
        block = block.get(key)
    return block


def build_summary(
    verdict: str, quality: dict[str, Any] | None, retrain: dict[str, Any] | None, generator: str | None
) -> dict[str, Any]:
    """The flat headline dict (module docstring) from the parsed ``quality.json`` and
    ``retrain.json`` (either may be None: not run, or left out for a rejected set)."""
    quality, retrain = quality or {}, retrain or {}
    primary = retrain.get("primary_metric")
    delta = _get(retrain, "delta", primary) if primary else None
    kept = _get(quality, "set_metrics", "sets", "kept", "overall")
    return {  # this order is the order of DVC's columns: the answer first
        "verdict": verdict,
        "delta": _num(_get(delta, "mean")),
        "delta_lo": _num(_get(delta, "ci95_low")),
        "delta_hi": _num(_get(delta, "ci95_high")),
        "auc": _num(_get(quality, "realism", "two_sample", "auc")),
        "metric": primary,
        "real": _num(_get(retrain, "real_only", primary, "mean")) if primary else None,
        "aug": _num(_get(retrain, "augmented", primary, "mean")) if primary else None,
        "fid": _num(_get(kept, "fid")),
        "extractor": _get(quality, "set_metrics", "extractor", "name"),
        "kept": _num(quality.get("kept_fraction")),
        "n_real": _num(retrain.get("n_real_train")),
        "n_syn": _num(retrain.get("n_synthetic_used")),
        "generator": generator,
    }


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buffer.getvalue()


def _mean_ci(stats: Any) -> list[Any]:
    return [_num(_get(stats, "mean")), _num(_get(stats, "ci95_low")), _num(_get(stats, "ci95_high"))]


def ratio_rows(retrain: dict[str, Any] | None) -> list[list[Any]]:
    """``[ratio, mean, lo, hi]`` of the primary metric per synthetic:real ratio."""
    primary = (retrain or {}).get("primary_metric")
    conditions = _get(retrain, "ratio_sweep", "conditions") or []
    return [[_num(c.get("ratio")), *_mean_ci(_get(c, "metrics", primary))] for c in conditions if isinstance(c, dict)]


def low_data_rows(retrain: dict[str, Any] | None) -> list[list[Any]]:
    """``[fraction, real, real_lo, real_hi, augmented, augmented_lo, augmented_hi]``."""
    primary = (retrain or {}).get("primary_metric")
    conditions = _get(retrain, "low_data", "conditions") or []
    return [
        [_num(c.get("fraction")), *_mean_ci(_get(c, "real_only", primary)), *_mean_ci(_get(c, "augmented", primary))]
        for c in conditions
        if isinstance(c, dict)
    ]


def realism_rows(quality: dict[str, Any] | None) -> list[list[Any]]:
    """``[class, auc, lo, hi]``: ``overall`` then each class of the two-sample test."""
    block = _get(quality, "realism", "two_sample")
    if not isinstance(block, dict) or block.get("auc") is None:
        return []
    entries = [("overall", block), *((str(k), v) for k, v in (block.get("per_class") or {}).items())]
    return [[name, _num(_get(e, "auc")), _num(_get(e, "ci95_low")), _num(_get(e, "ci95_high"))] for name, e in entries]


def training_rows(history: Path, losses: tuple[str, ...]) -> list[list[Any]]:
    """``[epoch, *losses]`` per row of the generator's ``history.csv`` (a loss it did not
    record is blank); none when there is no history (a registry generator, a control)."""
    if not history.is_file():
        return []
    with open(history, newline="") as handle:
        return [[row.get("epoch"), *(row.get(k) for k in losses)] for row in csv.DictReader(handle)]


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    value = json.loads(path.read_text())
    return value if isinstance(value, dict) else None


def write_summary(
    cfg: PipelineConfig, paths: PipelinePaths, verdict: str, retrain: dict[str, Any] | None
) -> dict[str, Any]:
    """Write ``summary.json`` (``{pipeline: summary}``) and the plot files (atomically);
    returns the summary dict.
    ``retrain``: the comparison the report showed (None when it showed none)."""
    from generators.shards import write_json_atomic
    from tasks.report import read_card_summary, write_text_atomic

    quality = _read_json(paths.metrics / "quality.json")
    card = read_card_summary(paths.generator / "card.yaml") or {}
    generator = f"{card['id']}@{card['version']}" if card.get("id") and card.get("version") else card.get("id")
    summary = build_summary(verdict, quality, retrain, generator)
    losses = training_losses(cfg)
    ratio, low, realism, training = plot_paths(paths)
    ratio.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(_csv(["ratio", "mean", "lo", "hi"], ratio_rows(retrain)), ratio)
    low_header = ["fraction", "real", "real_lo", "real_hi", "augmented", "augmented_lo", "augmented_hi"]
    write_text_atomic(_csv(low_header, low_data_rows(retrain)), low)
    write_text_atomic(_csv(["class", "auc", "lo", "hi"], realism_rows(quality)), realism)
    history = training_rows(paths.generator / "history.csv", losses)
    write_text_atomic(_csv(["epoch", *losses], history), training)
    write_json_atomic({paths.pipeline: summary}, summary_path(paths), sort_keys=False)
    log.info("summary: %s (verdict: %s, delta %s)", summary_path(paths), verdict, summary["delta"])
    return summary


def report_with_summary(cfg: PipelineConfig, paths: PipelinePaths) -> dict[str, Any]:
    """Stage ``report``: :func:`tasks.report.report`, then :func:`write_summary`; returns the
    report's summary plus ``summary`` (the headline dict)."""
    from tasks.report import current_retrain, read_metrics, report

    result = report(cfg, paths)
    retrain = None
    if result.get("rejected"):
        retrain = current_retrain(cfg, paths)
    elif (paths.metrics / "retrain.json").is_file():
        retrain = read_metrics(paths.metrics / "retrain.json", "retrain")
    return {**result, "summary": write_summary(cfg, paths, str(result.get("verdict")), retrain)}
