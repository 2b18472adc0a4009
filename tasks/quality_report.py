"""Markdown for the quality stage's part of the report: realism (the two-sample test), set
metrics (with the extractor that produced them and that extractor's own quality), filter
counts and the quality gate.

:func:`quality_markdown` is a pure function of the ``quality.json`` dict written by
:mod:`tasks.filter`; the report stage calls it. Missing blocks (an older quality.json,
disabled filters or metrics) are skipped or shown as ``n/a``; nothing here raises on a
missing key. Every user-supplied name that lands in a table cell (class labels, card
fields) goes through :func:`md_cell`, so a label such as ``a|b`` cannot break a table.
"""

from __future__ import annotations

from typing import Any

#: filter counts in pipeline order; other ``dropped_*`` keys (newer filters) follow, sorted
FILTER_COUNTS = (
    ("generated", "generated"),
    ("dropped_sanity", "dropped (sanity)"),
    ("dropped_label", "dropped (label)"),
    ("dropped_mask_unknown_class", "dropped (mask: unknown class)"),
    ("dropped_mask_implausible", "dropped (mask: implausible)"),
    ("dropped_mask_disagree", "dropped (mask: image disagrees)"),
    ("dropped_memorised", "dropped (memorised)"),
    ("dropped_duplicate", "dropped (duplicate)"),
    ("kept", "kept"),
)
SET_TITLES = {
    "kept": "kept synthetic vs real train",
    "generated": "all generated synthetic vs real train",
    "real_val": "real val vs real train (reference: what held-out real data scores)",
}
UNRELIABLE = "unreliable"
_MD_ESCAPES = {
    "\\": "\\\\",
    "|": "\\|",
    "`": "\\`",
    "*": "\\*",
    "_": "\\_",
    "[": "\\[",
    "]": "\\]",
    "#": "\\#",
    "~": "\\~",
    "&": "&amp;",
    "<": "&lt;",
    ">": "&gt;",
}


def md_cell(value: Any) -> str:
    """``value`` as inert Markdown text on one line: pipes, backticks, emphasis, brackets and
    HTML are escaped, line breaks become spaces. Safe in a table cell and in running text."""
    text = " ".join(str(value).split())
    return "".join(_MD_ESCAPES.get(ch, ch) for ch in text)


def class_cell(label: Any) -> str:
    """A class label for a table cell (``(unlabelled)`` for the empty label)."""
    return md_cell(label) if label not in (None, "") else "(unlabelled)"


def dropped_title(key: str) -> str:
    """Column title of a ``dropped_*`` count, e.g. ``dropped (mask: unknown class)``."""
    known = dict(FILTER_COUNTS)
    if key in known:
        return known[key]
    return f"dropped ({key.removeprefix('dropped_').replace('_', ' ')})"


def count_keys(totals: dict[str, Any], per_class: dict[str, Any]) -> list[str]:
    """The filter-count keys present in ``totals`` or any class: the known ones in pipeline
    order, any other ``dropped_*`` key (sorted) before ``kept``."""
    present = set(totals) | {k for entry in per_class.values() if isinstance(entry, dict) for k in entry}
    known = [key for key, _ in FILTER_COUNTS]
    extra = sorted(k for k in present if k.startswith("dropped_") and k not in known)
    ordered = [k for k in known if k != "kept" and k in present] + extra
    return ordered + (["kept"] if "kept" in present else [])


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return md_cell(value)


def _kid(entry: dict[str, Any]) -> str:
    if entry.get("kid_mean") is None:
        return "n/a"
    return f"{_num(entry['kid_mean'])} ± {_num(entry.get('kid_std'))}"


def extractor_reliable(set_metrics: dict[str, Any] | None) -> bool | None:
    """False when the set-metrics extractor reported itself unreliable (near chance), True
    when it reported itself reliable, None when it reported nothing (older quality.json)."""
    quality = ((set_metrics or {}).get("extractor") or {}).get("quality")
    if not isinstance(quality, dict) or quality.get("reliable") is None:
        return None
    return bool(quality["reliable"])


def _metrics_table(block: dict[str, Any], with_diversity: bool, reliable: bool | None) -> list[str]:
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
    per_class = block.get("per_class") or {}
    rows = [("**overall**", block.get("overall") or {})] + [(class_cell(k), v or {}) for k, v in per_class.items()]
    mark = f" ({UNRELIABLE})" if reliable is False else ""
    for name, entry in rows:
        feature_cells = [
            _num(entry.get("fid")),
            _kid(entry),
            _num(entry.get("precision")),
            _num(entry.get("recall")),
            _num(entry.get("density")),
            _num(entry.get("coverage")),
        ]
        cells = [name, _num(entry.get("n_real")), _num(entry.get("n_synthetic"))]
        cells += [f"{c}{mark}" if c != "n/a" else c for c in feature_cells]
        if with_diversity:
            cells.append(_num(entry.get("ms_ssim_mean")))  # pixels, not features: no mark
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _extractor_quality(extractor: dict[str, Any]) -> list[str]:
    quality = extractor.get("quality")
    if not isinstance(quality, dict):
        return []
    metric = md_cell(quality.get("metric") or "quality")
    line = f"The extractor's own quality: {metric} {_num(quality.get('value'))} (chance {_num(quality.get('chance'))})"
    if quality.get("reliable") is False:
        line += (
            f": **{UNRELIABLE}**, near chance. Every set metric below comes from features that barely "
            "separate the real classes: it is marked unreliable, is not evidence of realism, and is used "
            "neither to rank generators nor by the gate."
        )
    elif quality.get("reliable") is True:
        line += ": reliable."
    else:
        line += "."
    return [line, ""]


