"""Class-conditional (and optionally mask-conditional) 3D variational autoencoder (``vae3d``)
built from MONAI blocks (``Convolution``, ``ResidualUnit``, ``spatial_dims=3``): light
enough to train on a CPU in minutes at 16^3-32^3.

Networks (``b = base_channels``, ``L`` levels of stride 2 down to a side of 3-8 voxels,
widths ``b, 2b, 4b, ...``):

- encoder: the volume, one constant map per class label (one-hot) and, mask-conditioned,
  the one-hot mask -> ``L`` strided residual units -> flatten -> ``(mu, logvar)``, each
  ``(N, latent_dim)``;
- decoder: ``z`` with the one-hot label appended -> linear -> the coarsest grid, then per
  level: nearest-neighbour upsampling, the mask's class fractions at that scale
  concatenated (mask-conditioned), a convolution and (below full size) a residual unit;
  last, the full-size one-hot mask concatenated again, a 1x1x1 convolution and a sigmoid.

With ``with_masks: true`` (``mask_classes`` K > 0 in the card's ``network``) the model is a
``generators.contract.MaskConditionedGenerator``: ``generate(n, seed, condition, masks)``
makes a volume for each given mask int64 ``(N, D, H, W)`` in [0, K) and returns those masks
unchanged; without ``masks`` it draws them (seeded, by label) from the training masks stored
with its weights (``generators/architectures/mask_pool.py``): paired volume + mask synthesis.
Since the decoder sees the mask at every scale, tissue boundaries follow the mask exactly
and the latent code carries what the mask does not (intensity, texture).

Loss per volume, averaged over the batch: sum of squared errors + ``kl_weight`` * KL(q(z|x) ||
N(0, I)), plus, when ``adversarial_weight`` > 0, that weight times the hinge generator loss
of a small MONAI ``PatchDiscriminator(spatial_dims=3)`` (which sees the volume and the mask)
scaled by the voxel count, so that it is comparable with the summed squared error.
Generation decodes ``z ~ N(0, I)`` drawn from the per-image seed stream
(``generators.seed_stream``), so image ``i`` depends on ``(seed, i)`` only.

CPU budget (measured on the project's 2-core CPU, 256 MNI152 T1 cubes of 24^3 with GM/WM
masks): ``base_channels: 8, latent_dim: 32, batch_size: 4, lr_generator: 2e-3, betas:
[0.9, 0.999], lr_discriminator: 5e-4`` and the default ``adversarial_weight`` take 11-16 s per
epoch with ONE torch thread (two threads were slower: ~1.7x on an idle CPU, ~10x on a
loaded one); 16-20 epochs give WM brighter than GM, dark CSF/background, along the given
mask. The TrainSpec defaults (``base_channels: 32``, ``batch_size: 32``) suit a GPU.

Shapes: volumes float32 ``(N, 1, D, H, W)`` in [0, 1] (sigmoid output); masks int64
``(N, D, H, W)``; labels int64 ``(N,)``; latent ``(N, latent_dim)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit
from monai.networks.nets import PatchDiscriminator
from torch import nn

from generators.architectures import autocast, check_label_count, label_indices, load_network, seeded_normal
from generators.architectures.mask_pool import MaskPool, batch_masks, network_state, pool_state
from generators.card import ModelCard
from generators.contract import GeneratedBatch
from generators.errors import DataError, GeneratorError
from generators.train_spec import TrainSpec
from generators.training import Batch, Recipe, StepContext, TrainedGenerator, TrainingData, fit, make_optimizer

ACT = ("leakyrelu", {"negative_slope": 0.2})


def volume_levels(size: Sequence[int], most: int = 4) -> int:
    """Stride-2 levels that take every side of ``size`` (D, H, W) down to >= 3 voxels while
    staying whole (at least 1, at most ``most``): 16 -> 2, 24 -> 3, 32 -> 3, 64 -> 4."""
    levels = 0
    while levels < most and all(s % 2 ** (levels + 1) == 0 and s // 2 ** (levels + 1) >= 3 for s in size):
        levels += 1
    return max(1, levels)


@dataclass(frozen=True)
class Vae3dConfig:
    """Constructor arguments; stored in the card's ``network`` field. ``mask_classes`` > 0:
    mask-conditioned (the one-hot mask goes into the encoder and every decoder scale)."""

    volume_size: tuple[int, int, int]
    channels: int
    n_labels: int
    latent_dim: int = 64
    base_channels: int = 16
    mask_classes: int = 0
    mask_deformation: float = 0.0  # voxels; paired generation bends pool masks (mask_pool.deform_masks)
    mask_sigma: float = 0.75  # voxels; the decoder sees the one-hot mask blurred by this Gaussian (mask_onehot)

    def __post_init__(self) -> None:
        object.__setattr__(self, "volume_size", tuple(int(s) for s in self.volume_size))
        if len(self.volume_size) != 3 or min(self.volume_size) < 8 or any(s % 2 for s in self.volume_size):
            raise GeneratorError(f"vae3d needs a volume (D, H, W) with even sides >= 8, got {list(self.volume_size)}")
        if self.n_labels < 1:
            raise GeneratorError("vae3d is class-conditional and needs at least one label; give the volumes labels")
        if self.mask_classes == 1 or not 0 <= self.mask_classes <= 256:
            raise GeneratorError(f"vae3d: mask_classes must be 0 (no masks) or 2..256, got {self.mask_classes}")

    @property
    def levels(self) -> int:
        return volume_levels(self.volume_size)

    @property
    def widths(self) -> tuple[int, ...]:
        """Channels after each level (the full-size stem has ``base_channels``)."""
        return tuple(self.base_channels * 2 ** min(i + 1, 3) for i in range(self.levels))

    @property
    def bottom(self) -> tuple[int, int, int]:
        return tuple(s // 2**self.levels for s in self.volume_size)

    def network(self) -> dict:
        out = asdict(self)
        out["volume_size"] = list(self.volume_size)
        return out


def _norm(channels: int) -> tuple:
    return ("group", {"num_groups": math.gcd(8, channels)})


def _conv(cin: int, cout: int, strides: int = 1) -> Convolution:
    return Convolution(3, cin, cout, strides=strides, act=ACT, norm=_norm(cout))


def _res(cin: int, cout: int, strides: int = 1) -> ResidualUnit:
    return ResidualUnit(3, cin, cout, strides=strides, subunits=2, act=ACT, norm=_norm(cout))


def mask_onehot(masks: torch.Tensor, k: int, sigma: float = 0.0) -> torch.Tensor:
    """masks int64 ``(N, D, H, W)`` in [0, K) -> one-hot float32 ``(N, K, D, H, W)``, blurred
    by a Gaussian of ``sigma`` voxels when > 0 (class fractions that still sum to 1). A
    label map is a hard threshold of tissue that a scanner images with partial volume at
    every boundary; conditioning on the blurred map lets the decoder draw those soft
    boundaries instead of piecewise-constant tissue."""
    onehot = F.one_hot(masks, k).permute(0, 4, 1, 2, 3).float()
    if sigma <= 0:
        return onehot
    radius = max(1, int(math.ceil(2 * sigma)))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32, device=masks.device) / sigma) ** 2)
    taps = taps / taps.sum()
    flat = onehot.reshape(-1, 1, *onehot.shape[2:])
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = taps.numel()
        padding = [0, 0, 0]
        padding[axis] = radius
        flat = F.conv3d(F.pad(flat, [p for p in reversed(padding) for _ in (0, 1)], mode="replicate"), taps.view(shape))
    return flat.reshape(onehot.shape)


class ConditionalVae3d(nn.Module):
    """``encode(x, labels, masks) -> (mu, logvar)``, ``decode(z, labels, masks) -> volumes``:
    x ``(N, C, D, H, W)`` in [0, 1], labels one-hot ``(N, n_labels)``, masks one-hot
    ``(N, K, D, H, W)`` (None when not mask-conditioned), mu/logvar/z ``(N, latent_dim)``."""

    def __init__(self, cfg: Vae3dConfig) -> None:
        super().__init__()
        self.cfg = cfg
        b, k, widths = cfg.base_channels, cfg.mask_classes, cfg.widths
        self.stem = _conv(cfg.channels + cfg.n_labels + k, b)
        self.down = nn.ModuleList(_res(c_in, c_out, 2) for c_in, c_out in zip((b, *widths[:-1]), widths, strict=True))
        cells = widths[-1] * math.prod(cfg.bottom)
        self.to_stats = nn.Linear(cells, 2 * cfg.latent_dim)
        self.from_latent = nn.Linear(cfg.latent_dim + cfg.n_labels, cells)
        ups = (*reversed(widths[:-1]), b)  # channels after each upsampling, coarse to fine
        self.up_conv = nn.ModuleList(_conv(c_in + k, c_out) for c_in, c_out in zip(reversed(widths), ups, strict=True))
        # no residual unit at full size, where a convolution costs the most voxels
        self.up_res = nn.ModuleList([*(_res(c, c) for c in ups[:-1]), nn.Identity()])
        self.head = Convolution(3, b + k, cfg.channels, kernel_size=1, conv_only=True)

    def encode(
        self, x: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        maps = labels[:, :, None, None, None].expand(-1, -1, *x.shape[2:])
        h = self.stem(torch.cat([x, maps] + ([masks] if masks is not None else []), dim=1))
        for block in self.down:
            h = block(h)
        mu, logvar = self.to_stats(h.flatten(1)).chunk(2, dim=1)
        return mu, logvar.clamp(-12, 8)

    def decode(self, z: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        h = self.from_latent(torch.cat([z, labels], dim=1)).view(len(z), self.cfg.widths[-1], *self.cfg.bottom)
        for level, (conv, res) in enumerate(zip(self.up_conv, self.up_res, strict=True)):
            h = F.interpolate(h, scale_factor=2, mode="nearest")
            if masks is not None:
                factor = 2 ** (self.cfg.levels - 1 - level)
                h = torch.cat([h, F.avg_pool3d(masks, factor) if factor > 1 else masks], dim=1)
            h = res(conv(h))
        if masks is not None:
            h = torch.cat([h, masks], dim=1)
        return torch.sigmoid(self.head(h))

    def forward(self, z: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(z, labels, masks)


class Vae3dModel:
    """A loaded 3D VAE implementing ``generators.contract.Generator`` (and
    ``MaskConditionedGenerator`` when its card's ``mask_classes`` > 0)."""

    def __init__(self, card: ModelCard, state_dict: dict[str, torch.Tensor], device: str = "cpu") -> None:
        self.card = card
        self.cfg = Vae3dConfig(**card.network)
        check_label_count(card, self.cfg.n_labels)
        self.device = torch.device(device)
        self.mask_conditioned = self.cfg.mask_classes > 0
        self.mask_classes = self.cfg.mask_classes
        self.module = ConditionalVae3d(self.cfg)
        load_network(self.module, network_state(state_dict), card)
        self.module.to(self.device).eval()
        self.pool = MaskPool.from_state(card, state_dict)

    def use_mask_pool(self, masks: np.ndarray, labels: Sequence[str]) -> None:
        """Draw label-conditioned masks from ``masks`` int (P, D, H, W) with one label each."""
        if not self.mask_conditioned:
            raise GeneratorError(f"{self.card.ref}: this vae3d is not mask-conditioned; retrain with with_masks: true")
        self.pool = MaskPool.given(self.card, self.mask_classes, masks, labels)

    @torch.inference_mode()
    def generate(
        self, n: int, seed: int, condition: Sequence[str] | str | None = None, masks: np.ndarray | None = None
    ) -> GeneratedBatch:
        """``n`` volumes float32 (N, 1, D, H, W) in [0, 1]; same seed -> same output.
        Mask-conditioned: ``masks`` int (N, D, H, W) in [0, K) come back unchanged as the
        batch's masks (int64); without them, masks are drawn from the pool by label."""
        index = label_indices(self.card, n, condition)
        masks = batch_masks(self, masks, index, seed, n)
        onehot = F.one_hot(torch.tensor(index, dtype=torch.long), self.cfg.n_labels).float().to(self.device)
        cond = (
            None
            if masks is None
            else mask_onehot(torch.from_numpy(masks), self.mask_classes, self.cfg.mask_sigma).to(self.device)
        )
        z = seeded_normal((n, self.cfg.latent_dim), seed).to(self.device)
        with autocast(self.device):
            images = self.module.decode(z, onehot, cond).float()
        return GeneratedBatch(
            images=images.clamp(0, 1).cpu().numpy().astype(np.float32),
            masks=masks,
            labels=[self.card.conditioning.labels[i] for i in index],
        )


def volume_mask_classes(data: TrainingData, spec: TrainSpec, architecture: str) -> int:
    """K for ``spec.with_masks`` (0 without masks); DataError when the masks are missing."""
    if not spec.with_masks:
        return 0
    if data.masks is None:
        raise DataError(
            f"{architecture} with_masks needs a mask for every training volume; ingest masks or set with_masks: false"
        )
    return max(data.mask_classes, int(data.masks.max()) + 1, 2)


def require_volumes(data: TrainingData, architecture: str) -> tuple[int, int, int]:
    """(D, H, W) of the training volumes; DataError for 2D images."""
    if data.images.ndim != 5:
        raise DataError(
            f"{architecture} trains on volumes (N, 1, D, H, W), got images of shape {data.images.shape}; "
            "set preprocess.dims: 3 or use a 2D architecture"
        )
    return tuple(int(s) for s in data.images.shape[2:])


def train_vae3d(
    data: TrainingData,
    spec: TrainSpec,
    *,
    device: str = "cpu",
    checkpoint: Path | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainedGenerator:
    """Train the 3D CVAE with Adam(``lr_generator``, ``betas``) (the discriminator, when
    ``adversarial_weight`` > 0, with Adam(``lr_discriminator``)). History: ``loss``,
    ``loss_recon``, ``loss_kl`` (before weighting), and ``loss_adv``/``loss_d`` with the
    discriminator."""
    size = require_volumes(data, "vae3d")
    k = volume_mask_classes(data, spec, "vae3d")
    cfg = Vae3dConfig(
        size,
        int(data.images.shape[1]),
        len(data.label_names),
        spec.latent_dim,
        spec.base_channels,
        k,
        spec.mask_deformation if k else 0.0,
    )
    torch.manual_seed(spec.seed)
    vae = ConditionalVae3d(cfg)
    opt = make_optimizer(spec, vae, spec.lr_generator)
    networks: dict[str, nn.Module] = {"vae": vae}
    optimizers: dict[str, torch.optim.Optimizer] = {"vae": opt}
    adversarial = spec.adversarial_weight > 0
    if adversarial:
        disc = PatchDiscriminator(
            spatial_dims=3, channels=spec.base_channels, in_channels=cfg.channels + k, num_layers_d=2, norm="INSTANCE"
        )
        networks["disc"], optimizers["disc"] = disc, make_optimizer(spec, disc, spec.lr_discriminator)
    voxels = math.prod(size) * cfg.channels

    def critic(x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return networks["disc"](x if cond is None else torch.cat([x, cond], dim=1))[-1]

    def step(batch: Batch, ctx: StepContext) -> dict[str, float]:
        onehot = F.one_hot(batch.labels, cfg.n_labels).float()
        cond = None if batch.masks is None or not k else mask_onehot(batch.masks, k, cfg.mask_sigma)
        eps = ctx.randn(len(batch.images), cfg.latent_dim)
        with ctx.autocast():
            mu, logvar = vae.encode(batch.images, onehot, cond)
            mu, logvar = mu.float(), logvar.float()
            recon = vae.decode(mu + eps * torch.exp(0.5 * logvar), onehot, cond).float()
        recon_loss = (recon - batch.images).pow(2).flatten(1).sum(1).mean()
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum(1).mean()
        loss = recon_loss + spec.kl_weight * kl
        row = {"loss_recon": float(recon_loss.detach()), "loss_kl": float(kl.detach())}
        if adversarial:
            with ctx.autocast():
                adv = -critic(recon, cond).float().mean()
            loss = loss + spec.adversarial_weight * voxels * adv
            row["loss_adv"] = float(adv.detach())
        ctx.update(opt, loss, vae)
        if adversarial:
            with ctx.autocast():
                real, fake = critic(batch.images, cond).float(), critic(recon.detach(), cond).float()
            loss_d = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
            ctx.update(optimizers["disc"], loss_d, networks["disc"])
            row["loss_d"] = float(loss_d.detach())
        return {"loss": float(loss.detach()), **row}

    result = fit(
        Recipe(networks, optimizers, step, "vae"),
        data,
        spec,
        device=device,
        checkpoint=checkpoint,
        on_epoch=on_epoch,
        with_masks=k > 0,
    )
    state = {**result.state, **pool_state(data, spec.mask_pool_size, spec.seed)} if k else result.state
    return TrainedGenerator(
        architecture="vae3d",
        state=state,
        network=cfg.network(),
        labels=data.label_names,
        mask_classes=k,
        history=result.history,
        time_s=result.time_s,
        resumed_from_epoch=result.resumed_from_epoch,
    )
