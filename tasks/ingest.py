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

Size limits (``preprocess.max_pixels``, ``max_voxels``, ``max_aspect_ratio``) are checked on
each file's header before decoding (see :class:`tasks.readers.Limits`); padding to a square
never allocates more than ``max_pixels`` per plane. A class that cannot reach every split
(too few subjects) is ingested with one warning line and a note in the manifest.
With ``preprocess.channels: 1`` a colour image (channels that differ by more than
:data:`COLOUR_TOLERANCE` on average) is rejected rather than silently turned grey;
grey images saved as RGB are converted.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.resources
import logging
import math
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

from generators.errors import ConfigError, DataError
from generators.shards import SPLITS, Row, from_unit_float, sha256_file, write_dataset, write_json_atomic
from tasks.config import CsvSource, FolderSource, Mni152Source, PipelineConfig, PreprocessSpec
from tasks.paths import PipelinePaths
from tasks.pseudonym import key_id, key_source, pseudonymise, pseudonymise_path, warn_if_default_key
from tasks.readers import Decoded, Limits, ReadError, cut_volume, file_format, one_line, read_image, read_mask
from tasks.storage import localize_source

logger = logging.getLogger(__name__)

SHARD_ROWS = 1024
FOREGROUND_THRESHOLD = 0.1  # scaled intensity in [0, 1] above which a pixel is foreground
COLOUR_TOLERANCE = 0.03  # mean channel spread in [0, 1] up to which an RGB image counts as grey
ID_HEX_CHARS = 16
MAX_PAD_PIXELS = 4096 * 4096  # a plane is padded to a square only up to this size, else resized first
MAX_REJECTS_LOGGED = 20
CSV_REQUIRED = ("image", "label", "subject")
CSV_OPTIONAL = ("mask",)
MNI152_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
MNI152_URI = "nilearn:mni152_2009a_t1_1mm"
MNI152_SUBJECT = "mni152"


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class _Input:
    """One input file. ``file``: posix path relative to the dataset root, pseudonymised
    (:func:`pseudonymise_path`; for rejects and uris); ``subject``: pseudonym from the CSV or
    subject_regex, else None (then the file's own PatientID, else ``stem_subject``);
    ``key``: what makes two inputs the same file (never written out); ``line``: CSV line."""

    file: str
    path: Path
    label: str
    subject: str | None
    stem_subject: str
    key: str
    mask_path: Path | None = None
    line: int | None = None


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


# --------------------------------------------------------------------------- pixels
def scale_intensity(array: np.ndarray, eight_bit: bool, clip_percentiles: tuple[float, float]) -> np.ndarray:
    """Raw samples -> float32 in [0, 1]. 8-bit: ``/255``. Otherwise clip at the array's
    own ``clip_percentiles`` and stretch; when those coincide (a mostly constant array)
    min/max are used instead, and a constant array becomes all zeros."""
    data = array.astype(np.float32, copy=False)
    if eight_bit:
        return np.clip(data / np.float32(255.0), 0.0, 1.0)
    lo, hi = (float(v) for v in np.percentile(data, clip_percentiles))
    if hi <= lo:
        lo, hi = float(data.min()), float(data.max())
    if hi <= lo:
        return np.zeros_like(data)
    return np.clip((data - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0)


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """``(C, H, W)`` float -> ``(channels, H, W)``: RGB to grey by ITU-R 601 luma, grey
    to RGB by repetition."""
    if image.shape[0] == channels:
        return image
    if channels == 1:
        weights = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)[:, None, None]
        return (image * weights).sum(axis=0, keepdims=True, dtype=np.float32)
    return np.repeat(image, channels, axis=0)


def _pad_square(plane: np.ndarray) -> np.ndarray:
    h, w = plane.shape
    side = max(h, w)
    if h == w:
        return plane
    if side * side > MAX_PAD_PIXELS:
        raise ReadError(
            f"plane of {h} x {w} pixels would need a {side} x {side} padded square; expected at most "
            f"{MAX_PAD_PIXELS} pixels: crop the file"
        )
    top, left = (side - h) // 2, (side - w) // 2
    out = np.zeros((side, side), dtype=plane.dtype)
    out[top : top + h, left : left + w] = plane
    return out


