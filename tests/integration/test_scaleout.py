"""Scale-out through the real Prefect server on 127.0.0.1: ``synthmed run --shard-workers N``
makes each shard in its own Prefect task on a thread pool, ``--runner dask`` makes shards and
retrain runs on a local Dask cluster; both give the serial run's bytes."""

from __future__ import annotations

import shutil

import pytest

from generators.shards import read_manifest, verify_dataset
from tests.flows.project import without_timings
from tests.integration.helpers import cli, copy_project

pytestmark = pytest.mark.integration


def _task_states(prefect_client, root):
    """``{task run name: state name}`` of the one completed flow run of this project."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    config = str(root / "pipelines.yaml")
    runs = [r for r in prefect_client.read_flow_runs() if r.parameters.get("params", {}).get("config") == config]
    assert len(runs) == 1 and runs[0].state.is_completed()
    tasks = prefect_client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[runs[0].id])))
    return {t.name: t.state.name for t in tasks}


def test_parallel_shard_tasks_give_the_serial_bytes(tiny_repro, prefect_server, prefect_client, tmp_path):
    root = copy_project(tiny_repro, tmp_path / "proj")
    serial = read_manifest(root / "data" / "tiny" / "synthetic")
    assert len(serial["shards"]) >= 3
    shutil.rmtree(root / "data" / "tiny" / "synthetic")

    cli(["synthmed", "run", "--pipeline", "tiny", "--no-dvc", "--shard-workers", "3"], root, prefect_server.env())

    parallel = verify_dataset(root / "data" / "tiny" / "synthetic")
    assert parallel["shards"] == serial["shards"]  # same files, same sha256

    states = _task_states(prefect_client, root)
    shard_tasks = {name for name in states if name.startswith("synthesize-shard-")}
    assert shard_tasks == {f"synthesize-shard-{k}" for k in range(len(serial["shards"]))}
    assert {states[name] for name in shard_tasks} == {"Completed"}
    assert states["synthesize"] == "Completed"
    assert states["ingest"] in ("Completed", "Cached")  # unchanged inputs: skipped or cached


def test_the_dask_runner_gives_the_serial_outputs(tiny_repro, prefect_server, prefect_client, tmp_path):
    """``synthmed run --runner dask --dask-workers 2``: a local cluster of two worker
    processes makes the shards and the retrain runs, reporting to the same Prefect server."""
    import json

    root = copy_project(tiny_repro, tmp_path / "proj")
    serial_shards = read_manifest(root / "data" / "tiny" / "synthetic")["shards"]
    serial_retrain = json.loads((root / "metrics" / "tiny" / "retrain.json").read_text())
    shutil.rmtree(root / "data" / "tiny" / "synthetic")
    (root / "metrics" / "tiny" / "retrain.json").unlink()

    out = cli(
        ["synthmed", "run", "--pipeline", "tiny", "--no-dvc", "--runner", "dask", "--dask-workers", "2"],
        root,
        prefect_server.env(),
    )
    assert "runner: dask (a local cluster of 2 worker processes)" in out
    assert "Traceback" not in out

    assert verify_dataset(root / "data" / "tiny" / "synthetic")["shards"] == serial_shards
    retrain = json.loads((root / "metrics" / "tiny" / "retrain.json").read_text())
    assert without_timings(retrain) == without_timings(serial_retrain)

    states = _task_states(prefect_client, root)
    shards = {name for name in states if name.startswith("write-shard-")}
    assert shards == {f"write-shard-{k}" for k in range(len(serial_shards))}
    retrain_runs = {name for name in states if name.startswith("retrain-seed")}
    assert len(retrain_runs) >= 2 and {states[n] for n in shards | retrain_runs} == {"Completed"}
