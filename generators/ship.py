"""Turn a generator a pipeline trained into a shipped zoo entry with measured metrics.

``ship_generator(root, pipeline, card_id, out)`` reads what one pipeline run wrote:

- ``models/<pipeline>/generator/``: ``card.yaml``, the weights, ``history.csv``;
- ``metrics/<pipeline>/quality.json``: FID/KID/precision/recall of the kept and of all
  generated synthetic images against the real train split (features named there);
- ``metrics/<pipeline>/retrain.json``: the downstream delta (real + synthetic minus real
  only, primary metric, mean over seeds with its 95% interval), optional;
- ``metrics/<pipeline>/train.json``: the training device, optional, and
  ``.synthmed/<pipeline>/train_timing.json``: its wall time, optional;

and writes ``out/card.yaml`` (new id, version 1.0.0, the measurements as card metrics,
the training time) next to a copy of the weights and the loss history. The weights are
re-hashed; the card records their sha256. Shipped cards are static artefacts, so unlike
the pipeline's own card they may carry a wall time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from generators.card import Metric, ModelCard, card_error, load_card, save_card
from generators.errors import DataError
from generators.shards import sha256_file
from tasks.paths import PipelinePaths
from tasks.train import read_train_timing

#: (card metric name, quality.json set, key, higher is better, what it is)
SET_METRICS = (
    ("fid_kept", "kept", "fid", False, "kept synthetic vs real train"),
    ("kid_kept", "kept", "kid_mean", False, "kept synthetic vs real train"),
    ("precision_kept", "kept", "precision", True, "kept synthetic vs real train (k-NN manifold)"),
    ("recall_kept", "kept", "recall", True, "kept synthetic vs real train (k-NN manifold)"),
    ("fid_generated", "generated", "fid", False, "all generated (before filtering) vs real train"),
    ("kid_generated", "generated", "kid_mean", False, "all generated (before filtering) vs real train"),
    ("fid_real_val", "real_val", "fid", False, "reference: held-out real val vs real train"),
)


def _read_optional(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def measured_metrics(paths: PipelinePaths) -> dict[str, Metric]:
    """Card metrics from a pipeline run's ``quality.json`` (required) and ``retrain.json``."""
    from tasks.report import read_metrics

    quality = read_metrics(paths.metrics / "quality.json", "filter")
    metrics: dict[str, Metric] = {}
    sets = (quality.get("set_metrics") or {}).get("sets") or {}
    extractor = (quality.get("set_metrics") or {}).get("extractor") or {}
    extractor_name = extractor.get("name")
    if extractor_name and extractor.get("weights_sha256"):
        extractor_name = f"{extractor_name} (weights sha256 {extractor['weights_sha256'][:12]})"
    for name, which, key, higher, what in SET_METRICS:
        overall = ((sets.get(which) or {}).get("overall")) or {}
        value = overall.get(key)
        if value is not None:
            metrics[name] = Metric(
                value=float(value),
                higher_is_better=higher,
                extractor=extractor_name,
                note=f"{what}; n={overall.get('n_synthetic')} vs {overall.get('n_real')}, pipeline '{paths.pipeline}'",
            )
    metrics.update(realism_metrics(quality, paths.pipeline))
    kept = quality.get("kept_fraction")
    if kept is not None:
        metrics["kept_fraction"] = Metric(value=float(kept), higher_is_better=True, note="share kept by the filters")
    retrain = _read_optional(paths.metrics / "retrain.json")
    if retrain:
        primary = retrain["primary_metric"]
        delta = retrain["delta"][primary]
        metrics[f"downstream_delta_{primary}"] = Metric(
            value=float(delta["mean"]),
            higher_is_better=primary not in retrain.get("lower_is_better", []),
            note=(
                f"{retrain['task']} ({retrain['network']}), real + synthetic minus real only, "
                f"{len(retrain['seeds'])} seeds, 95% CI [{delta['ci95_low']:+.3f}, {delta['ci95_high']:+.3f}], "
                f"verdict: {retrain['verdict']}"
            ),
        )
    return metrics


