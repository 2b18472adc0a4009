"""Scaffold a pipeline from a folder of images: ``synthmed new-pipeline`` and ``synthmed init``.

:func:`inspect_source` looks at a folder with one sub-folder per class (PNG, JPEG, DICOM,
NIfTI; TIFF is found and flagged, ingest does not read it) or at a CSV manifest (columns
``image, label, subject[, mask]``) without decoding a pixel: sizes come from the headers
(Pillow's lazy open, the NIfTI header, DICOM Rows/Columns/NumberOfFrames read with
``specific_tags``). It counts files per class, formats, sizes, channels and masks, and lists
what would hurt a run: a class below the preflight minimum, mixed or tiny sizes, files
ingest cannot read, a single class, masks missing for segmentation. No file name is
printed (names often hold patient names or dates): only counts, suffixes and class names.

:func:`pipeline_entry` turns the findings into a pipeline with CPU-sized defaults;
:func:`append_pipeline` adds it to ``pipelines.yaml`` as text appended under
``pipelines:`` (comments and layout of the rest stay byte for byte), after checking the
whole file with the validator of ``tasks/config.py``; :func:`ensure_dvc_stages` renders
``dvc.yaml`` with ``flows/versioning.py`` so the new pipeline has its DVC stages.
:func:`init_project` makes a new project folder (pipelines.yaml, git, DVC, dvc.yaml).

For a segmentation folder, masks are found by name, ``<stem>_mask.<ext>`` beside
``<stem>.<ext>``; the scaffold then writes ``<name>-manifest.csv`` next to
``pipelines.yaml`` (a ``csv`` source, because a ``folder`` source carries no masks).
"""

from __future__ import annotations

import csv
import logging
import math
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from generators.errors import ConfigError, DataError
from tasks.config import PipelineConfig, PreflightSpec, SplitSpec, format_validation_error, load_pipelines

log = logging.getLogger(__name__)

Task = Literal["classification", "segmentation"]
READABLE = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".dcm": "DICOM", ".dicom": "DICOM"}
NIFTI = (".nii.gz", ".nii")
UNREADABLE_IMAGES = {".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP", ".gif": "GIF", ".webp": "WebP"}
MASK_SUFFIX = "_mask"
TINY_SIDE = 32  # pixels: below this a generator has little to learn and the filters little to check
MAX_SIZE = 64  # the default preprocess.size is capped here (CPU-sized runs; 128 takes ~4x longer to train)
LDM_BATCH = 32
AUTOENCODER_STEPS = 750  # optimiser steps of demo-train's recipe (375 epochs x 2 batches)
DIFFUSION_STEPS = 1200  # (600 epochs x 2 batches)
MIN_SIZE = 16
HEADER = "# Pipelines made by `synthmed init`; see `synthmed validate` and tasks/config.py for every key.\n"


@dataclass
class ClassFindings:
    """What one class holds: readable image files by format, their sizes ``(H, W)``,
    channels, volumes (``(shape, slices along axis 2)``) and masks found."""

    files: int = 0
    formats: Counter[str] = field(default_factory=Counter)
    sizes: Counter[tuple[int, int]] = field(default_factory=Counter)
    channels: Counter[int] = field(default_factory=Counter)
    volumes: int = 0
    slices: int = 0
    masks: int = 0
    subjects: set[str] = field(default_factory=set)  # DICOM PatientID, else the file stem; never printed


