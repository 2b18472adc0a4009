"""Bad input gets a one-line error naming the file and the fix; per-file problems go to
``rejects.json`` with a reason while the rest of the dataset is ingested, and the count
of rejects is in the ingest summary and the manifest."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from generators.errors import ConfigError, DataError
from generators.shards import decode_image, read_manifest, read_table
from tasks.config import PipelineConfig, load_pipelines
from tasks.ingest import ingest
from tasks.paths import PipelinePaths
from tasks.pseudonym import pseudonymise_path
from tests.reliability.helpers import assert_one_line, cli, grey8, phantom, save_dicom, save_png, write_pipelines

KEY_ENV = {"SYNTHMED_PSEUDONYM_KEY": "reliability-test-key"}


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNTHMED_PSEUDONYM_KEY", KEY_ENV["SYNTHMED_PSEUDONYM_KEY"])


def cfg_for(source: dict, **preprocess) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {"source": source, "generator": {"train": {}}, "threads": 1, "preprocess": {"size": 16, **preprocess}}
    )


def rejects_of(paths: PipelinePaths) -> dict[str, str]:
    rejects = json.loads(paths.rejects.read_text())
    for reject in rejects:
        assert set(reject) == {"file", "reason"}
        assert_one_line(reject["reason"])
        assert_one_line(reject["file"])
    return {r["file"]: r["reason"] for r in rejects}


# --------------------------------------------------------------------------- folder
def build_messy_folder(tmp_path: Path) -> tuple[Path, set[str]]:
    """``tmp_path/raw`` with good images and one of every kind of bad file; returns the
    folder and the relative paths of the good ones."""
    raw = tmp_path / "raw"
    good = set()
    for i in range(4):
        save_png(raw / "disc" / f"g{i}.png", grey8("disc", i))
        good.add(f"disc/g{i}.png")
        save_png(raw / "square" / f"s{i}.png", np.rint(phantom("square", 10 + i) * 4000).astype(np.uint16))
        good.add(f"square/s{i}.png")
    grey = grey8("disc", 99)
    save_png(raw / "disc" / "grey_as_rgb.png", np.stack([grey] * 3, axis=-1))  # grey stored as RGB: fine
    good.add("disc/grey_as_rgb.png")
    save_png(raw / "disc" / " .png", grey8("disc", 98))  # a blank stem is still a usable name
    good.add("disc/ .png")

    colour = np.zeros((16, 16, 3), np.uint8)
    colour[..., 0], colour[..., 2] = 200, 30  # a red picture where grey is expected
    save_png(raw / "disc" / "colour.png", colour)
    (raw / "disc" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    whole = (raw / "disc" / "g0.png").read_bytes()
    (raw / "disc" / "half.png").write_bytes(whole[: len(whole) // 2])
    from PIL import Image

    Image.fromarray(grey8("square", 5)).save(raw / "square" / "full.jpg", quality=90)
    jpeg = (raw / "square" / "full.jpg").read_bytes()
    (raw / "square" / "full.jpg").unlink()
    (raw / "square" / "half.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    dicom = save_dicom(raw / "disc" / "cut.dcm", np.rint(phantom("disc", 7) * 4000), "P-77")
    dicom.write_bytes(dicom.read_bytes()[:-300])
    nan_volume = np.ones((8, 8, 4), np.float32)
    nan_volume[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(nan_volume, np.eye(4)), raw / "square" / "nan.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 2, 2), np.float32), np.eye(4)), raw / "square" / "five_d.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((8,), np.float32), np.eye(4)), raw / "square" / "line.nii")
    (raw / "disc" / "notes.txt").write_text("reading notes")
    save_png(raw / "top.png", grey)  # not inside a class folder
    (raw / "disc" / os.fsdecode(b"caf\xe9.png")).write_bytes(whole)  # Latin-1 name: not UTF-8
    (raw / "empty_class").mkdir()
    outside = tmp_path / "outside"
    save_png(outside / "secret.png", grey)
    os.symlink(outside / "secret.png", raw / "disc" / "link_out.png")
    os.symlink(outside, raw / "linked_class")
    return raw, good


def test_folder_rejects_each_bad_file_with_a_reason_and_ingests_the_rest(tmp_path: Path) -> None:
    raw, good = build_messy_folder(tmp_path)
    paths = PipelinePaths(tmp_path, "messy")
    summary = ingest(cfg_for({"kind": "folder", "path": "raw"}), paths)

    rows = read_table(paths.real).to_pylist()
    assert {r["source"] for r in rows} == {pseudonymise_path(g, keep=1) for g in good}  # names below the class hashed
    reasons = rejects_of(paths)
    expected = {
        "disc/colour.png": ("colour image", "set preprocess.channels: 3 or convert the file to grey"),
        "disc/garbage.png": ("corrupt", "re-export the file or remove it"),
        "disc/half.png": ("corrupt", "re-export the file or remove it"),
        "square/half.jpg": ("corrupt", "re-export the file or remove it"),
        "disc/cut.dcm": ("DICOM", "re-export it or remove it"),
        "square/nan.nii.gz": ("1 NaN/inf samples", "fix or remove the file"),
        "square/five_d.nii.gz": ("NIfTI of shape (4, 4, 4, 2, 2)", "split 4D series"),
        "square/line.nii": ("NIfTI of shape (8,)", "expected 2D, 3D or 4D"),
        "disc/notes.txt": ("unsupported file type", "convert or remove it"),
        "top.png": ("outside any class sub-folder", "move it into raw/<label>/"),
        os.fsdecode(b"disc/caf\xe9.png"): ("not valid UTF-8", "rename it"),
        "disc/link_out.png": ("escapes the dataset root", "copy the file in"),
        "linked_class/secret.png": ("escapes the dataset root", "copy the file in"),
    }
    expected = {pseudonymise_path(f, keep=int("/" in f)): v for f, v in expected.items()}
    assert set(reasons) == set(expected)
    for file, fragments in expected.items():
        for fragment in fragments:
            assert fragment in reasons[file], (file, reasons[file])
    # nothing lost: every file below raw/ is either a row or a reject
    assert summary["rows"] == len(good) and summary["rejects"] == len(expected)
    assert read_manifest(paths.real)["provenance"]["counts"]["rejects"] == len(expected)
    # reasons are the same on every machine: no absolute path of this run leaks into them
    assert str(tmp_path) not in paths.rejects.read_text()


def test_sixteen_bit_and_grey_rgb_inputs_become_full_range_grey(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    sixteen = np.rint(phantom("square", 1) * 4000).astype(np.uint16)  # uses 0..~3600 of 0..65535
    save_png(raw / "square" / "s.png", sixteen)
    grey = grey8("disc", 2)
    save_png(raw / "disc" / "rgb.png", np.stack([grey] * 3, axis=-1))
    paths = PipelinePaths(tmp_path, "t")
    ingest(cfg_for({"kind": "folder", "path": "raw"}), paths)
    images = {r["source"]: decode_image(r["image"]) for r in read_table(paths.real).to_pylist()}
    images = {raw: images[pseudonymise_path(raw, keep=1)] for raw in ("square/s.png", "disc/rgb.png")}
    assert images["square/s.png"].shape == (1, 16, 16) and images["square/s.png"].dtype == np.uint8
    assert images["square/s.png"].max() == 255 and images["square/s.png"].min() == 0  # windowed, not clipped
    assert np.array_equal(images["disc/rgb.png"][0], grey)  # lossless: R = G = B


@pytest.mark.parametrize(
    ("layout", "fragments"),
    [
        ("nothing", ("raw: no image files found", "add images or fix source.path")),
        ("empty_class", ("raw: no image files found", "add images or fix source.path")),
        ("missing", ("raw: source folder not found", "fix source.path in pipelines.yaml")),
        ("all_bad", ("raw: no usable images", "reasons in data/t/rejects.json", "fix the files listed there")),
    ],
)
def test_unusable_folders_are_one_line_data_errors(tmp_path: Path, layout: str, fragments: tuple[str, ...]) -> None:
    if layout != "missing":
        (tmp_path / "raw").mkdir()
    if layout in ("empty_class", "all_bad"):
        (tmp_path / "raw" / "disc").mkdir()
    if layout == "all_bad":
        (tmp_path / "raw" / "disc" / "bad.png").write_bytes(b"garbage")
    paths = PipelinePaths(tmp_path, "t")
    with pytest.raises(DataError) as info:
        ingest(cfg_for({"kind": "folder", "path": "raw"}), paths)
    assert_one_line(str(info.value), *fragments)
    assert not paths.real.exists()
    if layout == "all_bad":
        assert set(rejects_of(paths)) == {pseudonymise_path("disc/bad.png", keep=1)}


# --------------------------------------------------------------------------- CSV
def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_csv_rows_with_bad_paths_and_duplicates_are_rejected_and_the_rest_ingested(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    good = [[f"img/a{i}.png", ("disc", "square")[i % 2], f"P{i}"] for i in range(4)]
    for i in range(4):
        save_png(raw / "img" / f"a{i}.png", grey8(("disc", "square")[i % 2], i))
    save_png(tmp_path / "outside.png", grey8("disc", 9))
    os.symlink(tmp_path / "outside.png", raw / "img" / "link_out.png")
    bad = [
        ["img/a0.png", "disc", "P0"],  # line 6: listed twice
        ["img/./a1.png", "square", "P1"],  # the same file, spelled differently
        ["img/a2.png", "disc", "Z9"],  # the same file for another subject
        ["../outside.png", "disc", "Q1"],
        [str(tmp_path / "outside.png"), "disc", "Q2"],
        ["img/link_out.png", "disc", "Q3"],
        ["img/a\x00.png", "disc", "Q4"],
        ["x" * 300 + ".png", "disc", "Q5"],
        ["img/none.png", "disc", "Q6"],
        ["img/a3.png", "", "Q7"],
        ["img/a3.png", "disc", ""],
        ["", "disc", "Q8"],
        ["img/a3.png", "disc", "Q9", "../outside.png"],  # mask escaping the root
    ]
    write_csv(raw / "list.csv", ["image", "label", "subject", "mask"], good + bad)
    paths = PipelinePaths(tmp_path, "t")
    summary = ingest(cfg_for({"kind": "csv", "path": "raw/list.csv"}), paths)

    assert sorted(r["source"] for r in read_table(paths.real).to_pylist()) == sorted(
        pseudonymise_path(f"img/a{i}.png") for i in range(4)
    )
    rejects = json.loads(paths.rejects.read_text())
    assert summary["rows"] + summary["rejects"] == len(good) + len(bad)  # every CSV row accounted for
    assert summary["rejects"] == len(rejects) == len(bad)
    text = paths.rejects.read_text()
    by_fragment = {
        "the same image is listed at CSV lines 2 and 6; the first is kept, remove the other row": 1,
        "the same image is listed at CSV lines 3 and 7": 1,
        "the same image is listed at CSV lines 4 and 8": 1,
        "path escapes the dataset root; keep images under the CSV root": 4,  # 3 images + 1 mask
        "unusable path (ValueError: embedded null byte); fix the path in the CSV": 1,
        "unusable path (OSError: File name too long); fix the path in the CSV": 1,
        "file not found under the CSV root; fix the path in the CSV (CSV line 14)": 1,
        "missing label (CSV line 15); fill in the label column": 1,
        "missing subject (CSV line 16); fill in the subject column": 1,
        "empty image path; fill in the image column": 1,
        "mask: path escapes the dataset root": 1,
    }
    for fragment, count in by_fragment.items():
        assert sum(fragment in r["reason"] for r in rejects) == count, fragment
    for reject in rejects:
        assert_one_line(reject["reason"])
        assert "\x00" not in reject["file"]
    assert str(tmp_path) not in text.replace(json.dumps(str(tmp_path / "outside.png"))[1:-1], "")


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ("image,label\na.png,disc\n", ("raw/list.csv: missing column(s) subject", "add them to the header row")),
        ("image,label,subject,image\na.png,disc,P1,b.png\n", ("column(s) image appear more than once", "keep one")),
        ("", ("missing column(s) image, label, subject", "got: no header")),
        ("image,label,subject\n", ("header but no rows", "expected one row per image")),
        (b"image,label,subject\n\xff\xfe.png,disc,P1\n", ("unreadable CSV", "expected UTF-8", "fix the file")),
    ],
)
def test_unusable_csv_is_a_one_line_data_error(
    tmp_path: Path, content: str | bytes, fragments: tuple[str, ...]
) -> None:
    target = tmp_path / "raw" / "list.csv"
    target.parent.mkdir(parents=True)
    target.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as info:
        ingest(cfg_for({"kind": "csv", "path": "raw/list.csv"}), PipelinePaths(tmp_path, "t"))
    assert_one_line(str(info.value), *fragments)


# --------------------------------------------------------------------------- pipelines.yaml
VALID = "pipelines:\n  demo:\n    source: {kind: mni152}\n    generator: {train: {}}\n"


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("pipelines:\n  demo: [unclosed\n", ("pipelines.yaml: not valid YAML at line 3", "fix the syntax")),
        (VALID + "    seeed: 3\n", ("pipelines.demo.seeed: unknown key", "did you mean 'seed'?")),
        (VALID + "    threads: two\n", ("pipelines.demo.threads: Input should be a valid integer", "(got 'two')")),
        (VALID + "    retrain: {task: segmentaton}\n", ("retrain.task", "did you mean 'segmentation'?")),
        (VALID + "    seed: 1\n    seed: 2\n", ("line 6", "duplicate key 'seed'; give each key once")),
        (VALID + "    retrain: {synthetic_ratio: .inf}\n", ("retrain.synthetic_ratio", "finite number")),
        (
            VALID + "    seed: x\n    threads: y\n    device: tpu\n",
            ("pipelines.demo.seed:", "; pipelines.demo.threads:", "; pipelines.demo.device: got 'tpu'"),
        ),
    ],
)
def test_malformed_pipelines_yaml_is_a_one_line_config_error(tmp_path: Path, text: str, fragments: tuple) -> None:
    path = tmp_path / "pipelines.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_pipelines(path)
    assert_one_line(str(info.value), "pipelines.yaml", *fragments)


def test_pipelines_yaml_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "pipelines.yaml"
    path.write_bytes(VALID.encode("utf-16"))
    with pytest.raises(ConfigError) as info:
        load_pipelines(path)
    assert_one_line(str(info.value), "pipelines.yaml: not UTF-8 text", "re-save it as UTF-8")


# --------------------------------------------------------------------------- CLI
@pytest.mark.integration
def test_cli_prints_one_error_line_and_exits_2(tmp_path: Path) -> None:
    """The real entry point: a broken YAML, an unknown key, an empty source folder."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "pipelines.yaml").write_text("pipelines:\n  demo: {source: {kind: mni152}\n")
    proc = cli(["validate", "--config", "pipelines.yaml"], broken)
    assert proc.returncode == 2
    assert_one_line(proc.stderr, "error: ", "pipelines.yaml: not valid YAML", "fix the syntax")

    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "pipelines.yaml").write_text(VALID + "    synthesis: {count_per_clas: 3}\n")
    proc = cli(["validate"], unknown)
    assert proc.returncode == 2
    assert_one_line(proc.stderr, "synthesis.count_per_clas: unknown key", "did you mean 'count_per_class'?")

    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    write_pipelines(empty, {"e": {"source": {"kind": "folder", "path": "images"}, "generator": {"train": {}}}})
    proc = cli(["stage", "ingest", "--pipeline", "e"], empty, KEY_ENV)
    assert proc.returncode == 2, proc.stderr
    assert_one_line(proc.stderr, "error: images: no image files found", "add images or fix source.path")
    assert proc.stdout == "" and not (empty / "data" / "e" / "real").exists()
