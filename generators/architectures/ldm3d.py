"""Class- (and optionally mask-) conditional 3D latent diffusion (``ldm3d``): the ``ldm``
recipe (``generators/architectures/ldm.py``) on cubes, with MONAI's
``AutoencoderKL(spatial_dims=3)`` and ``DiffusionModelUNet(spatial_dims=3)``, trained by
rectified flow (``sampler: rflow``, MONAI's ``RFlowScheduler``; ``ddim`` works as in ``ldm``)
and sampled by ``sample_steps`` Euler steps. Meant for a GPU (bf16 autocast with ``amp``);
it runs, tiny, on a CPU.

Everything but the mask is ``ldm``'s: :class:`Ldm3dConfig` subclasses ``LdmConfig``
(``image_size`` is the cube's side, ``spatial_dims`` 3), the autoencoder stage is
``ldm.train_autoencoder`` (cached and resumable next to the run's checkpoint), and sampling
is ``ldm.sample_latents`` + ``ldm.decode_latents`` with ``ldm.sampling_plan``.

Mask conditioning (``with_masks: true``; ``mask_classes`` K > 0 in the card's ``network``):
the one-hot mask ``(N, K, D, H, W)`` is average-pooled to the latent grid (class fractions per
latent voxel) and concatenated to the noisy latent at the UNet's input; the model generates
the volume only and returns the given mask unchanged
(``generators.contract.MaskConditionedGenerator``), or, without masks, masks drawn (seeded,
by label) from the training masks stored with its weights (``mask_pool.py``).

Shapes: volumes float32 ``(N, 1, S, S, S)`` in [0, 1]; masks int64 ``(N, S, S, S)``; latents
``(N, latent_channels, s, s, s)`` with ``s = S / 2**(len(autoencoder_channels) - 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, ClassVar, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from generators.architectures import autocast, check_label_count, label_indices, load_network, seeded_normal
from generators.architectures.ldm import (
    CACHE_FOLDER,
    LdmConfig,
    LdmSampler,
    decode_latents,
    encode_images,
    latent_diffusion_loss,
    sample_latents,
    train_autoencoder,
    training_scheduler,
)
from generators.architectures.mask_pool import MaskPool, batch_masks, network_state, pool_state
from generators.architectures.vae3d import mask_onehot, require_volumes, volume_mask_classes
from generators.card import ModelCard
from generators.contract import GeneratedBatch
from generators.errors import DataError, GeneratorError
from generators.train_spec import TrainSpec
from generators.training import Batch, Recipe, StepContext, TrainedGenerator, TrainingData, fit, make_optimizer


@dataclass(frozen=True)
class Ldm3dConfig(LdmConfig):
    """``LdmConfig`` for cubes of side ``image_size``, plus ``mask_classes`` (K > 0: the
    pooled one-hot mask is concatenated to the latent at the UNet's input)."""

    spatial_dims: ClassVar[int] = 3

    mask_classes: int = 0
    mask_deformation: float = 0.0  # voxels; paired generation bends pool masks (mask_pool.deform_masks)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mask_classes == 1 or not 0 <= self.mask_classes <= 256:
            raise GeneratorError(f"ldm3d: mask_classes must be 0 (no masks) or 2..256, got {self.mask_classes}")

    @property
    def condition_channels(self) -> int:
        return self.mask_classes

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.autoencoder_channels) - 1)


def latent_condition(masks: torch.Tensor, cfg: Ldm3dConfig) -> torch.Tensor:
    """masks int64 ``(N, S, S, S)`` -> class fractions float32 ``(N, K, s, s, s)`` on the latent grid."""
    onehot = mask_onehot(masks, cfg.mask_classes)
    return F.avg_pool3d(onehot, cfg.downsampling) if cfg.downsampling > 1 else onehot


