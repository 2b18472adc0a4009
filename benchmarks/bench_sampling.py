"""Sampling (issue 15): per-architecture sampling throughput, steps vs quality of the
diffusion models, and the shipped cards' training time to their quality.

1. **Throughput**: images/s of each architecture's own ``Model.generate`` (cgan in both
   styles, dcgan, vae, ddpm, ldm, pix2pix) at each size, networks built from their config
   classes (``CganConfig``, ``DdpmConfig.for_images``, ``LdmConfig.for_images``...) with
   seeded random weights: speed does not depend on the weights. For ddpm (DDIM) and ldm
   (rectified flow) the per-step time is the slope between two short step counts, and the
   images/s at the stated step count (``--ddpm-steps``, ``--ldm-steps``) is measured when
   ``--full-steps`` is given, else computed from overhead + steps x per-step time (marked
   ``extrapolated``).
2. **Steps vs quality**: a trained ldm card (``--ldm-card``) and the shipped ddpm card
   (``--ddpm-card``) generate ``--per-class`` images per class at each of ``--steps``
   sampling steps (``LdmModel.sample_steps`` / ``DdpmModel.ddim_steps`` set on the loaded
   model; nothing is retrained). Each set is scored against the real train split of
   ``--pipeline`` (``synthmed stage ingest --pipeline demo`` makes it): FID on the
   contrastive extractor of ``tasks/contrastive.py`` trained on that split (the one
   ``tasks/filter.py`` uses, cached under ``.synthmed/<pipeline>/contrastive/``; it did not
   choose any kept set), the classifier two-sample test AUC with its 95% cluster-bootstrap
   interval (``tasks/realism.py``, real rows grouped by subject as in ``tasks/filter.py``),
   and seconds per image.
3. **Training time to the shipped quality**: ``training.time_s`` and epochs of every
   shipped card (``generators/zoo/*/card.yaml``), with their realism / FID metrics.

On CUDA a GPU section adds fp32 vs bf16 autocast, a batch sweep 1..256 and the synthesis
stage vs the bare ``generate`` call; without CUDA it prints ``GPU: not available``.

    python -m benchmarks.bench_sampling                         # CPU defaults (sized for ~10 min idle; not timed)
    python -m benchmarks.bench_sampling --sizes 64 --per-class 16 --steps 1 4 16 --realism-epochs 5   # quicker
    python -m benchmarks.bench_sampling --full-steps --batch-size 64 --realism-epochs 30   # slower, fuller
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from benchmarks.common import ROOT, Timer, print_machine, save_results, table

logger = logging.getLogger(__name__)

#: the throughput rows: (row name, architecture, cgan style or None)
ARCHITECTURES: dict[str, tuple[str, str | None]] = {
    "cgan-mednist": ("cgan", "mednist"),
    "cgan-upsample": ("cgan", "upsample"),
    "dcgan": ("dcgan", None),
    "vae": ("vae", None),
    "ddpm": ("ddpm", None),
    "ldm": ("ldm", None),
    "pix2pix": ("pix2pix", None),
}
DIFFUSION = ("ddpm", "ldm")
LABELS = ("inferior", "middle", "superior")
ZOO = ROOT / "generators" / "zoo"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", default=["throughput", "quality", "cards", "gpu"])
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--batch-size", type=int, default=64, help="images per generate() call")
    parser.add_argument(
        "--diffusion-batch-size", type=int, default=16, help="images per generate() call of ddpm / ldm (CPU time)"
    )
    parser.add_argument("--base-channels", type=int, default=32, help="network width (TrainSpec default 32)")
    parser.add_argument("--ddpm-steps", type=int, default=50, help="DDIM steps the ddpm throughput is stated for")
    parser.add_argument("--ldm-steps", type=int, default=16, help="rectified-flow steps the ldm throughput is for")
    parser.add_argument("--full-steps", action="store_true", help="time ddpm / ldm at the stated steps too")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="timed calls repeat at least this long")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--ldm-card", type=Path, default=ZOO / "mni152_ldm", help="trained ldm card (folder or yaml)")
    parser.add_argument("--ddpm-card", type=Path, default=ZOO / "mni152_ddpm", help="trained ddpm card")
    parser.add_argument("--pipeline", default="demo", help="pipeline whose real train split is the reference")
    parser.add_argument("--per-class", type=int, default=32, help="images per class per step count")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 16, 50])
    parser.add_argument("--realism-epochs", type=int, default=10, help="two-sample test epochs per fold (config: 30)")
    parser.add_argument("--gpu-count", type=int, default=2048, help="images per GPU timing")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- models
def random_model(name: str, size: int, base_channels: int = 32, device: str = "cpu") -> Any:
    """The architecture's own loaded ``Model`` (``generators.architectures``) for a network
    built from its config class at ``size`` x ``size``, 1 channel, the 3 demo labels, with
    seeded random weights (pix2pix: 2 mask classes and a pool of random masks)."""
    import importlib

    from generators.architectures import _MODELS
    from generators.card import Conditioning, ModelCard
    from generators.train_spec import TrainSpec

    architecture, style = ARCHITECTURES[name]
    torch.manual_seed(0)
    mask_classes = 0
    if architecture == "cgan":
        from generators.architectures.cgan import CganConfig, ConditionalGenerator, network_kwargs

        cfg = CganConfig(
            image_size=size, channels=1, n_labels=len(LABELS), base_channels=base_channels, style=style or "mednist"
        )
        network, module = network_kwargs(cfg), ConditionalGenerator(cfg)
    elif architecture == "dcgan":
        from generators.architectures.dcgan import DcganConfig, build_generator

        cfg = DcganConfig(image_size=size, channels=1, base_channels=base_channels)
        network, module = asdict(cfg), build_generator(cfg)
    elif architecture == "vae":
        from generators.architectures.vae import ConditionalVae, VaeConfig

        cfg = VaeConfig(image_size=size, channels=1, n_labels=len(LABELS), base_channels=base_channels)
        network, module = asdict(cfg), ConditionalVae(cfg)
    elif architecture == "ddpm":
        from generators.architectures.ddpm import DdpmConfig, build_unet

        cfg = DdpmConfig.for_images(size, 1, len(LABELS), TrainSpec(architecture="ddpm", base_channels=base_channels))
        network = {**asdict(cfg), "unet_channels": list(cfg.unet_channels)}
        network["attention_levels"] = list(cfg.attention_levels)
        module = build_unet(cfg)
    elif architecture == "ldm":
        from generators.architectures.ldm import LdmConfig, LdmSampler

        cfg = LdmConfig.for_images(size, 1, len(LABELS), TrainSpec(architecture="ldm", base_channels=base_channels))
        network, module = cfg.network(), LdmSampler(cfg)
    else:
        from generators.architectures.pix2pix import Pix2pixConfig, build_generator

        mask_classes = 2
        cfg = Pix2pixConfig(
            image_size=size, channels=1, n_labels=len(LABELS), mask_classes=2, base_channels=base_channels
        )
        network, module = asdict(cfg), build_generator(cfg)
    card = ModelCard(
        id=f"bench/{name}-{size}",
        version="0.0.0",
        architecture=architecture,
        network=network,
        modality="MRI",
        anatomy="brain",
        image_size=(size, size),
        channels=1,
        latent_dim=network.get("latent_dim"),
        conditioning=Conditioning(
            labels=LABELS if architecture != "dcgan" else (),
            masks=mask_classes > 0,
            mask_classes=("background", "foreground") if mask_classes else (),
        ),
        licence="CC0-1.0",
        intended_use="benchmarking only",
    )
    module_name, class_name = _MODELS[architecture]
    model_class = getattr(importlib.import_module(module_name), class_name)
    model = model_class(card, module.state_dict(), device)
    if mask_classes:
        rng = np.random.default_rng(0)
        pool = (rng.random((16, size, size)) > 0.5).astype(np.int64)
        model.use_mask_pool(pool, [LABELS[i % len(LABELS)] for i in range(16)])
    return model


def set_steps(model: Any, steps: int) -> None:
    """Sampling steps of a loaded ddpm (``ddim_steps``) or ldm (``sample_steps``)."""
    if model.card.architecture == "ddpm":
        model.ddim_steps = steps
    elif model.card.architecture == "ldm":
        model.sample_steps = steps
    else:
        raise ValueError(f"expected a ddpm or ldm model, got {model.card.architecture!r}")


def condition_of(model: Any, n: int) -> list[str] | None:
    """Labels cycling over the card's labels (None for an unconditional model)."""
    labels = list(model.card.conditioning.labels)
    return [labels[i % len(labels)] for i in range(n)] if labels else None


