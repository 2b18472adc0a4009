"""Builders shared by the reliability tests: images and DICOM files with fake
identifiers, a small project with a trained tiny generator, and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml
from PIL import Image

from tasks.config import PipelineConfig
from tasks.paths import PipelinePaths
from tasks.train import train
from tests.flows.project import env
from tests.tasks.phantoms import write_real

# Fake identifiers carried by the DICOM files; none may reach an output or a log line.
IDENTIFIERS = {
    "PatientName": "Doe^Jane",
    "PatientBirthDate": "19700101",
    "StudyDate": "20240229",
    "InstitutionName": "Hospital of Nowhere",
    "AccessionNumber": "ACC-998877",
    "ReferringPhysicianName": "Strange^Stephen",
}


def phantom(shape: str, seed: int, size: int = 16) -> np.ndarray:
    """``(size, size)`` float in [0, 1]: a bright disc or square on a dark noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    c = size / 2 + rng.uniform(-1, 1)
    r = size / 4
    inside = (yy - c) ** 2 + (xx - c) ** 2 <= r**2 if shape == "disc" else (abs(yy - c) <= r) & (abs(xx - c) <= r)
    return np.clip(0.1 + 0.7 * inside + rng.normal(0, 0.05, (size, size)), 0, 1)


def save_png(path: Path, array: np.ndarray) -> Path:
    """Save a uint8/uint16 ``(H, W)`` or uint8 ``(H, W, 3)`` array as PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def grey8(shape: str, seed: int, size: int = 16) -> np.ndarray:
    return np.rint(phantom(shape, seed, size) * 255).astype(np.uint8)


def save_dicom(
    path: Path, pixels: np.ndarray, patient_id: str, *, bits: int = 16, identifiers: dict[str, str] = IDENTIFIERS
) -> Path:
    """A DICOM MR image. ``pixels``: (H, W) or (frames, H, W), uint8 (``bits=8``) or
    uint16; carries ``patient_id`` and the fake ``identifiers``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    for keyword, value in identifiers.items():
        setattr(ds, keyword, value)
    ds.Modality = "MR"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype("<u2" if bits == 16 else "u1").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def assert_one_line(message: str, *must_contain: str) -> None:
    """A user-facing error: one non-empty line that contains every given fragment."""
    assert message.strip() and "\n" not in message.strip() and "\r" not in message, repr(message)
    for fragment in must_contain:
        assert fragment in message, (fragment, message)


def cli(args: list[str], cwd: Path, extra_env: dict[str, str] | None = None, timeout_s: float = 120):
    """Run ``python -m flows.cli ARGS`` (the ``synthmed`` entry point) in ``cwd``."""
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=cwd,
        env={**env(), **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def parquet_text(dataset: Path) -> str:
    """Every value and the key/value metadata of every Parquet file below ``dataset``,
    decompressed, as one string (shards are zstd-compressed: raw bytes hide text)."""
    parts = []
    for shard in sorted(Path(dataset).rglob("*.parquet")):
        table = pq.read_table(shard)
        parts.append(repr(table.to_pylist()))
        parts.append(repr(pq.read_metadata(shard).metadata))
    return "\n".join(parts)


# --------------------------------------------------------------------------- project
def pipeline_dict(source: dict | None = None, **synthesis) -> dict:
    """A tiny pipeline: 16 px, a 1-epoch cGAN with 8 channels, small synthesis shards."""
    return {
        "seed": 0,
        "threads": 1,
        "device": "cpu",
        "source": source or {"kind": "folder", "path": "images"},
        "preprocess": {"size": 16},
        "generator": {"train": {"epochs": 1, "batch_size": 16, "latent_dim": 8, "base_channels": 8}},
        "synthesis": {"count_per_class": 4, "shard_rows": 4, "batch_size": 4, **synthesis},
    }


def write_pipelines(root: Path, pipelines: dict[str, dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "pipelines.yaml"
    path.write_text(yaml.safe_dump({"pipelines": pipelines}, sort_keys=False))
    return path


def trained_project(root: Path, pipeline: str, real_seed: int = 0, **synthesis) -> tuple[PipelineConfig, PipelinePaths]:
    """A real phantom dataset and a trained tiny generator for ``pipeline`` under ``root``
    (added to ``root/pipelines.yaml``), ready for ``synthesize``."""
    config = root / "pipelines.yaml"
    pipelines = yaml.safe_load(config.read_text())["pipelines"] if config.is_file() else {}
    pipelines[pipeline] = pipeline_dict(**synthesis)
    write_pipelines(root, pipelines)
    cfg = PipelineConfig.model_validate(pipelines[pipeline])
    paths = PipelinePaths(root, pipeline)
    write_real(paths.real, {"train": 4, "val": 1, "test": 1}, size=16, masks=False, seed=real_seed)
    train(cfg, paths)
    return cfg, paths
