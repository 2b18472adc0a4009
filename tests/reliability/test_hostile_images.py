"""Hostile images: a few hundred bytes that claim gigapixels or gigavoxels, extreme aspect
ratios, and an absolute ``source.path``. Each bad file is one reject with a reason, found
from the header before any pixel is decoded (memory stays bounded); the rest is ingested."""

from __future__ import annotations

import gzip
import json
import resource
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from generators.errors import ConfigError
from generators.shards import read_table
from tasks.config import PipelineConfig, load_pipelines
from tasks.ingest import ingest
from tasks.paths import PipelinePaths
from tasks.pseudonym import pseudonymise_path
from tasks.stages import dvc_stages
from tests.reliability.helpers import assert_one_line, cli, grey8, pipeline_dict, save_png, write_pipelines

MiB = 1024 * 1024


def good_images(raw: Path, n: int = 3) -> set[str]:
    """``n`` 16 px PNGs per class (disc, square); returns their ``source`` uris."""
    uris = set()
    for c, shape in enumerate(("disc", "square")):
        for i in range(n):
            save_png(raw / shape / f"s{c}{i}.png", grey8(shape, 10 * c + i))
            uris.add(pseudonymise_path(f"{shape}/s{c}{i}.png", keep=1))
    return uris


def cfg_for(**preprocess) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "source": {"kind": "folder", "path": "raw"},
            "generator": {"train": {}},
            "threads": 1,
            "preprocess": {"size": 16, **preprocess},
        }
    )


def rejects_of(paths: PipelinePaths) -> dict[str, str]:
    rejects = json.loads(paths.rejects.read_text())
    for reject in rejects:
        assert_one_line(reject["reason"])
    return {r["file"]: r["reason"] for r in rejects}


def ingest_measured(cfg: PipelineConfig, paths: PipelinePaths) -> tuple[dict, int, int]:
    """Run ingest; returns (summary, peak traced bytes, growth of the process's peak RSS in bytes)."""
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    tracemalloc.start()
    try:
        summary = ingest(cfg, paths)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    return summary, peak, rss_growth


