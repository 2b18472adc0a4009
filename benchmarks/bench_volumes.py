"""Volume synthesis (``preprocess.dims: 3``): volumes/s of the ``synthesize`` stage end to
end (generate + encode + write shards) against the bare forward pass (``generate`` alone,
same batch size), at 64^3 and 128^3, and peak memory per volume.

The generator is the demo-3d network (``vae3d``, base channels 8, latent 32, paired volume +
mask) trained one epoch on four random volumes through the ``train`` stage (speed does not depend on the
weights). Peak memory runs in a fresh process per size: ``ru_maxrss`` after generating one
batch minus the RSS after loading the generator, divided by the batch size.

    python -m benchmarks.bench_volumes                        # CPU, 64^3 and 128^3, ~3 min on 2 cores
    python -m benchmarks.bench_volumes --device cuda --sizes 64 128 --count 256 --batch-size 8

Target: the stage keeps >= 80 % of the bare forward pass's volumes/s (encoding and writing
a volume must not dominate making it).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Target, Timer, current_rss_mb, peak_rss_mb, print_machine, run_child, save_results, table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="cube sides")
    parser.add_argument("--count", type=int, default=16, help="volumes per timed run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # peak memory at this size
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def config(size: int, count: int, batch_size: int, threads: int, device: str):
    """A dims-3 pipeline at ``size``^3 with the demo-3d generator, one training epoch."""
    from tasks.config import PipelineConfig

    return PipelineConfig.model_validate(
        {
            "threads": threads,
            "device": device,
            "source": {"kind": "mni152", "levels_mm": [], "level_names": ["brain"]},
            "preprocess": {"dims": 3, "grid": [size, size, size]},
            "generator": {
                "train": {
                    "architecture": "vae3d",
                    "with_masks": True,
                    "epochs": 1,
                    "batch_size": 2,
                    "base_channels": 8,  # demo-3d's network
                    "latent_dim": 32,
                }
            },
            "synthesis": {"count_per_class": count, "batch_size": batch_size, "shard_rows": max(1, count // 2)},
        }
    )


def prepare(root: Path, size: int, count: int, batch_size: int, threads: int, device: str):
    """Write a 6-volume real dataset at ``size``^3 (with masks; 4 train, the preflight's
    minimum) and train the generator one epoch."""
    from generators.shards import Row, write_dataset
    from tasks.paths import PipelinePaths
    from tasks.runtime import setup_torch
    from tasks.train import train

    cfg = config(size, count, batch_size, threads, device)
    paths = PipelinePaths(root, "bench")
    rng = np.random.default_rng(0)
    rows = [
        Row(
            id=f"r{i}",
            subject=f"s{i}",
            split=split,
            label="brain",
            image=rng.integers(0, 256, (1, size, size, size), dtype=np.uint8),
            mask=rng.integers(0, 3, (size, size, size), dtype=np.uint8),
            source="bench",
        ).to_record()
        for i, split in enumerate(["train"] * 4 + ["val", "test"])
    ]
    shape = [size, size, size]
    write_dataset(
        paths.real,
        rows,
        provenance={"dims": 3, "volume_shape": shape, "eval_shape": shape, "mask_classes": ["bg", "gm", "wm"]},
    )
    setup_torch(cfg)
    train(cfg, paths)
    return cfg, paths


def time_size(size: int, cfg, paths, args: argparse.Namespace) -> dict[str, Any]:
    """Bare ``generate`` vs the ``synthesize`` stage, ``args.count`` volumes each."""
    import torch

    from generators.registry import load_generator
    from tasks.synthesize import synthesize

    generator = load_generator(paths.generator / "card.yaml", device=args.device)
    generator.generate(1, 0, "brain")  # warm-up
    with Timer() as bare, torch.inference_mode():
        for start in range(0, args.count, args.batch_size):
            generator.generate(min(args.batch_size, args.count - start), start, "brain")
    with Timer() as stage:
        synthesize(cfg, paths)
    shards = sum(f.stat().st_size for f in paths.synthetic.glob("*.parquet"))
    return {
        "size": size,
        "bare_volumes_per_s": args.count / bare.s,
        "stage_volumes_per_s": args.count / stage.s,
        "stage_over_bare": bare.s / stage.s,
        "bytes_per_volume_on_disk": shards / args.count,
    }


def child(size: int, args: argparse.Namespace) -> None:
    """Peak memory of generating one batch at ``size``^3 with the generator ``prepare``
    trained in ``args.workdir`` (run in a fresh process: its peak is generation's only)."""
    import torch

    from generators.registry import load_generator
    from tasks.paths import PipelinePaths

    torch.set_num_threads(args.threads)
    generator = load_generator(PipelinePaths(Path(args.workdir), "bench").generator / "card.yaml", device=args.device)
    loaded = current_rss_mb()
    with torch.inference_mode():
        generator.generate(args.batch_size, 0, "brain")
    peak = peak_rss_mb()
    print(json.dumps({"size": size, "loaded_rss_mb": loaded, "peak_rss_mb": peak}))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args.child, args)
        return
    print_machine(args.device)
    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            cfg, paths = prepare(Path(tmp), size, args.count, args.batch_size, args.threads, args.device)
            timing = time_size(size, cfg, paths, args)
            extra = ["--device", args.device, "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
            memory = run_child("bench_volumes", ["--child", str(size), "--workdir", tmp, *extra])
        timing["peak_mb_per_volume"] = (memory["peak_rss_mb"] - memory["loaded_rss_mb"]) / args.batch_size
        timing["voxels"] = size**3
        rows.append(timing)
    print(
        table(
            [
                [
                    f"{r['size']}^3",
                    r["bare_volumes_per_s"],
                    r["stage_volumes_per_s"],
                    r["stage_over_bare"],
                    r["bytes_per_volume_on_disk"] / 2**20,
                    r["peak_mb_per_volume"],
                ]
                for r in rows
            ],
            ["volume", "bare vol/s", "stage vol/s", "stage/bare", "MiB/volume on disk", "peak MiB/volume"],
        )
    )
    targets = [Target(f"stage/bare at {r['size']}^3", r["stage_over_bare"], 0.8) for r in rows]
    save_results(
        "volumes" if args.device == "cpu" else f"volumes_{args.device}",
        {"rows": rows, "count": args.count, "batch_size": args.batch_size, "threads": args.threads},
        targets,
        device=args.device,
    )


if __name__ == "__main__":
    main()
