"""Volume generators (``vae3d``, ``ldm3d``) through the ``train`` and ``synthesize`` stages on
tiny 16^3 phantoms: balls (a bright core in a darker shell) and hollow shells, three tissue
classes (0 background, 1 shell, 2 core)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from generators.architectures.mask_pool import deform_masks
from generators.card import load_card
from generators.contract import generate_batch
from generators.errors import DataError, GeneratorError
from generators.registry import load_generator
from generators.seed_stream import generate_range
from generators.seed_stream import offset as seed_offset
from generators.shards import Row, cell_shape, decode_image, decode_table, read_table, write_dataset
from generators.train_spec import TrainSpec
from generators.training import TrainingData, train_generator
from tasks.config import PipelineConfig
from tasks.paths import PipelinePaths
from tasks.synthesize import synthesize
from tasks.train import train

SIDE = 16
LABELS = ("ball", "shell")
TISSUE = (0.1, 0.45, 0.85)  # background, shell, core intensities


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def phantom(label: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """image uint8 (1, S, S, S), mask uint8 (S, S, S) in {0, 1, 2}."""
    zz, yy, xx = np.mgrid[:SIDE, :SIDE, :SIDE].astype(np.float64)
    centre = SIDE / 2 + rng.uniform(-1.5, 1.5, 3)
    radius = SIDE * rng.uniform(0.3, 0.4)
    d = np.sqrt((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2)
    mask = np.zeros((SIDE,) * 3, np.uint8)
    mask[d < radius] = 1
    if label == "ball":
        mask[d < 0.6 * radius] = 2
    else:
        mask[d < 0.6 * radius] = 0
    image = np.choose(mask, TISSUE) + rng.normal(0, 0.03, mask.shape)
    return np.rint(np.clip(image, 0.02, 0.98) * 255).astype(np.uint8)[None], mask


def write_volumes(paths: PipelinePaths, per_split: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for split, n in per_split.items():
        for label in LABELS:
            for i in range(n):
                image, mask = phantom(label, rng)
                rows.append(
                    Row(
                        id=f"{split}-{label}-{i:03d}",
                        subject=f"sub-{split}-{label}-{i:03d}",
                        split=split,
                        label=label,
                        image=image,
                        source=f"file://phantoms3d/{label}/{i}.nii.gz",
                        mask=mask,
                    ).to_record()
                )
    rows.sort(key=lambda r: r["id"])
    provenance = {"dims": 3, "volume_shape": [SIDE] * 3, "eval_shape": [SIDE] * 3}
    write_dataset(paths.real, rows, shard_rows=8, provenance=provenance)


def config(train_block: dict, **synthesis) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "source": {"kind": "folder", "path": "x"},
            "device": "cpu",
            "threads": 1,
            "preprocess": {"dims": 3, "size": SIDE},
            "generator": {"train": train_block},
            "retrain": {"task": "segmentation", "network": "unet"},
            "synthesis": {"count_per_class": 3, "shard_rows": 4, "batch_size": 2, **synthesis},
        }
    )


VAE3D = {
    "architecture": "vae3d",
    "with_masks": True,
    "epochs": 2,
    "batch_size": 4,
    "latent_dim": 8,
    "base_channels": 8,
    "adversarial_weight": 0.01,
    "mask_deformation": 1.5,  # voxels, for 16^3 phantoms
}
LDM3D = {
    "architecture": "ldm3d",
    "with_masks": True,
    "epochs": 2,
    "autoencoder_epochs": 2,
    "batch_size": 4,
    "base_channels": 8,
    "autoencoder_channels": (8, 16),
    "latent_channels": 2,
    "timesteps": 100,
    "sample_steps": 3,
}


@pytest.fixture(scope="module")
def vae3d(tmp_path_factory):
    paths = PipelinePaths(tmp_path_factory.mktemp("vae3d"), "v")
    write_volumes(paths, {"train": 5, "val": 1, "test": 1})
    summary = train(config(VAE3D), paths)
    return paths, summary


def test_vae3d_stage_writes_a_volume_card(vae3d):
    paths, summary = vae3d
    card = load_card(paths.generator / "card.yaml")
    assert summary["trained"] and summary["images"] == 10
    assert card.architecture == "vae3d" and card.volume_size == (SIDE,) * 3 and card.image_size == (SIDE, SIDE)
    assert card.conditioning.labels == LABELS and card.conditioning.masks and len(card.conditioning.mask_classes) == 3
    history = (paths.generator / "history.csv").read_text().splitlines()
    assert len(history) == 3 and history[0].startswith("epoch,loss,loss_recon,loss_kl,loss_adv,loss_d")


def test_vae3d_generates_deterministic_paired_volumes(vae3d):
    paths, _ = vae3d
    generator = load_generator(paths.generator / "card.yaml")
    assert generator.mask_conditioned is True and generator.mask_classes == 3
    batch = generator.generate(4, seed=7)
    assert batch.images.shape == (4, 1, SIDE, SIDE, SIDE) and batch.images.dtype == np.float32
    assert 0.0 <= batch.images.min() and batch.images.max() <= 1.0 and batch.images.std() > 0
    assert batch.masks.shape == (4, SIDE, SIDE, SIDE) and batch.masks.dtype == np.int64
    assert batch.labels == ["ball", "shell", "ball", "shell"]
    pool = generator.pool
    assert generator.cfg.mask_deformation == 1.5  # paired masks are bent pool masks
    for mask, label in zip(batch.masks, batch.labels, strict=True):
        of_label = pool.masks[pool.labels == LABELS.index(label)]
        assert not any(np.array_equal(mask, m) for m in of_label)  # new anatomy, not a training mask
        overlap = max(((mask > 0) & (m > 0)).sum() / max(1, ((mask > 0) | (m > 0)).sum()) for m in of_label)
        assert overlap > 0.5  # ... bent from one of its label's pool masks
        assert set(np.unique(mask)) <= set(np.unique(of_label))
    again = generator.generate(4, seed=7)
    np.testing.assert_array_equal(batch.images, again.images)
    np.testing.assert_array_equal(batch.masks, again.masks)
    other = generator.generate(4, seed=8)
    assert np.abs(other.images - batch.images).mean() > 1e-4
    tail = generate_range(generator, 2, 2, 7)  # images 2..3 of the same stream, in another batch
    np.testing.assert_array_equal(tail.images, batch.images[2:])


def test_vae3d_makes_volumes_for_given_masks(vae3d):
    paths, _ = vae3d
    generator = load_generator(paths.generator / "card.yaml")
    rng = np.random.default_rng(3)
    masks = np.stack([phantom(label, rng)[1] for label in LABELS]).astype(np.int64)
    batch = generate_batch(generator, 2, 5, list(LABELS), masks=masks)
    np.testing.assert_array_equal(batch.masks, masks)
    assert batch.images.shape == (2, 1, SIDE, SIDE, SIDE)
    with pytest.raises(GeneratorError, match=r"expected integer masks \(N, 16, 16, 16\)"):
        generator.generate(2, 5, masks=masks[:, 0])
    with pytest.raises(GeneratorError, match="mask values"):
        generator.generate(2, 5, masks=masks + 3)


def test_synthesize_writes_volume_rows_with_masks(vae3d):
    paths, _ = vae3d
    summary = synthesize(config(VAE3D), paths)
    assert summary["counts"] == {"ball": 3, "shell": 3} and summary["compiled"] is False
    table = read_table(paths.synthetic)
    assert table.num_rows == 6
    assert {cell_shape(cell) for cell in table.column("image").to_pylist()} == {(1, SIDE, SIDE, SIDE)}
    assert {cell_shape(cell) for cell in table.column("mask").to_pylist()} == {(1, SIDE, SIDE, SIDE)}
    arrays = decode_table(table)
    assert arrays.images.shape == (6, 1, SIDE, SIDE, SIDE) and arrays.masks.shape == (6, SIDE, SIDE, SIDE)
    assert set(np.unique(arrays.masks)) <= {0, 1, 2}


def test_synthesize_volumes_for_the_train_masks(vae3d):
    paths, _ = vae3d
    summary = synthesize(config(VAE3D, masks_from="train"), paths)
    assert summary["masks_used"] == 10 and summary["masks_rejected"] == 0
    real = read_table(paths.real, columns=["mask"], splits=["train"]).column("mask").to_pylist()
    real_masks = {decode_image(cell).tobytes() for cell in real}
    made = read_table(paths.synthetic, columns=["mask"]).column("mask").to_pylist()
    assert len(made) == 6 and all(decode_image(cell).tobytes() in real_masks for cell in made)


def test_ldm3d_trains_and_samples_on_cpu(tmp_path):
    paths = PipelinePaths(tmp_path, "l")
    write_volumes(paths, {"train": 4, "val": 1, "test": 1})
    train(config(LDM3D), paths)
    card = load_card(paths.generator / "card.yaml")
    assert card.architecture == "ldm3d" and card.volume_size == (SIDE,) * 3
    generator = load_generator(paths.generator / "card.yaml")
    batch = generator.generate(2, seed=1)
    assert batch.images.shape == (2, 1, SIDE, SIDE, SIDE) and batch.images.dtype == np.float32
    assert 0.0 <= batch.images.min() and batch.images.max() <= 1.0
    assert batch.masks.shape == (2, SIDE, SIDE, SIDE) and generator.mask_conditioned
    np.testing.assert_array_equal(batch.images, generator.generate(2, seed=1).images)
    given = generate_batch(generator, 2, 4, list(LABELS), masks=batch.masks[::-1].copy())
    np.testing.assert_array_equal(given.masks, batch.masks[::-1])


def test_dimensions_must_match_the_architecture():
    volumes = TrainingData(np.zeros((2, 1, 8, 8, 8), np.float32), np.zeros(2, np.int64), ("a",))
    images = TrainingData(np.zeros((2, 1, 8, 8), np.float32), np.zeros(2, np.int64), ("a",))
    with pytest.raises(DataError, match="makes 2D images but the training data are volumes"):
        train_generator(TrainSpec(architecture="vae", epochs=1), volumes)
    with pytest.raises(DataError, match="makes volumes but the training data are 2D images"):
        train_generator(TrainSpec(architecture="vae3d", epochs=1), images)
    with pytest.raises(DataError, match="with_masks needs a mask"):
        train_generator(TrainSpec(architecture="vae3d", with_masks=True, epochs=1), volumes)


def test_mask_deformation_is_seeded_per_image_and_keeps_classes():
    rng = np.random.default_rng(0)
    masks = rng.integers(0, 3, (3, 12, 12, 12)).astype(np.int64)
    np.testing.assert_array_equal(deform_masks(masks, 0.0, seed=1), masks)
    bent = deform_masks(masks, 3.0, seed=1)
    assert bent.shape == masks.shape and bent.dtype == np.int64
    assert set(np.unique(bent)) <= {0, 1, 2}
    assert all((b != m).mean() > 0.2 for b, m in zip(bent, masks, strict=True))
    np.testing.assert_array_equal(deform_masks(masks, 3.0, seed=1), bent)
    assert (deform_masks(masks, 3.0, seed=2) != bent).any()
    with seed_offset(1):  # image 1 of the stream, alone in its batch: the same deformation
        np.testing.assert_array_equal(deform_masks(masks[1:2], 3.0, seed=1), bent[1:2])
