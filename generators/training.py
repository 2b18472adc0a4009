"""Config-driven generator training (GaNDLF-Synth style): a ``train:`` block picks the
architecture, loss, optimiser settings, epochs and batch size; training is resumable from
checkpoints and uses bf16 autocast on GPU."""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from generators.architectures.cgan import (
    CganConfig,
    ConditionalDiscriminator,
    ConditionalGenerator,
    split_outputs,
)
from generators.errors import DataError
from generators.train_spec import TrainSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingData:
    """``images``: float32 (N, C, H, W) in [0, 1]; ``labels``: int64 (N,) indices into
    ``label_names``; ``masks``: int64 (N, H, W) in [0, K) or None."""

    images: np.ndarray
    labels: np.ndarray
    label_names: tuple[str, ...]
    masks: np.ndarray | None = None
    mask_classes: int = 0

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or len(self.images) == 0:
            raise DataError(f"expected training images (N, C, H, W) with N > 0, got shape {self.images.shape}")
        if self.images.shape[2] != self.images.shape[3]:
            raise DataError(f"expected square images, got {self.images.shape[2]}x{self.images.shape[3]}")
        if len(self.labels) != len(self.images):
            raise DataError(f"expected one label per image, got {len(self.labels)} for {len(self.images)}")


@dataclass
class TrainResult:
    """``generator``: state dict of the EMA generator; ``history``: one dict per epoch."""

    generator: dict[str, torch.Tensor]
    config: CganConfig
    history: list[dict[str, float]] = field(default_factory=list)
    time_s: float = 0.0
    resumed_from_epoch: int = 0


def _hinge_d(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def _bce_d(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(real, torch.ones_like(real)) + F.binary_cross_entropy_with_logits(
        fake, torch.zeros_like(fake)
    )


def _g_loss(loss: str, fake: torch.Tensor) -> torch.Tensor:
    if loss == "hinge":
        return -fake.mean()
    return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))


def _real_input(images: torch.Tensor, masks: torch.Tensor | None, k: int) -> torch.Tensor:
    if masks is None:
        return images
    onehot = F.one_hot(masks, k).permute(0, 3, 1, 2).float()
    return torch.cat([images, onehot], dim=1)


def train_cgan(
    data: TrainingData,
    spec: TrainSpec,
    *,
    device: str = "cpu",
    checkpoint: Path | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    ema_decay: float = 0.995,
) -> TrainResult:
    """Train a conditional GAN; resumable from ``checkpoint`` (written every
    ``spec.checkpoint_every`` epochs, atomically). Deterministic on CPU for a fixed seed
    and thread count."""
    started = time.perf_counter()
    cfg = CganConfig(
        image_size=int(data.images.shape[-1]),
        channels=int(data.images.shape[1]),
        n_labels=len(data.label_names),
        latent_dim=spec.latent_dim,
        base_channels=spec.base_channels,
        mask_classes=data.mask_classes if spec.with_masks else 0,
    )
    if spec.with_masks and data.masks is None:
        raise DataError("train.with_masks is true but the training images have no masks; ingest masks or set with_masks: false")
    torch.manual_seed(spec.seed)
    rng = torch.Generator().manual_seed(spec.seed)
    dev = torch.device(device)
    gen_net, disc_net = ConditionalGenerator(cfg).to(dev), ConditionalDiscriminator(cfg).to(dev)
    ema = copy.deepcopy(gen_net).eval()
    opt_g = torch.optim.Adam(gen_net.parameters(), lr=spec.lr_generator, betas=spec.betas)
    opt_d = torch.optim.Adam(disc_net.parameters(), lr=spec.lr_discriminator, betas=spec.betas)
    d_loss_fn = _hinge_d if spec.loss == "hinge" else _bce_d
    history: list[dict[str, float]] = []
    start_epoch = 0
    if checkpoint is not None and Path(checkpoint).is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        gen_net.load_state_dict(state["generator"])
        disc_net.load_state_dict(state["discriminator"])
        ema.load_state_dict(state["ema"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        rng.set_state(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        history = [dict(zip(("epoch", "loss_d", "loss_g"), row)) for row in state["history"].tolist()]
        start_epoch = int(state["epoch"])
        log.info("resuming generator training at epoch %d from %s", start_epoch, checkpoint)

    images = torch.from_numpy(data.images)
    labels = torch.from_numpy(data.labels.astype(np.int64))
    masks = None if not spec.with_masks or data.masks is None else torch.from_numpy(data.masks.astype(np.int64))
    n = len(images)
    batch = min(spec.batch_size, n)
    amp = dev.type == "cuda" and spec.amp
    global_step = start_epoch * (n // batch)
    for epoch in range(start_epoch, spec.epochs):
        gen_net.train()
        disc_net.train()
        order = torch.randperm(n, generator=rng)
        sums = {"loss_d": 0.0, "loss_g": 0.0}
        steps = 0
        for start in range(0, n - batch + 1, batch):
            idx = order[start : start + batch]
            flip = torch.rand(len(idx), generator=rng) < 0.5
            x = images[idx].clone()
            x[flip] = x[flip].flip(-1)
            m = None
            if masks is not None:
                m = masks[idx].clone()
                m[flip] = m[flip].flip(-1)
            onehot = F.one_hot(labels[idx], cfg.n_labels).float().to(dev)
            real = _real_input(x, m, cfg.mask_classes).to(dev)
            z = torch.randn(len(idx), cfg.latent_dim, generator=rng).to(dev)
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
                fake_img, fake_mask = split_outputs(gen_net(z, onehot).float(), cfg)
                fake = fake_img if fake_mask is None else torch.cat([fake_img, fake_mask], 1)
                loss_d = d_loss_fn(disc_net(real, onehot).float(), disc_net(fake.detach(), onehot).float())
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
                loss_g = _g_loss(spec.loss, disc_net(fake, onehot).float())
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            global_step += 1
            decay = min(ema_decay, (1.0 + global_step) / (10.0 + global_step))  # warm-up
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), gen_net.parameters()):
                    p_ema.lerp_(p, 1.0 - decay)
                for b_ema, b in zip(ema.buffers(), gen_net.buffers()):
                    b_ema.copy_(b)
            sums["loss_d"] += float(loss_d.detach())
            sums["loss_g"] += float(loss_g.detach())
            steps += 1
        row = {"epoch": float(epoch + 1), **{k: v / max(steps, 1) for k, v in sums.items()}}
        history.append(row)
        if on_epoch is not None:
            on_epoch(epoch + 1, row)
        if checkpoint is not None and ((epoch + 1) % spec.checkpoint_every == 0 or epoch + 1 == spec.epochs):
            _save_checkpoint(
                Path(checkpoint),
                {
                    "generator": gen_net.state_dict(),
                    "discriminator": disc_net.state_dict(),
                    "ema": ema.state_dict(),
                    "opt_g": opt_g.state_dict(),
                    "opt_d": opt_d.state_dict(),
                    "rng": rng.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "history": torch.tensor([[r["epoch"], r["loss_d"], r["loss_g"]] for r in history]),
                    "epoch": epoch + 1,
                },
            )
    return TrainResult(
        generator={k: v.detach().cpu() for k, v in ema.state_dict().items()},
        config=cfg,
        history=history,
        time_s=time.perf_counter() - started,
        resumed_from_epoch=start_epoch,
    )


def _save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
