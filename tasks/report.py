"""Stage ``report``: one Markdown page a person can read, with pictures.

Reads ``metrics/retrain.json`` and ``metrics/quality.json`` (both required), the real and
filtered datasets' manifests and rows, and the generator's ``card.yaml`` (optional), and
writes to ``paths.reports``:

- ``report.md``: the real-only vs real+synthetic table (mean +/- 95% CI half-width over
  seeds, delta with its seed and bootstrap intervals) and the verdict; the ratio sweep and
  the low-data regime (tables, plots, one verdict line per condition) when retrain ran
  them; class counts of the real splits and of the synthetic rows generated / dropped /
  kept / used, and how many inputs ingest rejected (``rejects.json``, optional); the
  quality stage's section (:func:`tasks.quality_report.quality_markdown`); the generator
  card's summary; the two image grids;
- ``grid_real.png`` and ``grid_synthetic.png``: one row per class, ``report.grid_per_class``
  images per row, picked evenly over the rows sorted by id; for volume pipelines
  (``preprocess.dims: 3``) middle slices in three planes instead, and a 3D section (2.5D
  metrics per plane, 2.5D two-sample test, per-class segmentation) in place of the 2D image
  section (:mod:`tasks.report_volumes`);
- ``ratio_sweep.png`` and ``low_data.png`` (when the sweep ran): the primary metric vs the
  synthetic:real ratio, and vs the real fraction (real only and real + synthetic), mean
  with 95% t-interval bars over seeds and each seed as a dot.

Everything is deterministic: the same inputs give the same bytes on rerun.
"""

from __future__ import annotations

import io
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFont

from generators.errors import ConfigError, DataError
from generators.shards import BASE_COLUMNS, decode_table, iter_tables, read_manifest, read_table
from tasks.config import PipelineConfig
from tasks.paths import PipelinePaths
from tasks.quality_report import (
    class_cell,
    count_keys,
    extractor_reliable,
    failed_checks,
    gate_rejected,
    md_cell,
    quality_markdown,
    two_sample_summary,
)
from tasks.statistics import NOT_TESTED_CEILING as CEILING

logger = logging.getLogger(__name__)

REPORT_NAME = "report.md"
GRID_REAL = "grid_real.png"
GRID_SYNTHETIC = "grid_synthetic.png"
RATIO_PLOT = "ratio_sweep.png"
FRACTION_PLOT = "low_data.png"
PLOT_SIZE_IN = (6.4, 4.0)
PLOT_DPI = 100
TILE_MIN_PX = 64  # small images are upscaled (nearest) to at least this many pixels
GAP_PX = 2
LABEL_WIDTH_PX = 96
SETTING_TITLES = {"real_only": "real only", "augmented": "real + synthetic"}


def _unit(retrain: dict[str, Any]) -> str:
    """What one row is: ``volumes`` for a volume pipeline (retrain.json ``volumes`` block), else ``images``."""
    return "volumes" if retrain.get("volumes") else "images"


def _selection_note(retrain: dict[str, Any]) -> str:
    n_val = retrain.get("n_val_for_selection") or 0
    if not n_val:
        return " Each run keeps its final weights."
    return (
        f" Each run keeps the weights that score best on the {n_val} real val {_unit(retrain)} "
        f"(checked every {retrain.get('eval_every')} steps); the test split is never used to choose."
    )


# --------------------------------------------------------------------------- inputs
def read_metrics(path: Path, stage: str) -> dict[str, Any]:
    """A metrics JSON file written by ``stage``; a clear error when it is missing."""
    if not path.is_file():
        raise DataError(
            f"{path}: expected the metrics of the '{stage}' stage, found none; run `synthmed stage {stage}` first"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(
            f"{path}: expected the JSON metrics of the '{stage}' stage, got unparsable JSON ({exc}); "
            f"rerun `synthmed stage {stage}`"
        ) from None
    if not isinstance(data, dict):
        raise DataError(
            f"{path}: expected a JSON object (the '{stage}' stage's metrics), got {type(data).__name__}; "
            f"rerun `synthmed stage {stage}`"
        )
    return data


def current_retrain(cfg: PipelineConfig, paths: PipelinePaths) -> dict[str, Any] | None:
    """``retrain.json`` when it was computed on the current filtered set (its stage record
    matches the current fingerprint), else None: after a rejected synthetic set the retrain
    stage is skipped, and an earlier run's results must not stand in for this one's."""
    path = paths.metrics / "retrain.json"
    if not path.is_file():
        return None
    from tasks.stages import up_to_date

    if up_to_date("retrain", cfg, paths) is None:
        logger.info("%s predates the current synthetic set; the report leaves it out", path.name)
        return None
    return read_metrics(path, "retrain")


def count_rejects(path: Path) -> int | None:
    """How many inputs ingest refused (the length of ``rejects.json``), None without the file."""
    if not path.is_file():
        return None
    try:
        rejects = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: expected a JSON list of rejected inputs, got unparsable JSON ({exc}); rerun ingest"
        ) from None
    if not isinstance(rejects, list):
        raise DataError(f"{path}: expected a JSON list of rejected inputs, got {type(rejects).__name__}; rerun ingest")
    return len(rejects)


