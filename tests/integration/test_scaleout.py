"""Scale-out of synthesis: ``synthmed run --shard-workers N`` makes each shard in its own
Prefect task on a thread pool (real server on 127.0.0.1), and the shards are
byte-identical to the serial run's."""

from __future__ import annotations

import shutil

import pytest

from generators.shards import read_manifest, verify_dataset
from tests.integration.helpers import cli, copy_project

pytestmark = pytest.mark.integration


def test_parallel_shard_tasks_give_the_serial_bytes(tiny_repro, prefect_server, prefect_client, tmp_path):
    root = copy_project(tiny_repro, tmp_path / "proj")
    serial = read_manifest(root / "data" / "tiny" / "synthetic")
    assert len(serial["shards"]) >= 3
    shutil.rmtree(root / "data" / "tiny" / "synthetic")

    cli(["synthmed", "run", "--pipeline", "tiny", "--no-dvc", "--shard-workers", "3"], root, prefect_server.env())

    parallel = verify_dataset(root / "data" / "tiny" / "synthetic")
    assert parallel["shards"] == serial["shards"]  # same files, same sha256

    config = str(root / "pipelines.yaml")
    runs = [r for r in prefect_client.read_flow_runs() if r.parameters.get("params", {}).get("config") == config]
    assert len(runs) == 1 and runs[0].state.is_completed()
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    tasks = prefect_client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[runs[0].id])))
    states = {t.name: t.state.name for t in tasks}
    shard_tasks = {name for name in states if name.startswith("synthesize-shard-")}
    assert shard_tasks == {f"synthesize-shard-{k}" for k in range(len(serial["shards"]))}
    assert {states[name] for name in shard_tasks} == {"Completed"}
    assert states["synthesize"] == "Completed"
    assert states["ingest"] in ("Completed", "Cached")  # unchanged inputs: skipped or cached
