"""`synthmed exp-show`'s column patterns and `synthmed baseline`'s refusals, without a DVC
run (the real sweep and baseline run in tests/integration/test_experiments.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from flows.cli import main
from flows.experiments import SHOWN_METRICS, baseline_paths, exp_diff_args, exp_show_args, record_baseline
from generators.errors import ConfigError, SynthmedError

REPO = Path(__file__).resolve().parents[2]


def _patterns(pipeline: str) -> tuple[re.Pattern, re.Pattern]:
    args = exp_show_args(pipeline)
    return re.compile(args[args.index("--drop") + 1]), re.compile(args[args.index("--keep") + 1])


@pytest.mark.parametrize("pipeline", ["demo", "demo-3d"])
def test_the_view_drops_everything_but_params_and_keeps_the_answer(pipeline):
    drop, keep = _patterns(pipeline)
    # DVC applies both with re.match (from the start of a column name); --keep wins over --drop
    for column in ("Created", "State", "Executor", "data/demo/synthetic", "metrics/demo/quality.json"):
        assert drop.match(column) and not keep.match(column), column
    for key in ("fid", "aug", "kept", "n_syn", "generator"):
        assert drop.match(f"{pipeline}.{key}") and not keep.match(f"{pipeline}.{key}"), key
    for key in SHOWN_METRICS:
        assert keep.match(f"{pipeline}.{key}"), key
    assert keep.match("Experiment")
    assert not drop.match(f"pipelines.{pipeline}.synthesis.count_per_class")  # a param: --only-changed decides
    other = "demo-vae" if pipeline == "demo" else "demo"
    assert not keep.match(f"{other}.verdict")  # another pipeline's headline is not protected


def test_exp_show_prints_the_command_and_passes_extra_arguments_to_dvc(tmp_path, capsys):
    shutil.copy(REPO / "pipelines.yaml", tmp_path / "pipelines.yaml")
    code = main(["exp-show", "--pipeline", "demo", "--config", str(tmp_path / "pipelines.yaml"), "--md"])
    printed = capsys.readouterr().out.splitlines()[0]
    assert printed.startswith("$ dvc exp show --only-changed --drop") and printed.endswith("--md"), printed
    assert code != 0  # not a DVC repository: DVC's own error and exit status


def test_other_commands_still_refuse_unknown_arguments(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["validate", "--md"])
    assert exit_.value.code == 2 and "unrecognized arguments: --md" in capsys.readouterr().err


def test_baseline_outside_a_git_dvc_project_is_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "pipelines.yaml").write_text("pipelines: {}\n")
    with pytest.raises(SynthmedError, match="not a git \\+ DVC project"):
        record_baseline(tmp_path, "demo", tmp_path / "pipelines.yaml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipelines.yaml"]


def test_baseline_needs_the_pipelines_file_inside_the_project_and_a_report_stage(tmp_path):
    outside = tmp_path / "elsewhere.yaml"
    root = tmp_path / "proj"
    root.mkdir()
    with pytest.raises(ConfigError, match="outside the project"):
        baseline_paths(root, "demo", outside)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    (root / ".dvc").mkdir()
    (root / "pipelines.yaml").write_text("pipelines: {}\n")
    (root / "dvc.yaml").write_text("stages: {}\n")
    with pytest.raises(ConfigError, match="no report stage"):
        record_baseline(root, "demo", root / "pipelines.yaml")
    (root / "dvc.yaml").write_text("stages:\n  report-demo: {cmd: synthmed stage report --pipeline demo}\n")
    with pytest.raises(SynthmedError, match="no git commit yet: commit the project first"):
        record_baseline(root, "demo", root / "pipelines.yaml")
    assert subprocess.run(["git", "rev-parse", "-q", "--verify", "HEAD"], cwd=root).returncode != 0  # still none


def test_exp_diff_targets_one_pipelines_files_and_takes_at_most_two_revisions(capsys):
    metrics, plots = exp_diff_args("demo-3d", ["a", "b"], "out")
    assert metrics == ["metrics", "diff", "a", "b", "--targets", "metrics/demo-3d/summary.json"]
    assert plots[:4] == ["plots", "diff", "a", "b"] and plots[-2:] == ["-o", "out"]
    assert [t for t in plots[5:-2]] == [f"demo-3d/{n}" for n in ("ratio-sweep", "low-data", "realism", "training")]
    assert main(["exp-diff", "a", "b", "c"]) == 2
    assert "at most two revisions" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["baseline", "exp-show", "exp-diff"])
def test_an_unknown_pipeline_is_one_line_naming_the_known_ones(command, capsys):
    assert main([command, "--pipeline", "nope", "--config", str(REPO / "pipelines.yaml")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "no pipeline named 'nope'; known: " in error[0] and "demo" in error[0], error
