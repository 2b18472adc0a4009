"""Where a run makes its synthesis shards and downstream retrain runs: the task runner.

The stage functions stay the source of truth (``tasks.synthesize.synthesize`` plans the
shards, ``tasks.retrain.retrain`` plans the runs); this module only supplies their hooks,
so the outputs are byte-identical whichever runner made them:

- ``local``: the stages' own loops (retrain runs on ``threads`` spawned processes).
- ``threads``: one Prefect task per shard on a ``ThreadPoolTaskRunner``; the generator is
  loaded once and shared, torch releases the GIL inside its kernels.
- ``dask``: one Prefect task per shard and per retrain run on a Dask cluster through
  prefect-dask's ``DaskTaskRunner``: a running scheduler (``address``) or a local cluster
  of worker processes started for the run. Each worker loads the generator (and the
  retrain inputs) once; each shard is written into the project's storage by the worker
  that made it. A worker that dies mid-task has its task run again on another worker.
  Workers need the project directory at the same path (a shared filesystem) and, for a
  scheduler elsewhere, a Prefect API they can reach (``PREFECT_API_URL``); see
  docs/scaleout.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable, Iterator, Literal, Sequence
from urllib.parse import urlparse

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from generators.errors import ConfigError, SynthmedError
from tasks.config import DASK_ADDRESS, RunnerSpec
from tasks.retrain_runs import Run, RunResult, SharedInputs, run_on_shared_inputs
from tasks.synthesize import ShardMap, ShardPlan, ShardWrites

log = logging.getLogger(__name__)
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
CONNECT_TIMEOUT = "10s"  # to the scheduler of --dask-address


class RunnerChoice(BaseModel):
    """The runner of one run: the pipeline's ``runner:`` with the command line's overrides.
    ``address`` is filled in once a local cluster is up, so every stage uses that one."""

    kind: Literal["local", "threads", "dask"] = "local"
    workers: int = Field(2, ge=1, le=256)
    address: str | None = None
    gpus_per_worker: Literal[0, 1] = 0

    def describe(self) -> str:
        if self.kind == "threads":
            return f"threads ({self.workers} for synthesis shards)"
        if self.kind == "dask":
            where = self.address or f"a local cluster of {self.workers} worker processes"
            return f"dask ({where}{', one GPU per task' if self.gpus_per_worker else ''})"
        return "local"


def resolve_runner(
    spec: RunnerSpec,
    *,
    kind: str | None = None,
    workers: int | None = None,
    address: str | None = None,
    shard_workers: int = 1,
) -> RunnerChoice:
    """The pipeline's ``runner:`` overridden by the command line: ``--runner``,
    ``--dask-workers``/``--shard-workers``, ``--dask-address`` (which implies dask).
    ``--shard-workers N > 1`` alone keeps its old meaning: threads."""
    if address is not None:
        if kind not in (None, "dask"):
            raise ConfigError(f"--dask-address needs --runner dask (got --runner {kind}); drop one of them")
        if not DASK_ADDRESS.fullmatch(address):  # the same check as in pipelines.yaml
            raise ConfigError(
                f"--dask-address: expected a Dask scheduler address like tcp://host:8786, got {address!r}"
            )
        kind = "dask"
    if kind is None:
        kind = "threads" if shard_workers > 1 and spec.kind == "local" else spec.kind
    if workers is None:
        workers = shard_workers if kind == "threads" and shard_workers > 1 else spec.workers
    if kind == "dask" and address is None:
        address = spec.address
    return RunnerChoice(kind=kind, workers=workers, address=address, gpus_per_worker=spec.gpus_per_worker)


# --------------------------------------------------------------------------- threads
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


# --------------------------------------------------------------------------- dask
@task(task_run_name="write-shard-{plan.index}", cache_policy=NO_CACHE, persist_result=False)
def write_shard(maker: Callable[[ShardPlan], dict[str, Any]], plan: ShardPlan) -> dict[str, Any]:
    """Make shard ``plan.index`` and write it into the project's storage (on a Dask
    worker); returns its record: file, rows, sha256, class counts."""
    return maker(plan)


@task(task_run_name="retrain-{label}", cache_policy=NO_CACHE, persist_result=False)
def retrain_run(shared: SharedInputs, run: Run, label: str) -> RunResult:
    """Train and test one downstream network (on a Dask worker); ``label`` names the task
    run (seed, real and synthetic rows, steps)."""
    return run_on_shared_inputs(shared, run)


def run_label(run: Run) -> str:
    return f"seed{run.seed}-real{len(run.real)}-syn{len(run.synthetic)}-{run.steps}steps"


def _api_url_for_workers() -> str | None:
    """The Prefect API the workers report task runs to: ``PREFECT_API_URL``, else this
    process's temporary server (flows/ephemeral.py). Without it every worker process
    would start a temporary server of its own and the runs would not show in this one."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return str(PREFECT_API_URL.value())
    server = SubprocessASGIServer._instances.get(None)
    return None if server is None or not getattr(server, "running", True) else server.api_url