# --------------------------------------------------------------------------- throughput
def time_generate(model: Any, batch: int, min_seconds: float, autocast_dtype: torch.dtype | None = None) -> float:
    """Seconds per ``generate(batch)`` call: one warm-up call, then calls repeated for at
    least ``min_seconds`` (at least one); the mean counts."""
    condition = condition_of(model, batch)

    def call(seed: int) -> None:
        if autocast_dtype is None:
            model.generate(batch, seed=seed, condition=condition)
        else:
            with torch.autocast(model.device.type, dtype=autocast_dtype):
                model.generate(batch, seed=seed, condition=condition)
        if model.device.type == "cuda":
            torch.cuda.synchronize()

    call(0)
    calls, total = 0, 0.0
    while calls == 0 or total < min_seconds:
        with Timer() as t:
            call(calls + 1)
        total += t.s
        calls += 1
    return total / calls


@dataclass(frozen=True)
class ThroughputRow:
    name: str
    size: int
    batch: int
    steps: int | None
    images_per_s: float
    step_ms_per_image: float | None
    how: str


def measure_throughput(
    name: str,
    size: int,
    *,
    batch: int,
    min_seconds: float,
    base_channels: int = 32,
    stated_steps: int | None = None,
    full_steps: bool = False,
) -> ThroughputRow:
    """Images/s of ``generate`` for one architecture and size. Diffusion: per-step time
    from the slope between 1 and 3 steps; images/s at ``stated_steps`` measured
    (``full_steps``) or overhead + steps x per-step (``how``: ``extrapolated``)."""
    model = random_model(name, size, base_channels)
    if name not in DIFFUSION:
        return ThroughputRow(
            name, size, batch, None, batch / time_generate(model, batch, min_seconds), None, "measured"
        )
    set_steps(model, 1)
    t1 = time_generate(model, batch, min_seconds)
    set_steps(model, 3)
    t3 = time_generate(model, batch, min_seconds)
    per_step = max((t3 - t1) / 2, 1e-9)
    steps = int(stated_steps or 1)
    if full_steps:
        set_steps(model, steps)
        seconds, how = time_generate(model, batch, 0.0), "measured"
    else:
        seconds, how = max(t1 - per_step, 0.0) + steps * per_step, "extrapolated"
    return ThroughputRow(name, size, batch, steps, batch / seconds, 1000 * per_step / batch, how)


