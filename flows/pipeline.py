"""The Prefect flow: ingest -> train/select -> synthesize -> filter -> retrain -> report,
then commit the outputs to DVC. Thin on purpose: policy (retries, caching) sits in the
task options, logic in ``tasks``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from pydantic import BaseModel, Field

from flows.scaleout import RunnerChoice, dask_cluster, resolve_runner, stage_options
from generators.errors import QualityGateError, TransientError
from tasks.config import PipelineConfig, load_pipeline
from tasks.lock import pipeline_lock
from tasks.paths import PipelinePaths
from tasks.stages import ORDER, fingerprint, run_stage, up_to_date


class AugmentParams(BaseModel):
    """Typed flow parameters (rendered as a form in the Prefect UI)."""

    pipeline: str = Field("demo", description="name of a pipeline in pipelines.yaml")
    config: str = Field("pipelines.yaml", description="path of the pipelines file; outputs go next to it")
    dvc_commit: bool = Field(True, description="record the outputs in DVC (dvc commit) at the end")
    dvc_push: bool = Field(False, description="push the outputs to the DVC remote at the end")
    shard_workers: int = Field(
        1, ge=1, le=64, description="synthesis shards made in parallel (Prefect thread-pool tasks); 1 = serial"
    )
    runner: Literal["local", "threads", "dask"] | None = Field(
        None, description="where shards and retrain runs go (default: the pipeline's runner.kind)"
    )
    dask_address: str | None = Field(None, description="tcp://host:port of a running Dask scheduler")
    dask_workers: int | None = Field(
        None, ge=1, le=256, description="worker processes of the local Dask cluster (or threads for 'threads')"
    )


def _retry_only_transient(task_obj: Any, task_run: Any, state: Any) -> bool:
    """Retry network/storage hiccups only; bad data or config fail at once."""
    try:
        state.result()
    except TransientError:
        return True
    except Exception:  # noqa: BLE001 - anything else is not worth a retry
        return False
    return False


def _pipeline(pipeline: str, config: str | Path) -> tuple[PipelineConfig, PipelinePaths]:
    """The validated pipeline and its paths (outputs live next to the pipelines file)."""
    return load_pipeline(pipeline, config), PipelinePaths(Path(config).resolve().parent, pipeline)


def project_id(root: Path) -> str:
    """A short digest of the resolved project root: names the project in cache keys
    without putting its path (which may hold a name) into Prefect's database."""
    return hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]


