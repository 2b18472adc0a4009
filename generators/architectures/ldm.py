"""Class-conditional latent diffusion (``ldm``): MONAI's ``AutoencoderKL`` compresses images
4x per side (64x64 -> 16x16 with the default three levels) and a class-conditional
``DiffusionModelUNet`` (``num_class_embeds``, as in ``ddpm``) learns the distribution of the
scaled latents, trained by rectified flow (``sampler: rflow``, velocity prediction, MONAI's
``RFlowScheduler``) or by DDPM (``sampler: ddim``, noise prediction, ``DDPMScheduler`` with
``noise_schedule``, sampled by DDIM). No other combination exists: the sampler decides the
training objective, and ``sample_steps`` (8-16 suit rflow) can be changed after training.

Training (one ``train`` stage, two ``generators.training.fit`` runs):

1. Autoencoder: ``autoencoder_epochs`` epochs of L1(recon, x) + ``autoencoder_kl_weight`` * KL
   on images scaled to [-1, 1], Adam(``autoencoder_lr``); the EMA autoencoder is kept. No
   perceptual loss (its ImageNet weights would be a download) and no patch-adversarial term:
   a discriminator roughly doubles the stage's cost and needs balancing, and on 64x64
   slices with a 4x (not 8x) compression the L1 reconstruction is already close
   (the training log reports its L1 and PSNR). The latent scale factor ``1 / std(z_mu)``
   over the training images is measured afterwards, as for ``LatentDiffusionInferer``.
   The result is cached next to the run's checkpoint (``<checkpoint dir>/ldm-autoencoder/
   <key>.safetensors`` + ``.json``), keyed by the sha256 of the training images, the
   autoencoder settings, seed, batch size, betas, device type, threads, torch version and
   this file's sha256: changing only diffusion settings reuses it. Its resumable checkpoint
   is ``<key>.ckpt`` in the same folder. Without a checkpoint path nothing is cached.
2. Diffusion: ``epochs`` epochs of MSE between the UNet's output and the target, on latents
   ``z = scale_factor * z_mu(encoder(2x - 1))`` of the (flipped) batch, timesteps ``t``
   uniform in {0..T-1} (``T = timesteps``), or for rflow with ``rflow_timesteps:
   logit-normal`` ``t = floor(sigmoid(u) T)``, ``u ~ N(0, 1)`` (more of the training on the
   middle of the path, where a few-step sampler needs the velocity most):
   rflow: ``z_t = (1 - t/T) z + (t/T) n``, target ``v = z - n``; ddim: ``z_t =
   sqrt(a_t) z + sqrt(1 - a_t) n``, target ``n``. Adam(``lr_generator``), EMA UNet exported.
   Resumable through the ``checkpoint`` the train stage passes.

Sampling (deterministic for a seed; :func:`sample_latents` and :func:`decode_latents` are
plain functions of tensors and modules so that :class:`LdmSampler` can be exported)::

    z = seeded_normal((N, latent_channels, h, h), seed)        # h = image_size / 2**(levels-1)
    for i in range(S):                                         # S = sample_steps
        out = unet(z, timesteps[i].expand(N), class_labels=labels)
        z = coef_x[i] * z + coef_out[i] * out
    images = clamp((autoencoder.decode(z / scale_factor) + 1) / 2, 0, 1)

with the plan of :func:`sampling_plan`: rflow (Euler steps of MONAI's ``RFlowScheduler``,
discrete timesteps ``t_i = round((1 - i/S) T)``, ``t_S = 0``): ``coef_x = 1``,
``coef_out = (t_i - t_{i+1}) / T``; ddim (MONAI ``DDIMScheduler``, eta 0, no clipping,
``t_i`` = ``linspace(T-1, 0, S)`` rounded, ``p = t_i - T // S``, ``a'`` = ``a_p`` or 1 when
``p < 0``): ``coef_x = sqrt(a'/a_t)``, ``coef_out = sqrt(1 - a') - sqrt(a' (1 - a_t) / a_t)``.
Both equal MONAI's ``step`` (tested).

Shapes: images float32 ``(N, C, H, W)`` in [0, 1]; labels int64 ``(N,)``; latents float32
``(N, latent_channels, h, h)``, roughly unit variance after scaling.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, ClassVar, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler
from torch import nn

from generators.architectures import autocast, check_label_count, label_indices, load_network, seeded_normal
from generators.card import ModelCard
from generators.contract import GeneratedBatch
from generators.errors import GeneratorError
from generators.shards import write_json_atomic
from generators.train_spec import TrainSpec
from generators.training import (
    Batch,
    Recipe,
    StepContext,
    TrainedGenerator,
    TrainingData,
    discard_checkpoint,
    fit,
    make_optimizer,
)
from generators.weights import load_weights, save_weights

log = logging.getLogger(__name__)
SAMPLERS = ("rflow", "ddim")
CACHE_FOLDER = "ldm-autoencoder"


@dataclass(frozen=True)
class LdmConfig:
    """Constructor arguments of both networks, the sampler and the latent scale factor;
    stored in the card's ``network`` field. ``autoencoder_channels`` has one entry per
    autoencoder level (``levels - 1`` stride-2 downsamplings); ``unet_channels`` and
    ``attention_levels`` one per UNet level. ``spatial_dims`` (a class attribute, not a
    card field) is 2 here; ``generators/architectures/ldm3d.py`` subclasses it for cubes,
    ``image_size`` then being the cube's side."""

    spatial_dims: ClassVar[int] = 2

    image_size: int
    channels: int
    n_labels: int
    autoencoder_channels: tuple[int, ...]
    latent_channels: int
    unet_channels: tuple[int, ...]
    attention_levels: tuple[bool, ...]
    num_res_blocks: int = 2
    sampler: str = "rflow"
    timesteps: int = 1000
    sample_steps: int = 12
    schedule: str = "cosine"
    scale_factor: float = 1.0

    def __post_init__(self) -> None:
        for name in ("autoencoder_channels", "unet_channels"):
            object.__setattr__(self, name, tuple(int(c) for c in getattr(self, name)))
        object.__setattr__(self, "attention_levels", tuple(bool(a) for a in self.attention_levels))
        if self.sampler not in SAMPLERS:
            raise GeneratorError(f"ldm: sampler must be one of {', '.join(SAMPLERS)}, got '{self.sampler}'")
        if not self.autoencoder_channels or any(c <= 0 or c % 8 for c in self.autoencoder_channels):
            raise GeneratorError(
                f"ldm: autoencoder_channels must be non-empty multiples of 8, got {list(self.autoencoder_channels)}"
            )
        down = 2 ** (len(self.autoencoder_channels) - 1)
        if self.image_size % down:
            raise GeneratorError(
                f"ldm: image size {self.image_size} must divide by {down} for {len(self.autoencoder_channels)} "
                "autoencoder levels; use fewer autoencoder_channels or resize the images"
            )
        if len(self.unet_channels) != len(self.attention_levels):
            raise GeneratorError("ldm: unet_channels and attention_levels need one entry per level each")
        if any(c % self.unet_groups for c in self.unet_channels):
            raise GeneratorError(f"ldm: every unet channel count must divide by {self.unet_groups}")
        if self.latent_size % 2 ** (len(self.unet_channels) - 1):
            raise GeneratorError(
                f"ldm: latent size {self.latent_size} must divide by {2 ** (len(self.unet_channels) - 1)} "
                f"for {len(self.unet_channels)} UNet levels"
            )
        if not 1 <= self.sample_steps <= self.timesteps:
            raise GeneratorError(
                f"ldm: sample_steps must be in [1, timesteps={self.timesteps}], got {self.sample_steps}"
            )
        if not (math.isfinite(self.scale_factor) and self.scale_factor > 0):
            raise GeneratorError(f"ldm: scale_factor must be a positive number, got {self.scale_factor}")

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.autoencoder_channels) - 1)

    @property
    def condition_channels(self) -> int:
        """Channels concatenated to the latent at the UNet's input (0: none; ldm3d's masks)."""
        return 0

    @property
    def autoencoder_groups(self) -> int:
        return math.gcd(32, *self.autoencoder_channels)

    @property
    def unet_groups(self) -> int:
        return math.gcd(32, *self.unet_channels)

    @classmethod
    def for_images(cls, image_size: int, channels: int, n_labels: int, spec: TrainSpec) -> "LdmConfig":
        """Autoencoder widths from ``spec.autoencoder_channels``; UNet widths b, 2b, 4b
        (``b = spec.base_channels``), one level per halving of the latent down to 4x4 (2 to 4
        levels), self-attention at the lowest level (and in the middle block)."""
        latent = image_size // 2 ** max(0, len(spec.autoencoder_channels) - 1)
        levels = max(2, min(4, latent.bit_length() - 2))
        b = spec.base_channels
        widths = tuple(spec.unet_channels or (b * min(2**i, 4) for i in range(levels)))
        return cls(
            image_size=image_size,
            channels=channels,
            n_labels=n_labels,
            autoencoder_channels=tuple(spec.autoencoder_channels),
            latent_channels=spec.latent_channels,
            unet_channels=widths,
            attention_levels=tuple(i == len(widths) - 1 for i in range(len(widths))),
            num_res_blocks=spec.unet_res_blocks,
            sampler=spec.sampler,
            timesteps=spec.timesteps,
            sample_steps=spec.sample_steps,
            schedule=spec.noise_schedule,
        )

    def network(self) -> dict:
        """The card's ``network`` field (lists instead of tuples)."""
        out = asdict(self)
        for name in ("autoencoder_channels", "unet_channels", "attention_levels"):
            out[name] = list(out[name])
        return out


