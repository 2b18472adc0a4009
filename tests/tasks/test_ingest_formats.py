"""Ingest of what hospital archives hold, on real files: pydicom's and nibabel's own test
files (shipped in their wheels) and files derived from them.

Each file type is decoded, paired as a mask, or refused with a one-line reason that
names the fix (issue 14 item 3).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from generators.shards import decode_png, read_table
from tasks.config import PipelineConfig
from tasks.ingest import ingest
from tasks.paths import PipelinePaths
from tasks.pseudonym import pseudonymise_path
from tasks.reader_base import OneLineRecords, ReadError, library_line, one_line
from tasks.readers import read_image, read_mask
from tasks.readers_dicom import read_dicom_seg
from tests.reliability.helpers import assert_one_line

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
CIFTI_DCONN = NIBABEL_DATA / "row_major.dconn.nii"
SEG_SOURCE_UID = "1.2.392.200103.20080913.113635.2.2009.6.22.21.43.10.23433.1"  # liver_1frame.dcm, frame 1


def shipped(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, f"{name} is not shipped in the pydicom wheel"
    return Path(path)


def config(source: dict, **preprocess) -> PipelineConfig:
    return PipelineConfig.model_validate({"source": source, "generator": {"train": {}}, "preprocess": preprocess})


def project_with(tmp_path: Path, files: dict[str, Path | None]) -> PipelinePaths:
    """``tmp_path/raw/<rel>`` copies of ``files`` (``None``: a grey phantom PNG), for a folder source."""
    for rel, src in files.items():
        dest = tmp_path / "raw" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src is None:
            yy, xx = np.mgrid[:32, :32]
            Image.fromarray(((np.hypot(yy - 16, xx - 16) < 9) * 200 + 20).astype(np.uint8)).save(dest)
        else:
            shutil.copy(src, dest)
    return PipelinePaths(tmp_path, "p")


def run(paths: PipelinePaths, **preprocess) -> tuple[list[dict], dict[str, str]]:
    ingest(config({"kind": "folder", "path": "raw"}, size=32, min_foreground=0.0, **preprocess), paths)
    rejects = {r["file"]: r["reason"] for r in json.loads(paths.rejects.read_text())}
    for reason in rejects.values():
        assert_one_line(reason)
    return read_table(paths.real).to_pylist(), rejects


def sources(rows: list[dict]) -> set[str]:
    return {r["source"] for r in rows}


def uri(rel: str) -> str:
    return pseudonymise_path(rel, keep=1)


def assert_log_lines_are_single(caplog: pytest.LogCaptureFixture) -> None:
    assert "Traceback" not in caplog.text
    for record in caplog.records:
        message = record.getMessage()
        assert "\n" not in message and not record.exc_info, message


# --------------------------------------------------------------------------- transfer syntaxes
def test_jpeg_ls_lossless_decodes_to_the_same_pixels_as_the_uncompressed_file() -> None:
    plain = read_image(shipped("MR_small.dcm"))
    jls = read_image(shipped("MR_small_jpeg_ls_lossless.dcm"))  # pyjpegls
    assert jls.kind == "image" and jls.array.shape == (1, 64, 64)
    assert np.array_equal(jls.array, plain.array)
    near = read_image(shipped("JPEGLSNearLossless_16.dcm"))
    assert near.array.shape == (1, 50, 10) and near.array.max() == 65535


def test_12bit_jpeg_extended_is_decoded_without_library_tracebacks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    decoded = read_image(shipped("JPEG-lossy.dcm"))  # Pillow and pydicom's GDCM plugin refuse it
    assert decoded.array.shape == (1, 1024, 256) and not decoded.eight_bit
    assert decoded.array[0, 420, 140] == 244 and decoded.array[0, 230, 120] == 95  # pydicom's reference values
    paths = project_with(
        tmp_path, {"nm/lossy.dcm": shipped("JPEG-lossy.dcm"), "nm/ext.dcm": shipped("JPGExtended.dcm")}
    )
    with caplog.at_level(logging.DEBUG):
        rows, rejects = run(paths)
    assert sources(rows) == {uri("nm/lossy.dcm"), uri("nm/ext.dcm")} and not rejects
    assert_log_lines_are_single(caplog)


def test_a_syntax_without_an_installed_decoder_is_refused_naming_the_package(tmp_path: Path) -> None:
    from pydicom.encaps import encapsulate
    from pydicom.uid import HTJ2KLossless

    ds = pydicom.dcmread(shipped("MR_small.dcm"))
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless  # no HTJ2K decoder is installed
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(64)])
    ds["PixelData"].VR = "OB"
    paths = project_with(tmp_path, {"mr/ok.png": None})
    ds.save_as(tmp_path / "raw" / "mr" / "htj2k.dcm", enforce_file_format=True)
    _, rejects = run(paths)
    assert_one_line(rejects[uri("mr/htj2k.dcm")], "High-Throughput JPEG 2000", "pip install pylibjpeg-openjpeg")


def test_corrupt_compressed_pixel_data_is_one_reject_and_library_logs_stay_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pydicom.encaps import encapsulate, generate_frames

    paths = project_with(tmp_path, {"mr/ok.png": None})
    for name, cut in (
        ("cut.dcm", lambda f: f[: len(f) // 3]),
        ("broken.dcm", lambda f: f[: len(f) // 3] + b"\xff\xd9"),
    ):
        ds = pydicom.dcmread(shipped("MR_small_jpeg_ls_lossless.dcm"))
        ds.PixelData = encapsulate([cut(next(generate_frames(ds.PixelData, number_of_frames=1)))])
        ds.save_as(tmp_path / "raw" / "mr" / name, enforce_file_format=True)
    with caplog.at_level(logging.DEBUG):
        rows, rejects = run(paths)
    assert sources(rows) == {uri("mr/ok.png")}
    assert_one_line(rejects[uri("mr/cut.dcm")], "truncated JPEG-LS", "no end-of-image marker", "re-export")
    assert_one_line(rejects[uri("mr/broken.dcm")], "JPEG-LS", "could not be decoded", "re-export it")
    assert any(r.name.startswith("pydicom") for r in caplog.records)  # the decoders did log their failure...
    assert_log_lines_are_single(caplog)  # ...on one line each, no traceback


def test_library_records_become_one_warning_line_without_values() -> None:
    try:
        raise RuntimeError("decoder failed\n  at frame 1")
    except RuntimeError:
        record = logging.getLogger("pydicom.test").makeRecord(
            "pydicom.test", logging.ERROR, __file__, 1, "Invalid value 'PAT-12345' for\nVR LO", None, None
        )
        record.exc_info = sys.exc_info()
    assert OneLineRecords().filter(record)
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert record.getMessage() == "Invalid value '<value>' for VR LO (RuntimeError: decoder failed at frame 1)"
    assert library_line('bad "x\ny" here') == "bad '<value>' here"
    assert one_line("word " * 100, 30) == "word word word word word..."  # cut at a word, never mid-word


# --------------------------------------------------------------------------- colour
def test_multiframe_colour_cine_gives_one_rgb_row_per_frame(tmp_path: Path) -> None:
    paths = project_with(
        tmp_path,
        {"us/cine.dcm": shipped("examples_ybr_color.dcm"), "us/rle2.dcm": shipped("SC_rgb_rle_2frame.dcm")},
    )
    rows, rejects = run(paths, channels=3)
    assert not rejects
    expected = {f"{uri('us/cine.dcm')}#frame={k:03d}" for k in range(30)}
    expected |= {f"{uri('us/rle2.dcm')}#frame={k:03d}" for k in range(2)}
    assert sources(rows) == expected
    image = decode_png(next(r["image"] for r in rows if r["source"] == f"{uri('us/rle2.dcm')}#frame=000"))
    assert image.shape == (3, 32, 32) and np.abs(image[0].astype(int) - image[2].astype(int)).max() > 100  # colour


def test_multiframe_colour_with_grey_channels_is_refused_naming_the_option(tmp_path: Path) -> None:
    paths = project_with(tmp_path, {"us/ok.png": None, "us/rle2.dcm": shipped("SC_rgb_rle_2frame.dcm")})
    _, rejects = run(paths, channels=1)
    assert_one_line(rejects[uri("us/rle2.dcm")], "colour image", "set preprocess.channels: 3")


def test_palette_colour_is_decoded_through_its_palette() -> None:
    from pydicom.pixels import apply_color_lut

    decoded = read_image(shipped("examples_palette.dcm"))
    ds = pydicom.dcmread(shipped("examples_palette.dcm"))
    expected = np.moveaxis(apply_color_lut(ds.pixel_array, ds) >> 8, -1, 0)  # 16-bit palette entries
    assert decoded.kind == "image" and decoded.eight_bit and decoded.array.shape == (3, 350, 800)
    assert np.array_equal(decoded.array, expected.astype(np.float32))
    assert np.mean(decoded.array.max(axis=0) - decoded.array.min(axis=0)) > 1  # not the grey palette indices


# --------------------------------------------------------------------------- privacy
def test_burned_in_annotation_is_refused_unless_allowed(tmp_path: Path) -> None:
    ds = pydicom.dcmread(shipped("CT_small.dcm"))
    ds.BurnedInAnnotation = "YES"
    paths = project_with(tmp_path, {"ct/ok.png": None})
    ds.save_as(tmp_path / "raw" / "ct" / "burned.dcm", enforce_file_format=True)
    rows, rejects = run(paths)
    assert uri("ct/burned.dcm") not in sources(rows)
    assert_one_line(rejects[uri("ct/burned.dcm")], "BurnedInAnnotation YES", "preprocess.allow_burned_in_annotation")
    rows, rejects = run(paths, allow_burned_in_annotation=True)
    assert uri("ct/burned.dcm") in sources(rows) and not rejects


# --------------------------------------------------------------------------- non-images
def test_non_images_are_refused_with_reasons(tmp_path: Path) -> None:
    paths = project_with(
        tmp_path,
        {
            "x/ok.png": None,
            "x/conn.dconn.nii": CIFTI_DCONN,
            "x/standard.nii.gz": NIBABEL_DATA / "standard.nii.gz",  # 4 x 5 x 7 voxels
            "x/seg_alone.dcm": shipped("liver_1frame.dcm"),
            "x/dose.dcm": shipped("rtdose.dcm"),
        },
    )
    nib.save(nib.Nifti1Image(np.arange(20, dtype=np.float32).reshape(4, 5), np.eye(4)), paths.root / "raw/x/tiny2d.nii")
    tiny = np.arange(60, dtype=np.float32).reshape(4, 5, 3)
    nib.save(nib.Nifti1Image(tiny, np.eye(4)), paths.root / "raw/x/tiny3d.nii.gz")
    label = nib.Nifti1Image(np.ones((16, 16, 4), np.uint8), np.eye(4))
    label.header.set_intent("label")
    nib.save(label, paths.root / "raw/x/orphan_labels.nii.gz")
    rows, rejects = run(paths)
    assert sources(rows) == {uri("x/ok.png")}
    assert_one_line(rejects[uri("x/conn.dconn.nii")], "CIFTI-2", "not an image grid", "remove it")
    assert_one_line(rejects[uri("x/seg_alone.dcm")], "DICOM SEG", "none of them in the source", "add the referenced")
    assert_one_line(rejects[uri("x/dose.dcm")], "RT Dose", "remove it")
    assert_one_line(rejects[uri("x/tiny2d.nii")], "5 x 4 pixels", "too small")
    assert_one_line(rejects[uri("x/tiny3d.nii.gz")], "too small")
    assert_one_line(rejects[uri("x/standard.nii.gz")], "5 x 4 pixels", "too small", "remove the file")
    assert_one_line(rejects[uri("x/orphan_labels.nii.gz")], "label map", "_seg.nii.gz", "CSV mask column")


# --------------------------------------------------------------------------- masks
def test_dicom_seg_becomes_the_mask_of_the_image_it_references(tmp_path: Path) -> None:
    seg_path = shipped("liver_1frame.dcm")
    truth = read_dicom_seg(seg_path)
    assert set(truth) == {SEG_SOURCE_UID} and set(np.unique(truth[SEG_SOURCE_UID])) == {0, 1}
    ct = pydicom.dcmread(shipped("CT_small.dcm"))  # a real CT, given the UID and size the SEG references
    ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = SEG_SOURCE_UID
    pixels = ct.pixel_array
    ct.Rows = ct.Columns = 512
    ct.PixelData = np.tile(pixels, (4, 4)).astype(pixels.dtype).tobytes()
    paths = project_with(tmp_path, {"liver/seg.dcm": seg_path, "liver/other.png": None})
    ct.save_as(paths.root / "raw" / "liver" / "ct.dcm", enforce_file_format=True)
    rows, rejects = run(paths)
    assert not rejects and sources(rows) == {uri("liver/ct.dcm"), uri("liver/other.png")}  # the SEG is no row
    row = next(r for r in rows if r["source"] == uri("liver/ct.dcm"))
    mask = decode_png(row["mask"])
    expected = np.asarray(Image.fromarray(truth[SEG_SOURCE_UID]).resize((32, 32), Image.Resampling.NEAREST))
    assert mask.shape[-2:] == (32, 32) and np.array_equal(mask.reshape(32, 32), expected)


def test_overlapping_seg_segments_are_refused(tmp_path: Path) -> None:
    ds = pydicom.dcmread(shipped("liver_1frame.dcm"))
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2  # the same bits twice: frame 2 repeats frame 1
    second = copy.deepcopy(ds.PerFrameFunctionalGroupsSequence[0])  # same source image...
    second.SegmentIdentificationSequence[0].ReferencedSegmentNumber = 2  # ...other segment
    ds.PerFrameFunctionalGroupsSequence = [ds.PerFrameFunctionalGroupsSequence[0], second]
    segment = copy.deepcopy(ds.SegmentSequence[0])
    segment.SegmentNumber = 2
    ds.SegmentSequence.append(segment)
    path = tmp_path / "overlap.dcm"
    ds.save_as(path)
    with pytest.raises(ReadError) as caught:
        read_dicom_seg(path)
    assert_one_line(str(caught.value), "segments 1 and 2 overlap", "make the segments disjoint")


def test_nifti_label_map_named_seg_is_paired_as_the_volume_mask(tmp_path: Path) -> None:
    volume = np.zeros((16, 16, 3), np.float32)
    volume[4:12, 4:12] = 100.0
    labels = np.zeros((16, 16, 3), np.uint8)
    labels[4:12, 4:8], labels[4:12, 8:12] = 1, 2
    paths = project_with(tmp_path, {})
    (paths.root / "raw" / "brain").mkdir(parents=True)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), paths.root / "raw/brain/case1.nii.gz")
    label = nib.Nifti1Image(labels, np.eye(4))
    label.header.set_intent("label")
    nib.save(label, paths.root / "raw/brain/case1_seg.nii.gz")
    rows, rejects = run(paths)
    assert not rejects and sources(rows) == {f"{uri('brain/case1.nii.gz')}#slice={k:03d}" for k in range(3)}
    masks = [decode_png(r["mask"]) for r in rows]
    assert all(set(np.unique(m)) == {0, 1, 2} for m in masks)
    assert np.array_equal(read_mask(paths.root / "raw/brain/case1_seg.nii.gz"), labels)


def test_label_values_outside_a_byte_reject_the_mask(tmp_path: Path) -> None:
    path = tmp_path / "bad_seg.nii.gz"
    nib.save(nib.Nifti1Image(np.full((16, 16, 2), 300, np.int16), np.eye(4)), path)
    with pytest.raises(ReadError) as caught:
        read_mask(path)
    assert_one_line(str(caught.value), "mask values 300..300", "0..255")


# --------------------------------------------------------------------------- paths
def test_an_absolute_csv_source_outside_the_project_ingests(tmp_path: Path) -> None:
    data = tmp_path / "archive"
    project_with(data, {"img/a.png": None, "img/b.png": None})
    listing = data / "list.csv"
    listing.write_text("image,label,subject\nraw/img/a.png,x,P1\nraw/img/b.png,x,P2\n")
    paths = PipelinePaths(tmp_path / "project", "p")
    summary = ingest(config({"kind": "csv", "path": str(listing)}, size=32), paths)
    assert summary["rows"] == 2 and summary["rejects"] == 0


def test_library_warnings_during_ingest_become_one_log_line_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = project_with(tmp_path, {"mr/padded.dcm": shipped("MR_small_padded.dcm"), "mr/ok.png": None})
    with warnings.catch_warnings(record=True) as escaped, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        rows, rejects = run(paths)
    assert not rejects and uri("mr/padded.dcm") in sources(rows)
    assert not [w for w in escaped if "pixel data" in str(w.message)]  # not Python's two-line warning output...
    lines = [r.getMessage() for r in caplog.records if r.name == "tasks.ingest" and "while reading" in r.getMessage()]
    assert len(lines) == 1 and "UserWarning: The pixel data is 8320 bytes long" in lines[0]  # ...one log line
    assert_log_lines_are_single(caplog)
