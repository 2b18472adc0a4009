"""The downstream models and the retrain stage on volumes (``preprocess.dims: 3``): 3D
networks, random crops and flips, sliding-window inference on larger val/test volumes,
per-class Dice/HD95 on hand-made masks, and the stage on tiny sphere/shell volumes (16^3
train rows, 24^3 val/test rows)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from generators.errors import ConfigError
from generators.shards import DatasetWriter, Row
from tasks import downstream
from tasks.config import AugmentSpec, PipelineConfig
from tasks.paths import PipelinePaths
from tasks.retrain import retrain
from tasks.retrain_data import mask_class_names

TRAIN, EVAL = 16, 24
VERDICTS = {"helped", "no measurable effect", "hurt", "not tested: real only already scores the maximum"}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def draw_volume(rng: np.random.Generator, size: int, label: str = "brain") -> tuple[np.ndarray, np.ndarray]:
    """A grey volume uint8 ``(1, size, size, size)`` and its mask uint8 ``(size,) * 3``:
    0 background, 1 a shell, 2 the sphere inside it (``label`` "shell": no inner sphere)."""
    grid = np.stack(np.mgrid[:size, :size, :size]).astype(np.float64)
    centre = size / 2 + rng.uniform(-1.5, 1.5, 3)
    radius = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(axis=0))
    outer = 0.36 * size * rng.uniform(0.9, 1.1)
    mask = np.zeros((size,) * 3, np.uint8)
    mask[radius <= outer] = 1
    if label != "shell":
        mask[radius <= 0.55 * outer] = 2
    image = np.array([0.15, 0.5, 0.8])[mask] + rng.normal(0, 0.03, mask.shape)
    return np.rint(np.clip(image, 0.02, 0.98) * 255).astype(np.uint8)[None], mask


def write_volumes(
    target: Path,
    per_split: dict[str, int],
    *,
    labels: tuple[str, ...] = ("brain",),
    seed: int = 0,
    provenance: dict | None = None,
    source: str = "file://spheres.nii.gz",
) -> None:
    """A volume dataset: train rows of 16^3, val/test rows of 24^3 (as patch ingest writes)."""
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in per_split.items():
        for label in labels:
            for i in range(n):
                image, mask = draw_volume(rng, TRAIN if split == "train" else EVAL, label)
                rows.append(
                    Row(
                        id=f"{split}-{label}-{i:03d}",
                        subject="sub-01",  # patches of one volume
                        split=split,
                        label=label,
                        image=image,
                        source=source,
                        mask=mask,
                        seed=None if split != "train" or source.startswith("file") else seed,
                    ).to_record()
                )
    rows.sort(key=lambda r: r["id"])
    with DatasetWriter(target, shard_rows=8, provenance=provenance or {}) as writer:
        writer.write_records(rows)


REAL_PROVENANCE = {
    "dims": 3,
    "volume_shape": [TRAIN] * 3,
    "eval_shape": [EVAL] * 3,
    "spacing_mm": [1.5, 1.5, 1.5],
    "patches_of_one_subject": True,
    "mask_classes": ["background", "shell", "core"],
}


def make_config(**retrain: object) -> PipelineConfig:
    spec = {
        "task": "segmentation",
        "network": "unet",
        "steps": 6,
        "batch_size": 4,
        "lr": 3e-3,
        "seeds": [0, 1],
        "synthetic_ratio": 1.0,
        "eval_every": 3,
        "roi_size": 8,
        **retrain,
    }
    return PipelineConfig.model_validate(
        {
            "source": {"kind": "folder", "path": "x"},
            "generator": {"train": {"architecture": "vae3d"}},
            "threads": 1,
            "preprocess": {"dims": 3, "patch": {"size": TRAIN, "eval_size": EVAL}},
            "retrain": spec,
        }
    )


# --------------------------------------------------------------------------- networks
def test_build_network_in_3d_gives_volume_shapes() -> None:
    x = torch.rand(2, 1, TRAIN, TRAIN, TRAIN).contiguous(memory_format=downstream.memory_format(5))
    unet = downstream.build_network("segmentation", "unet", 1, 3, spatial_dims=3)
    assert unet(x).shape == (2, 3, TRAIN, TRAIN, TRAIN)
    for network in ("densenet", "resnet"):
        model = downstream.build_network("classification", network, 1, 2, spatial_dims=3)
        assert model.to(memory_format=downstream.memory_format(5))(x).shape == (2, 2)
    assert downstream.memory_format(5) is torch.channels_last_3d and downstream.memory_format(4) is torch.channels_last
    # the 2D networks are unchanged: 4D in, 4D out
    assert downstream.build_network("segmentation", "unet", 1, 3)(torch.rand(1, 1, 16, 16)).shape == (1, 3, 16, 16)


def test_sliding_window_covers_larger_volumes_and_equals_one_pass_at_roi_size() -> None:
    torch.manual_seed(0)
    model = downstream.build_network("segmentation", "unet", 1, 3, spatial_dims=3).eval()
    rng = np.random.default_rng(0)
    big = rng.random((2, 1, EVAL, EVAL, EVAL), dtype=np.float32)
    proba = downstream.predict_proba(model, big, batch_size=2, roi_size=(TRAIN,) * 3, sw_overlap=0.25)
    assert proba.shape == (2, 3, EVAL, EVAL, EVAL) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)

    small = big[:, :, :TRAIN, :TRAIN, :TRAIN]
    windowed = downstream.predict_proba(model, small, batch_size=2, roi_size=(TRAIN,) * 3)
    with torch.no_grad():
        direct = torch.softmax(model(torch.from_numpy(np.ascontiguousarray(small))), dim=1).numpy()
    np.testing.assert_allclose(windowed, direct, atol=1e-5)
    # a smaller window is a different computation (it sees less context), not the same numbers
    assert not np.allclose(downstream.predict_proba(model, small, roi_size=(8, 8, 8)), direct, atol=1e-3)


# --------------------------------------------------------------------------- metrics
def test_per_class_dice_and_hd95_on_hand_made_volumes() -> None:
    size = 20
    truth = np.zeros((3, size, size, size), np.int64)
    truth[:, 4:12, 4:12, 4:12] = 1  # an 8^3 cube of class 1
    truth[:, 14:18, 14:18, 14:18] = 2  # a 4^3 cube of class 2
    truth[2, truth[2] == 2] = 0  # volume 2: class 2 absent from the truth
    pred = truth.copy()
    pred[1] = 0
    pred[1, 6:14, 4:12, 4:12] = 1  # class 1 shifted by 2 voxels along D
    pred[1, 14:18, 14:18, 14:18] = 2
    pred[2, 14:18, 14:18, 14:18] = 2  # volume 2: class 2 predicted but not there
    scores = downstream.segmentation_scores_per_class(truth, pred, 3)
    assert scores["dice"].shape == scores["hd95"].shape == (3, 2)
    diagonal = np.sqrt(3 * size**2)
    np.testing.assert_allclose(scores["dice"], [[1, 1], [0.75, 1], [1, 0]], atol=1e-6)
    np.testing.assert_allclose(scores["hd95"], [[0, 0], [2, 0], [0, diagonal]], atol=1e-6)
    means = downstream.segmentation_scores(truth, pred, 3)
    np.testing.assert_allclose(means["dice"], [1, 0.875, 0.5], atol=1e-6)
    np.testing.assert_allclose(means["hd95"], [0, 1, diagonal / 2], atol=1e-6)
    # both empty: Dice 1 / HD95 0
    empty = downstream.segmentation_scores_per_class(np.zeros((1, 8, 8, 8), np.int64), np.zeros((1, 8, 8, 8)), 2)
    assert empty["dice"].tolist() == [[1.0]] and empty["hd95"].tolist() == [[0.0]]
    proba = np.eye(3, dtype=np.float32)[pred].transpose(0, 4, 1, 2, 3)
    assert downstream.evaluate_segmentation(truth, proba)["dice"] == pytest.approx(2.375 / 3, abs=1e-6)


def test_mask_class_names_from_provenance() -> None:
    assert mask_class_names({"mask_classes": ["background", "GM", "WM"]}, 3) == ["GM", "WM"]
    assert mask_class_names({"mask_classes": ["GM", "WM"]}, 3) == ["GM", "WM"]
    assert mask_class_names({"mask_classes": {"2": "WM", "1": "GM"}}, 3) == ["GM", "WM"]
    assert mask_class_names({}, 3) == ["class 1", "class 2"]
    assert mask_class_names({"mask_classes": ["only one"]}, 3) == ["class 1", "class 2"]


# --------------------------------------------------------------------------- training data
def test_crops_and_3d_augmentation_keep_image_and_mask_aligned_and_are_seeded() -> None:
    rng = np.random.default_rng(0)
    masks = rng.integers(0, 3, (4, TRAIN, TRAIN, TRAIN))
    images = (masks[:, None] / 2).astype(np.float32)  # the image encodes its mask
    spec = AugmentSpec(hflip_p=0.5, brightness_contrast_p=0.0)

    def draw(seed: int) -> tuple[np.ndarray, np.ndarray]:
        generator = np.random.default_rng(seed)
        x, y = downstream.crop_volumes(images, masks, (8, 8, 8), generator)
        return downstream.augment_volumes(spec, x, y, generator)

    x, y = draw(1)
    assert x.shape == (4, 1, 8, 8, 8) and y.shape == (4, 8, 8, 8)
    np.testing.assert_array_equal(x[:, 0] * 2, y)  # flips and crops alike for image and mask
    x2, y2 = draw(1)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert not np.array_equal(draw(2)[0], x)
    # intensity: image only, clipped to [0, 1]
    bright = AugmentSpec(hflip_p=0.0, brightness_contrast_p=1.0)
    xi, yi = downstream.augment_volumes(bright, images, masks, np.random.default_rng(0))
    assert np.array_equal(yi, masks) and not np.allclose(xi, images) and xi.min() >= 0 and xi.max() <= 1
    assert downstream.resolve_roi(None, (16, 16, 12)) == (16, 16, 12)
    with pytest.raises(ConfigError, match="at most the train rows"):
        downstream.resolve_roi(32, (16, 16, 16))


def test_classification_on_volumes_trains_deterministically() -> None:
    rng = np.random.default_rng(0)
    pairs = [draw_volume(rng, 20, label) for label in ("brain", "shell") * 3]
    images = np.stack([p[0] for p in pairs]).astype(np.float32) / 255
    targets = np.array([0, 1] * 3)

    def fit() -> torch.nn.Module:
        torch.manual_seed(0)
        model = downstream.build_network("classification", "densenet", 1, 2, spatial_dims=3)
        return downstream.train_model(
            model, images, targets, task="classification", steps=2, batch_size=4, lr=1e-3, seed=0,
            augment=AugmentSpec(), roi_size=16,
        )  # fmt: skip

    a, b = fit(), fit()
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    big = rng.random((3, 1, EVAL, EVAL, EVAL), dtype=np.float32)
    proba = downstream.predict_proba(a, big, batch_size=2)  # whole volumes, one pass
    assert proba.shape == (3, 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    with pytest.raises(ConfigError, match="at least 16 for the DenseNet"):
        downstream.check_volume_roi("classification", "densenet", (12, 12, 12))


# --------------------------------------------------------------------------- the stage
@pytest.fixture()
def volume_paths(tmp_path: Path) -> PipelinePaths:
    paths = PipelinePaths(root=tmp_path, pipeline="v")
    write_volumes(paths.real, {"train": 6, "val": 2, "test": 3}, provenance=REAL_PROVENANCE)
    write_volumes(paths.filtered, {"train": 6}, seed=5, source="vae3d@1")
    return paths


def test_retrain_on_volumes_writes_per_class_scores_and_is_deterministic(volume_paths: PipelinePaths) -> None:
    cfg = make_config()
    summary = retrain(cfg, volume_paths)
    first = (volume_paths.metrics / "retrain.json").read_bytes()
    assert json.loads(first) == summary
    assert summary["primary_metric"] == "dice" and summary["num_classes"] == 3
    assert summary["n_real_train"] == 6 and summary["n_synthetic_used"] == 6 and summary["n_test"] == 3
    assert summary["verdict"] in VERDICTS
    assert "3 test volumes, 2 seeds" in summary["power"]["statement"]
    for setting in ("real_only", "augmented"):
        assert 0.0 <= summary[setting]["dice"]["mean"] <= 1.0
        assert summary[setting]["hd95"]["mean"] >= 0.0
        assert len(summary[setting]["dice"]["per_seed"]) == 2
    volumes = summary["volumes"]
    assert volumes["dims"] == 3 and volumes["train_shape"] == [TRAIN] * 3
    assert volumes["eval_shape"] == [EVAL] * 3 and volumes["val_shape"] == [EVAL] * 3
    assert volumes["roi_size"] == [8, 8, 8] and volumes["sw_overlap"] == 0.25 and volumes["sw_mode"] == "gaussian"
    assert volumes["patches_of_one_subject"] is True and volumes["spacing_mm"] == [1.5, 1.5, 1.5]
    assert volumes["classes"] == ["shell", "core"]
    per_class = volumes["per_class"]
    for setting in ("real_only", "augmented", "delta"):
        assert set(per_class[setting]) == {"shell", "core"}
        for name in ("shell", "core"):
            assert len(per_class[setting][name]["dice"]["per_seed"]) == 2
            assert len(per_class[setting][name]["hd95"]["per_seed"]) == 2
    # the primary metric is the mean over classes of the per-class means, seed by seed
    for setting in ("real_only", "augmented"):
        for seed in range(2):
            for metric in ("dice", "hd95"):
                classes = [per_class[setting][name][metric]["per_seed"][seed] for name in ("shell", "core")]
                assert np.mean(classes) == pytest.approx(summary[setting][metric]["per_seed"][seed], abs=1e-5)

    assert (volume_paths.metrics / "retrain.json").read_bytes() == first  # nothing else wrote it
    retrain(cfg, volume_paths)
    assert (volume_paths.metrics / "retrain.json").read_bytes() == first


def test_retrain_classifies_volumes_and_rejects_a_bad_roi(tmp_path: Path) -> None:
    paths = PipelinePaths(root=tmp_path, pipeline="c")
    write_volumes(paths.real, {"train": 4, "val": 1, "test": 2}, labels=("brain", "shell"), provenance={"dims": 3})
    write_volumes(paths.filtered, {"train": 2}, labels=("brain", "shell"), seed=5, source="vae3d@1")
    cfg = make_config(
        task="classification",
        network="resnet",
        seeds=[0],
        steps=2,
        roi_size=None,
        ratios=[0, 0.5],
        real_fractions=[0.5],
    )
    summary = retrain(cfg, paths)
    assert summary["primary_metric"] == "balanced_accuracy" and summary["n_synthetic_used"] == 4
    sweeps = [c for c in summary["ratio_sweep"]["conditions"] if c["ratio"] > 0] + summary["low_data"]["conditions"]
    assert len(sweeps) == 2 and all(c["verdict"] in VERDICTS | {"helped", "hurt"} for c in sweeps)
    assert summary["low_data"]["conditions"][0]["n_real"] == 4  # half of each class's 4 train volumes
    assert 0.0 <= summary["real_only"]["balanced_accuracy"]["mean"] <= 1.0
    volumes = summary["volumes"]
    assert volumes["roi_size"] == [TRAIN] * 3 and volumes["eval_shape"] == [EVAL] * 3
    assert volumes["per_class"] is None and volumes["patches_of_one_subject"] is None
    with pytest.raises(ConfigError, match="divisible by 4"):
        retrain(make_config(roi_size=10, seeds=[0]), paths)
