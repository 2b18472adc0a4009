"""The retrain stage on phantoms: both settings, CIs, verdict, determinism, segmentation."""

from __future__ import annotations

import csv
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from generators.errors import DataError
from tasks import statistics
from tasks.config import PipelineConfig
from tasks.paths import PipelinePaths
from tasks.retrain import retrain
from tasks.retrain_data import allocate
from tasks.statistics import (
    NOT_TESTED_NO_SYNTHETIC,
    NOT_TESTED_TOO_LITTLE_DATA,
    VERDICT_RULE,
    decide,
    t_critical_95,
    t_interval,
)
from tests.tasks.phantoms import write_real, write_synthetic

VERDICTS = {"helped", "no measurable effect", "hurt"}


def make_config(preflight: dict | None = None, **retrain: object) -> PipelineConfig:
    spec = {"steps": 12, "batch_size": 16, "lr": 3e-3, "seeds": [0, 1], "synthetic_ratio": 0.5, **retrain}
    return PipelineConfig.model_validate(
        {
            "source": {"kind": "folder", "path": "x"},
            "generator": {"train": {}},
            "threads": 1,
            "retrain": spec,
            "preflight": preflight or {},
        }
    )


@pytest.fixture()
def paths(tmp_path: Path) -> PipelinePaths:
    paths = PipelinePaths(root=tmp_path, pipeline="t")
    write_real(paths.real, {"train": 8, "val": 2, "test": 6})
    # retrain reads the filtered dataset; clean phantoms stand in for the filter's output
    write_synthetic(paths.filtered, per_class=6, blank=0, saturated=0, corrupt=0, mislabelled=0)
    return paths


def test_classification_writes_both_settings_and_is_deterministic(paths: PipelinePaths) -> None:
    cfg = make_config()
    result = retrain(cfg, paths)
    first_json = (paths.metrics / "retrain.json").read_bytes()
    first_csv = (paths.metrics / "retrain_seeds.csv").read_bytes()

    summary = json.loads(first_json)
    assert summary == result
    assert summary["n_real_train"] == 24 and summary["n_test"] == 18
    assert summary["n_synthetic_used"] == 12  # 0.5 x 24, stratified like the real train split
    assert summary["synthetic_used_per_class"] == {"disc": 4, "ring": 4, "square": 4}
    assert summary["verdict"] in VERDICTS
    for setting in ("real_only", "augmented", "delta"):
        for metric in ("accuracy", "balanced_accuracy", "macro_f1"):
            stats = summary[setting][metric]
            assert len(stats["per_seed"]) == 2
            assert stats["ci95_low"] <= stats["mean"] <= stats["ci95_high"]
            if setting != "delta":
                assert 0.0 <= stats["mean"] <= 1.0
    delta = summary["delta"]["balanced_accuracy"]
    assert delta["per_seed"] == pytest.approx(
        [
            a - r
            for r, a in zip(
                summary["real_only"]["balanced_accuracy"]["per_seed"],
                summary["augmented"]["balanced_accuracy"]["per_seed"],
                strict=True,
            )
        ],
        abs=2e-6,
    )
    assert delta["bootstrap_ci95_low"] <= delta["bootstrap_ci95_high"]
    # power: the half-width of the wider of the two intervals, under the one written rule
    assert summary["verdict_rule"] == VERDICT_RULE
    halves = {
        "seeds": (delta["ci95_high"] - delta["ci95_low"]) / 2,
        "test images": (delta["bootstrap_ci95_high"] - delta["bootstrap_ci95_low"]) / 2,
    }
    power = summary["power"]
    assert power["interval_governing"] == max(halves, key=halves.get)
    assert power["mde"] == pytest.approx(max(halves.values()), abs=2e-6)
    assert (power["metric"], power["n_test"], power["n_seeds"]) == ("balanced_accuracy", 18, 2)
    assert "(18 test images, 2 seeds)" in power["statement"] and f"{power['mde']:.3f}" in power["statement"]
    assert power["statement"].startswith(summary["verdict"])

    rows = list(csv.DictReader((paths.metrics / "retrain_seeds.csv").open()))
    assert [(r["seed"], r["setting"]) for r in rows] == [
        ("0", "real_only"),
        ("0", "augmented"),
        ("1", "real_only"),
        ("1", "augmented"),
    ]
    assert float(rows[0]["accuracy"]) == pytest.approx(summary["real_only"]["accuracy"]["per_seed"][0], abs=1e-6)

    retrain(cfg, paths)
    assert (paths.metrics / "retrain.json").read_bytes() == first_json
    assert (paths.metrics / "retrain_seeds.csv").read_bytes() == first_csv


