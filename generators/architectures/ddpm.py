"""Class-conditional denoising diffusion (DDPM training, DDIM sampling) on MONAI's
``DiffusionModelUNet`` with ``num_class_embeds`` (the label's embedding is added to the
timestep embedding), ``DDPMScheduler``/``DDIMScheduler`` and ``DiffusionInferer``.

The network predicts the noise (epsilon) added to images scaled to [-1, 1]; the training
loss is the mean squared error against that noise at uniformly drawn timesteps.
Generation starts from seeded Gaussian noise and runs ``ddim_steps`` deterministic DDIM
steps (eta 0), so the same seed gives the same images; more steps cost time, fewer cost
quality. The scheduler settings (``timesteps``, ``ddim_steps``, ``schedule``) are part of
the card's ``network`` field.

Shapes: images float32 ``(N, C, H, W)`` in [0, 1]; labels int64 ``(N,)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import DiffusionInferer
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from generators.architectures import label_indices, load_network, seeded_normal, size_levels
from generators.card import ModelCard
from generators.contract import GeneratedBatch
from generators.errors import GeneratorError
from generators.train_spec import TrainSpec
from generators.training import Batch, Recipe, StepContext, TrainedGenerator, TrainingData, fit, make_optimizer


@dataclass(frozen=True)
class DdpmConfig:
    """Constructor arguments of the UNet and the schedulers; stored in the card's ``network``.
    ``unet_channels``/``attention_levels`` have one entry per resolution level."""

    image_size: int
    channels: int
    n_labels: int
    unet_channels: tuple[int, ...]
    attention_levels: tuple[bool, ...]
    num_res_blocks: int = 1
    norm_num_groups: int = 8
    timesteps: int = 1000
    ddim_steps: int = 50
    schedule: str = "cosine"

    def __post_init__(self) -> None:
        object.__setattr__(self, "unet_channels", tuple(int(c) for c in self.unet_channels))
        object.__setattr__(self, "attention_levels", tuple(bool(a) for a in self.attention_levels))
        if len(self.unet_channels) != len(self.attention_levels):
            raise GeneratorError("ddpm: unet_channels and attention_levels need one entry per level each")
        if any(c % self.norm_num_groups for c in self.unet_channels):
            raise GeneratorError(
                f"ddpm: every unet channel count must divide by norm_num_groups={self.norm_num_groups}"
            )
        if self.image_size % 2 ** (len(self.unet_channels) - 1):
            raise GeneratorError(
                f"ddpm: image size {self.image_size} must divide by {2 ** (len(self.unet_channels) - 1)} "
                f"for {len(self.unet_channels)} UNet levels"
            )
        if not 1 <= self.ddim_steps <= self.timesteps:
            raise GeneratorError(f"ddpm: ddim_steps must be in [1, timesteps={self.timesteps}], got {self.ddim_steps}")

    @classmethod
    def for_images(cls, image_size: int, channels: int, n_labels: int, spec: TrainSpec) -> "DdpmConfig":
        """Widths b, 2b, 4b, 4b (``b = spec.base_channels``) down to 4x4 (at most 4 levels,
        at least 2), self-attention at the lowest resolution (MONAI's attention blocks,
        which need ``einops``; the UNet's middle block always has one)."""
        levels = max(2, size_levels(image_size))
        b = spec.base_channels
        return cls(
            image_size=image_size,
            channels=channels,
            n_labels=n_labels,
            unet_channels=tuple(b * min(2**i, 4) for i in range(levels)),
            attention_levels=tuple(i == levels - 1 for i in range(levels)),
            norm_num_groups=math.gcd(b, 8),
            timesteps=spec.timesteps,
            ddim_steps=spec.ddim_steps,
            schedule=spec.noise_schedule,
        )


def build_unet(cfg: DdpmConfig) -> DiffusionModelUNet:
    """``forward(x, timesteps, class_labels=y)``: x ``(N, C, H, W)`` -> predicted noise, same shape."""
    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=cfg.channels,
        out_channels=cfg.channels,
        num_res_blocks=cfg.num_res_blocks,
        channels=cfg.unet_channels,
        attention_levels=cfg.attention_levels,
        norm_num_groups=cfg.norm_num_groups,
        num_head_channels=tuple(math.gcd(c, 32) for c in cfg.unet_channels),
        num_class_embeds=cfg.n_labels if cfg.n_labels > 0 else None,
    )


