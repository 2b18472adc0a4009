"""Load: two pipelines of one project run their stages at the same time, in threads of
one process (as a Prefect task runner would) and as separate processes (as two CLI or
DVC invocations would), and every output equals the one a run on its own gives."""

from __future__ import annotations

import csv
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from generators.shards import read_table, verify_dataset
from tasks.config import load_pipeline
from tasks.paths import PipelinePaths
from tasks.stages import digest_path, run_stage
from tests.flows.project import env, write_images
from tests.reliability.helpers import pipeline_dict, write_pipelines

PIPELINES = ("a", "b")


def make_project(root: Path) -> Path:
    """Phantom PNGs; pipeline ``a`` reads the folder, ``b`` a CSV listing the same files
    with another split seed and 16-bit storage."""
    write_images(root / "images", subjects=6, per_subject=2, size=24)
    rows = [
        [path.relative_to(root / "images").as_posix(), path.parent.name, path.name.split("_")[0]]
        for path in sorted((root / "images").rglob("*.png"))
    ]
    with open(root / "images" / "list.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["image", "label", "subject"], *rows])
    a = pipeline_dict({"kind": "folder", "path": "images", "subject_regex": r"^(sub\d+)_"}, count_per_class=8)
    b = pipeline_dict({"kind": "csv", "path": "images/list.csv"}, count_per_class=6, seed=99)
    b.update(seed=5, preprocess={"size": 16, "bit_depth": 16})
    return write_pipelines(root, {"a": a, "b": b})


def outputs(root: Path, pipeline: str) -> dict[str, str | None]:
    paths = PipelinePaths(root, pipeline)
    return {
        name: digest_path(path)
        for name, path in (
            ("real", paths.real),
            ("rejects", paths.rejects),
            ("generator", paths.generator),
            ("synthetic", paths.synthetic),
        )
    }


def run_alone(root: Path) -> dict[str, dict[str, str | None]]:
    config = make_project(root)
    for pipeline in PIPELINES:
        cfg = load_pipeline(pipeline, config)
        for verb in ("ingest", "train", "synthesize"):
            run_stage(verb, cfg, PipelinePaths(root, pipeline))
    return {p: outputs(root, p) for p in PIPELINES}


def check_outputs(root: Path, expected: dict[str, dict[str, str | None]]) -> None:
    for pipeline in PIPELINES:
        paths = PipelinePaths(root, pipeline)
        verify_dataset(paths.real)
        verify_dataset(paths.synthetic)
        assert set(read_table(paths.synthetic, columns=["source"]).column("source").to_pylist()) == {
            f"synthmed/{pipeline}-cgan@1.0.0"
        }
        assert outputs(root, pipeline) == expected[pipeline], pipeline
        leftovers = [p.name for p in (root / "data" / pipeline).iterdir() if p.name.startswith(".")]
        assert leftovers == [], leftovers
    assert expected["a"]["real"] != expected["b"]["real"]  # different pipelines, different data


@pytest.fixture(scope="module")
def alone(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str | None]]:
    return run_alone(tmp_path_factory.mktemp("alone"))


def test_two_pipelines_in_threads_of_one_process(tmp_path: Path, alone: dict) -> None:
    config = make_project(tmp_path)
    cfgs = {p: load_pipeline(p, config) for p in PIPELINES}

    def stage(verb: str):
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = [pool.submit(run_stage, verb, cfgs[p], PipelinePaths(tmp_path, p)) for p in PIPELINES]
            return [f.result() for f in futures]

    stage("ingest")
    for pipeline in PIPELINES:  # training seeds torch's global RNG: one at a time (see the report)
        run_stage("train", cfgs[pipeline], PipelinePaths(tmp_path, pipeline))
    summaries = stage("synthesize")
    assert [s["counts"] for s in summaries] == [
        {"disc": 8, "ring": 8, "square": 8},
        {"disc": 6, "ring": 6, "square": 6},
    ]
    check_outputs(tmp_path, alone)


CHAIN = """
import sys
from flows.cli import main
for verb in ("ingest", "train", "synthesize"):
    code = main(["stage", verb, "--pipeline", sys.argv[1]])
    if code:
        sys.exit(code)
"""


@pytest.mark.integration
def test_two_pipelines_as_two_processes(tmp_path: Path, alone: dict) -> None:
    make_project(tmp_path)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHAIN, pipeline],
            cwd=tmp_path,
            env=env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pipeline in PIPELINES
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    check_outputs(tmp_path, alone)
