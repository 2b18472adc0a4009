"""The generator contract every architecture and import implements.

Mask conditioning (segmentation augmentation): a generator that makes an image FOR a
given segmentation mask is a :class:`MaskConditionedGenerator`: it has
``mask_conditioned = True``, ``mask_classes`` (K) and ``generate(n, seed, condition,
masks=None)``, where ``masks`` is int64 ``(N, H, W)`` in ``[0, K)`` at the card's image
size (``(N, D, H, W)`` at its ``volume_size`` for a volume generator). Its batch's ``masks`` are then exactly the given ones (pixel for pixel); without
``masks`` it picks its own (e.g. from the training masks stored with its weights).
Callers go through :func:`generate_batch`, which refuses masks (one-line
``GeneratorError``) for every other generator, so the other architectures and imported
models need no change. Implemented by ``pix2pix`` and by ``ddpm``, ``vae3d`` and ``ldm3d``
trained with ``with_masks: true``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

from generators.card import ModelCard
from generators.errors import GeneratorError

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


class MaskConditionedGenerator(Protocol):
    """A generator that makes images for given segmentation masks (see the module docstring)."""

    card: ModelCard
    mask_conditioned: bool  # True
    mask_classes: int  # K: mask values lie in [0, K)

    def generate(
        self, n: int, seed: int, condition: Sequence[str] | str | None = None, masks: np.ndarray | None = None
    ) -> GeneratedBatch:
        """``n`` image/mask pairs; with ``masks`` int64 (N, H, W), the returned masks equal them."""
        ...


def accepts_masks(generator: Any) -> bool:
    """Whether ``generator`` makes images for given masks (``mask_conditioned is True``)."""
    return getattr(generator, "mask_conditioned", False) is True


def generate_batch(
    generator: Generator | MaskConditionedGenerator,
    n: int,
    seed: int,
    condition: Sequence[str] | str | None = None,
    masks: np.ndarray | None = None,
) -> GeneratedBatch:
    """``generator.generate(n, seed, condition)``, or with ``masks`` int (N, H, W) the
    mask-conditioned call, checked to return exactly those masks. A generator that is not
    mask-conditioned and gets masks raises a one-line ``GeneratorError``."""
    if masks is None:
        return generator.generate(n, seed, condition)
    card = generator.card
    if not accepts_masks(generator):
        raise GeneratorError(
            f"{card.ref}: architecture '{card.architecture}' is not mask-conditioned and cannot make images for "
            "given masks; use pix2pix, or ddpm/vae3d/ldm3d with with_masks: true, or remove synthesis.masks_from"
        )
    batch = generator.generate(n, seed, condition, masks=masks)
    if batch.masks is None or batch.masks.shape != masks.shape or not np.array_equal(batch.masks, masks):
        raise GeneratorError(
            f"{card.ref}: returned other masks than the {n} it was given; a mask-conditioned generator must "
            "return its input masks unchanged (fix its generate)"
        )
    return batch
