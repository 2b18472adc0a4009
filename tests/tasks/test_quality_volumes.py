"""The filter stage and the report on volume pipelines (``preprocess.dims: 3``), on 16^3
phantom "brains" (an ellipsoid of grey matter around white matter, noisy background) cut
from ONE subject like the demo's cubes: memorised copies of real train volumes, blank
volumes and near-duplicates are dropped; noise volumes are told apart by the 3D two-sample
test while fresh phantoms are not; the 2.5D metrics cover three planes and are worse for
noise than for real val; the report shows three-plane grids and says that the real cubes
come from one subject."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from generators.errors import QualityGateError
from generators.shards import BASE_COLUMNS, DatasetWriter, Row, read_table
from tasks import report_volumes
from tasks.config import PipelineConfig
from tasks.filter import filter_synthetic
from tasks.mask_filters import MASK_COLUMNS
from tasks.paths import PipelinePaths
from tasks.quality_volumes import JUDGE_SLICES, judge_slices, position_groups
from tasks.quality_volumes_slices import PLANES
from tasks.report import report

SIDE, EVAL_SIDE = 16, 20
N_TRAIN, N_VAL = 24, 8


def phantom(rng: np.random.Generator, side: int = SIDE) -> tuple[np.ndarray, np.ndarray]:
    """image uint8 ``(1, side, side, side)``, mask uint8 ``(side,)*3``: 0 background, 1 grey
    matter (shell), 2 white matter (core); random centre, radii and brightness."""
    grid = np.mgrid[:side, :side, :side].astype(np.float64)
    centre = side / 2 + rng.uniform(-2, 2, 3)
    radii = side * rng.uniform(0.28, 0.4, 3)
    r = np.sqrt(sum(((g - c) / a) ** 2 for g, c, a in zip(grid, centre, radii, strict=True)))
    mask = np.where(r <= 0.6, 2, np.where(r <= 1.0, 1, 0)).astype(np.uint8)
    grey, white = rng.uniform(0.45, 0.55), rng.uniform(0.7, 0.8)
    image = 0.1 + (grey - 0.1) * (mask == 1) + (white - 0.1) * (mask == 2) + rng.normal(0, 0.03, mask.shape)
    return np.rint(np.clip(image, 0.02, 0.98) * 255).astype(np.uint8)[None], mask


def write_rows(target: Path, rows: list[Row], provenance: dict | None = None) -> None:
    with DatasetWriter(target, shard_rows=8, provenance=provenance or {}) as writer:
        writer.write_records([row.to_record() for row in sorted(rows, key=lambda r: r.id)])


def real_rows(seed: int = 0) -> list[Row]:
    rng = np.random.default_rng(seed)
    rows = []
    for split, n, side in (("train", N_TRAIN, SIDE), ("val", N_VAL, EVAL_SIDE)):
        for i in range(n):
            image, mask = phantom(rng, side)
            # cube centres as ingest writes them: 6 x 4 positions 12 voxels apart, 6 blocks of 32
            source = f"mni152.nii.gz#patch={8 + 12 * (i % 6):03d},{8 + 12 * (i // 6):03d},040"
            rows.append(Row(f"real-{split}-{i:03d}", "subject-0", split, "brain", image, source, mask))
    return rows


def make_config(**gate: object) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "source": {"kind": "folder", "path": "x"},
            "threads": 1,
            "generator": {"train": {"architecture": "vae3d"}},
            "preprocess": {"dims": 3, "size": SIDE, "patch": {"size": SIDE, "eval_size": EVAL_SIDE}},
            "synthesis": {"shard_rows": 8},
            "report": {"grid_per_class": 4},
            "quality": {
                "sanity": {"min_std": 0.02, "max_saturated_fraction": 0.5},
                "metrics": {"kid_subsets": 10, "kid_subset_size": 50, "self_supervised_steps": 15},
                "realism": {"folds": 3, "epochs": 6, "batch_size": 8, "bootstrap": 200},
                "gate": gate,
            },
        }
    )


def setup(root: Path, synthetic: list[Row]) -> PipelinePaths:
    paths = PipelinePaths(root=root, pipeline="v")
    provenance = {
        "dims": 3,
        "volume_shape": [SIDE] * 3,
        "eval_shape": [EVAL_SIDE] * 3,
        "spacing_mm": [1.5] * 3,
        "patches_of_one_subject": True,
    }
    write_rows(paths.real, real_rows(), provenance)
    write_rows(paths.synthetic, synthetic)
    return paths


def synthetic_row(name: str, image: np.ndarray, mask: np.ndarray) -> Row:
    return Row(name, "synthetic", "synthetic", "brain", image, "vae3d@1", mask, seed=0)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelinePaths, dict, Exception]:
    """Synthetic: 6 copies of real train volumes, 18 fresh phantoms, 1 exact duplicate of a
    fresh one, 2 blank volumes; gate max_memorised_fraction 0.1 (crossed by the copies)."""
    torch.set_num_threads(1)
    real = [r for r in real_rows() if r.split == "train"]
    rng = np.random.default_rng(99)
    rows = [synthetic_row(f"syn-copy-{i:02d}", real[4 * i].image, real[4 * i].mask) for i in range(6)]
    fresh = [phantom(rng) for _ in range(18)]
    rows += [synthetic_row(f"syn-fresh-{i:02d}", image, mask) for i, (image, mask) in enumerate(fresh)]
    rows.append(synthetic_row("syn-zdup-00", fresh[0][0], fresh[0][1]))
    blank = np.full((1, SIDE, SIDE, SIDE), 80, np.uint8)
    rows += [synthetic_row(f"syn-blank-{i}", blank, fresh[1][1]) for i in range(2)]
    paths = setup(tmp_path_factory.mktemp("mixed"), rows)
    with pytest.raises(QualityGateError) as error:
        filter_synthetic(make_config(max_memorised_fraction=0.1), paths)
    return paths, json.loads((paths.metrics / "quality.json").read_text()), error.value


@pytest.fixture(scope="module")
def noise(tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelinePaths, dict, Exception]:
    """Synthetic: 24 volumes of uniform noise with plausible masks (a negative control)."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(5)
    rows = [
        synthetic_row(
            f"syn-noise-{i:02d}", rng.integers(5, 250, (1, SIDE, SIDE, SIDE), dtype=np.uint8), phantom(rng)[1]
        )
        for i in range(24)
    ]
    paths = setup(tmp_path_factory.mktemp("noise"), rows)
    with pytest.raises(QualityGateError) as error:
        filter_synthetic(make_config(), paths)
    return paths, json.loads((paths.metrics / "quality.json").read_text()), error.value


