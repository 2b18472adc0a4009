"""MONAI bundles of diffusion models (``ddpm``, ``ldm``), laid out like the model zoo's
diffusion bundles (``brats_mri_axial_slices_generative_diffusion``): ``configs/inference.json``
builds MONAI's ``DiffusionModelUNet`` (and ``AutoencoderKL``) from literal arguments, loads
``models/model.pt`` (and ``models/model_autoencoder.pt``) as state dicts, builds MONAI's
scheduler and inferer, and runs ``scripts/sampler.py`` (a small sampler shipped in the
bundle, like the zoo's ``scripts/ldm_sampler.py``; it needs torch, numpy, MONAI and
Pillow, not synthmed)::

    python -m monai.bundle run --config_file OUT/configs/inference.json --bundle_root OUT \\
        --num_samples 16 --seed 0

writes ``OUT/outputs/<i>_image.png`` (8-bit, ``rint(255 x)``) for images ``i =
first_index .. first_index+num_samples-1``: image ``i`` starts from the seed stream's noise
(``rng(seed, i, 0)``, ``generators.seed_stream``) and gets label ``labels[i % L]``, so the
PNGs are ``generate(num_samples, seed)``'s images (float32 on the CPU; within one grey level).

Samplers: ddpm runs ``DiffusionInferer.sample`` with ``DDIMScheduler(clip_sample=True)``
exactly as ``DdpmModel.generate``; ldm runs ``LatentDiffusionInferer.sample`` with
``RFlowScheduler(use_discrete_timesteps=True)`` (``sampler: rflow``) or
``DDIMScheduler(clip_sample=False)`` (``sampler: ddim``) and decodes with the autoencoder at
the card's ``scale_factor``, as ``LdmModel.generate``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from generators.errors import GeneratorError

#: the sampler shipped in every diffusion bundle as ``scripts/sampler.py``
SAMPLER_SOURCE = '''"""Sampler of this bundle (exported by synthmed; needs torch, numpy, MONAI and Pillow).

Image ``i`` (``first_index`` <= i < ``first_index + num_samples``) starts from the noise
``numpy.random.Generator(numpy.random.PCG64(numpy.random.SeedSequence([seed, i, 0])))
.standard_normal(noise_shape, dtype=float32)`` and gets label ``i % len(labels)``; it is
written to ``output_dir/<i>_image.png`` as ``rint(255 * clip(x, 0, 1))``.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image


def stream_noise(seed: int, first_index: int, n: int, shape: Sequence[int]) -> torch.Tensor:
    """float32 ``(n, *shape)``: the initial noise of images ``first_index .. first_index+n-1``."""
    rows = [
        np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), i, 0]))).standard_normal(
            tuple(shape), dtype=np.float32
        )
        for i in range(int(first_index), int(first_index) + int(n))
    ]
    return torch.from_numpy(np.stack(rows))


