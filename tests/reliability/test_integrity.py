"""Integrity: no corrupted, truncated, edited or stale data is served as current.

A flipped bit or a truncation inside a shard, a truncated or edited ``_manifest.json``
and a truncated stage record under ``.synthmed`` each give a one-line error that names
the file and the fix (or, for a stage's own output or record, a rerun), never a
traceback and never a result computed from the altered data. Also here: a disk that
fills up while a dataset is written, and a corrupt training checkpoint."""

from __future__ import annotations

import errno
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import generators.shards as shards
from generators.errors import DataError
from generators.shards import MANIFEST_NAME, DatasetWriter, read_manifest, read_table, verify_dataset
from generators.train_spec import TrainSpec
from generators.training import TrainingData, train_generator
from tasks.stages import run_stage, up_to_date, verify_inputs
from tasks.synthesize import synthesize
from tests.reliability.helpers import assert_one_line, cli, trained_project
from tests.reliability.test_crash_resume import shard_table, write_all

PIPELINE = "integ"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project with real data, a trained tiny generator and a synthetic set (3 shards),
    each stage recorded as up to date; tests work on copies."""
    root = tmp_path_factory.mktemp("built")
    cfg, paths = trained_project(root, PIPELINE, count_per_class=4, shard_rows=4, batch_size=4)
    run_stage("train", cfg, paths)  # recorded, so --skip-current knows it
    run_stage("synthesize", cfg, paths)
    shutil.copytree(paths.synthetic, paths.filtered)  # a valid dataset where filter writes
    return root


@pytest.fixture
def project(built: Path, tmp_path: Path):
    root = tmp_path / "project"
    shutil.copytree(built, root)
    from tasks.config import load_pipeline
    from tasks.paths import PipelinePaths

    return load_pipeline(PIPELINE, root / "pipelines.yaml"), PipelinePaths(root, PIPELINE)


def flip_bit(path: Path) -> None:
    """Flip one bit in the middle of a file (inside a compressed data page of a shard)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x04
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# dataset -> (stages that read it, the stage that writes it)
READERS = {
    "real": (("train", "synthesize", "filter", "retrain", "report"), "ingest"),
    "synthetic": (("filter", "report"), "synthesize"),
    "filtered": (("retrain", "report"), "filter"),
}


@pytest.mark.parametrize("damage", [flip_bit, truncate], ids=["bit-flip", "truncated"])
@pytest.mark.parametrize("dataset", sorted(READERS))
def test_a_damaged_shard_is_refused_by_every_stage_that_reads_it(project, dataset, damage) -> None:
    cfg, paths = project
    name = read_manifest(getattr(paths, dataset))["shards"][-1]["file"]
    damage(getattr(paths, dataset) / name)
    readers, writer = READERS[dataset]
    for verb in readers:
        with pytest.raises(DataError) as err:
            verify_inputs(verb, cfg, paths)
        assert_one_line(
            str(err.value),
            f"data/{PIPELINE}/{dataset}/{name}: sha256 does not match {MANIFEST_NAME}",
            f"rerun `synthmed stage {writer} --pipeline {PIPELINE}`",
            f"`dvc checkout data/{PIPELINE}/{dataset}`",
        )
    if dataset == "real":  # the stage records say "up to date" until the data is checked
        with pytest.raises(DataError, match="sha256 does not match"):
            up_to_date("synthesize", cfg, paths)
        card = (paths.generator / "card.yaml").read_bytes()
        with pytest.raises(DataError, match="sha256 does not match"):
            run_stage("train", cfg, paths)  # forced: still never trains on the altered pixels
        assert (paths.generator / "card.yaml").read_bytes() == card


def test_skip_current_reruns_a_stage_whose_own_output_was_damaged(project) -> None:
    cfg, paths = project
    before = read_manifest(paths.synthetic)
    flip_bit(paths.synthetic / "part-00002.parquet")
    summary = run_stage("synthesize", cfg, paths, force=False)
    assert summary["skipped"] is False
    assert verify_dataset(paths.synthetic) == before  # rewritten, byte-identical
    assert run_stage("synthesize", cfg, paths, force=False)["skipped"] is True


