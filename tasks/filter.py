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
- **memorisation**: ``q_nn_real_distance``, the distance to the nearest REAL TRAIN image
  (``space`` pixel: RMSE of [0, 1] pixels; feature: Euclidean in the extractor's
  features); dropped below the threshold (near-copies of training images).
- **duplicates**: ``q_nn_synthetic_distance``, the distance to the nearest other synthetic
  image still in the running (NaN when there is none); of images closer than the
  threshold to each other, only the first by id is kept.

Thresholds of the last two: ``max_distance``, or calibrated on the real train split
(``calibration_scale`` x the ``calibration_quantile`` of each real image's distance to the
nearest real image of another subject; of any other image when there is one subject).

Set metrics (``quality.metrics``): FID, KID, precision/recall, density/coverage of the
kept synthetic set, all generated (decodable) images and the real val split, each
against the real train split, per class and overall, plus MS-SSIM diversity within the
kept set and, for reference, within real train; see :mod:`tasks.quality_metrics`. Features
come from :mod:`tasks.features`; real-image features and the classifier are cached under
``paths.state`` per real dataset version. ``quality.gate`` bounds are checked last: a
crossed bound raises QualityGateError AFTER the filtered shards and quality.json are
written, so both stay for inspection.

Writes the kept rows to ``paths.filtered`` (base columns + the float64 ``q_*`` columns of
every enabled filter) and ``paths.metrics / "quality.json"``. Memory: the real train (and
val) split plus the decoded synthetic images (N x C x H x W float32) and their features.

``quality.json`` keys:

- ``per_class``: ``{label: {generated, dropped_sanity, dropped_label, dropped_memorised,
  dropped_duplicate, kept}}``; ``totals``: the same summed; ``kept_fraction``.
- ``filters``: each filter's settings; ``memorisation`` and ``duplicates`` add
  ``threshold``, ``threshold_source`` (``absolute``/``calibrated``), ``reference`` (the
  real-vs-real distances it was calibrated on: ``kind``, ``n``, ``quantile``, ``value``) and
  counts (``n_scored``, ``n_below_threshold``, ``fraction_below_threshold`` over all
  scored rows, whatever other filters did; ``n_dropped`` for duplicates).
- ``label_classifier``: network, n_train, epochs, steps, n_val, val accuracy, ... or None.
- ``real_train_sanity``: how the sanity thresholds treat real train images, or None.
- ``set_metrics``: None when disabled, else ``{"extractor": {name, kind, description,
  weights_sha256, dim, normalisation[, training]}, "reference": "real train", "ms_ssim_settings":
  {kernel_size, kernel_sigma, scales, standard_scales, weights} | None, "sets": {"kept" |
  "generated" | "real_val": {"overall": M, "per_class": {label: M}}}, "real_train_diversity":
  {"overall": D, "per_class": {label: D}}}`` with ``M`` = :func:`tasks.quality_metrics.compare_sets`
  keys plus ``ms_ssim_mean``, ``ms_ssim_std``, ``ms_ssim_pairs`` (MS-SSIM within the set:
  computed for ``kept`` only, None/0 for the others), and ``D`` the last three;
  ``real_val`` is None without a val split. ``training`` (classifier extractor only): the
  classifier's summary, as ``label_classifier``.
