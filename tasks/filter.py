"""Stage ``filter``: score every synthetic image, drop the unusable ones, measure the rest.

Per-sample filters (``quality`` in pipelines.yaml), each optional, applied in this order; a
dropped row is counted under the first filter that drops it, and a row a filter cannot
score (undecodable image) is dropped by it:

- **sanity**: ``q_std`` (pixel standard deviation on the [0, 1] scale), ``q_saturated``
  (fraction of pixels at the maximum) and ``q_nan`` (1.0 when the image cannot be decoded
  or holds non-finite values, else 0.0). Dropped when ``q_nan == 1``, ``q_std < min_std``
  or ``q_saturated > max_saturated_fraction``.
- **label consistency**: a small classifier (:mod:`tasks.downstream`; DenseNet, batch 32,
  Adam 1e-3, default augmentation) trained for ``epochs`` passes over the real train split;
  ``q_label_confidence`` is its softmax probability of the conditioning label; dropped
  below ``min_confidence``. Its accuracy on the real val split goes to ``quality.json``.
- **masks** (paired image+mask sets; :mod:`tasks.mask_filters`): ``q_mask_unknown_fraction``,
  ``q_mask_foreground``, ``q_mask_components`` and ``q_mask_dice``; dropped for a mask class
  the real train masks never hold, an implausible mask, or a mask a UNet trained on real
  pairs disagrees with (only when that UNet is reliable on real val pairs).
- **memorisation**: ``q_nn_real_distance``, the distance to the nearest REAL TRAIN image
  (``space`` pixel: RMSE of [0, 1] pixels; feature: Euclidean in the extractor's
  features); dropped below the threshold (near-copies of training images).
- **duplicates**: ``q_nn_synthetic_distance``, the distance to the nearest other synthetic
  image still in the running (NaN when there is none); of images closer than the
  threshold to each other, only the first by id is kept.

Thresholds of the last two (:mod:`tasks.nn_filters`): ``max_distance``, or calibrated on
the real train split (``calibration_scale`` x the ``calibration_quantile`` of each real
image's distance to the nearest real image of another subject; of any other image when
there is one subject).

Realism (``quality.realism``, :mod:`tasks.realism`): a classifier two-sample test, a small
MONAI CNN trained from scratch to tell the kept synthetic set from real train,
cross-validated; its out-of-fold AUC with a 95% interval, overall and per class. It uses
neither the filter's classifier nor the set-metrics extractor.

Set metrics (``quality.metrics``): FID, KID, precision/recall, density/coverage of the
kept synthetic set, all generated (decodable) images and the real val split, each
against the real train split, per class and overall, plus MS-SSIM diversity within the
kept set and, for reference, within real train (:mod:`tasks.quality_sets`,
:mod:`tasks.quality_metrics`). Features come from :mod:`tasks.features`: by default
(``auto``) a self-supervised encoder trained on real train images only
(:mod:`tasks.contrastive`), which did not choose the kept set; every extractor reports its
own quality (linear probe on real val) and is flagged unreliable near chance. Real-image
features, the encoder and the classifier are cached under ``paths.state`` per real dataset
version.
``quality.gate`` bounds are checked last: a crossed bound raises QualityGateError AFTER
the filtered shards and quality.json are written, so both stay for inspection.

Writes the kept rows to ``paths.filtered`` (base columns + the float64 ``q_*`` columns of
every enabled filter) and ``paths.metrics / "quality.json"``. Memory: the real train (and
val) split plus the decoded synthetic images (N x C x H x W float32) and their features.

``quality.json`` keys:

- ``per_class``: ``{label: {generated, dropped_sanity, dropped_label, dropped_mask_unknown_class,
  dropped_mask_implausible, dropped_mask_disagree, dropped_memorised, dropped_duplicate, kept}}``;
  ``totals``: the same summed; ``kept_fraction``.
- ``filters.masks``: the settings and ``active``; when active ``reference`` (the real train
  masks' classes and bounds) and ``agreement`` (the UNet's real val Dice, ``reliable``,
  ``applied``, ``note``), else ``reason``.
- ``filters``: each filter's settings; ``memorisation`` and ``duplicates`` add
  ``threshold``, ``threshold_source`` (``absolute``/``calibrated``), ``reference`` (the
  real-vs-real distances it was calibrated on: ``kind``, ``n``, ``quantile``, ``value``) and
  counts (``n_scored``, ``n_below_threshold``, ``fraction_below_threshold`` over all
  scored rows, whatever other filters did; ``n_dropped`` for duplicates).
- ``label_classifier``: network, n_train, epochs, steps, n_val, val accuracy, ...,
  ``chance``, ``threshold``, ``reliable`` (balanced accuracy >= chance + 0.15), or None.
- ``real_train_sanity``: how the sanity thresholds treat real train images, or None.
- ``set_metrics``: None when disabled, else ``{"extractor": {name, kind, description,
  weights_sha256, dim, normalisation[, training]}, "reference": "real train", "ms_ssim_settings":
  {kernel_size, kernel_sigma, scales, standard_scales, weights} | None, "sets": {"kept" |
  "generated" | "real_val": {"overall": M, "per_class": {label: M}}}, "real_train_diversity":
  {"overall": D, "per_class": {label: D}}}`` with ``M`` = :func:`tasks.quality_metrics.compare_sets`
  keys plus ``ms_ssim_mean``, ``ms_ssim_std``, ``ms_ssim_pairs`` (MS-SSIM within the set:
  computed for ``kept`` only, None/0 for the others), and ``D`` the last three;
  ``real_val`` is None without a val split. ``training`` (classifier extractor only): the
  classifier's summary, as ``label_classifier``. The extractor record adds ``quality``
  (:func:`tasks.features.extractor_quality`: ``metric``, ``value``, ``chance``,
  ``threshold``, ``reliable``, ...), ``used_by_filters`` and ``chose_kept_set``.
- ``realism``: None when disabled, else ``{"two_sample": {auc, ci95_low, ci95_high, n_real,
  n_synthetic, folds, grouping, network, epochs, min_steps, bootstrap, reason, per_class:
  {label: {auc, ci95_low, ci95_high, n_real, n_synthetic}}}, "reference", "interpretation"}``.
- ``gate``: ``{"passed": bool, "realism_passed": bool | None, "extractor_reliable": bool |
  None, "checks": [{metric, bound_name, bound, value, passed, status, ...}]}``
  (:func:`tasks.quality_sets.check_gate`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from generators.errors import ConfigError, DataError, QualityGateError
from generators.shards import (
    BASE_COLUMNS,
    BASE_SCHEMA,
    DatasetWriter,
    dataset_digest,
    decode_png,
    iter_tables,
    read_table,
    to_unit_float,
    write_json_atomic,
)
from tasks import contrastive, downstream, features, mask_filters, nn_filters, quality_sets, realism
from tasks.config import AugmentSpec, PipelineConfig, QualitySpec
from tasks.paths import PipelinePaths
from tasks.runtime import setup_torch

logger = logging.getLogger(__name__)

SANITY_COLUMNS = ("q_std", "q_saturated", "q_nan")
LABEL_COLUMNS = ("q_label_confidence",)
MEMORISATION_COLUMNS = ("q_nn_real_distance",)
DUPLICATE_COLUMNS = ("q_nn_synthetic_distance",)
COUNT_KEYS = (
    "generated",
    "dropped_sanity",
    "dropped_label",
    "dropped_mask_unknown_class",
    "dropped_mask_implausible",
    "dropped_mask_disagree",
    "dropped_memorised",
    "dropped_duplicate",
    "kept",
)
#: the label-consistency classifier's fixed recipe (only its epochs are configurable), so
#: that the filter does not depend on the retrain stage's parameters
LABEL_NETWORK = "densenet"
LABEL_BATCH_SIZE = 32
LABEL_LR = 1e-3
#: warn when more than this fraction of real train images would fail the sanity filter
REAL_DROP_WARNING = 0.05


def quality_schema(
    sanity: bool, label: bool, memorisation: bool = False, duplicates: bool = False, masks: bool = False
) -> pa.Schema:
    """BASE_SCHEMA plus the float64 ``q_*`` columns of the enabled filters."""
    names = (
        (SANITY_COLUMNS if sanity else ())
        + (LABEL_COLUMNS if label else ())
        + (mask_filters.MASK_COLUMNS if masks else ())
        + (MEMORISATION_COLUMNS if memorisation else ())
        + (DUPLICATE_COLUMNS if duplicates else ())
    )
    return pa.schema(list(BASE_SCHEMA) + [pa.field(name, pa.float64()) for name in names])


def sanity_scores(image: np.ndarray) -> tuple[float, float, float]:
    """``(q_std, q_saturated, q_nan)`` of one image, float32 ``(C, H, W)`` in [0, 1].

    ``q_saturated`` is the fraction of pixels at the maximum (1.0): clipped highlights.
    Pixels at 0.0 are not counted, because a black background is normal in MRI and CT;
    a blank image is caught by ``q_std`` instead."""
    if not np.isfinite(image).all():
        return math.nan, math.nan, 1.0
    pixels = image.astype(np.float64)
    saturated = float(np.mean(pixels >= 1.0))
    return float(pixels.std()), saturated, 0.0


def decode_row(blob: bytes | None) -> np.ndarray | None:
    """float32 ``(C, H, W)`` in [0, 1], or None when the bytes are not a decodable image."""
    if blob is None:
        return None
    try:
        return to_unit_float(decode_png(blob))
    # PIL raises OSError (UnidentifiedImageError, truncated data), ValueError, or
    # SyntaxError for a broken PNG chunk.
    except (OSError, ValueError, SyntaxError) as exc:
        logger.debug("undecodable image: %s", exc)
        return None


# --------------------------------------------------------------------------- the classifier
def _classifier_cache_path(
    cfg: PipelineConfig, paths: PipelinePaths, classes: list[str], channels: int, device: str
) -> Path:
    """Where the trained classifier is cached: keyed by everything that determines its weights."""
    return features.trained_model_path(
        cfg,
        paths,
        "classifier",
        device=device,
        code_file=downstream.__file__,
        classes=classes,
        channels=channels,
        recipe=[LABEL_NETWORK, LABEL_BATCH_SIZE, LABEL_LR, cfg.quality.label_consistency.epochs],
        augment=AugmentSpec().model_dump(mode="json"),
    )


def _train_label_classifier(
    cfg: PipelineConfig,
    paths: PipelinePaths,
    classes: list[str],
    train: downstream.LabelledArrays,
    val: downstream.LabelledArrays | None,
    device: str,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The label-consistency classifier, trained on the real train split (or loaded from the
    cache of an identical earlier training); returns it (eval mode, on ``device``) and a
    JSON-able summary with its accuracy on the real val split."""
    if (train.targets < 0).any():
        raise DataError(
            f"{paths.real}: expected a class label on every real train row for the label-consistency classifier, "
            "found unlabelled rows; label the data, or set quality.label_consistency.enabled: false and "
            "quality.metrics.extractor: random"
        )
    network = LABEL_NETWORK
    batch_size = min(LABEL_BATCH_SIZE, len(train))
    steps = cfg.quality.label_consistency.epochs * math.ceil(len(train) / batch_size)

    def build() -> torch.nn.Module:
        return downstream.build_network("classification", network, train.images.shape[1], len(classes))

    def fit(untrained: torch.nn.Module) -> torch.nn.Module:
        return downstream.train_model(
            untrained,
            train.images,
            train.targets,
            task="classification",
            steps=steps,
            batch_size=batch_size,
            lr=LABEL_LR,
            seed=cfg.seed,
            augment=AugmentSpec(),
            device=device,
        )

    cache = _classifier_cache_path(cfg, paths, classes, int(train.images.shape[1]), device)
    model, _ = features.load_or_train(cache, build, fit)
    model = model.to(device).eval()
    summary: dict[str, Any] = {
        "network": network,
        "n_train": len(train),
        "epochs": cfg.quality.label_consistency.epochs,
        "steps": steps,
        "n_val": 0,
        "val_accuracy": None,
        "val_balanced_accuracy": None,
        "val_would_drop_fraction": None,
    }
    summary.update(features.reliability(None, len(classes)))
    if val is not None and len(val) and (val.targets >= 0).all():
        proba = downstream.predict_proba(model, val.images, device=device)
        scores = downstream.evaluate_classification(val.targets, proba, classes)
        true_confidence = proba[np.arange(len(val)), val.targets]
        summary.update(
            n_val=len(val),
            val_accuracy=scores["accuracy"],
            val_balanced_accuracy=scores["balanced_accuracy"],
            val_would_drop_fraction=float(np.mean(true_confidence < cfg.quality.label_consistency.min_confidence)),
        )
        summary.update(features.reliability(scores["balanced_accuracy"], len(classes)))
        if not summary["reliable"]:
            logger.warning(
                "label classifier near chance: real val balanced accuracy %.3f < %.3f (chance %.3f + %.2f); "
                "its confidences are unreliable",
                scores["balanced_accuracy"],
                summary["threshold"],
                summary["chance"],
                features.RELIABLE_MARGIN,
            )
        logger.info(
            "label classifier: %d steps, real val accuracy %.3f; it would drop %.1f%% of real val images",
            steps,
            scores["accuracy"],
            100 * summary["val_would_drop_fraction"],
        )
    else:
        logger.warning("%s: no labelled val split; the label classifier's accuracy is unknown", paths.real)
    return model, summary


