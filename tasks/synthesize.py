"""Stage ``synthesize``: generate the requested number of images per class into Parquet
shards of ``data/<pipeline>/synthetic``.

The plan (row ids, labels, shard boundaries, per-shard seeds) is fixed before any image
is made, so every shard is independent: shards can run in parallel or be resumed, and
the same config gives byte-identical shards. Shard ``k`` uses seed
``synthesis.seed * 1_000_003 + k``; row ``j`` of the shard is image ``j`` of that seed's
per-image stream (``generators.seed_stream``), so ``batch_size`` does not change the bytes.

Resume: a run that is killed or fails keeps its completed shards in
``data/<pipeline>/.synthetic.partial-<key>``; the next run with the same key (same
generator weights, plan, dtype, device, threads, torch and code) keeps the shards whose
sha256 matches and makes only the rest, so the result is byte-identical to an
uninterrupted run. Any change of those inputs gives a new key and a fresh start.

Throughput: the stage's own loop (no ``map_shards``) generates on the calling thread and
hands each batch to one I/O thread that quantises, encodes and writes, in order, at most
:data:`IO_QUEUE_DEPTH` jobs behind; so encoding and writing overlap with generation and
the bytes are the same as made one after another (``benchmarks/bench_synthesis.py``).

Masks given (``synthesis.masks_from``, segmentation augmentation; ``tasks/mask_sources.py``):
the plan also fixes each row's mask (class ``c``'s row ``i`` gets class ``c``'s mask
``i mod M_c``); the mask-conditioned generator makes each image for its mask
(``generators.contract.generate_batch``) and the row's mask is that mask, bit for bit.
The masks' sha256 is part of the plan's provenance, so other masks mean a fresh start.

Volumes (``preprocess.dims: 3``, a volume generator: ``vae3d``, ``ldm3d``): the same plan and
shards; a batch's images are ``(N, 1, D, H, W)`` and each row holds one volume cell
(``generators.shards.encode_image``) with its mask ``(D, H, W)``; given masks
(``masks_from: train``) are the train split's ``(M, D, H, W)``. Volume generators always
generate eager (``synthesis.compile`` is not applied to them). One shard's rows are held in
memory before writing: ``tasks/config.py`` bounds ``shard_rows`` x the volume's bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch

from generators.compiled import compile_generator, should_compile
from generators.contract import SYNTHETIC_SUBJECT, GeneratedBatch, Generator, accepts_masks, generate_batch
from generators.errors import ConfigError, DataError, GeneratorError
from generators.registry import load_generator
from generators.seed_stream import offset as stream_offset
from generators.shards import (
    DatasetWriter,
    Row,
    from_unit_float,
    read_table,
    records_to_table,
    verify_dataset,
)
from tasks.config import PipelineConfig
from tasks.mask_sources import MAX_REJECTS_KEPT, MaskSet, load_mask_set
from tasks.paths import PipelinePaths
from tasks.progress import Progress
from tasks.remote_shards import ShardMaker
from tasks.runtime import setup_torch

log = logging.getLogger(__name__)

IO_QUEUE_DEPTH = 4  # encode/write jobs the generating thread may run ahead (bounds memory)


@dataclass(frozen=True)
class ShardPlan:
    """Rows of one synthetic shard: ids and conditioning labels, and its seed; ``masks``:
    each row's index into the given masks (``synthesis.masks_from``), empty without them."""

    index: int
    seed: int
    ids: tuple[str, ...]
    labels: tuple[str, ...]
    masks: tuple[int, ...] = ()


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
        label: cfg.synthesis.counts.get(label, cfg.synthesis.count_per_class) for label in sorted(real_train_counts)
    }


