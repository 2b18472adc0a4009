"""3D ingest (``preprocess.dims: 3``): volumes stay volumes, as whole grids or cubes.

Inputs: the sources of 2D ingest (folder, CSV, s3 read as a folder, ``mni152``), masks
paired the same way (``<stem>_seg.nii.gz`` next to the image, CSV ``mask`` column).
Volumes: NIfTI (3D, or 4D with one volume), multi-frame grey DICOM, and DICOM series
(two or more single-frame files of one SeriesInstanceUID in one folder make one volume,
uri ``<folder>/series-<12 hex>``, the hex keyed like every pseudonymised name). 2D files
(PNG/JPEG, 2D NIfTI, a single-frame DICOM alone in its series) are rejects: "a 2D image
in a dims 3 pipeline; ...". Masks of a volume are NIfTI label maps on the image's grid
(same shape and, for NIfTI and series, same affine); anything else is a reject.

Per volume, one at a time (memory: one decoded volume and its resampled copy; only
encoded rows are kept):

1. header first: shape and spacing are read before any voxel is decoded; more voxels than
   ``preprocess.max_voxels``, or more float32 MiB after resampling than
   ``preprocess.max_volume_mib``, is a one-line reject naming shape, spacing, MiB and fix.
2. decode, reoriented to the closest canonical RAS+ (NIfTI, DICOM series; a multi-frame
   DICOM keeps :func:`tasks.readers.read_dicom`'s layout); NaN/inf and truncated files
   are rejects (the readers' reasons).
3. intensity exactly as 2D: :func:`tasks.ingest_pixels.scale_intensity` on the raw
   volume (clip percentiles -> [0, 1]), quantised to ``bit_depth`` at the end.
4. resample to ``spacing_mm`` (:func:`resample`: linear image, nearest mask, volume
   centres aligned, so the physical extent is kept within one voxel).
5. rows: without ``patch``, one row per volume, cropped/zero-padded to ``grid`` around
   its centre; with ``patch``, cubes (:class:`tasks.config.PatchSpec`) whose foreground
   (mask > 0, else intensity above the volume's mean) covers >= ``patch.min_foreground``,
   corners drawn without repeats from a generator seeded by ``pipeline.seed`` and the
   volume's uri. Axes shorter than a cube are zero-padded (not the split axis).

Rows: ``image`` ``(1, D, H, W)`` uint8/uint16 with (D, H, W) the array axes (R, A, S for
NIfTI and series), ``mask`` ``(D, H, W)`` uint8 or None, ``subject`` the pseudonymised
subject of the volume (every cube of a volume carries it), ``source`` the volume's uri
or ``<uri>#patch=i,j,k`` (cube centre voxel in the resampled grid, zero-padded where
a cube did not fit), ``id`` = hash of
``source``. Rows sorted by id, no time or machine path anywhere: reruns are byte-identical.

Splits: by subject (:func:`tasks.ingest_splits.assign_splits`); a train-split volume gives
``per_volume`` cubes of ``size``, a val/test one ``eval_per_volume`` cubes of
``eval_size``. With ``patch.split_axis`` every volume is cut into three slabs along that
axis (train, val, test in ``preprocess.split`` fractions, in that order) and each cube
lies inside its own slab, so no voxel is shared between splits; a slab thinner than its
cube is a :class:`ConfigError`. MNI152: the T1 template with the 2D tissue mask (0 bg,
1 GM, 2 WM); a cube's label is the level (``levels_mm``) of its centre's MNI z.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Callable, Literal

import numpy as np
from scipy import ndimage

from generators.errors import ConfigError, DataError
from generators.shards import SPLITS, Row, from_unit_float, sha256_file, write_dataset
from tasks.config import FolderSource, Mni152Source, PipelineConfig, PreprocessSpec
from tasks.ingest import (
    MNI152_SUBJECT,
    MNI152_URI,
    SHARD_ROWS,
    _limits,
    _one_line_warnings,
    base_provenance,
    drop_duplicates,
    record_rejects,
    row_id,
)
from tasks.ingest_pixels import scale_intensity
from tasks.ingest_sources import (
    MNI152_FILES,
    Input,
    csv_inputs,
    folder_inputs,
    mni152_files,
    pair_masks,
)
from tasks.ingest_splits import assign_splits, split_notes
from tasks.paths import PipelinePaths
from tasks.pseudonym import pseudonymise, pseudonymise_name
from tasks.reader_base import Limits, ReadError, Volume, VolumeHeader
from tasks.readers import file_format, nifti_volume_header, read_nifti_volume, read_volume_mask
from tasks.readers_dicom import (
    DicomGeometry,
    dicom_geometry,
    read_dicom_series,
    read_dicom_volume,
    series_header,
)

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
MAX_SHARD_BYTES = 256 * MIB  # rows per shard chosen so that one shard stays under this
AFFINE_TOLERANCE_MM = 1e-3
MNI152_MASK_CLASSES = ["background", "grey matter", "white matter"]
PLANAR_REASON = (
    "a 2D image in a dims 3 pipeline ({what}); expected NIfTI volumes, multi-frame DICOM or DICOM series "
    "(several single-frame files of one SeriesInstanceUID in one folder): remove it or set preprocess.dims: 2"
)

#: ``label_of(affine, centre voxel)``: the label of a row whose centre is that voxel
LabelOf = Callable[[np.ndarray, tuple[float, float, float]], str]


# --------------------------------------------------------------------------- geometry
def resampled_shape(
    shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]
) -> tuple[int, int, int]:
    """Voxels per axis after resampling ``shape`` at ``spacing`` mm to ``target`` mm:
    ``max(1, round(n * spacing / target))``, so the extent is kept within a voxel."""
    out = [max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target, strict=True)]
    return out[0], out[1], out[2]


def check_volume_memory(
    shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...], max_mib: float
) -> tuple[int, int, int]:
    """The resampled shape; ReadError (one line: shape, spacing, MiB, limit, fix) when it
    needs more than ``max_mib`` MiB as float32."""
    out = resampled_shape(shape, spacing, target)
    mib = float(np.prod(out, dtype=np.float64)) * 4 / MIB
    if mib > max_mib:
        raise ReadError(
            f"volume of shape {_x(shape)} at {_x(spacing, 'g')} mm resampled to {_x(target, 'g')} mm is "
            f"{_x(out)} voxels = {mib:.0f} MiB as float32, over preprocess.max_volume_mib = {max_mib:g}; "
            "raise preprocess.max_volume_mib or coarsen preprocess.spacing_mm"
        )
    return out


def check_volume_sides(shape: tuple[int, ...], min_side: int) -> None:
    """ReadError when a volume is shorter than ``min_side`` voxels along an axis: a 4 x 5 x 7
    matrix or a 3-slice slab is not a volume a 3D model can learn from."""
    if min(int(n) for n in shape) < min_side:
        raise ReadError(
            f"volume of shape {_x(shape)}, under {min_side} voxels along an axis: too small for a dims 3 "
            "pipeline; use whole volumes, or preprocess.dims: 2 for slabs of a few slices"
        )


def _x(values: tuple[Any, ...], fmt: str = "d") -> str:
    return "x".join(format(float(v), "g") if fmt == "g" else str(int(v)) for v in values)


def resample(
    array: np.ndarray, affine: np.ndarray, target: tuple[float, float, float], order: Literal[0, 1]
) -> tuple[np.ndarray, np.ndarray]:
    """``(I, J, K)`` ``array`` with voxel->mm ``affine`` -> ``(array at target spacing, its
    affine)``. ``order`` 1: trilinear (float32 out), 0: nearest (dtype kept, only input
    values). Volume centres are aligned: output voxel ``o`` samples input coordinate
    ``c_in + (o - c_out) * target / spacing`` with ``c = (n - 1) / 2``; edges clamp."""
    spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    goal = np.asarray(target, dtype=np.float64)
    if np.allclose(spacing, goal, rtol=1e-6, atol=1e-9):
        return array, affine
    out_shape = resampled_shape(array.shape, tuple(spacing), target)
    ratio = goal / spacing
    offset = (np.asarray(array.shape) - 1) / 2.0 - (np.asarray(out_shape) - 1) / 2.0 * ratio
    dtype = np.float32 if order == 1 else array.dtype
    out = ndimage.affine_transform(
        array, ratio, offset=offset, output_shape=out_shape, output=dtype, order=order, mode="nearest", prefilter=False
    )
    step = np.eye(4)
    step[:3, :3] = np.diag(ratio)
    step[:3, 3] = offset
    return out, np.asarray(affine, dtype=np.float64) @ step


def fit_to(array: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``array`` cropped / zero-padded to ``shape`` around its centre; returns (fitted,
    shift) with ``shift`` the input voxel of fitted voxel 0 (negative where padded)."""
    out = np.zeros(shape, dtype=array.dtype)
    shift = np.zeros(3, dtype=np.int64)
    src, dst = [], []
    for axis, (n, m) in enumerate(zip(array.shape, shape, strict=True)):
        start = (n - m) // 2
        shift[axis] = start
        lo, hi = max(start, 0), min(start + m, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[tuple(dst)] = array[tuple(src)]
    return out, shift


def _shifted(affine: np.ndarray, shift: np.ndarray) -> np.ndarray:
    step = np.eye(4)
    step[:3, 3] = shift
    return affine @ step


# --------------------------------------------------------------------------- cubes
def _summed_volume(foreground: np.ndarray) -> np.ndarray:
    dtype = np.int32 if foreground.size < 2**31 else np.int64
    table = np.zeros(tuple(n + 1 for n in foreground.shape), dtype=dtype)
    table[1:, 1:, 1:] = foreground.cumsum(0, dtype=dtype).cumsum(1).cumsum(2)
    return table


def _cube_counts(table: np.ndarray, lo: tuple[int, ...], hi: tuple[int, ...], size: int) -> np.ndarray:
    """Foreground voxels of every ``size``^3 cube with its corner in ``lo .. hi - size``
    (a cube never leaves ``[lo, hi)``), from the summed-volume ``table``."""
    n = [hi[a] - lo[a] - size + 1 for a in range(3)]

    def term(d0: int, d1: int, d2: int) -> np.ndarray:
        at = [lo[a] + d * size for a, d in enumerate((d0, d1, d2))]
        return table[at[0] : at[0] + n[0], at[1] : at[1] + n[1], at[2] : at[2] + n[2]]

    counts = term(1, 1, 1).astype(np.int64)  # inclusion-exclusion, in place: one volume-sized buffer
    for corner in ((0, 1, 1), (1, 0, 1), (1, 1, 0), (0, 0, 0)):
        counts -= term(*corner)
    for corner in ((0, 0, 1), (0, 1, 0), (1, 0, 0)):
        counts += term(*corner)
    return counts


def pick_cubes(
    table: np.ndarray,
    lo: tuple[int, ...],
    hi: tuple[int, ...],
    size: int,
    count: int,
    min_foreground: float,
    rng: np.random.Generator,
) -> list[tuple[int, int, int]]:
    """Up to ``count`` distinct corners of ``size``^3 cubes inside ``[lo, hi)`` whose
    foreground fraction is >= ``min_foreground``, drawn by ``rng`` (sorted); fewer when
    fewer qualify, none when none does."""
    if any(hi[a] - lo[a] < size for a in range(3)):
        return []
    counts = _cube_counts(table, lo, hi, size)
    good = np.flatnonzero(counts >= min_foreground * size**3 - 1e-6)
    if good.size == 0:
        return []
    chosen = np.sort(rng.choice(good.size, size=min(count, good.size), replace=False))
    corners = np.unravel_index(good[chosen], counts.shape)
    return [(int(a) + lo[0], int(b) + lo[1], int(c) + lo[2]) for a, b, c in zip(*corners, strict=True)]


def _rng(seed: int, uri: str, part: int) -> np.random.Generator:
    return np.random.default_rng([seed, int(hashlib.sha256(uri.encode()).hexdigest()[:8], 16), part])


# --------------------------------------------------------------------------- rows of one volume
@dataclass
class VolumeRows:
    """The encoded rows of one volume (records as from ``Row.to_record``, split not yet
    set): ``train`` if its subject lands in train, ``held`` if in val/test, or ``fixed``
    per split (``split_axis``: slabs). ``labels``: the labels, for stratification."""

    subject: str
    uri: str
    spacing: tuple[float, float, float]
    train: list[dict[str, Any]] = field(default_factory=list)
    held: list[dict[str, Any]] = field(default_factory=list)
    fixed: dict[str, list[dict[str, Any]]] | None = None
    labels: list[str] = field(default_factory=list)


def _record(
    uri: str, subject: str, label: str, unit: np.ndarray, mask: np.ndarray | None, spec: PreprocessSpec
) -> dict[str, Any]:
    dtype = "uint8" if spec.bit_depth == 8 else "uint16"
    return Row(
        id=row_id(uri),
        subject=subject,
        split=SPLITS[0],  # replaced once the split is known
        label=label,
        image=from_unit_float(unit[None], dtype),
        source=uri,
        mask=None if mask is None else np.ascontiguousarray(mask, dtype=np.uint8),
    ).to_record()


def volume_rows(
    unit: np.ndarray,
    mask: np.ndarray | None,
    affine: np.ndarray,
    spec: PreprocessSpec,
    seed: int,
    uri: str,
    subject: str,
    label_of: LabelOf,
) -> VolumeRows:
    """Rows of one resampled volume: ``unit`` ``(I, J, K)`` float32 in [0, 1], ``mask``
    uint8 on the same grid or None, ``affine`` voxel -> mm (module doc, step 5)."""
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    out = VolumeRows(subject=subject, uri=uri, spacing=(spacing[0], spacing[1], spacing[2]))
    patch = spec.patch
    if patch is None:
        grid = spec.volume_shape()
        fitted, shift = fit_to(unit, grid)
        fitted_mask = None if mask is None else fit_to(mask, grid)[0]
        centre = tuple((n - 1) / 2.0 for n in grid)
        label = label_of(_shifted(affine, shift), (centre[0], centre[1], centre[2]))
        record = _record(uri, subject, label, fitted, fitted_mask, spec)
        out.train, out.held, out.labels = [record], [record], [label]
        return out
    size, eval_size = patch.size, patch.eval_size or patch.size
    foreground = mask > 0 if mask is not None else unit > float(unit.mean())
    side = max(size, eval_size)
    padded_shape = tuple(n if a == patch.split_axis else max(n, side) for a, n in enumerate(unit.shape))
    if padded_shape != unit.shape:
        shape3 = (padded_shape[0], padded_shape[1], padded_shape[2])
        unit, shift = fit_to(unit, shape3)
        foreground = fit_to(foreground, shape3)[0]
        mask = None if mask is None else fit_to(mask, shape3)[0]
        affine = _shifted(affine, shift)
    table = _summed_volume(foreground)
    full = tuple(int(n) for n in unit.shape)

    def cubes(split: str, lo: tuple[int, ...], hi: tuple[int, ...], part: int) -> list[dict[str, Any]]:
        cube, count = (size, patch.per_volume) if split == "train" else (eval_size, patch.eval_per_volume)
        corners = pick_cubes(table, lo, hi, cube, count, patch.min_foreground, _rng(seed, uri, part))
        if not corners:
            region = "" if patch.split_axis is None else f" in the {split} slab"
            raise ReadError(
                f"no {cube}^3 cube{region} of this {_x(full)} volume has foreground >= {patch.min_foreground:g}; "
                "lower preprocess.patch.min_foreground or the cube size, or check the mask/intensities"
            )
        if len(corners) < count:
            logger.warning(
                "%s: only %d of %d %s cubes have foreground >= %g; lower preprocess.patch.min_foreground for more",
                uri,
                len(corners),
                count,
                split,
                patch.min_foreground,
            )
        records = []
        for corner in corners:
            window = tuple(slice(c, c + cube) for c in corner)
            centre = tuple(c + cube // 2 for c in corner)
            label = label_of(affine, (float(centre[0]), float(centre[1]), float(centre[2])))
            cube_uri = f"{uri}#patch={centre[0]:03d},{centre[1]:03d},{centre[2]:03d}"
            cube_mask = None if mask is None else mask[window]
            records.append(_record(cube_uri, subject, label, unit[window], cube_mask, spec))
            if split == "train":
                out.labels.append(label)
        return records

    if patch.split_axis is None:
        out.train = cubes("train", (0, 0, 0), full, 0)
        out.held = cubes("val", (0, 0, 0), full, 1)
        return out
    out.fixed = {}
    for part, (split, (start, stop)) in enumerate(_slabs(full[patch.split_axis], spec).items()):
        thickness = stop - start
        cube = size if split == "train" else eval_size
        if thickness < cube:
            name = "size" if split == "train" else "eval_size"
            raise ConfigError(
                f"preprocess.patch.split_axis {patch.split_axis}: the {split} slab of {uri} is {thickness} voxels "
                f"({thickness * spacing[patch.split_axis]:g} mm) thick, thinner than its {cube}-voxel cube; lower "
                f"preprocess.patch.{name}, use a finer preprocess.spacing_mm, or raise preprocess.split.{split}"
            )
        lo = tuple(start if a == patch.split_axis else 0 for a in range(3))
        hi = tuple(stop if a == patch.split_axis else full[a] for a in range(3))
        out.fixed[split] = cubes(split, lo, hi, part)
    out.labels = [r["label"] for records in out.fixed.values() for r in records]
    return out


def _slabs(length: int, spec: PreprocessSpec) -> dict[str, tuple[int, int]]:
    """``{split: (start, stop)}`` along the split axis: train, val, test in that order."""
    first = int(round(length * spec.split.train))
    second = int(round(length * (spec.split.train + spec.split.val)))
    return {"train": (0, first), "val": (first, second), "test": (second, length)}


# --------------------------------------------------------------------------- inputs -> volumes
@dataclass(frozen=True)
class VolumeJob:
    """One volume to read: ``items`` (one file, or the files of a DICOM series), its
    ``uri``, ``label``, ``subject`` (CSV / subject_regex pseudonym or None) and
    ``stem_subject`` (the fallback); ``kind`` picks the reader."""

    uri: str
    label: str
    subject: str | None
    stem_subject: str
    kind: Literal["nifti", "dicom", "series"]
    items: tuple[Input, ...]
    geometries: tuple[DicomGeometry, ...] = ()


def plan_volumes(inputs: list[Input]) -> tuple[list[VolumeJob], list[dict[str, str]]]:
    """Which volumes the inputs make (module doc); 2D files become rejects. Only DICOM
    headers are read here."""
    jobs: list[VolumeJob] = []
    rejects: list[dict[str, str]] = []
    series: dict[tuple[str, str], list[tuple[Input, DicomGeometry]]] = {}
    for item in inputs:
        fmt = file_format(item.path)
        if fmt == "pil":
            rejects.append({"file": item.file, "reason": PLANAR_REASON.format(what="PNG/JPEG")})
        elif fmt == "nifti":
            jobs.append(VolumeJob(item.file, item.label, item.subject, item.stem_subject, "nifti", (item,)))
        elif fmt == "dicom":
            try:
                geometry = dicom_geometry(item.path)
            except ReadError as exc:
                rejects.append({"file": item.file, "reason": str(exc)})
                continue
            if geometry.frames > 1:
                jobs.append(
                    VolumeJob(item.file, item.label, item.subject, item.stem_subject, "dicom", (item,), (geometry,))
                )
            else:
                folder = PurePosixPath(item.path.parent.as_posix()).as_posix()
                series.setdefault((folder, geometry.series), []).append((item, geometry))
        else:
            rejects.append({"file": item.file, "reason": "unsupported file type; expected NIfTI or DICOM volumes"})
    for (_, uid), members in sorted(series.items()):
        members.sort(key=lambda m: m[0].file)
        if len(members) < 2 or not uid:
            what = "a single-frame DICOM, the only file of its series in its folder"
            rejects.extend({"file": m.file, "reason": PLANAR_REASON.format(what=what)} for m, _ in members)
            continue
        job, problem = _series_job(uid, members)
        if job is None:
            rejects.extend({"file": m.file, "reason": problem} for m, _ in members)
        else:
            jobs.append(job)
    return jobs, rejects


def _series_job(uid: str, members: list[tuple[Input, DicomGeometry]]) -> tuple[VolumeJob | None, str]:
    items = [m for m, _ in members]
    if len({m.label for m in items}) > 1 or len({m.subject for m in items}) > 1:
        return None, "DICOM series whose files have different labels or subjects; expected one volume: fix the CSV"
    if any(m.mask_path is not None or m.mask is not None for m in items):
        return None, (
            "mask given for one slice of a DICOM series; expected a mask of the whole volume: convert the series "
            "and its mask to NIfTI"
        )
    parent = items[0].file.rpartition("/")[0]
    name = f"series-{pseudonymise_name(uid)}"
    uri = f"{parent}/{name}" if parent else name
    first = items[0]
    stem_subject = pseudonymise(f"{parent}/{name}")
    return (
        VolumeJob(uri, first.label, first.subject, stem_subject, "series", tuple(items), tuple(g for _, g in members)),
        "",
    )


def _header(job: VolumeJob) -> VolumeHeader:
    if job.kind == "nifti":
        return nifti_volume_header(job.items[0].path)
    if job.kind == "dicom":
        return job.geometries[0].header()
    return series_header(list(job.geometries))[0]


def _decode(job: VolumeJob, limits: Limits) -> Volume:
    if job.kind == "nifti":
        return read_nifti_volume(job.items[0].path, limits)
    if job.kind == "dicom":
        return read_dicom_volume(job.items[0].path, job.geometries[0], limits)
    return read_dicom_series([m.path for m in job.items], list(job.geometries), limits)


def _mask_of(job: VolumeJob, volume: Volume, limits: Limits) -> np.ndarray | None:
    item = job.items[0]
    if item.mask is not None:
        raise ReadError(
            "DICOM SEG mask of a volume; expected a NIfTI label map of the whole volume (<stem>_seg.nii.gz)"
        )
    if item.mask_path is None:
        return None
    mask = read_volume_mask(item.mask_path, limits)
    check_mask_grid(mask, volume, compare_affine=job.kind != "dicom")
    return mask.array


def check_mask_grid(mask: Volume, image: Volume, compare_affine: bool = True) -> None:
    """ReadError when a mask is not on its image's voxel grid (shape, and the affine
    within :data:`AFFINE_TOLERANCE_MM` when ``compare_affine``)."""
    if mask.array.shape != image.array.shape:
        raise ReadError(
            f"mask shape {_x(mask.array.shape)} differs from image shape {_x(image.array.shape)} (both in RAS order); "
            "expected the label map of this volume on its grid: fix the mask or remove the row"
        )
    gap = float(np.max(np.abs(np.asarray(mask.affine) - np.asarray(image.affine))))
    if compare_affine and gap > AFFINE_TOLERANCE_MM:
        raise ReadError(
            f"mask affine differs from the image's by up to {gap:.3g} mm; expected the same voxel grid (spacing, "
            "origin, orientation): resample the mask onto the image or remove the row"
        )


def _target(header: VolumeHeader, spec: PreprocessSpec) -> tuple[float, float, float]:
    if spec.spacing_mm is None:
        return header.spacing or (1.0, 1.0, 1.0)
    if header.spacing is None:
        raise ReadError(
            "volume without voxel spacing in its header (no PixelSpacing); expected a spacing to resample to "
            "preprocess.spacing_mm: add it, convert to NIfTI, or set spacing_mm: null"
        )
    return (float(spec.spacing_mm[0]), float(spec.spacing_mm[1]), float(spec.spacing_mm[2]))


def process_job(job: VolumeJob, spec: PreprocessSpec, seed: int) -> VolumeRows | dict[str, str]:
    """Read, check, resample and cut one volume; a per-file problem is a reject dict."""
    limits = _limits(spec)
    try:
        header = _header(job)
        if header.planar:
            raise ReadError(PLANAR_REASON.format(what=f"shape {_x(header.shape)}"))
        limits.check_volume(header.shape)
        check_volume_sides(header.shape[:3], limits.min_side)
        target = _target(header, spec)
        check_volume_memory(header.shape, header.spacing or (1.0, 1.0, 1.0), target, spec.max_volume_mib)
        volume = _decode(job, limits)
        mask = _mask_of(job, volume, limits)
        subject = job.subject or volume.subject or job.stem_subject
        unit = scale_intensity(volume.array, volume.eight_bit, spec.clip_percentiles)
        unit, affine = resample(unit, volume.affine, target, order=1)
        if mask is not None:
            mask = resample(mask, volume.affine, target, order=0)[0]
        del volume
        label = job.label
        return volume_rows(unit, mask, affine, spec, seed, job.uri, subject, lambda a, c: label)
    except ReadError as exc:
        return {"file": job.uri, "reason": str(exc)}
    except MemoryError:
        return {
            "file": job.uri,
            "reason": "out of memory while decoding; lower preprocess.max_voxels/max_volume_mib or coarsen spacing_mm",
        }


def mni152_rows(src: Mni152Source, spec: PreprocessSpec, seed: int) -> tuple[VolumeRows, dict[str, str]]:
    """The MNI152 T1 template as :class:`VolumeRows` (mask 0 bg / 1 GM / 2 WM as in 2D;
    label = level of the row centre's MNI z) and the sha256 of the template files."""
    files = mni152_files()
    limits = _limits(spec)
    t1 = read_nifti_volume(files["t1"], limits)
    target = _target(VolumeHeader(t1.array.shape, t1.spacing), spec)
    check_volume_memory(t1.array.shape, t1.spacing, target, spec.max_volume_mib)
    gm = read_nifti_volume(files["gm"], limits)
    wm = read_nifti_volume(files["wm"], limits)
    for tissue in (gm, wm):
        check_mask_grid(tissue, t1)
    g = gm.array / gm.array.max()  # probabilities in [0, 1], as load_mni152_gm_template returns them
    w = wm.array / wm.array.max()
    mask = np.where(g + w >= 0.5, np.where(w > g, 2, 1), 0).astype(np.uint8)
    del gm, wm, g, w
    unit = scale_intensity(t1.array, False, spec.clip_percentiles)
    unit, affine = resample(unit, t1.affine, target, order=1)
    mask = resample(mask, t1.affine, target, order=0)[0]
    levels = np.asarray(src.levels_mm, dtype=np.float64)

    def label_of(at: np.ndarray, centre: tuple[float, float, float]) -> str:
        z_mm = int(round(float((at @ np.array([*centre, 1.0]))[2])))
        return src.level_names[int(np.searchsorted(levels, z_mm, side="right"))]

    rows = volume_rows(unit, mask, affine, spec, seed, MNI152_URI, pseudonymise(MNI152_SUBJECT), label_of)
    digests = {MNI152_FILES[key]: sha256_file(path) for key, path in sorted(files.items())}
    return rows, digests


# --------------------------------------------------------------------------- stage
def _shard_rows(spec: PreprocessSpec) -> int:
    voxels = max(int(np.prod(spec.volume_shape())), int(np.prod(spec.eval_shape())))
    row_bytes = voxels * (spec.bit_depth // 8 + 1)  # image + mask
    return max(1, min(SHARD_ROWS, MAX_SHARD_BYTES // row_bytes))


def ingest_volumes(cfg: PipelineConfig, paths: PipelinePaths, src: Any) -> dict[str, Any]:
    """3D ingest of ``src`` (the localised ``cfg.source``) into ``paths.real`` and
    ``paths.rejects``; returns the summary dict of :func:`tasks.ingest.ingest`."""
    spec = cfg.preprocess
    extra: dict[str, Any] = {}
    rejects: list[dict[str, str]] = []
    volumes: list[VolumeRows] = []
    if isinstance(src, Mni152Source):
        rows, digests = mni152_rows(src, spec, cfg.seed)
        volumes, n_inputs = [rows], 1
        extra["template_sha256"] = digests
        extra["mask_classes"] = MNI152_MASK_CLASSES
    else:
        inputs, rejects = folder_inputs(src, paths) if isinstance(src, FolderSource) else csv_inputs(src, paths)
        with _one_line_warnings():
            inputs, mask_rejects = pair_masks(inputs, _limits(spec))
            unique, duplicates = drop_duplicates(inputs)
            jobs, plan_rejects = plan_volumes(unique)
            rejects += mask_rejects + duplicates + plan_rejects
            n_inputs = len(inputs)
            for job in jobs:  # one volume in memory at a time
                outcome = process_job(job, spec, cfg.seed)
                if isinstance(outcome, dict):
                    rejects.append(outcome)
                else:
                    volumes.append(outcome)
    rejects, rejects_rel = record_rejects(paths, rejects)
    if not volumes:
        where = getattr(src, "path", src.kind)
        raise DataError(
            f"{where}: no usable volumes ({n_inputs} inputs, {len(rejects)} rejected, reasons in {rejects_rel}); "
            "expected NIfTI volumes, multi-frame DICOM or DICOM series (preprocess.dims: 3); fix the files listed there"
        )
    records, groups, notes = _split(volumes, spec, cfg.seed)
    if len({r["id"] for r in records}) != len(records):
        raise DataError("internal: two cubes or volumes gave the same row id; report this with the input file list")
    records.sort(key=lambda r: r["id"])
    subjects = len({v.subject for v in volumes})
    one_subject = subjects == 1
    if one_subject and spec.patch is not None:
        notes.append(
            f"all {len(records)} rows are cubes of {len(volumes)} volume(s) of ONE subject; splits are regions of "
            "it, not independent subjects: results say nothing about new subjects"
        )
    spacings = sorted({tuple(round(s, 6) for s in v.spacing) for v in volumes})
    provenance = {
        **base_provenance(cfg, notes),
        "dims": 3,
        "volume_shape": list(spec.volume_shape()),
        "eval_shape": list(spec.eval_shape()),
        "spacing_mm": list(spacings[0]) if len(spacings) == 1 else None,
        "spacings_mm": [list(s) for s in spacings],
        "orientation": "closest canonical RAS+ (NIfTI, DICOM series); multi-frame DICOM: (columns, rows, frames)",
        "patches_of_one_subject": one_subject,
        "counts": {
            "inputs": n_inputs,
            "rejects": len(rejects),
            "rows": len(records),
            "volumes": len(volumes),
            "dropped_slices": 0,
            "subjects": subjects,
            "groups": groups,
        },
        **extra,
    }
    manifest = write_dataset(paths.real, records, shard_rows=_shard_rows(spec), provenance=provenance)
    summary = {
        "rows": int(manifest["rows"]),
        "class_counts": manifest["class_counts"],
        "rejects": len(rejects),
        "subjects": subjects,
        "groups": groups,
    }
    logger.info(
        "ingest (3D): %d rows from %d volumes (%d inputs, %d rejected), %d subjects, %d groups",
        summary["rows"],
        len(volumes),
        n_inputs,
        len(rejects),
        subjects,
        groups,
    )
    return summary


def _split(volumes: list[VolumeRows], spec: PreprocessSpec, seed: int) -> tuple[list[dict[str, Any]], int, list[str]]:
    """(records with their split, number of split groups, split notes)."""
    fractions = {"train": spec.split.train, "val": spec.split.val, "test": spec.split.test}
    if spec.patch is not None and spec.patch.split_axis is not None:
        records = [{**r, "split": split} for v in volumes for split, rows in (v.fixed or {}).items() for r in rows]
        group_of = {f"{v.uri}#{split}": split for v in volumes for split in (v.fixed or {})}
        pairs = [
            (r["label"], f"{v.uri}#{split}") for v in volumes for split, rows in (v.fixed or {}).items() for r in rows
        ]
        notes = split_notes(pairs, group_of, fractions)
        for note in notes:
            logger.warning("%s", note)
        return records, len(group_of), notes
    group_labels: dict[str, list[str]] = {}
    for v in volumes:
        group_labels.setdefault(v.subject, []).extend(v.labels)
    splits = assign_splits(group_labels, fractions, seed)
    empty = [s for s in SPLITS if s not in set(splits.values())]
    if empty:
        logger.warning(
            "split(s) %s got no rows: only %d subjects; add subjects or set preprocess.patch.split_axis "
            "(slabs of each volume)",
            ", ".join(empty),
            len(group_labels),
        )
    records = [
        {**r, "split": splits[v.subject]}
        for v in volumes
        for r in (v.train if splits[v.subject] == "train" else v.held)
    ]
    notes = [
        note.replace("preprocess.split.slab_slices", "preprocess.patch.split_axis")
        for note in split_notes(((r["label"], r["subject"]) for r in records), splits, fractions)
    ]
    for note in notes:
        logger.warning("%s", note)
    return records, len(group_labels), notes
