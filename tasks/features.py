"""Image feature extractors for the set metrics and the feature-space filters, and the caches
that let the filter stage compute real-image features (and the classifier behind them)
once per dataset version.

Extractors map float32 images ``(N, C, H, W)`` in [0, 1] to features float32 ``(N, D)``.
Every extractor has a ``name`` that goes into ``quality.json`` next to every number it
produced, and the sha256 of its weights:

- ``contrastive-densenet``: the pooled features of a MONAI DenseNet trained
  self-supervised (SimCLR) on the real train images alone (:mod:`tasks.contrastive`): the
  default (``auto``), because it did not choose the kept set it measures.
- ``classifier-<network>``: the penultimate layer (input of the last ``Linear``) of the
  label-consistency classifier, trained on the real train split (:mod:`tasks.filter`).
  In-domain and offline; its numbers are not comparable with published FIDs, and when the
  label filter is on this is the network that chose the kept set, so its kept-set numbers
  are biased in the kept set's favour.
- ``inception-v3-fid``: the standard FID Inception-V3 (:mod:`tasks.fid_inception`), only
  from a local weights file given by ``quality.metrics.inception_weights`` or
  ``$SYNTHMED_INCEPTION_WEIGHTS``; never downloaded. Grey images are repeated to 3 channels.
  A file whose sha256 does not start with the standard prefix is named
  ``inception-v3-fid-architecture(custom-weights)``.
- ``random-init-densenet(seed=S)``: a fixed, randomly initialised MONAI DenseNet: a last
  resort when there are no labels to train a classifier; it measures low-level statistics.

Every extractor's own quality (:func:`extractor_quality`): a logistic-regression linear
probe fitted on its real train features and labels, scored by balanced accuracy on the real
val split. ``reliable`` = value >= chance (1 / number of classes) + RELIABLE_MARGIN; an
extractor whose quality cannot be measured (no labels, no labelled val split) is not
reliable. Metrics of an unreliable extractor are shown as such and never gate or rank.

Normalisations (applied after channel adaptation, before the network):
``unit`` (pixels in [0, 1] as they are), ``symmetric`` (``2x - 1``, the FID Inception's
TF convention), ``imagenet`` (per-channel ImageNet mean/std; grey uses their averages),
``zscore`` (per image: zero mean, unit std).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from generators.errors import ConfigError
from generators.shards import sha256_file

logger = logging.getLogger(__name__)

NORMALISATIONS = ("unit", "symmetric", "imagenet", "zscore")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_ENV = "SYNTHMED_INCEPTION_WEIGHTS"
#: bump when the extraction pipeline changes the features of the same inputs (invalidates caches)
FEATURES_VERSION = 1
ZSCORE_EPS = 1e-6
#: an extractor (or classifier) is reliable when its balanced accuracy on real val is at
#: least chance + this margin (e.g. >= 0.483 for 3 classes, >= 0.65 for 2)
RELIABLE_MARGIN = 0.15


# --------------------------------------------------------------------------- extractors
@dataclass(frozen=True)
class Extractor:
    """``module``: normalised float32 ``(B, in_channels, H, W)`` -> float32 ``(B, dim)``;
    ``in_channels`` None means the images' own channel count."""

    name: str
    kind: str
    description: str
    module: nn.Module
    weights_sha256: str
    dim: int
    in_channels: int | None
    default_normalisation: str

    def describe(self, normalisation: str) -> dict[str, Any]:
        """The JSON record that goes next to every number this extractor produced."""
        return {
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "weights_sha256": self.weights_sha256,
            "dim": self.dim,
            "normalisation": normalisation,
        }


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over a module's state dict: names, dtypes, shapes and bytes, in key order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        array = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{array.dtype}:{tuple(array.shape)}".encode())
        digest.update(array.numpy().tobytes() if array.dtype != torch.bfloat16 else array.float().numpy().tobytes())
    return digest.hexdigest()


