"""``torch.compile`` for generation: the network a loaded generator calls in ``generate``
is compiled in place (inductor, static shapes), with a fallback to eager if compiling
fails (no C++ compiler, an unsupported op), so a run never dies for speed.

Measured on the 2-core CPU at 64x64 (``generate`` images/s, compiled / eager, after a
one-off compile of 10-20 s per batch shape; later loads in the same process reuse it):
cGAN ~2.3x on the network forward pass (``benchmarks/bench_synthesis.py``), VAE 1.7x,
pix2pix 1.5x, DDPM 1.0x after a 110 s compile, so ``auto`` leaves DDPM eager. Outputs
agree with eager to float32 rounding (max abs difference ~1e-5 on [0, 1] images), so after
quantisation to uint8 a few pixels may differ by one level: the synthesis resume key
records whether the network was compiled.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

# the method(s) ``generate`` spends its time in, per architecture (default: forward)
HOT_METHODS: dict[str, tuple[str, ...]] = {"vae": ("decode",)}


class CompiledOrEager:
    """Calls ``torch.compile(fn)``; if the first compiled call raises, logs one warning
    and calls the eager ``fn`` from then on (the same arguments, so a real input error
    still raises from eager)."""

    def __init__(self, fn: Callable[..., Any], what: str) -> None:
        self.eager = fn
        self.what = what
        self.compiled: Callable[..., Any] | None = torch.compile(fn, dynamic=False)
        self.proven = False
        self.lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is None:
            return self.eager(*args, **kwargs)
        if self.proven:
            return self.compiled(*args, **kwargs)
        with self.lock:
            if self.compiled is None:
                return self.eager(*args, **kwargs)
            try:
                out = self.compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any compile failure falls back to eager
                log.warning(
                    "torch.compile of %s failed (%s: %s); generating in eager mode "
                    "(set synthesis.compile: false to skip the attempt)",
                    self.what,
                    type(exc).__name__,
                    str(exc).splitlines()[0][:200] if str(exc) else "",
                )
                self.compiled = None
                return self.eager(*args, **kwargs)
            self.proven = True
            return out


def compile_generator(generator: Any) -> bool:
    """Compile the network of ``generator`` in place; False (nothing changed) when it has
    no ``nn.Module`` to compile (e.g. a TorchScript import)."""
    module = getattr(generator, "module", None)
    if not isinstance(module, nn.Module):
        return False
    for name in HOT_METHODS.get(generator.card.architecture, ("forward",)):
        setattr(module, name, CompiledOrEager(getattr(module, name), f"{generator.card.ref}.{name}"))
    return True


# architectures whose generation ``auto`` compiles: measured faster compiled (see above)
AUTO_ARCHITECTURES = frozenset({"cgan", "dcgan", "vae", "pix2pix", "monai_bundle"})


def should_compile(setting: bool | str, architecture: str, images: int, threshold: int) -> bool:
    """``synthesis.compile``: true/false, or ``auto`` = compile when the run makes at least
    ``threshold`` images with an architecture in :data:`AUTO_ARCHITECTURES` (the one-off
    compile costs about as much as ~15k eager cGAN images on the 2-core CPU)."""
    if setting == "auto":
        return architecture in AUTO_ARCHITECTURES and images >= threshold
    return bool(setting)
