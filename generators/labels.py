"""Conditioning labels -> label indices: the one rule every architecture shares.

``label_indices(labels, n, condition, ref)`` returns one index into ``labels`` per sample
(a ``list[int]`` of length ``n``):

* ``condition=None`` cycles through the labels: sample ``i`` gets label ``i % len(labels)``
  (what exported bundles and TorchScript modules do when given no label);
* a string applies to every sample; a sequence gives one label per sample.

A generator without labels returns ``None`` when ``unconditional_ok`` (and refuses a
condition); otherwise having no labels is an error. The network then sees the index as
``one_hot(index, len(labels))`` (float32, ``(N, L)``), appended to the latent or used as a
class embedding, depending on the architecture.
"""

from __future__ import annotations

from typing import Sequence

from generators.errors import GeneratorError


def label_indices(
    labels: Sequence[str],
    n: int,
    condition: Sequence[str] | str | None,
    ref: str,
    *,
    unconditional_ok: bool = False,
) -> list[int] | None:
    """Indices into ``labels`` for ``n`` samples (see the module docstring); ``ref`` names
    the generator in the one-line errors."""
    labels = list(labels)
    if not labels:
        if not unconditional_ok:
            raise GeneratorError(f"{ref}: the card lists no conditioning labels; add conditioning.labels")
        if condition is not None:
            raise GeneratorError(f"{ref}: unconditional generator; drop the condition (got {condition!r})")
        return None
    if condition is None:
        return [i % len(labels) for i in range(n)]
    names = [condition] * n if isinstance(condition, str) else list(condition)
    if len(names) != n:
        raise GeneratorError(f"{ref}: expected {n} conditioning labels, got {len(names)}")
    unknown = sorted(set(names) - set(labels))
    if unknown:
        raise GeneratorError(f"{ref}: unknown label(s) {unknown}; allowed: {', '.join(labels)}")
    return [labels.index(name) for name in names]