def _real_sanity_reference(cfg: PipelineConfig, train: downstream.LabelledArrays) -> dict[str, Any]:
    """How the sanity thresholds treat real train images (a check of the thresholds)."""
    scores = np.asarray([sanity_scores(image) for image in train.images], dtype=np.float64).reshape(-1, 3)
    if scores.shape[0] == 0:
        return {"n": 0, "would_drop_fraction": None, "q_std_p05": None, "q_saturated_p95": None}
    spec = cfg.quality.sanity
    fails = (scores[:, 2] == 1) | (scores[:, 0] < spec.min_std) | (scores[:, 1] > spec.max_saturated_fraction)
    reference = {
        "n": int(scores.shape[0]),
        "would_drop_fraction": float(fails.mean()),
        "q_std_p05": float(np.percentile(scores[:, 0], 5)),
        "q_saturated_p95": float(np.percentile(scores[:, 1], 95)),
    }
    if reference["would_drop_fraction"] > REAL_DROP_WARNING:
        logger.warning(
            "sanity thresholds would drop %.1f%% of REAL train images (min_std=%g, max_saturated_fraction=%g); "
            "check quality.sanity against real data (5th pct std %.4f, 95th pct saturated %.3f)",
            100 * reference["would_drop_fraction"],
            spec.min_std,
            spec.max_saturated_fraction,
            reference["q_std_p05"],
            reference["q_saturated_p95"],
        )
    return reference


