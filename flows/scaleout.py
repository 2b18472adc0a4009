"""Scale-out of synthesis: one Prefect task per shard, run on a ThreadPoolTaskRunner.

The stage function stays the source of truth (``tasks.synthesize.synthesize`` plans the
shards, makes each with ``generate_shard`` and writes them in order); this module only
supplies its ``map_shards`` hook, so the shards' bytes are the same whether they are made
one after another or in parallel (each shard has its own seed).

Threads, not processes: the generator is loaded once and shared, and torch releases the
GIL inside its kernels. On one machine the gain is bounded by the cores left over from
torch's own intra-op threads (``threads`` in pipelines.yaml); across machines, use a
work pool (infra/README.md) and run pipelines or shards as separate flow runs.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.synthesize import ShardMap, ShardPlan


@task(task_run_name="synthesize-shard-{plan.index}", cache_policy=NO_CACHE, persist_result=False)
def synthesize_shard(make: Callable[[ShardPlan], pa.Table], plan: ShardPlan) -> pa.Table:
    """Make one shard: a table of ``len(plan.ids)`` rows (see ``generators.shards``)."""
    return make(plan)


def thread_pool_shards(workers: int) -> ShardMap:
    """A ``map_shards`` hook that submits every shard as a ``synthesize_shard`` task to a
    ``ThreadPoolTaskRunner(max_workers=workers)`` and yields the tables in plan order."""

    def map_shards(make: Callable[[ShardPlan], pa.Table], plans: Sequence[ShardPlan]) -> Iterator[pa.Table]:
        with ThreadPoolTaskRunner(max_workers=workers) as runner:
            futures = [runner.submit(synthesize_shard, {"make": make, "plan": plan}) for plan in plans]
            for future in futures:
                yield future.result()

    return map_shards
