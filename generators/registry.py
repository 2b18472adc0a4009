"""The generator registry: list, search, rank and load model cards.

A registry is a set of directories, each holding ``<name>/card.yaml`` (+ weights next
to the card). The shipped zoo lives in ``generators/cards``; ``SYNTHMED_REGISTRY``
(``os.pathsep``-separated) adds more.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from generators.card import ModelCard, load_card
from generators.contract import Generator
from generators.errors import GeneratorError
from generators.weights import load_weights

log = logging.getLogger(__name__)
SHIPPED_CARDS = Path(__file__).resolve().parent / "cards"


@dataclass(frozen=True)
class Entry:
    """A card and the directory its relative paths resolve against."""

    card: ModelCard
    path: Path

    @property
    def weights_path(self) -> Path | None:
        if self.card.weights.file is None:
            return None
        return self.path.parent / self.card.weights.file


def registry_dirs(extra: Iterable[Path] = ()) -> list[Path]:
    dirs = [SHIPPED_CARDS, *extra]
    dirs += [Path(p) for p in os.environ.get("SYNTHMED_REGISTRY", "").split(os.pathsep) if p]
    return dirs


def list_entries(dirs: Iterable[Path] | None = None) -> list[Entry]:
    """Every card under the registry directories, sorted by id then version."""
    entries = []
    for directory in dirs if dirs is not None else registry_dirs():
        for card_path in sorted(Path(directory).glob("**/card.yaml")):
            entries.append(Entry(load_card(card_path), card_path))
    return sorted(entries, key=lambda e: (e.card.id, e.card.version))


def _searchable_text(card: ModelCard) -> str:
    h, w = card.image_size
    parts = [
        card.id, card.name, card.description, card.architecture, card.modality, card.anatomy,
        f"{h}x{w}", *card.tags, *card.conditioning.labels, card.training.dataset, card.licence,
        "masks" if card.conditioning.masks else "",
    ]
    return " ".join(p for p in parts if p).lower()


def search(
    query: str = "",
    filters: dict[str, str] | None = None,
    rank_by: str | None = None,
    entries: list[Entry] | None = None,
) -> list[Entry]:
    """Cards matching every word of ``query`` (free text) and every ``key=value`` filter
    (card fields, dotted for nested ones, case-insensitive), ranked by how many words
    matched, or by the metric ``rank_by`` (best first, as the metric's direction says;
    cards without that metric come last)."""
    entries = list_entries() if entries is None else entries
    words = [w for w in re.split(r"\s+", query.lower().strip()) if w]
    scored = []
    for entry in entries:
        text = _searchable_text(entry.card)
        hits = sum(1 for w in words if w in text)
        if words and hits == 0:
            continue
        if filters and not all(_field_matches(entry.card, k, v) for k, v in filters.items()):
            continue
        scored.append((hits, entry))
    if rank_by:
        def metric_key(item: tuple[int, Entry]) -> tuple[int, float]:
            metric = item[1].card.metrics.get(rank_by)
            if metric is None:
                return (1, 0.0)
            return (0, -metric.value if metric.higher_is_better else metric.value)
        scored.sort(key=metric_key)
    else:
        scored.sort(key=lambda item: -item[0])
    return [entry for _, entry in scored]


def _field_matches(card: ModelCard, key: str, value: str) -> bool:
    current: object = card.model_dump(mode="json")
    for part in key.split("."):
        if not isinstance(current, dict) or part not in current:
            raise GeneratorError(
                f"unknown card field '{key}'; use one of: {', '.join(sorted(ModelCard.model_fields))}"
            )
        current = current[part]
    if isinstance(current, (list, tuple)):
        return any(str(v).lower() == value.lower() for v in current)
    return str(current).lower() == value.lower()


def find(ref: str, entries: list[Entry] | None = None) -> Entry:
    """Look up ``id`` or ``id@version`` (latest version when none is given)."""
    entries = list_entries() if entries is None else entries
    wanted_id, _, version = ref.partition("@")
    matches = [e for e in entries if e.card.id == wanted_id and (not version or e.card.version == version)]
    if not matches:
        import difflib

        known = sorted({e.card.ref for e in entries})
        guess = difflib.get_close_matches(ref, known, n=1)
        hint = f" (did you mean '{guess[0]}'?)" if guess else ""
        raise GeneratorError(f"no generator '{ref}' in the registry; known: {', '.join(known) or 'none'}{hint}")
    return matches[-1]


def load_generator(entry: Entry | Path | str, device: str = "cpu") -> Generator:
    """Verify the weights' sha256, then build the generator the card describes."""
    if not isinstance(entry, Entry):
        path = Path(entry)
        entry = Entry(load_card(path), path)
    card = entry.card
    weights = entry.weights_path
    if weights is None:
        raise GeneratorError(
            f"{card.ref}: weights are not available here (listed for search only); "
            "obtain them from the card's origin and register with 'synthmed generators add'"
        )
    if card.architecture == "cgan":
        from generators.architectures.cgan import CganModel

        state = load_weights(weights, card.weights.sha256, card.weights.format)
        return CganModel(card, state, device)
    raise GeneratorError(f"{card.ref}: architecture '{card.architecture}' cannot be loaded by this version")
