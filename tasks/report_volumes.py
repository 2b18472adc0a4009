"""The report's sections for volume pipelines (``preprocess.dims: 3``), hooked from
:mod:`tasks.report`: three-plane image grids, the 2.5D metrics per plane, the 3D
two-sample test, the per-class segmentation comparison, and the warning that cubes of one
subject are not independent subjects.

Grids (``grid_real.png``, ``grid_synthetic.png``): one column per volume (up to
``report.grid_per_class``, evenly spaced over the rows sorted by id), one row per plane
with the middle slice of each volume (axial, coronal, sagittal), each followed by the same
slice with its mask overlaid (grey matter red, white matter blue, other classes yellow)
when the rows have masks. Volumes are RAS+ (:mod:`tasks.readers`), cut and turned with
:func:`tasks.readers.cut_volume`: anterior up in axial, superior up in coronal and
sagittal, the subject's left on the left (neurological convention). Both grids share one
display window taken from the picked REAL volumes (:func:`display_window`), so a synthetic
set that is too dark or too bright shows as such; tiles are upscaled (nearest) to TILE_PX.
Deterministic.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from generators.shards import decode_image, iter_tables, read_table, to_unit_float
from tasks.quality_report import md_cell
from tasks.quality_volumes_slices import PLANE_AXES, PLANES
from tasks.readers import cut_volume

logger = logging.getLogger(__name__)

GRID_REAL = "grid_real.png"
GRID_SYNTHETIC = "grid_synthetic.png"
TILE_PX = 96
GAP_PX = 2
LABEL_WIDTH_PX = 110
HEADER_PX = 18
#: what the row labels say about orientation
PLANE_HINTS = {"axial": "A up", "coronal": "S up", "sagittal": "S up, A right"}
#: overlay colours of mask classes 1, 2 (others: the last), blended at OVERLAY_ALPHA
MASK_COLOURS = ((230, 60, 60), (70, 140, 255), (240, 220, 40))
OVERLAY_ALPHA = 0.45
ONE_SUBJECT_SENTENCE = (
    "All real cubes are patches of one brain: they are not independent subjects, so intervals over "
    "test cubes overstate certainty."
)


# --------------------------------------------------------------------------- pictures
def pick_volumes(
    dataset: Path, splits: list[str] | None, count: int
) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """Up to ``count`` rows evenly spaced over the rows sorted by id: ``(id, volume float32
    (1, D, H, W) in [0, 1], mask int64 (D, H, W) or None)``; only picked rows are decoded."""
    ids = sorted(read_table(dataset, columns=["id"], splits=splits).column("id").to_pylist())
    if not ids:
        return []
    positions = np.unique(np.linspace(0, len(ids) - 1, min(count, len(ids))).round().astype(int))
    wanted = {ids[p] for p in positions}
    picked = []
    for table in iter_tables(dataset, columns=["id", "image", "mask"], splits=splits):
        for row_id, image, mask in zip(*(table.column(c).to_pylist() for c in ("id", "image", "mask")), strict=True):
            if row_id in wanted:
                volume = to_unit_float(decode_image(image))
                picked.append((row_id, volume, None if mask is None else decode_image(mask)[0].astype(np.int64)))
    return sorted(picked, key=lambda r: r[0])


def display_window(volumes: list[tuple[str, np.ndarray, np.ndarray | None]]) -> tuple[float, float]:
    """``(low, high)`` in [0, 1]: high = the 99.5th percentile of the voxels, low = the 2nd
    percentile of the tissue voxels (above 5% of high), so that background stays black and
    the grey/white matter contrast fills the grey scale; (0, 1) without volumes."""
    if not volumes:
        return 0.0, 1.0
    voxels = np.concatenate([volume.ravel() for _, volume, _ in volumes])
    high = float(np.percentile(voxels, 99.5))
    tissue = voxels[voxels > 0.05 * high]
    low = float(np.percentile(tissue, 2)) if tissue.size else 0.0
    return (low, high) if high > low else (0.0, 1.0)


def _tile(cut: np.ndarray, mask: np.ndarray | None, window: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """uint8 RGB ``(TILE_PX, TILE_PX, 3)``: a 2D cut in [0, 1] shown through ``window`` (low,
    high), optionally with its mask overlaid, scaled (nearest, aspect kept) into the tile and
    centred on black."""
    low, high = window
    grey = np.rint(np.clip((cut - low) / (high - low), 0, 1) * 255).astype(np.float64)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if mask is not None:
        for c in np.unique(mask):
            if c > 0:
                colour = np.asarray(MASK_COLOURS[min(int(c), len(MASK_COLOURS)) - 1], np.float64)
                inside = mask == c
                rgb[inside] = (1 - OVERLAY_ALPHA) * rgb[inside] + OVERLAY_ALPHA * colour
    h, w = cut.shape
    scale = TILE_PX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resized = np.asarray(Image.fromarray(np.rint(rgb).astype(np.uint8), "RGB").resize(size, Image.NEAREST))
    tile = np.zeros((TILE_PX, TILE_PX, 3), np.uint8)
    y, x = (TILE_PX - size[1]) // 2, (TILE_PX - size[0]) // 2
    tile[y : y + size[1], x : x + size[0]] = resized
    return tile


def render_volume_grid(
    volumes: list[tuple[str, np.ndarray, np.ndarray | None]],
    title: str,
    columns: int,
    window: tuple[float, float] = (0.0, 1.0),
) -> Image.Image:
    """An RGB picture: a header line (``title``), then per plane a row of middle slices and,
    when every picked row has a mask, a row with the mask overlaid; ``columns`` tiles a row
    (missing ones stay dark). Row labels name the plane and its orientation; intensities go
    through ``window`` (see :func:`display_window`)."""
    with_masks = bool(volumes) and all(mask is not None for _, _, mask in volumes)
    rows: list[tuple[str, str, bool]] = []
    for plane in PLANES:
        rows.append((plane, f"{plane}\n({PLANE_HINTS[plane]})", False))
        if with_masks:
            rows.append((plane, f"{plane}\n+ mask", True))
    height = HEADER_PX + len(rows) * (TILE_PX + GAP_PX) + GAP_PX
    width = LABEL_WIDTH_PX + columns * (TILE_PX + GAP_PX)
    canvas = np.full((height, width, 3), 32, np.uint8)
    for r, (plane, _, overlay) in enumerate(rows):
        axis = PLANE_AXES[plane]
        y = HEADER_PX + GAP_PX + r * (TILE_PX + GAP_PX)
        for c, (_, volume, mask) in enumerate(volumes[:columns]):
            middle = volume.shape[1 + axis] // 2
            cut = cut_volume(volume[0], axis, middle)
            cut_mask = cut_volume(mask, axis, middle) if overlay and mask is not None else None
            x = LABEL_WIDTH_PX + c * (TILE_PX + GAP_PX)
            canvas[y : y + TILE_PX, x : x + TILE_PX] = _tile(cut, cut_mask, window)
    picture = Image.fromarray(canvas, mode="RGB")
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    draw.text((4, 3), title if volumes else f"{title}: none", fill=(255, 255, 255), font=font)
    for r, (_, label, _) in enumerate(rows):
        y = HEADER_PX + GAP_PX + r * (TILE_PX + GAP_PX) + TILE_PX // 2 - 12
        draw.text((4, y), label, fill=(255, 255, 255), font=font)
    return picture


def write_grids(real: Path, filtered: Path, reports: Path, count: int, shape: list[int] | None) -> list[str]:
    """Write ``grid_real.png`` (real train) and ``grid_synthetic.png`` (kept synthetic) to
    ``reports``; returns their paths."""
    from tasks.report import save_png

    cube = "x".join(str(s) for s in shape) if shape else "volume"
    real_volumes = pick_volumes(real, ["train"], count)
    window = display_window(real_volumes)
    shown = f"window {window[0]:.2f}-{window[1]:.2f} (real)"
    written = []
    for name, volumes, title in (
        (GRID_REAL, real_volumes, f"real train, {cube} cubes: middle slices, {shown}"),
        (GRID_SYNTHETIC, pick_volumes(filtered, None, count), f"synthetic (kept), {cube}: middle slices, {shown}"),
    ):
        save_png(render_volume_grid(volumes, title, count, window), reports / name)
        written.append(str(reports / name))
    return written


# --------------------------------------------------------------------------- markdown
def _num(value: Any) -> str:
    """Three significant digits, or ``n/a``."""
    return f"{value:.3g}" if isinstance(value, (int, float)) else "n/a"


def _auc(value: Any) -> str:
    """Two decimals, or ``n/a``."""
    return f"{value:.2f}" if isinstance(value, (int, float)) else "n/a"


def metrics_25d_section(set_metrics: dict[str, Any] | None) -> list[str]:
    """The 2.5D table: per plane and their mean, the kept set's FID, KID, precision, recall
    against real train, and real val's FID as the real-vs-real reference."""
    if not isinstance(set_metrics, dict) or not isinstance(set_metrics.get("planes"), dict):
        return ["2.5D metrics were not computed (quality.metrics.enabled: false).", ""]
    extractor = set_metrics.get("extractor") or {}
    reliable = (extractor.get("quality") or {}).get("reliable")
    lines = [
        "### 2.5D set metrics (slices in three planes)",
        "",
        f"Kept synthetic volumes vs real train, on 2D slices of each plane, features of "
        f"{md_cell(extractor.get('name'))} ({md_cell(extractor.get('normalisation'))}); the mean over the planes "
        "is the number the gate and the summary use. Real val cubes (centre-cropped to the train size) give "
        "the real-vs-real reference.",
        "",
    ]
    if reliable is False:
        reason = (extractor.get("quality") or {}).get("reason")
        lines += [
            f"The extractor's quality could not be shown ({md_cell(reason or 'linear probe near chance')}): "
            "read these numbers as relative, not as a verdict.",
            "",
        ]
    lines += [
        "| plane | kept FID | kept KID | kept precision | kept recall | real val FID (reference) | real slices |",
        "|---|---|---|---|---|---|---|",
    ]
    planes = set_metrics["planes"]
    entries = [(p, (planes.get(p) or {}).get("sets") or {}, (planes.get(p) or {}).get("n_real_slices")) for p in PLANES]
    entries.append(("mean", set_metrics.get("mean") or {}, None))
    for name, sets, n in entries:
        kept = (sets.get("kept") or {}).get("overall") or {}
        val = (sets.get("real_val") or {}).get("overall") or {}
        lines.append(
            f"| {name} | {_num(kept.get('fid'))} | {_num(kept.get('kid_mean'))} | {_num(kept.get('precision'))} | "
            f"{_num(kept.get('recall'))} | {_num(val.get('fid'))} | {n if n is not None else ''} |"
        )
    return [*lines, ""]


