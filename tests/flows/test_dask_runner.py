"""The Dask runner (flows/scaleout.py) on a real ``distributed.LocalCluster`` of worker
processes, through prefect-dask's ``DaskTaskRunner`` and the session's Prefect API:
synthesis shards and retrain runs made on the workers are byte-identical to the local
loop's; a worker SIGKILLed mid-shard has its shard made again elsewhere with the same
bytes; a worker that cannot see the project's storage, or a GPU run without GPU workers,
fails with one line."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path
from typing import Any, Iterator

import pytest
from prefect import flow

from flows.scaleout import RunnerChoice, dask_runs, dask_shards
from generators.errors import ConfigError, DataError
from generators.shards import verify_dataset
from tasks.config import load_pipeline
from tasks.paths import PipelinePaths
from tasks.stages import run_stage
from tests.flows.project import make_project, without_timings


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as local:
        with Client(local) as client:
            yield local, client


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict[str, Any]:
    """The tiny project run locally end to end (the reference bytes)."""
    config = make_project(tmp_path_factory.mktemp("dask") / "proj")
    cfg, paths = load_pipeline("tiny", config), PipelinePaths(config.parent, "tiny")
    for verb in ("ingest", "train", "synthesize", "filter", "retrain"):
        run_stage(verb, cfg, paths)
    return {
        "cfg": cfg,
        "paths": paths,
        "shards": verify_dataset(paths.synthetic)["shards"],
        "retrain": without_timings(json.loads((paths.metrics / "retrain.json").read_text())),
    }


@flow(name="dask-stage")
def _stage_flow(verb: str, project: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    return run_stage(verb, project["cfg"], project["paths"], **options)


def _choice(cluster: Any, **update: Any) -> RunnerChoice:
    return RunnerChoice(kind="dask", address=cluster[0].scheduler_address, **update)


def test_shards_and_retrain_runs_on_dask_are_the_local_bytes(prefect_harness, project, cluster):
    from tasks.remote_shards import generator_loads

    choice = _choice(cluster)
    summary = _stage_flow("synthesize", project, {"write_shards": dask_shards(choice)})
    assert summary["shards"] == len(project["shards"]) >= 3
    assert verify_dataset(project["paths"].synthetic)["shards"] == project["shards"]  # same files, same sha256
    loads = cluster[1].run(generator_loads)
    assert 1 <= sum(loads.values()) <= len(loads)  # the generator loaded at most once per worker

    _stage_flow("retrain", project, {"run_many": dask_runs(choice)})
    retrain = json.loads((project["paths"].metrics / "retrain.json").read_text())
    assert without_timings(retrain) == project["retrain"]
    assert not list((project["paths"].state / "shared").glob("*.pkl"))  # the shared inputs are removed


@dataclasses.dataclass(frozen=True)
class KillOnce:
    """Wraps a shard maker: the first call for shard ``index`` leaves a half-written temp
    file in the staging dir, then SIGKILLs its own worker process."""

    maker: Any
    index: int
    marker: str

    def __call__(self, plan: Any) -> dict[str, Any]:
        if plan.index == self.index and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            staging = Path(self.maker.staging)
            (staging / f".part-{plan.index:05d}.parquet.{os.getpid()}.tmp").write_bytes(b"PAR1 half a shard")
            os.kill(os.getpid(), signal.SIGKILL)
        return self.maker(plan)


def test_a_worker_killed_mid_shard_gives_the_same_dataset(prefect_harness, project, cluster, tmp_path):
    marker = tmp_path / "killed"
    hook = dask_shards(_choice(cluster))

    def killing(maker, plans):
        return hook(KillOnce(maker, 1, str(marker)), plans)

    _stage_flow("synthesize", project, {"write_shards": killing})
    assert marker.is_file()  # a worker was killed
    killed_pid = int(marker.read_text())
    assert killed_pid not in cluster[1].run(os.getpid).values()
    assert verify_dataset(project["paths"].synthetic)["shards"] == project["shards"]
    leftovers = [p.name for p in project["paths"].synthetic.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


@dataclasses.dataclass(frozen=True)
class ElsewhereStorage:
    """A shard maker as a worker on another machine without the shared mount sees it."""

    maker: Any

    def __call__(self, plan: Any) -> dict[str, Any]:
        return dataclasses.replace(self.maker, staging="/mnt/not-mounted-here" + self.maker.staging)(plan)


def test_a_worker_that_cannot_see_the_storage_fails_with_one_line(prefect_harness, project, cluster):
    hook = dask_shards(_choice(cluster))
    before = verify_dataset(project["paths"].synthetic)["shards"]
    with pytest.raises(DataError) as caught:
        _stage_flow("synthesize", project, {"write_shards": lambda maker, plans: hook(ElsewhereStorage(maker), plans)})
    message = str(caught.value)
    assert "\n" not in message and "cannot see the project's storage" in message
    assert "/mnt/not-mounted-here" in message and "shared filesystem" in message
    assert verify_dataset(project["paths"].synthetic)["shards"] == before  # the previous dataset is intact


def test_gpu_tasks_without_gpu_workers_fail_at_once(prefect_harness, project, cluster):
    with pytest.raises(ConfigError, match="no worker of the Dask cluster .* offers the resource GPU"):
        _stage_flow("synthesize", project, {"write_shards": dask_shards(_choice(cluster, gpus_per_worker=1))})


def test_retrain_inputs_a_worker_cannot_see_are_a_one_line_error(tmp_path):
    from tasks.retrain_runs import Run, SharedInputs, run_on_shared_inputs

    missing = SharedInputs(str(tmp_path / "elsewhere" / "retrain-inputs-0.pkl"), "0" * 64)
    with pytest.raises(DataError, match=r"cannot see the project's storage: .*retrain-inputs-0\.pkl does not exist"):
        run_on_shared_inputs(missing, Run((0,), (), 0, 1))
    changed = tmp_path / "retrain-inputs-1.pkl"
    changed.write_bytes(b"not the pickle that was announced")
    with pytest.raises(DataError, match="changed while the stage ran"):
        run_on_shared_inputs(SharedInputs(str(changed), "0" * 64), Run((0,), (), 0, 1))
