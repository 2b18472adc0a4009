"""DICOM reader of ingest: images, cines and segmentations as hospital archives hold them.

Decoded (see :mod:`tasks.reader_base` for the array layouts):

- single frame, grey -> image ``(1, H, W)``; RGB/YBR -> image ``(3, H, W)``; PALETTE
  COLOR -> its palette applied, image ``(3, H, W)`` 8-bit; MONOCHROME1 inverted so that
  bright is dense, as in MONOCHROME2.
- multi-frame grey -> volume ``(Columns, Rows, Frames)`` with ``vol[i, j, k] =
  frames[k, rows - 1 - j, i]``, so ``cut_volume(vol, 2, k)`` is frame ``k`` as stored.
- multi-frame colour (ultrasound cine) -> frames ``(F, 3, H, W)``.
- DICOM SEG (Segmentation Storage) -> :func:`read_dicom_seg`: one ``(Rows, Columns)``
  uint8 mask (segment numbers, 0 = background) per referenced image SOPInstanceUID; ingest
  pairs it with that image. As an image it is refused.

Transfer syntaxes: everything pydicom decodes with the installed plugins: native, RLE,
JPEG baseline/extended 8-bit (Pillow), JPEG-LS (``pyjpegls``), JPEG lossless and JPEG
2000 (``python-gdcm``, Pillow). 12-bit JPEG Extended (Process 4), which Pillow cannot
decode and pydicom's GDCM plugin declines, is decoded by GDCM directly. A syntax with no
installed decoder is refused with the package to install (:data:`DECODER_PACKAGES`).

Refused with one line: ``BurnedInAnnotation: YES`` (text burned into the pixels may
identify the patient; ``preprocess.allow_burned_in_annotation: true`` accepts it), RT
Dose grids, objects without PixelData, SamplesPerPixel other than 1 or 3.

Privacy: only :data:`DICOM_TAGS` are parsed (``specific_tags``); PatientID is
pseudonymised here, so no raw identifier leaves this module. UIDs are read to pair
segmentations with images and never written out.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.pseudonym import Redactor, pseudonymise
from tasks.reader_base import (
    DEFAULT_LIMITS,
    Decoded,
    Limits,
    ReadError,
    Volume,
    VolumeHeader,
    check_finite,
    describe,
    quiet_library_logs,
)

logger = logging.getLogger(__name__)

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
NON_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.481.2": "RT Dose grid (radiotherapy dose), not an image",
    "1.2.840.10008.5.1.4.1.1.66": "Raw Data object, not an image",
}
PALETTE_TAGS = tuple(
    f"{prefix}{colour}PaletteColorLookupTable{part}"
    for colour in ("Red", "Green", "Blue")
    for prefix, part in (("", "Descriptor"), ("", "Data"), ("Segmented", "Data"))
)
DICOM_TAGS = (
    "PatientID",
    "SOPClassUID",
    "SOPInstanceUID",
    "BurnedInAnnotation",
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
    "PerFrameFunctionalGroupsSequence",
    "SegmentSequence",
    "SegmentationType",
    "MaximumFractionalValue",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    *PALETTE_TAGS,
    "PixelData",
)
JPEG_EXTENDED_12BIT = "1.2.840.10008.1.2.4.51"
#: JPEG-family syntaxes whose every frame ends with the EOI marker FF D9 (pyjpegls spends ~45 s failing on one without)
JPEG_FAMILY = {f"1.2.840.10008.1.2.4.{n}" for n in (50, 51, 57, 70, 80, 81)}
#: transfer syntax UID -> the package whose decoder it needs (named in the reject reason)
DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.50": "pillow",  # JPEG Baseline
    JPEG_EXTENDED_12BIT: "python-gdcm",
    "1.2.840.10008.1.2.4.57": "python-gdcm",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": "python-gdcm",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "pyjpegls",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "pyjpegls",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": "python-gdcm",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": "python-gdcm",  # JPEG 2000
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg",  # HTJ2K
    "1.2.840.10008.1.2.5": "pylibjpeg-rle",  # RLE (pydicom's own decoder normally suffices)
}
_DICOM_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    KeyError,
    IndexError,
    AttributeError,
    TypeError,
    NotImplementedError,
    RuntimeError,
    struct.error,
)


# --------------------------------------------------------------------------- header
def _read(path: Path, tags: tuple[str, ...] = DICOM_TAGS, header_only: bool = False) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    quiet_library_logs()
    try:
        return pydicom.dcmread(str(path), specific_tags=list(tags), stop_before_pixels=header_only)
    except InvalidDicomError:
        raise ReadError(
            "not a DICOM file (no 'DICM' preamble or file meta); expected a DICOM Part 10 file: "
            "re-export it from the PACS/viewer or remove it"
        ) from None
    except _DICOM_ERRORS as exc:
        raise ReadError(
            f"unreadable DICOM ({describe(exc, path)}); expected a complete DICOM image: re-export it or remove it"
        ) from None


def dicom_identity(path: Path) -> tuple[str, str]:
    """``(SOPClassUID, SOPInstanceUID)`` from the header only (empty strings when the
    file cannot be read: its image read reports why)."""
    try:
        ds = _read(path, ("SOPClassUID", "SOPInstanceUID"), header_only=True)
    except ReadError:
        return "", ""
    return str(getattr(ds, "SOPClassUID", "") or ""), str(getattr(ds, "SOPInstanceUID", "") or "")


def _transfer_syntax(ds: Any) -> Any:
    from pydicom.uid import ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    return getattr(meta, "TransferSyntaxUID", None) or ImplicitVRLittleEndian


def _shape(ds: Any, limits: Limits) -> tuple[int, int, int]:
    """(rows, cols, frames) from the header, checked against ``limits`` before decoding."""
    rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        limits.check_volume((rows, cols, frames))
        limits.check_aspect(rows, cols)
        limits.check_small(rows, cols)
    else:
        limits.check_image(rows, cols)
    return rows, cols, frames


# --------------------------------------------------------------------------- pixels
def _gdcm_pixels(path: Path, ds: Any) -> np.ndarray:
    """Decode with GDCM directly (12-bit JPEG Extended): ``(frames, rows, cols[, samples])``
    squeezed like pydicom's ``pixel_array``."""
    try:
        import gdcm
    except ImportError:
        raise ReadError(
            "12-bit JPEG Extended (Process 4) DICOM and no decoder installed; expected python-gdcm: "
            "pip install python-gdcm (or re-export the file uncompressed)"
        ) from None
    gdcm.Trace.WarningOff()
    gdcm.Trace.ErrorOff()
    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    if not reader.Read():
        raise ReadError("GDCM could not read this 12-bit JPEG DICOM; expected a complete file: re-export it")
    image = reader.GetImage()
    fmt = image.GetPixelFormat()
    dtype = {8: "u1", 16: "u2", 32: "u4"}.get(int(fmt.GetBitsAllocated()))
    if dtype is None:
        raise ReadError(f"GDCM decoded {fmt.GetBitsAllocated()}-bit samples; expected 8, 16 or 32: re-export it")
    if int(fmt.GetPixelRepresentation()) == 1:
        dtype = dtype.replace("u", "i")
    buffer = image.GetBuffer()
    raw = buffer.encode("utf-8", "surrogateescape") if isinstance(buffer, str) else bytes(buffer)
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
    if array.size != rows * cols * frames * samples:
        raise ReadError(
            f"GDCM decoded {array.size} samples, expected {rows} x {cols} x {frames} x {samples}; re-export the file"
        )
    shape = (frames, rows, cols, samples)
    return array.reshape(shape).squeeze(axis=tuple(i for i, n in ((0, frames), (3, samples)) if n == 1))