# --------------------------------------------------------------------------- quality
@dataclass(frozen=True)
class Reference:
    """The real train split of a pipeline and what scores a synthetic set against it."""

    images: np.ndarray  # float32 (N, C, H, W) in [0, 1]
    labels: list[str]
    subjects: list[str | None]
    features: np.ndarray  # float32 (N, D) contrastive features
    extractor: Any
    normalisation: str
    cfg: Any
    extractor_name: str


def load_reference(pipeline: str, device: str = "cpu") -> Reference:
    """The real train split of ``pipeline`` with its contrastive extractor, obtained (and
    cached under ``.synthmed/<pipeline>/contrastive/``) exactly as ``tasks/filter.py`` does."""
    from tasks import downstream, features
    from tasks import filter as filter_task
    from tasks.config import load_pipeline
    from tasks.paths import PipelinePaths

    cfg = load_pipeline(pipeline, ROOT / "pipelines.yaml")
    paths = PipelinePaths(ROOT, pipeline)
    if not paths.real.exists():
        raise FileNotFoundError(
            f"expected the real dataset at {paths.real}, found none; run: synthmed stage ingest --pipeline {pipeline}"
        )
    classes = [label for label in downstream.dataset_labels(paths.real, ["train"]) if label]
    train = downstream.load_labelled(paths.real, ["train"], classes)
    model = filter_task._self_supervised_model(cfg, paths, train, device)
    extractor = features.self_supervised_extractor(model)
    normalisation = extractor.default_normalisation
    feats = features.extract_features(extractor, train.images, normalisation=normalisation, device=device)
    return Reference(
        images=train.images,
        labels=list(train.labels),
        subjects=filter_task._real_subjects(paths, train.ids),
        features=feats,
        extractor=extractor,
        normalisation=normalisation,
        cfg=cfg,
        extractor_name=extractor.name,
    )


