"""Downstream models: the one home for the networks, training loop and metrics that the
``filter`` stage (label-consistency classifier) and the ``retrain`` stage share.

Array conventions (all numpy, channel-first):

- images: float32 ``(N, C, H, W)`` in [0, 1] (as :func:`generators.shards.decode_table`)
- classification targets: int64 ``(N,)`` class indices in ``[0, K)``
- segmentation targets: int64 ``(N, H, W)`` mask class indices in ``[0, K)``, 0 = background

Volumes (``preprocess.dims: 3``) are the same with one more spatial axis: images float32
``(N, 1, D, H, W)``, masks int64 ``(N, D, H, W)``; the functions here tell them apart by
``images.ndim`` (5) and use 3D networks (``spatial_dims=3``), random ``roi`` crops and flips
for training (:func:`crop_volumes`, :func:`augment_volumes`) and a gaussian-weighted sliding
window for segmentation inference on whole (possibly larger) val/test volumes
(:func:`predict_proba` with ``roi_size``).

Callers seed and configure torch with :func:`tasks.runtime.setup_torch` (threads, seeds,
deterministic algorithms); training draws its batches and augmentations from the seed it
is given, so the same inputs, seed and thread count give bitwise-identical weights and
metrics on CPU.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from generators.errors import ConfigError, DataError
from generators.shards import decode_table, read_manifest, read_table
from tasks.config import AugmentSpec
from tasks.statistics import (  # noqa: F401 - the metric names and scores live in tasks.statistics
    CLASSIFICATION_METRICS,
    LOWER_IS_BETTER,
    SEGMENTATION_METRICS,
    confusion_matrix,
    scores_from_confusion,
)

logger = logging.getLogger(__name__)

Task = Literal["classification", "segmentation"]
NETWORKS: dict[str, tuple[str, ...]] = {"classification": ("densenet", "resnet"), "segmentation": ("unet",)}
#: NHWC activations: about 25% less CPU time per step for the small DenseNet/ResNet at
#: 64x64 (no change for the UNet); the arrays handed in stay channel-first ``(N, C, H, W)``
MEMORY_FORMAT = torch.channels_last
#: NDHWC activations for volumes (``channels_last`` is for 4D tensors only): measured about
#: 10-20% less CPU time per training step than contiguous for the small 3D UNet at 24^3
#: (batch 4, one thread)
MEMORY_FORMAT_3D = torch.channels_last_3d
#: the UNet halves its input twice (strides (2, 2)): its input sides must be multiples of this
UNET_DIVISOR = 4
#: the DenseNet halves its input four times (stem conv, max pool, two 2x2 average pools):
#: smaller inputs fail inside its last pool
DENSENET_MIN_SIDE = 16
#: volumes: brightness/contrast augmentation draws ``x * a + b`` with ``a`` in 1 -/+ this and
#: ``b`` in -/+ this (albumentations' RandomBrightnessContrast defaults)
INTENSITY_LIMIT = 0.2


def memory_format(ndim: int) -> torch.memory_format:
    """The memory format for activations of ``ndim`` dimensions: 4 (images) or 5 (volumes)."""
    return MEMORY_FORMAT_3D if ndim == 5 else MEMORY_FORMAT


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class LabelledArrays:
    """Decoded rows of a dataset. ``images``: float32 ``(N, C, H, W)`` in [0, 1];
    ``labels``: class names (``""`` for unlabelled rows); ``targets``: int64 ``(N,)`` index
    of each label in the class list it was loaded with (-1 when not in it); ``masks``:
    int64 ``(N, H, W)`` or None when any row has no mask; ``ids``: row ids."""

    images: np.ndarray
    labels: list[str]
    targets: np.ndarray
    masks: np.ndarray | None
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)


def dataset_labels(dataset: Path, splits: Sequence[str] | None = None) -> dict[str, int]:
    """``{label: count}`` over ``splits`` (all when None) from the manifest, sorted by label;
    unlabelled rows count under ``""``."""
    counts: dict[str, int] = {}
    for split, per_label in read_manifest(dataset)["class_counts"].items():
        if splits is None or split in splits:
            for label, n in per_label.items():
                counts[label] = counts.get(label, 0) + int(n)
    return dict(sorted(counts.items()))


def load_labelled(dataset: Path, splits: Sequence[str], class_names: Sequence[str]) -> LabelledArrays:
    """Read and decode every row of ``splits`` (ordered by shard, i.e. by id)."""
    table = read_table(dataset, splits=list(splits))
    arrays = decode_table(table)
    labels = ["" if label is None else str(label) for label in arrays.labels]
    index = {name: i for i, name in enumerate(class_names)}
    targets = np.asarray([index.get(label, -1) for label in labels], dtype=np.int64)
    return LabelledArrays(arrays.images, labels, targets, arrays.masks, list(arrays.ids))


# --------------------------------------------------------------------------- networks
def build_network(
    task: Task, network: str, in_channels: int, num_classes: int, spatial_dims: int = 2
) -> torch.nn.Module:
    """A small MONAI network. Input: float32 ``(B, in_channels, H, W)`` (``spatial_dims``
    2) or ``(B, in_channels, D, H, W)`` (3, volumes); output: logits float32
    ``(B, num_classes)`` (classification) or ``(B, num_classes, *spatial)`` (segmentation;
    every spatial side divisible by :data:`UNET_DIVISOR`). Sizes were tuned for 64x64 grey
    images on 2 CPU cores (see ``retrain``'s budget); volumes use the same widths."""
    from monai.networks.nets import DenseNet, ResNet, UNet

    if spatial_dims not in (2, 3):
        raise DataError(f"expected images with 2 or 3 spatial dimensions, got {spatial_dims}; check preprocess.dims")
    if network not in NETWORKS.get(task, ()):
        raise ConfigError(
            f"retrain.network: expected one of {', '.join(NETWORKS.get(task, ()))} for task '{task}', "
            f"got '{network}'; pick a network that fits the task"
        )
    if num_classes < 2:
        raise DataError(f"expected at least 2 classes for {task}, got {num_classes}; add labelled data")
    if network == "densenet":
        return DenseNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=num_classes,
            init_features=16,
            growth_rate=8,
            block_config=(2, 3, 4),
            bn_size=2,
        )
    if network == "resnet":
        return ResNet(
            block="basic",
            layers=(1, 1, 1, 1),
            block_inplanes=(8, 16, 32, 64),
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            conv1_t_size=3,
            conv1_t_stride=1,
            num_classes=num_classes,
        )
    return UNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=num_classes,
        channels=(8, 16, 32),
        strides=(2, 2),
        num_res_units=1,
    )