@dataclass
class Findings:
    """The inspection of one source (see :func:`inspect_source`)."""

    kind: Literal["folder", "csv"]
    path: Path
    classes: dict[str, ClassFindings] = field(default_factory=dict)
    unreadable: Counter[str] = field(default_factory=Counter)  # suffix -> files ingest would reject
    other: Counter[str] = field(default_factory=Counter)  # non-image files by suffix
    hidden: int = 0
    outside: int = 0  # images outside any class folder
    header_errors: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # reason -> readable files ingest refuses
    pairs: list[tuple[str, str, str, str]] = field(default_factory=list)  # (image, label, subject, mask) rows

    @property
    def files(self) -> int:
        return sum(c.files for c in self.classes.values())

    @property
    def sizes(self) -> Counter[tuple[int, int]]:
        total: Counter[tuple[int, int]] = Counter()
        for c in self.classes.values():
            total.update(c.sizes)
        return total

    @property
    def formats(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for c in self.classes.values():
            total.update(c.formats)
        return total


# --------------------------------------------------------------------------- inspection
def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _stem(path: Path) -> str:
    return path.name[: -len(_suffix(path))] if _suffix(path) else path.name


class Refused(Exception):
    """A readable file ingest refuses; the message is the reason (one line)."""


def _header(path: Path) -> tuple[str, tuple[int, ...], int, str]:
    """``(format, spatial shape, channels, subject)`` from the file header, no pixels
    decoded. 2D images: shape ``(H, W)``; volumes: the 3D shape. ``subject`` is what ingest
    groups by: DICOM PatientID (kept in memory only, to count), else the file stem."""
    suffix = _suffix(path)
    if suffix in NIFTI:
        import nibabel as nib

        shape = tuple(int(n) for n in nib.load(str(path)).header.get_data_shape())
        if len(shape) > 4 or (len(shape) == 4 and shape[3] > 1):
            raise Refused("NIfTI series with more than one volume (4D): split it into 3D volumes first")
        spatial = tuple(n for n in shape[:3] if n > 1) if len(shape) >= 3 else shape
        return "NIfTI", spatial if len(spatial) >= 2 else shape[:2], 1, _stem(path)
    if READABLE[suffix] == "DICOM":
        import pydicom

        tags = ["Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "PatientID"]
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=tags)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        rows, cols = int(ds.Rows), int(ds.Columns)
        shape = (rows, cols) if frames == 1 else (cols, rows, frames)
        subject = str(getattr(ds, "PatientID", "") or "").strip() or _stem(path)
        return "DICOM", shape, int(getattr(ds, "SamplesPerPixel", 1) or 1), subject
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
        channels = 1 if image.mode in ("1", "L", "I", "I;16", "I;16B", "F", "P", "LA") else 3
        return READABLE[suffix], (height, width), channels, _stem(path)


def _add_image(findings: Findings, label: str, path: Path) -> bool:
    """Count one image file of class ``label``; False when it is not a readable image."""
    suffix = _suffix(path)
    if suffix in UNREADABLE_IMAGES:
        findings.unreadable[UNREADABLE_IMAGES[suffix]] += 1
        return False
    if suffix not in READABLE and suffix not in NIFTI:
        findings.other[suffix or "(no suffix)"] += 1
        return False
    entry = findings.classes.setdefault(label, ClassFindings())
    try:
        fmt, shape, channels, subject = _header(path)
    except Refused as exc:
        findings.refused[str(exc)] += 1
        return False
    except Exception:  # noqa: BLE001 - any header problem of one file is one counted finding
        findings.header_errors += 1
        return False
    entry.files += 1
    entry.subjects.add(subject)
    entry.formats[fmt] += 1
    entry.channels[channels] += 1
    if len(shape) == 3:
        entry.volumes += 1
        entry.slices += shape[2]
        entry.sizes[(shape[1], shape[0])] += 1  # an axial slice is displayed rotated: (J, I)
    else:
        entry.sizes[(shape[0], shape[1])] += 1
    return True


def _inspect_folder(root: Path) -> Findings:
    findings = Findings(kind="folder", path=root)
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            findings.hidden += 1
        elif entry.is_file():
            suffix = _suffix(entry)
            if suffix in READABLE or suffix in NIFTI or suffix in UNREADABLE_IMAGES:
                findings.outside += 1
            else:
                findings.other[suffix or "(no suffix)"] += 1
    for class_dir in sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=str):
        files = sorted(p for p in class_dir.rglob("*") if p.is_file())
        masks = {
            p.parent / (_stem(p)[: -len(MASK_SUFFIX)] + _suffix(p)): p for p in files if _stem(p).endswith(MASK_SUFFIX)
        }
        findings.classes.setdefault(class_dir.name, ClassFindings())
        for path in files:
            rel_parts = path.relative_to(root).parts
            if any(part.startswith(".") for part in rel_parts):
                findings.hidden += 1
                continue
            if path in masks.values():
                continue
            if _add_image(findings, class_dir.name, path) and path in masks:
                findings.classes[class_dir.name].masks += 1
                findings.pairs.append(
                    (
                        path.relative_to(root).as_posix(),
                        class_dir.name,
                        _stem(path),
                        masks[path].relative_to(root).as_posix(),
                    )
                )
    if not findings.classes:
        raise DataError(
            f"{root}: no class sub-folders; expected one sub-folder per class holding images "
            f"(e.g. {root.name}/<label>/scan01.png)"
        )
    return findings