def test_truncated_manifest_and_stage_record(project, caplog) -> None:
    cfg, paths = project
    # a truncated stage record: not up to date (one warning), and the rerun repairs it
    record = paths.state / "synthesize.json"
    truncate(record)
    with caplog.at_level(logging.WARNING, logger="tasks.stages"):
        assert up_to_date("synthesize", cfg, paths) is None
    assert any("unreadable stage record" in r.getMessage() for r in caplog.records)
    assert run_stage("synthesize", cfg, paths, force=False)["skipped"] is False
    assert up_to_date("synthesize", cfg, paths) is not None
    # a truncated manifest: a one-line error for its readers, a rerun for its writer
    intact = (paths.real / MANIFEST_NAME).read_bytes()
    truncate(paths.real / MANIFEST_NAME)
    with pytest.raises(DataError) as err:
        up_to_date("train", cfg, paths)
    assert_one_line(
        str(err.value),
        f"data/{PIPELINE}/real/{MANIFEST_NAME}: unreadable",
        f"synthmed stage ingest --pipeline {PIPELINE}",
    )
    (paths.real / MANIFEST_NAME).write_bytes(intact)
    truncate(paths.synthetic / MANIFEST_NAME)
    assert up_to_date("synthesize", cfg, paths) is None


def _traversal(m: dict) -> None:
    m["shards"][0]["file"] = "../synthetic/part-00000.parquet"


def _rows(m: dict) -> None:
    m["shards"][0]["rows"] += 1
    m["rows"] += 1


def _ghost_class(m: dict) -> None:
    m["class_counts"]["train"]["ghost"] = 3


def _not_an_object(m: dict) -> None:
    m.clear()
    m["shards"] = "everything"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_traversal, "expected shard entries"),
        (_rows, "rows, _manifest.json says"),
        (_ghost_class, "do not match the shards"),
        (_not_an_object, "expected a list under 'shards'"),
    ],
    ids=["path-traversal", "row-count", "extra-class", "wrong-shape"],
)
def test_an_edited_manifest_is_refused_with_one_line(project, edit, expected) -> None:
    cfg, paths = project
    manifest_path = paths.real / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    edit(manifest)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DataError) as err:
        verify_inputs("train", cfg, paths)
    assert_one_line(str(err.value), expected, f"synthmed stage ingest --pipeline {PIPELINE}")


def test_a_missing_shard_or_an_edited_stage_record(project) -> None:
    cfg, paths = project
    record = paths.state / "synthesize.json"
    record.write_text(json.dumps({"fingerprint": 3, "outputs": [], "summary": None}))  # valid JSON, wrong shape
    assert up_to_date("synthesize", cfg, paths) is None
    (paths.synthetic / "part-00001.parquet").unlink()
    with pytest.raises(DataError) as err:
        verify_inputs("filter", cfg, paths)
    assert_one_line(str(err.value), "part-00001.parquet: shard listed in _manifest.json is missing")
    assert run_stage("synthesize", cfg, paths, force=False)["skipped"] is False  # its writer repairs it
    verify_inputs("filter", cfg, paths)


def test_a_truncated_shard_read_directly_is_a_one_line_error(project) -> None:
    _, paths = project
    truncate(paths.synthetic / "part-00000.parquet")
    with pytest.raises(DataError) as err:
        read_table(paths.synthetic)
    assert_one_line(str(err.value), "part-00000.parquet: unreadable shard")


def test_a_manifest_that_drops_a_class_is_refused_not_synthesized_short(project) -> None:
    cfg, paths = project
    manifest_path = paths.real / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    del manifest["class_counts"]["train"]["ring"]  # shards unchanged: their sha256 still match
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DataError) as err:
        synthesize(cfg, paths)  # the stage function itself, as the API calls it
    assert_one_line(str(err.value), "class_counts", "do not match the shards", "synthmed stage ingest")
    assert sorted(read_manifest(paths.synthetic)["class_counts"]["train"]) == ["disc", "ring", "square"]


