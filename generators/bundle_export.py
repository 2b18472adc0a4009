"""Export a loaded generator as a MONAI bundle that MONAI's own runner
(``python -m monai.bundle run``) executes and model-zoo's ``ci/verify_bundle.py`` accepts.

Bundle layout (MONAI model zoo): ``LICENSE``, ``configs/metadata.json``,
``configs/inference.json``, ``configs/logging.conf``, ``models/model.pt`` (a state dict),
``docs/README.md`` and, when the training data has a licence, ``docs/data_license.txt``.
Diffusion models (``ddpm``, ``ldm``) export like the zoo's diffusion bundles: MONAI UNet (+
``AutoencoderKL`` in ``models/model_autoencoder.pt``), scheduler and inferer in the config,
``scripts/sampler.py`` (see ``generators.diffusion_bundle``). Every export draws image
``i``'s latent from the seed stream (``generators.seed_stream``), so the runner's PNGs are
``generate(n, seed)``'s. Exports of row-major generators add a ``Transposed`` step before
MONAI's ``SaveImaged`` so the PNGs come out upright.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from generators.bundle_runtime import DIFFUSION_ARCHITECTURES, BundleNetwork
from generators.card import ModelCard
from generators.errors import GeneratorError
from generators.latent import LatentModule, latent_module
from generators.shards import sha256_file

log = logging.getLogger(__name__)

LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def _unit_expression(lm: LatentModule, spec_channels: int, raw: bool) -> str:
    """Python source of a lambda mapping a prediction (C', ...) to image channels in [0, 1]."""
    low, high = lm.value_range
    head = f"x[:{spec_channels}]"
    if raw and lm.activation == "sigmoid":
        return f"$lambda x: torch.sigmoid({head})"
    if raw and lm.activation == "tanh":
        inner = f"torch.tanh({head})"
    else:
        inner = head if not raw else f"torch.clamp({head}, {low!r}, {high!r})"
    return f"$lambda x: torch.clamp(({inner} - {low!r}) / ({high!r} - {low!r}), 0.0, 1.0)"


def _mask_expression(lm: LatentModule, raw: bool) -> str:
    c = lm.image_channels
    if raw:
        return f"$lambda x: torch.argmax(x[{c}:], dim=0, keepdim=True).to(torch.uint8)"
    return f"$lambda x: x[{c}:{c + 1}].round().to(torch.uint8)"


#: numpy source of the masks of a mask-input module (pix2pix, mask-conditioned ddpm): image
#: i (label index k) gets a pool mask of label k, picked with rng(seed, i, 1) as MaskPool.draw does
MASK_PICK = (
    "torch.from_numpy(np.stack([@pool_masks[np.flatnonzero(@pool_labels == k)[np.random.Generator("
    "np.random.PCG64(np.random.SeedSequence([@seed, i, 1]))).integers(int((@pool_labels == k).sum()))]] "
    "for i, k in zip(@image_indices, @label_indices)]))"
)


def mask_input(lm: LatentModule) -> bool:
    """True for a module that takes masks as its third argument (it holds a mask pool)."""
    return hasattr(lm.module, "mask_pool_masks")


def inference_config(lm: LatentModule, num_samples: int = 8, seed: int = 0) -> dict[str, Any]:
    """The ``configs/inference.json`` of an exported generator (see ``export_bundle``)."""
    raw = lm.monai is not None  # MONAI network: raw outputs; else a TorchScript latent module
    n_labels = len(lm.labels)
    draw = "standard_normal" if lm.latent_distribution == "normal" else "random"
    cfg: dict[str, Any] = {
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "output_dir": "$@bundle_root + '/outputs'",
        "num_samples": num_samples,
        "batch_size": 8,
        "seed": seed,
        "first_index": 0,
        "latent_size": list(lm.latent_shape) if lm.latent_shape else lm.latent_dim,
        # the seed stream (generators.seed_stream): image i's latent comes from its own generator
        "image_indices": "$list(range(@first_index, @first_index + @num_samples))",
        "latents": (
            "$torch.from_numpy(np.stack([np.random.Generator(np.random.PCG64(np.random.SeedSequence([@seed, i, 0])))"
            f".{draw}(@latent_size, dtype=np.float32) for i in @image_indices]))"
        ),
    }
    if n_labels:
        cfg["labels"] = list(lm.labels)
        cfg["num_labels"] = n_labels
        cfg["label_indices"] = "$[i % @num_labels for i in @image_indices]"
        cfg["data"] = "$[{'latent': z, 'label_index': k} for z, k in zip(@latents, @label_indices)]"
    else:
        cfg["data"] = "$[{'latent': z} for z in @latents]"
    if mask_input(lm):
        # image i's mask: a pool mask of its label, picked by its own CHOICE stream (seed, i, 1)
        cfg["pool_masks"] = "$@network_def.mask_pool_masks.cpu().numpy().astype(np.int64)"
        cfg["pool_labels"] = "$@network_def.mask_pool_labels.cpu().numpy()"
        cfg["masks"] = f"${MASK_PICK}"
        cfg["data"] = (
            "$[{'latent': z, 'label_index': k, 'mask_in': m} for z, k, m in zip(@latents, @label_indices, @masks)]"
        )
    if raw:
        cfg["ckpt_path"] = "$@bundle_root + '/models/model.pt'"
        cfg["network_def"] = {"_target_": lm.monai.target, **lm.monai.kwargs}
        if n_labels:
            batch = (
                "(torch.cat([b['latent'], torch.nn.functional.one_hot(b['label_index'], @num_labels).float()], 1)"
                ".to(@device), None, (), {})"
            )
        else:
            batch = "(b['latent'].to(@device), None, (), {})"
    else:
        cfg["network_def"] = "$torch.jit.load(@bundle_root + '/models/model.ts')"
        if mask_input(lm):
            batch = "(b['latent'].to(@device), None, (b['label_index'].to(@device), b['mask_in'].to(@device)), {})"
        elif n_labels:
            batch = "(b['latent'].to(@device), None, (b['label_index'].to(@device),), {})"
        else:
            batch = "(b['latent'].to(@device), None, (), {})"
    cfg["network"] = "$@network_def.to(@device)"
    cfg["dataset"] = {"_target_": "Dataset", "data": "@data"}
    cfg["dataloader"] = {
        "_target_": "DataLoader",
        "dataset": "@dataset",
        "batch_size": "@batch_size",
        "shuffle": False,
        "num_workers": 0,
    }
    keys = ["pred", "mask"] if lm.mask_channel else ["pred"]
    transforms: list[dict[str, Any]] = []
    if lm.mask_channel:
        transforms.append({"_target_": "CopyItemsd", "keys": "pred", "names": "mask"})
        transforms.append({"_target_": "Lambdad", "keys": "mask", "func": _mask_expression(lm, raw)})
    transforms.append({"_target_": "Lambdad", "keys": "pred", "func": _unit_expression(lm, lm.image_channels, raw)})
    if lm.spatial_order == "row_major" or not raw:
        # SaveImaged writes MONAI's (C, x, y); our arrays are (C, H, W)
        transforms.append({"_target_": "Transposed", "keys": keys, "indices": [0, 2, 1]})
    for key in keys:
        transforms.append(
            {
                "_target_": "SaveImaged",
                "keys": key,
                "output_dir": "@output_dir",
                "output_ext": "png",
                "output_postfix": "image" if key == "pred" else "mask",
                "separate_folder": False,
                "scale": 255 if key == "pred" else None,
                "output_dtype": "$np.uint8",
                "print_log": False,
            }
        )
    cfg["postprocessing"] = {"_target_": "Compose", "transforms": transforms}
    cfg["inferer"] = {"_target_": "SimpleInferer"}
    cfg["prepare_batch"] = f"$lambda b, *_, **__: {batch}"
    cfg["handlers"] = (
        [{"_target_": "CheckpointLoader", "load_path": "@ckpt_path", "load_dict": {"model": "@network"}}] if raw else []
    )
    cfg["evaluator"] = {
        "_target_": "SupervisedEvaluator",
        "device": "@device",
        "val_data_loader": "@dataloader",
        "network": "@network",
        "inferer": "@inferer",
        "postprocessing": "@postprocessing",
        "prepare_batch": "@prepare_batch",
        "val_handlers": "@handlers",
    }
    cfg["run"] = ["$@evaluator.run()"]
    return cfg


def _latent_draw(lm: LatentModule) -> str:
    """numpy source of image ``i``'s latent from the seed stream (``generators.seed_stream``)."""
    draw = "standard_normal" if lm.latent_distribution == "normal" else "random"
    shape = list(lm.latent_shape) if lm.latent_shape else lm.latent_dim
    return (
        f"np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, i, 0]))).{draw}({shape}, dtype=np.float32)"
    )


def _tensor(
    type_: str,
    format_: str,
    channels: int,
    shape: list[Any],
    dtype: str,
    value_range: list[float],
    channel_def: dict[str, str],
    description: str,
) -> dict[str, Any]:
    """A tensor format specifier of the MONAI Bundle Specification, plus a ``description``."""
    return {
        "type": type_,
        "format": format_,
        "num_channels": channels,
        "spatial_shape": shape,
        "dtype": dtype,
        "value_range": value_range,
        "is_patch_data": False,
        "channel_def": channel_def,
        "description": description,
    }


def network_data_format(card: ModelCard, lm: LatentModule) -> dict[str, Any]:
    """``network_data_format`` of an exported (non-diffusion) generator: every input of the
    network ``network_def`` builds (latent: shape, distribution, range; label: one-hot and
    how it joins the latent) and its raw output, then ``post_processed_outputs`` (the
    activation applied and the resulting range), so a config written from this alone runs."""
    raw = lm.monai is not None
    n_labels = len(lm.labels)
    names = {str(i): name for i, name in enumerate(lm.labels)}
    dist = (
        "i.i.d. standard normal N(0, 1) (unbounded)" if lm.latent_distribution == "normal" else "i.i.d. uniform U(0, 1)"
    )
    inputs: dict[str, Any] = {
        "latent": _tensor(
            "tuples",
            "latent",
            0,
            list(lm.latent_shape) or [lm.latent_dim],
            "float32",
            [0, 1] if lm.latent_distribution == "uniform" else [],
            {},
            f"latent z, shape (N, {', '.join(map(str, lm.latent_shape or (lm.latent_dim,)))}), {dist}. Image i of seed s uses {_latent_draw(lm)} "
            "with seed=s (the bundle's seed stream), so a given (seed, i) always gives the same image.",
        )
    }
    if n_labels and raw:
        inputs["label"] = _tensor(
            "tuples",
            "labels",
            0,
            [n_labels],
            "float32",
            [0, 1],
            names,
            f"class label one-hot encoded, one_hot(label_index, {n_labels}).float(), shape (N, {n_labels}); "
            f"label_index indexes channel_def. It is concatenated AFTER the latent: the network's single input is "
            f"torch.cat([latent, label], dim=1), shape (N, {lm.latent_dim + n_labels}). Default: image i gets "
            f"label_index i % {n_labels}.",
        )
    elif n_labels:
        inputs["label_index"] = _tensor(
            "tuples",
            "indices",
            0,
            [1],
            "int64",
            [0, n_labels - 1],
            names,
            f"class label as an index into channel_def, shape (N,) int64, passed as the second argument: "
            f"network(latent, label_index) (the module one-hot encodes it and appends it to the latent itself). "
            f"Default: image i gets label_index i % {n_labels}.",
        )
    h, w = card.image_size
    c = lm.image_channels
    mask_classes = list(card.conditioning.mask_classes) if lm.mask_channel else []
    if mask_input(lm):
        inputs["mask"] = _tensor(
            "image",
            "segmentation",
            1,
            [h, w],
            "int64",
            [0, len(mask_classes) - 1],
            {str(k): name for k, name in enumerate(mask_classes)},
            "mask of class indices, shape (N, H, W) int64, third argument: network(latent, label_index, mask). "
            "Default: image i (label k) gets the pool mask network.mask_pool_masks[j], j = "
            "flatnonzero(network.mask_pool_labels == k)[np.random.Generator(np.random.PCG64(np.random.SeedSequence("
            "[seed, i, 1]))).integers(count of pool masks with label k)].",
        )
    low, high = (float(v) for v in lm.value_range)
    order = (
        "(N, C, x, y) in MONAI's axis order: transpose(2, 3) gives row-major (N, C, H, W)"
        if lm.spatial_order == "monai"
        else "(N, C, H, W) row-major"
    )
    if raw:
        channels = c + len(mask_classes)
        defs = {str(i): "image" for i in range(c)}
        defs.update({str(c + k): f"mask logit of class '{name}'" for k, name in enumerate(mask_classes)})
        shape = [w, h] if lm.spatial_order == "monai" else [h, w]
        if lm.activation == "sigmoid":
            post = f"images = torch.sigmoid(pred[:, :{c}])"
        elif lm.activation == "tanh":
            post = f"images = torch.tanh(pred[:, :{c}])"
        else:
            post = f"images = torch.clamp(pred[:, :{c}], {low!r}, {high!r})"
        if mask_classes:
            post += f"; mask = pred[:, {c}:].argmax(1) (class index)"
        outputs = {
            "pred": _tensor(
                "image",
                "magnitude",
                channels,
                shape,
                "float32",
                [],
                defs,
                f"raw network output {order}, unbounded (pre-activation, activation: {lm.activation}); "
                f"post-processing: {post} -> {[low, high]}.",
            )
        }
    else:
        channels = c + (1 if mask_classes else 0)
        defs = {str(i): "image" for i in range(c)}
        if mask_classes:
            defs[str(c)] = "mask class index (as float): " + ", ".join(f"{k}={n}" for k, n in enumerate(mask_classes))
        outputs = {
            "pred": _tensor(
                "image",
                "magnitude",
                channels,
                [h, w],
                "float32",
                [low, high],
                defs,
                f"TorchScript module output {order}: images already in [{low}, {high}] (the module applies its "
                f"activation, {lm.activation}, itself)" + ("; the last channel is the mask" if mask_classes else ""),
            )
        }
    post_outputs = {
        "pred": _tensor(
            "image",
            "magnitude",
            c,
            [h, w],
            "float32",
            [low, high],
            {str(i): "image" for i in range(c)},
            f"images (N, C, H, W) row-major in [{low}, {high}] after the activation ({lm.activation}); the bundle's "
            f"inference config writes them as 8-bit PNGs of 255 * (x - {low}) / ({high} - {low}).",
        )
    }
    return {"inputs": inputs, "outputs": outputs, "post_processed_outputs": post_outputs}


def bundle_metadata(card: ModelCard, lm: LatentModule) -> dict[str, Any]:
    """``configs/metadata.json`` in the MONAI model-zoo schema, plus the synthmed card."""
    return _metadata(
        card,
        "meta_schema_generator_20220718.json",
        ("pytorch-ignite", "pillow"),
        network_data_format(card, lm),
    )


#: schema file names model-zoo's own generator bundles use (``metadata.json`` ``schema``)
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/{}"


def _metadata(card: ModelCard, schema: str, packages: Sequence[str], data_format: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``configs/metadata.json`` every exported bundle shares: MONAI's
    ``schema`` (file name), versions, the ``packages`` installed here (as
    ``required_packages_version``),
    the card's provenance, model and data licences, and ``network_data_format``."""
    import monai

    required = {name: _installed(name) for name in packages}
    required = {k: v for k, v in required.items() if v}
    for tensors in data_format.values():  # model-zoo bundles name the modality of every tensor
        for tensor in tensors.values():
            if isinstance(tensor, dict):
                tensor.setdefault("modality", card.modality or "n/a")
    return {
        "schema": SCHEMA_URL.format(schema),
        "version": card.version,
        "changelog": dict(card.changelog)
        if card.version in card.changelog
        else {
            **dict(card.changelog),
            card.version: "exported by synthmed",
        },
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": required,
        "optional_packages_version": {},
        "name": card.name or card.id,
        "task": f"Generate synthetic {card.modality} {card.anatomy} images ({card.ref})",
        "description": card.description or f"{card.architecture} generator exported by synthmed",
        "authors": card.origin.authors or "synthmed",
        "copyright": card.origin.citation or f"see LICENSE ({card.licence})",
        "license": card.licence,
        "intended_use": card.intended_use,
        "data_source": card.training.dataset or "n/a",
        "data_license": card.training.dataset_licence or "n/a",
        "data_type": "png",
        "network_data_format": data_format,
        "synthmed_card": card.model_dump(mode="json"),
    }


def _installed(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def _export_card(card: ModelCard, lm: LatentModule) -> ModelCard:
    """The card of the exported bundle: what ``BundleGenerator`` needs to load it back."""
    data = card.model_dump(mode="json")
    if lm.monai is not None:
        data["architecture"] = "monai_bundle"
        data["network"] = BundleNetwork(
            target=lm.monai.target,
            kwargs=lm.monai.kwargs,
            activation=lm.activation,
            spatial_order=lm.spatial_order,
            latent_distribution=lm.latent_distribution,
            n_labels=len(lm.labels),
            mask_classes=len(card.conditioning.mask_classes) if lm.mask_channel else 0,
        ).model_dump(mode="json")
        data["weights"] = {"file": "models/model.pt", "sha256": None, "format": "torch"}
    else:
        from generators.torchscript import torchscript_network

        data["architecture"] = "torchscript"
        data["network"] = torchscript_network(lm)
        data["weights"] = {"file": "models/model.ts", "sha256": None, "format": "torchscript"}
    data["latent_dim"] = lm.latent_dim
    return ModelCard.model_validate(data)


def export_bundle(generator: Any, out: Path | str, *, source_dir: Path | None = None, num_samples: int = 8) -> Path:
    """Write ``generator`` as a MONAI bundle at ``out`` (must not exist) and return it.

    Generators built on a MONAI network get ``models/model.pt`` (its state dict) and a
    config that builds the network from ``monai.networks.nets``; others get their latent
    module as TorchScript in ``models/model.ts`` (and its state dict as ``models/model.pt``,
    which model-zoo requires). Mask-input modules (pix2pix, mask-conditioned ddpm) take image
    ``i``'s mask from their pool, picked with the ``(seed, i, 1)`` stream. Either way::

        python -m monai.bundle run --config_file OUT/configs/inference.json --bundle_root OUT

    writes ``num_samples`` PNGs to ``OUT/outputs`` (override ``--num_samples``, ``--seed``,
    ``--first_index``, ``--output_dir``): images ``first_index .. first_index+num_samples-1``
    of the seed stream (``generators.seed_stream``), i.e. with the same seed the images
    ``generate(n, seed)`` makes. ``ddpm``/``ldm`` (without masks) go to
    :func:`export_diffusion_bundle`. ``LICENSE`` and ``docs/data_license.txt`` are copied from
    ``source_dir`` (the card's directory) when present, else written from the card's
    ``licence`` and ``training.dataset_licence`` (:func:`write_licences`); ``metadata.json``
    documents every input and the output (:func:`network_data_format`) and ``docs/README.md``
    shows a minimal hand-written config (:func:`minimal_config`).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise GeneratorError(f"{out}: exists and is not empty; pick a new directory for the bundle")
    masked = bool(getattr(getattr(generator, "cfg", None), "mask_classes", 0))
    if generator.card.architecture in DIFFUSION_ARCHITECTURES and not masked:
        return export_diffusion_bundle(generator, out, source_dir=source_dir, num_samples=num_samples)
    lm = latent_module(generator)
    if mask_input(lm) and not lm.labels:
        raise GeneratorError(
            f"{generator.card.ref}: a mask-input generator without conditioning labels has no bundle export "
            "(its masks are drawn per label); export it as TorchScript (--format torchscript)"
        )
    card = generator.card
    export_card = _export_card(card, lm)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir()
    if lm.monai is not None:
        torch.save(dict(lm.monai.state_dict), out / "models" / "model.pt")
        weights = out / "models" / "model.pt"
    else:
        from generators.torchscript import script_module

        scripted = script_module(lm)
        weights = out / "models" / "model.ts"
        scripted.save(str(weights))
        # model-zoo wants models/model.pt: the state dict of the network the config builds
        torch.save({k: v.detach().cpu() for k, v in scripted.state_dict().items()}, out / "models" / "model.pt")
    export_card = export_card.model_copy(
        update={"weights": export_card.weights.model_copy(update={"sha256": sha256_file(weights)})}
    )
    metadata = bundle_metadata(export_card, lm)
    (out / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    inference = inference_config(lm, num_samples)
    (out / "configs" / "inference.json").write_text(json.dumps(inference, indent=2) + "\n")
    (out / "configs" / "logging.conf").write_text(LOGGING_CONF)
    write_licences(out, card, source_dir)
    (out / "docs" / "README.md").write_text(_readme(export_card, lm, metadata, inference))
    return out


def write_licences(out: Path, card: ModelCard, source_dir: Path | None) -> None:
    """``LICENSE`` (the source's, else one naming the card's ``licence``) and, when the
    training data has a licence, ``docs/data_license.txt`` (the source's, else one from the
    card's ``training`` fields), as model-zoo asks."""
    source = Path(source_dir) if source_dir is not None else None
    if source is not None and (source / "LICENSE").is_file():
        shutil.copy2(source / "LICENSE", out / "LICENSE")
    else:
        (out / "LICENSE").write_text(
            f"{card.name or card.id} ({card.ref})\n\n"
            f"The model (weights and configuration) in this bundle is licensed under: {card.licence}\n"
            + (f"SPDX-License-Identifier: {card.licence}\n" if " " not in card.licence.strip() else "")
            + f"Authors: {card.origin.authors or 'n/a'}. Citation: {card.origin.citation or 'n/a'}.\n"
            "See https://spdx.org/licenses/ for the licence text.\n"
            "Licences of the training data: docs/data_license.txt (when the data has one).\n"
        )
    (out / "docs").mkdir(exist_ok=True)
    if source is not None and (source / "docs" / "data_license.txt").is_file():
        shutil.copy2(source / "docs" / "data_license.txt", out / "docs" / "data_license.txt")
    elif card.training.dataset_licence:
        (out / "docs" / "data_license.txt").write_text(
            f"Training data: {card.training.dataset or 'n/a'}\n"
            f"Data licence: {card.training.dataset_licence}\n\n"
            "Images generated by this model derive from that data; follow its licence terms "
            "(attribution, share-alike where it applies).\n"
        )


def export_diffusion_bundle(
    generator: Any, out: Path | str, *, source_dir: Path | None = None, num_samples: int = 8
) -> Path:
    """Write a loaded ``ddpm``/``ldm`` generator as a model-zoo-style diffusion bundle at
    ``out`` (see ``generators.diffusion_bundle``): ``configs/inference.json`` +
    ``metadata.json`` + ``logging.conf``, ``models/model.pt`` (the UNet's state dict) and,
    for ldm, ``models/model_autoencoder.pt``, ``scripts/sampler.py``, ``docs/README.md``
    and the source's LICENSE. The card travels in metadata.json (``synthmed_card``)."""
    from generators.diffusion_bundle import (
        SAMPLER_SOURCE,
        diffusion_inference_config,
        diffusion_parts,
        diffusion_weights,
    )

    out = Path(out)
    card = generator.card
    parts = diffusion_parts(generator)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir()
    (out / "scripts").mkdir()
    for name, state in diffusion_weights(parts).items():
        torch.save(state, out / "models" / name)
    embedded = card.model_dump(mode="json")
    embedded["weights"] = {
        "file": "models/model.pt",
        "sha256": sha256_file(out / "models" / "model.pt"),
        "format": "torch",
    }
    network = dict(embedded["network"])
    network["ddim_steps" if card.architecture == "ddpm" else "sample_steps"] = parts["steps"]
    embedded["network"] = network
    export_card = ModelCard.model_validate(embedded)
    labels = list(card.conditioning.labels)
    config = diffusion_inference_config(parts, labels, num_samples)
    (out / "configs" / "inference.json").write_text(json.dumps(config, indent=2) + "\n")
    metadata = _diffusion_metadata(export_card, parts)
    (out / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    (out / "configs" / "logging.conf").write_text(LOGGING_CONF)
    (out / "scripts" / "__init__.py").write_text("")
    (out / "scripts" / "sampler.py").write_text(SAMPLER_SOURCE)
    write_licences(out, card, source_dir)
    (out / "docs" / "README.md").write_text(_diffusion_readme(export_card, parts, config, labels))
    return out


def _diffusion_metadata(card: ModelCard, parts: dict[str, Any]) -> dict[str, Any]:
    """``configs/metadata.json`` of a diffusion bundle: the inputs and output of the
    denoising UNet (``network_def``), then the sampled images (``post_processed_outputs``)."""
    noise_shape = list(parts["noise_shape"])
    labels = list(card.conditioning.labels)
    latent_space = parts["autoencoder"] is not None
    h, w = card.image_size
    space = "the autoencoder's latent space" if latent_space else "image space, scaled to [-1, 1]"
    inputs: dict[str, Any] = {
        "image": _tensor(
            "image",
            "latent" if latent_space else "magnitude",
            noise_shape[0],
            noise_shape[1:],
            "float32",
            [],
            {},
            f"noisy sample x_t in {space}, shape (N, {', '.join(map(str, noise_shape))}). Sampling starts from "
            "x_T = noise: image i of seed s uses np.random.Generator(np.random.PCG64(np.random.SeedSequence("
            f"[s, i, 0]))).standard_normal({tuple(noise_shape)}, dtype=np.float32), i.e. N(0, 1).",
        ),
        "timesteps": _tensor(
            "tuples",
            "indices",
            0,
            [1],
            "int64",
            [0, int(parts["scheduler"]["num_train_timesteps"]) - 1],
            {},
            "diffusion timestep t, shape (N,) int64, second argument: network(x, timesteps, class_labels); the "
            f"scheduler ({parts['scheduler']['_target_'].split('.')[-1]}, {parts['steps']} steps) chooses them.",
        ),
    }
    if labels:
        inputs["class_labels"] = _tensor(
            "tuples",
            "indices",
            0,
            [1],
            "int64",
            [0, len(labels) - 1],
            {str(i): name for i, name in enumerate(labels)},
            "class label as an index into channel_def, shape (N,) int64, keyword argument class_labels= "
            f"(the UNet embeds it: num_class_embeds={len(labels)}). Default: image i gets label i % {len(labels)}.",
        )
    decode = (
        " decoded by models/model_autoencoder.pt (AutoencoderKL) after division by scale_factor,"
        if latent_space
        else ""
    )
    outputs = {
        "pred": _tensor(
            "image",
            "latent" if latent_space else "magnitude",
            noise_shape[0],
            noise_shape[1:],
            "float32",
            [],
            {},
            "the UNet's prediction (noise, velocity or x_0 as the scheduler expects), unbounded; the scheduler's "
            "step() turns it into x_{t-1}.",
        )
    }
    post = {
        "pred": _tensor(
            "image",
            "magnitude",
            card.channels,
            [h, w],
            "float32",
            [0, 1],
            {str(i): "image" for i in range(card.channels)},
            f"images (N, C, H, W) row-major: the final sample x_0,{decode} mapped by clamp((x_0 + 1) / 2, 0, 1) "
            "(no activation).",
        )
    }
    return _metadata(
        card,
        "meta_schema_20240725.json",
        ("pillow",),
        {"inputs": inputs, "outputs": outputs, "post_processed_outputs": post},
    )


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, width=1 << 16, default_flow_style=None)


def _seed_stream_expr(shape: Sequence[int], draw: str) -> str:
    return (
        "$torch.from_numpy(np.stack([np.random.Generator(np.random.PCG64(np.random.SeedSequence([@seed, i, 0])))"
        f".{draw}({tuple(shape)!r}, dtype=np.float32) for i in range(@num_samples)]))"
    )


def minimal_config(lm: LatentModule, inference: dict[str, Any]) -> dict[str, Any]:
    """A minimal hand-written inference config for a non-diffusion export (what
    ``docs/README.md`` shows): the network from ``inference["network_def"]``, the inputs
    and the output mapping exactly as ``network_data_format`` documents them; ``images``
    (float32 ``(N, C, H, W)``, row-major, in the value range) equals ``generate(N, seed)``."""
    raw = lm.monai is not None
    n_labels = len(lm.labels)
    draw = "standard_normal" if lm.latent_distribution == "normal" else "random"
    cfg: dict[str, Any] = {
        "imports": ["$import numpy as np"],
        "bundle_root": ".",
        "seed": 0,
        "num_samples": 4,
        "network_def": inference["network_def"],
    }
    if raw:
        cfg["network"] = (
            "$[@network_def.load_state_dict(torch.load(@bundle_root + '/models/model.pt', weights_only=True)), "
            "@network_def.eval()][1]"
        )
    else:
        cfg["network"] = "$@network_def.eval()"
    shape = list(lm.latent_shape) if lm.latent_shape else lm.latent_dim
    cfg["latent"] = (
        "$torch.from_numpy(np.stack([np.random.Generator(np.random.PCG64(np.random.SeedSequence([@seed, i, 0])))"
        f".{draw}({shape}, dtype=np.float32) for i in range(@num_samples)]))"
    )
    c = lm.image_channels
    if raw:
        if n_labels:
            cfg["label"] = f"$torch.nn.functional.one_hot(torch.arange(@num_samples) % {n_labels}, {n_labels}).float()"
            call = "@network(torch.cat([@latent, @label], dim=1))"
        else:
            call = "@network(@latent)"
        if lm.spatial_order == "monai":
            call += ".transpose(2, 3)"
        cfg["pred"] = f"$torch.no_grad()(lambda: {call})()"
        low, high = lm.value_range
        if lm.activation == "sigmoid":
            cfg["images"] = f"$torch.sigmoid(@pred[:, :{c}])"
        elif lm.activation == "tanh":
            cfg["images"] = f"$torch.tanh(@pred[:, :{c}])"
        else:
            cfg["images"] = f"$torch.clamp(@pred[:, :{c}], {low!r}, {high!r})"
        if lm.mask_channel:
            cfg["mask"] = f"$@pred[:, {c}:].argmax(1)"
    else:
        if mask_input(lm):
            cfg["image_indices"] = "$list(range(@num_samples))"
            cfg["label_indices"] = f"$[i % {n_labels} for i in @image_indices]"
            cfg["label_index"] = "$torch.tensor(@label_indices)"
            cfg["pool_masks"] = "$@network.mask_pool_masks.numpy().astype(np.int64)"
            cfg["pool_labels"] = "$@network.mask_pool_labels.numpy()"
            cfg["masks"] = f"${MASK_PICK}"
            call = "@network(@latent, @label_index, @masks)"
        elif n_labels:
            cfg["label_index"] = f"$torch.arange(@num_samples) % {n_labels}"
            call = "@network(@latent, @label_index)"
        else:
            call = "@network(@latent)"
        cfg["pred"] = f"$torch.no_grad()(lambda: {call})()"
        cfg["images"] = f"$@pred[:, :{c}]"
        if lm.mask_channel:
            cfg["mask"] = f"$@pred[:, {c}].round().long()"
    return cfg


def diffusion_minimal_config(config: dict[str, Any], parts: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    """A minimal hand-written config for a diffusion export (what its ``docs/README.md``
    shows): networks, scheduler and inferer from ``configs/inference.json``, noise from the
    seed stream; ``images`` (float32 ``(N, C, H, W)`` in [0, 1]) equals ``generate(N, seed)``."""
    load = (
        "$[@{0}_def.load_state_dict(torch.load(@bundle_root + '/models/{1}', weights_only=True)), @{0}_def.eval()][1]"
    )
    cfg: dict[str, Any] = {
        "imports": ["$import numpy as np", "$import functools"],
        "bundle_root": ".",
        "seed": 0,
        "num_samples": 4,
        "network_def": config["network_def"],
        "network": load.format("network", "model.pt"),
    }
    sample_args = "input_noise=@noise, diffusion_model=@model, scheduler=@noise_scheduler, verbose=False"
    if parts["autoencoder"] is not None:
        cfg["autoencoder_def"] = config["autoencoder_def"]
        cfg["autoencoder"] = load.format("autoencoder", "model_autoencoder.pt")
        sample_args += ", autoencoder_model=@autoencoder"
    cfg["noise_scheduler"] = config["noise_scheduler"]
    cfg["steps"] = f"$@noise_scheduler.set_timesteps(num_inference_steps={parts['steps']})"
    cfg["inferer"] = config["inferer"]
    cfg["noise"] = _seed_stream_expr(parts["noise_shape"], "standard_normal")
    if labels:
        cfg["labels"] = f"$torch.arange(@num_samples) % {len(labels)}"
        cfg["model"] = "$functools.partial(@network, class_labels=@labels)"
    else:
        cfg["model"] = "@network"
    cfg["images"] = f"$[@steps, torch.no_grad()(lambda: ((@inferer.sample({sample_args}) + 1) / 2).clamp(0, 1))()][1]"
    return cfg


_PARSE = (
    "```python\nfrom monai.bundle import ConfigParser\n\nparser = ConfigParser()\n"
    'parser.read_config("my_inference.yaml")\nparser["bundle_root"] = "path/to/this/bundle"\n'
    'images = parser.get_parsed_content("images")  # float32 (N, C, H, W)\n```\n\n'
)


def _licence_lines(card: ModelCard) -> str:
    data = card.training.dataset or "n/a"
    if card.training.dataset_licence:
        data += f" ({card.training.dataset_licence}; docs/data_license.txt)"
    return f"Model: {card.licence} (LICENSE). Training data: {data}. Intended use: {card.intended_use}.\n"


def _readme(card: ModelCard, lm: LatentModule, metadata: dict[str, Any], inference: dict[str, Any]) -> str:
    h, w = card.image_size
    fmt = metadata["network_data_format"]
    described = "\n".join(f"- `{k}`: {v['description']}" for k, v in fmt["inputs"].items())
    out = fmt["outputs"]["pred"]["description"]
    return (
        f"# {card.name or card.id} ({card.ref})\n\n"
        + (f"{card.description}\n\n" if card.description else "")
        + f"Exported by synthmed. Generates {card.modality} {card.anatomy} images, {card.channels} x {h} x {w}, "
        f"float32 in {list(card.value_range)}.\n\n"
        "## Run the bundle\n\n"
        "```\npython -m monai.bundle run --config_file configs/inference.json --bundle_root . "
        "--num_samples 16 --seed 0\n```\n\nwrites `outputs/<i>_image.png` for images i = 0..15 of seed 0.\n\n"
        "## Inputs and output (configs/metadata.json, network_data_format)\n\n"
        f"{described}\n- output `pred`: {out}\n\n"
        "## A minimal inference config written from metadata.json\n\n"
        "The network from `configs/inference.json`'s `network_def`; everything else follows the "
        "inputs and output above. `images` equals synthmed's `generate(num_samples, seed)`:\n\n"
        f"```yaml\n{_yaml(minimal_config(lm, inference))}```\n\n"
        + _PARSE
        + "## Licences\n\n"
        + _licence_lines(card)
        + f"Origin: {' '.join(x for x in (card.origin.kind, card.origin.url, card.origin.authors, card.origin.citation) if x)}\n"
    )


def _diffusion_readme(card: ModelCard, parts: dict[str, Any], config: dict[str, Any], labels: list[str]) -> str:
    h, w = card.image_size
    return (
        f"# {card.name or card.id} ({card.ref})\n\n"
        + (f"{card.description}\n\n" if card.description else "")
        + f"Exported by synthmed: a {card.architecture} diffusion model making {card.modality} {card.anatomy} images, "
        f"{card.channels} x {h} x {w}, in [0, 1], in {parts['steps']} sampling steps. "
        + (f"Labels {labels} cycle: image i gets label i % {len(labels)}. " if labels else "")
        + "Image i starts from numpy PCG64(SeedSequence([seed, i, 0])).standard_normal(noise_shape, float32).\n\n"
        "## Run the bundle\n\n"
        "```\npython -m monai.bundle run --config_file configs/inference.json --bundle_root . "
        "--num_samples 16 --seed 0\n```\n\nwrites outputs/<i>_image.png.\n\n"
        "## A minimal inference config written from metadata.json\n\n"
        "Networks, scheduler and inferer from `configs/inference.json`; noise and labels as "
        "`network_data_format` documents them. `images` equals synthmed's `generate(num_samples, seed)`:\n\n"
        f"```yaml\n{_yaml(diffusion_minimal_config(config, parts, labels))}```\n\n"
        + _PARSE
        + "## Licences\n\n"
        + _licence_lines(card)
    )