def _set_metrics(set_metrics: dict[str, Any]) -> list[str]:
    extractor = set_metrics.get("extractor") or {}
    digest = str(extractor.get("weights_sha256") or "")[:12]
    reliable = extractor_reliable(set_metrics)
    lines = [
        "### Set metrics",
        "",
        f"Features: **{md_cell(extractor.get('name', 'n/a'))}** ("
        + (f"{md_cell(extractor['description'])}; " if extractor.get("description") else "")
        + f"{_num(extractor.get('dim'))}-d, weights sha256 {digest or 'n/a'}…), "
        f"normalisation **{md_cell(extractor.get('normalisation', 'n/a'))}**. "
        f"Reference: {md_cell(set_metrics.get('reference', 'real train'))}. Values depend on the extractor: "
        "compare them only between runs that name the same one.",
        "",
    ]
    lines += _extractor_quality(extractor)
    training = extractor.get("training") or {}
    if training.get("val_accuracy") is not None and not isinstance(extractor.get("quality"), dict):
        lines += [
            f"The extractor's classifier reaches accuracy {_num(training['val_accuracy'])} on "
            f"{_num(training.get('n_val'))} real val images.",
            "",
        ]
    settings = set_metrics.get("ms_ssim_settings")
    for key, title in SET_TITLES.items():
        block = (set_metrics.get("sets") or {}).get(key)
        if not block:
            continue
        suffix = f" ({UNRELIABLE}: extractor near chance)" if reliable is False else ""
        lines += [f"**{title}**{suffix}", "", *_metrics_table(block, key == "kept", reliable), ""]
    diversity = set_metrics.get("real_train_diversity") or {}
    if settings and diversity:
        per_class = ", ".join(
            f"{md_cell(name)} {_num((v or {}).get('ms_ssim_mean'))}"
            for name, v in (diversity.get("per_class") or {}).items()
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


def _auc_interval(entry: dict[str, Any]) -> str:
    if entry.get("ci95_low") is None or entry.get("ci95_high") is None:
        return "n/a"
    return f"[{entry['ci95_low']:.3f}, {entry['ci95_high']:.3f}]"


def _auc(entry: dict[str, Any]) -> str:
    return "n/a" if entry.get("auc") is None else f"{entry['auc']:.3f}"


def two_sample_summary(quality: dict[str, Any]) -> str | None:
    """``two-sample AUC 0.612 [0.540, 0.690] (0.5 = indistinguishable)`` or None."""
    block = (quality.get("realism") or {}).get("two_sample")
    if not isinstance(block, dict) or block.get("auc") is None:
        return None
    return f"two-sample AUC {_auc(block)} {_auc_interval(block)} (0.5 = indistinguishable, 1 = fully separable)"


def _realism(quality: dict[str, Any]) -> list[str]:
    realism = quality.get("realism")
    block = realism.get("two_sample") if isinstance(realism, dict) else None
    if not isinstance(block, dict):
        return []
    lines = [
        "### Realism: two-sample test (0.5 = indistinguishable)",
        "",
        "A small CNN of its own (neither the label-consistency classifier nor the set-metrics extractor) "
        "is trained to tell real train images from kept synthetic ones, cross-validated over "
        f"{_num(block.get('folds'))} folds; each image is scored by a model that did not see it. AUC 0.5: "
        "it cannot tell them apart; 1.0: every synthetic image is recognisable. Interval: 95% bootstrap "
        "over the scored images.",
        "",
    ]
    if block.get("reason"):
        lines += [f"Not computed: {md_cell(block['reason'])}.", ""]
    lines += ["| class | AUC | 95% CI | n real | n synthetic |", "|---|---|---|---|---|"]
    rows = [("**overall**", block)] + [(class_cell(k), v or {}) for k, v in (block.get("per_class") or {}).items()]
    for name, entry in rows:
        lines.append(
            f"| {name} | {_auc(entry)} | {_auc_interval(entry)} | {_num(entry.get('n_real'))} | "
            f"{_num(entry.get('n_synthetic'))} |"
        )
    return [*lines, ""]


def _filters(quality: dict[str, Any]) -> list[str]:
    totals = quality.get("totals") or {}
    per_class = quality.get("per_class") or {}
    keys = count_keys(totals, per_class)
    lines = [
        "### Filters",
        "",
        "| class | " + " | ".join(dropped_title(k) for k in keys) + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
    for name, entry in sorted(per_class.items()):
        entry = entry or {}
        lines.append(f"| {class_cell(name)} | " + " | ".join(str(entry.get(k, 0)) for k in keys) + " |")
    lines.append("| **total** | " + " | ".join(str(totals.get(k, 0)) for k in keys) + " |")
    lines.append("")
    filters = quality.get("filters") or {}
    masks = filters.get("masks")
    if isinstance(masks, dict) and masks.get("active"):
        agreement = masks.get("agreement") or {}
        verdict = "applied" if agreement.get("applied") else f"**not applied**: {md_cell(agreement.get('note', ''))}"
        lines.append(
            f"Mask agreement model (UNet on real train pairs): real val Dice {_num(agreement.get('val_dice'))}, "
            f"would drop {_num(agreement.get('val_would_drop_fraction'))} of real val pairs; {verdict}."
        )
        lines.append("")
    for key, title in (("memorisation", "Memorisation"), ("duplicates", "Near-duplicates")):
        info = filters.get(key)
        if not isinstance(info, dict) or not info:
            continue
        reference = info.get("reference") or {}
        unit = info.get("distance") or ("RMSE of [0, 1] pixels" if info.get("space") == "pixel" else "feature distance")
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


def gate_rejected(quality: dict[str, Any]) -> bool:
    """True when quality.json records a gate that failed (the synthetic set was rejected)."""
    gate = quality.get("gate")
    return isinstance(gate, dict) and gate.get("passed") is False


def _check_name(check: dict[str, Any]) -> str:
    """``metric`` plus its class when the check is per class (``scope``)."""
    scope = check.get("scope")
    name = md_cell(check.get("metric"))
    return name if scope in (None, "", "overall") else f"{name} (class {class_cell(scope)})"


def failed_checks(quality: dict[str, Any]) -> list[str]:
    """One text per failed gate check, e.g. ``fid 12.5 > max_fid 10`` or ``fid not checked:
    extractor unreliable (max_fid 10)``, Markdown-escaped."""
    gate = quality.get("gate") or {}
    out = []
    for check in gate.get("checks") or []:
        if not isinstance(check, dict) or check.get("passed") is not False:
            continue
        bound_name = md_cell(check.get("bound_name", ""))
        sign = ">" if str(check.get("bound_name", "")).startswith("max_") else "<"
        value, status = check.get("value"), str(check.get("status") or "checked")
        if value is None or status != "checked":
            shown = f"{md_cell(status if status != 'checked' else 'not computable')} ({bound_name} {_num(check.get('bound'))})"
        else:
            shown = f"{_num(value)} {sign} {bound_name} {_num(check.get('bound'))}"
        out.append(f"{_check_name(check)} {shown}")
    return out


def _result(check: dict[str, Any]) -> str:
    status = str(check.get("status") or "checked")
    if check.get("passed") is None:
        return f"not checked ({md_cell(status)})" if status != "checked" else "not checked"
    result = "pass" if check.get("passed") else "FAIL"
    return result if status == "checked" else f"{result}: {md_cell(status)}"


def _gate(quality: dict[str, Any]) -> list[str]:
    gate = quality.get("gate")
    if not isinstance(gate, dict) or not gate:
        return []
    checks = [c for c in gate.get("checks") or [] if isinstance(c, dict)]
    if not checks:
        return ["### Quality gate", "", "No bounds configured (quality.gate).", ""]
    status = "passed" if gate.get("passed") else "FAILED: the synthetic set is REJECTED"
    lines = ["### Quality gate", "", f"**{status}**"]
    if gate.get("realism_passed") is not None:
        lines[-1] += f" (realism checks: {'passed' if gate['realism_passed'] else 'FAILED'})"
    lines += ["", "| metric | value | bound | result |", "|---|---|---|---|"]
    for check in checks:
        sign = "<=" if str(check.get("bound_name", "")).startswith("max_") else ">="
        lines.append(
            f"| {_check_name(check)} | {_num(check.get('value'))} | {sign} {_num(check.get('bound'))} "
            f"({md_cell(check.get('bound_name', ''))}) | {_result(check)} |"
        )
    return [*lines, ""]


def quality_markdown(quality: dict[str, Any]) -> str:
    """The quality section (``## Synthetic data quality``) of the report as Markdown."""
    lines = ["## Synthetic data quality", ""]
    lines += _gate(quality)
    lines += _realism(quality)
    set_metrics = quality.get("set_metrics")
    if isinstance(set_metrics, dict) and set_metrics:
        lines += _set_metrics(set_metrics)
    else:
        lines += ["Set metrics were not computed (quality.metrics.enabled: false).", ""]
    lines += _filters(quality)
    return "\n".join(lines).rstrip() + "\n"
