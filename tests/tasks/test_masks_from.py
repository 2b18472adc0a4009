"""``synthesis.masks_from``: images made FOR given masks (segmentation augmentation).

A folder of label maps is validated file by file (unreadable, wrong values, wrong shape,
outside a class folder, unknown class: rejected with a reason, the rest used); the
synthesize stage writes every image with exactly its given mask; a generator that is not
mask-conditioned is refused with one line, by the config and by the stage."""

from __future__ import annotations

import io

import nibabel as nib
import numpy as np
import pytest
import yaml
from PIL import Image

from generators.card import load_card
from generators.errors import ConfigError, DataError, GeneratorError
from generators.registry import load_generator
from generators.shards import decode_image, read_manifest, read_table
from tasks.config import PipelineConfig, load_pipelines
from tasks.ingest import pad_resize_mask
from tasks.mask_sources import load_mask_set
from tasks.paths import PipelinePaths
from tasks.stages import mask_paths
from tasks.synthesize import synthesize
from tasks.train import train
from tests.tasks.phantoms import CLASSES, draw_phantom, write_real

SIZE = 16
TINY_P2P = {"architecture": "pix2pix", "with_masks": True, "epochs": 1, "batch_size": 8, "base_channels": 8}
TINY_DDPM = {
    "architecture": "ddpm",
    "with_masks": True,
    "epochs": 1,
    "batch_size": 8,
    "base_channels": 8,
    "timesteps": 20,
    "ddim_steps": 2,
}


def _cfg(train_block: dict, **synthesis) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "source": {"kind": "folder", "path": "x"},
            "device": "cpu",
            "threads": 1,
            "preprocess": {"size": SIZE},
            "generator": {"train": train_block},
            "synthesis": {"count_per_class": 3, "shard_rows": 4, "batch_size": 2, **synthesis},
            "retrain": {"task": "segmentation", "network": "unet"},
        }
    )


def _png(path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())


