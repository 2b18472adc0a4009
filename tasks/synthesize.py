"""Stage ``synthesize``: generate the requested number of images per class into Parquet
shards of ``data/<pipeline>/synthetic``.

The plan (row ids, labels, shard boundaries, per-shard seeds) is fixed before any image
is made, so every shard is independent: shards can run in parallel or be resumed, and
the same config gives byte-identical shards. Shard ``k`` uses seed
``synthesis.seed * 1_000_003 + k``; batch ``b`` inside it uses ``shard_seed * 1_009 + b``.

Resume: a run that is killed or fails keeps its completed shards in
``data/<pipeline>/.synthetic.partial-<key>``; the next run with the same key (same
generator weights, plan, dtype, device, threads, torch and code) keeps the shards whose
sha256 matches and makes only the rest, so the result is byte-identical to an
uninterrupted run. Any change of those inputs gives a new key and a fresh start.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable, Iterator, Sequence

import pyarrow as pa
import torch

from generators.contract import Generator
from generators.errors import ConfigError, DataError
from generators.registry import load_generator
from generators.shards import (
    DatasetWriter,
    Row,
    from_unit_float,
    read_manifest,
    read_table,
    records_to_table,
)
from tasks.config import PipelineConfig
from tasks.paths import PipelinePaths
from tasks.runtime import setup_torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardPlan:
    """Rows of one synthetic shard: ids and conditioning labels, and its seed."""

    index: int
    seed: int
    ids: tuple[str, ...]
    labels: tuple[str, ...]


def requested_counts(cfg: PipelineConfig, real_train_counts: dict[str, int]) -> dict[str, int]:
    """Images to make per class: ``counts`` override ``count_per_class``; with
    ``balance`` every class is topped up to the largest real training class."""
    unknown = sorted(set(cfg.synthesis.counts) - set(real_train_counts))
    if unknown:
        raise ConfigError(
            f"synthesis.counts names unknown class(es) {unknown}; classes in the real train split: "
            f"{', '.join(sorted(real_train_counts))}"
        )
    if cfg.synthesis.balance:
        largest = max(real_train_counts.values())
        return {label: largest - n for label, n in sorted(real_train_counts.items())}
    return {
        label: cfg.synthesis.counts.get(label, cfg.synthesis.count_per_class)
        for label in sorted(real_train_counts)
    }


def plan_shards(counts: dict[str, int], shard_rows: int, seed: int) -> list[ShardPlan]:
    """Deterministic plan: rows sorted by id (``syn-<label>-<index>``), cut into shards."""
    rows = [(f"syn-{label}-{i:07d}", label) for label in sorted(counts) for i in range(counts[label])]
    plans = []
    for k, start in enumerate(range(0, len(rows), shard_rows)):
        chunk = rows[start : start + shard_rows]
        plans.append(
            ShardPlan(
                index=k,
                seed=seed * 1_000_003 + k,
                ids=tuple(r[0] for r in chunk),
                labels=tuple(r[1] for r in chunk),
            )
        )
    return plans


def generate_shard(generator: Generator, plan: ShardPlan, batch_size: int, dtype: str) -> pa.Table:
    """Generate one shard's images (batched) and encode them as dataset rows."""
    records: list[dict[str, Any]] = []
    for b, start in enumerate(range(0, len(plan.ids), batch_size)):
        ids = plan.ids[start : start + batch_size]
        labels = list(plan.labels[start : start + batch_size])
        batch = generator.generate(len(ids), seed=plan.seed * 1_009 + b, condition=labels)
        for i, row_id in enumerate(ids):
            mask = None if batch.masks is None else batch.masks[i].astype("uint8")
            records.append(
                Row(
                    id=row_id,
                    subject="synthetic",
                    split="train",
                    label=labels[i],
                    image=from_unit_float(batch.images[i], dtype),
                    source=generator.card.ref,
                    mask=mask,
                    seed=plan.seed,
                ).to_record()
            )
    return records_to_table(records)


def iter_shards(generator: Generator, plans: list[ShardPlan], batch_size: int, dtype: str) -> Iterator[pa.Table]:
    for plan in plans:
        yield generate_shard(generator, plan, batch_size, dtype)


