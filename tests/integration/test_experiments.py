"""An experiment through DVC's own CLI: ``dvc exp run -S`` on a pipelines.yaml key reruns
the affected stages, and ``dvc exp show`` / ``dvc metrics diff`` compare it to the
baseline commit."""

from __future__ import annotations

import json
import re

import pytest

from tests.integration.helpers import FAST, cli, copy_project

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
SHOW_DROP = ".*/|Created|State|Executor"  # DVC matches from the start of the column name


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
    cli(["dvc", "exp", "run", "--queue", "-S", f"pipelines.yaml:{PARAM}={counts[0]},{counts[1]}"], root)
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

    # the changed columns: the swept param and the headline numbers (docs/experiments.md:
    # DVC's columns of changed data deps, 36-character hashes, and the queue's State and
    # Executor are dropped; verdict and delta are kept even when no experiment changed them)
    table = cli(
        ["dvc", "exp", "show", "--only-changed", "--drop", SHOW_DROP, "--keep", r"^tiny\.(verdict|delta)$"], root
    )
    width = max(len(line.rstrip()) for line in table.splitlines())
    assert width <= TERMINAL, f"{width} columns:\n{table}"
    header = next(line for line in table.splitlines() if "Experiment" in line)
    assert "tiny.verdict" in header and "tiny.delta" in header and PARAM in header, header
    for name in names.values():
        row = next(line for line in table.splitlines() if f"[{name}]" in line)
        assert any(v in row for v in ("no measurable effect", "helps", "hurts", "REJECTED", "not tested")), row
    metrics_diff = cli(["dvc", "metrics", "diff", "--all"], root)
    assert max(len(line.rstrip()) for line in metrics_diff.splitlines()) <= TERMINAL, metrics_diff

    out = tmp_path / "plots"
    cli(["dvc", "plots", "diff", names[counts[0]], names[counts[1]], "-o", str(out)], root)
    html = (out / "index.html").read_text()
    rows = _plot_rows(html, {"class", "auc"})  # the tiny/realism plot
    revs = {row["rev"] for row in rows}
    assert {names[counts[0]], names[counts[1]]} <= revs, revs
    # the rendered numbers are each experiment's own realism.csv
    for count, name in names.items():
        cli(["dvc", "exp", "apply", name], root)
        own = (root / "metrics" / "tiny" / "plots" / "realism.csv").read_text().splitlines()[1:]
        expected = {(line.split(",")[0], float(line.split(",")[1])) for line in own}
        rendered = {(row["class"], float(row["auc"])) for row in rows if row["rev"] == name}
        assert rendered == expected, (count, rendered, expected)
