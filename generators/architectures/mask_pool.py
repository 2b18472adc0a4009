"""Segmentation masks as generator conditions, shared by the mask-conditioned architectures
(``pix2pix``; ``ddpm`` with ``with_masks: true``).

- The **mask pool**: up to ``spec.mask_pool_size`` training masks (stratified by label)
  stored in the weights file under ``mask_pool.masks`` uint8 ``(P, H, W)`` and
  ``mask_pool.labels`` int64 ``(P,)``, so they are sha256-verified with the network. A model
  called without masks draws each sample's mask (seeded) from the pool entries of its
  label. Only segmentation masks: no pixel values, ids or subjects of the training images.
- :func:`check_masks`: given masks must be integer ``(N, H, W)`` of the card's image size
  with values in ``[0, mask_classes)``; anything else is a one-line ``GeneratorError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from generators.architectures import label_indices
from generators.card import ModelCard
from generators.errors import GeneratorError
from generators.seed_stream import CHOICE, image_rngs
from generators.training import TrainingData

POOL_PREFIX = "mask_pool."


def select_pool(data: TrainingData, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``size`` training masks, taken round-robin over labels in a seeded order (so
    every label is represented when ``size`` >= the number of labels): uint8 (P, H, W), int64 (P,)."""
    if data.masks is None or size == 0:
        return np.zeros((0, *data.images.shape[2:]), np.uint8), np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    per_label = [rng.permutation(np.flatnonzero(data.labels == k)).tolist() for k in range(len(data.label_names))]
    chosen: list[int] = []
    while len(chosen) < min(size, len(data.masks)):
        for queue in per_label:
            if queue and len(chosen) < size:
                chosen.append(queue.pop(0))
    return data.masks[chosen].astype(np.uint8), data.labels[chosen].astype(np.int64)


def pool_state(data: TrainingData, size: int, seed: int) -> dict[str, torch.Tensor]:
    """The pool's tensors, to store next to the network's state dict in the weights file."""
    masks, labels = select_pool(data, size, seed)
    return {POOL_PREFIX + "masks": torch.from_numpy(masks), POOL_PREFIX + "labels": torch.from_numpy(labels)}


def network_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the pool's tensors (what the network itself loads)."""
    return {k: v for k, v in state.items() if not k.startswith(POOL_PREFIX)}


def check_masks(card: ModelCard, masks: np.ndarray, mask_classes: int, n: int | None = None) -> np.ndarray:
    """Given masks -> int64 ``(N, H, W)``; raises ``GeneratorError`` (one line) on another
    dtype, shape or count (``n``), or a value outside ``[0, mask_classes)``."""
    masks = np.asarray(masks)
    size = tuple(card.image_size)
    if masks.ndim != 3 or masks.shape[1:] != size or not np.issubdtype(masks.dtype, np.integer):
        raise GeneratorError(
            f"{card.ref}: expected integer masks (N, {size[0]}, {size[1]}), got {masks.dtype} {masks.shape}; "
            "resize label maps to the card's image size"
        )
    if n is not None and len(masks) != n:
        raise GeneratorError(f"{card.ref}: expected {n} masks, got {len(masks)}; give one mask per sample")
    if masks.size and (masks.min() < 0 or masks.max() >= mask_classes):
        raise GeneratorError(
            f"{card.ref}: mask values must lie in [0, {mask_classes}), got [{masks.min()}, {masks.max()}]; "
            "relabel the masks with the card's mask classes"
        )
    return masks.astype(np.int64)


@dataclass(frozen=True)
class MaskPool:
    """Masks int64 ``(P, H, W)`` with the label index of each, int64 ``(P,)``."""

    masks: np.ndarray
    labels: np.ndarray

    @classmethod
    def from_state(cls, card: ModelCard, state: dict[str, torch.Tensor]) -> "MaskPool":
        """The pool stored in a weights file (empty when it holds none)."""
        masks, labels = state.get(POOL_PREFIX + "masks"), state.get(POOL_PREFIX + "labels")
        return cls(
            np.zeros((0, *card.image_size), np.int64) if masks is None else masks.numpy().astype(np.int64),
            np.zeros(0, np.int64) if labels is None else labels.numpy().astype(np.int64),
        )

    @classmethod
    def given(cls, card: ModelCard, mask_classes: int, masks: np.ndarray, labels: Sequence[str]) -> "MaskPool":
        """A pool of ``masks`` int (P, H, W) with one label name each (checked against the card)."""
        checked = check_masks(card, masks, mask_classes)
        if len(labels) != len(checked):
            raise GeneratorError(f"{card.ref}: mask pool has {len(checked)} masks but {len(labels)} labels")
        return cls(checked, np.array(label_indices(card, len(checked), list(labels)), dtype=np.int64))

    def draw(self, card: ModelCard, index: Sequence[int], seed: int) -> np.ndarray:
        """One pool mask per label index in ``index``: image ``i``'s pick comes from its own
        ``CHOICE`` stream (``generators.seed_stream``), so it does not depend on the batch.
        Returns int64 (N, H, W)."""
        picks = []
        for k, rng in zip(index, image_rngs(len(index), seed, CHOICE), strict=True):
            candidates = np.flatnonzero(self.labels == k)
            if len(candidates) == 0:
                raise GeneratorError(
                    f"{card.ref}: no mask for label '{card.conditioning.labels[k]}' in the mask pool; "
                    "pass masks (generate(..., masks=...)) or give a pool with use_mask_pool"
                )
            picks.append(candidates[int(rng.integers(len(candidates)))])
        return self.masks[picks] if picks else np.zeros((0, *self.masks.shape[1:]), np.int64)
