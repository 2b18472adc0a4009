"""Markdown for the quality stage's part of the report: set metrics (with the extractor and
normalisation that produced them), filter counts and the quality gate.

:func:`quality_markdown` is a pure function of the ``quality.json`` dict written by
:mod:`tasks.filter`; the report stage calls it. Missing blocks (an older quality.json,
disabled filters or metrics) are skipped or shown as ``n/a``.
"""

from __future__ import annotations

from typing import Any

FILTER_COUNTS = (
    ("generated", "generated"),
    ("dropped_sanity", "dropped (sanity)"),
    ("dropped_label", "dropped (label)"),
    ("dropped_memorised", "dropped (memorised)"),
    ("dropped_duplicate", "dropped (duplicate)"),
    ("kept", "kept"),
)
SET_TITLES = {
    "kept": "kept synthetic vs real train",
    "generated": "all generated synthetic vs real train",
    "real_val": "real val vs real train (reference: what held-out real data scores)",
}


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}"


def _kid(entry: dict[str, Any]) -> str:
    if entry.get("kid_mean") is None:
        return "n/a"
    return f"{_num(entry['kid_mean'])} ± {_num(entry.get('kid_std'))}"


def _metrics_table(block: dict[str, Any], with_diversity: bool) -> list[str]:
    header = [
        "class",
        "n real train",
        "n compared",
        "FID",
        "KID (mean ± std)",
        "precision",
        "recall",
        "density",
        "coverage",
    ]
    if with_diversity:
        header.append("MS-SSIM (lower = more diverse)")
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    rows = [("**overall**", block.get("overall") or {})] + list((block.get("per_class") or {}).items())
    for name, entry in rows:
        cells = [
            name,
            _num(entry.get("n_real")),
            _num(entry.get("n_synthetic")),
            _num(entry.get("fid")),
            _kid(entry),
            _num(entry.get("precision")),
            _num(entry.get("recall")),
            _num(entry.get("density")),
            _num(entry.get("coverage")),
        ]
        if with_diversity:
            cells.append(_num(entry.get("ms_ssim_mean")))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _set_metrics(set_metrics: dict[str, Any]) -> list[str]:
    extractor = set_metrics.get("extractor") or {}
    digest = str(extractor.get("weights_sha256") or "")[:12]
    lines = [
        "### Set metrics",
        "",
        f"Features: **{extractor.get('name', 'n/a')}** ({extractor.get('description', '')}; "
        f"{extractor.get('dim', 'n/a')}-d, weights sha256 {digest or 'n/a'}…), "
        f"normalisation **{extractor.get('normalisation', 'n/a')}**. "
        f"Reference: {set_metrics.get('reference', 'real train')}. Values depend on the extractor: "
        "compare them only between runs that name the same one.",
        "",
    ]
    training = extractor.get("training") or {}
    if training.get("val_accuracy") is not None:
        lines += [
            f"The extractor's classifier reaches accuracy {_num(training['val_accuracy'])} on "
            f"{training.get('n_val')} real val images.",
            "",
        ]
    settings = set_metrics.get("ms_ssim_settings")
    for key, title in SET_TITLES.items():
        block = (set_metrics.get("sets") or {}).get(key)
        if not block:
            continue
        lines += [f"**{title}**", "", *_metrics_table(block, with_diversity=key == "kept"), ""]
    diversity = set_metrics.get("real_train_diversity") or {}
    if settings and diversity:
        per_class = ", ".join(
            f"{name} {_num(v.get('ms_ssim_mean'))}" for name, v in diversity.get("per_class", {}).items()
        )
        scales = settings.get("scales")
        fallback = (
            f" ({scales} of {settings.get('standard_scales')} scales fit the image size; weights renormalised)"
            if scales != settings.get("standard_scales")
            else ""
        )
        lines += [
            f"MS-SSIM within real train, for reference: overall {_num((diversity.get('overall') or {}).get('ms_ssim_mean'))}"
            + (f"; {per_class}" if per_class else "")
            + f". Kernel {settings.get('kernel_size')} px, sigma {settings.get('kernel_sigma')}{fallback}.",
            "",
        ]
    return lines


def _filters(quality: dict[str, Any]) -> list[str]:
    totals = quality.get("totals") or {}
    present = [(key, title) for key, title in FILTER_COUNTS if key in totals]
    lines = [
        "### Filters",
        "",
        "| class | " + " | ".join(t for _, t in present) + " |",
        "|---" * (len(present) + 1) + "|",
    ]
    for name, entry in sorted((quality.get("per_class") or {}).items()):
        lines.append(f"| {name or '(unlabelled)'} | " + " | ".join(str(entry.get(k, 0)) for k, _ in present) + " |")
    lines.append("| **total** | " + " | ".join(str(totals.get(k, 0)) for k, _ in present) + " |")
    lines.append("")
    filters = quality.get("filters") or {}
    for key, title in (("memorisation", "Memorisation"), ("duplicates", "Near-duplicates")):
        info = filters.get(key)
        if not info:
            continue
        reference = info.get("reference") or {}
        unit = "RMSE of [0, 1] pixels" if info.get("space") == "pixel" else "feature distance"
        source = (
            f"calibrated: {info.get('calibration_scale')} x the {info.get('calibration_quantile')} quantile "
            f"({_num(reference.get('value'))}) of the distance from each of {reference.get('n')} real train images "
            f"to its {reference.get('kind')}"
            if info.get("threshold_source") == "calibrated"
            else "absolute"
        )
        lines.append(
            f"{title}: threshold {_num(info.get('threshold'))} ({unit}; {source}); "
            f"{info.get('n_below_threshold')} of {info.get('n_scored')} scored images below it."
        )
        lines.append("")
    return lines


def _gate(quality: dict[str, Any]) -> list[str]:
    gate = quality.get("gate")
    if not gate:
        return []
    checks = gate.get("checks") or []
    if not checks:
        return ["### Quality gate", "", "No bounds configured (quality.gate).", ""]
    lines = [
        "### Quality gate",
        "",
        f"**{'passed' if gate.get('passed') else 'FAILED'}**",
        "",
        "| metric | value | bound | result |",
        "|---|---|---|---|",
    ]
    for check in checks:
        sign = "<=" if str(check.get("bound_name", "")).startswith("max_") else ">="
        lines.append(
            f"| {check.get('metric')} | {_num(check.get('value'))} | {sign} {_num(check.get('bound'))} | "
            f"{'pass' if check.get('passed') else 'FAIL'} |"
        )
    return [*lines, ""]


def quality_markdown(quality: dict[str, Any]) -> str:
    """The quality section (``## Synthetic data quality``) of the report as Markdown."""
    lines = ["## Synthetic data quality", ""]
    set_metrics = quality.get("set_metrics")
    if set_metrics:
        lines += _set_metrics(set_metrics)
    else:
        lines += ["Set metrics were not computed (quality.metrics.enabled: false).", ""]
    lines += _filters(quality)
    lines += _gate(quality)
    return "\n".join(lines).rstrip() + "\n"
