"""Small readers for the input formats of ingest: PNG/JPEG, DICOM, NIfTI.

Every reader returns a :class:`Decoded` with float32 samples in the file's own units
(no scaling yet) or raises :class:`ReadError`, whose message is the one-line reason
that ingest writes to ``rejects.json``. Array conventions:

- 2D images: ``(C, H, W)`` float32, C = 1 (grey) or 3 (RGB), raw sample values
  (0..255 for 8-bit files, 0..65535 for 16-bit, modality units for DICOM after
  RescaleSlope/Intercept, anything finite for float NIfTI).
- volumes: ``(I, J, K)`` float32 voxel array in NIfTI index order; NIfTI files are
  reoriented to the closest canonical (RAS+) orientation first, so axis 2 is axial.
  A 2D cut ``volume[..., k]`` is displayed as ``np.rot90(cut)`` (see :func:`cut_volume`).
  Multi-frame DICOM is stored as ``vol[i, j, k] = frames[k, rows - 1 - j, i]`` so that
  ``cut_volume(vol, 2, k)`` gives frame ``k`` exactly as stored.
- masks: the same spatial layout with uint8 class indices (0 = background).

DICOM: only pixel data and the tags listed in :data:`DICOM_TAGS` are parsed
(``specific_tags``); PatientID is pseudonymised inside :func:`read_dicom`, so no raw
identifier ever leaves this module (``Decoded.redact`` replaces it in a path without
revealing it). PatientName, dates, institution etc. are never read.

Size limits (:class:`Limits`, from ``preprocess.max_pixels`` / ``max_voxels`` /
``max_aspect_ratio``) are checked on the header (PIL's lazy ``size``, the NIfTI header
shape, DICOM Rows/Columns/NumberOfFrames) BEFORE any pixel is decoded, so a 139-byte
PNG claiming 1 x 60000 pixels or a small gzip NIfTI claiming 1024^3 voxels is one
reject, not a MemoryError. Pillow's own bomb guard (``Image.MAX_IMAGE_PIXELS``) is set to
the same pixel limit.

Reasons never contain the machine path of the file (library messages that quote it
have it replaced by ``<file>``), so ``rejects.json`` is the same on every machine.
"""

from __future__ import annotations

import logging
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from generators.errors import DataError
from tasks.pseudonym import Redactor, pseudonymise

logger = logging.getLogger(__name__)

PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
DICOM_TAGS = (
    "PatientID",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "SharedFunctionalGroupsSequence",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "PixelData",
)
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
DEFAULT_MAX_VOXELS = 512**3
DEFAULT_MAX_ASPECT_RATIO = 20.0
Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS  # Pillow's guard agrees with ours (ingest sets the configured value)
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)


class ReadError(DataError):
    """One input file cannot be used; the message is the one-line reason for rejects.json."""


@dataclass(frozen=True)
class Limits:
    """Largest input accepted: ``max_pixels`` (H x W of a 2D image), ``max_voxels``
    (I x J x K of a volume, rows x cols x frames of multi-frame DICOM) and
    ``max_aspect_ratio`` (long side / short side of an image or of a volume's slices)."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_voxels: int = DEFAULT_MAX_VOXELS
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO

    def check_image(self, height: int, width: int) -> None:
        """ReadError when an ``height x width`` image is empty, too big or too elongated."""
        if height < 1 or width < 1:
            raise ReadError(f"image of {height} x {width} pixels; expected at least 1 x 1: remove the file")
        if height * width > self.max_pixels:
            raise ReadError(
                f"image of {height} x {width} = {height * width} pixels, over preprocess.max_pixels "
                f"= {self.max_pixels}; downsample the file or raise the limit"
            )
        self.check_aspect(height, width)

    def check_aspect(self, height: int, width: int) -> None:
        ratio = max(height, width) / max(min(height, width), 1)
        if ratio > self.max_aspect_ratio:
            raise ReadError(
                f"image or slice of {height} x {width} pixels (aspect ratio {ratio:.0f}:1), over "
                f"preprocess.max_aspect_ratio = {self.max_aspect_ratio:g}; crop the file or raise the limit"
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
    ``kind == "volume"``; raw sample values, all finite. ``eight_bit``: the samples are
    8-bit (0..255, scaled by 1/255 at ingest rather than clipped at percentiles).
    ``subject``: pseudonymised subject from the file (DICOM PatientID) or None.
    ``redact``: replaces that subject's raw id in a text (a path) by the pseudonym
    (empty, i.e. the identity, when the file names no subject).
    """

    array: np.ndarray
    kind: Literal["image", "volume"]
    eight_bit: bool
    subject: str | None = None
    redact: Redactor = field(default_factory=Redactor)


