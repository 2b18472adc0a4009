"""MONAI bundles at run time: a ``monai_bundle`` card loads as a ``BundleGenerator``.

A network written as a ``_target_`` from ``KNOWN_NETWORKS`` with literal arguments is built
directly (``monai.networks.nets.Generator``) and its weights load with
``torch.load(weights_only=True)`` after the sha256 check. A network that can only be built
by running the bundle config (``network.config``) executes code: refused unless the caller
opts in with ``allow_code=True`` (CLI ``--allow-code``), and then with a warning every time.

Image orientation: MONAI's image readers put the first spatial axis along x, so a network
trained in a bundle emits ``(C, x, y)``; ``spatial_order: monai`` transposes its output to
synthmed's row-major ``(C, H, W)``.

Import (``generators.bundle_import``) and export (``generators.bundle_export``) live apart.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from generators.card import ModelCard, card_error
from generators.contract import GeneratedBatch
from generators.errors import GeneratorError
from generators.labels import label_indices
from generators.latent import LatentModule, MonaiGeneratorModule, sample_latent
from generators.weights import load_state_strict, load_weights, verify_sha256

log = logging.getLogger(__name__)

KNOWN_NETWORKS = ("Generator", "monai.networks.nets.Generator", "monai.networks.nets.generator.Generator")
CODE_WARNING = (
    "running a MONAI bundle config executes the Python code it contains ('$' expressions, "
    "'_target_' imports); do this only for bundles from a source you trust"
)
#: architectures that export as model-zoo diffusion bundles (``generators.diffusion_bundle``)
DIFFUSION_ARCHITECTURES = ("ddpm", "ldm")


class BundleNetwork(BaseModel):
    """The ``network`` field of a ``monai_bundle`` card: either ``target`` + literal
    ``kwargs`` (built without running code) or ``config`` + ``network_key`` (built by running
    the bundle config: needs ``allow_code``). The rest says how to read the output."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str | None = None
    kwargs: dict[str, Any] = {}
    config: str | None = None
    network_key: str = "network_def"
    activation: Literal["sigmoid", "tanh", "none"] = "sigmoid"
    spatial_order: Literal["monai", "row_major"] = "monai"
    latent_distribution: Literal["normal", "uniform"] = "normal"
    n_labels: int = 0
    mask_classes: int = 0

    @model_validator(mode="after")
    def _one_source(self) -> BundleNetwork:
        if (self.target is None) == (self.config is None):
            raise ValueError("give either network.target (+ kwargs) or network.config (+ network_key), not both")
        if self.target is not None and self.target not in KNOWN_NETWORKS:
            raise ValueError(
                f"network.target '{self.target}' is not a known MONAI generator ({', '.join(KNOWN_NETWORKS)})"
            )
        return self

    @property
    def requires_code(self) -> bool:
        return self.config is not None


def _build_network(card: ModelCard, spec: BundleNetwork, card_dir: Path | None, allow_code: bool) -> torch.nn.Module:
    if not spec.requires_code:
        from monai.networks.nets import Generator

        return Generator(**spec.kwargs)
    if not allow_code:
        raise GeneratorError(
            f"{card.ref}: this bundle's network is built by running its config, which executes code; "
            "if you trust it, pass allow_code=True (CLI --allow-code)"
        )
    if card_dir is None:
        raise GeneratorError(f"{card.ref}: a config-built bundle needs its directory; load it through the registry")
    from monai.bundle import ConfigParser

    log.warning("%s: %s", card.ref, CODE_WARNING)
    parser = ConfigParser()
    parser.read_config(str(card_dir / str(spec.config)))
    parser["bundle_root"] = str(card_dir)
    net = parser.get_parsed_content(spec.network_key)
    if not isinstance(net, torch.nn.Module):
        raise GeneratorError(f"{card.ref}: config id '{spec.network_key}' built a {type(net).__name__}, not a network")
    return net


