"""Volume sets export as NIfTI with the real data's voxel spacing; PNG/DICOM refuse them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from generators.errors import DataError
from generators.shards import Row, write_dataset
from tasks.export import export_synthetic
from tasks.paths import PipelinePaths


def _project(root: Path) -> tuple[PipelinePaths, list[Row]]:
    paths = PipelinePaths(root, "p")
    rng = np.random.default_rng(0)
    rows = [
        Row(
            id=f"syn{i:03d}",
            subject="synthetic",
            split="train",
            label="brain",
            image=rng.integers(0, 256, (1, 6, 7, 8), dtype=np.uint8),
            mask=rng.integers(0, 3, (6, 7, 8), dtype=np.uint8),
            source="gen@1",
            seed=7,
        )
        for i in range(3)
    ]
    write_dataset(paths.filtered, [r.to_record() for r in rows], shard_rows=2)
    real = Row("r0", "s", "train", "brain", np.zeros((1, 6, 7, 8), np.uint8), "real")
    write_dataset(paths.real, [real.to_record()], provenance={"dims": 3, "spacing_mm": [1.5, 2.0, 2.5]})
    paths.metrics.mkdir(parents=True)
    (paths.metrics / "quality.json").write_text(json.dumps({"gate": {"passed": True}}))
    return paths, rows


def test_volumes_export_as_nifti_with_the_real_spacing(tmp_path: Path) -> None:
    import nibabel as nib

    paths, rows = _project(tmp_path)
    summary = export_synthetic(paths, "nifti", tmp_path / "out")
    assert summary["images"] == 3 and summary["masks"] == 3
    for row in rows:
        image = nib.load(str(tmp_path / "out" / "brain" / f"{row.id}.nii.gz"))
        mask = nib.load(str(tmp_path / "out" / "brain" / f"{row.id}_mask.nii.gz"))
        assert np.array_equal(np.asarray(image.dataobj), row.image[0])
        assert np.array_equal(np.asarray(mask.dataobj), row.mask)
        assert image.header.get_zooms() == pytest.approx((1.5, 2.0, 2.5))


@pytest.mark.parametrize("fmt", ["png", "dicom"])
def test_volumes_refuse_2d_formats_on_one_line(tmp_path: Path, fmt: str) -> None:
    paths, _ = _project(tmp_path)
    with pytest.raises(DataError, match="volumes export as NIfTI only: use --format nifti") as error:
        export_synthetic(paths, fmt, tmp_path / "out")
    assert "\n" not in str(error.value)