def one_line(text: object, limit: int = 200) -> str:
    """Collapse an error message to one line of at most ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


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


def file_format(path: Path) -> Literal["pil", "nifti", "dicom"] | None:
    """The reader for a path by its suffix; other files (no suffix, or UID-style names
    such as ``1.2.840.113619.2.55.3``) are sniffed for the DICOM preamble (``DICM`` at
    byte 128). None: not a supported image file."""
    name = path.name.lower()
    if name.endswith(PIL_SUFFIXES):
        return "pil"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return "dicom" if handle.read(4) == b"DICM" else None
    except OSError:
        return None


def _check_finite(array: np.ndarray) -> None:
    if not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise ReadError(f"{bad} NaN/inf samples; expected finite intensities: fix or remove the file")


# --------------------------------------------------------------------------- PIL
def read_pil(path: Path, limits: Limits = DEFAULT_LIMITS) -> Decoded:
    """PNG/JPEG: ``(1, H, W)`` grey or ``(3, H, W)`` RGB float32 raw samples.

    Modes: 1/L/LA/P/RGB/RGBA/CMYK/YCbCr are 8-bit (alpha dropped, palette expanded);
    I;16* are 16-bit grey, I (int32) and F (float32) grey are high-range.
    JPEG EXIF orientation is applied. The size is checked against ``limits`` before decoding.
    """
    try:
        with Image.open(path) as img:
            limits.check_image(img.size[1], img.size[0])
            img.load()
            if img.format == "JPEG":
                img = ImageOps.exif_transpose(img)
            mode = img.mode
            if mode in ("1", "L", "LA"):
                array, eight_bit = np.asarray(img.convert("L")), True
            elif mode in ("P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
                array, eight_bit = np.asarray(img.convert("RGB")), True
            elif mode.startswith("I;16"):
                array, eight_bit = np.asarray(img).astype(np.uint16), False
            elif mode in ("I", "F"):
                array, eight_bit = np.asarray(img), False
            else:
                raise ReadError(
                    f"unsupported image mode {mode!r}; expected grey, RGB or 16-bit grey: convert the file or remove it"
                )
    except ReadError:
        raise
    except _PIL_ERRORS as exc:
        raise ReadError(
            f"unreadable or corrupt image ({describe(exc, path)}); expected a complete PNG or JPEG: "
            "re-export the file or remove it"
        ) from None
    pixels = array.astype(np.float32)
    pixels = pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)
    _check_finite(pixels)
    return Decoded(np.ascontiguousarray(pixels), "image", eight_bit)


def read_pil_mask(path: Path, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """A single-channel PNG mask as ``(H, W)`` integer class indices (int64, not checked)."""
    try:
        with Image.open(path) as img:
            limits.check_image(img.size[1], img.size[0])
            img.load()
            if img.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise ReadError(f"mask mode {img.mode!r}; expected a single-channel image of class indices")
            array = np.asarray(img)
    except ReadError:
        raise
    except _PIL_ERRORS as exc:
        raise ReadError(
            f"unreadable or corrupt mask ({describe(exc, path)}); expected a complete PNG of class indices: "
            "re-export the mask or remove the row"
        ) from None
    return array.astype(np.int64)


# --------------------------------------------------------------------------- NIfTI
def _load_nifti(path: Path, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        img = nib.load(str(path))  # lazy: only the header is read here
        shape = tuple(int(n) for n in img.shape)
        if len(shape) == 2:
            limits.check_image(shape[1], shape[0])
        elif len(shape) >= 3:
            limits.check_volume(shape)
        if len(img.shape) >= 3:
            img = nib.as_closest_canonical(img)
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except (ImageFileError, OSError, EOFError, ValueError, zlib.error, struct.error) as exc:
        raise ReadError(
            f"unreadable or truncated NIfTI ({describe(exc, path)}); expected a complete .nii/.nii.gz: "
            "re-export the file or remove it"
        ) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3):
        raise ReadError(
            f"NIfTI of shape {tuple(data.shape)}; expected 2D, 3D or 4D with one volume: split 4D series into volumes first"
        )
    return data


def read_nifti(path: Path, limits: Limits = DEFAULT_LIMITS) -> Decoded:
    """NIfTI: 3D -> volume ``(I, J, K)``; 2D -> image ``(1, H, W)`` (``rot90`` of the array).
    Scaling (scl_slope/inter) is applied; NaN/inf anywhere rejects the file; the header
    shape is checked against ``limits`` before the data are read."""
    data = _load_nifti(path, limits)
    _check_finite(data)
    if data.ndim == 2:
        return Decoded(np.ascontiguousarray(np.rot90(data))[None], "image", False)
    return Decoded(np.ascontiguousarray(data), "volume", False)


def read_nifti_mask(path: Path, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """A NIfTI mask as int64 class indices, same layout as :func:`read_nifti`'s array
    (2D masks already rotated to ``(H, W)``). Non-integral values reject the mask."""
    data = _load_nifti(path, limits)
    _check_finite(data)
    rounded = np.rint(data)
    if np.max(np.abs(data - rounded), initial=0.0) > 1e-3:
        raise ReadError("mask has non-integer values; expected class indices (0 = background)")
    out = rounded.astype(np.int64)
    return np.ascontiguousarray(np.rot90(out)) if out.ndim == 2 else out


# --------------------------------------------------------------------------- DICOM
def _rescale(ds: object) -> tuple[float, float]:
    slope = getattr(ds, "RescaleSlope", None)
    intercept = getattr(ds, "RescaleIntercept", None)
    shared = getattr(ds, "SharedFunctionalGroupsSequence", None)
    if (slope is None or intercept is None) and shared:
        transform = getattr(shared[0], "PixelValueTransformationSequence", None)
        if transform:
            slope = getattr(transform[0], "RescaleSlope", slope)
            intercept = getattr(transform[0], "RescaleIntercept", intercept)
    return float(1.0 if slope is None else slope), float(0.0 if intercept is None else intercept)


def read_dicom(path: Path, limits: Limits = DEFAULT_LIMITS) -> Decoded:
    """DICOM: single frame -> image ``(1, H, W)`` (or ``(3, H, W)`` for RGB); multi-frame
    grey -> volume ``(Columns, Rows, Frames)`` (see module doc). RescaleSlope/Intercept
    applied. ``subject`` = pseudonymised PatientID, or None when absent/empty.
    Only :data:`DICOM_TAGS` (and the file meta) are parsed; Rows x Columns (x frames) is
    checked against ``limits`` before the pixel data are decoded."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path), specific_tags=list(DICOM_TAGS))
        if "PixelData" not in ds:
            raise ReadError(
                "DICOM has no PixelData; expected an image object (not a report or series index): remove it from the source"
            )
        rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
        n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        if n_frames > 1:
            limits.check_volume((rows, cols, n_frames))
            limits.check_aspect(rows, cols)
        else:
            limits.check_image(rows, cols)
        pixels = np.asarray(ds.pixel_array)
        samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        bits = int(getattr(ds, "BitsAllocated", 16) or 16)
        slope, intercept = _rescale(ds)
        raw_id = str(getattr(ds, "PatientID", "") or "").strip()
    except ReadError:
        raise
    except (
        InvalidDicomError,
        OSError,
        EOFError,
        ValueError,
        KeyError,
        AttributeError,
        TypeError,
        NotImplementedError,
        RuntimeError,
        struct.error,
    ) as exc:
        # pydicom messages name tags and lengths, never element values: safe to record
        if isinstance(exc, InvalidDicomError):
            raise ReadError(
                "not a DICOM file (no 'DICM' preamble or file meta); expected a DICOM Part 10 file: "
                "re-export it from the PACS/viewer or remove it"
            ) from None
        raise ReadError(
            f"unreadable DICOM ({describe(exc, path)}); expected a complete DICOM image: re-export it or remove it"
        ) from None
    subject = pseudonymise(raw_id) if raw_id else None
    redactor = Redactor(raw_id)
    if samples not in (1, 3):
        raise ReadError(
            f"DICOM with SamplesPerPixel={samples}; expected 1 (grey) or 3 (RGB): convert the file or remove it"
        )
    if samples == 3:
        if frames > 1:
            raise ReadError(
                f"multi-frame colour DICOM ({frames} frames); expected grey for volumes: convert the frames to grey or remove it"
            )
        image = np.moveaxis(pixels.astype(np.float32), -1, 0)
        return Decoded(np.ascontiguousarray(image), "image", bits == 8, subject, redactor)
    values = pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    _check_finite(values)
    eight_bit = bits == 8 and slope == 1.0 and intercept == 0.0
    if frames > 1:
        if values.ndim != 3:
            raise ReadError(
                f"DICOM says {frames} frames but decoded shape {values.shape}; expected (frames, rows, cols): re-export it"
            )
        volume = np.flip(values, axis=1).transpose(2, 1, 0)
        return Decoded(np.ascontiguousarray(volume), "volume", eight_bit, subject, redactor)
    if values.ndim != 2:
        raise ReadError(f"DICOM pixel array of shape {values.shape}; expected (rows, cols): re-export it")
    return Decoded(np.ascontiguousarray(values[None]), "image", eight_bit, subject, redactor)


