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

from generators.errors import DataError
from generators.shards import MANIFEST_NAME, REWRITE_HINT, sha256_file, verify_dataset, write_json_atomic
from tasks import summary
from tasks.config import PipelineConfig
from tasks.lock import pipeline_lock
from tasks.paths import PipelinePaths
from tasks.pseudonym import key_id

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
    fingerprint_extra: Callable[[], dict[str, str]] = lambda: {}  # what else the outputs depend on (no secrets)

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


def mask_paths(cfg: PipelineConfig, paths: PipelinePaths) -> list[Path]:
    """The folder of ``synthesis.masks_from`` the synthesize stage reads (none for ``train``)."""
    masks_from = cfg.synthesis.masks_from
    return [] if masks_from in (None, "train") else [paths.root / masks_from]


STAGES: dict[str, Stage] = {
    s.verb: s
    for s in (
        Stage(
            "ingest",
            "tasks.ingest:ingest",
            lambda p, c: source_paths(c, p),
            lambda p: [p.real, p.rejects],
            ("seed", "source", "preprocess"),
            fingerprint_extra=lambda: {"pseudonym_key_id": key_id()},  # a keyed digest, never the key
            code=(
                "tasks/ingest.py",
                "tasks/ingest_volumes.py",
                "tasks/ingest_pixels.py",
                "tasks/ingest_sources.py",
                "tasks/ingest_splits.py",
                "tasks/readers.py",
                "tasks/reader_base.py",
                "tasks/readers_dicom.py",
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
            code=(
                "tasks/train.py",
                "tasks/preflight.py",
                "generators/training.py",
                "generators/train_spec.py",
                "generators/architectures",
            ),
        ),
        Stage(
            "synthesize",
            "tasks.synthesize:synthesize",
            lambda p, c: [p.real, p.generator, *mask_paths(c, p)],
            lambda p: [p.synthetic],
            ("device", "synthesis"),
            code=(
                "tasks/synthesize.py",
                "tasks/mask_sources.py",
                "generators/seed_stream.py",
                "generators/contract.py",
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
                "tasks/quality_volumes.py",
                "tasks/quality_volumes_slices.py",
                "tasks/mask_filters.py",
                "tasks/downstream.py",
                "tasks/features.py",
                "tasks/fid_inception.py",
                "tasks/nn_filters.py",
                "tasks/quality_metrics.py",
                "tasks/quality_sets.py",
                "tasks/realism.py",
                "tasks/contrastive.py",
            ),
        ),
        Stage(
            "retrain",
            "tasks.retrain:retrain",
            lambda p, c: [p.real, p.filtered],
            lambda p: [p.metrics / name for name in UNCACHED_OUTS],
            ("seed", "threads", "retrain"),
            lambda p: [p.metrics / "retrain.json"],
            code=(
                "tasks/retrain.py",
                "tasks/retrain_data.py",
                "tasks/retrain_runs.py",
                "tasks/statistics.py",
                "tasks/downstream.py",
                "tasks/preflight.py",
            ),
        ),
        Stage(
            "report",
            "tasks.summary:report_with_summary",
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
            lambda p: summary.outputs(p),  # summary.json (the DVC metrics) and the DVC plot files
            code=(
                "tasks/report.py",
                "tasks/report_volumes.py",
                "tasks/quality_volumes_slices.py",
                "tasks/quality_report.py",
                "tasks/summary.py",
            ),
        ),
    )
}
ORDER: tuple[str, ...] = tuple(STAGES)


#: retrain's small per-run tables, kept in git (cache: false) like the metrics files
UNCACHED_OUTS = ("retrain_seeds.csv", "retrain_ratios.csv", "retrain_fractions.csv")


def _params(pipeline: str, stage: Stage, present: set[str] | None) -> list[dict[str, list[str]]]:
    """The stage's ``params`` entry: only keys written in pipelines.yaml (``present``; None:
    all), since DVC refuses a stage whose params are missing from the file; an absent key
    means the default, which only changes with the code (a code dep)."""
    keys = [f"pipelines.{pipeline}.{key}" for key in stage.params if present is None or key in present]
    return [{"pipelines.yaml": keys}] if keys else []


def dvc_stages(
    pipeline: str, cfg: PipelineConfig, *, with_code: bool = True, present: set[str] | None = None
) -> dict[str, Any]:
    """The ``dvc.yaml`` stages of one pipeline, rendered from this table (one source of
    truth; ``synthmed dvc-yaml`` prints it and a test checks the committed file).
    ``present``: the pipeline's top-level keys written in pipelines.yaml (None: all).
    ``summary.json`` is the stage's only DVC metrics file; the detailed JSON files and the
    plot CSVs are outputs kept in git (``cache: false``)."""
    paths = PipelinePaths(Path("."), pipeline)

    def rel(p: Path) -> str:
        return p.as_posix()

    stages: dict[str, Any] = {}
    for verb, stage in STAGES.items():
        deps = [rel(p) for p in stage.deps(paths, cfg)]
        entry: dict[str, Any] = {"cmd": f"synthmed stage {verb} --pipeline {pipeline}"}
        if deps or (with_code and stage.code):
            entry["deps"] = deps + (list(stage.code) if with_code else [])
        params = _params(pipeline, stage, present)
        if params:
            entry["params"] = params
        uncached = [p for p in [*stage.outs(paths), *stage.metrics(paths)] if p.name in UNCACHED_OUTS]
        uncached += [p for p in stage.metrics(paths) if p.name != summary.SUMMARY_NAME and p not in uncached]
        outs: list[Any] = [rel(p) for p in stage.outs(paths) if p not in uncached]
        outs += [{rel(p): {"cache": False}} for p in uncached]
        if outs:
            entry["outs"] = outs
        metrics = [{rel(p): {"cache": False}} for p in stage.metrics(paths) if p.name == summary.SUMMARY_NAME]
        if metrics:
            entry["metrics"] = metrics
        stages[verb if pipeline == "demo" else f"{verb}-{pipeline}"] = entry
    return stages


def dvc_yaml(
    pipeline: str, cfg: PipelineConfig, *, with_code: bool = True, present: set[str] | None = None
) -> dict[str, Any]:
    """A whole ``dvc.yaml`` for one pipeline: its stages and its plots
    (:func:`tasks.summary.plot_definitions`). All pipelines of a file:
    :func:`flows.versioning.render_dvc_yaml`."""
    return {
        "stages": dvc_stages(pipeline, cfg, with_code=with_code, present=present),
        "plots": summary.plot_definitions(cfg, PipelinePaths(Path("."), pipeline)),
    }


def digest_path(path: Path, *, fix: str = REWRITE_HINT) -> str | None:
    """Content digest of a file or directory (None when absent). A dataset directory is
    digested through its manifest, which records every shard's sha256, after every shard
    is checked against it (``verify_dataset``): a corrupted, truncated or edited dataset
    raises a one-line :class:`DataError` ending with ``fix``, never a stale digest."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    manifest = path / MANIFEST_NAME
    if manifest.is_file():
        verify_dataset(path, fix=fix)
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


def _dep_key(path: Path, root: Path) -> str:
    """A dep's name in the fingerprint: relative to the project root, or absolute (posix)
    for data outside it (an absolute ``source.path``)."""
    return str(path.relative_to(root)) if path.is_relative_to(root) else Path(path).absolute().as_posix()


def fingerprint(verb: str, cfg: PipelineConfig, paths: PipelinePaths) -> str:
    """Hash of what a stage's outputs depend on: its params, its inputs' content, the code."""
    stage = STAGES[verb]
    params = {key: cfg.model_dump(mode="json")[key] for key in stage.params}
    inputs = {_dep_key(p, paths.root): digest_path(p, fix=rewrite_hint(p, paths)) for p in stage.deps(paths, cfg)}
    payload = {"verb": verb, "params": params, "inputs": inputs, "code": code_digest()}
    payload.update({f"extra:{k}": v for k, v in stage.fingerprint_extra().items()})
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _record_path(verb: str, paths: PipelinePaths) -> Path:
    return paths.state / f"{verb}.json"


def rewrite_hint(path: Path, paths: PipelinePaths) -> str:
    """How to restore a stage output: rerun the stage that writes it, or check it out of DVC."""
    rel = Path(path).relative_to(paths.root).as_posix() if Path(path).is_relative_to(paths.root) else str(path)
    for verb, stage in STAGES.items():
        if Path(path) in stage.outs(paths):
            return f"rerun `synthmed stage {verb} --pipeline {paths.pipeline}` or `dvc checkout {rel}`"
    return f"restore {rel} (e.g. `dvc checkout {rel}`)"


def verify_inputs(verb: str, cfg: PipelineConfig, paths: PipelinePaths) -> None:
    """Check every dataset a stage reads against its manifest before the stage trusts it
    (sha256 per shard, row and class counts); a one-line :class:`DataError` names the bad
    file and how to restore it."""
    for dep in STAGES[verb].deps(paths, cfg):
        if (dep / MANIFEST_NAME).is_file():
            verify_dataset(dep, fix=rewrite_hint(dep, paths))


ROOT_MARK = "${project}"  # stands for the project root in recorded summaries


def _portable(value: Any, old: str, new: str) -> Any:
    """``value`` with every string that starts with the path ``old`` rebased onto ``new``
    (summaries name output files by absolute path; a copied project must not be served
    the original's)."""
    if isinstance(value, str):
        if value == old or value.startswith(old + "/"):
            return new + value[len(old) :]
        return value
    if isinstance(value, dict):
        return {k: _portable(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v, old, new) for v in value]
    return value


def _read_record(verb: str, paths: PipelinePaths) -> dict[str, Any] | None:
    """The stage record, or None when absent or unreadable (truncated, edited): an
    unreadable record only means the stage reruns."""
    record_path = _record_path(verb, paths)
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_bytes())
        if not (
            isinstance(record, dict)
            and isinstance(record.get("fingerprint"), str)
            and isinstance(record.get("outputs"), dict)
            and isinstance(record.get("summary"), dict)
        ):
            raise ValueError("not a stage record")
    except (OSError, ValueError) as exc:
        log.warning(
            ".synthmed/%s/%s.json: unreadable stage record (%s); stage %s counts as not up to date",
            paths.pipeline,
            verb,
            type(exc).__name__,
            verb,
        )
        return None
    return record


def up_to_date(verb: str, cfg: PipelineConfig, paths: PipelinePaths) -> dict[str, Any] | None:
    """The recorded summary when the stage's outputs match its current fingerprint, else None.

    A corrupted input dataset raises :class:`DataError` (the stage cannot run on it); a
    corrupted, missing or edited output only makes the stage not up to date."""
    record = _read_record(verb, paths)
    if record is None:
        return None
    if record["fingerprint"] != fingerprint(verb, cfg, paths):
        return None
    stage = STAGES[verb]
    for out in [*stage.outs(paths), *stage.metrics(paths)]:
        try:
            current = digest_path(out)
        except DataError as exc:
            log.warning("stage %s output is not intact (%s); it reruns", verb, exc)
            return None
        if record["outputs"].get(str(out.relative_to(paths.root))) != current:
            return None
    return _portable(record["summary"], ROOT_MARK, str(paths.root))


def run_stage(
    verb: str, cfg: PipelineConfig, paths: PipelinePaths, *, force: bool = True, **options: Any
) -> dict[str, Any]:
    """Run one stage; with ``force=False`` an up-to-date stage is skipped. The summary gains
    ``skipped`` (bool). A record of the fingerprint and output digests is kept under
    ``paths.state`` so either driver can tell later whether the outputs are current.
    ``options`` go to the stage function and must not change its outputs (e.g.
    ``map_shards`` of ``synthesize``: where shards are made, not what they hold).

    Holds the pipeline's lock (``tasks/lock.py``) throughout, and checks the stage's input
    datasets against their manifests before the stage function reads them."""
    if verb not in STAGES:
        raise KeyError(verb)
    with pipeline_lock(paths):
        if not force:
            summary = up_to_date(verb, cfg, paths)
            if summary is not None:
                log.info("stage %s is up to date; skipped", verb)
                return {**summary, "skipped": True}
        stage = STAGES[verb]
        verify_inputs(verb, cfg, paths)
        summary = stage.load()(cfg, paths, **options)
        paths.state.mkdir(parents=True, exist_ok=True)
        outs = [*stage.outs(paths), *stage.metrics(paths)]
        outputs = {str(p.relative_to(paths.root)): digest_path(p) for p in outs}
        record = {
            "fingerprint": fingerprint(verb, cfg, paths),
            "outputs": outputs,
            "summary": _portable(summary, str(paths.root), ROOT_MARK),
        }
        write_json_atomic(record, _record_path(verb, paths))
        return {**summary, "skipped": False}