class StreamSampler:
    """Runs ``inferer.sample`` batch by batch and writes 8-bit PNGs."""

    def __init__(
        self,
        network: torch.nn.Module,
        inferer: object,
        scheduler: object,
        noise_shape: Sequence[int],
        labels: Sequence[str],
        output_dir: str,
        device: torch.device,
        batch_size: int = 8,
        autoencoder: torch.nn.Module | None = None,
    ) -> None:
        self.network = network.eval()
        self.inferer = inferer
        self.scheduler = scheduler
        self.noise_shape = list(noise_shape)
        self.labels = list(labels)
        self.output_dir = output_dir
        self.device = device
        self.batch_size = int(batch_size)
        self.autoencoder = None if autoencoder is None else autoencoder.eval()

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Images float32 ``(N, C, H, W)`` in [0, 1] from noise ``(N, *noise_shape)``."""
        model = self.network if labels is None else functools.partial(self.network, class_labels=labels)
        if self.autoencoder is None:
            x = self.inferer.sample(input_noise=noise, diffusion_model=model, scheduler=self.scheduler, verbose=False)
        else:
            x = self.inferer.sample(
                input_noise=noise,
                autoencoder_model=self.autoencoder,
                diffusion_model=model,
                scheduler=self.scheduler,
                verbose=False,
            )
        return ((x.float() + 1) / 2).clamp(0, 1)

    def run(self, num_samples: int, seed: int, first_index: int = 0) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        end = int(first_index) + int(num_samples)
        for start in range(int(first_index), end, self.batch_size):
            n = min(self.batch_size, end - start)
            noise = stream_noise(seed, start, n, self.noise_shape).to(self.device)
            labels = None
            if self.labels:
                labels = (torch.arange(start, start + n) % len(self.labels)).to(self.device)
            images = self.sample(noise, labels).cpu().numpy()
            for j, image in enumerate(images):
                pixels = np.rint(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
                picture = Image.fromarray(pixels[0]) if len(pixels) == 1 else Image.fromarray(pixels.transpose(1, 2, 0))
                picture.save(os.path.join(self.output_dir, f"{start + j}_image.png"))
'''


def unet_kwargs(cfg: Any, in_channels: int, norm_num_groups: int) -> dict[str, Any]:
    """Literal ``DiffusionModelUNet`` arguments of a ddpm/ldm config (what its ``build_unet`` passes)."""
    return {
        "spatial_dims": 2,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "num_res_blocks": cfg.num_res_blocks,
        "channels": list(cfg.unet_channels),
        "attention_levels": list(cfg.attention_levels),
        "norm_num_groups": norm_num_groups,
        "num_head_channels": [math.gcd(c, 32) for c in cfg.unet_channels],
        "num_class_embeds": cfg.n_labels if cfg.n_labels > 0 else None,
    }


def autoencoder_kwargs(cfg: Any) -> dict[str, Any]:
    """Literal ``AutoencoderKL`` arguments of an ldm config (what ``ldm.build_autoencoder`` passes)."""
    levels = len(cfg.autoencoder_channels)
    return {
        "spatial_dims": 2,
        "in_channels": cfg.channels,
        "out_channels": cfg.channels,
        "num_res_blocks": 1,
        "channels": list(cfg.autoencoder_channels),
        "attention_levels": [False] * levels,
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.autoencoder_groups,
        "with_encoder_nonlocal_attn": False,
        "with_decoder_nonlocal_attn": False,
    }


def _rebuilt(target: str, kwargs: dict[str, Any], original: torch.nn.Module, ref: str) -> dict[str, torch.Tensor]:
    """The state dict of ``original``, after checking that ``target(**kwargs)`` (what the
    bundle config builds) takes it strictly (same keys and shapes; the runner test checks
    the images)."""
    from monai.networks import nets

    built = getattr(nets, target)(**kwargs)
    state = {k: v.detach().cpu().clone() for k, v in original.state_dict().items()}
    try:
        built.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise GeneratorError(
            f"{ref}: the bundle's {target} arguments do not rebuild the model's network "
            f"({str(exc).splitlines()[0][:120]}); generators/diffusion_bundle.py is out of step with the architecture"
        ) from None
    return state


def _ddpm_parts(generator: Any) -> dict[str, Any]:
    cfg = generator.cfg
    if getattr(cfg, "mask_classes", 0):
        raise GeneratorError(
            f"{generator.card.ref}: a mask-conditioned ddpm cannot be exported as a bundle yet (its sampler needs "
            "masks); export it as TorchScript (--format torchscript), which takes the masks"
        )
    kwargs = unet_kwargs(cfg, cfg.channels, cfg.norm_num_groups)
    return {
        "unet": (kwargs, _rebuilt("DiffusionModelUNet", kwargs, generator.module, generator.card.ref)),
        "autoencoder": None,
        "noise_shape": [cfg.channels, cfg.image_size, cfg.image_size],
        "scheduler": {
            "_target_": "monai.networks.schedulers.DDIMScheduler",
            "num_train_timesteps": cfg.timesteps,
            "schedule": cfg.schedule,
            "clip_sample": True,
        },
        "steps": int(generator.ddim_steps),
        "inferer": {"_target_": "monai.inferers.DiffusionInferer", "scheduler": "@noise_scheduler"},
    }


def _ldm_parts(generator: Any) -> dict[str, Any]:
    cfg = generator.cfg
    kwargs = unet_kwargs(cfg, cfg.latent_channels, cfg.unet_groups)
    ae_kwargs = autoencoder_kwargs(cfg)
    ref = generator.card.ref
    if cfg.sampler == "rflow":
        scheduler = {
            "_target_": "monai.networks.schedulers.RFlowScheduler",
            "num_train_timesteps": cfg.timesteps,
            "use_discrete_timesteps": True,
        }
    else:
        scheduler = {
            "_target_": "monai.networks.schedulers.DDIMScheduler",
            "num_train_timesteps": cfg.timesteps,
            "schedule": cfg.schedule,
            "clip_sample": False,
        }
    return {
        "unet": (kwargs, _rebuilt("DiffusionModelUNet", kwargs, generator.module.unet, ref)),
        "autoencoder": (ae_kwargs, _rebuilt("AutoencoderKL", ae_kwargs, generator.module.autoencoder, ref)),
        "noise_shape": [cfg.latent_channels, cfg.latent_size, cfg.latent_size],
        "scheduler": scheduler,
        "steps": int(generator.sample_steps),
        "inferer": {
            "_target_": "monai.inferers.LatentDiffusionInferer",
            "scheduler": "@noise_scheduler",
            "scale_factor": float(cfg.scale_factor),
        },
    }


def diffusion_parts(generator: Any) -> dict[str, Any]:
    """Networks (literal kwargs + state dict), scheduler and inferer of a loaded ddpm/ldm."""
    architecture = generator.card.architecture
    if architecture == "ddpm":
        return _ddpm_parts(generator)
    if architecture == "ldm":
        return _ldm_parts(generator)
    raise GeneratorError(f"{generator.card.ref}: not a diffusion model ('{architecture}'); use export_bundle")


def diffusion_inference_config(parts: dict[str, Any], labels: list[str], num_samples: int = 8) -> dict[str, Any]:
    """The ``configs/inference.json`` of a diffusion bundle (module docstring)."""
    load = "$@network.load_state_dict(torch.load(@model_dir + '/{}', map_location=@device, weights_only=True))"
    cfg: dict[str, Any] = {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "model_dir": "$@bundle_root + '/models'",
        "output_dir": "$@bundle_root + '/outputs'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "num_samples": num_samples,
        "seed": 0,
        "first_index": 0,
        "batch_size": 8,
        "num_inference_steps": parts["steps"],
        "noise_shape": parts["noise_shape"],
        "labels": labels,
        "network_def": {"_target_": "monai.networks.nets.DiffusionModelUNet", **parts["unet"][0]},
        "network": "$@network_def.to(@device)",
        "load_network": load.format("model.pt"),
    }
    requires = ["@load_network", "@set_timesteps"]
    if parts["autoencoder"] is not None:
        cfg["autoencoder_def"] = {"_target_": "monai.networks.nets.AutoencoderKL", **parts["autoencoder"][0]}
        cfg["autoencoder"] = "$@autoencoder_def.to(@device)"
        cfg["load_autoencoder"] = load.replace("@network", "@autoencoder").format("model_autoencoder.pt")
        requires.insert(1, "@load_autoencoder")
    cfg["noise_scheduler"] = parts["scheduler"]
    cfg["set_timesteps"] = "$@noise_scheduler.set_timesteps(num_inference_steps=@num_inference_steps)"
    cfg["inferer"] = parts["inferer"]
    sampler: dict[str, Any] = {
        "_target_": "scripts.sampler.StreamSampler",
        "_requires_": requires,
        "network": "@network",
        "inferer": "@inferer",
        "scheduler": "@noise_scheduler",
        "noise_shape": "@noise_shape",
        "labels": "@labels",
        "output_dir": "@output_dir",
        "device": "@device",
        "batch_size": "@batch_size",
    }
    if parts["autoencoder"] is not None:
        sampler["autoencoder"] = "@autoencoder"
    cfg["sampler"] = sampler
    cfg["run"] = ["$@sampler.run(@num_samples, @seed, @first_index)"]
    return cfg


def diffusion_weights(parts: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """``models/`` file name -> state dict."""
    files = {"model.pt": parts["unet"][1]}
    if parts["autoencoder"] is not None:
        files["model_autoencoder.pt"] = parts["autoencoder"][1]
    return files