# --------------------------------------------------------------------------- dispatch
def read_image(path: Path, limits: Limits = DEFAULT_LIMITS) -> Decoded:
    """Read any supported image file; :class:`ReadError` for unsupported, corrupt or
    oversized (``limits``) files."""
    kind = file_format(path)
    if kind == "pil":
        return read_pil(path, limits)
    if kind == "nifti":
        return read_nifti(path, limits)
    if kind == "dicom":
        return read_dicom(path, limits)
    raise ReadError(
        "unsupported file type; expected .png, .jpg, .jpeg, .dcm (or DICOM without suffix), .nii, .nii.gz: convert or remove it"
    )


def read_mask(path: Path, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """Read a mask (PNG or NIfTI) as uint8 class indices: ``(H, W)`` or ``(I, J, K)``.

    A mask whose values are exactly {0, 255} (a binary mask saved as black/white) is
    mapped to {0, 1}. Values outside 0..255 reject the mask."""
    kind = file_format(path)
    if kind == "pil":
        data = read_pil_mask(path, limits)
    elif kind == "nifti":
        data = read_nifti_mask(path, limits)
    else:
        raise ReadError("unsupported mask file type; expected .png or .nii/.nii.gz with class indices")
    if data.size and (data.min() < 0 or data.max() > 255):
        raise ReadError(f"mask values {int(data.min())}..{int(data.max())}; expected class indices 0..255")
    values = np.unique(data)
    if values.size == 2 and values[0] == 0 and values[1] == 255:
        data = (data == 255).astype(np.int64)
    return data.astype(np.uint8)


def cut_volume(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The 2D cut of a volume at ``index`` along ``axis``, oriented for display:
    ``np.rot90`` of the cut, shape ``(H, W)`` = (len of the higher remaining axis,
    len of the lower one). Works for float volumes and uint8 masks alike."""
    cut = volume[(slice(None),) * axis + (index,)]
    return np.ascontiguousarray(np.rot90(cut))
