"""The headline file DVC shows (``metrics/<p>/summary.json``) and the plot CSVs, from
quality.json / retrain.json shaped as the filter and retrain stages write them (the real
files go through it in tests/integration/test_experiments.py)."""

from __future__ import annotations

import csv
import json

import yaml

from tasks.config import PipelineConfig
from tasks.paths import PipelinePaths
from tasks.summary import build_summary, outputs, plot_definitions, training_losses, write_summary

STATS = {"mean": 0.55, "ci95_low": 0.2, "ci95_high": 0.9, "per_seed": [0.5, 0.6]}
DELTA = {
    "mean": 0.0523456,
    "ci95_low": -0.1,
    "ci95_high": 0.2,
    "bootstrap_ci95_low": -0.05,
    "bootstrap_ci95_high": 0.15,
}
RETRAIN = {
    "primary_metric": "balanced_accuracy",
    "verdict": "no measurable effect",
    "real_only": {"balanced_accuracy": STATS},
    "augmented": {"balanced_accuracy": {**STATS, "mean": 0.6}},
    "delta": {"balanced_accuracy": DELTA, "accuracy": {"mean": 9.0}},
    "n_real_train": 76,
    "n_synthetic_used": 62,
    "ratio_sweep": {
        "conditions": [
            {"ratio": 0.0, "metrics": {"balanced_accuracy": STATS}},
            {"ratio": 1.0, "metrics": {"balanced_accuracy": {**STATS, "mean": 0.7}}},
        ]
    },
    "low_data": {
        "conditions": [
            {"fraction": 0.1, "real_only": {"balanced_accuracy": STATS}, "augmented": {"balanced_accuracy": STATS}}
        ]
    },
}
QUALITY = {
    "kept_fraction": 0.693333,
    "set_metrics": {"extractor": {"name": "contrastive-densenet"}, "sets": {"kept": {"overall": {"fid": 7.035852}}}},
    "realism": {
        "two_sample": {
            "auc": 0.965,
            "ci95_low": 0.94,
            "ci95_high": 0.98,
            "per_class": {"inferior": {"auc": 0.9, "ci95_low": 0.8, "ci95_high": 1.0}},
        }
    },
}


def test_summary_is_flat_short_and_names_the_headline():
    summary = build_summary("no measurable effect", QUALITY, RETRAIN, "synthmed/demo-cgan@1.0.0")
    assert summary["verdict"] == "no measurable effect" and summary["metric"] == "balanced_accuracy"
    assert (summary["delta"], summary["delta_lo"], summary["delta_hi"]) == (0.0523, -0.1, 0.2)
    assert (summary["real"], summary["aug"]) == (0.55, 0.6)
    assert (summary["auc"], summary["fid"], summary["kept"]) == (0.965, 7.0359, 0.6933)
    assert (summary["n_real"], summary["n_syn"], summary["generator"]) == (76, 62, "synthmed/demo-cgan@1.0.0")
    assert all(not isinstance(v, (dict, list)) for v in summary.values())  # one DVC column per key
    assert len(summary) <= 14 and max(len(k) for k in summary) <= 9


def test_a_rejected_set_without_a_comparison_still_has_a_verdict():
    summary = build_summary("REJECTED", {"kept_fraction": 0.1}, None, None)
    assert summary["verdict"] == "REJECTED" and summary["kept"] == 0.1
    assert summary["delta"] is None and summary["auc"] is None and summary["n_syn"] is None


def test_write_summary_and_plot_files(tmp_path):
    cfg = PipelineConfig.model_validate(
        {"source": {"kind": "mni152"}, "generator": {"train": {"architecture": "vae", "epochs": 2}}}
    )
    paths = PipelinePaths(tmp_path, "p")
    paths.metrics.mkdir(parents=True)
    (paths.metrics / "quality.json").write_text(json.dumps(QUALITY))
    paths.generator.mkdir(parents=True)
    (paths.generator / "card.yaml").write_text(yaml.safe_dump({"id": "me/p-vae", "version": "1.0.0"}))
    (paths.generator / "history.csv").write_text("epoch,loss,loss_recon,loss_kl\n1,3.0,2.5,0.5\n2,2.0,1.8,0.2\n")

    summary = write_summary(cfg, paths, "no measurable effect", RETRAIN)
    assert json.loads((paths.metrics / "summary.json").read_text()) == {"p": summary}
    # DVC shows metric columns in the file's order: the answer first (flows/experiments.py)
    in_file = list(json.loads((paths.metrics / "summary.json").read_text())["p"])
    assert in_file[:5] == ["verdict", "delta", "delta_lo", "delta_hi", "auc"], in_file
    assert summary["generator"] == "me/p-vae@1.0.0"
    files = {p.name: list(csv.DictReader(p.open())) for p in outputs(paths)[1:]}
    assert [r["ratio"] for r in files["ratio_sweep.csv"]] == ["0.0", "1.0"]
    assert files["ratio_sweep.csv"][1] == {"ratio": "1.0", "mean": "0.7", "lo": "0.2", "hi": "0.9"}
    assert files["low_data.csv"][0]["augmented_hi"] == "0.9"
    assert [(r["class"], r["auc"]) for r in files["realism.csv"]] == [("overall", "0.965"), ("inferior", "0.9")]
    assert files["training.csv"][1] == {"epoch": "2", "loss": "2.0", "loss_recon": "1.8", "loss_kl": "0.2"}

    # the plot declarations name exactly these files and columns
    definitions = {k: v for d in plot_definitions(cfg, paths) for k, v in d.items()}
    assert set(definitions) == {"p/ratio-sweep", "p/low-data", "p/realism", "p/training"}
    training_y = definitions["p/training"]["y"]
    assert training_y == {"metrics/p/plots/training.csv": list(training_losses(cfg))}
    for definition in definitions.values():
        for file, fields in definition["y"].items():
            header = (tmp_path / file).read_text().splitlines()[0].split(",")
            assert set([fields] if isinstance(fields, str) else fields) <= set(header)
            assert definition["x"] in header


def test_no_history_and_no_sweep_give_header_only_files(tmp_path):
    cfg = PipelineConfig.model_validate({"source": {"kind": "mni152"}, "generator": {"id": "synthmed/demo-cgan@1.0.0"}})
    paths = PipelinePaths(tmp_path, "q")
    paths.metrics.mkdir(parents=True)
    write_summary(cfg, paths, "not tested: too little data", None)
    for path in outputs(paths)[1:]:
        assert len(path.read_text().splitlines()) == 1, path  # DVC finds every declared output
