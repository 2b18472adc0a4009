"""The stage table, the committed dvc.yaml, and the up-to-date fingerprint."""

from __future__ import annotations

from pathlib import Path

import yaml

from tasks.config import load_pipeline
from tasks.stages import ORDER, STAGES, dvc_yaml

REPO = Path(__file__).resolve().parents[2]


def test_committed_dvc_yaml_is_the_rendered_stage_table():
    cfg = load_pipeline("demo", REPO / "pipelines.yaml")
    committed = yaml.safe_load((REPO / "dvc.yaml").read_text())
    demo = dvc_yaml(
        "demo", cfg, present=set(yaml.safe_load((REPO / "pipelines.yaml").read_text())["pipelines"]["demo"])
    )
    assert {name: committed["stages"][name] for name in demo["stages"]} == demo["stages"]
    assert all(plot in committed["plots"] for plot in demo["plots"])


def test_stage_code_deps_exist_and_order_is_the_pipeline():
    assert ORDER == ("ingest", "train", "synthesize", "filter", "retrain", "report")
    for stage in STAGES.values():
        for file in stage.code:
            assert (REPO / file).is_file() or (REPO / file).is_dir(), file
        module, name = stage.function.split(":")
        assert (REPO / (module.replace(".", "/") + ".py")).is_file()
