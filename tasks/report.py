"""Stage ``report``: one Markdown page a person can read, with pictures.

Reads ``metrics/retrain.json`` and ``metrics/quality.json`` (both required), the real and
filtered datasets' manifests and rows, and the generator's ``card.yaml`` (optional), and
writes to ``paths.reports``:

- ``report.md``: the real-only vs real+synthetic table (mean +/- 95% CI half-width over
  seeds, delta with its seed and bootstrap intervals) and the verdict; class counts of the
  real splits and of the synthetic rows generated / dropped / kept / used; the generator
  card's summary; the two image grids;
- ``grid_real.png`` and ``grid_synthetic.png``: one row per class, ``report.grid_per_class``
  images per row, picked evenly over the rows sorted by id (deterministic; the PNG bytes
  are identical on rerun).
"""

from __future__ import annotations

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

logger = logging.getLogger(__name__)

REPORT_NAME = "report.md"
GRID_REAL = "grid_real.png"
GRID_SYNTHETIC = "grid_synthetic.png"
TILE_MIN_PX = 64  # small images are upscaled (nearest) to at least this many pixels
GAP_PX = 2
LABEL_WIDTH_PX = 96
SETTING_TITLES = {"real_only": "real only", "augmented": "real + synthetic"}


# --------------------------------------------------------------------------- inputs
def read_metrics(path: Path, stage: str) -> dict[str, Any]:
    """A metrics JSON file written by ``stage``; a clear error when it is missing."""
    if not path.is_file():
        raise DataError(f"{path}: expected the metrics of the '{stage}' stage, found none; run `synthmed stage {stage}` first")
    return json.loads(path.read_text())


def read_card_summary(path: Path) -> dict[str, Any] | None:
    """id, version, architecture, training time and a few more fields of a model card
    (read with ``yaml.safe_load``), or None when there is no card."""
    if not path.is_file():
        return None
    try:
        card = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: expected a YAML model card, got unparsable YAML ({exc}); rerun the train stage") from None
    if not isinstance(card, dict):
        raise ConfigError(f"{path}: expected a YAML mapping (a model card), got {type(card).__name__}; rerun the train stage")
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


def pick_rows(dataset: Path, splits: list[str] | None, classes: list[str], per_class: int) -> dict[str, list[np.ndarray]]:
    """Up to ``per_class`` images per class, evenly spaced over the class's rows sorted by
    id. Returns ``{class: [float32 (C, H, W) in [0, 1], ...]}``; only picked rows are decoded."""
    table = read_table(dataset, columns=["id", "label"], splits=splits)
    by_class: dict[str, list[str]] = {c: [] for c in classes}
    for row_id, label in zip(table.column("id").to_pylist(), table.column("label").to_pylist()):
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
            for row_id, image in zip(arrays.ids, arrays.images):
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


def save_png(picture: Image.Image, path: Path) -> None:
    """Write a PNG atomically; PIL writes no timestamp, so the bytes are reproducible."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        picture.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- text
def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _mean_ci(stats: dict[str, Any]) -> str:
    if stats.get("ci95_low") is None:
        return f"{_fmt(stats['mean'])} (1 seed)"
    half = (stats["ci95_high"] - stats["ci95_low"]) / 2
    return f"{_fmt(stats['mean'])} ± {half:.3f}"


def _interval(low: float | None, high: float | None) -> str:
    if low is None or high is None:
        return "n/a"
    return f"[{_fmt(low, True)}, {_fmt(high, True)}]"


def metric_table(retrain: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric: means and 95% bounds of both settings and of the delta."""
    rows = []
    for metric, delta in retrain["delta"].items():
        row: dict[str, Any] = {"metric": metric, "primary": metric == retrain["primary_metric"]}
        for setting in ("real_only", "augmented"):
            stats = retrain[setting][metric]
            row.update({f"{setting}_mean": stats["mean"], f"{setting}_ci95_low": stats["ci95_low"],
                        f"{setting}_ci95_high": stats["ci95_high"]})
        row.update(
            delta_mean=delta["mean"],
            delta_ci95_low=delta["ci95_low"],
            delta_ci95_high=delta["ci95_high"],
            delta_bootstrap_ci95_low=delta["bootstrap_ci95_low"],
            delta_bootstrap_ci95_high=delta["bootstrap_ci95_high"],
        )
        rows.append(row)
    return rows


