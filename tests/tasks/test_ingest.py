"""Tests of the ingest stage on tiny phantoms built in tmp_path (discs vs squares)."""

from __future__ import annotations

import csv
import hmac
import json
import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from generators.errors import DataError
from generators.shards import decode_png, read_manifest, read_table
from tasks.config import PipelineConfig
from tasks.ingest import allocate_groups, ingest
from tasks.paths import PipelinePaths
from tasks.pseudonym import KEY_ENV, pseudonymise, pseudonymise_path

PSEUDONYM = re.compile(r"^sub-[0-9a-f]{12}(-slab\d{3})?$")


# --------------------------------------------------------------------------- phantoms
def phantom(shape: str, seed: int, size: int = 32) -> np.ndarray:
    """(size, size) float in [0, 1]: a bright disc or square on a dark noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = size / 2 + rng.uniform(-2, 2, 2)
    radius = size / 4 + rng.uniform(-1, 1)
    if shape == "disc":
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    else:
        inside = (np.abs(yy - cy) <= radius) & (np.abs(xx - cx) <= radius)
    return np.clip(0.1 + 0.7 * inside + rng.normal(0, 0.05, (size, size)), 0, 1)


def save_png(path: Path, unit: np.ndarray, bits: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if bits == 8:
        Image.fromarray(np.rint(unit * 255).astype(np.uint8)).save(path)
    else:
        Image.fromarray(np.rint(unit * 4000).astype(np.uint16)).save(path)


def make_folder(root: Path, subjects_per_class: int = 6, images_per_subject: int = 2) -> Path:
    """root/{disc,square}/sNN_imgK.png; squares are 16-bit to cover that path too."""
    for c, shape in enumerate(("disc", "square")):
        for s in range(subjects_per_class):
            subject = f"s{c * subjects_per_class + s:02d}"
            for k in range(images_per_subject):
                seed = 100 * c + 10 * s + k
                save_png(root / shape / f"{subject}_img{k}.png", phantom(shape, seed), bits=8 if c == 0 else 16)
    return root


def config(source: dict, **preprocess) -> PipelineConfig:
    return PipelineConfig.model_validate({"source": source, "generator": {"train": {}}, "preprocess": preprocess})


def folder_uri(rel: str) -> str:
    """How a folder source's ``class/.../file`` is written out: class kept, the rest hashed."""
    return pseudonymise_path(rel, keep=1)


def table_rows(paths: PipelinePaths) -> list[dict]:
    return read_table(paths.real).to_pylist()


def assert_no_subject_crosses(rows: list[dict]) -> None:
    splits_of: dict[str, set[str]] = {}
    for row in rows:
        splits_of.setdefault(row["subject"], set()).add(row["split"])
    crossing = {s: sp for s, sp in splits_of.items() if len(sp) > 1}
    assert not crossing


# --------------------------------------------------------------------------- folder
def test_folder_counts_and_subject_splits(tmp_path: Path) -> None:
    make_folder(tmp_path / "raw")
    paths = PipelinePaths(root=tmp_path, pipeline="t")
    cfg = config({"kind": "folder", "path": "raw", "subject_regex": r"^(s\d+)_"}, size=32)
    summary = ingest(cfg, paths)

    assert summary["rows"] == 24 and summary["rejects"] == 0 and summary["subjects"] == 12
    assert json.loads(paths.rejects.read_text()) == []
    rows = table_rows(paths)
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    assert all(PSEUDONYM.match(r["subject"]) for r in rows)
    assert {r["subject"] for r in rows} == {pseudonymise(f"s{i:02d}") for i in range(12)}
    assert_no_subject_crosses(rows)
    # 6 subjects per class -> 4/1/1 subjects, i.e. 8/2/2 images per class in train/val/test
    assert summary["class_counts"] == {
        "test": {"disc": 2, "square": 2},
        "train": {"disc": 8, "square": 8},
        "val": {"disc": 2, "square": 2},
    }
    row = rows[0]
    image = decode_png(row["image"])
    assert image.shape == (1, 32, 32) and image.dtype == np.uint8
    assert (row["height"], row["width"], row["channels"], row["dtype"]) == (32, 32, 1, "uint8")
    assert row["source"].startswith(("disc/", "square/")) and row["mask"] is None


