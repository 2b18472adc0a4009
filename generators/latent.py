"""The pure-torch form of a latent generator: what export, TorchScript and latent-space
visualisation share.

A ``LatentModule`` wraps an ``nn.Module`` with the signature

    forward(latent: (N, latent_dim) float32, label_index: (N,) int64 | None = None)
        -> (N, C [+ 1], H, W) float32

whose first C channels are images in the card's ``value_range``, row-major (H, W) like
every array in synthmed; with ``mask_channel`` one more channel holds the mask class index
(as float). ``label_index`` indexes the card's ``conditioning.labels``; None cycles through
them (sample i gets label ``i % n_labels``), as ``CganModel.generate`` does. The module
needs torch only (no synthmed) and is scriptable, so ``torch.jit.script`` exports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from generators.errors import GeneratorError

LatentDistribution = Literal["normal", "uniform"]
Activation = Literal["sigmoid", "tanh", "none"]
SpatialOrder = Literal["row_major", "monai"]


def sample_latent(n: int, latent_dim: int, distribution: str, seed: int) -> torch.Tensor:
    """``(n, latent_dim)`` float32 latents, N(0, 1) or U(0, 1), from the per-image seed
    stream (``generators.seed_stream``: row ``j`` is image ``start + j``'s latent)."""
    from generators.seed_stream import stream_normal

    return stream_normal((n, latent_dim), seed, distribution=distribution)


def interpolate_latents(start: torch.Tensor, end: torch.Tensor, steps: int, distribution: str) -> torch.Tensor:
    """``(steps, D)`` points from ``start`` to ``end`` (both ``(D,)``): spherical for normal
    latents (stays on the shell where Gaussian samples live), linear for uniform ones."""
    if steps < 2:
        raise GeneratorError(f"expected at least 2 interpolation steps, got {steps}")
    t = torch.linspace(0.0, 1.0, steps)[:, None]
    if distribution == "uniform":
        return (1 - t) * start + t * end
    cos = torch.clamp(F.cosine_similarity(start, end, dim=0), -1.0, 1.0)
    omega = torch.acos(cos)
    if float(omega) < 1e-4:
        return (1 - t) * start + t * end
    so = torch.sin(omega)
    return torch.sin((1 - t) * omega) / so * start + torch.sin(t * omega) / so * end


class MonaiGeneratorModule(nn.Module):
    """A MONAI ``Generator``-style network as a latent module (see module docstring).

    The network sees ``cat(latent, one_hot(label_index))`` when ``n_labels`` > 0 and emits
    ``image_channels + mask_classes`` raw channels. ``activation`` maps the image channels to
    the value range (sigmoid -> [0, 1], tanh -> [-1, 1], none -> clamped to ``value_range``);
    mask logits become a class index channel. ``spatial_order`` "monai" means the network
    emits (C, x, y) as MONAI's image readers do, so the output is transposed to (C, H, W).
    """

    def __init__(
        self,
        net: nn.Module,
        image_channels: int,
        n_labels: int = 0,
        mask_classes: int = 0,
        activation: str = "sigmoid",
        spatial_order: str = "row_major",
        value_range: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        super().__init__()
        if activation not in ("sigmoid", "tanh", "none"):
            raise GeneratorError(f"unknown output activation '{activation}'; allowed: sigmoid, tanh, none")
        if spatial_order not in ("row_major", "monai"):
            raise GeneratorError(f"unknown spatial order '{spatial_order}'; allowed: row_major, monai")
        self.net = net
        self.image_channels = int(image_channels)
        self.n_labels = int(n_labels)
        self.mask_classes = int(mask_classes)
        self.activation = activation
        self.transpose = spatial_order == "monai"
        self.low = float(value_range[0])
        self.high = float(value_range[1])

    def forward(self, latent: torch.Tensor, label_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.n_labels > 0:
            if label_index is None:
                label_index = torch.arange(latent.shape[0], device=latent.device) % self.n_labels
            onehot = F.one_hot(label_index.long(), self.n_labels).to(latent.dtype)
            latent = torch.cat([latent, onehot], dim=1)
        raw = self.net(latent)
        if self.transpose:
            raw = raw.transpose(2, 3)
        images = raw[:, : self.image_channels]
        if self.activation == "sigmoid":
            images = torch.sigmoid(images)
        elif self.activation == "tanh":
            images = torch.tanh(images)
        else:
            images = torch.clamp(images, self.low, self.high)
        if self.mask_classes > 0:
            mask = torch.argmax(raw[:, self.image_channels :], dim=1, keepdim=True).to(images.dtype)
            return torch.cat([images, mask], dim=1)
        return images


@dataclass(frozen=True)
class MonaiNetwork:
    """A network MONAI's bundle runner can build from a config: ``_target_`` name in
    ``monai.networks.nets``, literal constructor arguments and its state dict."""

    target: str
    kwargs: dict[str, Any]
    state_dict: dict[str, torch.Tensor]


@dataclass(frozen=True)
class LatentModule:
    """A generator in pure-torch form; ``module`` follows the module docstring's signature."""

    module: nn.Module
    latent_dim: int
    latent_distribution: str
    labels: tuple[str, ...]
    image_channels: int
    value_range: tuple[float, float]
    mask_channel: bool = False
    activation: str = "none"
    spatial_order: str = "row_major"
    monai: MonaiNetwork | None = None
    #: per-image latent shape when it is not ``(latent_dim,)`` (diffusion noise ``(C, h, w)``)
    latent_shape: tuple[int, ...] = ()

    @torch.inference_mode()
    def images(self, latent: torch.Tensor, label_index: torch.Tensor | None = None) -> torch.Tensor:
        """Run the module and keep the image channels: float32 ``(N, C, H, W)``."""
        out = self.module(latent, label_index)
        return out[:, : self.image_channels].float()


def latent_module(generator: Any) -> LatentModule:
    """The latent module of a loaded generator: its own ``latent_module()`` when it has one,
    else an adapter for the architectures synthmed ships (cgan)."""
    own = getattr(generator, "latent_module", None)
    if callable(own):
        return own()
    from generators.architectures.cgan import CganModel

    if isinstance(generator, CganModel):
        return _cgan_latent_module(generator)
    architecture = getattr(getattr(generator, "card", None), "architecture", None)
    if architecture == "dcgan":
        return _dcgan_latent_module(generator)
    if architecture == "vae":
        return _vae_latent_module(generator)
    if architecture in ("ddpm", "ldm", "pix2pix"):
        from generators import diffusion_export

        return getattr(diffusion_export, f"{architecture}_latent_module")(generator)
    card = generator.card
    raise GeneratorError(
        f"{card.ref}: architecture '{card.architecture}' exposes no latent module, so it cannot be exported "
        "or interpolated; implement latent_module() on its generator class (see generators/latent.py)"
    )


class VaeDecoderModule(nn.Module):
    """The decoder of a conditional ``VarAutoEncoder`` (label one-hot appended to z, as in
    ``generators.architectures.vae``) as a latent module: images in [0, 1]."""

    def __init__(self, net: nn.Module, n_labels: int) -> None:
        super().__init__()
        self.net = net
        self.n_labels = int(n_labels)

    def forward(self, latent: torch.Tensor, label_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        if label_index is None:
            label_index = torch.arange(latent.shape[0], device=latent.device) % self.n_labels
        onehot = F.one_hot(label_index.long(), self.n_labels).to(latent.dtype)
        return torch.clamp(self.net.decode_forward(torch.cat([latent, onehot], dim=1), True), 0.0, 1.0)


def monai_generator_kwargs(net: nn.Module) -> dict[str, Any]:
    """Constructor arguments of a built ``monai.networks.nets.Generator``, as JSON literals."""
    from monai.networks.nets import Generator

    if not isinstance(net, Generator):
        raise GeneratorError(f"expected a monai.networks.nets.Generator, got {type(net).__name__}")

    def literal(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return [literal(v) for v in value]
        if isinstance(value, dict):
            return {str(k): literal(v) for k, v in value.items()}
        if isinstance(value, str):
            return str(value)
        return value

    return {
        "latent_shape": literal(net.latent_shape),
        "start_shape": [net.in_channels, *literal(net.start_shape)],
        "channels": literal(net.channels),
        "strides": literal(net.strides),
        "kernel_size": literal(net.kernel_size),
        "num_res_units": net.num_res_units,
        "act": literal(net.act),
        "norm": literal(net.norm),
        "dropout": net.dropout,
        "bias": net.bias,
    }


def _cgan_latent_module(generator: Any) -> LatentModule:
    cfg = generator.cfg
    net = generator.module.net  # what ConditionalGenerator runs on cat(z, onehot)
    wrapper = MonaiGeneratorModule(
        net, cfg.channels, cfg.n_labels, cfg.mask_classes, "sigmoid", "row_major", generator.card.value_range
    )
    monai = None  # the 'upsample' style is not a MONAI network: it is exported as TorchScript
    if cfg.style == "mednist":
        state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        monai = MonaiNetwork("Generator", monai_generator_kwargs(net), state)
    return LatentModule(
        module=wrapper.eval(),
        latent_dim=cfg.latent_dim,
        latent_distribution="normal",
        labels=tuple(generator.labels),
        image_channels=cfg.channels,
        value_range=tuple(generator.card.value_range),
        mask_channel=cfg.mask_classes > 0,
        activation="sigmoid",
        spatial_order="row_major",
        monai=monai,
    )


def _dcgan_latent_module(generator: Any) -> LatentModule:
    cfg = generator.cfg
    net = generator.module  # a MONAI Generator: z -> logits, sigmoid gives the image
    wrapper = MonaiGeneratorModule(net, cfg.channels, 0, 0, "sigmoid", "row_major", generator.card.value_range)
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    return LatentModule(
        module=wrapper.eval(),
        latent_dim=cfg.latent_dim,
        latent_distribution="normal",
        labels=(),  # unconditional (a one-class model's label is a name, not an input)
        image_channels=cfg.channels,
        value_range=tuple(generator.card.value_range),
        activation="sigmoid",
        monai=MonaiNetwork("Generator", monai_generator_kwargs(net), state),
    )


def _vae_latent_module(generator: Any) -> LatentModule:
    cfg = generator.cfg
    return LatentModule(
        module=VaeDecoderModule(generator.module.net, cfg.n_labels).eval(),
        latent_dim=cfg.latent_dim,
        latent_distribution="normal",
        labels=tuple(generator.card.conditioning.labels),
        image_channels=cfg.channels,
        value_range=tuple(generator.card.value_range),
    )
