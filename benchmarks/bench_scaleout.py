"""Scale-out on Dask (issue 17): the synthesize and retrain stages on a 2-process
``distributed.LocalCluster`` through prefect-dask (flows/scaleout.py) against their
serial runs in the same process, the per-task overhead of Dask and of Prefect on Dask,
the shard size that keeps that overhead under 5%, and a simulated scale run (100k images)
with the workers' memory sampled while it runs.

    python -m benchmarks.bench_scaleout [--images 100000] [--count 2000] [--size 32] [--quick]

A phantom project (tests/flows/project.py) is built in a temporary folder, ingested, a
small cGAN trained for one epoch (its weights' quality does not matter for speed) and
filtered once for retrain. Every pipeline uses ``threads: 1`` (one torch thread per
process), so the two Dask worker processes (one thread each) are the only parallelism.
Measured, each against its baseline:

1. synthesis: serial loop vs 2 Dask workers; cold (first run on fresh workers: torch
   import + generator load) and warm (median of ``--repeats``); shards byte-identical.
2. retrain sweep (>= 12 runs): in-process serial vs the stage's own 2-process pool vs
   2 Dask workers; ``retrain.json`` equal without its timings.
3. per-task overhead: a trivial Prefect task through ``DaskTaskRunner`` and the same
   function through plain ``client.submit``; the shard size for < 5% overhead, and
   synthesis img/s at shard_rows 8 / 32 / 128 / 512 on the cluster.
4. scale run: ``--images`` images in shards of ``--scale-shard-rows``; img/s and each
   worker's RSS at 10% / 50% / 90% of the shards done.

Runs under a temporary Prefect server (``prefect_test_harness``); writes
``benchmarks/results/bench_scaleout.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")

from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

MAX_OVERHEAD = 0.05  # the overhead share a shard size must stay under
SWEEP_SHARD_ROWS = (8, 32, 128, 512)
MIB = 1024.0 * 1024.0


# --------------------------------------------------------------------------- project
def build_project(root: Path, args: argparse.Namespace):
    """A phantom project with ingest + train done (``threads: 1``); returns (config, paths)."""
    from tasks.config import load_pipeline
    from tasks.paths import PipelinePaths
    from tasks.stages import run_stage
    from tests.flows.project import make_project

    retrain = {
        "steps": args.retrain_steps,
        "batch_size": 16,
        "seeds": [0, 1, 2],
        "ratios": [0, 0.5, 1, 2],
        "real_fractions": [0.5, 1.0],
    }
    if args.quick:
        retrain.update(seeds=[0, 1], ratios=[0, 1, 2])
    overrides = {
        "threads": 1,
        "preprocess": {"size": args.size, "split": {"train": 0.5, "val": 0.25, "test": 0.25}},
        "generator": {"train": {"epochs": 1, "batch_size": 16, "latent_dim": 16, "base_channels": 16}},
        "synthesis": {"count_per_class": args.count, "shard_rows": args.shard_rows, "batch_size": 64},
        "retrain": retrain,
    }
    config = make_project(root, overrides=overrides)
    cfg, paths = load_pipeline("tiny", config), PipelinePaths(root, "tiny")
    for verb in ("ingest", "train"):
        run_stage(verb, cfg, paths)
    return cfg, paths


def with_synthesis(cfg, **update: Any):
    """``cfg`` with its ``synthesis`` fields replaced (e.g. count_per_class, shard_rows)."""
    return cfg.model_copy(update={"synthesis": cfg.synthesis.model_copy(update=update)})


@flow(name="bench-scaleout-stage")
def stage_in_flow(verb: str, cfg: Any, paths: Any, options: dict[str, Any]) -> dict[str, Any]:
    from tasks.stages import run_stage

    return run_stage(verb, cfg, paths, force=True, **options)


def timed_stage(verb: str, cfg, paths, options: dict[str, Any] | None = None) -> tuple[float, dict[str, Any]]:
    """Seconds for one forced run of stage ``verb`` inside a Prefect flow, and its summary."""
    start = time.perf_counter()
    summary = stage_in_flow(verb, cfg, paths, options or {})
    return time.perf_counter() - start, summary


def shard_digests(paths) -> list[str]:
    from generators.shards import read_manifest

    return [s["sha256"] for s in read_manifest(paths.synthetic)["shards"]]


def retrain_result(paths) -> Any:
    from tests.flows.project import without_timings

    return without_timings(json.loads((paths.metrics / "retrain.json").read_text()))


# --------------------------------------------------------------------------- overhead
@task(task_run_name="echo-{value}", cache_policy=NO_CACHE, persist_result=False)
def echo(value: int) -> int:
    """The trivial Prefect task: returns its input."""
    return value


def identity(value: int) -> int:
    return value


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (also run on every worker)."""
    import psutil

    times = psutil.Process().cpu_times()
    return times.user + times.system