def _stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Cache on the project and the stage fingerprint (its params, input content and code).
    Prefect's result storage is per user, shared by every project: the project id keeps
    one project from being served another's result (summaries hold output paths). The flow
    refreshes the entry whenever the outputs on disk no longer match (``_outputs_current``),
    so a cache hit never stands in for deleted or edited outputs."""
    verb, pipeline = parameters["verb"], parameters["pipeline"]
    cfg, paths = _pipeline(pipeline, parameters["config"])
    return f"synthmed-{project_id(paths.root)}-{pipeline}-{verb}-{fingerprint(verb, cfg, paths)}"


def _holding_pipeline_lock(fn: Any) -> Any:
    """Run the flow function under the pipeline's lock (``tasks/lock.py``): a second run of
    the same pipeline in the same project fails at once instead of sharing its files."""

    @functools.wraps(fn)
    def locked(params: AugmentParams = AugmentParams()) -> dict[str, Any]:
        with pipeline_lock(PipelinePaths(Path(params.config).resolve().parent, params.pipeline)):
            return fn(params)

    return locked


def _outputs_current(verb: str, pipeline: str, config: str) -> bool:
    return up_to_date(verb, *_pipeline(pipeline, config)) is not None


@task(
    task_run_name="{verb}",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=_retry_only_transient,
    cache_key_fn=_stage_cache_key,
    persist_result=True,
)
def stage(verb: str, pipeline: str, config: str, runner: RunnerChoice | None = None) -> dict[str, Any]:
    """Run one stage function (skipped when its outputs are current). ``runner`` says where
    synthesis shards and retrain runs go (flows/scaleout.py); never what they hold."""
    cfg, paths = _pipeline(pipeline, config)
    summary = run_stage(verb, cfg, paths, force=False, **stage_options(verb, runner))
    get_run_logger().info("%s: %s", verb, "up to date, skipped" if summary.get("skipped") else "done")
    return summary


@task(task_run_name="preflight", cache_policy=NO_CACHE)
def preflight_check(pipeline: str, config: str) -> dict[str, Any]:
    """Enough real images per class and split (tasks/preflight.py): seconds, before training."""
    from tasks.preflight import preflight

    return preflight(*_pipeline(pipeline, config))


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_only_transient, cache_policy=NO_CACHE)
def publish(pipeline: str, config: str) -> list[str]:
    """Copy reports and metrics to ``storage.results_uri`` (S3); returns the URIs written."""
    from tasks.storage import publish_results

    return publish_results(*_pipeline(pipeline, config))


def _png_markdown(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f"![{path.stem}](data:image/png;base64,{data})"


def publish_artifacts(pipeline: str, report: dict[str, Any], versions: dict[str, Any] | None) -> None:
    """Report table, image grids and data versions as Prefect artifacts."""
    key = pipeline.lower().replace("_", "-")
    if report.get("table"):
        create_table_artifact(key=f"{key}-metrics", table=report["table"], description="real-only vs augmented")
    images = [Path(p) for p in report.get("images", []) if Path(p).is_file()]
    if images:
        create_markdown_artifact(
            key=f"{key}-grids", markdown="\n\n".join(_png_markdown(p) for p in images), description="real vs synthetic"
        )
    if report.get("markdown"):
        create_markdown_artifact(key=f"{key}-report", markdown=report["markdown"], description="synthmed report")
    if versions:
        rows = [{"output": k, "md5": v} for k, v in sorted(versions.get("outputs", {}).items())]
        rows.append({"output": "git commit", "md5": versions.get("git_commit") or "(not in a git repo)"})
        create_table_artifact(key=f"{key}-versions", table=rows, description="DVC versions of this run's outputs")
    if versions and versions.get("dvc_lock"):
        create_markdown_artifact(
            key=f"{key}-dvc-lock",
            markdown=f"```yaml\n{versions['dvc_lock']}```",
            description="this run's dvc.lock entries: save as dvc.lock in a checkout of the git commit, then dvc pull",
        )


@flow(name="synthmed-augment", log_prints=False)
@_holding_pipeline_lock
def augment(params: AugmentParams = AugmentParams()) -> dict[str, Any]:
    """One augmentation run of a named pipeline; returns each stage's summary."""
    logger = get_run_logger()
    cfg = load_pipeline(params.pipeline, params.config)  # fail fast with a readable config error
    summaries: dict[str, Any] = {}
    # the filter's gate refused the synthetic set: retrain and report still run, so the report
    # shows what the rejected set would have done (and the power of that test) under a
    # REJECTED verdict that governs; then the run fails with the gate's message
    rejected: QualityGateError | None = None
    choice = resolve_runner(
        cfg.runner,
        kind=params.runner,
        workers=params.dask_workers,
        address=params.dask_address,
        shard_workers=params.shard_workers,
    )
    if choice.kind != "local":
        logger.info("runner: %s", choice.describe())
    with dask_cluster(choice, threads=cfg.threads) as choice:
        for verb in ORDER:
            if verb == "retrain" and rejected is not None:
                logger.warning("the quality gate rejected the synthetic set; retrain runs for the report only")
            current = _outputs_current(verb, params.pipeline, str(params.config))
            try:
                summaries[verb] = stage.with_options(refresh_cache=not current)(
                    verb, params.pipeline, str(params.config), choice
                )
            except QualityGateError as exc:  # outputs are written; the report still says REJECTED
                rejected, summaries[verb] = exc, {"rejected": str(exc)}
            if verb == "ingest":
                summaries["preflight"] = preflight_check(params.pipeline, str(params.config))
    versions = None
    if params.dvc_commit:  # a rejected run is versioned too: an experiment whose verdict is REJECTED
        from flows.versioning import commit_outputs

        config_path = Path(params.config).resolve()
        versions = commit_outputs(
            config_path.parent, params.pipeline, push=params.dvc_push and rejected is None, config=config_path
        )
        summaries["versions"] = versions
    if rejected is not None:  # never pushed or published; the run fails with the gate's message
        publish_artifacts(params.pipeline, summaries["report"], versions)
        recorded = "; recorded in dvc.lock with verdict REJECTED" if versions else ""
        raise QualityGateError(f"{rejected}; report: {summaries['report'].get('report')}{recorded}")
    if cfg.storage.results_uri:
        summaries["published"] = publish(params.pipeline, str(params.config))
        logger.info("results copied to %s/%s", cfg.storage.results_uri, params.pipeline)
    publish_artifacts(params.pipeline, summaries["report"], versions)
    logger.info("report: %s", summaries["report"].get("report"))
    return summaries
