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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import Discriminator, Generator
from torch import nn

from generators.card import ModelCard
from generators.contract import GeneratedBatch
from generators.errors import GeneratorError


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
    """Standard-normal latents ``(n, latent_dim)`` float32 from a seeded CPU generator."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(n, latent_dim, generator=gen)


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
        if condition is None:
            return [i % len(self.labels) for i in range(n)]
        names = [condition] * n if isinstance(condition, str) else list(condition)
        if len(names) != n:
            raise GeneratorError(f"expected {n} conditioning labels, got {len(names)}")
        unknown = sorted(set(names) - set(self.labels))
        if unknown:
            raise GeneratorError(f"{self.card.ref}: unknown label(s) {unknown}; allowed: {', '.join(self.labels)}")
        return [self.labels.index(name) for name in names]

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