# --------------------------------------------------------------------------- augmentation
def build_augmentation(spec: AugmentSpec | None, seed: int):
    """An albumentations ``Compose`` (seeded, its own RNG) for float32 HWC images in [0, 1]
    and their uint8 masks, or None when ``spec`` is None or every probability is 0."""
    if spec is None or max(spec.hflip_p, spec.rotate_p, spec.brightness_contrast_p) == 0:
        return None
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations as A

    return A.Compose(
        [
            A.HorizontalFlip(p=spec.hflip_p),
            A.Affine(
                rotate=(-spec.rotate_limit_deg, spec.rotate_limit_deg),
                border_mode=0,
                fill=0,
                fill_mask=0,
                p=spec.rotate_p,
            ),
            A.RandomBrightnessContrast(p=spec.brightness_contrast_p),
        ],
        seed=seed,
    )


def augment_batch(augment, images: np.ndarray, masks: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply ``augment`` sample by sample. images: float32 ``(B, C, H, W)`` in [0, 1]
    (returned clipped to [0, 1]); masks: int64 ``(B, H, W)`` or None."""
    if augment is None:
        return images, masks
    out_images = np.empty_like(images)
    out_masks = None if masks is None else np.empty_like(masks)
    for i in range(images.shape[0]):
        hwc = np.ascontiguousarray(np.moveaxis(images[i], 0, -1))
        if masks is None:
            result = augment(image=hwc)
        else:
            result = augment(image=hwc, mask=masks[i].astype(np.uint8))
            out_masks[i] = result["mask"]
        out_images[i] = np.moveaxis(np.asarray(result["image"], dtype=np.float32).reshape(hwc.shape), -1, 0)
    np.clip(out_images, 0.0, 1.0, out=out_images)
    return out_images, out_masks


def resolve_roi(roi_size: int | Sequence[int] | None, shape: Sequence[int]) -> tuple[int, int, int]:
    """The (D, H, W) training crop / sliding window of volumes whose rows are ``shape``
    (D, H, W): ``roi_size`` as a cube side (or a 3-tuple), None = ``shape``. Raises
    ConfigError when it is larger than the rows."""
    shape = tuple(int(v) for v in shape)
    if roi_size is None:
        return shape  # type: ignore[return-value]
    roi = (int(roi_size),) * 3 if isinstance(roi_size, (int, np.integer)) else tuple(int(v) for v in roi_size)
    if len(roi) != 3 or len(shape) != 3:
        raise ConfigError(f"retrain.roi_size: expected a cube side for (D, H, W) volumes, got {roi} for {shape}")
    if any(r > s for r, s in zip(roi, shape, strict=True)):
        raise ConfigError(
            f"retrain.roi_size: expected at most the train rows' size {list(shape)}, got {list(roi)}; "
            "lower retrain.roi_size or leave it unset"
        )
    return roi  # type: ignore[return-value]


def check_volume_roi(task: Task, network: str, roi: Sequence[int]) -> None:
    """Raise ConfigError when a (D, H, W) ``roi`` does not fit ``network``: UNet sides must be
    multiples of :data:`UNET_DIVISOR`, DenseNet sides at least :data:`DENSENET_MIN_SIDE`."""
    if task == "segmentation" and any(side % UNET_DIVISOR for side in roi):
        raise ConfigError(
            f"retrain.roi_size: expected sides divisible by {UNET_DIVISOR} for the UNet, got {list(roi)}; "
            f"set retrain.roi_size to a multiple of {UNET_DIVISOR}"
        )
    if network == "densenet" and min(roi) < DENSENET_MIN_SIDE:
        raise ConfigError(
            f"retrain.roi_size: expected sides of at least {DENSENET_MIN_SIDE} for the DenseNet, got {list(roi)}; "
            f"raise retrain.roi_size (and the train rows' size) or use network: resnet"
        )


def crop_volumes(
    images: np.ndarray, masks: np.ndarray | None, roi: Sequence[int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """Random ``roi`` (D, H, W) crops, one per volume, corners uniform from ``rng``.
    images: float32 ``(B, C, D, H, W)``; masks: int64 ``(B, D, H, W)`` (cropped alike) or
    None. Volumes already of ``roi`` size are returned as they are (no draw)."""
    shape = images.shape[2:]
    if tuple(shape) == tuple(roi):
        return images, masks
    starts = rng.integers(0, np.asarray(shape) - np.asarray(roi) + 1, size=(images.shape[0], 3))
    out_images = np.empty((*images.shape[:2], *roi), images.dtype)
    out_masks = None if masks is None else np.empty((masks.shape[0], *roi), masks.dtype)
    for i, (d, h, w) in enumerate(starts):
        window = (slice(d, d + roi[0]), slice(h, h + roi[1]), slice(w, w + roi[2]))
        out_images[i] = images[(i, slice(None), *window)]
        if out_masks is not None:
            out_masks[i] = masks[(i, *window)]
    return out_images, out_masks


def augment_volumes(
    spec: AugmentSpec | None, images: np.ndarray, masks: np.ndarray | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """3D augmentation drawn from ``rng`` (no albumentations: its transforms are 2D).

    Mapping from :class:`tasks.config.AugmentSpec` (per volume, independently):

    - ``hflip_p``: a flip along EACH of the three axes D, H, W with this probability (image
      and mask alike);
    - ``brightness_contrast_p``: with this probability ``x * a + b`` on the image only,
      ``a`` uniform in ``1 -/+ INTENSITY_LIMIT`` and ``b`` in ``-/+ INTENSITY_LIMIT`` (the
      defaults of albumentations' RandomBrightnessContrast), then clipped to [0, 1];
    - ``rotate_p`` / ``rotate_limit_deg``: not applied to volumes (3D resampling of every
      crop would cost more CPU time than the training step; flips change orientation).

    images: float32 ``(B, C, D, H, W)`` in [0, 1]; masks: int64 ``(B, D, H, W)`` or None.
    The same draws for every batch whatever the outcomes: deterministic for a seed."""
    if spec is None or max(spec.hflip_p, spec.brightness_contrast_p) == 0:
        return images, masks
    batch = images.shape[0]
    flips = rng.random((batch, 3)) < spec.hflip_p
    scaled = rng.random(batch) < spec.brightness_contrast_p
    gain = rng.uniform(1 - INTENSITY_LIMIT, 1 + INTENSITY_LIMIT, batch)
    shift = rng.uniform(-INTENSITY_LIMIT, INTENSITY_LIMIT, batch)
    out_images = images.copy()
    out_masks = None if masks is None else masks.copy()
    for i in range(batch):
        axes = tuple(int(a) for a in np.flatnonzero(flips[i]))
        if axes:
            out_images[i] = np.flip(out_images[i], axis=tuple(a + 1 for a in axes))
            if out_masks is not None:
                out_masks[i] = np.flip(out_masks[i], axis=axes)
        if scaled[i]:
            out_images[i] = out_images[i] * np.float32(gain[i]) + np.float32(shift[i])
    np.clip(out_images, 0.0, 1.0, out=out_images)
    return out_images, out_masks


# --------------------------------------------------------------------------- training
def train_model(
    model: torch.nn.Module,
    images: np.ndarray,
    targets: np.ndarray,
    *,
    task: Task,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    augment: AugmentSpec | None = None,
    device: torch.device | str = "cpu",
    val: tuple[np.ndarray, np.ndarray] | None = None,
    eval_every: int = 25,
    roi_size: int | Sequence[int] | None = None,
    sw_overlap: float = 0.25,
) -> torch.nn.Module:
    """Train ``model`` for exactly ``steps`` Adam steps; returns it (in eval mode).

    With ``val`` = ``(images, targets)`` (same layout as the training arrays) the model is
    scored on it every ``eval_every`` steps and after the last one, and the weights with
    the best :func:`validation_score` are returned (the latest wins a tie).

    images: float32 ``(N, C, H, W)`` in [0, 1]; targets: int64 ``(N,)`` class indices
    (classification, cross-entropy) or ``(N, H, W)`` mask indices (segmentation, Dice + CE).
    Batches of ``min(batch_size, N)`` images are drawn epoch by epoch from permutations of
    a numpy generator seeded with ``seed``; the same arguments give the same weights.

    Volumes (images ``(N, C, D, H, W)``, masks ``(N, D, H, W)``): each batch is cut to
    random crops of :func:`resolve_roi` ``(roi_size, (D, H, W))`` (:func:`crop_volumes`)
    and augmented by :func:`augment_volumes`, both drawn from a second generator seeded
    with ``(seed, 1)``; segmentation validation volumes (any size) are read with a
    sliding window of that roi and ``sw_overlap``.
    """
    n = int(images.shape[0])
    if n < 2:
        raise DataError(f"expected at least 2 training images, got {n}; add data or lower the split fractions")
    if targets.shape[0] != n:
        raise DataError(f"expected one target per image ({n}), got {targets.shape[0]}")
    if steps < 1 or batch_size < 1:
        raise ConfigError(f"expected steps >= 1 and batch_size >= 1, got {steps} and {batch_size}")
    device = torch.device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    volumes = images.ndim == 5
    roi = resolve_roi(roi_size, images.shape[2:]) if volumes else None
    if volumes:
        check_volume_roi(task, "densenet" if type(model).__name__ == "DenseNet" else "", roi)
    volume_rng = np.random.default_rng((seed, 1)) if volumes else None
    transform = None if volumes else build_augmentation(augment, seed)
    fmt = memory_format(images.ndim)
    model = model.to(device, memory_format=fmt)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    if task == "classification":
        loss_fn: torch.nn.Module = torch.nn.CrossEntropyLoss()
    else:
        from monai.losses import DiceCELoss

        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    batch = min(batch_size, n)
    order = rng.permutation(n)
    cursor = 0
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    for step in range(steps):
        if cursor + batch > n:
            order, cursor = rng.permutation(n), 0
        index = np.sort(order[cursor : cursor + batch])
        cursor += batch
        x, y = images[index], targets[index]
        if volumes:
            masks = y if task == "segmentation" else None
            x, masks = crop_volumes(x, masks, roi, volume_rng)
            x, masks = augment_volumes(augment, x, masks, volume_rng)
            y = y if masks is None else masks
        elif task == "classification":
            x, _ = augment_batch(transform, x, None)
        else:
            x, y = augment_batch(transform, x, y)
        xb = torch.from_numpy(np.ascontiguousarray(x)).to(device).contiguous(memory_format=fmt)
        yb = torch.from_numpy(np.ascontiguousarray(y).astype(np.int64)).to(device)
        if task == "segmentation":
            yb = yb[:, None]
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        loss.backward()
        optimizer.step()
        if step == 0 or (step + 1) % 100 == 0 or step + 1 == steps:
            logger.debug("step %d/%d loss %.4f", step + 1, steps, float(loss.detach()))
        if val is not None and ((step + 1) % eval_every == 0 or step + 1 == steps):
            score = validation_score(
                model,
                val,
                task=task,
                batch_size=batch_size,
                device=device,
                roi_size=roi if volumes and task == "segmentation" else None,
                sw_overlap=sw_overlap,
            )
            if best is None or score >= best[0]:
                best = (score, step + 1, {k: v.detach().clone() for k, v in model.state_dict().items()})
            model.train()
    if best is not None:
        model.load_state_dict(best[2])
        logger.debug("kept the weights of step %d (validation score %.4f)", best[1], best[0])
    return model.eval()


def validation_score(
    model: torch.nn.Module,
    val: tuple[np.ndarray, np.ndarray],
    *,
    task: Task,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    roi_size: Sequence[int] | None = None,
    sw_overlap: float = 0.25,
) -> float:
    """Model-selection score on a held-out split, higher is better: balanced accuracy
    (classification; targets int64 ``(N,)``) or mean per-image Dice over foreground classes
    (segmentation; targets ``(N, H, W)`` or ``(N, D, H, W)``; ``roi_size``/``sw_overlap``:
    the sliding window for volumes, see :func:`predict_proba`)."""
    images, targets = val
    proba = predict_proba(model, images, batch_size=batch_size, device=device, roi_size=roi_size, sw_overlap=sw_overlap)
    predicted = proba.argmax(axis=1)
    if task == "classification":
        num_classes = proba.shape[1]
        return float(scores_from_confusion(confusion_matrix(targets, predicted, num_classes))["balanced_accuracy"])
    truth, pred = _one_hot_masks(
        np.asarray(targets, dtype=np.int64), predicted.astype(np.int64), max(2, proba.shape[1])
    )
    return float(_dice_per_image(truth, pred).mean())


@torch.no_grad()
def predict_proba(
    model: torch.nn.Module,
    images: np.ndarray,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    roi_size: Sequence[int] | None = None,
    sw_overlap: float = 0.25,
) -> np.ndarray:
    """Softmax probabilities. images: float32 ``(N, C, H, W)`` or ``(N, C, D, H, W)`` in
    [0, 1]; returns float32 ``(N, K)`` (classification) or ``(N, K, *spatial)``
    (segmentation), rows summing to 1.

    ``roi_size`` (volumes, segmentation): ``monai.inferers.sliding_window_inference`` with
    windows of this (D, H, W), ``sw_overlap`` and gaussian weighting of the windows'
    probabilities, so volumes of any size (val/test rows larger than the train crops) get
    a prediction of their own shape; None: one forward pass of the whole input."""
    model.eval()
    device = torch.device(device)
    fmt = memory_format(images.ndim)
    window = None if roi_size is None or images.ndim != 5 else tuple(int(v) for v in roi_size)

    def probabilities(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(model(x.contiguous(memory_format=fmt)).float(), dim=1)

    outputs = []
    for start in range(0, images.shape[0], batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(device)
        if window is None:
            proba = probabilities(xb)
        else:
            from monai.inferers import sliding_window_inference

            proba = sliding_window_inference(xb, window, batch_size, probabilities, overlap=sw_overlap, mode="gaussian")
            proba = torch.as_tensor(proba).float()
        outputs.append(proba.cpu().numpy())
    if not outputs:
        return np.zeros((0, 0), np.float32)
    return np.concatenate(outputs).astype(np.float32)


# --------------------------------------------------------------------------- metrics
def round_floats(value: Any, digits: int = 6) -> Any:
    """Round every float in a JSON-able structure; non-finite floats become None."""
    if isinstance(value, float):
        return round(value, digits) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: round_floats(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [round_floats(v, digits) for v in value]
    return value


def evaluate_classification(y_true: np.ndarray, proba: np.ndarray, class_names: list[str]) -> dict:
    """Metrics of predictions ``argmax(proba)``. y_true: int64 ``(N,)``; proba: float32
    ``(N, K)``. Returns accuracy, balanced_accuracy, macro_f1 (floats in [0, 1]) and
    ``per_class`` ``{name: {"n": int, "correct": int, "predicted": int}}``."""
    if proba.ndim != 2 or proba.shape[0] != y_true.shape[0] or proba.shape[1] != len(class_names):
        raise DataError(f"expected probabilities of shape ({y_true.shape[0]}, {len(class_names)}), got {proba.shape}")
    if y_true.shape[0] == 0:
        raise DataError("expected at least one evaluation image, got 0; check the split")
    y_pred = proba.argmax(axis=1)
    confusion = confusion_matrix(y_true, y_pred, len(class_names))
    scores = {k: float(v) for k, v in scores_from_confusion(confusion).items()}
    scores["per_class"] = {
        name: {
            "n": int(confusion[i].sum()),
            "correct": int(confusion[i, i]),
            "predicted": int(confusion[:, i].sum()),
        }
        for i, name in enumerate(class_names)
    }
    return scores


def _one_hot_masks(
    masks_true: np.ndarray, masks_pred: np.ndarray, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 masks ``(N, *spatial)`` -> float one-hot ``(N, K, *spatial)`` tensors (truth, prediction)."""
    classes = torch.arange(num_classes).reshape(1, num_classes, *([1] * (masks_true.ndim - 1)))
    truth = (torch.from_numpy(masks_true)[:, None] == classes).float()
    pred = (torch.from_numpy(masks_pred)[:, None] == classes).float()
    return truth, pred


def _dice_per_class(truth: torch.Tensor, pred: torch.Tensor) -> np.ndarray:
    """float64 ``(N, K-1)``: Dice of each foreground class 1..K-1 per image (MONAI's
    ``compute_dice``; a class empty in both scores 1, empty in only one scores 0)."""
    from monai.metrics import compute_dice

    dice = compute_dice(pred, truth, include_background=False, ignore_empty=False).double().numpy()
    return np.nan_to_num(dice, nan=0.0)


def _dice_per_image(truth: torch.Tensor, pred: torch.Tensor) -> np.ndarray:
    """float64 ``(N,)``: :func:`_dice_per_class` averaged over the foreground classes."""
    return _dice_per_class(truth, pred).mean(axis=1)


def segmentation_scores_per_class(
    masks_true: np.ndarray, masks_pred: np.ndarray, num_classes: int
) -> dict[str, np.ndarray]:
    """Dice and HD95 (pixels / voxels) of every foreground class 1..K-1 in every image.

    masks: int64 ``(N, H, W)`` or ``(N, D, H, W)``. Dice via ``monai.metrics.compute_dice``
    (a class empty in both truth and prediction scores 1, empty in only one scores 0). HD95
    via ``monai.metrics.compute_hausdorff_distance`` (percentile 95, unit spacing); a class
    empty in both scores 0 and in only one scores the image (volume) diagonal, so values
    stay finite. Returns ``{"dice": float64 (N, K-1) in [0, 1], "hd95": float64 (N, K-1) >= 0}``.
    """
    from monai.metrics import compute_hausdorff_distance

    if masks_true.shape != masks_pred.shape:
        raise DataError(f"expected predicted masks of shape {masks_true.shape}, got {masks_pred.shape}")
    spatial = masks_true.shape[1:]
    if len(spatial) not in (2, 3):
        raise DataError(f"expected masks of shape (N, H, W) or (N, D, H, W), got {masks_true.shape}")
    truth, pred = _one_hot_masks(masks_true, masks_pred, num_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # monai warns for every empty class; handled below
        hd = compute_hausdorff_distance(pred, truth, include_background=False, percentile=95).double().numpy()
    truth_any = truth[:, 1:].flatten(2).amax(-1).bool().numpy()
    pred_any = pred[:, 1:].flatten(2).amax(-1).bool().numpy()
    if len(spatial) == 2:
        diagonal = float(np.hypot(*spatial))
    else:
        diagonal = float(np.sqrt(sum(float(side) ** 2 for side in spatial)))
    hd = np.where(truth_any & pred_any, hd, np.where(truth_any | pred_any, diagonal, 0.0))
    hd = np.where(np.isfinite(hd), hd, diagonal)
    return {"dice": _dice_per_class(truth, pred), "hd95": hd}


def segmentation_scores(masks_true: np.ndarray, masks_pred: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """Per-image Dice and HD95 (pixels / voxels), each averaged over the foreground classes
    1..K-1 of :func:`segmentation_scores_per_class` (same conventions). masks: int64
    ``(N, H, W)`` or ``(N, D, H, W)``. Returns ``{"dice": float64 (N,) in [0, 1], "hd95":
    float64 (N,) >= 0}``.
    """
    per_class = segmentation_scores_per_class(masks_true, masks_pred, num_classes)
    return {metric: values.mean(axis=1) for metric, values in per_class.items()}


def evaluate_segmentation(masks_true: np.ndarray, proba: np.ndarray) -> dict:
    """Mean Dice over foreground classes and mean HD95 (pixels / voxels) over images.

    masks_true: int64 ``(N, H, W)`` or ``(N, D, H, W)``; proba: float32 ``(N, K, *spatial)``.
    Returns ``{"dice": float in [0, 1], "hd95": float >= 0, "per_image": {"dice": [...], "hd95": [...]}}``.
    """
    if (
        proba.ndim != masks_true.ndim + 1
        or proba.shape[0] != masks_true.shape[0]
        or proba.shape[2:] != masks_true.shape[1:]
    ):
        raise DataError(f"expected probabilities of shape (N, K, {masks_true.shape[1:]}), got {proba.shape}")
    if masks_true.shape[0] == 0:
        raise DataError("expected at least one evaluation image, got 0; check the split")
    scores = segmentation_scores(masks_true, proba.argmax(axis=1), proba.shape[1])
    return {
        "dice": float(scores["dice"].mean()),
        "hd95": float(scores["hd95"].mean()),
        "per_image": {k: v.tolist() for k, v in scores.items()},
    }
