"""The ``ingest`` stage: real images (folder, CSV, MNI152 demo) -> a Parquet dataset.

Reads every input once, preprocesses it (see :class:`tasks.config.PreprocessSpec`),
assigns splits per subject (or per slab of slices), and writes ``paths.real`` with
:func:`generators.shards.write_dataset` plus ``paths.rejects``. Per-file problems
(corrupt file, NaN volume, path outside the dataset root, duplicate, missing label...)
go to ``rejects.json`` and the rest is ingested; whole-input problems raise
:class:`DataError` with one line saying what was expected and how to fix it.

Subjects (always pseudonymised, :func:`tasks.pseudonym.pseudonymise`): CSV ``subject``
column; folder source: the first group of ``subject_regex`` (searched in the path below
the class folder) when set, else the DICOM PatientID when the file has one, else the
file stem. With ``split.slab_slices`` set, the rows of a volume are grouped into slabs of
that many consecutive kept slices; the slab (``<subject>-slabNNN``, also stored in the
``subject`` column) is then the split unit.

Stored images are ``(C, size, size)`` ``uint8``/``uint16`` (``bit_depth``), masks
``(size, size)`` ``uint8`` class indices. The same inputs and config give byte-identical
shards: the ``source`` uri is the input's pseudonymised posix path relative to the dataset
root (the folder, or the CSV root) plus ``#slice=NNN`` for volume slices (MNI152:
``nilearn:mni152_2009a_t1_1mm#z=+012``), ids are hashes of that uri, rows are sorted by id, splits come
from hashes seeded by ``cfg.seed``, nothing depends on time, machine paths or dict order.

Identifiers: folder and file names often carry names, MRNs and dates
(``DOE_JANE_MRN4471234_19620314/SMITH_JOHN_20240101.dcm``), which nothing can recognise
reliably. So every path component below the source root is replaced by its keyed hash
(:func:`tasks.pseudonym.pseudonymise_path`: 12 hex chars of HMAC-SHA256 with the pseudonym
key, known image suffix kept) before it reaches the ``source`` column, row ids,
``rejects.json`` or the log; only the class folder (the label, a category the user chose)
is kept: ``disc/PAT-7/scan.dcm`` -> ``disc/3fa2c1d9e0b4/81bc2e07a9d1.dcm``. With the key,
:func:`locate_inputs` maps those back to the files on this machine. Hidden files and
folders (names starting with ``.``) are skipped and listed in the rejects.

Size limits (``preprocess.max_pixels``, ``max_voxels``, ``max_aspect_ratio``; images and
slices under 8 pixels on a side) are checked on each file's header before decoding (see
:class:`tasks.reader_base.Limits`); padding to a square
never allocates more than ``max_pixels`` per plane. A class that cannot reach every split
(too few subjects) is ingested with one warning line and a note in the manifest.
With ``preprocess.channels: 1`` a colour image (channels that differ by more than
:data:`COLOUR_TOLERANCE` on average) is rejected rather than silently turned grey;
grey images saved as RGB are converted. A colour cine (multi-frame RGB/YBR/palette DICOM,
ultrasound) gives one row per frame (uri ``#frame=NNN``) with ``channels: 3``.

Masks: the CSV ``mask`` column, a DICOM SEG among the inputs (paired with the images it
references), or a label map named ``<stem>_seg.nii.gz`` next to ``<stem>.*``
(:mod:`tasks.ingest_sources`). Warnings that pydicom/nibabel raise while reading are
logged once each, on one line, after the files are read (no tracebacks).

With ``preprocess.dims: 3`` volumes stay volumes (whole grids or cubes, resampled to
``spacing_mm``): :func:`ingest` hands over to :mod:`tasks.ingest_volumes` after
localising the source; 2D files are rejects there.

Modules: :mod:`tasks.ingest_sources` (inputs, path safety, mask pairing),
:mod:`tasks.readers` / :mod:`tasks.readers_dicom` (one reader per format),
:mod:`tasks.ingest_pixels` (scaling, resizing), :mod:`tasks.ingest_splits` (splits).
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

from generators.errors import ConfigError, DataError
from generators.shards import SPLITS, Row, from_unit_float, sha256_file, write_dataset, write_json_atomic
from tasks.config import FolderSource, Mni152Source, PipelineConfig, PreprocessSpec
from tasks.ingest_pixels import (
    COLOUR_TOLERANCE,
    FOREGROUND_THRESHOLD,
    MAX_PAD_PIXELS,
    check_grey,
    foreground_fraction,
    pad_resize,
    pad_resize_mask,
    scale_intensity,
    to_channels,
)
from tasks.ingest_sources import (
    CSV_OPTIONAL,
    CSV_REQUIRED,
    MNI152_FILES,
    Input,
    csv_inputs,
    folder_inputs,
    locate_inputs,
    mni152_files,
    pair_masks,
    printable_file,
)
from tasks.ingest_splits import allocate_groups, assign_splits, split_notes
from tasks.paths import PipelinePaths
from tasks.pseudonym import key_id, key_source, pseudonymise, warn_if_default_key
from tasks.reader_base import Decoded, Limits, ReadError, library_line
from tasks.readers import cut_volume, read_image, read_mask
from tasks.storage import localize_source

__all__ = [  # names other modules import from here (kept when the module was split)
    "COLOUR_TOLERANCE",
    "CSV_OPTIONAL",
    "CSV_REQUIRED",
    "FOREGROUND_THRESHOLD",
    "MAX_PAD_PIXELS",
    "MNI152_FILES",
    "allocate_groups",
    "assign_splits",
    "foreground_fraction",
    "ingest",
    "locate_inputs",
    "mni152_files",
    "pad_resize",
    "pad_resize_mask",
    "row_id",
    "scale_intensity",
    "to_channels",
]

logger = logging.getLogger(__name__)

SHARD_ROWS = 1024
ID_HEX_CHARS = 16
MAX_REJECTS_LOGGED = 20
MNI152_URI = "nilearn:mni152_2009a_t1_1mm"
MNI152_SUBJECT = "mni152"


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class _Draft:
    """One encoded row waiting for its split; ``record`` as from ``Row.to_record``."""

    id: str
    base_subject: str
    group: str
    label: str
    record: dict[str, Any]


@dataclass
class _Outcome:
    drafts: list[_Draft] = field(default_factory=list)
    dropped_slices: int = 0
    reject: dict[str, str] | None = None


def _reject(file: str, reason: str) -> _Outcome:
    return _Outcome(reject={"file": file, "reason": " ".join(reason.split())})


def row_id(uri: str) -> str:
    """Stable row id: the first 16 hex chars of sha256 of the input's relative uri."""
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()[:ID_HEX_CHARS]