class PenultimateFeatures(nn.Module):
    """Wraps a classifier: ``forward`` returns the input of its last ``nn.Linear`` ``(B, D)``."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        linears = [m for m in classifier.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ConfigError(f"expected a classifier ending in nn.Linear, got {type(classifier).__name__}")
        self.classifier = classifier
        self.head = linears[-1]
        self._captured: torch.Tensor | None = None
        self.head.register_forward_pre_hook(self._capture)

    def _capture(self, _module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self._captured = inputs[0]

    @property
    def num_features(self) -> int:
        return int(self.head.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._captured = None
        self.classifier(x)
        captured, self._captured = self._captured, None
        return captured.flatten(1)


def classifier_extractor(model: nn.Module, network: str) -> Extractor:
    """The penultimate layer of the trained label-consistency classifier (in eval mode)."""
    module = PenultimateFeatures(model.eval())
    return Extractor(
        name=f"classifier-{network}",
        kind="classifier",
        description=f"penultimate layer of the label-consistency {network} trained on the real train split",
        module=module,
        weights_sha256=state_dict_sha256(model),
        dim=module.num_features,
        in_channels=None,
        default_normalisation="unit",
    )


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch inside the block without changing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def random_extractor(in_channels: int, seed: int = 0) -> Extractor:
    """A MONAI DenseNet with fixed random weights (seeded): a last resort, named as such."""
    from tasks.downstream import build_network

    with _seeded(seed):
        model = build_network("classification", "densenet", in_channels, 2).eval()
    module = PenultimateFeatures(model)
    return Extractor(
        name=f"random-init-densenet(seed={seed})",
        kind="random",
        description="randomly initialised DenseNet, not trained: a last resort that measures low-level statistics",
        module=module,
        weights_sha256=state_dict_sha256(model),
        dim=module.num_features,
        in_channels=None,
        default_normalisation="zscore",
    )


def self_supervised_extractor(model: nn.Module) -> Extractor:
    """The pooled features of the contrastive encoder of :mod:`tasks.contrastive` (eval mode)."""
    from tasks.contrastive import NETWORK

    module = PenultimateFeatures(model.eval())
    return Extractor(
        name=f"contrastive-{NETWORK}",
        kind="self_supervised",
        description=f"{NETWORK} trained self-supervised (SimCLR) on the real train images, without labels "
        "and without the filter's classifier",
        module=module,
        weights_sha256=state_dict_sha256(model),
        dim=module.num_features,
        in_channels=None,
        default_normalisation="unit",
    )


def reliability(value: float | None, num_classes: int) -> dict[str, Any]:
    """``{"chance", "threshold", "reliable"}`` for a balanced accuracy ``value`` over
    ``num_classes`` classes (None = unknown = not reliable)."""
    chance = 1.0 / num_classes if num_classes >= 2 else None
    threshold = None if chance is None else chance + RELIABLE_MARGIN
    reliable = value is not None and threshold is not None and value >= threshold
    return {"chance": chance, "threshold": threshold, "reliable": bool(reliable)}


def extractor_quality(
    train_features: np.ndarray,
    train_targets: np.ndarray,
    val_features: np.ndarray | None,
    val_targets: np.ndarray | None,
    num_classes: int,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """``{"metric": "linear_probe_balanced_accuracy", "value", "chance", "threshold",
    "reliable", "n_train", "n_val", "reason"}``: a standardised logistic-regression probe
    (scikit-learn, C=1) fitted on real train features float32 ``(N, D)`` with int targets
    ``(N,)`` (-1 = unlabelled), scored by balanced accuracy on real val."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    record: dict[str, Any] = {
        "metric": "linear_probe_balanced_accuracy",
        "value": None,
        "n_train": int(len(train_targets)),
        "n_val": 0 if val_targets is None else int(len(val_targets)),
        "reason": None,
    }
    labelled = train_targets >= 0
    if num_classes < 2 or len(np.unique(train_targets[labelled])) < 2:
        record["reason"] = "fewer than 2 labelled classes in real train"
    elif val_features is None or val_targets is None or len(val_targets) == 0 or (val_targets < 0).any():
        record["reason"] = "no labelled real val split"
    else:
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, random_state=seed))
        probe.fit(train_features[labelled].astype(np.float64), train_targets[labelled])
        predicted = probe.predict(val_features.astype(np.float64))
        record["value"] = float(balanced_accuracy_score(val_targets, predicted))
    record.update(reliability(record["value"], num_classes))
    return record