def _verdict_line(retrain: dict[str, Any]) -> str:
    primary = retrain["primary_metric"]
    delta = retrain["delta"][primary]
    seeds = len(retrain["seeds"])
    why = {
        "helped": "every 95% interval of the delta lies above zero",
        "hurt": "every 95% interval of the delta lies below zero",
        "no measurable effect": "a 95% interval of the delta includes zero",
    }.get(retrain["verdict"], "")
    return (
        f"**Verdict on {primary}: {retrain['verdict']}**: delta {_fmt(delta['mean'], True)}, "
        f"95% CI over {seeds} seed(s) {_interval(delta['ci95_low'], delta['ci95_high'])}, "
        f"bootstrap over {retrain['n_test']} test images "
        f"{_interval(delta['bootstrap_ci95_low'], delta['bootstrap_ci95_high'])}; {why}."
    )


def _counts_table(real: dict[str, dict[str, int]], quality: dict[str, Any], used: dict[str, int], classes: list[str]) -> list[str]:
    splits = [s for s in ("train", "val", "test") if s in real] + sorted(set(real) - {"train", "val", "test"})
    per_class = quality.get("per_class", {})
    header = [*(f"real {s}" for s in splits), "synthetic generated", "dropped (sanity)", "dropped (label)", "kept",
              "used in retrain"]
    lines = ["| class | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    labels = list(classes) + sorted((set(per_class) | {lab for c in real.values() for lab in c}) - set(classes))
    for label in labels:
        entry = per_class.get(label, {})
        cells = [str(real.get(s, {}).get(label, 0)) for s in splits]
        cells += [str(entry.get(k, 0)) for k in ("generated", "dropped_sanity", "dropped_label", "kept")]
        cells.append(str(used.get(label, 0)))
        lines.append(f"| {label or '(unlabelled)'} | " + " | ".join(cells) + " |")
    totals = quality.get("totals", {})
    cells = [str(sum(real.get(s, {}).values())) for s in splits]
    cells += [str(totals.get(k, 0)) for k in ("generated", "dropped_sanity", "dropped_label", "kept")]
    cells.append(str(sum(used.values())))
    lines.append("| **total** | " + " | ".join(cells) + " |")
    return lines


def render_markdown(
    pipeline: str,
    description: str,
    retrain: dict[str, Any],
    quality: dict[str, Any],
    real_counts: dict[str, dict[str, int]],
    card: dict[str, Any] | None,
    card_path: str,
) -> str:
    """The report's Markdown (pure function of its inputs)."""
    lower = set(retrain.get("lower_is_better", []))
    seeds = retrain["seeds"]
    lines = [f"# synthmed report: {pipeline}", ""]
    if description:
        lines += [description, ""]
    lines += [
        "## Does synthetic data help?",
        "",
        f"Downstream {retrain['task']} with {retrain['network']}: {retrain['steps']} optimizer steps, batch "
        f"{retrain['batch_size']}, lr {retrain['lr']}, seeds {', '.join(map(str, seeds))}. "
        f"*real only*: {retrain['n_real_train']} real train images; *real + synthetic*: plus "
        f"{retrain['n_synthetic_used']} filtered synthetic images (ratio {retrain['synthetic_ratio']}). "
        f"Both evaluated on {retrain['n_test']} real test images.",
        "",
        "| metric | real only | real + synthetic | delta | delta 95% CI (seeds) | delta 95% CI (bootstrap) |",
        "|---|---|---|---|---|---|",
    ]
    for row in metric_table(retrain):
        metric = row["metric"]
        name = f"**{metric}**" if row["primary"] else metric
        name += " (lower is better)" if metric in lower else ""
        lines.append(
            f"| {name} | {_mean_ci(retrain['real_only'][metric])} | {_mean_ci(retrain['augmented'][metric])} | "
            f"{_fmt(row['delta_mean'], True)} | {_interval(row['delta_ci95_low'], row['delta_ci95_high'])} | "
            f"{_interval(row['delta_bootstrap_ci95_low'], row['delta_bootstrap_ci95_high'])} |"
        )
    lines += [
        "",
        f"Values: mean ± half-width of the 95% t-interval over {len(seeds)} seed(s). "
        "Delta = real + synthetic − real only, paired by seed.",
        "",
        _verdict_line(retrain),
        "",
        "## Data",
        "",
        *_counts_table(real_counts, quality, retrain.get("synthetic_used_per_class", {}), retrain.get("classes", [])),
        "",
    ]
    classifier = quality.get("label_classifier")
    if classifier and classifier.get("val_accuracy") is not None:
        drop = classifier.get("val_would_drop_fraction")
        lines += [
            f"Label-consistency filter: its classifier ({classifier['network']}, {classifier['steps']} steps) "
            f"reaches accuracy {_fmt(classifier['val_accuracy'])} on {classifier['n_val']} real val images"
            + (f" and would drop {100 * drop:.1f}% of them." if drop is not None else "."),
            "",
        ]
    elif classifier:
        lines += ["Label-consistency filter: no labelled val split, so its accuracy is unknown.", ""]
    lines += ["## Generator", ""]
    if card is None:
        lines += [f"No model card at `{card_path}`; the generator is not described here.", ""]
    else:
        time_s = card.get("training_time_s")
        lines += [
            "| id | version | architecture | training time | epochs | training images |",
            "|---|---|---|---|---|---|",
            f"| {card.get('id') or 'n/a'} | {card.get('version') or 'n/a'} | {card.get('architecture') or 'n/a'} | "
            f"{f'{time_s:.1f} s' if isinstance(time_s, (int, float)) else 'n/a'} | "
            f"{card.get('training_epochs') if card.get('training_epochs') is not None else 'n/a'} | "
            f"{card.get('training_images') if card.get('training_images') is not None else 'n/a'} |",
            "",
        ]
        if card.get("intended_use"):
            lines += [f"Intended use: {card['intended_use']}", ""]
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
def report(cfg: PipelineConfig, paths: PipelinePaths) -> dict[str, Any]:
    """Write ``report.md`` and the two PNG grids; returns ``{"report": path, "markdown":
    text, "images": [paths], "table": [row dicts of the metrics table]}``."""
    retrain = read_metrics(paths.metrics / "retrain.json", "retrain")
    quality = read_metrics(paths.metrics / "quality.json", "filter")
    real_counts = read_manifest(paths.real)["class_counts"]
    classes = list(retrain.get("classes") or sorted({lab for c in real_counts.values() for lab in c if lab}))
    card_path = paths.generator / "card.yaml"
    card = read_card_summary(card_path)
    if card is None:
        logger.info("%s: no generator card; the report leaves the generator out", card_path)

    per_class = cfg.report.grid_per_class
    paths.reports.mkdir(parents=True, exist_ok=True)
    images = []
    for name, dataset, splits in ((GRID_REAL, paths.real, ["train"]), (GRID_SYNTHETIC, paths.filtered, None)):
        picture = render_grid(pick_rows(dataset, splits, classes, per_class), per_class)
        save_png(picture, paths.reports / name)
        images.append(str(paths.reports / name))

    shown_card_path = card_path.relative_to(paths.root).as_posix() if card_path.is_relative_to(paths.root) else str(card_path)
    markdown = render_markdown(paths.pipeline, cfg.description, retrain, quality, real_counts, card, shown_card_path)
    report_path = paths.reports / REPORT_NAME
    write_text_atomic(markdown, report_path)
    logger.info("report: %s (verdict: %s)", report_path, retrain["verdict"])
    return {"report": str(report_path), "markdown": markdown, "images": images, "table": metric_table(retrain)}