- ``gate``: ``{"passed": bool, "checks": [{metric, bound_name, bound, value, passed}]}``.
"""

from __future__ import annotations

import hashlib
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
from tasks import downstream, features, quality_metrics
from tasks.config import AugmentSpec, NearestNeighbourFilter, PipelineConfig, QualityGate
from tasks.paths import PipelinePaths
from tasks.runtime import setup_torch

logger = logging.getLogger(__name__)

SANITY_COLUMNS = ("q_std", "q_saturated", "q_nan")
LABEL_COLUMNS = ("q_label_confidence",)
MEMORISATION_COLUMNS = ("q_nn_real_distance",)
DUPLICATE_COLUMNS = ("q_nn_synthetic_distance",)
COUNT_KEYS = ("generated", "dropped_sanity", "dropped_label", "dropped_memorised", "dropped_duplicate", "kept")
#: the label-consistency classifier's fixed recipe (only its epochs are configurable), so
#: that the filter does not depend on the retrain stage's parameters
LABEL_NETWORK = "densenet"
LABEL_BATCH_SIZE = 32
LABEL_LR = 1e-3
#: warn when more than this fraction of real train images would fail the sanity filter
REAL_DROP_WARNING = 0.05
GATE_FIXES = {
    "max_fid": "improve the generator (train longer, pick another) or relax quality.gate.max_fid",
    "max_kid": "improve the generator (train longer, pick another) or relax quality.gate.max_kid",
    "min_precision": "the generator makes images unlike real ones: train it longer or relax quality.gate.min_precision",
    "min_recall": "the synthetic set misses part of the real data: synthesize more, train longer, or relax quality.gate.min_recall",
    "max_memorised_fraction": "the generator copies training images: train on more data or fewer epochs, "
    "or relax quality.gate.max_memorised_fraction",
    "min_kept_fraction": "the filters drop most images: check their thresholds or the generator, "
    "or relax quality.gate.min_kept_fraction",
}


def quality_schema(sanity: bool, label: bool, memorisation: bool = False, duplicates: bool = False) -> pa.Schema:
    """BASE_SCHEMA plus the float64 ``q_*`` columns of the enabled filters."""
    names = (
        (SANITY_COLUMNS if sanity else ())
        + (LABEL_COLUMNS if label else ())
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
    key = features.cache_key(
        real=dataset_digest(paths.real),
        classes=classes,
        channels=channels,
        recipe=[LABEL_NETWORK, LABEL_BATCH_SIZE, LABEL_LR, cfg.quality.label_consistency.epochs],
        augment=AugmentSpec().model_dump(mode="json"),
        seed=cfg.seed,
        threads=cfg.threads,
        device=device,
        torch=torch.__version__,
        code=hashlib.sha256(Path(downstream.__file__).read_bytes()).hexdigest(),
    )
    return paths.state / "classifier" / f"{key[:32]}.pt"


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
    """``classifier`` / ``inception`` / ``random``, or None when nothing needs features."""
    if not _needs_features(cfg):
        return None
    kind = cfg.quality.metrics.extractor
    if kind == "auto":
        kind = "classifier" if len(classes) >= 2 else "random"
        if kind == "random":
            logger.warning("no labelled classes to train a classifier: set metrics use a random-init network")
    return kind


def _build_extractor(
    cfg: PipelineConfig, paths: PipelinePaths, kind: str, model: torch.nn.Module | None, channels: int
) -> tuple[features.Extractor, str]:
    """The extractor and the normalisation it is used with."""
    spec = cfg.quality.metrics
    if kind == "classifier":
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


# --------------------------------------------------------------------------- scoring
@dataclass
class SyntheticScores:
    """Pass 1 over the synthetic shards. Arrays are over all ``n`` rows in id order; images
    of the ``usable`` rows (decodable, finite, of the real shape) are float32 ``(U, C, H, W)``."""

    labels: list[str] = field(default_factory=list)
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    keep_sanity: np.ndarray = field(default_factory=lambda: np.ones(0, bool))
    keep_label: np.ndarray = field(default_factory=lambda: np.ones(0, bool))
    usable: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    images: np.ndarray = field(default_factory=lambda: np.zeros((0, 1, 1, 1), np.float32))

    @property
    def n(self) -> int:
        return len(self.labels)


def _score_synthetic(
    cfg: PipelineConfig,
    paths: PipelinePaths,
    model: torch.nn.Module | None,
    classes: list[str],
    real_shape: tuple[int, ...],
    device: str,
    check_shape: bool,
) -> SyntheticScores:
    """Decode every synthetic row once; sanity and label-consistency scores; usable images."""
    spec = cfg.quality
    class_index = {name: i for i, name in enumerate(classes)}
    labels: list[str] = []
    sanity_rows: list[np.ndarray] = []
    confidence_rows: list[np.ndarray] = []
    usable: list[int] = []
    images: list[np.ndarray] = []
    for table in iter_tables(paths.synthetic, columns=["id", "label", "image"]):
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
        if check_shape:
            usable += [offset + i for i in ok]
            images += [decoded[i] for i in ok]
    n = len(labels)
    scores = SyntheticScores(labels=labels, keep_sanity=np.ones(n, bool), keep_label=np.ones(n, bool))
    if spec.sanity.enabled:
        sanity = np.concatenate(sanity_rows) if sanity_rows else np.zeros((0, 3))
        scores.columns.update(q_std=sanity[:, 0], q_saturated=sanity[:, 1], q_nan=sanity[:, 2])
        scores.keep_sanity = (
            (sanity[:, 2] == 0)
            & (sanity[:, 0] >= spec.sanity.min_std)
            & (sanity[:, 1] <= spec.sanity.max_saturated_fraction)
        )
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


def _space_vectors(space: str, images: np.ndarray, feats: np.ndarray | None) -> np.ndarray:
    """Rows whose Euclidean distance is the filter's distance: pixel -> flattened images
    divided by sqrt(C*H*W) (distance = RMSE of [0, 1] pixels); feature -> the features."""
    if space == "feature":
        return np.asarray(feats, dtype=np.float64)
    flat = images.reshape(images.shape[0], int(np.prod(images.shape[1:]))).astype(np.float64)
    return flat / math.sqrt(max(flat.shape[1], 1))


def _subject_groups(paths: PipelinePaths, ids: list[str]) -> tuple[np.ndarray, str]:
    """int64 group per real train row for the calibration reference (subject, or the row
    itself when the split has a single subject) and the reference's name."""
    table = read_table(paths.real, columns=["id", "subject"], splits=["train"])
    subject_of = dict(zip(table.column("id").to_pylist(), table.column("subject").to_pylist(), strict=True))
    subjects = [subject_of.get(row_id) for row_id in ids]
    if len(set(subjects)) >= 2:
        codes = {name: i for i, name in enumerate(sorted(set(map(str, subjects))))}
        return np.asarray([codes[str(s)] for s in subjects], np.int64), "nearest real train image of another subject"
    return np.arange(len(ids), dtype=np.int64), "nearest other real train image (one subject)"


