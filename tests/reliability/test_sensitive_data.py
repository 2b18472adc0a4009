"""Sensitive data: DICOM ingest keeps the pixels and parses only the few tags it needs;
subject ids are pseudonymised with a keyed hash; no identifier (patient name and id,
dates, institution, accession number, physician, the pseudonym key) reaches any output
(Parquet values, manifest, rejects, stage records) or any log line, not even through
file paths that carry the subject id."""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest

from generators.shards import decode_image, read_manifest, read_table
from tasks.config import PipelineConfig
from tasks.ingest import locate_inputs
from tasks.paths import PipelinePaths
from tasks.pseudonym import KEY_ENV
from tasks.readers import DICOM_TAGS
from tasks.stages import run_stage
from tests.reliability.helpers import IDENTIFIERS, grey8, parquet_text, phantom, save_dicom, save_png

SECRET_KEY = "k3y-only-for-this-test-0f9e8d"
PATIENTS = ("PAT-12345", "PAT-2", "PAT-3", "PAT-4")


def keyed(subject: str, key: str = SECRET_KEY) -> str:
    return "sub-" + hmac.new(key.encode(), subject.encode(), hashlib.sha256).hexdigest()[:12]


def keyed_path(rel: str, keep: int = 1, key: str = SECRET_KEY) -> str:
    """The documented path pseudonym, recomputed here independently: class folder kept,
    every other component 12 hex chars of HMAC-SHA256(key, "path\\0" + name) + image suffix."""
    path, mark, fragment = rel.partition("#")
    parts = path.split("/")

    def one(name: str) -> str:
        suffix = next((s for s in (".nii.gz", ".nii", ".png", ".dcm") if name.lower().endswith(s)), "")
        return hmac.new(key.encode(), b"path\x00" + name.encode(), hashlib.sha256).hexdigest()[:12] + suffix

    return "/".join(parts[:keep] + [one(p) for p in parts[keep:]]) + mark + fragment


def everything_written(root: Path, *inputs: Path) -> str:
    """The text of every file under ``root`` except the inputs, Parquet decompressed."""
    parts = [parquet_text(root / "data")]
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not any(i in p.parents for i in inputs)):
        parts.append(path.name)
        parts.append(path.read_bytes().decode("utf-8", "replace"))
    return "\n".join(parts)


def assert_no_identifiers(text: str, extra: tuple[str, ...] = ()) -> None:
    for secret in (*IDENTIFIERS.values(), *PATIENTS, SECRET_KEY, *extra):
        assert secret not in text, secret