def test_folder_rgb_and_16bit_options(tmp_path: Path) -> None:
    make_folder(tmp_path / "raw", subjects_per_class=2, images_per_subject=1)
    paths = PipelinePaths(root=tmp_path, pipeline="t")
    ingest(config({"kind": "folder", "path": "raw"}, size=16, channels=3), paths)
    assert {decode_png(r["image"]).shape for r in table_rows(paths)} == {(3, 16, 16)}
    ingest(config({"kind": "folder", "path": "raw"}, size=16, bit_depth=16), paths)
    images = [decode_png(r["image"]) for r in table_rows(paths)]
    assert all(i.dtype == np.uint16 and i.shape == (1, 16, 16) for i in images)
    assert max(int(i.max()) for i in images) > 60000  # clipped at percentiles, stretched to full range


def test_empty_folder_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "raw" / "disc").mkdir(parents=True)
    with pytest.raises(DataError, match="raw: no image files found") as info:
        ingest(config({"kind": "folder", "path": "raw"}), PipelinePaths(root=tmp_path, pipeline="t"))
    assert "\n" not in str(info.value)


def test_missing_source_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere: source folder not found"):
        ingest(config({"kind": "folder", "path": "nowhere"}), PipelinePaths(root=tmp_path, pipeline="t"))