def _check_labels(cfg: PipelineConfig, paths: PipelinePaths) -> list[str]:
    """Real class names (sorted labels of the real train split); synthetic labels must be among them."""
    real = downstream.dataset_labels(paths.real, ["train"])
    classes = [label for label in real if label]
    synthetic = downstream.dataset_labels(paths.synthetic)
    unknown = sorted(set(synthetic) - set(classes) - {""})
    if unknown:
        raise DataError(
            f"{paths.synthetic}: expected synthetic labels among the real classes {classes}, got {unknown}; "
            "synthesize with the real dataset's labels"
        )
    if cfg.quality.label_consistency.enabled:
        if len(classes) < 2:
            raise DataError(
                f"{paths.real}: expected >= 2 labelled classes in the train split for the label filter, "
                f"got {classes}; set quality.label_consistency.enabled: false"
            )
        if "" in synthetic:
            raise DataError(
                f"{paths.synthetic}: expected a conditioning label on every synthetic row for the label filter, "
                f"got {synthetic['']} unlabelled; set quality.label_consistency.enabled: false"
            )
    if cfg.quality.metrics.extractor == "classifier" and len(classes) < 2 and _needs_features(cfg):
        raise ConfigError(
            f"quality.metrics.extractor 'classifier': expected >= 2 labelled classes in the real train split to "
            f"train it, got {classes}; use extractor: random (or inception with local weights)"
        )
    return classes


