"""The ``set_metrics`` and ``gate`` blocks of ``quality.json`` (see :mod:`tasks.filter`).

:func:`set_metrics_block` measures sets of feature vectors against the real train split
with :mod:`tasks.quality_metrics`, overall and per class, and names the extractor and
normalisation next to the numbers; :func:`check_gate` compares the kept set's numbers with
``quality.gate``; :func:`gate_message` says, on one line, which bound failed and how to fix it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from generators.errors import DataError
from tasks import quality_metrics
from tasks.config import QualityGate, SetMetricsSpec

logger = logging.getLogger(__name__)

GATE_FIXES = {
    "max_fid": "improve the generator (train longer, pick another) or relax quality.gate.max_fid",
    "max_kid": "improve the generator (train longer, pick another) or relax quality.gate.max_kid",
    "min_precision": "the generator makes images unlike real ones: train it longer or relax quality.gate.min_precision",
    "min_recall": "the synthetic set misses part of the real data: synthesize more, train longer, "
    "or relax quality.gate.min_recall",
    "max_memorised_fraction": "the generator copies training images: train on more data or fewer epochs, "
    "or relax quality.gate.max_memorised_fraction",
    "min_kept_fraction": "the filters drop most images: check their thresholds or the generator, "
    "or relax quality.gate.min_kept_fraction",
}
SET_METRICS = ("fid", "kid", "precision", "recall")


@dataclass(frozen=True)
class FeatureSet:
    """One set to measure: features float32 ``(N, D)``, class labels ``(N,)`` (object
    array of str), and float32 images ``(N, C, H, W)`` in [0, 1] for MS-SSIM diversity, or
    None to skip it."""

    features: np.ndarray
    labels: np.ndarray
    images: np.ndarray | None = None


def diversity(
    images: np.ndarray | None,
    settings: quality_metrics.MsSsimSettings | None,
    spec: SetMetricsSpec,
    seed: int,
    device: str,
) -> dict[str, Any]:
    """``ms_ssim_mean``, ``ms_ssim_std``, ``ms_ssim_pairs`` of one set (None/0 when not computed)."""
    if settings is None or images is None:
        return {"ms_ssim_mean": None, "ms_ssim_std": None, "ms_ssim_pairs": 0}
    result = quality_metrics.ms_ssim_diversity(images, settings, pairs=spec.ms_ssim_pairs, seed=seed, device=device)
    return {"ms_ssim_mean": result["mean"], "ms_ssim_std": result["std"], "ms_ssim_pairs": result["n_pairs"]}


def compare(
    real: FeatureSet,
    mine: FeatureSet,
    classes: list[str],
    spec: SetMetricsSpec,
    settings: quality_metrics.MsSsimSettings | None,
    seed: int,
    device: str,
) -> dict[str, Any]:
    """``{"overall": M, "per_class": {name: M}}``: ``M`` = :func:`quality_metrics.compare_sets`
    of ``mine`` against ``real`` plus its MS-SSIM diversity."""

    def one(real_rows: np.ndarray, rows: np.ndarray) -> dict[str, Any]:
        result = quality_metrics.compare_sets(
            real.features[real_rows],
            mine.features[rows],
            k=spec.nearest_k,
            kid_subsets=spec.kid_subsets,
            kid_subset_size=spec.kid_subset_size,
            seed=seed,
        )
        images = None if mine.images is None else mine.images[rows]
        return {**result, **diversity(images, settings, spec, seed, device)}

    everything_real = np.ones(len(real.labels), bool)
    per_class = {name: one(real.labels == name, mine.labels == name) for name in classes}
    return {"overall": one(everything_real, np.ones(len(mine.labels), bool)), "per_class": per_class}


def set_metrics_block(
    spec: SetMetricsSpec,
    extractor: dict[str, Any],
    real: FeatureSet,
    sets: dict[str, FeatureSet | None],
    classes: list[str],
    *,
    seed: int,
    device: str = "cpu",
) -> dict[str, Any]:
    """The ``set_metrics`` block: every set of ``sets`` against ``real`` (real train), and the
    MS-SSIM diversity within ``real`` for reference. ``extractor``: the extractor's record
    (name, normalisation, ...). MS-SSIM settings come from the real images' size; a size
    too small for the kernel skips MS-SSIM (logged) rather than failing the stage."""
    settings = None
    if real.images is not None:
        try:
            settings = quality_metrics.ms_ssim_settings(*real.images.shape[2:], spec.ms_ssim_kernel_size)
        except DataError as exc:
            logger.warning("MS-SSIM skipped: %s", exc)
    measured = {
        name: None if chosen is None else compare(real, chosen, classes, spec, settings, seed, device)
        for name, chosen in sets.items()
    }
    real_diversity = {
        "overall": diversity(real.images, settings, spec, seed, device),
        "per_class": {
            name: diversity(
                None if real.images is None else real.images[real.labels == name], settings, spec, seed, device
            )
            for name in classes
        },
    }
    return {
        "extractor": extractor,
        "reference": "real train",
        "ms_ssim_settings": settings.as_dict() if settings else None,
        "sets": measured,
        "real_train_diversity": real_diversity,
    }


def check_gate(gate: QualityGate, quality: dict[str, Any]) -> dict[str, Any]:
    """``{"passed": bool, "checks": [{metric, bound_name, bound, value, passed}]}`` for every
    configured bound; a metric that could not be computed fails its bound."""
    overall = (((quality.get("set_metrics") or {}).get("sets") or {}).get("kept") or {}).get("overall") or {}
    memorisation = (quality.get("filters") or {}).get("memorisation") or {}
    values = {
        "max_fid": ("fid", overall.get("fid")),
        "max_kid": ("kid", overall.get("kid_mean")),
        "min_precision": ("precision", overall.get("precision")),
        "min_recall": ("recall", overall.get("recall")),
        "max_memorised_fraction": ("memorised_fraction", memorisation.get("fraction_below_threshold")),
        "min_kept_fraction": ("kept_fraction", quality.get("kept_fraction")),
    }
    checks = []
    for bound_name, (metric, value) in values.items():
        bound = getattr(gate, bound_name)
        if bound is None:
            continue
        ok = value is not None and (value <= bound if bound_name.startswith("max_") else value >= bound)
        checks.append({"metric": metric, "bound_name": bound_name, "bound": bound, "value": value, "passed": bool(ok)})
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def gate_message(gate: dict[str, Any], quality: dict[str, Any], outputs: str) -> str:
    """One line: every failed check (metric, value, bound, extractor, fix) and where the
    outputs were kept (``outputs``)."""
    extractor = (quality.get("set_metrics") or {}).get("extractor") or {}
    context = (
        f" (extractor {extractor.get('name')}, normalisation {extractor.get('normalisation')}, "
        "kept synthetic vs real train)"
        if extractor
        else ""
    )
    parts = []
    for check in gate["checks"]:
        if check["passed"]:
            continue
        sign = ">" if check["bound_name"].startswith("max_") else "<"
        value = "not computable (too few images)," if check["value"] is None else f"{check['value']:.6g} {sign}"
        shown = f"{check['metric']} {value} {check['bound_name']} {check['bound']:g}"
        if check["metric"] in SET_METRICS:
            shown += context
        parts.append(f"{shown}: {GATE_FIXES[check['bound_name']]}")
    return f"quality gate failed: {'; '.join(parts)}; outputs kept for inspection in {outputs}"