def _inspect_csv(path: Path) -> Findings:
    findings = Findings(kind="csv", path=path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in reader.fieldnames or []]
            reader.fieldnames = header
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: unreadable CSV ({type(exc).__name__}); expected UTF-8 comma-separated text") from None
    missing = [c for c in ("image", "label", "subject") if c not in header]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; expected image, label, subject (optional: mask); "
            f"got: {', '.join(header) or 'no header'}"
        )
    root = path.parent
    for row in rows:
        image = (row.get("image") or "").strip()
        label = (row.get("label") or "").strip() or "(no label)"
        file = root / image
        if not image or not file.is_file():
            findings.header_errors += 1
            continue
        if _add_image(findings, label, file) and (row.get("mask") or "").strip():
            findings.classes[label].masks += 1
    return findings


def inspect_source(path: Path, task: Task = "classification") -> Findings:
    """Inspect a class-folder tree or a CSV manifest (headers only, see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found; expected a folder with one sub-folder per class, or a CSV manifest")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DataError(f"{path}: expected a folder of class sub-folders or a .csv manifest, got a file")
        return _inspect_csv(path)
    return _inspect_folder(path)


def min_images_per_class(preflight: PreflightSpec = PreflightSpec(), split: SplitSpec = SplitSpec()) -> int:
    """Files (subjects) per class below which the preflight will likely fail: enough for
    ``min_train`` in the train fraction and one each in val and test."""
    need_train = math.ceil(preflight.min_train_per_class / split.train)
    return max(need_train, preflight.min_train_per_class + preflight.min_val_per_class + preflight.min_test_per_class)


def _size_text(size: tuple[int, int]) -> str:
    return f"{size[1]}x{size[0]}"  # width x height, as image viewers say it


def warnings_for(findings: Findings, task: Task) -> list[str]:
    """One line per problem a run would meet (see the module docstring)."""
    notes: list[str] = []
    need = min_images_per_class()
    for label, found in sorted(findings.classes.items()):
        if found.files == 0:
            notes.append(f"class '{label}': no readable images; add some or remove the folder")
        elif len(found.subjects) < need:
            notes.append(
                f"class '{label}': {found.files} image file(s) from {len(found.subjects)} subject(s); splits are "
                f"made by subject and the preflight needs about {need} subjects per class (4 train + 1 val + "
                "1 test after a 60/20/20 split): add data or set preflight.allow_too_little_data: true"
            )
    if len([c for c in findings.classes.values() if c.files]) < 2 and task == "classification":
        notes.append("fewer than 2 classes with images: a classifier needs at least 2; add class folders")
    sizes = findings.sizes
    if len(sizes) > 1:
        common = ", ".join(f"{_size_text(s)} ({n})" for s, n in sizes.most_common(3))
        notes.append(
            f"{len(sizes)} different image sizes (most common: {common}); ingest pads each image "
            "to a square and resizes it to preprocess.size"
        )
    small = sum(n for s, n in sizes.items() if min(s) < TINY_SIDE)
    if small:
        notes.append(f"{small} image(s) smaller than {TINY_SIDE} pixels on a side: little for a generator to learn")
    for fmt, n in sorted(findings.unreadable.items()):
        notes.append(f"{n} {fmt} file(s): ingest reads PNG, JPEG, DICOM and NIfTI only; convert them (e.g. to PNG)")
    if findings.other:
        kinds = ", ".join(f"{suffix} x{n}" for suffix, n in findings.other.most_common(4))
        notes.append(f"{sum(findings.other.values())} non-image file(s) ({kinds}): ingest rejects them (rejects.json)")
    for reason, n in sorted(findings.refused.items()):
        notes.append(f"{n} file(s): {reason}; ingest rejects them")
    if findings.header_errors:
        notes.append(
            f"{findings.header_errors} file(s) with an unreadable header or a missing path: ingest rejects them"
        )
    if findings.hidden:
        notes.append(f"{findings.hidden} hidden file(s) or folder(s) (name starts with '.'): skipped")
    if findings.outside:
        notes.append(f"{findings.outside} image(s) outside any class folder: move them into <folder>/<label>/")
    channels = Counter[int]()
    for found in findings.classes.values():
        channels.update(found.channels)
    if len(channels) > 1:
        notes.append("grey and colour images mixed: all are converted to preprocess.channels")
    masks = sum(c.masks for c in findings.classes.values())
    if task == "segmentation" and masks < findings.files:
        notes.append(
            f"segmentation: {findings.files - masks} of {findings.files} image(s) have no mask "
            f"(expected <stem>{MASK_SUFFIX}.<ext> beside each image, or a mask column in the CSV); "
            "images without one do not count for the preflight"
        )
    if findings.kind == "folder" and findings.formats.keys() - {"DICOM"}:
        notes.append(
            "PNG/JPEG/NIfTI files count as one subject each: if several come from one patient, set "
            "source.subject_regex (e.g. '^(sub\\d+)_') so a patient never spans two splits"
        )
    return notes


# --------------------------------------------------------------------------- the entry
def default_size(findings: Findings) -> int:
    """preprocess.size: the largest power of two not above the median short side, in
    [:data:`MIN_SIZE`, :data:`MAX_SIZE`]."""
    sides = sorted(min(s) for s, n in findings.sizes.items() for _ in range(n))
    if not sides:
        return 64
    median = sides[len(sides) // 2]
    return int(min(MAX_SIZE, max(MIN_SIZE, 2 ** int(math.log2(max(median, 1))))))


def training_images(findings: Findings) -> int:
    """Images ingest will likely make: one per 2D file, one per slice of a volume."""
    return sum(c.files - c.volumes + c.slices for c in findings.classes.values())


def default_generator(findings: Findings, segmentation: bool) -> dict[str, Any]:
    """``generator.train`` for what was found.

    Classification: the latent diffusion recipe of the shipped ``synthmed/mni152-ldm`` card
    (pipeline ``demo-train``: the one recipe here whose images passed the realism gate; the
    in-loop cGAN, VAE and pixel DDPM were rejected), with epochs set so training makes about
    :data:`DIFFUSION_STEPS` optimiser steps (:data:`AUTOENCODER_STEPS` for the autoencoder)
    whatever the number of images: ~20-25 min on a 2-core CPU at size 64.
    Segmentation: the paired cGAN (``with_masks``; the ldm does not make masks)."""
    if segmentation:
        return {"architecture": "cgan", "epochs": 200, "batch_size": 16, "with_masks": True, "seed": 0}
    train_images = max(1, int(training_images(findings) * SplitSpec().train))
    batches = math.ceil(train_images / LDM_BATCH)
    return {
        "architecture": "ldm",
        "autoencoder_channels": [16, 32],
        "latent_channels": 4,
        "autoencoder_epochs": max(25, math.ceil(AUTOENCODER_STEPS / batches)),
        "autoencoder_lr": 0.0005,
        "autoencoder_kl_weight": 0.000001,
        "sampler": "rflow",
        "sample_steps": 16,
        "unet_channels": [32, 64, 64],
        "unet_res_blocks": 1,
        "rflow_timesteps": "logit-normal",
        "epochs": max(50, math.ceil(DIFFUSION_STEPS / batches)),
        "batch_size": LDM_BATCH,
        "lr_generator": 0.0002,
        "betas": [0.9, 0.999],
        "checkpoint_every": 25,
        "seed": 0,
    }


def pipeline_entry(findings: Findings, source: dict[str, Any], task: Task, description: str) -> dict[str, Any]:
    """A pipeline with CPU-sized defaults for what was found (plain data, validated later)."""
    channels = Counter[int]()
    for found in findings.classes.values():
        channels.update(found.channels)
    rgb = channels.most_common(1)[0][0] == 3 if channels else False
    segmentation = task == "segmentation"
    return {
        "description": description,
        "seed": 0,
        "threads": 2,
        "source": source,
        "preprocess": {
            "size": default_size(findings),
            "channels": 3 if rgb else 1,
            "split": {"train": 0.6, "val": 0.2, "test": 0.2},
        },
        "generator": {"train": default_generator(findings, segmentation)},
        "synthesis": {"count_per_class": 100, "shard_rows": 128, "seed": 1234},
        "quality": {"label_consistency": {"enabled": not segmentation}},
        "retrain": {
            "task": task,
            "network": "unet" if segmentation else "densenet",
            "steps": 300,
            "seeds": [0, 1, 2],
        },
    }


def _flow_dump(value: Any) -> str:
    """A small mapping or list on one line (``{a: 1, b: [1, 2]}``), as pipelines.yaml writes them."""
    text = yaml.safe_dump([value], default_flow_style=True, width=10_000, sort_keys=False).strip()
    return text[1:-1]  # "[...]": a one-item list, so scalars get no document-end marker


def entry_text(name: str, entry: dict[str, Any], indent: str = "  ") -> str:
    """The YAML text of one pipeline under ``pipelines:`` (block keys, flow-style leaves)."""
    lines = [f"{indent}{name}:"]
    inner = indent * 2
    for key, value in entry.items():
        if isinstance(value, dict):
            lines.append(f"{inner}{key}:")
            lines += [f"{inner}{indent}{k}: {_flow_dump(v)}" for k, v in value.items()]
        else:
            lines.append(f"{inner}{key}: {_flow_dump(value)}")
    return "\n".join(lines) + "\n"


def _top_level_keys(text: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^([A-Za-z_][\w-]*)\s*:", text, flags=re.MULTILINE)]


def append_pipeline(config: Path, name: str, entry: dict[str, Any]) -> str:
    """Append pipeline ``name`` to ``config`` as text at the end of its ``pipelines:``
    mapping; the rest of the file is kept byte for byte. The new file is validated with
    :func:`tasks.config.load_pipelines` before it replaces the old one (atomically), and the
    old pipelines must parse to exactly what they were. Returns the appended text."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ConfigError(f"pipeline name {name!r}: expected letters, digits, '-' or '_'; pass --name")
    text = config.read_text(encoding="utf-8")
    raw = yaml.safe_load(text) or {}
    # the file must be valid before we touch it (a new file of `synthmed init` has no pipeline yet)
    before = load_pipelines(config).pipelines if raw.get("pipelines") else {}
    if name in before:
        raise ConfigError(f"{config.name}: a pipeline named '{name}' exists; pass another --name")
    keys = _top_level_keys(text)
    if not keys or keys[-1] != "pipelines" or re.search(r"^pipelines[ \t]*:[ \t]*[^\s#]", text, flags=re.MULTILINE):
        raise ConfigError(
            f"{config.name}: expected 'pipelines:' as the last top-level key, in block style; "
            "add the pipeline by hand (see the printed entry)"
        )
    child = re.search(r"^pipelines[ \t]*:[ \t]*\n(?:[ \t]*#.*\n|[ \t]*\n)*( +)[^\s#]", text, flags=re.MULTILINE)
    indent = child.group(1) if child else "  "
    block = entry_text(name, entry, indent)
    gap = "\n" if before else ""  # a blank line between pipelines
    new_text = text + ("" if text.endswith("\n") else "\n") + gap + block
    tmp = config.with_name(f".{config.name}.new")
    tmp.write_text(new_text, encoding="utf-8")
    try:
        after = load_pipelines(tmp)  # the validator of tasks/config.py, on the whole new file
        if {k: v for k, v in after.pipelines.items() if k != name} != before or name not in after.pipelines:
            raise ConfigError(f"{config.name}: appending '{name}' would change other pipelines; add it by hand")
        tmp.replace(config)
    finally:
        tmp.unlink(missing_ok=True)
    return block