def _shrink(plane: np.ndarray, size: int, resample: Image.Resampling) -> np.ndarray:
    """An ``(H, W)`` plane whose padded square would exceed :data:`MAX_PAD_PIXELS`, resized
    first so that its long side is ``size`` (aspect kept, short side >= 1); bounded memory."""
    h, w = plane.shape
    scale = size / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    return np.asarray(Image.fromarray(plane).resize((new_w, new_h), resample))


def pad_resize(image: np.ndarray, size: int) -> np.ndarray:
    """``(C, H, W)`` float32 in [0, 1] -> ``(C, size, size)``: zero-pad to a centred
    square, then Pillow's antialiased bilinear resize (per channel). A plane whose padded
    square would exceed :data:`MAX_PAD_PIXELS` is resized first (long side -> ``size``),
    then padded, so memory stays bounded by the input's own size."""
    planes = []
    for plane in image:
        if max(plane.shape) ** 2 > MAX_PAD_PIXELS:
            plane = _shrink(np.ascontiguousarray(plane, dtype=np.float32), size, Image.Resampling.BILINEAR)
        square = _pad_square(np.ascontiguousarray(plane, dtype=np.float32))
        if square.shape[0] != size:
            square = np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.BILINEAR))
        planes.append(square)
    return np.clip(np.stack(planes), 0.0, 1.0).astype(np.float32)


def pad_resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """``(H, W)`` uint8 class indices -> ``(size, size)`` uint8, centred pad + nearest
    (resize first when the padded square would exceed :data:`MAX_PAD_PIXELS`)."""
    if max(mask.shape) ** 2 > MAX_PAD_PIXELS:
        mask = _shrink(np.ascontiguousarray(mask, dtype=np.uint8), size, Image.Resampling.NEAREST)
    square = _pad_square(np.ascontiguousarray(mask, dtype=np.uint8))
    if square.shape[0] != size:
        square = np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.NEAREST))
    return square.astype(np.uint8)


def foreground_fraction(image: np.ndarray, mask: np.ndarray | None) -> float:
    """Fraction of pixels that are foreground: ``mask > 0`` when a mask is given, else
    mean-over-channels intensity above :data:`FOREGROUND_THRESHOLD` (image in [0, 1])."""
    if mask is not None:
        return float(np.count_nonzero(mask)) / mask.size
    grey = image.mean(axis=0)
    return float(np.count_nonzero(grey > FOREGROUND_THRESHOLD)) / grey.size


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
    unit = scale_intensity(decoded.array, decoded.eight_bit, spec.clip_percentiles)
    if spec.channels == 1 and unit.shape[0] == 3:
        spread = float(np.mean(unit.max(axis=0) - unit.min(axis=0)))
        if spread > COLOUR_TOLERANCE:
            raise ReadError(
                f"colour image (mean channel spread {spread:.2f} > {COLOUR_TOLERANCE}) where grey is expected "
                "(preprocess.channels: 1); set preprocess.channels: 3 or convert the file to grey"
            )
    image = pad_resize(to_channels(unit, spec.channels), spec.size)
    small_mask = None if mask is None else pad_resize_mask(mask, spec.size)
    return [_draft(uri, subject, subject, label, image, small_mask, spec)]


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
    return Limits(spec.max_pixels, spec.max_voxels, spec.max_aspect_ratio)


def _process(item: _Input, spec: PreprocessSpec) -> _Outcome:
    """Read, preprocess and encode one input file; per-file problems (including files over
    the size limits, checked before decoding) become a reject."""
    try:
        decoded = read_image(item.path, _limits(spec))
        mask = None if item.mask_path is None else read_mask(item.mask_path, _limits(spec))
        subject = item.subject or decoded.subject or item.stem_subject
        if decoded.kind == "image":
            drafts = _image_drafts(decoded, mask, spec, item.file, subject, item.label)
            return _Outcome(drafts=drafts)
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


