"""The ``set_metrics`` and ``gate`` blocks of ``quality.json`` (see :mod:`tasks.filter`).

:func:`set_metrics_block` measures sets of feature vectors against the real train split
with :mod:`tasks.quality_metrics`, overall and per class, and names the extractor and
normalisation next to the numbers; :func:`check_gate` compares the kept set's numbers (and
the two-sample test of :mod:`tasks.realism`) with ``quality.gate``; :func:`gate_message`
says, on one line, which bound failed and how to fix it.
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
    "min_precision": "the generator makes images unlike real ones: train it longer or pick another generator",
    "min_recall": "the synthetic set misses part of the real data: synthesize more, train longer, "
    "or relax quality.gate.min_recall",
    "max_memorised_fraction": "the generator copies training images: train on more data or fewer epochs, "
    "or relax quality.gate.max_memorised_fraction",
    "min_kept_fraction": "the filters drop most images: check their thresholds or the generator, "
    "or relax quality.gate.min_kept_fraction",
}
SET_METRICS = ("fid", "kid", "precision", "recall")
#: the bounds of the realism gate (the others: quality gate)
REALISM_BOUNDS = ("max_two_sample_auc", "min_precision")
REALISM_FIX = (
    "the synthetic images are told apart from real ones; improve the generator (train longer, another "
    "architecture or more real data) and never loosen the bound to pass"
)
UNRELIABLE_FIX = (
    "the set-metrics extractor is near chance on real val, so its numbers cannot vouch for the images; "
    "give it more real data or an extractor that is reliable (quality.metrics.extractor), or remove the bound"
)
UNTESTED_FIX = (
    "too few kept synthetic images to test their realism; synthesize more images or find out why the filters "
    "drop them (quality.json per_class)"
)


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


def _two_sample_checks(gate: QualityGate, realism: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The ``max_two_sample_auc`` checks: overall and per class (each with an AUC)."""
    bound = gate.max_two_sample_auc
    if bound is None:
        return []
    base = {"metric": "two_sample_auc_ci95_low", "bound_name": "max_two_sample_auc", "bound": bound}
    test = (realism or {}).get("two_sample")
    if test is None:
        logger.warning("realism gate: max_two_sample_auc not checked (quality.realism.enabled is false)")
        return [{**base, "scope": "overall", "value": None, "passed": None, "status": "not checked: realism disabled"}]

    def one(scope: str, entry: dict[str, Any]) -> dict[str, Any]:
        value = entry.get("ci95_low")
        ok = value is not None and value <= bound
        status = "checked" if value is not None else f"not computable: {test.get('reason') or 'too few images'}"
        interval = {k: entry.get(k) for k in ("auc", "ci95_high", "n_real", "n_synthetic")}
        return {**base, "scope": scope, "value": value, **interval, "passed": bool(ok), "status": status}

    checks = [one("overall", test)]
    checks += [
        one(name, entry) for name, entry in (test.get("per_class") or {}).items() if entry.get("auc") is not None
    ]
    return checks


