"""The DVC pipeline through the real ``dvc`` CLI: ``dvc repro`` runs the stage functions,
a second ``dvc repro`` does nothing, and a fresh git clone reproduces identical hashes."""

from __future__ import annotations

import pytest
import yaml

from tests.flows.project import make_project, run

pytestmark = pytest.mark.integration
DATASETS = (
    "data/tiny/real",
    "data/tiny/synthetic",
    "data/tiny/filtered",
    "data/tiny/rejects.json",
    "models/tiny/generator",
)


def _out_hashes(root) -> dict[str, str]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


def test_dvc_repro_is_reproducible_in_a_fresh_clone(tmp_path):
    root = make_project(tmp_path / "origin", dvc=True).parent
    out = run(["dvc", "repro"], root)
    assert "Running stage 'ingest-tiny'" in out and "Running stage 'report-tiny'" in out
    assert (root / "reports" / "tiny" / "report.md").is_file()
    again = run(["dvc", "repro"], root)
    assert "Running stage" not in again
    hashes = _out_hashes(root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "first repro"], root)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(root), str(clone)], tmp_path)
    assert not (clone / "data" / "tiny" / "real").exists()
    run(["dvc", "repro"], clone)
    cloned = _out_hashes(clone)
    for path in DATASETS:
        assert cloned[path] == hashes[path], path