def test_memorised_blank_and_duplicate_volumes_are_dropped(mixed) -> None:
    paths, quality, error = mixed
    kept = read_table(paths.filtered)
    ids = kept.column("id").to_pylist()
    assert ids == [f"syn-fresh-{i:02d}" for i in range(18)]
    assert kept.column_names == [
        *BASE_COLUMNS,
        "q_std",
        "q_saturated",
        "q_nan",
        *MASK_COLUMNS,
        "q_nn_real_distance",
        "q_nn_synthetic_distance",
    ]
    totals = quality["totals"]
    assert totals["generated"] == 27 and totals["kept"] == 18
    assert (totals["dropped_memorised"], totals["dropped_sanity"], totals["dropped_duplicate"]) == (6, 2, 1)
    memo = quality["filters"]["memorisation"]
    assert memo["threshold_source"] == "calibrated" and memo["n_below_threshold"] == 6
    assert "Pearson" in memo["distance"]
    assert min(kept.column("q_nn_real_distance").to_pylist()) >= memo["threshold"]
    # the gate applies as in 2D: 6 of 25 scored volumes memorised > 0.1
    assert "max_memorised_fraction" in str(error)
    failed = [c["bound_name"] for c in quality["gate"]["checks"] if c["passed"] is False]
    assert failed == ["max_memorised_fraction"]
    assert quality["filters"]["label_consistency"]["active"] is False
    assert "one class" in quality["filters"]["label_consistency"]["note"]
    assert quality["filters"]["masks"]["active"] is True
    assert quality["volumes"]["patches_of_one_subject"] is True


