"""medigan-grade search over model cards: selection values, match modes, keys, dotted lookup.

Every card has a *selection* mapping, the data that search terms are matched against:

* a card imported from medigan (``card.medigan`` holds its ``global.json`` entry) uses
  medigan's own ``selection`` section, verbatim, so searches give medigan's result sets;
* any other card gets one derived from its fields under medigan's key names (``type``,
  ``modality``, ``organ``, ``height``, ``width``, ``tags``, ``dataset``, ``license``,
  ``performance``, ...) plus ``id``, ``id_parts`` (``synthmed/mni152-cgan`` -> ``synthmed``,
  ``mni152``, ``cgan``), ``name`` and ``image_size`` (``"64x64"``).

Matching (:func:`matches`), as medigan 1.0.0's ``ModelSelector.find_matching_models_by_values``:

* ``match="all"`` (medigan ``AND``): every term must match; ``"any"`` (``OR``): at least one;
* ``exact=True`` (medigan's matching, the default): a term matches a whole value
  (``str(value)``, so ``128`` matches ``"128"``; a list matches through any of its items;
  nested mappings are searched recursively), so ``x-ray`` does not match ``x-ray
  mammography``; ``exact=False``: a term may be part of a value or of the card's text
  (id, name, description, modality, ...), e.g. ``mammo``;
* ``case_sensitive=False`` compares lower-cased text (medigan's default);
* ``match_keys=True`` also matches the mapping keys (medigan ``are_keys_also_matched``).
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from generators.card import ModelCard
from generators.errors import GeneratorError

if TYPE_CHECKING:
    from generators.registry import Entry

MATCH_MODES = ("all", "any")
ORDERS = ("asc", "desc")
MEDIGAN_NUMBER_DIGITS = 5  # medigan numbers its models by the 5-digit prefix of the id (1 -> 00001_...)


def terms_of(query: str | Sequence[str]) -> list[str]:
    """Search terms: a string is split on whitespace (``"brain mri"`` -> two terms); a list
    keeps each item as one term, spaces included (``["noise to image"]``: one term)."""
    if isinstance(query, str):
        return query.split()
    return [str(term).strip() for term in query if str(term).strip()]


def selection(card: ModelCard) -> dict[str, Any]:
    """The mapping search terms are matched against (see the module docstring)."""
    if isinstance(card.medigan.get("selection"), dict):
        return card.medigan["selection"]
    h, w = card.image_size
    derived: dict[str, Any] = {
        "id": card.id,
        "id_parts": [part for part in re.split(r"[/._-]", card.id) if part],  # mni152 finds synthmed/mni152-cgan
        "name": card.name,
        "type": card.architecture,
        "modality": [card.modality],
        "organ": [card.anatomy],
        "image_size": f"{h}x{w}",
        "height": h,
        "width": w,
        "channels": card.channels,
        "tags": list(card.tags),
        "condition": list(card.conditioning.labels),
        "generates": [*card.conditioning.mask_classes, *(["masks"] if card.conditioning.masks else [])],
        "dataset": [card.training.dataset] if card.training.dataset else [],
        "license": card.licence,
        "performance": {name: metric.value for name, metric in card.metrics.items()},
    }
    return {key: value for key, value in derived.items() if value not in ("", None)}


def _leaves(mapping: dict[str, Any], with_keys: bool) -> Iterable[str]:
    """``str()`` of every value (list items one by one, mappings recursively) and, with
    ``with_keys``, every key: what medigan's ``recursive_search_for_values`` compares."""
    for key, value in mapping.items():
        if with_keys:
            yield str(key)
        if isinstance(value, dict):
            yield from _leaves(value, with_keys)
        elif isinstance(value, list):
            yield from (str(item) for item in value)
        else:
            yield str(value)


def _text(card: ModelCard) -> list[str]:
    h, w = card.image_size
    return [
        card.id,
        card.name,
        card.description,
        card.architecture,
        card.modality,
        card.anatomy,
        f"{h}x{w}",
        *card.tags,
        *card.conditioning.labels,
        card.training.dataset,
        card.licence,
        "masks" if card.conditioning.masks else "",
    ]


def matched_terms(
    card: ModelCard, terms: Sequence[str], *, exact: bool = True, case_sensitive: bool = False, match_keys: bool = False
) -> set[str]:
    """The subset of ``terms`` that match ``card`` (see the module docstring for the modes)."""
    fold = (lambda s: s) if case_sensitive else str.lower
    values = {fold(v) for v in _leaves(selection(card), match_keys)}
    if exact:
        return {t for t in terms if fold(t) in values}
    haystack = [*values, *(fold(p) for p in _text(card) if p)]
    return {t for t in terms if any(fold(t) in value for value in haystack)}


def check_mode(match: str, order: str | None = None) -> None:
    if match not in MATCH_MODES:
        raise GeneratorError(f"unknown match mode '{match}'; use 'all' (every term, medigan AND) or 'any' (medigan OR)")
    if order is not None and order not in ORDERS:
        raise GeneratorError(f"unknown order '{order}'; use 'asc' (smallest first) or 'desc' (largest first)")


def metric_of(card: ModelCard, name: str):
    """``card.metrics[name]``, also under medigan's spelling (``FID`` -> ``fid``,
    ``CLF.trained_on_real.f1`` -> ``clf_trained_on_real_f1``); None when absent."""
    return card.metrics.get(name) or card.metrics.get(name.lower().replace(".", "_"))