def test_segmentation_on_phantoms_with_masks(paths: PipelinePaths) -> None:
    cfg = make_config(task="segmentation", network="unet", steps=8, seeds=[0])
    summary = retrain(cfg, paths)
    assert summary["primary_metric"] == "dice" and summary["num_classes"] == 2
    for setting in ("real_only", "augmented"):
        assert 0.0 <= summary[setting]["dice"]["mean"] <= 1.0
        assert summary[setting]["hd95"]["mean"] >= 0.0
        assert summary[setting]["dice"]["ci95_low"] is None  # one seed: no t-interval
    assert summary["verdict"] in VERDICTS
    assert summary["lower_is_better"] == ["hd95"]


def test_missing_test_split_is_an_error(tmp_path: Path) -> None:
    paths = PipelinePaths(root=tmp_path, pipeline="t")
    write_real(paths.real, {"train": 4, "val": 2})
    write_synthetic(paths.filtered, per_class=2, blank=0, saturated=0, corrupt=0, mislabelled=0)
    with pytest.raises(DataError, match="0 test images"):  # the preflight, before any training
        retrain(make_config(), paths)
    with pytest.raises(DataError, match="non-empty 'test' split"):  # opted in: the stage's own check
        retrain(make_config(preflight={"allow_too_little_data": True}), paths)


def test_segmentation_needs_synthetic_masks(tmp_path: Path) -> None:
    paths = PipelinePaths(root=tmp_path, pipeline="t")
    write_real(paths.real, {"train": 4, "val": 1, "test": 2})
    write_synthetic(paths.filtered, per_class=2, blank=0, saturated=0, corrupt=0, mislabelled=0, masks=False)
    with pytest.raises(DataError, match="expected a mask on every synthetic row"):
        retrain(make_config(task="segmentation", network="unet"), paths)


def test_statistics_helpers() -> None:
    assert round(t_critical_95(2), 3) == 4.303 and round(t_critical_95(35), 3) == 2.03
    assert round(t_critical_95(1000), 2) == 1.96
    stats = t_interval([1.0, 2.0, 3.0])
    assert stats["mean"] == 2.0
    assert stats["ci95_low"] == pytest.approx(2.0 - 4.303 / np.sqrt(3), abs=1e-3)
    assert t_interval([0.5])["ci95_low"] is None
    above = {"ci95_low": 0.01, "ci95_high": 0.2, "bootstrap_ci95_low": 0.02, "bootstrap_ci95_high": 0.1}
    assert decide(above, lower_is_better=False) == "helped"
    assert decide(above, lower_is_better=True) == "hurt"
    assert decide({**above, "bootstrap_ci95_low": -0.01}, lower_is_better=False) == "no measurable effect"
    assert decide({**above, "ci95_low": None, "ci95_high": None}, lower_is_better=False) == "helped"
    assert allocate(10, {"a": 2, "b": 1}, {"a": 100, "b": 100}) == {"a": 7, "b": 3}
    assert allocate(10, {"a": 2, "b": 1}, {"a": 2, "b": 100}) == {"a": 2, "b": 3}


def test_validation_selection_keeps_the_best_scoring_weights(paths: PipelinePaths) -> None:
    """train_model with ``val`` returns the checkpoint with the best validation score; it
    can only be at least as good on val as the final weights, and with val the summary
    records how many val images chose the weights."""
    import torch

    from tasks import downstream

    real_train = downstream.load_labelled(paths.real, ["train"], ["disc", "ring", "square"])
    val = downstream.load_labelled(paths.real, ["val"], ["disc", "ring", "square"])
    val_pair = (val.images, val.targets)

    def fit(with_val: bool) -> torch.nn.Module:
        model = downstream.build_network("classification", "densenet", 1, 3)
        return downstream.train_model(
            model,
            real_train.images,
            real_train.targets,
            task="classification",
            steps=10,
            batch_size=8,
            lr=3e-3,
            seed=0,
            val=val_pair if with_val else None,
            eval_every=2,
        )

    final, selected = fit(False), fit(True)
    score = lambda m: downstream.validation_score(m, val_pair, task="classification")  # noqa: E731
    assert 0.0 <= score(final) <= score(selected) <= 1.0

    summary = retrain(make_config(seeds=[0]), paths)
    assert summary["n_val_for_selection"] == 6 and summary["eval_every"] == 25
    assert retrain(make_config(seeds=[0], select_on_val=False), paths)["n_val_for_selection"] == 0


