"""Conformance check for contributed generators, and registration into the user registry.

``check_conformance(card, weights)`` runs, in order, and stops at the first failure that
makes the rest meaningless:

  card        the YAML validates as a ModelCard, with weights declared
  weights     the weights file exists
  sha256      it hashes to the card's ``weights.sha256``
  load        the registry can build the generator (safe loaders only; code needs allow_code)
  generate    ``generate(n, seed=0)`` returns a GeneratedBatch
  shape       images are ``(n, channels, H, W)`` as the card declares
  dtype       images are float32 and finite
  value_range every pixel lies within the card's ``value_range``
  labels      one label per sample, each one of the card's labels (None if unconditional)
  masks       masks ``(n, H, W)`` integer class indices exactly when the card has masks
  conditioning each declared label can be requested and is honoured
  deterministic the same seed gives the same images
  seed_varies a different seed gives different images
  batch_varies samples within a batch are not all identical (collapsed generator)
  seed_stream image i depends on (seed, i) only (``generators.seed_stream``): images 1..n-1
              made as a batch of their own equal those of the whole batch (skipped for
              the controls, which draw per batch)

``register(card, weights)`` copies the card and weights into a staging directory of the
user registry, checks them there and moves them to ``<registry>/<id>/<version>/`` only if
every check passed.

``init_card(weights, architecture, ...)`` writes a starting card (``synthmed generators
card-init``): the weights' sha256 filled in, the architecture's ``network`` keys with their
defaults (``network_keys``), and ``TODO: ...`` placeholders that the ``card`` check refuses
by name until they are filled in.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from generators.card import ModelCard, card_error, load_card, save_card
from generators.contract import GeneratedBatch, Generator
from generators.errors import GeneratorError, SynthmedError
from generators.registry import Entry, list_entries, load_generator, safe_join, user_registry_dir
from generators.seed_stream import generate_range
from generators.shards import sha256_file
from generators.weights import verify_sha256

log = logging.getLogger(__name__)
TOLERANCE = 1e-5
ATTRIBUTION = ("LICENSE", "README.md", "docs", "configs")  # copied along with card and weights


@dataclass(frozen=True)
class Check:
    """One conformance check; ``passed`` None means it was not run."""

    name: str
    passed: bool | None
    detail: str = ""


@dataclass(frozen=True)
class ConformanceReport:
    ref: str
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.passed is False]

    def check(self, name: str) -> Check:
        for item in self.checks:
            if item.name == name:
                return item
        raise KeyError(name)

    def summary(self) -> str:
        mark = {True: "ok  ", False: "FAIL", None: "skip"}
        lines = [f"conformance of {self.ref}: {'passed' if self.passed else 'FAILED'}"]
        lines += [f"  {mark[c.passed]} {c.name:14s} {c.detail}" for c in self.checks]
        return "\n".join(lines)


class _Checks:
    """Collects check results in order."""

    def __init__(self) -> None:
        self.items: list[Check] = []

    def record(self, name: str, ok: bool, detail: str = "") -> bool:
        self.items.append(Check(name, bool(ok), detail))
        return bool(ok)


def stage(card_path: Path | str, weights: Path | str | None, dest: Path | str) -> Entry:
    """Copy a card and its files into ``dest`` (weights to the card's ``weights.file``; a
    config-built bundle's config; LICENSE, README.md, docs/ and configs/ when they sit next
    to the card) and return the staged entry."""
    card_path, dest = Path(card_path), Path(dest)
    card = load_card(card_path)
    if card.weights.file is None:
        raise GeneratorError(f"{card.ref}: the card declares no weights.file; set it to the weights' file name")
    source = (
        Path(weights)
        if weights is not None
        else safe_join(card_path.parent, card.weights.file, what=f"{card.ref}: weights.file")
    )
    if not source.is_file():
        raise GeneratorError(f"{source}: weights file not found; pass the path of the weights to register")
    target = safe_join(dest, card.weights.file, what=f"{card.ref}: weights.file")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    config = card.network.get("config") if card.architecture == "monai_bundle" else None
    if isinstance(config, str):
        config_source = card_path.parent / config
        if not config_source.is_file() or ".." in Path(config).parts:
            raise GeneratorError(f"{config_source}: the card's network.config is missing; put it next to the card")
        (dest / config).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(config_source, dest / config)
    for name in ATTRIBUTION:  # licence and provenance travel with the model
        source_item = safe_join(card_path.parent, name, what=f"{card.ref}: {name}")  # no symlink out of the folder
        if source_item.is_dir() and not (dest / name).exists():
            shutil.copytree(source_item, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif source_item.is_file():
            shutil.copyfile(source_item, dest / name)
    save_card(card, dest / "card.yaml")
    return Entry(card, dest / "card.yaml")


def check_entry(entry: Entry, *, n: int = 4, device: str = "cpu", allow_code: bool = False) -> ConformanceReport:
    """Run every check on a registry entry (card + weights next to it)."""
    card = entry.card
    checks = _Checks()
    try:
        _run_checks(entry, card, checks, n, device, allow_code)
    except _Stop:
        pass
    names = [c.name for c in checks.items]
    skipped = [Check(name, None, "not run") for name in ALL_CHECKS if name not in names]
    return ConformanceReport(card.ref, (*checks.items, *skipped))


ALL_CHECKS = (
    "card",
    "weights",
    "sha256",
    "load",
    "generate",
    "shape",
    "dtype",
    "value_range",
    "labels",
    "masks",
    "conditioning",
    "deterministic",
    "seed_varies",
    "batch_varies",
    "seed_stream",
)

#: architectures that draw per batch, not per image (see ``generators.seed_stream``)
BATCH_DRAWN = ("noise", "blobs", "real-holdout")


class _Stop(Exception):
    """Internal: a failed check makes the remaining ones meaningless."""


def _run_checks(entry: Entry, card: ModelCard, checks: _Checks, n: int, device: str, allow_code: bool) -> None:
    def must(name: str, ok: bool, detail: str = "") -> None:
        if not checks.record(name, ok, detail):
            raise _Stop

    must(
        "card", card.available and card.architecture != "external", f"{card.architecture}, weights {card.weights.file}"
    )
    todo = placeholders(card)
    if todo:
        checks.items[-1] = Check(
            "card", False, f"fill in the placeholders {', '.join(todo)} (values starting with '{PLACEHOLDER}:')"
        )
        raise _Stop
    weights = entry.weights_path
    must("weights", weights is not None and weights.is_file(), str(weights))
    try:
        verify_sha256(weights, card.weights.sha256)
        must("sha256", True, (card.weights.sha256 or "")[:16] + "...")
    except SynthmedError as exc:
        must("sha256", False, str(exc))
    started = time.perf_counter()
    try:
        generator = load_generator(entry, device, allow_code=allow_code)
    except SynthmedError as exc:
        must("load", False, str(exc))
    except (RuntimeError, ValueError, TypeError) as exc:  # a network that does not build
        must("load", False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    must("load", True, f"{type(generator).__name__} in {time.perf_counter() - started:.2f} s")
    started = time.perf_counter()
    try:
        first = generator.generate(n, 0)
    except SynthmedError as exc:
        must("generate", False, str(exc))
    except (RuntimeError, ValueError, TypeError) as exc:  # a broken network raises torch errors
        must("generate", False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    seconds = time.perf_counter() - started
    must("generate", isinstance(first, GeneratedBatch), f"{n} samples in {seconds:.2f} s")
    images = np.asarray(first.images)
    h, w = card.image_size
    expected = (n, card.channels, h, w)
    must("shape", images.shape == expected, f"expected {expected}, got {images.shape}")
    finite = bool(np.isfinite(images).all())
    must("dtype", images.dtype == np.float32 and finite, f"{images.dtype}, {'finite' if finite else 'NaN/inf present'}")
    low, high = card.value_range
    lo, hi = float(images.min()), float(images.max())
    checks.record(
        "value_range",
        lo >= low - TOLERANCE and hi <= high + TOLERANCE,
        f"declared [{low:g}, {high:g}], got [{lo:.4g}, {hi:.4g}]",
    )
    labels = list(card.conditioning.labels)
    ok_labels = len(first.labels) == n and all((lab in labels) if labels else lab is None for lab in first.labels)
    checks.record("labels", ok_labels, f"{first.labels[:4]}{'...' if n > 4 else ''}")
    checks.record("masks", *_mask_check(card, first, n))
    checks.record("conditioning", *_conditioning_check(generator, labels))
    again = generator.generate(n, 0)
    same = np.asarray(again.images).shape == images.shape and np.allclose(again.images, images, rtol=0, atol=1e-6)
    checks.record("deterministic", same, "seed 0 twice: " + ("identical" if same else "outputs differ"))
    other = np.asarray(generator.generate(n, 1).images)
    diff = float(np.abs(other - images).max()) if other.shape == images.shape else float("inf")
    checks.record("seed_varies", diff > 1e-4, f"max |seed 1 - seed 0| = {diff:.3g}")
    if n >= 2:
        spread = float(np.abs(images - images[:1]).max())
        checks.record("batch_varies", spread > 1e-4, f"max difference from sample 0 = {spread:.3g}")
    else:
        checks.record("batch_varies", True, "n = 1: not checked")
    checks.record("seed_stream", *_stream_check(generator, card, images, n))


def _stream_check(generator: Generator, card: ModelCard, images: np.ndarray, n: int) -> tuple[bool, str]:
    """Images 1..n-1 of seed 0 made on their own (stream offset 1) equal the batch's."""
    if card.architecture in BATCH_DRAWN:
        return True, f"not checked: '{card.architecture}' draws per batch"
    if n < 2:
        return True, "n = 1: not checked"
    try:
        tail = np.asarray(generate_range(generator, 1, n - 1, 0).images)
    except (SynthmedError, RuntimeError, ValueError, TypeError) as exc:
        return False, f"images 1..{n - 1} on their own failed: {str(exc).splitlines()[0] if str(exc) else exc}"
    if tail.shape != images[1:].shape:
        return False, f"images 1..{n - 1} on their own have shape {tail.shape}, expected {images[1:].shape}"
    diff = float(np.abs(tail - images[1:]).max())
    return diff <= 1e-5, f"max |images 1..{n - 1} alone - in the batch| = {diff:.3g} (must be <= 1e-5)"


