"""Crash and resume: ``synthmed stage synthesize`` killed with SIGKILL between shards and
in the middle of writing one leaves no dataset and no half shard behind; the rerun
keeps the completed shards (sha256-checked), makes only the rest, and ends with a
dataset byte-identical to an uninterrupted run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from generators.shards import (
    BASE_SCHEMA,
    DONE_DIR,
    MANIFEST_NAME,
    DatasetWriter,
    dataset_digest,
    read_manifest,
    read_table,
    verify_dataset,
)
from tasks.stages import digest_path, run_stage
from tasks.synthesize import plan_shards, synthesize
from tests.flows.project import env
from tests.reliability.helpers import trained_project

KEY = "0123456789abcdef"


# --------------------------------------------------------------------------- writer
def shard_table(index: int, rows: int = 3) -> pa.Table:
    records = [
        {
            "id": f"r{index:03d}-{i}",
            "subject": "s",
            "split": "train",
            "label": "abc"[i % 3],
            "image": b"x" * (index + 1),
            "height": 1,
            "width": 1,
            "channels": 1,
            "dtype": "uint8",
            "source": "test",
            "seed": index,
        }
        for i in range(rows)
    ]
    return pa.Table.from_pylist(records, schema=BASE_SCHEMA)


def write_all(writer: DatasetWriter, n: int, made: list[int]) -> None:
    for k in range(n):
        if writer.resume_shard():
            continue
        made.append(k)
        writer.write_table(shard_table(k))


def test_resumable_writer_keeps_verified_shards_and_discards_everything_else(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    with DatasetWriter(reference, shard_rows=3) as writer:
        write_all(writer, 5, [])

    target = tmp_path / "out"
    crashed = DatasetWriter(target, shard_rows=3, resume_key=KEY)
    write_all(crashed, 5, [])  # all five shards written, then "killed" before close()
    partial = crashed.staging
    assert partial.name == f".out.partial-{KEY}" and not target.exists()
    (partial / "part-00001.parquet").write_bytes(b"flipped bits")  # corrupt: sha256 differs
    (partial / DONE_DIR / "part-00003.parquet.json").unlink()  # renamed but never recorded
    (partial / ".part-00005.parquet.1234.tmp").write_bytes(b"PAR1 half a shard")  # killed mid-write
    (partial / MANIFEST_NAME).write_text("{}")  # killed during close()

    made: list[int] = []
    with DatasetWriter(target, shard_rows=3, resume_key=KEY) as writer:
        write_all(writer, 5, made)
    assert made == [1, 3] and writer.resumed == 3
    assert read_manifest(target) == read_manifest(reference)
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in reference.iterdir())
    verify_dataset(target)
    assert not partial.exists()


def test_a_new_key_starts_afresh_and_plain_writers_clean_up_on_error(tmp_path: Path) -> None:
    target = tmp_path / "out"
    old = DatasetWriter(target, shard_rows=3, resume_key=KEY)
    write_all(old, 2, [])
    made: list[int] = []
    with DatasetWriter(target, shard_rows=3, resume_key="fedcba9876543210") as writer:
        write_all(writer, 2, made)
    assert made == [0, 1] and not old.staging.exists()

    with pytest.raises(RuntimeError):
        with DatasetWriter(target, shard_rows=3, resume_key=KEY) as writer:
            write_all(writer, 1, [])
            raise RuntimeError("generator failed")
    assert (writer.staging / "part-00000.parquet").is_file()  # kept for the next run
    with pytest.raises(RuntimeError):
        with DatasetWriter(target, shard_rows=3) as plain:
            write_all(plain, 1, [])
            raise RuntimeError("generator failed")
    assert not plain.staging.exists()
    assert [p["file"] for p in read_manifest(target)["shards"]] == ["part-00000.parquet", "part-00001.parquet"]


def test_a_killed_plain_writers_staging_dir_is_removed_by_the_next_writer(tmp_path: Path) -> None:
    target = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has exited: its pid names an orphan
    orphan = tmp_path / f".out.staging-{dead_pid}-{'0' * 32}"
    (orphan / "part-00000.parquet").parent.mkdir(parents=True)
    (orphan / "part-00000.parquet").write_bytes(b"half a shard")
    live = tmp_path / f".out.staging-{os.getpid()}-{'1' * 32}"  # a writer still running here
    live.mkdir()
    with DatasetWriter(target, shard_rows=3) as writer:
        write_all(writer, 1, [])
    assert not orphan.exists() and live.is_dir()
    assert read_manifest(target)["rows"] == 3


# --------------------------------------------------------------------------- the real stage
KILL_MID_WRITE = """
import io, os, signal, sys
import pyarrow.parquet as pq

