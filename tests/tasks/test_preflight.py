"""The preflight: images per class and split against configurable minimums, checked in
seconds before any training (train stage, CLI, Prefect flow), or, opted in, a run whose
verdict will be "not tested: too little data"."""

from __future__ import annotations

import importlib
import io
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from flows.cli import main
from generators.errors import DataError
from tasks.config import PipelineConfig, load_pipeline
from tasks.paths import PipelinePaths
from tasks.preflight import ALL_IMAGES, find_problems, preflight, too_little_message
from tasks.stages import digest_path
from tests.tasks.phantoms import CLASSES, draw_phantom, write_real

TINY = {
    "seed": 0,
    "threads": 1,
    "device": "cpu",
    "source": {"kind": "folder", "path": "images"},
    "preprocess": {"size": 16},
    "generator": {"train": {"epochs": 1, "batch_size": 8, "latent_dim": 8, "base_channels": 8}},
    "synthesis": {"count_per_class": 2, "shard_rows": 4, "batch_size": 4},
    "retrain": {"steps": 2, "batch_size": 4, "seeds": [0]},
}


def cfg_of(**overrides) -> PipelineConfig:
    return PipelineConfig.model_validate({**TINY, **overrides})


def two_per_class_project(root: Path, **overrides) -> Path:
    """``root/images/<class>/<class>_<i>.png``: 2 phantoms per class (each its own subject),
    and ``root/pipelines.yaml`` with pipeline ``p``."""
    rng = np.random.default_rng(0)
    for label in CLASSES:
        folder = root / "images" / label
        folder.mkdir(parents=True)
        for i in range(2):
            image, _ = draw_phantom(label, rng, 24)
            buffer = io.BytesIO()
            Image.fromarray(image[0]).save(buffer, format="PNG")
            (folder / f"{label}_{i}.png").write_bytes(buffer.getvalue())
    config = root / "pipelines.yaml"
    config.write_text(yaml.safe_dump({"pipelines": {"p": {**TINY, **overrides}}}, sort_keys=False))
    return config


def test_enough_images_pass_with_counts_per_class_and_split(tmp_path: Path) -> None:
    paths = PipelinePaths(tmp_path, "p")
    write_real(paths.real, {"train": 4, "val": 1, "test": 2}, size=16)
    result = preflight(cfg_of(), paths)
    assert result["passed"] is True and result["problems"] == []
    assert result["counts"] == {
        "train": {c: 4 for c in CLASSES},
        "val": {c: 1 for c in CLASSES},
        "test": {c: 2 for c in CLASSES},
    }
    assert result["minimums"] == {"train": 4, "val": 1, "test": 1}


def test_a_missing_split_of_one_class_is_named_with_what_is_needed(tmp_path: Path) -> None:
    paths = PipelinePaths(tmp_path, "p")
    write_real(paths.real, {"train": 5, "val": 2}, size=16)  # no test split at all
    cfg = cfg_of(preflight={"min_train_per_class": 3, "min_val_per_class": 2, "min_test_per_class": 2})
    with pytest.raises(DataError) as caught:
        preflight(cfg, paths)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("too little data: class 'disc' has 5 train / 2 val / 0 test images")
    assert "need >= 3 / 2 / 2 train / val / test images per class" in message
    assert "preflight.allow_too_little_data: true" in message and "'not tested: too little data'" in message


def test_opt_in_goes_on_with_passed_false_and_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    paths = PipelinePaths(tmp_path, "p")
    write_real(paths.real, {"train": 2, "test": 1}, size=16)
    cfg = cfg_of(preflight={"allow_too_little_data": True})
    with caplog.at_level(logging.WARNING, logger="tasks.preflight"):
        result = preflight(cfg, paths)
    assert result["passed"] is False and result["allowed"] is True
    assert result["problems"] == [f"class '{c}' has 2 train / 0 val / 1 test images" for c in sorted(CLASSES)]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "allow_too_little_data is true" in warnings[0].getMessage()


def test_segmentation_counts_images_with_a_mask(tmp_path: Path) -> None:
    paths = PipelinePaths(tmp_path, "p")
    write_real(paths.real, {"train": 4, "val": 1, "test": 1}, size=16, masks=False)
    seg = {"task": "segmentation", "network": "unet", "steps": 2, "batch_size": 4, "seeds": [0]}
    with pytest.raises(DataError, match="has 0 train / 0 val / 0 test images with a mask"):
        preflight(cfg_of(retrain=seg), paths)
    assert preflight(cfg_of(), paths)["passed"]  # classification does not need masks

    masked = PipelinePaths(tmp_path, "q")
    write_real(masked.real, {"train": 4, "val": 1, "test": 1}, size=16, masks=True)
    assert preflight(cfg_of(retrain=seg), masked)["counts"]["train"] == {c: 4 for c in CLASSES}


def test_unlabelled_data_is_counted_per_split() -> None:
    counts = {"train": {ALL_IMAGES: 3}, "val": {ALL_IMAGES: 0}, "test": {ALL_IMAGES: 5}}
    problems = find_problems(counts, {"train": 4, "val": 1, "test": 1})
    assert problems == ["all images has 3 train / 0 val / 5 test images"]
    many = [f"class 'c{i}' has 0 train / 0 val / 0 test images" for i in range(6)]
    message = too_little_message(many, {"train": 4, "val": 1, "test": 1})
    assert "class 'c3'" in message and "class 'c4'" not in message and "and 2 more class(es)" in message


def test_two_images_per_class_stop_the_train_stage_in_seconds(tmp_path: Path, capsys) -> None:
    config = two_per_class_project(tmp_path)
    assert main(["stage", "ingest", "--pipeline", "p", "--config", str(config)]) == 0
    paths = PipelinePaths(tmp_path, "p")
    ingested = {p: digest_path(p) for p in (paths.real, paths.rejects)}
    capsys.readouterr()
    importlib.import_module("tasks.train")  # time the stage, not the one-off torch/MONAI import

    started = time.perf_counter()
    status = main(["stage", "train", "--pipeline", "p", "--config", str(config)])
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err
    assert status == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1]
    assert errors[0].startswith("error: too little data: class 'disc' has ")
    assert "need >= 4 / 1 / 1 train / val / test images per class" in errors[0]
    assert elapsed < 5, f"the train stage took {elapsed:.1f} s to refuse the data"
    assert not paths.generator.exists() and not list(paths.generator.parent.glob(".generator*"))
    assert {p: digest_path(p) for p in ingested} == ingested  # the ingest outputs are intact

    opted = two_per_class_project(tmp_path / "opted", preflight={"allow_too_little_data": True})
    assert main(["stage", "ingest", "--pipeline", "p", "--config", str(opted)]) == 0
    result = preflight(load_pipeline("p", opted), PipelinePaths(opted.parent, "p"))
    assert result["passed"] is False and result["problems"]


@pytest.mark.integration
def test_the_flow_stops_after_ingest_before_training(prefect_harness, tmp_path: Path) -> None:
    from flows.pipeline import AugmentParams, augment

    config = two_per_class_project(tmp_path)
    state = augment(AugmentParams(pipeline="p", config=str(config), dvc_commit=False), return_state=True)
    assert state.is_failed()
    with pytest.raises(DataError, match="^too little data: class 'disc' has "):
        state.result()
    paths = PipelinePaths(tmp_path, "p")
    assert (paths.real / "_manifest.json").is_file()
    assert not paths.generator.exists() and not paths.synthetic.exists()

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    states = {r.name: r.state.name for r in runs}
    assert states == {"ingest": "Completed", "preflight": "Failed"}  # the train task never started
