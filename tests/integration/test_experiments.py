"""An experiment through DVC's own CLI: ``dvc exp run -S`` on a pipelines.yaml key reruns
the affected stages, and ``dvc exp show`` / ``dvc metrics diff`` compare it to the
baseline commit."""

from __future__ import annotations

import json

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
    generated = _find(exp_data["metrics"]["metrics/tiny/quality.json"]["data"], "totals")["generated"]
    assert generated == 3 * count

    # the experiment's results are in the workspace: compare them with the baseline commit
    diff = json.loads(cli(["dvc", "metrics", "diff", "--json"], root))
    totals = diff["metrics/tiny/quality.json"]["totals.generated"]
    assert (totals["old"], totals["new"]) == (3 * baseline, 3 * count)
    params = json.loads(cli(["dvc", "params", "diff", "--json"], root))
    assert params["pipelines.yaml"][PARAM] == {"old": baseline, "new": count, "diff": count - baseline}