def read_card_summary(path: Path) -> dict[str, Any] | None:
    """id, version, architecture, training time and a few more fields of a model card
    (read with ``yaml.safe_load``), or None when there is no card."""
    if not path.is_file():
        return None
    try:
        card = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"{path}: expected a YAML model card, got unparsable YAML ({exc}); rerun the train stage"
        ) from None
    if not isinstance(card, dict):
        raise ConfigError(
            f"{path}: expected a YAML mapping (a model card), got {type(card).__name__}; rerun the train stage"
        )
    training = card.get("training") if isinstance(card.get("training"), dict) else {}
    return {
        "id": card.get("id"),
        "version": card.get("version"),
        "architecture": card.get("architecture"),
        "training_time_s": training.get("time_s"),
        "training_epochs": training.get("epochs"),
        "training_images": training.get("images"),
        "licence": card.get("licence"),
        "intended_use": card.get("intended_use"),
    }


def pick_rows(
    dataset: Path, splits: list[str] | None, classes: list[str], per_class: int
) -> dict[str, list[np.ndarray]]:
    """Up to ``per_class`` images per class, evenly spaced over the class's rows sorted by
    id. Returns ``{class: [float32 (C, H, W) in [0, 1], ...]}``; only picked rows are decoded."""
    table = read_table(dataset, columns=["id", "label"], splits=splits)
    by_class: dict[str, list[str]] = {c: [] for c in classes}
    for row_id, label in zip(table.column("id").to_pylist(), table.column("label").to_pylist(), strict=True):
        if label in by_class:
            by_class[label].append(row_id)
    picked: dict[str, str] = {}
    for label, ids in by_class.items():
        ids = sorted(ids)
        if ids:
            positions = np.unique(np.linspace(0, len(ids) - 1, min(per_class, len(ids))).round().astype(int))
            picked.update({ids[p]: label for p in positions})
    images: dict[str, list[tuple[str, np.ndarray]]] = {c: [] for c in classes}
    for part in iter_tables(dataset, columns=list(BASE_COLUMNS), splits=splits):
        keep = np.asarray([row_id in picked for row_id in part.column("id").to_pylist()], dtype=bool)
        if keep.any():
            arrays = decode_table(part.filter(keep))
            for row_id, image in zip(arrays.ids, arrays.images, strict=True):
                images[picked[row_id]].append((row_id, image))
    return {c: [image for _, image in sorted(rows, key=lambda r: r[0])] for c, rows in images.items()}


