"""Segmentation masks as generator conditions, shared by the mask-conditioned architectures
(``pix2pix``; ``ddpm``, ``vae3d`` and ``ldm3d`` with ``with_masks: true``).

- The **mask pool**: up to ``spec.mask_pool_size`` training masks (stratified by label)
  stored in the weights file under ``mask_pool.masks`` uint8 ``(P, H, W)`` (volumes:
  ``(P, D, H, W)``) and
  ``mask_pool.labels`` int64 ``(P,)``, so they are sha256-verified with the network. A model
  called without masks draws each sample's mask (seeded) from the pool entries of its
  label. Only segmentation masks: no pixel values, ids or subjects of the training images.
- :func:`deform_masks`: paired volume generation (``vae3d``, ``ldm3d``) bends each drawn
  pool mask by a random smooth displacement field, so a paired volume gets new anatomy
  instead of a training cube's (a copy that the memorisation filter would drop, and
  rightly: the decoder follows its mask closely).
- :func:`check_masks`: given masks must be integer ``(N, H, W)`` of the card's image size
  (a volume generator's: ``(N, D, H, W)`` of its ``volume_size``) with values in
  ``[0, mask_classes)``; anything else is a one-line ``GeneratorError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from generators.architectures import label_indices
from generators.card import ModelCard
from generators.errors import GeneratorError
from generators.seed_stream import CHOICE, DEFORM, image_rngs
from generators.training import TrainingData

POOL_PREFIX = "mask_pool."


def select_pool(data: TrainingData, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``size`` training masks, taken round-robin over labels in a seeded order (so
    every label is represented when ``size`` >= the number of labels): uint8 (P, H, W) (volumes:
    (P, D, H, W)), int64 (P,)."""
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


def mask_shape(card: ModelCard) -> tuple[int, ...]:
    """The shape of one mask of ``card``: its ``volume_size`` (D, H, W) for a volume
    generator, else its ``image_size`` (H, W)."""
    volume = getattr(card, "volume_size", None)
    return tuple(volume) if volume is not None else tuple(card.image_size)


def network_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the pool's tensors (what the network itself loads)."""
    return {k: v for k, v in state.items() if not k.startswith(POOL_PREFIX)}


def check_masks(card: ModelCard, masks: np.ndarray, mask_classes: int, n: int | None = None) -> np.ndarray:
    """Given masks -> int64 ``(N, H, W)`` (volumes: ``(N, D, H, W)``, :func:`mask_shape`);
    raises ``GeneratorError`` (one line) on another dtype, shape or count (``n``), or a
    value outside ``[0, mask_classes)``."""
    masks = np.asarray(masks)
    size = mask_shape(card)
    if masks.ndim != len(size) + 1 or masks.shape[1:] != size or not np.issubdtype(masks.dtype, np.integer):
        what = "volume" if len(size) == 3 else "image"
        raise GeneratorError(
            f"{card.ref}: expected integer masks (N, {', '.join(map(str, size))}), got {masks.dtype} {masks.shape}; "
            f"resize label maps to the card's {what} size"
        )
    if n is not None and len(masks) != n:
        raise GeneratorError(f"{card.ref}: expected {n} masks, got {len(masks)}; give one mask per sample")
    if masks.size and (masks.min() < 0 or masks.max() >= mask_classes):
        raise GeneratorError(
            f"{card.ref}: mask values must lie in [0, {mask_classes}), got [{masks.min()}, {masks.max()}]; "
            "relabel the masks with the card's mask classes"
        )
    return masks.astype(np.int64)


