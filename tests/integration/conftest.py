"""Real servers on 127.0.0.1 for the integration tests, started once per session:

- ``s3_server``: moto in server mode (a real HTTP S3 API on a free port); tests get a
  fresh bucket and S3 environment variables through ``s3``;
- ``prefect_server``: ``prefect server start`` in a subprocess (SQLite in a temporary
  PREFECT_HOME, free port); CLI subprocesses reach it through ``prefect_env``;
- ``tiny_repro``: the tiny phantom project (tests/flows/project.py, sized to run in
  seconds) with git + DVC, reproduced once with ``dvc repro`` and committed; tests work
  on copies (``copy_project``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.flows.project import make_project, run
from tests.integration.helpers import FAST, S3_KEYS, free_port, stop_process, wait_for


# --------------------------------------------------------------------------- S3 (moto server)
@dataclass(frozen=True)
class S3:
    endpoint: str
    bucket: str
    client: object

    def env(self) -> dict[str, str]:
        return {**S3_KEYS, "SYNTHMED_S3_ENDPOINT_URL": self.endpoint}

    def objects(self, prefix: str = "") -> dict[str, dict]:
        """``{key: {"etag", "size", "modified"}}`` of every object under ``prefix``."""
        out = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                out[item["Key"]] = {"etag": item["ETag"], "size": item["Size"], "modified": item["LastModified"]}
        return out


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (random free port); yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path) -> S3:
    """A fresh bucket, and the environment (endpoint + keys) pointing at the server, for
    this process and every subprocess it starts."""
    import boto3

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    empty = tmp_path / "aws-empty-config"  # never the developer's own AWS profile
    empty.write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    for name, value in S3_KEYS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SYNTHMED_S3_ENDPOINT_URL", s3_server)
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    bucket = f"synthmed-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    return S3(endpoint=s3_server, bucket=bucket, client=client)


# --------------------------------------------------------------------------- Prefect server
@dataclass(frozen=True)
class PrefectServer:
    api_url: str
    home: Path

    def env(self, home: Path | None = None) -> dict[str, str]:
        """Settings for a client subprocess: this server, its own PREFECT_HOME."""
        return {
            "PREFECT_API_URL": self.api_url,
            "PREFECT_HOME": str(home or self.home / "client"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "INFO",
        }


def _server_up(api_url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> Iterator[PrefectServer]:
    """``prefect server start`` on 127.0.0.1 (free port, SQLite under a temporary
    PREFECT_HOME, no UI); stopped at the end of the session."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
    }
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        wait_for(lambda: proc.poll() is not None or _server_up(api_url), 120, "the Prefect server to start")
        if proc.poll() is not None:
            raise AssertionError(f"prefect server exited ({proc.returncode}):\n{(home / 'server.log').read_text()}")
        yield PrefectServer(api_url=api_url, home=home)
    finally:
        stop_process(proc)
        log.close()


@pytest.fixture
def prefect_client(prefect_server):
    """A sync Prefect client of the session's server (settings scoped to this test)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        with get_client(sync_client=True) as client:
            yield client


# --------------------------------------------------------------------------- projects
@pytest.fixture(scope="session")
def tiny_repro(tmp_path_factory) -> Path:
    """The tiny project with every stage run (in this process, through the stage
    functions) and recorded with ``dvc commit`` (flows.versioning.commit_outputs, as a
    Prefect run ends), then committed to git: ``dvc status`` is clean."""
    from flows.versioning import commit_outputs
    from tasks.config import load_pipeline
    from tasks.paths import PipelinePaths
    from tasks.stages import ORDER, run_stage

    root = make_project(tmp_path_factory.mktemp("tiny-repro") / "proj", dvc=True, overrides=FAST).parent
    cfg, paths = load_pipeline("tiny", root / "pipelines.yaml"), PipelinePaths(root, "tiny")
    for verb in ORDER:
        run_stage(verb, cfg, paths)
    versions = commit_outputs(root, "tiny")
    assert versions["versioned"], versions
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "baseline run"], root)
    return root
