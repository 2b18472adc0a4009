"""``synthesis.masks_from: train`` end to end through the real Prefect flow, CI-sized: real
MNI152 slices with their GM/WM masks, a mask-conditioned DDPM (a few epochs), synthesis for
the real train masks, filter, UNet segmentation retrain and report. Every synthetic row's
mask must be one of the real train masks of its class, bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flows.pipeline import AugmentParams, augment
from generators.shards import decode_image, read_manifest, read_table
from tests.flows.project import TINY, make_project

pytestmark = pytest.mark.integration

SEG_MASKS = {
    "description": "MNI152 with GM/WM masks; mask-conditioned DDPM for the real train masks; UNet",
    "threads": 1,
    "source": {"kind": "mni152"},
    "preprocess": {"size": 32, "split": {"train": 0.6, "val": 0.2, "test": 0.2, "slab_slices": 8}},
    "generator": {
        "train": {
            "architecture": "ddpm",
            "with_masks": True,
            "epochs": 2,
            "batch_size": 16,
            "base_channels": 8,
            "timesteps": 50,
            "ddim_steps": 3,
            "checkpoint_every": 1,
        }
    },
    "synthesis": {"count_per_class": 4, "masks_from": "train", "shard_rows": 8, "batch_size": 8},
    "quality": {**TINY["quality"], "label_consistency": {"enabled": False}},
    "retrain": {"task": "segmentation", "network": "unet", "steps": 4, "batch_size": 8, "seeds": [0, 1]},
}


def _masks_by_label(dataset, splits=None) -> dict[str, list[bytes]]:
    table = read_table(dataset, columns=["label", "mask"], splits=splits)
    out: dict[str, list[bytes]] = {}
    for label, blob in zip(table.column("label").to_pylist(), table.column("mask").to_pylist(), strict=True):
        out.setdefault(label, []).append(np.ascontiguousarray(decode_image(blob)[0], np.uint8).tobytes())
    return out


def test_masks_from_train_runs_end_to_end(prefect_harness, tmp_path):
    config = make_project(tmp_path / "proj", overrides=SEG_MASKS)
    root = config.parent
    state = augment(AugmentParams(pipeline="tiny", config=str(config), dvc_commit=False), return_state=True)
    assert state.is_completed(), state
    summaries = state.result()
    assert summaries["synthesize"]["masks_from"] == "train" and summaries["synthesize"]["masks_rejected"] == 0

    real = _masks_by_label(root / "data/tiny/real", splits=["train"])
    synthetic = _masks_by_label(root / "data/tiny/synthetic")
    assert {k: len(v) for k, v in synthetic.items()} == {label: 4 for label in real}
    for label, masks in synthetic.items():
        assert all(mask in real[label] for mask in masks), label  # exactly a given mask
    assert read_manifest(root / "data/tiny/synthetic")["provenance"]["masks_used"] == sum(map(len, real.values()))

    retrain = json.loads((root / "metrics/tiny/retrain.json").read_text())
    assert retrain["verdict"] in ("helped", "no measurable effect", "hurt")
    assert (root / "reports/tiny/report.md").is_file()
