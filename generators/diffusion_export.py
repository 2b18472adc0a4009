"""Diffusion models (``ddpm``, ``ldm``) and ``pix2pix`` in pure-torch form, for TorchScript export.

A diffusion model's TorchScript module holds its network(s) (MONAI's ``DiffusionModelUNet``
and, for ``ldm``, the ``AutoencoderKL`` decoder, both traced: MONAI's diffusion networks
are not scriptable) and a scripted sampling loop, :class:`DiffusionLoop`::

    images = module(latent)                 # latent (N, *latent_shape) float32, the initial noise
    images = module(latent, label_index)    # conditional: label_index (N,) int64 into the card's labels

with, for step ``i`` of the ``S`` steps (``t_i`` the UNet's timestep input)::

    out = unet(z, t_i, label_index)
    ddpm (DDIM, eta 0, clipped, as ``DDIMScheduler(clip_sample=True)``):
        x0 = clamp((z - sqrt(1 - a_i) out) / sqrt(a_i), -1, 1);  z = sqrt(a'_i) x0 + sqrt(1 - a'_i) out
    ldm (rflow Euler steps or unclipped DDIM, ``generators.architectures.ldm.sampling_plan``):
        z = coef_x[i] z + coef_out[i] out
    images = clamp((z + 1) / 2, 0, 1)                              ddpm
    images = clamp((decoder(z / scale_factor) + 1) / 2, 0, 1)      ldm

``latent`` is drawn per image from the seed stream (``generators.seed_stream``): image
``i`` of seed ``s`` starts from ``rng(s, i, 0).standard_normal(latent_shape, float32)``, so
the module reproduces ``generate(n, s)`` image for image (same float32 arithmetic on the
CPU; on CUDA ``generate`` runs the UNet under bf16 autocast, the module in float32).

``pix2pix``'s module takes ``forward(latent (N, 1, H, W), label_index (N,), masks (N, H, W)
int64)`` and returns the image channels plus the mask as one more channel; the mask pool is
inside it (buffers ``mask_pool_masks`` uint8 ``(P, H, W)``, ``mask_pool_labels`` int64
``(P,)``); image ``i``'s pool pick is ``candidates[rng(s, i, 1).integers(len(candidates))]``
with ``candidates`` the pool entries of its label in pool order.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from generators.latent import LatentModule

TRACE_BATCH = 2  # example batch the networks are traced with (the traced graphs take any N)


class _UnetCall(nn.Module):
    """``forward(z, t, labels)`` of a class-conditional ``DiffusionModelUNet`` (for tracing)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.unet(z, timesteps=t, class_labels=labels).float()


class _UnconditionalUnetCall(nn.Module):
    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.unet(z, timesteps=t).float()


class _Decode(nn.Module):
    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(z).float()