def rank_key(card: ModelCard, metric: str, order: str | None) -> tuple[int, float]:
    """Sort key: cards without the metric last; ``order`` None = best first by the
    metric's own direction, ``asc``/``desc`` = by value (medigan's ``order``)."""
    found = metric_of(card, metric)
    if found is None:
        return (1, 0.0)
    descending = found.higher_is_better if order is None else order == "desc"
    return (0, -found.value if descending else found.value)


# ------------------------------------------------------------------ keys and values


def selection_keys(cards: Iterable[ModelCard]) -> dict[str, int]:
    """Top-level selection keys -> number of cards that have one (medigan ``get_selection_keys``)."""
    counts: Counter[str] = Counter()
    for card in cards:
        counts.update(selection(card).keys())
    return dict(sorted(counts.items()))


def _deep_get(mapping: Any, key: str) -> tuple[bool, Any]:
    current = mapping
    for part in key.split("."):
        if not isinstance(current, dict) or part not in current:
            return False, None
        current = current[part]
    return True, current


def selection_values(key: str, cards: Iterable[ModelCard]) -> dict[str, int]:
    """Values of selection key ``key`` (dotted for nested ones, e.g. ``performance.FID``) ->
    number of cards holding each (a list counts each distinct item once per card; unset
    values are left out). A mapping's values are its keys (``performance`` -> ``FID``,
    ``SSIM``, ...). Most frequent first."""
    counts: Counter[str] = Counter()
    seen_key = False
    cards = list(cards)
    for card in cards:
        found, value = _deep_get(selection(card), key)
        seen_key |= found
        if not found or value is None:
            continue
        items = value if isinstance(value, (list, dict)) else [value]
        counts.update({str(item) for item in items if item is not None})
    if not seen_key:
        known = selection_keys(cards)
        guess = difflib.get_close_matches(key, list(known), n=1)
        hint = f" (did you mean '{guess[0]}'?)" if guess else ""
        raise GeneratorError(
            f"no card has selection key '{key}'; keys: {', '.join(known) or 'none'}{hint} "
            "(nested keys with dots, e.g. performance.FID)"
        )
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0].lower())))


def config_value(card: ModelCard, key: str) -> Any:
    """The value at dotted ``key`` (medigan ``get_config_by_id(model_id, config_key)``): looked
    up in the card's fields (``metrics.fid.value``), then, for a card imported from medigan, in
    its ``global.json`` entry (``selection.performance.FID``, ``description.trained_date``)."""
    sources = [card.model_dump(mode="json")]
    if card.medigan:
        sources.append(card.medigan)
    for source in sources:
        found, value = _deep_get(source, key)
        if found:
            return value
    parts = key.split(".")
    reached = [_reach(source, parts) for source in sources]
    depth, current = max(reached, key=lambda r: r[0])  # the source that got furthest
    where = f"under '{'.'.join(parts[:depth])}'" if depth else "at the top level"
    if not isinstance(current, dict):
        raise GeneratorError(f"{card.ref}: '{'.'.join(parts[:depth])}' is a value, not a mapping; no key '{key}'")
    keys = sorted(current) if depth else sorted({k for source in sources for k in source})
    guess = difflib.get_close_matches(parts[depth], keys, n=1)
    hint = f" (did you mean '{guess[0]}'?)" if guess else ""
    raise GeneratorError(f"{card.ref}: no key '{key}'; keys {where}: {', '.join(keys[:40]) or 'none'}{hint}")


def _reach(source: Any, parts: list[str]) -> tuple[int, Any]:
    """How many leading ``parts`` resolve in ``source``, and the value reached."""
    current, depth = source, 0
    for part in parts:
        if not isinstance(current, dict) or part not in current:
            break
        current, depth = current[part], depth + 1
    return depth, current


# ------------------------------------------------------------------ short ids


def resolve_id(ref_id: str, ids: Iterable[str]) -> list[str]:
    """Card ids that ``ref_id`` names: itself when it is an id; else medigan's short forms,
    the model number (``1`` or ``00001`` -> ``medigan/00001_DCGAN_MMG_CALC_ROI``: the first 5
    characters of the id's last part, as medigan's ``match_model_id``) and the medigan id
    (``00001_DCGAN_MMG_CALC_ROI``: the id's last part). Several ids = ambiguous."""
    ids = sorted(set(ids))
    if ref_id in ids:
        return [ref_id]
    if ref_id.isdigit() and len(ref_id) <= MEDIGAN_NUMBER_DIGITS:
        number = ref_id.zfill(MEDIGAN_NUMBER_DIGITS)
        return [i for i in ids if i.rsplit("/", 1)[-1][:MEDIGAN_NUMBER_DIGITS] == number]
    return [i for i in ids if "/" in i and i.rsplit("/", 1)[-1] == ref_id]


# ------------------------------------------------------------------ machine-readable rows


def summary(entry: Entry, metric: str | None = None) -> dict[str, Any]:
    """One JSON-ready row for ``--json`` output of list/search/rank."""
    card = entry.card
    row: dict[str, Any] = {
        "ref": card.ref,
        "id": card.id,
        "version": card.version,
        "name": card.name,
        "architecture": card.architecture,
        "modality": card.modality,
        "anatomy": card.anatomy,
        "image_size": list(card.image_size),
        "channels": card.channels,
        "available": card.available,
        "origin": card.origin.kind,
        "metrics": {name: m.value for name, m in sorted(card.metrics.items())},
        "card": str(entry.path),
    }
    if metric:
        found = metric_of(card, metric)
        row["rank_by"] = {"metric": metric, "value": None if found is None else found.value}
    return row