def _mask_check(card: ModelCard, batch: GeneratedBatch, n: int) -> tuple[bool, str]:
    h, w = card.image_size
    if not card.conditioning.masks:
        return batch.masks is None, "no masks declared" + ("" if batch.masks is None else ", but masks returned")
    if batch.masks is None:
        return False, "card declares masks, generator returned none"
    masks = np.asarray(batch.masks)
    if masks.shape != (n, h, w) or not np.issubdtype(masks.dtype, np.integer):
        return False, f"expected integer masks {(n, h, w)}, got {masks.dtype} {masks.shape}"
    k = len(card.conditioning.mask_classes)
    if k and (masks.min() < 0 or masks.max() >= k):
        return False, f"mask values [{masks.min()}, {masks.max()}] outside the {k} declared classes"
    return True, f"{masks.shape}, classes seen {sorted(np.unique(masks).tolist())[:8]}"


def _conditioning_check(generator: object, labels: list[str]) -> tuple[bool, str]:
    if not labels:
        return True, "unconditional"
    for label in labels[:8]:
        try:
            batch = generator.generate(1, 0, label)
        except SynthmedError as exc:
            return False, f"label '{label}': {exc}"
        if list(batch.labels) != [label]:
            return False, f"asked for '{label}', got {batch.labels}"
    return True, f"{min(len(labels), 8)} of {len(labels)} labels honoured"


