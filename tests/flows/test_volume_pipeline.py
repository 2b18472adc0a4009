"""Volumes end to end (issue 18): the CI-sized twin of ``demo-3d`` through the Prefect flow
with DVC versioning: MNI152 cubes ingested as volume rows, a paired 3D generator trained
in the loop, volume synthesis, the 3D quality stage (2.5D metrics, two-sample test), a 3D
UNet retrained real-only vs augmented, and a report with three-plane grids."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from flows.pipeline import AugmentParams, augment
from generators.shards import cell_shape, decode_image, read_manifest, read_table
from tests.flows.project import TINY_3D, make_project, run

pytestmark = pytest.mark.integration


def test_volume_pipeline_runs_end_to_end_versioned_by_dvc(prefect_harness, tmp_path):
    config = make_project(tmp_path / "proj", dvc=True, base=TINY_3D)
    root = config.parent
    state = augment(AugmentParams(pipeline="tiny", config=str(config), dvc_commit=True), return_state=True)
    assert state.is_completed(), state
    data = root / "data" / "tiny"

    # real rows are volumes: 16^3 train cubes with their GM/WM masks, one template
    real = read_manifest(data / "real")
    assert real["provenance"]["dims"] == 3
    assert real["provenance"]["patches_of_one_subject"] is True
    train = read_table(data / "real", splits=["train"])
    assert {cell_shape(cell) for cell in train.column("image").to_pylist()} == {(1, 16, 16, 16)}
    masks = np.stack([decode_image(m)[0] for m in train.column("mask").to_pylist()])
    assert set(np.unique(masks)) <= {0, 1, 2} and (masks == 2).any()

    # the generator made paired volumes
    synthetic = read_table(data / "synthetic")
    assert synthetic.num_rows == TINY_3D["synthesis"]["count_per_class"]
    assert {cell_shape(cell) for cell in synthetic.column("image").to_pylist()} == {(1, 16, 16, 16)}
    assert all(m is not None for m in synthetic.column("mask").to_pylist())

    # quality: 2.5D set metrics in three planes and a two-sample AUC
    quality = json.loads((root / "metrics" / "tiny" / "quality.json").read_text())
    planes = quality["set_metrics"]["planes"]
    assert set(planes) == {"axial", "coronal", "sagittal"}
    assert all(np.isfinite(planes[p]["sets"]["kept"]["overall"]["fid"]) for p in planes)
    assert 0.0 <= quality["realism"]["two_sample"]["auc"] <= 1.0

    # retrain: 3D segmentation compared real-only vs augmented, per tissue class
    retrain = json.loads((root / "metrics" / "tiny" / "retrain.json").read_text())
    assert retrain["verdict"]
    assert retrain["volumes"]["dims"] == 3 and retrain["volumes"]["patches_of_one_subject"] is True
    assert retrain["primary_metric"] == "dice"
    for condition in ("real_only", "augmented"):
        assert 0.0 <= retrain[condition]["dice"]["mean"] <= 1.0 and retrain[condition]["hd95"]["mean"] >= 0.0

    # report: three-plane grids, the one-subject caveat; DVC sees nothing to redo
    reports = root / "reports" / "tiny"
    text = (reports / "report.md").read_text()
    for grid in ("grid_real.png", "grid_synthetic.png"):
        assert f"({grid})" in text
        with Image.open(reports / grid) as picture:
            width, height = picture.size
            assert height > 6 * 16 and width > 2 * 16  # three planes, each with a mask row; two volumes per row
    for plane in ("axial", "coronal", "sagittal"):
        assert f"| {plane} |" in text  # the 2.5D metrics table
    assert "not independent subjects" in text
    assert "up to date" in run(["dvc", "status"], root).lower()
