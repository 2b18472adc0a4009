"""An experiment through DVC's own CLI: ``dvc exp run -S`` on a pipelines.yaml key reruns
the affected stages, and ``dvc exp show`` / ``dvc metrics diff`` compare it to the
baseline commit."""

from __future__ import annotations

import csv
import json
import re
import subprocess

import pytest

from tests.integration.helpers import FAST, base_env, cli, copy_project

pytestmark = pytest.mark.integration
PARAM = "pipelines.tiny.synthesis.count_per_class"


def _find(value, key: str):
    """Depth-first search for ``key`` in nested dicts/lists (exp show's JSON is deep)."""
    if isinstance(value, dict):
        if key in value:
            return value[key]
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            found = _find(item, key)
            if found is not None:
                return found
    return None


def test_exp_run_with_a_changed_count_and_compare(tiny_repro, tmp_path):
    root = copy_project(tiny_repro, tmp_path / "proj")
    baseline = FAST["synthesis"]["count_per_class"]
    count = baseline + 3

    out = cli(["dvc", "exp", "run", "-n", "more-synthetic", "-S", f"pipelines.yaml:{PARAM}={count}"], root)
    assert "Running stage 'synthesize-tiny'" in out
    assert "Running stage 'ingest-tiny'" not in out and "Running stage 'train-tiny'" not in out  # unchanged

    shown = json.loads(cli(["dvc", "exp", "show", "--json"], root))
    experiments = [e for rev in shown for e in (rev.get("experiments") or []) if e.get("name") == "more-synthetic"]
    assert len(experiments) == 1
    exp_data = experiments[0]["revs"][0]["data"]
    assert _find(exp_data["params"]["pipelines.yaml"]["data"], "count_per_class") == count
    assert _find(exp_data["metrics"]["metrics/tiny/summary.json"]["data"], "n_syn") is not None
    generated = json.loads((root / "metrics" / "tiny" / "quality.json").read_text())["totals"]["generated"]
    assert generated == 3 * count  # the experiment's outputs are in the workspace

    # the experiment's results are in the workspace: compare them with the baseline commit
    diff = json.loads(cli(["dvc", "metrics", "diff", "--json", "--all"], root))
    assert set(diff) == {"metrics/tiny/summary.json"}  # the headline only, not quality.json's hundreds of keys
    assert (
        diff["metrics/tiny/summary.json"]["tiny.n_real"]["old"]
        == diff["metrics/tiny/summary.json"]["tiny.n_real"]["new"]
    )
    params = json.loads(cli(["dvc", "params", "diff", "--json"], root))
    assert params["pipelines.yaml"][PARAM] == {"old": baseline, "new": count, "diff": count - baseline}


# --------------------------------------------------------------------------- a queued sweep
TERMINAL = 160


def _summary(root) -> dict:
    return json.loads((root / "metrics" / "tiny" / "summary.json").read_text())["tiny"]


def _plot_rows(html: str, fields: set[str]) -> list[dict]:
    """The data rows DVC rendered into its HTML page (each vega-lite spec's ``data.values``)
    that carry ``fields``; each row also names its experiment in ``rev``."""
    rows = []
    for match in re.finditer(r'"values":\s*(\[.*?\])\s*[,}]', html, re.S):
        try:
            values = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        rows += [v for v in values if isinstance(v, dict) and {"rev", *fields} <= set(v)]
    return rows


