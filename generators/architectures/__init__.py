"""Generator architectures built from MONAI networks, and how to load each one.

=========  ======================================================  ===================  =========================
name       networks (MONAI)                                        conditioning         sampling
=========  ======================================================  ===================  =========================
cgan       Generator / Discriminator (MedNIST GAN bundle)          label, paired mask   one forward pass
dcgan      Generator / Discriminator (MedNIST GAN bundle recipe)   none                 one forward pass
vae        VarAutoEncoder, label maps in, label appended to z      label                decode z ~ N(0, I)
ddpm       DiffusionModelUNet (class embedding) + DDPM scheduler   label                DDIM, ``ddim_steps``
ldm        AutoencoderKL + latent DiffusionModelUNet, RFlow/DDPM   label                rflow/DDIM, ``sample_steps``
pix2pix    UNet generator + PatchDiscriminator, L1 + adversarial   mask (+ label)       one forward pass
vae3d      3D Convolution/ResidualUnit VAE (+ PatchDiscriminator)   label, mask          decode z ~ N(0, I)
ldm3d      3D AutoencoderKL + latent DiffusionModelUNet, RFlow     label, mask          Euler, ``sample_steps``
noise      none (negative control: per-class Gaussian noise)       label, salt masks    seeded draw
blobs      none (negative control: smooth random blobs)            label, salt masks    seeded draw
holdout    none (positive control: held-out REAL val images)       label, real masks    seeded permutation
=========  ======================================================  ===================  =========================

``holdout`` is the architecture named ``real-holdout``; the controls prove the judge (see
``generators/architectures/controls.py``).

Every model emits float32 images ``(N, C, H, W)`` in [0, 1] (the card's ``value_range``
must say so; the volume architectures ``vae3d`` and ``ldm3d`` emit ``(N, 1, D, H, W)`` and
their cards give ``volume_size``) and is deterministic for a seed. ``LOADERS[card.architecture](card,
weights_path, device)`` verifies the weights' sha256 (``generators.weights``) and returns a
loaded ``generators.contract.Generator``; modules are imported lazily, so reading this
mapping costs no MONAI import.

Training lives in ``generators.training`` (``train_generator(spec, data, ...)``).
Multi-GPU is data parallel under torch's own launcher: start one process per GPU with
``torchrun --nproc_per_node=<gpus> <script>``, where the script calls
``torch.distributed.init_process_group("nccl")`` (``gloo`` on CPU), picks
``cuda:<LOCAL_RANK>`` and calls ``train_generator``; ``generators.training.fit`` then gives
every rank its share of each epoch, averages gradients across ranks and writes checkpoints
from rank 0 only (see its docstring), and rank 0 writes the card and weights. The ``train``
stage itself runs one process; it does not set up a process group yet. Every architecture
but the controls trains through ``fit``; the controls refuse a process group.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from generators.card import ModelCard
from generators.contract import Generator
from generators.errors import DataError, GeneratorError

# architecture -> (module, model class); the class takes (card, state_dict, device)
_MODELS: dict[str, tuple[str, str]] = {
    "cgan": ("generators.architectures.cgan", "CganModel"),
    "dcgan": ("generators.architectures.dcgan", "DcganModel"),
    "vae": ("generators.architectures.vae", "VaeModel"),
    "ddpm": ("generators.architectures.ddpm", "DdpmModel"),
    "ldm": ("generators.architectures.ldm", "LdmModel"),
    "pix2pix": ("generators.architectures.pix2pix", "Pix2pixModel"),
    "vae3d": ("generators.architectures.vae3d", "Vae3dModel"),
    "ldm3d": ("generators.architectures.ldm3d", "Ldm3dModel"),
    # controls that prove the judge (generators/architectures/controls.py)
    "noise": ("generators.architectures.controls", "NoiseModel"),
    "blobs": ("generators.architectures.controls", "NoiseModel"),
    "real-holdout": ("generators.architectures.controls", "HoldoutModel"),
}


def load_state(card: ModelCard, weights: Path | None) -> dict[str, torch.Tensor]:
    """Verify ``weights`` against the card's sha256, then read the state dict (CPU tensors)."""
    from generators.weights import load_weights

    if weights is None:
        raise GeneratorError(
            f"{card.ref}: weights are not available here (listed for search only); "
            "obtain them from the card's origin and register them"
        )
    return load_weights(Path(weights), card.weights.sha256, card.weights.format)


