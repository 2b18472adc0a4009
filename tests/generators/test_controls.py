"""The control generators (generators/architectures/controls.py): the ``noise`` and ``blobs``
negative controls and the ``real-holdout`` positive control train, load and generate under
the generator contract (shape, dtype, range, labels, masks, determinism, conformance), and
``real-holdout`` run through the train stage serves only REAL VAL images: never a train image
(the realism checks' reference) nor a test image (the verdict's)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from scipy import ndimage

from generators.architectures import LOADERS
from generators.architectures.controls import HOLDOUT_SPLIT, draw_without_replacement
from generators.card import Conditioning, ModelCard, Weights, load_card, save_card
from generators.conformance import check_conformance
from generators.errors import GeneratorError
from generators.registry import load_generator
from generators.shards import Row, decode_png, decode_table, read_table, write_dataset
from generators.train_spec import TrainSpec
from generators.training import TrainedGenerator, TrainingData, train_generator
from generators.weights import save_weights
from tasks import realism
from tasks.config import PipelineConfig
from tasks.paths import PipelinePaths
from tasks.synthesize import synthesize
from tasks.train import train
from tests.tasks.phantoms import CLASSES, draw_phantom, write_real

SIZE = 16
LABELS = ("dark", "bright")


def tiny_data() -> TrainingData:
    """8 images per label: ``dark`` around 0.2, ``bright`` around 0.7; masks in {0, 1, 2}."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 8)
    images = (np.where(labels == 0, 0.2, 0.7)[:, None, None, None] + rng.normal(0, 0.05, (16, 1, SIZE, SIZE))).clip(
        0, 1
    )
    masks = np.zeros((16, SIZE, SIZE), np.int64)
    masks[:, 4:12, 4:12] = 1
    masks[:, 6:10, 6:10] = 2
    return TrainingData(images.astype(np.float32), labels, LABELS, masks, 3)


def save(result: TrainedGenerator, folder: Path) -> Path:
    """Weights and card as the train stage writes them; returns the card's path."""
    folder.mkdir(parents=True, exist_ok=True)
    sha = save_weights(result.state, folder / "weights.safetensors")
    card = ModelCard(
        id=f"test/{result.architecture}",
        version="1",
        architecture=result.architecture,
        network=result.network,
        modality="MRI",
        anatomy="phantom",
        image_size=(SIZE, SIZE),
        channels=1,
        licence="MIT",
        conditioning=Conditioning(
            labels=result.labels,
            masks=result.mask_classes > 0,
            mask_classes=("background", "a", "b")[: result.mask_classes],
        ),
        weights=Weights(file="weights.safetensors", sha256=sha),
    )
    save_card(card, folder / "card.yaml")
    return folder / "card.yaml"


@pytest.mark.parametrize("architecture", ["noise", "blobs"])
def test_negative_controls_generate_seeded_class_matched_noise(architecture: str, tmp_path: Path) -> None:
    data = tiny_data()
    result = train_generator(TrainSpec(architecture=architecture, with_masks=True), data)
    assert result.history == [] and result.mask_classes == 3 and result.labels == LABELS
    card_path = save(result, tmp_path)
    model = LOADERS[architecture](load_card(card_path), tmp_path / "weights.safetensors", "cpu")

    condition = ["dark"] * 6 + ["bright"] * 6
    batch = model.generate(12, seed=4, condition=condition)
    assert batch.images.shape == (12, 1, SIZE, SIZE) and batch.images.dtype == np.float32
    assert np.isfinite(batch.images).all() and batch.images.min() >= 0.0 and batch.images.max() <= 1.0
    assert batch.labels == condition
    # each class's noise is centred on that class's real pixel mean
    assert abs(batch.images[:6].mean() - data.images[:8].mean()) < 0.05
    assert abs(batch.images[6:].mean() - data.images[8:].mean()) < 0.05
    # salt-noise masks: every class everywhere, far more fragments than the one-square real masks
    assert batch.masks.shape == (12, SIZE, SIZE) and batch.masks.dtype == np.int64
    assert set(np.unique(batch.masks)) == {0, 1, 2}
    assert ndimage.label(batch.masks[0] == 1)[1] > 10

    again = model.generate(12, seed=4, condition=condition)
    np.testing.assert_array_equal(again.images, batch.images)
    np.testing.assert_array_equal(again.masks, batch.masks)
    assert not np.array_equal(model.generate(12, seed=5, condition=condition).images, batch.images)

    # blobs are smooth (neighbouring pixels agree), noise is not
    image = batch.images[0, 0] - batch.images[0, 0].mean()
    correlation = float((image[:, 1:] * image[:, :-1]).mean() / (image**2).mean())
    assert correlation > 0.8 if architecture == "blobs" else abs(correlation) < 0.3


