"""The filter stage on phantoms: sanity scores, label consistency, quality.json counts, the
classifier cache, the realism gate on a negative (noise) and a positive (held-out real)
control, and the independence of the set-metrics extractor from the kept set's choice.
Memorisation, near-duplicates, set metrics and the fid/memorisation gate:
tests/tasks/test_quality_metrics.py. The two-sample test itself: tests/tasks/test_realism.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from generators.errors import DataError
from generators.shards import BASE_COLUMNS, Row, decode_png, read_manifest, read_table, write_dataset
from tasks import downstream
from tasks.config import PipelineConfig
from tasks.filter import COUNT_KEYS, filter_synthetic
from tasks.mask_filters import MASK_COLUMNS
from tasks.paths import PipelinePaths
from tests.tasks.phantoms import CLASSES, write_real, write_synthetic


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
                "metrics": {
                    "extractor": extractor,
                    "kid_subsets": 10,
                    "ms_ssim_pairs": 20,
                    "self_supervised_steps": 40,
                },
                "masks": {"enabled": False},  # paired-set filters: tests/tasks/test_mask_filters.py
                # the judge's full training only where a test is about it: pass realism={}
                "realism": {"min_steps": 0},
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
    masks = (
        MASK_COLUMNS if json.loads((paths.metrics / "quality.json").read_text())["filters"]["masks"]["active"] else ()
    )
    q_columns = ["q_std", "q_saturated", "q_nan", *masks, "q_nn_real_distance", "q_nn_synthetic_distance"]
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
        "dropped_mask_unknown_class": 0,
        "dropped_mask_implausible": 0,
        "dropped_mask_disagree": 0,
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
    assert classifier["chance"] == pytest.approx(1 / 3) and classifier["reliable"] is True
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
    # extractor "auto": the self-supervised encoder, not the classifier that chose the kept set
    extractor = quality["set_metrics"]["extractor"]
    assert extractor["name"] == result["extractor"] == "contrastive-densenet"
    assert extractor["normalisation"] == "unit" and "training" not in extractor
    assert extractor["chose_kept_set"] is False and extractor["used_by_filters"] == []
    assert extractor["quality"]["metric"] == "linear_probe_balanced_accuracy"
    assert extractor["quality"]["reliable"] is (extractor["quality"]["value"] >= 1 / 3 + 0.15)


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
        label=False,
        memorisation={"enabled": False},
        duplicates={"enabled": False},
        metrics={"enabled": False},
        masks={"enabled": False},
        realism={"enabled": False},
    )
    result = filter_synthetic(cfg, paths)
    assert read_table(paths.filtered).column_names == [*BASE_COLUMNS, "q_std", "q_saturated", "q_nan"]
    quality = json.loads((paths.metrics / "quality.json").read_text())
    assert quality["set_metrics"] is None and result["extractor"] is None
    assert quality["filters"]["memorisation"] is None and quality["filters"]["duplicates"] is None
    assert quality["realism"] is None and result["two_sample_auc"] is None
    # the realism bound is on by default: switched off, it is recorded as not checked, not as passed
    assert quality["gate"]["passed"] is True and quality["gate"]["realism_passed"] is None
    assert [(c["bound_name"], c["passed"], c["status"]) for c in quality["gate"]["checks"]] == [
        ("max_two_sample_auc", None, "not checked: realism disabled")
    ]
    assert not paths.state.exists()  # no classifier, no features: nothing cached


def test_unknown_synthetic_label_is_an_error(tmp_path: Path) -> None:
    paths = PipelinePaths(root=tmp_path, pipeline="t")
    write_real(paths.real, classes=("disc", "ring"))
    write_synthetic(paths.synthetic)
    with pytest.raises(DataError, match=r"expected synthetic labels among the real classes.*square"):
        filter_synthetic(make_config(label=False), paths)


# --------------------------------------------------------------------------- realism gate
def _write_rows(target: Path, images: list[np.ndarray], labels: list[str], subjects: list[str], source: str) -> None:
    """A synthetic dataset of uint8 ``(1, H, W)`` images (no masks), split ``train``."""
    records = [
        Row(
            id=f"syn-{i:04d}", subject=subject, split="train", label=label, image=image, source=source, seed=0
        ).to_record()
        for i, (image, label, subject) in enumerate(zip(images, labels, subjects, strict=True))
    ]
    write_dataset(target, records, shard_rows=16)


def test_noise_generator_fails_the_realism_gate_after_writing_everything(
    paths: PipelinePaths, capsys: pytest.CaptureFixture[str]
) -> None:
    """Negative control, through the CLI (``synthmed stage filter``): a "generator" of uniform
    noise. The label filter is off so the noise reaches the kept set; the two-sample test must
    reject it with a one-line verdict after writing every output. Under DVC a rejection is a
    result, so the stage command warns and exits 0 (``synthmed run`` exits 2: see
    tests/flows/test_control_pipelines.py)."""
    from flows.cli import main

    rng = np.random.default_rng(5)
    labels = [CLASSES[i % 3] for i in range(36)]
    noise = [rng.integers(0, 256, (1, 32, 32), dtype=np.uint8) for _ in labels]
    _write_rows(paths.synthetic, noise, labels, ["synthetic"] * 36, "noise@1")
    config = paths.root / "pipelines.yaml"
    pipeline = make_config(label=False, realism={}).model_dump(mode="json")
    config.write_text(yaml.safe_dump({"pipelines": {paths.pipeline: pipeline}}))

    status = main(["stage", "filter", "--pipeline", paths.pipeline, "--config", str(config)])
    verdict = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 0
    assert verdict.startswith("warning: rejected: synthetic images fail the realism gate (two-sample AUC 1.00 [")
    assert verdict.endswith("the report's verdict will be REJECTED")
    assert "lower 95% bound" in verdict and "> max_two_sample_auc 0.9" in verdict
    assert "improve the generator" in verdict and "never loosen" in verdict
    assert "outputs kept for inspection" in verdict

    quality = json.loads((paths.metrics / "quality.json").read_text())  # written before the error
    test = quality["realism"]["two_sample"]
    assert test["auc"] >= 0.95 and test["ci95_low"] > 0.9
    assert test["n_real"] == test["n_synthetic"] == 36 and test["folds"] == 5
    assert set(test["per_class"]) == set(CLASSES) and all(e["auc"] >= 0.9 for e in test["per_class"].values())
    gate = quality["gate"]
    assert gate["passed"] is False and gate["realism_passed"] is False
    overall = next(c for c in gate["checks"] if c["bound_name"] == "max_two_sample_auc" and c["scope"] == "overall")
    assert overall == {
        "metric": "two_sample_auc_ci95_low",
        "bound_name": "max_two_sample_auc",
        "bound": 0.9,
        "scope": "overall",
        "value": test["ci95_low"],
        "auc": test["auc"],
        "ci95_high": test["ci95_high"],
        "n_real": 36,
        "n_synthetic": 36,
        "passed": False,
        "status": "checked",
    }
    assert read_manifest(paths.filtered)["rows"] == quality["totals"]["kept"] == 36  # filtered shards written


def test_held_out_real_images_pass_the_realism_gate(tmp_path: Path) -> None:
    """Positive control: held-out REAL images (the real test split) stand in as synthetic,
    with every filter at its default; the gate must accept them."""
    paths = PipelinePaths(root=tmp_path, pipeline="t")
    write_real(paths.real, {"train": 20, "val": 6, "test": 20}, masks=False)
    held_out = read_table(paths.real, splits=["test"])
    _write_rows(
        paths.synthetic,
        [decode_png(blob) for blob in held_out.column("image").to_pylist()],
        held_out.column("label").to_pylist(),
        held_out.column("subject").to_pylist(),
        "held-out-real@1",
    )
    result = filter_synthetic(make_config(epochs=20, realism={}), paths)

    quality = json.loads((paths.metrics / "quality.json").read_text())
    test = quality["realism"]["two_sample"]
    assert result["gate_passed"] is True and result["realism_passed"] is True
    assert quality["gate"]["realism_passed"] is True
    assert test["n_real"] == test["n_synthetic"] >= 45  # most of the 60 held-out images are kept
    assert test["ci95_low"] <= 0.9 and test["auc"] < 0.9 and test["ci95_low"] < 0.5 < test["ci95_high"]
    assert result["two_sample_auc"] == test["auc"]


def test_kept_set_metrics_use_an_extractor_that_did_not_pick_the_kept_set(paths: PipelinePaths) -> None:
    """Behavioural: changing the classifier that picks the kept set (25 vs 40 epochs) changes
    neither the default set-metrics extractor nor any number it gives on real images; with
    ``extractor: classifier`` the extractor IS that classifier and says so."""
    write_synthetic(paths.synthetic, masks=False)
    runs = {}
    for extractor, epochs in (("auto", 25), ("auto", 40), ("classifier", 25)):
        filter_synthetic(make_config(epochs=epochs, extractor=extractor, realism={"enabled": False}), paths)
        runs[extractor, epochs] = json.loads((paths.metrics / "quality.json").read_text())

    weak, strong, biased = runs["auto", 25], runs["auto", 40], runs["classifier", 25]
    assert weak["label_classifier"] != strong["label_classifier"]  # a different picker...
    independent = weak["set_metrics"]["extractor"]
    assert independent == strong["set_metrics"]["extractor"]  # ...the same extractor, weights and probe
    assert weak["set_metrics"]["sets"]["real_val"] == strong["set_metrics"]["sets"]["real_val"]
    assert independent["kind"] == "self_supervised" and independent["chose_kept_set"] is False
    picker = biased["set_metrics"]["extractor"]  # the 25-epoch classifier that picked weak's kept set
    assert picker["kind"] == "classifier" and picker["training"] == weak["label_classifier"]
    assert picker["chose_kept_set"] is True and picker["used_by_filters"] == ["label_consistency"]
    assert picker["weights_sha256"] != independent["weights_sha256"]