class _Identity(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z


class DiffusionLoop(nn.Module):
    """Scriptable sampling loop around traced networks (see the module docstring).
    Buffers ``(S,)`` float32: ``timesteps``; ``alpha``/``alpha_prev`` (clipped DDIM) or
    ``coef_x``/``coef_out`` (linear steps)."""

    def __init__(
        self,
        unet: nn.Module,
        decoder: nn.Module,
        timesteps: torch.Tensor,
        coef_a: torch.Tensor,
        coef_b: torch.Tensor,
        *,
        clip_x0: bool,
        n_labels: int,
        scale_factor: float,
        mask_pool: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        mask_classes: int = 0,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.decoder = decoder
        self.register_buffer("timesteps", timesteps.float().clone())
        self.register_buffer("coef_a", coef_a.float().clone())
        self.register_buffer("coef_b", coef_b.float().clone())
        self.clip_x0 = bool(clip_x0)
        self.n_labels = int(n_labels)
        self.scale_factor = float(scale_factor)
        self.mask_classes = int(mask_classes)
        if mask_pool is not None:  # mask-conditioned ddpm: masks are a third input (module docstring)
            self.register_buffer("mask_pool_masks", mask_pool[0].to(torch.uint8).clone())
            self.register_buffer("mask_pool_labels", mask_pool[1].long().clone())

    def forward(
        self, latent: torch.Tensor, label_index: Optional[torch.Tensor] = None, masks: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        n = latent.shape[0]
        if label_index is None:
            labels = torch.arange(n, device=latent.device) % max(self.n_labels, 1)
        else:
            labels = label_index.long()
        cond = torch.zeros(n, 0, latent.shape[2], latent.shape[3], device=latent.device)
        if self.mask_classes > 0:
            if masks is None:
                raise RuntimeError("this model needs masks (N, H, W) int64; draw them from mask_pool_masks")
            cond = F.one_hot(masks.long(), self.mask_classes).permute(0, 3, 1, 2).float()
        z = latent.float()
        for i in range(self.timesteps.shape[0]):
            x = torch.cat([z, cond], dim=1) if self.mask_classes > 0 else z
            out = self.unet(x, self.timesteps[i].expand(n), labels)
            if self.clip_x0:
                a = self.coef_a[i]
                a_prev = self.coef_b[i]
                x0 = torch.clamp((z - (1 - a) ** 0.5 * out) / a**0.5, -1.0, 1.0)
                z = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * out
            else:
                z = self.coef_a[i] * z + self.coef_b[i] * out
        images = torch.clamp((self.decoder(z / self.scale_factor) + 1) / 2, 0.0, 1.0)
        if self.mask_classes > 0 and masks is not None:
            return torch.cat([images, masks[:, None].float()], dim=1)
        return images


def _trace_unet(
    unet: nn.Module, latent_shape: tuple[int, ...], n_labels: int, extra_channels: int = 0
) -> torch.jit.ScriptModule:
    call = (_UnetCall if n_labels > 0 else _UnconditionalUnetCall)(unet).cpu().eval().requires_grad_(False)
    example = (
        torch.zeros(TRACE_BATCH, latent_shape[0] + extra_channels, *latent_shape[1:]),
        torch.full((TRACE_BATCH,), 1.0),
        torch.zeros(TRACE_BATCH, dtype=torch.long),
    )
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks become constants: fine
        return torch.jit.trace(call, example, check_trace=False)


def ddim_alphas(timesteps: int, steps: int, schedule: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(timesteps, alpha, alpha_prev), float32 ``(S,)`` each, of MONAI's ``DDIMScheduler``
    with ``steps`` inference steps (``a'`` = ``a_{t - T // S}``, or the final alpha when negative)."""
    from monai.networks.schedulers import DDIMScheduler

    ddim = DDIMScheduler(num_train_timesteps=timesteps, schedule=schedule, clip_sample=True)
    ddim.set_timesteps(steps)
    alpha, alpha_prev = [], []
    for t in ddim.timesteps.tolist():
        previous = t - timesteps // steps
        alpha.append(ddim.alphas_cumprod[t])
        alpha_prev.append(ddim.alphas_cumprod[previous] if previous >= 0 else ddim.final_alpha_cumprod)
    return ddim.timesteps.float(), torch.stack(alpha).float(), torch.stack(alpha_prev).float()


def _latent_module(
    loop: nn.Module, latent_shape: tuple[int, ...], labels: tuple[str, ...], channels: int, mask_channel: bool = False
) -> LatentModule:
    return LatentModule(
        module=loop.eval(),
        latent_dim=math.prod(latent_shape),
        latent_distribution="normal",
        labels=labels,
        image_channels=channels,
        value_range=(0.0, 1.0),
        mask_channel=mask_channel,
        latent_shape=latent_shape,
    )


def ddpm_latent_module(generator: Any) -> LatentModule:
    """A loaded ``DdpmModel`` as a latent module: traced UNet + clipped-DDIM loop with the
    instance's ``ddim_steps``. A mask-conditioned ddpm (``mask_classes`` K > 0) takes masks
    as a third input, holds its mask pool, and returns the mask as one more channel."""
    cfg = generator.cfg
    mask_classes = int(getattr(cfg, "mask_classes", 0))
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    t, alpha, alpha_prev = ddim_alphas(cfg.timesteps, int(generator.ddim_steps), cfg.schedule)
    pool = None
    if mask_classes:
        pool = (torch.from_numpy(generator.pool.masks.astype("uint8")), torch.from_numpy(generator.pool.labels))
    loop = DiffusionLoop(
        _trace_unet(generator.module, shape, cfg.n_labels, mask_classes),
        _Identity(),
        t,
        alpha,
        alpha_prev,
        clip_x0=True,
        n_labels=cfg.n_labels,
        scale_factor=1.0,
        mask_pool=pool,
        mask_classes=mask_classes,
    )
    labels = tuple(generator.card.conditioning.labels)
    return _latent_module(loop, shape, labels, cfg.channels, mask_channel=mask_classes > 0)


def ldm_latent_module(generator: Any) -> LatentModule:
    """A loaded ``LdmModel`` as a latent module: traced UNet and decoder + its sampling plan
    (``generators.architectures.ldm.sampling_plan``) with the instance's ``sample_steps``."""
    from generators.architectures.ldm import sampling_plan

    cfg = generator.cfg
    shape = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    plan = sampling_plan(cfg.sampler, cfg.timesteps, int(generator.sample_steps), cfg.schedule)
    decoder = _Decode(generator.module.autoencoder).cpu().eval().requires_grad_(False)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced_decoder = torch.jit.trace(decoder, (torch.zeros(TRACE_BATCH, *shape),), check_trace=False)
    loop = DiffusionLoop(
        _trace_unet(generator.module.unet, shape, cfg.n_labels),
        traced_decoder,
        plan.timesteps,
        plan.coef_x,
        plan.coef_out,
        clip_x0=False,
        n_labels=cfg.n_labels,
        scale_factor=float(cfg.scale_factor),
    )
    return _latent_module(loop, shape, tuple(generator.card.conditioning.labels), cfg.channels)


class Pix2pixLoop(nn.Module):
    """pix2pix as a scriptable module: ``forward(latent (N, 1, H, W), label_index (N,),
    masks (N, H, W) int64)`` -> ``(N, C + 1, H, W)``: sigmoid images, then the mask as a
    float channel. Holds the mask pool as buffers (module docstring)."""

    def __init__(
        self, net: nn.Module, mask_classes: int, n_labels: int, pool_masks: torch.Tensor, pool_labels: torch.Tensor
    ) -> None:
        super().__init__()
        self.net = net
        self.mask_classes = int(mask_classes)
        self.n_labels = int(n_labels)
        self.register_buffer("mask_pool_masks", pool_masks.to(torch.uint8).clone())
        self.register_buffer("mask_pool_labels", pool_labels.long().clone())

    def forward(
        self, latent: torch.Tensor, label_index: Optional[torch.Tensor] = None, masks: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        n = latent.shape[0]
        if label_index is None:
            labels = torch.arange(n, device=latent.device) % self.n_labels
        else:
            labels = label_index.long()
        if masks is None:
            raise RuntimeError("pix2pix needs masks (N, H, W) int64; draw them from mask_pool_masks")
        onehot = F.one_hot(masks.long(), self.mask_classes).permute(0, 3, 1, 2).float()
        label_maps = (
            F.one_hot(labels, self.n_labels).float()[:, :, None, None].expand(-1, -1, masks.shape[1], masks.shape[2])
        )
        raw = self.net(torch.cat([onehot, label_maps, latent.float()], dim=1))
        return torch.cat([torch.sigmoid(raw.float()), masks[:, None].float()], dim=1)


def pix2pix_latent_module(generator: Any) -> LatentModule:
    """A loaded ``Pix2pixModel`` as a mask-input latent module (module docstring)."""
    cfg = generator.cfg
    pool = generator.pool
    loop = Pix2pixLoop(
        generator.module.cpu().eval(),
        cfg.mask_classes,
        cfg.n_labels,
        torch.from_numpy(pool.masks.astype("uint8")),
        torch.from_numpy(pool.labels),
    )
    shape = (1, cfg.image_size, cfg.image_size)
    return _latent_module(loop, shape, tuple(generator.card.conditioning.labels), cfg.channels, mask_channel=True)
