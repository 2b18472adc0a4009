"""Class-conditional GAN on MONAI's ``Generator``/``Discriminator`` (the networks of the
MedNIST GAN bundle), optionally emitting a segmentation mask with each image.

Conditioning: the one-hot label is appended to the latent vector (generator) and
broadcast as extra input channels (discriminator). With ``mask_classes`` K > 0 the
generator emits C image channels plus K mask logits; the discriminator sees the image
and the mask as class probabilities, so it judges image and mask together.

Two network styles (``CganConfig.style``, ``generator.train.cgan_style``):

- ``mednist`` (the default, and what older cards hold): MONAI's ``Generator`` (transposed
  convolutions, widths b, b/2, b/4 from an (2b, H/8, W/8) start) and ``Discriminator``
  with the label as extra input channels. Small and fast; on the demo data it draws
  saturated blobs that the realism gate rejects.
- ``upsample``: a resize-convolution generator (bilinear x2 upsampling + 3x3 convolution,
  batch norm, leaky ReLU; widths 16b, 8b, 4b, 2b, b from a (16b, H/16, W/16) start; no
  transposed convolutions, so no checkerboard) and a projection discriminator (spectral
  norm, four stride-2 4x4 convolutions, a minibatch-standard-deviation channel against
  mode collapse, then ``linear(h) + <embed(label), h>``; Miyato & Koyama 2018). About 4x
  the compute of ``mednist`` at the same ``base_channels``; image size divisible by 16.

Shapes: latent ``(N, latent_dim + n_labels)``; output images float32 ``(N, C, H, W)`` in
[0, 1] (sigmoid, as in the MedNIST bundle); masks int64 ``(N, H, W)``.

Training (``train_cgan``) is a recipe of ``generators.training.fit``, the loop every
architecture shares: ``spec.loss`` (hinge or bce), DiffAugment of the discriminator's inputs
(``spec.diffaugment``), Adam with ``spec.betas`` at ``lr_generator``/``lr_discriminator``,
an EMA generator (exported), checkpoints, exact resume and torchrun data parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import Discriminator, Generator
from torch import nn

from generators.card import ModelCard
from generators.contract import GeneratedBatch
from generators.errors import DataError, GeneratorError
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
    _real_input,
    fit,
    make_optimizer,
)


@dataclass(frozen=True)
class CganConfig:
    """Constructor arguments of the pair; stored in the card's ``network`` field."""

    image_size: int
    channels: int
    n_labels: int
    latent_dim: int = 64
    base_channels: int = 32
    mask_classes: int = 0
    style: str = "mednist"

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise GeneratorError(f"cgan style must be one of {', '.join(STYLES)}, got {self.style!r}")
        if self.style == "upsample" and (self.image_size % 16 or self.image_size < 16):
            raise GeneratorError(
                f"cgan style 'upsample' needs an image size divisible by 16, got {self.image_size}; "
                "change preprocess.size or use cgan_style: mednist"
            )
        if self.image_size % 8 or self.image_size < 16:
            raise GeneratorError(f"cgan needs an image size divisible by 8 and >= 16, got {self.image_size}")


#: network styles of the pair (see the module docstring), as a card's description names them
NETWORK_DESCRIPTIONS = {
    "mednist": "MONAI Generator/Discriminator",
    "upsample": "resize-convolution generator, spectral-norm projection discriminator",
}
STYLES = tuple(NETWORK_DESCRIPTIONS)


