"""Tiny labelled phantom datasets for the filter / retrain / report tests.

Three classes that a small CNN separates in a few dozen steps: a filled ``disc``, a
hollow ``ring`` and a filled ``square``, bright on a dark noisy background (no pixel at
0 or 255, so real phantoms never look saturated). Masks: 0 background, 1 shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from generators.shards import Row, write_dataset

CLASSES = ("disc", "ring", "square")
SOURCE = "phantom-gan@1"


def draw_phantom(label: str, rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """One phantom: image uint8 ``(1, size, size)``, mask uint8 ``(size, size)`` in {0, 1}."""
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    cy, cx = size / 2 + rng.uniform(-2, 2, 2)
    radius = size * rng.uniform(0.26, 0.32)
    d2 = (yy - cy) ** 2 + (xx - cx) ** 2
    if label == "disc":
        inside = d2 <= radius**2
    elif label == "ring":
        inside = (d2 <= radius**2) & (d2 >= (0.55 * radius) ** 2)
    elif label == "square":
        half = 0.85 * radius
        inside = (np.abs(yy - cy) <= half) & (np.abs(xx - cx) <= half)
    else:
        raise ValueError(f"expected a label in {CLASSES}, got {label!r}")
    brightness = rng.uniform(0.6, 0.8)
    image = 0.15 + (brightness - 0.15) * inside + rng.normal(0, 0.03, (size, size))
    pixels = np.rint(np.clip(image, 0.02, 0.98) * 255).astype(np.uint8)
    return pixels[None], inside.astype(np.uint8)


def write_real(
    target: Path,
    per_split: dict[str, int] | None = None,
    *,
    size: int = 32,
    seed: int = 0,
    masks: bool = True,
    classes: tuple[str, ...] = CLASSES,
) -> dict:
    """A real dataset: ``per_split[split]`` phantoms of every class (default train 20,
    val 6, test 8). Returns the manifest."""
    per_split = per_split or {"train": 20, "val": 6, "test": 8}
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in per_split.items():
        for label in classes:
            for i in range(n):
                image, mask = draw_phantom(label, rng, size)
                rows.append(
                    Row(
                        id=f"{split}-{label}-{i:03d}",
                        subject=f"sub-{split}-{label}-{i:03d}",
                        split=split,
                        label=label,
                        image=image,
                        source=f"file://phantoms/{label}/{i}.png",
                        mask=mask if masks else None,
                    ).to_record()
                )
    rows.sort(key=lambda r: r["id"])
    return write_dataset(target, rows, shard_rows=16)


@dataclass
class SyntheticIds:
    """Ids of each kind of synthetic row written by :func:`write_synthetic`."""

    good: list[str] = field(default_factory=list)
    blank: list[str] = field(default_factory=list)
    saturated: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    mislabelled: list[str] = field(default_factory=list)
    label: dict[str, str] = field(default_factory=dict)

    @property
    def insane(self) -> set[str]:
        return set(self.blank) | set(self.saturated) | set(self.corrupt)


def write_synthetic(
    target: Path,
    *,
    per_class: int = 8,
    blank: int = 2,
    saturated: int = 2,
    corrupt: int = 1,
    mislabelled: int = 3,
    size: int = 32,
    seed: int = 7,
    masks: bool = True,
    shard_rows: int = 8,
    classes: tuple[str, ...] = CLASSES,
) -> SyntheticIds:
    """A synthetic dataset (split ``train``, ``seed`` and ``source`` set): ``per_class``
    good phantoms per class plus deliberately bad rows: constant grey (``blank``: std 0),
    mostly white (``saturated``: 75% of pixels at 255, thin black stripes), undecodable bytes
    (``corrupt``) and phantoms of one class labelled as the next (``mislabelled``)."""
    rng = np.random.default_rng(seed)
    kinds = [("good", classes[i % len(classes)]) for i in range(per_class * len(classes))]
    kinds += [("blank", classes[i % len(classes)]) for i in range(blank)]
    kinds += [("saturated", classes[i % len(classes)]) for i in range(saturated)]
    kinds += [("corrupt", classes[i % len(classes)]) for i in range(corrupt)]
    kinds += [("mislabelled", classes[i % len(classes)]) for i in range(mislabelled)]
    order = rng.permutation(len(kinds))
    ids = SyntheticIds()
    records = []
    for position, k in enumerate(order):
        kind, label = kinds[k]
        row_id = f"syn-{position:04d}"
        mask = np.zeros((size, size), np.uint8)
        if kind == "good":
            image, mask = draw_phantom(label, rng, size)
        elif kind == "mislabelled":
            drawn = classes[(classes.index(label) + 1) % len(classes)]
            image, mask = draw_phantom(drawn, rng, size)
        elif kind == "blank":
            image = np.full((1, size, size), 100, np.uint8)
        elif kind == "saturated":
            image = np.full((1, size, size), 255, np.uint8)
            image[:, :, ::4] = 0  # 75% of pixels clipped at the maximum
        else:
            image = np.full((1, size, size), 100, np.uint8)
        record = Row(
            id=row_id,
            subject=f"synthetic-{position:04d}",
            split="train",
            label=label,
            image=image,
            source=SOURCE,
            mask=mask if masks else None,
            seed=seed,
        ).to_record()
        if kind == "corrupt":
            record["image"] = b"this is not a PNG"
        records.append(record)
        getattr(ids, kind).append(row_id)
        ids.label[row_id] = label
    write_dataset(target, records, shard_rows=shard_rows)
    return ids


@dataclass
class PlantedIds:
    """Ids of each kind of row written by :func:`write_synthetic_with_copies`."""

    good: list[str] = field(default_factory=list)
    exact_copy: list[str] = field(default_factory=list)
    noisy_copy: list[str] = field(default_factory=list)
    duplicate_group: list[str] = field(default_factory=list)  # one phantom and its near-copies
    label: dict[str, str] = field(default_factory=dict)

    @property
    def memorised(self) -> set[str]:
        return set(self.exact_copy) | set(self.noisy_copy)


def write_synthetic_with_copies(
    target: Path,
    real: Path,
    *,
    per_class: int = 6,
    exact: int = 2,
    noisy: int = 2,
    noise_std: float = 0.01,
    group_size: int = 3,
    size: int = 32,
    seed: int = 11,
    classes: tuple[str, ...] = CLASSES,
) -> PlantedIds:
    """A synthetic dataset of fresh phantoms (``per_class`` per class) with planted rows:
    ``exact`` byte-identical copies and ``noisy`` lightly noised copies (Gaussian,
    ``noise_std`` on the [0, 1] scale) of distinct REAL TRAIN images, and a group of
    ``group_size`` near-identical synthetic images (one phantom, an exact copy of it, the
    rest lightly noised). Rows are shuffled and ids follow the shuffled order."""
    from generators.shards import decode_png, read_table

    rng = np.random.default_rng(seed)
    train = read_table(real, splits=["train"])
    real_images = [decode_png(blob) for blob in train.column("image").to_pylist()]
    real_labels = train.column("label").to_pylist()
    picks = rng.choice(len(real_images), size=exact + noisy, replace=False)

    def noised(image: np.ndarray) -> np.ndarray:
        pixels = image.astype(np.float64) / 255 + rng.normal(0, noise_std, image.shape)
        return np.rint(np.clip(pixels, 0, 1) * 255).astype(np.uint8)

    items: list[tuple[str, str, np.ndarray]] = []
    for i in range(per_class * len(classes)):
        label = classes[i % len(classes)]
        items.append(("good", label, draw_phantom(label, rng, size)[0]))
    for n, k in enumerate(picks):
        kind = "exact_copy" if n < exact else "noisy_copy"
        image = real_images[k] if kind == "exact_copy" else noised(real_images[k])
        items.append((kind, real_labels[k], image))
    base_label = classes[0]
    base = draw_phantom(base_label, rng, size)[0]
    for n in range(group_size):
        items.append(("duplicate_group", base_label, base if n < 2 else noised(base)))
    order = rng.permutation(len(items))
    ids = PlantedIds()
    records = []
    for position, k in enumerate(order):
        kind, label, image = items[k]
        row_id = f"syn-{position:04d}"
        records.append(
            Row(
                id=row_id,
                subject=f"synthetic-{position:04d}",
                split="train",
                label=label,
                image=image,
                source=SOURCE,
                seed=seed,
            ).to_record()
        )
        getattr(ids, kind).append(row_id)
        ids.label[row_id] = label
    write_dataset(target, records, shard_rows=8)
    return ids
