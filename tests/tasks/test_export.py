"""``synthmed export-synthetic``: a stored synthetic set (real MNI152 slices standing in for
generated ones, with grey-matter masks) written as PNG, NIfTI and DICOM and read back with
PIL, nibabel and pydicom: the pixels must be exactly the stored ones, the DICOM tags must
mark the files synthetic and carry no patient data, and the manifest must be a valid
synthmed CSV source."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from flows.cli import main
from generators.errors import DataError
from generators.shards import Row, write_dataset
from tasks.export import PRIVATE_CREATOR, PRIVATE_GROUP, export_synthetic
from tasks.ingest import mni152_files
from tasks.paths import PipelinePaths

GENERATOR = "me/mni152-cgan@1.0.0"


def _slices(count: int, size: int = 48) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` real MNI152 T1 axial slices as uint8 ``(size, size)`` with GM masks (0/1)."""
    files = mni152_files()
    t1 = np.asarray(nib.load(str(files["t1"])).dataobj, dtype=np.float32)
    gm = np.asarray(nib.load(str(files["gm"])).dataobj, dtype=np.float32)
    out = []
    for k in np.linspace(50, 140, count).astype(int):
        plane = np.rot90(t1[:, :, k])
        image = Image.fromarray(np.clip(plane / t1.max() * 255, 0, 255).astype(np.uint8)).resize((size, size))
        mask = Image.fromarray((np.rot90(gm[:, :, k]) > 0.5).astype(np.uint8)).resize((size, size), Image.NEAREST)
        out.append((np.asarray(image), np.asarray(mask)))
    return out


def _store(
    root: Path, *, dtype: str = "uint8", rgb: bool = False, masks: bool = False, gate_passed: bool = True
) -> dict[str, Row]:
    """A ``filtered`` dataset of pipeline ``p`` under ``root``: 3 rows each of ``upper`` and
    ``lower/odd`` (a label that is not a safe folder name), and the filter's ``quality.json``
    with ``gate.passed``; returns the rows by id."""
    paths = PipelinePaths(root, "p")
    paths.metrics.mkdir(parents=True, exist_ok=True)
    (paths.metrics / "quality.json").write_text(json.dumps({"gate": {"passed": gate_passed}}))
    rows = []
    for i, (image, mask) in enumerate(_slices(6)):
        array = image.astype(np.uint16) * 257 if dtype == "uint16" else image
        array = np.stack([array, array[::-1], array.T]) if rgb else array[None]
        label = "upper" if i < 3 else "lower/odd"
        rows.append(
            Row(
                id=f"syn-{i:04d}",
                subject="synthetic",
                split="train",
                label=label,
                image=np.ascontiguousarray(array),
                source=GENERATOR,
                mask=mask if masks else None,
                seed=1000 + i // 3,
            )
        )
    write_dataset(PipelinePaths(root, "p").filtered, [r.to_record() for r in rows], shard_rows=4)
    return {r.id: r for r in rows}