# --------------------------------------------------------------------------- extractor
def _needs_features(cfg: PipelineConfig) -> bool:
    spec = cfg.quality
    feature_filter = any(f.enabled and f.space == "feature" for f in (spec.memorisation, spec.duplicates))
    return spec.metrics.enabled or feature_filter


def _extractor_kind(cfg: PipelineConfig, classes: list[str]) -> str | None:
    """``self_supervised`` / ``classifier`` / ``inception`` / ``random``, or None when nothing
    needs features. ``auto`` is ``self_supervised``: it needs no labels and did not choose
    the kept set."""
    if not _needs_features(cfg):
        return None
    kind = cfg.quality.metrics.extractor
    return "self_supervised" if kind == "auto" else kind


def _self_supervised_model(
    cfg: PipelineConfig, paths: PipelinePaths, train: downstream.LabelledArrays, device: str
) -> torch.nn.Module:
    """The contrastive encoder of :mod:`tasks.contrastive`, trained on the real train images
    only (no labels, no filter classifier), cached under ``paths.state`` like the classifier."""
    steps = cfg.quality.metrics.self_supervised_steps
    channels = int(train.images.shape[1])
    cache = features.trained_model_path(
        cfg,
        paths,
        "contrastive",
        device=device,
        code_file=contrastive.__file__,
        channels=channels,
        recipe=[contrastive.NETWORK, contrastive.PROJECTION_DIM, contrastive.BATCH_SIZE, contrastive.LR, steps],
    )
    model, _ = features.load_or_train(
        cache,
        lambda: contrastive.build_encoder(channels, seed=cfg.seed),
        lambda untrained: contrastive.train_encoder(untrained, train.images, steps=steps, seed=cfg.seed, device=device),
    )
    return model.to(device).eval()


def _build_extractor(
    cfg: PipelineConfig,
    paths: PipelinePaths,
    kind: str,
    model: torch.nn.Module | None,
    train: downstream.LabelledArrays,
    device: str,
) -> tuple[features.Extractor, str]:
    """The extractor and the normalisation it is used with."""
    spec = cfg.quality.metrics
    channels = int(train.images.shape[1])
    if kind == "self_supervised":
        extractor = features.self_supervised_extractor(_self_supervised_model(cfg, paths, train, device))
    elif kind == "classifier":
        extractor = features.classifier_extractor(model, LABEL_NETWORK)
    elif kind == "inception":
        extractor = features.inception_extractor(features.resolve_inception_weights(spec.inception_weights, paths.root))
    else:
        extractor = features.random_extractor(channels, seed=cfg.seed)
    normalisation = extractor.default_normalisation if spec.normalisation == "auto" else spec.normalisation
    if normalisation != extractor.default_normalisation:
        logger.warning(
            "normalisation '%s' differs from %s's own ('%s'); its features may be less meaningful",
            normalisation,
            extractor.name,
            extractor.default_normalisation,
        )
    return extractor, normalisation


def _real_features(
    cfg: PipelineConfig,
    paths: PipelinePaths,
    extractor: features.Extractor,
    normalisation: str,
    split: str,
    arrays: downstream.LabelledArrays,
    device: str,
) -> np.ndarray:
    """Features of a real split, from the cache under ``paths.state`` when this real dataset
    version was seen with this extractor and normalisation before."""
    feats, _ = features.FeatureCache(paths.state / "features").features(
        dataset_digest=dataset_digest(paths.real),
        split=split,
        extractor=extractor,
        normalisation=normalisation,
        ids=arrays.ids,
        compute=lambda: features.extract_features(
            extractor,
            arrays.images,
            normalisation=normalisation,
            batch_size=cfg.quality.metrics.batch_size,
            device=device,
        ),
    )
    return feats


# --------------------------------------------------------------------------- scoring
@dataclass
class SyntheticScores:
    """Pass 1 over the synthetic shards. Arrays are over all ``n`` rows in id order; images
    of the ``usable`` rows (decodable, finite, of the real shape) are float32 ``(U, C, H, W)``."""

    labels: list[str] = field(default_factory=list)
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    keep_sanity: np.ndarray = field(default_factory=lambda: np.ones(0, bool))
    keep_label: np.ndarray = field(default_factory=lambda: np.ones(0, bool))
    keep_mask_class: np.ndarray = field(default_factory=lambda: np.ones(0, bool))
    keep_mask_plausible: np.ndarray = field(default_factory=lambda: np.ones(0, bool))
    keep_mask_agree: np.ndarray = field(default_factory=lambda: np.ones(0, bool))
    usable: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    images: np.ndarray = field(default_factory=lambda: np.zeros((0, 1, 1, 1), np.float32))

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def keep_mask(self) -> np.ndarray:
        """Kept by all three mask filters (all True when they are off)."""
        return self.keep_mask_class & self.keep_mask_plausible & self.keep_mask_agree


