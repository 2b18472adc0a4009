"""Tiny seeded generators of every architecture, as card + weights in a directory (a
registry entry): 16x16 grey images, 2 labels where the architecture is conditional, a
few diffusion steps. Untrained (random weights): the tests check plumbing, not quality."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from generators.card import ModelCard, Weights, save_card
from generators.weights import save_weights

LABELS = ("healthy", "lesion")
SIZE = 16
#: every (architecture, style) make_tiny builds: each trainable architecture and variant
VARIANTS = [
    ("cgan", "mednist"),
    ("cgan", "upsample"),
    ("dcgan", "mednist"),
    ("vae", "mednist"),
    ("ddpm", "mednist"),
    ("ddpm", "masks"),
    ("pix2pix", "mednist"),
    ("ldm", "rflow"),
]


def _mask_pool() -> dict[str, torch.Tensor]:
    """Six random 2-class masks, three per label, as stored with a mask-conditioned model."""
    rng = np.random.default_rng(0)
    return {
        "mask_pool.masks": torch.from_numpy(rng.integers(0, 2, (6, SIZE, SIZE)).astype(np.uint8)),
        "mask_pool.labels": torch.tensor([0, 1, 0, 1, 0, 1]),
    }


def _network(architecture: str, style: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], tuple[str, ...], int]:
    """(network field, state dict, labels, mask classes) of a tiny seeded network."""
    if architecture == "cgan":
        from generators.architectures.cgan import CganConfig, ConditionalGenerator, network_kwargs

        cfg = CganConfig(SIZE, 1, 2, latent_dim=8, base_channels=8, style=style)
        return network_kwargs(cfg), ConditionalGenerator(cfg).state_dict(), LABELS, 0
    if architecture == "dcgan":
        from generators.architectures.dcgan import DcganConfig, build_generator

        cfg = DcganConfig(SIZE, 1, latent_dim=8, base_channels=8)
        return asdict(cfg), build_generator(cfg).state_dict(), (), 0
    if architecture == "vae":
        from generators.architectures.vae import ConditionalVae, VaeConfig

        cfg = VaeConfig(SIZE, 1, 2, latent_dim=8, base_channels=8)
        return asdict(cfg), ConditionalVae(cfg).state_dict(), LABELS, 0
    if architecture == "ddpm":
        from generators.architectures.ddpm import DdpmConfig, build_unet

        masks = 2 if style == "masks" else 0  # style "masks": mask-conditioned, with a mask pool
        cfg = DdpmConfig(SIZE, 1, 2, (8, 8), (False, True), timesteps=20, ddim_steps=3, mask_classes=masks)
        network = asdict(cfg)
        network["unet_channels"], network["attention_levels"] = [8, 8], [False, True]
        state = dict(build_unet(cfg).state_dict())
        if masks:
            state.update(_mask_pool())
        return network, state, LABELS, masks
    if architecture == "pix2pix":
        from generators.architectures.pix2pix import Pix2pixConfig, build_generator

        cfg = Pix2pixConfig(SIZE, 1, 2, mask_classes=2, base_channels=8)
        return asdict(cfg), {**build_generator(cfg).state_dict(), **_mask_pool()}, LABELS, 2
    if architecture == "ldm":
        from generators.architectures.ldm import LdmConfig, LdmSampler

        cfg = LdmConfig(
            SIZE, 1, 2, (8, 8), 1, (8, 8), (False, True), num_res_blocks=1, sampler=style, timesteps=20, sample_steps=3
        )
        return cfg.network(), LdmSampler(cfg).state_dict(), LABELS, 0
    raise ValueError(f"no tiny model for architecture '{architecture}'")


def make_tiny(directory: Path, architecture: str, *, style: str = "mednist", seed: int = 0) -> Path:
    """Write ``directory/card.yaml`` + weights of a tiny ``architecture`` model; returns the card path."""
    torch.manual_seed(seed)
    network, state, labels, mask_classes = _network(architecture, style)
    directory.mkdir(parents=True, exist_ok=True)
    sha = save_weights({k: v.contiguous() for k, v in state.items()}, directory / "weights.safetensors")
    suffix = f"-{style}" if style != "mednist" or architecture == "cgan" else ""
    card = ModelCard(
        id=f"tiny/{architecture}{suffix}",
        version="1.0.0",
        architecture=architecture,
        network=network,
        modality="MRI",
        anatomy="brain",
        image_size=(SIZE, SIZE),
        channels=1,
        licence="MIT",
        latent_dim=8 if architecture in ("cgan", "dcgan", "vae") else None,
        conditioning={
            "labels": labels,
            "masks": mask_classes > 0,
            "mask_classes": ("background", "lesion")[:mask_classes],
        },
        weights=Weights(file="weights.safetensors", sha256=sha),
    )
    save_card(card, directory / "card.yaml")
    return directory / "card.yaml"


def tiny_cgan_card(
    directory: Path,
    *,
    card_id: str = "t/cgan",
    labels: tuple[str, ...] = LABELS,
    masks: int = 0,
    seed: int = 0,
    weights: bool = True,
    tags: tuple[str, ...] = (),
) -> ModelCard:
    """A tiny seeded 16x16 conditional GAN (``masks`` mask classes, 0 = none) saved as
    ``directory/card.yaml`` (+ ``weights.safetensors`` unless ``weights`` is False, a card
    with no runnable weights); returns the card."""
    from generators.architectures.cgan import CganConfig, ConditionalGenerator

    torch.manual_seed(seed)
    cfg = CganConfig(
        image_size=SIZE, channels=1, n_labels=len(labels), latent_dim=8, base_channels=8, mask_classes=masks
    )
    directory.mkdir(parents=True, exist_ok=True)
    sha = save_weights(ConditionalGenerator(cfg).state_dict(), directory / "weights.safetensors") if weights else None
    conditioning: dict[str, Any] = {"labels": labels}
    if masks:
        conditioning.update(masks=True, mask_classes=("bg", "fg")[:masks])
    card = ModelCard(
        id=card_id,
        version="1.0.0",
        architecture="cgan",
        network=cfg.__dict__,
        modality="MRI",
        anatomy="brain",
        image_size=(SIZE, SIZE),
        channels=1,
        licence="MIT",
        latent_dim=8,
        tags=tags,
        conditioning=conditioning,
        weights=Weights(file="weights.safetensors" if weights else None, sha256=sha),
    )
    save_card(card, directory / "card.yaml")
    return card
