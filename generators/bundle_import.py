"""Import a MONAI bundle as a model card, and install its files in a registry entry.

Safety: importing never evaluates a config. A network written as a ``_target_`` from
``KNOWN_NETWORKS`` with literal arguments (``@id`` references to literals are resolved
here) is read as literals; anything else (``$`` expressions, other targets, ``%`` macros)
can only be built by running the config, which executes code: refused unless the caller
opts in with ``allow_code=True`` (CLI ``--allow-code``). Configs may be JSON or YAML
(``configs/inference.json``, ``.yaml`` or ``.yml``, as in the model zoo).

Missing weights: a bundle without its weights file is refused with one line naming the URL
its ``large_files.yml`` lists and where to put the file (nothing is downloaded).
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from generators.bundle_runtime import CODE_WARNING, DIFFUSION_ARCHITECTURES, KNOWN_NETWORKS
from generators.card import ModelCard, card_error, save_card
from generators.errors import ConfigError, GeneratorError
from generators.safe_yaml import load_yaml, read_text_bounded
from generators.shards import sha256_file
from generators.weights import load_weights

log = logging.getLogger(__name__)

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
    config_file: str | None = None,
    network_key: str = "network_def",
    latent_distribution: str | None = None,
    activation: str | None = None,
    extra: dict[str, Any] | None = None,
) -> ModelCard:
    """A model card for the MONAI bundle at ``path`` (weights stay where they are:
    ``weights.file`` is ``models/model.pt`` relative to the bundle root).

    ``config_file`` (relative to the bundle root) defaults to ``configs/inference.json``,
    ``.yaml`` or ``.yml``, whichever exists. ``card_id`` also renames a bundle synthmed
    exported itself (its card travels in metadata.json). ``latent_distribution`` defaults to U(0, 1) when the metadata declares a [0, 1] latent
    value range (as MONAI's GAN bundles do), else N(0, 1). ``extra`` overrides card fields
    (deep-merged). Refuses networks that need code unless ``allow_code``. Never evaluates
    the config.
    """
    root = Path(path)
    metadata = _read_structured(root / "configs" / "metadata.json")
    if config_file is not None and (Path(config_file).is_absolute() or ".." in Path(config_file).parts):
        raise ConfigError(
            f"config_file '{config_file}': expected a path inside the bundle, relative to its root "
            "(e.g. configs/inference.yaml)"
        )
    config_file = config_file or find_inference_config(root)
    config = _read_structured(root / config_file)
    weights = root / "models" / "model.pt"
    if not weights.is_file():
        raise GeneratorError(
            f"{root}: no models/model.pt; a bundle to import needs its weights file ({_large_files_hint(root, 'models/model.pt')})"
        )
    embedded = metadata.get("synthmed_card")
    if isinstance(embedded, dict):
        if card_id:
            embedded = {**embedded, "id": card_id}
        return _embedded_card(root, embedded, config, network_key, allow_code)

    outputs = metadata.get("network_data_format", {}).get("outputs", {})
    inputs = metadata.get("network_data_format", {}).get("inputs", {})
    if not outputs:
        raise ConfigError(f"{root}/configs/metadata.json: no network_data_format.outputs; cannot tell the image shape")
    out_spec = next(iter(outputs.values()))
    spatial = list(out_spec.get("spatial_shape", []))
    if len(spatial) != 2:
        raise GeneratorError(f"{root}: expected a 2D image output, metadata says spatial_shape {spatial}")
    # the range after post-processing (activation) when the bundle documents it, else the raw one
    post_spec = next(iter(metadata["network_data_format"].get("post_processed_outputs", {}).values()), out_spec)
    value_range = tuple(float(v) for v in (post_spec.get("value_range") or out_spec.get("value_range") or [0, 1]))
    in_spec = inputs.get("latent") or next(iter(inputs.values()), {})
    # a one-hot label concatenated after the latent (format "labels", as synthmed exports document it)
    label_spec = inputs.get("label") if isinstance(inputs.get("label"), dict) else {}
    labels = [str(v) for _, v in sorted(label_spec.get("channel_def", {}).items(), key=lambda kv: int(kv[0]))]
    if latent_distribution is None:
        latent_distribution = "uniform" if list(in_spec.get("value_range", [])) == [0, 1] else "normal"
    found_activation = _find_activation(config.get("postprocessing", config))
    # what network_data_format documents (synthmed exports do): "activation: sigmoid", axis order
    described = str(out_spec.get("description", ""))
    documented = re.search(r"activation: (sigmoid|tanh|none)", described)
    row_major = "row-major" in described and "MONAI's axis order" not in described
    net_fields: dict[str, Any] = {
        "activation": activation or found_activation or (documented.group(1) if documented else "none"),
        "spatial_order": "row_major" if row_major else "monai",
        "latent_distribution": latent_distribution,
    }
    try:
        target, kwargs = network_from_config(config, network_key)
        net_fields.update(target=target, kwargs=kwargs)
        latent_shape = kwargs.get("latent_shape")
        latent_dim = int(latent_shape if isinstance(latent_shape, int) else np.prod(latent_shape)) - len(labels)
        if labels:
            net_fields["n_labels"] = len(labels)
    except _NeedsCode as reason:
        if not allow_code:
            raise GeneratorError(
                f"{root}: the bundle's network cannot be built without running its config ({reason}); "
                "if you trust this bundle, re-run with allow_code=True (CLI --allow-code)"
            ) from None
        log.warning("%s: %s; importing it because allow_code was given", root, CODE_WARNING)
        net_fields.update(config=config_file, network_key=network_key)
        if labels:
            net_fields["n_labels"] = len(labels)
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
        "conditioning": {"labels": labels},
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


def find_inference_config(root: Path) -> str:
    """The bundle's inference config relative to ``root``: ``configs/inference.json``,
    ``.yaml`` or ``.yml`` (model-zoo accepts all three, e.g. mednist_reg ships YAML)."""
    for suffix in ("json", "yaml", "yml"):
        if (root / "configs" / f"inference.{suffix}").is_file():
            return f"configs/inference.{suffix}"
    raise ConfigError(
        f"{root}/configs: no inference.json, inference.yaml or inference.yml; "
        "pass the config with config_file= (CLI --config-file)"
    )


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