class UpsampleGenerator(nn.Module):
    """Resize-convolution generator: ``forward(latent)`` with latent float32
    ``(N, latent_dim + n_labels)`` -> raw outputs ``(N, C + K, H, W)`` (logits)."""

    def __init__(self, cfg: CganConfig) -> None:
        super().__init__()
        b, self.start = cfg.base_channels, cfg.image_size // 16
        widths = (16 * b, 8 * b, 4 * b, 2 * b, b)
        self.project = nn.Linear(cfg.latent_dim + cfg.n_labels, widths[0] * self.start * self.start)
        blocks: list[nn.Module] = [nn.BatchNorm2d(widths[0]), nn.LeakyReLU(0.2)]
        for width_in, width_out in zip(widths[:-1], widths[1:], strict=True):
            blocks += [
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(width_in, width_out, 3, padding=1),
                nn.BatchNorm2d(width_out),
                nn.LeakyReLU(0.2),
            ]
        blocks.append(nn.Conv2d(b, cfg.channels + cfg.mask_classes, 3, padding=1))
        self.body = nn.Sequential(*blocks)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        start = self.project(latent).view(len(latent), -1, self.start, self.start)
        return self.body(start)


def minibatch_stddev(h: torch.Tensor) -> torch.Tensor:
    """``h`` (N, C, H, W) -> (N, C + 1, H, W): appends the mean over features of the
    standard deviation over the batch (Karras et al. 2018), a diversity cue for the critic."""
    spread = h.float().std(dim=0, unbiased=False).mean().to(h.dtype)
    return torch.cat([h, spread.expand(len(h), 1, h.shape[2], h.shape[3])], dim=1)


