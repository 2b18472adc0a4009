"""Fuzzing the two user-written inputs, ``pipelines.yaml`` and CSV manifests: whatever
the document, the outcome is a valid result or a ConfigError/DataError with a one-line
message, never another exception; a CSV ingest accounts for every row.

60 examples per test by default (well under a minute); set ``SYNTHMED_FUZZ_EXAMPLES``
for a longer hunt (600 each ran clean when this was written)."""

from __future__ import annotations

import copy
import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from generators.errors import ConfigError, DataError
from generators.shards import read_table
from tasks.config import PipelineConfig, load_pipelines
from tasks.ingest import ingest
from tasks.paths import PipelinePaths
from tests.reliability.helpers import assert_one_line, grey8, save_png

REPO = Path(__file__).resolve().parents[2]
SHIPPED = yaml.safe_load((REPO / "pipelines.yaml").read_text())
FUZZ = settings(
    max_examples=int(os.environ.get("SYNTHMED_FUZZ_EXAMPLES", "60")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


# --------------------------------------------------------------------------- pipelines.yaml
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["mni152", "csv", "folder", "cgan", "unet", "densenet", "segmentation", "auto", "cuda"])
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
KEYS = st.sampled_from(
    [
        "source",
        "kind",
        "path",
        "generator",
        "train",
        "epochs",
        "synthesis",
        "counts",
        "seed",
        "split",
        "retrain",
        "task",
        "network",
        "seeds",
        "preprocess",
        "size",
        "quality",
        "sanity",
        "id",
        "query",
        "levels_mm",
        "unknwn",
    ]
) | st.text(max_size=10)


def check_config_text(tmp_dir: Path, data: bytes) -> None:
    path = tmp_dir / "pipelines.yaml"
    path.write_bytes(data)
    try:
        pipelines = load_pipelines(path)
    except ConfigError as exc:
        event("config error")
        assert_one_line(str(exc), "pipelines.yaml")
    else:
        event("valid config")
        assert all(isinstance(cfg, PipelineConfig) for cfg in pipelines.pipelines.values())


def dump(document: Any) -> bytes:
    return yaml.safe_dump(document, allow_unicode=True).encode("utf-8")


def paths_of(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path in a nested dict/list document."""
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += paths_of(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += paths_of(value, (*prefix, i))
    return out


@st.composite
def mutated_configs(draw: st.DrawFn) -> Any:
    """The shipped pipelines.yaml with one to three random edits: a value replaced, a
    key deleted, renamed or added."""
    document = copy.deepcopy(SHIPPED)
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from(paths_of(document)))
        if not target:
            continue
        parent = document
        for part in target[:-1]:
            parent = parent[part]
        last = target[-1]
        action = draw(st.sampled_from(["replace", "delete", "rename", "add"]))
        if action == "replace":
            parent[last] = draw(VALUES)
        elif action == "delete" and isinstance(parent, dict):
            del parent[last]
        elif action == "rename" and isinstance(parent, dict):
            parent[draw(KEYS)] = parent.pop(last)
        elif action == "add" and isinstance(parent, dict):
            parent[draw(KEYS)] = draw(VALUES)
    return document


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-config")


@FUZZ
@given(text=st.text(max_size=300))
def test_any_text_is_a_config_or_a_one_line_config_error(scratch: Path, text: str) -> None:
    check_config_text(scratch, text.encode("utf-8", "surrogatepass"))


@FUZZ
@given(data=st.binary(max_size=200))
def test_any_bytes_are_a_config_or_a_one_line_config_error(scratch: Path, data: bytes) -> None:
    check_config_text(scratch, data)


@FUZZ
@given(document=VALUES, wrap=st.sampled_from(["bare", "pipelines", "pipeline"]))
def test_random_documents_give_a_one_line_config_error(scratch: Path, document: Any, wrap: str) -> None:
    wrapped = {"bare": document, "pipelines": {"pipelines": document}, "pipeline": {"pipelines": {"demo": document}}}
    check_config_text(scratch, dump(wrapped[wrap]))


@FUZZ
@given(document=mutated_configs())
def test_mutated_shipped_config_is_valid_or_a_one_line_config_error(scratch: Path, document: Any) -> None:
    check_config_text(scratch, dump(document))


# --------------------------------------------------------------------------- model cards
SHIPPED_CARD = yaml.safe_load((REPO / "generators" / "zoo" / "mni152_cgan" / "card.yaml").read_text())
CARD_KEYS = st.sampled_from([*SHIPPED_CARD, "id", "version", "weights", "file", "value", "labels"])


@FUZZ
@given(key=CARD_KEYS, value=VALUES | st.sampled_from(["/abs", "../x", "a/../b", "a//b", "x" * 200, "a\\b", "1.0/.."]))
def test_mutated_card_is_a_card_or_a_one_line_config_error(scratch: Path, key: str, value: Any) -> None:
    """A shipped card with one field replaced: a valid card whose id and version are safe
    folder names, or one ConfigError line; never another exception."""
    from generators.card import load_card
    from generators.safe_paths import safe_join

    document = copy.deepcopy(SHIPPED_CARD)
    document[key] = value
    path = scratch / "card.yaml"
    path.write_bytes(dump(document))
    try:
        card = load_card(path)
    except ConfigError as exc:
        assert_one_line(str(exc))
        event("config error")
        return
    target = safe_join(scratch / "registry", *card.id.split("/"), card.version)
    assert (scratch / "registry").resolve() in target.parents
    event("valid card")


# --------------------------------------------------------------------------- CSV manifests
@pytest.fixture(scope="module")
def csv_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project whose ``raw/`` holds good PNGs, a corrupt one, a text file, a folder, a
    symlink out of the root and a mask; the fuzzed CSV is written to ``raw/list.csv``."""
    root = tmp_path_factory.mktemp("fuzz-csv")
    raw = root / "raw"
    for i in range(4):
        save_png(raw / "img" / f"a{i}.png", grey8(("disc", "square")[i % 2], i))
    save_png(raw / "img" / "m0.png", (grey8("disc", 0) > 100).astype(np.uint8))
    (raw / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (raw / "img" / "notes.txt").write_text("notes")
    save_png(root / "outside.png", grey8("disc", 9))
    os.symlink(root / "outside.png", raw / "img" / "link_out.png")
    return root


PATHS = st.sampled_from(
    [
        "img/a0.png",
        "img/a1.png",
        "img/a2.png",
        "img/a3.png",
        "img/./a0.png",
        "img/../img/a1.png",
        "img/corrupt.png",
        "img/notes.txt",
        "img",
        "img/link_out.png",
        "../outside.png",
        "/etc/passwd",
        "/dev/zero",
        "~/a.png",
        "img\\a0.png",
        "img/a0.png\x00",
        "",
        " img/a2.png ",
        "x" * 300,
        "img/" + "y/" * 40 + "z.png",
        "img/m0.png",
    ]
) | st.text(max_size=20)
CELLS = st.sampled_from(["disc", "square", "", "P1", "P2", " "]) | st.text(max_size=8)
HEADERS = st.lists(st.sampled_from(["image", "label", "subject", "mask", "extra", " image", "Image"]), max_size=5)


GOOD = st.sampled_from(["img/a0.png", "img/a1.png", "img/a2.png", "img/a3.png"])
LABELS = st.sampled_from(["disc", "square"])
SUBJECTS = st.sampled_from(["P1", "P2", "P3", "P4", "P5"])


@st.composite
def csv_documents(draw: st.DrawFn) -> str:
    """Mostly the expected header with plausible rows (good paths, labels and subjects
    mixed with junk), sometimes random headers and ragged rows."""
    if draw(st.sampled_from([True] * 7 + [False] * 3)):
        header = ["image", "label", "subject", "mask"]
        rows = draw(
            st.lists(
                st.tuples(GOOD | PATHS, LABELS | CELLS, SUBJECTS | CELLS, st.just("") | PATHS).map(list),
                min_size=1,
                max_size=8,
            )
        )
    else:
        header = draw(HEADERS)
        rows = draw(st.lists(st.lists(st.one_of(PATHS, CELLS), max_size=len(header) + 1), max_size=8))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def data_rows(text: str) -> int:
    """How many records a CSV reader sees after the header (blank lines are skipped)."""
    records = [r for r in csv.reader(io.StringIO(text, newline="")) if r]
    return max(len(records) - 1, 0)


@FUZZ
@given(document=csv_documents())
def test_fuzzed_csv_is_ingested_or_a_one_line_data_error_and_no_row_is_lost(csv_project: Path, document: str) -> None:
    (csv_project / "raw" / "list.csv").write_text(document, encoding="utf-8", errors="surrogateescape")
    paths = PipelinePaths(csv_project, "fuzz")
    paths.rejects.unlink(missing_ok=True)
    cfg = PipelineConfig.model_validate(
        {
            "source": {"kind": "csv", "path": "raw/list.csv"},
            "generator": {"train": {}},
            "threads": 1,
            "preprocess": {"size": 16},
        }
    )
    try:
        summary = ingest(cfg, paths)
    except (DataError, ConfigError) as exc:
        event(f"error: {str(exc).split(';')[0].split(': ', 1)[-1][:30]}")
        assert_one_line(str(exc))
        assert "raw/list.csv" in str(exc) or "raw" in str(exc)
        if paths.rejects.is_file():  # "no usable images": every row was rejected, with a reason
            rejects = json.loads(paths.rejects.read_text())
            assert len(rejects) == data_rows(document)
            for reject in rejects:
                assert_one_line(reject["reason"])
        return
    rejects = json.loads(paths.rejects.read_text())
    event(f"ingested {min(summary['rows'], 3)}+ rows, {min(summary['rejects'], 3)}+ rejects")
    assert summary["rows"] + summary["rejects"] == data_rows(document)
    assert summary["rejects"] == len(rejects)
    for reject in rejects:
        assert_one_line(reject["reason"])
    sources = read_table(paths.real, columns=["source"]).column("source").to_pylist()
    for source in sources:  # relative, inside the root (a subject id in it is replaced by a pseudonym)
        assert not source.startswith("/") and ".." not in source.split("/"), source
