"""Scheduled deployments against a real Prefect server on 127.0.0.1:

- in code: ``synthmed serve`` (flows/deploy.py) registers a cron-scheduled deployment
  with typed parameters; a run triggered through the API is executed by ``serve``,
  completes, writes the outputs, commits them to DVC and pushes them to an S3 remote,
  copies the results to S3, and publishes the report table, image grids and data
  versions as artifacts, from which the run's data is then restored in a fresh clone;
- declaratively: ``prefect deploy --prefect-file infra/prefect.yaml`` registers both
  work-pool deployments with their schedules, parameters and pull steps.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from generators.shards import verify_dataset
from tests.flows.project import env as base_env
from tests.flows.project import make_project
from tests.integration.helpers import FAST, cli, stop_process, wait_for

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
NAME = "synthmed-augment/tiny-nightly"


def _deployment(client, name: str):
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_deployment_by_name(name)
    except ObjectNotFound:
        return None


def _sha256_tree(path: Path) -> dict[str, str]:
    return {
        p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in path.rglob("*")
        if p.is_file()
    }


def _artifacts(client, flow_run_id) -> dict[str, object]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    found = client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    )
    return {a.key: a for a in found}


def test_served_deployment_runs_and_versions_its_outputs(prefect_server, prefect_client, s3, tmp_path):
    from prefect.deployments import run_deployment

    overrides = {**FAST, "storage": {"results_uri": f"s3://{s3.bucket}/results"}}
    config = make_project(tmp_path / "proj", dvc=True, overrides=overrides)
    root = config.parent
    cli(["synthmed", "remote", "s3", f"s3://{s3.bucket}/dvcstore"], root)  # endpoint from the environment
    cli(["git", "commit", "-q", "-am", "S3 remote"], root)
    command = ["synthmed", "serve", "--pipeline", "tiny", "--config", str(config), "--push"]
    command += ["--cron", "0 3 * * 1-5", "--timezone", "Europe/Berlin"]
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        serve = subprocess.Popen(
            command,
            cwd=root,
            env={**base_env(), **prefect_server.env()},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deployment = wait_for(lambda: _deployment(prefect_client, NAME), 120, f"{NAME} to be registered")

        # schedule and typed parameters, as defined in flows/deploy.py
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules] == [
            ("0 3 * * 1-5", "Europe/Berlin", True)
        ]
        assert deployment.parameters["params"]["pipeline"] == "tiny"
        assert deployment.parameters["params"]["config"] == str(config)
        fields = deployment.parameter_openapi_schema["definitions"]["AugmentParams"]["properties"]
        assert fields["shard_workers"]["type"] == "integer" and fields["shard_workers"]["minimum"] == 1
        assert fields["dvc_push"]["type"] == "boolean"

        # a parameter outside its type is refused when the run is created
        bad = {"params": {**deployment.parameters["params"], "shard_workers": 0}}
        from prefect.exceptions import PrefectHTTPStatusError

        with pytest.raises(PrefectHTTPStatusError, match="params.shard_workers.*less than the minimum of 1"):
            run_deployment(NAME, parameters=bad, timeout=0)

        params = {"params": {**deployment.parameters["params"], "shard_workers": 2}}
        flow_run = run_deployment(NAME, parameters=params, timeout=0)
        final = wait_for(
            lambda: (state := prefect_client.read_flow_run(flow_run.id).state).is_final() and state,
            480,  # minutes under load on a shared 2-core machine; seconds when idle
            f"the flow run to finish (serve log: {log_path})",
            interval_s=2,
        )
        assert final.is_completed(), f"{final}\n{log_path.read_text()[-4000:]}"
    finally:
        stop_process(serve)

    # outputs on disk, versioned by DVC, nothing left to commit
    for dataset in ("real", "synthetic", "filtered"):
        verify_dataset(root / "data" / "tiny" / dataset)
    assert (root / "reports" / "tiny" / "report.md").is_file()
    assert "up to date" in cli(["dvc", "status"], root).lower()
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    lock_md5 = {o["path"]: o["md5"] for s in lock["stages"].values() for o in s.get("outs", [])}

    # synthesis ran as parallel shard tasks (the parameter given to this run)
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    tasks = prefect_client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    assert {"synthesize-shard-0", "synthesize-shard-1", "synthesize-shard-2"} <= {t.name for t in tasks}

    # artifacts of this run: report table, grids, report, and the versions DVC recorded
    artifacts = _artifacts(prefect_client, flow_run.id)
    assert {"tiny-metrics", "tiny-grids", "tiny-report", "tiny-versions", "tiny-dvc-lock"} <= set(artifacts)
    assert "data:image/png;base64," in artifacts["tiny-grids"].data
    rows = artifacts["tiny-versions"].data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    recorded = {row["output"]: row["md5"] for row in rows}
    assert recorded["data/tiny/synthetic"] == lock_md5["data/tiny/synthetic"]
    assert recorded["data/tiny/real"] == lock_md5["data/tiny/real"]

    # and the results went to the configured S3 URI
    keys = set(s3.objects("results/tiny/"))
    assert {"results/tiny/reports/report.md", "results/tiny/metrics/retrain.json"} <= keys

    # restore this run's data from the artifacts alone: the git commit + its dvc.lock entries
    lock_yaml = artifacts["tiny-dvc-lock"].data.removeprefix("```yaml\n").removesuffix("```")
    restored = tmp_path / "restored"
    cli(["git", "clone", "-q", str(root), str(restored)], tmp_path)
    cli(["git", "checkout", "-q", recorded["git commit"]], restored)
    (restored / "dvc.lock").write_text(lock_yaml)
    cli(["dvc", "pull"], restored)  # from S3: the run pushed its outputs (--push)
    for path in ("data/tiny/real", "data/tiny/synthetic", "models/tiny/generator", "reports/tiny"):
        assert _sha256_tree(restored / path) == _sha256_tree(root / path), path


def test_prefect_yaml_registers_both_work_pool_deployments(prefect_server, prefect_client):
    env = prefect_server.env()
    cli(["prefect", "work-pool", "create", "synthmed-process", "--type", "process", "--overwrite"], REPO, env)
    template = str(REPO / "infra" / "k8s" / "gpu-job-template.json")
    cli(
        [
            "prefect",
            "work-pool",
            "create",
            "synthmed-gpu",
            "--type",
            "kubernetes",
            "--base-job-template",
            template,
            "--overwrite",
        ],
        REPO,
        env,
    )
    cli(["prefect", "--no-prompt", "deploy", "--prefect-file", "infra/prefect.yaml", "--all"], REPO, env)

    spec = {d["name"]: d for d in yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())["deployments"]}
    for name, expected in spec.items():
        deployment = prefect_client.read_deployment_by_name(f"synthmed-augment/{name}")
        assert deployment.work_pool_name == expected["work_pool"]["name"]
        assert [s.schedule.cron for s in deployment.schedules] == [s["cron"] for s in expected["schedules"]]
        assert deployment.parameters == expected["parameters"]
        assert deployment.pull_steps == expected["pull"]
    gpu = prefect_client.read_work_pool("synthmed-gpu")
    container = gpu.base_job_template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "{{ gpu_count }}"


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [("--cron", "0 2 * *", "Invalid cron string"), ("--timezone", "Mars/Olympus", "Invalid timezone")],
)
def test_serve_refuses_a_bad_schedule_in_one_line(tmp_path, option, value, message):
    config = make_project(tmp_path / "proj")
    proc = subprocess.run(
        ["synthmed", "serve", "--pipeline", "tiny", "--config", str(config), option, value],
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