def _threshold(spec: NearestNeighbourFilter, reference: np.ndarray, reference_kind: str) -> dict[str, Any]:
    """The filter's distance threshold: absolute, or calibrated on real-vs-real distances."""
    finite = reference[np.isfinite(reference)]
    info: dict[str, Any] = {
        "reference": {
            "kind": reference_kind,
            "n": int(finite.size),
            "quantile": spec.calibration_quantile,
            "value": float(np.quantile(finite, spec.calibration_quantile)) if finite.size else None,
        }
    }
    if spec.max_distance is not None:
        return {**info, "threshold": float(spec.max_distance), "threshold_source": "absolute"}
    if not finite.size:
        raise DataError(
            "expected at least 2 real train images to calibrate the nearest-neighbour filters, got fewer; "
            "set quality.memorisation.max_distance and quality.duplicates.max_distance"
        )
    threshold = spec.calibration_scale * info["reference"]["value"]
    if threshold == 0:
        logger.warning(
            "calibrated %s threshold is 0 (real train holds identical images); nothing is dropped", spec.space
        )
    return {**info, "threshold": float(threshold), "threshold_source": "calibrated"}


# --------------------------------------------------------------------------- set metrics
def _diversity(
    images: np.ndarray | None, settings: quality_metrics.MsSsimSettings | None, pairs: int, seed: int, device: str
) -> dict:
    """MS-SSIM diversity fields of one set (None when not computed)."""
    if settings is None or images is None:
        return {"ms_ssim_mean": None, "ms_ssim_std": None, "ms_ssim_pairs": 0}
    result = quality_metrics.ms_ssim_diversity(images, settings, pairs=pairs, seed=seed, device=device)
    return {"ms_ssim_mean": result["mean"], "ms_ssim_std": result["std"], "ms_ssim_pairs": result["n_pairs"]}


