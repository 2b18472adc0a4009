"""Import medigan's model index (``global.json``) as model cards.

medigan (https://github.com/RichardObi/medigan, MIT, Osuala, Skorupko, Lazrak et al.)
describes each model with ``execution`` (package, weights file, generate arguments),
``selection`` (modality, organ, metrics, licence, tags) and ``description`` (title, DOI,
comment). Each entry becomes one card ``<out>/<model id>/card.yaml`` with id
``medigan/<model id>`` and architecture ``external``: medigan models run their own code
from a downloaded package, which synthmed never downloads or installs, so the cards carry
no weights (``card.available`` is False). They are still listed, searchable and rankable
by their published metrics next to synthmed's own generators.

The whole ``global.json`` entry is kept verbatim in ``card.medigan`` (augmentations,
dates, vendors, centres, privacy fields, ...): ``generators.search`` matches search
terms against its ``selection`` section exactly as medigan does, and ``synthmed
generators show ID --key description.trained_date`` reads any of its fields.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Iterable

from pydantic import ValidationError

from generators.card import Metric, ModelCard, card_error, save_card
from generators.errors import ConfigError
from generators.safe_paths import safe_join

log = logging.getLogger(__name__)

MODALITIES = {
    "mmg": "mammography",
    "mammography": "mammography",
    "x-ray": "X-ray",
    "xray": "X-ray",
    "cxr": "X-ray",
    "mri": "MRI",
    "t1": "MRI",
    "t2": "MRI",
    "dce-mri": "MRI",
    "endoscopy": "endoscopy",
    "ct": "CT",
}
LICENCES = {
    "mit": "MIT",
    "bsd": "BSD (variant not stated by medigan)",
    "bsd license": "BSD (variant not stated by medigan)",
    "gnu general public license": "GPL (version not stated by medigan)",
}
# flat medigan performance keys -> (our metric name, higher_is_better, extractor)
FLAT_METRICS = {
    "FID": ("fid", False, "InceptionV3"),
    "FID_RADIMAGENET": ("fid_radimagenet", False, "RadImageNet"),
    "FID_ratio": ("fid_ratio", True, "InceptionV3"),
    "FID_RADIMAGENET_ratio": ("fid_radimagenet_ratio", True, "RadImageNet"),
    "SSIM": ("ssim", True, None),
    "PSNR": ("psnr", True, None),
    "MSE": ("mse", False, None),
    "NSME": ("nsme", False, None),
    "IS": ("is", True, "InceptionV3"),
    "CLF_delta": ("clf_delta", True, None),
    "SEG_delta": ("seg_delta", True, None),
    "DET_delta": ("det_delta", True, None),
}
RATIO_NOTE = (
    "medigan FID ratio (per the medigan paper: real-vs-real FID over real-vs-synthetic FID; closer to 1 is better)"
)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value in (None, ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _dedupe(values: Iterable[Any]) -> list[str]:
    seen: dict[str, None] = {}
    for value in values:
        text = str(value).strip()
        if text and text.lower() not in {s.lower() for s in seen}:
            seen[text] = None
    return list(seen)


def _metrics(performance: dict[str, Any]) -> dict[str, Metric]:
    out: dict[str, Metric] = {}
    n_images = performance.get("FID_no_images")
    for key, (name, higher, extractor) in FLAT_METRICS.items():
        value = _number(performance.get(key))
        if value is None:
            continue
        note = "from medigan global.json"
        if key.startswith("FID") and n_images:
            note += f"; computed on {n_images} images"
        if key.endswith("_ratio"):
            note += f"; {RATIO_NOTE}"
        out[name] = Metric(value=value, higher_is_better=higher, extractor=extractor, note=note)
    nested = dict(performance)
    nested.update(performance.get("downstream_task") or {})
    for task in ("CLF", "SEG", "DET"):
        for setting, values in (nested.get(task) or {}).items():
            for metric, raw in (values or {}).items():
                value = _number(raw)
                if value is None:
                    continue
                name = f"{task}_{setting}_{metric}".lower()
                out[name] = Metric(
                    value=value,
                    higher_is_better="loss" not in metric.lower(),
                    note=f"medigan downstream {task} model {setting.replace('_', ' ')}",
                )
    return out


def _turing_text(performance: dict[str, Any]) -> str:
    test = performance.get("turing_test")
    if not isinstance(test, dict) or not test:
        return ""
    parts = [f"{k}={v}" for k, v in test.items()]
    return " Visual Turing test: " + ", ".join(parts) + "."


def card_from_entry(model_id: str, entry: dict[str, Any]) -> ModelCard:
    """One medigan ``global.json`` entry as a ``ModelCard`` (architecture ``external``,
    weights unavailable)."""
    try:
        execution = entry["execution"]
        selection = entry["selection"]
        description = entry.get("description", {})
    except (KeyError, TypeError):
        raise ConfigError(f"medigan entry '{model_id}': expected 'execution' and 'selection' sections") from None
    size = [int(float(v)) for v in execution.get("image_size", [])]
    if len(size) < 2:
        raise ConfigError(f"medigan entry '{model_id}': image_size {execution.get('image_size')} has no height/width")
    modalities = [str(m) for m in selection.get("modality", [])]
    organs = [str(o) for o in selection.get("organ", [])]
    generates = [str(g) for g in selection.get("generates", [])]
    functions = [str(f) for f in selection.get("function", [])]
    conditions = [str(c) for c in selection.get("condition", [])]
    performance = selection.get("performance") or {}
    method = execution.get("generate_method", {})
    raw_licence = selection.get("license")
    licence = (
        LICENCES.get(str(raw_licence).strip().lower(), str(raw_licence))
        if raw_licence
        else "unspecified (medigan lists none; check the model's Zenodo record)"
    )
    epochs = description.get("provided_after_epoch")
    references = [str(d) for d in description.get("doi") or [] if d] + (
        [str(description["publication"])] if description.get("publication") else []
    )
    card = {
        "id": f"medigan/{model_id}",
        "version": str(description.get("version") or "unversioned"),
        "name": str(description.get("title") or model_id),
        "description": str(description.get("comment") or "") + _turing_text(performance),
        "architecture": "external",
        "network": {
            "medigan_type": selection.get("type"),
            "package_name": execution.get("package_name"),
            "model_name": execution.get("model_name"),
            "extension": execution.get("extension"),
            "generate_method": method.get("name"),
            "generate_args": (method.get("args") or {}).get("custom", {}),
            "inputs": description.get("inputs", []),
        },
        "modality": MODALITIES.get(modalities[0].lower(), modalities[0]) if modalities else "unspecified",
        "anatomy": organs[0].lower() if organs else "unspecified",
        "image_size": size[:2],
        "channels": size[2] if len(size) > 2 else 1,
        "latent_dim": method.get("input_latent_vector_size"),
        "conditioning": {
            "masks": any("mask" in text.lower() for text in (*generates, *functions)),
        },
        "training": {
            "dataset": ", ".join(str(d) for d in selection.get("dataset", []))
            + (f" ({selection['dataset_type']})" if selection.get("dataset_type") else ""),
            "epochs": int(epochs) if isinstance(epochs, int) or str(epochs).isdigit() else None,
        },
        "licence": licence,
        "metrics": _metrics(performance),
        "weights": {"file": None, "sha256": None, "format": "torch"},
        "dependencies": [str(d) for d in execution.get("dependencies", [])],
        "origin": {
            "kind": "medigan",
            "url": str(execution.get("package_link", "")),
            "citation": "; ".join(references),
            "authors": "listed in medigan (https://github.com/RichardObi/medigan)",
        },
        "tags": _dedupe(
            [
                "medigan",
                *selection.get("tags", []),
                *modalities,
                *organs,
                *selection.get("use_cases", []),
                *functions,
                *generates,
                *(f"condition:{c}" for c in conditions),
                f"year:{selection['year']}" if selection.get("year") else "",
                "weights-unavailable",
            ]
        ),
        "medigan": json.loads(json.dumps(entry)),  # every field, verbatim (a copy: cards are immutable)
    }
    try:
        return ModelCard.model_validate(card)
    except ValidationError as exc:
        raise card_error(exc, f"medigan entry '{model_id}'") from None


def read_medigan_index(path: Path | str) -> dict[str, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found; pass the path of medigan's global.json")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); pass medigan's global.json") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: expected a JSON object of model id -> entry, got {type(data).__name__}")
    return data


def import_medigan(global_json: Path | str, out: Path | str) -> list[ModelCard]:
    """Write one card per medigan model under ``out`` (``<out>/<model id>/card.yaml``), plus
    medigan's LICENSE when it sits next to ``global_json``. Every entry is validated
    before anything is written. Re-importing overwrites the cards, and the registry lists
    each ``id@version`` once (:func:`generators.registry.list_entries`), so an import into the
    user registry next to the shipped cards does not list any model twice. Returns the cards."""
    global_json, out = Path(global_json), Path(out)
    index = read_medigan_index(global_json)
    cards = {model_id: card_from_entry(model_id, entry) for model_id, entry in sorted(index.items())}
    folders = {model_id: safe_join(out, model_id, what=f"medigan entry {model_id[:60]!r}") for model_id in cards}
    for model_id, folder in folders.items():  # one folder per model, directly under out
        if "/" in model_id or folder.parent != out.resolve():
            raise ConfigError(
                f"medigan entry {model_id[:60]!r}: a model id must be one folder name (letters, digits, '.', '_', "
                "'-'); fix the key in global.json"
            )
    out.mkdir(parents=True, exist_ok=True)
    for model_id, card in cards.items():
        folders[model_id].mkdir(exist_ok=True)
        save_card(card, folders[model_id] / "card.yaml")
    licence = global_json.parent / "LICENSE"
    if licence.is_file() and licence.resolve() != (out / "LICENSE").resolve():
        shutil.copyfile(licence, out / "LICENSE")
    (out / "README.md").write_text(
        "# medigan model index\n\n"
        f"Cards generated by `synthmed generators import-medigan global.json` from medigan's `global.json` "
        f"({len(cards)} models). medigan: https://github.com/RichardObi/medigan, MIT licence "
        "(see LICENSE; Copyright (c) 2021 Richard Osuala, Grzegorz Skorupko, Noussair Lazrak). "
        "Each model keeps its own licence (card `licence`) and citation (card `origin`). Weights are not "
        "included: medigan models download and run their own code, which synthmed does not do.\n"
    )
    log.info("imported %d medigan cards into %s", len(cards), out)
    return list(cards.values())
