"""The report stage: Markdown table and verdict, class counts, card summary, PNG grids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from generators.errors import DataError
from tasks.config import PipelineConfig
from tasks.filter import filter_synthetic
from tasks.paths import PipelinePaths
from tasks.report import report
from tasks.retrain import retrain
from tests.tasks.phantoms import write_real, write_synthetic


def make_config() -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "description": "phantom pipeline",
            "source": {"kind": "folder", "path": "x"},
            "generator": {"train": {}},
            "threads": 1,
            "quality": {"label_consistency": {"enabled": False}},
            "retrain": {"steps": 4, "batch_size": 8, "seeds": [0, 1]},
            "report": {"grid_per_class": 4},
        }
    )


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelineConfig, PipelinePaths]:
    """Real + synthetic phantoms run through filter and retrain once (cheap settings)."""
    cfg = make_config()
    paths = PipelinePaths(root=tmp_path_factory.mktemp("report"), pipeline="t")
    write_real(paths.real, {"train": 6, "val": 2, "test": 3})
    write_synthetic(paths.synthetic, per_class=3, mislabelled=0)
    filter_synthetic(cfg, paths)
    retrain(cfg, paths)
    return cfg, paths


def test_report_has_table_counts_and_grids(stages: tuple[PipelineConfig, PipelinePaths]) -> None:
    cfg, paths = stages
    result = report(cfg, paths)
    markdown = Path(result["report"]).read_text()
    assert markdown == result["markdown"]
    assert markdown.startswith("# synthmed report: t")
    assert "| metric | real only | real + synthetic |" in markdown
    assert "| **balanced_accuracy** |" in markdown and "| accuracy |" in markdown
    verdict = json.loads((paths.metrics / "retrain.json").read_text())["verdict"]
    assert f"**Verdict on balanced_accuracy: {verdict}**" in markdown
    # class counts: real train/val/test, synthetic generated/dropped (sanity, label)/kept/used;
    # disc carries 3 good rows + 1 blank + 1 saturated + 1 corrupt
    assert "| disc | 6 | 2 | 3 | 6 | 3 | 0 | 3 | 3 |" in markdown
    assert "| **total** | 18 | 6 | 9 | 14 | 5 | 0 | 9 | 9 |" in markdown
    assert "No model card at `models/t/generator/card.yaml`" in markdown
    assert "![real images, one row per class](grid_real.png)" in markdown
    assert "![synthetic images, one row per class](grid_synthetic.png)" in markdown

    assert [Path(p).name for p in result["images"]] == ["grid_real.png", "grid_synthetic.png"]
    for image_path in result["images"]:
        with Image.open(image_path) as picture:
            picture.verify()
        with Image.open(image_path) as picture:
            assert picture.format == "PNG" and picture.mode == "RGB"
            # 3 class rows of 64-px tiles (32-px phantoms upscaled x2), 4 columns + label strip
            assert picture.size == (96 + 4 * 66, 2 + 3 * 66)
    assert [row["metric"] for row in result["table"]] == ["accuracy", "balanced_accuracy", "macro_f1"]
    row = result["table"][1]
    assert row["primary"] and row["real_only_ci95_low"] <= row["real_only_mean"] <= row["real_only_ci95_high"]

    first = {p: Path(p).read_bytes() for p in [result["report"], *result["images"]]}
    report(cfg, paths)
    assert {p: Path(p).read_bytes() for p in first} == first


def test_report_summarises_the_generator_card(stages: tuple[PipelineConfig, PipelinePaths]) -> None:
    cfg, paths = stages
    paths.generator.mkdir(parents=True, exist_ok=True)
    card = {"id": "phantom-gan", "version": "1", "architecture": "cgan", "training": {"time_s": 12.34, "epochs": 5}}
    (paths.generator / "card.yaml").write_text(yaml.safe_dump(card))
    try:
        markdown = report(cfg, paths)["markdown"]
    finally:
        (paths.generator / "card.yaml").unlink()
    assert "| phantom-gan | 1 | cgan | 12.3 s | 5 | n/a |" in markdown


def test_report_needs_the_retrain_metrics(tmp_path: Path) -> None:
    paths = PipelinePaths(root=tmp_path, pipeline="t")
    write_real(paths.real, {"train": 2, "test": 1})
    with pytest.raises(DataError, match="run `synthmed stage retrain` first"):
        report(make_config(), paths)
