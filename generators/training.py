"""Config-driven generator training (GaNDLF-Synth style): a ``train:`` block picks the
architecture, loss, optimiser settings, epochs and batch size; training is resumable from
checkpoints and uses bf16 autocast on GPU."""

from __future__ import annotations

import copy
import importlib
import logging
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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
from generators.shards import sha256_file
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


def diff_augment(x: torch.Tensor, rng: torch.Generator, shift: float = 0.125, cutout: float = 0.25) -> torch.Tensor:
    """DiffAugment (Zhao et al. 2020) for the discriminator's inputs: a random translation of
    up to ``shift`` of the image size (zero padded) and one zeroed square of side
    ``cutout * size`` per sample. Differentiable, applied identically to real and fake
    batches; every channel (image and one-hot mask) moves together.

    ``x``: float32 (B, C, H, W); returns the same shape and dtype. Random numbers come from
    the CPU generator ``rng`` so training stays deterministic for a seed."""
    b, _, h, w = x.shape
    offsets = (torch.rand(b, 2, generator=rng) * 2 - 1) * (2 * shift)  # grid units: 2 == image size
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = offsets
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    side_h, side_w = max(1, int(h * cutout)), max(1, int(w * cutout))
    top = torch.randint(0, h - side_h + 1, (b,), generator=rng)
    left = torch.randint(0, w - side_w + 1, (b,), generator=rng)
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    hole = (
        (rows >= top.view(b, 1, 1))
        & (rows < (top + side_h).view(b, 1, 1))
        & (cols >= left.view(b, 1, 1))
        & (cols < (left + side_w).view(b, 1, 1))
    )
    return x * (~hole).unsqueeze(1).to(x.device, x.dtype)


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
        style=spec.cgan_style,
    )
    if spec.with_masks and data.masks is None:
        raise DataError(
            "train.with_masks is true but the training images have no masks; ingest masks or set with_masks: false"
        )
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
    state = load_checkpoint(
        checkpoint,
        lambda s: _check_cgan_state(s, {"generator": gen_net, "discriminator": disc_net, "ema": ema}, spec.epochs),
    )
    if state is not None:
        gen_net.load_state_dict(state["generator"])
        disc_net.load_state_dict(state["discriminator"])
        ema.load_state_dict(state["ema"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        rng.set_state(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        history = [dict(zip(("epoch", "loss_d", "loss_g"), row, strict=True)) for row in state["history"].tolist()]
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
                d_real, d_fake = real, fake
                if spec.diffaugment:
                    d_real, d_fake = diff_augment(real, rng), diff_augment(fake, rng)
                loss_d = d_loss_fn(disc_net(d_real, onehot).float(), disc_net(d_fake.detach(), onehot).float())
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
                loss_g = _g_loss(spec.loss, disc_net(d_fake, onehot).float())
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            global_step += 1
            decay = min(ema_decay, (1.0 + global_step) / (10.0 + global_step))  # warm-up
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), gen_net.parameters(), strict=True):
                    p_ema.lerp_(p, 1.0 - decay)
                for b_ema, b in zip(ema.buffers(), gen_net.buffers(), strict=True):
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


def _checkpoint_digest_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.sha256")


def _save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` atomically, then its sha256 next to it (``<name>.sha256``), so a
    checkpoint changed on disk afterwards (a flipped bit loads without error) is known."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    digest_tmp = path.with_name(f".{path.name}.sha256.tmp")
    digest_tmp.write_text(digest + "\n")
    os.replace(digest_tmp, _checkpoint_digest_path(path))


def discard_checkpoint(path: Path) -> None:
    """Remove a checkpoint and its recorded sha256."""
    Path(path).unlink(missing_ok=True)
    _checkpoint_digest_path(Path(path)).unlink(missing_ok=True)


# what reading a damaged or foreign checkpoint raises (torch's zip reader: RuntimeError;
# a short file: EOFError; bytes that are no checkpoint: UnpicklingError; our checks: ValueError)
CHECKPOINT_ERRORS = (
    OSError,
    EOFError,
    RuntimeError,
    ValueError,
    KeyError,
    TypeError,
    IndexError,
    pickle.UnpicklingError,
)


def load_checkpoint(checkpoint: Path | None, check: Callable[[Any], None]) -> dict[str, Any] | None:
    """The state saved by :func:`_save_checkpoint`, or None when there is none. A checkpoint
    whose sha256 differs from the one recorded at write (or has none), that torch cannot
    read (``weights_only=True``: nothing pickled is executed), or that ``check`` rejects
    (it raises ``ValueError`` when the state does not fit the networks being trained) is
    discarded with one warning: training then starts from epoch 0 instead of failing
    every rerun."""
    if checkpoint is None or not Path(checkpoint).is_file():
        return None
    path = Path(checkpoint)
    try:
        recorded = _checkpoint_digest_path(path).read_text().strip()
        if sha256_file(path) != recorded:
            raise ValueError("sha256 differs from the one recorded when it was written")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"expected a dict, got {type(state).__name__}")
        check(state)
    except CHECKPOINT_ERRORS as exc:
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        log.warning("%s: unusable training checkpoint (%s); discarded, training from scratch", path.name, reason)
        discard_checkpoint(path)
        return None
    return state


def _check_module_state(name: str, saved: Any, module: torch.nn.Module) -> None:
    """Raise ValueError unless ``saved`` has exactly ``module``'s state keys and shapes."""
    expected = module.state_dict()
    if not isinstance(saved, dict) or set(saved) != set(expected):
        raise ValueError(f"{name}: the saved parameter names differ from the network's")
    for key, tensor in expected.items():
        if not isinstance(saved[key], torch.Tensor) or saved[key].shape != tensor.shape:
            raise ValueError(f"{name}.{key}: saved shape differs from the network's {tuple(tensor.shape)}")


def _check_epoch(state: dict[str, Any], epochs: int) -> None:
    epoch = state["epoch"]
    if not isinstance(epoch, int) or not 0 <= epoch <= epochs:
        raise ValueError(f"epoch {epoch!r} is outside 0..{epochs}")


def _check_cgan_state(state: dict[str, Any], modules: dict[str, torch.nn.Module], epochs: int) -> None:
    for name, module in modules.items():
        _check_module_state(name, state[name], module)
    for key in ("opt_g", "opt_d"):
        if not isinstance(state[key], dict):
            raise ValueError(f"{key}: expected an optimiser state")
    history = state["history"]
    if not isinstance(history, torch.Tensor) or history.ndim != 2 or history.shape[1] != 3:
        raise ValueError("history: expected an (epochs, 3) tensor")
    _check_epoch(state, epochs)


# --- shared harness of the zoo architectures (dcgan, vae, ddpm, pix2pix) -------------------


@dataclass(frozen=True)
class Batch:
    """One batch on the training device: ``images`` float32 (B, C, H, W) in [0, 1] (randomly
    flipped left-right), ``labels`` int64 (B,), ``masks`` int64 (B, H, W) or None."""

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None


@dataclass
class StepContext:
    """What a training step may use: the device, bf16 autocast (CUDA only), the seeded CPU
    generator ``rng`` for every random draw (so runs are reproducible and resumable), and
    ``update`` (backward, gradient averaging across ranks under torchrun, optimiser step)."""

    device: torch.device
    amp: bool
    rng: torch.Generator
    world_size: int = 1

    def autocast(self) -> torch.autocast:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def randn(self, *shape: int) -> torch.Tensor:
        """Standard-normal float32 ``shape`` on the device, drawn on CPU from ``rng``."""
        return torch.randn(*shape, generator=self.rng).to(self.device)

    def randint(self, high: int, *shape: int) -> torch.Tensor:
        """int64 ``shape`` uniform in [0, high) on the device, drawn on CPU from ``rng``."""
        return torch.randint(0, high, shape, generator=self.rng).to(self.device)

    def update(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor, network: torch.nn.Module) -> None:
        """Zero ``optimizer``'s gradients, backpropagate ``loss``, average ``network``'s
        gradients over the ranks (no-op in one process) and take a step."""
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.world_size > 1:
            _average_gradients(network, self.world_size)
        optimizer.step()


@dataclass
class Recipe:
    """An architecture's side of training: its networks and optimisers (both checkpointed),
    ``step(batch, ctx) -> {loss name: float}`` (forward, backward, update), and ``sampler``,
    the network whose exponential moving average (EMA) is exported."""

    networks: dict[str, torch.nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    step: Callable[[Batch, StepContext], dict[str, float]]
    sampler: str


@dataclass
class FitResult:
    """``state``: CPU state dict of the sampler's EMA; ``history``: one row per epoch
    (``epoch`` and the step's losses averaged over the epoch's steps)."""

    state: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    time_s: float
    resumed_from_epoch: int


@dataclass
class TrainedGenerator:
    """What ``train_generator`` returns for any architecture: ``state`` goes to
    ``weights.safetensors``, ``network`` to the card's ``network`` field (constructor
    arguments), ``labels`` to ``conditioning.labels`` (empty when unconditional),
    ``mask_classes`` > 0 when the generator emits or consumes masks."""

    architecture: str
    state: dict[str, torch.Tensor]
    network: dict[str, Any]
    labels: tuple[str, ...]
    mask_classes: int
    history: list[dict[str, float]]
    time_s: float
    resumed_from_epoch: int


def make_optimizer(spec: TrainSpec, network: torch.nn.Module, lr: float) -> torch.optim.Adam:
    """Adam with the spec's ``betas`` (as ``train_cgan``)."""
    return torch.optim.Adam(network.parameters(), lr=lr, betas=spec.betas)


def _world() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _average_gradients(network: torch.nn.Module, world_size: int) -> None:
    grads = [p.grad for p in network.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def fit(
    recipe: Recipe,
    data: TrainingData,
    spec: TrainSpec,
    *,
    device: str = "cpu",
    checkpoint: Path | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    with_masks: bool = False,
    ema_decay: float = 0.995,
) -> FitResult:
    """Run ``recipe.step`` over ``spec.epochs`` epochs of shuffled, left-right-flipped
    batches of ``spec.batch_size`` (the last incomplete batch is dropped), keep an EMA of
    the sampler network, and checkpoint everything (networks, optimisers, EMA, RNG states,
    history) atomically every ``spec.checkpoint_every`` epochs. An existing ``checkpoint``
    is resumed; on CPU a resumed run equals an uninterrupted one bit for bit.

    Under torchrun (a torch.distributed group initialised by the caller) every rank draws
    the same permutation and takes its own equal share of it, ``spec.batch_size`` is the
    per-rank batch, gradients are averaged in ``StepContext.update``, rank 0 alone writes
    checkpoints, and epoch losses in the history are rank 0's. Networks must be built from
    the same seed on every rank (the architectures' train functions seed with ``spec.seed``).
    """
    started = time.perf_counter()
    rank, world = _world()
    dev = torch.device(device)
    for network in recipe.networks.values():
        network.to(dev)
    sampler = recipe.networks[recipe.sampler]
    ema = copy.deepcopy(sampler).eval().requires_grad_(False)
    rng = torch.Generator().manual_seed(spec.seed)
    history: list[dict[str, float]] = []
    start_epoch = 0
    state = load_checkpoint(checkpoint, lambda s: _check_fit_state(s, recipe, ema, spec.epochs))
    if state is not None:
        for name, network in recipe.networks.items():
            network.load_state_dict(state["networks"][name])
        for name, optimizer in recipe.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        ema.load_state_dict(state["ema"])
        rng.set_state(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        history = [dict(row) for row in state["history"]]
        start_epoch = int(state["epoch"])
        log.info("resuming generator training at epoch %d from %s", start_epoch, checkpoint)

    images = torch.from_numpy(data.images)
    labels = torch.from_numpy(data.labels.astype(np.int64))
    masks = torch.from_numpy(data.masks.astype(np.int64)) if with_masks and data.masks is not None else None
    share = len(images) // world
    if share == 0:
        raise DataError(f"{len(images)} training images cannot be shared by {world} ranks; use fewer processes")
    batch = min(spec.batch_size, share)
    steps_per_epoch = share // batch
    ctx = StepContext(dev, dev.type == "cuda" and spec.amp, rng, world)
    global_step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, spec.epochs):
        for network in recipe.networks.values():
            network.train()
        order = torch.randperm(len(images), generator=rng)[: share * world][rank::world]
        sums: dict[str, float] = {}
        for start in range(0, steps_per_epoch * batch, batch):
            idx = order[start : start + batch]
            flip = torch.rand(len(idx), generator=rng) < 0.5
            x = images[idx].clone()
            x[flip] = x[flip].flip(-1)
            m = None
            if masks is not None:
                m = masks[idx].clone()
                m[flip] = m[flip].flip(-1)
                m = m.to(dev)
            losses = recipe.step(Batch(x.to(dev), labels[idx].to(dev), m), ctx)
            global_step += 1
            decay = min(ema_decay, (1.0 + global_step) / (10.0 + global_step))  # warm-up
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), sampler.parameters(), strict=True):
                    p_ema.lerp_(p, 1.0 - decay)
                for b_ema, b in zip(ema.buffers(), sampler.buffers(), strict=True):
                    b_ema.copy_(b)
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        row = {"epoch": float(epoch + 1), **{k: v / steps_per_epoch for k, v in sums.items()}}
        history.append(row)
        if on_epoch is not None:
            on_epoch(epoch + 1, row)
        due = (epoch + 1) % spec.checkpoint_every == 0 or epoch + 1 == spec.epochs
        if checkpoint is not None and due:
            if rank == 0:
                _save_checkpoint(
                    Path(checkpoint),
                    {
                        "networks": {k: v.state_dict() for k, v in recipe.networks.items()},
                        "optimizers": {k: v.state_dict() for k, v in recipe.optimizers.items()},
                        "ema": ema.state_dict(),
                        "rng": rng.get_state(),
                        "torch_rng": torch.get_rng_state(),
                        "history": history,
                        "epoch": epoch + 1,
                    },
                )
            if world > 1:
                torch.distributed.barrier()
    return FitResult(
        state={k: v.detach().cpu().clone() for k, v in ema.state_dict().items()},
        history=history,
        time_s=time.perf_counter() - started,
        resumed_from_epoch=start_epoch,
    )


def _check_fit_state(state: dict[str, Any], recipe: Recipe, ema: torch.nn.Module, epochs: int) -> None:
    if not isinstance(state["networks"], dict) or set(state["networks"]) != set(recipe.networks):
        raise ValueError(f"networks: expected {sorted(recipe.networks)}")
    for name, network in recipe.networks.items():
        _check_module_state(name, state["networks"][name], network)
    _check_module_state("ema", state["ema"], ema)
    optimizers = state["optimizers"]
    if not isinstance(optimizers, dict) or set(optimizers) != set(recipe.optimizers):
        raise ValueError(f"optimizers: expected {sorted(recipe.optimizers)}")
    if not isinstance(state["history"], list) or not all(isinstance(row, dict) for row in state["history"]):
        raise ValueError("history: expected a list of rows")
    _check_epoch(state, epochs)


# architecture -> (module, train function); imported lazily because the modules import this one
_TRAINERS: dict[str, tuple[str, str]] = {
    "dcgan": ("generators.architectures.dcgan", "train_dcgan"),
    "vae": ("generators.architectures.vae", "train_vae"),
    "ddpm": ("generators.architectures.ddpm", "train_ddpm"),
    "pix2pix": ("generators.architectures.pix2pix", "train_pix2pix"),
    "noise": ("generators.architectures.controls", "train_noise"),
    "blobs": ("generators.architectures.controls", "train_blobs"),
    "real-holdout": ("generators.architectures.controls", "train_real_holdout"),
}


def train_generator(
    spec: TrainSpec,
    data: TrainingData,
    *,
    device: str = "cpu",
    checkpoint: Path | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainedGenerator:
    """Train the architecture ``spec.architecture`` names on ``data``; resumable from
    ``checkpoint``. ``cgan`` runs ``train_cgan`` unchanged."""
    if spec.architecture == "cgan":
        from generators.architectures.cgan import network_kwargs

        result = train_cgan(data, spec, device=device, checkpoint=checkpoint, on_epoch=on_epoch)
        return TrainedGenerator(
            architecture="cgan",
            state=result.generator,
            network=network_kwargs(result.config),
            labels=data.label_names,
            mask_classes=result.config.mask_classes,
            history=result.history,
            time_s=result.time_s,
            resumed_from_epoch=result.resumed_from_epoch,
        )
    module_name, function_name = _TRAINERS[spec.architecture]
    train = getattr(importlib.import_module(module_name), function_name)
    return train(data, spec, device=device, checkpoint=checkpoint, on_epoch=on_epoch)