def deform_masks(masks: np.ndarray, amplitude: float, seed: int, control_points: int = 4) -> np.ndarray:
    """Bend volume masks int64 ``(N, D, H, W)`` by random smooth deformations: per image, a
    displacement of ``control_points``^3 normal draws x ``amplitude`` voxels per axis (from
    the image's ``DEFORM`` stream, so it depends on ``(seed, image index)`` only), upsampled
    trilinearly to the volume and applied to the one-hot mask with trilinear sampling, then
    the most likely class per voxel (smooth boundaries, no isolated voxels that nearest
    sampling of a blocky mask leaves; borders repeat the edge). ``amplitude`` 0 returns
    ``masks``."""
    import torch.nn.functional as F

    if amplitude <= 0 or len(masks) == 0:
        return masks
    if masks.ndim != 4:
        raise GeneratorError(f"deform_masks takes volume masks (N, D, H, W), got shape {masks.shape}")
    n, *size = masks.shape
    coarse = np.stack([rng.standard_normal((3, *(control_points,) * 3)) for rng in image_rngs(n, seed, DEFORM)])
    flow = F.interpolate(
        torch.from_numpy(coarse * amplitude).float(), size=tuple(size), mode="trilinear", align_corners=True
    )
    axes = [torch.linspace(-1.0, 1.0, s) for s in size]
    base = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (D, H, W, 3) in (d, h, w) order
    per_voxel = torch.tensor([2.0 / max(s - 1, 1) for s in size])
    grid = (base[None] + flow.permute(0, 2, 3, 4, 1) * per_voxel)[..., [2, 1, 0]]  # grid_sample wants (w, h, d)
    onehot = F.one_hot(torch.from_numpy(masks).long(), int(masks.max()) + 1).permute(0, 4, 1, 2, 3).float()
    moved = F.grid_sample(onehot, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return moved.argmax(dim=1).numpy().astype(np.int64)


def batch_masks(model: Any, masks: np.ndarray | None, index: Sequence[int], seed: int, n: int) -> np.ndarray | None:
    """The masks of a mask-capable volume generator's batch (``vae3d``, ``ldm3d``: ``model``
    has ``card``, ``mask_conditioned``, ``mask_classes``, ``pool``, ``cfg.mask_deformation``):
    given ``masks`` checked by :func:`check_masks` (a one-line ``GeneratorError`` for a model
    that is not mask-conditioned), else drawn from the pool and bent by the model's
    ``mask_deformation``, else None (no masks). int64 ``(N, D, H, W)``."""
    if masks is not None:
        if not model.mask_conditioned:
            raise GeneratorError(
                f"{model.card.ref}: this {model.card.architecture} is not mask-conditioned (trained with "
                "with_masks: false); retrain with with_masks: true to generate volumes for given masks"
            )
        return check_masks(model.card, masks, model.mask_classes, n)
    if model.mask_conditioned:
        return model.pool.draw(model.card, index, seed, deform=model.cfg.mask_deformation)
    return None


@dataclass(frozen=True)
class MaskPool:
    """Masks int64 ``(P, H, W)`` (volumes: ``(P, D, H, W)``) with the label index of each, int64 ``(P,)``."""

    masks: np.ndarray
    labels: np.ndarray

    @classmethod
    def from_state(cls, card: ModelCard, state: dict[str, torch.Tensor]) -> "MaskPool":
        """The pool stored in a weights file (empty when it holds none)."""
        masks, labels = state.get(POOL_PREFIX + "masks"), state.get(POOL_PREFIX + "labels")
        return cls(
            np.zeros((0, *mask_shape(card)), np.int64) if masks is None else masks.numpy().astype(np.int64),
            np.zeros(0, np.int64) if labels is None else labels.numpy().astype(np.int64),
        )

    @classmethod
    def given(cls, card: ModelCard, mask_classes: int, masks: np.ndarray, labels: Sequence[str]) -> "MaskPool":
        """A pool of ``masks`` int (P, H, W) or (P, D, H, W) with one label name each (checked against the card)."""
        checked = check_masks(card, masks, mask_classes)
        if len(labels) != len(checked):
            raise GeneratorError(f"{card.ref}: mask pool has {len(checked)} masks but {len(labels)} labels")
        return cls(checked, np.array(label_indices(card, len(checked), list(labels)), dtype=np.int64))

    def draw(self, card: ModelCard, index: Sequence[int], seed: int, deform: float = 0.0) -> np.ndarray:
        """One pool mask per label index in ``index``: image ``i``'s pick comes from its own
        ``CHOICE`` stream (``generators.seed_stream``), so it does not depend on the batch.
        ``deform`` > 0 (volumes): bent by :func:`deform_masks` with that amplitude in voxels.
        Returns int64 (N, H, W) (volumes: (N, D, H, W))."""
        picks = []
        for k, rng in zip(index, image_rngs(len(index), seed, CHOICE), strict=True):
            candidates = np.flatnonzero(self.labels == k)
            if len(candidates) == 0:
                raise GeneratorError(
                    f"{card.ref}: no mask for label '{card.conditioning.labels[k]}' in the mask pool; "
                    "pass masks (generate(..., masks=...)) or give a pool with use_mask_pool"
                )
            picks.append(candidates[int(rng.integers(len(candidates)))])
        drawn = self.masks[picks] if picks else np.zeros((0, *self.masks.shape[1:]), np.int64)
        return deform_masks(drawn, deform, seed) if deform > 0 else drawn
