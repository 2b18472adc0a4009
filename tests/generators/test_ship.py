"""Shipping a pipeline-trained generator as a zoo entry: the card carries the run's
measured metrics, the weights' sha256, and it passes conformance and generates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.cli import main
from generators.card import load_card
from generators.errors import DataError
from generators.registry import find, list_entries, load_generator, search
from generators.shards import sha256_file
from generators.ship import ship_generator
from tasks.config import load_pipeline
from tasks.paths import PipelinePaths
from tasks.stages import ORDER, run_stage
from tests.flows.project import make_project


def test_ship_records_measured_metrics_and_the_card_generates(tmp_path: Path, capsys) -> None:
    config = make_project(tmp_path / "proj")
    root = config.parent
    cfg, paths = load_pipeline("tiny", config), PipelinePaths(root, "tiny")
    for verb in ORDER[:-1]:  # everything up to retrain; the report is not needed
        run_stage(verb, cfg, paths)
    out = tmp_path / "zoo" / "tiny_cgan"

    assert (
        main(
            [
                "generators",
                "ship",
                "--pipeline",
                "tiny",
                "--config",
                str(config),
                "--id",
                "test/tiny-cgan",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "conformance ok" in capsys.readouterr().out

    card = load_card(out / "card.yaml")
    quality = json.loads((paths.metrics / "quality.json").read_text())
    retrain = json.loads((paths.metrics / "retrain.json").read_text())
    kept = quality["set_metrics"]["sets"]["kept"]["overall"]
    assert card.ref == "test/tiny-cgan@1.0.0"
    assert card.metrics["fid_kept"].value == pytest.approx(kept["fid"])
    assert card.metrics["fid_kept"].extractor.startswith(quality["set_metrics"]["extractor"]["name"])
    assert card.metrics["fid_kept"].higher_is_better is False
    primary = retrain["primary_metric"]
    assert card.metrics[f"downstream_delta_{primary}"].value == pytest.approx(retrain["delta"][primary]["mean"])
    assert retrain["verdict"] in card.metrics[f"downstream_delta_{primary}"].note
    assert card.training.time_s == json.loads((paths.state / "train_timing.json").read_text())["time_s"] > 0
    assert "time_s" not in json.loads((paths.metrics / "train.json").read_text())  # DVC hashes repeat
    assert card.weights.sha256 == sha256_file(out / card.weights.file)

    entries = list_entries([out.parent])
    assert [e.card.ref for e in search("tiny", rank_by="fid_kept", entries=entries)] == ["test/tiny-cgan@1.0.0"]
    batch = load_generator(find("test/tiny-cgan", entries)).generate(4, seed=0, condition=cfg_labels(card))
    assert tuple(batch.images.shape) == (4, 1, 16, 16)


def cfg_labels(card) -> list[str]:
    return [card.conditioning.labels[i % len(card.conditioning.labels)] for i in range(4)]


def test_ship_without_a_run_says_what_to_do(tmp_path: Path) -> None:
    config = make_project(tmp_path / "proj")
    with pytest.raises(DataError, match="synthmed stage train --pipeline tiny"):
        ship_generator(config.parent, "tiny", "test/x", tmp_path / "out")
