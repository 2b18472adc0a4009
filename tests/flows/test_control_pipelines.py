"""The negative control through the real CLI: a pipeline whose generator makes noise
(``generator.train.architecture: noise``, as pipeline ``control-noise``) fails the realism
gate of ``synthmed run`` with a one-line verdict and exit status 2, after every output is
written (filtered shards, quality.json, the report whose verdict is REJECTED).
The realism gate's checks on their own: tests/tasks/test_realism.py; on the filter stage:
tests/tasks/test_filter.py; the held-out real positive control's grouping:
tests/generators/test_controls.py."""

from __future__ import annotations

import json
import subprocess

import pytest

from generators.shards import read_manifest
from tasks.paths import PipelinePaths
from tests.flows.project import env, make_project

pytestmark = pytest.mark.integration


def test_a_noise_generator_fails_the_realism_gate_of_synthmed_run(prefect_harness, tmp_path, capsys) -> None:
    from flows.cli import main

    quality = {  # the default gate (max_two_sample_auc 0.9); the label filter keeps every image
        "label_consistency": {"enabled": True, "min_confidence": 0.0, "epochs": 1},
        "metrics": {"extractor": "random"},
    }
    overrides = {"generator": {"train": {"architecture": "noise"}}, "quality": quality}
    config = make_project(tmp_path / "proj", overrides=overrides)
    status = main(["run", "--pipeline", "tiny", "--config", str(config), "--no-dvc"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2
    assert last.startswith("error: rejected: synthetic images fail the realism gate (two-sample AUC ")
    assert "> max_two_sample_auc 0.9" in last and "never loosen the bound" in last
    assert last.endswith("reports/tiny/report.md")

    paths = PipelinePaths(config.parent, "tiny")
    written = json.loads((paths.metrics / "quality.json").read_text())
    test = written["realism"]["two_sample"]
    assert test["ci95_low"] > 0.9 and test["n_synthetic"] == test["n_real"] > 0
    assert test["synthetic_grouping"] == "row"  # noise rows are independent samples
    assert written["gate"]["passed"] is False and written["gate"]["realism_passed"] is False
    assert read_manifest(paths.filtered)["rows"] == written["totals"]["kept"] > 0  # filtered shards written
    markdown = (paths.reports / "report.md").read_text()
    assert markdown.splitlines()[2].startswith("**Verdict: REJECTED**")


def test_a_rejected_run_is_versioned_with_its_verdict(prefect_harness, tmp_path, capsys) -> None:
    """A rejected set is an experiment's result, not a lost run: ``synthmed run`` exits 2 after
    ``dvc commit`` (``dvc status`` clean, summary.json's verdict REJECTED), and the filter
    stage under DVC exits 0 with a one-line warning, so ``dvc repro``/``dvc exp run`` record it."""
    from flows.cli import main
    from tests.flows.project import run

    quality = {
        "label_consistency": {"enabled": True, "min_confidence": 0.0, "epochs": 1},
        "metrics": {"extractor": "random"},
    }
    overrides = {"generator": {"train": {"architecture": "noise"}}, "quality": quality}
    config = make_project(tmp_path / "proj", dvc=True, overrides=overrides)
    root = config.parent
    status = main(["run", "--pipeline", "tiny", "--config", str(config)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2 and last.startswith("error: rejected: ")
    assert last.endswith("recorded in dvc.lock with verdict REJECTED")
    assert "up to date" in run(["dvc", "status"], root)
    summary = json.loads((PipelinePaths(root, "tiny").metrics / "summary.json").read_text())
    assert summary["tiny"]["verdict"] == "REJECTED"

    forced = subprocess.run(
        ["dvc", "repro", "-f", "-s", "filter-tiny"], cwd=root, env=env(), capture_output=True, text=True
    )
    assert forced.returncode == 0, forced.stderr[-2000:]
    warnings = [line for line in (forced.stdout + forced.stderr).splitlines() if line.startswith("warning: rejected")]
    assert len(warnings) == 1 and warnings[0].endswith("the report's verdict will be REJECTED")
    assert "up to date" in run(["dvc", "status"], root)
