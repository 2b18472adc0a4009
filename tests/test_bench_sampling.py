"""Smoke test of ``benchmarks/bench_sampling.py`` at minimum size: every architecture's real
``generate`` is timed, the diffusion step override changes the sampler, the quality scoring
runs end to end on real MNI152 slices, and the card table reads the shipped cards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks import bench_sampling
from benchmarks.common import mni_slices


@pytest.mark.parametrize("name", list(bench_sampling.ARCHITECTURES))
def test_throughput_of_every_architecture(name: str) -> None:
    row = bench_sampling.measure_throughput(name, 32, batch=2, min_seconds=0.0, base_channels=8, stated_steps=4)
    assert row.images_per_s > 0
    if name in bench_sampling.DIFFUSION:
        assert row.steps == 4 and row.step_ms_per_image is not None and row.step_ms_per_image > 0
        assert row.how == "extrapolated"
    else:
        assert row.steps is None and row.how == "measured"


def test_steps_change_the_diffusion_sample() -> None:
    model = bench_sampling.random_model("ldm", 32, base_channels=8)
    bench_sampling.set_steps(model, 1)
    one = model.generate(2, seed=0, condition=["inferior", "middle"]).images
    assert model.module.timesteps.shape[0] == 1  # the sampler's plan follows the override
    bench_sampling.set_steps(model, 3)
    three = model.generate(2, seed=0, condition=["inferior", "middle"]).images
    assert model.module.timesteps.shape[0] == 3
    assert one.shape == three.shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="ddpm or ldm"):
        bench_sampling.set_steps(bench_sampling.random_model("vae", 32, base_channels=8), 2)


def test_score_steps_on_real_slices() -> None:
    from tasks import features
    from tasks.config import load_pipeline

    slices = mni_slices(32, limit=36)
    real = np.stack(slices).astype(np.float32) / 255.0
    labels = [bench_sampling.LABELS[i % 3] for i in range(len(real))]
    subjects = [f"s{i % 6}" for i in range(len(real))]
    extractor = features.random_extractor(1, seed=0)
    reference = bench_sampling.Reference(
        images=real,
        labels=labels,
        subjects=subjects,
        features=features.extract_features(extractor, real, normalisation="unit"),
        extractor=extractor,
        normalisation="unit",
        cfg=load_pipeline("demo", bench_sampling.ROOT / "pipelines.yaml"),
        extractor_name=extractor.name,
    )
    model = bench_sampling.random_model("ddpm", 32, base_channels=8)
    torch.manual_seed(0)
    row = bench_sampling.score_steps("ddpm", model, reference, steps=2, per_class=8, realism_epochs=1)
    assert row.n == 24 and row.steps == 2 and model.ddim_steps == 2
    assert np.isfinite(row.fid) and row.fid > 0
    assert row.s_per_image > 0
    assert row.auc is None or 0.0 <= row.ci95_low <= row.auc <= row.ci95_high <= 1.0


def test_card_rows_read_the_shipped_cards() -> None:
    rows = bench_sampling.card_rows()
    ids = {row[0] for row in rows}
    assert "synthmed/mni152-ddpm" in ids
    assert all(row[3] > 0 for row in rows)


def test_gpu_section_reports_missing_cuda(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the guard, on any machine
    assert bench_sampling.gpu_section(["cgan-mednist"], [32], 64, 8) == []
    assert "GPU: not available" in capsys.readouterr().out