def ensure_dvc_stages(root: Path, config: Path, name: str) -> str:
    """Make ``root/dvc.yaml`` hold pipeline ``name``'s stages with ``flows/versioning.py``:
    re-rendered for every pipeline (keeping its header's ``--no-code``) when synthmed wrote
    it, rendered when absent (code deps only inside the synthmed repo), untouched when
    written by hand. Returns a one-line description of what happened."""
    from flows.versioning import DVC_YAML, render_dvc_yaml, rendered_with_code, repo_lock

    path = root / DVC_YAML
    with_code = rendered_with_code(root)
    if path.is_file() and with_code is None:
        return f"{path.name} was written by hand; not changed: add the stages printed by `synthmed dvc-yaml`"
    if with_code is None:
        with_code = (root / "tasks").is_dir() and (root / "generators").is_dir()
    with repo_lock(root):
        tmp = root / f".{DVC_YAML}.tmp"
        tmp.write_text(render_dvc_yaml(config, with_code=with_code))
        tmp.replace(path)
    return f"{path.name}: rendered with the stages of '{name}' (ingest-{name} ... report-{name})"


def _relative(target: Path, base: Path) -> str:
    """``target`` relative to ``base`` when it lies inside, else absolute (pipelines.yaml
    resolves source paths against its folder; an absolute path works too)."""
    target, base = target.resolve(), base.resolve()
    return target.relative_to(base).as_posix() if target.is_relative_to(base) else target.as_posix()


