"""Mask-to-image translation (pix2pix): MONAI ``UNet`` generator, MONAI ``PatchDiscriminator``
(PatchGAN: one real/fake score per patch), loss = adversarial + ``l1_weight`` * L1.

Generator input, ``(N, K + L + 1, H, W)``: the segmentation mask one-hot (K classes), one
constant map per class label (L labels, one-hot) and one seeded Gaussian noise map (so the
seed varies the texture for a fixed mask; image ``i``'s noise and pool pick come from its
own streams, ``generators.seed_stream``); output: the image through a sigmoid. The
discriminator judges (mask, label maps, image) stacks.

Contract (``generators.contract.MaskConditionedGenerator``: ``generate(n, seed, condition,
masks=None)``), a paired generator:
- ``masks`` int ``(N, H, W)`` in [0, K) with ``condition`` the labels (a label, one per
  mask, or None: labels cycle): translate exactly these masks (``synthesis.masks_from``).
- no masks, ``condition`` a label, a list of labels or None (labels cycle as in the other
  architectures): each sample's mask is drawn (seeded) from the **mask pool** entries of
  its label. The pool is ``spec.mask_pool_size`` training masks (stratified by label)
  stored with the weights (``mask_pool.masks`` uint8 (P, H, W), ``mask_pool.labels`` int64
  (P,); ``generators/architectures/mask_pool.py``), so it is sha256-verified with them; a
  model object can be given another pool (``mask_pool=`` or ``use_mask_pool``), and
  ``mask_pool_size: 0`` ships none. The pool is segmentation masks only: no pixel values,
  ids or subjects of the training images.
- ``condition`` a ``MaskCondition(masks, labels)``, or a bare int array of masks
  ``(N, H, W)`` (labels then cycle): the older spelling of ``masks=``, kept.
The returned batch carries the masks it was conditioned on (``GeneratedBatch.masks``), so
image and mask come as a pair for segmentation training.

Shapes: images float32 ``(N, C, H, W)`` in [0, 1]; masks int64 ``(N, H, W)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import PatchDiscriminator, UNet
from torch import nn

from generators.architectures import (
    autocast,
    check_label_count,
    label_indices,
    load_network,
    seeded_normal,
    size_levels,
)
from generators.architectures.mask_pool import (  # noqa: F401 - POOL_PREFIX, select_pool: re-exported
    POOL_PREFIX,
    MaskPool,
    check_masks,
    network_state,
    pool_state,
    select_pool,
)
from generators.card import ModelCard
from generators.contract import GeneratedBatch
from generators.errors import DataError, GeneratorError
from generators.train_spec import TrainSpec
from generators.training import (
    Batch,
    Recipe,
    StepContext,
    TrainedGenerator,
    TrainingData,
    _bce_d,
    _g_loss,
    _hinge_d,
    diff_augment,
    fit,
    make_optimizer,
)


@dataclass(frozen=True)
class Pix2pixConfig:
    """Constructor arguments of the pair; stored in the card's ``network`` field."""

    image_size: int
    channels: int
    n_labels: int
    mask_classes: int
    base_channels: int = 32

    def __post_init__(self) -> None:
        levels = size_levels(self.image_size)
        if self.image_size < 16 or self.image_size % 2**levels:
            raise GeneratorError(f"pix2pix needs an image size >= 16 divisible by {2**levels}, got {self.image_size}")
        if not 2 <= self.mask_classes <= 256:
            raise GeneratorError(f"pix2pix needs 2..256 mask classes, got {self.mask_classes}")

    @property
    def condition_channels(self) -> int:
        return self.mask_classes + self.n_labels


@dataclass(frozen=True)
class MaskCondition:
    """Masks to translate: int ``(N, H, W)`` in [0, mask_classes); ``labels`` one per mask
    (None: labels cycle through the card's labels)."""

    masks: np.ndarray
    labels: Sequence[str] | None = None


def build_generator(cfg: Pix2pixConfig) -> nn.Module:
    """``forward(x)``: x ``(N, K + L + 1, H, W)`` -> logits ``(N, C, H, W)``."""
    b, levels = cfg.base_channels, size_levels(cfg.image_size)
    return UNet(
        spatial_dims=2,
        in_channels=cfg.condition_channels + 1,
        out_channels=cfg.channels,
        channels=tuple(b * min(2**i, 8) for i in range(levels + 1)),
        strides=(2,) * levels,
        num_res_units=1,
    )


def build_discriminator(cfg: Pix2pixConfig) -> PatchDiscriminator:
    """``forward(x)[-1]``: x ``(N, K + L + C, H, W)`` -> patch logits ``(N, 1, h, w)``
    (the 70x70 PatchGAN of the paper at 256x256: 3 layers)."""
    return PatchDiscriminator(
        spatial_dims=2,
        channels=cfg.base_channels,
        in_channels=cfg.condition_channels + cfg.channels,
        num_layers_d=3 if cfg.image_size >= 64 else 2,
        norm="INSTANCE",
    )


def condition_maps(masks: torch.Tensor, labels: torch.Tensor, cfg: Pix2pixConfig) -> torch.Tensor:
    """masks int64 ``(N, H, W)``, labels int64 ``(N,)`` -> float32 ``(N, K + L, H, W)``."""
    onehot = F.one_hot(masks, cfg.mask_classes).permute(0, 3, 1, 2).float()
    label_maps = F.one_hot(labels, cfg.n_labels).float()[:, :, None, None].expand(-1, -1, *masks.shape[1:])
    return torch.cat([onehot, label_maps], dim=1)