# --------------------------------------------------------------------------- CSV
def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def test_csv_with_masks_round_trips(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    rows, originals = [], {}
    for i in range(6):
        shape = ("disc", "square")[i % 2]
        unit = phantom(shape, i)
        mask = np.where(unit > 0.5, 2, np.where(unit > 0.3, 1, 0)).astype(np.uint8)
        save_png(raw / "img" / f"{i}.png", unit)
        Image.fromarray(mask).save(raw / "img" / f"{i}_mask.png")
        rows.append([f"img/{i}.png", shape, f"P{i // 2}", f"img/{i}_mask.png"])
        originals[pseudonymise_path(f"img/{i}.png")] = (np.rint(unit * 255).astype(np.uint8), mask)
    write_csv(raw / "list.csv", ["image", "label", "subject", "mask"], rows)
    paths = PipelinePaths(root=tmp_path, pipeline="t")
    summary = ingest(config({"kind": "csv", "path": "raw/list.csv"}, size=32), paths)

    assert summary["rows"] == 6 and summary["subjects"] == 3
    out = table_rows(paths)
    assert_no_subject_crosses(out)
    for row in out:
        image, mask = originals[row["source"]]
        assert np.array_equal(decode_png(row["image"])[0], image)  # 8-bit, same size: lossless
        assert np.array_equal(decode_png(row["mask"])[0], mask)


def test_csv_missing_columns_names_them(tmp_path: Path) -> None:
    write_csv(tmp_path / "raw" / "list.csv", ["image", "label"], [["a.png", "disc"]])
    with pytest.raises(DataError, match="missing column.*subject.*required") as info:
        ingest(config({"kind": "csv", "path": "raw/list.csv"}), PipelinePaths(root=tmp_path, pipeline="t"))
    assert "raw/list.csv" in str(info.value) and "\n" not in str(info.value)


def test_rejects_are_recorded_and_the_rest_ingested(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    good = []
    for i in range(6):
        shape = ("disc", "square")[i % 2]
        save_png(raw / f"good{i}.png", phantom(shape, i))
        good.append([f"good{i}.png", shape, f"P{i}"])
    (raw / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    valid = (raw / "good0.png").read_bytes()
    (raw / "truncated.png").write_bytes(valid[: len(valid) // 2])
    save_png(tmp_path / "outside.png", phantom("disc", 99))
    nan_volume = np.ones((8, 8, 4), np.float32)
    nan_volume[2, 2, 2] = np.nan
    nib.save(nib.Nifti1Image(nan_volume, np.eye(4)), raw / "nan.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 4, 2), np.float32), np.eye(4)), raw / "series4d.nii.gz")
    rows = good + [
        ["corrupt.png", "disc", "Q1"],
        ["truncated.png", "disc", "Q2"],
        ["../outside.png", "disc", "Q3"],
        [str(tmp_path / "outside.png"), "disc", "Q4"],
        ["nan.nii.gz", "square", "Q5"],
        ["series4d.nii.gz", "square", "Q6"],
        ["good1.png", "", "Q7"],
        ["good2.png", "disc", "P2"],  # listed twice
        ["missing.png", "disc", "Q8"],
    ]
    write_csv(raw / "list.csv", ["image", "label", "subject"], rows)
    paths = PipelinePaths(root=tmp_path, pipeline="t")
    summary = ingest(config({"kind": "csv", "path": "raw/list.csv"}, size=16), paths)

    assert summary["rows"] == 6
    rejects = json.loads(paths.rejects.read_text())
    assert rejects == sorted(rejects, key=lambda r: (r["file"], r["reason"]))
    assert summary["rejects"] == len(rejects) == 9
    reasons = {r["file"]: r["reason"] for r in rejects}
    expected_raw = {
        "corrupt.png": "corrupt",
        "truncated.png": "corrupt",
        "../outside.png": "escapes the dataset root",
        str(tmp_path / "outside.png"): "escapes the dataset root",
        "nan.nii.gz": "NaN",
        "series4d.nii.gz": "4D with one volume",
        "good1.png": "missing label",
        "good2.png": "duplicate",
        "missing.png": "not found",
    }
    expected = {pseudonymise_path(file): word for file, word in expected_raw.items()}
    for file, word in expected.items():
        assert word in reasons[file], (file, reasons[file])
    assert all("\n" not in r["reason"] for r in rejects)
    assert sorted(r["source"] for r in table_rows(paths)) == sorted(pseudonymise_path(f"good{i}.png") for i in range(6))


def test_zero_usable_images_is_a_data_error_with_rejects_written(tmp_path: Path) -> None:
    (tmp_path / "raw" / "disc").mkdir(parents=True)
    (tmp_path / "raw" / "disc" / "bad.png").write_bytes(b"garbage")
    paths = PipelinePaths(root=tmp_path, pipeline="t")
    with pytest.raises(DataError, match="no usable images"):
        ingest(config({"kind": "folder", "path": "raw"}), paths)
    assert [r["file"] for r in json.loads(paths.rejects.read_text())] == [folder_uri("disc/bad.png")]


# --------------------------------------------------------------------------- NIfTI
def test_nifti_volume_slicing_and_foreground_filter(tmp_path: Path) -> None:
    volume = np.zeros((20, 20, 10), np.float32)
    volume[5:15, 5:15, 2:8] = 1000.0  # 25 % foreground in slices 2..7
    volume[10, 10, 8] = 1000.0  # one voxel: 0.25 %, below min_foreground
    raw = tmp_path / "raw" / "brain"
    raw.mkdir(parents=True)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), raw / "sub01.nii.gz")
    nib.save(nib.Nifti1Image(volume[..., None], np.eye(4)), raw / "sub02.nii")  # 4D, one volume: fine
    paths = PipelinePaths(root=tmp_path, pipeline="t")
    split = {"train": 0.5, "val": 0.25, "test": 0.25, "slab_slices": 2}
    summary = ingest(config({"kind": "folder", "path": "raw"}, size=16, min_foreground=0.05, split=split), paths)

    assert summary["rows"] == 12 and summary["subjects"] == 2 and summary["groups"] == 6
    rows = table_rows(paths)
    sub01 = folder_uri("brain/sub01.nii.gz")
    sources = sorted(r["source"] for r in rows if r["source"].startswith(sub01))
    assert sources == [f"{sub01}#slice={k:03d}" for k in range(2, 8)]
    assert all(PSEUDONYM.match(r["subject"]) and "-slab" in r["subject"] for r in rows)
    assert_no_subject_crosses(rows)
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert read_manifest(paths.real)["provenance"]["counts"]["dropped_slices"] == 8


# --------------------------------------------------------------------------- DICOM
IDENTIFIERS = ("Doe^Jane", "PAT-12345", "19700101", "Hospital of Nowhere")


def save_dicom(path: Path, pixels: np.ndarray, patient_id: str) -> None:
    """pixels: (H, W) or (frames, H, W) uint16; carries fake identifying tags."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4." + str(abs(hash(path.name)) % 10**8)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Doe^Jane"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.InstitutionName = "Hospital of Nowhere"
    ds.Modality = "MR"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    ds.PixelData = pixels.astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_dicom_identifiers_never_reach_outputs_or_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    caplog.set_level(logging.DEBUG)
    raw = tmp_path / "raw"
    ids = {"PAT-12345": "disc", "PAT-2": "disc", "PAT-3": "square"}
    for n, (pid, shape) in enumerate(ids.items()):
        for k in range(2):
            save_dicom(raw / shape / f"img{n}{k}.dcm", np.rint(phantom(shape, 10 * n + k) * 4000), pid)
    frames = np.stack([np.rint(phantom("square", 50 + f) * 4000) for f in range(3)])
    save_dicom(raw / "square" / "cine", frames, "PAT-4")  # multi-frame, no suffix
    broken = (raw / "disc" / "img00.dcm").read_bytes()
    (raw / "disc" / "broken.dcm").write_bytes(broken[: len(broken) - 900])
    paths = PipelinePaths(root=tmp_path, pipeline="t")
    summary = ingest(config({"kind": "folder", "path": "raw"}, size=16, min_foreground=0.0), paths)

    assert summary["rows"] == 6 + 3 and summary["subjects"] == 4 and summary["rejects"] == 1
    rows = table_rows(paths)
    assert {r["subject"] for r in rows} == {pseudonymise(p) for p in (*ids, "PAT-4")}
    cine = folder_uri("square/cine")
    assert sorted(r["source"] for r in rows if r["source"].startswith(cine)) == [
        f"{cine}#slice={k:03d}" for k in range(3)
    ]
    assert "DICOM" in json.loads(paths.rejects.read_text())[0]["reason"]
    blobs = [p.read_bytes() for p in (tmp_path / "data").rglob("*") if p.is_file()]
    decoded = repr(rows).encode() + caplog.text.encode()
    for secret in IDENTIFIERS:
        assert all(secret.encode() not in blob for blob in [*blobs, decoded]), secret


# --------------------------------------------------------------------------- MNI152
def test_mni152_source_ingests_levels_and_tissue_masks(tmp_path: Path) -> None:
    paths = PipelinePaths(root=tmp_path, pipeline="t")
    summary = ingest(config({"kind": "mni152"}, split={"slab_slices": 8}), paths)

    rows = table_rows(paths)
    assert summary["rows"] == len(rows) > 50 and summary["subjects"] == 1
    assert {r["label"] for r in rows} == {"inferior", "middle", "superior"}
    for split in ("train", "val", "test"):
        assert set(summary["class_counts"][split]) == {"inferior", "middle", "superior"}
    assert all(r["source"].startswith("nilearn:mni152_2009a_t1_1mm#z=") for r in rows)
    assert all(r["subject"].startswith(pseudonymise("mni152") + "-slab") for r in rows)
    assert_no_subject_crosses(rows)
    masks = np.stack([decode_png(r["mask"])[0] for r in rows])
    assert masks.shape == (len(rows), 64, 64) and set(np.unique(masks)) == {0, 1, 2}
    assert ((masks > 0).mean(axis=(1, 2)) >= 0.05).all()  # min_foreground on the mask
    z = {r["source"].split("z=")[1]: r["label"] for r in rows}
    assert z.get("-030", "inferior") == "inferior" and z.get("+000", "middle") == "middle"
    assert z.get("+040", "superior") == "superior"
    manifest_text = (paths.real / "_manifest.json").read_text()
    assert str(tmp_path) not in manifest_text and "site-packages" not in manifest_text
    provenance = json.loads(manifest_text)["provenance"]  # what trained generators' cards inherit
    assert (provenance["modality"], provenance["anatomy"]) == ("MRI", "brain")
    assert provenance["licence"].startswith("BSD-3-Clause")


# --------------------------------------------------------------------------- determinism
def test_same_inputs_give_identical_shards(tmp_path: Path) -> None:
    manifests = []
    for name, threads in (("one", 1), ("two", 2)):
        root = tmp_path / name
        make_folder(root / "raw", subjects_per_class=3)
        cfg = PipelineConfig.model_validate(
            {
                "source": {"kind": "folder", "path": "raw"},
                "generator": {"train": {}},
                "preprocess": {"size": 16},
                "threads": threads,
                "seed": 7,
            }
        )
        ingest(cfg, PipelinePaths(root=root, pipeline="t"))
        manifests.append(read_manifest(root / "data" / "t" / "real"))
    assert [s["sha256"] for s in manifests[0]["shards"]] == [s["sha256"] for s in manifests[1]["shards"]]
    assert manifests[0] == manifests[1]


# --------------------------------------------------------------------------- helpers
def test_pseudonymise_is_keyed_and_stable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    default = pseudonymise("PAT-12345")
    assert re.fullmatch(r"sub-[0-9a-f]{12}", default) and default == pseudonymise(" PAT-12345 ")
    expected = hmac.new(b"synthmed-public-default-pseudonym-key-v1", b"PAT-12345", "sha256").hexdigest()
    assert default == "sub-" + expected[:12]
    monkeypatch.setenv(KEY_ENV, "a-secret")
    assert pseudonymise("PAT-12345") != default


def test_allocate_groups_keeps_every_split_when_possible() -> None:
    fractions = {"train": 0.6, "val": 0.2, "test": 0.2}
    assert allocate_groups(1, fractions) == {"train": 1, "val": 0, "test": 0}
    assert allocate_groups(2, fractions) == {"train": 1, "val": 0, "test": 1}
    assert allocate_groups(3, fractions) == {"train": 1, "val": 1, "test": 1}
    assert allocate_groups(10, fractions) == {"train": 6, "val": 2, "test": 2}
    assert sum(allocate_groups(7, fractions).values()) == 7


# --------------------------------------------------------------------------- listing
def test_hidden_files_and_folders_are_listed_as_rejects_not_read(tmp_path: Path) -> None:
    raw = make_folder(tmp_path / "raw", subjects_per_class=3, images_per_subject=1)
    (raw / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (raw / "disc" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    save_png(raw / ".hidden" / "x.png", phantom("disc", 1))  # a hidden class folder
    save_png(raw / "square" / ".trash" / "y.png", phantom("square", 2))  # a hidden sub-folder
    save_png(raw / "square" / ".z.png", phantom("square", 3))
    paths = PipelinePaths(root=tmp_path, pipeline="t")
    summary = ingest(config({"kind": "folder", "path": "raw"}, size=16), paths)

    assert summary["rows"] == 6 and summary["rejects"] == 5
    reasons = {r["file"]: r["reason"] for r in json.loads(paths.rejects.read_text())}
    expected = {
        pseudonymise_path(".DS_Store"): "hidden file",
        ".hidden/": "hidden folder",
        folder_uri("disc/.DS_Store"): "hidden file",
        folder_uri("square/.trash") + "/": "hidden folder",  # one entry for the folder, not one per file
        folder_uri("square/.z.png"): "hidden file",
    }
    assert set(reasons) == set(expected)
    for file, what in expected.items():
        assert reasons[file].startswith(f"{what} (name starts with '.'), skipped"), reasons[file]
    assert read_manifest(paths.real)["provenance"]["counts"]["rejects"] == 5


def test_a_class_with_one_subject_warns_and_is_noted_in_the_manifest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw = make_folder(tmp_path / "raw", subjects_per_class=5, images_per_subject=1)
    save_png(raw / "rare" / "only.png", phantom("disc", 7))
    paths = PipelinePaths(root=tmp_path, pipeline="t")
    caplog.set_level(logging.WARNING)
    summary = ingest(config({"kind": "folder", "path": "raw"}, size=16), paths)

    assert summary["class_counts"]["train"]["rare"] == 1 and "rare" not in summary["class_counts"].get("test", {})
    notes = read_manifest(paths.real)["provenance"]["notes"]
    assert notes == [
        "class 'rare' has 1 split group(s) (subjects or slabs) and no rows in val, test; "
        "add subjects of this class or set preprocess.split.slab_slices"
    ]
    assert [r.getMessage() for r in caplog.records if "class 'rare'" in r.getMessage()] == notes  # one line
    assert not any("class 'disc'" in r.getMessage() or "class 'square'" in r.getMessage() for r in caplog.records)