def _write_manifest(findings: Findings, path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label", "subject", "mask"])
        writer.writerows(findings.pairs)


@dataclass(frozen=True)
class Scaffold:
    """What :func:`new_pipeline` found and did."""

    findings: Findings
    warnings: list[str]
    entry: dict[str, Any]
    name: str
    written: list[str]


def new_pipeline(
    config: Path,
    source_path: Path,
    task: Task,
    name: str | None = None,
    *,
    dry_run: bool = False,
    render_dvc: bool = True,
) -> Scaffold:
    """Inspect ``source_path``, build a pipeline entry, validate it and (unless ``dry_run``)
    append it to ``config`` and (with ``render_dvc``) render its DVC stages."""
    config = Path(config).resolve()
    root = config.parent
    findings = inspect_source(source_path, task)
    notes = warnings_for(findings, task)
    name = name or re.sub(r"[^A-Za-z0-9_-]+", "-", Path(source_path).resolve().stem).strip("-") or "data"
    written: list[str] = []
    if findings.kind == "csv":
        source: dict[str, Any] = {"kind": "csv", "path": _relative(findings.path, root)}
    elif task == "segmentation" and findings.pairs:
        manifest = root / f"{name}-manifest.csv"
        source = {"kind": "csv", "path": manifest.name, "root": _relative(findings.path, root)}
        if not dry_run:
            _write_manifest(findings, manifest)
            written.append(manifest.name)
    else:
        source = {"kind": "folder", "path": _relative(findings.path, root)}
    classes = len(findings.classes)
    description = f"{findings.files} images in {classes} classes from {Path(source_path).name} (synthmed new-pipeline)"
    entry = pipeline_entry(findings, source, task, description)
    try:
        PipelineConfig.model_validate(entry)  # the schema, before anything is written
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, f"scaffolded pipeline '{name}'")) from None
    if not dry_run:
        append_pipeline(config, name, entry)
        written.append(config.name)
        if render_dvc:
            written.append(ensure_dvc_stages(root, config, name))
    return Scaffold(findings=findings, warnings=notes, entry=entry, name=name, written=written)