def test_fresh_phantoms_pass_the_3d_two_sample_test(mixed) -> None:
    _, quality, _ = mixed
    test = quality["realism"]["two_sample"]
    assert test["n_real_volumes"] == test["n_synthetic_volumes"] == 18
    assert test["n_real"] == test["n_synthetic"] == 18 * JUDGE_SLICES  # the 2.5D judge scores slices
    assert "2.5D" in test["network"] and "grouped by volume" in test["method"]
    assert test["auc"] is not None and test["auc"] < 0.8
    assert test["ci95_low"] <= 0.9 and quality["gate"]["realism_passed"] is True
    assert test["real_one_subject"] is True and test["grouping"] == "position"
    assert "blocks of 32 voxels" in test["note"] and "optimistic" in test["note"]


def test_position_groups_need_a_centre_on_every_row() -> None:
    sources = ["a.nii#patch=010,010,010", "a.nii#patch=040,010,010", "a.nii#patch=012,020,011"]
    assert position_groups(sources, ["s"] * 3, 16) == ["s@block0,0,0", "s@block1,0,0", "s@block0,0,0"]
    assert position_groups([*sources[:2], "a.nii"], ["s"] * 3, 16) is None
    assert position_groups(sources[::2], ["s"] * 2, 16) is None  # one block: nothing to group by


def test_noise_volumes_are_told_apart_and_rejected(noise) -> None:
    _, quality, error = noise
    test = quality["realism"]["two_sample"]
    assert test["auc"] > 0.9 and test["ci95_low"] > 0.9
    assert quality["gate"]["realism_passed"] is False and "realism gate" in str(error)
    assert quality["totals"]["kept"] == 24  # noise is not a copy: only the two-sample test catches it


def test_25d_metrics_cover_three_planes_and_rank_noise_below_real(mixed, noise) -> None:
    real_like = mixed[1]["set_metrics"]
    noisy = noise[1]["set_metrics"]
    for block in (real_like, noisy):
        assert block["kind"] == "2.5D" and set(block["planes"]) == set(PLANES)
        assert block["sets"]["kept"]["overall"]["fid"] == block["mean"]["kept"]["overall"]["fid"]
        fids = [block["planes"][p]["sets"]["kept"]["overall"]["fid"] for p in PLANES]
        assert block["mean"]["kept"]["overall"]["fid"] == pytest.approx(np.mean(fids), rel=1e-3)
        assert block["planes"]["axial"]["n_real_slices"] == N_TRAIN * SIDE
    for plane in PLANES:
        noise_fid = noisy["planes"][plane]["sets"]["kept"]["overall"]["fid"]
        assert noise_fid > 2 * noisy["planes"][plane]["sets"]["real_val"]["overall"]["fid"]
        assert noise_fid > 2 * real_like["planes"][plane]["sets"]["kept"]["overall"]["fid"]
    assert noisy["mean"]["kept"]["overall"]["precision"] < real_like["mean"]["kept"]["overall"]["precision"]


def test_report_shows_three_plane_grids_and_the_one_subject_sentence(noise) -> None:
    paths, _, _ = noise
    result = report(make_config(), paths)  # rejected set: no retrain.json needed
    markdown = result["markdown"]
    assert report_volumes.ONE_SUBJECT_SENTENCE in markdown
    for name in (report_volumes.GRID_REAL, report_volumes.GRID_SYNTHETIC):
        assert f"]({name})" in markdown
        with Image.open(paths.reports / name) as picture:
            width, height = picture.size
        # header + 3 planes x (image row + mask row), 4 volumes + label column
        tile = report_volumes.TILE_PX
        assert height == report_volumes.HEADER_PX + 6 * (tile + report_volumes.GAP_PX) + report_volumes.GAP_PX
        assert width == report_volumes.LABEL_WIDTH_PX + 4 * (tile + report_volumes.GAP_PX)
    assert "| axial |" in markdown and "| sagittal |" in markdown and "| mean |" in markdown


