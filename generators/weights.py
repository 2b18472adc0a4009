"""Safe weight files: sha256-verified before any byte is deserialised; safetensors or
``torch.load(weights_only=True)`` only."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from generators.errors import GeneratorError, IntegrityError
from generators.shards import sha256_file


def save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> str:
    """Write a state dict as safetensors (contiguous CPU tensors); returns its sha256."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sorted(state_dict.items())}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return sha256_file(path)


def verify_sha256(path: Path, expected: str | None) -> None:
    """Raise IntegrityError unless ``path`` exists and hashes to ``expected``."""
    _check_present(path, expected)
    _check_digest(path, sha256_file(path), expected)


def read_verified(path: Path, expected: str | None) -> bytes:
    """The bytes of ``path``, read once and checked against ``expected``: what is
    deserialised is exactly what was hashed (no window to swap the file in between)."""
    _check_present(path, expected)
    data = Path(path).read_bytes()
    _check_digest(path, hashlib.sha256(data).hexdigest(), expected)
    return data


def _check_present(path: Path, expected: str | None) -> None:
    if not Path(path).is_file():
        raise GeneratorError(f"{path}: weights file not found; restore it (dvc pull) or fix the card's weights.file")
    if not expected:
        raise IntegrityError(f"{path}: the card records no sha256 for its weights; add weights.sha256 to the card")


def _check_digest(path: Path, actual: str, expected: str) -> None:
    if actual != expected:
        raise IntegrityError(
            f"{path}: sha256 {actual[:12]}... does not match the card's {expected[:12]}...; "
            "the file is corrupt or was replaced: restore the original or re-register the model"
        )


def load_weights(path: Path, expected_sha256: str | None, fmt: str = "safetensors") -> dict[str, torch.Tensor]:
    """Verify then load a state dict. ``fmt``: ``safetensors`` or ``torch`` (weights_only)."""
    if fmt not in ("safetensors", "torch"):
        raise GeneratorError(f"unknown weights format '{fmt}'; allowed: safetensors, torch")
    data = read_verified(path, expected_sha256)
    if fmt == "safetensors":
        try:
            return load_safetensors_bytes(data)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise GeneratorError(f"{path}: not a readable safetensors file ({exc}); restore the original") from None
    if fmt == "torch":
        try:
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises bare Exception/UnpicklingError variants
            raise GeneratorError(
                f"{path}: not a plain tensor checkpoint ({type(exc).__name__}); refusing to unpickle code"
            ) from None
        if isinstance(loaded, dict) and "model" in loaded and isinstance(loaded["model"], dict):
            loaded = loaded["model"]
        if not isinstance(loaded, dict):
            raise GeneratorError(f"{path}: expected a state dict, got {type(loaded).__name__}")
        return loaded
    raise GeneratorError(f"unknown weights format '{fmt}'; allowed: safetensors, torch")


def _listed(items: list[str], most: int = 4, width: int = 60) -> str:
    """``a, b, c, ... (+N more)``: at most ``most`` items, each cut to ``width`` characters."""
    shown = [item if len(item) <= width else item[: width - 3] + "..." for item in items[:most]]
    return ", ".join(shown) + (f", ... (+{len(items) - most} more)" if len(items) > most else "")


def state_mismatch(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> str:
    """One line naming what keeps ``state`` from loading strictly into ``module``: missing
    and unexpected keys and tensors whose shapes differ (at most four of each, then a count);
    ``""`` when it fits."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{key} {list(state[key].shape)} in the file, {list(expected[key].shape)} in the network"
        for key in sorted(set(state) & set(expected))
        if isinstance(state[key], torch.Tensor) and state[key].shape != expected[key].shape
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_listed(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_listed(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es): {_listed(shapes, most=3, width=120)}")
    return "; ".join(parts)


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``module.load_state_dict(state, strict=True)``, but a mismatch raises a one-line
    GeneratorError naming ``what`` (e.g. the card ref), the missing and unexpected keys and
    the mismatching shapes, instead of torch's multi-line "Error(s) in loading state_dict"."""
    problem = state_mismatch(module, state)
    if problem:
        raise GeneratorError(
            f"{what}: the weights do not fit the network ({problem}); the card's network settings and the weights "
            "disagree: fix card.network or use the weights trained with these settings"
        )
    module.load_state_dict(state, strict=True)
