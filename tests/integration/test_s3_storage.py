"""Pipelines reading from and writing to S3 (moto server on 127.0.0.1): an ``s3`` source
ingests the same rows as the same images on disk, and ``storage.results_uri`` receives
the reports and metrics."""

from __future__ import annotations

import pytest
import yaml

from generators.errors import ConfigError, DataError, TransientError
from generators.shards import read_manifest, read_table
from tasks.config import load_pipeline
from tasks.paths import PipelinePaths
from tasks.stages import run_stage
from tasks.storage import S3Uri, download_prefix, list_objects, upload_dir
from tests.flows.project import TINY, make_project
from tests.integration.helpers import FAST, cli, copy_project, free_port

pytestmark = pytest.mark.integration


def test_ingest_from_an_s3_prefix_gives_the_same_rows_as_from_disk(s3, tmp_path):
    config = make_project(tmp_path / "proj", overrides=FAST)
    root = config.parent
    uri = f"s3://{s3.bucket}/raw/phantoms"
    uploaded = upload_dir(root / "images", S3Uri.parse(uri))
    assert len(uploaded) == sum(1 for p in (root / "images").rglob("*.png"))

    local = {**TINY, **FAST}
    remote = {**local, "source": {"kind": "s3", "uri": uri, "subject_regex": TINY["source"]["subject_regex"]}}
    config.write_text(yaml.safe_dump({"pipelines": {"local": local, "remote": remote}}, sort_keys=False))
    summaries = {
        name: run_stage("ingest", load_pipeline(name, config), PipelinePaths(root, name))
        for name in ("local", "remote")
    }

    assert summaries["remote"]["rows"] == summaries["local"]["rows"] > 0
    tables = {name: read_table(root / "data" / name / "real") for name in ("local", "remote")}
    assert tables["remote"].equals(tables["local"])  # ids, subjects, splits, pixels, source uris
    manifests = {name: read_manifest(root / "data" / name / "real") for name in ("local", "remote")}
    assert [s["sha256"] for s in manifests["remote"]["shards"]] == [s["sha256"] for s in manifests["local"]["shards"]]
    # provenance names the bucket, never the machine-local staging folder
    recorded = manifests["remote"]["provenance"]["source"]
    assert {k: recorded[k] for k in remote["source"]} == remote["source"]
    assert set(recorded) - set(remote["source"]) <= {"modality", "anatomy", "licence"}  # schema defaults
    assert str(root) not in (root / "data" / "remote" / "real" / "_manifest.json").read_text()


def test_results_are_copied_to_the_configured_s3_uri(tiny_repro, s3, tmp_path):
    root = copy_project(tiny_repro, tmp_path / "proj")
    config = root / "pipelines.yaml"
    data = yaml.safe_load(config.read_text())
    data["pipelines"]["tiny"]["storage"] = {"results_uri": f"s3://{s3.bucket}/results/"}
    config.write_text(yaml.safe_dump(data, sort_keys=False))

    out = cli(["synthmed", "publish", "--pipeline", "tiny"], root)
    assert f"to s3://{s3.bucket}/results/tiny/" in out
    expected = {
        f"results/tiny/{kind}/{p.relative_to(root / kind / 'tiny').as_posix()}": p.read_bytes()
        for kind in ("reports", "metrics")
        for p in (root / kind / "tiny").rglob("*")
        if p.is_file()
    }
    assert "results/tiny/reports/report.md" in expected and "results/tiny/metrics/retrain.json" in expected
    assert set(s3.objects("results/")) == set(expected)
    for key, body in expected.items():
        assert s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read() == body, key


def test_s3_problems_are_one_line_errors_of_the_right_kind(s3, tmp_path, monkeypatch):
    with pytest.raises(DataError, match="bucket not found"):
        list_objects(S3Uri.parse(f"s3://{s3.bucket}-missing/x"))
    with pytest.raises(ConfigError, match="expected an s3://bucket/prefix"):
        S3Uri.parse("/data/images")
    empty = S3Uri.parse(f"s3://{s3.bucket}/nothing-here")
    assert download_prefix(empty, tmp_path / "dest") == 0 and not (tmp_path / "dest").exists()

    # nothing listens on this port: a network problem, worth a retry (TransientError)
    monkeypatch.setenv("SYNTHMED_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TransientError) as info:
        list_objects(S3Uri.parse(f"s3://{s3.bucket}/x"))
    assert "\n" not in str(info.value)