def _nifti_2d(path, mask: np.ndarray) -> None:
    """A 2D NIfTI that reads back (``tasks/readers``: rot90 of the array) as ``mask``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.rot90(mask, k=-1).astype(np.int16), np.eye(4)), str(path))


def _mask(label: str, seed: int, size: int = SIZE) -> np.ndarray:
    return draw_phantom(label, np.random.default_rng(seed), size)[1]


@pytest.fixture()
def mask_folder(tmp_path):
    """``masks/<label>/...``: 4 good maps (PNG at the target size, PNG at twice the size,
    a {0,255} PNG, a 2D NIfTI with classes 0..2) and 5 bad files, each with its reason."""
    root = tmp_path / "masks"
    good = {
        "disc/a.png": _mask("disc", 1),
        "ring/b.png": _mask("ring", 2, 2 * SIZE),
        "square/c.png": _mask("square", 3) * 255,
    }
    nifti = _mask("square", 4).astype(np.uint8)
    nifti[:2] = 2  # a third class (the generator's K = 3: background, grey/white matter)
    good["square/d.nii.gz"] = nifti
    _png(root / "disc/a.png", good["disc/a.png"])
    _png(root / "ring/b.png", good["ring/b.png"])
    _png(root / "square/c.png", good["square/c.png"])
    _nifti_2d(root / "square/d.nii.gz", nifti)
    (root / "disc/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # truncated
    _png(root / "disc/wrong_label.png", _mask("disc", 5) * 7)  # values {0, 7}: 7 is no class
    _png(root / "ring/rgb.png", np.zeros((SIZE, SIZE, 3), np.uint8))  # not a label map
    _png(root / "zebra/e.png", _mask("disc", 6))  # not a class of the real data
    _png(root / "loose.png", _mask("disc", 7))  # outside any class folder
    (root / "ring/notes.txt").write_text("not a mask")
    expected = {
        "disc/a.png": good["disc/a.png"],
        "ring/b.png": pad_resize_mask(good["ring/b.png"], SIZE),
        "square/c.png": good["square/c.png"] // 255,
        "square/d.nii.gz": nifti,
    }
    return root, expected


def test_folder_masks_are_validated_and_the_rest_used(mask_folder, tmp_path):
    root, expected = mask_folder
    mask_set = load_mask_set("masks", PipelinePaths(tmp_path, "t"), SIZE, 3, CLASSES)
    assert mask_set.labels == ("disc", "ring", "square", "square")
    assert mask_set.masks.dtype == np.uint8 and mask_set.masks.shape == (4, SIZE, SIZE)
    for got, want in zip(mask_set.masks, expected.values(), strict=True):
        np.testing.assert_array_equal(got, want)
    reasons = {r["file"].split("/")[0] + ":" + r["reason"].split(";")[0] for r in mask_set.rejects}
    assert len(mask_set.rejects) == 6, mask_set.rejects
    joined = " | ".join(sorted(reasons))
    assert "disc:unreadable or corrupt mask" in joined
    assert "disc:label value(s) 7 outside 0..2 (the generator's 3 mask classes)" in joined
    assert "ring:mask mode 'RGB'" in joined
    assert "ring:unsupported file type" in joined
    assert "zebra:class folder 'zebra' is not a class of the real train split (disc, ring, square)" in joined
    assert any(r["reason"].startswith("mask outside any class sub-folder") for r in mask_set.rejects)
    # file names are pseudonymised below the class folder, as at ingest; one line each
    assert all("wrong_label" not in r["file"] and "\n" not in r["reason"] for r in mask_set.rejects)


def test_a_folder_without_usable_masks_is_one_line_error(tmp_path):
    _png(tmp_path / "bad/disc/x.png", np.full((SIZE, SIZE), 9, np.uint8))
    with pytest.raises(DataError, match=r"no usable mask in bad, 1 rejected \(first: disc/.*label value\(s\) 9"):
        load_mask_set("bad", PipelinePaths(tmp_path, "t"), SIZE, 3, CLASSES)
    with pytest.raises(DataError, match="is not a folder"):
        load_mask_set("missing", PipelinePaths(tmp_path, "t"), SIZE, 3, CLASSES)


@pytest.fixture()
def pix2pix_project(tmp_path):
    paths = PipelinePaths(tmp_path, "t")
    write_real(paths.real, {"train": 4, "val": 1, "test": 1}, size=SIZE)
    train(_cfg(TINY_P2P), paths)
    return paths


def _rows(paths: PipelinePaths) -> tuple[list[str], list[str], np.ndarray]:
    table = read_table(paths.synthetic, columns=["id", "label", "mask"])
    masks = np.stack([decode_image(blob)[0] for blob in table.column("mask").to_pylist()])
    return table.column("id").to_pylist(), table.column("label").to_pylist(), masks


def test_synthesize_writes_exactly_the_given_masks(pix2pix_project, mask_folder):
    paths = pix2pix_project
    _, expected = mask_folder
    cfg = _cfg(TINY_P2P, masks_from="masks", counts={"disc": 2, "ring": 1, "square": 3})
    summary = synthesize(cfg, paths)
    assert summary["masks_used"] == 4 and summary["masks_rejected"] == 6
    ids, labels, masks = _rows(paths)
    assert labels == ["disc", "disc", "ring", "square", "square", "square"]
    # class c's row i gets class c's mask i mod M_c, bit for bit
    want = [expected["disc/a.png"], expected["disc/a.png"], expected["ring/b.png"]]
    want += [expected["square/c.png"], expected["square/d.nii.gz"], expected["square/c.png"]]
    for got, mask in zip(masks, want, strict=True):
        np.testing.assert_array_equal(got, mask)
    manifest = read_manifest(paths.synthetic)
    assert manifest["provenance"]["masks_from"] == "masks" and len(manifest["provenance"]["masks_sha256"]) == 64
    images = read_table(paths.synthetic, columns=["image"]).column("image").to_pylist()
    assert len({bytes(b) for b in images}) == len(images)  # a repeated mask gets other noise
    assert mask_paths(cfg, paths) == [paths.root / "masks"]  # the folder is a dep of the stage


def test_a_class_without_masks_is_refused(pix2pix_project, tmp_path):
    _png(tmp_path / "only_disc/disc/a.png", _mask("disc", 1))
    with pytest.raises(DataError, match=r"no usable mask for class\(es\) \['ring', 'square'\]"):
        synthesize(_cfg(TINY_P2P, masks_from="only_disc"), pix2pix_project)
    summary = synthesize(_cfg(TINY_P2P, masks_from="only_disc", counts={"ring": 0, "square": 0}), pix2pix_project)
    assert summary["counts"] == {"disc": 3, "ring": 0, "square": 0}


def test_ddpm_makes_images_for_the_real_train_masks(tmp_path):
    paths = PipelinePaths(tmp_path, "t")
    write_real(paths.real, {"train": 4, "val": 1, "test": 1}, size=SIZE)
    train(_cfg(TINY_DDPM), paths)
    card = load_card(paths.generator / "card.yaml")
    assert card.conditioning.masks and card.network["mask_classes"] == 3
    synthesize(_cfg(TINY_DDPM, masks_from="train"), paths)
    real = read_table(paths.real, columns=["label", "mask"], splits=["train"])
    real_masks = {
        label: [
            decode_image(b)[0]
            for b, lab in zip(real.column("mask").to_pylist(), real.column("label").to_pylist(), strict=True)
            if lab == label
        ]
        for label in CLASSES
    }
    ids, labels, masks = _rows(paths)
    assert len(ids) == 9
    for row_id, label, mask in zip(ids, labels, masks, strict=True):
        i = int(row_id.rsplit("-", 1)[1])
        np.testing.assert_array_equal(mask, real_masks[label][i % 4])


def test_config_refuses_masks_from_without_a_mask_conditioned_generator(tmp_path):
    def load(train_block: dict, task: str = "segmentation") -> None:
        pipeline = {
            "source": {"kind": "mni152"},
            "generator": {"train": train_block},
            "synthesis": {"masks_from": "train"},
            "retrain": {"task": task, "network": "unet" if task == "segmentation" else "densenet"},
        }
        (tmp_path / "p.yaml").write_text(yaml.safe_dump({"pipelines": {"x": pipeline}}))
        load_pipelines(tmp_path / "p.yaml")

    with pytest.raises(
        ConfigError,
        match=r"needs a mask-conditioned generator .* got generator.train.architecture 'cgan' with with_masks: true",
    ) as info:
        load({"architecture": "cgan", "with_masks": True})
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="architecture 'ddpm' with with_masks: false"):
        load({"architecture": "ddpm"})
    with pytest.raises(ConfigError, match="set retrain.task: segmentation"):
        load({"architecture": "pix2pix", "with_masks": True}, task="classification")
    load({"architecture": "ddpm", "with_masks": True})  # accepted
    load({"architecture": "pix2pix", "with_masks": True})


def test_stage_refuses_a_registry_generator_that_is_not_mask_conditioned(tmp_path):
    paths = PipelinePaths(tmp_path, "t")
    write_real(paths.real, {"train": 4, "val": 1, "test": 1}, size=SIZE)
    train(_cfg({"epochs": 1, "batch_size": 8, "latent_dim": 8, "base_channels": 8, "with_masks": True}), paths)
    # a generator picked from the registry is only known at run time: the stage checks it
    cfg = PipelineConfig.model_validate(
        {
            **_cfg(TINY_P2P).model_dump(),
            "generator": {"id": "synthmed/t-cgan@1.0.0"},
            "synthesis": {"masks_from": "train"},
        }
    )
    with pytest.raises(ConfigError, match="needs a mask-conditioned generator, but synthmed/t-cgan@1.0.0 .*'cgan'"):
        synthesize(cfg, paths)
    generator = load_generator(paths.generator / "card.yaml")
    from generators.contract import generate_batch

    with pytest.raises(GeneratorError, match="is not mask-conditioned"):
        generate_batch(generator, 1, 0, "disc", masks=np.zeros((1, SIZE, SIZE), np.int64))
