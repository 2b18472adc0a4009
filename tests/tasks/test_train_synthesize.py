"""Stages ``train`` and ``synthesize`` on tiny phantom data."""

from __future__ import annotations

import pytest

from generators.card import load_card
from generators.errors import ConfigError
from generators.shards import read_manifest, read_table, sha256_file, verify_dataset
from tasks.config import PipelineConfig
from tasks.paths import PipelinePaths
from tasks.synthesize import plan_shards, requested_counts, synthesize
from tasks.train import train
from tests.tasks.phantoms import write_real


def _cfg(**synthesis) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "source": {"kind": "folder", "path": "x"},
            "device": "cpu",
            "generator": {"train": {"epochs": 2, "batch_size": 16, "latent_dim": 8, "base_channels": 8}},
            "synthesis": {"count_per_class": 5, "shard_rows": 4, "batch_size": 3, **synthesis},
        }
    )


@pytest.fixture()
def trained(tmp_path):
    paths = PipelinePaths(tmp_path, "t")
    write_real(paths.real, {"train": 6, "val": 2, "test": 2}, size=16)
    summary = train(_cfg(), paths)
    return paths, summary


def test_train_writes_a_verified_card(trained):
    paths, summary = trained
    card = load_card(paths.generator / "card.yaml")
    assert card.conditioning.labels == ("disc", "ring", "square")
    assert card.weights.sha256 == sha256_file(paths.generator / card.weights.file)
    assert card.image_size == (16, 16) and card.training.images == 18
    assert (paths.generator / "history.csv").read_text().count("\n") == 3  # header + 2 epochs
    assert summary["trained"] and summary["generator"] == card.ref


def test_synthesize_counts_seeds_and_determinism(trained):
    paths, _ = trained
    summary = synthesize(_cfg(counts={"ring": 2}), paths)
    assert summary["counts"] == {"disc": 5, "ring": 2, "square": 5}
    manifest = verify_dataset(paths.synthetic)
    assert manifest["class_counts"] == {"train": {"disc": 5, "ring": 2, "square": 5}}
    assert [s["rows"] for s in manifest["shards"]] == [4, 4, 4]
    table = read_table(paths.synthetic)
    assert table.column("id").to_pylist() == sorted(table.column("id").to_pylist())
    assert set(table.column("seed").to_pylist()) == {1234 * 1_000_003 + k for k in range(3)}
    assert set(table.column("source").to_pylist()) == {"synthmed/t-cgan@1.0.0"}
    first = [s["sha256"] for s in manifest["shards"]]
    synthesize(_cfg(counts={"ring": 2}), paths)
    assert [s["sha256"] for s in read_manifest(paths.synthetic)["shards"]] == first


def test_balance_and_bad_counts():
    cfg = _cfg(balance=True)
    assert requested_counts(cfg, {"a": 10, "b": 4}) == {"a": 0, "b": 6}
    with pytest.raises(ConfigError, match="unknown class"):
        requested_counts(_cfg(counts={"zebra": 1}), {"a": 1})
    plans = plan_shards({"a": 3, "b": 2}, shard_rows=2, seed=1)
    assert [p.ids for p in plans] == [
        ("syn-a-0000000", "syn-a-0000001"),
        ("syn-a-0000002", "syn-b-0000000"),
        ("syn-b-0000001",),
    ]