def build_autoencoder(cfg: LdmConfig) -> AutoencoderKL:
    """``encode(x) -> (z_mu, z_sigma)``, ``decode(z) -> x``: x ``(N, C, H, W)`` in [-1, 1],
    z ``(N, latent_channels, h, h)``. No attention (convolutions only)."""
    levels = len(cfg.autoencoder_channels)
    return AutoencoderKL(
        spatial_dims=cfg.spatial_dims,
        in_channels=cfg.channels,
        out_channels=cfg.channels,
        num_res_blocks=1,
        channels=cfg.autoencoder_channels,
        attention_levels=(False,) * levels,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.autoencoder_groups,
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )


def build_unet(cfg: LdmConfig) -> DiffusionModelUNet:
    """``forward(z, timesteps, class_labels=y)``: z ``(N, latent_channels, h, h)`` -> same shape
    (with ``cfg.condition_channels`` > 0 the input has those channels appended)."""
    return DiffusionModelUNet(
        spatial_dims=cfg.spatial_dims,
        in_channels=cfg.latent_channels + cfg.condition_channels,
        out_channels=cfg.latent_channels,
        num_res_blocks=cfg.num_res_blocks,
        channels=cfg.unet_channels,
        attention_levels=cfg.attention_levels,
        norm_num_groups=cfg.unet_groups,
        num_head_channels=tuple(math.gcd(c, 32) for c in cfg.unet_channels),
        num_class_embeds=cfg.n_labels if cfg.n_labels > 0 else None,
    )