@contextlib.contextmanager
def _worker_settings(address: str) -> Iterator[None]:
    """Prefect settings for the tasks sent to the cluster at ``address`` (they travel
    with each task): the API URL of this run; a scheduler on another host must be able
    to reach it, so a loopback URL with a remote scheduler is an error."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = _api_url_for_workers()
    scheduler_host = urlparse(address).hostname or ""
    if url and scheduler_host not in LOCAL_HOSTS and (urlparse(url).hostname or "") in LOCAL_HOSTS:
        raise ConfigError(
            f"the Dask scheduler {address} is on another host, but the Prefect API is {url}, which its workers "
            "cannot reach; start a Prefect server they can reach and set PREFECT_API_URL (docs/scaleout.md)"
        )
    if url is None:
        yield
        return
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield


def _annotations(choice: RunnerChoice) -> contextlib.AbstractContextManager[Any]:
    import dask

    return dask.annotate(resources={"GPU": 1}) if choice.gpus_per_worker else contextlib.nullcontext()


def _check_gpu_workers(client: Any, address: str) -> None:
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    if not any(w.get("resources", {}).get("GPU", 0) >= 1 for w in workers):
        raise ConfigError(
            f"runner.gpus_per_worker is 1, but no worker of the Dask cluster {address} offers the resource GPU; "
            "start one worker per GPU with `dask worker ... --resources GPU=1` (docs/scaleout.md)"
        )


@contextlib.contextmanager
def _dask_runner(choice: RunnerChoice) -> Iterator[Any]:
    """A started ``DaskTaskRunner`` on ``choice.address``; a task whose workers kept dying
    (Dask's ``allowed-failures``) ends the stage with one line."""
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    from distributed import KilledWorker
    from prefect_dask import DaskTaskRunner

    if choice.address is None:
        raise ValueError("the dask runner needs a cluster address; start one with dask_cluster()")
    with _worker_settings(choice.address), DaskTaskRunner(address=choice.address) as runner:
        _connect(runner, choice)
        try:
            yield runner
        except KilledWorker as exc:
            raise SynthmedError(
                f"Dask gave up on a task after its workers died: {' '.join(str(exc).split())[:300]}; expected the "
                "workers to stay up: check their memory limit and logs, or raise "
                "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES (docs/scaleout.md)"
            ) from exc


def _connect(runner: Any, choice: RunnerChoice) -> None:
    """Connect the runner's client now, with a one-line error for a scheduler that cannot
    be reached, and check the GPU workers a GPU run needs."""
    import dask

    try:
        with dask.config.set({"distributed.comm.timeouts.connect": CONNECT_TIMEOUT}):
            client = runner.client
    except OSError as exc:
        raise ConfigError(
            f"cannot reach the Dask scheduler {choice.address} ({' '.join(str(exc).split())[:160]}); expected a "
            "running `dask scheduler` at that address: check the address, the port and the firewall"
        ) from exc
    if choice.gpus_per_worker:
        _check_gpu_workers(client, str(choice.address))


def check_cluster(choice: RunnerChoice) -> None:
    """Before any stage runs: the scheduler of ``choice`` answers, offers GPU workers if
    the run needs them, and its workers can reach the Prefect API (one-line errors)."""
    if choice.kind != "dask" or choice.address is None:
        return
    with _dask_runner(choice):
        pass


def dask_shards(choice: RunnerChoice) -> ShardWrites:
    """A ``write_shards`` hook: every shard a ``write_shard`` task on the cluster, its
    records yielded in plan order."""

    def write_shards(maker: Callable[[ShardPlan], dict[str, Any]], plans: Sequence[ShardPlan]) -> Iterator[dict]:
        with _dask_runner(choice) as runner:
            with _annotations(choice):
                futures = [runner.submit(write_shard, {"maker": maker, "plan": plan}) for plan in plans]
            for future in futures:
                yield future.result()

    return write_shards


def dask_runs(choice: RunnerChoice) -> Callable[[SharedInputs, Sequence[Run]], Iterator[tuple[Run, RunResult]]]:
    """A ``run_many`` hook for retrain: every run a ``retrain_run`` task on the cluster."""

    def run_many(shared: SharedInputs, runs: Sequence[Run]) -> Iterator[tuple[Run, RunResult]]:
        with _dask_runner(choice) as runner:
            with _annotations(choice):
                futures = [
                    (run, runner.submit(retrain_run, {"shared": shared, "run": run, "label": run_label(run)}))
                    for run in runs
                ]
            for run, future in futures:
                yield run, future.result()

    return run_many


def stage_options(verb: str, choice: RunnerChoice | None) -> dict[str, Any]:
    """The hooks ``run_stage`` passes to stage ``verb`` under ``choice``."""
    if choice is None or choice.kind == "local":
        return {}
    if choice.kind == "threads":
        return {"map_shards": thread_pool_shards(choice.workers)} if verb == "synthesize" else {}
    if verb == "synthesize":
        return {"write_shards": dask_shards(choice)}
    if verb == "retrain":
        return {"run_many": dask_runs(choice)}
    return {}


def oversubscription(workers: int, threads: int, cores: int) -> str | None:
    """A warning when ``workers`` local processes of ``threads`` torch threads each need
    more than ``cores`` cores, else None."""
    if workers * threads <= cores:
        return None
    return (
        f"{workers} local Dask workers x {threads} torch threads (the pipeline's threads, fixed for byte-identical "
        f"shards) > {cores} cores: synthesis will be oversubscribed and may be slower than serial; retrain runs "
        "use 1 thread each (docs/scaleout.md)"
    )


@contextlib.contextmanager
def dask_cluster(choice: RunnerChoice, threads: int = 1) -> Iterator[RunnerChoice]:
    """``choice`` with a scheduler address: the given one, or a local cluster of
    ``choice.workers`` processes started here and closed on exit (a warning when they
    would run more torch threads, ``threads`` each during synthesis, than this machine
    has cores). Other runners pass through."""
    if choice.kind != "dask" or choice.address is not None:
        check_cluster(choice)
        yield choice
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    warning = None if choice.gpus_per_worker else oversubscription(choice.workers, threads, cores)
    if warning:
        log.warning(warning)
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # before distributed is imported; workers inherit it
    from distributed import LocalCluster, SpecCluster

    if choice.gpus_per_worker:
        cluster_cm: Any = _gpu_cluster(choice.workers)
    else:
        # one Dask thread per worker process; torch's threads are the pipeline's ``threads``
        cluster_cm = LocalCluster(
            n_workers=choice.workers, threads_per_worker=1, processes=True, dashboard_address=":0"
        )
    with cluster_cm as cluster:
        assert isinstance(cluster, SpecCluster)
        log.info("Dask: a local cluster of %d worker processes at %s", choice.workers, cluster.scheduler_address)
        yield choice.model_copy(update={"address": cluster.scheduler_address})


def _gpu_cluster(workers: int) -> Any:
    """One worker process per GPU of this machine (as dask-cuda does): worker ``i`` runs
    with ``CUDA_VISIBLE_DEVICES=i`` and offers the resource GPU=1."""
    import torch
    from distributed import Nanny, Scheduler, SpecCluster

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = [d for d in visible.split(",") if d.strip()] if visible else []
    if not visible:
        devices = [str(i) for i in range(torch.cuda.device_count())]
    if len(devices) < workers:
        raise ConfigError(
            f"runner.gpus_per_worker 1 with {workers} local Dask workers needs {workers} GPU(s), but "
            f"{len(devices)} are visible here; use --dask-workers {max(1, len(devices))} or gpus_per_worker: 0"
        )
    specs = {
        i: {
            "cls": Nanny,
            "options": {"nthreads": 1, "resources": {"GPU": 1}, "env": {"CUDA_VISIBLE_DEVICES": devices[i]}},
        }
        for i in range(workers)
    }
    return SpecCluster(workers=specs, scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}})