class BundleGenerator:
    """A MONAI-network generator loaded from a ``monai_bundle`` card (implements the
    ``generators.contract.Generator`` protocol). ``generate`` returns float32 images
    ``(N, C, H, W)`` in the card's value range; the same seed gives the same images."""

    def __init__(
        self,
        card: ModelCard,
        weights: Path,
        device: str = "cpu",
        *,
        allow_code: bool = False,
        card_dir: Path | None = None,
    ) -> None:
        if card.architecture != "monai_bundle":
            raise GeneratorError(f"{card.ref}: expected a monai_bundle card, got '{card.architecture}'")
        try:
            self.spec = BundleNetwork.model_validate(card.network)
        except ValidationError as exc:
            raise card_error(exc, f"{card.ref} network") from None
        if card.latent_dim is None:
            raise GeneratorError(f"{card.ref}: the card needs latent_dim (the size of the latent vector)")
        n_labels = len(card.conditioning.labels)
        if n_labels != self.spec.n_labels:
            raise GeneratorError(
                f"{card.ref}: card lists {n_labels} labels but network.n_labels is {self.spec.n_labels}; make them agree"
            )
        self.card = card
        self.labels = list(card.conditioning.labels)
        self.device = torch.device(device)
        verify_sha256(weights, card.weights.sha256)  # before the config (maybe code) is touched
        net = _build_network(card, self.spec, card_dir, allow_code)
        state = load_weights(weights, card.weights.sha256, "torch")
        load_state_strict(net, state, card.ref)  # one line naming the keys and shapes that differ
        self.module = MonaiGeneratorModule(
            net,
            card.channels,
            self.spec.n_labels,
            self.spec.mask_classes,
            self.spec.activation,
            self.spec.spatial_order,
            card.value_range,
        )
        self.module.to(self.device).eval()

    @torch.inference_mode()
    def generate(self, n: int, seed: int, condition: Sequence[str] | str | None = None) -> GeneratedBatch:
        """``n`` samples: float32 ``(N, C, H, W)`` in the card's value range; masks int64
        ``(N, H, W)`` when the card has mask classes."""
        if n < 1:
            raise GeneratorError(f"expected n >= 1, got {n}")
        indices = label_indices(self.labels, n, condition, self.card.ref, unconditional_ok=True)
        z = sample_latent(n, int(self.card.latent_dim), self.spec.latent_distribution, seed).to(self.device)
        index = None if indices is None else torch.tensor(indices, dtype=torch.long, device=self.device)
        out = self.module(z, index).float().cpu()
        channels = self.card.channels
        masks = out[:, channels].round().long().numpy() if self.spec.mask_classes else None
        labels = [None] * n if indices is None else [self.labels[i] for i in indices]
        return GeneratedBatch(images=out[:, :channels].numpy().astype(np.float32), masks=masks, labels=labels)

    def latent_module(self) -> LatentModule:
        """This generator in pure-torch form (for export and latent-space visualisation)."""
        from generators.latent import MonaiNetwork

        monai = None
        if not self.spec.requires_code:
            state = {k: v.detach().cpu() for k, v in self.module.net.state_dict().items()}
            monai = MonaiNetwork("Generator", dict(self.spec.kwargs), state)
        return LatentModule(
            module=self.module,
            latent_dim=int(self.card.latent_dim),
            latent_distribution=self.spec.latent_distribution,
            labels=tuple(self.labels),
            image_channels=self.card.channels,
            value_range=tuple(self.card.value_range),
            mask_channel=self.spec.mask_classes > 0,
            activation=self.spec.activation,
            spatial_order=self.spec.spatial_order,
            monai=monai,
        )


def load_bundle_generator(
    card: ModelCard, weights: Path, device: str = "cpu", *, allow_code: bool = False, card_dir: Path | None = None
) -> BundleGenerator:
    """Build a ``BundleGenerator``; ``card_dir`` (the card's directory) is where a
    config-built network's config is read from."""
    return BundleGenerator(card, weights, device, allow_code=allow_code, card_dir=card_dir)