@pytest.mark.parametrize("architecture", ["noise", "blobs", "real-holdout"])
def test_controls_pass_the_conformance_check(architecture: str, tmp_path: Path) -> None:
    result = train_generator(TrainSpec(architecture=architecture, with_masks=True), tiny_data())
    report = check_conformance(save(result, tmp_path))
    assert report.passed, report.summary()


def test_real_holdout_draws_each_class_without_replacement_while_possible(tmp_path: Path) -> None:
    data = tiny_data()
    card_path = save(train_generator(TrainSpec(architecture="real-holdout"), data), tmp_path)
    model = LOADERS["real-holdout"](load_card(card_path), tmp_path / "weights.safetensors", "cpu")
    assert model.masks is None
    batch = model.generate(10, seed=1, condition="bright")
    rows = [int(np.flatnonzero((data.images == image).all(axis=(1, 2, 3)))[0]) for image in batch.images]
    assert sorted(rows[:8]) == list(range(8, 16))  # all 8 bright images before any repeat
    assert set(rows[8:]) <= set(range(8, 16))
    np.testing.assert_array_equal(model.generate(10, seed=1, condition="bright").images, batch.images)
    assert not np.array_equal(model.generate(10, seed=2, condition="bright").images, batch.images)
    pool = np.arange(5)
    assert sorted(draw_without_replacement(pool, 5, np.random.default_rng(0))) == [0, 1, 2, 3, 4]
    assert len(draw_without_replacement(pool, 0, np.random.default_rng(0))) == 0


def test_real_holdout_through_the_train_stage_serves_only_real_val_images(tmp_path: Path) -> None:
    paths = PipelinePaths(root=tmp_path, pipeline="control-real")
    write_real(paths.real, {"train": 6, "val": 3, "test": 3}, size=32)
    cfg = PipelineConfig.model_validate(
        {
            "source": {"kind": "folder", "path": "x"},
            "threads": 1,
            "generator": {"train": {"architecture": "real-holdout", "with_masks": True}},
            "retrain": {"select_on_val": False},
        }
    )
    summary = train(cfg, paths)
    assert summary["generator"] == "synthmed/control-real-real-holdout@1.0.0" and summary["images"] == 9
    generator = load_generator(paths.generator / "card.yaml")
    assert "POSITIVE CONTROL" in generator.card.description and generator.card.conditioning.masks

    splits = {split: decode_table(read_table(paths.real, splits=[split])) for split in ("train", "val", "test")}
    condition = [label for label in ("disc", "ring", "square") for _ in range(5)]  # 5 > 3 val images per class
    batch = generator.generate(len(condition), seed=0, condition=condition)
    assert batch.images.shape == (15, 1, 32, 32) and batch.images.dtype == np.float32
    assert batch.labels == condition and batch.masks.shape == (15, 32, 32)

    def rows_of(split: str, image: np.ndarray) -> np.ndarray:
        return np.flatnonzero((splits[split].images == image).all(axis=(1, 2, 3)))

    served = []
    for i, image in enumerate(batch.images):
        assert len(rows_of("train", image)) == 0 and len(rows_of("test", image)) == 0
        (row,) = rows_of(HOLDOUT_SPLIT, image)
        assert splits["val"].labels[row] == condition[i]
        np.testing.assert_array_equal(batch.masks[i], splits["val"].masks[row])
        served.append(int(row))
    for start in range(0, 15, 5):  # per class: all 3 val images before a repeat
        assert len(set(served[start : start + 3])) == 3


def test_real_holdout_refuses_val_based_model_selection_and_unknown_classes(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="select_on_val: false"):
        PipelineConfig.model_validate(
            {"source": {"kind": "mni152"}, "generator": {"train": {"architecture": "real-holdout"}}}
        )
    data = tiny_data()
    only_dark = TrainingData(data.images[:8], data.labels[:8], LABELS)  # "bright" has no held-out image
    card_path = save(train_generator(TrainSpec(architecture="real-holdout"), only_dark), tmp_path)
    model = LOADERS["real-holdout"](load_card(card_path), tmp_path / "weights.safetensors", "cpu")
    with pytest.raises(GeneratorError, match="has no image of class 'bright'"):
        model.generate(2, seed=0, condition="bright")