def _pixels(path: Path, ds: Any) -> np.ndarray:
    """The decoded pixel array, choosing the decoder by transfer syntax; ReadError naming
    the package to install when none is."""
    from pydicom.pixels import get_decoder

    syntax = _transfer_syntax(ds)
    name = getattr(syntax, "name", str(syntax))
    package = DECODER_PACKAGES.get(str(syntax), "python-gdcm")
    try:
        decoder = get_decoder(syntax) if getattr(syntax, "is_compressed", False) else None
    except NotImplementedError:
        raise ReadError(
            f"transfer syntax {name!r} has no pixel decoder (video or unknown); expected an image syntax: "
            "re-export the images uncompressed or remove the file"
        ) from None
    if decoder is not None and not decoder.is_available:
        raise ReadError(
            f"no decoder installed for transfer syntax {name!r}; expected {package}: pip install {package} "
            "(or re-export the file uncompressed)"
        )
    if str(syntax) in JPEG_FAMILY:
        _check_jpeg_frames(ds, name)
    bits_stored = int(getattr(ds, "BitsStored", 8) or 8)
    if str(syntax) == JPEG_EXTENDED_12BIT and bits_stored > 8 and "pylibjpeg" not in decoder.available_plugins:
        return _gdcm_pixels(path, ds)
    try:
        return np.asarray(ds.pixel_array)
    except _DICOM_ERRORS as exc:
        raise ReadError(
            f"DICOM pixel data ({name}) could not be decoded ({describe(exc, path).splitlines()[0]}); "
            f"expected a complete image ({package} decodes this syntax): re-export it or remove it"
        ) from None