@dataclass(frozen=True)
class QualityRow:
    model: str
    steps: int
    n: int
    s_per_image: float
    fid: float
    auc: float | None
    ci95_low: float | None
    ci95_high: float | None


def score_steps(
    label: str, model: Any, reference: Reference, steps: int, per_class: int, realism_epochs: int, seed: int = 1234
) -> QualityRow:
    """Generate ``per_class`` images per card label at ``steps`` sampling steps, then FID
    (contrastive features) and the two-sample test AUC against ``reference``."""
    from tasks import features, quality_metrics, realism

    set_steps(model, steps)
    labels = [name for name in model.card.conditioning.labels for _ in range(per_class)]
    chunks = []
    with Timer() as t:
        for start in range(0, len(labels), 64):
            chunk = labels[start : start + 64]
            chunks.append(model.generate(len(chunk), seed=seed + start, condition=chunk).images)
    images = np.concatenate(chunks)
    synthetic_features = features.extract_features(
        reference.extractor, images, normalisation=reference.normalisation, device="cpu"
    )
    fid = quality_metrics.fid(reference.features, synthetic_features)
    spec = reference.cfg.quality.realism
    settings = realism.TwoSampleSettings.from_spec(spec, epochs=realism_epochs)
    test = realism.two_sample_test(
        reference.images,
        reference.labels,
        reference.subjects,
        images,
        labels,
        settings,
        seed=reference.cfg.seed,
        device="cpu",
    )
    return QualityRow(
        label, steps, len(labels), t.s / len(labels), fid, test["auc"], test["ci95_low"], test["ci95_high"]
    )


def load_card_model(card: Path) -> Any:
    """A loaded generator from a card folder or ``card.yaml`` (sha256 verified)."""
    from generators.registry import load_generator

    path = card / "card.yaml" if card.is_dir() else card
    if not path.is_file():
        raise FileNotFoundError(f"expected a generator card at {path}, found none; pass its folder or card.yaml")
    return load_generator(path)


# --------------------------------------------------------------------------- cards
def card_rows(zoo: Path = ZOO) -> list[list[Any]]:
    """Card id, architecture, epochs, training time_s and the realism / FID metrics of every
    shipped card under ``zoo`` with a ``training.time_s``."""
    from generators.card import load_card

    rows = []
    for path in sorted(zoo.glob("*/card.yaml")):
        card = load_card(path)
        if card.training.time_s is None:
            continue
        metrics = {name: metric.value for name, metric in card.metrics.items()}
        rows.append(
            [
                card.id,
                card.architecture,
                card.training.epochs,
                float(card.training.time_s),
                metrics.get("fid_kept", float("nan")),
                metrics.get("fid_generated", float("nan")),
                metrics.get("realism_auc", metrics.get("two_sample_auc", float("nan"))),
                metrics.get("kept_fraction", float("nan")),
            ]
        )
    return rows


# --------------------------------------------------------------------------- GPU
def gpu_section(names: Sequence[str], sizes: Sequence[int], count: int, base_channels: int) -> list[list[Any]]:
    """On CUDA: per architecture and size, fp32 vs bf16 autocast images/s at batch 64, a
    batch sweep 1..256 (bf16), and the synthesis stage vs the bare ``generate`` call (64x64).
    Returns the rows (empty without CUDA)."""
    if not torch.cuda.is_available():
        print("GPU: not available")
        return []
    rows: list[list[Any]] = []
    for name in names:
        for size in sizes:
            model = random_model(name, size, base_channels, device="cuda")
            for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
                rows.append([name, size, label, 64, 64 / time_generate(model, 64, 2.0, dtype), "generate"])
            for batch in (1, 4, 16, 64, 256):
                rows.append(
                    [name, size, "bf16", batch, batch / time_generate(model, batch, 1.0, torch.bfloat16), "generate"]
                )
    rows += stage_vs_forward(count, base_channels)
    print(table(rows, ["architecture", "size", "dtype", "batch", "img/s", "what"]))
    return rows


