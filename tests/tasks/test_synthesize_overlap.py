"""The synthesize stage's own loop overlaps encoding and writing (one I/O thread) with
generation: same bytes as making each shard in turn, errors on the I/O thread surface in
the stage with nothing written, and the queue between them is bounded and ordered."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from generators.architectures.cgan import CganConfig, ConditionalGenerator, network_kwargs
from generators.card import Conditioning, ModelCard, Weights, save_card
from generators.errors import DataError
from generators.shards import decode_image, read_manifest, read_table, verify_dataset
from generators.weights import save_weights
from tasks.config import PipelineConfig
from tasks.paths import PipelinePaths
from tasks.synthesize import OrderedWorker, synthesize
from tests.tasks.phantoms import CLASSES, write_real


def _cfg(**synthesis) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "source": {"kind": "folder", "path": "x"},
            "device": "cpu",
            "generator": {"id": "test/overlap-cgan"},
            "threads": 1,
            "synthesis": {"count_per_class": 7, "shard_rows": 4, "batch_size": 3, **synthesis},
        }
    )


@pytest.fixture()
def project(tmp_path: Path) -> PipelinePaths:
    """A real dataset and an (untrained, seeded) 16x16 cGAN card with its weights."""
    paths = PipelinePaths(tmp_path, "o")
    write_real(paths.real, {"train": 2, "val": 1, "test": 1}, size=16)
    config = CganConfig(image_size=16, channels=1, n_labels=len(CLASSES), latent_dim=8, base_channels=8)
    torch.manual_seed(0)
    paths.generator.mkdir(parents=True)
    sha = save_weights(ConditionalGenerator(config).state_dict(), paths.generator / "weights.safetensors")
    card = ModelCard(
        id="test/overlap-cgan",
        version="1.0.0",
        architecture="cgan",
        network=network_kwargs(config),
        modality="phantom",
        anatomy="none",
        image_size=(16, 16),
        channels=1,
        conditioning=Conditioning(labels=CLASSES),
        licence="CC0-1.0",
        weights=Weights(file="weights.safetensors", sha256=sha, format="safetensors"),
    )
    save_card(card, paths.generator / "card.yaml")
    return paths


def test_overlapped_loop_writes_the_same_bytes_as_one_shard_after_another(project: PipelinePaths) -> None:
    synthesize(_cfg(), project)
    overlapped = read_manifest(project.synthetic)
    assert [s["rows"] for s in overlapped["shards"]] == [4, 4, 4, 4, 4, 1]

    def one_after_another(make, plans):
        return (make(plan) for plan in plans)

    synthesize(_cfg(), project, map_shards=one_after_another)
    sequential = verify_dataset(project.synthetic)
    assert [s["sha256"] for s in sequential["shards"]] == [s["sha256"] for s in overlapped["shards"]]
    assert read_table(project.synthetic).column("id").to_pylist() == sorted(
        f"syn-{label}-{i:07d}" for label in CLASSES for i in range(7)
    )


def test_an_error_on_the_io_thread_fails_the_stage_and_writes_nothing(project: PipelinePaths, monkeypatch) -> None:
    import tasks.synthesize as stage

    real_load = stage.load_generator
    calls = {"n": 0}

    def load_broken(*args, **kwargs):
        generator = real_load(*args, **kwargs)
        generate = generator.generate

        def generate_then_break(n, seed, condition=None):
            batch = generate(n, seed, condition)
            calls["n"] += 1
            if calls["n"] == 3:  # the third batch has two channels: encoding refuses it
                return replace(batch, images=np.concatenate([batch.images, batch.images], axis=1))
            return batch

        generator.generate = generate_then_break
        return generator

    monkeypatch.setattr(stage, "load_generator", load_broken)
    with pytest.raises(DataError, match=r"C in \(1, 3\)"):
        synthesize(_cfg(), project)
    assert not project.synthetic.exists()


def test_ordered_worker_keeps_order_bounds_the_queue_and_reraises() -> None:
    done: list[int] = []
    gate = threading.Event()
    with OrderedWorker(depth=2) as worker:
        worker.submit(gate.wait)
        worker.submit(done.append, 0)
        blocked = threading.Thread(target=worker.submit, args=(done.append, 1))
        blocked.start()
        time.sleep(0.2)
        assert blocked.is_alive()  # two jobs pending: the third submit waits
        gate.set()
        blocked.join(5)
        for i in range(2, 20):
            worker.submit(done.append, i)
    assert done == list(range(20))

    def fail() -> None:
        raise DataError("boom")

    ran: list[int] = []
    with pytest.raises(DataError, match="boom"):
        with OrderedWorker(depth=1) as worker:
            worker.submit(fail)
            worker.submit(ran.append, 1)  # waits for fail() and raises its error here
    assert ran == []


def test_compiled_stage_matches_the_eager_stage_within_one_grey_level(project: PipelinePaths) -> None:
    eager = synthesize(_cfg(compile=False), project)
    eager_table = read_table(project.synthetic)
    compiled = synthesize(_cfg(compile=True), project)
    compiled_table = read_table(project.synthetic)
    assert (eager["compiled"], compiled["compiled"]) == (False, True)
    assert compiled_table.column("id").to_pylist() == eager_table.column("id").to_pylist()
    assert compiled_table.column("label").to_pylist() == eager_table.column("label").to_pylist()
    a = np.stack([decode_image(b) for b in eager_table.column("image").to_pylist()]).astype(int)
    b = np.stack([decode_image(b) for b in compiled_table.column("image").to_pylist()]).astype(int)
    assert np.abs(a - b).max() <= 1
    assert synthesize(_cfg(), project)["compiled"] is False  # auto: 21 images is far below the threshold
