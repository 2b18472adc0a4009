"""Pixel operations of ingest: intensity scaling, channel conversion, padding/resizing.

All functions take and return float32 arrays in [0, 1] ``(C, H, W)`` (images) or uint8
``(H, W)`` class indices (masks); memory stays bounded by the input's own size
(:data:`MAX_PAD_PIXELS`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from tasks.reader_base import ReadError

FOREGROUND_THRESHOLD = 0.1  # scaled intensity in [0, 1] above which a pixel is foreground
COLOUR_TOLERANCE = 0.03  # mean channel spread in [0, 1] up to which an RGB image counts as grey
MAX_PAD_PIXELS = 4096 * 4096  # a plane is padded to a square only up to this size, else resized first


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


def check_grey(unit: np.ndarray) -> None:
    """ReadError when a ``(3, H, W)`` image in [0, 1] is colour (mean channel spread
    above :data:`COLOUR_TOLERANCE`) where grey is expected (``preprocess.channels: 1``)."""
    spread = float(np.mean(unit.max(axis=0) - unit.min(axis=0)))
    if spread > COLOUR_TOLERANCE:
        raise ReadError(
            f"colour image (mean channel spread {spread:.2f} > {COLOUR_TOLERANCE}) where grey is expected "
            "(preprocess.channels: 1); set preprocess.channels: 3 or convert the file to grey"
        )
