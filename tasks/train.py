"""Stage ``train``: train the pipeline's generator on the real training split, or select
one from the registry (by id or search query), and place it in ``models/<pipeline>/generator``.

Outputs: ``card.yaml`` (with the weights' sha256), ``weights.safetensors``,
``history.csv`` (per-epoch losses, a DVC plot). ``metrics/<pipeline>/train.json`` (DVC
metrics) holds what was trained (ref, epochs, images, device); the wall time goes to
``.synthmed/<pipeline>/train_timing.json`` (not versioned), so that an identical rerun
gives identical DVC hashes for the generator and its metrics.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from generators import registry
from generators.architectures.cgan import NETWORK_DESCRIPTIONS as CGAN_NETWORKS
from generators.architectures.controls import HOLDOUT_SPLIT, add_holdout_groups
from generators.card import Conditioning, ModelCard, TrainingInfo, Weights, save_card
from generators.errors import DataError, GeneratorError
from generators.shards import dataset_digest, decode_table, read_manifest, read_table, replace_dir, write_json_atomic
from generators.train_spec import TrainSpec
from generators.training import TrainedGenerator, TrainingData, discard_checkpoint, train_generator
from generators.weights import save_weights, verify_sha256
from tasks.config import PipelineConfig
from tasks.paths import PipelinePaths
from tasks.preflight import preflight
from tasks.progress import Progress
from tasks.runtime import setup_torch

log = logging.getLogger(__name__)
MASK_CLASSES = ("background", "grey_matter", "white_matter")


def load_training_data(paths: PipelinePaths, with_masks: bool, split: str = "train") -> TrainingData:
    """Decode the real ``train`` split: images float32 (N, C, H, W) in [0, 1] (a 3D dataset:
    volumes (N, 1, D, H, W), masks (N, D, H, W)). Another
    ``split`` (the ``real-holdout`` control's held-out split) keeps the train split's class
    names, so the generator's card lists the classes the rest of the pipeline expects."""
    table = read_table(paths.real, splits=[split])
    if table.num_rows == 0:
        raise DataError(f"{paths.real}: the {split} split is empty; add images or adjust preprocess.split")
    arrays = decode_table(table)
    if any(label is None for label in arrays.labels):
        raise DataError(
            f"{paths.real}: every training image needs a label for a conditional generator; fix the source labels"
        )
    names = tuple(sorted(set(arrays.labels)))
    if split != "train":
        names = tuple(sorted(read_manifest(paths.real)["class_counts"].get("train", {})))
        if set(arrays.labels) - set(names):
            raise DataError(
                f"{paths.real}: expected {split} labels among the train classes {list(names)}, got "
                f"{sorted(set(arrays.labels) - set(names))}; re-ingest with consistent labels"
            )
    labels = np.array([names.index(label) for label in arrays.labels], dtype=np.int64)
    masks = arrays.masks if with_masks else None
    if with_masks and masks is None:
        raise DataError(f"{paths.real}: generator.train.with_masks needs masks on every training image; ingest masks")
    mask_classes = int(masks.max()) + 1 if masks is not None else 0
    return TrainingData(
        arrays.images, labels, names, masks, max(mask_classes, len(MASK_CLASSES)) if masks is not None else 0
    )


def _fingerprint(cfg: PipelineConfig, paths: PipelinePaths) -> str:
    spec = cfg.generator.train.model_dump(mode="json") if cfg.generator.train else {}
    payload = json.dumps({"spec": spec, "real": dataset_digest(paths.real), "threads": cfg.threads}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _train_new(cfg: PipelineConfig, paths: PipelinePaths, staging: Path) -> dict[str, Any]:
    spec = cfg.generator.train
    if spec is None:
        raise GeneratorError("generator.train is missing; give a train block or an id/query")
    device = setup_torch(cfg, spec.seed)
    # the positive control serves held-out real images: it gets that split, never train or test
    split = HOLDOUT_SPLIT if spec.architecture == "real-holdout" else "train"
    data = load_training_data(paths, spec.with_masks, split)
    manifest = read_manifest(paths.real)
    checkpoint = paths.state / f"generator-{_fingerprint(cfg, paths)}.ckpt"
    return _train_architecture(cfg, paths, staging, data, manifest, checkpoint, device)


def _finish(
    staging: Path,
    card: ModelCard,
    result: Any,
    spec: TrainSpec,
    data: TrainingData,
    device: str,
    checkpoint: Path,
    columns: Sequence[str],
) -> dict[str, Any]:
    """After a training run (``result``: ``.history``, ``.time_s``, ``.resumed_from_epoch``):
    write ``history.csv`` (``columns``: ``epoch`` then the losses, 6 decimals), drop the
    checkpoint and return the stage summary."""
    with open(staging / "history.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in result.history:
            writer.writerow([int(row["epoch"]), *(f"{row[k]:.6f}" for k in columns[1:])])
    discard_checkpoint(checkpoint)
    return {
        "generator": card.ref,
        "trained": True,
        "time_s": round(result.time_s, 2),
        "epochs": spec.epochs,
        "images": len(data.images),
        "device": device,
        "resumed_from_epoch": result.resumed_from_epoch,
    }


_DESCRIPTIONS = {
    # cgan: a template; _describe fills in the network style and the loss
    "cgan": "Class-conditional GAN ({network}, {loss} loss, EMA generator)",
    "dcgan": "Unconditional DCGAN (MONAI Generator/Discriminator, MedNIST GAN bundle recipe, EMA generator)",
    "vae": "Class-conditional VAE (MONAI VarAutoEncoder, label maps in, label appended to the latent code)",
    "ddpm": "Class-conditional diffusion model (MONAI DiffusionModelUNet, DDPM training, DDIM sampling; "
    "mask-conditioned when with_masks: the one-hot mask is concatenated to the noisy image)",
    "ldm": "Class-conditional latent diffusion model (MONAI AutoencoderKL + DiffusionModelUNet on its latents, "
    "rectified-flow or DDPM training, few-step sampling)",
    "vae3d": "Class-conditional 3D VAE (MONAI Convolution/ResidualUnit blocks, spatial_dims 3; mask-conditioned when "
    "with_masks: the one-hot mask enters the encoder and every decoder scale, paired volume/mask generation from a "
    "pool of training masks)",
    "ldm3d": "Class-conditional 3D latent diffusion model (MONAI AutoencoderKL + DiffusionModelUNet, spatial_dims 3, "
    "rectified-flow training, Euler sampling; mask-conditioned when with_masks: the downsampled one-hot mask is "
    "concatenated to the latent)",
    "pix2pix": "Mask-to-image pix2pix (MONAI UNet + PatchDiscriminator, L1 + adversarial) emitting image/mask "
    "pairs; its weights file holds a pool of training segmentation masks (no pixel data, no ids)",
    "noise": "NEGATIVE CONTROL: per-class Gaussian noise (salt-noise masks when paired); the judge must reject it",
    "blobs": "NEGATIVE CONTROL: smooth random blobs (salt-noise masks when paired); the judge must reject it",
    "real-holdout": f"POSITIVE CONTROL: serves held-out REAL images of the {HOLDOUT_SPLIT} split (never train or "
    "test), stored in its weights file; a local control, not a model to share",
}
_TAGS = {
    "cgan": ("conditional", "gan"),
    "dcgan": ("unconditional", "gan"),
    "vae": ("conditional", "vae"),
    "ddpm": ("conditional", "diffusion"),
    "ldm": ("conditional", "diffusion", "latent-diffusion"),
    "pix2pix": ("conditional", "gan", "mask-to-image"),
    "vae3d": ("conditional", "vae", "3d"),
    "ldm3d": ("conditional", "diffusion", "latent-diffusion", "3d"),
    "noise": ("control", "negative-control"),
    "blobs": ("control", "negative-control"),
    "real-holdout": ("control", "positive-control", "real-images"),
}


_NAMES = {"cgan": "class-conditional GAN"}  # the card's name after the pipeline's; default: the architecture


def _describe(result: TrainedGenerator, spec: TrainSpec, pipeline: str) -> str:
    """The card's description: the architecture's line of ``_DESCRIPTIONS`` (cgan's names
    its network style and loss) and the pipeline that trained it."""
    if result.architecture == "cgan":
        network = CGAN_NETWORKS[result.network.get("style", "mednist")]
        line = _DESCRIPTIONS["cgan"].format(network=network, loss=spec.loss)
        return f"{line} trained by synthmed pipeline '{pipeline}'."  # no comma: as cgan cards always read
    return f"{_DESCRIPTIONS[result.architecture]}, trained by synthmed pipeline '{pipeline}'."


def _train_architecture(
    cfg: PipelineConfig,
    paths: PipelinePaths,
    staging: Path,
    data: TrainingData,
    manifest: dict[str, Any],
    checkpoint: Path,
    device: str,
) -> dict[str, Any]:
    """Train ``spec.architecture`` through ``train_generator`` and write its card, weights
    and history into ``staging``."""
    spec = cfg.generator.train
    arch = spec.architecture
    log.info(
        "training %s on %d images (%s), %d epochs, device %s",
        arch,
        len(data.images),
        ", ".join(data.label_names),
        spec.epochs,
        device,
    )

    counter = Progress("train", spec.epochs, "epochs", every_s=30.0)

    def progress(epoch: int, row: dict[str, float]) -> None:
        if counter.done == 0 and epoch > 1:  # resumed: count the epochs done before, time only the new ones
            counter.done, counter.total = 0, spec.epochs - epoch + 1
        counter.advance(1)
        if epoch == 1 or epoch % max(1, spec.epochs // 10) == 0 or epoch == spec.epochs:
            losses = "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "epoch")
            log.info("epoch %d/%d  %s", epoch, spec.epochs, losses)

    result = train_generator(spec, data, device=device, checkpoint=checkpoint, on_epoch=progress)
    if arch == "real-holdout":  # each served real slice keeps its slab/subject group (tasks/realism.py)
        subjects = read_table(paths.real, columns=["subject"], splits=[HOLDOUT_SPLIT]).column("subject").to_pylist()
        result = add_holdout_groups(result, subjects)
    sha = save_weights(result.state, staging / "weights.safetensors")
    height, width = (int(s) for s in data.images.shape[-2:])
    volume = tuple(int(s) for s in data.images.shape[2:]) if data.images.ndim == 5 else None
    size_tag = "x".join(str(s) for s in (volume or (height, width)))
    licence = str(manifest["provenance"].get("licence", "see source"))
    card = ModelCard(
        id=f"synthmed/{paths.pipeline}-{arch}",
        version="1.0.0",
        name=f"{paths.pipeline} {_NAMES.get(arch, arch)}",
        description=_describe(result, spec, paths.pipeline),
        changelog={"1.0.0": "trained by the pipeline"},
        architecture=arch,
        network=result.network,
        modality=str(manifest["provenance"].get("modality", "unknown")),
        anatomy=str(manifest["provenance"].get("anatomy", "unknown")),
        image_size=(height, width),
        volume_size=volume,
        channels=int(data.images.shape[1]),
        latent_dim=spec.latent_dim if arch in ("cgan", "dcgan", "vae", "vae3d") else None,
        conditioning=Conditioning(
            labels=result.labels,
            masks=result.mask_classes > 0,
            mask_classes=MASK_CLASSES[: result.mask_classes] if result.mask_classes else (),
        ),
        training=TrainingInfo(
            dataset=f"{paths.pipeline} real train split (dataset {dataset_digest(paths.real)})",
            dataset_licence=licence,
            images=len(data.images),
            epochs=spec.epochs,
            config=spec.model_dump(mode="json"),
        ),
        licence=licence,
        weights=Weights(file="weights.safetensors", sha256=sha, format="safetensors"),
        dependencies=("torch", "monai", "einops") if arch in ("ddpm", "ldm", "ldm3d") else ("torch", "monai"),
        origin={"kind": "synthmed"},
        tags=(*_TAGS[arch], size_tag),
    )
    save_card(card, staging / "card.yaml")
    columns = list(result.history[0]) if result.history else ["epoch"]
    return _finish(staging, card, result, spec, data, device, checkpoint, columns)


def _select_existing(cfg: PipelineConfig, staging: Path) -> dict[str, Any]:
    spec = cfg.generator
    if spec.id:
        entry = registry.find(spec.id)
    else:
        found = [e for e in registry.search(spec.query or "", rank_by=spec.rank_by) if e.card.available]
        if not found:
            raise GeneratorError(
                f"no available generator matches query '{spec.query}'; try 'synthmed generators search'"
            )
        entry = found[0]
    weights = entry.weights_path
    if weights is None:
        raise GeneratorError(f"{entry.card.ref}: weights not available here; choose another generator")
    verify_sha256(weights, entry.card.weights.sha256)
    shutil.copyfile(entry.path, staging / "card.yaml")
    (staging / entry.card.weights.file).parent.mkdir(parents=True, exist_ok=True)  # e.g. models/model.pt
    shutil.copyfile(weights, staging / entry.card.weights.file)
    return {"generator": entry.card.ref, "trained": False}


def train(cfg: PipelineConfig, paths: PipelinePaths) -> dict[str, Any]:
    """Train or select the generator; returns a summary (ref, timing)."""
    paths.generator.parent.mkdir(parents=True, exist_ok=True)
    paths.state.mkdir(parents=True, exist_ok=True)
    staging = paths.generator.with_name(f".{paths.generator.name}.staging-{uuid.uuid4().hex}")
    staging.mkdir()
    try:
        if cfg.generator.train:
            preflight(cfg, paths)  # enough real images per class and split, before any training
            summary = _train_new(cfg, paths, staging)
        else:
            summary = _select_existing(cfg, staging)
            preflight(cfg, paths)  # after the (cheap) selection, before anything is replaced
        replace_dir(staging, paths.generator)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    paths.metrics.mkdir(parents=True, exist_ok=True)
    timing = {"time_s": summary.pop("time_s")} if "time_s" in summary else {}
    write_json_atomic(summary, paths.metrics / "train.json")
    write_json_atomic(timing, train_timing_path(paths))
    return {**summary, **timing}


def train_timing_path(paths: PipelinePaths) -> Path:
    """Where the train stage leaves its wall time (``{"time_s": float}``, ``{}`` when it
    selected a generator): outside the DVC-tracked outputs, which must repeat bit for bit."""
    return paths.state / "train_timing.json"


def read_train_timing(paths: PipelinePaths) -> float | None:
    """The last training run's wall time in seconds, or None (not trained, or no record)."""
    try:
        value = json.loads(train_timing_path(paths).read_text()).get("time_s")
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None