real_write, calls = pq.write_table, []

def write_table(table, where, **kwargs):
    calls.append(where)
    if len(calls) == int(os.environ["KILL_AT_WRITE"]):
        buffer = io.BytesIO()
        real_write(table, buffer, **kwargs)
        with open(where, "wb") as handle:  # the temp file of the shard being written
            handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            handle.flush()
            os.fsync(handle.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return real_write(table, where, **kwargs)

pq.write_table = write_table
from flows.cli import main
sys.exit(main(sys.argv[1:]))
"""


def partial_dirs(paths) -> list[Path]:
    return sorted(paths.synthetic.parent.glob(".synthetic.partial-*"))


def done_records(paths) -> list[Path]:
    return sorted(p for d in partial_dirs(paths) for p in (d / DONE_DIR).glob("*.json"))


@pytest.mark.integration
def test_synthesize_killed_twice_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    cfg, paths = trained_project(tmp_path, "crash", count_per_class=100, shard_rows=4, batch_size=4)
    total = len(plan_shards({"disc": 100, "ring": 100, "square": 100}, 4, cfg.synthesis.seed))

    synthesize(cfg, paths)  # the uninterrupted run, in this process
    expected_manifest, expected_digest = read_manifest(paths.synthetic), dataset_digest(paths.synthetic)
    expected_ids = read_table(paths.synthetic, columns=["id"]).column("id").to_pylist()
    expected_stage_digest = digest_path(paths.synthetic)
    shutil.rmtree(paths.synthetic)

    # 1. SIGKILL between shards, as soon as the first completed shard is on disk
    stage = [sys.executable, "-m", "flows.cli", "stage", "synthesize", "--pipeline", "crash"]
    proc = subprocess.Popen(stage, cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not done_records(paths) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, stderr.decode()
    first = len(done_records(paths))
    assert 1 <= first < total, first
    assert not paths.synthetic.exists() and len(partial_dirs(paths)) == 1

    # 2. SIGKILL in the middle of writing a shard: one more shard completes, the next is half written
    proc = subprocess.run(
        [sys.executable, "-c", KILL_MID_WRITE, *stage[3:]],
        cwd=tmp_path,
        env={**env(), "KILL_AT_WRITE": "2"},
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    partial = partial_dirs(paths)[0]
    half = list(partial.glob(".part-*.tmp"))
    assert len(half) == 1 and 0 < half[0].stat().st_size
    second = len(done_records(paths))
    assert second == first + 1 and not paths.synthetic.exists()

    # 3. rerun (the stage function the CLI calls, in this process to save a start-up):
    #    the completed shards are kept, the half one is discarded, the rest is made
    summary = run_stage("synthesize", cfg, paths)
    assert summary["resumed_shards"] == second and summary["shards"] == total
    manifest = verify_dataset(paths.synthetic)
    assert manifest == expected_manifest
    assert dataset_digest(paths.synthetic) == expected_digest
    assert digest_path(paths.synthetic) == expected_stage_digest
    ids = read_table(paths.synthetic, columns=["id"]).column("id").to_pylist()
    assert ids == expected_ids and len(set(ids)) == len(ids) == 300
    on_disk = sorted(p.name for p in paths.synthetic.iterdir())
    assert on_disk == sorted([MANIFEST_NAME, *(s["file"] for s in manifest["shards"])])  # no temp, no records
    assert partial_dirs(paths) == []