def resolve_inception_weights(configured: str | None, root: Path | None = None) -> Path:
    """The FID Inception weights file: ``configured`` (relative to ``root``) or
    ``$SYNTHMED_INCEPTION_WEIGHTS``; a ConfigError that says how to provide it otherwise."""
    from tasks.fid_inception import WEIGHTS_FILE, WEIGHTS_URL

    given = configured or os.environ.get(INCEPTION_ENV)
    source = "quality.metrics.inception_weights" if configured else f"${INCEPTION_ENV}"
    if not given:
        raise ConfigError(
            f"quality.metrics.extractor 'inception': expected the FID Inception weights file {WEIGHTS_FILE}, "
            f"none given; download it once from {WEIGHTS_URL} and set quality.metrics.inception_weights or "
            f"${INCEPTION_ENV} to its path (synthmed never downloads weights), or use extractor: classifier"
        )
    path = Path(given).expanduser()
    if not path.is_absolute() and root is not None:
        path = root / path
    if not path.is_file():
        raise ConfigError(
            f"{source}: expected the FID Inception weights file {WEIGHTS_FILE} at {path}, found none; "
            f"fix the path (download it once from {WEIGHTS_URL}) or use extractor: classifier"
        )
    return path


def inception_extractor(weights: Path) -> Extractor:
    """The FID Inception-V3 with the local weights file ``weights`` (see :func:`resolve_inception_weights`)."""
    from tasks.fid_inception import FEATURE_DIM, WEIGHTS_FILE, WEIGHTS_SHA256_PREFIX, load_fid_inception

    sha256 = sha256_file(weights)
    model = load_fid_inception(weights)
    standard = sha256.startswith(WEIGHTS_SHA256_PREFIX)
    if not standard:
        logger.warning(
            "%s: sha256 %s... is not that of %s; FID values will not be comparable with published ones",
            weights.name,
            sha256[:12],
            WEIGHTS_FILE,
        )
    return Extractor(
        name="inception-v3-fid" if standard else "inception-v3-fid-architecture(custom-weights)",
        kind="inception",
        description="FID Inception-V3 pool3 (TF 2015-12-05 weights via pytorch-fid)"
        if standard
        else "FID Inception-V3 architecture with non-standard weights",
        module=model,
        weights_sha256=sha256,
        dim=FEATURE_DIM,
        in_channels=3,
        default_normalisation="symmetric",
    )


# --------------------------------------------------------------------------- extraction
def adapt_channels(images: np.ndarray, in_channels: int | None) -> np.ndarray:
    """Repeat grey to 3 channels or average RGB to grey when the extractor needs it."""
    channels = images.shape[1]
    if in_channels is None or channels == in_channels:
        return images
    if channels == 1:
        return np.repeat(images, in_channels, axis=1)
    if in_channels == 1:
        return images.mean(axis=1, keepdims=True)
    raise ConfigError(f"expected images with 1 or {in_channels} channels for this extractor, got {channels}")


def normalise(images: np.ndarray, mode: str) -> np.ndarray:
    """float32 ``(N, C, H, W)`` in [0, 1] -> float32 network input (see the module docstring)."""
    x = np.asarray(images, dtype=np.float32)
    if mode == "unit":
        return x
    if mode == "symmetric":
        return 2.0 * x - 1.0
    if mode == "imagenet":
        if x.shape[1] == 3:
            mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
        else:
            mean = np.full(x.shape[1], np.mean(IMAGENET_MEAN), np.float32)
            std = np.full(x.shape[1], np.mean(IMAGENET_STD), np.float32)
        return (x - mean[None, :, None, None]) / std[None, :, None, None]
    if mode == "zscore":
        flat = x.reshape(x.shape[0], -1)
        mean = flat.mean(axis=1)[:, None, None, None]
        std = np.maximum(flat.std(axis=1), ZSCORE_EPS)[:, None, None, None]
        return (x - mean) / std
    raise ConfigError(f"quality.metrics.normalisation: got '{mode}'; allowed: {', '.join(NORMALISATIONS)}")


