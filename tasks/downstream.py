"""Downstream models: the one home for the networks, training loop and metrics that the
``filter`` stage (label-consistency classifier) and the ``retrain`` stage share.

Array conventions (all numpy, channel-first):

- images: float32 ``(N, C, H, W)`` in [0, 1] (as :func:`generators.shards.decode_table`)
- classification targets: int64 ``(N,)`` class indices in ``[0, K)``
- segmentation targets: int64 ``(N, H, W)`` mask class indices in ``[0, K)``, 0 = background

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
def build_network(task: Task, network: str, in_channels: int, num_classes: int) -> torch.nn.Module:
    """A small MONAI network. Input: float32 ``(B, in_channels, H, W)``; output: logits
    float32 ``(B, num_classes)`` (classification) or ``(B, num_classes, H, W)``
    (segmentation; H and W divisible by 4). Sizes were tuned for 64x64 grey images on
    2 CPU cores (see ``retrain``'s budget)."""
    from monai.networks.nets import DenseNet, ResNet, UNet

    if network not in NETWORKS.get(task, ()):
        raise ConfigError(
            f"retrain.network: expected one of {', '.join(NETWORKS.get(task, ()))} for task '{task}', "
            f"got '{network}'; pick a network that fits the task"
        )
    if num_classes < 2:
        raise DataError(f"expected at least 2 classes for {task}, got {num_classes}; add labelled data")
    if network == "densenet":
        return DenseNet(
            spatial_dims=2,
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
            spatial_dims=2,
            n_input_channels=in_channels,
            conv1_t_size=3,
            conv1_t_stride=1,
            num_classes=num_classes,
        )
    return UNet(
        spatial_dims=2,
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
) -> torch.nn.Module:
    """Train ``model`` for exactly ``steps`` Adam steps; returns it (in eval mode).

    With ``val`` = ``(images, targets)`` (same layout as the training arrays) the model is
    scored on it every ``eval_every`` steps and after the last one, and the weights with
    the best :func:`validation_score` are returned (the latest wins a tie).

    images: float32 ``(N, C, H, W)`` in [0, 1]; targets: int64 ``(N,)`` class indices
    (classification, cross-entropy) or ``(N, H, W)`` mask indices (segmentation, Dice + CE).
    Batches of ``min(batch_size, N)`` images are drawn epoch by epoch from permutations of
    a numpy generator seeded with ``seed``; the same arguments give the same weights.
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
    transform = build_augmentation(augment, seed)
    model = model.to(device, memory_format=MEMORY_FORMAT)
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
        if task == "classification":
            x, _ = augment_batch(transform, x, None)
        else:
            x, y = augment_batch(transform, x, y)
        xb = torch.from_numpy(np.ascontiguousarray(x)).to(device).contiguous(memory_format=MEMORY_FORMAT)
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
            score = validation_score(model, val, task=task, batch_size=batch_size, device=device)
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
) -> float:
    """Model-selection score on a held-out split, higher is better: balanced accuracy
    (classification; targets int64 ``(N,)``) or mean per-image Dice over foreground classes
    (segmentation; targets ``(N, H, W)``)."""
    images, targets = val
    proba = predict_proba(model, images, batch_size=batch_size, device=device)
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
    model: torch.nn.Module, images: np.ndarray, *, batch_size: int = 64, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Softmax probabilities. images: float32 ``(N, C, H, W)`` in [0, 1]; returns float32
    ``(N, K)`` (classification) or ``(N, K, H, W)`` (segmentation), rows summing to 1."""
    model.eval()
    device = torch.device(device)
    outputs = []
    for start in range(0, images.shape[0], batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(device)
        xb = xb.contiguous(memory_format=MEMORY_FORMAT)
        outputs.append(torch.softmax(model(xb).float(), dim=1).cpu().numpy())
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
    """int64 masks ``(N, H, W)`` -> float one-hot ``(N, K, H, W)`` tensors (truth, prediction)."""
    classes = torch.arange(num_classes)[None, :, None, None]
    truth = (torch.from_numpy(masks_true)[:, None] == classes).float()
    pred = (torch.from_numpy(masks_pred)[:, None] == classes).float()
    return truth, pred


def _dice_per_image(truth: torch.Tensor, pred: torch.Tensor) -> np.ndarray:
    """float64 ``(N,)``: Dice over foreground classes 1..K-1 per image (MONAI's
    ``compute_dice``; a class empty in both scores 1, empty in only one scores 0)."""
    from monai.metrics import compute_dice

    dice = compute_dice(pred, truth, include_background=False, ignore_empty=False).double().numpy()
    return np.nan_to_num(dice, nan=0.0).mean(axis=1)


def segmentation_scores(masks_true: np.ndarray, masks_pred: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """Per-image Dice and HD95 (pixels), each averaged over the foreground classes 1..K-1.

    masks: int64 ``(N, H, W)``. Dice via ``monai.metrics.compute_dice`` (a class empty in
    both truth and prediction scores 1, empty in only one scores 0). HD95 via
    ``monai.metrics.compute_hausdorff_distance`` (percentile 95); a class empty in both
    scores 0 and in only one scores the image diagonal, so values stay finite. Returns
    ``{"dice": float64 (N,) in [0, 1], "hd95": float64 (N,) >= 0}``.
    """
    from monai.metrics import compute_hausdorff_distance

    if masks_true.shape != masks_pred.shape:
        raise DataError(f"expected predicted masks of shape {masks_true.shape}, got {masks_pred.shape}")
    n, height, width = masks_true.shape
    truth, pred = _one_hot_masks(masks_true, masks_pred, num_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # monai warns for every empty class; handled below
        hd = compute_hausdorff_distance(pred, truth, include_background=False, percentile=95).double().numpy()
    truth_any = truth[:, 1:].flatten(2).amax(-1).bool().numpy()
    pred_any = pred[:, 1:].flatten(2).amax(-1).bool().numpy()
    diagonal = float(np.hypot(height, width))
    hd = np.where(truth_any & pred_any, hd, np.where(truth_any | pred_any, diagonal, 0.0))
    hd = np.where(np.isfinite(hd), hd, diagonal)
    return {"dice": _dice_per_image(truth, pred), "hd95": hd.mean(axis=1)}


def evaluate_segmentation(masks_true: np.ndarray, proba: np.ndarray) -> dict:
    """Mean Dice over foreground classes and mean HD95 (pixels) over images.

    masks_true: int64 ``(N, H, W)``; proba: float32 ``(N, K, H, W)``. Returns
    ``{"dice": float in [0, 1], "hd95": float >= 0, "per_image": {"dice": [...], "hd95": [...]}}``.
    """
    if proba.ndim != 4 or proba.shape[0] != masks_true.shape[0] or proba.shape[2:] != masks_true.shape[1:]:
        raise DataError(f"expected probabilities of shape (N, K, {masks_true.shape[1:]}), got {proba.shape}")
    if masks_true.shape[0] == 0:
        raise DataError("expected at least one evaluation image, got 0; check the split")
    scores = segmentation_scores(masks_true, proba.argmax(axis=1), proba.shape[1])
    return {
        "dice": float(scores["dice"].mean()),
        "hd95": float(scores["hd95"].mean()),
        "per_image": {k: v.tolist() for k, v in scores.items()},
    }
