"""Pictures of a generator: a grid of samples and a latent-space interpolation, as PNG.

    from generators.api import get_generator
    from generators.visualise import visualise
    visualise(get_generator("mednist-gan-hand"), "out/")   # out/samples.png, out/interpolation.png

Grids are uint8, grey for 1-channel images and RGB for 3+ channels (first three), with a
2-pixel dark border between tiles. Interpolation rows walk from one seeded latent to
another (spherical for Gaussian latents, linear for uniform ones); conditional generators
keep one label per row. It needs the generator's latent module (``generators.latent``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from generators.errors import GeneratorError
from generators.latent import interpolate_latents, latent_module, sample_latent

log = logging.getLogger(__name__)
PAD = 2


def to_display(images: np.ndarray, value_range: Sequence[float]) -> np.ndarray:
    """float ``(N, C, H, W)`` in ``value_range`` -> uint8 ``(N, H, W)`` or ``(N, H, W, 3)``."""
    if images.ndim != 4:
        raise GeneratorError(f"expected images (N, C, H, W), got shape {images.shape}")
    low, high = float(value_range[0]), float(value_range[1])
    unit = np.clip((np.nan_to_num(images.astype(np.float32)) - low) / (high - low), 0.0, 1.0)
    pixels = np.rint(unit * 255).astype(np.uint8)
    if pixels.shape[1] >= 3:
        return pixels[:, :3].transpose(0, 2, 3, 1)
    return pixels[:, 0]


def tile(tiles: np.ndarray, ncols: int) -> np.ndarray:
    """uint8 ``(N, H, W[, 3])`` -> one image with ``ncols`` columns and PAD-pixel borders."""
    n, h, w = tiles.shape[:3]
    nrows = math.ceil(n / ncols)
    shape = (nrows * (h + PAD) + PAD, ncols * (w + PAD) + PAD, *tiles.shape[3:])
    canvas = np.zeros(shape, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, ncols)
        y, x = PAD + r * (h + PAD), PAD + c * (w + PAD)
        canvas[y : y + h, x : x + w] = tiles[i]
    return canvas


def save_png(image: np.ndarray, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def sample_grid(
    generator: Any, n: int = 16, seed: int = 0, condition: str | None = None, ncols: int | None = None
) -> np.ndarray:
    """uint8 grid of ``generator.generate(n, seed, condition)`` (conditional generators
    cycle through their labels when ``condition`` is None)."""
    if n < 1:
        raise GeneratorError(f"expected n >= 1 samples, got {n}")
    batch = generator.generate(n, seed, condition)
    ncols = ncols or math.ceil(math.sqrt(n))
    return tile(to_display(batch.images, generator.card.value_range), ncols)


def mask_grid(generator: Any, n: int = 16, seed: int = 0, ncols: int | None = None) -> np.ndarray | None:
    """uint8 grid of the masks (class index spread over 0..255), or None without masks."""
    batch = generator.generate(n, seed, None)
    if batch.masks is None:
        return None
    masks = np.asarray(batch.masks)
    top = max(int(masks.max()), 1)
    pixels = np.rint(masks * (255.0 / top)).astype(np.uint8)
    return tile(pixels, ncols or math.ceil(math.sqrt(n)))


def interpolation_grid(generator: Any, rows: int = 4, steps: int = 8, seed: int = 0) -> np.ndarray:
    """uint8 grid: ``rows`` walks of ``steps`` images between latents drawn with ``seed``
    and ``seed + 1``."""
    lm = latent_module(generator)
    start = sample_latent(rows, lm.latent_dim, lm.latent_distribution, seed)
    end = sample_latent(rows, lm.latent_dim, lm.latent_distribution, seed + 1)
    path = torch.cat([interpolate_latents(start[r], end[r], steps, lm.latent_distribution) for r in range(rows)])
    if lm.latent_shape:  # diffusion models: the walk is over their initial noise (C, h, w)
        path = path.reshape(len(path), *lm.latent_shape)
    labels = None
    if lm.labels:
        labels = torch.arange(rows).repeat_interleave(steps) % len(lm.labels)
    device = _module_device(lm.module)
    images = lm.images(path.to(device), None if labels is None else labels.to(device)).cpu().numpy()
    return tile(to_display(images, lm.value_range), steps)


def _module_device(module: torch.nn.Module) -> torch.device:
    for parameter in module.parameters():
        return parameter.device
    return torch.device("cpu")


def visualise(
    generator: Any, out: Path | str, *, n: int = 16, seed: int = 0, rows: int = 4, steps: int = 8
) -> dict[str, Path]:
    """Write ``samples.png`` (+ ``masks.png`` for mask generators) and ``interpolation.png``
    to ``out``; returns name -> path. Generators without a latent module get no
    interpolation (logged), since they have no latent to walk."""
    out = Path(out)
    written = {"samples": save_png(sample_grid(generator, n, seed), out / "samples.png")}
    masks = mask_grid(generator, n, seed)
    if masks is not None:
        written["masks"] = save_png(masks, out / "masks.png")
    try:
        if hasattr(latent_module(generator).module, "mask_pool_masks"):
            raise GeneratorError(f"{generator.card.ref}: its module needs masks besides the latent")
    except GeneratorError as exc:
        log.warning("no latent interpolation: %s", exc)
    else:
        written["interpolation"] = save_png(interpolation_grid(generator, rows, steps, seed), out / "interpolation.png")
    return written
