"""MONAI bundles: import one as a model card, load it as a generator, export a generator
as a bundle that MONAI's own runner (``python -m monai.bundle run``) executes.

Bundle layout (MONAI model zoo): ``configs/metadata.json``, ``configs/inference.json``,
``models/model.pt`` (a state dict), ``LICENSE``, ``docs/``. Diffusion models (``ddpm``,
``ldm``) export like the zoo's diffusion bundles: MONAI UNet (+ ``AutoencoderKL`` in
``models/model_autoencoder.pt``), scheduler and inferer in the config, ``scripts/sampler.py``
(see ``generators.diffusion_bundle``). Every export draws image ``i``'s latent from the
seed stream (``generators.seed_stream``), so the runner's PNGs are ``generate(n, seed)``'s.

Missing weights: a bundle without ``models/model.pt`` is refused with one line naming the
URL its ``large_files.yml`` lists and where to put the file (nothing is downloaded).

Safety: importing never evaluates a config. A network written as a ``_target_`` from
``KNOWN_NETWORKS`` with literal arguments (``@id`` references to literals are resolved
here) is built directly, and its weights load with ``torch.load(weights_only=True)`` after
the sha256 check. Anything else (``$`` expressions, other targets, ``%`` macros) can only be
built by running the config, which executes code: refused unless the caller opts in with
``allow_code=True`` (CLI ``--allow-code``), and then with a warning every time.

Image orientation: MONAI's image readers put the first spatial axis along x, so a network
trained in a bundle emits ``(C, x, y)``; ``spatial_order: monai`` transposes its output to
synthmed's row-major ``(C, H, W)``. Exports of row-major generators add a ``Transposed``
step before MONAI's ``SaveImaged`` so the PNGs come out upright.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from generators.card import ModelCard, card_error, save_card
from generators.contract import GeneratedBatch
from generators.errors import ConfigError, GeneratorError
from generators.latent import LatentModule, MonaiGeneratorModule, latent_module, sample_latent
from generators.safe_yaml import load_yaml, read_text_bounded
from generators.shards import sha256_file
from generators.weights import load_weights, verify_sha256

log = logging.getLogger(__name__)

KNOWN_NETWORKS = ("Generator", "monai.networks.nets.Generator", "monai.networks.nets.generator.Generator")
CODE_WARNING = (
    "running a MONAI bundle config executes the Python code it contains ('$' expressions, "
    "'_target_' imports); do this only for bundles from a source you trust"
)
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


class BundleNetwork(BaseModel):
    """The ``network`` field of a ``monai_bundle`` card: either ``target`` + literal
    ``kwargs`` (built without running code) or ``config`` + ``network_key`` (built by running
    the bundle config: needs ``allow_code``). The rest says how to read the output."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str | None = None
    kwargs: dict[str, Any] = {}
    config: str | None = None
    network_key: str = "network_def"
    activation: Literal["sigmoid", "tanh", "none"] = "sigmoid"
    spatial_order: Literal["monai", "row_major"] = "monai"
    latent_distribution: Literal["normal", "uniform"] = "normal"
    n_labels: int = 0
    mask_classes: int = 0

    @model_validator(mode="after")
    def _one_source(self) -> BundleNetwork:
        if (self.target is None) == (self.config is None):
            raise ValueError("give either network.target (+ kwargs) or network.config (+ network_key), not both")
        if self.target is not None and self.target not in KNOWN_NETWORKS:
            raise ValueError(
                f"network.target '{self.target}' is not a known MONAI generator ({', '.join(KNOWN_NETWORKS)})"
            )
        return self

    @property
    def requires_code(self) -> bool:
        return self.config is not None


MAX_BUNDLE_JSON_BYTES = 16 << 20  # metadata.json / inference.json are a few KB


class _NeedsCode(Exception):
    """Internal: the network can only be built by evaluating the config."""


# ---------------------------------------------------------------- reading configs safely


