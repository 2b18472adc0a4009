"""The generator contract every architecture and import implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from generators.card import ModelCard

#: the ``subject`` column of a synthetic row whose generator names no group: every such row
#: is an independent sample (``tasks/realism.py`` puts each in a group of its own)
SYNTHETIC_SUBJECT = "synthetic"


@dataclass(frozen=True)
class GeneratedBatch:
    """``images``: float32 (N, C, H, W) in the card's ``value_range``;
    ``masks``: int64 (N, H, W) class indices or None; ``labels``: the conditioning label
    of each sample (None for unconditional generators); ``subjects``: the group of each
    sample when samples are correlated in groups (the ``real-holdout`` control serves
    held-out real slices: a pseudonymous id of each slice's subject or slab), else None
    (independent samples). ``tasks/synthesize.py`` writes it into the ``subject`` column
    (:data:`SYNTHETIC_SUBJECT` when None)."""

    images: np.ndarray
    masks: np.ndarray | None
    labels: list[str | None]
    subjects: list[str] | None = None


class Generator(Protocol):
    """Loaded generator. ``generate`` is deterministic for a given seed."""

    card: ModelCard

    def generate(self, n: int, seed: int, condition: Sequence[str] | str | None = None) -> GeneratedBatch:
        """Make ``n`` samples; ``condition`` is one label or one label per sample."""
        ...
