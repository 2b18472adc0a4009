"""Export a pipeline's synthetic images as files other tools read: PNG, NIfTI or DICOM.

``synthmed export-synthetic --pipeline P --format png|nifti|dicom --out DIR`` reads the
kept synthetic set (``data/<P>/filtered/``, or ``--dataset synthetic`` for everything
generated), verifies it (sha256 of every shard) and writes one file per image::

    DIR/<label>/<id>.png | .nii.gz | .dcm          the image
    DIR/<label>/<id>_mask.png | .nii.gz | .dcm     its mask (paired generators), uint8 class indices
    DIR/manifest.csv                               image,label,subject,mask,source,seed
    DIR/export.json                                what was exported, from which dataset version

``manifest.csv`` has the columns of a synthmed ``csv`` source (``image, label, subject,
mask``; paths relative to DIR), so an exported set can be ingested again; ``subject`` is the
synthetic row id (no real subject behind it). Pixels are written exactly as stored (uint8 or
uint16, lossless), so reading a file back gives the stored array.

- **PNG**: grey (``L`` / ``I;16``) or RGB, as ``generators.shards.encode_png`` writes them.
- **NIfTI** (grey only): a 2D image ``(H, W)`` is stored as data of shape ``(W, H, 1)`` with
  ``data[..., 0] = np.rot90(image, -1)`` and an identity (RAS+) affine, the convention of
  ``tasks.readers.cut_volume``: ``np.rot90(nib.load(f).get_fdata()[..., 0])`` is the image.
- **Volumes** (``preprocess.dims: 3``): NIfTI only, one ``.nii.gz`` per volume (and mask),
  data ``(D, H, W)`` exactly as stored (canonical RAS voxel axes) with the affine
  ``diag(spacing_mm)`` of the real dataset's ingest (1 mm when unknown); PNG and DICOM
  refuse a volume set with one line.
- **DICOM**: Secondary Capture Image Storage, explicit VR little endian, one instance per
  image, fresh UIDs (one study per export, one series per class; ``pydicom.uid.generate_uid``),
  and tags that mark it synthetic: PatientName ``SYNTHETIC``, PatientID ``SYNTHETIC``,
  ConversionType ``SYN`` (synthetic image), ImageType ``DERIVED\\SECONDARY``,
  BurnedInAnnotation ``NO``, PatientIdentityRemoved ``YES``, DerivationDescription naming
  the generator and the seed, and a private block (creator ``SYNTHMED``, group 0x0011):
  ``(0011,1001)`` ``SYNTHETIC``, ``(0011,1002)`` generator, ``(0011,1003)`` seed,
  ``(0011,1004)`` label. No date, time, institution or real identifier is written.

Output names come from row ids (``[A-Za-z0-9._-]`` kept, anything else ``_``) and labels the
same way; ``DIR`` must be empty or absent, so an export never overwrites other files. A set
the quality gate rejected (``quality.json`` ``gate.passed`` false) is refused unless
``--allow-rejected``.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np

from generators.errors import DataError
from generators.shards import decode_image, encode_png, iter_tables, read_manifest, verify_dataset
from tasks.paths import PipelinePaths
from tasks.progress import Progress

log = logging.getLogger(__name__)

Format = Literal["png", "nifti", "dicom"]
FORMATS: tuple[str, ...] = ("png", "nifti", "dicom")
SUFFIXES = {"png": ".png", "nifti": ".nii.gz", "dicom": ".dcm"}
DATASETS = ("filtered", "synthetic")
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
PRIVATE_CREATOR = "SYNTHMED"
PRIVATE_GROUP = 0x0011
SYNTHETIC = "SYNTHETIC"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class Item:
    """One stored row. ``image``: ``(C, H, W)`` uint8/uint16; ``mask``: ``(H, W)`` uint8 or None
    (a volume: ``(1, D, H, W)`` and ``(D, H, W)``)."""

    id: str
    label: str
    image: np.ndarray
    mask: np.ndarray | None
    generator: str
    seed: int | None


@dataclass(frozen=True)
class DicomContext:
    """UIDs shared by the instances of one export: one study, one series per class."""

    study_uid: str
    series_uids: dict[str, str]


def safe_name(text: str) -> str:
    """A file or folder name from a row id or label: ``[A-Za-z0-9._-]`` kept, anything
    else ``_``; never empty, never ``.`` or ``..``."""
    name = _UNSAFE.sub("_", text).strip(".") or "_"
    return name[:120]


# --------------------------------------------------------------------------- writers
def write_png(array: np.ndarray, path: Path) -> None:
    """``array``: ``(C, H, W)`` uint8/uint16 (C = 1 or 3) or a ``(H, W)`` uint8 mask."""
    path.write_bytes(encode_png(array if array.ndim == 3 else array[None]))


def write_nifti(array: np.ndarray, path: Path) -> None:
    """``array``: ``(1, H, W)`` uint8/uint16 or a ``(H, W)`` uint8 mask; stored ``(W, H, 1)``
    with an identity affine (see the module docstring)."""
    import nibabel as nib

    plane = array[0] if array.ndim == 3 else array
    if array.ndim == 3 and array.shape[0] != 1:
        raise DataError(
            f"NIfTI export takes grey images, got {array.shape[0]} channels; use --format png or dicom for RGB"
        )
    data = np.ascontiguousarray(np.rot90(plane, -1))[..., None]
    image = nib.Nifti1Image(data, np.eye(4))
    image.header.set_data_dtype(data.dtype)
    image.header["descrip"] = b"synthmed synthetic image"
    nib.save(image, str(path))


def write_nifti_volume(array: np.ndarray, path: Path, spacing_mm: tuple[float, float, float]) -> None:
    """``array``: a ``(1, D, H, W)`` uint8/uint16 volume or a ``(D, H, W)`` uint8 mask, stored
    as is (RAS voxel axes) with the affine ``diag(spacing_mm)``."""
    import nibabel as nib

    data = np.ascontiguousarray(array[0] if array.ndim == 4 else array)
    image = nib.Nifti1Image(data, np.diag([*spacing_mm, 1.0]))
    image.header.set_data_dtype(data.dtype)
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = b"synthmed synthetic volume"
    nib.save(image, str(path))


def real_spacing(paths: PipelinePaths) -> tuple[float, float, float]:
    """The voxel spacing (mm) the real dataset was resampled to, from its manifest; 1 mm
    when it does not say."""
    try:
        spacing = read_manifest(paths.real).get("provenance", {}).get("spacing_mm")
    except DataError:
        spacing = None
    if isinstance(spacing, list) and len(spacing) == 3:
        return (float(spacing[0]), float(spacing[1]), float(spacing[2]))
    return (1.0, 1.0, 1.0)


def _dicom_dataset(array: np.ndarray, item: Item, context: DicomContext, number: int, mask: bool) -> Any:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SECONDARY_CAPTURE, sop_uid
    ds.StudyInstanceUID = context.study_uid
    ds.SeriesInstanceUID = context.series_uids[item.label + ("/mask" if mask else "")]
    ds.PatientName, ds.PatientID = SYNTHETIC, SYNTHETIC
    ds.PatientBirthDate, ds.PatientSex = "", ""
    ds.PatientIdentityRemoved = "YES"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "", "", "", "", ""
    ds.Modality, ds.ConversionType = "OT", "SYN"
    ds.SeriesNumber, ds.InstanceNumber = 2 if mask else 1, number
    ds.SeriesDescription = f"synthmed synthetic {item.label}{' mask' if mask else ''}"[:64]
    ds.ImageType = ["DERIVED", "SECONDARY"] + (["MASK"] if mask else [])
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    seed = "unknown" if item.seed is None else str(item.seed)
    ds.DerivationDescription = f"synthetic image generated by {item.generator} with seed {seed} (synthmed)"[:1024]
    ds.ImageComments = f"label {item.label}; row {item.id}" + ("; mask of uint8 class indices" if mask else "")
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", SYNTHETIC)
    block.add_new(0x02, "LO", item.generator[:64])
    block.add_new(0x03, "LO", seed)
    block.add_new(0x04, "LO", item.label[:64])
    channels = array.shape[0] if array.ndim == 3 else 1
    pixels = np.moveaxis(array, 0, -1) if channels == 3 else (array[0] if array.ndim == 3 else array)
    bits = 16 if array.dtype == np.uint16 else 8
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.SamplesPerPixel = channels
    ds.PhotometricInterpretation = "RGB" if channels == 3 else "MONOCHROME2"
    if channels == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = np.ascontiguousarray(pixels.astype(f"<u{bits // 8}")).tobytes()
    return ds


def write_dicom(array: np.ndarray, path: Path, item: Item, context: DicomContext, number: int) -> None:
    """``array``: ``(C, H, W)`` uint8/uint16 image or ``(H, W)`` uint8 mask, one Secondary
    Capture instance (see the module docstring for its tags)."""
    ds = _dicom_dataset(array, item, context, number, mask=array.ndim == 2)
    ds.save_as(str(path), enforce_file_format=True)


def _write(
    fmt: str,
    array: np.ndarray,
    path: Path,
    item: Item,
    context: DicomContext | None,
    number: int,
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> None:
    if item.image.ndim == 4:
        if fmt != "nifti":
            raise DataError(f"row {item.id} is a volume; volumes export as NIfTI only: use --format nifti")
        write_nifti_volume(array, path, spacing_mm)
    elif fmt == "png":
        write_png(array, path)
    elif fmt == "nifti":
        write_nifti(array, path)
    elif context is not None:
        write_dicom(array, path, item, context, number)
    else:
        raise DataError("DICOM export needs a DicomContext (study and series UIDs); pass one")


# --------------------------------------------------------------------------- export
def iter_items(dataset: Path) -> Iterator[Item]:
    """Yield an :class:`Item` per row of a verified dataset, shard by shard."""
    columns = ["id", "label", "image", "mask", "source", "seed"]
    for table in iter_tables(dataset, columns=columns):
        rows = zip(*(table.column(name).to_pylist() for name in columns), strict=True)
        for row_id, label, image, mask, source, seed in rows:
            yield Item(
                id=str(row_id),
                label=str(label or "unlabelled"),
                image=decode_image(image),
                mask=None if mask is None else decode_image(mask)[0].astype(np.uint8),
                generator=str(source or "unknown"),
                seed=None if seed is None else int(seed),
            )


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(
            f"{out}: the export folder exists and is not empty; expected a new or empty folder: pick another --out"
        )


def _check_gate(paths: PipelinePaths) -> None:
    """Refuse a set the quality gate rejected (``quality.json`` ``gate.passed`` false)."""
    quality_path = paths.metrics / "quality.json"
    try:
        gate = json.loads(quality_path.read_text()).get("gate", {})
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{quality_path}: no readable quality record ({type(exc).__name__}); run the filter stage "
            f"(`synthmed run --pipeline {paths.pipeline}`) first"
        ) from None
    if gate.get("passed") is False:
        raise DataError(
            f"pipeline '{paths.pipeline}': the quality gate REJECTED this synthetic set ({quality_path}); "
            "improve the generator and rerun, or pass --allow-rejected to export it anyway (e.g. to inspect it)"
        )


def export_synthetic(
    paths: PipelinePaths, fmt: str, out: Path, *, dataset: str = "filtered", allow_rejected: bool = False
) -> dict[str, Any]:
    """Write the pipeline's ``dataset`` (``filtered`` = kept, or ``synthetic``) to ``out`` in
    ``fmt``; returns the summary also written to ``out/export.json``. One-line
    :class:`DataError` for an unknown format, a missing or corrupt dataset, a set the quality
    gate rejected (unless ``allow_rejected``), a non-empty ``out`` or RGB images for NIfTI."""
    if fmt not in FORMATS:
        raise DataError(f"unknown export format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; allowed: {', '.join(DATASETS)}")
    source = getattr(paths, dataset)
    if not (source / "_manifest.json").is_file():
        raise DataError(
            f"{source}: no {dataset} dataset for pipeline '{paths.pipeline}'; run "
            f"`synthmed run --pipeline {paths.pipeline}` (or the stages up to filter) first"
        )
    manifest = verify_dataset(source)
    if not allow_rejected:
        _check_gate(paths)
    _check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = SUFFIXES[fmt]
    labels = sorted({label or "unlabelled" for counts in manifest["class_counts"].values() for label in counts})
    context = None
    if fmt == "dicom":
        from pydicom.uid import generate_uid

        series = {label + kind: generate_uid() for label in labels for kind in ("", "/mask")}
        context = DicomContext(study_uid=generate_uid(), series_uids=series)
    spacing = real_spacing(paths)
    progress = Progress(f"export {fmt}", int(manifest["rows"]))
    records: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    for number, item in enumerate(iter_items(source), start=1):
        folder = out / safe_name(item.label)
        folder.mkdir(exist_ok=True)
        stem = safe_name(item.id)
        image_path = folder / f"{stem}{suffix}"
        mask_path = folder / f"{stem}_mask{suffix}" if item.mask is not None else None
        if image_path.exists():
            raise DataError(f"{image_path}: two rows map to this file name; expected unique row ids")
        _write(fmt, item.image, image_path, item, context, number, spacing)
        if mask_path is not None and item.mask is not None:
            _write(fmt, item.mask, mask_path, item, context, number, spacing)
        counts[item.label] = counts.get(item.label, 0) + 1
        records.append(
            {
                "image": image_path.relative_to(out).as_posix(),
                "label": item.label,
                "subject": item.id,
                "mask": "" if mask_path is None else mask_path.relative_to(out).as_posix(),
                "source": item.generator,
                "seed": "" if item.seed is None else item.seed,
            }
        )
        progress.advance()
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "label", "subject", "mask", "source", "seed"])
        writer.writeheader()
        writer.writerows(records)
    summary = {
        "pipeline": paths.pipeline,
        "dataset": dataset,
        "format": fmt,
        "images": len(records),
        "masks": sum(1 for r in records if r["mask"]),
        "per_class": dict(sorted(counts.items())),
        "generators": sorted({r["source"] for r in records}),
        "shards_sha256": [s["sha256"] for s in manifest["shards"]],
        "out": str(out),
    }
    (out / "export.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    log.info("exported %d %s images (%s) to %s", len(records), fmt, dataset, out)
    return summary
