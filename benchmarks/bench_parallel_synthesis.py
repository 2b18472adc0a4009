"""Local speed-up of sharded synthesis: the synthesize stage with its shards made by
Prefect tasks on a ThreadPoolTaskRunner (flows/scaleout.py), 1 vs 2 workers, plus the
plain serial loop (no Prefect) for reference. Prints seconds per setting and the ratio.

    python -m benchmarks.bench_parallel_synthesis [--count 800] [--size 64] [--repeats 2]

A phantom project is built in a temporary folder, ingested, and a cGAN trained for one
epoch (its weights' quality does not matter for speed). torch intra-op threads are set
to 1 (``threads: 1``) so that the workers are the only parallelism; the shards of every
setting are checked to be byte-identical. Runs under a temporary Prefect server
(``prefect_test_harness``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def build_project(root: Path, count: int, size: int, shard_rows: int):
    """A phantom project with ingest + train done; returns (config, paths)."""
    from tasks.config import load_pipeline
    from tasks.paths import PipelinePaths
    from tasks.stages import run_stage
    from tests.flows.project import make_project

    overrides = {
        "threads": 1,
        "preprocess": {"size": size, "split": {"train": 0.5, "val": 0.25, "test": 0.25}},
        "generator": {"train": {"epochs": 1, "batch_size": 16, "latent_dim": 64, "base_channels": 32}},
        "synthesis": {"count_per_class": count, "shard_rows": shard_rows, "batch_size": 32},
    }
    config = make_project(root, overrides=overrides)
    cfg, paths = load_pipeline("tiny", config), PipelinePaths(root, "tiny")
    for verb in ("ingest", "train"):
        run_stage(verb, cfg, paths)
    return cfg, paths


def time_synthesis(cfg, paths, workers: int | None) -> tuple[float, list[str]]:
    """Seconds for one forced synthesize run; ``workers=None``: serial, no Prefect tasks."""
    from flows.scaleout import thread_pool_shards
    from generators.shards import read_manifest
    from tasks.stages import run_stage

    options = {} if workers is None else {"map_shards": thread_pool_shards(workers)}
    start = time.perf_counter()
    run_stage("synthesize", cfg, paths, force=True, **options)
    elapsed = time.perf_counter() - start
    return elapsed, [s["sha256"] for s in read_manifest(paths.synthetic)["shards"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=800, help="images per class (3 classes)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--shard-rows", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting (median reported)")
    args = parser.parse_args(argv)

    import torch
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    settings = {"serial (no Prefect tasks)": None, "1 worker": 1, "2 workers": 2}
    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=120):
        cfg, paths = build_project(Path(tmp) / "proj", args.count, args.size, args.shard_rows)

        @flow(name="bench-parallel-synthesis")
        def bench() -> dict[str, tuple[float, list[str]]]:
            results = {}
            for label, workers in settings.items():
                runs = [time_synthesis(cfg, paths, workers) for _ in range(args.repeats)]
                results[label] = (statistics.median(t for t, _ in runs), runs[-1][1])
            return results

        results = bench()

    digests = {tuple(d) for _, d in results.values()}
    n_shards = len(next(iter(results.values()))[1])
    print(f"# bench_parallel_synthesis: {3 * args.count} images {args.size}x{args.size}, {n_shards} shards")
    print(
        f"# torch {torch.__version__}, intra-op threads 1, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    )
    for label, (seconds, _) in results.items():
        print(f"{label:28s} {seconds:7.2f} s")
    ratio = results["1 worker"][0] / results["2 workers"][0]
    print(f"speed-up 2 workers vs 1: {ratio:.2f}x")
    print(f"shards identical across settings: {len(digests) == 1}")
    return 0 if len(digests) == 1 else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