def check_conformance(
    card_path: Path | str,
    weights: Path | str | None = None,
    *,
    n: int = 4,
    device: str = "cpu",
    allow_code: bool = False,
) -> ConformanceReport:
    """Check a card (+ weights, default: the card's ``weights.file`` next to it) without
    registering it. Never raises for a broken model: the report says what failed."""
    if n < 1:
        raise GeneratorError(f"expected n >= 1 samples for the check, got {n}")
    with tempfile.TemporaryDirectory(prefix="synthmed-conformance-") as tmp:
        try:
            entry = stage(card_path, weights, Path(tmp))
        except SynthmedError as exc:
            skipped = tuple(Check(name, None, "not run") for name in ALL_CHECKS[1:])
            return ConformanceReport(str(card_path), (Check("card", False, str(exc)), *skipped))
        return check_entry(entry, n=n, device=device, allow_code=allow_code)


def register(
    card_path: Path | str,
    weights: Path | str | None = None,
    registry: Path | str | None = None,
    *,
    n: int = 4,
    device: str = "cpu",
    allow_code: bool = False,
) -> tuple[Entry, ConformanceReport]:
    """Check, then copy card + weights into ``registry`` (default: the user registry) as
    ``<registry>/<id>/<version>/``. Raises GeneratorError (with the report) on any failure
    or when ``id@version`` is already registered."""
    registry = Path(registry) if registry is not None else user_registry_dir()
    card = load_card(card_path)
    existing = [e for e in list_entries() if e.card.ref == card.ref]
    destination = safe_join(registry, *card.id.split("/"), card.version, what=f"{card.ref}: registry folder")
    if existing or destination.exists():
        where = existing[0].path if existing else destination
        raise GeneratorError(f"{card.ref} is already registered ({where}); bump the card's version to add a new one")
    registry.mkdir(parents=True, exist_ok=True)
    staging = registry / f".staging-{uuid.uuid4().hex[:12]}"
    try:
        entry = stage(card_path, weights, staging)
        report = check_entry(entry, n=n, device=device, allow_code=allow_code)
        if not report.passed:
            failed = "; ".join(f"{c.name}: {c.detail}" for c in report.failures())
            raise GeneratorError(f"{card.ref}: conformance check failed ({failed}); fix the model or its card")
        destination.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log.info("registered %s in %s", card.ref, destination)
    return Entry(card, destination / "card.yaml"), report


