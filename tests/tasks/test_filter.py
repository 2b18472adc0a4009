"""The filter stage on phantoms: sanity scores, label consistency, quality.json counts, the
classifier cache. Memorisation, near-duplicates, set metrics and the gate:
tests/tasks/test_quality_metrics.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from generators.errors import DataError
from generators.shards import BASE_COLUMNS, read_manifest, read_table
from tasks import downstream
from tasks.config import PipelineConfig
from tasks.filter import COUNT_KEYS, filter_synthetic
from tasks.paths import PipelinePaths
from tests.tasks.phantoms import write_real, write_synthetic


def make_config(
    sanity: bool = True,
    label: bool = True,
    epochs: int = 40,
    extractor: str = "auto",
    min_confidence: float = 0.5,
    **quality: object,
) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "source": {"kind": "folder", "path": "x"},
            "threads": 1,
            "generator": {"train": {}},
            "synthesis": {"shard_rows": 8},
            "quality": {
                "sanity": {"enabled": sanity, "min_std": 0.02, "max_saturated_fraction": 0.5},
                "label_consistency": {"enabled": label, "min_confidence": min_confidence, "epochs": epochs},
                "metrics": {"extractor": extractor, "kid_subsets": 10, "ms_ssim_pairs": 20},
                **quality,
            },
        }
    )


@pytest.fixture()
def paths(tmp_path: Path) -> PipelinePaths:
    paths = PipelinePaths(root=tmp_path, pipeline="t")
    write_real(paths.real)
    return paths


def test_sanity_filter_drops_exactly_the_blank_saturated_and_corrupt(paths: PipelinePaths) -> None:
    ids = write_synthetic(paths.synthetic)
    result = filter_synthetic(make_config(label=False, extractor="random"), paths)

    kept = read_table(paths.filtered)
    assert set(kept.column("id").to_pylist()) == set(ids.good) | set(ids.mislabelled)
    q_columns = ["q_std", "q_saturated", "q_nan", "q_nn_real_distance", "q_nn_synthetic_distance"]
    assert kept.column_names == [*BASE_COLUMNS, *q_columns]
    assert kept.schema.field("q_std").type == "double"
    assert min(kept.column("q_std").to_pylist()) >= 0.02
    assert max(kept.column("q_saturated").to_pylist()) <= 0.5
    assert set(kept.column("q_nan").to_pylist()) == {0.0}
    assert kept.column("id").to_pylist() == sorted(kept.column("id").to_pylist())
    assert result["totals"] == {
        "generated": len(ids.label),
        "dropped_sanity": len(ids.insane),
        "dropped_label": 0,
        "dropped_memorised": 0,
        "dropped_duplicate": 0,
        "kept": len(ids.good) + len(ids.mislabelled),
    }
    quality = json.loads((paths.metrics / "quality.json").read_text())
    assert quality["label_classifier"] is None
    assert quality["real_train_sanity"]["would_drop_fraction"] == 0.0
    assert read_manifest(paths.filtered)["rows"] == result["totals"]["kept"]


def test_sanity_scores_of_bad_rows(tmp_path: Path) -> None:
    from generators.shards import decode_png, to_unit_float
    from tasks.filter import decode_row, sanity_scores

    blank = sanity_scores(np.full((1, 8, 8), 0.4, np.float32))
    assert blank == (pytest.approx(0.0), 0.0, 0.0)
    stripes = np.zeros((1, 8, 8), np.float32)
    stripes[..., ::2] = 1.0
    std, saturated, nan = sanity_scores(stripes)
    assert (std, saturated, nan) == (pytest.approx(0.5), 0.5, 0.0)  # black pixels are not saturated
    mri_like = np.zeros((1, 8, 8), np.float32)
    mri_like[:, 2:6, 2:6] = 0.6  # black background, grey tissue
    assert sanity_scores(mri_like)[1] == 0.0
    assert sanity_scores(np.full((1, 4, 4), np.nan, np.float32))[2] == 1.0
    assert decode_row(b"not a png") is None and decode_row(None) is None
    assert decode_png  # noqa: B018  (imported for the round trip below)
    assert to_unit_float(np.array([[[255]]], np.uint8))[0, 0, 0] == 1.0


def test_label_filter_drops_mislabelled_and_counts_add_up(paths: PipelinePaths) -> None:
    ids = write_synthetic(paths.synthetic)
    result = filter_synthetic(make_config(), paths)
    quality = json.loads((paths.metrics / "quality.json").read_text())

    kept = read_table(paths.filtered)
    kept_ids = set(kept.column("id").to_pylist())
    assert kept_ids.isdisjoint(ids.mislabelled)
    assert kept_ids.isdisjoint(ids.insane)
    assert len(kept_ids & set(ids.good)) >= 0.8 * len(ids.good)
    assert "q_label_confidence" in kept.column_names
    assert min(kept.column("q_label_confidence").to_pylist()) >= 0.5

    classifier = quality["label_classifier"]
    assert classifier["val_accuracy"] >= 0.9
    assert classifier["n_val"] == 18 and classifier["n_train"] == 60
    totals = quality["totals"]
    assert totals["generated"] == sum(totals[k] for k in COUNT_KEYS if k != "generated")
    assert totals["dropped_sanity"] == len(ids.insane)
    assert totals["dropped_label"] >= len(ids.mislabelled)
    for label, entry in quality["per_class"].items():
        assert entry["generated"] == sum(1 for i in ids.label.values() if i == label)
        assert entry["generated"] == sum(entry[k] for k in COUNT_KEYS if k != "generated")
    assert sum(e["kept"] for e in quality["per_class"].values()) == len(kept_ids)
    assert result["per_class"] == quality["per_class"] and result["totals"] == totals
    assert result["label_classifier_val_accuracy"] == classifier["val_accuracy"]
    # extractor "auto" with labelled classes: the same classifier's penultimate layer
    extractor = quality["set_metrics"]["extractor"]
    assert extractor["name"] == result["extractor"] == "classifier-densenet"
    assert extractor["normalisation"] == "unit" and extractor["training"] == classifier


def test_filter_is_deterministic_and_trains_the_classifier_once(
    paths: PipelinePaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_synthetic(paths.synthetic)
    cfg = make_config(epochs=5, min_confidence=0.0)
    trainings: list[int] = []
    original = downstream.train_model

    def counting(*args, **kwargs):
        trainings.append(kwargs["steps"])
        return original(*args, **kwargs)

    monkeypatch.setattr(downstream, "train_model", counting)
    filter_synthetic(cfg, paths)
    first = (paths.metrics / "quality.json").read_bytes(), read_manifest(paths.filtered)["shards"]
    assert trainings == [10]  # 5 epochs x 2 batches of 32 over 60 real train images
    filter_synthetic(cfg, paths)
    assert ((paths.metrics / "quality.json").read_bytes(), read_manifest(paths.filtered)["shards"]) == first
    assert trainings == [10]  # the second run loaded the cached classifier
    assert len(list((paths.state / "features").glob("*.npz"))) == 2  # real train and val features


def test_disabled_filters_and_metrics_leave_no_trace(paths: PipelinePaths) -> None:
    write_synthetic(paths.synthetic)
    cfg = make_config(
        label=False, memorisation={"enabled": False}, duplicates={"enabled": False}, metrics={"enabled": False}
    )
    result = filter_synthetic(cfg, paths)
    assert read_table(paths.filtered).column_names == [*BASE_COLUMNS, "q_std", "q_saturated", "q_nan"]
    quality = json.loads((paths.metrics / "quality.json").read_text())
    assert quality["set_metrics"] is None and result["extractor"] is None
    assert quality["filters"]["memorisation"] is None and quality["filters"]["duplicates"] is None
    assert quality["gate"] == {"passed": True, "checks": []}
    assert not paths.state.exists()  # no classifier, no features: nothing cached


def test_unknown_synthetic_label_is_an_error(tmp_path: Path) -> None:
    paths = PipelinePaths(root=tmp_path, pipeline="t")
    write_real(paths.real, classes=("disc", "ring"))
    write_synthetic(paths.synthetic)
    with pytest.raises(DataError, match=r"expected synthetic labels among the real classes.*square"):
        filter_synthetic(make_config(label=False), paths)