@dataclass(frozen=True)
class SamplingPlan:
    """float32 ``(S,)`` tensors: the UNet's timestep input and the two coefficients of each
    step ``z <- coef_x[i] * z + coef_out[i] * unet(z, timesteps[i])``."""

    timesteps: torch.Tensor
    coef_x: torch.Tensor
    coef_out: torch.Tensor


def sampling_plan(sampler: str, timesteps: int, steps: int, schedule: str = "cosine") -> SamplingPlan:
    """The ``steps``-step plan of ``sampler`` (``rflow`` or ``ddim``) for a UNet trained with
    ``timesteps`` training timesteps (module docstring has the formulas)."""
    if sampler == "rflow":
        rflow = RFlowScheduler(num_train_timesteps=timesteps, use_discrete_timesteps=True)
        rflow.set_timesteps(steps)
        t = rflow.timesteps.double()
        following = torch.cat([t[1:], t.new_zeros(1)])
        return SamplingPlan(t.float(), torch.ones(steps), ((t - following) / timesteps).float())
    if sampler == "ddim":
        ddim = DDIMScheduler(num_train_timesteps=timesteps, schedule=schedule, clip_sample=False)
        ddim.set_timesteps(steps)
        alphas = ddim.alphas_cumprod.double()
        coef_x, coef_out = [], []
        for t in ddim.timesteps.tolist():
            previous = t - timesteps // steps
            a, a_prev = alphas[t], alphas[previous] if previous >= 0 else ddim.final_alpha_cumprod.double()
            coef_x.append(float(torch.sqrt(a_prev / a)))
            coef_out.append(float(torch.sqrt(1 - a_prev) - torch.sqrt(a_prev * (1 - a) / a)))
        return SamplingPlan(ddim.timesteps.float(), torch.tensor(coef_x), torch.tensor(coef_out))
    raise GeneratorError(f"ldm: sampler must be one of {', '.join(SAMPLERS)}, got '{sampler}'")