def _check_jpeg_frames(ds: Any, name: str) -> None:
    """ReadError when a JPEG/JPEG-LS frame lacks its end-of-image marker (a truncated file)."""
    from pydicom.encaps import generate_frames

    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    try:
        for k, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=frames)):
            if not frame.rstrip(b"\x00\xff").endswith(b"\xff\xd9"):  # after 0x00 / 0xFF padding
                raise ReadError(
                    f"truncated {name} frame {k + 1} (no end-of-image marker); expected complete compressed "
                    "frames: re-export the file or remove it"
                )
    except _DICOM_ERRORS as exc:
        raise ReadError(
            f"unreadable {name} pixel data ({type(exc).__name__}: {exc}); expected encapsulated frames: re-export it"
        ) from None


def _palette_rgb(pixels: np.ndarray, ds: Any) -> np.ndarray:
    """PALETTE COLOR indices -> ``(..., 3)`` uint8 RGB through the file's own palette."""
    from pydicom.pixels import apply_color_lut

    try:
        rgb = np.asarray(apply_color_lut(pixels, ds))
    except _DICOM_ERRORS as exc:
        raise ReadError(
            f"PALETTE COLOR DICOM with an unusable palette ({type(exc).__name__}); expected the Red/Green/Blue "
            "palette lookup tables: re-export the file as RGB or remove it"
        ) from None
    if rgb.dtype != np.uint8 and rgb.size and int(rgb.max()) > 255:
        rgb = rgb >> 8  # 16-bit palette entries: keep the high byte
    return rgb.astype(np.uint8)


def _rescale(ds: Any) -> tuple[float, float]:
    slope = getattr(ds, "RescaleSlope", None)
    intercept = getattr(ds, "RescaleIntercept", None)
    shared = getattr(ds, "SharedFunctionalGroupsSequence", None)
    if (slope is None or intercept is None) and shared:
        transform = getattr(shared[0], "PixelValueTransformationSequence", None)
        if transform:
            slope = getattr(transform[0], "RescaleSlope", slope)
            intercept = getattr(transform[0], "RescaleIntercept", intercept)
    return float(1.0 if slope is None else slope), float(0.0 if intercept is None else intercept)


def _check_kind(ds: Any, limits: Limits) -> None:
    sop_class = str(getattr(ds, "SOPClassUID", "") or "")
    if sop_class == SEG_SOP_CLASS:
        raise ReadError(
            "DICOM SEG (a segmentation, not an image) whose referenced images are not in the source; it is "
            "paired as a mask with the images it references: add those images or remove it"
        )
    if sop_class in NON_IMAGE_SOP_CLASSES:
        raise ReadError(f"DICOM {NON_IMAGE_SOP_CLASSES[sop_class]}; expected an image object: remove it")
    if "PixelData" not in ds:
        raise ReadError(
            "DICOM has no PixelData; expected an image object (not a report or series index): remove it from the source"
        )
    burned = str(getattr(ds, "BurnedInAnnotation", "") or "").strip().upper()
    if burned == "YES" and not limits.allow_burned_in_annotation:
        raise ReadError(
            "DICOM with BurnedInAnnotation YES (text in the pixels may identify the patient); expected images "
            "without it: remove the file, or set preprocess.allow_burned_in_annotation: true once checked"
        )