def _compare(
    cfg: PipelineConfig,
    real_feats: np.ndarray,
    real_labels: np.ndarray,
    feats: np.ndarray,
    labels: np.ndarray,
    images: np.ndarray | None,
    classes: list[str],
    settings: quality_metrics.MsSsimSettings | None,
    device: str,
) -> dict[str, Any]:
    """Set metrics of one set against real train, overall and per class; MS-SSIM diversity
    only when ``images`` are given."""
    spec = cfg.quality.metrics

    def one(real: np.ndarray, mine: np.ndarray, mine_images: np.ndarray | None) -> dict[str, Any]:
        result = quality_metrics.compare_sets(
            real,
            mine,
            k=spec.nearest_k,
            kid_subsets=spec.kid_subsets,
            kid_subset_size=spec.kid_subset_size,
            seed=cfg.seed,
        )
        return {**result, **_diversity(mine_images, settings, spec.ms_ssim_pairs, cfg.seed, device)}

    per_class = {
        name: one(
            real_feats[real_labels == name], feats[labels == name], None if images is None else images[labels == name]
        )
        for name in classes
    }
    return {"overall": one(real_feats, feats, images), "per_class": per_class}


# --------------------------------------------------------------------------- gate
def _gate(gate: QualityGate, quality: dict[str, Any]) -> dict[str, Any]:
    """Check every configured bound; ``{"passed", "checks": [...]}``."""
    overall = ((quality.get("set_metrics") or {}).get("sets") or {}).get("kept", {}).get("overall", {})
    memorisation = quality["filters"].get("memorisation") or {}
    values = {
        "max_fid": ("fid", overall.get("fid")),
        "max_kid": ("kid", overall.get("kid_mean")),
        "min_precision": ("precision", overall.get("precision")),
        "min_recall": ("recall", overall.get("recall")),
        "max_memorised_fraction": ("memorised_fraction", memorisation.get("fraction_below_threshold")),
        "min_kept_fraction": ("kept_fraction", quality.get("kept_fraction")),
    }
    checks = []
    for bound_name, (metric, value) in values.items():
        bound = getattr(gate, bound_name)
        if bound is None:
            continue
        ok = value is not None and (value <= bound if bound_name.startswith("max_") else value >= bound)
        checks.append({"metric": metric, "bound_name": bound_name, "bound": bound, "value": value, "passed": bool(ok)})
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def gate_message(gate: dict[str, Any], quality: dict[str, Any], paths: PipelinePaths) -> str:
    """One line: every failed check (metric, value, bound, fix) and where the outputs are."""
    extractor = ((quality.get("set_metrics") or {}).get("extractor")) or {}
    context = (
        f" (extractor {extractor.get('name')}, normalisation {extractor.get('normalisation')}, kept synthetic vs real train)"
        if extractor
        else ""
    )
    parts = []
    for check in gate["checks"]:
        if check["passed"]:
            continue
        sign = ">" if check["bound_name"].startswith("max_") else "<"
        value = "not computable (too few images)" if check["value"] is None else f"{check['value']:.6g} {sign}"
        shown = f"{check['metric']} {value} {check['bound_name']} {check['bound']:g}"
        if check["metric"] in ("fid", "kid", "precision", "recall"):
            shown += context
        parts.append(f"{shown}: {GATE_FIXES[check['bound_name']]}")
    where = f"{paths.filtered} and {paths.metrics / 'quality.json'}"
    return f"quality gate failed: {'; '.join(parts)}; outputs kept for inspection in {where}"