def _score_synthetic(
    cfg: PipelineConfig,
    paths: PipelinePaths,
    model: torch.nn.Module | None,
    classes: list[str],
    real_shape: tuple[int, ...],
    device: str,
    check_shape: bool,
    masks: mask_filters.MaskContext | None = None,
) -> SyntheticScores:
    """Decode every synthetic row once; sanity, label-consistency and (with ``masks``) mask
    scores; usable images."""
    spec = cfg.quality
    class_index = {name: i for i, name in enumerate(classes)}
    labels: list[str] = []
    sanity_rows: list[np.ndarray] = []
    confidence_rows: list[np.ndarray] = []
    usable: list[int] = []
    images: list[np.ndarray] = []
    mask_rows: list[np.ndarray] = []
    columns = ["id", "label", "image"] + (["mask"] if masks is not None else [])
    for table in iter_tables(paths.synthetic, columns=columns):
        offset = len(labels)
        shard_labels = ["" if label is None else str(label) for label in table.column("label").to_pylist()]
        decoded = [decode_row(blob) for blob in table.column("image").to_pylist()]
        labels += shard_labels
        if spec.sanity.enabled:
            sanity_rows.append(
                np.asarray(
                    [sanity_scores(image) if image is not None else (math.nan, math.nan, 1.0) for image in decoded],
                    dtype=np.float64,
                ).reshape(len(decoded), 3)
            )
        ok = [i for i, image in enumerate(decoded) if image is not None and np.isfinite(image).all()]
        for i in ok:
            if check_shape and tuple(decoded[i].shape) != real_shape:
                raise DataError(
                    f"{paths.synthetic}: row {table.column('id')[i].as_py()}: expected image shape "
                    f"{real_shape} like the real data, got {tuple(decoded[i].shape)}; "
                    "synthesize at preprocess.size with preprocess.channels"
                )
        if spec.label_consistency.enabled:
            confidence = np.full(len(decoded), math.nan, dtype=np.float64)
            if ok:
                batch = np.stack([decoded[i] for i in ok]).astype(np.float32)
                proba = downstream.predict_proba(model, batch, device=device)
                rows = np.asarray([class_index[shard_labels[i]] for i in ok], dtype=np.int64)
                confidence[ok] = proba[np.arange(len(ok)), rows].astype(np.float64)
            confidence_rows.append(confidence)
        if masks is not None:
            mask_rows.append(mask_filters.score_shard(masks, decoded, table.column("mask").to_pylist(), device))
        if check_shape:
            usable += [offset + i for i in ok]
            images += [decoded[i] for i in ok]
    scores = score_sanity_and_masks(labels, spec, sanity_rows, masks, mask_rows)
    if spec.label_consistency.enabled:
        confidence = np.concatenate(confidence_rows) if confidence_rows else np.zeros(0)
        scores.columns["q_label_confidence"] = confidence
        scores.keep_label = confidence >= spec.label_consistency.min_confidence  # NaN -> dropped
    scores.usable = np.asarray(usable, dtype=np.int64)
    if images:
        scores.images = np.stack(images).astype(np.float32)
    else:
        scores.images = np.zeros((0, *real_shape), np.float32)
    return scores


def score_sanity_and_masks(
    labels: list[str],
    spec: QualitySpec,
    sanity_rows: list[np.ndarray],
    masks: Any,
    mask_rows: list[np.ndarray],
) -> SyntheticScores:
    """Scores of ``len(labels)`` rows with every filter keeping them, then the sanity decision
    (``sanity_rows``: per shard float64 ``(n, 3)`` of std, saturated fraction, NaN flag) and,
    with a mask reference ``masks``, the mask decisions (``mask_rows``: per shard
    ``(n, len(MASK_COLUMNS))``); shared by the 2D and the volume filter stage."""
    n = len(labels)
    scores = SyntheticScores(
        labels=labels,
        keep_sanity=np.ones(n, bool),
        keep_label=np.ones(n, bool),
        keep_mask_class=np.ones(n, bool),
        keep_mask_plausible=np.ones(n, bool),
        keep_mask_agree=np.ones(n, bool),
    )
    if spec.sanity.enabled:
        sanity = np.concatenate(sanity_rows) if sanity_rows else np.zeros((0, 3))
        scores.columns.update(q_std=sanity[:, 0], q_saturated=sanity[:, 1], q_nan=sanity[:, 2])
        scores.keep_sanity = (
            (sanity[:, 2] == 0)
            & (sanity[:, 0] >= spec.sanity.min_std)
            & (sanity[:, 1] <= spec.sanity.max_saturated_fraction)
        )
    if masks is not None:
        mask_scores = np.concatenate(mask_rows) if mask_rows else np.zeros((0, len(mask_filters.MASK_COLUMNS)))
        scores.columns.update(zip(mask_filters.MASK_COLUMNS, mask_scores.T, strict=True))
        scores.keep_mask_class, scores.keep_mask_plausible, scores.keep_mask_agree = mask_filters.decide(
            masks, mask_scores
        )
    return scores


def real_train_column(paths: PipelinePaths, ids: list[str], column: str) -> list[Any]:
    """``column`` of each real train row ``ids`` (None for an id not found)."""
    table = read_table(paths.real, columns=["id", column], splits=["train"])
    value_of = dict(zip(table.column("id").to_pylist(), table.column(column).to_pylist(), strict=True))
    return [value_of.get(row_id) for row_id in ids]


def _real_subjects(paths: PipelinePaths, ids: list[str]) -> list[str | None]:
    """The subject of each real train row ``ids`` (pseudonymised; used only for grouping)."""
    return real_train_column(paths, ids, "subject")


