"""TorchScript export and import of latent generators.

An exported ``model.ts`` needs torch only (no synthmed, no MONAI)::

    net = torch.jit.load("model.ts")
    images = net(latent)                 # latent (N, latent_dim) float32
    images = net(latent, label_index)    # conditional: label_index (N,) int64 into the card's labels

``images`` is float32 ``(N, C, H, W)`` in the card's value range (row-major), with one extra
channel holding the mask class index when the card has masks. The card (``card.yaml``
next to it, and a copy inside the file as ``extra/synthmed_card.json``) says which latent
distribution to draw from and what the labels are; ``network.latent_shape`` gives the
per-image latent shape of diffusion models (their initial noise ``[C, h, w]``), whose
module holds the network(s) and the sampling loop (``generators.diffusion_export``);
``network.mask_input`` marks pix2pix's ``module(latent, label_index, masks)``.

To reproduce ``generate(n, seed)`` draw image ``i``'s latent from the seed stream
(``generators.seed_stream``), with numpy only::

    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, i, 0])))
    latent_i = rng.standard_normal(latent_shape, dtype=np.float32)   # .random(...) for uniform
    label_index_i = i % n_labels

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
from generators.labels import label_indices
from generators.latent import LatentModule, latent_module, sample_latent
from generators.seed_stream import stream_normal
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
    #: per-image latent shape when it is not ``(latent_dim,)``: diffusion noise ``[C, h, w]``
    latent_shape: list[int] | None = None
    #: the module takes ``masks`` (N, H, W) int64 as a third argument and holds a mask pool
    #: (``mask_pool_masks``, ``mask_pool_labels``; see ``generators.diffusion_export``)
    mask_input: bool = False
    signature: str = SIGNATURE


def torchscript_network(lm: LatentModule) -> dict[str, Any]:
    """Card ``network`` entry describing ``lm`` once scripted."""
    mask_input = hasattr(lm.module, "mask_pool_masks")
    signature = SIGNATURE
    if lm.latent_shape:
        signature = signature.replace("(N, latent_dim)", f"(N, {', '.join(map(str, lm.latent_shape))})")
    if mask_input:
        signature += "; masks: (N, H, W) int64 (third argument), drawn from the module's mask pool"
    if lm.mask_channel:
        signature += "; one extra output channel holds the mask class index"
    return TorchScriptNetwork(
        latent_distribution=lm.latent_distribution,
        conditional=bool(lm.labels),
        mask_channel=lm.mask_channel,
        latent_shape=list(lm.latent_shape) or None,
        mask_input=mask_input,
        signature=signature,
    ).model_dump(mode="json", exclude_defaults=False)


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
        return label_indices(self.labels, n, condition, self.card.ref, unconditional_ok=True)

    @property
    def mask_conditioned(self) -> bool:
        """True for a module with a mask input (``generators.contract.MaskConditionedGenerator``)."""
        return self.spec.mask_input

    @property
    def mask_classes(self) -> int:
        return len(self.card.conditioning.mask_classes)

    def latent(self, n: int, seed: int) -> torch.Tensor:
        """The module's first input for images ``start .. start+n-1`` of ``seed``'s stream
        (``generators.seed_stream``): float32 ``(n, *latent_shape)``."""
        shape = tuple(self.spec.latent_shape or (int(self.card.latent_dim),))
        if len(shape) == 1:
            return sample_latent(n, shape[0], self.spec.latent_distribution, seed)
        return stream_normal((n, *shape), seed, distribution=self.spec.latent_distribution)

    def _masks(self, indices: list[int] | None, seed: int, masks: np.ndarray | None) -> np.ndarray:
        from generators.architectures.mask_pool import MaskPool, check_masks

        n = 0 if indices is None else len(indices)
        if masks is not None:
            return check_masks(self.card, masks, self.mask_classes, n)
        pool = MaskPool(
            self.module.mask_pool_masks.cpu().numpy().astype(np.int64), self.module.mask_pool_labels.cpu().numpy()
        )
        return pool.draw(self.card, indices or [], seed)

    @torch.inference_mode()
    def generate(
        self, n: int, seed: int, condition: Sequence[str] | str | None = None, masks: np.ndarray | None = None
    ) -> GeneratedBatch:
        """``n`` samples from images ``start .. start+n-1`` of the seed stream; ``masks``
        int (N, H, W) only for a module with a mask input (else drawn from its pool)."""
        if n < 1:
            raise GeneratorError(f"expected n >= 1, got {n}")
        if masks is not None and not self.spec.mask_input:
            raise GeneratorError(f"{self.card.ref}: this TorchScript module takes no masks; drop masks=")
        indices = self._indices(n, condition)
        z = self.latent(n, seed).to(self.device)
        if self.spec.mask_input:
            given = torch.from_numpy(self._masks(indices, seed, masks)).to(self.device)
            index = torch.tensor(indices or [0] * n, dtype=torch.long, device=self.device)
            out = self.module(z, index, given)
        elif indices is None:
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
            latent_shape=tuple(self.spec.latent_shape or ()),
        )


def load_torchscript_generator(
    card: ModelCard, weights: Path, device: str = "cpu", *, allow_code: bool = False
) -> TorchScriptGenerator:
    return TorchScriptGenerator(card, weights, device, allow_code=allow_code)
