"""Architectures contributed by installed packages: the ``synthmed.architectures`` entry-point group.

A contributor's package declares its architecture in its ``pyproject.toml``::

    [project.entry-points."synthmed.architectures"]
    tinymlp = "synthmed_tinymlp:ARCHITECTURE"

and cards then say ``architecture: tinymlp``. The entry point names an object (or a
zero-argument callable, e.g. a class, returning one) with either

``build(network: dict) -> torch.nn.Module``
    the network from the card's ``network`` mapping (untrained; synthmed loads the weights);
``generate(module, latent, label_index) -> torch.Tensor``
    ``latent`` float32 ``(N, *latent_shape)`` on the module's device, drawn by synthmed from
    the per-image seed stream (``generators.seed_stream``); ``label_index`` int64 ``(N,)``
    indices into the card's ``conditioning.labels`` (None for an unconditional card);
    returns float32 ``(N, C, H, W)`` within the card's ``value_range``;
``latent_shape(network: dict) -> tuple[int, ...]`` (optional)
    the per-image latent shape; default ``(card.latent_dim,)``;
``latent_distribution`` (optional attribute)
    ``"normal"`` (default) or ``"uniform"``;

or, for full control (own sampling loop, masks), ``load(card, weights_path, device) ->
generators.contract.Generator``, the signature of ``generators.architectures.LOADERS``.

With ``build``/``generate``, synthmed verifies the weights' sha256, reads them safely
(safetensors, or ``torch.load(weights_only=True)``), loads them strictly (a mismatch names
the missing and unexpected keys and the shapes), and draws latents and labels, so the
conformance check's determinism and seed-stream checks hold by construction.

Trust: loading an architecture imports the package's code into the synthmed process.
Installing the package (``pip install``) is the trust decision, as for any Python
dependency; ``--allow-code`` is not asked for. A name that clashes with a built-in
architecture, or that two installed packages both claim, is refused (one-line
GeneratorError) instead of silently picking one.
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from generators.card import ARCHITECTURES, ModelCard
from generators.contract import GeneratedBatch, Generator
from generators.errors import GeneratorError
from generators.seed_stream import stream_normal

log = logging.getLogger(__name__)
GROUP = "synthmed.architectures"
Loader = Callable[[ModelCard, Path | None, str], Generator]


def builtin_names() -> set[str]:
    """Architecture names synthmed itself defines (never overridden by a package)."""
    try:
        from generators.architectures import LOADERS
    except ImportError:
        return set(ARCHITECTURES)
    return {*ARCHITECTURES, *LOADERS}


def _package(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "an unknown package"


def discover(*, strict: bool = True) -> dict[str, importlib.metadata.EntryPoint]:
    """Entry points of the ``synthmed.architectures`` group by name (nothing is imported).
    ``strict``: a name that clashes with a built-in or that two packages claim raises a
    one-line GeneratorError; otherwise such names are left out with a warning."""
    builtins = builtin_names()
    found: dict[str, importlib.metadata.EntryPoint] = {}
    clashes: set[str] = set()
    for ep in importlib.metadata.entry_points(group=GROUP):
        if ep.name in builtins:
            problem = (
                f"architecture '{ep.name}' of the installed package {_package(ep)} (entry point {ep.value}) clashes "
                f"with synthmed's built-in '{ep.name}'; rename the entry point in that package's pyproject.toml "
                "(group synthmed.architectures) or uninstall it"
            )
        elif ep.name in found and found[ep.name].value != ep.value:
            problem = (
                f"architecture '{ep.name}' is declared by two installed packages ({_package(found[ep.name])}: "
                f"{found[ep.name].value}; {_package(ep)}: {ep.value}); uninstall one of them or rename its entry point"
            )
        else:
            found[ep.name] = ep
            continue
        if strict:
            raise GeneratorError(problem)
        log.warning("ignoring a contributed architecture: %s", problem)
        clashes.add(ep.name)
    return {name: ep for name, ep in found.items() if name not in clashes}


def plugin_names() -> tuple[str, ...]:
    """Names of the usable contributed architectures (clashing ones left out), sorted."""
    return tuple(sorted(discover(strict=False)))


def plugin_loaders() -> dict[str, Loader]:
    """name -> ``loader(card, weights_path, device)`` for every contributed architecture;
    the package is imported only when its loader is called. Raises on a name clash."""
    return {name: _lazy_loader(ep) for name, ep in discover(strict=True).items()}


def _lazy_loader(ep: importlib.metadata.EntryPoint) -> Loader:
    def load(card: ModelCard, weights: Path | None, device: str = "cpu") -> Generator:
        return load_plugin_generator(resolve(ep), card, weights, device)

    load.__name__ = f"load_{ep.name}"
    return load


def resolve(ep: importlib.metadata.EntryPoint) -> Any:
    """Import the entry point's object (calling it when it is a factory) and check it
    provides ``load`` or ``build`` + ``generate``."""
    try:
        target = ep.load()
    except Exception as exc:  # noqa: BLE001 - third-party import errors of any type
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise GeneratorError(
            f"architecture '{ep.name}' ({_package(ep)}): importing {ep.value} failed ({type(exc).__name__}: "
            f"{first}); reinstall the package or fix its entry point"
        ) from None
    if not _provides(target) and callable(target):
        target = target()
    if not _provides(target):
        raise GeneratorError(
            f"architecture '{ep.name}' ({_package(ep)}): {ep.value} provides neither build() and generate() nor "
            "load(); see generators/plugins.py for the protocol"
        )
    return target


def _provides(obj: Any) -> bool:
    return callable(getattr(obj, "load", None)) or (
        callable(getattr(obj, "build", None)) and callable(getattr(obj, "generate", None))
    )


def load_plugin_generator(plugin: Any, card: ModelCard, weights: Path | None, device: str = "cpu") -> Generator:
    """A loaded generator for ``card`` from a resolved plugin object (see the module docstring)."""
    if callable(getattr(plugin, "load", None)):
        return plugin.load(card, weights, device)
    return PluginGenerator(plugin, card, weights, device)


class PluginGenerator:
    """A contributed ``build``/``generate`` architecture as a ``generators.contract.Generator``:
    images float32 ``(N, C, H, W)`` in the card's value range, image ``i`` a function of
    ``(seed, i)`` only."""

    def __init__(self, plugin: Any, card: ModelCard, weights: Path | None, device: str = "cpu") -> None:
        from generators.architectures import load_state
        from generators.weights import load_state_strict

        self.plugin, self.card, self.device = plugin, card, torch.device(device)
        state = load_state(card, weights)  # sha256 first, then a safe read
        try:
            module = plugin.build(dict(card.network))
        except (TypeError, ValueError, KeyError) as exc:
            raise GeneratorError(
                f"{card.ref}: architecture '{card.architecture}' could not build its network from the card's network "
                f"{dict(card.network)} ({type(exc).__name__}: {exc}); fix card.network"
            ) from None
        if not isinstance(module, torch.nn.Module):
            raise GeneratorError(
                f"{card.ref}: architecture '{card.architecture}'.build returned {type(module).__name__}, "
                "expected a torch.nn.Module"
            )
        load_state_strict(module, state, card.ref)
        self.module = module.to(self.device).eval()
        shape_of = getattr(plugin, "latent_shape", None)
        if callable(shape_of):
            self.latent_shape = tuple(int(s) for s in shape_of(dict(card.network)))
        elif card.latent_dim:
            self.latent_shape = (int(card.latent_dim),)
        else:
            raise GeneratorError(
                f"{card.ref}: architecture '{card.architecture}' needs the card's latent_dim (or the plugin's "
                "latent_shape()); set latent_dim"
            )
        self.distribution = getattr(plugin, "latent_distribution", "normal")

    @torch.inference_mode()
    def generate(self, n: int, seed: int, condition: Sequence[str] | str | None = None) -> GeneratedBatch:
        """``n`` images float32 ``(n, C, H, W)``; conditional cards cycle labels when ``condition`` is None."""
        from generators.architectures import label_indices

        latent = stream_normal((n, *self.latent_shape), seed, distribution=self.distribution).to(self.device)
        if self.card.conditioning.labels:
            index = label_indices(self.card, n, condition)
            labels: list[str | None] = [self.card.conditioning.labels[i] for i in index]
            label_index = torch.tensor(index, dtype=torch.int64, device=self.device)
        elif condition is not None:
            raise GeneratorError(f"{self.card.ref}: unconditional (no conditioning.labels); generate with no condition")
        else:
            labels, label_index = [None] * n, None
        images = self.plugin.generate(self.module, latent, label_index)
        if not isinstance(images, torch.Tensor):
            raise GeneratorError(
                f"{self.card.ref}: architecture '{self.card.architecture}'.generate returned "
                f"{type(images).__name__}, expected a float32 tensor (N, C, H, W)"
            )
        return GeneratedBatch(
            images=images.detach().float().cpu().numpy().astype(np.float32), masks=None, labels=labels
        )