def _read_structured(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: not found; a MONAI bundle needs configs/metadata.json and an inference config")
    if path.suffix in (".yaml", ".yml"):
        data = load_yaml(path, what="bundle config")  # bounded size and alias expansion
    else:
        try:
            data = json.loads(read_text_bounded(path, max_bytes=MAX_BUNDLE_JSON_BYTES, what="bundle config"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc}); fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _lookup(config: dict[str, Any], ref: str) -> Any:
    current: Any = config
    for part in re.split(r"::|#", ref):
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            raise _NeedsCode(f"reference '@{ref}' does not resolve to a value in the config")
    return current


def _literal(config: dict[str, Any], value: Any, depth: int = 0) -> Any:
    """``value`` with ``@id`` references replaced by literals; raises _NeedsCode on anything
    that would need evaluation."""
    if depth > 20:
        raise _NeedsCode("references nest too deeply (cycle?)")
    if isinstance(value, str):
        if value.startswith("$"):
            raise _NeedsCode(f"expression '{value[:60]}' must be evaluated")
        if value.startswith("%"):
            raise _NeedsCode(f"macro '{value[:60]}' loads another file")
        if value.startswith("@"):
            return _literal(config, _lookup(config, value[1:]), depth + 1)
        return value
    if isinstance(value, list):
        return [_literal(config, v, depth + 1) for v in value]
    if isinstance(value, dict):
        if "_target_" in value:
            raise _NeedsCode(f"nested component '{value['_target_']}' must be instantiated")
        return {k: _literal(config, v, depth + 1) for k, v in value.items()}
    return value


def network_from_config(config: dict[str, Any], key: str = "network_def") -> tuple[str, dict[str, Any]]:
    """``(target, literal kwargs)`` of ``config[key]`` when it is a known MONAI generator with
    literal arguments; raises ``_NeedsCode`` otherwise."""
    if key not in config:
        raise ConfigError(f"the bundle config has no '{key}'; pass the id of its network (network_key)")
    spec = config[key]
    if not isinstance(spec, dict) or "_target_" not in spec:
        raise _NeedsCode(f"'{key}' is not a plain component (got {str(spec)[:60]!r})")
    target = spec["_target_"]
    if target not in KNOWN_NETWORKS:
        raise _NeedsCode(f"'{key}' targets '{target}', not a known MONAI generator ({', '.join(KNOWN_NETWORKS)})")
    if any(k in spec for k in ("_requires_", "_disabled_", "_desc_", "_mode_")):
        raise _NeedsCode(f"'{key}' uses special keys that need the config runner")
    kwargs = {k: _literal(config, v) for k, v in spec.items() if k != "_target_"}
    _check_kwargs(kwargs)
    return "Generator", kwargs


def _check_kwargs(kwargs: dict[str, Any]) -> None:
    from monai.networks.nets import Generator

    try:
        inspect.signature(Generator).bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"network arguments do not fit monai.networks.nets.Generator: {exc}") from None


def _find_activation(config: Any) -> str | None:
    """'sigmoid'/'tanh' when the config's post-processing applies one to the prediction."""
    if isinstance(config, dict):
        target = str(config.get("_target_", ""))
        if target.split(".")[-1] in ("Activations", "Activationsd"):
            if config.get("sigmoid") is True:
                return "sigmoid"
            if str(config.get("other", "")).endswith("tanh"):
                return "tanh"
        for value in config.values():
            found = _find_activation(value)
            if found:
                return found
    if isinstance(config, list):
        for value in config:
            found = _find_activation(value)
            if found:
                return found
    return None


def licence_of(bundle_dir: Path) -> str:
    """SPDX id from the bundle's LICENSE file (Apache-2.0, MIT, BSD-3-Clause), else a pointer."""
    path = Path(bundle_dir) / "LICENSE"
    if not path.is_file():
        return "unspecified (no LICENSE file in the bundle)"
    text = path.read_text(errors="replace")[:4000]
    if "Apache License" in text and "Version 2.0" in text:
        return "Apache-2.0"
    if "MIT License" in text or "Permission is hereby granted, free of charge" in text:
        return "MIT"
    if "Redistribution and use in source and binary forms" in text:
        return "BSD-3-Clause"
    return "see LICENSE"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "bundle"


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------- import