def test_a_139_byte_1x60000_png_is_one_reject_with_bounded_memory(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    good = good_images(raw)
    bomb = raw / "disc" / "strip.png"
    Image.new("L", (60000, 1), 200).save(bomb, optimize=True)
    assert bomb.stat().st_size < 400  # a few hundred bytes that used to allocate 13.4 GiB
    paths = PipelinePaths(tmp_path, "t")
    summary, peak, rss_growth = ingest_measured(cfg_for(), paths)

    assert {r["source"] for r in read_table(paths.real).to_pylist()} == good
    reasons = rejects_of(paths)
    assert set(reasons) == {pseudonymise_path("disc/strip.png", keep=1)} and summary["rejects"] == 1
    assert "aspect ratio 60000:1" in reasons[pseudonymise_path("disc/strip.png", keep=1)]
    assert "preprocess.max_aspect_ratio" in reasons[pseudonymise_path("disc/strip.png", keep=1)]
    assert peak < 64 * MiB and rss_growth < 512 * MiB, (peak, rss_growth)


def test_an_elongated_image_within_the_limits_is_resized_without_padding_blow_up(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    good = good_images(raw)
    strip = np.tile(grey8("disc", 5, size=8), (1, 625))  # 8 x 5000: a padded square would be 100 MB
    save_png(raw / "disc" / "long.png", strip)
    paths = PipelinePaths(tmp_path, "t")
    summary, peak, _ = ingest_measured(cfg_for(max_aspect_ratio=1000), paths)

    sources = {r["source"] for r in read_table(paths.real).to_pylist()}
    assert sources == good | {pseudonymise_path("disc/long.png", keep=1)} and summary["rejects"] == 0
    assert peak < 48 * MiB, peak  # the 5000 x 5000 float32 square (95 MiB) was never built


def test_over_max_pixels_is_one_reject_read_from_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    raw = tmp_path / "raw"
    good = good_images(raw)
    Image.new("L", (300, 300), 100).save(raw / "square" / "big.png")
    paths = PipelinePaths(tmp_path, "t")
    summary = ingest(cfg_for(max_pixels=256 * 256), paths)
    assert {r["source"] for r in read_table(paths.real).to_pylist()} == good
    reason = rejects_of(paths)[pseudonymise_path("square/big.png", keep=1)]
    assert "300 x 300 = 90000 pixels, over preprocess.max_pixels = 65536" in reason and summary["rejects"] == 1
    assert Image.MAX_IMAGE_PIXELS == 256 * 256  # Pillow's own guard follows the configured limit


def write_nifti_bomb(path: Path, shape: tuple[int, int, int]) -> None:
    """A valid gzip NIfTI-1 of uint8 zeros with ``shape``, streamed: tiny on disk (zeros compress)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    header.set_qform(np.eye(4), 1)
    header["vox_offset"] = 352
    chunk = bytes(16 * MiB)
    total = int(np.prod(shape))
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb", compresslevel=6) as handle:
        handle.write(header.binaryblock + b"\0" * 4)
        for start in range(0, total, len(chunk)):
            handle.write(chunk[: min(len(chunk), total - start)])


def test_a_small_gzip_nifti_of_1024x1024x512_is_one_reject_with_bounded_memory(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    good = good_images(raw)
    bomb = raw / "square" / "huge.nii.gz"
    write_nifti_bomb(bomb, (1024, 1024, 512))
    assert bomb.stat().st_size < 3 * MiB and nib.load(str(bomb)).shape == (1024, 1024, 512)
    paths = PipelinePaths(tmp_path, "t")
    summary, peak, rss_growth = ingest_measured(cfg_for(), paths)

    assert {r["source"] for r in read_table(paths.real).to_pylist()} == good
    reason = rejects_of(paths)[pseudonymise_path("square/huge.nii.gz", keep=1)]
    assert "volume of shape (1024, 1024, 512) = 536870912 voxels, over preprocess.max_voxels" in reason
    assert summary["rejects"] == 1
    assert peak < 64 * MiB and rss_growth < 512 * MiB, (peak, rss_growth)  # the data (2 GiB as float32) never read


def test_a_dicom_claiming_too_many_voxels_is_rejected_before_decoding(tmp_path: Path) -> None:
    from tests.reliability.helpers import save_dicom

    raw = tmp_path / "raw"
    good = good_images(raw)
    path = save_dicom(raw / "disc" / "cine.dcm", np.zeros((4, 16, 16), np.uint16), "P9")
    import pydicom

    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns, ds.NumberOfFrames = 4096, 4096, 64  # claims 1 Gvoxel; PixelData unchanged
    ds.save_as(path, enforce_file_format=True)
    paths = PipelinePaths(tmp_path, "t")
    ingest(cfg_for(), paths)
    assert {r["source"] for r in read_table(paths.real).to_pylist()} == good
    assert (
        "= 1073741824 voxels, over preprocess.max_voxels"
        in rejects_of(paths)[pseudonymise_path("disc/cine.dcm", keep=1)]
    )


@pytest.mark.parametrize(
    ("preprocess", "key"),
    [({"max_pixels": 0}, "max_pixels"), ({"max_voxels": -1}, "max_voxels"), ({"max_aspect_ratio": 0.5}, "max_aspect")],
)
def test_size_limits_are_checked_by_validate(tmp_path: Path, preprocess: dict, key: str) -> None:
    config = write_pipelines(tmp_path, {"p": {**pipeline_dict(), "preprocess": {"size": 16, **preprocess}}})
    with pytest.raises(ConfigError) as info:
        load_pipelines(config)
    assert_one_line(str(info.value), f"pipelines.p.preprocess.{key}")


def test_an_absolute_source_path_outside_the_project_ingests_and_skips_when_current(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / "images"
    good = good_images(outside)
    project = tmp_path / "project"
    write_pipelines(project, {"p": pipeline_dict({"kind": "folder", "path": str(outside)})})

    first = cli(["stage", "ingest", "--pipeline", "p"], cwd=project)
    assert first.returncode == 0 and "Traceback" not in first.stderr, first.stderr[-2000:]
    assert json.loads(first.stdout)["skipped"] is False
    assert {r["source"] for r in read_table(PipelinePaths(project, "p").real).to_pylist()} == good
    again = cli(["stage", "ingest", "--pipeline", "p", "--skip-current"], cwd=project)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr[-2000:]
    assert json.loads(again.stdout)["skipped"] is True
    (outside / "disc" / "s00.png").unlink()  # the external data changed: not current any more
    third = cli(["stage", "ingest", "--pipeline", "p", "--skip-current"], cwd=project)
    assert third.returncode == 0 and json.loads(third.stdout)["skipped"] is False, third.stderr[-2000:]

    cfg = load_pipelines(project / "pipelines.yaml").pipelines["p"]
    assert str(outside) in dvc_stages("p", cfg)["ingest-p"]["deps"]  # DVC: an external (absolute) dependency