# --------------------------------------------------------------------------- drafts
def _dtype(spec: PreprocessSpec) -> str:
    return "uint8" if spec.bit_depth == 8 else "uint16"


def _draft(
    uri: str, subject: str, group: str, label: str, image: np.ndarray, mask: np.ndarray | None, spec: PreprocessSpec
) -> _Draft:
    rid = row_id(uri)
    row = Row(
        id=rid,
        subject=group,
        split=SPLITS[0],  # placeholder, replaced once every group is known
        label=label,
        image=from_unit_float(image, _dtype(spec)),
        source=uri,
        mask=mask,
    )
    return _Draft(id=rid, base_subject=subject, group=group, label=label, record=row.to_record())


def _image_drafts(
    decoded: Decoded, mask: np.ndarray | None, spec: PreprocessSpec, uri: str, subject: str, label: str
) -> list[_Draft]:
    if mask is not None and mask.shape != decoded.array.shape[1:]:
        raise ReadError(
            f"mask shape {mask.shape} differs from image shape {decoded.array.shape[1:]}; expected equal: "
            "fix the mask or remove the row"
        )
    return [
        _draft(
            uri, subject, subject, label, _unit_image(decoded.array, decoded.eight_bit, spec), _small(mask, spec), spec
        )
    ]


def _unit_image(array: np.ndarray, eight_bit: bool, spec: PreprocessSpec) -> np.ndarray:
    """``(C, H, W)`` raw samples -> ``(spec.channels, size, size)`` float32 in [0, 1];
    ReadError for colour where grey is expected."""
    unit = scale_intensity(array, eight_bit, spec.clip_percentiles)
    if spec.channels == 1 and unit.shape[0] == 3:
        check_grey(unit)
    return pad_resize(to_channels(unit, spec.channels), spec.size)


def _small(mask: np.ndarray | None, spec: PreprocessSpec) -> np.ndarray | None:
    return None if mask is None else pad_resize_mask(mask, spec.size)


def _frame_drafts(decoded: Decoded, spec: PreprocessSpec, uri: str, subject: str, label: str) -> list[_Draft]:
    """A colour cine ``(F, 3, H, W)`` -> one row per frame (``uri#frame=NNN``), all in the
    subject's split group; a colour frame with ``channels: 1`` rejects the file."""
    return [
        _draft(f"{uri}#frame={k:03d}", subject, subject, label, _unit_image(frame, decoded.eight_bit, spec), None, spec)
        for k, frame in enumerate(decoded.array)
    ]


