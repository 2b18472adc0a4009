"""The DVC pipeline through the real ``dvc`` CLI: ``dvc repro`` runs the stage functions,
a second ``dvc repro`` does nothing, and a fresh git clone reproduces identical hashes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.versioning import check_dvc_yaml, pipeline_stages, render_dvc_yaml, sync_dvc_yaml
from tasks.stages import ORDER
from tests.flows.project import env, make_project, run

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


# --------------------------------------------------------------------------- dvc.yaml in sync
REPO = Path(__file__).resolve().parents[2]


def test_every_pipeline_in_pipelines_yaml_has_its_stages_and_dvc_yaml_is_current():
    names = list(yaml.safe_load((REPO / "pipelines.yaml").read_text())["pipelines"])
    assert check_dvc_yaml(REPO, REPO / "pipelines.yaml") == "", "run `synthmed dvc-yaml --write` and commit dvc.yaml"
    for name in names:
        verbs = [stage.split("-")[0] for stage in pipeline_stages(REPO, name)]
        assert verbs == list(ORDER), name


def test_stage_params_name_only_keys_the_file_writes_out():
    """DVC refuses `dvc commit` when a stage's params are missing from pipelines.yaml
    (`Parameters 'pipelines.X.device' are missing`): every rendered key must exist."""
    raw = yaml.safe_load((REPO / "pipelines.yaml").read_text())
    rendered = yaml.safe_load(render_dvc_yaml(REPO / "pipelines.yaml"))
    listed = [key for s in rendered["stages"].values() for p in s.get("params", []) for key in p["pipelines.yaml"]]
    assert any(k.startswith("pipelines.demo-seg.") for k in listed)
    assert "pipelines.demo-seg.device" not in listed  # demo-seg leaves device to its default
    for key in listed:
        node = raw
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{key} is not in pipelines.yaml"
            node = node[part]


def test_dvc_yaml_check_and_write_follow_a_new_pipeline(tmp_path):
    """A pipeline added to pipelines.yaml: `--check` names its missing stages and exits 1,
    `--write` renders them (with DVC accepting the file), and a synthmed-rendered dvc.yaml
    is re-rendered by `sync_dvc_yaml` (what `commit_outputs` does at the end of a run)."""
    config = make_project(tmp_path / "proj", dvc=True)
    root = config.parent
    spec = yaml.safe_load(config.read_text())
    extra = {k: v for k, v in spec["pipelines"]["tiny"].items() if k not in ("device", "threads", "report")}
    spec["pipelines"]["tiny-b"] = extra
    config.write_text(yaml.safe_dump(spec, sort_keys=False))

    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "dvc-yaml", "--no-code", "--check"],
        cwd=root,
        env=env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "missing stages" in proc.stdout and "ingest-tiny-b" in proc.stdout, proc.stdout
    assert sync_dvc_yaml(root, config)  # the header recorded --no-code; every pipeline now
    assert not sync_dvc_yaml(root, config)  # in sync: untouched
    assert check_dvc_yaml(root, config, with_code=False) == ""
    assert pipeline_stages(root, "tiny-b") == [f"{verb}-tiny-b" for verb in ORDER]
    train = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["train-tiny-b"]
    assert train["params"] == [{"pipelines.yaml": ["pipelines.tiny-b.generator"]}]  # no threads/device
    listed = run([sys.executable, "-m", "dvc", "stage", "list"], root)
    assert "report-tiny-b" in listed and "report-tiny" in listed


def test_a_hand_written_dvc_yaml_is_never_rewritten(tmp_path):
    config = make_project(tmp_path / "proj", dvc=True)
    hand = "stages:\n  hello:\n    cmd: echo hello\n"
    (config.parent / "dvc.yaml").write_text(hand)
    assert not sync_dvc_yaml(config.parent, config)
    assert (config.parent / "dvc.yaml").read_text() == hand
