"""The generator contract every architecture and import implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from generators.card import ModelCard


@dataclass(frozen=True)
class GeneratedBatch:
    """``images``: float32 (N, C, H, W) in the card's ``value_range``;
    ``masks``: int64 (N, H, W) class indices or None; ``labels``: the conditioning label
    of each sample (None for unconditional generators)."""

    images: np.ndarray
    masks: np.ndarray | None
    labels: list[str | None]


class Generator(Protocol):
    """Loaded generator. ``generate`` is deterministic for a given seed."""

    card: ModelCard

    def generate(self, n: int, seed: int, condition: Sequence[str] | str | None = None) -> GeneratedBatch:
        """Make ``n`` samples; ``condition`` is one label or one label per sample."""
        ...
