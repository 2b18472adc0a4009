"""Synthesis shards made and written by another process (a Dask worker), byte-identical
to the stage's own loop.

A :class:`ShardMaker` is everything a worker needs to make shard ``k`` of a plan: where
the generator's card is (and the digest that pins its weights and the run's settings),
the torch device and threads, the batch size, the pixel dtype, the given masks, and the
staging directory of the stage's :class:`generators.shards.DatasetWriter`. It is small
and picklable; the generator itself is loaded once per worker process and cached
(:func:`cached_generator`), so a worker that makes fifty shards loads it once.

The worker writes the shard into the staging directory itself, atomically (temp file,
then rename) with its completion record (:func:`generators.shards.write_staged_shard`),
and returns the record; the stage's process checks the file's sha256 and counts it in
(:meth:`DatasetWriter.adopt_shard`). A worker killed mid-shard leaves at most a temp
file; the scheduler runs the shard again elsewhere and the rename makes it whole. Every
worker must therefore see the project directory at the same path: a shared filesystem.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from threading import Lock
from typing import Any

import numpy as np
import torch

from generators.compiled import compile_generator
from generators.contract import Generator
from generators.errors import ConfigError, worker_cannot_see
from generators.registry import load_generator
from generators.shards import write_staged_shard
from tasks.config import PipelineConfig
from tasks.runtime import setup_torch

_CACHE: dict[tuple[str, str, str, bool], Generator] = {}
_CACHE_LOCK = Lock()
LOADS = {"count": 0}  # generator loads in this process


def generator_loads() -> int:
    """Generators loaded by :func:`cached_generator` in this process (run it on each worker
    with ``client.run`` for the per-worker figure)."""
    return LOADS["count"]


@dataclass(frozen=True)
class ShardMaker:
    """Makes and writes one planned shard wherever it is called (see module docstring).

    ``key``: the stage's resume key (card with weights sha256, plan, dtype, device,
    threads, torch and code digests): a worker's cached generator is reused only under
    the same key. ``masks``: the given masks, uint8 ``(M, H, W)``, or None."""

    cfg: PipelineConfig
    card_path: str
    key: str
    device: str
    batch_size: int
    dtype: str
    staging: str
    compiled: bool = False
    masks: np.ndarray | None = None

    def __call__(self, plan: Any) -> dict[str, Any]:
        """Make shard ``plan.index`` and write it into :attr:`staging`; returns its record
        (file, rows, sha256, class counts)."""
        from tasks.synthesize import generate_shard  # the one definition of a shard's rows

        staging = Path(self.staging)
        if not staging.is_dir():
            raise worker_cannot_see(staging)
        generator = cached_generator(self)
        table = generate_shard(generator, plan, batch_size=self.batch_size, dtype=self.dtype, masks=self.masks)
        return write_staged_shard(table, staging, plan.index)


def cached_generator(maker: ShardMaker) -> Generator:
    """The generator of ``maker``, loaded once per process and key, with this process's
    torch set as the stage's (threads, deterministic algorithms), on ``maker.device``."""
    cache_key = (maker.card_path, maker.key, maker.device, maker.compiled)
    with _CACHE_LOCK:
        generator = _CACHE.get(cache_key)
        if generator is not None:
            return generator
        if maker.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                f"worker {socket.gethostname()}: device cuda, but torch sees no CUDA device here; start one "
                "Dask worker per GPU with --resources GPU=1 (docs/scaleout.md), or set device: cpu"
            )
        setup_torch(maker.cfg, maker.cfg.synthesis.seed)
        generator = load_generator(Path(maker.card_path), maker.device)
        if maker.compiled:
            compile_generator(generator)
        _CACHE.clear()  # one generator per worker: a new run's key replaces the last one
        _CACHE[cache_key] = generator
        LOADS["count"] += 1
        return generator