def resume_key(generator: Generator, provenance: dict[str, Any], *, dtype: str, device: str, threads: int) -> str:
    """Digest of everything that fixes the shards' bytes: the card (weights sha256
    included), the plan (``provenance``: counts, seed, shard_rows, batch_size), the pixel
    dtype, device, torch threads and version, and the stage code."""
    from tasks.stages import code_digest

    payload = {
        "card": generator.card.model_dump(mode="json"),
        "plan": provenance,
        "dtype": dtype,
        "device": device,
        "threads": threads,
        "torch": torch.__version__,
        "code": code_digest(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def real_train_counts(paths: PipelinePaths) -> dict[str, int]:
    counts = read_manifest(paths.real)["class_counts"].get("train", {})
    if not counts:
        raise DataError(f"{paths.real}: no labelled training images; ingest a labelled source first")
    return dict(counts)


def real_dtype(paths: PipelinePaths) -> str:
    table = read_table(paths.real, columns=["dtype"])
    dtypes = Counter(table.column("dtype").to_pylist())
    return dtypes.most_common(1)[0][0]


ShardMap = Callable[[Callable[[ShardPlan], pa.Table], Sequence[ShardPlan]], Iterable[pa.Table]]
"""``map_shards(make, plans)``: the tables ``make(plan)`` of every plan, yielded in plan
order, made in any order or place (e.g. the Prefect flow's thread-pool shard tasks)."""


def _write_mapped(
    writer: DatasetWriter, plans: list[ShardPlan], make: Callable[[ShardPlan], pa.Table], map_shards: ShardMap
) -> None:
    """Write shards made by ``map_shards``. Shards kept from an interrupted run (always
    a prefix of the plan when the writer wrote them) are not made again; a kept shard
    after the first one made is made anyway and its table dropped."""
    made: Iterator[pa.Table] | None = None
    for plan in plans:
        resumed = writer.resume_shard()
        if made is None:
            if resumed:
                continue
            made = iter(map_shards(make, plans[plan.index :]))
        table = next(made)
        if not resumed:
            writer.write_table(table)


def synthesize(cfg: PipelineConfig, paths: PipelinePaths, map_shards: ShardMap | None = None) -> dict[str, Any]:
    """Generate ``requested_counts`` images per class; returns counts and the generator ref.

    ``map_shards`` (optional) makes the shards elsewhere, e.g. in parallel; the shards'
    bytes do not depend on it (each shard has its own seed)."""
    device = setup_torch(cfg, cfg.synthesis.seed)
    generator = load_generator(paths.generator / "card.yaml", device)
    counts = requested_counts(cfg, real_train_counts(paths))
    missing = sorted(set(counts) - set(generator.card.conditioning.labels))
    if missing:
        raise ConfigError(
            f"generator {generator.card.ref} cannot make class(es) {missing}; it knows "
            f"{', '.join(generator.card.conditioning.labels)}; retrain it on this dataset"
        )
    plans = plan_shards(counts, cfg.synthesis.shard_rows, cfg.synthesis.seed)
    dtype = real_dtype(paths)
    provenance = {
        "generator": generator.card.ref,
        "counts": counts,
        "seed": cfg.synthesis.seed,
        "shard_rows": cfg.synthesis.shard_rows,
        "batch_size": cfg.synthesis.batch_size,
    }
    key = resume_key(generator, provenance, dtype=dtype, device=device, threads=cfg.threads)
    log.info("synthesizing %d images in %d shards with %s", sum(counts.values()), len(plans), generator.card.ref)
    writer = DatasetWriter(
        paths.synthetic, shard_rows=cfg.synthesis.shard_rows, provenance=provenance, resume_key=key
    )
    with writer:
        if map_shards is None:
            for plan in plans:
                if writer.resume_shard():
                    continue
                writer.write_table(generate_shard(generator, plan, cfg.synthesis.batch_size, dtype))
        else:
            make = partial(generate_shard, generator, batch_size=cfg.synthesis.batch_size, dtype=dtype)
            _write_mapped(writer, plans, make, map_shards)
    if writer.resumed:
        log.info("resumed: %d of %d shards kept from an interrupted run", writer.resumed, len(plans))
    return {
        "generator": generator.card.ref,
        "counts": counts,
        "shards": len(plans),
        "resumed_shards": writer.resumed,
        "device": device,
    }