def _volume_drafts(
    volume: np.ndarray,
    eight_bit: bool,
    mask: np.ndarray | None,
    spec: PreprocessSpec,
    subject: str,
    label_of: Callable[[int], str],
    uri_of: Callable[[int], str],
) -> tuple[list[_Draft], int]:
    """Slice a ``(I, J, K)`` volume along ``spec.slice_axis``; returns (drafts, dropped)."""
    if mask is not None and mask.shape != volume.shape:
        raise ReadError(f"mask shape {mask.shape} differs from volume shape {volume.shape}; expected equal")
    axis = spec.slice_axis
    plane = [n for i, n in enumerate(volume.shape) if i != axis]
    _limits(spec).check_aspect(plane[1], plane[0])
    _limits(spec).check_small(plane[1], plane[0])
    unit = scale_intensity(volume, eight_bit, spec.clip_percentiles)
    slab = spec.split.slab_slices
    drafts: list[_Draft] = []
    dropped = 0
    for k in range(volume.shape[axis]):
        image = pad_resize(to_channels(cut_volume(unit, axis, k)[None], spec.channels), spec.size)
        small_mask = None if mask is None else pad_resize_mask(cut_volume(mask, axis, k), spec.size)
        if foreground_fraction(image, small_mask) < spec.min_foreground:
            dropped += 1
            continue
        group = subject if slab is None else f"{subject}-slab{len(drafts) // slab:03d}"
        drafts.append(_draft(uri_of(k), subject, group, label_of(k), image, small_mask, spec))
    if not drafts:
        raise ReadError(
            f"no slice along axis {axis} has foreground >= {spec.min_foreground} ({dropped} slices); "
            "lower preprocess.min_foreground or check the intensities"
        )
    return drafts, dropped


def _limits(spec: PreprocessSpec) -> Limits:
    return Limits(
        spec.max_pixels,
        spec.max_voxels,
        spec.max_aspect_ratio,
        allow_burned_in_annotation=bool(getattr(spec, "allow_burned_in_annotation", False)),
    )


def _process(item: Input, spec: PreprocessSpec) -> _Outcome:
    """Read, preprocess and encode one input file; per-file problems (including files over
    the size limits, checked before decoding) become a reject."""
    try:
        decoded = read_image(item.path, _limits(spec))
        mask = item.mask if item.mask_path is None else read_mask(item.mask_path, _limits(spec))
        subject = item.subject or decoded.subject or item.stem_subject
        if decoded.kind == "image":
            return _Outcome(drafts=_image_drafts(decoded, mask, spec, item.file, subject, item.label))
        if decoded.kind == "frames":
            if mask is not None:
                raise ReadError("mask given for a colour cine; expected masks for single images or volumes only")
            return _Outcome(drafts=_frame_drafts(decoded, spec, item.file, subject, item.label))
        drafts, dropped = _volume_drafts(
            decoded.array,
            decoded.eight_bit,
            mask,
            spec,
            subject,
            label_of=lambda k: item.label,
            uri_of=lambda k: f"{item.file}#slice={k:03d}",
        )
        return _Outcome(drafts=drafts, dropped_slices=dropped)
    except ReadError as exc:
        return _reject(item.file, str(exc))
    except MemoryError:
        return _reject(
            item.file, "out of memory while decoding; lower preprocess.max_pixels/max_voxels or shrink the file"
        )


def _mni152_outcome(src: Mni152Source, spec: PreprocessSpec) -> tuple[_Outcome, dict[str, str]]:
    """Slice the MNI152 T1 template; labels by MNI z band, masks 0 bg / 1 GM / 2 WM."""
    import nibabel as nib

    if spec.slice_axis != 2:
        raise ConfigError(
            f"preprocess.slice_axis: got {spec.slice_axis}; source 'mni152' labels axial slices by MNI z, "
            "so set slice_axis: 2"
        )
    files = mni152_files()
    images = {key: nib.load(str(path)) for key, path in files.items()}
    affine = images["t1"].affine
    t1 = images["t1"].get_fdata(dtype=np.float32)
    gm = images["gm"].get_fdata(dtype=np.float32)
    wm = images["wm"].get_fdata(dtype=np.float32)
    gm /= gm.max()  # probabilities in [0, 1], as load_mni152_gm_template returns them
    wm /= wm.max()
    mask = np.where(gm + wm >= 0.5, np.where(wm > gm, 2, 1), 0).astype(np.uint8)
    centre = (np.asarray(t1.shape[:2], dtype=np.float64) - 1.0) / 2.0
    levels = np.asarray(src.levels_mm, dtype=np.float64)

    def z_mm(k: int) -> int:
        return int(round(float((affine @ np.array([centre[0], centre[1], k, 1.0]))[2])))

    drafts, dropped = _volume_drafts(
        t1,
        False,
        mask,
        spec,
        pseudonymise(MNI152_SUBJECT),
        label_of=lambda k: src.level_names[int(np.searchsorted(levels, z_mm(k), side="right"))],
        uri_of=lambda k: f"{MNI152_URI}#z={z_mm(k):+04d}",
    )
    digests = {MNI152_FILES[key]: sha256_file(path) for key, path in sorted(files.items())}
    return _Outcome(drafts=drafts, dropped_slices=dropped), digests


