"""Prefect overhead: a flow mapping 100 shard tasks against the same work in a plain loop.

Two kinds of work per task: ``tiny`` (a few microseconds: the overhead alone) and
``realistic`` (one synthetic shard: ``tasks.synthesize.generate_shard`` with the demo cGAN
at 64x64, run by the project's own ``flows.scaleout.synthesize_shard`` task). The flow
uses a one-worker ``ThreadPoolTaskRunner``, so it does the same work in the same order as
the loop and the difference is Prefect's: task-run records, state changes, API calls to
the (temporary, local) Prefect server. Server start-up is measured apart and excluded.

Target: overhead < 10 % of the flow's time for realistic work.

    python -m benchmarks.bench_orchestration                 # 100 tasks, 16 images per shard
    python -m benchmarks.bench_orchestration --tasks 300 --shard-images 64
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from benchmarks.common import Target, Timer, build_generator, print_machine, save_results, table  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--shard-images", type=int, default=16, help="images per realistic shard task")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats per variant (the best counts)")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class TinyItem:
    """A stand-in for a ShardPlan (the shard task names its runs by ``plan.index``)."""

    index: int


def tiny_work(item: TinyItem) -> int:
    return sum(range(item.index % 7 + 100))


def run_flow(work: Callable[[Any], Any], items: Sequence[Any], workers: int = 1) -> list[Any]:
    """A Prefect flow that maps ``flows.scaleout.synthesize_shard`` (the project's shard
    task: ``make(plan)``) over ``items`` on a ThreadPoolTaskRunner; returns the results in order."""
    from prefect import flow, unmapped
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.scaleout import synthesize_shard

    @flow(name="bench-map-shards", task_runner=ThreadPoolTaskRunner(max_workers=workers), persist_result=False)
    def map_shards() -> list[Any]:
        futures = synthesize_shard.map(make=unmapped(work), plan=list(items))
        return [f.result() for f in futures]

    return map_shards()


def best_of(repeats: int, fn: Callable[[], Any]) -> float:
    times = []
    for _ in range(repeats):
        with Timer() as t:
            fn()
        times.append(t.s)
    return min(times)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch
    from prefect.testing.utilities import prefect_test_harness

    from generators.registry import load_generator
    from tasks.synthesize import generate_shard, plan_shards

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print_machine()
    print(f"bench_orchestration: {args.tasks} mapped tasks, realistic = {args.shard_images} cGAN images per shard")
    with tempfile.TemporaryDirectory(prefix="bench-orch-") as tmp_name:
        card = build_generator("cgan", args.size, Path(tmp_name) / "card")
        generator = load_generator(card, "cpu")
        counts = {"inferior": args.tasks * args.shard_images}
        plans = plan_shards(counts, args.shard_images, seed=1)[: args.tasks]
        realistic = partial(generate_shard, generator, batch_size=args.shard_images, dtype="uint8")
        tiny_items = [TinyItem(i) for i in range(args.tasks)]

        with Timer() as t_start:
            harness = prefect_test_harness(server_startup_timeout=120)
            harness.__enter__()
        try:
            run_flow(tiny_work, tiny_items[:2])  # warm-up: first flow run, imports, API client
            rows = []
            figures: dict[str, Any] = {"server_startup_s": t_start.s, "args": vars(args)}
            for name, work, items in (("tiny", tiny_work, tiny_items), ("realistic", realistic, plans)):
                loop_s = best_of(args.repeats, lambda w=work, i=items: [w(x) for x in i])
                flow_s = best_of(args.repeats, lambda w=work, i=items: run_flow(w, i, 1))
                flow2_s = best_of(1, lambda w=work, i=items: run_flow(w, i, 2))
                overhead = max(flow_s - loop_s, 0.0)
                rows.append([name, loop_s, flow_s, overhead / flow_s * 100, overhead / args.tasks * 1000, flow2_s])
                figures[name] = {
                    "loop_s": loop_s,
                    "flow_1_worker_s": flow_s,
                    "flow_2_workers_s": flow2_s,
                    "overhead_fraction": overhead / flow_s,
                    "overhead_ms_per_task": overhead / args.tasks * 1000,
                }
        finally:
            harness.__exit__(None, None, None)
    print(f"\nPrefect test server start-up (excluded): {t_start.s:.1f} s")
    print(
        table(
            rows,
            ["work", "plain loop s", "flow (1 worker) s", "overhead %", "overhead ms/task", "flow (2 workers) s"],
        )
    )
    targets = [
        Target(
            "Prefect overhead, realistic shard work (%)", figures["realistic"]["overhead_fraction"] * 100, 10, False
        ),
    ]
    print(f"(tiny work: {figures['tiny']['overhead_fraction'] * 100:.0f} % overhead; there is no target for it)")
    save_results("bench_orchestration", figures, targets)
    return figures


if __name__ == "__main__":
    main()
