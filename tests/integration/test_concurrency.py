"""Two pipelines run at once in one repository (two ``synthmed run`` processes against a
real Prefect server): neither corrupts the other's outputs, ``dvc.lock`` or the DVC
cache."""

from __future__ import annotations

import hashlib
import subprocess

import pytest
import yaml

from flows.versioning import pipeline_stages
from generators.shards import read_manifest, verify_dataset
from tasks.stages import ORDER
from tests.flows.project import TINY, make_project
from tests.flows.project import env as base_env
from tests.integration.helpers import FAST, cli

pytestmark = pytest.mark.integration
PIPELINES = {
    "tiny": {**TINY, **FAST},
    "tiny2": {**TINY, **FAST, "seed": 7, "synthesis": {**FAST["synthesis"], "count_per_class": 9, "seed": 99}},
}


def _two_pipeline_project(root):
    config = make_project(root, dvc=True, overrides=FAST)
    config.write_text(yaml.safe_dump({"pipelines": PIPELINES}, sort_keys=False))
    stages, plots = {}, []
    for name in PIPELINES:
        rendered = yaml.safe_load(cli(["synthmed", "dvc-yaml", "--pipeline", name, "--no-code"], root))
        stages.update(rendered["stages"])
        plots += rendered["plots"]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages, "plots": plots}, sort_keys=False))
    cli(["git", "add", "-A"], root)
    cli(["git", "commit", "-q", "-m", "two pipelines"], root)
    return config


def _cache_is_sound(cache) -> int:
    """Every object in the DVC cache hashes to its own name; returns how many there are."""
    objects = [p for p in (cache / "files" / "md5").rglob("*") if p.is_file()]
    for obj in objects:
        name = obj.parent.name + obj.name.removesuffix(".dir")
        assert hashlib.md5(obj.read_bytes()).hexdigest() == name, f"corrupt cache object {obj}"
    return len(objects)


def test_two_pipelines_at_once_do_not_corrupt_each_other(prefect_server, prefect_client, tmp_path):
    config = _two_pipeline_project(tmp_path / "proj")
    root = config.parent
    env = {**base_env(), **prefect_server.env()}
    procs = {
        name: subprocess.Popen(
            ["synthmed", "run", "--pipeline", name, "--config", str(config)],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in PIPELINES
    }
    outputs = {name: proc.communicate(timeout=600)[0] for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}:\n{outputs[name][-4000:]}"

    # they really ran at the same time
    runs = [r for r in prefect_client.read_flow_runs() if r.parameters["params"].get("config") == str(config)]
    assert sorted(r.parameters["params"]["pipeline"] for r in runs) == sorted(PIPELINES)
    (a, b) = runs
    assert a.start_time < b.end_time and b.start_time < a.end_time, "the two runs did not overlap"

    # each pipeline's datasets are whole and hold its own settings
    for name, spec in PIPELINES.items():
        for dataset in ("real", "synthetic", "filtered"):
            verify_dataset(root / "data" / name / dataset)
        counts = read_manifest(root / "data" / name / "synthetic")["provenance"]["counts"]
        assert set(counts.values()) == {spec["synthesis"]["count_per_class"]}

    # DVC: each run committed its own stages only ("tiny" is a prefix of "tiny2" on purpose),
    # both pipelines are recorded, nothing is left to redo or commit, the cache is intact
    assert pipeline_stages(root, "tiny") == [f"{verb}-tiny" for verb in ORDER]
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert {f"{verb}-{name}" for verb in ("ingest", "synthesize", "report") for name in PIPELINES} <= set(lock)
    assert "up to date" in cli(["dvc", "status"], root).lower()
    assert _cache_is_sound(root / ".dvc" / "cache") > 10