def realism_section(quality: dict[str, Any]) -> list[str]:
    """One paragraph on the volumes' two-sample test (the table is in the quality section)."""
    test = (quality.get("realism") or {}).get("two_sample")
    if not isinstance(test, dict):
        return ["The two-sample test was not run (quality.realism.enabled: false).", ""]
    if test.get("auc") is None:
        line = f"Two-sample test: no AUC ({md_cell(test.get('reason') or 'too few volumes')})."
    else:
        volumes = (test.get("n_real_volumes"), test.get("n_synthetic_volumes"))
        counted = (
            f"{volumes[0]} real and {volumes[1]} synthetic volumes ({test.get('n_real')} and "
            f"{test.get('n_synthetic')} slices)"
            if None not in volumes
            else f"{test.get('n_real')} real and {test.get('n_synthetic')} synthetic volumes"
        )
        line = (
            f"Two-sample test ({md_cell(test.get('network'))}, {test.get('folds')} folds): "
            f"AUC {_auc(test['auc'])} [{_auc(test.get('ci95_low'))}, {_auc(test.get('ci95_high'))}] over "
            f"{counted} (0.5 = indistinguishable)."
        )
        if test.get("method"):
            line += f" Method: {md_cell(test['method'])}."
    if test.get("note"):
        line += f" {md_cell(test['note'])}."
    return [line, ""]