def import_bundle(
    path: Path | str,
    *,
    allow_code: bool = False,
    card_id: str | None = None,
    modality: str = "unspecified",
    anatomy: str = "unspecified",
    config_file: str = "configs/inference.json",
    network_key: str = "network_def",
    latent_distribution: str | None = None,
    activation: str | None = None,
    extra: dict[str, Any] | None = None,
) -> ModelCard:
    """A model card for the MONAI bundle at ``path`` (weights stay where they are:
    ``weights.file`` is ``models/model.pt`` relative to the bundle root).

    ``latent_distribution`` defaults to U(0, 1) when the metadata declares a [0, 1] latent
    value range (as MONAI's GAN bundles do), else N(0, 1). ``extra`` overrides card fields
    (deep-merged). Refuses networks that need code unless ``allow_code``. Never evaluates
    the config.
    """
    root = Path(path)
    metadata = _read_structured(root / "configs" / "metadata.json")
    config = _read_structured(root / config_file)
    weights = root / "models" / "model.pt"
    if not weights.is_file():
        raise GeneratorError(
            f"{root}: no models/model.pt; a bundle to import needs its weights file ({_large_files_hint(root, 'models/model.pt')})"
        )
    embedded = metadata.get("synthmed_card")
    if isinstance(embedded, dict):
        return _embedded_card(root, embedded, config, network_key, allow_code)

    outputs = metadata.get("network_data_format", {}).get("outputs", {})
    inputs = metadata.get("network_data_format", {}).get("inputs", {})
    if not outputs:
        raise ConfigError(f"{root}/configs/metadata.json: no network_data_format.outputs; cannot tell the image shape")
    out_spec = next(iter(outputs.values()))
    spatial = list(out_spec.get("spatial_shape", []))
    if len(spatial) != 2:
        raise GeneratorError(f"{root}: expected a 2D image output, metadata says spatial_shape {spatial}")
    value_range = tuple(float(v) for v in out_spec.get("value_range", [0, 1]))
    in_spec = next(iter(inputs.values()), {})
    if latent_distribution is None:
        latent_distribution = "uniform" if list(in_spec.get("value_range", [])) == [0, 1] else "normal"
    found_activation = _find_activation(config.get("postprocessing", config))
    net_fields: dict[str, Any] = {
        "activation": activation or found_activation or "none",
        "spatial_order": "monai",
        "latent_distribution": latent_distribution,
    }
    try:
        target, kwargs = network_from_config(config, network_key)
        net_fields.update(target=target, kwargs=kwargs)
        latent_shape = kwargs.get("latent_shape")
        latent_dim = int(latent_shape if isinstance(latent_shape, int) else np.prod(latent_shape))
    except _NeedsCode as reason:
        if not allow_code:
            raise GeneratorError(
                f"{root}: the bundle's network cannot be built without running its config ({reason}); "
                "if you trust this bundle, re-run with allow_code=True (CLI --allow-code)"
            ) from None
        log.warning("%s: %s; importing it because allow_code was given", root, CODE_WARNING)
        net_fields.update(config=config_file, network_key=network_key)
        latent_dim = int(np.prod(in_spec.get("spatial_shape", [0]))) or None

    name = str(metadata.get("name") or root.name)
    card = {
        "id": card_id or _slug(name),
        "version": str(metadata.get("version", "0.0.0")),
        "name": name,
        "description": " ".join(str(metadata.get(k, "")) for k in ("description", "task")).strip(),
        "changelog": {str(k): str(v) for k, v in metadata.get("changelog", {}).items()},
        "architecture": "monai_bundle",
        "network": net_fields,
        "modality": modality,
        "anatomy": anatomy,
        "image_size": spatial,
        "channels": int(out_spec.get("num_channels", 1)),
        "value_range": list(value_range),
        "latent_dim": latent_dim,
        "training": {"dataset": str(metadata.get("data_source", ""))},
        "licence": licence_of(root),
        "weights": {"file": "models/model.pt", "sha256": sha256_file(weights), "format": "torch"},
        "dependencies": [
            f"monai>={metadata['monai_version']}" if "monai_version" in metadata else "monai",
            f"torch>={metadata['pytorch_version']}" if "pytorch_version" in metadata else "torch",
        ],
        "intended_use": str(metadata.get("intended_use") or "research only; not for clinical use"),
        "origin": {
            "kind": "monai_bundle",
            "authors": str(metadata.get("authors", "")),
            "citation": str(metadata.get("copyright", "")),
        },
        "tags": ["monai-bundle", "gan"],
    }
    card = _deep_merge(card, extra or {})
    try:
        return ModelCard.model_validate(card)
    except ValidationError as exc:
        raise card_error(exc, str(root)) from None


