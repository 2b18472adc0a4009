"""Stage ``filter``: score every synthetic image, drop the unusable ones.

Two optional filters (``quality`` in pipelines.yaml):

- **sanity**: ``q_std`` (pixel standard deviation on the [0, 1] scale), ``q_saturated``
  (fraction of pixels at 0 or at the dtype's maximum) and ``q_nan`` (1.0 when the image
  cannot be decoded or holds non-finite values, else 0.0). A row is dropped when
  ``q_nan == 1``, ``q_std < min_std`` or ``q_saturated > max_saturated_fraction``.
- **label consistency**: a small classifier (:mod:`tasks.downstream`; DenseNet, batch 32,
  Adam 1e-3, default augmentation) trained for ``epochs`` passes over the real train split; ``q_label_confidence`` is its softmax
  probability of the conditioning label. Rows that passed sanity are dropped when it is
  below ``min_confidence``. Its accuracy on the real val split goes to ``quality.json``
  so a reader knows how far to trust the filter.

Writes the kept rows to ``paths.filtered`` (base columns + the ``q_*`` float64 columns of
every enabled filter) and ``paths.metrics / "quality.json"``. Synthetic shards are read
one at a time, so memory is bounded by one shard plus the real train split.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pyarrow as pa

from generators.errors import DataError
from generators.shards import (
    BASE_COLUMNS,
    BASE_SCHEMA,
    DatasetWriter,
    dataset_digest,
    decode_png,
    iter_tables,
    to_unit_float,
    write_json_atomic,
)
from tasks import downstream
from tasks.config import AugmentSpec, PipelineConfig
from tasks.paths import PipelinePaths
from tasks.runtime import setup_torch

logger = logging.getLogger(__name__)

SANITY_COLUMNS = ("q_std", "q_saturated", "q_nan")
LABEL_COLUMNS = ("q_label_confidence",)
#: the label-consistency classifier's fixed recipe (only its epochs are configurable), so
#: that the filter does not depend on the retrain stage's parameters
LABEL_NETWORK = "densenet"
LABEL_BATCH_SIZE = 32
LABEL_LR = 1e-3
#: warn when more than this fraction of real train images would fail the sanity filter
REAL_DROP_WARNING = 0.05


def quality_schema(sanity: bool, label: bool) -> pa.Schema:
    """BASE_SCHEMA plus the float64 ``q_*`` columns of the enabled filters."""
    names = (SANITY_COLUMNS if sanity else ()) + (LABEL_COLUMNS if label else ())
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


def _train_label_classifier(
    cfg: PipelineConfig, paths: PipelinePaths, classes: list[str], train: downstream.LabelledArrays
) -> tuple[Any, dict[str, Any]]:
    """Train the label-consistency classifier on the real train split; returns the model
    (in eval mode, on the configured device) and a JSON-able summary."""
    device = setup_torch(cfg, cfg.seed)
    if (train.targets < 0).any():
        raise DataError(
            f"{paths.real}: expected a class label on every real train row for the label filter, "
            "found unlabelled rows; label the data or set quality.label_consistency.enabled: false"
        )
    network = LABEL_NETWORK
    batch_size = min(LABEL_BATCH_SIZE, len(train))
    steps = cfg.quality.label_consistency.epochs * math.ceil(len(train) / batch_size)
    model = downstream.build_network("classification", network, train.images.shape[1], len(classes))
    model = downstream.train_model(
        model,
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
    val = downstream.load_labelled(paths.real, ["val"], classes)
    val = val if (val.targets >= 0).all() else None  # unlabelled val rows: no accuracy
    if val is not None and len(val):
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
        logger.warning("%s: no labelled val split; the label filter's accuracy is unknown", paths.real)
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
    return classes


def filter_synthetic(cfg: PipelineConfig, paths: PipelinePaths) -> dict[str, Any]:
    """Score, filter and write the synthetic dataset; returns the counts of ``quality.json``:
    ``{"per_class": {label: {"generated", "dropped_sanity", "dropped_label", "kept"}},
    "totals": {...}, "kept_fraction": float, "label_classifier_val_accuracy": float | None}``."""
    spec = cfg.quality
    use_sanity, use_label = spec.sanity.enabled, spec.label_consistency.enabled
    classes = _check_labels(cfg, paths)
    class_index = {name: i for i, name in enumerate(classes)}

    train = downstream.load_labelled(paths.real, ["train"], classes)
    real_shape = tuple(int(d) for d in train.images.shape[1:])
    model, classifier, device = None, None, None
    if use_label:
        model, classifier = _train_label_classifier(cfg, paths, classes, train)
        device = next(model.parameters()).device
    reference = _real_sanity_reference(cfg, train) if use_sanity else None
    del train

    schema = quality_schema(use_sanity, use_label)
    counts: dict[str, dict[str, int]] = {}
    provenance = {
        "stage": "filter",
        "synthetic": dataset_digest(paths.synthetic),
        "real": dataset_digest(paths.real),
        "quality": spec.model_dump(mode="json"),
    }
    with DatasetWriter(paths.filtered, shard_rows=cfg.synthesis.shard_rows, schema=schema, provenance=provenance) as writer:
        for table in iter_tables(paths.synthetic):
            table = table.select(list(BASE_COLUMNS))
            labels = ["" if label is None else str(label) for label in table.column("label").to_pylist()]
            images = [decode_row(blob) for blob in table.column("image").to_pylist()]
            n = table.num_rows
            keep_sanity = np.ones(n, dtype=bool)
            keep_label = np.ones(n, dtype=bool)
            columns: dict[str, np.ndarray] = {}
            if use_sanity:
                scores = np.asarray(
                    [sanity_scores(image) if image is not None else (math.nan, math.nan, 1.0) for image in images],
                    dtype=np.float64,
                ).reshape(n, 3)
                columns.update(q_std=scores[:, 0], q_saturated=scores[:, 1], q_nan=scores[:, 2])
                keep_sanity = (
                    (scores[:, 2] == 0)
                    & (scores[:, 0] >= spec.sanity.min_std)
                    & (scores[:, 1] <= spec.sanity.max_saturated_fraction)
                )
            if use_label:
                confidence = np.full(n, math.nan, dtype=np.float64)
                usable = [i for i, image in enumerate(images) if image is not None and np.isfinite(image).all()]
                for i in usable:
                    if tuple(images[i].shape) != real_shape:
                        raise DataError(
                            f"{paths.synthetic}: row {table.column('id')[i].as_py()}: expected image shape "
                            f"{real_shape} like the real data, got {tuple(images[i].shape)}; "
                            "synthesize at preprocess.size with preprocess.channels"
                        )
                if usable:
                    batch = np.stack([images[i] for i in usable]).astype(np.float32)
                    proba = downstream.predict_proba(model, batch, device=device)
                    rows = np.asarray([class_index[labels[i]] for i in usable], dtype=np.int64)
                    confidence[usable] = proba[np.arange(len(usable)), rows].astype(np.float64)
                columns["q_label_confidence"] = confidence
                keep_label = confidence >= spec.label_consistency.min_confidence  # NaN -> dropped
            keep = keep_sanity & keep_label
            for i, label in enumerate(labels):
                entry = counts.setdefault(label, {"generated": 0, "dropped_sanity": 0, "dropped_label": 0, "kept": 0})
                entry["generated"] += 1
                if not keep_sanity[i]:
                    entry["dropped_sanity"] += 1
                elif not keep_label[i]:
                    entry["dropped_label"] += 1
                else:
                    entry["kept"] += 1
            for name in schema.names[len(BASE_COLUMNS) :]:
                table = table.append_column(name, pa.array(columns[name], type=pa.float64()))
            writer.write_table(table.filter(pa.array(keep)))

    per_class = dict(sorted(counts.items()))
    keys = ("generated", "dropped_sanity", "dropped_label", "kept")
    totals = {k: sum(entry[k] for entry in per_class.values()) for k in keys}
    kept_fraction = totals["kept"] / totals["generated"] if totals["generated"] else None
    summary = {
        "per_class": per_class,
        "totals": totals,
        "kept_fraction": kept_fraction,
        "filters": {
            "sanity": spec.sanity.model_dump(mode="json"),
            "label_consistency": spec.label_consistency.model_dump(mode="json"),
        },
        "label_classifier": classifier,
        "real_train_sanity": reference,
    }
    paths.metrics.mkdir(parents=True, exist_ok=True)
    write_json_atomic(downstream.round_floats(summary), paths.metrics / "quality.json")
    logger.info(
        "filter: %d generated, %d dropped by sanity, %d by label, %d kept",
        totals["generated"],
        totals["dropped_sanity"],
        totals["dropped_label"],
        totals["kept"],
    )
    return downstream.round_floats(
        {
            "per_class": per_class,
            "totals": totals,
            "kept_fraction": kept_fraction,
            "label_classifier_val_accuracy": classifier["val_accuracy"] if classifier else None,
        }
    )