def test_queued_two_value_sweep_fits_a_terminal_and_plots_diff_overlays_both(tiny_repro, tmp_path):
    """Issue 19's acceptance on the tiny pipeline: a baseline commit (the fixture), a
    two-value `dvc exp run --queue` sweep, `dvc exp show --only-changed` within 160
    columns with verdict and delta for each experiment, and `dvc plots diff` rendering
    both experiments' realism rows into one HTML page."""
    root = copy_project(tiny_repro, tmp_path / "sweep")
    baseline = _summary(root)
    assert {"verdict", "delta", "delta_lo", "delta_hi", "auc", "fid", "kept", "n_real", "n_syn"} <= set(baseline)
    counts = (4, 9)
    # both experiments also run a two-point ratio sweep, so the HTML has curves to compare
    ratios = "pipelines.yaml:+pipelines.tiny.retrain.ratios=[0.0,1.0]"  # + : a key the file lacks
    cli(["dvc", "exp", "run", "--queue", "-S", f"pipelines.yaml:{PARAM}={counts[0]},{counts[1]}", "-S", ratios], root)
    cli(["dvc", "exp", "run", "--run-all", "-j", "1"], root, timeout_s=1500)

    shown = json.loads(cli(["dvc", "exp", "show", "--json"], root))
    names = {}
    for rev in shown:
        for exp in rev.get("experiments") or []:
            data = exp["revs"][0]["data"]
            count = _find(data["params"]["pipelines.yaml"]["data"], "count_per_class")
            names[count] = exp["name"]
            summary = data["metrics"]["metrics/tiny/summary.json"]["data"]["tiny"]
            assert summary["n_syn"] is not None and summary["verdict"], summary
    assert sorted(names) == list(counts), names

    # `synthmed exp-show` (the dvc exp show view, flows/experiments.py): the experiment, its
    # verdict, delta (and interval) and AUC, the swept param; no data-dependency hashes
    table = cli(["synthmed", "exp-show", "--pipeline", "tiny"], root)
    command, *lines = table.splitlines()
    assert command.startswith("$ dvc exp show --only-changed"), command  # what it ran, to retype
    width = max(len(line.rstrip()) for line in lines)
    assert width <= TERMINAL, f"{width} columns:\n{table}"
    header = next(line for line in lines if "Experiment" in line)
    assert "tiny.verdict" in header and "tiny.delta" in header and PARAM in header, header
    assert "data/" not in header and "Created" not in header, header
    for name in names.values():
        row = next(line for line in lines if f"[{name}]" in line)
        assert any(v in row for v in ("no measurable effect", "helps", "hurts", "REJECTED", "not tested")), row
    # narrower than the table: the AUC (then the interval) is left out, and the output says so
    narrow = cli(["synthmed", "exp-show", "--pipeline", "tiny", "--width", str(width - 1)], root).splitlines()
    assert max(len(line.rstrip()) for line in narrow[1:]) <= width - 1, "\n".join(narrow)
    assert "tiny.auc" not in narrow[0] and "tiny\\.(verdict|delta" in narrow[0], narrow[0]
    assert narrow[-1].startswith(f"(left out to fit {width - 1} columns: ") and "tiny.auc" in narrow[-1], narrow[-1]
    # plain `dvc exp show --only-changed` is wider (a hash column per changed data dependency),
    # but summary.json's order puts its changed headline numbers on the first 160-column
    # screen, right after DVC's own columns (verdict too, when it differs between rows)
    plain = cli(["dvc", "exp", "show", "--only-changed"], root).splitlines()
    plain_header = next(line for line in plain if "Experiment" in line)
    shown = [word for word in plain_header.split() if word.startswith("tiny.")]
    assert "tiny.delta" in shown and all(word in plain_header[:TERMINAL] for word in shown), plain_header
    metrics_diff = cli(["dvc", "metrics", "diff", "--all"], root)
    assert max(len(line.rstrip()) for line in metrics_diff.splitlines()) <= TERMINAL, metrics_diff

    out = tmp_path / "html" / "plots"  # a parent that does not exist yet (DVC alone fails there)
    diff = cli(["synthmed", "exp-diff", names[counts[0]], names[counts[1]], "--pipeline", "tiny", "-o", str(out)], root)
    assert "$ dvc metrics diff" in diff and "$ dvc plots diff" in diff and "tiny.n_syn" in diff, diff
    assert "failed to load" not in diff, diff  # only this pipeline's files are asked for
    html = (out / "index.html").read_text()
    rows = _plot_rows(html, {"class", "auc"})  # the tiny/realism plot
    revs = {row["rev"] for row in rows}
    assert {names[counts[0]], names[counts[1]]} <= revs, revs
    curve = _plot_rows(html, {"ratio", "mean"})  # the tiny/ratio-sweep curve of each experiment
    assert {names[counts[0]], names[counts[1]]} <= {row["rev"] for row in curve}, curve
    # the rendered numbers are each experiment's own realism.csv and ratio_sweep.csv
    for count, name in names.items():
        cli(["dvc", "exp", "apply", name], root)
        own = (root / "metrics" / "tiny" / "plots" / "realism.csv").read_text().splitlines()[1:]
        expected = {(line.split(",")[0], float(line.split(",")[1])) for line in own}
        rendered = {(row["class"], float(row["auc"])) for row in rows if row["rev"] == name}
        assert rendered == expected, (count, rendered, expected)
        sweep = list(csv.DictReader((root / "metrics" / "tiny" / "plots" / "ratio_sweep.csv").open()))
        assert [float(r["ratio"]) for r in sweep] == [0.0, 1.0], sweep
        own_curve = {(float(r["ratio"]), float(r["mean"])) for r in sweep}
        drawn = {(float(row["ratio"]), float(row["mean"])) for row in curve if row["rev"] == name}
        assert drawn == own_curve, (count, drawn, own_curve)