def _large_files_hint(root: Path, relative: str) -> str:
    """Where a missing weights file comes from, for a one-line error: the ``url`` (and hash)
    that the bundle's ``large_files.yml`` (or ``.yaml``/``.json``) lists for ``relative``,
    and where to put the downloaded file. Never downloads anything."""
    target = root / relative
    for name in ("large_files.yml", "large_files.yaml", "large_files.json"):
        listing = root / name
        if not listing.is_file():
            continue
        try:
            data = _read_structured(listing)
        except ConfigError as exc:
            return f"{listing.name} is unreadable ({str(exc)[:80]}); put the weights file at {target}"
        for item in data.get("large_files", []) if isinstance(data, dict) else []:
            if isinstance(item, dict) and str(item.get("path", "")).lstrip("./") == relative:
                source = item.get("url") or item.get("path")
                digest = (
                    f" ({item['hash_type']} {item['hash_val']})"
                    if item.get("hash_val") and item.get("hash_type")
                    else ""
                )
                return (
                    f"{listing.name} lists it at {source}{digest}; download that file yourself (synthmed never "
                    f"downloads) and put it at {target}, then re-run"
                )
        return f"{listing.name} does not list {relative}; put the bundle's weights file at {target}"
    return f"the bundle has no large_files.yml naming a download; put its weights file at {target}"


def _embedded_card(
    root: Path, embedded: dict[str, Any], config: dict[str, Any], network_key: str, allow_code: bool
) -> ModelCard:
    """A bundle exported by synthmed carries its card in metadata.json: restore it, pointing
    at this bundle's weights, after checking the config builds the same network."""
    data = dict(embedded)
    weights_file = data.get("weights", {}).get("file") or "models/model.pt"
    if weights_file not in ("models/model.pt", "models/model.ts"):
        raise ConfigError(f"{root}: metadata.json synthmed_card points at unexpected weights '{weights_file}'")
    data["weights"] = {**data.get("weights", {}), "sha256": sha256_file(root / weights_file)}
    try:
        card = ModelCard.model_validate(data)
    except ValidationError as exc:
        raise card_error(exc, f"{root}/configs/metadata.json synthmed_card") from None
    if card.architecture == "monai_bundle":
        target, kwargs = network_from_config(config, network_key)
        if kwargs != card.network.get("kwargs"):
            raise ConfigError(f"{root}: inference config network differs from the card in metadata.json; re-export")
    elif card.architecture in DIFFUSION_ARCHITECTURES:
        # loaded by synthmed's own loader from the card (state dicts, weights_only): no config code runs
        if card.architecture == "ldm" and not (root / "models" / "model_autoencoder.pt").is_file():
            raise GeneratorError(
                f"{root}: no models/model_autoencoder.pt; an ldm bundle needs the autoencoder's weights file "
                f"({_large_files_hint(root, 'models/model_autoencoder.pt')})"
            )
    elif not allow_code:
        raise GeneratorError(
            f"{root}: this bundle holds a {card.architecture} model, which runs code when loaded; "
            "if you trust it, re-run with allow_code=True (CLI --allow-code)"
        )
    return card