def segmentation_section(retrain: dict[str, Any] | None) -> list[str]:
    """Per foreground class, Dice and HD95 (mean over seeds) of real only, real + synthetic
    and their delta, from ``retrain.json`` ``volumes.per_class`` (or ``per_class``)."""
    block = None
    if isinstance(retrain, dict):
        volumes = retrain.get("volumes") if isinstance(retrain.get("volumes"), dict) else {}
        block = volumes.get("per_class") or retrain.get("per_class")
    lines = ["### 3D segmentation per class", ""]
    if not isinstance(block, dict) or not isinstance(block.get("real_only"), dict) or not block["real_only"]:
        return [*lines, "Per-class segmentation scores are not available (retrain.json has no per_class block).", ""]
    unit = ((retrain or {}).get("volumes") or {}).get("hd95_unit") or "voxels"
    lines += [
        f"Mean over seeds of each class's mean over test volumes; HD95 in {md_cell(unit)} (lower is better).",
        "",
        "| class | Dice real only | Dice real + synthetic | Dice delta | HD95 real only | HD95 real + synthetic | HD95 delta |",
        "|---|---|---|---|---|---|---|",
    ]

    def mean(setting: str, name: str, metric: str) -> str:
        entry = block.get(setting)
        entry = entry.get(name) if isinstance(entry, dict) else None
        entry = entry.get(metric) if isinstance(entry, dict) else None
        return _num(entry.get("mean") if isinstance(entry, dict) else None)

    for name in block["real_only"]:
        cells = [mean(s, name, m) for m in ("dice", "hd95") for s in ("real_only", "augmented", "delta")]
        lines.append(f"| {md_cell(name)} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def volumes_markdown(quality: dict[str, Any], retrain: dict[str, Any] | None, provenance: dict[str, Any]) -> list[str]:
    """The report's 3D part, in place of the 2D image section: the one-subject warning when
    flagged, the 2.5D table, the 2.5D two-sample test, the per-class segmentation comparison
    and the three-plane grids."""
    one_subject = bool(provenance.get("patches_of_one_subject")) or bool(
        (quality.get("volumes") or {}).get("patches_of_one_subject")
    )
    shape = provenance.get("volume_shape") or (quality.get("volumes") or {}).get("volume_shape")
    spacing = provenance.get("spacing_mm")
    lines = ["## Volumes (3D)", ""]
    described = f"Train rows are {'x'.join(map(str, shape))} volumes" if shape else "Rows are volumes"
    if spacing:
        described += f" at {' x '.join(f'{s:g}' for s in spacing)} mm"
    lines += [described + ".", ""]
    if one_subject:
        lines += [f"**{ONE_SUBJECT_SENTENCE}**", ""]
    lines += metrics_25d_section(quality.get("set_metrics"))
    lines += realism_section(quality)
    lines += segmentation_section(retrain)
    lines += [
        "## Images",
        "",
        "Real (train split): middle slices in three planes (rows), one volume per column, with the mask "
        "overlaid where the rows have masks (red grey matter, blue white matter):",
        "",
        f"![real volumes, axial, coronal and sagittal middle slices]({GRID_REAL})",
        "",
        "Synthetic, kept by the filter, the same way:",
        "",
        f"![synthetic volumes, axial, coronal and sagittal middle slices]({GRID_SYNTHETIC})",
        "",
    ]
    return lines
