"""Input discovery of ingest: which files a folder or CSV source holds, path safety,
pseudonymised names, and mask pairing.

Path safety: every input must resolve (symlinks followed) inside the dataset root (the
folder, or the CSV root); hidden files and folders (names starting with ``.``) are
listed in the rejects, not read; names that are not valid UTF-8 are rejected. Every
path component below the root except the class folder is pseudonymised
(:func:`tasks.pseudonym.pseudonymise_path`) before it reaches a reject, a uri or the log.
``source.path`` may be absolute (data usually lives outside the project) or relative
to the project root.

Masks (:func:`pair_masks`), besides the CSV ``mask`` column:

- DICOM SEG: a SEG among the inputs becomes the mask of every input image whose
  SOPInstanceUID it references (per-frame SourceImageSequence); the SEG is not an input
  itself. A SEG that references no input image is rejected with that reason.
- label map by name: ``<stem>_seg``, ``<stem>_mask``, ``<stem>_label`` or
  ``<stem>_labels`` (``.nii``, ``.nii.gz`` or ``.png``) in the same folder as the image
  ``<stem>.*`` is that image's mask.
"""

from __future__ import annotations

import csv
import importlib.resources
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np

from generators.errors import ConfigError, DataError
from tasks.config import CsvSource, FolderSource, PipelineConfig
from tasks.paths import PipelinePaths
from tasks.pseudonym import pseudonymise, pseudonymise_path
from tasks.reader_base import Limits, ReadError, one_line
from tasks.readers import SEG_SOP_CLASS, dicom_identity, file_format, read_dicom_seg

CSV_REQUIRED = ("image", "label", "subject")
CSV_OPTIONAL = ("mask",)
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".dcm", ".dicom")
MASK_STEM_SUFFIXES = ("_seg", "_mask", "_labels", "_label")
MASK_FILE_SUFFIXES = (".nii.gz", ".nii", ".png")
MNI152_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


@dataclass(frozen=True)
class Input:
    """One input file. ``file``: posix path relative to the dataset root, pseudonymised
    (:func:`pseudonymise_path`; for rejects and uris); ``subject``: pseudonym from the CSV or
    subject_regex, else None (then the file's own PatientID, else ``stem_subject``);
    ``key``: what makes two inputs the same file (never written out); ``line``: CSV line;
    ``mask_path``: a mask file to read; ``mask``: a mask already read (DICOM SEG),
    ``(H, W)`` uint8 class indices."""

    file: str
    path: Path
    label: str
    subject: str | None
    stem_subject: str
    key: str
    mask_path: Path | None = None
    line: int | None = None
    mask: np.ndarray | None = None