def install_bundle(source: Path | str, dest: Path | str, card: ModelCard) -> Path:
    """Copy the bundle's files (configs, models/model.pt, LICENSE, docs) to ``dest`` and write
    ``card.yaml`` there; returns the card path. ``dest`` must not exist yet."""
    source, dest = Path(source), Path(dest)
    if dest.exists():
        raise GeneratorError(f"{dest}: already exists; remove it or pick another destination")
    dest.mkdir(parents=True)
    for name in ("configs", "docs"):
        if (source / name).is_dir():
            shutil.copytree(source / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (dest / "models").mkdir()
    weights = card.weights.file or "models/model.pt"
    shutil.copy2(source / weights, dest / weights)
    if card.architecture == "ldm":
        card = _merge_ldm_weights(source, dest, card)
    for name in ("LICENSE", "README.md"):
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)
    for copied in dest.rglob("*"):
        copied.chmod(0o755 if copied.is_dir() else 0o644)  # sources may be read-only
    save_card(card, dest / "card.yaml")
    return dest / "card.yaml"


def _merge_ldm_weights(source: Path, dest: Path, card: ModelCard) -> ModelCard:
    """An ldm bundle keeps the UNet (``models/model.pt``) and the autoencoder
    (``models/model_autoencoder.pt``) apart, as the model zoo does; synthmed's ldm loader
    reads one file with ``unet.`` and ``autoencoder.`` prefixes: write it as
    ``dest/weights.safetensors`` and point the card at it."""
    from generators.weights import save_weights

    unet = load_weights(source / "models" / "model.pt", card.weights.sha256, "torch")
    autoencoder_file = source / "models" / "model_autoencoder.pt"
    autoencoder = load_weights(autoencoder_file, sha256_file(autoencoder_file), "torch")
    state = {f"unet.{k}": v for k, v in unet.items()}
    state.update({f"autoencoder.{k}": v for k, v in autoencoder.items()})
    sha = save_weights(state, dest / "weights.safetensors")
    return card.model_copy(
        update={
            "weights": card.weights.model_copy(
                update={"file": "weights.safetensors", "sha256": sha, "format": "safetensors"}
            )
        }
    )


# ---------------------------------------------------------------- load and generate


def _build_network(card: ModelCard, spec: BundleNetwork, card_dir: Path | None, allow_code: bool) -> torch.nn.Module:
    if not spec.requires_code:
        from monai.networks.nets import Generator

        return Generator(**spec.kwargs)
    if not allow_code:
        raise GeneratorError(
            f"{card.ref}: this bundle's network is built by running its config, which executes code; "
            "if you trust it, pass allow_code=True (CLI --allow-code)"
        )
    if card_dir is None:
        raise GeneratorError(f"{card.ref}: a config-built bundle needs its directory; load it through the registry")
    from monai.bundle import ConfigParser

    log.warning("%s: %s", card.ref, CODE_WARNING)
    parser = ConfigParser()
    parser.read_config(str(card_dir / str(spec.config)))
    parser["bundle_root"] = str(card_dir)
    net = parser.get_parsed_content(spec.network_key)
    if not isinstance(net, torch.nn.Module):
        raise GeneratorError(f"{card.ref}: config id '{spec.network_key}' built a {type(net).__name__}, not a network")
    return net