def nearest_neighbour_filters(
    cfg: PipelineConfig,
    paths: PipelinePaths,
    train: downstream.LabelledArrays,
    real_feats: np.ndarray | None,
    scores: SyntheticScores,
    syn_feats: np.ndarray | None,
) -> tuple[nn_filters.FilterResult | None, nn_filters.FilterResult | None]:
    """Run the memorisation and near-duplicate filters that are enabled."""
    spec = cfg.quality
    n, usable = scores.n, scores.usable
    groups, reference_kind = None, ""
    references: dict[str, np.ndarray] = {}

    def limit(nn_spec) -> dict[str, Any]:
        nonlocal groups, reference_kind
        if groups is None:
            groups, reference_kind = nn_filters.subject_groups(_real_subjects(paths, train.ids))
        if nn_spec.space not in references:
            vectors = nn_filters.space_vectors(nn_spec.space, train.images, real_feats)
            references[nn_spec.space] = nn_filters.real_reference(vectors, groups)
        return nn_filters.threshold(nn_spec, references[nn_spec.space], reference_kind)

    memo = dup = None
    if spec.memorisation.enabled:
        space = spec.memorisation.space
        memo = nn_filters.memorisation_filter(
            spec.memorisation,
            limit(spec.memorisation),
            n,
            usable,
            nn_filters.space_vectors(space, scores.images, syn_feats),
            nn_filters.space_vectors(space, train.images, real_feats),
        )
    if spec.duplicates.enabled:
        in_running = (
            scores.keep_sanity & scores.keep_label & scores.keep_mask & (memo.keep if memo else np.ones(n, bool))
        )
        position = np.flatnonzero(in_running[usable])  # positions in the usable arrays, id order
        vectors = nn_filters.space_vectors(
            spec.duplicates.space, scores.images[position], None if syn_feats is None else syn_feats[position]
        )
        dup = nn_filters.duplicate_filter(
            spec.duplicates, limit(spec.duplicates), n, usable[position], vectors, in_running
        )
    return memo, dup


def _count(scores: SyntheticScores, keep_memo: np.ndarray, keep_dup: np.ndarray) -> dict[str, dict[str, int]]:
    """Per-class counts; a dropped row counts under the first filter that drops it."""
    counts: dict[str, dict[str, int]] = {}
    for i, label in enumerate(scores.labels):
        entry = counts.setdefault(label, dict.fromkeys(COUNT_KEYS, 0))
        entry["generated"] += 1
        if not scores.keep_sanity[i]:
            entry["dropped_sanity"] += 1
        elif not scores.keep_label[i]:
            entry["dropped_label"] += 1
        elif not scores.keep_mask_class[i]:
            entry["dropped_mask_unknown_class"] += 1
        elif not scores.keep_mask_plausible[i]:
            entry["dropped_mask_implausible"] += 1
        elif not scores.keep_mask_agree[i]:
            entry["dropped_mask_disagree"] += 1
        elif not keep_memo[i]:
            entry["dropped_memorised"] += 1
        elif not keep_dup[i]:
            entry["dropped_duplicate"] += 1
        else:
            entry["kept"] += 1
    return dict(sorted(counts.items()))


def keep_and_write(
    cfg: PipelineConfig,
    paths: PipelinePaths,
    scores: SyntheticScores,
    memo: nn_filters.FilterResult | None,
    dup: nn_filters.FilterResult | None,
    use_label: bool,
    use_masks: bool,
) -> np.ndarray:
    """Add the nearest-neighbour distance columns to ``scores``, decide which rows every
    filter keeps (bool ``(n,)``, returned) and write the filtered dataset."""
    if memo:
        scores.columns["q_nn_real_distance"] = memo.column
    if dup:
        scores.columns["q_nn_synthetic_distance"] = dup.column
    keep = (
        scores.keep_sanity & scores.keep_label & scores.keep_mask & _kept_by(memo, scores.n) & _kept_by(dup, scores.n)
    )
    schema = quality_schema(cfg.quality.sanity.enabled, use_label, memo is not None, dup is not None, masks=use_masks)
    _write_filtered(cfg, paths, schema, scores.columns, keep)
    return keep


def _kept_by(result: nn_filters.FilterResult | None, n: int) -> np.ndarray:
    return result.keep if result else np.ones(n, bool)


def mask_filters_info(cfg: PipelineConfig, mask_ctx: Any, off_reason: str) -> dict[str, Any]:
    """The ``filters.masks`` record: the mask filters' own, or their settings and why they are off."""
    if mask_ctx:
        return mask_ctx.info()
    return {**cfg.quality.masks.model_dump(mode="json"), "active": False, "reason": off_reason}