def plan_shards(
    counts: dict[str, int], shard_rows: int, seed: int, masks_by_label: dict[str, list[int]] | None = None
) -> list[ShardPlan]:
    """Deterministic plan: rows sorted by id (``syn-<label>-<index>``), cut into shards.
    With ``masks_by_label`` (label -> indices of its given masks), row ``i`` of a label
    gets that label's mask ``i mod M``."""
    rows = [(f"syn-{label}-{i:07d}", label, i) for label in sorted(counts) for i in range(counts[label])]
    plans = []
    for k, start in enumerate(range(0, len(rows), shard_rows)):
        chunk = rows[start : start + shard_rows]
        masks = (
            ()
            if masks_by_label is None
            else tuple(masks_by_label[r[1]][r[2] % len(masks_by_label[r[1]])] for r in chunk)
        )
        plans.append(
            ShardPlan(
                index=k,
                seed=seed * 1_000_003 + k,
                ids=tuple(r[0] for r in chunk),
                labels=tuple(r[1] for r in chunk),
                masks=masks,
            )
        )
    return plans


@dataclass(frozen=True)
class ShardBatch:
    """One generated batch of a shard: its row ids, labels and the generator's output."""

    ids: tuple[str, ...]
    labels: list[str]
    batch: GeneratedBatch


def generate_batches(
    generator: Generator, plan: ShardPlan, batch_size: int, masks: np.ndarray | None = None
) -> Iterator[ShardBatch]:
    """Generate one shard's images, ``batch_size`` at a time; row ``j`` is image ``j`` of
    ``plan.seed``'s per-image stream (``generators.seed_stream``), whatever the batch size.
    ``masks``: the given masks, uint8 (M, H, W) (volumes: (M, D, H, W)), row ``j`` getting ``masks[plan.masks[j]]``
    (None: the generator picks its own masks, if it makes any)."""
    for start in range(0, len(plan.ids), batch_size):
        ids = plan.ids[start : start + batch_size]
        labels = list(plan.labels[start : start + batch_size])
        given = None if masks is None else masks[list(plan.masks[start : start + batch_size])].astype(np.int64)
        with torch.inference_mode(), stream_offset(start):
            batch = generate_batch(generator, len(ids), plan.seed, labels, masks=given)
        yield ShardBatch(ids=ids, labels=labels, batch=batch)


def encode_batch(item: ShardBatch, source: str, seed: int, dtype: str) -> list[dict[str, Any]]:
    """Quantise a generated batch (float32 in [0, 1]) to ``dtype`` and encode its rows.

    ``subject`` column: the generator's group of each sample (``GeneratedBatch.subjects``,
    e.g. the slab of a held-out real slice served by the ``real-holdout`` control), else
    ``SYNTHETIC_SUBJECT`` (independent samples); the two-sample test groups by it."""
    images = from_unit_float(item.batch.images, dtype)
    masks = None if item.batch.masks is None else item.batch.masks.astype("uint8")
    subjects = item.batch.subjects or [SYNTHETIC_SUBJECT] * len(item.ids)
    if len(subjects) != len(item.ids):
        raise GeneratorError(
            f"{source}: expected one subject per generated sample ({len(item.ids)}), got {len(subjects)}; "
            "fix the generator's GeneratedBatch.subjects"
        )
    return [
        Row(
            id=row_id,
            subject=subjects[i],
            split="train",
            label=item.labels[i],
            image=images[i],
            source=source,
            mask=None if masks is None else masks[i],
            seed=seed,
        ).to_record()
        for i, row_id in enumerate(item.ids)
    ]


def generate_shard(
    generator: Generator, plan: ShardPlan, batch_size: int, dtype: str, masks: np.ndarray | None = None
) -> pa.Table:
    """Generate one shard's images (batched; ``masks`` as in :func:`generate_batches`) and
    encode them as dataset rows."""
    records: list[dict[str, Any]] = []
    for item in generate_batches(generator, plan, batch_size, masks):
        records.extend(encode_batch(item, generator.card.ref, plan.seed, dtype))
    return records_to_table(records)