def read_dicom(path: Path, limits: Limits = DEFAULT_LIMITS) -> Decoded:
    """DICOM image -> :class:`Decoded` (layouts in the module doc). RescaleSlope/Intercept
    applied to grey. ``subject`` = pseudonymised PatientID, or None when absent/empty.
    Only :data:`DICOM_TAGS` (and the file meta) are parsed; Rows x Columns (x frames) is
    checked against ``limits`` before the pixel data are decoded."""
    ds = _read(path)
    try:
        _check_kind(ds, limits)
        _, _, frames = _shape(ds, limits)
        samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
        if samples not in (1, 3):
            raise ReadError(
                f"DICOM with SamplesPerPixel={samples}; expected 1 (grey) or 3 (RGB): convert the file or remove it"
            )
        pixels = _pixels(path, ds)
        photometric = str(getattr(ds, "PhotometricInterpretation", "") or "").strip().upper()
        bits = int(getattr(ds, "BitsAllocated", 16) or 16)
        slope, intercept = _rescale(ds)
        raw_id = str(getattr(ds, "PatientID", "") or "").strip()
    except ReadError:
        raise
    except _DICOM_ERRORS as exc:  # pydicom messages name tags and lengths, never element values
        raise ReadError(
            f"unreadable DICOM ({describe(exc, path)}); expected a complete DICOM image: re-export it or remove it"
        ) from None
    subject = pseudonymise(raw_id) if raw_id else None
    redactor = Redactor(raw_id)
    if photometric == "PALETTE COLOR" and samples == 1:
        pixels, samples, bits = _palette_rgb(pixels, ds), 3, 8
    if samples == 3:
        colour = pixels.astype(np.float32)
        if frames > 1:
            if colour.ndim != 4:
                raise ReadError(
                    f"DICOM says {frames} colour frames but decoded shape {colour.shape}; expected "
                    "(frames, rows, cols, 3): re-export it"
                )
            return Decoded(np.ascontiguousarray(np.moveaxis(colour, -1, 1)), "frames", bits == 8, subject, redactor)
        return Decoded(np.ascontiguousarray(np.moveaxis(colour, -1, 0)), "image", bits == 8, subject, redactor)
    values = pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    check_finite(values)
    if photometric == "MONOCHROME1" and values.size:
        values = np.float32(values.max() + values.min()) - values
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


# --------------------------------------------------------------------------- SEG
def _frame_source(item: Any, f: int) -> tuple[int, str]:
    """(segment number, referenced SOPInstanceUID) of one per-frame functional group."""
    no_source = (
        f"DICOM SEG frame {f + 1} does not name its source image (DerivationImageSequence); expected a SEG "
        "that references single-frame images: export the mask as NIfTI and give it in a CSV mask column"
    )
    try:
        segment = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
    except (AttributeError, IndexError, TypeError, ValueError):
        raise ReadError(
            f"DICOM SEG frame {f + 1} has no ReferencedSegmentNumber; expected a valid SEG: re-export it"
        ) from None
    try:
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        uid = str(source.ReferencedSOPInstanceUID)
    except (AttributeError, IndexError):
        raise ReadError(no_source) from None
    if getattr(source, "ReferencedFrameNumber", None) is not None:
        raise ReadError(
            "DICOM SEG references frames of a multi-frame image; expected single-frame source images: "
            "export the mask as NIfTI and give it in a CSV mask column"
        )
    return segment, uid


