"""Deployments of the ``synthmed-augment`` flow: a cron schedule and typed parameters,
defined in code (here) or declaratively (``infra/prefect.yaml``, for work pools).

    synthmed serve --pipeline demo --cron "0 2 * * *"      # this machine runs the schedule
    prefect deploy --prefect-file infra/prefect.yaml --all # a work pool runs it (infra/README.md)

``serve`` registers the deployment with the Prefect API (``PREFECT_API_URL``) and then
polls for its scheduled and manually triggered runs, executing each in a subprocess,
until stopped. Each run ends by committing its outputs to DVC (and pushing them when
``--push``), so every scheduled run is a version that ``dvc pull`` can restore.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from flows.pipeline import AugmentParams, augment
from generators.errors import ConfigError
from tasks.config import load_pipeline

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

DEFAULT_CRON = "0 2 * * *"  # nightly at 02:00
DEFAULT_TIMEZONE = "UTC"


def deployment_name(pipeline: str) -> str:
    return f"{pipeline}-nightly"


def schedule(cron: str, timezone: str = DEFAULT_TIMEZONE):
    """A Prefect cron schedule; a bad cron string or time zone is a one-line ConfigError."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.schedules import Cron

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise ConfigError(
            f"--cron {cron!r} / --timezone {timezone!r}: {reason}; expected 5 cron fields "
            "(minute hour day month weekday, e.g. '0 2 * * *') and an IANA zone (e.g. 'Europe/Berlin')"
        ) from None
    return Cron(cron, timezone=timezone)


def build_deployment(
    pipeline: str = "demo",
    config: str | Path = "pipelines.yaml",
    *,
    cron: str = DEFAULT_CRON,
    timezone: str = DEFAULT_TIMEZONE,
    name: str | None = None,
    push: bool = False,
    shard_workers: int = 1,
    paused: bool = False,
    runner: str | None = None,
    dask_address: str | None = None,
    dask_workers: int | None = None,
) -> "RunnerDeployment":
    """The flow as a deployment: default parameters (the form in the UI) for ``pipeline``,
    a cron schedule, at most one run at a time (a late run waits rather than racing the
    previous one for the same outputs). ``config`` is stored as an absolute path: outputs
    go next to it on the machine that executes the run."""
    from prefect.deployments.runner import EntrypointType

    config_path = Path(config).resolve()
    cfg = load_pipeline(pipeline, config_path)  # a readable error now, not at 2 a.m.
    from flows.scaleout import resolve_runner

    resolve_runner(cfg.runner, kind=runner, workers=dask_workers, address=dask_address, shard_workers=shard_workers)
    params = AugmentParams(
        pipeline=pipeline,
        config=str(config_path),
        dvc_commit=True,
        dvc_push=push,
        shard_workers=shard_workers,
        runner=runner,
        dask_address=dask_address,
        dask_workers=dask_workers,
    )
    return augment.to_deployment(
        name=name or deployment_name(pipeline),
        schedules=[schedule(cron, timezone)],
        paused=paused,
        parameters={"params": params.model_dump(mode="json")},
        description=f"synthmed pipeline '{pipeline}' from {config_path.name}: augment, then version with DVC",
        tags=["synthmed", pipeline],
        concurrency_limit=1,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def serve_deployments(*deployments: "RunnerDeployment", limit: int | None = None) -> None:
    """Register the deployments and execute their runs here until interrupted."""
    from prefect import serve

    serve(*deployments, limit=limit, print_starting_message=True)