@pytest.mark.integration
def test_cli_stage_on_a_damaged_input_exits_2_with_one_line(project) -> None:
    _, paths = project
    flip_bit(paths.real / "part-00000.parquet")
    proc = cli(["stage", "train", "--pipeline", PIPELINE, "--skip-current"], paths.root)
    assert proc.returncode == 2, proc.stderr
    assert_one_line(proc.stderr, "error: ", "part-00000.parquet: sha256 does not match", "dvc checkout")


# --------------------------------------------------------------------------- disk full
def no_space() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


def half_shard_then_full(table, where, **kwargs):
    """``pq.write_table`` on a full disk: part of the file lands, then ENOSPC."""
    Path(where).write_bytes(b"PAR1 half a shard")
    raise no_space()


def half_json_then_full(data, path: Path) -> None:
    """``write_json_atomic`` on a full disk: a temp file is started, then ENOSPC."""
    Path(path).with_name(f".{Path(path).name}.0.tmp").write_text('{"schema_')
    raise no_space()


@pytest.mark.parametrize("where", ["last shard", "manifest"])
def test_disk_full_in_close_leaves_the_previous_dataset_and_no_staging(tmp_path, monkeypatch, where) -> None:
    target = tmp_path / "out"
    with DatasetWriter(target, shard_rows=3) as writer:
        write_all(writer, 2, [])
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    if where == "last shard":
        monkeypatch.setattr(shards.pq, "write_table", half_shard_then_full)
    else:
        monkeypatch.setattr(shards, "write_json_atomic", half_json_then_full)
    with pytest.raises(DataError) as err:
        with DatasetWriter(target, shard_rows=3) as writer:
            if where == "manifest":
                writer.write_table(shard_table(0))
            writer.write_table(shard_table(5, rows=2))  # a partial shard: written by close()
    assert_one_line(str(err.value), f"no space left on device writing {target}", "free space and rerun")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging dir, no temp file
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    verify_dataset(target)


def test_disk_full_during_synthesize_keeps_the_old_set_then_resumes_identically(project, monkeypatch) -> None:
    cfg, paths = project
    expected = {p.name: p.read_bytes() for p in paths.synthetic.iterdir()}
    with DatasetWriter(paths.synthetic, shard_rows=3) as writer:  # an older synthetic set
        write_all(writer, 1, [])
    old = {p.name: p.read_bytes() for p in paths.synthetic.iterdir()}
    real_write, calls = shards.pq.write_table, []

    def full_after_one(table, where, **kwargs):
        calls.append(where)
        if len(calls) > 1:
            half_shard_then_full(table, where)
        return real_write(table, where, **kwargs)

    monkeypatch.setattr(shards.pq, "write_table", full_after_one)
    with pytest.raises(DataError) as err:
        synthesize(cfg, paths)
    assert_one_line(str(err.value), "no space left on device writing", "synthetic", "free space and rerun")
    assert {p.name: p.read_bytes() for p in paths.synthetic.iterdir()} == old
    siblings = [p for p in paths.synthetic.parent.iterdir() if p.name.startswith(".synthetic.")]
    assert len(siblings) == 1 and siblings[0].name.startswith(".synthetic.partial-")  # kept to resume
    assert not [p for p in siblings[0].iterdir() if p.name.endswith(".tmp")]  # no half-written file
    monkeypatch.setattr(shards.pq, "write_table", real_write)
    summary = synthesize(cfg, paths)
    assert summary["resumed_shards"] == 1
    assert {p.name: p.read_bytes() for p in paths.synthetic.iterdir()} == expected


# --------------------------------------------------------------------------- checkpoints
def tiny_data(n: int = 8, size: int = 16) -> TrainingData:
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (n, 1, size, size)).astype(np.float32)
    return TrainingData(images, (np.arange(n) % 2).astype(np.int64), ("a", "b"))


def spec(epochs: int, **extra) -> TrainSpec:
    return TrainSpec(epochs=epochs, batch_size=4, latent_dim=4, base_channels=4, checkpoint_every=1, seed=1, **extra)


def garbage(path: Path) -> None:
    path.write_bytes(b"not a checkpoint" * 8)


def foreign(path: Path) -> None:
    """A readable checkpoint of another network (wider), recorded as intact."""
    path.unlink()
    train_generator(spec(1).model_copy(update={"base_channels": 8}), tiny_data(), checkpoint=path)