def summary_lines(scaffold: Scaffold) -> list[str]:
    """What was found, for the console: one line per class, the formats, sizes, warnings."""
    f = scaffold.findings
    lines = [f"found: {f.kind} source, {len(f.classes)} classes, {f.files} image files"]
    width = max((len(label) for label in f.classes), default=5)
    for label, c in sorted(f.classes.items()):
        formats = ", ".join(f"{fmt} {n}" for fmt, n in sorted(c.formats.items()))
        sizes = ", ".join(_size_text(s) for s, _ in c.sizes.most_common(2)) + (" ..." if len(c.sizes) > 2 else "")
        extra = f", {c.volumes} volumes ({c.slices} slices)" if c.volumes else ""
        extra += f", {c.masks} masks" if c.masks else ""
        lines.append(
            f"  {label:<{width}}  {c.files:>5} files  {len(c.subjects):>4} subjects  {formats or '-'}  {sizes or '-'}{extra}"
        )
    lines.append(
        f"preprocess.size: {scaffold.entry['preprocess']['size']}, channels: {scaffold.entry['preprocess']['channels']}"
    )
    train = scaffold.entry["generator"]["train"]
    if train["architecture"] == "ldm":
        lines.append(
            f"generator: latent diffusion (ldm), autoencoder {train['autoencoder_epochs']} + diffusion "
            f"{train['epochs']} epochs of batch {train['batch_size']} (about 20-25 min on 2 CPU cores at size 64)"
        )
    else:
        lines.append(f"generator: {train['architecture']}, {train['epochs']} epochs")
    lines += [f"warning: {note}" for note in scaffold.warnings] or ["warnings: none"]
    return lines


