"""pipelines.yaml schema: the shipped file validates; errors name key and allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from generators.errors import ConfigError
from tasks.config import load_pipeline, load_pipelines

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipelines.yaml"
    path.write_text(text)
    return path


def test_shipped_pipelines_validate():
    pipelines = load_pipelines(REPO / "pipelines.yaml").pipelines
    assert {"demo", "demo-seg", "demo-train"} <= set(pipelines)
    # the demo selects a shipped generator by its realism; demo-train trains it in the loop
    assert pipelines["demo"].generator.train is None
    assert (pipelines["demo"].generator.query, pipelines["demo"].generator.rank_by) == ("mni152", "two_sample_auc")
    assert pipelines["demo-train"].generator.train.architecture == "ldm"


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        (
            "source: {kind: mni152, levls_mm: [1]}\n    generator: {train: {}}",
            "pipelines.demo.source.mni152.levls_mm: unknown key; allowed: anatomy, kind, level_names, levels_mm, licence, modality (did you mean 'levels_mm'?)",
        ),
        ("source: {kind: mni152}\n    generator: {train: {epochz: 3}}", "(did you mean 'epochs'?)"),
        (
            "source: {kind: mni152}\n    generator: {train: {}}\n    retrain: {task: segmentaton}",
            "allowed: 'classification' or 'segmentation' (did you mean 'segmentation'?)",
        ),
        (
            "source: {kind: mni152}\n    generator: {train: {}}\n    retrain: {task: segmentation, network: densenet}",
            "network 'densenet' does not fit task 'segmentation'; allowed: unet",
        ),
        ("source: {kind: mni152}\n    generator: {id: a, query: b}", "give exactly one of 'id', 'query', 'train'"),
        ("source: {kind: ftp, path: x}\n    generator: {train: {}}", "pipelines.demo.source"),
        (
            "source: {kind: mni152}\n    generator: {train: {}}\n    preprocess: {split: {train: 0.9, val: 0.2, test: 0.2}}",
            "train + val + test must be 1.0",
        ),
        (
            "source: {kind: mni152}\n    generator: {train: {}}\n    synthesis: {compile: sometimes}",
            "pipelines.demo.synthesis.compile: expected true, false or 'auto' (got 'sometimes')",
        ),
    ],
)
def test_errors_name_the_key_and_the_allowed_values(tmp_path, snippet, expected):
    path = _write(tmp_path, f"pipelines:\n  demo:\n    {snippet}\n")
    with pytest.raises(ConfigError) as info:
        load_pipelines(path)
    assert expected in str(info.value)


def test_malformed_yaml_and_missing_file_and_unknown_pipeline(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML at line 3"):
        load_pipelines(_write(tmp_path, "pipelines:\n  demo: [unclosed\n"))
    with pytest.raises(ConfigError, match="pipelines file not found"):
        load_pipelines(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="top-level 'pipelines:'"):
        load_pipelines(_write(tmp_path, "- a\n- b\n"))
    path = _write(tmp_path, "pipelines:\n  demo:\n    source: {kind: mni152}\n    generator: {train: {}}\n")
    with pytest.raises(ConfigError, match="did you mean 'demo'"):
        load_pipeline("dmeo", path)
