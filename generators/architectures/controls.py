"""Control generators that prove the judge: two negative controls and one positive control.

They satisfy the generator contract (``generate(n, seed, condition)`` -> float32 images
``(N, C, H, W)`` in [0, 1], masks int64 ``(N, H, W)`` when the card has masks, deterministic
for a seed), train through ``generators.training.train_generator`` and load through
``generators.architectures.LOADERS`` like every other architecture, so a pipeline uses them
with ``generator.train.architecture: noise | blobs | real-holdout``.

**Negative controls** (``noise``, ``blobs``): "training" takes no gradient step; it records
each class's pixel mean and standard deviation on the real train split (float32 ``(L,)``
each, in the weights file). ``noise`` emits per-pixel Gaussian noise with the class's mean
and std; ``blobs`` emits smooth random blobs (a seeded coarse Gaussian grid, 1/8 of the
image size, bilinearly upsampled, then scaled to the class's mean and std); both clipped to
[0, 1]. With ``with_masks`` the mask is salt noise: every pixel an independent uniform draw
of a class in [0, K) (K = the card's mask classes). A judge that keeps these is broken.

**Positive control** (``real-holdout``): "generate" serves held-out REAL images, never
generated ones. Design (the simplest honest one): the train stage hands this architecture
the real split named by :data:`HOLDOUT_SPLIT` (``val``) instead of ``train``; its images,
labels and masks are stored in the sha256-verified weights file (``holdout.images`` float32
``(P, C, H, W)`` in [0, 1], ``holdout.labels`` int64 ``(P,)``, ``holdout.masks`` uint8
``(P, H, W)`` when paired, ``holdout.groups`` int64 ``(P,)``: see below). So:

- it never serves a real TRAIN image, which the realism and memorisation checks compare
  against (that would be memorisation, not realism), and never a real TEST image, on which
  the downstream verdict is measured (that would leak the test set);
- the val split is then "synthetic" data; a pipeline using this control must not also use
  val for model selection: set ``retrain.select_on_val: false`` (``tasks.config`` refuses
  the combination);
- each ``generate`` call draws, per class, a seeded permutation of that class's held-out
  images (without replacement while possible; a request larger than the class's holdout
  starts a new permutation, so repeats appear only then). Calls are independent (the
  contract is stateless), so for a repeat-free set request at most the holdout's class
  counts in one batch (``synthesis.batch_size`` and ``shard_rows`` >= the total).
- served images are correlated like real ones (neighbouring slices of one slab), so each
  carries its group: ``holdout.groups`` (written by :func:`add_holdout_groups` from the
  train stage) is the index of each held-out row's split group (subject or slab) among the
  holdout's distinct groups, and ``generate`` returns ``subjects`` = ``holdout-group-NNNN``
  per image. ``tasks/synthesize.py`` writes them into the ``subject`` column and the
  two-sample test (``tasks/realism.py``) keeps each group in one fold; ungrouped, the
  neighbours of a test slice teach the CNN its look and the positive control is told apart
  too easily. Weights without ``holdout.groups`` serve ``subjects`` None (independent rows).

The weights file of ``real-holdout`` holds real pixel data (no ids, subjects, paths or
tags; the group indices only say which images share a subject or slab): it is a local
control, not a model to share.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from generators.architectures import label_indices
from generators.card import ModelCard
from generators.contract import GeneratedBatch
from generators.errors import DataError, GeneratorError
from generators.seed_stream import batch_rng
from generators.train_spec import TrainSpec
from generators.training import TrainedGenerator, TrainingData

#: the real split ``real-holdout`` serves (read by ``tasks.train``); never train or test
HOLDOUT_SPLIT = "val"
NOISE_ARCHITECTURES = ("noise", "blobs")
BLOB_GRID_DIVISOR = 8  # coarse grid = image size / 8 (at least 2x2), upsampled bilinearly
STATS_PREFIX = "stats."
HOLDOUT_PREFIX = "holdout."
HOLDOUT_GROUP = "holdout-group-{:04d}"  # the subject written for a served image of group k


@dataclass(frozen=True)
class ControlConfig:
    """Constructor arguments; stored in the card's ``network`` field."""

    image_size: int
    channels: int
    n_labels: int
    mask_classes: int = 0

    def __post_init__(self) -> None:
        if self.image_size < 2 or self.channels < 1 or self.n_labels < 1 or self.mask_classes < 0:
            raise GeneratorError(f"control generator: invalid network settings {asdict(self)}")


def _config(data: TrainingData, spec: TrainSpec) -> ControlConfig:
    if spec.with_masks and data.masks is None:
        raise DataError(
            "train.with_masks is true but the training images have no masks; ingest masks or set with_masks: false"
        )
    mask_classes = 0
    if spec.with_masks:
        mask_classes = max(data.mask_classes, int(data.masks.max()) + 1)
    return ControlConfig(int(data.images.shape[-1]), int(data.images.shape[1]), len(data.label_names), mask_classes)