# --------------------------------------------------------------------------- paths
def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` (symlinks resolved) lies inside ``root`` (already resolved)."""
    return path.resolve().is_relative_to(root)


def _stem(name: str) -> str:
    lower = name.lower()
    for suffix in (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".dcm", ".dicom"):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _hidden(rel: PurePosixPath) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _printable(name: str) -> str:
    """A file name safe for JSON/Parquet/logs: undecodable bytes as ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _printable_file(name: str) -> str:
    """A reject's file on one line: undecodable bytes and control characters escaped."""
    text = _printable(name)
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _source_dir(paths: PipelinePaths, configured: str, what: str) -> Path:
    path = paths.root / configured
    if not path.exists():
        raise DataError(
            f"{configured}: source {what} not found (relative to the project root); "
            "fix source.path in pipelines.yaml or create the data"
        )
    return path


# --------------------------------------------------------------------------- sources
HIDDEN_REASON = "hidden {what} (name starts with '.'), skipped; rename it without the dot to ingest it"


def _hidden_reject(rel: str, keep: int, is_dir: bool) -> dict[str, str]:
    what = "folder" if is_dir else "file"
    return {"file": pseudonymise_path(rel, keep) + ("/" if is_dir else ""), "reason": HIDDEN_REASON.format(what=what)}


def _folder_inputs(src: FolderSource, paths: PipelinePaths) -> tuple[list[_Input], list[dict[str, str]]]:
    """Inputs below ``src.path`` (one sub-folder per class). Paths in inputs and rejects
    are pseudonymised below the class folder; hidden files and folders are rejected
    (listed, not read)."""
    root = _source_dir(paths, src.path, "folder")
    if not root.is_dir():
        raise DataError(f"{src.path}: expected a folder with one sub-folder per class, got a file; fix source.path")
    try:
        pattern = re.compile(src.subject_regex) if src.subject_regex else None
    except re.error as exc:
        raise ConfigError(f"source.subject_regex: invalid regular expression ({exc}); fix the pattern") from None
    real_root = root.resolve()
    inputs: list[_Input] = []
    rejects: list[dict[str, str]] = []
    entries = sorted(root.iterdir(), key=lambda p: p.name)
    classes = [d for d in entries if d.is_dir() and not d.name.startswith(".")]
    for entry in entries:
        if entry.name.startswith("."):
            is_dir = entry.is_dir()
            rejects.append(_hidden_reject(entry.name, 1 if is_dir else 0, is_dir))  # a class folder name is kept
        elif entry.is_file() and file_format(entry) is not None:
            rejects.append(
                {
                    "file": pseudonymise_path(entry.name),
                    "reason": f"image outside any class sub-folder; move it into {src.path}/<label>/",
                }
            )
    for class_dir in classes:
        files: list[Path] = []
        for path in sorted(class_dir.rglob("*"), key=lambda p: p.relative_to(root).as_posix()):
            parts = PurePosixPath(path.relative_to(root).as_posix()).parts
            hidden = [i for i, part in enumerate(parts) if part.startswith(".")]
            if hidden and hidden[0] == len(parts) - 1:  # the entry itself is hidden (not inside a hidden folder)
                rejects.append(_hidden_reject("/".join(parts), 1, path.is_dir()))
            elif not hidden and path.is_file():
                files.append(path)
        for path in files:
            rel = path.relative_to(root).as_posix()
            shown = pseudonymise_path(rel, keep=1)
            if not _utf8(rel):
                rejects.append({"file": shown, "reason": "file or folder name is not valid UTF-8; rename it"})
                continue
            if not _inside(path, real_root):
                rejects.append({"file": shown, "reason": "path escapes the dataset root (symlink); copy the file in"})
                continue
            if file_format(path) is None:
                rejects.append(
                    {
                        "file": shown,
                        "reason": "unsupported file type; expected PNG, JPEG, DICOM or NIfTI: convert or remove it",
                    }
                )
                continue
            subject = None
            if pattern is not None:
                inner = path.relative_to(class_dir).as_posix()
                match = pattern.search(inner)
                group = 1 if pattern.groups else 0
                if match is None or not match.group(group).strip():
                    rejects.append(
                        {
                            "file": shown,
                            "reason": f"source.subject_regex {src.subject_regex!r} does not match; "
                            "fix the pattern or rename the file",
                        }
                    )
                    continue
                subject = pseudonymise(match.group(group))
            inputs.append(
                _Input(
                    file=shown,
                    path=path,
                    label=class_dir.name,
                    subject=subject,
                    stem_subject=pseudonymise(_stem(path.name).strip() or path.name),
                    key=rel,
                )
            )
    if not inputs and not rejects:
        raise DataError(
            f"{src.path}: no image files found; expected one sub-folder per class holding "
            f"PNG/JPEG/DICOM/NIfTI files (e.g. {src.path}/<label>/scan01.png); add images or fix source.path"
        )
    return inputs, rejects


def locate_inputs(cfg: PipelineConfig, paths: PipelinePaths) -> dict[str, Path]:
    """``{pseudonymised file: path on this machine}`` for a folder or CSV source, computed
    with the current pseudonym key and never written anywhere: how a person who holds the
    key finds the file behind a row's ``source`` or a reject's ``file``."""
    src = cfg.source
    if isinstance(src, FolderSource):
        root = _source_dir(paths, src.path, "folder")
        return {pseudonymise_path(p.relative_to(root).as_posix(), keep=1): p for p in sorted(root.rglob("*"))}
    if isinstance(src, CsvSource):
        csv_file = _source_dir(paths, src.path, "CSV")
        root = paths.root / src.root if src.root else csv_file.parent
        return {pseudonymise_path(p.relative_to(root).as_posix()): p for p in sorted(root.rglob("*"))}
    return {}


def _csv_path(entry: str, root: Path, real_root: Path) -> tuple[Path | None, str | None]:
    """Resolve one CSV path entry; returns (path, None) or (None, reason)."""
    try:
        candidate = Path(entry)
        full = candidate if candidate.is_absolute() else root / candidate
        if not _inside(full, real_root):
            return None, "path escapes the dataset root; keep images under the CSV root"
        if not full.is_file():
            return None, "file not found under the CSV root; fix the path in the CSV"
    except (ValueError, OSError) as exc:  # NUL byte, name too long, ...
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)  # no machine path
        return None, f"unusable path ({type(exc).__name__}: {one_line(detail, 80)}); fix the path in the CSV"
    return full, None


def _csv_inputs(src: CsvSource, paths: PipelinePaths) -> tuple[list[_Input], list[dict[str, str]]]:
    """Inputs listed in the CSV; image paths in inputs and rejects are pseudonymised."""
    csv_file = _source_dir(paths, src.path, "CSV")
    if not csv_file.is_file():
        raise DataError(f"{src.path}: expected a CSV file, got a folder; point source.path at the CSV")
    root = paths.root / src.root if src.root else csv_file.parent
    if not root.is_dir():
        raise DataError(f"{src.root}: CSV root folder not found (relative to the project root); fix source.root")
    real_root = root.resolve()
    try:
        with open(csv_file, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in (reader.fieldnames or [])]
            missing = [name for name in CSV_REQUIRED if name not in header]
            if missing:
                raise DataError(
                    f"{src.path}: missing column(s) {', '.join(missing)}; required columns: "
                    f"{', '.join(CSV_REQUIRED)} (optional: {', '.join(CSV_OPTIONAL)}); got: "
                    f"{', '.join(header) or 'no header'}; add them to the header row"
                )
            doubled = sorted({name for name in header if header.count(name) > 1} & {*CSV_REQUIRED, *CSV_OPTIONAL})
            if doubled:
                raise DataError(
                    f"{src.path}: column(s) {', '.join(doubled)} appear more than once in the header; keep one of each"
                )
            reader.fieldnames = header
            lines = [(reader.line_num, row) for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(
            f"{src.path}: unreadable CSV ({one_line(exc, 120)}); expected UTF-8 comma-separated text; fix the file"
        ) from None
    if not lines:
        raise DataError(f"{src.path}: the CSV has a header but no rows; expected one row per image")
    inputs: list[_Input] = []
    rejects: list[dict[str, str]] = []
    for line, row in lines:
        image = (row.get("image") or "").strip()
        label = (row.get("label") or "").strip()
        subject = (row.get("subject") or "").strip()
        mask_entry = (row.get("mask") or "").strip()
        shown = pseudonymise_path(image)
        if not image:
            rejects.append(
                {"file": f"{Path(src.path).name}:{line}", "reason": "empty image path; fill in the image column"}
            )
            continue
        if not label:
            rejects.append({"file": shown, "reason": f"missing label (CSV line {line}); fill in the label column"})
            continue
        if not subject:
            rejects.append({"file": shown, "reason": f"missing subject (CSV line {line}); fill in the subject column"})
            continue
        path, problem = _csv_path(image, root, real_root)
        if path is None:
            rejects.append({"file": shown, "reason": f"{problem} (CSV line {line})"})
            continue
        mask_path = None
        if mask_entry:
            mask_path, problem = _csv_path(mask_entry, root, real_root)
            if mask_path is None:
                rejects.append({"file": shown, "reason": f"mask: {problem} (CSV line {line})"})
                continue
        real = path.resolve().relative_to(real_root).as_posix()
        inputs.append(
            _Input(
                file=pseudonymise_path(real),
                path=path,
                label=label,
                subject=pseudonymise(subject),
                stem_subject=pseudonymise(subject),
                key=real,
                mask_path=mask_path,
                line=line,
            )
        )
    return inputs, rejects


def mni152_files() -> dict[str, Path]:
    """Paths of the MNI152 2009a 1 mm T1, GM and WM templates inside nilearn's package
    data (the files ``nilearn.datasets.load_mni152_*_template(resolution=1)`` read; they
    are shipped in the wheel, nothing is downloaded)."""
    try:
        base = importlib.resources.files("nilearn").joinpath("datasets", "data")
    except ModuleNotFoundError:
        raise DataError("source kind 'mni152' needs nilearn; install it with `pip install nilearn`") from None
    files = {key: Path(str(base.joinpath(name))) for key, name in MNI152_FILES.items()}
    missing = [p.name for p in files.values() if not p.is_file()]
    if missing:
        raise DataError(
            f"nilearn package data lacks {', '.join(missing)}; expected the MNI152 2009a templates "
            "shipped with nilearn >= 0.10; reinstall nilearn"
        )
    return files


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


# --------------------------------------------------------------------------- splits
def allocate_groups(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """How many of ``n`` groups each split gets: largest-remainder rounding, then at
    least one group per split with a positive fraction when ``n`` allows; with fewer
    groups than such splits, train is filled first, then test, then val."""
    positive = [s for s in ("train", "test", "val") if fractions[s] > 0]
    if n <= len(positive):
        return {s: int(s in positive[:n]) for s in SPLITS}
    raw = {s: round(fractions[s] * n, 9) for s in SPLITS}
    counts = {s: math.floor(raw[s]) for s in SPLITS}
    by_remainder = sorted(SPLITS, key=lambda s: (-(raw[s] - counts[s]), SPLITS.index(s)))
    for s in by_remainder[: n - sum(counts.values())]:
        counts[s] += 1
    for s in positive:
        if counts[s] == 0:
            donor = max(positive, key=lambda d: (counts[d], -positive.index(d)))
            counts[donor] -= 1
            counts[s] += 1
    return counts


def assign_splits(group_labels: dict[str, list[str]], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """``{group: split}``, stratified by each group's majority label (ties: the smallest
    label). Within a stratum groups are ordered by sha256 of ``seed``/label/group, so the
    result depends only on the seed and the group ids, never on input order."""
    strata: dict[str, list[str]] = {}
    for group in sorted(group_labels):
        counts = Counter(group_labels[group])
        majority = min(counts, key=lambda label: (-counts[label], label))
        strata.setdefault(majority, []).append(group)
    assignment: dict[str, str] = {}
    for label in sorted(strata):
        groups = sorted(strata[label], key=lambda g: hashlib.sha256(f"{seed}\x00{label}\x00{g}".encode()).hexdigest())
        start = 0
        for split, count in allocate_groups(len(groups), fractions).items():
            for group in groups[start : start + count]:
                assignment[group] = split
            start += count
    return assignment


# --------------------------------------------------------------------------- stage
def _check_preprocess(spec: PreprocessSpec) -> None:
    lo, hi = spec.clip_percentiles
    if not 0.0 <= lo < hi <= 100.0:
        raise ConfigError(f"preprocess.clip_percentiles: got {spec.clip_percentiles}; expected 0 <= low < high <= 100")
    if spec.bit_depth == 16 and spec.channels == 3:
        raise ConfigError("preprocess.bit_depth: 16-bit is stored for grey only; set channels: 1 or bit_depth: 8")


def _split_notes(drafts: list[_Draft], splits: dict[str, str], fractions: dict[str, float]) -> list[str]:
    """One line per class that has no rows in some split with a positive fraction (too
    few subjects or slabs of that class to honour the split); empty when all is well."""
    seen: dict[str, set[str]] = {}
    groups: dict[str, set[str]] = {}
    for draft in drafts:
        seen.setdefault(draft.label, set()).add(splits[draft.group])
        groups.setdefault(draft.label, set()).add(draft.group)
    notes = []
    for label in sorted(seen):
        missing = [s for s in SPLITS if fractions[s] > 0 and s not in seen[label]]
        if missing:
            notes.append(
                f"class {label!r} has {len(groups[label])} split group(s) (subjects or slabs) and no rows in "
                f"{', '.join(missing)}; add subjects of this class or set preprocess.split.slab_slices"
            )
    return notes


def _write_rejects(paths: PipelinePaths, rejects: list[dict[str, str]]) -> None:
    paths.rejects.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(sorted(rejects, key=lambda r: (r["file"], r["reason"])), paths.rejects)


def _log_rejects(rejects: list[dict[str, str]], rejects_path: str) -> None:
    for reject in rejects[:MAX_REJECTS_LOGGED]:
        logger.warning("rejected %s: %s", reject["file"], reject["reason"])
    if len(rejects) > MAX_REJECTS_LOGGED:
        logger.warning("... and %d more rejected files, see %s", len(rejects) - MAX_REJECTS_LOGGED, rejects_path)


def _run_inputs(inputs: list[_Input], spec: PreprocessSpec, threads: int) -> Iterator[_Outcome]:
    if threads <= 1 or len(inputs) <= 1:
        yield from (_process(item, spec) for item in inputs)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        yield from pool.map(lambda item: _process(item, spec), inputs)


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
    extra: dict[str, Any] = {}
    if isinstance(src, Mni152Source):
        outcome, digests = _mni152_outcome(src, spec)
        outcomes, rejects, n_inputs = [outcome], [], 1
        extra["template_sha256"] = digests
    else:
        if isinstance(src, FolderSource):
            inputs, rejects = _folder_inputs(src, paths)
        else:
            inputs, rejects = _csv_inputs(src, paths)
        unique: list[_Input] = []
        first: dict[str, _Input] = {}
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
        n_inputs = len(inputs)
        outcomes = list(_run_inputs(unique, spec, cfg.threads))
    drafts: list[_Draft] = []
    dropped = 0
    for outcome in outcomes:
        if outcome.reject is not None:
            rejects.append(outcome.reject)
        drafts.extend(outcome.drafts)
        dropped += outcome.dropped_slices
    rejects = [{"file": _printable_file(r["file"]), "reason": " ".join(r["reason"].split())} for r in rejects]
    ids = Counter(d.id for d in drafts)
    if any(n > 1 for n in ids.values()):
        raise DataError("internal: two inputs gave the same row id; report this with the input file list")
    rejects_rel = paths.rejects.relative_to(paths.root).as_posix()
    _write_rejects(paths, rejects)
    _log_rejects(rejects, rejects_rel)
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
    notes = _split_notes(drafts, splits, fractions)
    for note in notes:
        logger.warning("%s", note)
    drafts.sort(key=lambda d: d.id)
    subjects = len({d.base_subject for d in drafts})
    provenance = {
        "stage": "ingest",
        "source": cfg.source.model_dump(mode="json"),
        "modality": cfg.source.modality,
        "anatomy": cfg.source.anatomy,
        "licence": cfg.source.licence,
        "preprocess": spec.model_dump(mode="json"),
        "seed": cfg.seed,
        "pseudonym": {
            "method": "hmac-sha256",
            "key": key_source(),
            "key_id": key_id(),
            "paths": "class folder kept, every other component hmac-sha256 (12 hex)",
        },
        "notes": notes,
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