class BundleGenerator:
    """A MONAI-network generator loaded from a ``monai_bundle`` card (implements the
    ``generators.contract.Generator`` protocol). ``generate`` returns float32 images
    ``(N, C, H, W)`` in the card's value range; the same seed gives the same images."""

    def __init__(
        self,
        card: ModelCard,
        weights: Path,
        device: str = "cpu",
        *,
        allow_code: bool = False,
        card_dir: Path | None = None,
    ) -> None:
        if card.architecture != "monai_bundle":
            raise GeneratorError(f"{card.ref}: expected a monai_bundle card, got '{card.architecture}'")
        try:
            self.spec = BundleNetwork.model_validate(card.network)
        except ValidationError as exc:
            raise card_error(exc, f"{card.ref} network") from None
        if card.latent_dim is None:
            raise GeneratorError(f"{card.ref}: the card needs latent_dim (the size of the latent vector)")
        n_labels = len(card.conditioning.labels)
        if n_labels != self.spec.n_labels:
            raise GeneratorError(
                f"{card.ref}: card lists {n_labels} labels but network.n_labels is {self.spec.n_labels}; make them agree"
            )
        self.card = card
        self.labels = list(card.conditioning.labels)
        self.device = torch.device(device)
        verify_sha256(weights, card.weights.sha256)  # before the config (maybe code) is touched
        net = _build_network(card, self.spec, card_dir, allow_code)
        state = load_weights(weights, card.weights.sha256, "torch")
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise GeneratorError(
                f"{card.ref}: weights do not fit the network ({first}); the card and weights disagree"
            ) from None
        self.module = MonaiGeneratorModule(
            net,
            card.channels,
            self.spec.n_labels,
            self.spec.mask_classes,
            self.spec.activation,
            self.spec.spatial_order,
            card.value_range,
        )
        self.module.to(self.device).eval()

    def _label_indices(self, n: int, condition: Sequence[str] | str | None) -> list[int] | None:
        if not self.labels:
            if condition is not None:
                raise GeneratorError(
                    f"{self.card.ref}: unconditional generator; drop the condition (got {condition!r})"
                )
            return None
        if condition is None:
            return [i % len(self.labels) for i in range(n)]
        names = [condition] * n if isinstance(condition, str) else list(condition)
        if len(names) != n:
            raise GeneratorError(f"expected {n} conditioning labels, got {len(names)}")
        unknown = sorted(set(names) - set(self.labels))
        if unknown:
            raise GeneratorError(f"{self.card.ref}: unknown label(s) {unknown}; allowed: {', '.join(self.labels)}")
        return [self.labels.index(name) for name in names]

    @torch.inference_mode()
    def generate(self, n: int, seed: int, condition: Sequence[str] | str | None = None) -> GeneratedBatch:
        """``n`` samples: float32 ``(N, C, H, W)`` in the card's value range; masks int64
        ``(N, H, W)`` when the card has mask classes."""
        if n < 1:
            raise GeneratorError(f"expected n >= 1, got {n}")
        indices = self._label_indices(n, condition)
        z = sample_latent(n, int(self.card.latent_dim), self.spec.latent_distribution, seed).to(self.device)
        index = None if indices is None else torch.tensor(indices, dtype=torch.long, device=self.device)
        out = self.module(z, index).float().cpu()
        channels = self.card.channels
        masks = out[:, channels].round().long().numpy() if self.spec.mask_classes else None
        labels = [None] * n if indices is None else [self.labels[i] for i in indices]
        return GeneratedBatch(images=out[:, :channels].numpy().astype(np.float32), masks=masks, labels=labels)

    def latent_module(self) -> LatentModule:
        """This generator in pure-torch form (for export and latent-space visualisation)."""
        from generators.latent import MonaiNetwork

        monai = None
        if not self.spec.requires_code:
            state = {k: v.detach().cpu() for k, v in self.module.net.state_dict().items()}
            monai = MonaiNetwork("Generator", dict(self.spec.kwargs), state)
        return LatentModule(
            module=self.module,
            latent_dim=int(self.card.latent_dim),
            latent_distribution=self.spec.latent_distribution,
            labels=tuple(self.labels),
            image_channels=self.card.channels,
            value_range=tuple(self.card.value_range),
            mask_channel=self.spec.mask_classes > 0,
            activation=self.spec.activation,
            spatial_order=self.spec.spatial_order,
            monai=monai,
        )


def load_bundle_generator(
    card: ModelCard, weights: Path, device: str = "cpu", *, allow_code: bool = False, card_dir: Path | None = None
) -> BundleGenerator:
    """Build a ``BundleGenerator``; ``card_dir`` (the card's directory) is where a
    config-built network's config is read from."""
    return BundleGenerator(card, weights, device, allow_code=allow_code, card_dir=card_dir)


# ---------------------------------------------------------------- export


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
        "latent_size": lm.latent_dim,
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
        if n_labels:
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