# ---------------------------------------------------------------------------------------- card-init

PLACEHOLDER = "TODO"
#: built-in architecture -> (module, dataclass of its card ``network`` mapping)
NETWORK_CONFIGS = {
    "cgan": ("generators.architectures.cgan", "CganConfig"),
    "dcgan": ("generators.architectures.dcgan", "DcganConfig"),
    "vae": ("generators.architectures.vae", "VaeConfig"),
    "ddpm": ("generators.architectures.ddpm", "DdpmConfig"),
    "ldm": ("generators.architectures.ldm", "LdmConfig"),
    "pix2pix": ("generators.architectures.pix2pix", "Pix2pixConfig"),
    "noise": ("generators.architectures.controls", "ControlConfig"),
    "blobs": ("generators.architectures.controls", "ControlConfig"),
    "real-holdout": ("generators.architectures.controls", "ControlConfig"),
    "torchscript": ("generators.torchscript", "TorchScriptNetwork"),
}
_MISSING = object()


def network_keys(architecture: str) -> list[tuple[str, str, Any]]:
    """``(key, type, default)`` of a built-in architecture's card ``network`` mapping, read
    from its config class (default ``_MISSING`` when required); ``[]`` for other architectures."""
    if architecture not in NETWORK_CONFIGS:
        return []
    module, name = NETWORK_CONFIGS[architecture]
    config = getattr(importlib.import_module(module), name)
    if dataclasses.is_dataclass(config):
        out = []
        for item in dataclasses.fields(config):
            default = item.default if item.default is not dataclasses.MISSING else _MISSING
            out.append((item.name, str(item.type), default))
        return out
    return [  # a pydantic model (torchscript)
        (
            key,
            getattr(field.annotation, "__name__", str(field.annotation)).replace("typing.", ""),
            _MISSING if field.is_required() else field.default,
        )
        for key, field in config.model_fields.items()
    ]