def test_validation_score_for_segmentation_is_mean_foreground_dice() -> None:
    import torch

    from tasks import downstream

    class Perfect(torch.nn.Module):  # logits that reproduce a fixed mask exactly
        def __init__(self, masks: np.ndarray) -> None:
            super().__init__()
            self.masks = torch.from_numpy(masks)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot(self.masks[: x.shape[0]], 2).permute(0, 3, 1, 2).float() * 10

    masks = np.zeros((2, 8, 8), np.int64)
    masks[:, 2:6, 2:6] = 1
    images = np.zeros((2, 1, 8, 8), np.float32)
    assert downstream.validation_score(Perfect(masks), (images, masks), task="segmentation") == pytest.approx(1.0)
    shifted = np.roll(masks, 2, axis=2)  # half the square overlaps: Dice 0.5
    assert downstream.validation_score(Perfect(shifted), (images, masks), task="segmentation") == pytest.approx(0.5)


def test_every_sweep_condition_has_a_verdict_and_its_power(paths: PipelinePaths) -> None:
    summary = retrain(make_config(seeds=[0], steps=4, ratios=[0, 1], real_fractions=[0.5]), paths)
    conditions = [c for c in summary["ratio_sweep"]["conditions"] if c["ratio"] > 0]
    conditions += summary["low_data"]["conditions"]
    assert len(conditions) == 2
    for condition in conditions:
        assert condition["verdict"] in VERDICTS
        d = condition["delta"]["balanced_accuracy"]
        assert d["ci95_low"] is None  # one seed: the bootstrap alone governs
        power = condition["power"]
        assert power["interval_governing"] == "test images" and power["n_seeds"] == 1
        assert power["mde"] == pytest.approx((d["bootstrap_ci95_high"] - d["bootstrap_ci95_low"]) / 2, abs=2e-6)
        assert "one seed" in power["statement"]
    baseline = summary["ratio_sweep"]["conditions"][0]
    assert baseline["ratio"] == 0 and baseline["verdict"] is None and baseline["power"] is None


def test_no_synthetic_image_in_the_retrain_is_not_tested(tmp_path: Path) -> None:
    """The filter dropped every synthetic image: no comparison of real only with itself,
    no augmented runs trained, every condition says "not tested"."""
    paths = PipelinePaths(root=tmp_path, pipeline="t")
    write_real(paths.real, {"train": 8, "val": 2, "test": 6})
    write_synthetic(paths.filtered, per_class=0, blank=0, saturated=0, corrupt=0, mislabelled=0)
    summary = retrain(make_config(steps=4, ratios=[0, 1], real_fractions=[0.5]), paths)
    assert summary["n_synthetic_used"] == 0
    assert summary["verdict"] == NOT_TESTED_NO_SYNTHETIC
    assert summary["power"]["mde"] is None and summary["power"]["statement"].startswith(NOT_TESTED_NO_SYNTHETIC)
    assert summary["delta"]["balanced_accuracy"]["mean"] is None
    assert summary["augmented"]["balanced_accuracy"]["mean"] is None
    assert summary["real_only"]["balanced_accuracy"]["mean"] is not None
    # 2 seeds x (main real only, fraction 0.5 real only); ratio 1 without rows is ratio 0 = main
    assert summary["runs_trained"] == 4
    ratio_one = summary["ratio_sweep"]["conditions"][1]
    assert ratio_one["n_synthetic"] == 0 and ratio_one["verdict"] == NOT_TESTED_NO_SYNTHETIC
    assert ratio_one["delta"] is None and ratio_one["power"]["mde"] is None
    fraction = summary["low_data"]["conditions"][0]
    assert fraction["verdict"] == NOT_TESTED_NO_SYNTHETIC and fraction["augmented"]["balanced_accuracy"]["mean"] is None
    rows = list(csv.DictReader((paths.metrics / "retrain_seeds.csv").open()))
    assert {r["setting"] for r in rows} == {"real_only"}
    rows = list(csv.DictReader((paths.metrics / "retrain_fractions.csv").open()))
    assert len(rows) == 2 and all(r["augmented_balanced_accuracy"] == "" for r in rows)