# --------------------------------------------------------------------------- paths
def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` (symlinks resolved) lies inside ``root`` (already resolved)."""
    return path.resolve().is_relative_to(root)


def stem(name: str) -> str:
    """A file name without its image suffix (``a.nii.gz`` -> ``a``)."""
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _hidden(rel: PurePosixPath) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _printable(name: str) -> str:
    """A file name safe for JSON/Parquet/logs: undecodable bytes as ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def printable_file(name: str) -> str:
    """A reject's file on one line: undecodable bytes and control characters escaped."""
    text = _printable(name)
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def source_dir(paths: PipelinePaths, configured: str, what: str) -> Path:
    """``configured`` (absolute, or relative to the project root) as an existing path."""
    path = paths.root / configured
    if not path.exists():
        raise DataError(
            f"{configured}: source {what} not found (an absolute path, or relative to the project root); "
            "fix source.path in pipelines.yaml or create the data"
        )
    return path


# --------------------------------------------------------------------------- sources
HIDDEN_REASON = "hidden {what} (name starts with '.'), skipped; rename it without the dot to ingest it"


def _hidden_reject(rel: str, keep: int, is_dir: bool) -> dict[str, str]:
    what = "folder" if is_dir else "file"
    return {"file": pseudonymise_path(rel, keep) + ("/" if is_dir else ""), "reason": HIDDEN_REASON.format(what=what)}


def folder_inputs(src: FolderSource, paths: PipelinePaths) -> tuple[list[Input], list[dict[str, str]]]:
    """Inputs below ``src.path`` (one sub-folder per class). Paths in inputs and rejects
    are pseudonymised below the class folder; hidden files and folders are rejected
    (listed, not read)."""
    root = source_dir(paths, src.path, "folder")
    if not root.is_dir():
        raise DataError(f"{src.path}: expected a folder with one sub-folder per class, got a file; fix source.path")
    try:
        pattern = re.compile(src.subject_regex) if src.subject_regex else None
    except re.error as exc:
        raise ConfigError(f"source.subject_regex: invalid regular expression ({exc}); fix the pattern") from None
    real_root = root.resolve()
    inputs: list[Input] = []
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
                Input(
                    file=shown,
                    path=path,
                    label=class_dir.name,
                    subject=subject,
                    stem_subject=pseudonymise(stem(path.name).strip() or path.name),
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
        root = source_dir(paths, src.path, "folder")
        return {pseudonymise_path(p.relative_to(root).as_posix(), keep=1): p for p in sorted(root.rglob("*"))}
    if isinstance(src, CsvSource):
        csv_file = source_dir(paths, src.path, "CSV")
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


def csv_inputs(src: CsvSource, paths: PipelinePaths) -> tuple[list[Input], list[dict[str, str]]]:
    """Inputs listed in the CSV; image paths in inputs and rejects are pseudonymised."""
    csv_file = source_dir(paths, src.path, "CSV")
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
    inputs: list[Input] = []
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
            Input(
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


# --------------------------------------------------------------------------- masks
def _mask_partner(path: Path) -> tuple[Path, str] | None:
    """``(folder, image stem)`` when ``path`` is named like a label map of an image
    (``<stem>_seg.nii.gz`` etc.), else None."""
    lower = path.name.lower()
    suffix = next((s for s in MASK_FILE_SUFFIXES if lower.endswith(s)), None)
    if suffix is None:
        return None
    base = path.name[: -len(suffix)]
    for tail in MASK_STEM_SUFFIXES:
        if base.lower().endswith(tail) and len(base) > len(tail):
            return path.parent, base[: -len(tail)]
    return None


def _pair_named(inputs: list[Input]) -> list[Input]:
    """Label maps named ``<stem>_seg.*`` (see module doc) become the ``mask_path`` of the
    image ``<stem>.*`` in the same folder that has no mask yet; they stop being inputs."""
    by_stem: dict[tuple[Path, str], int] = {}
    for i, item in enumerate(inputs):
        if _mask_partner(item.path) is None:
            by_stem.setdefault((item.path.parent, stem(item.path.name)), i)
    paired: dict[int, Path] = {}
    consumed: set[int] = set()
    for i, item in enumerate(inputs):
        partner = _mask_partner(item.path)
        image = None if partner is None else by_stem.get(partner)
        if image is not None and inputs[image].mask_path is None and image not in paired:
            paired[image] = item.path
            consumed.add(i)
    return [
        replace(item, mask_path=paired[i]) if i in paired else item
        for i, item in enumerate(inputs)
        if i not in consumed
    ]


def pair_masks(inputs: list[Input], limits: Limits) -> tuple[list[Input], list[dict[str, str]]]:
    """Attach masks given as files among the inputs (module doc): DICOM SEGs by the
    SOPInstanceUIDs they reference, label maps by name. Returns (image inputs, rejects)."""
    rejects: list[dict[str, str]] = []
    identities = {i: dicom_identity(item.path) for i, item in enumerate(inputs) if file_format(item.path) == "dicom"}
    segs = [i for i, (sop_class, _) in identities.items() if sop_class == SEG_SOP_CLASS]
    if not segs:
        return _pair_named(inputs), rejects
    by_uid = {uid: i for i, (sop_class, uid) in identities.items() if uid and sop_class != SEG_SOP_CLASS}
    masks: dict[int, np.ndarray] = {}
    for s in segs:
        seg = inputs[s]
        try:
            referenced = read_dicom_seg(seg.path, limits)
        except ReadError as exc:
            rejects.append({"file": seg.file, "reason": str(exc)})
            continue
        found = {by_uid[uid]: mask for uid, mask in referenced.items() if uid in by_uid}
        if not found:
            rejects.append(
                {
                    "file": seg.file,
                    "reason": f"DICOM SEG referencing {len(referenced)} image(s), none of them in the source; "
                    "add the referenced images (same SOPInstanceUID) or remove the SEG",
                }
            )
            continue
        for i, mask in found.items():
            if i in masks or inputs[i].mask_path is not None:
                rejects.append(
                    {
                        "file": seg.file,
                        "reason": f"second mask for image {inputs[i].file}; expected one mask per image: "
                        "remove one of the SEGs or the CSV mask",
                    }
                )
                continue
            masks[i] = mask
    consumed = set(segs)
    images = [
        replace(item, mask=masks[i]) if i in masks else item for i, item in enumerate(inputs) if i not in consumed
    ]
    return _pair_named(images), rejects