def _trained(architecture: str, state: dict[str, torch.Tensor], cfg: ControlConfig, data: TrainingData):
    return TrainedGenerator(
        architecture=architecture,
        state=state,
        network=asdict(cfg),
        labels=data.label_names,
        mask_classes=cfg.mask_classes,
        history=[],
        time_s=0.0,
        resumed_from_epoch=0,
    )


# --------------------------------------------------------------------------- negative controls
def _class_stats(data: TrainingData) -> tuple[np.ndarray, np.ndarray]:
    """Per-class pixel mean and std of ``data.images``: float32 ``(L,)`` each (0.5 / 0.25
    for a class without images)."""
    mean = np.full(len(data.label_names), 0.5, np.float32)
    std = np.full(len(data.label_names), 0.25, np.float32)
    for k in range(len(data.label_names)):
        pixels = data.images[data.labels == k]
        if pixels.size:
            mean[k], std[k] = float(pixels.mean()), float(pixels.std())
    return mean, std


def _train_noise_like(architecture: str, data: TrainingData, spec: TrainSpec) -> TrainedGenerator:
    cfg = _config(data, spec)
    mean, std = _class_stats(data)
    state = {STATS_PREFIX + "mean": torch.from_numpy(mean), STATS_PREFIX + "std": torch.from_numpy(std)}
    return _trained(architecture, state, cfg, data)