def test_synthetic_ratio_zero_is_not_tested(paths: PipelinePaths) -> None:
    summary = retrain(make_config(seeds=[0], steps=4, synthetic_ratio=0), paths)
    assert summary["verdict"] == NOT_TESTED_NO_SYNTHETIC and summary["runs_trained"] == 1


def test_failed_preflight_makes_every_verdict_not_tested(paths: PipelinePaths, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit test of the hook (its real counterpart: the next test)."""
    problems = ["class 'disc' has 1 train image; need >= 4"]
    fake = types.ModuleType("tasks.preflight")
    fake.preflight = lambda cfg, paths: {"passed": False, "problems": problems, "counts": {}}
    monkeypatch.setitem(sys.modules, "tasks.preflight", fake)
    summary = retrain(make_config(seeds=[0], steps=4, real_fractions=[1.0]), paths)
    assert summary["verdict"] == NOT_TESTED_TOO_LITTLE_DATA
    assert summary["preflight"] == {"passed": False, "problems": problems}
    assert summary["low_data"]["conditions"][0]["verdict"] == NOT_TESTED_TOO_LITTLE_DATA
    assert summary["power"]["statement"].startswith(NOT_TESTED_TOO_LITTLE_DATA)
    fake.preflight = lambda cfg, paths: {"passed": True, "problems": []}
    assert retrain(make_config(seeds=[0], steps=4), paths)["verdict"] in VERDICTS


def test_too_little_data_stops_or_with_the_opt_in_is_not_tested(tmp_path: Path) -> None:
    paths = PipelinePaths(root=tmp_path, pipeline="t")
    write_real(paths.real, {"train": 2, "val": 1, "test": 2})  # below the default 4 train per class
    write_synthetic(paths.filtered, per_class=2, blank=0, saturated=0, corrupt=0, mislabelled=0)
    with pytest.raises(DataError, match="too little data"):
        retrain(make_config(seeds=[0], steps=4), paths)
    summary = retrain(make_config(preflight={"allow_too_little_data": True}, seeds=[0], steps=4), paths)
    assert summary["verdict"] == NOT_TESTED_TOO_LITTLE_DATA
    assert summary["preflight"]["passed"] is False and summary["preflight"]["problems"]
    assert summary["n_synthetic_used"] > 0  # the runs went on; only the verdict is withheld


def test_real_only_at_the_ceiling_is_not_called_no_effect() -> None:
    """Real only perfect on every seed and augmented too: "no measurable effect, could detect
    0.000" would mislead (no gain could show), so the verdict says why nothing was judged; a
    loss from the same ceiling is still "hurt"; one imperfect real-only seed is judged as usual."""
    from tasks.retrain import Comparison
    from tasks.retrain_runs import RunResult

    y_true = np.array([0, 1] * 13)

    def runs(wrong: list[int]) -> list[RunResult]:
        out = []
        for n in wrong:
            pred = y_true.copy()
            pred[:n] = 1 - pred[:n]
            scores = {
                m: float(v)
                for m, v in statistics.scores_from_confusion(statistics.confusion_matrix(y_true, pred, 2)).items()
            }
            out.append(RunResult(scores=scores, output=pred, time_s=0.0))
        return out

    judge = Comparison("classification", "balanced_accuracy", y_true, 2, 0, None)
    _, verdict, power = judge.judge(runs([0, 0, 0]), runs([0, 0, 0]))
    assert verdict == statistics.NOT_TESTED_CEILING == "not tested: real only already scores the maximum"
    assert "no gain could show" in power["statement"]
    _, hurt, _ = judge.judge(runs([0, 0, 0]), runs([8, 9, 10]))
    assert hurt == statistics.HURT
    _, usual, _ = judge.judge(runs([0, 1, 0]), runs([0, 0, 0]))
    assert usual == statistics.NO_EFFECT
    assert statistics.at_ceiling("hd95", [0.0, 0.0]) and not statistics.at_ceiling("dice", [1.0, 0.99])