def stage_vs_forward(count: int, base_channels: int) -> list[list[Any]]:
    """cgan 64x64 on CUDA: the ``synthesize`` stage end to end (generate + encode + shards)
    vs the bare ``generate`` call, ``count`` images each, batch 64."""
    from benchmarks.bench_synthesis import stage_rate
    from benchmarks.common import build_generator

    model = random_model("cgan-mednist", 64, base_channels, device="cuda")
    bare = 64 / time_generate(model, 64, 2.0)
    settings = argparse.Namespace(device="cuda", threads=torch.get_num_threads(), shard_rows=512, batch_size=64)
    with tempfile.TemporaryDirectory() as tmp:
        card = build_generator("cgan", 64, Path(tmp) / "gen")
        stage_rate(Path(tmp), card, 64, settings, count=max(64, count // 8))  # warm-up
        stage = stage_rate(Path(tmp), card, 64, settings, count=count)
    return [
        ["cgan-mednist", 64, "stage policy", 64, stage, "synthesize stage"],
        ["cgan-mednist", 64, "fp32", 64, bare, "bare generate"],
    ]


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print_machine("cpu")
    print(f"torch threads: {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    figures: dict[str, Any] = {"threads": torch.get_num_threads()}

    if "throughput" in args.sections:
        rows = []
        for size in args.sizes:
            for name in args.architectures:
                batch = args.diffusion_batch_size if name in DIFFUSION else args.batch_size
                stated = {"ddpm": args.ddpm_steps, "ldm": args.ldm_steps}.get(name)
                rows.append(
                    measure_throughput(
                        name,
                        size,
                        batch=batch,
                        min_seconds=args.min_seconds,
                        base_channels=args.base_channels,
                        stated_steps=stated,
                        full_steps=args.full_steps,
                    )
                )
                print(f"  {rows[-1]}", flush=True)
        print(
            "\nSampling throughput (CPU, random weights, base channels "
            f"{args.base_channels}, {torch.get_num_threads()} torch threads)"
        )
        print(
            table(
                [
                    [
                        r.name,
                        r.size,
                        r.batch,
                        r.steps or "-",
                        r.images_per_s,
                        r.step_ms_per_image or float("nan"),
                        r.how,
                    ]
                    for r in rows
                ],
                ["architecture", "size", "batch", "steps", "img/s", "ms/step/img", "img/s is"],
            )
        )
        figures["throughput"] = [asdict(r) for r in rows]

    if "quality" in args.sections:
        figures["quality"] = run_quality(args)

    if "cards" in args.sections:
        rows = card_rows()
        print("\nTraining time to the shipped quality (from the cards; FID on each card's own extractor)")
        print(table(rows, ["card", "architecture", "epochs", "time_s", "fid_kept", "fid_generated", "auc", "kept"]))
        figures["cards"] = rows

    if "gpu" in args.sections:
        figures["gpu"] = gpu_section(
            ["cgan-mednist", "vae", "ddpm", "ldm", "pix2pix"], args.sizes, args.gpu_count, args.base_channels
        )
    save_results("sampling", figures, [])
    return 0


def run_quality(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Section 2: steps vs quality for each available trained diffusion card."""
    cards = [("ldm", args.ldm_card), ("ddpm", args.ddpm_card)]
    available = []
    for label, card in cards:
        try:
            available.append((label, card, load_card_model(card)))
        except FileNotFoundError as exc:
            print(f"steps vs quality: {label} skipped ({exc})")
    if not available:
        return []
    reference = load_reference(args.pipeline)
    print(
        f"\nreference: {args.pipeline} real train, n={len(reference.labels)}, extractor {reference.extractor_name}; "
        f"two-sample test {args.realism_epochs} epochs x {reference.cfg.quality.realism.folds} folds"
    )
    rows: list[QualityRow] = []
    for label, _card, model in available:
        name = f"{model.card.id} ({label})"
        for steps in args.steps:
            rows.append(score_steps(name, model, reference, steps, args.per_class, args.realism_epochs))
            print(f"  {rows[-1]}", flush=True)
    print(
        "\nSteps vs quality (FID: contrastive extractor; AUC: two-sample test vs real train, 0.5 = indistinguishable)"
    )
    print(
        table(
            [[r.model, r.steps, r.n, r.s_per_image, r.fid, _auc(r)] for r in rows],
            ["model", "steps", "n", "s/img", "FID", "AUC [95% CI]"],
        )
    )
    return [dataclasses.asdict(r) for r in rows]


def _auc(row: QualityRow) -> str:
    if row.auc is None:
        return "-"
    return f"{row.auc:.2f} [{row.ci95_low:.2f}, {row.ci95_high:.2f}]"


if __name__ == "__main__":
    raise SystemExit(main())
