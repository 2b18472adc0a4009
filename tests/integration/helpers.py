"""Helpers of the integration tests: the fast tiny-pipeline settings, polling, process
control and running the CLI with extra environment variables."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from tests.flows.project import env as base_env

# The tiny pipeline, made lighter still: one GAN epoch, no label classifier, two
# retrain steps on one seed with the small ResNet. Every stage runs in a few seconds.
FAST = {
    "generator": {"train": {"epochs": 1, "batch_size": 16, "latent_dim": 8, "base_channels": 8}},
    "synthesis": {"count_per_class": 6, "shard_rows": 6, "batch_size": 6},
    # a 1-epoch toy GAN: no realism bound (plumbing test; the realism gate is proven in
    # tests/tasks/test_realism.py and test_filter.py); the two-sample test and the
    # self-supervised extractor still run, on a small budget
    "quality": {
        "label_consistency": {"enabled": False},
        "metrics": {"self_supervised_steps": 10},
        "realism": {"folds": 2, "epochs": 2, "min_steps": 0, "bootstrap": 100},
        "gate": {"max_two_sample_auc": None},
    },
    "retrain": {"steps": 2, "batch_size": 8, "seeds": [0], "network": "resnet"},
    "report": {"grid_per_class": 2},
}
S3_KEYS = {
    "AWS_ACCESS_KEY_ID": "synthmed-test",
    "AWS_SECRET_ACCESS_KEY": "synthmed-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.5) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def cli(args: list[str], cwd: Path, extra_env: dict[str, str] | None = None, timeout_s: float = 600) -> str:
    """Run a command (``synthmed``, ``dvc``, ``git``, ``prefect``) with the test
    environment plus ``extra_env``; fail with its output when it exits non-zero."""
    proc = subprocess.run(
        args, cwd=cwd, env={**base_env(), **(extra_env or {})}, capture_output=True, text=True, timeout=timeout_s
    )
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


def stop_process(proc: subprocess.Popen, timeout_s: float = 20) -> None:
    """SIGINT, then SIGTERM, then SIGKILL to the process group this test started."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            continue


def copy_project(src: Path, dest: Path) -> Path:
    """A full copy (work tree, .git, .dvc cache, stage records) of a project."""
    shutil.copytree(src, dest, symlinks=True)
    return dest