# --------------------------------------------------------------------------- pictures
def render_grid(rows: dict[str, list[np.ndarray]], per_class: int) -> Image.Image:
    """An RGB image: one row per class (its name on the left), ``per_class`` tiles per row.
    Tiles are float32 ``(C, H, W)`` in [0, 1] with C = 1 or 3; missing tiles stay black."""
    shapes = [image.shape for images in rows.values() for image in images]
    height, width = (shapes[0][1], shapes[0][2]) if shapes else (TILE_MIN_PX, TILE_MIN_PX)
    scale = max(1, -(-TILE_MIN_PX // max(1, min(height, width))))
    tile_h, tile_w = height * scale, width * scale
    canvas = np.zeros(
        (GAP_PX + len(rows) * (tile_h + GAP_PX), LABEL_WIDTH_PX + per_class * (tile_w + GAP_PX), 3), np.uint8
    )
    canvas[:] = 32
    for r, images in enumerate(rows.values()):
        for c, image in enumerate(images[:per_class]):
            rgb = np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image[:3]
            pixels = np.rint(np.clip(np.moveaxis(rgb, 0, -1), 0, 1) * 255).astype(np.uint8)
            pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
            y, x = GAP_PX + r * (tile_h + GAP_PX), LABEL_WIDTH_PX + c * (tile_w + GAP_PX)
            canvas[y : y + tile_h, x : x + tile_w] = pixels[:tile_h, :tile_w]
    picture = Image.fromarray(canvas, mode="RGB")
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    for r, label in enumerate(rows):
        count = len(rows[label])
        text = label if count else f"{label}\n(none)"
        draw.text((4, GAP_PX + r * (tile_h + GAP_PX) + tile_h // 2 - 6), text, fill=(255, 255, 255), font=font)
    return picture


def write_bytes_atomic(data: bytes, path: Path) -> None:
    """Write a file atomically (temp file in the same folder, then rename)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(text: str, path: Path) -> None:
    write_bytes_atomic(text.encode("utf-8"), path)


def save_png(picture: Image.Image, path: Path) -> None:
    """Write a PNG atomically; PIL writes no timestamp, so the bytes are reproducible."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    write_bytes_atomic(buffer.getvalue(), path)


def _figure():
    """A matplotlib Figure on the Agg canvas (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=PLOT_SIZE_IN, dpi=PLOT_DPI)
    FigureCanvasAgg(figure)
    return figure


def _figure_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=PLOT_DPI, metadata={"Software": None})
    return buffer.getvalue()


def _error_bars(stats: list[dict[str, Any]]) -> np.ndarray | None:
    """``(2, n)`` distances from the means to the 95% bounds, None when no bound exists."""
    if all(s.get("ci95_low") is None for s in stats):
        return None
    low = [s["mean"] - s["ci95_low"] if s.get("ci95_low") is not None else 0.0 for s in stats]
    high = [s["ci95_high"] - s["mean"] if s.get("ci95_high") is not None else 0.0 for s in stats]
    return np.asarray([low, high])


def _metric_axis(axes, retrain: dict[str, Any]) -> None:
    primary = retrain["primary_metric"]
    lower = primary in set(retrain.get("lower_is_better", []))
    axes.set_ylabel(primary + (" (lower is better)" if lower else ""))
    if not lower:
        axes.set_ylim(-0.02, 1.02)
    axes.grid(True, alpha=0.3)


def _plot_points(axes, x: list[float], stats: list[dict[str, Any]], label: str, color: str) -> None:
    """Means with 95% t-interval bars over seeds, and every seed as a dot."""
    means = [s["mean"] for s in stats]
    axes.errorbar(x, means, yerr=_error_bars(stats), fmt="o-", color=color, capsize=4, label=label)
    for xi, s in zip(x, stats, strict=True):
        per_seed = s.get("per_seed") or []
        axes.plot([xi] * len(per_seed), per_seed, ".", color=color, alpha=0.35)


def render_ratio_plot(retrain: dict[str, Any]) -> bytes:
    """PNG bytes: the primary metric vs the synthetic:real ratio of the ratio sweep."""
    sweep = retrain["ratio_sweep"]
    primary = retrain["primary_metric"]
    conditions = sweep["conditions"]
    figure = _figure()
    axes = figure.add_subplot()
    x = [c["ratio"] for c in conditions]
    _plot_points(axes, x, [c["metrics"][primary] for c in conditions], "real + synthetic (ratio 0: real only)", "C0")
    for c in conditions:
        if c["n_synthetic"] < c["n_synthetic_requested"]:
            axes.annotate(
                f"only {c['effective_ratio']:.2f}",
                (c["ratio"], c["metrics"][primary]["mean"]),
                textcoords="offset points",
                xytext=(6, -14),
                fontsize=8,
            )
    axes.set_xticks(x)
    axes.set_xlabel("synthetic : real ratio (requested)")
    _metric_axis(axes, retrain)
    axes.set_title(
        f"{retrain['task']} with {retrain['network']}: {len(sweep['seeds'])} seed(s), {sweep['steps']} steps"
    )
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return _figure_png(figure)


def render_fraction_plot(retrain: dict[str, Any]) -> bytes:
    """PNG bytes: the primary metric vs the real fraction, real only and real + synthetic."""
    sweep = retrain["low_data"]
    primary = retrain["primary_metric"]
    conditions = sweep["conditions"]
    figure = _figure()
    axes = figure.add_subplot()
    x = [c["fraction"] for c in conditions]
    dodge = 1.03  # side by side on the log axis
    _plot_points(axes, [v / dodge for v in x], [c["real_only"][primary] for c in conditions], "real only", "C1")
    trained = [
        (v, c) for v, c in zip(x, conditions, strict=True) if (c["augmented"][primary] or {}).get("mean") is not None
    ]
    if trained:  # a fraction without synthetic rows has no augmented runs (verdict "not tested")
        _plot_points(
            axes,
            [v * dodge for v, _ in trained],
            [c["augmented"][primary] for _, c in trained],
            f"real + synthetic (ratio {sweep['synthetic_ratio']:g})",
            "C0",
        )
    axes.set_xscale("log")
    axes.set_xticks(x)
    axes.set_xticklabels([f"{v:g}\n({c['n_real']} real)" for v, c in zip(x, conditions, strict=True)])
    axes.minorticks_off()
    axes.set_xlabel("fraction of the real train split")
    _metric_axis(axes, retrain)
    axes.set_title(f"low-data regime: {len(sweep['seeds'])} seed(s), {sweep['steps']} steps")
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return _figure_png(figure)


# --------------------------------------------------------------------------- text
def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _mean_ci(stats: dict[str, Any] | None) -> str:
    stats = stats or {}
    if stats.get("mean") is None:
        return "not trained"
    if stats.get("ci95_low") is None or stats.get("ci95_high") is None:
        return f"{_fmt(stats['mean'])} (1 seed)"
    half = (stats["ci95_high"] - stats["ci95_low"]) / 2
    return f"{_fmt(stats['mean'])} ± {half:.3f}"


def _interval(low: float | None, high: float | None) -> str:
    if low is None or high is None:
        return "n/a"
    return f"[{_fmt(low, True)}, {_fmt(high, True)}]"


def untested(verdict: Any) -> bool:
    """True for the verdicts of a comparison that was not made (``not tested: ...``)."""
    return isinstance(verdict, str) and verdict.startswith("not tested")


def metric_table(retrain: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per metric: means and 95% bounds of both settings and of the delta; empty
    when no comparison was made (no retrain results, or a ``not tested`` verdict)."""
    if not retrain or untested(retrain.get("verdict")):
        return []
    rows = []
    for metric, delta in (retrain.get("delta") or {}).items():
        row: dict[str, Any] = {"metric": metric, "primary": metric == retrain.get("primary_metric")}
        for setting in ("real_only", "augmented"):
            stats = (retrain.get(setting) or {}).get(metric) or {}
            row.update(
                {
                    f"{setting}_mean": stats.get("mean"),
                    f"{setting}_ci95_low": stats.get("ci95_low"),
                    f"{setting}_ci95_high": stats.get("ci95_high"),
                }
            )
        row.update(
            delta_mean=delta.get("mean"),
            delta_ci95_low=delta.get("ci95_low"),
            delta_ci95_high=delta.get("ci95_high"),
            delta_bootstrap_ci95_low=delta.get("bootstrap_ci95_low"),
            delta_bootstrap_ci95_high=delta.get("bootstrap_ci95_high"),
        )
        rows.append(row)
    return rows


WHY = {
    "helped": "every 95% interval of the delta lies above zero",
    "hurt": "every 95% interval of the delta lies below zero",
    "no measurable effect": "a 95% interval of the delta includes zero",
}


def power_text(power: Any, verdict: Any) -> str:
    """The power statement of a verdict without its leading ``<verdict>: `` (``""`` when the
    retrain results carry none), e.g. ``this test (24 test images, 3 seeds) could only have
    detected a change of at least 0.120 balanced accuracy``."""
    statement = power.get("statement") if isinstance(power, dict) else None
    if not statement:
        return ""
    statement = " ".join(str(statement).split())
    prefix = f"{verdict}: "
    return statement[len(prefix) :] if isinstance(verdict, str) and statement.startswith(prefix) else statement


def _power_sentence(power: Any, verdict: Any) -> str:
    text = power_text(power, verdict)
    return f" Power: {md_cell(text)}." if text else ""


def _delta_text(delta: dict[str, Any], seeds: int, n_test: int) -> str:
    return (
        f"delta {_fmt(delta.get('mean'), True)}, 95% CI over {seeds} seed(s) "
        f"{_interval(delta.get('ci95_low'), delta.get('ci95_high'))}, bootstrap over {n_test} test images "
        f"{_interval(delta.get('bootstrap_ci95_low'), delta.get('bootstrap_ci95_high'))}"
    )


def _untested_reason(retrain: dict[str, Any], quality: dict[str, Any]) -> str:
    """Why the comparison was not made, from the retrain and quality results."""
    verdict = retrain.get("verdict")
    if verdict == "not tested: too little data":
        problems = (retrain.get("preflight") or {}).get("problems") or []
        shown = "; ".join(md_cell(p) for p in problems[:4]) + (
            f"; and {len(problems) - 4} more" if len(problems) > 4 else ""
        )
        return (
            "the preflight found too few real images per class and split"
            + (f" ({shown})" if shown else "")
            + " and preflight.allow_too_little_data let the run go on"
        )
    if verdict == CEILING:
        return (
            f"real only scored the best possible {retrain.get('primary_metric', 'score')} with every seed, so "
            "synthetic data could not show a gain (a loss would have shown); use fewer real images "
            "(`retrain.fractions`, e.g. [0.1, 0.25]) or a harder test split"
        )
    if verdict == "not tested: no synthetic images reached the retrain":
        totals = quality.get("totals") or {}
        return (
            f"the filters kept {totals.get('kept', 0)} of {totals.get('generated', 0)} synthetic images, so "
            f"{retrain.get('n_synthetic_used', 0)} reached the retrain"
        )
    return "no comparison was made"


def _verdict_line(retrain: dict[str, Any], quality: dict[str, Any] | None = None) -> str:
    primary = retrain["primary_metric"]
    verdict = retrain.get("verdict")
    if verdict == CEILING:
        delta = (retrain.get("delta") or {}).get(primary) or {}
        measured = _delta_text(delta, len(retrain.get("seeds") or []), retrain.get("n_test", 0))
        return (
            f"**Verdict on {primary}: {verdict}**: real only scored the best possible {primary} with every seed, "
            f"so synthetic data could not show a gain ({measured}; a loss would have shown). The task is too "
            "easy to judge them: use fewer real images (`retrain.fractions`, e.g. [0.1, 0.25]) or a harder test split."
        )
    if untested(verdict):
        return (
            f"**Verdict on {primary}: {verdict}**: {_untested_reason(retrain, quality or {})}; real only was "
            "not compared with real + synthetic, so there is no delta to report."
        )
    delta = (retrain.get("delta") or {}).get(primary) or {}
    return (
        f"**Verdict on {primary}: {verdict}**: "
        f"{_delta_text(delta, len(retrain.get('seeds') or []), retrain.get('n_test', 0))}; {WHY.get(verdict, '')}."
        + _power_sentence(retrain.get("power"), verdict)
    )


def _condition_line(name: str, condition: dict[str, Any], primary: str, seeds: int, n_test: int) -> str:
    """One verdict line of a sweep condition."""
    verdict = condition.get("verdict")
    delta = (condition.get("delta") or {}).get(primary)
    if untested(verdict) or not delta:
        return f"- {name}: **{verdict or 'not tested'}**: no comparison was made."
    return f"- {name}: **{verdict}**: {_delta_text(delta, seeds, n_test)}; {WHY.get(verdict, '')}." + _power_sentence(
        condition.get("power"), verdict
    )


def _synthetic_count(condition: dict[str, Any]) -> str:
    """``77`` or ``77 of 152 requested`` when the filtered pool ran short."""
    n, requested = condition.get("n_synthetic", 0), condition.get("n_synthetic_requested", 0)
    if n < requested:
        return f"{n} of {requested} requested"
    return str(n)


def _few_seeds_note(seeds: int) -> list[str]:
    if seeds >= 3:
        return []
    return [
        f"With {seeds} seed(s) the seed interval is {'absent' if seeds < 2 else 'very wide'}: "
        "add seeds (retrain.sweep_seeds) to resolve small effects.",
        "",
    ]


def ratio_section(retrain: dict[str, Any]) -> list[str]:
    """Markdown lines of the ratio sweep (table, plot, verdict lines), or a note when off."""
    sweep = retrain.get("ratio_sweep") or {}
    conditions = sweep.get("conditions") or []
    lines = ["## How much synthetic data? (ratio sweep)", ""]
    if not conditions:
        return lines + ["Not run: set `retrain.ratios` (e.g. `[0, 0.5, 1, 2]`) in pipelines.yaml.", ""]
    primary = retrain["primary_metric"]
    seeds = len(sweep.get("seeds") or [])
    lines += [
        f"The {retrain.get('n_real_train')} real train images plus ratio × as many filtered synthetic images "
        "(stratified by class; a larger ratio adds images to a smaller one's), each ratio compared with "
        f"ratio 0 (real only), paired by seed: {seeds} seed(s) × {sweep.get('steps')} steps, batch "
        f"{retrain.get('batch_size')}, evaluated on {retrain.get('n_test')} real test images.",
        "",
        f"| ratio | synthetic images | {primary} | delta vs real only | delta 95% CI (seeds) "
        "| delta 95% CI (bootstrap) | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in conditions:
        baseline = c.get("ratio") == 0
        name = f"{c.get('ratio', 0):g}" + (" (real only)" if baseline else "")
        d = (c.get("delta") or {}).get(primary)
        if baseline:
            cells = ["", "", "", "baseline"]
        elif untested(c.get("verdict")) or not d:
            cells = ["", "", "", str(c.get("verdict") or "not tested")]
        else:
            cells = [
                _fmt(d.get("mean"), True),
                _interval(d.get("ci95_low"), d.get("ci95_high")),
                _interval(d.get("bootstrap_ci95_low"), d.get("bootstrap_ci95_high")),
                str(c.get("verdict")),
            ]
        lines.append(
            f"| {name} | {_synthetic_count(c)} | {_mean_ci((c.get('metrics') or {}).get(primary))} | "
            + " | ".join(cells)
            + " |"
        )
    lines += ["", f"![{primary} vs synthetic:real ratio]({RATIO_PLOT})", "", f"Verdicts on {primary}:", ""]
    lines += [
        _condition_line(f"ratio {c['ratio']:g}", c, primary, seeds, retrain.get("n_test", 0))
        for c in conditions
        if c.get("ratio") != 0
    ]
    lines.append("")
    short = [c for c in conditions if c.get("n_synthetic", 0) < c.get("n_synthetic_requested", 0)]
    if short:
        lines += [
            "Not enough filtered synthetic images for ratio(s) "
            + ", ".join(f"{c['ratio']:g} (effective {c.get('effective_ratio', 0):.2f})" for c in short)
            + ": those runs used all there were; synthesize more (synthesis.count_per_class) to test them.",
            "",
        ]
    return lines + _few_seeds_note(seeds)


def low_data_section(retrain: dict[str, Any]) -> list[str]:
    """Markdown lines of the low-data regime (table, plot, verdict lines), or a note when off."""
    sweep = retrain.get("low_data") or {}
    conditions = sweep.get("conditions") or []
    lines = ["## Low-data regime", ""]
    if not conditions:
        return lines + ["Not run: set `retrain.real_fractions` (e.g. `[0.1, 0.25, 1.0]`) in pipelines.yaml.", ""]
    primary = retrain["primary_metric"]
    seeds = len(sweep.get("seeds") or [])
    lines += [
        "A fraction of the real train split, stratified by class and spread over subjects (a different "
        "subset per seed, nested across fractions), real only vs plus "
        f"{sweep.get('synthetic_ratio', 0):g} × as many filtered synthetic images, paired by seed: {seeds} seed(s) × "
        f"{sweep.get('steps')} steps, batch {retrain.get('batch_size')} (or the whole set when smaller), evaluated on "
        f"{retrain.get('n_test')} real test images.",
        "",
        f"| real fraction | real images | synthetic images | real only ({primary}) | real + synthetic | delta "
        "| delta 95% CI (seeds) | delta 95% CI (bootstrap) | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in conditions:
        d = (c.get("delta") or {}).get(primary)
        if untested(c.get("verdict")) or not d:
            delta_cells = ["", "", ""]
        else:
            delta_cells = [
                _fmt(d.get("mean"), True),
                _interval(d.get("ci95_low"), d.get("ci95_high")),
                _interval(d.get("bootstrap_ci95_low"), d.get("bootstrap_ci95_high")),
            ]
        lines.append(
            f"| {c.get('fraction', 0):g} | {c.get('n_real')} | {_synthetic_count(c)} | "
            f"{_mean_ci((c.get('real_only') or {}).get(primary))} | {_mean_ci((c.get('augmented') or {}).get(primary))} | "
            + " | ".join(delta_cells)
            + f" | {c.get('verdict')} |"
        )
    lines += [
        "",
        f"![{primary} vs fraction of the real train split]({FRACTION_PLOT})",
        "",
        f"Verdicts on {primary}:",
        "",
    ]
    lines += [
        _condition_line(
            f"real fraction {c['fraction']:g} ({c.get('n_real')} real images)",
            c,
            primary,
            seeds,
            retrain.get("n_test", 0),
        )
        for c in conditions
    ]
    lines += [
        "",
        "Caveat: the generator was trained on the whole real train split, so below fraction 1 the synthetic "
        "images carry information from real images the real-only model never sees; a benefit there "
        "overstates what a generator trained on that fraction alone would bring.",
        "",
    ]
    return lines + _few_seeds_note(seeds)


def _counts_table(
    real: dict[str, dict[str, int]], quality: dict[str, Any], used: dict[str, int], classes: list[str]
) -> list[str]:
    """Real images per split and synthetic images generated / dropped (every ``dropped_*``
    reason summed; per reason in the Filters table) / kept / used, one row per class."""
    splits = [s for s in ("train", "val", "test") if s in real] + sorted(set(real) - {"train", "val", "test"})
    per_class = quality.get("per_class") or {}
    totals = quality.get("totals") or {}
    dropped = [k for k in count_keys(totals, per_class) if k.startswith("dropped_")]

    def synthetic_cells(entry: dict[str, Any]) -> list[str]:
        return [
            str(entry.get("generated", 0)),
            str(sum(int(entry.get(k) or 0) for k in dropped)),
            str(entry.get("kept", 0)),
        ]

    header = [*(f"real {s}" for s in splits), "synthetic generated", "dropped (all filters)", "kept", "used in retrain"]
    lines = ["| class | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    labels = list(classes) + sorted((set(per_class) | {lab for c in real.values() for lab in c}) - set(classes))
    for label in labels:
        cells = [str(real.get(s, {}).get(label, 0)) for s in splits]
        cells += synthetic_cells(per_class.get(label) or {})
        cells.append(str(used.get(label, 0)))
        lines.append(f"| {class_cell(label)} | " + " | ".join(cells) + " |")
    cells = [str(sum(real.get(s, {}).values())) for s in splits]
    cells += synthetic_cells(totals)
    cells.append(str(sum(used.values())))
    lines.append("| **total** | " + " | ".join(cells) + " |")
    return lines


def headline(retrain: dict[str, Any] | None, quality: dict[str, Any]) -> tuple[str, str]:
    """``(verdict, markdown line)`` for the top of the report. The verdict is ``REJECTED``
    when the quality gate failed (whatever retrain said), else retrain's verdict."""
    if gate_rejected(quality):
        why = "; ".join(failed_checks(quality)) or "see the quality gate below"
        line = (
            f"**Verdict: REJECTED**: the quality gate rejected the synthetic set ({why}); do not use these "
            "synthetic images."
        )
        if retrain is None:
            line += " Real only vs real + synthetic was not compared on a rejected set."
        else:
            line += f" A comparison ran on it anyway ({md_cell(retrain.get('verdict'))}); the rejection governs."
        return "REJECTED", line
    verdict = (retrain or {}).get("verdict") or "unknown"
    primary = (retrain or {}).get("primary_metric", "the primary metric")
    if untested(verdict):
        return verdict, f"**Verdict: {verdict}**: {_untested_reason(retrain or {}, quality)}."
    power = power_text((retrain or {}).get("power"), verdict)
    return verdict, f"**Verdict on {primary}: {verdict}**" + (f": {md_cell(power)}" if power else "") + "."


def _judge_summary(quality: dict[str, Any]) -> list[str]:
    """One line on realism for the top of the report: the two-sample test, and whether the
    set metrics may be read at all."""
    parts = []
    two_sample = two_sample_summary(quality)
    if two_sample:
        parts.append(f"Realism: {two_sample}.")
    reliable = extractor_reliable(quality.get("set_metrics"))
    if reliable is False:
        parts.append(
            "Set metrics (FID, KID, precision/recall, density/coverage) are **unreliable** here: their "
            "extractor is near chance, so they are no evidence either way."
        )
    return [" ".join(parts), ""] if parts else []


def _comparison_section(retrain: dict[str, Any] | None, quality: dict[str, Any]) -> list[str]:
    """``## Does synthetic data help?``: the real-only vs real+synthetic table with the
    verdict and its power, or why no comparison was made (never a delta table then)."""
    lines = ["## Does synthetic data help?", ""]
    if retrain is None:
        return lines + [
            "Not tested: the quality gate rejected the synthetic set, so the retrain stage did not compare "
            "real only with real + synthetic (any earlier retrain results belong to another synthetic set "
            "and are not shown).",
            "",
        ]
    lower = set(retrain.get("lower_is_better") or [])
    seeds = retrain.get("seeds") or []
    verdict = retrain.get("verdict")
    lines += [
        f"Downstream {retrain.get('task')} with {retrain.get('network')}: {retrain.get('steps')} optimizer steps, "
        f"batch {retrain.get('batch_size')}, lr {retrain.get('lr')}, seeds {', '.join(map(str, seeds))}. "
        f"*real only*: {retrain.get('n_real_train')} real train {_unit(retrain)}; *real + synthetic*: plus "
        f"{retrain.get('n_synthetic_used')} filtered synthetic {_unit(retrain)} (ratio "
        f"{retrain.get('synthetic_ratio')}). Both evaluated on {retrain.get('n_test')} real test "
        f"{_unit(retrain)}.{_selection_note(retrain)}",
        "",
    ]
    if untested(verdict):
        lines += [
            _verdict_line(retrain, quality),
            "",
            f"Real only, for reference (mean ± half-width of the 95% t-interval over {len(seeds)} seed(s)):",
            "",
            "| metric | real only |",
            "|---|---|",
        ]
        for metric, stats in (retrain.get("real_only") or {}).items():
            name = f"**{metric}**" if metric == retrain.get("primary_metric") else metric
            lines.append(f"| {name}{' (lower is better)' if metric in lower else ''} | {_mean_ci(stats)} |")
        return [*lines, ""]
    lines += [
        "| metric | real only | real + synthetic | delta | delta 95% CI (seeds) | delta 95% CI (bootstrap) |",
        "|---|---|---|---|---|---|",
    ]
    for row in metric_table(retrain):
        metric = row["metric"]
        name = f"**{metric}**" if row["primary"] else metric
        name += " (lower is better)" if metric in lower else ""
        lines.append(
            f"| {name} | {_mean_ci((retrain.get('real_only') or {}).get(metric))} | "
            f"{_mean_ci((retrain.get('augmented') or {}).get(metric))} | "
            f"{_fmt(row['delta_mean'], True)} | {_interval(row['delta_ci95_low'], row['delta_ci95_high'])} | "
            f"{_interval(row['delta_bootstrap_ci95_low'], row['delta_bootstrap_ci95_high'])} |"
        )
    lines += [
        "",
        f"Values: mean ± half-width of the 95% t-interval over {len(seeds)} seed(s). "
        "Delta = real + synthetic − real only, paired by seed.",
        "",
        _verdict_line(retrain, quality),
        "",
    ]
    if retrain.get("verdict_rule"):
        lines += [
            f"How the verdict is decided (one rule for every verdict here): {md_cell(retrain['verdict_rule'])}",
            "",
        ]
    lines += [
        "'no measurable effect' means the 95% intervals include zero at this budget; it is not evidence "
        "that there is no effect.",
        "",
    ]
    return lines


def _label_classifier(quality: dict[str, Any]) -> list[str]:
    classifier = quality.get("label_classifier")
    if not isinstance(classifier, dict):
        return []
    if classifier.get("val_accuracy") is None:
        return ["Label-consistency filter: no labelled val split, so its accuracy is unknown.", ""]
    drop = classifier.get("val_would_drop_fraction")
    line = (
        f"Label-consistency filter: its classifier ({md_cell(classifier.get('network'))}, "
        f"{classifier.get('steps')} steps) reaches accuracy {_fmt(classifier['val_accuracy'])} on "
        f"{classifier.get('n_val')} real val images"
        + (f" and would drop {100 * drop:.1f}% of them." if isinstance(drop, (int, float)) else ".")
    )
    if classifier.get("reliable") is False:
        chance = classifier.get("chance")
        line += (
            f" That is near chance{f' ({_fmt(chance)})' if isinstance(chance, (int, float)) else ''}: "
            "the classifier is **unreliable**, so its drops say nothing about label errors."
        )
    elif classifier.get("reliable") is True:
        line += " Reliable (well above chance)."
    return [line, ""]


def render_markdown(
    pipeline: str,
    description: str,
    retrain: dict[str, Any] | None,
    quality: dict[str, Any],
    real_counts: dict[str, dict[str, int]],
    card: dict[str, Any] | None,
    card_path: str,
    rejects: int | None = None,
    rejects_path: str = "rejects.json",
    classes: list[str] | None = None,
    volumes: list[str] | None = None,
) -> str:
    """The report's Markdown (pure function of its inputs). ``retrain``: None when the quality
    gate rejected the synthetic set and no current retrain results exist. ``rejects``: how
    many inputs ingest refused (None: unknown). ``classes``: class order of the counts
    table when ``retrain`` gives none. ``volumes``: the 3D part
    (:func:`tasks.report_volumes.volumes_markdown`), in place of the 2D image section."""
    _, top = headline(retrain, quality)
    lines = [f"# synthmed report: {pipeline}", "", top, ""]
    lines += _judge_summary(quality)
    if description:
        lines += [description, ""]
    lines += _comparison_section(retrain, quality)
    if retrain is not None:
        lines += [*ratio_section(retrain), *low_data_section(retrain)]
    used = (retrain or {}).get("synthetic_used_per_class") or {}
    order = list((retrain or {}).get("classes") or classes or [])
    lines += ["## Data", "", *_counts_table(real_counts, quality, used, order), ""]
    if rejects is None:
        lines += [f"No `{rejects_path}`: the number of inputs ingest refused is unknown.", ""]
    else:
        lines += [f"Ingest rejected {rejects} input(s); files and reasons are listed in `{rejects_path}`.", ""]
    lines += _label_classifier(quality)
    lines += [quality_markdown(quality)]
    lines += ["## Generator", ""]
    if card is None:
        lines += [f"No model card at `{card_path}`; the generator is not described here.", ""]
    else:
        time_s = card.get("training_time_s")
        timing = f"{time_s:.1f} s" if isinstance(time_s, (int, float)) else "not on the card"

        def cell(key: str) -> str:
            return md_cell(card[key]) if card.get(key) is not None else "n/a"

        lines += [
            "| id | version | architecture | training time | epochs | training images |",
            "|---|---|---|---|---|---|",
            f"| {cell('id')} | {cell('version')} | {cell('architecture')} | {timing} | "
            f"{cell('training_epochs')} | {cell('training_images')} |",
            "",
        ]
        if not isinstance(time_s, (int, float)):
            lines += [
                "Cards the pipeline trains carry no wall time, so their bytes (and DVC hashes) repeat "
                f"on rerun; this run's training time is in `.synthmed/{pipeline}/train_timing.json`.",
                "",
            ]
        if card.get("intended_use"):
            lines += [f"Intended use: {md_cell(card['intended_use'])}", ""]
    if volumes is not None:
        return "\n".join([*lines, *volumes])
    lines += [
        "## Images",
        "",
        "Real (train split), one row per class:",
        "",
        f"![real images, one row per class]({GRID_REAL})",
        "",
        "Synthetic, kept by the filter, one row per conditioning class:",
        "",
        f"![synthetic images, one row per class]({GRID_SYNTHETIC})",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- stage
def _shown(path: Path, root: Path) -> str:
    """``path`` relative to the project root when inside it (no machine paths in the report)."""
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def report(cfg: PipelineConfig, paths: PipelinePaths) -> dict[str, Any]:
    """Write ``report.md``, the two PNG grids and the sweep plots; returns ``{"report": path,
    "markdown": text, "images": [paths], "table": [row dicts of the metrics table],
    "verdict": str, "rejected": bool}``. When the quality gate rejected the synthetic set
    (``quality.json`` ``gate.passed`` false) the report is still written, says REJECTED at
    the top, and needs no ``retrain.json`` (one from an earlier synthetic set is left out)."""
    quality_path, retrain_path = paths.metrics / "quality.json", paths.metrics / "retrain.json"
    if quality_path.is_file():
        quality = read_metrics(quality_path, "filter")
        rejected = gate_rejected(quality)
        retrain = current_retrain(cfg, paths) if rejected else read_metrics(retrain_path, "retrain")
    else:  # name the last missing stage first: running it runs the others
        retrain = read_metrics(retrain_path, "retrain")
        quality, rejected = read_metrics(quality_path, "filter"), False
    real_counts = read_manifest(paths.real).get("class_counts") or {}
    classes = list((retrain or {}).get("classes") or sorted({lab for c in real_counts.values() for lab in c if lab}))
    card_path = paths.generator / "card.yaml"
    card = read_card_summary(card_path)
    if card is None:
        logger.info("%s: no generator card; the report leaves the generator out", card_path)
    rejects = count_rejects(paths.rejects)

    per_class = cfg.report.grid_per_class
    paths.reports.mkdir(parents=True, exist_ok=True)
    images = []
    volumes = None
    if cfg.preprocess.dims == 3:
        from tasks import report_volumes

        provenance = read_manifest(paths.real).get("provenance") or {}
        shape = provenance.get("volume_shape") or list(cfg.preprocess.volume_shape())
        images += report_volumes.write_grids(paths.real, paths.filtered, paths.reports, per_class, shape)
        volumes = report_volumes.volumes_markdown(quality, retrain, provenance)
    else:
        for name, dataset, splits in ((GRID_REAL, paths.real, ["train"]), (GRID_SYNTHETIC, paths.filtered, None)):
            picture = render_grid(pick_rows(dataset, splits, classes, per_class), per_class)
            save_png(picture, paths.reports / name)
            images.append(str(paths.reports / name))
    for name, key, render in (
        (RATIO_PLOT, "ratio_sweep", render_ratio_plot),
        (FRACTION_PLOT, "low_data", render_fraction_plot),
    ):
        plot_path = paths.reports / name
        if retrain is not None and (retrain.get(key) or {}).get("conditions"):
            write_bytes_atomic(render(retrain), plot_path)
            images.append(str(plot_path))
        else:
            plot_path.unlink(missing_ok=True)  # a plot of an earlier run would not match this report

    markdown = render_markdown(
        paths.pipeline,
        cfg.description,
        retrain,
        quality,
        real_counts,
        card,
        _shown(card_path, paths.root),
        rejects=rejects,
        rejects_path=_shown(paths.rejects, paths.root),
        classes=classes,
        volumes=volumes,
    )
    report_path = paths.reports / REPORT_NAME
    write_text_atomic(markdown, report_path)
    verdict, _ = headline(retrain, quality)
    logger.info("report: %s (verdict: %s)", report_path, verdict)
    return {
        "report": str(report_path),
        "markdown": markdown,
        "images": images,
        "table": metric_table(retrain),
        "verdict": verdict,
        "rejected": rejected,
    }
