"""Choosing the runner: the pipeline's ``runner:`` block, overridden by ``synthmed run``'s
flags; bad choices are one-line errors before anything starts. The runner never changes
a stage's DVC params (it says where work runs, not what it makes)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flows.scaleout import resolve_runner, stage_options
from generators.errors import ConfigError
from tasks.config import RunnerSpec
from tasks.stages import STAGES


def test_the_pipeline_default_is_local_and_flags_override_it():
    assert resolve_runner(RunnerSpec()).kind == "local"
    assert resolve_runner(RunnerSpec(), shard_workers=3).model_dump() == {
        "kind": "threads",
        "workers": 3,
        "address": None,
        "gpus_per_worker": 0,
    }
    spec = RunnerSpec(kind="dask", workers=4, gpus_per_worker=1)
    assert resolve_runner(spec).model_dump() == {"kind": "dask", "workers": 4, "address": None, "gpus_per_worker": 1}
    assert resolve_runner(spec, kind="local").kind == "local"
    assert resolve_runner(RunnerSpec(), kind="dask", workers=3).workers == 3
    chosen = resolve_runner(RunnerSpec(), address="tcp://10.0.0.5:8786")
    assert (chosen.kind, chosen.address) == ("dask", "tcp://10.0.0.5:8786")  # an address implies dask


def test_bad_runner_choices_are_one_line_errors():
    with pytest.raises(ConfigError, match="--dask-address needs --runner dask"):
        resolve_runner(RunnerSpec(), kind="threads", address="tcp://h:8786")
    with pytest.raises(ConfigError, match="--dask-address: expected a Dask scheduler address like tcp://host:8786"):
        resolve_runner(RunnerSpec(), address="h:8786")
    with pytest.raises(ValidationError, match="expected a Dask scheduler address like tcp://host:8786"):
        RunnerSpec(address="h:8786")
    with pytest.raises(ValidationError, match="kind"):
        RunnerSpec(kind="ray")


def test_hooks_follow_the_runner():
    threads = resolve_runner(RunnerSpec(), kind="threads", workers=2)
    dask = resolve_runner(RunnerSpec(), address="tcp://127.0.0.1:8786")
    assert set(stage_options("synthesize", threads)) == {"map_shards"}
    assert stage_options("retrain", threads) == {}
    assert set(stage_options("synthesize", dask)) == {"write_shards"}
    assert set(stage_options("retrain", dask)) == {"run_many"}
    assert stage_options("filter", dask) == {} and stage_options("synthesize", None) == {}


def test_no_stage_reads_the_runner():
    assert all("runner" not in stage.params for stage in STAGES.values())


def test_a_local_gpu_cluster_needs_as_many_visible_gpus_as_workers(monkeypatch):
    from flows.scaleout import dask_cluster

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    choice = resolve_runner(RunnerSpec(kind="dask", workers=2, gpus_per_worker=1))
    with pytest.raises(ConfigError, match="needs 2 GPU.*1 are visible here; use --dask-workers 1"):
        with dask_cluster(choice):
            pass


def test_a_scheduler_that_does_not_answer_is_a_one_line_error():
    import socket

    from flows.scaleout import check_cluster

    with socket.socket() as probe:  # a free port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    choice = resolve_runner(RunnerSpec(), address=f"tcp://127.0.0.1:{port}")
    with pytest.raises(
        ConfigError, match=rf"cannot reach the Dask scheduler tcp://127.0.0.1:{port} .*expected a running"
    ):
        check_cluster(choice)


def test_a_remote_scheduler_with_a_loopback_prefect_api_is_refused_before_connecting():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.scaleout import check_cluster

    choice = resolve_runner(RunnerSpec(), address="tcp://sched.example.invalid:8786")
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        with pytest.raises(ConfigError, match="on another host, but the Prefect API is http://127.0.0.1:4200/api"):
            check_cluster(choice)


def test_an_oversubscribed_local_cluster_is_warned_about():
    from flows.scaleout import oversubscription

    assert oversubscription(2, 1, 2) is None and oversubscription(4, 2, 8) is None
    assert "2 local Dask workers x 2 torch threads" in oversubscription(2, 2, 2)
    assert "> 2 cores: synthesis will be oversubscribed" in oversubscription(2, 2, 2)
