"""Config-driven generator training (GaNDLF-Synth style): a ``train:`` block picks the
architecture, loss, optimiser settings, epochs and batch size.

One training loop for every architecture: :func:`fit`. An architecture contributes a
:class:`Recipe` (its networks, optimisers, one training ``step`` and the network to export)
and ``fit`` does the rest in one place: seeded shuffling and flips, bf16 autocast on GPU
(``spec.amp``), the EMA of the exported network, atomic sha256-checked checkpoints, exact
resume, and data parallelism under ``torchrun`` (gradients averaged, buffers broadcast from
rank 0, every rank drawing its own noise). ``train_generator(spec, data)`` picks the
architecture's train function (``_TRAINERS``), which builds the recipe and calls ``fit``;
the controls (noise, blobs, real-holdout) learn no weights and run in one process only.
"""

from __future__ import annotations

import copy
import importlib
import logging
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from generators.errors import DataError, GeneratorError
from generators.shards import sha256_file
from generators.train_spec import VOLUME_ARCHITECTURES, TrainSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingData:
    """``images``: float32 (N, C, H, W) in [0, 1] (volumes: (N, 1, D, H, W)); ``labels``:
    int64 (N,) indices into ``label_names``; ``masks``: int64 (N, H, W) (volumes:
    (N, D, H, W)) in [0, K) or None."""

    images: np.ndarray
    labels: np.ndarray
    label_names: tuple[str, ...]
    masks: np.ndarray | None = None
    mask_classes: int = 0

    def __post_init__(self) -> None:
        if self.images.ndim not in (4, 5) or len(self.images) == 0:
            raise DataError(
                f"expected training images (N, C, H, W) or volumes (N, 1, D, H, W) with N > 0, "
                f"got shape {self.images.shape}"
            )
        if self.images.ndim == 4 and self.images.shape[2] != self.images.shape[3]:
            raise DataError(f"expected square images, got {self.images.shape[2]}x{self.images.shape[3]}")
        if len(self.labels) != len(self.images):
            raise DataError(f"expected one label per image, got {len(self.labels)} for {len(self.images)}")


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


def diff_augment(
    x: torch.Tensor,
    rng: torch.Generator,
    shift: float = 0.125,
    cutout: float = 0.25,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """DiffAugment (Zhao et al. 2020) for the discriminator's inputs: a random translation of
    up to ``shift`` of the image size (zero padded) and one zeroed square of side
    ``cutout * size`` per sample. Differentiable, applied identically to real and fake
    batches; every channel (image and one-hot mask) moves together.

    ``x``: float32 (B, C, H, W); returns the same shape and dtype. Random numbers come from
    the CPU generator ``rng`` so training stays deterministic for a seed. With
    ``world_size`` > 1 (data parallel) the draw is for the ranks' B * world_size samples and
    rank ``rank`` takes its own B of them (see ``StepContext.augment``)."""
    b, _, h, w = x.shape
    n, mine = b * world_size, slice(rank * b, (rank + 1) * b)
    offsets = (torch.rand(n, 2, generator=rng)[mine] * 2 - 1) * (2 * shift)  # grid units: 2 == image size
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = offsets
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    side_h, side_w = max(1, int(h * cutout)), max(1, int(w * cutout))
    top = torch.randint(0, h - side_h + 1, (n,), generator=rng)[mine]
    left = torch.randint(0, w - side_w + 1, (n,), generator=rng)[mine]
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    hole = (
        (rows >= top.view(b, 1, 1))
        & (rows < (top + side_h).view(b, 1, 1))
        & (cols >= left.view(b, 1, 1))
        & (cols < (left + side_w).view(b, 1, 1))
    )
    return x * (~hole).unsqueeze(1).to(x.device, x.dtype)


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


# --- the training loop of every architecture ------------------------------------------------


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
    ``update`` (backward, gradient averaging across ranks under torchrun, optimiser step).

    Under torchrun ``rng`` is in the same state on every rank (so rank 0's checkpoint resumes
    all ranks). Draw through ``rand``/``randn``/``randint``/``augment``: each draws for the
    ranks' whole batch (first dimension times ``world_size``) and hands this rank its own
    rows, so the ranks use different noise and ``rng`` stays in step; in one process they
    equal plain ``torch.rand``/``randn``/``randint``/``diff_augment`` calls on ``rng``."""

    device: torch.device
    amp: bool
    rng: torch.Generator
    world_size: int = 1
    rank: int = 0

    def autocast(self) -> torch.autocast:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def _mine(self, draw: Callable[[tuple[int, ...]], torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        if self.world_size == 1 or not shape:
            return draw(shape).to(self.device)
        rows = shape[0]
        every = draw((rows * self.world_size, *shape[1:]))
        return every[self.rank * rows : (self.rank + 1) * rows].to(self.device)

    def rand(self, *shape: int) -> torch.Tensor:
        """Uniform [0, 1) float32 ``shape`` (first dimension: this rank's batch) on the device."""
        return self._mine(lambda s: torch.rand(s, generator=self.rng), shape)

    def randn(self, *shape: int) -> torch.Tensor:
        """Standard-normal float32 ``shape`` (first dimension: this rank's batch) on the
        device, drawn on CPU from ``rng``."""
        return self._mine(lambda s: torch.randn(s, generator=self.rng), shape)

    def randint(self, high: int, *shape: int) -> torch.Tensor:
        """int64 ``shape`` (first dimension: this rank's batch) uniform in [0, high) on the
        device, drawn on CPU from ``rng``."""
        return self._mine(lambda s: torch.randint(0, high, s, generator=self.rng), shape)

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """``diff_augment(x, rng)`` with this rank's own translations and cutouts; ``x``
        float32 (B, C, H, W) -> same shape and dtype."""
        return diff_augment(x, self.rng, rank=self.rank, world_size=self.world_size)

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
    """Adam with the spec's ``betas``."""
    return torch.optim.Adam(network.parameters(), lr=lr, betas=spec.betas)


def _world() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast_buffers(networks: Iterable[torch.nn.Module]) -> None:
    """Give every rank rank 0's buffers (batch-norm running statistics, spectral-norm
    vectors), as torch's DistributedDataParallel does, so the ranks' networks stay equal."""
    for network in networks:
        for buffer in network.buffers():
            torch.distributed.broadcast(buffer, 0)


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
    per-rank batch, each rank flips and draws its own noise (``StepContext``), gradients are
    averaged in ``StepContext.update``, buffers are broadcast from rank 0 after every step,
    epoch losses in the history are averaged over the ranks, and rank 0 alone writes
    checkpoints (they resume every rank: the seeded generator is in step on all ranks).
    Networks must be built from the same seed on every rank (the architectures' train
    functions seed with ``spec.seed``); every rank returns the same result.
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
    ctx = StepContext(dev, dev.type == "cuda" and spec.amp, rng, world, rank)
    global_step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, spec.epochs):
        for network in recipe.networks.values():
            network.train()
        order = torch.randperm(len(images), generator=rng)[: share * world][rank::world]
        sums: dict[str, float] = {}
        for start in range(0, steps_per_epoch * batch, batch):
            idx = order[start : start + batch]
            flip = torch.rand(batch * world, generator=rng)[rank * batch : (rank + 1) * batch] < 0.5
            x = images[idx].clone()
            x[flip] = x[flip].flip(-1)
            m = None
            if masks is not None:
                m = masks[idx].clone()
                m[flip] = m[flip].flip(-1)
                m = m.to(dev)
            losses = recipe.step(Batch(x.to(dev), labels[idx].to(dev), m), ctx)
            if world > 1:
                _broadcast_buffers(recipe.networks.values())
            global_step += 1
            decay = min(ema_decay, (1.0 + global_step) / (10.0 + global_step))  # warm-up
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), sampler.parameters(), strict=True):
                    p_ema.lerp_(p, 1.0 - decay)
                for b_ema, b in zip(ema.buffers(), sampler.buffers(), strict=True):
                    b_ema.copy_(b)
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        if world > 1:  # the mean over every rank's steps
            totals = torch.tensor(list(sums.values()), dtype=torch.float64, device=dev)
            torch.distributed.all_reduce(totals)
            sums = dict(zip(sums, (totals / world).tolist(), strict=True))
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


