"""The stage table: each verb's function, inputs, outputs and parameters, and the
fingerprint that tells whether a stage's outputs are up to date.

Both drivers use this table: the CLI (``synthmed stage VERB``, which ``dvc.yaml`` calls)
and the Prefect flow. ``dvc.yaml`` lists the same deps/outs/params; a test checks that
the two agree.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from generators.shards import MANIFEST_NAME, sha256_file, write_json_atomic
from tasks.config import PipelineConfig
from tasks.paths import PipelinePaths

log = logging.getLogger(__name__)
CODE_ROOTS = ("tasks", "generators")


@dataclass(frozen=True)
class Stage:
    """``function``: ``module:name`` of the stage function; ``params``: the config keys it reads."""

    verb: str
    function: str
    deps: Callable[[PipelinePaths, PipelineConfig], list[Path]]
    outs: Callable[[PipelinePaths], list[Path]]
    params: tuple[str, ...]
    metrics: Callable[[PipelinePaths], list[Path]] = lambda p: []
    code: tuple[str, ...] = ()

    def load(self) -> Callable[[PipelineConfig, PipelinePaths], dict[str, Any]]:
        module, name = self.function.split(":")
        return getattr(importlib.import_module(module), name)


def source_paths(cfg: PipelineConfig, paths: PipelinePaths) -> list[Path]:
    """Files the ingest stage reads (none for the packaged MNI152 source)."""
    source = cfg.source
    if source.kind == "folder":
        return [paths.root / source.path]
    if source.kind == "csv":
        csv_path = paths.root / source.path
        return [csv_path, paths.root / source.root] if source.root else [csv_path, csv_path.parent]
    return []


STAGES: dict[str, Stage] = {
    s.verb: s
    for s in (
        Stage(
            "ingest",
            "tasks.ingest:ingest",
            lambda p, c: source_paths(c, p),
            lambda p: [p.real, p.rejects],
            ("seed", "source", "preprocess"),
            code=(
                "tasks/ingest.py",
                "tasks/readers.py",
                "tasks/pseudonym.py",
                "tasks/storage.py",
                "generators/shards.py",
            ),
        ),
        Stage(
            "train",
            "tasks.train:train",
            lambda p, c: [p.real],
            lambda p: [p.generator],
            ("threads", "device", "generator"),
            lambda p: [p.metrics / "train.json"],
            code=("tasks/train.py", "generators/training.py", "generators/train_spec.py", "generators/architectures"),
        ),
        Stage(
            "synthesize",
            "tasks.synthesize:synthesize",
            lambda p, c: [p.real, p.generator],
            lambda p: [p.synthetic],
            ("device", "synthesis"),
            code=(
                "tasks/synthesize.py",
                "generators/compiled.py",
                "generators/registry.py",
                "generators/architectures",
                "generators/shards.py",
            ),
        ),
        Stage(
            "filter",
            "tasks.filter:filter_synthetic",
            lambda p, c: [p.real, p.synthetic],
            lambda p: [p.filtered],
            ("seed", "threads", "quality"),
            lambda p: [p.metrics / "quality.json"],
            code=(
                "tasks/filter.py",
                "tasks/downstream.py",
                "tasks/features.py",
                "tasks/fid_inception.py",
                "tasks/nn_filters.py",
                "tasks/quality_metrics.py",
                "tasks/quality_sets.py",
            ),
        ),
        Stage(
            "retrain",
            "tasks.retrain:retrain",
            lambda p, c: [p.real, p.filtered],
            lambda p: [p.metrics / "retrain_seeds.csv"],
            ("seed", "threads", "retrain"),
            lambda p: [p.metrics / "retrain.json"],
            code=("tasks/retrain.py", "tasks/downstream.py"),
        ),
        Stage(
            "report",
            "tasks.report:report",
            lambda p, c: [
                p.real,
                p.synthetic,
                p.filtered,
                p.generator,
                p.metrics / "quality.json",
                p.metrics / "retrain.json",
            ],
            lambda p: [p.reports],
            ("report",),
            code=("tasks/report.py",),
        ),
    )
}
ORDER: tuple[str, ...] = tuple(STAGES)


PLOTS = ("retrain_seeds.csv",)


def dvc_stages(pipeline: str, cfg: PipelineConfig, *, with_code: bool = True) -> dict[str, Any]:
    """The ``dvc.yaml`` content for one pipeline, rendered from this table (one source of
    truth; ``synthmed dvc-yaml`` prints it and a test checks the committed file)."""
    paths = PipelinePaths(Path("."), pipeline)

    def rel(p: Path) -> str:
        return p.as_posix()

    stages: dict[str, Any] = {}
    for verb, stage in STAGES.items():
        deps = [rel(p) for p in stage.deps(paths, cfg)]
        entry: dict[str, Any] = {"cmd": f"synthmed stage {verb} --pipeline {pipeline}"}
        if deps or (with_code and stage.code):
            entry["deps"] = deps + (list(stage.code) if with_code else [])
        entry["params"] = [{"pipelines.yaml": [f"pipelines.{pipeline}.{key}" for key in stage.params]}]
        outs = [rel(p) for p in stage.outs(paths) if p.name not in PLOTS]
        if outs:
            entry["outs"] = outs
        metrics = [{rel(p): {"cache": False}} for p in stage.metrics(paths)]
        if metrics:
            entry["metrics"] = metrics
        plots = [{rel(p): {"cache": False}} for p in stage.outs(paths) if p.name in PLOTS]
        if plots:
            entry["plots"] = plots
        stages[verb if pipeline == "demo" else f"{verb}-{pipeline}"] = entry
    return stages


def dvc_yaml(pipeline: str, cfg: PipelineConfig, *, with_code: bool = True) -> dict[str, Any]:
    """A whole ``dvc.yaml`` for one pipeline, with its loss-curve and per-seed plots."""
    paths = PipelinePaths(Path("."), pipeline)
    return {
        "stages": dvc_stages(pipeline, cfg, with_code=with_code),
        "plots": [
            {(paths.generator / "history.csv").as_posix(): {"x": "epoch", "y": ["loss_d", "loss_g"]}},
            (paths.metrics / "retrain_seeds.csv").as_posix(),
        ],
    }


def digest_path(path: Path) -> str | None:
    """Content digest of a file or directory (None when absent). A dataset directory is
    digested through its manifest, which records every shard's sha256."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    manifest = path / MANIFEST_NAME
    if manifest.is_file():
        shards = json.loads(manifest.read_text()).get("shards", [])
        if not all((path / s["file"]).is_file() for s in shards):
            return None
        digest.update(sha256_file(manifest).encode())
        return digest.hexdigest()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def code_digest() -> str:
    """sha256 over the source of the stage and generator packages."""
    digest = hashlib.sha256()
    base = Path(__file__).resolve().parent.parent
    for root in CODE_ROOTS:
        for file in sorted((base / root).rglob("*.py")):
            digest.update(str(file.relative_to(base)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def fingerprint(verb: str, cfg: PipelineConfig, paths: PipelinePaths) -> str:
    """Hash of what a stage's outputs depend on: its params, its inputs' content, the code."""
    stage = STAGES[verb]
    params = {key: cfg.model_dump(mode="json")[key] for key in stage.params}
    inputs = {str(p.relative_to(paths.root)): digest_path(p) for p in stage.deps(paths, cfg)}
    payload = json.dumps({"verb": verb, "params": params, "inputs": inputs, "code": code_digest()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _record_path(verb: str, paths: PipelinePaths) -> Path:
    return paths.state / f"{verb}.json"


def up_to_date(verb: str, cfg: PipelineConfig, paths: PipelinePaths) -> dict[str, Any] | None:
    """The recorded summary when the stage's outputs match its current fingerprint, else None."""
    record_path = _record_path(verb, paths)
    if not record_path.is_file():
        return None
    record = json.loads(record_path.read_text())
    if record.get("fingerprint") != fingerprint(verb, cfg, paths):
        return None
    stage = STAGES[verb]
    for out in [*stage.outs(paths), *stage.metrics(paths)]:
        if record["outputs"].get(str(out.relative_to(paths.root))) != digest_path(out):
            return None
    return record["summary"]


def run_stage(
    verb: str, cfg: PipelineConfig, paths: PipelinePaths, *, force: bool = True, **options: Any
) -> dict[str, Any]:
    """Run one stage; with ``force=False`` an up-to-date stage is skipped. The summary gains
    ``skipped`` (bool). A record of the fingerprint and output digests is kept under
    ``paths.state`` so either driver can tell later whether the outputs are current.
    ``options`` go to the stage function and must not change its outputs (e.g.
    ``map_shards`` of ``synthesize``: where shards are made, not what they hold)."""
    if verb not in STAGES:
        raise KeyError(verb)
    if not force:
        summary = up_to_date(verb, cfg, paths)
        if summary is not None:
            log.info("stage %s is up to date; skipped", verb)
            return {**summary, "skipped": True}
    stage = STAGES[verb]
    summary = stage.load()(cfg, paths, **options)
    paths.state.mkdir(parents=True, exist_ok=True)
    outputs = {str(p.relative_to(paths.root)): digest_path(p) for p in [*stage.outs(paths), *stage.metrics(paths)]}
    write_json_atomic(
        {"fingerprint": fingerprint(verb, cfg, paths), "outputs": outputs, "summary": summary},
        _record_path(verb, paths),
    )
    return {**summary, "skipped": False}