class OrderedWorker:
    """One background thread running jobs in submission order, at most ``depth`` pending:
    ``submit`` blocks while ``depth`` jobs wait. A job's error is raised in the submitting
    thread at its next ``submit``/``drain``; on leaving the ``with`` block after an error,
    jobs not started are cancelled and the running one is waited for."""

    def __init__(self, depth: int = IO_QUEUE_DEPTH) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="synthmed-io")
        self._futures: deque[Future[Any]] = deque()
        self._depth = max(1, depth)

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        while len(self._futures) >= self._depth:
            self._futures.popleft().result()
        self._futures.append(self._pool.submit(fn, *args))

    def drain(self) -> None:
        while self._futures:
            self._futures.popleft().result()

    def __enter__(self) -> "OrderedWorker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.drain()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _take_resumed(writer: DatasetWriter, index: int) -> None:
    if not writer.resume_shard():
        raise DataError(f"internal: shard {index} was resumable but the writer did not take it; rerun the stage")


def write_overlapped(
    writer: DatasetWriter,
    generator: Generator,
    plans: Sequence[ShardPlan],
    batch_size: int,
    dtype: str,
    masks: np.ndarray | None = None,
) -> None:
    """Generate every shard on this thread; encode and write on an :class:`OrderedWorker`.
    Shards kept from an interrupted run are taken over, not made. ``masks`` as in
    :func:`generate_batches`."""
    counter = Progress("synthesize", sum(len(plan.ids) for plan in plans), "images", every_s=15.0)
    with OrderedWorker() as io:
        for plan in plans:
            if writer.is_resumable(plan.index):
                io.submit(_take_resumed, writer, plan.index)
                counter.advance(len(plan.ids))
                continue
            records: list[dict[str, Any]] = []
            for item in generate_batches(generator, plan, batch_size, masks):
                io.submit(_extend_encoded, records, item, generator.card.ref, plan.seed, dtype)
                counter.advance(len(item.batch.images))
            io.submit(_write_records, writer, records)


def _extend_encoded(records: list[dict[str, Any]], item: ShardBatch, source: str, seed: int, dtype: str) -> None:
    records.extend(encode_batch(item, source, seed, dtype))


def _write_records(writer: DatasetWriter, records: list[dict[str, Any]]) -> None:
    writer.write_table(records_to_table(records))


def iter_shards(generator: Generator, plans: list[ShardPlan], batch_size: int, dtype: str) -> Iterator[pa.Table]:
    for plan in plans:
        yield generate_shard(generator, plan, batch_size, dtype)