def _write_slabs(target: Path, slabs: dict[str, int], per_slab: int = 3, size: int = 16) -> None:
    """A real dataset whose rows come in slabs (``per_slab`` correlated slices share one
    ``subject``, as ingest writes ``<subject>-slabNNN``): ``slabs[split]`` slabs per class."""
    rng = np.random.default_rng(0)
    rows = []
    for split, n in slabs.items():
        for label in CLASSES:
            for i in range(n * per_slab):
                image, _ = draw_phantom(label, rng, size)
                rows.append(
                    Row(
                        id=f"{split}-{label}-{i:03d}",
                        subject=f"vol-{split}-{label}-slab{i // per_slab:03d}",
                        split=split,
                        label=label,
                        image=image,
                        source=f"file://phantoms/{label}/{i}.png",
                    ).to_record()
                )
    write_dataset(target, sorted(rows, key=lambda r: r["id"]), shard_rows=16)


def test_real_holdout_rows_carry_their_slab_into_the_synthetic_set_and_the_two_sample_test(tmp_path: Path) -> None:
    """Held-out real slices come in slabs; served as "synthetic" data they must keep that
    grouping (``subject`` column), and the two-sample test must keep each slab in one fold,
    while an ordinary generator's rows (``subject`` "synthetic") stay independent rows."""
    paths = PipelinePaths(root=tmp_path, pipeline="control-real")
    _write_slabs(paths.real, {"train": 2, "val": 2, "test": 1})
    cfg = PipelineConfig.model_validate(
        {
            "source": {"kind": "folder", "path": "x"},
            "threads": 1,
            "generator": {"train": {"architecture": "real-holdout"}},
            "synthesis": {"count_per_class": 6, "shard_rows": 64, "batch_size": 64},
            "retrain": {"select_on_val": False},
        }
    )
    train(cfg, paths)
    synthesize(cfg, paths)

    synthetic = read_table(paths.synthetic)
    val = read_table(paths.real, splits=[HOLDOUT_SPLIT])
    val_slab = {
        decode_png(b).tobytes(): s for b, s in zip(val["image"].to_pylist(), val["subject"].to_pylist(), strict=True)
    }
    served = [val_slab[decode_png(b).tobytes()] for b in synthetic["image"].to_pylist()]  # a val image each
    groups = synthetic["subject"].to_pylist()
    assert sorted(served) == sorted(val["subject"].to_pylist())  # every val slice served once
    assert all(re.fullmatch(r"holdout-group-\d{4}", g) for g in groups)  # no pseudonym copied
    assert (
        len(set(zip(served, groups, strict=True))) == len(set(served)) == len(set(groups)) == 6
    )  # slab <-> group, 1:1

    real = read_table(paths.real, splits=["train"])
    real_images = np.stack([decode_png(b) for b in real["image"].to_pylist()]).astype(np.float32) / 255
    synthetic_images = np.stack([decode_png(b) for b in synthetic["image"].to_pylist()]).astype(np.float32) / 255
    settings = realism.TwoSampleSettings(folds=3, epochs=1, min_steps=0, batch_size=8, bootstrap=20)
    args = (real_images, real["label"].to_pylist(), real["subject"].to_pylist(), synthetic_images)
    test = realism.two_sample_test(*args, synthetic["label"].to_pylist(), settings, seed=0, synthetic_subjects=groups)
    assert (test["grouping"], test["synthetic_grouping"], test["n_synthetic"]) == ("subject", "subject", 18)
    fresh = ["synthetic"] * 18  # what an ordinary generator writes: independent rows
    assert realism._side_groups("synthetic", fresh, np.arange(18))[1] == "row"

    rows = np.arange(18)
    synthetic_groups, how = realism._side_groups("synthetic", groups, rows)
    real_groups, _ = realism._side_groups("real", real["subject"].to_pylist(), rows)
    assert how == "subject" and len(set(synthetic_groups)) == 6
    fold, folds = realism._fold_ids(np.r_[np.zeros(18, bool), np.ones(18, bool)], real_groups + synthetic_groups, 3, 0)
    assert folds == 3
    for slab in set(groups):  # every served slab sits in one fold
        assert len({int(fold[18 + i]) for i in rows if groups[i] == slab}) == 1
