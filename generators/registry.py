"""The generator registry: list, search, rank and load model cards.

A registry is a set of directories, each holding ``<name>/card.yaml`` (+ weights next
to the card). Shipped with synthmed: ``generators/cards`` and ``generators/zoo`` (the
MedNIST GAN bundle, the medigan index). The user registry is ``SYNTHMED_REGISTRY``
(``os.pathsep``-separated; ``synthmed generators add`` writes into the first one) or,
when that is unset, ``~/.synthmed/generators``.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from generators.card import ModelCard, load_card
from generators.contract import Generator
from generators.errors import ConfigError, GeneratorError
from generators.safe_paths import safe_join
from generators.weights import verify_sha256

log = logging.getLogger(__name__)
SHIPPED_CARDS = Path(__file__).resolve().parent / "cards"
SHIPPED_ZOO = Path(__file__).resolve().parent / "zoo"
NEEDS_CODE = ("torchscript",)  # architectures whose loading runs code from the weights file


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
    return [SHIPPED_CARDS, SHIPPED_ZOO, *extra, *user_registry_dirs()]


_WARNED: set[tuple[str, str]] = set()  # (card path, reason) already warned about in this process


def list_entries(dirs: Iterable[Path] | None = None) -> list[Entry]:
    """Every valid card under the registry directories, sorted by id then version. A
    broken card (invalid YAML or fields) is skipped with one warning line naming its
    file and the reason, so it cannot hide the others; ``synthmed generators check
    <card>`` reports it in full."""
    entries = []
    for directory in dirs if dirs is not None else registry_dirs():
        for card_path in sorted(Path(directory).glob("**/card.yaml")):
            try:
                entries.append(Entry(load_card(card_path), card_path))
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
    return sorted(entries, key=lambda e: (e.card.id, e.card.version))


def _searchable_text(card: ModelCard) -> str:
    h, w = card.image_size
    parts = [
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
    return " ".join(p for p in parts if p).lower()


def search(
    query: str = "",
    filters: dict[str, str] | None = None,
    rank_by: str | None = None,
    entries: list[Entry] | None = None,
) -> list[Entry]:
    """Cards matching every word of ``query`` (free text) and every ``key=value`` filter
    (card fields, dotted for nested ones, case-insensitive; ``available=true|false``
    filters on weights being present), ranked by how many words matched, or by the metric
    ``rank_by`` (best first, as the metric's direction says; cards without it come last)."""
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
    if key == "available":
        if value.lower() not in ("true", "false"):
            raise GeneratorError(f"filter available={value}: expected true or false")
        return card.available == (value.lower() == "true")
    current: object = card.model_dump(mode="json")
    for part in key.split("."):
        if not isinstance(current, dict) or part not in current:
            raise GeneratorError(
                f"unknown card field '{key}'; use one of: {', '.join(sorted([*ModelCard.model_fields, 'available']))}"
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
        known = sorted({e.card.ref for e in entries})
        guess = difflib.get_close_matches(ref, known, n=1)
        hint = f" (did you mean '{guess[0]}'?)" if guess else ""
        shown = ", ".join(known[:20]) + (f", ... ({len(known)} in all)" if len(known) > 20 else "")
        raise GeneratorError(f"no generator '{ref}' in the registry; known: {shown or 'none'}{hint}")
    return matches[-1]


def _architecture_loaders() -> dict:
    try:
        from generators.architectures import LOADERS
    except ImportError:
        return {}
    return dict(LOADERS)


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
            "convert it to TorchScript or a MONAI bundle and register that with 'synthmed generators add'"
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
        from generators.bundle import load_bundle_generator

        return load_bundle_generator(card, weights, device, allow_code=allow_code, card_dir=entry.path.parent)
    if card.architecture == "torchscript":
        from generators.torchscript import load_torchscript_generator

        return load_torchscript_generator(card, weights, device, allow_code=allow_code)
    if card.architecture == "cgan":
        from generators.architectures.cgan import CganModel
        from generators.weights import load_weights

        return CganModel(card, load_weights(weights, card.weights.sha256, card.weights.format), device)
    raise GeneratorError(
        f"{card.ref}: architecture '{card.architecture}' cannot be loaded by this version; "
        f"loadable: {', '.join(sorted({*loaders, 'monai_bundle', 'torchscript', 'cgan'}))}"
    )
