"""medigan-style Python API: ``generate`` to disk, a generate function, a DataLoader."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from generators.contract import GeneratedBatch, Generator
from generators.errors import GeneratorError
from generators.registry import find, load_generator
from generators.shards import Row, from_unit_float, encode_png, write_dataset


def get_generator(ref: str, device: str = "cpu") -> Generator:
    """Load a registered generator by ``id`` or ``id@version`` (sha256-checked)."""
    return load_generator(find(ref), device)


def get_generate_function(ref: str, device: str = "cpu") -> Callable[..., GeneratedBatch]:
    """``fn(n, seed=0, condition=None) -> GeneratedBatch`` for a user's own code."""
    generator = get_generator(ref, device)
    return lambda n, seed=0, condition=None: generator.generate(n, seed, condition)


def _unit(images: np.ndarray, value_range: Sequence[float]) -> np.ndarray:
    low, high = value_range
    return (images - low) / (high - low)


def generate(
    ref: str,
    n: int,
    *,
    seed: int = 0,
    condition: str | None = None,
    output: Path,
    fmt: str = "parquet",
    batch_size: int = 64,
    device: str = "cpu",
) -> Path:
    """Generate ``n`` images into a dataset (Parquet shards) or a folder of 8-bit PNGs."""
    if n < 1:
        raise GeneratorError(f"expected n >= 1, got {n}")
    generator = get_generator(ref, device)
    output = Path(output)

    def rows() -> Iterator[Row]:
        for b, start in enumerate(range(0, n, batch_size)):
            count = min(batch_size, n - start)
            batch = generator.generate(count, seed * 1_009 + b, condition)
            unit = _unit(batch.images, generator.card.value_range)
            for i in range(count):
                mask = None if batch.masks is None else batch.masks[i].astype(np.uint8)
                yield Row(
                    id=f"gen-{start + i:07d}", subject="synthetic", split="train", label=batch.labels[i],
                    image=from_unit_float(unit[i], "uint8"), source=generator.card.ref, mask=mask, seed=seed,
                )

    if fmt == "parquet":
        write_dataset(output, (r.to_record() for r in rows()), provenance={"generator": generator.card.ref, "seed": seed})
    elif fmt == "png":
        output.mkdir(parents=True, exist_ok=True)
        for row in rows():
            label = row.label or "unconditional"
            (output / f"{row.id}_{label}.png").write_bytes(encode_png(row.image))
    else:
        raise GeneratorError(f"unknown format '{fmt}'; allowed: parquet, png")
    return output


class SyntheticDataset(torch.utils.data.IterableDataset):
    """Yields ``(image, label_index)`` pairs made on the fly: image float32 (C, H, W) in
    [0, 1]. Deterministic for a given seed; ``length`` samples per epoch."""

    def __init__(self, ref: str, length: int, seed: int = 0, batch_size: int = 64, device: str = "cpu") -> None:
        self.generator = get_generator(ref, device)
        self.length, self.seed, self.batch_size = length, seed, batch_size
        self.labels = list(self.generator.card.conditioning.labels)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        for b, start in enumerate(range(0, self.length, self.batch_size)):
            count = min(self.batch_size, self.length - start)
            batch = self.generator.generate(count, self.seed * 1_009 + b, None)
            unit = _unit(batch.images, self.generator.card.value_range)
            for i in range(count):
                label = batch.labels[i]
                yield torch.from_numpy(unit[i]), (self.labels.index(label) if label in self.labels else -1)


def get_dataloader(ref: str, length: int, batch_size: int = 32, seed: int = 0, device: str = "cpu") -> torch.utils.data.DataLoader:
    """A torch DataLoader of synthetic samples for a user's own training loop."""
    return torch.utils.data.DataLoader(SyntheticDataset(ref, length, seed, device=device), batch_size=batch_size)
