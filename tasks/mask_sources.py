"""The masks that ``synthesis.masks_from`` gives a mask-conditioned generator.

``train``: the masks of the real train split, each with its row's label.

A folder (relative to the project root, or absolute): one sub-folder per class label,
holding 2D label maps::

    my_masks/inferior/case01.png      # PNG: 8/16-bit grey or palette, pixel = class index
    my_masks/middle/a.nii.gz          # NIfTI: 2D (or 3D with one slice), integral values

A volume generator (``preprocess.dims: 3``) takes label volumes instead: ``train`` gives the
train split's masks ``(D, H, W)`` as stored; a folder holds ``.nii``/``.nii.gz`` label
volumes of exactly the generator's ``volume_size`` (no resampling: cut them as ingest cuts
the train cubes), anything else is rejected with its shape.

Each 2D file is read as at ingest (``tasks/readers.read_mask``: a {0, 255} mask becomes
{0, 1}; a 2D NIfTI is rotated as ingest rotates 2D NIfTI images), must hold class indices
in ``[0, K)`` for the generator's K mask classes, and is padded to a centred square and
resized to ``preprocess.size`` by nearest neighbour (``tasks/ingest.pad_resize_mask``).
A file that cannot be read, has another shape (RGB, a volume), other values, lies outside
a class sub-folder or in a folder that is not a class of the real train split is
rejected with a one-line reason, and the rest are used. File names in rejects are
pseudonymised below the class folder, as at ingest (names may hold identifiers).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np

from generators.errors import DataError
from generators.shards import decode_image, read_table
from tasks.ingest import pad_resize_mask
from tasks.paths import PipelinePaths
from tasks.pseudonym import pseudonymise_path
from tasks.readers import ReadError, cut_volume, read_mask

log = logging.getLogger(__name__)

TRAIN = "train"
MAX_REJECTS_KEPT = 200  # rejects listed in the synthetic dataset's provenance (all are counted)
MASK_SUFFIXES = (".png", ".nii", ".nii.gz")


@dataclass(frozen=True)
class MaskSet:
    """Usable masks: uint8 ``(M, size, size)`` (volumes: ``(M, D, H, W)``) class indices in
    [0, K), the class label of each, and the rejected files (``{"file", "reason"}``)."""

    masks: np.ndarray
    labels: tuple[str, ...]
    rejects: tuple[dict[str, str], ...]
    source: str

    def digest(self) -> str:
        """sha256 of the masks' bytes and labels (the plan's identity in the resume key)."""
        digest = hashlib.sha256(np.ascontiguousarray(self.masks, dtype=np.uint8).tobytes())
        digest.update(repr(self.masks.shape).encode())
        digest.update("\0".join(self.labels).encode())
        return digest.hexdigest()

    def index_by_label(self) -> dict[str, list[int]]:
        """Label -> indices of its masks, in mask order."""
        out: dict[str, list[int]] = {}
        for i, label in enumerate(self.labels):
            out.setdefault(label, []).append(i)
        return out


def check_label_map(mask: np.ndarray, size: int, mask_classes: int) -> np.ndarray:
    """A read label map -> uint8 ``(size, size)``; ``ReadError`` (one line) when it is not
    2D (a 3D map with one slice is that slice) or holds a value outside [0, mask_classes)."""
    if mask.ndim == 3 and 1 in mask.shape:
        mask = cut_volume(mask, mask.shape.index(1), 0)
    if mask.ndim != 2:
        raise ReadError(
            f"label map of shape {tuple(mask.shape)}; expected a 2D single-channel map (H, W): "
            "save one slice per file, class indices as grey values"
        )
    _check_values(mask, mask_classes)
    return pad_resize_mask(mask.astype(np.uint8), size)


def check_label_volume(mask: np.ndarray, shape: tuple[int, ...], mask_classes: int) -> np.ndarray:
    """A label volume -> uint8 ``shape`` (D, H, W); ``ReadError`` (one line) for another
    shape or a value outside [0, mask_classes)."""
    if tuple(mask.shape) != tuple(shape):
        raise ReadError(
            f"label volume of shape {tuple(mask.shape)}; expected {tuple(shape)} (the generator's volume size): "
            "cut it to that size as ingest cuts the train cubes"
        )
    _check_values(mask, mask_classes)
    return mask.astype(np.uint8)


def _check_values(mask: np.ndarray, mask_classes: int) -> None:
    values = np.unique(mask)
    bad = values[(values < 0) | (values >= mask_classes)]
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:5]) + (", ..." if bad.size > 5 else "")
        raise ReadError(
            f"label value(s) {shown} outside 0..{mask_classes - 1} (the generator's {mask_classes} mask classes); "
            "relabel the map"
        )


def _check_any(mask: np.ndarray, size: int | tuple[int, ...], mask_classes: int) -> np.ndarray:
    """:func:`check_label_volume` when ``size`` is a (D, H, W) shape, else :func:`check_label_map`."""
    if isinstance(size, tuple):
        return check_label_volume(mask, size, mask_classes)
    return check_label_map(mask, size, mask_classes)


def read_label_map(path: Path, size: int | tuple[int, ...], mask_classes: int) -> np.ndarray:
    """One mask file -> uint8 ``(size, size)``, or ``size`` when it is a volume's (D, H, W)
    (see the module docstring); ``ReadError`` otherwise."""
    suffixes = MASK_SUFFIXES if not isinstance(size, tuple) else (".nii", ".nii.gz")
    if not path.name.lower().endswith(suffixes):
        kind = "a .png or .nii/.nii.gz label map" if not isinstance(size, tuple) else "a .nii/.nii.gz label volume"
        raise ReadError(f"unsupported file type; expected {kind}: convert or remove it")
    return _check_any(read_mask(path), size, mask_classes)


def _reject(file: str, reason: str) -> dict[str, str]:
    return {"file": file, "reason": reason}


def _folder_masks(
    root: Path, configured: str, size: int | tuple[int, ...], mask_classes: int, classes: Sequence[str]
) -> tuple[list[np.ndarray], list[str], list[dict[str, str]]]:
    if not root.is_dir():
        raise DataError(
            f"synthesis.masks_from: {configured} is not a folder (relative to the project root); expected "
            "'train' or a folder with one sub-folder of label maps per class"
        )
    real_root = root.resolve()
    masks: list[np.ndarray] = []
    labels: list[str] = []
    rejects: list[dict[str, str]] = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            rejects.append(_reject(pseudonymise_path(entry.name), "hidden (name starts with '.'), skipped"))
        elif not entry.is_dir():
            rejects.append(
                _reject(
                    pseudonymise_path(entry.name),
                    f"mask outside any class sub-folder; move it into {configured}/<label>/",
                )
            )
    for class_dir in sorted(
        (d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda p: p.name
    ):
        for path in sorted(class_dir.rglob("*"), key=lambda p: p.relative_to(root).as_posix()):
            rel = path.relative_to(root).as_posix()
            if path.is_dir() or any(part.startswith(".") for part in PurePosixPath(rel).parts[1:-1]):
                continue
            shown = pseudonymise_path(rel, keep=1)
            if path.name.startswith("."):
                rejects.append(_reject(shown, "hidden (name starts with '.'), skipped"))
            elif class_dir.name not in classes:
                rejects.append(
                    _reject(
                        shown,
                        f"class folder '{class_dir.name}' is not a class of the real train split "
                        f"({', '.join(classes)}); rename the folder",
                    )
                )
            elif not path.resolve().is_relative_to(real_root):
                rejects.append(_reject(shown, "path escapes the masks folder (symlink); copy the file in"))
            else:
                try:
                    masks.append(read_label_map(path, size, mask_classes))
                    labels.append(class_dir.name)
                except ReadError as exc:
                    rejects.append(_reject(shown, str(exc)))
    return masks, labels, rejects


def _train_masks(
    paths: PipelinePaths, size: int | tuple[int, ...], mask_classes: int
) -> tuple[list[np.ndarray], list[str], list[dict[str, str]]]:
    table = read_table(paths.real, columns=["id", "label", "mask"], splits=[TRAIN])
    masks: list[np.ndarray] = []
    labels: list[str] = []
    rejects: list[dict[str, str]] = []
    for row_id, label, blob in zip(*(table.column(c).to_pylist() for c in ("id", "label", "mask")), strict=True):
        if blob is None or label is None:
            rejects.append(_reject(row_id, "train row without a mask or label; ingest masks for every image"))
            continue
        try:
            masks.append(_check_any(decode_image(blob)[0].astype(np.int64), size, mask_classes))
            labels.append(label)
        except ReadError as exc:
            rejects.append(_reject(row_id, str(exc)))
    return masks, labels, rejects


def load_mask_set(
    masks_from: str, paths: PipelinePaths, size: int | tuple[int, ...], mask_classes: int, classes: Sequence[str]
) -> MaskSet:
    """The usable masks of ``masks_from`` (``train`` or a folder) with their labels; every
    reject is logged (one line each). ``size``: the side of 2D masks, or a volume
    generator's (D, H, W). Raises ``DataError`` when none is usable."""
    if masks_from == TRAIN:
        masks, labels, rejects = _train_masks(paths, size, mask_classes)
    else:
        masks, labels, rejects = _folder_masks(paths.root / masks_from, masks_from, size, mask_classes, classes)
    for reject in rejects:
        log.warning("synthesis.masks_from: rejected %s: %s", reject["file"], reject["reason"])
    if not masks:
        first = f" (first: {rejects[0]['file']}: {rejects[0]['reason']})" if rejects else ""
        raise DataError(
            f"synthesis.masks_from: no usable mask in {masks_from}, {len(rejects)} rejected{first}; "
            f"expected {masks_from}/<label>/<file>.png|.nii.gz label maps with values 0..{mask_classes - 1}"
        )
    log.info("synthesis.masks_from %s: %d masks used, %d rejected", masks_from, len(masks), len(rejects))
    return MaskSet(np.stack(masks).astype(np.uint8), tuple(labels), tuple(rejects), masks_from)
