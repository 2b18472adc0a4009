"""Unconditional DCGAN with the networks and recipe of MONAI's MedNIST GAN bundle
(``mednist_gan``): ``Generator`` latent -> image with a sigmoid output, ``Discriminator``
with 5x5 kernels and one residual unit, ``normal_init`` on both, Adam(2e-4, (0.5, 0.999)).

Sizes scale with the image: for 64x64 and ``base_channels`` 32 the networks are exactly the
bundle's (start 64x8x8, generator channels 32-16-8-1, discriminator 8-16-32-64-1). The loss
is ``spec.loss`` (``bce`` is the bundle's; the default ``hinge`` also works), with the
project's DiffAugment when ``spec.diffaugment``. Not copied from the bundle: its 5
discriminator steps per generator step (one here) and its image transforms (left-right
flips only here).

Shapes: latent float32 ``(N, latent_dim)``; images float32 ``(N, C, H, W)`` in [0, 1].
Unconditional: ``generate(condition=None)``; a model trained on a single class accepts that
class's label too (the card lists it), so a one-class pipeline can request it by name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from monai.networks import normal_init
from monai.networks.nets import Discriminator, Generator
from torch import nn

from generators.architectures import autocast, load_network, seeded_normal, size_levels
from generators.card import ModelCard
from generators.contract import GeneratedBatch
from generators.errors import GeneratorError
from generators.train_spec import TrainSpec
from generators.training import (
    Batch,
    Recipe,
    StepContext,
    TrainedGenerator,
    TrainingData,
    _bce_d,
    _g_loss,
    _hinge_d,
    fit,
    make_optimizer,
)


@dataclass(frozen=True)
class DcganConfig:
    """Constructor arguments of the pair; stored in the card's ``network`` field."""

    image_size: int
    channels: int
    latent_dim: int = 64
    base_channels: int = 32

    def __post_init__(self) -> None:
        if self.image_size % 8 or self.image_size < 16:
            raise GeneratorError(f"dcgan needs an image size divisible by 8 and >= 16, got {self.image_size}")


def build_generator(cfg: DcganConfig) -> nn.Module:
    """``forward(z)``: z ``(N, latent_dim)`` -> logits ``(N, C, H, W)`` (sigmoid gives the image)."""
    b = cfg.base_channels
    return Generator(
        latent_shape=(cfg.latent_dim,),
        start_shape=(2 * b, cfg.image_size // 8, cfg.image_size // 8),
        channels=(b, max(1, b // 2), max(1, b // 4), cfg.channels),
        strides=(2, 2, 2, 1),
    )


def build_discriminator(cfg: DcganConfig) -> nn.Module:
    """``forward(x)``: x ``(N, C, H, W)`` in [0, 1] -> logits ``(N, 1)``."""
    b = cfg.base_channels
    levels = size_levels(cfg.image_size)
    widths = tuple(max(1, b // 4) * 2**i for i in range(levels))
    return Discriminator(
        in_shape=(cfg.channels, cfg.image_size, cfg.image_size),
        channels=(*widths, 1),
        strides=(*(2,) * levels, 1),
        num_res_units=1,
        kernel_size=5,
        last_act=None,
    )


class DcganModel:
    """A loaded DCGAN generator implementing ``generators.contract.Generator``."""

    def __init__(self, card: ModelCard, state_dict: dict[str, torch.Tensor], device: str = "cpu") -> None:
        self.card = card
        self.cfg = DcganConfig(**card.network)
        self.device = torch.device(device)
        self.module = build_generator(self.cfg)
        load_network(self.module, state_dict, card)
        self.module.to(self.device).eval()

    def _labels(self, n: int, condition: Sequence[str] | str | None) -> list[str | None]:
        known = list(self.card.conditioning.labels)
        if condition is None:
            return [known[0] if len(known) == 1 else None] * n
        names = [condition] * n if isinstance(condition, str) else list(condition)
        if len(known) != 1 or set(names) != set(known) or len(names) != n:
            raise GeneratorError(
                f"{self.card.ref}: dcgan is unconditional (trained on labels {known or 'none'}); "
                "generate with condition=None, or train a conditional architecture (cgan, vae, ddpm)"
            )
        return list(names)

    @torch.inference_mode()
    def generate(self, n: int, seed: int, condition: Sequence[str] | str | None = None) -> GeneratedBatch:
        """``n`` samples; float32 images (N, C, H, W) in [0, 1]. Same seed -> same output."""
        labels = self._labels(n, condition)
        z = seeded_normal((n, self.cfg.latent_dim), seed).to(self.device)
        with autocast(self.device):
            images = torch.sigmoid(self.module(z).float())
        return GeneratedBatch(images=images.cpu().numpy().astype(np.float32), masks=None, labels=labels)


def train_dcgan(
    data: TrainingData,
    spec: TrainSpec,
    *,
    device: str = "cpu",
    checkpoint: Path | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainedGenerator:
    """Train on every image of ``data`` regardless of label. History: ``loss_d``, ``loss_g``."""
    cfg = DcganConfig(int(data.images.shape[-1]), int(data.images.shape[1]), spec.latent_dim, spec.base_channels)
    torch.manual_seed(spec.seed)
    gen_net = build_generator(cfg).apply(normal_init)
    disc_net = build_discriminator(cfg).apply(normal_init)
    opt_g = make_optimizer(spec, gen_net, spec.lr_generator)
    opt_d = make_optimizer(spec, disc_net, spec.lr_discriminator)
    d_loss_fn = _hinge_d if spec.loss == "hinge" else _bce_d

    def step(batch: Batch, ctx: StepContext) -> dict[str, float]:
        z = ctx.randn(len(batch.images), cfg.latent_dim)
        with ctx.autocast():
            fake = torch.sigmoid(gen_net(z).float())
            d_real, d_fake = batch.images, fake
            if spec.diffaugment:
                d_real, d_fake = ctx.augment(d_real), ctx.augment(d_fake)
            loss_d = d_loss_fn(disc_net(d_real).float(), disc_net(d_fake.detach()).float())
        ctx.update(opt_d, loss_d, disc_net)
        with ctx.autocast():
            loss_g = _g_loss(spec.loss, disc_net(d_fake).float())
        ctx.update(opt_g, loss_g, gen_net)
        return {"loss_d": float(loss_d.detach()), "loss_g": float(loss_g.detach())}

    recipe = Recipe(
        {"generator": gen_net, "discriminator": disc_net},
        {"generator": opt_g, "discriminator": opt_d},
        step,
        "generator",
    )
    result = fit(recipe, data, spec, device=device, checkpoint=checkpoint, on_epoch=on_epoch)
    return TrainedGenerator(
        architecture="dcgan",
        state=result.state,
        network=asdict(cfg),
        labels=data.label_names if len(data.label_names) == 1 else (),
        mask_classes=0,
        history=result.history,
        time_s=result.time_s,
        resumed_from_epoch=result.resumed_from_epoch,
    )