def placeholders(card: ModelCard) -> list[str]:
    """Dotted names of the card's values still starting with ``TODO:`` (left by card-init);
    a medigan card's verbatim ``medigan`` entry is upstream data and not searched."""
    found: list[str] = []

    def walk(value: Any, key: str) -> None:
        if key == "medigan":
            return
        if isinstance(value, str) and value.startswith(f"{PLACEHOLDER}:"):
            found.append(key)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")

    walk(card.model_dump(mode="json"), "")
    return found


def _weights_format(weights: Path, architecture: str) -> str:
    suffix = weights.suffix.lower()
    if architecture == "torchscript" or suffix == ".ts":
        return "torchscript"
    if suffix == ".zip":
        return "zip"
    return "safetensors" if suffix == ".safetensors" else "torch"


def init_card(
    weights: Path | str,
    architecture: str,
    out: Path | str,
    *,
    image_size: tuple[int, int],
    channels: int = 1,
    card_id: str | None = None,
    version: str = "0.1.0",
    labels: tuple[str, ...] = (),
    latent_dim: int | None = None,
    network: dict[str, Any] | None = None,
    modality: str | None = None,
    anatomy: str | None = None,
    licence: str | None = None,
) -> ModelCard:
    """Write a starting card to ``out`` for ``weights``: sha256 and format filled in, the
    ``network`` keys of ``architecture`` with their defaults (``image_size``, ``channels``,
    ``n_labels``, ``latent_dim`` from the arguments; ``network`` overrides), and
    ``TODO: ...`` placeholders for what only the author knows. ``weights.file`` is the path
    relative to the card when the weights sit in its folder, else the file name (pass the
    weights to ``check``/``add``, which copy them next to the card). Returns the card."""
    weights, out = Path(weights), Path(out)
    if not weights.is_file():
        raise GeneratorError(f"{weights}: weights file not found; pass the path of the trained weights")
    if out.exists():
        raise GeneratorError(f"{out}: exists; pick a new file name for the card (card-init never overwrites)")
    h, w = (int(v) for v in image_size)
    values = {"image_size": h, "channels": channels, "n_labels": len(labels), "latent_dim": latent_dim}
    net: dict[str, Any] = {}
    for key, kind, default in network_keys(architecture):
        if key in values and values[key] is not None:
            net[key] = values[key]
        elif default is not _MISSING:
            net[key] = list(default) if isinstance(default, tuple) else default
        else:
            net[key] = f"{PLACEHOLDER}: {kind}"
    net.update(network or {})
    try:
        relative = str(weights.resolve().relative_to(out.resolve().parent))
    except ValueError:
        relative = weights.name
    todo = PLACEHOLDER + ": {}"
    data = {
        "id": card_id or f"contrib/{weights.stem}",
        "version": version,
        "name": todo.format("a short human-readable name"),
        "description": todo.format("what it generates, how it was trained, known limitations"),
        "architecture": architecture,
        "network": net,
        "modality": modality or todo.format("imaging modality, e.g. MRI"),
        "anatomy": anatomy or todo.format("body part, e.g. brain"),
        "image_size": [h, w],
        "channels": channels,
        "latent_dim": latent_dim,
        "conditioning": {"labels": list(labels)},
        "training": {
            "dataset": todo.format("training data set (name, version, URL)"),
            "dataset_licence": todo.format("the training data's licence, e.g. CC BY-SA 4.0"),
        },
        "licence": licence or todo.format("the weights' licence, e.g. Apache-2.0"),
        "weights": {"file": relative, "sha256": sha256_file(weights), "format": _weights_format(weights, architecture)},
        "origin": {"kind": "contributed", "authors": todo.format("authors"), "citation": ""},
    }
    try:
        card = ModelCard.model_validate(data)
    except ValidationError as exc:
        raise card_error(exc, f"card-init {out}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    save_card(card, out)
    return card