def _manifest(out: Path) -> list[dict[str, str]]:
    import csv

    with open(out / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_png_export_round_trips_pixels_and_masks(tmp_path: Path, dtype: str) -> None:
    rows = _store(tmp_path, dtype=dtype, masks=True)
    out = tmp_path / "out"
    summary = export_synthetic(PipelinePaths(tmp_path, "p"), "png", out)
    assert summary["images"] == 6 and summary["masks"] == 6 and summary["per_class"] == {"lower/odd": 3, "upper": 3}
    manifest = _manifest(out)
    assert [m["image"] for m in manifest][:1] == ["upper/syn-0000.png"]
    assert {m["image"].split("/")[0] for m in manifest} == {"upper", "lower_odd"}  # '/' never makes a folder
    for record in manifest:
        row = rows[record["subject"]]
        image = np.asarray(Image.open(out / record["image"]))
        assert image.dtype == row.image.dtype and np.array_equal(image, row.image[0])
        assert np.array_equal(np.asarray(Image.open(out / record["mask"])), row.mask)
        assert record["source"] == GENERATOR and int(record["seed"]) == row.seed


def test_png_export_keeps_rgb(tmp_path: Path) -> None:
    rows = _store(tmp_path, rgb=True)
    out = tmp_path / "out"
    export_synthetic(PipelinePaths(tmp_path, "p"), "png", out)
    image = np.asarray(Image.open(out / "upper" / "syn-0001.png"))
    assert image.shape == (48, 48, 3) and np.array_equal(np.moveaxis(image, -1, 0), rows["syn-0001"].image)


def test_nifti_export_follows_the_ingest_orientation(tmp_path: Path) -> None:
    rows = _store(tmp_path, dtype="uint16", masks=True)
    out = tmp_path / "out"
    export_synthetic(PipelinePaths(tmp_path, "p"), "nifti", out)
    for record in _manifest(out):
        row = rows[record["subject"]]
        image = nib.load(str(out / record["image"]))
        assert image.shape == (48, 48, 1) and image.get_data_dtype() == np.uint16
        assert np.array_equal(np.rot90(np.asarray(image.dataobj)[..., 0]), row.image[0])  # tasks.readers convention
        mask = np.asarray(nib.load(str(out / record["mask"])).dataobj)
        assert np.array_equal(np.rot90(mask[..., 0]), row.mask)


def test_nifti_refuses_rgb_on_one_line(tmp_path: Path) -> None:
    _store(tmp_path, rgb=True)
    with pytest.raises(DataError, match="NIfTI export takes grey images, got 3 channels; use --format png or dicom"):
        export_synthetic(PipelinePaths(tmp_path, "p"), "nifti", tmp_path / "out")


@pytest.mark.parametrize("rgb", [False, True])
def test_dicom_export_is_marked_synthetic_with_fresh_uids(tmp_path: Path, rgb: bool) -> None:
    rows = _store(tmp_path, rgb=rgb, masks=not rgb)
    out = tmp_path / "out"
    export_synthetic(PipelinePaths(tmp_path, "p"), "dicom", out)
    seen_sops, studies, series = set(), set(), {}
    for record in _manifest(out):
        row = rows[record["subject"]]
        ds = pydicom.dcmread(out / record["image"])
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
        pixels = ds.pixel_array
        assert np.array_equal(np.moveaxis(pixels, -1, 0) if rgb else pixels, row.image if rgb else row.image[0])
        assert str(ds.PatientName) == "SYNTHETIC" and ds.PatientID == "SYNTHETIC"
        assert ds.BurnedInAnnotation == "NO" and list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert ds.ConversionType == "SYN" and ds.PatientIdentityRemoved == "YES"
        assert ds.DerivationDescription == f"synthetic image generated by {GENERATOR} with seed {row.seed} (synthmed)"
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        assert [block[i].value for i in (1, 2, 3, 4)] == ["SYNTHETIC", GENERATOR, str(row.seed), row.label]
        assert not ds.get("StudyDate") and not ds.get("PatientBirthDate") and "InstitutionName" not in ds
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert pydicom.uid.UID(ds.SOPInstanceUID).is_valid and ds.SOPInstanceUID not in seen_sops
        seen_sops.add(ds.SOPInstanceUID)
        studies.add(ds.StudyInstanceUID)
        series.setdefault(row.label, set()).add(ds.SeriesInstanceUID)
        if not rgb:
            mask = pydicom.dcmread(out / record["mask"])
            assert np.array_equal(mask.pixel_array, row.mask) and "MASK" in mask.ImageType
            assert mask.SeriesInstanceUID != ds.SeriesInstanceUID and mask.StudyInstanceUID == ds.StudyInstanceUID
    assert len(studies) == 1 and all(len(uids) == 1 for uids in series.values())
    assert len({uid for uids in series.values() for uid in uids}) == 2  # one series per class

    again = tmp_path / "again"
    export_synthetic(PipelinePaths(tmp_path, "p"), "dicom", again)
    other = pydicom.dcmread(again / "upper" / "syn-0000.dcm")
    assert other.SOPInstanceUID not in seen_sops and other.StudyInstanceUID not in studies  # fresh per export


def test_exported_manifest_is_a_csv_source_ingest_reads(tmp_path: Path) -> None:
    from tasks.config import PipelineConfig
    from tasks.ingest import ingest

    _store(tmp_path, masks=True)
    out = tmp_path / "out"
    export_synthetic(PipelinePaths(tmp_path, "p"), "png", out)
    cfg = PipelineConfig.model_validate(
        {"source": {"kind": "csv", "path": "out/manifest.csv"}, "generator": {"id": "x"}, "preprocess": {"size": 32}}
    )
    summary = ingest(cfg, PipelinePaths(tmp_path, "again"))
    assert summary["rows"] == 6


def test_bad_requests_are_one_line_and_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "pipelines.yaml").write_text(
        "pipelines:\n  p: {source: {kind: mni152}, generator: {id: x}}\n", encoding="utf-8"
    )
    config = str(tmp_path / "pipelines.yaml")
    out = tmp_path / "out"
    code = main(["export-synthetic", "--pipeline", "p", "--config", config, "--format", "png", "--out", str(out)])
    assert (
        code == 2 and "no filtered dataset for pipeline 'p'; run `synthmed run --pipeline p`" in capsys.readouterr().err
    )
    assert not out.exists()
    _store(tmp_path)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(["export-synthetic", "--pipeline", "p", "--config", config, "--format", "dicom", "--out", str(out)])
    assert code == 2 and "is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    code = main(["export-synthetic", "--pipeline", "p", "--config", config, "--format", "png", "--out", str(out / "n")])
    assert code == 0 and "exported 6 images (lower/odd 3, upper 3) as png" in capsys.readouterr().out


def test_a_rejected_set_is_refused_unless_asked_for(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "pipelines.yaml").write_text(
        "pipelines:\n  p: {source: {kind: mni152}, generator: {id: x}}\n", encoding="utf-8"
    )
    config = str(tmp_path / "pipelines.yaml")
    _store(tmp_path, gate_passed=False)
    out = tmp_path / "out"
    code = main(["export-synthetic", "--pipeline", "p", "--config", config, "--format", "png", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "quality gate REJECTED this synthetic set" in err and "--allow-rejected" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    argv = ["export-synthetic", "--pipeline", "p", "--config", config, "--format", "png", "--out", str(out)]
    assert main([*argv, "--allow-rejected"]) == 0
    assert len(_manifest(out)) == 6