#: architectures whose train function does not run through ``fit`` (the controls learn no
#: weights): ``train_generator`` refuses them under torchrun instead of training them N times
SINGLE_PROCESS = frozenset({"noise", "blobs", "real-holdout"})

# architecture -> (module, train function); imported lazily because the modules import this one
_TRAINERS: dict[str, tuple[str, str]] = {
    "cgan": ("generators.architectures.cgan", "train_cgan"),
    "dcgan": ("generators.architectures.dcgan", "train_dcgan"),
    "vae": ("generators.architectures.vae", "train_vae"),
    "ddpm": ("generators.architectures.ddpm", "train_ddpm"),
    "ldm": ("generators.architectures.ldm", "train_ldm"),
    "pix2pix": ("generators.architectures.pix2pix", "train_pix2pix"),
    "vae3d": ("generators.architectures.vae3d", "train_vae3d"),
    "ldm3d": ("generators.architectures.ldm3d", "train_ldm3d"),
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
    ``checkpoint``. Every architecture but the controls trains through :func:`fit`, so also
    data parallel under torchrun; the controls refuse a process group (one line)."""
    _, world = _world()
    if world > 1 and spec.architecture in SINGLE_PROCESS:
        raise GeneratorError(
            f"architecture '{spec.architecture}' is a control that learns no weights and runs in one process, "
            f"got a torchrun group of {world}; start it without torchrun"
        )
    volumes = data.images.ndim == 5
    if spec.architecture not in SINGLE_PROCESS and volumes != (spec.architecture in VOLUME_ARCHITECTURES):
        made = "volumes" if spec.architecture in VOLUME_ARCHITECTURES else "2D images"
        raise DataError(
            f"architecture '{spec.architecture}' makes {made} but the training data are "
            f"{'volumes' if volumes else '2D images'} (shape {data.images.shape}); use "
            f"{' or '.join(VOLUME_ARCHITECTURES) if volumes else 'a 2D architecture'} for preprocess.dims "
            f"{3 if volumes else 2}"
        )
    module_name, function_name = _TRAINERS[spec.architecture]
    train = getattr(importlib.import_module(module_name), function_name)
    return train(data, spec, device=device, checkpoint=checkpoint, on_epoch=on_epoch)