def bundle_metadata(card: ModelCard, lm: LatentModule) -> dict[str, Any]:
    """``configs/metadata.json`` in the MONAI model-zoo schema, plus the synthmed card."""

    latent: dict[str, Any] = {
        "type": "tuples",
        "format": "latent",
        "num_channels": 0,
        "spatial_shape": [lm.latent_dim],
        "dtype": "float32",
        "distribution": lm.latent_distribution,
        "is_patch_data": False,
        "channel_def": {},
    }
    if lm.latent_distribution == "uniform":
        latent["value_range"] = [0, 1]
    inputs: dict[str, Any] = {"latent": latent}
    if lm.labels:
        inputs["label_index"] = {
            "type": "tuples",
            "format": "labels",
            "num_channels": 0,
            "spatial_shape": [1],
            "dtype": "int64",
            "value_range": [0, len(lm.labels) - 1],
            "is_patch_data": False,
            "channel_def": {str(i): name for i, name in enumerate(lm.labels)},
        }
    h, w = card.image_size
    outputs: dict[str, Any] = {
        "pred": {
            "type": "image",
            "format": "magnitude",
            "num_channels": card.channels,
            "spatial_shape": [h, w],
            "dtype": "float32",
            "value_range": list(card.value_range),
            "is_patch_data": False,
            "channel_def": {"0": "image"},
        }
    }
    if lm.mask_channel:
        outputs["mask"] = {
            "type": "image",
            "format": "labels",
            "num_channels": 1,
            "spatial_shape": [h, w],
            "dtype": "uint8",
            "value_range": [0, len(card.conditioning.mask_classes) or 255],
            "is_patch_data": False,
            "channel_def": {str(i): name for i, name in enumerate(card.conditioning.mask_classes)},
        }
    return _metadata(
        card,
        "meta_schema_generator_20220718.json",
        ("pytorch-ignite", "pillow"),
        {"inputs": inputs, "outputs": outputs},
    )


