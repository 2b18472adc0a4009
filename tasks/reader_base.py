"""What every ingest reader shares: the reject error, size limits, the decoded record,
one-line messages, and one-line library log records.

Array conventions of :class:`Decoded` (all float32, raw sample values, all finite):

- ``kind == "image"``: ``(C, H, W)``, C = 1 (grey) or 3 (RGB).
- ``kind == "volume"``: ``(I, J, K)`` voxel array (see :mod:`tasks.readers`).
- ``kind == "frames"``: ``(F, 3, H, W)``, the frames of a colour cine (ultrasound loop),
  each one an RGB image; ingested frame by frame (uri ``#frame=NNN``).

pydicom and nibabel log decoder failures with full tracebacks (``LOGGER.exception``)
even when ingest handles the file; :func:`quiet_library_logs` makes every record of
those libraries one warning line (``TypeName: message``, no traceback).
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from generators.errors import DataError
from tasks.pseudonym import Redactor

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
DEFAULT_MAX_VOXELS = 512**3
DEFAULT_MAX_ASPECT_RATIO = 20.0
MIN_SIDE = 8  # an image or slice shorter than this on a side is a matrix or a thumbnail, not an image
LIBRARY_LOGGERS = ("pydicom", "nibabel")


class ReadError(DataError):
    """One input file cannot be used; the message is the one-line reason for rejects.json."""


@dataclass(frozen=True)
class Limits:
    """What a reader accepts: ``max_pixels`` (H x W of a 2D image), ``max_voxels``
    (I x J x K of a volume, rows x cols x frames of multi-frame DICOM),
    ``max_aspect_ratio`` (long side / short side of an image or of a volume's slices),
    ``min_side`` (shortest side of an image or slice: a 4 x 5 matrix upsampled to 64 x 64
    is no image) and ``allow_burned_in_annotation`` (DICOM ``BurnedInAnnotation: YES``
    files are refused unless True)."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_voxels: int = DEFAULT_MAX_VOXELS
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO
    min_side: int = MIN_SIDE
    allow_burned_in_annotation: bool = False

    def check_image(self, height: int, width: int) -> None:
        """ReadError when an ``height x width`` image is empty, too big, too elongated or too small."""
        if height < 1 or width < 1:
            raise ReadError(f"image of {height} x {width} pixels; expected at least 1 x 1: remove the file")
        if height * width > self.max_pixels:
            raise ReadError(
                f"image of {height} x {width} = {height * width} pixels, over preprocess.max_pixels "
                f"= {self.max_pixels}; downsample the file or raise the limit"
            )
        self.check_aspect(height, width)
        self.check_small(height, width)

    def check_aspect(self, height: int, width: int) -> None:
        ratio = max(height, width) / max(min(height, width), 1)
        if ratio > self.max_aspect_ratio:
            raise ReadError(
                f"image or slice of {height} x {width} pixels (aspect ratio {ratio:.0f}:1), over "
                f"preprocess.max_aspect_ratio = {self.max_aspect_ratio:g}; crop the file or raise the limit"
            )

    def check_small(self, height: int, width: int) -> None:
        """ReadError when an image or slice is shorter than ``min_side`` on a side."""
        if min(height, width) < self.min_side:
            raise ReadError(
                f"image or slice of {height} x {width} pixels, under {self.min_side} pixels on a side: too small "
                "to be an image (a matrix, a thumbnail or a tiny volume); remove the file"
            )

    def check_volume(self, shape: tuple[int, ...]) -> None:
        """ReadError when a volume of ``shape`` (spatial axes first) holds too many voxels."""
        voxels = 1
        for n in shape:
            voxels *= max(int(n), 0)
        if voxels > self.max_voxels:
            raise ReadError(
                f"volume of shape {tuple(int(n) for n in shape)} = {voxels} voxels, over preprocess.max_voxels "
                f"= {self.max_voxels}; crop or downsample the file or raise the limit"
            )


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Decoded:
    """One decoded input.

    ``array``: float32, ``(C, H, W)`` when ``kind == "image"``, ``(I, J, K)`` when
    ``kind == "volume"``, ``(F, 3, H, W)`` when ``kind == "frames"``; raw sample values,
    all finite. ``eight_bit``: the samples are 8-bit (0..255, scaled by 1/255 at ingest
    rather than clipped at percentiles). ``subject``: pseudonymised subject from the file
    (DICOM PatientID) or None. ``redact``: replaces that subject's raw id in a text (a
    path) by the pseudonym (empty, i.e. the identity, when the file names no subject).
    """

    array: np.ndarray
    kind: Literal["image", "volume", "frames"]
    eight_bit: bool
    subject: str | None = None
    redact: Redactor = field(default_factory=Redactor)


def one_line(text: object, limit: int = 200) -> str:
    """Collapse a message to one line of at most ``limit`` characters, cut at a word
    boundary (``...`` marks the cut)."""
    flat = " ".join(str(text).split())
    if len(flat) <= limit:
        return flat
    head = flat[: limit - 3]
    space = head.rfind(" ")
    return (head[:space] if space > limit // 2 else head).rstrip(" ,;:") + "..."


def describe(exc: BaseException, path: Path) -> str:
    """``TypeName: message`` on one line, with the file's machine path (as given, or
    resolved) replaced by ``<file>``: library messages often quote it."""
    text = str(exc)
    path = Path(path)
    names = {path.name, *(p.name for p in path.parents)}  # folder/file names may hold identifiers
    spellings = {str(path), str(path.resolve()), str(path.absolute()), *(n for n in names if len(n) > 3)}
    for spelling in sorted(spellings, key=len, reverse=True):
        text = text.replace(spelling, "<file>")
    return f"{type(exc).__name__}: {one_line(text)}"


def check_finite(array: np.ndarray) -> None:
    """ReadError when ``array`` holds NaN or inf."""
    if not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise ReadError(f"{bad} NaN/inf samples; expected finite intensities: fix or remove the file")


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def library_line(text: object, limit: int = 300) -> str:
    """A library's warning or log message as one line with quoted values replaced by
    ``'<value>'``: pydicom quotes element values (which may be a PatientID) there."""
    return one_line(_QUOTED.sub("'<value>'", str(text)), limit)


class OneLineRecords(logging.Filter):
    """Rewrites a library's log record in place: message and exception on one line
    (``message (TypeName: detail)``, quoted values hidden), traceback dropped, ERROR and above lowered to
    WARNING (ingest reports the file itself, as a reject or a row)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            detail = f"{type(exc).__name__}: {exc}"
            message = detail if str(exc) == message else f"{message} ({detail})"
        record.msg, record.args = library_line(message), None
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        if record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_FILTER = OneLineRecords()
_FILTER_LOCK = threading.Lock()


def quiet_library_logs() -> None:
    """Attach :class:`OneLineRecords` to every logger of :data:`LIBRARY_LOGGERS` known
    now (call after importing the library; idempotent, thread-safe). Filters on a logger
    do not apply to its children's records, so each child gets its own."""
    with _FILTER_LOCK:
        names = [
            name
            for name in list(logging.root.manager.loggerDict)
            if name.split(".")[0] in LIBRARY_LOGGERS
            and isinstance(logging.root.manager.loggerDict[name], logging.Logger)
        ]
        for name in {*LIBRARY_LOGGERS, *names}:
            log = logging.getLogger(name)
            if _FILTER not in log.filters:
                log.addFilter(_FILTER)


@dataclass(frozen=True)
class VolumeHeader:
    """What a volume file's header says, read before any voxel is decoded (dims 3).

    ``shape``: ``(I, J, K)`` in the layout the decoded array will have (NIfTI: closest
    canonical RAS+); ``spacing``: mm per axis in that layout, None when the file does not
    say; ``planar``: the file holds a 2D image (2D NIfTI, an axis of length 1)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float] | None
    planar: bool = False


@dataclass(frozen=True)
class Volume:
    """A decoded volume (dims 3). ``array``: ``(I, J, K)`` float32 raw samples, all finite;
    ``affine``: 4 x 4 float64 voxel index -> world mm (RAS+ for NIfTI and DICOM series; a
    diagonal of the spacing for multi-frame DICOM); ``eight_bit``, ``subject``: as in
    :class:`Decoded`."""

    array: np.ndarray
    affine: np.ndarray
    eight_bit: bool = False
    subject: str | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """mm per voxel along each array axis (column norms of the affine)."""
        norms = np.linalg.norm(np.asarray(self.affine, dtype=np.float64)[:3, :3], axis=0)
        return (float(norms[0]), float(norms[1]), float(norms[2]))