def read_dicom_seg(path: Path, limits: Limits = DEFAULT_LIMITS) -> dict[str, np.ndarray]:
    """A DICOM SEG -> ``{referenced SOPInstanceUID: (Rows, Columns) uint8 mask}`` holding
    segment numbers (1..255, 0 = background). BINARY segments as stored, FRACTIONAL ones
    at half the MaximumFractionalValue. Overlapping segments, segment numbers outside
    1..255 or not in SegmentSequence, and frames that do not name a single-frame source
    image reject the SEG."""
    ds = _read(path)
    try:
        if str(getattr(ds, "SOPClassUID", "") or "") != SEG_SOP_CLASS:
            raise ReadError("not a DICOM SEG (SOPClassUID); expected Segmentation Storage: fix the mask entry")
        rows, cols, frames = _shape(ds, limits)
        pixels = _pixels(path, ds).reshape(frames, rows, cols)
        kind = str(getattr(ds, "SegmentationType", "BINARY") or "BINARY").upper()
        numbers = {int(s.SegmentNumber) for s in getattr(ds, "SegmentSequence", [])}
        per_frame = list(getattr(ds, "PerFrameFunctionalGroupsSequence", []))
        most = float(getattr(ds, "MaximumFractionalValue", 255) or 255)
    except ReadError:
        raise
    except _DICOM_ERRORS as exc:
        raise ReadError(
            f"unreadable DICOM SEG ({describe(exc, path)}); expected a complete SEG: re-export it"
        ) from None
    if kind not in ("BINARY", "FRACTIONAL"):
        raise ReadError(f"DICOM SEG of type {kind}; expected BINARY or FRACTIONAL: re-export it")
    bad = sorted(n for n in numbers if not 1 <= n <= 255)
    if not numbers or bad:
        raise ReadError(
            f"DICOM SEG segment numbers {sorted(numbers) or 'none'}; expected 1..255 (one class each): re-export it"
        )
    if len(per_frame) < frames:
        raise ReadError(
            f"DICOM SEG has {frames} frames but {len(per_frame)} per-frame descriptions; expected one each: re-export it"
        )
    masks: dict[str, np.ndarray] = {}
    for f, item in enumerate(per_frame[:frames]):  # extra descriptions (a truncated SEG) describe no pixels
        segment, uid = _frame_source(item, f)
        if segment not in numbers:
            raise ReadError(
                f"DICOM SEG frame {f + 1} names segment {segment}, not in SegmentSequence {sorted(numbers)}; re-export it"
            )
        on = pixels[f] >= most / 2 if kind == "FRACTIONAL" else pixels[f] > 0
        mask = masks.setdefault(uid, np.zeros((rows, cols), np.uint8))
        clash = on & (mask != 0) & (mask != segment)
        if clash.any():
            raise ReadError(
                f"DICOM SEG segments {int(mask[clash].max())} and {segment} overlap in {int(clash.sum())} pixels; "
                "expected one class per pixel: make the segments disjoint or export a NIfTI label map"
            )
        mask[on] = segment
    return masks


# --------------------------------------------------------------------------- volumes (dims 3)
GEOMETRY_TAGS = (
    "SOPClassUID",
    "SeriesInstanceUID",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SamplesPerPixel",
    "PixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SharedFunctionalGroupsSequence",
)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _first(item: Any, sequence: str, tag: str) -> Any:
    seq = getattr(item, sequence, None)
    return getattr(seq[0], tag, None) if seq else None


@dataclass(frozen=True)
class DicomGeometry:
    """Header facts of one DICOM file that place it in a volume (dims 3): ``series``
    (SeriesInstanceUID; never written out), ``rows``/``cols``/``frames``, ``samples``,
    ``pixel_spacing`` (row spacing, column spacing) mm, ``slice_spacing`` mm
    (SpacingBetweenSlices, else SliceThickness), ``position`` (ImagePositionPatient, LPS
    mm) and ``orientation`` (ImageOrientationPatient, 6 direction cosines); None where absent."""

    series: str
    rows: int
    cols: int
    frames: int
    samples: int
    pixel_spacing: tuple[float, ...] | None
    slice_spacing: float | None
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None

    def header(self) -> VolumeHeader:
        """The :class:`VolumeHeader` of a multi-frame file, in :func:`read_dicom`'s volume
        layout ``(Columns, Rows, Frames)``; spacing None unless PixelSpacing is given."""
        spacing = None
        if self.pixel_spacing is not None:
            spacing = (self.pixel_spacing[1], self.pixel_spacing[0], self.slice_spacing or 1.0)
        return VolumeHeader((self.cols, self.rows, self.frames), spacing, planar=self.frames <= 1)