def finish_quality(
    cfg: PipelineConfig,
    paths: PipelinePaths,
    scores: SyntheticScores,
    memo: nn_filters.FilterResult | None,
    dup: nn_filters.FilterResult | None,
    *,
    label_info: dict[str, Any],
    mask_info: dict[str, Any],
    label_classifier: dict[str, Any] | None,
    real_train_sanity: dict[str, Any] | None,
    set_metrics: dict[str, Any] | None,
    realism_block: dict[str, Any] | None,
    extractor_name: str | None,
    label_classifier_val_accuracy: float | None,
    extra: dict[str, Any] | None = None,
    stage: str = "filter",
) -> dict[str, Any]:
    """Count, write ``quality.json`` (the filters' records, ``label_classifier``, the real
    train sanity reference, set metrics, realism and the ``extra`` top-level blocks) with its
    gate, log one line as ``stage``; raise QualityGateError (after writing) when the gate
    fails, else return the stage summary. Shared by the 2D and the volume filter stage."""
    spec = cfg.quality
    per_class = _count(scores, _kept_by(memo, scores.n), _kept_by(dup, scores.n))
    totals = {k: sum(entry[k] for entry in per_class.values()) for k in COUNT_KEYS}
    kept_fraction = totals["kept"] / totals["generated"] if totals["generated"] else None
    quality: dict[str, Any] = {
        "per_class": per_class,
        "totals": totals,
        "kept_fraction": kept_fraction,
        "filters": {
            "sanity": spec.sanity.model_dump(mode="json"),
            "label_consistency": label_info,
            "masks": mask_info,
            "memorisation": memo.info if memo else None,
            "duplicates": dup.info if dup else None,
        },
        "label_classifier": label_classifier,
        "real_train_sanity": real_train_sanity,
        "set_metrics": set_metrics,
        "realism": realism_block,
        **(extra or {}),
    }
    quality = downstream.round_floats(quality)
    gate = downstream.round_floats(quality_sets.check_gate(spec.gate, quality))
    quality["gate"] = gate
    paths.metrics.mkdir(parents=True, exist_ok=True)
    write_json_atomic(quality, paths.metrics / "quality.json")
    logger.info(
        "%s: %d generated, %s; %d kept",
        stage,
        totals["generated"],
        ", ".join(f"{k.removeprefix('dropped_')} {totals[k]}" for k in COUNT_KEYS if k.startswith("dropped_")),
        totals["kept"],
    )
    if not gate["passed"]:
        outputs = f"{paths.filtered} and {paths.metrics / 'quality.json'}"
        raise QualityGateError(quality_sets.gate_message(gate, quality, outputs))
    kept_overall = ((set_metrics or {}).get("sets") or {}).get("kept") or {}
    kept_overall = kept_overall.get("overall") or {}
    return downstream.round_floats(
        {
            "per_class": per_class,
            "totals": totals,
            "kept_fraction": kept_fraction,
            "label_classifier_val_accuracy": label_classifier_val_accuracy,
            "extractor": extractor_name,
            "fid": kept_overall.get("fid"),
            "kid_mean": kept_overall.get("kid_mean"),
            "extractor_reliable": gate["extractor_reliable"],
            "two_sample_auc": ((realism_block or {}).get("two_sample") or {}).get("auc"),
            "realism_passed": gate["realism_passed"],
            "gate_passed": gate["passed"],
        }
    )


def _write_filtered(
    cfg: PipelineConfig, paths: PipelinePaths, schema: pa.Schema, columns: dict[str, np.ndarray], keep: np.ndarray
) -> None:
    """Second pass over the synthetic shards: append the score columns, keep the kept rows."""
    provenance = {
        "stage": "filter",
        "synthetic": dataset_digest(paths.synthetic),
        "real": dataset_digest(paths.real),
        "quality": cfg.quality.model_dump(mode="json"),
    }
    with DatasetWriter(
        paths.filtered, shard_rows=cfg.synthesis.shard_rows, schema=schema, provenance=provenance
    ) as writer:
        offset = 0
        for table in iter_tables(paths.synthetic):
            table = table.select(list(BASE_COLUMNS))
            rows = slice(offset, offset + table.num_rows)
            offset += table.num_rows
            for name in schema.names[len(BASE_COLUMNS) :]:
                table = table.append_column(name, pa.array(columns[name][rows], type=pa.float64()))
            writer.write_table(table.filter(pa.array(keep[rows])))


def _extractor_record(
    cfg: PipelineConfig,
    extractor: features.Extractor,
    normalisation: str,
    kind: str,
    classifier: dict[str, Any] | None,
    classes: list[str],
    train: downstream.LabelledArrays,
    real_feats: np.ndarray,
    val: downstream.LabelledArrays | None,
    val_feats: np.ndarray | None,
) -> dict[str, Any]:
    """``set_metrics.extractor``: the extractor's description, its own quality (a linear
    probe on real val), and whether it took part in choosing the kept set
    (``chose_kept_set``: the label filter's classifier, or the features of a feature-space
    memorisation / duplicate filter)."""
    spec = cfg.quality
    record = extractor.describe(normalisation)
    if kind == "classifier":
        record["training"] = classifier
    record["quality"] = features.extractor_quality(
        real_feats,
        train.targets,
        val_feats,
        None if val is None else val.targets,
        len(classes),
        seed=cfg.seed,
    )
    nn_specs = {"memorisation": spec.memorisation, "duplicates": spec.duplicates}
    used_by = [name for name, nn_spec in nn_specs.items() if nn_spec.enabled and nn_spec.space == "feature"]
    if kind == "classifier" and spec.label_consistency.enabled:
        used_by.insert(0, "label_consistency")
    record["used_by_filters"] = used_by
    record["chose_kept_set"] = bool(used_by)
    quality = record["quality"]
    if not quality["reliable"]:
        logger.warning(
            "set-metrics extractor %s is UNRELIABLE (linear probe %s, chance %s%s): its metrics are shown as "
            "unreliable and never gate",
            extractor.name,
            "n/a" if quality["value"] is None else f"{quality['value']:.3f}",
            quality["chance"],
            f"; {quality['reason']}" if quality["reason"] else "",
        )
    if used_by:
        logger.warning("set-metrics extractor %s also chose the kept set (%s)", extractor.name, ", ".join(used_by))
    return record