def sample_latents(
    unet: nn.Module,
    noise: torch.Tensor,
    labels: Optional[torch.Tensor],
    timesteps: torch.Tensor,
    coef_x: torch.Tensor,
    coef_out: torch.Tensor,
) -> torch.Tensor:
    """Run the plan from ``noise`` float32 ``(N, L, h, h)``; returns float32 scaled latents,
    same shape. ``labels`` int64 ``(N,)`` (None for an unconditional UNet); plan tensors
    ``(S,)`` on ``noise``'s device."""
    z = noise
    for i in range(timesteps.shape[0]):
        out = unet(z, timesteps[i].expand(z.shape[0]), class_labels=labels).float()
        z = coef_x[i] * z + coef_out[i] * out
    return z


def decode_latents(autoencoder: nn.Module, z: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """Scaled latents ``(N, L, h, h)`` -> float32 images ``(N, C, H, W)`` in [0, 1]."""
    return ((autoencoder.decode(z / scale_factor).float() + 1) / 2).clamp(0, 1)


class LdmSampler(nn.Module):
    """Both networks plus the sampling plan as buffers: ``forward(noise, labels)`` runs
    :func:`sample_latents` then :func:`decode_latents`. The state dict (the weights file) holds
    ``autoencoder.*`` and ``unet.*`` only; the plan follows the config (``set_steps``)."""

    def __init__(self, cfg: LdmConfig) -> None:
        super().__init__()
        self.autoencoder = build_autoencoder(cfg)
        self.unet = build_unet(cfg)
        self.cfg = cfg
        self.scale_factor = float(cfg.scale_factor)
        for name in ("timesteps", "coef_x", "coef_out"):
            self.register_buffer(name, torch.zeros(0), persistent=False)
        self.set_steps(cfg.sample_steps)

    def set_steps(self, steps: int) -> None:
        """Use a ``steps``-step plan (1 to ``timesteps``) from now on."""
        if not 1 <= steps <= self.cfg.timesteps:
            raise GeneratorError(f"ldm: sample steps must be in [1, {self.cfg.timesteps}], got {steps}")
        plan = sampling_plan(self.cfg.sampler, self.cfg.timesteps, steps, self.cfg.schedule)
        device = self.timesteps.device
        self.timesteps, self.coef_x, self.coef_out = (
            plan.timesteps.to(device),
            plan.coef_x.to(device),
            plan.coef_out.to(device),
        )

    def forward(self, noise: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """noise float32 ``(N, L, h, h)``, labels int64 ``(N,)`` -> images float32 ``(N, C, H, W)`` in [0, 1]."""
        z = sample_latents(self.unet, noise, labels, self.timesteps, self.coef_x, self.coef_out)
        return decode_latents(self.autoencoder, z, self.scale_factor)


class LdmModel:
    """A loaded latent diffusion model implementing ``generators.contract.Generator``.
    ``sample_steps`` (from the card) may be changed on the instance to trade speed for quality."""

    def __init__(self, card: ModelCard, state_dict: dict[str, torch.Tensor], device: str = "cpu") -> None:
        self.card = card
        self.cfg = LdmConfig(**card.network)
        check_label_count(card, self.cfg.n_labels)
        self.device = torch.device(device)
        self.sample_steps = self.cfg.sample_steps
        self.module = LdmSampler(self.cfg)
        load_network(self.module, state_dict, card)
        self.module.to(self.device).eval().requires_grad_(False)

    @torch.inference_mode()
    def generate(self, n: int, seed: int, condition: Sequence[str] | str | None = None) -> GeneratedBatch:
        """``n`` samples; float32 images (N, C, H, W) in [0, 1]. Same seed -> same output."""
        index = label_indices(self.card, n, condition)
        labels = torch.tensor(index, dtype=torch.long, device=self.device)
        if self.module.timesteps.shape[0] != self.sample_steps:
            self.module.set_steps(self.sample_steps)
        shape = (n, self.cfg.latent_channels, self.cfg.latent_size, self.cfg.latent_size)
        noise = seeded_normal(shape, seed).to(self.device)
        with autocast(self.device):
            images = self.module(noise, labels if self.cfg.n_labels > 0 else None)
        return GeneratedBatch(
            images=images.float().cpu().numpy().astype(np.float32),
            masks=None,
            labels=[self.card.conditioning.labels[i] for i in index],
        )


# --------------------------------------------------------------------------- training


def _kl(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma) || N(0, I)) summed over the latent, averaged over the batch."""
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-12) - 1)
    return kl.flatten(1).sum(1).mean()


def autoencoder_key(data: TrainingData, cfg: LdmConfig, spec: TrainSpec, device: str) -> str:
    """sha256 of everything that determines the autoencoder's weights (module docstring)."""
    images = np.ascontiguousarray(data.images, dtype=np.float32)
    parts = {
        "images": hashlib.sha256(images.tobytes()).hexdigest(),
        "shape": list(images.shape),
        "channels": list(cfg.autoencoder_channels),
        "latent_channels": cfg.latent_channels,
        "epochs": spec.autoencoder_epochs,
        "lr": spec.autoencoder_lr,
        "kl_weight": spec.autoencoder_kl_weight,
        "batch_size": spec.batch_size,
        "betas": list(spec.betas),
        "amp": spec.amp,
        "seed": spec.seed,
        "device": torch.device(device).type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


@torch.no_grad()
def encode_images(autoencoder: AutoencoderKL, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """float32 ``z_mu`` ``(N, L, h, h)`` (unscaled) of images ``(N, C, H, W)`` in [0, 1], in batches."""
    device = next(autoencoder.parameters()).device
    return torch.cat(
        [
            autoencoder.encode(images[i : i + batch_size].to(device) * 2 - 1)[0].float()
            for i in range(0, len(images), batch_size)
        ]
    )


def _load_cached(path: Path, autoencoder: AutoencoderKL) -> float | None:
    """Load a cached autoencoder into ``autoencoder``; its scale factor, or None when there is
    no usable cache (a damaged one is discarded with a warning)."""
    meta_path = path.with_suffix(".json")
    if not (path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        state = load_weights(path, meta["sha256"], "safetensors")
        autoencoder.load_state_dict(state)
        return float(meta["scale_factor"])
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, GeneratorError) as exc:
        log.warning("%s: unusable cached autoencoder (%s); retraining it", path.name, str(exc).splitlines()[0][:120])
        path.unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)
        return None


def train_autoencoder(
    data: TrainingData, cfg: LdmConfig, spec: TrainSpec, *, device: str, cache: Path | None
) -> tuple[AutoencoderKL, float, float]:
    """The EMA autoencoder (on ``device``, eval, frozen), its latent scale factor and the
    seconds spent training (0 on a cache hit). ``cache``: the folder of cached autoencoders
    (None: train without caching or checkpoints)."""
    torch.manual_seed(spec.seed)
    autoencoder = build_autoencoder(cfg)
    key = autoencoder_key(data, cfg, spec, device)
    weights = cache / f"{key}.safetensors" if cache is not None else None
    scale = _load_cached(weights, autoencoder) if weights is not None else None
    if scale is not None:
        log.info("ldm: reusing the cached autoencoder %s (scale factor %.4f)", key[:12], scale)
        return autoencoder.to(device).eval().requires_grad_(False), scale, 0.0
    opt = make_optimizer(spec, autoencoder, spec.autoencoder_lr)

    def step(batch: Batch, ctx: StepContext) -> dict[str, float]:
        x = batch.images * 2 - 1
        with ctx.autocast():
            z_mu, z_sigma = autoencoder.encode(x)
            z_mu, z_sigma = z_mu.float(), z_sigma.float()
            recon = autoencoder.decode(z_mu + ctx.randn(*z_mu.shape) * z_sigma).float()
        l1 = (recon - x).abs().mean()
        kl = _kl(z_mu, z_sigma)
        ctx.update(opt, l1 + spec.autoencoder_kl_weight * kl, autoencoder)
        return {"ae_l1": float(l1.detach()), "ae_kl": float(kl.detach())}

    def progress(epoch: int, row: dict[str, float]) -> None:
        if epoch == 1 or epoch % max(1, spec.autoencoder_epochs // 10) == 0 or epoch == spec.autoencoder_epochs:
            log.info(
                "autoencoder epoch %d/%d  L1 %.4f  KL %.1f", epoch, spec.autoencoder_epochs, row["ae_l1"], row["ae_kl"]
            )

    checkpoint = cache / f"{key}.ckpt" if cache is not None else None
    stage = spec.model_copy(update={"epochs": spec.autoencoder_epochs})
    result = fit(
        Recipe({"autoencoder": autoencoder}, {"autoencoder": opt}, step, "autoencoder"),
        data,
        stage,
        device=device,
        checkpoint=checkpoint,
        on_epoch=progress,
    )
    autoencoder.load_state_dict(result.state)
    autoencoder.to(device).eval().requires_grad_(False)
    images = torch.from_numpy(data.images)
    z = encode_images(autoencoder, images)
    scale = 1.0 / float(z.std())
    with torch.no_grad():
        recon = decode_latents(autoencoder, z, 1.0).cpu()
    mse = float(F.mse_loss(recon, images))
    log.info(
        "ldm: autoencoder trained in %.0f s; train L1 %.4f, PSNR %.1f dB, latent std %.4f",
        result.time_s,
        float((recon - images).abs().mean()),
        10 * math.log10(1.0 / max(mse, 1e-12)),
        1.0 / scale,
    )
    if weights is not None:
        weights.parent.mkdir(parents=True, exist_ok=True)
        tmp = weights.with_name(f".{weights.name}.tmp")
        sha = save_weights(autoencoder.state_dict(), tmp)
        os.replace(tmp, weights)
        write_json_atomic(
            {"sha256": sha, "scale_factor": scale, "history": result.history}, weights.with_suffix(".json")
        )
        discard_checkpoint(checkpoint)
    return autoencoder, scale, result.time_s


def training_scheduler(cfg: LdmConfig) -> RFlowScheduler | DDPMScheduler:
    """The noising scheduler of the diffusion stage: rectified flow or DDPM (``cfg.sampler``)."""
    if cfg.sampler == "rflow":
        return RFlowScheduler(num_train_timesteps=cfg.timesteps, use_discrete_timesteps=True)
    return DDPMScheduler(num_train_timesteps=cfg.timesteps, schedule=cfg.schedule)


def latent_diffusion_loss(
    unet: torch.nn.Module,
    noising: RFlowScheduler | DDPMScheduler,
    cfg: LdmConfig,
    spec: TrainSpec,
    z: torch.Tensor,
    ctx: StepContext,
    class_labels: torch.Tensor | None,
    condition: torch.Tensor | None = None,
) -> torch.Tensor:
    """One diffusion-stage loss on scaled latents ``z`` ``(B, C, *latent)``: noise and
    timesteps from ``ctx`` (logit-normal timesteps for ``rflow_timesteps: logit-normal``),
    ``condition`` (B, K, *latent) concatenated to the noisy latent when given; MSE of the
    UNet's output against the velocity ``z - noise`` (rflow) or the noise (ddim). 2D and 3D."""
    noise = ctx.randn(*z.shape)
    if cfg.sampler == "rflow" and spec.rflow_timesteps == "logit-normal":
        timesteps = (torch.sigmoid(ctx.randn(len(z))) * cfg.timesteps).long().clamp_(0, cfg.timesteps - 1)
    else:
        timesteps = ctx.randint(cfg.timesteps, len(z))
    noisy = noising.add_noise(original_samples=z, noise=noise, timesteps=timesteps)
    if condition is not None:
        noisy = torch.cat([noisy, condition], dim=1)
    target = z - noise if cfg.sampler == "rflow" else noise
    with ctx.autocast():
        prediction = unet(noisy, timesteps=timesteps, class_labels=class_labels).float()
    return F.mse_loss(prediction, target)


def train_ldm(
    data: TrainingData,
    spec: TrainSpec,
    *,
    device: str = "cpu",
    checkpoint: Path | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainedGenerator:
    """Train (or reuse from the cache) the autoencoder, then the latent diffusion UNet
    (module docstring). History: the diffusion stage's ``loss`` per epoch; the autoencoder's
    is in its cache's ``.json``."""
    n_labels = len(data.label_names)
    cfg = LdmConfig.for_images(int(data.images.shape[-1]), int(data.images.shape[1]), n_labels, spec)
    cache = Path(checkpoint).parent / CACHE_FOLDER if checkpoint is not None else None
    autoencoder, scale, ae_time = train_autoencoder(data, cfg, spec, device=device, cache=cache)
    cfg = LdmConfig(**{**asdict(cfg), "scale_factor": scale})

    torch.manual_seed(spec.seed)
    unet = build_unet(cfg)
    opt = make_optimizer(spec, unet, spec.lr_generator)
    noising = training_scheduler(cfg)

    def step(batch: Batch, ctx: StepContext) -> dict[str, float]:
        z = encode_images(autoencoder, batch.images) * scale
        loss = latent_diffusion_loss(unet, noising, cfg, spec, z, ctx, batch.labels if n_labels else None)
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
    state = {f"autoencoder.{k}": v.detach().cpu().clone() for k, v in autoencoder.state_dict().items()}
    state.update({f"unet.{k}": v for k, v in result.state.items()})
    return TrainedGenerator(
        architecture="ldm",
        state=state,
        network=cfg.network(),
        labels=data.label_names,
        mask_classes=0,
        history=result.history,
        time_s=ae_time + result.time_s,
        resumed_from_epoch=result.resumed_from_epoch,
    )
