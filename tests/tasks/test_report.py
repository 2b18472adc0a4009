"""The report stage: Markdown table and verdict, class counts, card summary, PNG grids."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from PIL import Image

from generators.errors import DataError
from tasks.config import PipelineConfig
from tasks.filter import filter_synthetic
from tasks.paths import PipelinePaths
from tasks.quality_report import md_cell
from tasks.report import headline, metric_table, render_fraction_plot, render_markdown, report
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
    # class counts: real train/val/test, synthetic generated/dropped (all filters)/kept/used;
    # disc carries 3 good rows + 1 blank + 1 saturated + 1 corrupt
    assert "| disc | 6 | 2 | 3 | 6 | 3 | 3 | 3 |" in markdown
    assert "| **total** | 18 | 6 | 9 | 14 | 5 | 9 | 9 |" in markdown
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


# --------------------------------------------------------------------------- hand-written results
METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
RULE = "helped (hurt) only when BOTH 95% intervals lie above (below) zero; otherwise no measurable effect"
NO_EFFECT_POWER = {
    "metric": "balanced_accuracy",
    "mde": 0.121,
    "statement": "no measurable effect: this test (24 test images, 3 seeds) could only have detected a change "
    "of at least 0.121 balanced accuracy",
}


def _stats(mean: float | None) -> dict:
    if mean is None:
        return {"mean": None, "ci95_low": None, "ci95_high": None, "per_seed": []}
    return {"mean": mean, "ci95_low": mean - 0.05, "ci95_high": mean + 0.05, "per_seed": [mean] * 3}


def _delta(mean: float | None) -> dict:
    if mean is None:
        keys = ("mean", "ci95_low", "ci95_high", "bootstrap_ci95_low", "bootstrap_ci95_high")
        return {**dict.fromkeys(keys), "per_seed": []}
    return {
        "mean": mean,
        "ci95_low": mean - 0.1,
        "ci95_high": mean + 0.1,
        "bootstrap_ci95_low": mean - 0.08,
        "bootstrap_ci95_high": mean + 0.08,
        "per_seed": [mean] * 3,
    }


def retrain_dict(verdict: str = "no measurable effect", delta: float | None = 0.0417, **extra) -> dict:
    tested = not verdict.startswith("not tested")
    return {
        "task": "classification",
        "network": "densenet",
        "primary_metric": "balanced_accuracy",
        "lower_is_better": [],
        "real_only": {m: _stats(0.7) for m in METRICS},
        "augmented": {m: _stats(0.74 if tested else None) for m in METRICS},
        "delta": {m: _delta(delta) for m in METRICS},
        "verdict": verdict,
        "verdict_rule": RULE,
        "power": NO_EFFECT_POWER if tested else {"mde": None, "statement": f"{verdict}: no comparison was made"},
        "seeds": [0, 1, 2],
        "steps": 300,
        "batch_size": 32,
        "lr": 0.001,
        "n_val_for_selection": 0,
        "synthetic_ratio": 1.0,
        "n_real_train": 76,
        "n_synthetic_used": 76 if tested else 0,
        "n_test": 24,
        "classes": ["a|b", "plain"],
        "synthetic_used_per_class": {"a|b": 38, "plain": 38} if tested else {},
        **extra,
    }


def quality_dict(**extra) -> dict:
    per_class = {"a|b": {"generated": 100, "dropped_sanity": 2, "dropped_mask_unknown_class": 5, "kept": 93}}
    per_class["plain"] = {"generated": 100, "dropped_sanity": 0, "dropped_mask_unknown_class": 0, "kept": 100}
    return {
        "per_class": per_class,
        "totals": {"generated": 200, "dropped_sanity": 2, "dropped_mask_unknown_class": 5, "kept": 193},
        "realism": {
            "two_sample": {
                "auc": 0.612,
                "ci95_low": 0.54,
                "ci95_high": 0.69,
                "n_real": 60,
                "n_synthetic": 60,
                "folds": 5,
                "per_class": {
                    "a|b": {"auc": 0.701, "ci95_low": 0.6, "ci95_high": 0.8, "n_real": 30, "n_synthetic": 30},
                    "plain": {"auc": 0.523, "ci95_low": 0.41, "ci95_high": 0.64, "n_real": 30, "n_synthetic": 30},
                },
            }
        },
        "set_metrics": {
            "extractor": {
                "name": "fold-classifier",
                "dim": 64,
                "normalisation": "unit",
                "quality": {"metric": "val_accuracy", "value": 0.91, "chance": 0.5, "reliable": True},
            },
            "sets": {
                "kept": {
                    "overall": {"n_real": 76, "n_synthetic": 193, "fid": 12.5, "precision": 0.8},
                    "per_class": {"a|b": {"n_real": 38, "n_synthetic": 93, "fid": 14.25}},
                }
            },
        },
        "label_classifier": {"network": "densenet", "steps": 50, "n_val": 32, "val_accuracy": 0.94, "reliable": True},
        "gate": {
            "passed": True,
            "realism_passed": True,
            "checks": [
                {
                    "metric": "two_sample_auc",
                    "bound_name": "max_two_sample_auc",
                    "bound": 0.8,
                    "value": 0.612,
                    "passed": True,
                }
            ],
        },
        **extra,
    }


REAL_COUNTS = {"train": {"a|b": 38, "plain": 38}, "val": {"a|b": 16, "plain": 16}, "test": {"a|b": 12, "plain": 12}}


def render(retrain: dict | None, quality: dict) -> str:
    return render_markdown("p", "", retrain, quality, REAL_COUNTS, None, "models/p/generator/card.yaml")


def table_rows(markdown: str) -> list[list[str]]:
    """Every Markdown table as a list of rows, each the cells split on unescaped pipes."""
    tables, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
        elif current:
            tables.append(current)
            current = []
    return tables


def test_a_tested_verdict_prints_its_power_and_the_rule_once() -> None:
    markdown = render(retrain_dict(), quality_dict())
    top = markdown.splitlines()[2]
    assert top.startswith("**Verdict on balanced_accuracy: no measurable effect**: this test (24 test images")
    assert "could only have detected a change of at least 0.121 balanced accuracy" in top
    verdict_line = next(line for line in markdown.splitlines() if line.startswith("**Verdict on balanced_accuracy"))
    assert verdict_line == top  # the first one is the headline
    section = markdown.split("## Does synthetic data help?")[1].split("## How much")[0]
    assert "| **balanced_accuracy** | 0.700 ± 0.050 | 0.740 ± 0.050 | +0.042 | [-0.058, +0.142] |" in section
    assert "Power: this test (24 test images, 3 seeds) could only have detected a change of at least 0.121" in section
    assert markdown.count(RULE) == 1


@pytest.mark.parametrize(
    ("verdict", "reason"),
    [
        ("not tested: no synthetic images reached the retrain", "the filters kept 193 of 200 synthetic images, so 0"),
        ("not tested: too little data", "class 'plain' has 2 train / 0 val / 1 test images"),
        ("not tested: real only already scores the maximum", "real only scored the best possible balanced_accuracy"),
    ],
)
def test_a_not_tested_verdict_prints_no_comparison(verdict: str, reason: str) -> None:
    preflight = {"passed": False, "problems": ["class 'plain' has 2 train / 0 val / 1 test images"]}
    # a computed delta must not be shown as if the comparison counted: "too little data" may carry one
    retrain = retrain_dict(verdict, delta=0.25 if "little" in verdict else None, preflight=preflight)
    markdown = render(retrain, quality_dict())
    assert markdown.splitlines()[2].startswith(f"**Verdict: {verdict}**: ")
    assert reason in markdown.splitlines()[2]
    assert "real + synthetic |" not in markdown and "delta 95% CI" not in markdown
    assert "+0.250" not in markdown and "helped" not in markdown.replace("helped (hurt)", "")
    assert "| **balanced_accuracy** | 0.700 ± 0.050 |" in markdown  # real only, for reference
    assert metric_table(retrain) == []


def test_sweep_conditions_print_power_and_not_tested_rows_without_a_delta() -> None:
    tested = {"ratio": 1.0, "n_synthetic": 76, "n_synthetic_requested": 76, "effective_ratio": 1.0}
    tested.update(metrics={m: _stats(0.72) for m in METRICS}, delta={m: _delta(0.02) for m in METRICS})
    tested.update(verdict="no measurable effect", power=NO_EFFECT_POWER)
    empty = {"ratio": 2.0, "n_synthetic": 0, "n_synthetic_requested": 152, "effective_ratio": 0.0}
    empty.update(metrics={m: _stats(0.7) for m in METRICS}, delta=None, power=None)
    empty["verdict"] = "not tested: no synthetic images reached the retrain"
    base = {"ratio": 0.0, "n_synthetic": 0, "n_synthetic_requested": 0, "effective_ratio": 0.0}
    base.update(metrics={m: _stats(0.7) for m in METRICS}, delta=None, verdict=None, power=None)
    fraction = {"fraction": 0.1, "n_real": 8, "n_synthetic": 0, "n_synthetic_requested": 8}
    fraction.update(real_only={m: _stats(0.5) for m in METRICS}, augmented={m: _stats(None) for m in METRICS})
    fraction.update(delta={m: _delta(None) for m in METRICS}, verdict=empty["verdict"], power=None)
    retrain = retrain_dict(
        ratio_sweep={"seeds": [0, 1, 2], "steps": 100, "conditions": [base, tested, empty]},
        low_data={"seeds": [0, 1, 2], "steps": 100, "synthetic_ratio": 1.0, "conditions": [fraction]},
    )
    markdown = render(retrain, quality_dict())
    assert "| 2 | 0 of 152 requested | 0.700 ± 0.050 |  |  |  | not tested: no synthetic images reached" in markdown
    assert "- ratio 1: **no measurable effect**: delta +0.020" in markdown
    assert "Power: this test (24 test images, 3 seeds) could only have detected" in markdown.split("- ratio 1:")[1]
    assert "- ratio 2: **not tested: no synthetic images reached the retrain**: no comparison was made." in markdown
    assert "| 0.1 | 8 | 0 of 8 requested | 0.500 ± 0.050 | not trained |  |  |  | not tested" in markdown
    assert render_fraction_plot(retrain)[:8] == b"\x89PNG\r\n\x1a\n"  # untrained points are left out


def test_realism_two_sample_per_class_and_extractor_quality_are_shown() -> None:
    markdown = render(retrain_dict(), quality_dict())
    assert "### Realism: two-sample test (0.5 = indistinguishable)" in markdown
    assert "| **overall** | 0.612 | [0.540, 0.690] | 60 | 60 |" in markdown
    assert "| a\\|b | 0.701 | [0.600, 0.800] | 30 | 30 |" in markdown
    assert "| plain | 0.523 | [0.410, 0.640] | 30 | 30 |" in markdown
    assert "Realism: two-sample AUC 0.612 [0.540, 0.690]" in markdown.split("## Does synthetic")[0]
    assert "The extractor's own quality: val\\_accuracy 0.91 (chance 0.5): reliable." in markdown
    assert "| **overall** | 76 | 193 | 12.5 |" in markdown and "unreliable" not in markdown
    assert "reaches accuracy 0.940 on 32 real val images" in markdown and "Reliable (well above chance)" in markdown
    assert "**passed** (realism checks: passed)" in markdown
    assert "| dropped (mask: unknown class) |" in markdown.split("### Filters")[1]
    assert "| a\\|b | 100 | 2 | 5 | 93 |" in markdown.split("### Filters")[1]


def test_an_unreliable_extractor_marks_every_set_metric() -> None:
    quality = quality_dict()
    quality["set_metrics"]["extractor"]["quality"] = {
        "metric": "val_accuracy",
        "value": 0.27,
        "chance": 0.25,
        "reliable": False,
    }
    quality["label_classifier"].update(val_accuracy=0.25, reliable=False, chance=0.25)
    markdown = render(retrain_dict(), quality)
    assert "(chance 0.25): **unreliable**" in markdown
    assert "**kept synthetic vs real train** (unreliable: extractor near chance)" in markdown
    assert "| **overall** | 76 | 193 | 12.5 (unreliable) | n/a | 0.8 (unreliable) |" in markdown
    assert "| a\\|b | 38 | 93 | 14.25 (unreliable) |" in markdown
    head = markdown.split("## Does synthetic")[0]
    assert "Set metrics (FID, KID, precision/recall, density/coverage) are **unreliable** here" in head
    assert "12.5" not in head  # the headline never quotes them
    assert "near chance (0.250): the classifier is **unreliable**" in markdown


def test_a_rejected_set_says_rejected_at_the_top_and_why() -> None:
    quality = quality_dict()
    quality["gate"] = {
        "passed": False,
        "realism_passed": False,
        "checks": [
            {
                "metric": "two_sample_auc",
                "bound_name": "max_two_sample_auc",
                "bound": 0.8,
                "value": 0.99,
                "passed": False,
            },
            {"metric": "precision", "bound_name": "min_precision", "bound": 0.5, "value": 0.7, "passed": True},
            {
                "metric": "two_sample_auc_ci95_low",
                "scope": "a|b",
                "bound_name": "max_two_sample_auc",
                "bound": 0.9,
                "value": 0.95,
                "passed": False,
                "status": "checked",
            },
            {
                "metric": "fid",
                "bound_name": "max_fid",
                "bound": 10.0,
                "value": 5.0,
                "passed": False,
                "status": "not checked: extractor unreliable",
            },
        ],
    }
    markdown = render(None, quality)
    top = markdown.splitlines()[2]
    assert top.startswith("**Verdict: REJECTED**: the quality gate rejected the synthetic set")
    assert "two\\_sample\\_auc 0.99 > max\\_two\\_sample\\_auc 0.8" in top and "precision" not in top
    assert "two\\_sample\\_auc\\_ci95\\_low (class a\\|b) 0.95 > max\\_two\\_sample\\_auc 0.9" in top
    assert "fid not checked: extractor unreliable (max\\_fid 10)" in top
    assert "| fid | 5 | <= 10 (max\\_fid) | FAIL: not checked: extractor unreliable |" in markdown
    assert "was not compared on a rejected set" in top
    assert "**FAILED: the synthetic set is REJECTED** (realism checks: FAILED)" in markdown
    assert "real + synthetic |" not in markdown and "## How much synthetic data" not in markdown
    assert headline(None, quality)[0] == "REJECTED"
    # with retrain results of this very set, the rejection still governs
    assert headline(retrain_dict("helped"), quality)[0] == "REJECTED"


def test_labels_are_escaped_in_every_table() -> None:
    quality = quality_dict()
    markdown = render(retrain_dict(), quality)
    assert "| a\\|b | 38 | 16 | 12 | 100 | 7 | 93 | 38 |" in markdown  # the Data table
    for table in table_rows(markdown):
        assert len({len(row) for row in table}) == 1, table  # no row gained a cell
    assert md_cell("x`*_<b>\n[y]") == "x\\`\\*\\_&lt;b&gt; \\[y\\]"


def test_old_results_without_the_new_keys_still_render() -> None:
    retrain = retrain_dict()
    for key in ("power", "verdict_rule"):
        retrain.pop(key)
    markdown = render(retrain, {"per_class": {}, "totals": {}})
    assert markdown.splitlines()[2] == "**Verdict on balanced_accuracy: no measurable effect**."
    assert "Realism" not in markdown and "Power:" not in markdown


def test_a_rejected_set_gets_its_report_without_retrain_results(tmp_path: Path) -> None:
    """The flow skips retrain after a gate failure; the report stage still writes a report,
    and an earlier run's retrain.json (not current) is left out."""
    cfg = make_config()
    paths = PipelinePaths(root=tmp_path, pipeline="t")
    write_real(paths.real, {"train": 2, "val": 1, "test": 1}, size=16)
    write_synthetic(paths.filtered, per_class=2, blank=0, saturated=0, corrupt=0, mislabelled=0)
    quality = quality_dict()
    quality["gate"]["passed"] = False
    quality["gate"]["checks"][0].update(value=0.97, passed=False)
    paths.metrics.mkdir(parents=True)
    (paths.metrics / "quality.json").write_text(json.dumps(quality))
    (paths.metrics / "retrain.json").write_text(json.dumps(retrain_dict("helped", delta=0.3)))  # stale
    result = report(cfg, paths)
    assert result["rejected"] is True and result["verdict"] == "REJECTED" and result["table"] == []
    markdown = Path(result["report"]).read_text()
    assert markdown.splitlines()[2].startswith("**Verdict: REJECTED**")
    assert "+0.300" not in markdown and "helped" not in markdown.replace("helped (hurt)", "")


