"""The nearest-neighbour filters of the quality stage: memorisation (near-copies of real
TRAIN images) and near-duplicates among synthetic images. Pure functions of arrays; the
stage (:mod:`tasks.filter`) reads the data and writes the results.

Distances live in one of two spaces (:func:`space_vectors`): ``pixel``, the RMSE of [0, 1]
pixels (so thresholds do not depend on the image size), or ``feature``, Euclidean in the
extractor's features. A threshold is absolute (``max_distance``) or calibrated on the real
train split: ``calibration_scale`` x the ``calibration_quantile`` of each real image's
distance to the nearest real image of another subject (:func:`real_reference`), which is
how close two different patients' images get. Translated or flipped copies are not
caught in pixel space.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from generators.errors import DataError
from tasks import quality_metrics
from tasks.config import NearestNeighbourFilter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FilterResult:
    """``keep``: bool ``(n,)`` over all synthetic rows; ``column``: the float64 ``(n,)`` score
    column (NaN where not scored); ``info``: the JSON record of ``quality.json``."""

    keep: np.ndarray
    column: np.ndarray
    info: dict[str, Any]


def space_vectors(space: str, images: np.ndarray, feats: np.ndarray | None) -> np.ndarray:
    """float64 rows whose Euclidean distance is the filter's distance: ``pixel`` ->
    images ``(N, C, H, W)`` flattened and divided by sqrt(C*H*W) (distance = RMSE of [0, 1]
    pixels); ``feature`` -> the features ``(N, D)``. Volumes ``(N, C, D, H, W)``, whatever
    ``space``: :func:`volume_vectors` (correlation of pooled volumes)."""
    if images.ndim == 5:
        return volume_vectors(images)
    if space == "feature":
        return np.asarray(feats, dtype=np.float64)
    flat = images.reshape(images.shape[0], int(np.prod(images.shape[1:]))).astype(np.float64)
    return flat / math.sqrt(max(flat.shape[1], 1))


def subject_groups(subjects: Sequence[str | None]) -> tuple[np.ndarray, str]:
    """int64 group per real train row: its subject, or the row itself when there is only
    one subject; and the name of the resulting reference distance."""
    if len(set(subjects)) >= 2:
        codes = {name: i for i, name in enumerate(sorted(set(map(str, subjects))))}
        groups = np.asarray([codes[str(s)] for s in subjects], np.int64)
        return groups, "nearest real train image of another subject"
    return np.arange(len(subjects), dtype=np.int64), "nearest other real train image (one subject)"


def real_reference(vectors: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """float64 ``(N,)``: each real row's distance to the nearest real row of another group
    (inf when there is none)."""
    distance, _ = quality_metrics.nearest_distances(vectors, vectors, groups, groups)
    return distance


def threshold(spec: NearestNeighbourFilter, reference: np.ndarray, reference_kind: str) -> dict[str, Any]:
    """``{"threshold", "threshold_source", "reference": {kind, n, quantile, value}}``."""
    finite = reference[np.isfinite(reference)]
    info: dict[str, Any] = {
        "reference": {
            "kind": reference_kind,
            "n": int(finite.size),
            "quantile": spec.calibration_quantile,
            "value": float(np.quantile(finite, spec.calibration_quantile)) if finite.size else None,
        }
    }
    if spec.max_distance is not None:
        return {**info, "threshold": float(spec.max_distance), "threshold_source": "absolute"}
    if not finite.size:
        raise DataError(
            "expected at least 2 real train images to calibrate the nearest-neighbour filters, got fewer; "
            "set quality.memorisation.max_distance and quality.duplicates.max_distance"
        )
    value = spec.calibration_scale * info["reference"]["value"]
    if value == 0:
        logger.warning(
            "calibrated %s threshold is 0 (real train holds identical images); nothing is dropped", spec.space
        )
    return {**info, "threshold": float(value), "threshold_source": "calibrated"}


def memorisation_filter(
    spec: NearestNeighbourFilter,
    limit: dict[str, Any],
    n: int,
    usable: np.ndarray,
    synthetic: np.ndarray,
    real: np.ndarray,
) -> FilterResult:
    """Distance of each usable synthetic row (``synthetic`` vectors, in the order of the row
    numbers ``usable``) to its nearest real train vector; rows closer than the threshold, and
    rows that could not be scored, are dropped. ``limit``: from :func:`threshold`."""
    column = np.full(n, math.nan)
    if usable.size:
        nearest, _ = quality_metrics.nearest_distances(synthetic, real)
        column[usable] = nearest
    keep = column >= limit["threshold"]  # NaN (unscorable) -> dropped
    below = int(np.sum(column[usable] < limit["threshold"]))
    info = {
        **spec.model_dump(mode="json"),
        **limit,
        "n_scored": int(usable.size),
        "n_below_threshold": below,
        "fraction_below_threshold": below / usable.size if usable.size else None,
    }
    logger.info(
        "memorisation: %d of %d synthetic images within %.4g of a real train image",
        below,
        usable.size,
        limit["threshold"],
    )
    return FilterResult(keep, column, info)


def duplicate_filter(
    spec: NearestNeighbourFilter,
    limit: dict[str, Any],
    n: int,
    candidates: np.ndarray,
    vectors: np.ndarray,
    in_running: np.ndarray,
) -> FilterResult:
    """Near-duplicates among the ``candidates`` (row numbers, id order; ``vectors`` in the
    same order): the column is each one's distance to the nearest other candidate (NaN when
    alone); of candidates closer than the threshold to each other only the first by id is
    kept (:func:`tasks.quality_metrics.first_of_each_group`). Rows out of the running
    (``in_running`` False) keep True here: an earlier filter counts them; rows in the
    running but not candidates (unscorable) are dropped."""
    rows = np.arange(candidates.size, dtype=np.int64)
    nearest, _ = quality_metrics.nearest_distances(vectors, vectors, rows, rows)
    column = np.full(n, math.nan)
    column[candidates] = np.where(np.isfinite(nearest), nearest, math.nan)
    first = quality_metrics.first_of_each_group(
        candidates.size, quality_metrics.close_pairs(vectors, limit["threshold"])
    )
    keep = ~in_running
    keep[candidates[first]] = True
    below = nearest < limit["threshold"]
    info = {
        **spec.model_dump(mode="json"),
        **limit,
        "n_scored": int(candidates.size),
        "n_below_threshold": int(below.sum()),
        "fraction_below_threshold": float(below.mean()) if candidates.size else None,
        "n_dropped": int(candidates.size - first.sum()),
    }
    return FilterResult(keep, column, info)


#: volumes are average-pooled to at most this many voxels per side before their distance
VOLUME_MAX_SIDE = 16


def volume_vectors(volumes: np.ndarray, max_side: int = VOLUME_MAX_SIDE) -> np.ndarray:
    """float64 ``(N, V)`` rows for the nearest-neighbour filters on volumes: each volume of
    float32 ``(N, C, D, H, W)`` in [0, 1] is average-pooled so that no side exceeds
    ``max_side`` (torch ``adaptive_avg_pool3d``), centred and scaled to unit norm, so the
    Euclidean distance of two rows is ``sqrt(2 (1 - r))`` with ``r`` the Pearson correlation
    of the pooled volumes: 0 for a copy (also one with changed brightness or contrast), about
    1.41 for unrelated noise. A constant volume becomes zeros (distance 1 to every other)."""
    import torch
    import torch.nn.functional as F

    if volumes.ndim != 5:
        raise DataError(f"expected volumes of shape (N, C, D, H, W), got {volumes.shape}")
    target = tuple(min(int(side), max_side) for side in volumes.shape[2:])
    with torch.no_grad():
        pooled = F.adaptive_avg_pool3d(torch.from_numpy(np.ascontiguousarray(volumes, dtype=np.float32)), target)
    flat = pooled.reshape(volumes.shape[0], -1).double().numpy()
    flat = flat - flat.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    return np.where(norms > 1e-12, flat / np.maximum(norms, 1e-12), 0.0)
