"""TorchScript export and import of latent generators.

An exported ``model.ts`` needs torch only (no synthmed, no MONAI)::

    net = torch.jit.load("model.ts")
    images = net(latent)                 # latent (N, latent_dim) float32
    images = net(latent, label_index)    # conditional: label_index (N,) int64 into the card's labels

``images`` is float32 ``(N, C, H, W)`` in the card's value range (row-major), with one extra
channel holding the mask class index when the card has masks. The card (``card.yaml``
next to it, and a copy inside the file as ``extra/synthmed_card.json``) says which latent
distribution to draw from and what the labels are.

Loading TorchScript deserialises and runs code compiled into the file, so importing or
loading a ``torchscript`` card is refused unless the caller opts in (``allow_code=True``,
CLI ``--allow-code``).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import zipfile
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from generators.card import ModelCard, card_error, save_card
from generators.contract import GeneratedBatch
from generators.errors import GeneratorError
from generators.latent import LatentModule, latent_module, sample_latent
from generators.shards import sha256_file
from generators.weights import read_verified

log = logging.getLogger(__name__)
CARD_EXTRA = "synthmed_card.json"
SIGNATURE = (
    "forward(latent: (N, latent_dim) float32, label_index: (N,) int64 | None = None) -> (N, C, H, W) float32 "
    "in value_range; label_index indexes conditioning.labels (None: sample i gets label i % n_labels)"
)


class TorchScriptNetwork(BaseModel):
    """The ``network`` field of a ``torchscript`` card: how to call the module."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latent_distribution: Literal["normal", "uniform"] = "normal"
    conditional: bool = False
    mask_channel: bool = False
    signature: str = SIGNATURE


def torchscript_network(lm: LatentModule) -> dict[str, Any]:
    """Card ``network`` entry describing ``lm`` once scripted."""
    signature = SIGNATURE + ("; one extra output channel holds the mask class index" if lm.mask_channel else "")
    return TorchScriptNetwork(
        latent_distribution=lm.latent_distribution,
        conditional=bool(lm.labels),
        mask_channel=lm.mask_channel,
        signature=signature,
    ).model_dump(mode="json")


def script_module(lm: LatentModule) -> torch.jit.ScriptModule:
    """``torch.jit.script`` of the latent module (already-scripted modules pass through)."""
    if isinstance(lm.module, torch.jit.ScriptModule):
        return lm.module
    module = copy.deepcopy(lm.module).cpu().eval()
    module.requires_grad_(False)  # inference only: outputs are plain tensors
    try:
        return torch.jit.script(module)
    except Exception as exc:  # noqa: BLE001 - the TorchScript compiler raises many unrelated types
        raise GeneratorError(
            f"the latent module ({type(lm.module).__name__}) is not scriptable: {str(exc).splitlines()[0]}; "
            "make its forward TorchScript-compatible (typed arguments, no Python-only calls)"
        ) from None


def export_torchscript(generator: Any, out: Path | str) -> Path:
    """Write ``OUT/model.ts`` and ``OUT/card.yaml`` (architecture ``torchscript``) for a loaded
    generator; returns the ``model.ts`` path. ``OUT`` may exist but must not hold a model.ts."""
    out = Path(out)
    target = out / "model.ts"
    if target.exists():
        raise GeneratorError(f"{target}: exists; pick a new output directory")
    lm = latent_module(generator)
    data = generator.card.model_dump(mode="json")
    data.update(
        architecture="torchscript",
        network=torchscript_network(lm),
        latent_dim=lm.latent_dim,
        weights={"file": "model.ts", "sha256": None, "format": "torchscript"},
    )
    out.mkdir(parents=True, exist_ok=True)
    scripted = script_module(lm)
    card_json = json.dumps(data, sort_keys=True)
    torch.jit.save(scripted, str(target), _extra_files={CARD_EXTRA: card_json})
    data["weights"]["sha256"] = sha256_file(target)
    save_card(ModelCard.model_validate(data), out / "card.yaml")
    return target


def embedded_card(path: Path | str) -> dict[str, Any] | None:
    """The card a synthmed export stored inside a TorchScript file, read from the zip
    archive without deserialising any code; None when there is none."""
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith(f"/extra/{CARD_EXTRA}"):
                    return json.loads(archive.read(name))
    except zipfile.BadZipFile:
        raise GeneratorError(f"{path}: not a TorchScript archive (expected a zip written by torch.jit.save)") from None
    return None