def cpu_snapshot(client: Any) -> dict[str, float]:
    """CPU seconds so far of this process (the driver), of the temporary Prefect server
    (a child process running uvicorn) and of all Dask workers together."""
    import psutil

    server = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            if "uvicorn" in " ".join(child.cmdline()):
                times = child.cpu_times()
                server += times.user + times.system
        except psutil.Error:
            continue
    return {"driver": cpu_seconds(), "server": server, "workers": sum(client.run(cpu_seconds).values())}


@flow(name="bench-scaleout-overhead")
def prefect_tasks_on_dask(choice: Any, n: int) -> tuple[float, dict[str, float]]:
    """Seconds for ``n`` ``echo`` tasks submitted at once through ``DaskTaskRunner``, and
    the CPU seconds each process kind spent meanwhile (the flow's parameters travel with
    every task, so the Dask client for the CPU snapshots is made here, not passed in)."""
    from distributed import Client

    from flows.scaleout import _dask_runner

    with _dask_runner(choice) as runner, Client(choice.address) as client:
        runner.submit(echo, {"value": -1}).result()  # the runner's client connected, workers warm
        before = cpu_snapshot(client)
        start = time.perf_counter()
        futures = [runner.submit(echo, {"value": i}) for i in range(n)]
        assert [f.result() for f in futures] == list(range(n))
        elapsed = time.perf_counter() - start
        after = cpu_snapshot(client)
    return elapsed, {k: after[k] - before[k] for k in after}


def plain_dask_tasks(client: Any, n: int) -> float:
    """Seconds for ``n`` ``identity`` calls through ``client.submit`` (Dask alone)."""
    client.submit(identity, -1, pure=False).result()
    start = time.perf_counter()
    futures = [client.submit(identity, i, pure=False) for i in range(n)]
    assert client.gather(futures) == list(range(n))
    return time.perf_counter() - start


# --------------------------------------------------------------------------- memory
def worker_rss() -> int:
    """This process's resident set size, bytes (run on every worker by ``client.run``)."""
    import psutil

    return psutil.Process().memory_info().rss


class WorkerMemory:
    """``with WorkerMemory(client, progress) as m: ...``: every ``interval_s`` the RSS of
    every worker (MiB) and ``progress()`` (shards done), in ``m.samples``."""

    def __init__(self, client: Any, progress: Callable[[], int], interval_s: float = 0.5) -> None:
        self.client, self.progress, self.interval_s = client, progress, interval_s
        self.samples: list[tuple[float, int, dict[str, float]]] = []

    def _run(self) -> None:
        start = time.perf_counter()
        while not self._stop.wait(self.interval_s):
            try:
                rss = self.client.run(worker_rss)
            except (OSError, TimeoutError):  # a worker restarting (CommClosedError); skip this sample
                continue
            self.samples.append((time.perf_counter() - start, self.progress(), {w: b / MIB for w, b in rss.items()}))

    def __enter__(self) -> "WorkerMemory":
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, done: int) -> dict[str, float] | None:
        """RSS per worker (MiB) of the first sample with at least ``done`` shards done."""
        return next((rss for _, d, rss in self.samples if d >= done), None)