def unrecorded(path: Path) -> None:
    path.with_name(path.name + ".sha256").unlink()


@pytest.mark.parametrize("damage", [truncate, flip_bit, garbage, foreign, unrecorded])
def test_a_corrupt_checkpoint_is_discarded_with_one_warning_and_training_restarts(tmp_path, caplog, damage) -> None:
    torch.set_num_threads(1)
    data = tiny_data()
    fresh = train_generator(spec(2), data)
    checkpoint = tmp_path / "generator.ckpt"
    train_generator(spec(1), data, checkpoint=checkpoint)  # a run stopped after epoch 1
    damage(checkpoint)
    with caplog.at_level(logging.WARNING, logger="generators.training"):
        result = train_generator(spec(2), data, checkpoint=checkpoint)
    warnings = [r for r in caplog.records if r.name == "generators.training" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "unusable training checkpoint" in warnings[0].getMessage(), warnings
    assert result.resumed_from_epoch == 0
    for key in fresh.state:
        torch.testing.assert_close(result.state[key], fresh.state[key], rtol=0, atol=0)
    resumed = train_generator(spec(2), data, checkpoint=checkpoint)  # the rewritten checkpoint is good
    assert resumed.resumed_from_epoch == 2


def test_a_corrupt_checkpoint_of_a_zoo_architecture_is_discarded(tmp_path, caplog) -> None:
    torch.set_num_threads(1)
    data = tiny_data()
    vae = {"architecture": "vae", "lr_generator": 2e-3, "betas": (0.9, 0.999)}
    checkpoint = tmp_path / "vae.ckpt"
    train_generator(spec(1, **vae), data, checkpoint=checkpoint)
    flip_bit(checkpoint)
    with caplog.at_level(logging.WARNING, logger="generators.training"):
        result = train_generator(spec(2, **vae), data, checkpoint=checkpoint)
    assert result.resumed_from_epoch == 0
    assert any("unusable training checkpoint" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- projects
def _stage_state(verb: str, config: str):
    """(state name, summary) of the flow's ``stage`` task run as the flow runs it when the
    outputs on disk are current (``refresh_cache=False``)."""
    from prefect import flow

    from flows.pipeline import stage

    @flow(name="one-stage")
    def one_stage() -> tuple[str, dict]:
        state = stage.with_options(refresh_cache=False)(verb, "tiny", config, return_state=True)
        return state.name, state.result()

    return one_stage()


@pytest.mark.integration
def test_a_copied_project_is_never_served_the_originals_cached_result(prefect_harness, tmp_path) -> None:
    """Prefect's result storage is per user: without the project in the cache key, a copy
    (same pipeline name, data, params and code: same stage fingerprints) was served the
    original's cached summaries, whose paths name the original's files."""
    from tests.flows.project import make_project

    original = make_project(tmp_path / "original")
    state, summary = _stage_state("ingest", str(original))
    assert state == "Completed" and summary["skipped"] is False
    copy = tmp_path / "copy"
    shutil.copytree(original.parent, copy)
    state, summary = _stage_state("ingest", str(copy / "pipelines.yaml"))
    assert state == "Completed", "the copy was served the original's cached result"
    assert summary["skipped"] is True  # its own outputs are current: the stage checked and skipped
    assert _stage_state("ingest", str(original))[0] == "Cached"  # each project keeps its own cache


def test_stage_records_name_outputs_relative_to_their_project(tmp_path) -> None:
    """A stage summary's paths (the report's) are recorded relative to the project, so a
    copied project's up-to-date stage reports its own files."""
    from tasks.stages import ROOT_MARK, _portable

    summary = {"report": str(tmp_path / "a" / "reports" / "x.md"), "images": [str(tmp_path / "a" / "g.png")], "n": 3}
    recorded = _portable(summary, str(tmp_path / "a"), ROOT_MARK)
    assert str(tmp_path) not in json.dumps(recorded)
    served = _portable(recorded, ROOT_MARK, str(tmp_path / "b"))
    assert served == {
        "report": str(tmp_path / "b" / "reports" / "x.md"),
        "images": [str(tmp_path / "b" / "g.png")],
        "n": 3,
    }
