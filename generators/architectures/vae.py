"""Class-conditional variational autoencoder on MONAI's ``VarAutoEncoder``.

Conditioning (a CVAE): the encoder sees the image plus one constant map per label (one-hot),
and the decoder's first layer (``decodeL``, replaced here) takes the latent code with the
one-hot label appended. Generation decodes ``z ~ N(0, I)`` with the requested label.

Loss per image, averaged over the batch: sum of squared errors + ``kl_weight`` * KL(q(z|x) || N(0, I)).

Shapes: images float32 ``(N, C, H, W)`` in [0, 1] (sigmoid output); latent ``(N, latent_dim)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import VarAutoEncoder
from torch import nn

from generators.architectures import (
    autocast,
    check_label_count,
    label_indices,
    load_network,
    seeded_normal,
    size_levels,
)
from generators.card import ModelCard
from generators.contract import GeneratedBatch
from generators.errors import GeneratorError
from generators.train_spec import TrainSpec
from generators.training import Batch, Recipe, StepContext, TrainedGenerator, TrainingData, fit, make_optimizer


@dataclass(frozen=True)
class VaeConfig:
    """Constructor arguments; stored in the card's ``network`` field."""

    image_size: int
    channels: int
    n_labels: int
    latent_dim: int = 64
    base_channels: int = 32

    def __post_init__(self) -> None:
        levels = size_levels(self.image_size)
        if self.image_size < 8 or self.image_size % 2**levels:
            raise GeneratorError(f"vae needs an image size >= 8 divisible by {2**levels}, got {self.image_size}")
        if self.n_labels < 1:
            raise GeneratorError("vae is class-conditional and needs at least one label; give the images labels")


class ConditionalVae(nn.Module):
    """``encode(x, onehot) -> (mu, logvar)``, ``decode(z, onehot) -> images in [0, 1]``;
    x ``(N, C, H, W)``, onehot ``(N, n_labels)``, z/mu/logvar ``(N, latent_dim)``."""

    def __init__(self, cfg: VaeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        b, levels = cfg.base_channels, size_levels(cfg.image_size)
        self.net = VarAutoEncoder(
            spatial_dims=2,
            in_shape=(cfg.channels + cfg.n_labels, cfg.image_size, cfg.image_size),
            out_channels=cfg.channels,
            latent_size=cfg.latent_dim,
            channels=tuple(b * 2**i for i in range(levels)),
            strides=(2,) * levels,
            num_res_units=1,
        )
        self.net.decodeL = nn.Linear(cfg.latent_dim + cfg.n_labels, self.net.decodeL.out_features)

    def encode(self, x: torch.Tensor, onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = onehot[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
        return self.net.encode_forward(torch.cat([x, maps], dim=1))

    def decode(self, z: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        return self.net.decode_forward(torch.cat([z, onehot], dim=1), use_sigmoid=True)


def vae_loss(
    recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, kl_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, reconstruction, KL), each a per-image sum averaged over the batch."""
    recon_loss = (recon - x).pow(2).flatten(1).sum(1).mean()
    kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum(1).mean()
    return recon_loss + kl_weight * kl, recon_loss, kl


class VaeModel:
    """A loaded conditional VAE implementing ``generators.contract.Generator``."""

    def __init__(self, card: ModelCard, state_dict: dict[str, torch.Tensor], device: str = "cpu") -> None:
        self.card = card
        self.cfg = VaeConfig(**card.network)
        check_label_count(card, self.cfg.n_labels)
        self.device = torch.device(device)
        self.module = ConditionalVae(self.cfg)
        load_network(self.module, state_dict, card)
        self.module.to(self.device).eval()

    @torch.inference_mode()
    def generate(self, n: int, seed: int, condition: Sequence[str] | str | None = None) -> GeneratedBatch:
        """``n`` samples; float32 images (N, C, H, W) in [0, 1]. Same seed -> same output."""
        index = label_indices(self.card, n, condition)
        onehot = F.one_hot(torch.tensor(index), self.cfg.n_labels).float().to(self.device)
        z = seeded_normal((n, self.cfg.latent_dim), seed).to(self.device)
        with autocast(self.device):
            images = self.module.decode(z, onehot).float()
        return GeneratedBatch(
            images=images.clamp(0, 1).cpu().numpy().astype(np.float32),
            masks=None,
            labels=[self.card.conditioning.labels[i] for i in index],
        )


def train_vae(
    data: TrainingData,
    spec: TrainSpec,
    *,
    device: str = "cpu",
    checkpoint: Path | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainedGenerator:
    """Train the CVAE with Adam(``lr_generator``, ``betas``). History: ``loss``,
    ``loss_recon``, ``loss_kl`` (the KL before weighting)."""
    cfg = VaeConfig(
        int(data.images.shape[-1]),
        int(data.images.shape[1]),
        len(data.label_names),
        spec.latent_dim,
        spec.base_channels,
    )
    torch.manual_seed(spec.seed)
    vae = ConditionalVae(cfg)
    opt = make_optimizer(spec, vae, spec.lr_generator)

    def step(batch: Batch, ctx: StepContext) -> dict[str, float]:
        onehot = F.one_hot(batch.labels, cfg.n_labels).float()
        eps = ctx.randn(len(batch.images), cfg.latent_dim)
        with ctx.autocast():
            mu, logvar = vae.encode(batch.images, onehot)
            mu, logvar = mu.float(), logvar.float()
            z = mu + eps * torch.exp(0.5 * logvar)
            recon = vae.decode(z, onehot).float()
        loss, recon_loss, kl = vae_loss(recon, batch.images, mu, logvar, spec.kl_weight)
        ctx.update(opt, loss, vae)
        return {"loss": float(loss.detach()), "loss_recon": float(recon_loss.detach()), "loss_kl": float(kl.detach())}

    result = fit(
        Recipe({"vae": vae}, {"vae": opt}, step, "vae"),
        data,
        spec,
        device=device,
        checkpoint=checkpoint,
        on_epoch=on_epoch,
    )
    return TrainedGenerator(
        architecture="vae",
        state=result.state,
        network=asdict(cfg),
        labels=data.label_names,
        mask_classes=0,
        history=result.history,
        time_s=result.time_s,
        resumed_from_epoch=result.resumed_from_epoch,
    )
