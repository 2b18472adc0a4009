"""medigan-style Python API: search, rank, show, generate (to disk, as a function, as a
DataLoader), visualise, contribute (conformance-checked) and export.

    from generators import api
    api.search("hand x-ray")                       # registry entries matching every term
    api.search(["Mammography", "128x128", "DCGAN"])  # medigan's query: the same 3 models
    api.rank("fid", modality="mammography")        # by a metric, best first (order="asc"|"desc")
    api.show("mednist-gan-hand")                   # the ModelCard (also "1", "00001_DCGAN_MMG_CALC_ROI")
    api.get_config("1", "selection.performance.FID")  # dotted lookup, as medigan's get_config_by_id
    api.get_selection_values("modality")           # values of a selection key -> card counts
    api.find_and_generate("hand x-ray", 16)        # search, then generate with the one match
    api.get_generator("mednist-gan-hand").generate(16, seed=0)   # float32 (16, 1, 64, 64)
    api.get_dataloader("mednist-gan-hand", length=256, batch_size=32)
    api.visualise("mednist-gan-hand", "out/")      # samples.png, interpolation.png
    api.add_generator("card.yaml", "weights.safetensors")        # conformance check + register
    api.export("mednist-gan-hand", "bundle", "out/bundle")       # or "torchscript"
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from generators.card import ModelCard
from generators.compiled import compile_generator
from generators.contract import GeneratedBatch, Generator
from generators.errors import GeneratorError
from generators.registry import Entry, find, list_entries, load_generator
from generators.registry import search as _search
from generators.search import (
    config_value,
    matched_terms,
    metric_of,
    selection_keys,
    selection_values,
    terms_of,
)
from generators.seed_stream import generate_range
from generators.shards import Row, encode_png, from_unit_float, write_dataset


def search(
    query: str | Sequence[str] = "",
    *,
    match: str = "all",
    exact: bool = True,
    case_sensitive: bool = False,
    match_keys: bool = False,
    rank_by: str | None = None,
    order: str | None = None,
    **filters: str,
) -> list[Entry]:
    """Registry entries matching the terms of ``query`` (a string is split on whitespace; a
    list keeps each term whole) and ``field=value`` filters. Defaults are medigan's
    ``find_matching_models_by_values``: every term (``match="all"``; ``"any"`` for one),
    whole values (``exact``; False finds parts), case-insensitive; ``match_keys`` also
    matches selection keys. See :func:`generators.registry.search`."""
    return _search(
        query,
        {k: str(v) for k, v in filters.items()},
        rank_by,
        match=match,
        exact=exact,
        case_sensitive=case_sensitive,
        match_keys=match_keys,
        order=order,
    )


def rank(
    metric: str,
    query: str | Sequence[str] = "",
    *,
    order: str | None = None,
    match: str = "all",
    exact: bool = True,
    case_sensitive: bool = False,
    match_keys: bool = False,
    **filters: str,
) -> list[Entry]:
    """Matching entries ordered by ``metric`` (``order`` None: best first by the metric's
    direction; ``"asc"``/``"desc"``: by value, as medigan's ``order``; missing last)."""
    return search(
        query,
        match=match,
        exact=exact,
        case_sensitive=case_sensitive,
        match_keys=match_keys,
        rank_by=metric,
        order=order,
        **filters,
    )


def show(ref: str) -> ModelCard:
    """The card of ``id`` or ``id@version`` (or a medigan model number or id, e.g. ``"1"``)."""
    return find(ref).card


def get_config(ref: str, key: str | None = None) -> Any:
    """The card as a dict, or the value at dotted ``key`` (medigan's ``get_config_by_id``):
    card fields (``metrics.fid.value``) or a medigan card's ``global.json`` entry
    (``selection.performance.FID``). A missing key raises a one-line GeneratorError
    naming the keys there."""
    card = find(ref).card
    return card.model_dump(mode="json") if key is None else config_value(card, key)


def get_selection_keys() -> dict[str, int]:
    """Selection keys search terms are matched against -> number of cards with each."""
    return selection_keys(e.card for e in list_entries())


def get_selection_values(key: str) -> dict[str, int]:
    """Values of a selection key (dotted, e.g. ``performance.FID``) -> number of cards."""
    return selection_values(key, (e.card for e in list_entries()))


def find_and_generate(
    query: str | Sequence[str],
    n: int,
    *,
    rank_by: str | None = None,
    order: str | None = None,
    match: str = "all",
    exact: bool = True,
    case_sensitive: bool = False,
    match_keys: bool = False,
    filters: dict[str, str] | None = None,
    seed: int = 0,
    condition: str | None = None,
    output: Path | str | None = None,
    fmt: str = "parquet",
    device: str = "cpu",
    allow_code: bool = False,
) -> GeneratedBatch | Path:
    """Search, then generate ``n`` images with the best match (medigan's
    ``find_model_and_generate``; with ``rank_by`` its ``find_models_rank_and_generate``).

    The best match is the only card matching (without ``rank_by``, several equally good
    matches are an error listing them, as in medigan), or the first by ``rank_by``/``order``;
    of several versions of one id, the latest counts (as in :func:`show`).
    A best match whose weights cannot run here (a search-only medigan card) is a one-line
    GeneratorError; it is not silently replaced by a worse match. Returns the images as a
    GeneratedBatch (float32 (n, C, H, W) in the card's ``value_range``; image ``i`` is
    image ``i`` of ``seed``'s stream, as :func:`generate`), or, with ``output``, writes them
    there as :func:`generate` does and returns the path."""
    if n < 1:
        raise GeneratorError(f"expected n >= 1, got {n}")
    terms = terms_of(query)
    found = _search(
        terms,
        filters,
        rank_by,
        match=match,
        exact=exact,
        case_sensitive=case_sensitive,
        match_keys=match_keys,
        order=order,
    )
    if not found:
        raise GeneratorError(
            f"no generator matches {terms} ({match} of the terms, {'whole values' if exact else 'substrings'}); "
            "see 'synthmed generators keys' for the values, or relax with match='any' / exact=False"
        )
    latest = {e.card.id: e for e in sorted(found, key=lambda e: (e.card.id, e.card.version))}
    found = [e for e in found if latest[e.card.id] is e]  # one version per id: the one find() picks
    best = found[0]
    if rank_by and metric_of(best.card, rank_by) is None:
        raise GeneratorError(f"none of the {len(found)} matching generators has the metric '{rank_by}'")
    if not rank_by:

        def hits(entry: Entry) -> int:
            return len(
                matched_terms(entry.card, terms, exact=exact, case_sensitive=case_sensitive, match_keys=match_keys)
            )

        top = [e for e in found if hits(e) == hits(best)]
        if len(top) > 1:
            shown = ", ".join(e.card.ref for e in top[:10]) + (" ..." if len(top) > 10 else "")
            raise GeneratorError(
                f"{len(top)} generators match {terms} equally: {shown}; add terms or filters, or pick the best "
                "with rank_by (e.g. rank_by='fid')"
            )
    card = best.card
    if card.architecture == "external" or not card.available:
        raise GeneratorError(
            f"the best match {card.ref} has no runnable weights here (listed for search only); register its "
            "weights (see its card's origin) or narrow the search to runnable ones with filters={'available': 'true'}"
        )
    if output is not None:
        return generate(
            card.ref,
            n,
            seed=seed,
            condition=condition,
            output=Path(output),
            fmt=fmt,
            device=device,
            allow_code=allow_code,
        )
    return generate_range(load_generator(best, device, allow_code=allow_code), 0, n, seed, condition)


def get_generator(ref: str, device: str = "cpu", *, allow_code: bool = False, compile: bool = False) -> Generator:
    """Load a registered generator by ``id`` or ``id@version`` (sha256-checked). Models
    whose loading runs code (TorchScript) need ``allow_code=True``. ``compile``:
    ``torch.compile`` its network (worth it from ~20k images; see ``generators.compiled``)."""
    generator = load_generator(find(ref), device, allow_code=allow_code)
    if compile:
        compile_generator(generator)
    return generator


def get_generate_function(
    ref: str, device: str = "cpu", *, allow_code: bool = False, compile: bool = False
) -> Callable[..., GeneratedBatch]:
    """``fn(n, seed=0, condition=None) -> GeneratedBatch`` for a user's own code."""
    generator = get_generator(ref, device, allow_code=allow_code, compile=compile)
    return lambda n, seed=0, condition=None: generator.generate(n, seed, condition)


def visualise(ref: str, out: Path | str, *, n: int = 16, seed: int = 0, device: str = "cpu") -> dict[str, Path]:
    """Sample grid and latent interpolation PNGs of a registered generator in ``out``."""
    from generators.visualise import visualise as _visualise

    return _visualise(get_generator(ref, device), out, n=n, seed=seed)


def add_generator(card: Path | str, weights: Path | str | None = None, *, allow_code: bool = False) -> Entry:
    """Contribute a model: conformance-check it and copy it into the user registry
    (``SYNTHMED_REGISTRY`` or ~/.synthmed/generators). Raises with the failed checks."""
    from generators.conformance import register

    entry, _ = register(card, weights, allow_code=allow_code)
    return entry


def export(ref: str, fmt: str, out: Path | str, *, allow_code: bool = False) -> Path:
    """Export a registered generator as a MONAI bundle directory (``fmt="bundle"``) or a
    TorchScript file + card (``fmt="torchscript"``); returns the bundle dir or model.ts."""
    entry = find(ref)
    generator = load_generator(entry, "cpu", allow_code=allow_code)
    if fmt == "bundle":
        from generators.bundle import export_bundle

        return export_bundle(generator, out, source_dir=entry.path.parent)
    if fmt == "torchscript":
        from generators.torchscript import export_torchscript

        return export_torchscript(generator, out)
    raise GeneratorError(f"unknown export format '{fmt}'; allowed: bundle, torchscript")


def _unit(images: np.ndarray, value_range: Sequence[float]) -> np.ndarray:
    low, high = value_range
    return (images - low) / (high - low)


def file_label(label: str, limit: int = 64) -> str:
    """A class label made safe for a file name: characters other than letters, digits, '.',
    '_' and '-' become '_' (``T1/T2`` -> ``T1_T2``: no folder is created from a label),
    leading dots are dropped, at most ``limit`` characters."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", label).lstrip(".")[:limit]
    return safe or "label"


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
    allow_code: bool = False,
    compile: bool = False,
) -> Path:
    """Generate ``n`` images into a dataset (Parquet shards) or a folder of 8-bit PNGs.

    Image ``i`` (row ``gen-<i>``) is a pure function of ``(seed, i)`` (the per-image seed
    stream of ``generators.seed_stream``): ``batch_size`` only trades memory for speed, and
    the first ``m`` images of a request for ``n > m`` are the images of a request for ``m``."""
    if n < 1:
        raise GeneratorError(f"expected n >= 1, got {n}")
    generator = get_generator(ref, device, allow_code=allow_code, compile=compile)
    output = Path(output)

    def rows() -> Iterator[Row]:
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            batch = generate_range(generator, start, count, seed, condition)
            unit = _unit(batch.images, generator.card.value_range)
            for i in range(count):
                mask = None if batch.masks is None else batch.masks[i].astype(np.uint8)
                yield Row(
                    id=f"gen-{start + i:07d}",
                    subject="synthetic",
                    split="train",
                    label=batch.labels[i],
                    image=from_unit_float(unit[i], "uint8"),
                    source=generator.card.ref,
                    mask=mask,
                    seed=seed,
                )

    if fmt == "parquet":
        write_dataset(
            output, (r.to_record() for r in rows()), provenance={"generator": generator.card.ref, "seed": seed}
        )
    elif fmt == "png":
        output.mkdir(parents=True, exist_ok=True)
        for row in rows():
            label = file_label(row.label or "unconditional")
            (output / f"{row.id}_{label}.png").write_bytes(encode_png(row.image))
    else:
        raise GeneratorError(f"unknown format '{fmt}'; allowed: parquet, png")
    return output


class SyntheticDataset(torch.utils.data.IterableDataset):
    """Yields ``(image, label_index)`` pairs made on the fly: image float32 (C, H, W) in
    [0, 1]. ``length`` samples per epoch; sample ``i`` is image ``i`` of the seed stream
    (``generators.seed_stream``), whatever ``batch_size`` and however many DataLoader workers
    (worker ``w`` of ``W`` makes the batches ``b`` with ``b % W == w``; the DataLoader
    interleaves them back in order)."""

    def __init__(
        self,
        ref: str,
        length: int,
        seed: int = 0,
        batch_size: int = 64,
        device: str = "cpu",
        compile: bool = False,
        *,
        allow_code: bool = False,
    ) -> None:
        self.generator = get_generator(ref, device, allow_code=allow_code, compile=compile)
        self.length, self.seed, self.batch_size = length, seed, batch_size
        self.labels = list(self.generator.card.conditioning.labels)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for b, start in enumerate(range(0, self.length, self.batch_size)):
            if b % workers != worker:
                continue
            count = min(self.batch_size, self.length - start)
            batch = generate_range(self.generator, start, count, self.seed)
            unit = _unit(batch.images, self.generator.card.value_range)
            for i in range(count):
                label = batch.labels[i]
                yield torch.from_numpy(unit[i]), (self.labels.index(label) if label in self.labels else -1)


def get_dataloader(
    ref: str,
    length: int,
    batch_size: int = 32,
    seed: int = 0,
    device: str = "cpu",
    compile: bool = False,
    *,
    allow_code: bool = False,
) -> torch.utils.data.DataLoader:
    """A torch DataLoader of synthetic samples for a user's own training loop; sample ``i``
    of an epoch is image ``i`` of ``seed``'s stream, whatever ``batch_size``. Generators
    whose loading runs code from their files (TorchScript, medigan packages) need
    ``allow_code=True``, as in :func:`get_generator`."""
    dataset = SyntheticDataset(
        ref, length, seed, batch_size=batch_size, device=device, compile=compile, allow_code=allow_code
    )
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size)
