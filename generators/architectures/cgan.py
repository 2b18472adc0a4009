"""Class-conditional GAN on MONAI's ``Generator``/``Discriminator`` (the networks of the
MedNIST GAN bundle), optionally emitting a segmentation mask with each image.

Conditioning: the one-hot label is appended to the latent vector (generator) and
broadcast as extra input channels (discriminator). With ``mask_classes`` K > 0 the
generator emits C image channels plus K mask logits; the discriminator sees the image
and the mask as class probabilities, so it judges image and mask together.

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

    def __post_init__(self) -> None:
        if self.image_size % 8 or self.image_size < 16:
            raise GeneratorError(f"cgan needs an image size divisible by 8 and >= 16, got {self.image_size}")


class ConditionalGenerator(nn.Module):
    """``forward(z, onehot)`` -> raw outputs ``(N, C + K, H, W)`` (logits, before sigmoid/softmax)."""

    def __init__(self, cfg: CganConfig) -> None:
        super().__init__()
        self.cfg = cfg
        b = cfg.base_channels
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
        missing, unexpected = self.module.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise GeneratorError(
                f"{card.ref}: weights do not fit the network (missing {len(missing)}, unexpected "
                f"{len(unexpected)} keys); the card's network settings and weights disagree"
            )
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
    }