def realism_metrics(quality: dict[str, Any], pipeline: str) -> dict[str, Metric]:
    """``two_sample_auc`` (kept synthetic vs real train, :mod:`tasks.realism`; 0.5 = the
    classifier cannot tell them apart, lower is better) overall and per class
    (``two_sample_auc_<class>``), with the 95% interval in the note; empty when the run
    had no realism test or it could not be computed."""
    test = ((quality.get("realism") or {}).get("two_sample")) or {}
    rows = [("two_sample_auc", test)] + [
        (f"two_sample_auc_{label}", block) for label, block in sorted((test.get("per_class") or {}).items()) if label
    ]
    metrics: dict[str, Metric] = {}
    for name, block in rows:
        if block.get("auc") is None:
            continue
        metrics[name] = Metric(
            value=round(float(block["auc"]), 4),
            higher_is_better=False,
            note=(
                f"classifier two-sample test, kept synthetic vs real train, 95% CI "
                f"[{block['ci95_low']:.3f}, {block['ci95_high']:.3f}]; n={block.get('n_synthetic')} vs "
                f"{block.get('n_real')}, pipeline '{pipeline}'"
            ),
        )
    return metrics


UNKNOWN = ("unknown", "unspecified", "see source", "")


def ship_generator(
    root: Path, pipeline: str, card_id: str, out: Path, *, version: str = "1.0.0", config: Path | None = None
) -> ModelCard:
    """Copy ``models/<pipeline>/generator`` to ``out`` as card ``card_id@version`` with the
    run's measured metrics; returns the new card. Modality, anatomy and licence the card
    lacks are taken from the pipeline's ``source`` in ``config`` (default
    ``root/pipelines.yaml``) when it names them."""
    from tasks.config import load_pipeline

    paths = PipelinePaths(Path(root), pipeline)
    config = Path(config) if config is not None else Path(root) / "pipelines.yaml"
    source = load_pipeline(pipeline, config).source if config.is_file() else None
    described = {
        field: getattr(source, field)
        for field in ("modality", "anatomy", "licence")
        if source is not None and getattr(source, field, "unspecified") not in UNKNOWN
    }
    card_path = paths.generator / "card.yaml"
    if not card_path.is_file():
        raise DataError(
            f"{card_path}: expected a trained generator card; run `synthmed stage train --pipeline {pipeline}`"
        )
    card = load_card(card_path)
    if not card.weights.file:
        raise DataError(f"{card_path}: the card names no weights file; only trained generators can be shipped")
    try:  # model_copy below does not validate: check the new id and version before writing anything
        ModelCard.model_validate({**card.model_dump(mode="json"), "id": card_id, "version": version})
    except ValidationError as exc:
        raise card_error(exc, f"ship --id {card_id[:60]!r}") from None
    fill = {k: v for k, v in described.items() if getattr(card, k) in UNKNOWN}
    train = _read_optional(paths.metrics / "train.json") or {}
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(paths.generator / card.weights.file, out / card.weights.file)
    if (paths.generator / "history.csv").is_file():
        shutil.copyfile(paths.generator / "history.csv", out / "history.csv")
    shipped = card.model_copy(
        update={
            "id": card_id,
            "version": version,
            "name": f"{card_id.split('/')[-1]} ({card.architecture})",
            "changelog": {version: f"trained by synthmed pipeline '{pipeline}' and shipped with measured metrics"},
            "metrics": measured_metrics(paths),
            **fill,
            "tags": tuple(
                dict.fromkeys((*card.tags, *(fill.get(k, getattr(card, k)).lower() for k in ("modality", "anatomy"))))
            ),
            "training": card.training.model_copy(
                update={
                    "time_s": read_train_timing(paths),
                    "device": train.get("device"),
                    **({"dataset_licence": fill["licence"]} if "licence" in fill else {}),
                }
            ),
            "weights": card.weights.model_copy(update={"sha256": sha256_file(out / card.weights.file)}),
        }
    )
    save_card(ModelCard.model_validate(shipped.model_dump()), out / "card.yaml")
    return shipped