@pytest.mark.integration
def test_a_run_whose_gate_rejects_the_set_writes_the_report_then_exits_non_zero(
    prefect_harness, tmp_path: Path, capsys
) -> None:
    from flows.cli import main
    from tests.flows.project import make_project

    quality = {  # cheap settings; no synthetic set has FID 0 (and an unreliable extractor fails it too)
        "label_consistency": {"enabled": False},
        "realism": {"enabled": False},
        "metrics": {"extractor": "random"},
        "gate": {"max_two_sample_auc": None, "max_fid": 0.0},
    }
    config = make_project(tmp_path / "proj", overrides={"quality": quality})
    status = main(["run", "--pipeline", "tiny", "--config", str(config), "--no-dvc"])
    err = capsys.readouterr().err
    assert status == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: quality gate failed: ") and last.endswith("reports/tiny/report.md")
    assert "FID" in last or "fid" in last
    paths = PipelinePaths(config.parent, "tiny")
    assert json.loads((paths.metrics / "quality.json").read_text())["gate"]["passed"] is False
    assert (paths.filtered / "_manifest.json").is_file()  # the filter's outputs are kept
    # retrain still ran, for the report only; the rejection governs the verdict
    assert json.loads((paths.metrics / "retrain.json").read_text())["verdict"]
    markdown = (paths.reports / "report.md").read_text()
    assert markdown.splitlines()[2].startswith("**Verdict: REJECTED**: the quality gate rejected the synthetic set")
    assert "the rejection governs" in markdown.splitlines()[2]
