"""Mask-aware filters for paired (image + mask) synthetic sets: the segmentation twin of
label consistency. Used by the ``filter`` stage (:mod:`tasks.filter`), after sanity and
label consistency, before memorisation and near-duplicates; a pair is counted under the
first of these three that drops it.

Masks are int64 ``(H, W)`` class indices (0 = background); images float32 ``(C, H, W)`` in
[0, 1]. Everything is calibrated on the REAL TRAIN masks (:func:`calibrate`):

- **unknown class** (``dropped_mask_unknown_class``): ``q_mask_unknown_fraction``, the
  fraction of pixels whose class never occurs in a real train mask; dropped when > 0.
- **implausible** (``dropped_mask_implausible``): ``q_mask_foreground`` (fraction of pixels
  > 0) and ``q_mask_components`` (connected components, 4-connectivity, of each foreground
  class, summed over classes; salt noise scores hundreds). Dropped when the foreground lies
  below ``foreground_low_scale`` x the real 1st percentile or above ``foreground_high_scale``
  x the real 99th (capped at 1), when it is 0 and no real mask is empty, when the
  components exceed ``components_scale`` x the real 99th percentile (at least 1), or when
  the row has no decodable mask of the image's size (scores NaN).
- **image-mask agreement** (``dropped_mask_disagree``): a MONAI UNet
  (:func:`tasks.downstream.build_network`, batch 32, Adam 1e-3, default augmentation),
  trained ``epochs`` passes over the real train pairs and cached like the label classifier,
  predicts a mask for the synthetic image; ``q_mask_dice`` is the Dice of that prediction
  with the synthetic mask (mean over the real foreground classes; a class empty in both
  scores 1, as :func:`tasks.downstream.segmentation_scores`). Dropped below ``min_dice``
  (NaN, an image that cannot be scored, is dropped) **only when the UNet is reliable**: it
  must have a real val split with masks and would drop at most ``max_real_drop_fraction``
  of the real val pairs. An unreliable UNet still scores every pair but drops none, and
  ``quality.json`` says so (``filters.masks.agreement.applied: false`` with a note).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage

from generators.errors import DataError
from generators.shards import decode_image, iter_tables
from tasks import downstream, features
from tasks.config import AugmentSpec, MaskFilter, PipelineConfig
from tasks.paths import PipelinePaths

logger = logging.getLogger(__name__)

MASK_COLUMNS = ("q_mask_unknown_fraction", "q_mask_foreground", "q_mask_components", "q_mask_dice")
#: the agreement model's fixed recipe (only its epochs are configurable)
SEGMENTER_NETWORK = "unet"
SEGMENTER_BATCH_SIZE = 32
SEGMENTER_LR = 1e-3
#: percentiles of the real train masks that bound the foreground fraction and the components
FOREGROUND_PERCENTILES = (1.0, 99.0)
COMPONENTS_PERCENTILE = 99.0


# --------------------------------------------------------------------------- per-mask scores
def decode_mask(blob: bytes | None) -> np.ndarray | None:
    """int64 ``(H, W)`` class indices, or None when the cell is null or undecodable."""
    if blob is None:
        return None
    try:
        return decode_image(blob)[0].astype(np.int64)
    # PIL raises OSError / ValueError / SyntaxError; a corrupt raw cell raises a DataError
    except (OSError, ValueError, SyntaxError, DataError) as exc:
        logger.debug("undecodable mask: %s", exc)
        return None


def count_components(mask: np.ndarray) -> int:
    """Connected components (4-connectivity) of every foreground class (> 0), summed."""
    return int(sum(ndimage.label(mask == c)[1] for c in np.unique(mask) if c > 0))


def mask_stats(mask: np.ndarray | None, classes: frozenset[int], shape: tuple[int, int]) -> tuple[float, float, float]:
    """``(q_mask_unknown_fraction, q_mask_foreground, q_mask_components)`` of one int mask
    ``(H, W)``; NaNs when it is None or not of ``shape``."""
    if mask is None or tuple(mask.shape) != tuple(shape):
        return math.nan, math.nan, math.nan
    unknown = float(np.mean(~np.isin(mask, list(classes))))
    return unknown, float(np.mean(mask > 0)), float(count_components(mask))


def dice_per_pair(truth: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """float64 ``(N,)``: per pair, the mean Dice over classes 1..K-1 of int masks
    ``(N, H, W)``; a class empty in both masks scores 1, empty in one scores 0 (the
    convention of :func:`tasks.downstream.segmentation_scores`). Pixels of classes >= K
    belong to no class."""
    if truth.shape != pred.shape:
        raise DataError(f"expected masks of equal shape, got {truth.shape} and {pred.shape}")
    n = truth.shape[0]
    if n == 0 or num_classes < 2:
        return np.ones(n, np.float64)
    scores = np.empty((n, num_classes - 1), np.float64)
    for c in range(1, num_classes):
        a = (truth == c).reshape(n, -1)
        b = (pred == c).reshape(n, -1)
        overlap = (a & b).sum(1)
        total = a.sum(1) + b.sum(1)
        scores[:, c - 1] = np.where(total > 0, 2.0 * overlap / np.maximum(total, 1), 1.0)
    return scores.mean(1)


# --------------------------------------------------------------------------- calibration
@dataclass(frozen=True)
class MaskReference:
    """What plausible masks look like, from the real train masks."""

    classes: tuple[int, ...]
    n: int
    foreground_p01: float
    foreground_p99: float
    foreground_low: float
    foreground_high: float
    allow_empty: bool
    components_p99: float
    max_components: float

    def info(self) -> dict[str, Any]:
        return {
            "kind": "real train masks",
            "n": self.n,
            "classes": list(self.classes),
            "foreground_p01": self.foreground_p01,
            "foreground_p99": self.foreground_p99,
            "foreground_low": self.foreground_low,
            "foreground_high": self.foreground_high,
            "allow_empty": self.allow_empty,
            "components_p99": self.components_p99,
            "max_components": self.max_components,
        }


def calibrate(real_masks: np.ndarray, spec: MaskFilter) -> MaskReference:
    """Bounds from real train masks int64 ``(N, H, W)``, or volume masks ``(N, D, H, W)`` (N >= 1)."""
    if real_masks.ndim not in (3, 4) or len(real_masks) == 0:
        raise DataError(f"expected real train masks (N, H, W) or (N, D, H, W) with N > 0, got shape {real_masks.shape}")
    foreground = (real_masks > 0).reshape(len(real_masks), -1).mean(1)
    components = np.asarray([count_components(m) for m in real_masks], np.float64)
    low_p, high_p = (float(np.percentile(foreground, q)) for q in FOREGROUND_PERCENTILES)
    components_p99 = float(np.percentile(components, COMPONENTS_PERCENTILE))
    return MaskReference(
        classes=tuple(int(c) for c in np.unique(real_masks)),
        n=len(real_masks),
        foreground_p01=low_p,
        foreground_p99=high_p,
        foreground_low=spec.foreground_low_scale * low_p,
        foreground_high=min(1.0, spec.foreground_high_scale * high_p),
        allow_empty=bool((foreground == 0).any()),
        components_p99=components_p99,
        max_components=spec.components_scale * max(components_p99, 1.0),
    )


def plausibility(stats: np.ndarray, reference: MaskReference) -> tuple[np.ndarray, np.ndarray]:
    """``(keep_class, keep_plausible)`` bool ``(N,)`` from ``stats`` float64 ``(N, 3)`` (the
    columns of :func:`mask_stats`). A row without a usable mask (NaN) passes the class
    check and fails the plausibility check."""
    unknown, foreground, components = stats[:, 0], stats[:, 1], stats[:, 2]
    keep_class = ~(unknown > 0)
    with np.errstate(invalid="ignore"):
        keep_plausible = (
            np.isfinite(stats).all(1)
            & (foreground >= reference.foreground_low)
            & (foreground <= reference.foreground_high)
            & ((foreground > 0) | reference.allow_empty)
            & (components <= reference.max_components)
        )
    return keep_class, keep_plausible


# --------------------------------------------------------------------------- agreement model
@dataclass
class Segmenter:
    """The agreement model (eval mode, on ``device``) and its JSON-able record."""

    model: torch.nn.Module | None
    num_classes: int
    info: dict[str, Any]

    @property
    def reliable(self) -> bool:
        return bool(self.info.get("reliable"))


def _segmenter_cache_path(
    cfg: PipelineConfig, paths: PipelinePaths, num_classes: int, channels: int, device: str
) -> Path:
    return features.trained_model_path(
        cfg,
        paths,
        "segmenter",
        device=device,
        code_file=downstream.__file__,
        num_classes=num_classes,
        channels=channels,
        recipe=[SEGMENTER_NETWORK, SEGMENTER_BATCH_SIZE, SEGMENTER_LR, cfg.quality.masks.epochs],
        augment=AugmentSpec().model_dump(mode="json"),
    )


def train_segmenter(
    cfg: PipelineConfig,
    paths: PipelinePaths,
    train: downstream.LabelledArrays,
    val: downstream.LabelledArrays | None,
    reference: MaskReference,
    device: str,
) -> Segmenter:
    """Train (or load from the cache) the UNet on the real train pairs and measure it on the
    real val pairs: ``val_dice`` (mean per-pair Dice) and ``val_would_drop_fraction`` (real
    val pairs below ``min_dice``); ``reliable`` when a val split with masks exists and that
    fraction is at most ``max_real_drop_fraction``."""
    spec = cfg.quality.masks
    num_classes = max(2, max(reference.classes) + 1)
    info: dict[str, Any] = {
        "network": SEGMENTER_NETWORK,
        "n_train": len(train),
        "epochs": spec.epochs,
        "steps": 0,
        "num_classes": num_classes,
        "n_val": 0,
        "val_dice": None,
        "val_would_drop_fraction": None,
        "min_dice": spec.min_dice,
        "max_real_drop_fraction": spec.max_real_drop_fraction,
        "reliable": False,
        "applied": False,
        "note": "",
    }
    height, width = train.images.shape[2:]
    if height % 4 or width % 4 or len(train) < 2:
        info["note"] = (
            f"no agreement model: the UNet needs >= 2 real train pairs of a size divisible by 4, got "
            f"{len(train)} of {height}x{width}; the agreement filter drops nothing"
        )
        logger.warning("%s", info["note"])
        return Segmenter(None, num_classes, info)
    batch_size = min(SEGMENTER_BATCH_SIZE, len(train))
    steps = spec.epochs * math.ceil(len(train) / batch_size)
    channels = int(train.images.shape[1])

    def build() -> torch.nn.Module:
        return downstream.build_network("segmentation", SEGMENTER_NETWORK, channels, num_classes)

    def fit(untrained: torch.nn.Module) -> torch.nn.Module:
        return downstream.train_model(
            untrained,
            train.images,
            train.masks,
            task="segmentation",
            steps=steps,
            batch_size=batch_size,
            lr=SEGMENTER_LR,
            seed=cfg.seed,
            augment=AugmentSpec(),
            device=device,
        )

    cache = _segmenter_cache_path(cfg, paths, num_classes, channels, device)
    model, _ = features.load_or_train(cache, build, fit)
    model = model.to(device).eval()
    info["steps"] = steps
    if val is None or len(val) == 0 or val.masks is None:
        info["note"] = (
            "no real val pairs to measure the agreement model on: it is not trusted and the agreement "
            "filter drops nothing (its q_mask_dice scores are still written)"
        )
        logger.warning("mask agreement: %s", info["note"])
        return Segmenter(model, num_classes, info)
    predicted = downstream.predict_proba(model, val.images, device=device).argmax(1)
    dice = dice_per_pair(val.masks, predicted, num_classes)
    would_drop = float(np.mean(dice < spec.min_dice))
    reliable = would_drop <= spec.max_real_drop_fraction
    info.update(
        n_val=len(val),
        val_dice=float(dice.mean()),
        val_would_drop_fraction=would_drop,
        reliable=reliable,
        applied=reliable,
        note=""
        if reliable
        else (
            f"unreliable agreement model: it would drop {100 * would_drop:.1f}% of REAL val pairs (allowed "
            f"{100 * spec.max_real_drop_fraction:.1f}%); the agreement filter drops nothing"
        ),
    )
    logger.info(
        "mask agreement model: %d steps, real val Dice %.3f; it would drop %.1f%% of real val pairs%s",
        steps,
        info["val_dice"],
        100 * would_drop,
        "" if reliable else " (unreliable: not applied)",
    )
    return Segmenter(model, num_classes, info)


# --------------------------------------------------------------------------- the filter
@dataclass
class MaskContext:
    """Everything the per-shard scoring needs: the settings, the calibrated reference, the
    agreement model and the real image shape ``(C, H, W)``."""

    spec: MaskFilter
    reference: MaskReference
    segmenter: Segmenter
    real_shape: tuple[int, ...]

    def info(self) -> dict[str, Any]:
        """``quality.json`` ``filters.masks``: the settings, ``reference`` and ``agreement``."""
        return {
            **self.spec.model_dump(mode="json"),
            "active": True,
            "reference": self.reference.info(),
            "agreement": self.segmenter.info,
        }


def synthetic_has_masks(dataset: Path) -> bool:
    """True when any row of ``dataset`` carries a mask."""
    for table in iter_tables(dataset, columns=["mask"]):
        if table.column("mask").null_count < table.num_rows:
            return True
    return False


def resolve_enabled(spec: MaskFilter, paths: PipelinePaths, real_masks: np.ndarray | None) -> tuple[bool, str]:
    """Whether the mask filters run, and why not when they do not. ``auto``: on when the
    synthetic set has masks (and the real train split has masks to calibrate on; if it
    has none, a warning and off). ``true`` without masks on either side is a DataError."""
    if spec.enabled is False:
        return False, "disabled (quality.masks.enabled: false)"
    has_masks = synthetic_has_masks(paths.synthetic)
    if not has_masks:
        if spec.enabled is True:
            raise DataError(
                f"{paths.synthetic}: quality.masks.enabled is true but no synthetic row has a mask; "
                "synthesize with a paired generator (with_masks: true) or set quality.masks.enabled: auto"
            )
        return False, "the synthetic set has no masks"
    if real_masks is None:
        reason = "the real train split lacks masks to calibrate on"
        if spec.enabled is True:
            raise DataError(
                f"{paths.real}: quality.masks.enabled is true but {reason}; ingest masks for every real train "
                "image or set quality.masks.enabled: false"
            )
        logger.warning("mask filters off: the synthetic set has masks but %s", reason)
        return False, reason
    return True, ""


def prepare(
    cfg: PipelineConfig,
    paths: PipelinePaths,
    train: downstream.LabelledArrays,
    val: downstream.LabelledArrays | None,
    device: str,
) -> MaskContext:
    """Calibrate on the real train masks and train (or load) the agreement model."""
    reference = calibrate(train.masks, cfg.quality.masks)
    segmenter = train_segmenter(cfg, paths, train, val, reference, device)
    return MaskContext(cfg.quality.masks, reference, segmenter, tuple(int(d) for d in train.images.shape[1:]))


def score_shard(
    ctx: MaskContext, images: Sequence[np.ndarray | None], mask_blobs: Sequence[bytes | None], device: str
) -> np.ndarray:
    """float64 ``(n, 4)``: the :data:`MASK_COLUMNS` of one shard's rows. ``images``: decoded
    float32 ``(C, H, W)`` in [0, 1] or None; ``mask_blobs``: the rows' mask cells. Dice is NaN
    where the image or the mask is missing, non-finite or of another size."""
    shape = ctx.real_shape[1:]
    masks = [decode_mask(blob) for blob in mask_blobs]
    out = np.full((len(masks), len(MASK_COLUMNS)), math.nan, np.float64)
    classes = frozenset(ctx.reference.classes)
    for i, mask in enumerate(masks):
        out[i, :3] = mask_stats(mask, classes, shape)
    scorable = [
        i
        for i, (image, mask) in enumerate(zip(images, masks, strict=True))
        if image is not None
        and mask is not None
        and tuple(image.shape) == ctx.real_shape
        and tuple(mask.shape) == shape
        and np.isfinite(image).all()
    ]
    if scorable and ctx.segmenter.model is not None:
        batch = np.stack([images[i] for i in scorable]).astype(np.float32)
        predicted = downstream.predict_proba(ctx.segmenter.model, batch, device=device).argmax(1)
        truth = np.stack([masks[i] for i in scorable])
        out[scorable, 3] = dice_per_pair(truth, predicted, ctx.segmenter.num_classes)
    return out


def decide(ctx: MaskContext, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(keep_class, keep_plausible, keep_agree)`` bool ``(n,)`` from :func:`score_shard`
    rows ``(n, 4)``; ``keep_agree`` is all True when the agreement model is not reliable."""
    keep_class, keep_plausible = plausibility(scores[:, :3], ctx.reference)
    if ctx.segmenter.reliable:
        keep_agree = scores[:, 3] >= ctx.spec.min_dice  # NaN -> dropped
    else:
        keep_agree = np.ones(len(scores), bool)
    return keep_class, keep_plausible, keep_agree