def _denoiser(
    unet: DiffusionModelUNet, labels: torch.Tensor | None, device: torch.device, amp: bool
) -> Callable[..., torch.Tensor]:
    """The UNet with its class labels bound, in the call form ``DiffusionInferer`` uses;
    bf16 autocast when ``amp`` (CUDA only), float32 output for the scheduler's arithmetic."""

    def denoise(x: torch.Tensor, timesteps: torch.Tensor, context: Any = None) -> torch.Tensor:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            return unet(x, timesteps=timesteps, class_labels=labels).float()

    return denoise


class DdpmModel:
    """A loaded class-conditional diffusion model implementing ``generators.contract.Generator``.
    ``ddim_steps`` (from the card) may be changed on the instance to trade speed for quality."""

    def __init__(self, card: ModelCard, state_dict: dict[str, torch.Tensor], device: str = "cpu") -> None:
        self.card = card
        self.cfg = DdpmConfig(**card.network)
        if len(card.conditioning.labels) != self.cfg.n_labels:
            raise GeneratorError(
                f"{card.ref}: card lists {len(card.conditioning.labels)} labels but the network expects "
                f"{self.cfg.n_labels}; fix conditioning.labels"
            )
        self.device = torch.device(device)
        self.ddim_steps = self.cfg.ddim_steps
        self.module = build_unet(self.cfg)
        load_network(self.module, state_dict, card)
        self.module.to(self.device).eval()

    @torch.inference_mode()
    def generate(self, n: int, seed: int, condition: Sequence[str] | str | None = None) -> GeneratedBatch:
        """``n`` samples by DDIM; float32 images (N, C, H, W) in [0, 1]. Same seed -> same output."""
        index = label_indices(self.card, n, condition)
        labels = torch.tensor(index, dtype=torch.long, device=self.device)
        scheduler = DDIMScheduler(num_train_timesteps=self.cfg.timesteps, schedule=self.cfg.schedule, clip_sample=True)
        scheduler.set_timesteps(self.ddim_steps)
        noise = seeded_normal((n, self.cfg.channels, self.cfg.image_size, self.cfg.image_size), seed).to(self.device)
        x = DiffusionInferer(scheduler).sample(
            noise, _denoiser(self.module, labels, self.device, amp=True), scheduler=scheduler, verbose=False
        )
        images = ((x.float() + 1) / 2).clamp(0, 1)
        return GeneratedBatch(
            images=images.cpu().numpy().astype(np.float32),
            masks=None,
            labels=[self.card.conditioning.labels[i] for i in index],
        )


def train_ddpm(
    data: TrainingData,
    spec: TrainSpec,
    *,
    device: str = "cpu",
    checkpoint: Path | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainedGenerator:
    """Epsilon-prediction DDPM training with Adam(``lr_generator``, ``betas``); the EMA of the
    UNet is exported. History: ``loss`` (noise MSE)."""
    cfg = DdpmConfig.for_images(int(data.images.shape[-1]), int(data.images.shape[1]), len(data.label_names), spec)
    torch.manual_seed(spec.seed)
    unet = build_unet(cfg)
    opt = make_optimizer(spec, unet, spec.lr_generator)
    inferer = DiffusionInferer(DDPMScheduler(num_train_timesteps=cfg.timesteps, schedule=cfg.schedule))

    def step(batch: Batch, ctx: StepContext) -> dict[str, float]:
        x0 = batch.images * 2 - 1
        noise = ctx.randn(*x0.shape)
        timesteps = ctx.randint(cfg.timesteps, len(x0))
        prediction = inferer(
            inputs=x0,
            diffusion_model=_denoiser(unet, batch.labels, ctx.device, ctx.amp),
            noise=noise,
            timesteps=timesteps,
        )
        loss = F.mse_loss(prediction, noise)
        ctx.update(opt, loss, unet)
        return {"loss": float(loss.detach())}

    result = fit(
        Recipe({"unet": unet}, {"unet": opt}, step, "unet"),
        data,
        spec,
        device=device,
        checkpoint=checkpoint,
        on_epoch=on_epoch,
    )
    network = asdict(cfg)
    network["unet_channels"], network["attention_levels"] = list(cfg.unet_channels), list(cfg.attention_levels)
    return TrainedGenerator(
        architecture="ddpm",
        state=result.state,
        network=network,
        labels=data.label_names,
        mask_classes=0,
        history=result.history,
        time_s=result.time_s,
        resumed_from_epoch=result.resumed_from_epoch,
    )
