"""Preflight: enough real images per class and split, checked in seconds before any training.

Reads the ingested real dataset's manifest (``class_counts``, no pixels) and, for a
segmentation pipeline, the ``split``/``mask`` columns (to count images that carry a mask).
Every class is checked in every split against ``cfg.preflight``'s minimums
(:class:`tasks.config.PreflightSpec`); a dataset without labels is checked per split.

- enough data: ``{"passed": True, ...}``;
- too little and not opted in: :class:`DataError`, one line saying how many images are
  needed where, before minutes of training are spent;
- too little and ``preflight.allow_too_little_data: true``: one warning, ``{"passed": False,
  ...}``; the retrain stage then gives the verdict "not tested: too little data".

Called by the Prefect flow right after ingest, by the train stage first thing (so the DVC
path ``synthmed stage train`` runs it too) and by the retrain stage for its verdict.
"""

from __future__ import annotations

import logging
from typing import Any

from generators.errors import DataError
from generators.shards import iter_tables, read_manifest
from tasks.config import PipelineConfig
from tasks.paths import PipelinePaths

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
ALL_IMAGES = "(all images)"  # the one group of a dataset without labels
MAX_CLASSES_NAMED = 4  # in the one-line error; the rest is counted
NOT_TESTED = "not tested: too little data"


def _name(label: str) -> str:
    """A class name on one line (labels come from folder names and CSV cells)."""
    return " ".join(str(label).split())


def count_images(cfg: PipelineConfig, paths: PipelinePaths) -> dict[str, dict[str, int]]:
    """``{split: {group: n}}`` for train/val/test: groups are the dataset's labels (every
    label in every split, 0 where absent), or :data:`ALL_IMAGES` when no row has a label.
    For a segmentation pipeline ``n`` counts only rows with a mask."""
    manifest = read_manifest(paths.real)
    per_split: dict[str, dict[str, int]] = manifest.get("class_counts") or {}
    labels = sorted({label for counts in per_split.values() for label in counts if label})
    if cfg.retrain.task == "segmentation":
        source: dict[str, dict[str, int]] = {}
        for table in iter_tables(paths.real, columns=["split", "label", "mask"]):
            rows = zip(
                table.column("split").to_pylist(),
                table.column("label").to_pylist(),
                table.column("mask").is_valid().to_pylist(),
                strict=True,
            )
            for split, label, has_mask in rows:
                counts = source.setdefault(split, {})
                counts[label or ""] = counts.get(label or "", 0) + int(has_mask)
        per_split = source
    result: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        counts = per_split.get(split) or {}
        if labels:
            result[split] = {label: int(counts.get(label, 0)) for label in labels}
        else:
            result[split] = {ALL_IMAGES: int(sum(counts.values()))}
    return result


def minimums(cfg: PipelineConfig) -> dict[str, int]:
    """``{split: minimum images per class}`` from ``cfg.preflight``."""
    spec = cfg.preflight
    return {"train": spec.min_train_per_class, "val": spec.min_val_per_class, "test": spec.min_test_per_class}


def find_problems(counts: dict[str, dict[str, int]], need: dict[str, int], unit: str = "images") -> list[str]:
    """One line per class (group) below a minimum in some split, e.g.
    ``class 'dense' has 2 train / 0 val / 0 test images``; empty when every count suffices."""
    groups = sorted({g for split in counts.values() for g in split})
    if not groups:
        return [f"the dataset has no {unit}"]
    problems = []
    for group in groups:
        have = {split: counts.get(split, {}).get(group, 0) for split in SPLITS}
        if any(have[split] < need[split] for split in SPLITS):
            name = "all images" if group == ALL_IMAGES else f"class '{_name(group)}'"
            problems.append(f"{name} has " + " / ".join(f"{have[s]} {s}" for s in SPLITS) + f" {unit}")
    return problems


def too_little_message(problems: list[str], need: dict[str, int], unit: str = "images") -> str:
    """The one-line error (or warning) for ``problems`` from :func:`find_problems`."""
    shown = problems[:MAX_CLASSES_NAMED]
    more = f" and {len(problems) - len(shown)} more class(es)" if len(problems) > len(shown) else ""
    return (
        f"too little data: {', '.join(shown)}{more}; need >= "
        + " / ".join(str(need[s]) for s in SPLITS)
        + f" {' / '.join(SPLITS)} {unit} per class: add {unit} (or change preprocess.split, or lower the "
        "preflight minimums) or set preflight.allow_too_little_data: true "
        f"(the verdict will then be '{NOT_TESTED}')"
    )


def preflight(cfg: PipelineConfig, paths: PipelinePaths) -> dict[str, Any]:
    """Check the real dataset's images per class and split against ``cfg.preflight``.

    Returns ``{"passed": bool, "problems": [one-line str], "counts": {split: {class: n}},
    "minimums": {split: n}, "allowed": bool, "unit": str}``. Raises :class:`DataError`
    (one line) when a count is below its minimum and ``allow_too_little_data`` is false;
    with it, logs one warning and returns ``passed: False``. Reads the manifest (and, for
    segmentation, the mask column): seconds, no decoding of pixels."""
    unit = "images with a mask" if cfg.retrain.task == "segmentation" else "images"
    counts = count_images(cfg, paths)
    need = minimums(cfg)
    problems = find_problems(counts, need, unit)
    result = {
        "passed": not problems,
        "problems": problems,
        "counts": counts,
        "minimums": need,
        "allowed": cfg.preflight.allow_too_little_data,
        "unit": unit,
    }
    if not problems:
        logger.info(
            "preflight passed: every class has >= %s %s",
            " / ".join(f"{need[s]} {s}" for s in SPLITS),
            unit,
        )
        return result
    message = too_little_message(problems, need, unit)
    if not cfg.preflight.allow_too_little_data:
        raise DataError(message)
    logger.warning("%s; going on because preflight.allow_too_little_data is true", message.split("; need")[0])
    return result
