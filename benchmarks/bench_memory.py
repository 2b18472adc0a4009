"""Memory of the ``synthesize`` stage as the image count grows: each count runs in a fresh
process and reports its own peak RSS; a flat curve (slope per image ~ 0) is extrapolated
linearly to 1,000,000 images, and the extrapolation is labelled as such.

The generator is the demo pipeline's cGAN at 64x64 with narrow layers (``--base-channels``
8 by default, so 32k images finish in minutes on a CPU); what grows with the count is the
plan, the writer and the I/O queue, not the network.

    python -m benchmarks.bench_memory                         # 2k, 8k, 32k images (~2 min on the 2-core CPU)
    python -m benchmarks.bench_memory --compile false         # the same, eager
    python -m benchmarks.bench_memory --counts 2000 8000 32000 128000 --base-channels 32

Every count runs with the same ``synthesis.compile`` (``--compile``, default true: what
``auto`` picks at 1,000,000 images), so the curve is not bent by ``auto`` switching to
the compiled network at 20,000 images; the one-off compile's memory is in every point.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    LABELS,
    Target,
    Timer,
    current_rss_mb,
    peak_rss_mb,
    print_machine,
    run_child,
    save_results,
    table,
    write_real_dataset,
)

EXTRAPOLATE_TO = 1_000_000
FLAT_MB_PER_10K = 25.0  # "flat": under 25 MiB more peak RSS per 10,000 more images


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[2000, 8000, 32000])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--base-channels", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-rows", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--compile", choices=["true", "false"], default="true", help="synthesis.compile")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _card(workdir: Path, size: int, base_channels: int) -> None:
    """An untrained seeded cGAN card + weights in ``workdir/models/mem/generator``."""
    import torch

    from generators.architectures.cgan import CganConfig, ConditionalGenerator, network_kwargs
    from generators.card import Conditioning, ModelCard, Weights, save_card
    from generators.weights import save_weights

    target = workdir / "models" / "mem" / "generator"
    target.mkdir(parents=True, exist_ok=True)
    config = CganConfig(image_size=size, channels=1, n_labels=len(LABELS), base_channels=base_channels)
    torch.manual_seed(0)
    sha = save_weights(ConditionalGenerator(config).state_dict(), target / "weights.safetensors")
    card = ModelCard(
        id="bench/memory-cgan",
        version="0.0.0",
        architecture="cgan",
        network=network_kwargs(config),
        modality="MRI",
        anatomy="brain",
        image_size=(size, size),
        channels=1,
        conditioning=Conditioning(labels=LABELS),
        licence="CC0-1.0",
        weights=Weights(file="weights.safetensors", sha256=sha, format="safetensors"),
    )
    save_card(card, target / "card.yaml")


def child(args: argparse.Namespace) -> None:
    """Run the stage once for ``args.counts[0]`` images; print one JSON line."""
    from tasks.config import PipelineConfig
    from tasks.paths import PipelinePaths
    from tasks.synthesize import synthesize

    count = args.counts[0]
    workdir = Path(args.workdir)
    paths = PipelinePaths(workdir, "mem")
    cfg = PipelineConfig.model_validate(
        {
            "source": {"kind": "folder", "path": "unused"},
            "device": "cpu",
            "threads": args.threads,
            "generator": {"id": "bench/memory-cgan"},
            "synthesis": {
                "count_per_class": count // len(LABELS),
                "shard_rows": args.shard_rows,
                "batch_size": args.batch_size,
                "compile": args.compile == "true",
            },
        }
    )
    baseline_mb = current_rss_mb()  # after imports: torch, MONAI, pyarrow
    with Timer() as t:
        summary = synthesize(cfg, paths)
    made = sum(summary["counts"].values())
    dataset_mb = sum(p.stat().st_size for p in paths.synthetic.iterdir()) / 2**20
    print(
        json.dumps(
            {
                "count": made,
                "time_s": t.s,
                "img_s": made / t.s,
                "rss_after_imports_mb": baseline_mb,
                "peak_rss_mb": peak_rss_mb(),
                "dataset_mb": dataset_mb,
                "shards": summary["shards"],
                "compiled": summary["compiled"],
            }
        )
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        child(args)
        return {}
    print_machine()
    print(
        f"bench_memory: synthesize {args.counts} images at {args.size}x{args.size}, base channels "
        f"{args.base_channels}, batch {args.batch_size}, shards of {args.shard_rows}, compile {args.compile}; "
        "one process per count"
    )
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp_name:
        workdir = Path(tmp_name)
        write_real_dataset(workdir / "data" / "mem" / "real", args.size)
        _card(workdir, args.size, args.base_channels)
        for count in args.counts:
            common = [
                "--size", str(args.size),
                "--base-channels", str(args.base_channels),
                "--batch-size", str(args.batch_size),
                "--shard-rows", str(args.shard_rows),
                "--threads", str(args.threads),
                "--compile", args.compile,
            ]  # fmt: skip
            result = run_child("bench_memory", ["--child", "--workdir", str(workdir), "--counts", str(count), *common])
            shutil.rmtree(workdir / "data" / "mem" / "synthetic", ignore_errors=True)
            runs.append(result)
            print(
                f"  {result['count']:>9,d} images: peak RSS {result['peak_rss_mb']:.0f} MiB "
                f"({result['rss_after_imports_mb']:.0f} after imports), {result['img_s']:.0f} img/s, "
                f"dataset {result['dataset_mb']:.1f} MiB"
            )
    counts = np.array([r["count"] for r in runs], dtype=np.float64)
    peaks = np.array([r["peak_rss_mb"] for r in runs], dtype=np.float64)
    slope, intercept = np.polyfit(counts, peaks, 1) if len(runs) > 1 else (0.0, peaks[0])
    # a flat or falling curve (noise) predicts the largest peak measured, never less
    predicted = max(float(peaks.max()), intercept + slope * EXTRAPOLATE_TO)
    per_10k = slope * 10_000
    largest = runs[int(np.argmax(counts))]
    print()
    print(
        table(
            [[r["count"], r["peak_rss_mb"], r["rss_after_imports_mb"], r["img_s"], r["dataset_mb"]] for r in runs],
            ["images", "peak RSS MiB", "RSS after imports MiB", "img/s", "dataset MiB"],
        )
    )
    flat = per_10k < FLAT_MB_PER_10K
    print(
        f"\nlinear fit: {per_10k:+.2f} MiB peak RSS per 10,000 images ({slope * 1024 * 1024:+.0f} bytes/image); "
        f"{'flat' if flat else 'NOT flat'} (bound {FLAT_MB_PER_10K} MiB per 10k)"
    )
    print(
        f"EXTRAPOLATED (not measured): {EXTRAPOLATE_TO:,d} images -> ~{predicted:,.0f} MiB peak RSS, "
        f"~{EXTRAPOLATE_TO / largest['img_s'] / 3600:.1f} h at the rate of the largest run"
    )
    figures = {
        "runs": runs,
        "slope_mb_per_10k_images": per_10k,
        "extrapolated_peak_rss_mb_at_1m": predicted,
        "args": vars(args),
    }
    targets = [Target("peak RSS growth per 10k images (MiB, flat curve)", per_10k, FLAT_MB_PER_10K, False)]
    save_results("bench_memory", figures, targets)
    return figures


if __name__ == "__main__":
    main()