# --------------------------------------------------------------------------- init
def _run(args: list[str], cwd: Path) -> None:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = next((line for line in reversed((proc.stderr or proc.stdout).splitlines()) if line.strip()), "")
        raise DataError(f"`{' '.join(args[-2:])}` failed in {cwd}: {last}")


def init_project(directory: Path, source_path: Path, task: Task, name: str | None = None) -> Scaffold:
    """A new project in ``directory`` (created; must be empty if it exists): a
    ``pipelines.yaml`` with one pipeline scaffolded from ``source_path``, ``git init`` and
    ``dvc init`` unless already there, ``.gitignore`` for local state, and ``dvc.yaml``."""
    directory = Path(directory).resolve()
    config = directory / "pipelines.yaml"
    if config.exists():
        raise ConfigError(f"{config}: exists already; use `synthmed new-pipeline --config {config}` to add a pipeline")
    directory.mkdir(parents=True, exist_ok=True)
    config.write_text(HEADER + "pipelines:\n", encoding="utf-8")
    try:
        scaffold = new_pipeline(config, source_path, task, name, render_dvc=False)
    except Exception:
        config.unlink(missing_ok=True)
        raise
    if not (directory / ".git").exists():
        _run(["git", "init", "-q"], directory)
    if not (directory / ".dvc").is_dir():
        _run([sys.executable, "-m", "dvc", "init", "-q"], directory)
    ignore = directory / ".gitignore"
    lines = ignore.read_text().splitlines() if ignore.is_file() else []
    if ".synthmed/" not in lines:
        ignore.write_text("\n".join([*lines, ".synthmed/"]) + "\n")
    scaffold.written.append(ensure_dvc_stages(directory, config, scaffold.name))
    return scaffold