@pytest.fixture()
def dcmread_spy(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every dataset the readers get back from ``pydicom.dcmread``."""
    import pydicom

    seen: list = []
    real = pydicom.dcmread

    def spy(*args, **kwargs):
        ds = real(*args, **kwargs)
        seen.append(ds)
        return ds

    monkeypatch.setattr(pydicom, "dcmread", spy)
    return seen


def test_dicom_ingest_keeps_pixels_and_drops_every_identifier(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, dcmread_spy: list
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET_KEY)
    caplog.set_level(logging.DEBUG)
    raw = tmp_path / "raw"
    exact = grey8("disc", 0)  # 8-bit at the target size: must come out bit for bit
    save_dicom(raw / "disc" / "PAT-12345" / "img0.dcm", exact, "PAT-12345", bits=8)
    save_dicom(raw / "disc" / "PAT-12345" / "img1.dcm", grey8("disc", 1), "PAT-12345", bits=8)
    save_dicom(raw / "disc" / "PAT-2" / "scan_PAT-2.dcm", np.rint(phantom("disc", 2) * 3000), "PAT-2")
    save_dicom(raw / "square" / "PAT-3" / "a.dcm", np.rint(phantom("square", 3) * 3000), "PAT-3")
    frames = np.stack([np.rint(phantom("square", 10 + f) * 3000) for f in range(3)])
    save_dicom(raw / "square" / "PAT-4" / "cine", frames, "PAT-4")  # multi-frame, no suffix
    broken = raw / "disc" / "PAT-12345" / "broken.dcm"
    broken.write_bytes((raw / "disc" / "PAT-12345" / "img0.dcm").read_bytes()[:-200])
    cfg = PipelineConfig.model_validate(
        {
            "source": {"kind": "folder", "path": "raw"},
            "generator": {"train": {}},
            "threads": 2,
            "preprocess": {"size": 16, "min_foreground": 0.0},
        }
    )
    paths = PipelinePaths(tmp_path, "dicom")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run_stage("ingest", cfg, paths)

    rows = read_table(paths.real).to_pylist()
    assert summary["rows"] == len(rows) == 4 + 3 and summary["rejects"] == 1
    assert {r["subject"] for r in rows} == {keyed(p) for p in PATIENTS}
    assert {r["subject"] for r in rows}.isdisjoint(
        {keyed(p, "synthmed-public-default-pseudonym-key-v1") for p in PATIENTS}
    )
    by_source = {r["source"]: r for r in rows}
    first = keyed_path("disc/PAT-12345/img0.dcm")
    assert np.array_equal(decode_image(by_source[first]["image"])[0], exact)  # pixel data kept, lossless
    assert keyed_path("disc/PAT-2/scan_PAT-2.dcm") in by_source  # every name below the class hashed
    cine = keyed_path("square/PAT-4/cine")
    assert sorted(s for s in by_source if s.startswith(cine)) == [f"{cine}#slice={k:03d}" for k in range(3)]

    parsed = set().union(*(set(ds.dir()) for ds in dcmread_spy))
    assert dcmread_spy and parsed <= {*DICOM_TAGS, "SpecificCharacterSet"}
    assert parsed.isdisjoint({*IDENTIFIERS, "PatientBirthDate", "StudyInstanceUID", "OtherPatientIDs"})

    written = everything_written(tmp_path, raw)
    assert "rejects.json" in written and keyed_path("disc/PAT-12345/broken.dcm") in written
    assert_no_identifiers(written)
    assert_no_identifiers(caplog.text + repr(summary) + "\n".join(str(w.message) for w in caught))
    assert "rejected" in caplog.text  # the log did talk about the files, just not about the patients


def test_csv_and_regex_subject_ids_in_paths_never_reach_outputs_or_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET_KEY)
    caplog.set_level(logging.DEBUG)
    raw = tmp_path / "raw"
    rows = []
    for i, pid in enumerate(PATIENTS):
        label = ("disc", "square")[i % 2]
        save_png(raw / "img" / f"{pid}_t1.png", grey8(label, i))
        rows.append([f"img/{pid}_t1.png", label, pid])
    rows.append(["img/PAT-3_missing.png", "disc", "PAT-3"])  # rejected: not found
    rows.append(["img/PAT-4_t1.png", "square", "PAT-4"])  # rejected: duplicate
    with open(raw / "list.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["image", "label", "subject"], *rows])
    paths = PipelinePaths(tmp_path, "csv")
    cfg = PipelineConfig.model_validate(
        {"source": {"kind": "csv", "path": "raw/list.csv"}, "generator": {"train": {}}, "preprocess": {"size": 16}}
    )
    summary = run_stage("ingest", cfg, paths)
    assert summary["rows"] == 4 and summary["rejects"] == 2
    assert {r["source"] for r in read_table(paths.real).to_pylist()} == {
        keyed_path(f"img/{p}_t1.png", keep=0) for p in PATIENTS
    }

    folder = tmp_path / "folder"
    numbers = ("Q042", "Q043", "Q044", "Q045")  # not hex: cannot turn up inside a digest by chance
    for i, number in enumerate(numbers):
        save_png(folder / ("disc", "square")[i % 2] / f"{number}scan.png", grey8("disc", i))  # id glued to text
    cfg_regex = PipelineConfig.model_validate(
        {
            "source": {"kind": "folder", "path": "folder", "subject_regex": r"^(Q\d{3})"},
            "generator": {"train": {}},
            "preprocess": {"size": 16},
        }
    )
    run_stage("ingest", cfg_regex, PipelinePaths(tmp_path, "regex"))
    sources = {r["source"] for r in read_table(PipelinePaths(tmp_path, "regex").real).to_pylist()}
    assert sources == {keyed_path(f"{('disc', 'square')[i % 2]}/{n}scan.png") for i, n in enumerate(numbers)}

    assert_no_identifiers(everything_written(tmp_path, raw, folder), extra=numbers)
    assert_no_identifiers(caplog.text, extra=numbers)


HOSTILE = ("PAT-SECRET", "4711", "DOE", "JANE", "MRN4471234", "19620314", "SMITH", "JOHN", "20240101", "KOWALSKI")


def test_names_mrns_and_dates_in_folder_and_file_names_never_reach_outputs_or_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET_KEY)
    caplog.set_level(logging.DEBUG)
    raw = tmp_path / "raw"
    named = "disc/DOE_JANE_MRN4471234_19620314/SMITH_JOHN_20240101.dcm"
    save_dicom(raw / named, grey8("disc", 0), "P1", bits=8)
    save_dicom(raw / "disc" / "P2" / "a.dcm", grey8("disc", 1), "P2", bits=8)
    broken = "disc/PAT-SECRET-4711/PAT-SECRET-4711_t1.dcm"  # fails to decode: no PatientID learned
    (raw / broken).parent.mkdir(parents=True)
    (raw / broken).write_bytes((raw / named).read_bytes()[:-150])
    for i in range(2):
        save_png(raw / "square" / f"KOWALSKI_ANNA_{i}_19880101.png", grey8("square", i))
    cfg = PipelineConfig.model_validate(
        {"source": {"kind": "folder", "path": "raw"}, "generator": {"train": {}}, "preprocess": {"size": 16}}
    )
    paths = PipelinePaths(tmp_path, "names")
    summary = run_stage("ingest", cfg, paths)

    sources = {r["source"] for r in read_table(paths.real).to_pylist()}
    assert summary["rows"] == 4 and keyed_path(named) in sources and keyed_path("disc/P2/a.dcm") in sources
    rejects = json.loads(paths.rejects.read_text())
    assert [r["file"] for r in rejects] == [keyed_path(broken)] and "DICOM" in rejects[0]["reason"]
    written = everything_written(tmp_path, raw)
    assert keyed_path(broken) in written and "rejected" in caplog.text  # the reject is listed and logged...
    assert_no_identifiers(written, extra=HOSTILE)  # ...without any part of the names
    assert_no_identifiers(caplog.text + repr(summary), extra=HOSTILE)
    located = locate_inputs(cfg, paths)  # with the key, a person finds the files again (nothing written)
    assert located[keyed_path(broken)] == raw / broken and located[keyed_path(named)] == raw / named


def test_setting_the_pseudonym_key_reruns_ingest_and_the_manifest_names_the_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = tmp_path / "raw"
    for i, shape in enumerate(("disc", "square", "disc", "square")):
        save_png(raw / shape / f"Q{i}.png", grey8(shape, i))
    cfg = PipelineConfig.model_validate(
        {"source": {"kind": "folder", "path": "raw"}, "generator": {"train": {}}, "preprocess": {"size": 16}}
    )
    paths = PipelinePaths(tmp_path, "key")
    default_key = b"synthmed-public-default-pseudonym-key-v1"

    monkeypatch.delenv(KEY_ENV, raising=False)
    caplog.set_level(logging.WARNING)
    assert run_stage("ingest", cfg, paths, force=False)["skipped"] is False
    unsafe = [r.getMessage() for r in caplog.records if "UNSAFE" in r.getMessage()]
    assert len(unsafe) == 1 and "\n" not in unsafe[0] and KEY_ENV in unsafe[0]  # one loud line
    pseudonym = read_manifest(paths.real)["provenance"]["pseudonym"]
    assert pseudonym["key"] == "default"
    assert pseudonym["key_id"] == hmac.new(default_key, b"synthmed-key-id", hashlib.sha256).hexdigest()[:16]
    assert run_stage("ingest", cfg, paths, force=False)["skipped"] is True

    monkeypatch.setenv(KEY_ENV, SECRET_KEY)
    caplog.clear()
    assert run_stage("ingest", cfg, paths, force=False)["skipped"] is False  # the key changed: not current
    assert not [r for r in caplog.records if "UNSAFE" in r.getMessage()]
    pseudonym = read_manifest(paths.real)["provenance"]["pseudonym"]
    assert pseudonym["key"] == "env"
    assert pseudonym["key_id"] == hmac.new(SECRET_KEY.encode(), b"synthmed-key-id", hashlib.sha256).hexdigest()[:16]
    rows = read_table(paths.real).to_pylist()
    assert {r["subject"] for r in rows} == {keyed(f"Q{i}") for i in range(4)}
    assert {r["source"] for r in rows} == {keyed_path(f"{s}/Q{i}.png") for i, s in enumerate(("disc", "square") * 2)}
    assert run_stage("ingest", cfg, paths, force=False)["skipped"] is True
    monkeypatch.setenv(KEY_ENV, SECRET_KEY + "-rotated")
    assert run_stage("ingest", cfg, paths, force=False)["skipped"] is False  # another secret key: rerun too
    assert_no_identifiers(everything_written(tmp_path, raw))  # neither key is written anywhere
    assert SECRET_KEY not in caplog.text