@torch.no_grad()
def extract_features(
    extractor: Extractor,
    images: np.ndarray,
    *,
    normalisation: str,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """float32 ``(N, dim)`` features of float32 ``(N, C, H, W)`` images in [0, 1], computed in
    batches of ``batch_size`` (channel adaptation and normalisation per batch)."""
    module = extractor.module.to(torch.device(device)).eval()
    out = np.empty((images.shape[0], extractor.dim), dtype=np.float32)
    for start in range(0, images.shape[0], batch_size):
        batch = normalise(adapt_channels(images[start : start + batch_size], extractor.in_channels), normalisation)
        xb = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
        out[start : start + batch.shape[0]] = module(xb).float().cpu().numpy()
    return out


# --------------------------------------------------------------------------- caches
def _atomic_save(path: Path, writer: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        writer(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cache_key(**parts: Any) -> str:
    """sha256 of the JSON of ``parts`` (sorted keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def trained_model_path(cfg: Any, paths: Any, folder: str, *, device: str, code_file: str, **identity: Any) -> Path:
    """Where a network trained on the real train split is cached: ``paths.state / folder /
    <key>.pt``, keyed by the real dataset's digest, ``identity`` (recipe, classes, channels...),
    the pipeline seed and threads, the device, the torch version and the sha256 of the
    module that trains it (``code_file``), i.e. by everything that determines its weights."""
    from generators.shards import dataset_digest

    key = cache_key(
        real=dataset_digest(paths.real),
        **identity,
        seed=cfg.seed,
        threads=cfg.threads,
        device=device,
        torch=torch.__version__,
        code=hashlib.sha256(Path(code_file).read_bytes()).hexdigest(),
    )
    return paths.state / folder / f"{key[:32]}.pt"


def _ids_sha256(ids: Sequence[str]) -> str:
    """A digest of the row ids (the cache stores no ids, only this)."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


class FeatureCache:
    """Real-image features on disk, one ``.npz`` per (dataset digest, split, extractor name,
    extractor weights sha256, normalisation, FEATURES_VERSION), under ``root`` (the
    pipeline's state dir). A file whose row ids do not match, or that cannot be read, is
    recomputed and replaced. Files hold float32 features and a sha256 of the row ids, no ids."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def key(self, *, dataset_digest: str, split: str, extractor: Extractor, normalisation: str) -> str:
        return cache_key(
            dataset=dataset_digest,
            split=split,
            extractor=extractor.name,
            weights_sha256=extractor.weights_sha256,
            normalisation=normalisation,
            version=FEATURES_VERSION,
        )

    def features(
        self,
        *,
        dataset_digest: str,
        split: str,
        extractor: Extractor,
        normalisation: str,
        ids: Sequence[str],
        compute: Callable[[], np.ndarray],
    ) -> tuple[np.ndarray, bool]:
        """``(features float32 (N, dim), hit)``: the cached features of rows ``ids``, or
        ``compute()`` stored for next time."""
        key = self.key(dataset_digest=dataset_digest, split=split, extractor=extractor, normalisation=normalisation)
        path = self.root / f"{key}.npz"
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as data:
                    cached_ids, features = str(data["ids_sha256"]), data["features"]
                if cached_ids == _ids_sha256(ids) and features.shape == (len(ids), extractor.dim):
                    logger.info("real %s features (%s): cache hit", split, extractor.name)
                    return features, True
                logger.warning("%s: cached features do not match the rows; recomputing", path.name)
            except (OSError, ValueError, KeyError) as exc:
                logger.warning("%s: unreadable feature cache (%s); recomputing", path.name, type(exc).__name__)
        features = np.asarray(compute(), dtype=np.float32)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez(handle, ids_sha256=np.asarray(_ids_sha256(ids)), features=features)

        _atomic_save(path, write)
        return features, False


def load_or_train(
    path: Path, build: Callable[[], nn.Module], train: Callable[[nn.Module], nn.Module]
) -> tuple[nn.Module, bool]:
    """``(model, hit)``: a model from ``build()`` holding the state dict cached at ``path``
    (loaded with ``weights_only=True``), or that of ``train(build())``, saved there first.
    Either way the weights are loaded into a fresh model, so the first run and the cached
    runs use the same tensor layouts and give bitwise-identical outputs on CPU (training
    can leave conv weights channels-last, which changes the float round-off)."""
    if path.is_file():
        try:
            model = build()
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            logger.info("%s: cached classifier loaded", path.name)
            return model.eval(), True
        except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
            logger.warning("%s: unusable cached classifier (%s); retraining", path.name, type(exc).__name__)
    trained = train(build())
    state = {k: v.detach().cpu().contiguous() for k, v in trained.state_dict().items()}
    _atomic_save(path, lambda tmp: torch.save(state, tmp))
    model = build()
    model.load_state_dict(state)
    return model.eval(), False