class ProjectionDiscriminator(nn.Module):
    """``forward(x, onehot)`` with x ``(N, C + K, H, W)`` in [0, 1] and onehot ``(N, L)``
    -> scores ``(N,)``: ``linear(h) + <onehot @ embed, h>`` on pooled features ``h``."""

    def __init__(self, cfg: CganConfig) -> None:
        super().__init__()
        b = cfg.base_channels
        sn = nn.utils.spectral_norm
        widths = (cfg.channels + cfg.mask_classes, b, 2 * b, 4 * b, 8 * b)
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [sn(nn.Conv2d(width_in, width_out, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(sn(nn.Conv2d(8 * b + 1, 16 * b, 3, padding=1)), nn.LeakyReLU(0.2))
        self.linear = sn(nn.Linear(16 * b, 1))
        self.embed = sn(nn.Linear(cfg.n_labels, 16 * b, bias=False))

    def forward(self, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        h = self.head(minibatch_stddev(self.body(x))).sum(dim=(2, 3))
        return self.linear(h).reshape(-1) + (self.embed(onehot) * h).sum(dim=1)


class ConditionalGenerator(nn.Module):
    """``forward(z, onehot)`` -> raw outputs ``(N, C + K, H, W)`` (logits, before sigmoid/softmax)."""

    def __init__(self, cfg: CganConfig) -> None:
        super().__init__()
        self.cfg = cfg
        b = cfg.base_channels
        if cfg.style == "upsample":
            self.net = UpsampleGenerator(cfg)
            return
        self.net = Generator(
            latent_shape=(cfg.latent_dim + cfg.n_labels,),
            start_shape=(2 * b, cfg.image_size // 8, cfg.image_size // 8),
            channels=(b, b // 2, b // 4, cfg.channels + cfg.mask_classes),
            strides=(2, 2, 2, 1),
            num_res_units=1,
        )

    def forward(self, z: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, onehot], dim=1))


class ConditionalDiscriminator(nn.Module):
    """``forward(x, onehot)`` with x ``(N, C + K, H, W)`` in [0, 1] -> scores ``(N,)``."""

    def __init__(self, cfg: CganConfig) -> None:
        super().__init__()
        self.cfg = cfg
        b = cfg.base_channels
        if cfg.style == "upsample":
            self.net = ProjectionDiscriminator(cfg)
            return
        in_channels = cfg.channels + cfg.mask_classes + cfg.n_labels
        # downsample by 2 until 4x4 (at most 4 times) so instance norm sees > 1 pixel
        downsamplings = min(4, int(np.log2(cfg.image_size)) - 2)
        widths = tuple(b // 2 * 2**i for i in range(downsamplings))
        self.net = Discriminator(
            in_shape=(in_channels, cfg.image_size, cfg.image_size),
            channels=(*widths, 1),
            strides=(*(2,) * downsamplings, 1),
            num_res_units=1,
            dropout=0.25,
            last_act=None,
        )

    def forward(self, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        if self.cfg.style == "upsample":
            return self.net(x, onehot)
        maps = onehot[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
        return self.net(torch.cat([x, maps], dim=1)).reshape(-1)


def split_outputs(raw: torch.Tensor, cfg: CganConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Raw generator output -> (images in [0, 1], mask probabilities or None)."""
    images = torch.sigmoid(raw[:, : cfg.channels])
    if cfg.mask_classes == 0:
        return images, None
    return images, torch.softmax(raw[:, cfg.channels :], dim=1)


def latent(n: int, latent_dim: int, seed: int) -> torch.Tensor:
    """Standard-normal latents ``(n, latent_dim)`` float32 from the per-image seed stream
    (``generators.seed_stream``: row ``j`` is image ``start + j``'s latent)."""
    from generators.seed_stream import stream_normal

    return stream_normal((n, latent_dim), seed)


class CganModel:
    """A loaded conditional GAN generator implementing ``generators.contract.Generator``."""

    def __init__(self, card: ModelCard, state_dict: dict[str, torch.Tensor], device: str = "cpu") -> None:
        self.card = card
        self.cfg = CganConfig(**card.network)
        self.labels = list(card.conditioning.labels)
        if len(self.labels) != self.cfg.n_labels:
            raise GeneratorError(
                f"{card.ref}: card lists {len(self.labels)} labels but the network expects "
                f"{self.cfg.n_labels}; fix conditioning.labels"
            )
        self.device = torch.device(device)
        self.module = ConditionalGenerator(self.cfg)
        from generators.architectures import load_network  # lazily: the package lists this module

        load_network(self.module, state_dict, card)  # shapes, then missing/unexpected keys: one line
        self.module.to(self.device).eval()

    def label_indices(self, n: int, condition: Sequence[str] | str | None) -> list[int]:
        """One index into the card's labels per sample (``generators.labels``)."""
        from generators.labels import label_indices

        return label_indices(self.labels, n, condition, self.card.ref)

    @torch.inference_mode()
    def generate(self, n: int, seed: int, condition: Sequence[str] | str | None = None) -> GeneratedBatch:
        """``n`` samples; float32 images (N, C, H, W) in [0, 1]. Same seed -> same output."""
        index = torch.tensor(self.label_indices(n, condition), dtype=torch.long)
        onehot = F.one_hot(index, self.cfg.n_labels).float()
        z = latent(n, self.cfg.latent_dim, seed)
        autocast = self.device.type == "cuda"
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=autocast):
            raw = self.module(z.to(self.device), onehot.to(self.device))
        images, masks = split_outputs(raw.float(), self.cfg)
        mask_array = None if masks is None else masks.argmax(1).cpu().numpy().astype(np.int64)
        return GeneratedBatch(
            images=images.cpu().numpy().astype(np.float32),
            masks=mask_array,
            labels=[self.labels[i] for i in index.tolist()],
        )


def network_kwargs(cfg: CganConfig) -> dict[str, Any]:
    return {
        "image_size": cfg.image_size,
        "channels": cfg.channels,
        "n_labels": cfg.n_labels,
        "latent_dim": cfg.latent_dim,
        "base_channels": cfg.base_channels,
        "mask_classes": cfg.mask_classes,
        # only a non-default style is written, so cards of the original networks stay as they were
        **({"style": cfg.style} if cfg.style != "mednist" else {}),
    }


def config_for(data: TrainingData, spec: TrainSpec) -> CganConfig:
    """The pair's constructor arguments for ``data`` (size, channels, labels, mask classes
    when ``spec.with_masks``) and the spec's latent size, width and style."""
    if spec.with_masks and data.masks is None:
        raise DataError(
            "train.with_masks is true but the training images have no masks; ingest masks or set with_masks: false"
        )
    return CganConfig(
        image_size=int(data.images.shape[-1]),
        channels=int(data.images.shape[1]),
        n_labels=len(data.label_names),
        latent_dim=spec.latent_dim,
        base_channels=spec.base_channels,
        mask_classes=data.mask_classes if spec.with_masks else 0,
        style=spec.cgan_style,
    )


def cgan_recipe(cfg: CganConfig, spec: TrainSpec) -> Recipe:
    """The cGAN's side of ``fit``: a freshly built generator/discriminator pair (seeded with
    ``spec.seed``), their Adam optimisers, and one step: a discriminator update on real vs
    fake (``spec.loss``, DiffAugment when ``spec.diffaugment``), then a generator update
    through the same augmented fakes. Real inputs are the images, with the one-hot mask
    appended as K channels when ``cfg.mask_classes`` > 0; fakes are the sigmoid image and
    the softmax mask. The step reports ``loss_d`` and ``loss_g``; the exported network is
    the generator's EMA."""
    torch.manual_seed(spec.seed)
    gen_net, disc_net = ConditionalGenerator(cfg), ConditionalDiscriminator(cfg)
    opt_g = make_optimizer(spec, gen_net, spec.lr_generator)
    opt_d = make_optimizer(spec, disc_net, spec.lr_discriminator)
    d_loss_fn = _hinge_d if spec.loss == "hinge" else _bce_d

    def step(batch: Batch, ctx: StepContext) -> dict[str, float]:
        onehot = F.one_hot(batch.labels, cfg.n_labels).float()
        real = _real_input(batch.images, batch.masks, cfg.mask_classes)
        z = ctx.randn(len(batch.images), cfg.latent_dim)
        with ctx.autocast():
            fake_img, fake_mask = split_outputs(gen_net(z, onehot).float(), cfg)
            fake = fake_img if fake_mask is None else torch.cat([fake_img, fake_mask], 1)
            d_real, d_fake = real, fake
            if spec.diffaugment:
                d_real, d_fake = ctx.augment(real), ctx.augment(fake)
            loss_d = d_loss_fn(disc_net(d_real, onehot).float(), disc_net(d_fake.detach(), onehot).float())
        ctx.update(opt_d, loss_d, disc_net)
        with ctx.autocast():
            loss_g = _g_loss(spec.loss, disc_net(d_fake, onehot).float())
        ctx.update(opt_g, loss_g, gen_net)
        return {"loss_d": float(loss_d.detach()), "loss_g": float(loss_g.detach())}

    return Recipe(
        {"generator": gen_net, "discriminator": disc_net},
        {"generator": opt_g, "discriminator": opt_d},
        step,
        "generator",
    )


def train_cgan(
    data: TrainingData,
    spec: TrainSpec,
    *,
    device: str = "cpu",
    checkpoint: Path | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainedGenerator:
    """Train the conditional GAN through ``fit`` (checkpoints, resume, EMA, torchrun).
    History: ``loss_d``, ``loss_g``. The card's ``network`` is ``network_kwargs(cfg)``;
    ``mask_classes`` > 0 when ``spec.with_masks`` (paired image + mask output)."""
    cfg = config_for(data, spec)
    recipe = cgan_recipe(cfg, spec)
    result = fit(
        recipe, data, spec, device=device, checkpoint=checkpoint, on_epoch=on_epoch, with_masks=spec.with_masks
    )
    return TrainedGenerator(
        architecture="cgan",
        state=result.state,
        network=network_kwargs(cfg),
        labels=data.label_names,
        mask_classes=cfg.mask_classes,
        history=result.history,
        time_s=result.time_s,
        resumed_from_epoch=result.resumed_from_epoch,
    )