def check_gate(gate: QualityGate, quality: dict[str, Any]) -> dict[str, Any]:
    """``{"passed": bool, "realism_passed": bool | None, "extractor_reliable": bool | None,
    "checks": [{metric, bound_name, bound, value, passed, status, ...}]}`` for every
    configured bound. ``passed`` is None for a check that was deliberately not run (realism
    disabled), which does not fail the gate; a metric that could not be computed fails its
    bound; a set-metric bound on an unreliable extractor fails as "not checked: extractor
    unreliable" (see QualityGate). ``realism_passed`` covers the REALISM_BOUNDS checks
    (None when none ran)."""
    set_metrics = quality.get("set_metrics") or {}
    overall = ((set_metrics.get("sets") or {}).get("kept") or {}).get("overall") or {}
    extractor_quality = (set_metrics.get("extractor") or {}).get("quality")
    reliable = None if not set_metrics else bool((extractor_quality or {}).get("reliable"))
    memorisation = (quality.get("filters") or {}).get("memorisation") or {}
    values = {
        "max_fid": ("fid", overall.get("fid")),
        "max_kid": ("kid", overall.get("kid_mean")),
        "min_precision": ("precision", overall.get("precision")),
        "min_recall": ("recall", overall.get("recall")),
        "max_memorised_fraction": ("memorised_fraction", memorisation.get("fraction_below_threshold")),
        "min_kept_fraction": ("kept_fraction", quality.get("kept_fraction")),
    }
    checks = _two_sample_checks(gate, quality.get("realism"))
    for bound_name, (metric, value) in values.items():
        bound = getattr(gate, bound_name)
        if bound is None:
            continue
        status = "checked" if value is not None else "not computable (too few images)"
        ok = value is not None and (value <= bound if bound_name.startswith("max_") else value >= bound)
        if metric in SET_METRICS and not reliable:
            ok, status = False, "not checked: extractor unreliable"
        check = {"metric": metric, "bound_name": bound_name, "bound": bound, "value": value, "passed": bool(ok)}
        checks.append({**check, "status": status})
    realism = [c["passed"] for c in checks if c["bound_name"] in REALISM_BOUNDS and c["passed"] is not None]
    return {
        "passed": all(c["passed"] is not False for c in checks),
        "realism_passed": all(realism) if realism else None,
        "extractor_reliable": reliable,
        "checks": checks,
    }


def _shown(check: dict[str, Any], context: str) -> str:
    sign = ">" if check["bound_name"].startswith("max_") else "<"
    if check["metric"] == "two_sample_auc_ci95_low":
        scope = "" if check["scope"] == "overall" else f" in class '{check['scope']}'"
        if check["value"] is None:
            return f"two-sample test{scope} {check['status']}"
        return (
            f"two-sample AUC{scope} {check['auc']:.2f} [{check['value']:.2f}, {check['ci95_high']:.2f}]: "
            f"lower 95% bound {check['value']:.2f} {sign} max_two_sample_auc {check['bound']:g}"
        )
    if check["status"].startswith("not checked"):
        return f"{check['metric']} {check['status']} (bound {check['bound_name']} {check['bound']:g}){context}"
    value = "not computable (too few images)," if check["value"] is None else f"{check['value']:.6g} {sign}"
    shown = f"{check['metric']} {value} {check['bound_name']} {check['bound']:g}"
    return shown + context if check["metric"] in SET_METRICS else shown


def _realism_fix(check: dict[str, Any]) -> str:
    if check["status"] == "not checked: extractor unreliable":
        return UNRELIABLE_FIX
    return UNTESTED_FIX if check["value"] is None else REALISM_FIX


def gate_message(gate: dict[str, Any], quality: dict[str, Any], outputs: str) -> str:
    """One line: every failed check (metric, value, bound, extractor, fix) and where the
    outputs were kept (``outputs``). Realism failures come first, as
    ``rejected: synthetic images fail the realism gate (...)``."""
    extractor = (quality.get("set_metrics") or {}).get("extractor") or {}
    context = (
        f" (extractor {extractor.get('name')}, normalisation {extractor.get('normalisation')}, "
        "kept synthetic vs real train)"
        if extractor
        else ""
    )
    failed = [c for c in gate["checks"] if c["passed"] is False]
    realism = [c for c in failed if c["bound_name"] in REALISM_BOUNDS]
    other = [c for c in failed if c["bound_name"] not in REALISM_BOUNDS]
    parts = []
    if realism:
        shown = "; ".join(_shown(c, context) for c in realism)
        fixes = dict.fromkeys(_realism_fix(c) for c in realism)
        parts.append(f"rejected: synthetic images fail the realism gate ({shown}): {'; '.join(fixes)}")
    if other:
        shown = "; ".join(f"{_shown(c, context)}: {GATE_FIXES[c['bound_name']]}" for c in other)
        parts.append(f"quality gate failed: {shown}")
    return f"{'; '.join(parts)}; outputs kept for inspection in {outputs}"