# --------------------------------------------------------------------------- the stage
def filter_synthetic(cfg: PipelineConfig, paths: PipelinePaths) -> dict[str, Any]:
    """Score, filter, measure and write the synthetic dataset; returns the counts of
    ``quality.json`` (``per_class``, ``totals``, ``kept_fraction``), the label classifier's
    val accuracy, the extractor name, the kept set's overall FID/KID and ``gate_passed``.
    Raises QualityGateError after writing when a ``quality.gate`` bound is crossed."""
    spec = cfg.quality
    use_memo, use_dup, use_metrics = spec.memorisation.enabled, spec.duplicates.enabled, spec.metrics.enabled
    classes = _check_labels(cfg, paths)
    device = setup_torch(cfg, cfg.seed)
    train = downstream.load_labelled(paths.real, ["train"], classes)
    if len(train) == 0:
        raise DataError(f"{paths.real}: expected real train images, found none; check the ingest split")
    real_shape = tuple(int(d) for d in train.images.shape[1:])
    kind = _extractor_kind(cfg, classes)
    val = (
        downstream.load_labelled(paths.real, ["val"], classes)
        if (spec.label_consistency.enabled or use_metrics)
        else None
    )

    model, classifier = None, None
    if spec.label_consistency.enabled or kind == "classifier":
        model, classifier = _train_label_classifier(cfg, paths, classes, train, val, device)
    extractor, normalisation, real_feats, val_feats = None, None, None, None
    if kind is not None:
        extractor, normalisation = _build_extractor(cfg, paths, kind, model, real_shape[0])
        cache = features.FeatureCache(paths.state / "features")
        digest = dataset_digest(paths.real)

        def cached(split: str, arrays: downstream.LabelledArrays) -> np.ndarray:
            feats, _ = cache.features(
                dataset_digest=digest,
                split=split,
                extractor=extractor,
                normalisation=normalisation,
                ids=arrays.ids,
                compute=lambda: features.extract_features(
                    extractor,
                    arrays.images,
                    normalisation=normalisation,
                    batch_size=spec.metrics.batch_size,
                    device=device,
                ),
            )
            return feats

        real_feats = cached("train", train)
        if use_metrics and val is not None and len(val):
            val_feats = cached("val", val)
    reference = _real_sanity_reference(cfg, train) if spec.sanity.enabled else None

    check_shape = spec.label_consistency.enabled or use_memo or use_dup or use_metrics
    scores = _score_synthetic(cfg, paths, model, classes, real_shape, device, check_shape)
    n, usable = scores.n, scores.usable
    syn_feats = None
    if extractor is not None:
        syn_feats = features.extract_features(
            extractor, scores.images, normalisation=normalisation, batch_size=spec.metrics.batch_size, device=device
        )
    keep_memo, keep_dup = np.ones(n, bool), np.ones(n, bool)
    filters: dict[str, Any] = {
        "sanity": spec.sanity.model_dump(mode="json"),
        "label_consistency": spec.label_consistency.model_dump(mode="json"),
        "memorisation": None,
        "duplicates": None,
    }

    reference_cache: dict[str, tuple[np.ndarray, str]] = {}

    def real_reference(space: str) -> tuple[np.ndarray, str]:
        """Each real train image's distance to its nearest real train image of another subject."""
        if space not in reference_cache:
            vectors = _space_vectors(space, train.images, real_feats)
            groups, kind_name = _subject_groups(paths, train.ids)
            distance, _ = quality_metrics.nearest_distances(vectors, vectors, groups, groups)
            reference_cache[space] = (distance, kind_name)
        return reference_cache[space]

    if use_memo:
        memo = spec.memorisation
        info = _threshold(memo, *real_reference(memo.space))
        distance = np.full(n, math.nan)
        if usable.size:
            real_vectors = _space_vectors(memo.space, train.images, real_feats)
            nearest, _ = quality_metrics.nearest_distances(
                _space_vectors(memo.space, scores.images, syn_feats), real_vectors
            )
            distance[usable] = nearest
        scores.columns["q_nn_real_distance"] = distance
        keep_memo = distance >= info["threshold"]  # NaN (unscorable) -> dropped
        below = int(np.sum(distance[usable] < info["threshold"]))
        filters["memorisation"] = {
            **memo.model_dump(mode="json"),
            **info,
            "n_scored": int(usable.size),
            "n_below_threshold": below,
            "fraction_below_threshold": below / usable.size if usable.size else None,
        }
        logger.info(
            "memorisation: %d of %d synthetic images within %.4g of a real train image",
            below,
            usable.size,
            info["threshold"],
        )

    if use_dup:
        dup = spec.duplicates
        info = _threshold(dup, *real_reference(dup.space))
        in_running = scores.keep_sanity & scores.keep_label & keep_memo
        position = np.flatnonzero(in_running[usable])  # positions in the usable arrays, id order
        candidates = usable[position]
        vectors = _space_vectors(dup.space, scores.images[position], None if syn_feats is None else syn_feats[position])
        rows = np.arange(candidates.size, dtype=np.int64)
        nearest, _ = quality_metrics.nearest_distances(vectors, vectors, rows, rows)
        distance = np.full(n, math.nan)
        distance[candidates] = np.where(np.isfinite(nearest), nearest, math.nan)
        first = quality_metrics.first_of_each_group(
            candidates.size, quality_metrics.close_pairs(vectors, info["threshold"])
        )
        keep_dup = np.zeros(n, bool)  # rows out of the running cannot be scored
        keep_dup[candidates[first]] = True
        keep_dup |= ~in_running  # ... and are counted under the filter that dropped them
        scores.columns["q_nn_synthetic_distance"] = distance
        filters["duplicates"] = {
            **dup.model_dump(mode="json"),
            **info,
            "n_scored": int(candidates.size),
            "n_below_threshold": int(np.sum(nearest < info["threshold"])),
            "fraction_below_threshold": float(np.mean(nearest < info["threshold"])) if candidates.size else None,
            "n_dropped": int(candidates.size - first.sum()),
        }

    keep = scores.keep_sanity & scores.keep_label & keep_memo & keep_dup
    counts: dict[str, dict[str, int]] = {}
    for i, label in enumerate(scores.labels):
        entry = counts.setdefault(label, dict.fromkeys(COUNT_KEYS, 0))
        entry["generated"] += 1
        if not scores.keep_sanity[i]:
            entry["dropped_sanity"] += 1
        elif not scores.keep_label[i]:
            entry["dropped_label"] += 1
        elif not keep_memo[i]:
            entry["dropped_memorised"] += 1
        elif not keep_dup[i]:
            entry["dropped_duplicate"] += 1
        else:
            entry["kept"] += 1

    schema = quality_schema(spec.sanity.enabled, spec.label_consistency.enabled, use_memo, use_dup)
    provenance = {
        "stage": "filter",
        "synthetic": dataset_digest(paths.synthetic),
        "real": dataset_digest(paths.real),
        "quality": spec.model_dump(mode="json"),
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
                table = table.append_column(name, pa.array(scores.columns[name][rows], type=pa.float64()))
            writer.write_table(table.filter(pa.array(keep[rows])))

    set_metrics = None
    if use_metrics:
        set_metrics = _set_metrics(
            cfg, extractor, normalisation, classes, train, real_feats, val, val_feats, scores, syn_feats, keep
        )
        if kind == "classifier":
            set_metrics["extractor"]["training"] = classifier
    if not spec.label_consistency.enabled:
        classifier = None  # trained only as the feature extractor (recorded above), not as a filter

    per_class = dict(sorted(counts.items()))
    totals = {k: sum(entry[k] for entry in per_class.values()) for k in COUNT_KEYS}
    kept_fraction = totals["kept"] / totals["generated"] if totals["generated"] else None
    quality: dict[str, Any] = {
        "per_class": per_class,
        "totals": totals,
        "kept_fraction": kept_fraction,
        "filters": filters,
        "label_classifier": classifier,
        "real_train_sanity": reference,
        "set_metrics": set_metrics,
    }
    quality = downstream.round_floats(quality)
    gate = _gate(spec.gate, quality)
    quality["gate"] = downstream.round_floats(gate)
    paths.metrics.mkdir(parents=True, exist_ok=True)
    write_json_atomic(quality, paths.metrics / "quality.json")
    logger.info(
        "filter: %d generated, dropped %d sanity, %d label, %d memorised, %d duplicate; %d kept",
        *(totals[k] for k in COUNT_KEYS),
    )
    if not gate["passed"]:
        raise QualityGateError(gate_message(gate, quality, paths))
    kept_overall = (set_metrics or {}).get("sets", {}).get("kept", {}).get("overall", {})
    return downstream.round_floats(
        {
            "per_class": per_class,
            "totals": totals,
            "kept_fraction": kept_fraction,
            "label_classifier_val_accuracy": classifier["val_accuracy"] if classifier else None,
            "extractor": extractor.name if extractor is not None and use_metrics else None,
            "fid": kept_overall.get("fid"),
            "kid_mean": kept_overall.get("kid_mean"),
            "gate_passed": gate["passed"],
        }
    )


def _set_metrics(
    cfg: PipelineConfig,
    extractor: features.Extractor,
    normalisation: str,
    classes: list[str],
    train: downstream.LabelledArrays,
    real_feats: np.ndarray,
    val: downstream.LabelledArrays | None,
    val_feats: np.ndarray | None,
    scores: SyntheticScores,
    syn_feats: np.ndarray,
    keep: np.ndarray,
) -> dict[str, Any]:
    """The ``set_metrics`` block of quality.json (see the module docstring)."""
    spec = cfg.quality.metrics
    height, width = train.images.shape[2:]
    try:
        settings = quality_metrics.ms_ssim_settings(height, width, spec.ms_ssim_kernel_size)
    except DataError as exc:
        logger.warning("MS-SSIM skipped: %s", exc)
        settings = None
    real_labels = np.asarray(train.labels, dtype=object)
    syn_labels = np.asarray(scores.labels, dtype=object)[scores.usable]
    kept = keep[scores.usable]
    device = next(extractor.module.parameters()).device.type
    sets = {
        "kept": _compare(
            cfg,
            real_feats,
            real_labels,
            syn_feats[kept],
            syn_labels[kept],
            scores.images[kept],
            classes,
            settings,
            device,
        ),
        "generated": _compare(cfg, real_feats, real_labels, syn_feats, syn_labels, None, classes, settings, device),
        "real_val": None,
    }
    if val is not None and val_feats is not None and len(val):
        val_labels = np.asarray(val.labels, dtype=object)
        sets["real_val"] = _compare(
            cfg, real_feats, real_labels, val_feats, val_labels, None, classes, settings, device
        )
    real_diversity = {
        "overall": _diversity(train.images, settings, spec.ms_ssim_pairs, cfg.seed, device),
        "per_class": {
            name: _diversity(train.images[real_labels == name], settings, spec.ms_ssim_pairs, cfg.seed, device)
            for name in classes
        },
    }
    overall = sets["kept"]["overall"]
    logger.info(
        "set metrics (%s, %s): kept vs real train FID %s, KID %s, precision %s, recall %s",
        extractor.name,
        normalisation,
        overall["fid"],
        overall["kid_mean"],
        overall["precision"],
        overall["recall"],
    )
    return {
        "extractor": extractor.describe(normalisation),
        "reference": "real train",
        "ms_ssim_settings": settings.as_dict() if settings else None,
        "sets": sets,
        "real_train_diversity": real_diversity,
    }