# --------------------------------------------------------------------------- stage
def drop_duplicates(inputs: list[Input]) -> tuple[list[Input], list[dict[str, str]]]:
    """``(inputs without repeats of one file, a reject per repeat)``; the first is kept."""
    unique: list[Input] = []
    rejects: list[dict[str, str]] = []
    first: dict[str, Input] = {}
    for item in inputs:
        if item.key in first:
            where = f"at CSV lines {first[item.key].line} and {item.line}" if item.line else "twice"
            rejects.append(
                {
                    "file": item.file,
                    "reason": f"duplicate id: the same image is listed {where}; the first is kept, "
                    "remove the other row",
                }
            )
            continue
        first[item.key] = item
        unique.append(item)
    return unique, rejects


def base_provenance(cfg: PipelineConfig, notes: list[str]) -> dict[str, Any]:
    """The manifest provenance every ingest writes (2D and 3D): stage, source, preprocess,
    seed, pseudonym key id, split notes."""
    return {
        "stage": "ingest",
        "source": cfg.source.model_dump(mode="json"),
        "modality": cfg.source.modality,
        "anatomy": cfg.source.anatomy,
        "licence": cfg.source.licence,
        "preprocess": cfg.preprocess.model_dump(mode="json"),
        "seed": cfg.seed,
        "pseudonym": {
            "method": "hmac-sha256",
            "key": key_source(),
            "key_id": key_id(),
            "paths": "class folder kept, every other component hmac-sha256 (12 hex)",
        },
        "notes": notes,
    }


def _check_preprocess(spec: PreprocessSpec) -> None:
    lo, hi = spec.clip_percentiles
    if not 0.0 <= lo < hi <= 100.0:
        raise ConfigError(f"preprocess.clip_percentiles: got {spec.clip_percentiles}; expected 0 <= low < high <= 100")
    if spec.bit_depth == 16 and spec.channels == 3:
        raise ConfigError("preprocess.bit_depth: 16-bit is stored for grey only; set channels: 1 or bit_depth: 8")


def record_rejects(paths: PipelinePaths, rejects: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """Make every reject printable and one line, write ``paths.rejects`` and log them;
    returns the rejects as written and the rejects file as shown (relative to the root)."""
    rejects = [{"file": printable_file(r["file"]), "reason": " ".join(r["reason"].split())} for r in rejects]
    shown = paths.rejects.relative_to(paths.root).as_posix()
    _write_rejects(paths, rejects)
    _log_rejects(rejects, shown)
    return rejects, shown


def _write_rejects(paths: PipelinePaths, rejects: list[dict[str, str]]) -> None:
    paths.rejects.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(sorted(rejects, key=lambda r: (r["file"], r["reason"])), paths.rejects)


def _log_rejects(rejects: list[dict[str, str]], rejects_path: str) -> None:
    for reject in rejects[:MAX_REJECTS_LOGGED]:
        logger.warning("rejected %s: %s", reject["file"], reject["reason"])
    if len(rejects) > MAX_REJECTS_LOGGED:
        logger.warning("... and %d more rejected files, see %s", len(rejects) - MAX_REJECTS_LOGGED, rejects_path)


@contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Warnings raised inside (by pydicom, nibabel, Pillow while reading inputs, in any
    thread) are logged on leaving, once per distinct message, on one line each with quoted
    values hidden, instead of Python's two-line ``file:line: Warning`` output."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    counts = Counter(f"{w.category.__name__}: {library_line(w.message)}" for w in caught)
    for message, n in sorted(counts.items()):
        logger.warning("while reading the inputs (%d time(s)): %s", n, message)


def _run_inputs(inputs: list[Input], spec: PreprocessSpec, threads: int) -> list[_Outcome]:
    """Process every input (in ``threads`` threads)."""
    with _one_line_warnings():
        if threads <= 1 or len(inputs) <= 1:
            return [_process(item, spec) for item in inputs]
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(lambda item: _process(item, spec), inputs))