def _metadata(card: ModelCard, schema: str, packages: Sequence[str], data_format: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``configs/metadata.json`` every exported bundle shares: MONAI's
    generator ``schema`` (file name), versions, the ``packages`` installed here, the card's
    provenance and licence, and ``network_data_format``."""
    import monai

    required = {name: _installed(name) for name in packages}
    return {
        "schema": f"https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/{schema}",
        "version": card.version,
        "changelog": dict(card.changelog) or {card.version: "exported by synthmed"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {k: v for k, v in required.items() if v},
        "name": card.name or card.id,
        "task": f"Generate synthetic {card.modality} {card.anatomy} images ({card.ref})",
        "description": card.description,
        "authors": card.origin.authors or "synthmed",
        "copyright": card.origin.citation or f"see LICENSE ({card.licence})",
        "license": card.licence,
        "intended_use": card.intended_use,
        "data_source": " ".join(x for x in (card.training.dataset, card.training.dataset_licence) if x),
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
    module as TorchScript in ``models/model.ts``. Either way::

        python -m monai.bundle run --config_file OUT/configs/inference.json --bundle_root OUT

    writes ``num_samples`` PNGs to ``OUT/outputs`` (override ``--num_samples``, ``--seed``,
    ``--first_index``, ``--output_dir``): images ``first_index .. first_index+num_samples-1``
    of the seed stream (``generators.seed_stream``), i.e. with the same seed the images
    ``generate(n, seed)`` makes. ``ddpm``/``ldm`` go to :func:`export_diffusion_bundle`.
    LICENSE and docs are copied from ``source_dir`` (the card's directory) when present.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise GeneratorError(f"{out}: exists and is not empty; pick a new directory for the bundle")
    if generator.card.architecture in DIFFUSION_ARCHITECTURES:
        return export_diffusion_bundle(generator, out, source_dir=source_dir, num_samples=num_samples)
    lm = latent_module(generator)
    if hasattr(lm.module, "mask_pool_masks"):
        raise GeneratorError(
            f"{generator.card.ref}: a mask-input generator ({generator.card.architecture}) has no MONAI bundle "
            "export yet; export it as TorchScript (--format torchscript)"
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

        weights = out / "models" / "model.ts"
        script_module(lm).save(str(weights))
    export_card = export_card.model_copy(
        update={"weights": export_card.weights.model_copy(update={"sha256": sha256_file(weights)})}
    )
    metadata = bundle_metadata(export_card, lm)
    (out / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    (out / "configs" / "inference.json").write_text(json.dumps(inference_config(lm, num_samples), indent=2) + "\n")
    (out / "configs" / "logging.conf").write_text(LOGGING_CONF)
    if source_dir is not None:
        for name in ("LICENSE",):
            if (Path(source_dir) / name).is_file():
                shutil.copy2(Path(source_dir) / name, out / name)
    (out / "docs").mkdir(exist_ok=True)
    (out / "docs" / "README.md").write_text(_readme(export_card, lm))
    return out


DIFFUSION_ARCHITECTURES = ("ddpm", "ldm")


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
    metadata = _diffusion_metadata(export_card, parts["noise_shape"])
    (out / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    (out / "configs" / "logging.conf").write_text(LOGGING_CONF)
    (out / "scripts" / "__init__.py").write_text("")
    (out / "scripts" / "sampler.py").write_text(SAMPLER_SOURCE)
    if source_dir is not None and (Path(source_dir) / "LICENSE").is_file():
        shutil.copy2(Path(source_dir) / "LICENSE", out / "LICENSE")
    (out / "docs").mkdir(exist_ok=True)
    h, w = card.image_size
    (out / "docs" / "README.md").write_text(
        f"# {card.name or card.id} ({card.ref})\n\n{card.description}\n\n"
        f"Exported by synthmed: a {card.architecture} diffusion model making {card.modality} {card.anatomy} images, "
        f"{card.channels} x {h} x {w}, in [0, 1], in {parts['steps']} sampling steps. "
        + (f"Labels {labels} cycle: image i gets label i % {len(labels)}. " if labels else "")
        + "Image i starts from numpy PCG64(SeedSequence([seed, i, 0])).standard_normal(noise_shape, float32).\n\n"
        "```\npython -m monai.bundle run --config_file configs/inference.json --bundle_root . "
        "--num_samples 16 --seed 0\n```\n\nwrites outputs/<i>_image.png.\n\n"
        f"Licence: {card.licence}. Intended use: {card.intended_use}.\n"
    )
    return out


def _diffusion_metadata(card: ModelCard, noise_shape: list[int]) -> dict[str, Any]:
    """``configs/metadata.json`` of a diffusion bundle (model-zoo generator schema)."""

    h, w = card.image_size
    noise = {
        "type": "noise",
        "format": "magnitude",
        "num_channels": noise_shape[0],
        "spatial_shape": noise_shape[1:],
        "dtype": "float32",
        "value_range": [],
        "is_patch_data": False,
        "channel_def": {},
    }
    pred = {
        "type": "image",
        "format": "magnitude",
        "num_channels": card.channels,
        "spatial_shape": [h, w],
        "dtype": "float32",
        "value_range": [0, 1],
        "is_patch_data": False,
        "channel_def": {"0": "image"},
    }
    return _metadata(
        card,
        "meta_schema_generator_ldm_20230507.json",
        ("pillow",),
        {"inputs": {"noise": noise}, "outputs": {"pred": pred}},
    )


def _readme(card: ModelCard, lm: LatentModule) -> str:
    h, w = card.image_size
    labels = (
        f"Conditional: `label_index` selects one of {list(lm.labels)} (default: sample i gets label i % {len(lm.labels)}).\n"
        if lm.labels
        else ""
    )
    return (
        f"# {card.name or card.id} ({card.ref})\n\n"
        f"{card.description}\n\n"
        f"Exported by synthmed. Generates {card.modality} {card.anatomy} images, {card.channels} x {h} x {w}, "
        f"float32 in {list(card.value_range)}, from a {lm.latent_dim}-d latent "
        f"({'N(0, 1)' if lm.latent_distribution == 'normal' else 'U(0, 1)'}). {labels}\n"
        "```\npython -m monai.bundle run --config_file configs/inference.json --bundle_root . "
        "--num_samples 16 --seed 0\n```\n\n"
        f"Licence: {card.licence}. Training data: {card.training.dataset or 'n/a'} "
        f"({card.training.dataset_licence or 'licence n/a'}). Intended use: {card.intended_use}.\n"
        + (f"Origin: {card.origin.kind} {card.origin.url} {card.origin.authors} {card.origin.citation}\n")
    )