class Ldm3dSampler(LdmSampler):
    """``LdmSampler`` whose ``forward(noise, labels, condition)`` concatenates ``condition``
    float32 ``(N, K, s, s, s)`` (or nothing, when None) to the latent at every UNet call."""

    def forward(
        self, noise: torch.Tensor, labels: Optional[torch.Tensor] = None, condition: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        unet = self.unet
        if condition is not None:

            def unet(z: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
                return self.unet(torch.cat([z, condition.to(z.dtype)], dim=1), t, class_labels=class_labels)

        z = sample_latents(unet, noise, labels, self.timesteps, self.coef_x, self.coef_out)
        return decode_latents(self.autoencoder, z, self.scale_factor)


class Ldm3dModel:
    """A loaded 3D latent diffusion model implementing ``generators.contract.Generator`` (and
    ``MaskConditionedGenerator`` when its card's ``mask_classes`` > 0). ``sample_steps``
    (from the card) may be changed on the instance to trade speed for quality."""

    def __init__(self, card: ModelCard, state_dict: dict[str, torch.Tensor], device: str = "cpu") -> None:
        self.card = card
        self.cfg = Ldm3dConfig(**card.network)
        check_label_count(card, self.cfg.n_labels)
        self.device = torch.device(device)
        self.sample_steps = self.cfg.sample_steps
        self.mask_conditioned = self.cfg.mask_classes > 0
        self.mask_classes = self.cfg.mask_classes
        self.module = Ldm3dSampler(self.cfg)
        load_network(self.module, network_state(state_dict), card)
        self.module.to(self.device).eval().requires_grad_(False)
        self.pool = MaskPool.from_state(card, state_dict)

    def use_mask_pool(self, masks: np.ndarray, labels: Sequence[str]) -> None:
        """Draw label-conditioned masks from ``masks`` int (P, S, S, S) with one label each."""
        if not self.mask_conditioned:
            raise GeneratorError(f"{self.card.ref}: this ldm3d is not mask-conditioned; retrain with with_masks: true")
        self.pool = MaskPool.given(self.card, self.mask_classes, masks, labels)

    @torch.inference_mode()
    def generate(
        self, n: int, seed: int, condition: Sequence[str] | str | None = None, masks: np.ndarray | None = None
    ) -> GeneratedBatch:
        """``n`` volumes float32 (N, 1, S, S, S) in [0, 1]; same seed -> same output. Masks as
        in ``vae3d``: given ones come back unchanged, else they are drawn from the pool."""
        index = label_indices(self.card, n, condition)
        masks = batch_masks(self, masks, index, seed, n)
        labels = torch.tensor(index, dtype=torch.long, device=self.device)
        if self.module.timesteps.shape[0] != self.sample_steps:
            self.module.set_steps(self.sample_steps)
        side = self.cfg.latent_size
        noise = seeded_normal((n, self.cfg.latent_channels, side, side, side), seed).to(self.device)
        cond = None if masks is None else latent_condition(torch.from_numpy(masks), self.cfg).to(self.device)
        with autocast(self.device):
            images = self.module(noise, labels if self.cfg.n_labels > 0 else None, cond)
        return GeneratedBatch(
            images=images.float().cpu().numpy().astype(np.float32),
            masks=masks,
            labels=[self.card.conditioning.labels[i] for i in index],
        )


def train_ldm3d(
    data: TrainingData,
    spec: TrainSpec,
    *,
    device: str = "cpu",
    checkpoint: Path | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainedGenerator:
    """The ``ldm`` autoencoder stage (``ldm.train_autoencoder``, cached), then the latent UNet:
    rflow velocity (or ddim noise) MSE on ``scale_factor * z_mu``, the pooled mask
    concatenated when ``with_masks``; Adam(``lr_generator``), EMA UNet exported. History:
    the diffusion stage's ``loss`` per epoch."""
    side = require_volumes(data, "ldm3d")
    if len(set(side)) != 1:
        raise DataError(f"ldm3d trains on cubes (D = H = W), got volumes {list(side)}; use vae3d or cubic patches")
    k = volume_mask_classes(data, spec, "ldm3d")
    n_labels = len(data.label_names)
    cfg = replace(
        Ldm3dConfig.for_images(side[0], int(data.images.shape[1]), n_labels, spec),
        mask_classes=k,
        mask_deformation=spec.mask_deformation if k else 0.0,
    )
    cache = Path(checkpoint).parent / CACHE_FOLDER if checkpoint is not None else None
    autoencoder, scale, ae_time = train_autoencoder(data, cfg, spec, device=device, cache=cache)
    cfg = replace(cfg, scale_factor=scale)

    torch.manual_seed(spec.seed)
    sampler = Ldm3dSampler(cfg)
    unet = sampler.unet
    opt = make_optimizer(spec, unet, spec.lr_generator)
    noising = training_scheduler(cfg)

    def step(batch: Batch, ctx: StepContext) -> dict[str, float]:
        z = encode_images(autoencoder, batch.images) * scale
        condition = latent_condition(batch.masks, cfg) if k and batch.masks is not None else None
        loss = latent_diffusion_loss(unet, noising, cfg, spec, z, ctx, batch.labels if n_labels else None, condition)
        ctx.update(opt, loss, unet)
        return {"loss": float(loss.detach())}

    result = fit(
        Recipe({"unet": unet}, {"unet": opt}, step, "unet"),
        data,
        spec,
        device=device,
        checkpoint=checkpoint,
        on_epoch=on_epoch,
        with_masks=k > 0,
    )
    state = {f"autoencoder.{key}": v.detach().cpu().clone() for key, v in autoencoder.state_dict().items()}
    state.update({f"unet.{key}": v for key, v in result.state.items()})
    if k:
        state.update(pool_state(data, spec.mask_pool_size, spec.seed))
    return TrainedGenerator(
        architecture="ldm3d",
        state=state,
        network=cfg.network(),
        labels=data.label_names,
        mask_classes=k,
        history=result.history,
        time_s=ae_time + result.time_s,
        resumed_from_epoch=result.resumed_from_epoch,
    )