def _realism(
    cfg: PipelineConfig,
    paths: PipelinePaths,
    train: downstream.LabelledArrays,
    scores: SyntheticScores,
    keep: np.ndarray,
    device: str,
) -> dict[str, Any] | None:
    """The ``realism`` block: the classifier two-sample test of the kept synthetic set
    against real train (:mod:`tasks.realism`), or None when ``quality.realism`` is off."""
    spec = cfg.quality.realism
    if not spec.enabled:
        return None
    kept = keep[scores.usable]
    synthetic_subjects = read_table(paths.synthetic, columns=["subject"]).column("subject").to_pylist()
    settings = realism.TwoSampleSettings.from_spec(spec)
    test = realism.two_sample_test(
        train.images,
        train.labels,
        _real_subjects(paths, train.ids),
        scores.images[kept],
        np.asarray(scores.labels, dtype=object)[scores.usable][kept].tolist(),
        settings,
        seed=cfg.seed,
        device=device,
        synthetic_subjects=[synthetic_subjects[i] for i in scores.usable[kept]],
    )
    return {
        "two_sample": test,
        "reference": "real train",
        "interpretation": "AUC 0.5 = indistinguishable, 1.0 = separable",
    }


def filter_synthetic(cfg: PipelineConfig, paths: PipelinePaths) -> dict[str, Any]:
    """Score, filter, measure and write the synthetic dataset; returns the counts of
    ``quality.json`` (``per_class``, ``totals``, ``kept_fraction``), the label classifier's
    val accuracy, the extractor name, the kept set's overall FID/KID and ``gate_passed``.
    Raises QualityGateError after writing when a ``quality.gate`` bound is crossed. Volume
    pipelines (``preprocess.dims: 3``) are handled by :mod:`tasks.quality_volumes`."""
    if cfg.preprocess.dims == 3:
        from tasks.quality_volumes import filter_volumes

        return filter_volumes(cfg, paths)
    spec = cfg.quality
    use_label, use_metrics = spec.label_consistency.enabled, spec.metrics.enabled
    classes = _check_labels(cfg, paths)
    device = setup_torch(cfg, cfg.seed)
    train = downstream.load_labelled(paths.real, ["train"], classes)
    if len(train) == 0:
        raise DataError(f"{paths.real}: expected real train images, found none; check the ingest split")
    real_shape = tuple(int(d) for d in train.images.shape[1:])
    use_masks, masks_off_reason = mask_filters.resolve_enabled(spec.masks, paths, train.masks)
    kind = _extractor_kind(cfg, classes)
    val = downstream.load_labelled(paths.real, ["val"], classes) if (use_label or use_metrics or use_masks) else None

    model, classifier = None, None
    if use_label or kind == "classifier":
        model, classifier = _train_label_classifier(cfg, paths, classes, train, val, device)
    extractor, normalisation, real_feats, val_feats = None, None, None, None
    if kind is not None:
        extractor, normalisation = _build_extractor(cfg, paths, kind, model, train, device)
        real_feats = _real_features(cfg, paths, extractor, normalisation, "train", train, device)
        if use_metrics and val is not None and len(val):
            val_feats = _real_features(cfg, paths, extractor, normalisation, "val", val, device)
    reference = _real_sanity_reference(cfg, train) if spec.sanity.enabled else None

    mask_ctx = mask_filters.prepare(cfg, paths, train, val, device) if use_masks else None
    check_shape = use_label or spec.memorisation.enabled or spec.duplicates.enabled or use_metrics
    check_shape = check_shape or spec.realism.enabled
    scores = _score_synthetic(cfg, paths, model, classes, real_shape, device, check_shape, mask_ctx)
    syn_feats = None
    if extractor is not None:
        syn_feats = features.extract_features(
            extractor, scores.images, normalisation=normalisation, batch_size=spec.metrics.batch_size, device=device
        )
    memo, dup = nearest_neighbour_filters(cfg, paths, train, real_feats, scores, syn_feats)
    keep = keep_and_write(cfg, paths, scores, memo, dup, use_label, use_masks)

    set_metrics = None
    if use_metrics:
        labels = np.asarray(scores.labels, dtype=object)[scores.usable]
        kept = keep[scores.usable]
        record = _extractor_record(
            cfg, extractor, normalisation, kind, classifier, classes, train, real_feats, val, val_feats
        )
        set_metrics = quality_sets.set_metrics_block(
            spec.metrics,
            record,
            quality_sets.FeatureSet(real_feats, np.asarray(train.labels, dtype=object), train.images),
            {
                "kept": quality_sets.FeatureSet(syn_feats[kept], labels[kept], scores.images[kept]),
                "generated": quality_sets.FeatureSet(syn_feats, labels),
                "real_val": None
                if val_feats is None
                else quality_sets.FeatureSet(val_feats, np.asarray(val.labels, dtype=object)),
            },
            classes,
            seed=cfg.seed,
            device=device,
        )
        overall = set_metrics["sets"]["kept"]["overall"]
        logger.info(
            "set metrics (%s, %s), kept vs real train: FID %s, KID %s, precision %s, recall %s",
            extractor.name,
            normalisation,
            *(overall[k] for k in ("fid", "kid_mean", "precision", "recall")),
        )

    realism_block = _realism(cfg, paths, train, scores, keep, device)
    return finish_quality(
        cfg,
        paths,
        scores,
        memo,
        dup,
        label_info=spec.label_consistency.model_dump(mode="json"),
        mask_info=mask_filters_info(cfg, mask_ctx, masks_off_reason),
        # trained only as the feature extractor (recorded there) when the filter is off
        label_classifier=classifier if use_label else None,
        real_train_sanity=reference,
        set_metrics=set_metrics,
        realism_block=realism_block,
        extractor_name=extractor.name if use_metrics else None,
        label_classifier_val_accuracy=classifier["val_accuracy"] if use_label else None,
    )
