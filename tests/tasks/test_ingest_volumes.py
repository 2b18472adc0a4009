"""Tests of 3D ingest (``preprocess.dims: 3``) on tiny NIfTI/DICOM volumes and the MNI152 template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from generators.errors import ConfigError
from generators.shards import cell_shape, decode_image, read_manifest, read_table
from tasks.config import PipelineConfig
from tasks.ingest import ingest
from tasks.ingest_volumes import _summed_volume, pick_cubes, resample
from tasks.paths import PipelinePaths
from tasks.pseudonym import pseudonymise, pseudonymise_path

ZOOMS = (2.0, 1.5, 2.5)
SHAPE = (20, 24, 18)


def config(source: dict, **preprocess) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {"source": source, "generator": {"train": {"architecture": "vae3d"}}, "preprocess": {"dims": 3, **preprocess}}
    )


def save_nifti(path: Path, data: np.ndarray, zooms: tuple[float, ...] = ZOOMS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([*zooms, 1.0])), str(path))


def volume(seed: int, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.normal(100.0, 5.0, shape).astype(np.float32)
    data[4:-4, 5:-5, 4:-4] += 300.0
    return data


def label_map(shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """Values {0, 1, 3}; 1 along every border, so the non-zero extent is the whole volume."""
    mask = np.ones(shape, np.uint8)
    mask[6:12, 6:12, 5:10] = 0
    mask[12:16, 14:20, 10:14] = 3
    return mask


def folder_project(tmp_path: Path) -> PipelinePaths:
    raw = tmp_path / "raw"
    for i, cls in enumerate(["a", "a", "a", "b", "b", "b"]):
        save_nifti(raw / cls / f"s{i:02d}.nii.gz", volume(i))
    save_nifti(raw / "a" / "s00_seg.nii.gz", label_map())
    save_nifti(raw / "b" / "s03_seg.nii.gz", label_map((20, 24, 17)))  # wrong shape -> reject
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(raw / "a" / "flat.png")
    bad = volume(9)
    bad[3, 3, 3] = np.nan
    save_nifti(raw / "b" / "nan.nii.gz", bad)
    save_nifti(raw / "a" / "big.nii.gz", volume(10, (48, 48, 48)), zooms=(2.0, 2.0, 2.0))
    return PipelinePaths(tmp_path, "p")


def rejects_of(paths: PipelinePaths) -> dict[str, str]:
    return {r["file"]: r["reason"] for r in json.loads(paths.rejects.read_text())}


def test_folder_volumes_resampled_masks_nearest_and_rejects(tmp_path: Path) -> None:
    paths = folder_project(tmp_path)
    cfg = config({"kind": "folder", "path": "raw"}, spacing_mm=[1.0, 1.0, 1.0], grid=[48, 40, 48], max_volume_mib=1)
    summary = ingest(cfg, paths)

    rejects = rejects_of(paths)
    assert set(rejects) == {
        pseudonymise_path(p, keep=1) for p in ("a/flat.png", "b/nan.nii.gz", "a/big.nii.gz", "b/s03.nii.gz")
    }
    assert rejects[pseudonymise_path("a/flat.png", keep=1)].startswith("a 2D image in a dims 3 pipeline")
    assert "NaN" in rejects[pseudonymise_path("b/nan.nii.gz", keep=1)]
    big = rejects[pseudonymise_path("a/big.nii.gz", keep=1)]
    assert "48x48x48" in big and "preprocess.max_volume_mib = 1;" in big and "3 MiB" in big and "spacing_mm" in big
    assert "mask shape" in rejects[pseudonymise_path("b/s03.nii.gz", keep=1)]
    assert all("\n" not in reason for reason in rejects.values())

    rows = read_table(paths.real).to_pylist()
    assert summary["rows"] == len(rows) == 5 and summary["subjects"] == 5 and summary["rejects"] == 4
    assert {cell_shape(r["image"]) for r in rows} == {(1, 48, 40, 48)}
    assert {r["subject"] for r in rows} == {pseudonymise(f"s{i:02d}") for i in (0, 1, 2, 4, 5)}
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    masked = [r for r in rows if r["mask"] is not None]
    assert len(masked) == 1 and masked[0]["source"] == pseudonymise_path("a/s00.nii.gz", keep=1)
    mask = decode_image(masked[0]["mask"])[0]
    assert mask.shape == (48, 40, 48) and set(np.unique(mask)) == {0, 1, 3}  # nearest: no blended values
    # spacing honoured: the mask's non-zero extent (1 mm voxels) is the input's physical extent within a voxel
    extent = [int(np.ptp(np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != k)))[0])) + 1 for k in range(3)]
    for got, n, zoom in zip(extent, SHAPE, ZOOMS, strict=True):
        assert abs(got - n * zoom) <= 1.0
    image = decode_image(masked[0]["image"])
    assert image.dtype == np.uint8 and 240 <= image.max() <= 255 and image.min() == 0

    prov = read_manifest(paths.real)["provenance"]
    assert prov["dims"] == 3 and prov["volume_shape"] == [48, 40, 48] and prov["eval_shape"] == [48, 40, 48]
    assert prov["spacing_mm"] == [1.0, 1.0, 1.0] and prov["patches_of_one_subject"] is False

    shards = [s["sha256"] for s in read_manifest(paths.real)["shards"]]
    ingest(cfg, paths)
    assert [s["sha256"] for s in read_manifest(paths.real)["shards"]] == shards


def test_resample_keeps_extent_and_mask_values() -> None:
    mask = label_map()
    affine = np.diag([*ZOOMS, 1.0])
    out, out_affine = resample(mask, affine, (1.2, 1.2, 1.2), order=0)
    assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 1, 3}
    assert np.allclose(np.linalg.norm(out_affine[:3, :3], axis=0), 1.2)
    for n_out, n_in, zoom in zip(out.shape, SHAPE, ZOOMS, strict=True):
        assert abs(n_out * 1.2 - n_in * zoom) <= 1.2 / 2 + 1e-9
    centre_in = affine @ np.array([*((np.array(SHAPE) - 1) / 2), 1.0])
    centre_out = out_affine @ np.array([*((np.array(out.shape) - 1) / 2), 1.0])
    assert np.allclose(centre_in, centre_out)  # the volume stays where it was in mm


def patches(rows: list[dict]) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in r["source"].rpartition("#patch=")[2].split(",")) for r in rows]


def test_mni152_cubes_stay_in_their_slab_with_foreground(tmp_path: Path) -> None:
    paths = PipelinePaths(tmp_path, "p")
    patch = {"size": 8, "eval_size": 10, "per_volume": 16, "eval_per_volume": 4, "split_axis": 1, "min_foreground": 0.3}
    summary = ingest(config({"kind": "mni152"}, spacing_mm=[4.0, 4.0, 4.0], patch=patch), paths)

    assert summary["class_counts"]["train"] and sum(summary["class_counts"]["train"].values()) == 16
    extents = {}
    for split, size in (("train", 8), ("val", 10), ("test", 10)):
        rows = read_table(paths.real, splits=[split]).to_pylist()
        assert len(rows) == (16 if split == "train" else 4)
        assert {cell_shape(r["image"]) for r in rows} == {(1, size, size, size)}
        assert {r["label"] for r in rows} <= {"inferior", "middle", "superior"}
        assert {r["subject"] for r in rows} == {pseudonymise("mni152")}
        for row in rows:
            mask = decode_image(row["mask"])[0]
            assert mask.shape == (size,) * 3 and np.count_nonzero(mask) / mask.size >= 0.3
            assert set(np.unique(mask)) <= {0, 1, 2}
        ys = [c[1] for c in patches(rows)]
        extents[split] = (min(ys) - size // 2, max(ys) - size // 2 + size)  # [first voxel, last voxel + 1)
    assert extents["train"][1] <= extents["val"][0] and extents["val"][1] <= extents["test"][0]

    prov = read_manifest(paths.real)["provenance"]
    assert prov["patches_of_one_subject"] is True and prov["mask_classes"] == [
        "background",
        "grey matter",
        "white matter",
    ]
    assert prov["volume_shape"] == [8, 8, 8] and prov["eval_shape"] == [10, 10, 10] and prov["spacing_mm"] == [4.0] * 3
    assert len(prov["template_sha256"]) == 3


def test_slab_thinner_than_its_cube_is_a_config_error(tmp_path: Path) -> None:
    patch = {"size": 8, "eval_size": 16, "per_volume": 4, "split_axis": 1}
    cfg = config(
        {"kind": "mni152"}, spacing_mm=[4.0, 4.0, 4.0], patch=patch, split={"train": 0.7, "val": 0.1, "test": 0.2}
    )
    with pytest.raises(ConfigError, match=r"the val slab .* 5 voxels \(20 mm\) .* thinner than its 16-voxel cube"):
        ingest(cfg, PipelinePaths(tmp_path, "p"))


def test_dicom_series_and_multiframe_become_volumes(tmp_path: Path) -> None:
    source = Path(get_testdata_file("MR_small.dcm"))
    series = generate_uid()
    for k in range(8):  # eight slices of one series (the fewest a volume may have), written out of order
        ds = pydicom.dcmread(source)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series, generate_uid()
        ds.ImagePositionPatient = [-83.9063, -91.2, 6.6406 + 0.8 * (7 - k)]
        (tmp_path / "raw" / "mr" / "PAT1").mkdir(parents=True, exist_ok=True)
        ds.save_as(tmp_path / "raw" / "mr" / "PAT1" / f"IM{k}.dcm")
    (tmp_path / "raw" / "mr" / "PAT2").mkdir()
    shutil.copy(source, tmp_path / "raw" / "mr" / "PAT2" / "lone.dcm")  # a single slice: 2D
    multi = pydicom.dcmread(source)
    multi.NumberOfFrames = 8
    multi.PixelData = multi.PixelData * 8
    multi.save_as(tmp_path / "raw" / "mr" / "cine.dcm")
    paths = PipelinePaths(tmp_path, "p")
    ingest(config({"kind": "folder", "path": "raw"}, grid=[16, 16, 16]), paths)

    rows = read_table(paths.real).to_pylist()
    assert len(rows) == 2 and {cell_shape(r["image"]) for r in rows} == {(1, 16, 16, 16)}
    assert any("/series-" in r["source"] for r in rows)
    assert all("PAT1" not in r["source"] and series not in r["source"] for r in rows)
    rejects = rejects_of(paths)
    assert list(rejects) == [pseudonymise_path("mr/PAT2/lone.dcm", keep=1)]
    assert rejects[pseudonymise_path("mr/PAT2/lone.dcm", keep=1)].startswith("a 2D image in a dims 3 pipeline")


def test_csv_patches_split_by_subject_with_masks(tmp_path: Path) -> None:
    root = tmp_path / "data"
    lines = ["image,label,subject,mask"]
    for i in range(6):
        save_nifti(root / f"v{i}.nii.gz", volume(i))
        save_nifti(root / f"v{i}_lab.nii.gz", label_map())
        lines.append(f"v{i}.nii.gz,{'ab'[i % 2]},P{i},v{i}_lab.nii.gz")
    moved = np.diag([*ZOOMS, 1.0])
    moved[:3, 3] = [5.0, 0.0, 0.0]  # same shape, moved 5 mm: another grid
    nib.save(nib.Nifti1Image(label_map(), moved), str(root / "moved_lab.nii.gz"))
    save_nifti(root / "moved.nii.gz", volume(7))
    lines.append("moved.nii.gz,a,P7,moved_lab.nii.gz")
    (root / "truncated.nii.gz").write_bytes((root / "v0.nii.gz").read_bytes()[:300])
    lines.append("truncated.nii.gz,b,P8,")
    (root / "list.csv").write_text("\n".join(lines) + "\n")
    paths = PipelinePaths(tmp_path, "p")
    patch = {"size": 8, "eval_size": 12, "per_volume": 3, "eval_per_volume": 2, "min_foreground": 0.5}
    summary = ingest(config({"kind": "csv", "path": "data/list.csv"}, patch=patch), paths)

    rejects = rejects_of(paths)
    assert "mask affine differs" in rejects[pseudonymise_path("moved.nii.gz")]
    assert "truncated" in rejects[pseudonymise_path("truncated.nii.gz")]
    rows = read_table(paths.real).to_pylist()
    assert summary["subjects"] == 6 and summary["groups"] == 6
    by_subject: dict[str, set[str]] = {}
    for row in rows:
        by_subject.setdefault(row["subject"], set()).add(row["split"])
        side = 8 if row["split"] == "train" else 12
        assert cell_shape(row["image"]) == (1, side, side, side)
        mask = decode_image(row["mask"])[0]
        assert np.count_nonzero(mask) / mask.size >= 0.5 and set(np.unique(mask)) <= {0, 1, 3}
        assert "#patch=" in row["source"]
    assert all(len(splits) == 1 for splits in by_subject.values())  # a subject's cubes stay in one split
    per_split = {s: sum(n.values()) for s, n in summary["class_counts"].items()}
    assert per_split["train"] % 3 == 0 and per_split["train"] >= 3 and per_split["val"] % 2 == 0
    assert read_manifest(paths.real)["provenance"]["patches_of_one_subject"] is False


def test_pick_cubes_matches_brute_force_foreground() -> None:
    rng = np.random.default_rng(0)
    foreground = rng.random((10, 11, 12)) < 0.4
    table = _summed_volume(foreground)
    lo, hi = (0, 2, 0), (10, 9, 12)
    corners = pick_cubes(table, lo, hi, 4, 10_000, 0.45, np.random.default_rng(1))
    expected = {
        (a, b, c)
        for a in range(lo[0], hi[0] - 3)
        for b in range(lo[1], hi[1] - 3)
        for c in range(lo[2], hi[2] - 3)
        if foreground[a : a + 4, b : b + 4, c : c + 4].mean() >= 0.45
    }
    assert expected and set(corners) == expected and len(corners) == len(expected)
    assert pick_cubes(table, lo, hi, 8, 5, 0.0, np.random.default_rng(1)) == []  # 7 voxels thick: no 8-cube fits


def test_foreign_nifti_files_too_small_4d_or_nan_are_rejected_with_reasons(tmp_path: Path) -> None:
    """nibabel's own example files (not written for this project): a 4 x 5 x 7 matrix, a
    3-slice slab, 4D series and a volume with NaN are refused one per line; the anatomical
    volumes (LAS and RAS) are ingested."""
    data = Path(nib.__file__).parent / "tests" / "data"
    names = ["anatomical.nii", "reoriented_anat_moved.nii", "standard.nii.gz", "functional.nii"]
    names += ["resampled_anat_moved.nii", "example4d.nii.gz"]
    if not all((data / name).is_file() for name in names):
        pytest.fail(f"nibabel's example data is missing from {data}; reinstall nibabel")
    raw = tmp_path / "raw" / "brain"
    raw.mkdir(parents=True)
    for name in names:
        shutil.copy(data / name, raw / name)
    paths = PipelinePaths(tmp_path, "p")
    summary = ingest(config({"kind": "folder", "path": "raw"}, spacing_mm=[2.0, 2.0, 2.0], grid=[32, 32, 16]), paths)
    assert summary["rows"] == 2
    reasons = list(rejects_of(paths).values())
    assert len(reasons) == 4 and all("\n" not in r for r in reasons)
    # standard.nii.gz (4 x 5 x 7) and resampled_anat_moved.nii (a 17 x 21 x 3 slab, with NaN
    # too: the header is checked first)
    assert sum("under 8 voxels along an axis" in r for r in reasons) == 2
    assert sum("expected a 3D volume (or 4D with one volume)" in r for r in reasons) == 2
