"""The generator registry: list, search, rank and load model cards.

A registry is a set of directories, each holding ``<name>/card.yaml`` (+ weights next
to the card). Shipped with synthmed: ``generators/zoo`` (the MNI152 cards, the MedNIST GAN
bundle, the medigan index). The user registry is ``SYNTHMED_REGISTRY``
(``os.pathsep``-separated; ``synthmed generators add`` writes into the first one) or,
when that is unset, ``~/.synthmed/generators``.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from generators.card import ModelCard, load_card
from generators.contract import Generator
from generators.errors import ConfigError, GeneratorError
from generators.safe_paths import safe_join
from generators.search import check_mode, matched_terms, metric_of, rank_key, resolve_id, selection, terms_of
from generators.weights import verify_sha256

log = logging.getLogger(__name__)
SHIPPED_ZOO = Path(__file__).resolve().parent / "zoo"
NEEDS_CODE = ("torchscript", "medigan")  # architectures whose loading runs code from the model files


@dataclass(frozen=True)
class Entry:
    """A card and the path of its YAML file (relative paths resolve against its directory)."""

    card: ModelCard
    path: Path

    @property
    def weights_path(self) -> Path | None:
        """The weights file, which must lie inside the card's folder (a symlink that leads
        out of it, e.g. to ``/etc/passwd``, is refused with a ConfigError)."""
        if self.card.weights.file is None:
            return None
        return safe_join(self.path.parent, self.card.weights.file, what=f"{self.card.ref}: weights.file")


def user_registry_dirs() -> list[Path]:
    """``SYNTHMED_REGISTRY`` entries, or ``~/.synthmed/generators`` when it is unset."""
    value = os.environ.get("SYNTHMED_REGISTRY", "")
    dirs = [Path(p).expanduser() for p in value.split(os.pathsep) if p]
    return dirs or [Path.home() / ".synthmed" / "generators"]


def user_registry_dir() -> Path:
    """Where ``synthmed generators add`` registers models."""
    return user_registry_dirs()[0]


def registry_dirs(extra: Iterable[Path] = ()) -> list[Path]:
    return [SHIPPED_ZOO, *extra, *user_registry_dirs()]


_WARNED: set[tuple[str, str]] = set()  # (card path, reason) already warned about in this process


def list_entries(dirs: Iterable[Path] | None = None) -> list[Entry]:
    """Every valid card under the registry directories, sorted by id then version, each
    ``id@version`` once: a card in a later directory (the user registry comes after the
    shipped zoo) replaces one with the same ref in an earlier one, so re-importing medigan's
    index into the user registry does not list its models twice. A broken card (invalid
    YAML or fields) is skipped with one warning line naming its file and the reason, so it
    cannot hide the others; ``synthmed generators check <card>`` reports it in full."""
    entries: dict[str, Entry] = {}
    for directory in dirs if dirs is not None else registry_dirs():
        for card_path in sorted(Path(directory).glob("**/card.yaml")):
            try:
                entry = Entry(load_card(card_path), card_path)
            except ConfigError as exc:
                reason = " ".join(str(exc).split())
                if (str(card_path), reason) not in _WARNED:
                    _WARNED.add((str(card_path), reason))
                    log.warning(
                        "skipping broken card %s: %s (check it with: synthmed generators check %s)",
                        card_path,
                        reason.removeprefix(f"{card_path}: "),
                        card_path,
                    )
                continue
            if entry.card.ref in entries:
                log.debug("%s: %s replaces %s", entry.card.ref, card_path, entries[entry.card.ref].path)
            entries[entry.card.ref] = entry
    return sorted(entries.values(), key=lambda e: (e.card.id, e.card.version))


def search(
    query: str | Sequence[str] = "",
    filters: dict[str, str] | None = None,
    rank_by: str | None = None,
    entries: list[Entry] | None = None,
    *,
    match: str = "all",
    exact: bool = True,
    case_sensitive: bool = False,
    match_keys: bool = False,
    order: str | None = None,
) -> list[Entry]:
    """Cards matching the search terms of ``query`` and every ``key=value`` filter.

    The defaults are medigan's (``find_matching_models_by_values``): ``match="all"`` keeps
    cards that match every term (medigan ``AND``: adding a term narrows the result),
    ``exact=True`` compares whole values, case-insensitively (``x-ray`` does not match
    ``x-ray mammography``; ``128x128`` matches the value ``128x128``), so a query gives
    medigan's result set for medigan's models. ``match="any"`` keeps cards matching one term
    (medigan ``OR``), ranked by how many matched; ``exact=False`` finds a term inside a value
    or the card's text (``mammo``); ``case_sensitive`` and ``match_keys`` as medigan's
    ``is_case_sensitive`` and ``are_keys_also_matched``. The earlier default (any word,
    substring) is ``match="any", exact=False``. Terms and the values they are matched
    against: :mod:`generators.search` (a string query is split on whitespace, a list keeps
    each item whole).

    Filters: card fields (dotted for nested ones, e.g. ``origin.kind``), else selection keys
    (``organ=breast``, ``performance.FID=67.6``), case-insensitive, a list matching through
    any item; ``available=true|false`` filters on weights being present.

    Order: by the metric ``rank_by`` when given (``order`` None: best first by the metric's
    direction; ``"asc"``/``"desc"``: by value, as medigan's ``order``; cards without it
    last), else by how many terms matched, then id."""
    entries = list_entries() if entries is None else entries
    check_mode(match, order)
    terms = terms_of(query)
    filters = filters or {}
    _check_filter_keys(filters, entries)
    if rank_by:
        _check_metric(rank_by, entries)
    scored = []
    for entry in entries:
        hits = len(matched_terms(entry.card, terms, exact=exact, case_sensitive=case_sensitive, match_keys=match_keys))
        if terms and (hits == 0 if match == "any" else hits < len(set(terms))):
            continue
        if not all(_field_matches(entry.card, k, v) for k, v in filters.items()):
            continue
        scored.append((hits, entry))
    if rank_by:
        scored.sort(key=lambda item: rank_key(item[1].card, rank_by, order))
    else:
        scored.sort(key=lambda item: -item[0])
    return [entry for _, entry in scored]


def _check_metric(metric: str, entries: list[Entry]) -> None:
    """A metric no card in the registry reports is a typo, not a ranking: one-line error."""
    if any(metric_of(e.card, metric) is not None for e in entries):
        return
    known = sorted({name for e in entries for name in e.card.metrics})
    close = difflib.get_close_matches(metric, known, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise GeneratorError(
        f"no card reports metric '{metric}'; {hint}metrics in the registry: {', '.join(known[:12]) or 'none'}"
        + (f" and {len(known) - 12} more" if len(known) > 12 else "")
    )


def _check_filter_keys(filters: dict[str, str], entries: list[Entry]) -> None:
    known = {*ModelCard.model_fields, "available"}
    selection_known = {key for e in entries for key in selection(e.card)}
    for key in filters:
        if key.split(".")[0] not in known | selection_known:
            raise GeneratorError(
                f"unknown card field '{key}'; use one of: {', '.join(sorted(known))}; "
                f"or a selection key: {', '.join(sorted(selection_known)) or 'none'} "
                "(list them with 'synthmed generators keys')"
            )
        if key == "available" and filters[key].lower() not in ("true", "false"):
            raise GeneratorError(f"filter available={filters[key]}: expected true or false")


def _field_matches(card: ModelCard, key: str, value: str) -> bool:
    if key == "available":
        return card.available == (value.lower() == "true")
    source: object = card.model_dump(mode="json") if key.split(".")[0] in ModelCard.model_fields else selection(card)
    current = source
    for part in key.split("."):
        if not isinstance(current, dict) or part not in current:
            return False  # this card lacks the key (medigan: the model is not a match)
        current = current[part]
    if isinstance(current, (list, tuple)):
        return any(str(v).lower() == value.lower() for v in current)
    return str(current).lower() == value.lower()


def find(ref: str, entries: list[Entry] | None = None) -> Entry:
    """Look up ``id`` or ``id@version`` (latest version when none is given); ``id`` may also
    be a medigan model number (``1``, ``00001``) or medigan id (``00001_DCGAN_MMG_CALC_ROI``),
    see :func:`generators.search.resolve_id`. A ref naming several cards is an error that
    lists them."""
    entries = list_entries() if entries is None else entries
    wanted_id, _, version = ref.partition("@")
    ids = resolve_id(wanted_id, (e.card.id for e in entries))
    if len(ids) > 1:
        raise GeneratorError(
            f"'{ref}' is ambiguous: it names {', '.join(ids[:20])}{' ...' if len(ids) > 20 else ''}; give the full id"
        )
    matches = [e for e in entries if e.card.id in ids and (not version or e.card.version == version)]
    if not matches:
        known = sorted({e.card.ref for e in entries})
        guess = difflib.get_close_matches(ref, known, n=1)
        hint = f" (did you mean '{guess[0]}'?)" if guess else ""
        shown = ", ".join(known[:20]) + (f", ... ({len(known)} in all)" if len(known) > 20 else "")
        raise GeneratorError(f"no generator '{ref}' in the registry; known: {shown or 'none'}{hint}")
    return matches[-1]


def _architecture_loaders() -> dict:
    """Built-in loaders (``generators.architectures.LOADERS``) plus those of installed
    packages (entry-point group ``synthmed.architectures``, ``generators.plugins``); a
    package name that clashes with a built-in raises a one-line GeneratorError."""
    from generators.plugins import plugin_loaders

    try:
        from generators.architectures import LOADERS
    except ImportError:
        LOADERS = {}
    return {**plugin_loaders(), **LOADERS}


def load_generator(entry: Entry | Path | str, device: str = "cpu", *, allow_code: bool = False) -> Generator:
    """Verify the weights' sha256, then build the generator the card describes.

    Architectures in ``generators.architectures.LOADERS`` load through that mapping;
    ``monai_bundle`` and ``torchscript`` cards through ``generators.bundle`` and
    ``generators.torchscript``. Cards whose loading runs code from the model files
    (TorchScript, bundles built by running their config) need ``allow_code=True``.
    """
    if not isinstance(entry, Entry):
        path = Path(entry)
        entry = Entry(load_card(path), path)
    card = entry.card
    weights = entry.weights_path
    if card.architecture == "external":
        raise GeneratorError(
            f"{card.ref}: an external model (e.g. from medigan) runs its own code and is listed for search only; "
            "download its package and register it with 'synthmed generators import-medigan-model PACKAGE.zip "
            "--allow-code', or convert it to TorchScript or a MONAI bundle and register that"
        )
    if weights is None:
        raise GeneratorError(
            f"{card.ref}: weights are not available here (listed for search only); "
            "obtain them from the card's origin and register with 'synthmed generators add'"
        )
    verify_sha256(weights, card.weights.sha256)
    loaders = _architecture_loaders()
    if card.architecture in loaders:
        return loaders[card.architecture](card, weights, device)
    if card.architecture == "monai_bundle":
        from generators.bundle_runtime import load_bundle_generator

        return load_bundle_generator(card, weights, device, allow_code=allow_code, card_dir=entry.path.parent)
    if card.architecture == "torchscript":
        from generators.torchscript import load_torchscript_generator

        return load_torchscript_generator(card, weights, device, allow_code=allow_code)
    if card.architecture == "medigan":
        from generators.medigan_package import load_medigan_generator

        return load_medigan_generator(card, weights, device, allow_code=allow_code)
    if card.architecture == "cgan":
        from generators.architectures.cgan import CganModel
        from generators.weights import load_weights

        return CganModel(card, load_weights(weights, card.weights.sha256, card.weights.format), device)
    raise GeneratorError(
        f"{card.ref}: architecture '{card.architecture}' cannot be loaded by this version; "
        f"loadable: {', '.join(sorted({*loaders, 'monai_bundle', 'torchscript', 'medigan', 'cgan'}))}; "
        "a contributed architecture loads once its package is installed (entry-point group synthmed.architectures)"
    )
