"""The Prefect flow end to end on tiny data, under Prefect's test harness: every stage
runs, artifacts are published, outputs are versioned with the real DVC CLI, and an
unchanged rerun is served from the cache."""

from __future__ import annotations

import json

import pytest
import yaml

from flows.pipeline import AugmentParams, augment
from generators.shards import read_manifest
from tests.flows.project import make_project, run

pytestmark = pytest.mark.integration


def _task_states(flow_state) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id]))
        )
    return {r.name: r.state.name for r in runs}


def test_flow_runs_every_stage_then_caches_and_dvc_agrees(prefect_harness, tmp_path):
    config = make_project(tmp_path / "proj", dvc=True)
    root = config.parent
    params = AugmentParams(pipeline="tiny", config=str(config), dvc_commit=True)

    first = augment(params, return_state=True)
    assert first.is_completed(), first
    summaries = first.result()
    assert set(_task_states(first).values()) == {"Completed"}
    assert summaries["ingest"]["rows"] > 0
    for dataset in ("real", "synthetic", "filtered"):
        assert read_manifest(root / "data" / "tiny" / dataset)["rows"] > 0
    assert (root / "reports" / "tiny" / "report.md").is_file()
    retrain = json.loads((root / "metrics" / "tiny" / "retrain.json").read_text())
    assert retrain["verdict"] in ("helped", "no measurable effect", "hurt")

    # versioned: dvc.lock pins every output, and DVC itself sees nothing to redo
    versions = summaries["versions"]
    assert versions["versioned"] and "data/tiny/synthetic" in versions["outputs"]
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert {"ingest-tiny", "train-tiny", "synthesize-tiny", "filter-tiny", "retrain-tiny", "report-tiny"} <= set(
        lock["stages"]
    )
    assert "up to date" in run(["dvc", "status"], root).lower()

    # artifacts were published
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    assert {"tiny-metrics", "tiny-grids", "tiny-report", "tiny-versions"} <= keys

    # unchanged rerun: every stage is served from Prefect's cache; the preflight (seconds,
    # cache_policy=NO_CACHE in flows/pipeline.py) checks the data again on every run
    second = augment(params, return_state=True)
    assert second.is_completed()
    states = _task_states(second)
    assert states.pop("preflight") == "Completed"
    assert set(states) == {"ingest", "train", "synthesize", "filter", "retrain", "report"}
    assert set(states.values()) == {"Cached"}, states

    # a changed parameter reruns that stage and the ones after it only
    data = yaml.safe_load(config.read_text())
    data["pipelines"]["tiny"]["report"]["grid_per_class"] = 3
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    third = augment(AugmentParams(pipeline="tiny", config=str(config), dvc_commit=False), return_state=True)
    states = _task_states(third)
    assert states["report"] == "Completed"
    assert {states[v] for v in ("ingest", "train", "synthesize", "filter", "retrain")} == {"Cached"}