def dicom_geometry(path: Path) -> DicomGeometry:
    """:class:`DicomGeometry` from the header only (no pixel data read); ReadError for
    files that are not readable DICOM. Multi-frame files: PixelSpacing and slice spacing
    from the SharedFunctionalGroupsSequence (PixelMeasuresSequence) when not top-level."""
    ds = _read(path, GEOMETRY_TAGS, header_only=True)
    try:
        shared = getattr(ds, "SharedFunctionalGroupsSequence", None)
        measures = shared[0] if shared else None
        pixel = _floats(getattr(ds, "PixelSpacing", None), 2)
        thickness = getattr(ds, "SpacingBetweenSlices", None) or getattr(ds, "SliceThickness", None)
        if measures is not None:
            pixel = pixel or _floats(_first(measures, "PixelMeasuresSequence", "PixelSpacing"), 2)
            thickness = (
                thickness
                or _first(measures, "PixelMeasuresSequence", "SpacingBetweenSlices")
                or _first(measures, "PixelMeasuresSequence", "SliceThickness")
            )
        slice_spacing = _floats([thickness], 1) if thickness is not None else None
        geometry = DicomGeometry(
            series=str(getattr(ds, "SeriesInstanceUID", "") or ""),
            rows=int(getattr(ds, "Rows", 0) or 0),
            cols=int(getattr(ds, "Columns", 0) or 0),
            frames=int(getattr(ds, "NumberOfFrames", 1) or 1),
            samples=int(getattr(ds, "SamplesPerPixel", 1) or 1),
            pixel_spacing=pixel if pixel and min(pixel) > 0 else None,
            slice_spacing=slice_spacing[0] if slice_spacing and slice_spacing[0] > 0 else None,
            position=_floats(getattr(ds, "ImagePositionPatient", None), 3),
            orientation=_floats(getattr(ds, "ImageOrientationPatient", None), 6),
        )
    except _DICOM_ERRORS as exc:
        raise ReadError(
            f"unreadable DICOM header ({describe(exc, path)}); expected a complete DICOM image: re-export it"
        ) from None
    return geometry


def series_header(geometries: list[DicomGeometry]) -> tuple[VolumeHeader, list[int]]:
    """The volume a series of single-frame files makes: its :class:`VolumeHeader` in
    closest canonical RAS+ order and the files' order along the slice normal. ReadError
    when the files differ in size or orientation, lack ImagePositionPatient /
    ImageOrientationPatient / PixelSpacing, or share a position."""
    import nibabel as nib

    affine, order = _series_affine(geometries)
    ornt = nib.orientations.io_orientation(affine)
    shape = (geometries[0].cols, geometries[0].rows, len(geometries))
    canonical, spacing = [0, 0, 0], [0.0, 0.0, 0.0]
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    for i in range(3):
        canonical[int(ornt[i, 0])] = shape[i]
        spacing[int(ornt[i, 0])] = float(norms[i])
    return VolumeHeader((canonical[0], canonical[1], canonical[2]), (spacing[0], spacing[1], spacing[2])), order


