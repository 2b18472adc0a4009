"""The quiet console (flows/console.py): a real ``synthmed run`` of a tiny pipeline whose
quality gate rejects the synthetic set (the demo's path: exit 2, REJECTED) prints no
traceback, no ERROR line and no telemetry failure, one line per finished stage, and ends
with one ``error:`` line; with telemetry settings removed from the environment, so the
CLI itself must switch Prefect's heartbeat off. Unit tests check each rewrite rule."""

from __future__ import annotations

import logging
import subprocess
import warnings
from pathlib import Path

import pytest

from flows.console import QuietFilter, telemetry_off
from tasks.progress import Progress, format_seconds
from tests.flows.project import env, make_project


def _record(name: str, level: int, msg: str, exc: BaseException | None = None, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord(name, level, __file__, 1, msg, None, (type(exc), exc, None) if exc else None)
    record.__dict__.update(extra)
    return record


def test_library_traceback_becomes_one_warning_line() -> None:
    quiet = QuietFilter()
    try:
        raise ValueError("database is locked\nSQL: INSERT ...")
    except ValueError as exc:
        record = _record("docket.dependencies", logging.ERROR, "send_telemetry_heartbeat()", exc)
    assert quiet.filter(record)
    line = logging.Formatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert line == (
        "WARNING docket.dependencies: send_telemetry_heartbeat() (ValueError: database is locked; "
        "run with -v for the traceback)"
    )
    own = _record("tasks.filter", logging.ERROR, "something failed")
    assert quiet.filter(own) and own.levelname == "ERROR"  # our own errors stay errors
    verbose = _record("docket.dependencies", logging.ERROR, "x", ValueError("y"))
    assert QuietFilter(verbose=True).filter(verbose) and verbose.exc_info and verbose.levelname == "ERROR"


def test_stage_lines_and_python_warnings() -> None:
    quiet = QuietFilter(stages=("ingest", "train"))
    begin = _record("prefect.flow_runs", logging.INFO, "Beginning flow run 'x' for flow 'synthmed-augment'")
    assert quiet.filter(begin)
    done = _record("prefect.task_runs", logging.INFO, "Finished in state Completed()", task_run_name="train")
    assert quiet.filter(done)
    assert done.getMessage().startswith("[2/2] train: Completed in ")
    failed = _record("prefect.task_runs", logging.ERROR, "Finished in state Failed('boom')", task_run_name="ingest")
    assert quiet.filter(failed) and failed.levelname == "WARNING" and "[1/2] ingest: Failed in" in failed.getMessage()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("deprecated thing", UserWarning, stacklevel=1)
    text = warnings.formatwarning(caught[0].message, caught[0].category, caught[0].filename, caught[0].lineno)
    first = _record("py.warnings", logging.WARNING, text)
    assert quiet.filter(first) and first.getMessage() == "UserWarning: deprecated thing"
    assert not quiet.filter(_record("py.warnings", logging.WARNING, text))  # once per run


def test_progress_lines_have_counts_and_eta(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tasks.progress")
    progress = Progress("synthesize", 4, every_s=0.0)
    progress.advance(1)
    progress.advance(3)
    lines = [r.getMessage() for r in caplog.records if r.name == "tasks.progress"]
    assert lines[0].startswith("synthesize: 1/4 images (25%), ETA ")
    assert lines[-1].startswith("synthesize: 4/4 images (100%) in ")
    assert format_seconds(3725) == "1 h 02 min" and format_seconds(65) == "1 min 05 s"


def test_telemetry_off_keeps_the_users_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_SERVER_ANALYTICS_ENABLED", raising=False)
    monkeypatch.delenv("DVC_NO_ANALYTICS", raising=False)
    monkeypatch.setenv("DO_NOT_TRACK", "0")
    assert telemetry_off() == {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1"}


@pytest.mark.integration
def test_a_rejected_run_prints_no_traceback_and_no_error_line(tmp_path: Path) -> None:
    quality = {
        "label_consistency": {"enabled": True, "min_confidence": 0.0, "epochs": 1},
        "metrics": {"self_supervised_steps": 10},
        "realism": {"folds": 2, "epochs": 2, "min_steps": 0, "bootstrap": 100},
        "gate": {"max_two_sample_auc": None, "max_fid": 0.0},  # FID is never 0: the gate rejects, like the demo's
    }
    config = make_project(tmp_path / "proj", overrides={"quality": quality})
    environment = {k: v for k, v in env().items() if k not in ("PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK")}
    environment["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # a fresh database, as on a first run
    environment["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "300"  # a busy CI machine
    proc = subprocess.run(
        ["synthmed", "run", "--pipeline", "tiny", "--no-dvc"],
        cwd=config.parent,
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output
    assert not [line for line in output.splitlines() if " ERROR " in line or "| ERROR" in line], output
    assert "telemetry" not in output.lower(), output
    for number, verb in enumerate(("ingest", "train", "synthesize", "filter", "retrain", "report"), start=1):
        assert f"[{number}/6] {verb}: " in output, output
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "rejected" in errors[0], output
    assert "Finished in state" not in output  # replaced by the stage lines