def train_noise(
    data: TrainingData,
    spec: TrainSpec,
    *,
    device: str = "cpu",
    checkpoint: Path | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainedGenerator:
    """The ``noise`` negative control: per-class pixel statistics only (no gradient step;
    ``device``, ``checkpoint`` and ``on_epoch`` are accepted for the common signature)."""
    return _train_noise_like("noise", data, spec)


def train_blobs(
    data: TrainingData,
    spec: TrainSpec,
    *,
    device: str = "cpu",
    checkpoint: Path | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainedGenerator:
    """The ``blobs`` negative control: per-class pixel statistics only (no gradient step)."""
    return _train_noise_like("blobs", data, spec)


def salt_noise_masks(n: int, size: tuple[int, int], mask_classes: int, rng: np.random.Generator) -> np.ndarray:
    """int64 ``(n, H, W)``: every pixel an independent uniform class in [0, mask_classes)."""
    return rng.integers(0, mask_classes, (n, *size), dtype=np.int64)


def smooth_blobs(n: int, channels: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """float32 ``(n, channels, size, size)``, each image zero-mean unit-std: a coarse
    Gaussian grid (``size / 8``, at least 2) upsampled bilinearly."""
    coarse = max(2, size // BLOB_GRID_DIVISOR)
    grid = torch.from_numpy(rng.standard_normal((n, channels, coarse, coarse)).astype(np.float32))
    smooth = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
    flat = smooth.flatten(1)
    flat = (flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True).clamp_min(1e-6)
    return flat.reshape(smooth.shape).numpy()


class NoiseModel:
    """A loaded ``noise`` or ``blobs`` control implementing ``generators.contract.Generator``."""

    def __init__(self, card: ModelCard, state_dict: dict[str, torch.Tensor], device: str = "cpu") -> None:
        if card.architecture not in NOISE_ARCHITECTURES:
            raise GeneratorError(f"{card.ref}: NoiseModel serves {NOISE_ARCHITECTURES}, not '{card.architecture}'")
        self.card = card
        self.cfg = ControlConfig(**card.network)
        try:
            self.mean = state_dict[STATS_PREFIX + "mean"].numpy().astype(np.float32)
            self.std = state_dict[STATS_PREFIX + "std"].numpy().astype(np.float32)
        except KeyError as missing:
            raise GeneratorError(f"{card.ref}: weights lack {missing}; retrain the control") from None
        if len(self.mean) != self.cfg.n_labels or len(card.conditioning.labels) != self.cfg.n_labels:
            raise GeneratorError(
                f"{card.ref}: expected {self.cfg.n_labels} labels in the card and the weights, got "
                f"{len(card.conditioning.labels)} and {len(self.mean)}; retrain the control"
            )

    def generate(self, n: int, seed: int, condition: Sequence[str] | str | None = None) -> GeneratedBatch:
        """``n`` samples: float32 images (N, C, H, W) in [0, 1]; salt-noise masks int64
        (N, H, W) when the card has masks. Same seed and condition -> same output."""
        index = np.asarray(label_indices(self.card, n, condition), dtype=np.int64)
        rng = batch_rng(seed)  # keyed by (seed, first stream index): batches differ
        size = self.cfg.image_size
        if self.card.architecture == "noise":
            unit = rng.standard_normal((n, self.cfg.channels, size, size)).astype(np.float32)
        else:
            unit = smooth_blobs(n, self.cfg.channels, size, rng)
        images = self.mean[index, None, None, None] + self.std[index, None, None, None] * unit
        masks = None
        if self.cfg.mask_classes:
            masks = salt_noise_masks(n, (size, size), self.cfg.mask_classes, rng)
        return GeneratedBatch(
            images=np.clip(images, 0.0, 1.0).astype(np.float32),
            masks=masks,
            labels=[self.card.conditioning.labels[i] for i in index],
        )


# --------------------------------------------------------------------------- positive control
def train_real_holdout(
    data: TrainingData,
    spec: TrainSpec,
    *,
    device: str = "cpu",
    checkpoint: Path | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainedGenerator:
    """The ``real-holdout`` positive control: stores ``data`` (which the caller must take
    from the :data:`HOLDOUT_SPLIT` split, see the module docstring) as the weights."""
    cfg = _config(data, spec)
    state = {
        HOLDOUT_PREFIX + "images": torch.from_numpy(np.ascontiguousarray(data.images, dtype=np.float32)),
        HOLDOUT_PREFIX + "labels": torch.from_numpy(data.labels.astype(np.int64)),
    }
    if cfg.mask_classes:
        state[HOLDOUT_PREFIX + "masks"] = torch.from_numpy(data.masks.astype(np.uint8))
    return _trained("real-holdout", state, cfg, data)


def add_holdout_groups(trained: TrainedGenerator, subjects: Sequence[str]) -> TrainedGenerator:
    """``trained`` (a ``real-holdout`` result) with ``holdout.groups`` int64 ``(P,)``: for each
    held-out image, the index of its ``subjects`` entry (the real rows' pseudonymous subject
    or slab, in the stored order) among the sorted distinct entries. The pseudonyms
    themselves are not stored."""
    if trained.architecture != "real-holdout":
        raise GeneratorError(f"holdout groups belong to the 'real-holdout' control, not '{trained.architecture}'")
    n = len(trained.state[HOLDOUT_PREFIX + "labels"])
    if len(subjects) != n or any(not s for s in subjects):
        raise DataError(
            f"real-holdout: expected a subject for each of the {n} held-out images, got {len(subjects)} "
            f"({sum(not s for s in subjects)} empty); re-ingest the real data"
        )
    index = {name: k for k, name in enumerate(sorted(set(subjects)))}
    groups = np.asarray([index[s] for s in subjects], dtype=np.int64)
    return replace(trained, state={**trained.state, HOLDOUT_PREFIX + "groups": torch.from_numpy(groups)})


def draw_without_replacement(pool: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` entries of ``pool``: a seeded permutation, then further permutations once
    it is used up (so no entry repeats before every entry was drawn)."""
    rounds = [rng.permutation(pool) for _ in range(-(-count // len(pool)))]
    return np.concatenate(rounds)[:count] if rounds else pool[:0]


class HoldoutModel:
    """A loaded ``real-holdout`` control implementing ``generators.contract.Generator``."""

    def __init__(self, card: ModelCard, state_dict: dict[str, torch.Tensor], device: str = "cpu") -> None:
        if card.architecture != "real-holdout":
            raise GeneratorError(f"{card.ref}: HoldoutModel serves 'real-holdout', not '{card.architecture}'")
        self.card = card
        self.cfg = ControlConfig(**card.network)
        try:
            self.images = state_dict[HOLDOUT_PREFIX + "images"].numpy().astype(np.float32)
            self.labels = state_dict[HOLDOUT_PREFIX + "labels"].numpy().astype(np.int64)
        except KeyError as missing:
            raise GeneratorError(f"{card.ref}: weights lack {missing}; retrain the control") from None
        masks = state_dict.get(HOLDOUT_PREFIX + "masks")
        self.masks = None if masks is None else masks.numpy().astype(np.int64)
        groups = state_dict.get(HOLDOUT_PREFIX + "groups")
        self.groups = None if groups is None else groups.numpy().astype(np.int64)
        if self.groups is not None and len(self.groups) != len(self.labels):
            raise GeneratorError(f"{card.ref}: expected one holdout group per image, got {len(self.groups)}; retrain")
        if bool(self.cfg.mask_classes) != (self.masks is not None):
            raise GeneratorError(f"{card.ref}: the card's mask_classes and the stored masks disagree; retrain")

    def generate(self, n: int, seed: int, condition: Sequence[str] | str | None = None) -> GeneratedBatch:
        """``n`` held-out real images, float32 (N, C, H, W) in [0, 1] (and their masks, int64
        (N, H, W)); per class without replacement while possible; ``subjects``: each image's
        ``holdout-group-NNNN`` (None without stored groups). Same seed -> same output."""
        index = np.asarray(label_indices(self.card, n, condition), dtype=np.int64)
        rng = batch_rng(seed)  # keyed by (seed, first stream index): batches differ
        picks = np.zeros(n, np.int64)
        for k in np.unique(index):
            pool = np.flatnonzero(self.labels == k)
            if len(pool) == 0:
                raise GeneratorError(
                    f"{self.card.ref}: the held-out {HOLDOUT_SPLIT} split has no image of class "
                    f"'{self.card.conditioning.labels[k]}'; request only classes it holds or re-split the data"
                )
            where = np.flatnonzero(index == k)
            picks[where] = draw_without_replacement(pool, len(where), rng)
        return GeneratedBatch(
            images=self.images[picks].copy(),
            masks=None if self.masks is None else self.masks[picks].copy(),
            labels=[self.card.conditioning.labels[i] for i in index],
            subjects=None if self.groups is None else [HOLDOUT_GROUP.format(g) for g in self.groups[picks]],
        )
