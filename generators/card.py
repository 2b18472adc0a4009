"""Model cards: YAML validated by pydantic, the I/O contract and provenance of a generator.

A card can express every field of a medigan ``global.json`` entry (see
``generators.medigan``) and of a MONAI bundle's ``metadata.json``.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from generators.errors import ConfigError
from generators.safe_yaml import load_yaml

ARCHITECTURES = (
    "cgan",
    "dcgan",
    "vae",
    "ddpm",
    "ldm",
    "pix2pix",
    "vae3d",
    "ldm3d",
    "noise",
    "blobs",
    "real-holdout",
    "monai_bundle",
    "torchscript",
    "external",
    "medigan",  # a medigan model package run in a subprocess (generators.medigan_package)
)


def known_architectures() -> tuple[str, ...]:
    """``ARCHITECTURES`` plus any key of ``generators.architectures.LOADERS`` and the
    architectures of installed packages (``generators.plugins``, entry-point group
    ``synthmed.architectures``)."""
    from generators.plugins import plugin_names

    try:
        from generators.architectures import LOADERS
    except ImportError:
        LOADERS = {}
    return tuple(dict.fromkeys((*ARCHITECTURES, *LOADERS, *plugin_names())))


MAX_ID_CHARS = 128
# ids and versions become folder names in registries (<registry>/<id>/<version>/): no
# absolute paths, no '..', no separators other than '/', nothing a shell or Windows mangles
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}(/[A-Za-z0-9][A-Za-z0-9._-]{0,63}){0,2}")
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_-]{0,31}")


def _shown(value: str, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class CardModel(BaseModel):
    """Base: unknown keys are errors, instances immutable, NaN and infinity refused (a NaN
    metric would silently scramble ``rank``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Metric(CardModel):
    """A measured number. ``extractor`` names the feature network for FID/KID."""

    value: float
    higher_is_better: bool = False
    extractor: str | None = None
    note: str = ""


class Conditioning(CardModel):
    """Class labels the generator accepts, and whether it also emits a segmentation mask."""

    labels: tuple[str, ...] = ()
    masks: bool = False
    mask_classes: tuple[str, ...] = ()


class TrainingInfo(CardModel):
    dataset: str = ""
    dataset_licence: str = ""
    images: int | None = None
    epochs: int | None = None
    time_s: float | None = None
    device: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)


class Weights(CardModel):
    """Weights file relative to the card, checked by sha256 before loading.
    ``file`` None means the weights are not available here (card still searchable)."""

    file: str | None = None
    sha256: str | None = None
    format: Literal["safetensors", "torch", "torchscript", "zip"] = "safetensors"  # zip: a medigan model package

    @field_validator("file")
    @classmethod
    def _relative(cls, value: str | None) -> str | None:
        if value is not None and (value.startswith(("/", "\\")) or ".." in Path(value).parts or ":" in value):
            raise ValueError("weights.file must be a path relative to the card, without '..'")
        return value


class Origin(CardModel):
    """Where an imported model came from, with credit."""

    kind: Literal["synthmed", "medigan", "monai_bundle", "torchscript", "contributed"] = "synthmed"
    url: str = ""
    citation: str = ""
    authors: str = ""


class ModelCard(CardModel):
    """Everything a user needs to pick, trust and run a generator."""

    id: str
    version: str
    name: str = ""
    description: str = ""
    changelog: dict[str, str] = Field(default_factory=dict)
    architecture: str
    network: dict[str, Any] = Field(default_factory=dict, description="constructor arguments")
    modality: str
    anatomy: str
    image_size: tuple[int, int]
    volume_size: tuple[int, int, int] | None = Field(
        None, description="(D, H, W) of a volume generator (its batches are (N, 1, D, H, W)); None: 2D images"
    )
    channels: int = Field(ge=1)
    dtype: Literal["float32"] = "float32"
    value_range: tuple[float, float] = (0.0, 1.0)
    latent_dim: int | None = None
    conditioning: Conditioning = Conditioning()
    training: TrainingInfo = TrainingInfo()
    licence: str
    metrics: dict[str, Metric] = Field(default_factory=dict)
    weights: Weights = Weights()
    dependencies: tuple[str, ...] = ()
    intended_use: str = "research only; not for clinical use"
    origin: Origin = Origin()
    tags: tuple[str, ...] = ()
    medigan: dict[str, Any] = Field(
        default_factory=dict,
        description="a medigan model's global.json entry (execution, selection, description), verbatim: every "
        "medigan field (augmentations, dates, vendors, centres, privacy, ...) and what medigan-style search matches",
    )

    @field_validator("id")
    @classmethod
    def _id_is_safe(cls, value: str) -> str:
        if len(value) > MAX_ID_CHARS or not ID_PATTERN.fullmatch(value) or ".." in value:
            raise ValueError(
                f"id must be 1-3 '/'-separated names of letters, digits, '.', '_', '-', each starting with a "
                f"letter or digit, at most {MAX_ID_CHARS} characters, no '..' (e.g. 'synthmed/mni152-cgan'); "
                f"got {_shown(value)}"
            )
        return value

    @field_validator("version")
    @classmethod
    def _version_is_safe(cls, value: str) -> str:
        if not VERSION_PATTERN.fullmatch(value) or ".." in value:
            raise ValueError(
                "version must be 1-32 letters, digits, '.', '+', '_', '-', starting with a letter or digit, "
                f"no '..' or '/' (e.g. '1.0.0'); got {_shown(value)}"
            )
        return value

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, value: str) -> str:
        if value not in ARCHITECTURES:
            known = known_architectures()
            if value in known:
                return value
            guess = difflib.get_close_matches(value, known, n=1)
            hint = f" (did you mean '{guess[0]}'?)" if guess else ""
            raise ValueError(f"unknown architecture '{value}'; allowed: {', '.join(known)}{hint}")
        return value

    @property
    def ref(self) -> str:
        """``id@version``: what synthetic rows record in their ``source`` column."""
        return f"{self.id}@{self.version}"

    @property
    def available(self) -> bool:
        return self.weights.file is not None


def card_error(exc: ValidationError, origin: str) -> ConfigError:
    parts = []
    for item in exc.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            guess = difflib.get_close_matches(str(item["loc"][-1]), list(ModelCard.model_fields), n=1)
            message = "unknown key" + (f" (did you mean '{guess[0]}'?)" if guess else "")
        parts.append(" ".join(f"{key}: {message}".split()))  # keys and messages may hold newlines
    more = f"; and {len(parts) - 5} more problem(s)" if len(parts) > 5 else ""
    return ConfigError(
        f"{origin}: invalid model card: {'; '.join(parts[:5])}{more}; see generators/zoo/*/card.yaml for examples"
    )


def load_card(path: Path | str) -> ModelCard:
    """Read and validate a card YAML file (through :func:`generators.safe_yaml.load_yaml`:
    bounded size and alias expansion, no duplicate keys)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: model card not found; pass the path of a card YAML file")
    data = load_yaml(path, what="model card", invalid="model card is not valid YAML")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a model card (a YAML mapping), got {type(data).__name__}")
    try:
        return ModelCard.model_validate(data)
    except ValidationError as exc:
        raise card_error(exc, str(path)) from None


def save_card(card: ModelCard, path: Path | str) -> None:
    """Write a card as YAML with stable key order. A 2D card has no ``volume_size`` key, so
    its bytes are those of cards written before volumes existed."""
    data = card.model_dump(mode="json")
    if data.get("volume_size") is None:
        data.pop("volume_size", None)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
