"""Split assignment of ingest: whole split groups (subjects, or slabs of slices) go to
one split, stratified by label, deterministic in the seed and the group ids only."""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from typing import Iterable

from generators.shards import SPLITS


def allocate_groups(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """How many of ``n`` groups each split gets: largest-remainder rounding, then at
    least one group per split with a positive fraction when ``n`` allows; with fewer
    groups than such splits, train is filled first, then test, then val."""
    positive = [s for s in ("train", "test", "val") if fractions[s] > 0]
    if n <= len(positive):
        return {s: int(s in positive[:n]) for s in SPLITS}
    raw = {s: round(fractions[s] * n, 9) for s in SPLITS}
    counts = {s: math.floor(raw[s]) for s in SPLITS}
    by_remainder = sorted(SPLITS, key=lambda s: (-(raw[s] - counts[s]), SPLITS.index(s)))
    for s in by_remainder[: n - sum(counts.values())]:
        counts[s] += 1
    for s in positive:
        if counts[s] == 0:
            donor = max(positive, key=lambda d: (counts[d], -positive.index(d)))
            counts[donor] -= 1
            counts[s] += 1
    return counts


def assign_splits(group_labels: dict[str, list[str]], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """``{group: split}``, stratified by each group's majority label (ties: the smallest
    label). Within a stratum groups are ordered by sha256 of ``seed``/label/group, so the
    result depends only on the seed and the group ids, never on input order."""
    strata: dict[str, list[str]] = {}
    for group in sorted(group_labels):
        counts = Counter(group_labels[group])
        majority = min(counts, key=lambda label: (-counts[label], label))
        strata.setdefault(majority, []).append(group)
    assignment: dict[str, str] = {}
    for label in sorted(strata):
        groups = sorted(strata[label], key=lambda g: hashlib.sha256(f"{seed}\x00{label}\x00{g}".encode()).hexdigest())
        start = 0
        for split, count in allocate_groups(len(groups), fractions).items():
            for group in groups[start : start + count]:
                assignment[group] = split
            start += count
    return assignment


def split_notes(rows: Iterable[tuple[str, str]], splits: dict[str, str], fractions: dict[str, float]) -> list[str]:
    """One line per class that has no rows in some split with a positive fraction (too
    few subjects or slabs of that class to honour the split); empty when all is well.
    ``rows``: ``(label, group)`` per ingested row; ``splits``: ``{group: split}``."""
    seen: dict[str, set[str]] = {}
    groups: dict[str, set[str]] = {}
    for label, group in rows:
        seen.setdefault(label, set()).add(splits[group])
        groups.setdefault(label, set()).add(group)
    notes = []
    for label in sorted(seen):
        missing = [s for s in SPLITS if fractions[s] > 0 and s not in seen[label]]
        if missing:
            notes.append(
                f"class {label!r} has {len(groups[label])} split group(s) (subjects or slabs) and no rows in "
                f"{', '.join(missing)}; add subjects of this class or set preprocess.split.slab_slices"
            )
    return notes