def _series_affine(geometries: list[DicomGeometry]) -> tuple[np.ndarray, list[int]]:
    """(RAS affine of voxel (column, row, slice in ``order``), ``order``); ReadError as in
    :func:`series_header`."""
    first = geometries[0]
    if any((g.rows, g.cols, g.samples) != (first.rows, first.cols, first.samples) for g in geometries):
        raise ReadError("DICOM series whose files differ in Rows/Columns/SamplesPerPixel; expected one volume grid")
    if first.samples != 1:
        raise ReadError("DICOM series of colour images; expected grey (SamplesPerPixel 1) slices of one volume")
    if any(g.position is None or g.orientation is None or g.pixel_spacing is None for g in geometries):
        raise ReadError(
            "DICOM series without ImagePositionPatient/ImageOrientationPatient/PixelSpacing on every file; "
            "expected CT/MR slices that place themselves in space: convert the series to NIfTI (dcm2niix)"
        )
    cosines = np.asarray(first.orientation, dtype=np.float64)
    if any(np.max(np.abs(np.asarray(g.orientation) - cosines)) > 1e-4 for g in geometries):
        raise ReadError("DICOM series whose slices differ in ImageOrientationPatient; expected one stack of slices")
    along_row, along_col = cosines[:3], cosines[3:]
    normal = np.cross(along_row, along_col)
    heights = np.asarray([float(np.dot(normal, g.position)) for g in geometries])
    order = [int(i) for i in np.argsort(heights, kind="stable")]
    gaps = np.diff(heights[order])
    if gaps.size == 0 or float(gaps.min()) <= 1e-4:
        raise ReadError(
            "DICOM series with two slices at the same position (or one slice); expected one slice per "
            "position: remove duplicates or convert the series to NIfTI"
        )
    step = float(np.median(gaps))
    row_spacing, col_spacing = first.pixel_spacing
    affine = np.eye(4)
    affine[:3, 0] = along_row * col_spacing  # voxel i = column index
    affine[:3, 1] = along_col * row_spacing  # voxel j = row index
    affine[:3, 2] = normal * step  # voxel k = slice, in order along the normal
    affine[:3, 3] = geometries[order[0]].position
    return LPS_TO_RAS @ affine, order


def read_dicom_series(paths: list[Path], geometries: list[DicomGeometry], limits: Limits = DEFAULT_LIMITS) -> Volume:
    """Single-frame grey DICOM files of one series -> one :class:`Volume` in closest
    canonical RAS+ order (the slices sorted along their normal; affine from
    ImagePositionPatient/ImageOrientationPatient/PixelSpacing, LPS turned to RAS).
    Each file is read with :func:`read_dicom` (same checks, rescale, MONOCHROME1)."""
    import nibabel as nib

    affine, order = _series_affine(geometries)
    limits.check_volume((geometries[0].cols, geometries[0].rows, len(paths)))
    slices, eight_bit, subject = [], True, None
    for index in order:
        decoded = read_dicom(paths[index], limits)
        if decoded.kind != "image" or decoded.array.shape[0] != 1:
            raise ReadError("DICOM series with a colour or multi-frame file; expected grey single-frame slices")
        slices.append(decoded.array[0])
        eight_bit = eight_bit and decoded.eight_bit
        subject = subject or decoded.subject
    stack = np.stack(slices).transpose(2, 1, 0)  # (frames, rows, cols) -> (cols, rows, frames) = (i, j, k)
    img = nib.as_closest_canonical(nib.Nifti1Image(np.ascontiguousarray(stack, dtype=np.float32), affine))
    data = np.ascontiguousarray(np.asarray(img.dataobj, dtype=np.float32))
    check_finite(data)
    return Volume(data, np.asarray(img.affine, dtype=np.float64), eight_bit, subject)


def read_dicom_volume(path: Path, geometry: DicomGeometry, limits: Limits = DEFAULT_LIMITS) -> Volume:
    """A multi-frame grey DICOM as a :class:`Volume` in :func:`read_dicom`'s layout
    ``(Columns, Rows, Frames)``; the affine is the diagonal of (column spacing, row
    spacing, slice spacing) when the header gives PixelSpacing, else the identity."""
    decoded = read_dicom(path, limits)
    if decoded.kind != "volume":
        what = "colour cine" if decoded.kind == "frames" else "single image"
        raise ReadError(f"DICOM {what}; expected a grey multi-frame volume in a dims 3 pipeline")
    spacing = geometry.header().spacing or (1.0, 1.0, 1.0)
    return Volume(decoded.array, np.diag([*spacing, 1.0]), decoded.eight_bit, decoded.subject)
