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

DICOM (:mod:`tasks.readers_dicom`): only pixel data and the tags listed in
:data:`DICOM_TAGS` are parsed (``specific_tags``); PatientID is pseudonymised inside
:func:`read_dicom`, so no raw identifier ever leaves it (``Decoded.redact`` replaces it
in a path without revealing it). PatientName, dates, institution etc. are never read.
Compressed transfer syntaxes, palette colour, colour cines, DICOM SEG: see that module.

NIfTI: CIFTI-2 files (``*.dconn.nii``, ``*.dtseries.nii``...: connectivity matrices and
surface data, intent codes 3000-3099) are refused; a NIfTI label map (intent code
LABEL) is refused as an image and used as a mask when paired with its image (CSV
``mask`` column, or ``<stem>_seg.nii.gz`` next to ``<stem>.nii.gz``, see
:mod:`tasks.ingest_sources`).

Images and slices under ``Limits.min_side`` (8) pixels on a side are refused: a 4 x 5
matrix upsampled to 64 x 64 is no image.

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
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from tasks.reader_base import (
    DEFAULT_LIMITS,
    DEFAULT_MAX_ASPECT_RATIO,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_VOXELS,
    MIN_SIDE,
    Decoded,
    Limits,
    ReadError,
    Volume,
    VolumeHeader,
    check_finite,
    describe,
    one_line,
    quiet_library_logs,
)
from tasks.readers_dicom import DICOM_TAGS, SEG_SOP_CLASS, dicom_identity, read_dicom, read_dicom_seg

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_MAX_ASPECT_RATIO",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_VOXELS",
    "DICOM_TAGS",
    "MIN_SIDE",
    "SEG_SOP_CLASS",
    "Decoded",
    "Limits",
    "ReadError",
    "cut_volume",
    "describe",
    "dicom_identity",
    "file_format",
    "one_line",
    "read_dicom",
    "read_dicom_seg",
    "read_image",
    "read_mask",
    "read_nifti",
    "read_nifti_volume",
    "read_pil",
    "read_volume_mask",
    "nifti_volume_header",
]

logger = logging.getLogger(__name__)

PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_LABEL_INTENT = 1002  # NIFTI_INTENT_LABEL: the voxels are class indices
CIFTI_INTENTS = range(3000, 3100)  # NIFTI_INTENT_CONNECTIVITY_*: CIFTI-2 matrices, not image grids
Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS  # Pillow's guard agrees with ours (ingest sets the configured value)
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)


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
    check_finite(pixels)
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
def _intent(img: object) -> int:
    header = getattr(img, "nifti_header", None) or getattr(img, "header", None)
    try:
        return int(header["intent_code"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return 0


def _check_nifti_kind(img: object, as_mask: bool) -> None:
    """ReadError for NIfTI files that hold no image grid (CIFTI-2), and for label maps
    read as images."""
    from nibabel.cifti2 import Cifti2Image

    code = _intent(img)
    if isinstance(img, Cifti2Image) or code in CIFTI_INTENTS:
        raise ReadError(
            f"CIFTI-2 file (intent code {code}: a connectivity matrix or surface data, not an image grid); "
            "expected a NIfTI image volume: remove it"
        )
    if code == NIFTI_LABEL_INTENT and not as_mask:
        raise ReadError(
            "NIfTI label map (intent code LABEL) without its image; expected an image: name it <image>_seg.nii.gz "
            "next to its image, or give it in the CSV mask column"
        )


def _load_nifti(path: Path, limits: Limits = DEFAULT_LIMITS, as_mask: bool = False) -> np.ndarray:
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    quiet_library_logs()
    try:
        img = nib.load(str(path))  # lazy: only the header is read here
        _check_nifti_kind(img, as_mask)
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
    check_finite(data)
    if data.ndim == 2:
        return Decoded(np.ascontiguousarray(np.rot90(data))[None], "image", False)
    return Decoded(np.ascontiguousarray(data), "volume", False)


def read_nifti_mask(path: Path, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """A NIfTI mask as int64 class indices, same layout as :func:`read_nifti`'s array
    (2D masks already rotated to ``(H, W)``). Non-integral values reject the mask."""
    data = _load_nifti(path, limits, as_mask=True)
    check_finite(data)
    rounded = np.rint(data)
    if np.max(np.abs(data - rounded), initial=0.0) > 1e-3:
        raise ReadError("mask has non-integer values; expected class indices (0 = background)")
    out = rounded.astype(np.int64)
    return np.ascontiguousarray(np.rot90(out)) if out.ndim == 2 else out


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
    """Read a mask (PNG, NIfTI or a one-image DICOM SEG) as uint8 class indices: ``(H, W)`` or ``(I, J, K)``.

    A mask whose values are exactly {0, 255} (a binary mask saved as black/white) is
    mapped to {0, 1}. Values outside 0..255 reject the mask."""
    kind = file_format(path)
    if kind == "pil":
        data = read_pil_mask(path, limits)
    elif kind == "nifti":
        data = read_nifti_mask(path, limits)
    elif kind == "dicom":
        masks = read_dicom_seg(path, limits)
        if len(masks) != 1:
            raise ReadError(
                f"DICOM SEG covering {len(masks)} images as one mask; expected a SEG of one image here: "
                "put the SEG and its images in the source instead (paired by SOPInstanceUID)"
            )
        data = next(iter(masks.values())).astype(np.int64)
    else:
        raise ReadError("unsupported mask file type; expected .png, .nii/.nii.gz or DICOM SEG with class indices")
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


# --------------------------------------------------------------------------- volumes (dims 3)
_NIFTI_ERRORS = (OSError, EOFError, ValueError, zlib.error, struct.error)


def _nifti_failure(exc: BaseException, path: Path) -> ReadError:
    return ReadError(
        f"unreadable or truncated NIfTI ({describe(exc, path)}); expected a complete .nii/.nii.gz: "
        "re-export the file or remove it"
    )


def nifti_volume_header(path: Path, as_mask: bool = False) -> VolumeHeader:
    """Shape and spacing of a NIfTI file in closest canonical (RAS+) axis order, from the
    header alone (nothing decoded); ``planar`` for 2D files and 3D ones with an axis of 1.
    ReadError for unreadable files, CIFTI-2, 4D with several volumes, and label maps read
    as images."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    quiet_library_logs()
    try:
        img = nib.load(str(path))
        _check_nifti_kind(img, as_mask)
        shape = tuple(int(n) for n in img.shape)
        zooms = tuple(float(z) for z in img.header.get_zooms())
        ornt = nib.orientations.io_orientation(img.affine) if len(shape) >= 3 else None
    except (ImageFileError, *_NIFTI_ERRORS) as exc:
        raise _nifti_failure(exc, path) from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) == 2:
        return VolumeHeader((shape[0], shape[1], 1), None, planar=True)
    if len(shape) != 3:
        raise ReadError(
            f"NIfTI of shape {shape}; expected a 3D volume (or 4D with one volume): split 4D series into volumes first"
        )
    canonical = [0, 0, 0]
    spacing = [1.0, 1.0, 1.0]
    for i in range(3):
        axis = int(ornt[i, 0])
        canonical[axis] = shape[i]
        spacing[axis] = zooms[i] if i < len(zooms) and zooms[i] > 0 else 1.0
    return VolumeHeader(
        (canonical[0], canonical[1], canonical[2]), (spacing[0], spacing[1], spacing[2]), planar=min(shape) == 1
    )


def read_nifti_volume(path: Path, limits: Limits = DEFAULT_LIMITS, as_mask: bool = False) -> Volume:
    """A 3D NIfTI (or 4D with one volume) reoriented to the closest canonical RAS+:
    :class:`Volume` with the ``(I, J, K)`` float32 array (scl_slope/inter applied) and its
    canonical affine. The header shape is checked against ``limits`` first; NaN/inf
    anywhere rejects the file."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    quiet_library_logs()
    try:
        img = nib.load(str(path))
        _check_nifti_kind(img, as_mask)
        shape = tuple(int(n) for n in img.shape)
        if len(shape) == 4 and shape[3] == 1:
            img = img.slicer[..., 0]
        if len(img.shape) != 3:
            raise ReadError(f"NIfTI of shape {shape}; expected a 3D volume: split 4D series or remove the file")
        limits.check_volume(tuple(int(n) for n in img.shape))
        img = nib.as_closest_canonical(img)
        data = np.asarray(img.get_fdata(dtype=np.float32))
        affine = np.asarray(img.affine, dtype=np.float64)
    except ReadError:
        raise
    except (ImageFileError, *_NIFTI_ERRORS) as exc:
        raise _nifti_failure(exc, path) from None
    check_finite(data)
    return Volume(np.ascontiguousarray(data), affine, False)


def read_volume_mask(path: Path, limits: Limits = DEFAULT_LIMITS) -> Volume:
    """A NIfTI label map as a :class:`Volume` whose array is ``(I, J, K)`` uint8 class
    indices (closest canonical RAS+, like :func:`read_nifti_volume`). Non-integral values
    or values outside 0..255 reject it; exactly {0, 255} is read as {0, 1}."""
    if file_format(path) != "nifti":
        raise ReadError(
            "mask is not a NIfTI volume; expected a 3D label map (.nii/.nii.gz) in a dims 3 pipeline: "
            "export the mask as NIfTI"
        )
    volume = read_nifti_volume(path, limits, as_mask=True)
    data = volume.array
    rounded = np.rint(data)
    if np.max(np.abs(data - rounded), initial=0.0) > 1e-3:
        raise ReadError("mask has non-integer values; expected class indices (0 = background)")
    if rounded.size and (rounded.min() < 0 or rounded.max() > 255):
        raise ReadError(f"mask values {int(rounded.min())}..{int(rounded.max())}; expected class indices 0..255")
    values = np.unique(rounded)
    if values.size == 2 and values[0] == 0 and values[1] == 255:
        rounded = rounded == 255
    return Volume(np.ascontiguousarray(rounded.astype(np.uint8)), volume.affine, True)