def generation_code_digest() -> str:
    """sha256 over the code that decides a synthetic shard's bytes: this module,
    ``tasks/runtime.py`` and the whole ``generators`` package (networks, weights, shard
    encoding). Edits elsewhere (other stages) leave interrupted shards resumable."""
    base = Path(__file__).resolve().parent.parent
    files = [
        base / "tasks" / "synthesize.py",
        base / "tasks" / "runtime.py",
        *sorted((base / "generators").rglob("*.py")),
    ]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(base).as_posix().encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def resume_key(
    generator: Generator, provenance: dict[str, Any], *, dtype: str, device: str, threads: int, compiled: bool = False
) -> str:
    """Digest of everything that fixes the shards' bytes: the card (weights sha256
    included), the plan (``provenance``: counts, seed, shard_rows, batch_size), the pixel
    dtype, device, torch threads and version, whether the network is compiled, and the
    generation code."""
    payload = {
        "card": generator.card.model_dump(mode="json"),
        "plan": provenance,
        "dtype": dtype,
        "device": device,
        "threads": threads,
        "compiled": compiled,
        "torch": torch.__version__,
        "code": generation_code_digest(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def real_train_counts(paths: PipelinePaths) -> dict[str, int]:
    """Images per class of the real ``train`` split, from a manifest checked against its
    shards (an edited ``class_counts`` that drops a class is an error, not a class never made)."""
    from tasks.stages import rewrite_hint

    counts = verify_dataset(paths.real, fix=rewrite_hint(paths.real, paths))["class_counts"].get("train", {})
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


ShardWrites = Callable[[Callable[[ShardPlan], dict[str, Any]], Sequence[ShardPlan]], Iterable[dict[str, Any]]]
"""``write_shards(maker, plans)``: the records ``maker(plan)`` of every plan (each shard
written into the writer's staging dir by whoever runs ``maker``, e.g. a Dask worker;
``tasks/remote_shards.py``), yielded in plan order."""


def _adopt_written(
    writer: DatasetWriter,
    plans: list[ShardPlan],
    maker: Callable[[ShardPlan], dict[str, Any]],
    write_shards: ShardWrites,
) -> None:
    """Count in, in plan order, the shards ``write_shards`` had written into the writer's
    staging dir. Shards kept from an interrupted run (anywhere in the plan) are not made
    again."""
    todo = [plan for plan in plans if not writer.is_resumable(plan.index)]
    made = iter(write_shards(maker, todo)) if todo else iter(())
    for _plan in plans:
        if not writer.resume_shard():
            writer.adopt_shard(next(made))


def given_masks(cfg: PipelineConfig, paths: PipelinePaths, generator: Generator, counts: dict[str, int]) -> MaskSet:
    """The masks of ``synthesis.masks_from`` for ``generator``, checked: the generator is
    mask-conditioned at ``preprocess.size`` (``preprocess.dims: 3``: a volume generator of
    the train rows' ``volume_shape()``, given masks (M, D, H, W)), and every class to make
    has a mask."""
    card = generator.card
    if not accepts_masks(generator):
        raise ConfigError(
            f"synthesis.masks_from needs a mask-conditioned generator, but {card.ref} (architecture "
            f"'{card.architecture}') is not; use pix2pix, or ddpm, vae3d or ldm3d with with_masks: true, or remove "
            "synthesis.masks_from"
        )
    size: int | tuple[int, ...] = cfg.preprocess.size
    if cfg.preprocess.dims == 3:
        size = tuple(cfg.preprocess.volume_shape())
        if card.volume_size is None or tuple(card.volume_size) != size:
            made = "2D images" if card.volume_size is None else "x".join(map(str, card.volume_size)) + " volumes"
            raise ConfigError(
                f"synthesis.masks_from: {card.ref} makes {made} but the train masks are "
                f"{'x'.join(map(str, size))} volumes (preprocess.volume_shape()); use a volume generator of that size"
            )
    elif tuple(card.image_size) != (size, size):
        raise ConfigError(
            f"synthesis.masks_from: {card.ref} makes {card.image_size[0]}x{card.image_size[1]} images but masks are "
            f"resized to preprocess.size {size}; use a generator of that size or change preprocess.size"
        )
    mask_set = load_mask_set(
        str(cfg.synthesis.masks_from), paths, size, int(generator.mask_classes), sorted(card.conditioning.labels)
    )
    available = mask_set.index_by_label()
    missing = sorted(label for label, n in counts.items() if n > 0 and label not in available)
    if missing:
        raise DataError(
            f"synthesis.masks_from {mask_set.source}: no usable mask for class(es) {missing}; add label maps under "
            f"<folder>/<label>/ or set synthesis.counts to 0 for them"
        )
    return mask_set


def synthesize(
    cfg: PipelineConfig,
    paths: PipelinePaths,
    map_shards: ShardMap | None = None,
    write_shards: ShardWrites | None = None,
) -> dict[str, Any]:
    """Generate ``requested_counts`` images per class; returns counts and the generator ref
    (and, with ``synthesis.masks_from``, the masks used and rejected).

    ``map_shards`` (optional) makes the shards elsewhere, e.g. in parallel threads, and
    hands the tables back; ``write_shards`` (optional) has them made and written by other
    processes that see this project's storage (a Dask cluster: ``flows/scaleout.py``).
    The shards' bytes depend on neither (each shard has its own seed)."""
    if map_shards is not None and write_shards is not None:
        raise ValueError("give map_shards or write_shards, not both")
    device = setup_torch(cfg, cfg.synthesis.seed)
    generator = load_generator(paths.generator / "card.yaml", device)
    counts = requested_counts(cfg, real_train_counts(paths))
    missing = sorted(set(counts) - set(generator.card.conditioning.labels))
    if missing:
        raise ConfigError(
            f"generator {generator.card.ref} cannot make class(es) {missing}; it knows "
            f"{', '.join(generator.card.conditioning.labels)}; retrain it on this dataset"
        )
    mask_set = None if cfg.synthesis.masks_from is None else given_masks(cfg, paths, generator, counts)
    masks = None if mask_set is None else mask_set.masks
    plans = plan_shards(
        counts, cfg.synthesis.shard_rows, cfg.synthesis.seed, None if mask_set is None else mask_set.index_by_label()
    )
    dtype = real_dtype(paths)
    provenance: dict[str, Any] = {
        "generator": generator.card.ref,
        "counts": counts,
        "seed": cfg.synthesis.seed,
        "shard_rows": cfg.synthesis.shard_rows,
        "batch_size": cfg.synthesis.batch_size,
    }
    masks_summary: dict[str, Any] = {}
    if mask_set is not None:
        masks_summary = {
            "masks_from": mask_set.source,
            "masks_sha256": mask_set.digest(),
            "masks_used": len(mask_set.labels),
            "masks_rejected": len(mask_set.rejects),
            "masks_rejects": list(mask_set.rejects[:MAX_REJECTS_KEPT]),
        }
        provenance.update(masks_summary)
    total = sum(counts.values())
    # volume generators generate eager: torch.compile is measured for the 2D networks only
    compiled = (
        generator.card.volume_size is None
        and should_compile(cfg.synthesis.compile, generator.card.architecture, total, cfg.synthesis.compile_min_images)
        and compile_generator(generator)
    )
    key = resume_key(generator, provenance, dtype=dtype, device=device, threads=cfg.threads, compiled=compiled)
    log.info(
        "synthesizing %d images in %d shards with %s%s",
        total,
        len(plans),
        generator.card.ref,
        " (torch.compile)" if compiled else "",
    )
    writer = DatasetWriter(paths.synthetic, shard_rows=cfg.synthesis.shard_rows, provenance=provenance, resume_key=key)
    started = time.perf_counter()
    with writer:
        if write_shards is not None:
            maker = ShardMaker(
                cfg=cfg,
                card_path=str((paths.generator / "card.yaml").resolve()),
                key=key,
                device=device,
                batch_size=cfg.synthesis.batch_size,
                dtype=dtype,
                staging=str(writer.staging.resolve()),
                compiled=compiled,
                masks=masks,
            )
            _adopt_written(writer, plans, maker, write_shards)
        elif map_shards is None:
            write_overlapped(writer, generator, plans, cfg.synthesis.batch_size, dtype, masks)
        else:
            make = partial(generate_shard, generator, batch_size=cfg.synthesis.batch_size, dtype=dtype, masks=masks)
            _write_mapped(writer, plans, make, map_shards)
    if writer.resumed:
        log.info("resumed: %d of %d shards kept from an interrupted run", writer.resumed, len(plans))
    made = sum(len(p.ids) for p in plans[writer.resumed :])
    elapsed_s = time.perf_counter() - started
    log.info("made %d images in %.1f s (%.1f images/s)", made, elapsed_s, made / max(elapsed_s, 1e-9))
    return {
        "generator": generator.card.ref,
        "counts": counts,
        "shards": len(plans),
        "resumed_shards": writer.resumed,
        "device": device,
        "compiled": compiled,
        **masks_summary,
    }
