"""The ``generator.train`` block: which architecture, loss, optimiser settings, epochs
and batch size. Kept free of torch imports so that reading a config stays fast."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_SEED = 2**32 - 1
#: A random seed: a whole number in [0, 2**32 - 1] (what numpy's legacy seeding accepts);
#: floats, strings, booleans and negatives are refused by ``synthmed validate``.
Seed = Annotated[int, Field(ge=0, le=MAX_SEED, strict=True)]

MASK_ARCHITECTURES = (
    "cgan",
    "pix2pix",
    "noise",
    "blobs",
    "real-holdout",
    "ddpm",
    "vae3d",
    "ldm3d",
)  # the architectures that use ``with_masks``
#: the architectures that make images FOR given masks (pix2pix always; ddpm, vae3d and ldm3d
#: with ``with_masks: true``)
MASK_CONDITIONED_ARCHITECTURES = ("pix2pix", "ddpm", "vae3d", "ldm3d")
#: the architectures that make volumes (N, 1, D, H, W) and train on ``preprocess.dims: 3`` data
VOLUME_ARCHITECTURES = ("vae3d", "ldm3d")


class TrainSpec(BaseModel):
    """The ``generator.train`` block of a pipeline. ``lr_generator`` is the learning rate of
    the network that makes images (the GAN generator, the VAE, the diffusion UNet);
    ``lr_discriminator`` applies to the GANs (cgan, dcgan, pix2pix) only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: noise, blobs (negative) and real-holdout (positive): controls, see generators/architectures/controls.py
    #: vae3d, ldm3d: volumes (preprocess.dims 3), see generators/architectures/vae3d.py and ldm3d.py
    architecture: Literal[
        "cgan", "dcgan", "vae", "ddpm", "ldm", "pix2pix", "vae3d", "ldm3d", "noise", "blobs", "real-holdout"
    ] = "cgan"
    loss: Literal["hinge", "bce"] = "hinge"
    epochs: int = Field(200, ge=1)
    batch_size: int = Field(32, ge=1)
    lr_generator: float = Field(2e-4, gt=0)
    lr_discriminator: float = Field(2e-4, gt=0)
    betas: tuple[float, float] = (0.5, 0.999)
    latent_dim: int = Field(64, ge=1)
    base_channels: int = Field(32, ge=4)
    cgan_style: Literal["mednist", "upsample"] = Field(
        "mednist",
        description="cgan: 'mednist' = MONAI's Generator/Discriminator of the MedNIST GAN bundle (small, fast); "
        "'upsample' = resize-convolution generator + spectral-norm projection discriminator with a "
        "minibatch-stddev channel (sharper, ~4x the compute; image size divisible by 16)",
    )
    with_masks: bool = Field(False, description="also generate the tissue mask (paired generator)")
    diffaugment: bool = Field(
        True,
        description="differentiable augmentation (translation, cutout) of the discriminator's inputs; "
        "keeps a GAN trainable on a few hundred images",
    )
    amp: bool = Field(True, description="bf16 autocast on GPU; ignored on CPU")
    checkpoint_every: int = Field(50, ge=1, description="epochs between resumable checkpoints")
    seed: Seed = 0
    kl_weight: float = Field(1.0, ge=0, description="vae, vae3d: weight of the KL term (a beta-VAE when not 1)")
    adversarial_weight: float = Field(
        0.005,
        ge=0,
        description="vae3d: weight per voxel of a small 3D PatchDiscriminator's hinge term (Adam at "
        "lr_discriminator); restores texture the squared error blurs away at ~1.2x the training time; 0: none",
    )
    timesteps: int = Field(1000, ge=2, description="ddpm: diffusion steps of the training noise schedule")
    ddim_steps: int = Field(50, ge=1, description="ddpm: DDIM denoising steps per generated batch")
    noise_schedule: Literal["cosine", "linear_beta", "scaled_linear_beta"] = Field(
        "cosine", description="ddpm: beta schedule (MONAI scheduler names); cosine suits any timesteps"
    )
    autoencoder_epochs: int = Field(
        100, ge=1, description="ldm, ldm3d: epochs of the autoencoder stage (cached apart from the diffusion stage)"
    )
    autoencoder_channels: tuple[int, ...] = Field(
        (32, 64, 64), description="ldm: AutoencoderKL widths, one per level; n levels downsample 2**(n-1) times"
    )
    latent_channels: int = Field(3, ge=1, description="ldm: channels of the autoencoder's latent")
    autoencoder_lr: float = Field(5e-4, gt=0, description="ldm: learning rate of the autoencoder")
    autoencoder_kl_weight: float = Field(1e-6, ge=0, description="ldm: weight of the autoencoder's KL term")
    sampler: Literal["rflow", "ddim"] = Field(
        "rflow",
        description="ldm: 'rflow' = rectified-flow training (velocity) and Euler sampling; 'ddim' = DDPM "
        "training (noise, noise_schedule) and DDIM sampling; timesteps applies to both",
    )
    sample_steps: int = Field(12, ge=1, description="ldm: denoising steps per generated batch")
    unet_channels: tuple[int, ...] | None = Field(
        None,
        description="ldm: UNet widths, one per level (self-attention at the last); default b, 2b, 4b(, 4b) "
        "from base_channels down to a 4x4 latent",
    )
    unet_res_blocks: int = Field(2, ge=1, le=4, description="ldm: residual blocks per UNet level")
    rflow_timesteps: Literal["uniform", "logit-normal"] = Field(
        "uniform",
        description="ldm with sampler rflow: how training timesteps are drawn; 'logit-normal' (t = sigmoid(N(0,1)) T, "
        "as in rectified-flow image models) puts the training effort on the middle of the path",
    )
    l1_weight: float = Field(100.0, ge=0, description="pix2pix: weight of the L1 term (100 in the pix2pix paper)")
    mask_deformation: float = Field(
        4.0,
        ge=0,
        le=64,
        description="vae3d, ldm3d with with_masks: paired generation bends each pool mask by a random smooth "
        "deformation of this amplitude (voxels, std of 4^3 control-point displacements) so volumes get new "
        "anatomy, not a training cube's; 0: the stored training masks as they are (near-copies)",
    )
    mask_pool_size: int = Field(
        64,
        ge=0,
        description="pix2pix and mask-conditioned ddpm, vae3d, ldm3d: training masks stored with the weights, to draw conditions from at generation",
    )

    @model_validator(mode="after")
    def _consistent(self) -> "TrainSpec":
        if self.architecture == "pix2pix" and not self.with_masks:
            raise ValueError("pix2pix translates masks into images; set with_masks: true (and ingest masks)")
        if self.with_masks and self.architecture not in MASK_ARCHITECTURES:
            raise ValueError(
                f"with_masks is supported by {', '.join(MASK_ARCHITECTURES)}, not {self.architecture}; "
                "set with_masks: false or choose one of those"
            )
        if self.architecture in ("ldm", "ldm3d") and self.sample_steps > self.timesteps:
            raise ValueError(
                f"sample_steps ({self.sample_steps}) cannot exceed timesteps ({self.timesteps}); lower sample_steps"
            )
        if self.ddim_steps > self.timesteps:
            raise ValueError(
                f"ddim_steps ({self.ddim_steps}) cannot exceed timesteps ({self.timesteps}); lower ddim_steps"
            )
        return self