def counting(write_shards: Callable, counter: list[int]) -> Callable:
    """A ``write_shards`` hook that counts the shard records it yields in ``counter[0]``."""

    def hook(maker, plans):
        for record in write_shards(maker, plans):
            counter[0] += 1
            yield record

    return hook


def counting_runs(run_many: Callable, counter: list[int]) -> Callable:
    """A ``run_many`` hook that puts the number of distinct runs it was given in ``counter[0]``."""

    def hook(shared, runs):
        counter[0] = len(runs)
        yield from run_many(shared, runs)

    return hook


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="images per class (3 classes) for the speed-up")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--shard-rows", type=int, default=500, help="shard rows for the speed-up")
    parser.add_argument("--repeats", type=int, default=2, help="warm runs per setting (median reported)")
    parser.add_argument("--retrain-steps", type=int, default=30)
    parser.add_argument("--tasks", type=int, default=200, help="trivial tasks for the overhead")
    parser.add_argument("--sweep-images", type=int, default=2048, help="images per shard_rows setting")
    parser.add_argument("--images", type=int, default=100_000, help="images of the scale run")
    parser.add_argument("--scale-shard-rows", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="a smoke run of about 3 minutes")
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.repeats, args.retrain_steps, args.tasks = 200, 1, 10, 50
        args.sweep_images, args.images, args.scale_shard_rows = 256, min(args.images, 6000), 1000

    from distributed import Client, LocalCluster
    from prefect.testing.utilities import prefect_test_harness

    from benchmarks.common import Target, print_machine, save_results, table
    from flows.scaleout import RunnerChoice, dask_runs, dask_shards

    load_start = os.getloadavg()[0]
    print_machine()
    figures: dict[str, Any] = {"load_avg_1m_start": round(load_start, 2)}
    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=120):
        cfg, paths = build_project(Path(tmp) / "proj", args)
        n_images = 3 * args.count

        # 1a. serial synthesis (first run warms this process's torch and generator)
        serial_cold, _ = timed_stage("synthesize", cfg, paths)
        serial_warm = statistics.median(timed_stage("synthesize", cfg, paths)[0] for _ in range(args.repeats))
        serial_digests = shard_digests(paths)
        t_img = serial_warm / n_images
        timed_stage("filter", cfg, paths)

        # 2a. retrain: in-process serial, then the stage's own pool of 2 spawned processes
        retrain_serial, summary = timed_stage("retrain", cfg, paths)
        reference = retrain_result(paths)
        retrain_pool, _ = timed_stage("retrain", cfg.model_copy(update={"threads": 2}), paths)
        pool_equal = retrain_result(paths) == reference

        with (
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
            Client(cluster) as client,
        ):
            choice = RunnerChoice(kind="dask", address=cluster.scheduler_address)
            shards = {"write_shards": dask_shards(choice)}

            # 1b. synthesis on the cluster: cold (fresh workers), then warm
            dask_cold, _ = timed_stage("synthesize", cfg, paths, shards)
            cold_equal = shard_digests(paths) == serial_digests
            warm = [timed_stage("synthesize", cfg, paths, shards) for _ in range(args.repeats)]
            dask_warm = statistics.median(t for t, _ in warm)
            assert all(s["resumed_shards"] == 0 for _, s in warm)
            dask_equal = cold_equal and shard_digests(paths) == serial_digests
            assert dask_equal, "shards made on Dask differ from the serial shards"

            # 2b. retrain on the cluster (first: workers load the shared inputs)
            run_count = [0]
            runs = {"run_many": counting_runs(dask_runs(choice), run_count)}
            retrain_dask_cold, _ = timed_stage("retrain", cfg, paths, runs)
            n_runs = run_count[0]
            retrain_dask, _ = timed_stage("retrain", cfg, paths, runs)
            retrain_equal = retrain_result(paths) == reference
            assert retrain_equal, "retrain.json from Dask differs from the serial one"

            # 3. per-task overhead, shard size for < 5%, measured shard_rows sweep
            prefect_s, prefect_cpu = prefect_tasks_on_dask(choice, args.tasks)
            dask_s = plain_dask_tasks(client, args.tasks)
            workers = len(client.scheduler_info()["workers"])
            # worker-seconds each task costs beyond its work: wall x workers / tasks
            overhead_s = prefect_s * workers / args.tasks
            min_rows = overhead_s * (1 - MAX_OVERHEAD) / (MAX_OVERHEAD * t_img)
            sweep = {}
            per_class = max(1, args.sweep_images // 3)
            for rows in SWEEP_SHARD_ROWS:
                swept = with_synthesis(cfg, count_per_class=per_class, shard_rows=rows)
                seconds, summary = timed_stage("synthesize", swept, paths, shards)
                sweep[rows] = {"shards": summary["shards"], "s": seconds, "img_per_s": 3 * per_class / seconds}

            # 4. the scale run, workers' memory sampled
            scale_per_class = -(-args.images // 3)
            scaled = with_synthesis(cfg, count_per_class=scale_per_class, shard_rows=args.scale_shard_rows)
            done = [0]
            hook = {"write_shards": counting(dask_shards(choice), done)}
            with WorkerMemory(client, lambda: done[0]) as memory:
                scale_s, scale_summary = timed_stage("synthesize", scaled, paths, hook)
            n_shards = scale_summary["shards"]
            rss_at = {f"{p}%": memory.at(max(1, round(n_shards * p / 100))) for p in (10, 50, 90)}

    load_end = os.getloadavg()[0]
    scale_images = 3 * scale_per_class
    print(f"# bench_scaleout: {args.size}x{args.size} tiny cGAN, 2 Dask worker processes x 1 thread, torch threads 1")
    print(f"load avg 1 min: {load_start:.2f} at start, {load_end:.2f} at end")
    print(f"\n1. synthesis, {n_images} images in {len(serial_digests)} shards of {args.shard_rows}")
    print(
        table(
            [
                ["serial (cold)", serial_cold, n_images / serial_cold],
                ["serial (warm)", serial_warm, n_images / serial_warm],
                ["dask 2 workers (cold)", dask_cold, n_images / dask_cold],
                ["dask 2 workers (warm)", dask_warm, n_images / dask_warm],
            ],
            ["setting", "s", "img/s"],
        )
    )
    synth_speedup = serial_warm / dask_warm
    print(f"speed-up warm: {synth_speedup:.2f}x, cold: {serial_warm / dask_cold:.2f}x; shards identical: {dask_equal}")

    print(f"\n2. retrain sweep ({n_runs} distinct runs, {args.retrain_steps} steps each)")
    print(
        table(
            [
                ["serial, in process (threads 1)", retrain_serial],
                ["stage's process pool (threads 2)", retrain_pool],
                ["dask 2 workers (cold)", retrain_dask_cold],
                ["dask 2 workers (warm)", retrain_dask],
            ],
            ["setting", "s"],
        )
    )
    retrain_speedup = retrain_serial / retrain_dask
    print(
        f"speed-up dask vs serial: {retrain_speedup:.2f}x, vs pool: {retrain_pool / retrain_dask:.2f}x; "
        f"results equal: dask {retrain_equal}, pool {pool_equal}"
    )

    print(f"\n3. per-task overhead ({args.tasks} trivial tasks at once, {workers} workers)")
    prefect_ms, dask_ms = 1000 * prefect_s / args.tasks, 1000 * dask_s / args.tasks
    print(f"Prefect task via DaskTaskRunner: {prefect_ms:.2f} ms/task wall ({1000 * overhead_s:.1f} worker-ms)")
    print(f"plain client.submit:             {dask_ms:.2f} ms/task wall; Prefect's share {1 - dask_s / prefect_s:.0%}")
    cpu_ms = {k: 1000 * v / args.tasks for k, v in prefect_cpu.items()}
    print("CPU per Prefect task (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in cpu_ms.items()))
    print(
        f"serial generation {1000 * t_img:.3f} ms/img -> shard rows for < {MAX_OVERHEAD:.0%} overhead: "
        f">= {min_rows:,.0f}"
    )
    print(
        table(
            [[r, v["shards"], v["s"], v["img_per_s"]] for r, v in sweep.items()], ["shard rows", "shards", "s", "img/s"]
        )
    )

    print(f"\n4. scale run: {scale_images} images, {n_shards} shards of {args.scale_shard_rows}")
    print(f"{scale_s:.1f} s, {scale_images / scale_s:,.0f} img/s; RSS per worker (MiB) by shards done:")
    addresses = sorted({w for rss in rss_at.values() if rss for w in rss})
    print(
        table(
            [[p, *(f"{rss[w]:.0f}" if rss and w in rss else "-" for w in addresses)] for p, rss in rss_at.items()],
            ["shards done", *(f"worker {i}" for i in range(workers))],
        )
    )
    rss_values = [v for rss in rss_at.values() if rss for v in rss.values()]
    growth = max(
        (rss_at["90%"][w] - rss_at["10%"][w] for w in rss_at["10%"] if rss_at["90%"] and w in rss_at["90%"]),
        default=float("nan"),
    )
    print(f"largest RSS growth of a worker from 10% to 90%: {growth:+.0f} MiB")

    figures.update(
        {
            "load_avg_1m_end": round(load_end, 2),
            "synthesis": {
                "images": n_images,
                "shards": len(serial_digests),
                "serial_cold_s": serial_cold,
                "serial_warm_s": serial_warm,
                "dask_cold_s": dask_cold,
                "dask_warm_s": dask_warm,
                "speedup_warm": synth_speedup,
                "identical": dask_equal,
            },
            "retrain": {
                "runs": n_runs,
                "steps": args.retrain_steps,
                "serial_s": retrain_serial,
                "process_pool_2_s": retrain_pool,
                "dask_cold_s": retrain_dask_cold,
                "dask_warm_s": retrain_dask,
                "speedup_vs_serial": retrain_speedup,
                "equal": retrain_equal,
                "pool_equal": pool_equal,
            },
            "overhead": {
                "tasks": args.tasks,
                "workers": workers,
                "prefect_on_dask_ms_per_task": prefect_ms,
                "plain_dask_ms_per_task": dask_ms,
                "prefect_cpu_ms_per_task": cpu_ms,
                "serial_ms_per_image": 1000 * t_img,
                "min_shard_rows_for_5pct": min_rows,
                "sweep": {str(r): v for r, v in sweep.items()},
            },
            "scale": {
                "images": scale_images,
                "shards": n_shards,
                "shard_rows": args.scale_shard_rows,
                "s": scale_s,
                "img_per_s": scale_images / scale_s,
                "rss_mib_per_worker": rss_at,
                "rss_growth_10_to_90_mib": growth,
                "samples": len(memory.samples),
                "rss_max_mib": max(rss_values, default=float("nan")),
            },
        }
    )
    targets = [
        Target("dask synthesis speed-up, 2 workers vs serial (warm)", synth_speedup, 1.5, unit="x"),
        Target("dask retrain sweep speed-up, 2 workers vs serial", retrain_speedup, 1.5, unit="x"),
        Target("worker RSS growth 10% -> 90% of the scale run", growth, 50, higher_is_better=False, unit=" MiB"),
    ]
    if not args.quick:
        save_results("bench_scaleout", figures, targets)
    else:
        for target in targets:
            print(target.line())
    return 0 if dask_equal and retrain_equal else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
