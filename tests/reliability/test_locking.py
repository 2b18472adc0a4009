"""One run per pipeline and project: a second ``synthmed run`` or ``synthmed stage`` of a
pipeline that another process is running fails at once with one line and status 2, the
first is unaffected, and a lock left by a killed process is taken over. A killed
``synthmed run`` leaves no temporary Prefect server behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tasks.lock import PipelineBusyError, lock_path, pipeline_lock
from tasks.paths import PipelinePaths
from tests.flows.project import env, make_project
from tests.reliability.helpers import assert_one_line, cli

HOLD = """
import sys
from pathlib import Path
from tasks.lock import pipeline_lock
from tasks.paths import PipelinePaths
with pipeline_lock(PipelinePaths(Path(sys.argv[1]), "tiny")):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin (or kills this process)
print("released", flush=True)
"""


def hold_lock(root: Path) -> subprocess.Popen:
    """A process holding pipeline ``tiny``'s lock until its stdin is closed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(root)],
        cwd=root,
        env=env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.integration
def test_a_second_run_or_stage_of_a_running_pipeline_fails_at_once(tmp_path: Path) -> None:
    make_project(tmp_path)
    paths = PipelinePaths(tmp_path, "tiny")
    first = hold_lock(tmp_path)
    try:
        for args in (["stage", "ingest", "--pipeline", "tiny"], ["run", "--pipeline", "tiny", "--no-dvc"]):
            started = time.monotonic()
            proc = cli(args, tmp_path)
            assert proc.returncode == 2, proc.stderr
            assert_one_line(proc.stderr, f"error: pipeline 'tiny' is already running in this project (pid {first.pid})")
            assert time.monotonic() - started < 60  # at once: no waiting, no server start
        assert not paths.real.exists() and not (tmp_path / "data" / "tiny").exists()  # nothing written
        with pytest.raises(PipelineBusyError):  # in this process too
            with pipeline_lock(paths):
                pass
        # the first is unaffected: still holding, its pid still recorded, and it finishes cleanly
        assert first.poll() is None
        assert lock_path(paths).read_text().strip() == str(first.pid)
        out, _ = first.communicate("", timeout=30)
        assert first.returncode == 0 and out.strip() == "released"
    finally:
        if first.poll() is None:
            first.kill()
    with pipeline_lock(paths):  # released: free again
        assert lock_path(paths).read_text().strip() == str(os.getpid())


def test_a_lock_left_by_a_killed_process_is_taken_over_and_it_is_reentrant(tmp_path: Path) -> None:
    paths = PipelinePaths(tmp_path, "tiny")
    lock_path(paths).parent.mkdir(parents=True)
    lock_path(paths).write_text("not a pid\n")  # an edited lock file, not held: taken
    with pipeline_lock(paths):
        assert lock_path(paths).read_text().strip() == str(os.getpid())
    holder = hold_lock(tmp_path)
    holder.kill()
    holder.wait(timeout=30)
    assert lock_path(paths).read_text().strip() == str(holder.pid)  # the dead pid is still in the file
    with pipeline_lock(paths):
        with pipeline_lock(paths):  # the flow holds it while its stages take it again
            assert lock_path(paths).read_text().strip() == str(os.getpid())
        probe = subprocess.run(
            [sys.executable, "-c", HOLD, str(tmp_path)],
            cwd=tmp_path,
            env=env(),
            input="",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert probe.returncode == 1 and "already running" in probe.stderr  # still held after the inner exit


def server_processes(pid: int) -> list[psutil.Process]:
    """Prefect temporary servers (uvicorn) among the descendants of ``pid``."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if "uvicorn" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.integration
def test_a_killed_run_leaves_no_prefect_server(tmp_path: Path) -> None:
    make_project(tmp_path)
    run_env = {key: value for key, value in env().items() if key != "PREFECT_API_URL"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "--pipeline", "tiny", "--no-dvc"],
        cwd=tmp_path,
        env=run_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    servers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 180
        while not servers and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            servers = server_processes(proc.pid)
        assert servers, f"no temporary server seen (exit {proc.poll()})"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(running(s) for s in servers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(running(s) for s in servers), "the temporary Prefect server outlived its run"
    finally:
        for server in servers:
            if running(server):
                server.kill()
        if proc.poll() is None:
            proc.kill()


@pytest.mark.integration
def test_a_run_that_fails_on_bad_data_prints_no_traceback(tmp_path: Path) -> None:
    make_project(tmp_path)
    for image in (tmp_path / "images").rglob("*.png"):
        image.unlink()  # the ingest stage task fails with a DataError inside the flow
    slow_start = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}  # a busy CI machine
    proc = cli(["run", "--pipeline", "tiny", "--no-dvc"], tmp_path, slow_start, timeout_s=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert_one_line(errors[0], "no image files found")
