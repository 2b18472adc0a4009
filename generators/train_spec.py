"""The ``generator.train`` block: which architecture, loss, optimiser settings, epochs
and batch size. Kept free of torch imports so that reading a config stays fast."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TrainSpec(BaseModel):
    """The ``generator.train`` block of a pipeline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: Literal["cgan"] = "cgan"
    loss: Literal["hinge", "bce"] = "hinge"
    epochs: int = Field(200, ge=1)
    batch_size: int = Field(32, ge=1)
    lr_generator: float = Field(2e-4, gt=0)
    lr_discriminator: float = Field(2e-4, gt=0)
    betas: tuple[float, float] = (0.5, 0.999)
    latent_dim: int = Field(64, ge=1)
    base_channels: int = Field(32, ge=4)
    with_masks: bool = Field(False, description="also generate the tissue mask (paired generator)")
    amp: bool = Field(True, description="bf16 autocast on GPU; ignored on CPU")
    checkpoint_every: int = Field(50, ge=1, description="epochs between resumable checkpoints")
    seed: int = 0