def ingest(cfg: PipelineConfig, paths: PipelinePaths) -> dict[str, Any]:
    """Ingest ``cfg.source`` into ``paths.real`` (dataset) and ``paths.rejects``.

    Returns ``{"rows", "class_counts": {split: {label: n}}, "rejects", "subjects",
    "groups"}`` (JSON-able). Raises :class:`DataError` for whole-input problems and
    :class:`ConfigError` for settings that cannot work with the source.
    """
    spec = cfg.preprocess
    _check_preprocess(spec)
    Image.MAX_IMAGE_PIXELS = spec.max_pixels  # Pillow's bomb guard agrees with the configured limit
    if cfg.source.kind != "mni152":
        warn_if_default_key(cfg.source.kind)
    src = localize_source(cfg.source, paths)  # an s3 source: downloaded, then read as a folder
    if spec.dims == 3:
        from tasks.ingest_volumes import ingest_volumes  # imports this module's helpers

        return ingest_volumes(cfg, paths, src)
    extra: dict[str, Any] = {}
    if isinstance(src, Mni152Source):
        outcome, digests = _mni152_outcome(src, spec)
        outcomes, rejects, n_inputs = [outcome], [], 1
        extra["template_sha256"] = digests
    else:
        if isinstance(src, FolderSource):
            inputs, rejects = folder_inputs(src, paths)
        else:
            inputs, rejects = csv_inputs(src, paths)
        with _one_line_warnings():
            inputs, mask_rejects = pair_masks(inputs, _limits(spec))
        rejects.extend(mask_rejects)
        unique, duplicates = drop_duplicates(inputs)
        rejects.extend(duplicates)
        n_inputs = len(inputs)
        outcomes = _run_inputs(unique, spec, cfg.threads)
    drafts: list[_Draft] = []
    dropped = 0
    for outcome in outcomes:
        if outcome.reject is not None:
            rejects.append(outcome.reject)
        drafts.extend(outcome.drafts)
        dropped += outcome.dropped_slices
    ids = Counter(d.id for d in drafts)
    if any(n > 1 for n in ids.values()):
        raise DataError("internal: two inputs gave the same row id; report this with the input file list")
    rejects, rejects_rel = record_rejects(paths, rejects)
    if not drafts:
        where = getattr(src, "path", src.kind)
        raise DataError(
            f"{where}: no usable images ({n_inputs} inputs, {len(rejects)} rejected, reasons in {rejects_rel}); "
            "expected readable PNG/JPEG/DICOM/NIfTI images; fix the files listed there"
        )

    group_labels: dict[str, list[str]] = {}
    for draft in drafts:
        group_labels.setdefault(draft.group, []).append(draft.label)
    fractions = {"train": spec.split.train, "val": spec.split.val, "test": spec.split.test}
    splits = assign_splits(group_labels, fractions, cfg.seed)
    empty = [s for s in SPLITS if fractions[s] > 0 and s not in set(splits.values())]
    if empty:
        logger.warning(
            "split(s) %s got no rows: only %d split groups (subjects or slabs); add subjects or set "
            "preprocess.split.slab_slices",
            ", ".join(empty),
            len(group_labels),
        )
    notes = split_notes(((d.label, d.group) for d in drafts), splits, fractions)
    for note in notes:
        logger.warning("%s", note)
    drafts.sort(key=lambda d: d.id)
    subjects = len({d.base_subject for d in drafts})
    provenance = {
        **base_provenance(cfg, notes),
        "foreground_threshold": FOREGROUND_THRESHOLD,
        "counts": {
            "inputs": n_inputs,
            "rejects": len(rejects),
            "rows": len(drafts),
            "dropped_slices": dropped,
            "subjects": subjects,
            "groups": len(group_labels),
        },
        **extra,
    }
    records = ({**d.record, "split": splits[d.group]} for d in drafts)
    manifest = write_dataset(paths.real, records, shard_rows=SHARD_ROWS, provenance=provenance)
    summary = {
        "rows": int(manifest["rows"]),
        "class_counts": manifest["class_counts"],
        "rejects": len(rejects),
        "subjects": subjects,
        "groups": len(group_labels),
    }
    logger.info(
        "ingest: %d rows from %d inputs (%d rejected, %d slices below min_foreground), %d subjects, %d groups",
        summary["rows"],
        n_inputs,
        len(rejects),
        dropped,
        subjects,
        len(group_labels),
    )
    return summary