class Pix2pixModel:
    """A loaded mask-to-image generator implementing ``generators.contract.Generator``
    (with the mask conditions described in the module docstring)."""

    def __init__(
        self,
        card: ModelCard,
        state_dict: dict[str, torch.Tensor],
        device: str = "cpu",
        mask_pool: tuple[np.ndarray, Sequence[str]] | None = None,
    ) -> None:
        self.card = card
        self.cfg = Pix2pixConfig(**card.network)
        check_label_count(card, self.cfg.n_labels)
        self.device = torch.device(device)
        self.mask_conditioned = True
        self.mask_classes = self.cfg.mask_classes
        self.module = build_generator(self.cfg)
        load_network(self.module, network_state(state_dict), card)
        self.module.to(self.device).eval()
        self.pool = MaskPool.from_state(card, state_dict)
        if mask_pool is not None:
            self.use_mask_pool(*mask_pool)

    @property
    def pool_masks(self) -> np.ndarray:
        return self.pool.masks

    @property
    def pool_labels(self) -> np.ndarray:
        return self.pool.labels

    def use_mask_pool(self, masks: np.ndarray, labels: Sequence[str]) -> None:
        """Draw label-conditioned masks from ``masks`` int (P, H, W) with one label each."""
        self.pool = MaskPool.given(self.card, self.mask_classes, masks, labels)

    @torch.inference_mode()
    def generate(
        self,
        n: int,
        seed: int,
        condition: MaskCondition | np.ndarray | Sequence[str] | str | None = None,
        masks: np.ndarray | None = None,
    ) -> GeneratedBatch:
        """``n`` image/mask pairs; images float32 (N, C, H, W) in [0, 1], masks int64 (N, H, W).
        Same seed and condition -> same output. Given ``masks`` come back unchanged."""
        if isinstance(condition, np.ndarray):
            condition = MaskCondition(condition)
        if isinstance(condition, MaskCondition):
            if masks is not None:
                raise GeneratorError(
                    f"{self.card.ref}: masks given twice (MaskCondition and masks=); pass them once, as masks="
                )
            masks, condition = condition.masks, None if condition.labels is None else list(condition.labels)
        if masks is not None:
            masks = check_masks(self.card, masks, self.mask_classes, n)
            index = label_indices(self.card, n, condition)
        else:
            index = label_indices(self.card, n, condition)
            masks = self.pool.draw(self.card, index, seed)
        noise = seeded_normal((n, 1, *masks.shape[1:]), seed)
        cond = condition_maps(torch.from_numpy(masks), torch.tensor(index), self.cfg)
        with autocast(self.device):
            raw = self.module(torch.cat([cond, noise], dim=1).to(self.device))
        return GeneratedBatch(
            images=torch.sigmoid(raw.float()).cpu().numpy().astype(np.float32),
            masks=masks,
            labels=[self.card.conditioning.labels[i] for i in index],
        )


def train_pix2pix(
    data: TrainingData,
    spec: TrainSpec,
    *,
    device: str = "cpu",
    checkpoint: Path | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainedGenerator:
    """Train on (mask, label) -> image pairs. History: ``loss_d``, ``loss_g`` (adversarial
    part of the generator loss) and ``loss_l1`` (mean absolute error, before weighting)."""
    if data.masks is None:
        raise DataError("pix2pix needs a mask for every training image; ingest masks and set with_masks: true")
    cfg = Pix2pixConfig(
        int(data.images.shape[-1]),
        int(data.images.shape[1]),
        len(data.label_names),
        max(data.mask_classes, int(data.masks.max()) + 1),
        spec.base_channels,
    )
    torch.manual_seed(spec.seed)
    gen_net, disc_net = build_generator(cfg), build_discriminator(cfg)
    opt_g = make_optimizer(spec, gen_net, spec.lr_generator)
    opt_d = make_optimizer(spec, disc_net, spec.lr_discriminator)
    d_loss_fn = _hinge_d if spec.loss == "hinge" else _bce_d

    def step(batch: Batch, ctx: StepContext) -> dict[str, float]:
        cond = condition_maps(batch.masks, batch.labels, cfg)
        noise = ctx.randn(len(cond), 1, *cond.shape[2:])
        with ctx.autocast():
            fake = torch.sigmoid(gen_net(torch.cat([cond, noise], dim=1)).float())
            real_pair, fake_pair = torch.cat([cond, batch.images], 1), torch.cat([cond, fake], 1)
            if spec.diffaugment:
                real_pair, fake_pair = diff_augment(real_pair, ctx.rng), diff_augment(fake_pair, ctx.rng)
            loss_d = d_loss_fn(disc_net(real_pair)[-1].float(), disc_net(fake_pair.detach())[-1].float())
        ctx.update(opt_d, loss_d, disc_net)
        with ctx.autocast():
            loss_adv = _g_loss(spec.loss, disc_net(fake_pair)[-1].float())
        loss_l1 = (fake - batch.images).abs().mean()
        ctx.update(opt_g, loss_adv + spec.l1_weight * loss_l1, gen_net)
        return {
            "loss_d": float(loss_d.detach()),
            "loss_g": float(loss_adv.detach()),
            "loss_l1": float(loss_l1.detach()),
        }

    recipe = Recipe(
        {"generator": gen_net, "discriminator": disc_net},
        {"generator": opt_g, "discriminator": opt_d},
        step,
        "generator",
    )
    result = fit(recipe, data, spec, device=device, checkpoint=checkpoint, on_epoch=on_epoch, with_masks=True)
    state = {**result.state, **pool_state(data, spec.mask_pool_size, spec.seed)}
    return TrainedGenerator(
        architecture="pix2pix",
        state=state,
        network=asdict(cfg),
        labels=data.label_names,
        mask_classes=cfg.mask_classes,
        history=result.history,
        time_s=result.time_s,
        resumed_from_epoch=result.resumed_from_epoch,
    )