def test_segmentation_section_reads_per_class_dice_and_is_defensive() -> None:
    def stats(dice: float, hd95: float) -> dict:
        return {"dice": {"mean": dice, "ci95_low": None}, "hd95": {"mean": hd95}}

    per_class = {
        "real_only": {"grey matter": stats(0.71, 3.2)},
        "augmented": {"grey matter": stats(0.74, 2.9)},
        "delta": {"grey matter": stats(0.03, -0.3)},
    }
    lines = "\n".join(report_volumes.segmentation_section({"volumes": {"per_class": per_class}}))
    assert "| grey matter | 0.71 | 0.74 | 0.03 | 3.2 | 2.9 | -0.3 |" in lines
    assert "not available" in "\n".join(report_volumes.segmentation_section(None))
    assert "not available" in "\n".join(report_volumes.segmentation_section({"per_class": "odd"}))


def test_grid_orientation_superior_up_anterior_up_in_axial_and_right_in_sagittal() -> None:
    volume = np.zeros((1, SIDE, SIDE, SIDE), np.float32)  # RAS+: axes x (L->R), y (P->A), z (I->S)
    volume[0, :, :, 12:] = 1.0  # superior slab
    volume[0, :, 12:, :] = np.maximum(volume[0, :, 12:, :], 0.5)  # anterior slab
    picture = np.asarray(report_volumes.render_volume_grid([("v", volume, None)], "orientation", 1))[..., 0]

    def tile(row: int) -> np.ndarray:
        y = report_volumes.HEADER_PX + report_volumes.GAP_PX + row * (report_volumes.TILE_PX + report_volumes.GAP_PX)
        x = report_volumes.LABEL_WIDTH_PX
        return picture[y : y + report_volumes.TILE_PX, x : x + report_volumes.TILE_PX].astype(float)

    q = report_volumes.TILE_PX // 4 - 2  # the slabs fill the last quarter of their axis
    axial, coronal, sagittal = tile(0), tile(1), tile(2)  # no masks: one row per plane
    assert axial[:q].mean() > 100 > axial[-q:].mean()  # anterior up
    assert coronal[:q].mean() > 200 > 20 > coronal[-q:].mean()  # superior up
    assert sagittal[:q].mean() > 200 > 20 > sagittal[-q:, :q].mean()  # superior up
    assert sagittal[-q:, -q:].mean() > 100  # anterior right


def test_judge_slices_cut_three_planes_per_volume() -> None:
    volumes = np.zeros((2, 1, 8, 10, 12), np.float32)
    volumes[1, 0, 2, 5, 9] = (
        1.0  # one voxel in volume 1: x 2 (the 1/4 sagittal plane), y 5 (coronal 1/2), z 9 (axial 3/4)
    )
    slices = judge_slices(volumes)
    assert slices.shape == (2 * JUDGE_SLICES, 1, 12, 12)
    assert not slices[:JUDGE_SLICES].any()  # volume 0 is empty
    lit = {int(i) for i in np.flatnonzero(slices[JUDGE_SLICES:].reshape(JUDGE_SLICES, -1).any(axis=1))}
    # order per fraction: axial, coronal, sagittal -> axial 3/4 = 6, coronal 1/2 = 4, sagittal 1/4 = 2
    assert lit == {2, 4, 6}


def test_too_smooth_volumes_are_told_apart(tmp_path: Path) -> None:
    """The failure a weak judge misses: fresh phantoms without the real texture (Gaussian-
    smoothed, as a blurry generator makes them), shapes and contrast right. The 2.5D judge
    must tell them apart and the realism gate reject them (a 3D CNN on whole cubes scored
    demo-3d's flat VAE cubes 0.57: see JUDGE_METHOD)."""
    from scipy import ndimage

    torch.set_num_threads(1)
    rng = np.random.default_rng(11)
    rows = []
    for i in range(24):
        image, mask = phantom(rng)
        smooth = ndimage.gaussian_filter(image[0].astype(np.float32), 1.0)
        rows.append(synthetic_row(f"syn-smooth-{i:02d}", np.rint(smooth).astype(np.uint8)[None], mask))
    paths = setup(tmp_path, rows)
    with pytest.raises(QualityGateError, match="realism gate"):
        filter_synthetic(make_config(), paths)
    test = json.loads((paths.metrics / "quality.json").read_text())["realism"]["two_sample"]
    assert test["auc"] > 0.9 and test["ci95_low"] > 0.9