# --------------------------------------------------------------------------- a baseline
def test_synthmed_baseline_commits_what_dvc_exp_show_compares_with(tiny_repro, tmp_path):
    """Issue 19's baseline: a project whose results were never committed has an all-`!`
    baseline row; `synthmed baseline` commits dvc.lock and metrics/<p> (nothing else), the
    row then holds the run's summary, a second call commits nothing, and uncommitted code
    is refused in one line with nothing committed."""
    root = copy_project(tiny_repro, tmp_path / "base")
    cli(["git", "rm", "-q", "-r", "--cached", "dvc.lock", "metrics/tiny"], root)
    cli(["git", "commit", "-q", "-m", "results not committed"], root)

    def baseline_summary():
        shown = json.loads(cli(["dvc", "exp", "show", "--json"], root))
        row = next(rev for rev in shown if rev.get("rev") != "workspace")
        return (row["data"]["metrics"].get("metrics/tiny/summary.json") or {}).get("data")

    assert baseline_summary() is None  # the `!` row
    out = cli(["synthmed", "baseline", "--pipeline", "tiny"], root)
    assert "committed" in out, out
    subject = cli(["git", "log", "-1", "--format=%s"], root).strip()
    assert subject.startswith(f"baseline: tiny ({_summary(root)['verdict']}"), subject
    committed = set(cli(["git", "show", "--name-only", "--format=", "HEAD"], root).split())
    assert {"dvc.lock", "metrics/tiny/summary.json", "metrics/tiny/quality.json"} <= committed, committed
    assert not any(path.startswith(("data/", "models/")) and not path.endswith(".gitignore") for path in committed)
    committed_summary = {k: v for k, v in baseline_summary()["tiny"].items() if v is not None}
    assert committed_summary == {k: v for k, v in _summary(root).items() if v is not None}  # DVC drops nulls
    assert "up to date" in cli(["dvc", "status"], root)

    again = cli(["synthmed", "baseline", "--pipeline", "tiny"], root)
    assert "nothing to commit" in again, again

    head = cli(["git", "rev-parse", "HEAD"], root)
    (root / "notes.py").write_text("x = 1\n")
    cli(["git", "add", "notes.py"], root)
    cli(["git", "commit", "-q", "-m", "code"], root)
    (root / "notes.py").write_text("x = 2\n")
    proc = subprocess.run(
        ["synthmed", "baseline", "--pipeline", "tiny"], cwd=root, env=base_env(), capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    error = proc.stderr.strip().splitlines()
    assert len(error) == 1 and "uncommitted changes" in error[0] and "notes.py" in error[0], error
    assert cli(["git", "rev-parse", "HEAD~1"], root) == head  # only the "code" commit was added
