"""One random stream per image: what a seed means in synthmed, for any ``n`` and batch size.

The rule (what every generator, TorchScript export and bundle follows)::

    rng(seed, i, stream) = numpy.random.Generator(numpy.random.PCG64(numpy.random.SeedSequence([seed, i, stream])))

- ``seed`` >= 0 is the request's seed; ``i`` >= 0 is the image's index in the request
  (image 0 is the first image of ``generate(n, seed)``, counted across batches, shards
  and dataloader workers); ``stream`` says which draw of that image:
  ``0`` (:data:`LATENT`) its latent or initial noise, ``1`` (:data:`CHOICE`) its discrete
  choices (e.g. pix2pix's mask-pool pick), ``2 + k`` (:func:`step_stream`) the noise of
  step ``k`` of a stochastic sampler.
- A latent of per-image shape ``S`` is ``rng(seed, i, 0).standard_normal(S, dtype=float32)``
  (``.random(S, dtype=float32)`` for a U(0, 1) latent), then ``torch.from_numpy``: the
  draw happens on the CPU, so it is the same on every device.
- Labels when no condition is given cycle over the card's labels by the same ``i``
  (image ``i`` gets label ``i % L``).

So image ``i`` is a pure function of ``(seed, i)``: ``generate(200, s)`` in batches of 7,
64 or 200 gives the same images, and its first 50 are ``generate(50, s)``.

A generator's ``generate(n, seed)`` makes images ``0 .. n-1``; a caller that makes a long
request in batches runs each batch inside ``with offset(start):`` so the batch makes images
``start .. start+n-1`` (:func:`generate_range` does both). The offset is a context
variable, so architectures keep the ``generate(n, seed, condition)`` contract. Controls
(``noise``, ``blobs``, ``real-holdout``) draw a whole batch at once from
:func:`batch_rng`, keyed by ``(seed, start)``: reproducible for a fixed batch size only.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from generators.errors import GeneratorError

LATENT = 0  #: stream of an image's latent / initial noise
CHOICE = 1  #: stream of an image's discrete random choices
BATCH = 2**32 - 1  #: stream of the batch-level draws of controls (:func:`batch_rng`)
DEFORM = 2**32 - 2  #: stream of an image's random mask deformation (volume generators' paired masks)

_START: ContextVar[int] = ContextVar("synthmed_seed_stream_start", default=0)


def step_stream(step: int) -> int:
    """Stream of the noise a stochastic sampler adds at step ``step`` (0-based)."""
    return 2 + int(step)


def _check(seed: int, index: int) -> None:
    if int(seed) < 0 or int(index) < 0:
        raise GeneratorError(f"expected a seed >= 0 and an image index >= 0, got seed {seed}, index {index}")


def image_rng(seed: int, index: int, stream: int = LATENT) -> np.random.Generator:
    """The generator of draw ``stream`` of image ``index`` for ``seed`` (see the module rule)."""
    _check(seed, index)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(index), int(stream)])))


def current_start() -> int:
    """Index of the first image of the current ``generate`` call (0 outside :func:`offset`)."""
    return _START.get()


@contextmanager
def offset(start: int) -> Iterator[None]:
    """Inside the block, ``generate(n, seed)`` makes images ``start .. start+n-1`` of the stream."""
    if int(start) < 0:
        raise GeneratorError(f"expected a stream offset >= 0, got {start}")
    token = _START.set(int(start))
    try:
        yield
    finally:
        _START.reset(token)


def indices(n: int, start: int | None = None) -> range:
    """Stream indices of ``n`` images from ``start`` (default: the current offset)."""
    first = current_start() if start is None else int(start)
    return range(first, first + int(n))


def stream_normal(
    shape: Sequence[int], seed: int, start: int | None = None, stream: int = LATENT, distribution: str = "normal"
) -> torch.Tensor:
    """float32 CPU tensor ``shape = (n, *S)``: row ``j`` is image ``start + j``'s draw
    ``stream`` of per-image shape ``S``, N(0, 1) (``distribution="normal"``) or U(0, 1)
    (``"uniform"``). ``start`` defaults to the current :func:`offset`."""
    n, per_image = int(shape[0]), tuple(int(s) for s in shape[1:])
    if distribution not in ("normal", "uniform"):
        raise GeneratorError(f"unknown latent distribution '{distribution}'; allowed: normal, uniform")
    rows = np.empty((n, *per_image), dtype=np.float32)
    for j, i in enumerate(indices(n, start)):
        rng = image_rng(seed, i, stream)
        rows[j] = (
            rng.standard_normal(per_image, dtype=np.float32)
            if distribution == "normal"
            else rng.random(per_image, dtype=np.float32)
        )
    return torch.from_numpy(rows)


def image_rngs(n: int, seed: int, stream: int = CHOICE, start: int | None = None) -> list[np.random.Generator]:
    """One generator per image of the current call (images ``start .. start+n-1``)."""
    return [image_rng(seed, i, stream) for i in indices(n, start)]


def batch_rng(seed: int) -> np.random.Generator:
    """A generator for draws that cover a whole batch (the controls): keyed by ``seed`` and
    the batch's first index, so successive batches of one request differ."""
    return image_rng(seed, current_start(), BATCH)


def cycled_labels(labels: Sequence[str], n: int, start: int | None = None) -> list[str] | None:
    """``labels[i % L]`` for the stream indices of ``n`` images; None when there are no labels."""
    if not labels:
        return None
    return [labels[i % len(labels)] for i in indices(n, start)]


def generate_range(generator: Any, start: int, count: int, seed: int, condition: Any = None) -> Any:
    """``generator.generate`` for images ``start .. start+count-1`` of ``seed``'s stream.
    ``condition=None`` on a conditional card becomes the cycled labels of those images
    (a one-label card gets its label), so labels too follow the stream."""
    labels = list(generator.card.conditioning.labels)
    if condition is None:
        condition = cycled_labels(labels, count, start)
    with offset(start):
        return generator.generate(count, seed, condition)