def _loader(architecture: str) -> Callable[[ModelCard, Path | None, str], Generator]:
    module_name, class_name = _MODELS[architecture]

    def load(card: ModelCard, weights: Path | None, device: str = "cpu") -> Generator:
        if card.architecture != architecture:
            raise GeneratorError(
                f"{card.ref}: card architecture is '{card.architecture}', not '{architecture}'; "
                f"load it with LOADERS['{card.architecture}']"
            )
        if tuple(card.value_range) != (0.0, 1.0):
            raise GeneratorError(
                f"{card.ref}: {architecture} emits images in [0, 1] but the card says value_range "
                f"{list(card.value_range)}; set value_range: [0.0, 1.0]"
            )
        state = load_state(card, weights)
        model_class = getattr(importlib.import_module(module_name), class_name)
        return model_class(card, state, device)

    load.__name__ = f"load_{architecture}"
    load.__doc__ = f"Verify the weights' sha256 and build a loaded {architecture} generator on ``device``."
    return load


LOADERS: dict[str, Callable[[ModelCard, Path | None, str], Generator]] = {name: _loader(name) for name in _MODELS}


def label_indices(card: ModelCard, n: int, condition: Sequence[str] | str | None) -> list[int]:
    """Conditioning labels -> indices into ``card.conditioning.labels``.

    ``None`` cycles through the labels (sample ``i`` gets label ``i % L``); a string applies
    to every sample; a sequence gives one label per sample (``generators.labels``)."""
    from generators.labels import label_indices as shared_label_indices

    return shared_label_indices(card.conditioning.labels, n, condition, card.ref)


def check_shapes(module: nn.Module, state: dict[str, torch.Tensor], card: ModelCard) -> None:
    """DataError (one line, naming the card, the tensor and both shapes) when a tensor of
    ``state`` has another shape than the same-named tensor of ``module``."""
    expected = module.state_dict()
    for key, tensor in state.items():
        if key in expected and isinstance(tensor, torch.Tensor) and tensor.shape != expected[key].shape:
            raise DataError(
                f"{card.ref}: weights tensor '{key}' has shape {list(tensor.shape)}, the network expects "
                f"{list(expected[key].shape)}; the weights file does not match the card's network settings: "
                "retrain, or restore the matching weights"
            )


def check_label_count(card: ModelCard, n_labels: int) -> None:
    """Raise unless the card lists as many class labels as the network was built for."""
    if len(card.conditioning.labels) != n_labels:
        raise GeneratorError(
            f"{card.ref}: card lists {len(card.conditioning.labels)} labels but the network expects "
            f"{n_labels}; fix conditioning.labels"
        )


def load_network(module: nn.Module, state: dict[str, torch.Tensor], card: ModelCard) -> None:
    """Strictly load ``state`` into ``module``; a mismatch names the card, not torch internals."""
    from generators.weights import load_state_strict

    check_shapes(module, state, card)
    load_state_strict(module, state, card.ref)  # names missing/unexpected keys and shapes in one line


def seeded_normal(shape: Sequence[int], seed: int, stream: int = 0) -> torch.Tensor:
    """Standard-normal float32 CPU tensor ``shape = (n, ...)`` from the per-image seed stream
    (``generators.seed_stream``): row ``j`` is image ``start + j``'s draw ``stream`` (0: its
    latent / initial noise), so it depends on ``(seed, image index)`` only, not on the batch.
    Same numbers on every device, since the draw happens on the CPU."""
    from generators.seed_stream import stream_normal

    return stream_normal(shape, seed, stream=stream)


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA, a no-op elsewhere."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def size_levels(image_size: int, most: int = 4) -> int:
    """How many stride-2 levels take ``image_size`` down to 4x4 (at most ``most``, at least 1)."""
    return max(1, min(most, image_size.bit_length() - 3))