def import_torchscript(
    path: Path | str, *, allow_code: bool = False, fields: dict[str, Any] | None = None
) -> ModelCard:
    """A ``torchscript`` card for the file at ``path``: the card embedded by a synthmed export,
    updated with ``fields`` (required when nothing is embedded: id, version, modality,
    anatomy, image_size, channels, licence, latent_dim, ...). The weights entry points at the
    file's name (relative to where the card will sit) with its sha256."""
    path = Path(path)
    if not allow_code:
        raise GeneratorError(
            f"{path}: a TorchScript file contains compiled code that runs when loaded; "
            "if you trust its source, re-run with allow_code=True (CLI --allow-code)"
        )
    log.warning("%s: importing TorchScript (compiled code) because allow_code was given", path)
    data = embedded_card(path) or {}
    data.update(fields or {})
    data.update(
        architecture="torchscript",
        weights={"file": path.name, "sha256": sha256_file(path), "format": "torchscript"},
    )
    data.setdefault("network", TorchScriptNetwork().model_dump(mode="json"))
    data.setdefault("origin", {"kind": "torchscript"})
    try:
        return ModelCard.model_validate(data)
    except ValidationError as exc:
        raise card_error(exc, str(path)) from None


class TorchScriptGenerator:
    """A generator loaded from a ``torchscript`` card (implements the contract). Images are
    float32 ``(N, C, H, W)`` in the card's value range; same seed -> same images, provided
    the module itself is deterministic (the conformance check tests that)."""

    def __init__(self, card: ModelCard, weights: Path, device: str = "cpu", *, allow_code: bool = False) -> None:
        if not allow_code:
            raise GeneratorError(
                f"{card.ref}: a TorchScript generator runs compiled code from its file; "
                "if you trust it, pass allow_code=True (CLI --allow-code)"
            )
        try:
            self.spec = TorchScriptNetwork.model_validate(card.network)
        except ValidationError as exc:
            raise card_error(exc, f"{card.ref} network") from None
        if card.latent_dim is None:
            raise GeneratorError(f"{card.ref}: a torchscript card needs latent_dim (the latent vector size)")
        if self.spec.conditional != bool(card.conditioning.labels):
            raise GeneratorError(
                f"{card.ref}: network.conditional must be true exactly when conditioning.labels is set"
            )
        weights_bytes = read_verified(weights, card.weights.sha256)
        log.warning("%s: loading TorchScript (compiled code) because allow_code was given", card.ref)
        self.card = card
        self.labels = list(card.conditioning.labels)
        self.device = torch.device(device)
        try:
            self.module = torch.jit.load(io.BytesIO(weights_bytes), map_location=self.device).eval()
        except RuntimeError as exc:
            raise GeneratorError(f"{weights}: not a loadable TorchScript file ({str(exc).splitlines()[0]})") from None

    def _indices(self, n: int, condition: Sequence[str] | str | None) -> list[int] | None:
        if not self.labels:
            if condition is not None:
                raise GeneratorError(
                    f"{self.card.ref}: unconditional generator; drop the condition (got {condition!r})"
                )
            return None
        if condition is None:
            return [i % len(self.labels) for i in range(n)]
        names = [condition] * n if isinstance(condition, str) else list(condition)
        unknown = sorted(set(names) - set(self.labels))
        if len(names) != n or unknown:
            raise GeneratorError(f"{self.card.ref}: expected {n} labels from {self.labels}, got {names}")
        return [self.labels.index(name) for name in names]

    @torch.inference_mode()
    def generate(self, n: int, seed: int, condition: Sequence[str] | str | None = None) -> GeneratedBatch:
        if n < 1:
            raise GeneratorError(f"expected n >= 1, got {n}")
        indices = self._indices(n, condition)
        z = sample_latent(n, int(self.card.latent_dim), self.spec.latent_distribution, seed).to(self.device)
        if indices is None:
            out = self.module(z)
        else:
            out = self.module(z, torch.tensor(indices, dtype=torch.long, device=self.device))
        if not isinstance(out, torch.Tensor) or out.ndim != 4:
            raise GeneratorError(f"{self.card.ref}: the module returned {type(out).__name__}, expected (N, C, H, W)")
        out = out.float().cpu()
        c = self.card.channels
        masks = out[:, c].round().long().numpy() if self.spec.mask_channel else None
        labels = [None] * n if indices is None else [self.labels[i] for i in indices]
        return GeneratedBatch(images=out[:, :c].numpy().astype(np.float32), masks=masks, labels=labels)

    def latent_module(self) -> LatentModule:
        return LatentModule(
            module=self.module,
            latent_dim=int(self.card.latent_dim),
            latent_distribution=self.spec.latent_distribution,
            labels=tuple(self.labels),
            image_channels=self.card.channels,
            value_range=tuple(self.card.value_range),
            mask_channel=self.spec.mask_channel,
        )


def load_torchscript_generator(
    card: ModelCard, weights: Path, device: str = "cpu", *, allow_code: bool = False
) -> TorchScriptGenerator:
    return TorchScriptGenerator(card, weights, device, allow_code=allow_code)
