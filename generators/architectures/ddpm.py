"""Class-conditional denoising diffusion (DDPM training, DDIM sampling) on MONAI's
``DiffusionModelUNet`` with ``num_class_embeds`` (the label's embedding is added to the
timestep embedding), ``DDPMScheduler``/``DDIMScheduler`` and ``DiffusionInferer``.

The network predicts the noise (epsilon) added to images scaled to [-1, 1]; the training
loss is the mean squared error against that noise at uniformly drawn timesteps.
Generation starts from seeded Gaussian noise and runs ``ddim_steps`` deterministic DDIM
steps (eta 0), so the same seed gives the same images; more steps cost time, fewer cost
quality. The scheduler settings (``timesteps``, ``ddim_steps``, ``schedule``) are part of
the card's ``network`` field.

Mask conditioning (``with_masks: true``; ``mask_classes`` K > 0 in the card's ``network``):
the segmentation mask, one-hot ``(N, K, H, W)``, is concatenated to the noisy image at
the UNet's input (``DiffusionInferer`` ``mode="concat"``; the UNet takes C + K channels
and predicts the C-channel noise), so the model generates the image only and the mask is
exactly the given one. Chosen over MONAI's ``ControlNet``: ControlNet adds a trainable
copy of the encoder to steer a *pretrained*, frozen diffusion model; here the model is
trained from scratch on a few hundred slices, where input concatenation (as in Med-DDPM,
Dorjsembe et al. 2023) is one network and one loss, with no second encoder to run. The
model implements ``generators.contract.MaskConditionedGenerator``: ``generate(n, seed,
condition, masks=None)`` makes images for the given masks int64 ``(N, H, W)`` in [0, K),
or, without masks, for masks drawn (seeded) from the pool of training masks stored with
its weights (``generators/architectures/mask_pool.py``, ``spec.mask_pool_size``).

Shapes: images float32 ``(N, C, H, W)`` in [0, 1]; labels int64 ``(N,)``; masks int64 ``(N, H, W)``.
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

from generators.architectures import check_label_count, label_indices, load_network, seeded_normal, size_levels
from generators.architectures.mask_pool import MaskPool, check_masks, network_state, pool_state
from generators.card import ModelCard
from generators.contract import GeneratedBatch
from generators.errors import DataError, GeneratorError
from generators.train_spec import TrainSpec
from generators.training import Batch, Recipe, StepContext, TrainedGenerator, TrainingData, fit, make_optimizer


@dataclass(frozen=True)
class DdpmConfig:
    """Constructor arguments of the UNet and the schedulers; stored in the card's ``network``.
    ``unet_channels``/``attention_levels`` have one entry per resolution level;
    ``mask_classes`` > 0: mask-conditioned (one-hot mask channels at the input)."""

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
    mask_classes: int = 0

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
        if self.mask_classes == 1 or not 0 <= self.mask_classes <= 256:
            raise GeneratorError(f"ddpm: mask_classes must be 0 (no masks) or 2..256, got {self.mask_classes}")

    @classmethod
    def for_images(
        cls, image_size: int, channels: int, n_labels: int, spec: TrainSpec, mask_classes: int = 0
    ) -> "DdpmConfig":
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
            mask_classes=mask_classes,
        )


def build_unet(cfg: DdpmConfig) -> DiffusionModelUNet:
    """``forward(x, timesteps, class_labels=y)``: x ``(N, C + K, H, W)`` (K = ``mask_classes``:
    the noisy image, then the one-hot mask) -> predicted noise ``(N, C, H, W)``."""
    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=cfg.channels + cfg.mask_classes,
        out_channels=cfg.channels,
        num_res_blocks=cfg.num_res_blocks,
        channels=cfg.unet_channels,
        attention_levels=cfg.attention_levels,
        norm_num_groups=cfg.norm_num_groups,
        num_head_channels=tuple(math.gcd(c, 32) for c in cfg.unet_channels),
        num_class_embeds=cfg.n_labels if cfg.n_labels > 0 else None,
    )


def mask_condition(masks: torch.Tensor, cfg: DdpmConfig) -> torch.Tensor:
    """masks int64 ``(N, H, W)`` in [0, K) -> one-hot float32 ``(N, K, H, W)``."""
    return F.one_hot(masks, cfg.mask_classes).permute(0, 3, 1, 2).float()


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
    """A loaded class-conditional diffusion model implementing ``generators.contract.Generator``
    (and ``MaskConditionedGenerator`` when its card's ``mask_classes`` > 0).
    ``ddim_steps`` (from the card) may be changed on the instance to trade speed for quality."""

    def __init__(self, card: ModelCard, state_dict: dict[str, torch.Tensor], device: str = "cpu") -> None:
        self.card = card
        self.cfg = DdpmConfig(**card.network)
        check_label_count(card, self.cfg.n_labels)
        self.device = torch.device(device)
        self.ddim_steps = self.cfg.ddim_steps
        self.mask_conditioned = self.cfg.mask_classes > 0
        self.mask_classes = self.cfg.mask_classes
        self.module = build_unet(self.cfg)
        load_network(self.module, network_state(state_dict), card)
        self.module.to(self.device).eval()
        self.pool = MaskPool.from_state(card, state_dict)

    def use_mask_pool(self, masks: np.ndarray, labels: Sequence[str]) -> None:
        """Draw label-conditioned masks from ``masks`` int (P, H, W) with one label each."""
        self._require_masks()
        self.pool = MaskPool.given(self.card, self.mask_classes, masks, labels)

    def _require_masks(self) -> None:
        if not self.mask_conditioned:
            raise GeneratorError(
                f"{self.card.ref}: this ddpm is not mask-conditioned (trained with with_masks: false); "
                "retrain with with_masks: true to generate images for given masks"
            )

    @torch.inference_mode()
    def generate(
        self, n: int, seed: int, condition: Sequence[str] | str | None = None, masks: np.ndarray | None = None
    ) -> GeneratedBatch:
        """``n`` samples by DDIM; float32 images (N, C, H, W) in [0, 1]. Same seed -> same output.
        Mask-conditioned: ``masks`` int (N, H, W) in [0, K) are returned unchanged as the
        batch's masks (int64); without them, masks are drawn from the pool by label."""
        index = label_indices(self.card, n, condition)
        labels = torch.tensor(index, dtype=torch.long, device=self.device)
        if masks is not None:
            self._require_masks()
            masks = check_masks(self.card, masks, self.mask_classes, n)
        elif self.mask_conditioned:
            masks = self.pool.draw(self.card, index, seed)
        scheduler = DDIMScheduler(num_train_timesteps=self.cfg.timesteps, schedule=self.cfg.schedule, clip_sample=True)
        scheduler.set_timesteps(self.ddim_steps)
        noise = seeded_normal((n, self.cfg.channels, self.cfg.image_size, self.cfg.image_size), seed).to(self.device)
        concat = {}
        if masks is not None:
            concat = {
                "conditioning": mask_condition(torch.from_numpy(masks), self.cfg).to(self.device),
                "mode": "concat",
            }
        x = DiffusionInferer(scheduler).sample(
            noise, _denoiser(self.module, labels, self.device, amp=True), scheduler=scheduler, verbose=False, **concat
        )
        images = ((x.float() + 1) / 2).clamp(0, 1)
        return GeneratedBatch(
            images=images.cpu().numpy().astype(np.float32),
            masks=masks,
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
    UNet is exported. History: ``loss`` (noise MSE). ``spec.with_masks``: mask-conditioned
    (the one-hot mask concatenated to the noisy image; ``spec.mask_pool_size`` training
    masks stored with the weights)."""
    mask_classes = 0
    if spec.with_masks:
        if data.masks is None:
            raise DataError(
                "ddpm with_masks needs a mask for every training image; ingest masks or set with_masks: false"
            )
        mask_classes = max(data.mask_classes, int(data.masks.max()) + 1, 2)
    cfg = DdpmConfig.for_images(
        int(data.images.shape[-1]), int(data.images.shape[1]), len(data.label_names), spec, mask_classes
    )
    torch.manual_seed(spec.seed)
    unet = build_unet(cfg)
    opt = make_optimizer(spec, unet, spec.lr_generator)
    inferer = DiffusionInferer(DDPMScheduler(num_train_timesteps=cfg.timesteps, schedule=cfg.schedule))

    def step(batch: Batch, ctx: StepContext) -> dict[str, float]:
        x0 = batch.images * 2 - 1
        noise = ctx.randn(*x0.shape)
        timesteps = ctx.randint(cfg.timesteps, len(x0))
        concat = {}
        if cfg.mask_classes and batch.masks is not None:
            concat = {"condition": mask_condition(batch.masks, cfg), "mode": "concat"}
        prediction = inferer(
            inputs=x0,
            diffusion_model=_denoiser(unet, batch.labels, ctx.device, ctx.amp),
            noise=noise,
            timesteps=timesteps,
            **concat,
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
        with_masks=cfg.mask_classes > 0,
    )
    state = {**result.state, **pool_state(data, spec.mask_pool_size, spec.seed)} if cfg.mask_classes else result.state
    network = asdict(cfg)
    network["unet_channels"], network["attention_levels"] = list(cfg.unet_channels), list(cfg.attention_levels)
    return TrainedGenerator(
        architecture="ddpm",
        state=state,
        network=network,
        labels=data.label_names,
        mask_classes=cfg.mask_classes,
        history=result.history,
        time_s=result.time_s,
        resumed_from_epoch=result.resumed_from_epoch,
    )
