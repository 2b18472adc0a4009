"""Mask-aware filtering of paired (image + mask) synthetic sets (tasks/mask_filters.py) through
the filter stage: unknown mask classes, implausible masks and image-mask disagreement are
dropped and counted per reason; an unreliable agreement model drops nothing.

Tiny seeded phantoms (32 px): a bright shape on a dark background whose mask holds class 1
(the outer shell) and class 2 (the brighter core), so the real masks hold {0, 1, 2}."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from generators.errors import DataError
from generators.shards import Row, read_table, write_dataset
from tasks import downstream, mask_filters
from tasks.config import MaskFilter, PipelineConfig
from tasks.filter import COUNT_KEYS, filter_synthetic
from tasks.paths import PipelinePaths

SIZE = 32
LABELS = ("disc", "square")


def draw_pair(label: str, rng: np.random.Generator, centre: tuple[float, float] | None = None):
    """image uint8 ``(1, SIZE, SIZE)``, mask uint8 ``(SIZE, SIZE)`` in {0, 1, 2}."""
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float64)
    cy, cx = centre if centre is not None else rng.uniform(10, 22, 2)
    radius = rng.uniform(5.5, 7.0)
    if label == "disc":
        distance = np.hypot(yy - cy, xx - cx)
    else:
        distance = np.maximum(np.abs(yy - cy), np.abs(xx - cx))
    mask = np.where(distance <= radius, 1, 0) + np.where(distance <= 0.5 * radius, 1, 0)
    image = np.choose(mask, [0.1, 0.5, 0.85]) + rng.normal(0, 0.03, (SIZE, SIZE))
    return np.rint(np.clip(image, 0.02, 0.98) * 255).astype(np.uint8)[None], mask.astype(np.uint8)


def write_real(target: Path, per_split: dict[str, int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in per_split.items():
        for label in LABELS:
            for i in range(n):
                image, mask = draw_pair(label, rng)
                row_id = f"{split}-{label}-{i:03d}"
                rows.append(
                    Row(
                        id=row_id,
                        subject=f"sub-{row_id}",
                        split=split,
                        label=label,
                        image=image,
                        source=f"phantom://{label}",
                        mask=mask,
                    ).to_record()
                )
    rows.sort(key=lambda r: r["id"])
    write_dataset(target, rows, shard_rows=16)


@dataclass
class PairIds:
    good: list[str] = field(default_factory=list)
    unknown_class: list[str] = field(default_factory=list)
    salt: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    disagree: list[str] = field(default_factory=list)


def write_synthetic_pairs(target: Path, seed: int = 5, masks: bool = True) -> PairIds:
    """Good pairs plus planted bad ones: a mask with a patch of class 3 (unknown to the real
    masks), salt-noise masks over {0, 1, 2}, empty masks, and a plausible mask of a shape
    far from the one in the image (disagreement)."""
    rng = np.random.default_rng(seed)
    kinds = ["good"] * 12 + ["unknown_class"] * 4 + ["salt"] * 4 + ["empty"] * 2 + ["disagree"] * 4
    ids = PairIds()
    records = []
    for position, k in enumerate(rng.permutation(len(kinds))):
        kind, label = kinds[k], LABELS[position % 2]
        image, mask = draw_pair(label, rng)
        if kind == "unknown_class":
            mask = mask.copy()
            mask[mask == 2] = 3
        elif kind == "salt":
            mask = rng.integers(0, 3, (SIZE, SIZE)).astype(np.uint8)
        elif kind == "empty":
            mask = np.zeros_like(mask)
        elif kind == "disagree":
            image, _ = draw_pair(label, rng, centre=(9.0, 9.0))
            _, mask = draw_pair(label, rng, centre=(23.0, 23.0))
        row_id = f"syn-{position:04d}"
        records.append(
            Row(
                id=row_id,
                subject="synthetic",
                split="train",
                label=label,
                image=image,
                source="paired-gan@1",
                mask=mask if masks else None,
                seed=seed,
            ).to_record()
        )
        getattr(ids, kind).append(row_id)
    write_dataset(target, records, shard_rows=8)
    return ids


def make_config(**masks: object) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "source": {"kind": "folder", "path": "x"},
            "threads": 1,
            "generator": {"train": {}},
            "synthesis": {"shard_rows": 8},
            "quality": {
                "sanity": {"enabled": True},
                "label_consistency": {"enabled": False},
                "masks": {"epochs": 40, **masks},
                "memorisation": {"enabled": False},
                "duplicates": {"enabled": False},
                "metrics": {"enabled": False},
            },
        }
    )


@pytest.fixture(scope="module")
def paired(tmp_path_factory: pytest.TempPathFactory):
    paths = PipelinePaths(root=tmp_path_factory.mktemp("paired"), pipeline="seg")
    write_real(paths.real, {"train": 24, "val": 8, "test": 2})
    ids = write_synthetic_pairs(paths.synthetic)
    result = filter_synthetic(make_config(), paths)
    quality = json.loads((paths.metrics / "quality.json").read_text())
    return paths, ids, result, quality


def test_paired_run_drops_and_counts_each_kind_of_bad_mask(paired) -> None:
    paths, ids, result, quality = paired
    totals = quality["totals"]
    assert totals["dropped_mask_unknown_class"] == len(ids.unknown_class) == 4
    assert totals["dropped_mask_implausible"] == len(ids.salt) + len(ids.empty) == 6
    assert totals["dropped_mask_disagree"] == len(ids.disagree) == 4
    assert totals["dropped_sanity"] == 0 and totals["kept"] == len(ids.good) == 12
    assert totals["generated"] == sum(totals[k] for k in COUNT_KEYS if k != "generated")
    for entry in quality["per_class"].values():
        assert entry["generated"] == sum(entry[k] for k in COUNT_KEYS if k != "generated")
    assert result["totals"] == totals

    kept = read_table(paths.filtered)
    assert set(kept.column("id").to_pylist()) == set(ids.good)
    for name in mask_filters.MASK_COLUMNS:
        assert kept.schema.field(name).type == "double"
    assert set(kept.column("q_mask_unknown_fraction").to_pylist()) == {0.0}
    assert min(kept.column("q_mask_dice").to_pylist()) >= 0.5


def test_mask_filter_records_its_reference_and_a_reliable_agreement_model(paired) -> None:
    _, _, _, quality = paired
    info = quality["filters"]["masks"]
    assert info["active"] is True and info["enabled"] == "auto"
    reference = info["reference"]
    assert reference["classes"] == [0, 1, 2] and reference["n"] == 48
    assert reference["allow_empty"] is False and 0 < reference["foreground_low"] < reference["foreground_high"] <= 1
    agreement = info["agreement"]
    assert agreement["network"] == "unet" and agreement["n_train"] == 48 and agreement["n_val"] == 16
    assert agreement["val_dice"] >= 0.6 > agreement["min_dice"]
    assert agreement["val_would_drop_fraction"] <= agreement["max_real_drop_fraction"]
    assert agreement["reliable"] is True and agreement["applied"] is True


def test_unreliable_agreement_model_scores_but_drops_nothing(tmp_path: Path) -> None:
    paths = PipelinePaths(root=tmp_path, pipeline="seg")
    write_real(paths.real, {"train": 24, "val": 8, "test": 2})
    ids = write_synthetic_pairs(paths.synthetic)
    # one epoch (2 steps) of a UNet: near-random masks, far below min_dice on real val
    filter_synthetic(make_config(epochs=1, min_dice=0.9), paths)
    quality = json.loads((paths.metrics / "quality.json").read_text())

    agreement = quality["filters"]["masks"]["agreement"]
    assert agreement["reliable"] is False and agreement["applied"] is False
    assert agreement["val_would_drop_fraction"] > agreement["max_real_drop_fraction"]
    assert "drops nothing" in agreement["note"]
    totals = quality["totals"]
    assert totals["dropped_mask_disagree"] == 0
    assert totals["dropped_mask_unknown_class"] == 4 and totals["dropped_mask_implausible"] == 6
    kept = read_table(paths.filtered)
    assert set(kept.column("id").to_pylist()) == set(ids.good) | set(ids.disagree)
    assert all(np.isfinite(kept.column("q_mask_dice").to_numpy()))


def test_auto_is_off_without_synthetic_masks_and_true_then_refuses(tmp_path: Path) -> None:
    paths = PipelinePaths(root=tmp_path, pipeline="seg")
    write_real(paths.real, {"train": 6, "val": 2, "test": 2})
    write_synthetic_pairs(paths.synthetic, masks=False)
    result = filter_synthetic(make_config(), paths)
    quality = json.loads((paths.metrics / "quality.json").read_text())
    assert quality["filters"]["masks"]["active"] is False
    assert quality["filters"]["masks"]["reason"] == "the synthetic set has no masks"
    assert not any(name.startswith("q_mask") for name in read_table(paths.filtered).column_names)
    assert result["totals"]["kept"] == result["totals"]["generated"] == 26
    with pytest.raises(DataError, match="no synthetic row has a mask"):
        filter_synthetic(make_config(enabled=True), paths)


def test_mask_scores_and_bounds_on_hand_made_masks() -> None:
    rng = np.random.default_rng(0)
    real = np.stack([draw_pair(LABELS[i % 2], rng)[1] for i in range(20)]).astype(np.int64)
    reference = mask_filters.calibrate(real, MaskFilter())
    assert reference.classes == (0, 1, 2) and reference.components_p99 == 2.0 and reference.max_components == 4.0

    salt = rng.integers(0, 3, (SIZE, SIZE))
    unknown, foreground, components = mask_filters.mask_stats(salt, frozenset({0, 1, 2}), (SIZE, SIZE))
    assert unknown == 0.0 and 0.6 < foreground < 0.73 and components > 100
    with_three = real[0].copy()
    with_three[:2, :2] = 3
    assert mask_filters.mask_stats(with_three, frozenset({0, 1, 2}), (SIZE, SIZE))[0] == 4 / SIZE**2
    assert np.isnan(mask_filters.mask_stats(None, frozenset({0}), (SIZE, SIZE))).all()
    assert np.isnan(mask_filters.mask_stats(real[0][:8], frozenset({0}), (SIZE, SIZE))).all()

    stats = np.array(
        [
            mask_filters.mask_stats(m, frozenset(reference.classes), (SIZE, SIZE))
            for m in (real[1], salt, np.zeros((SIZE, SIZE), np.int64), with_three)
        ]
        + [[np.nan] * 3]
    )
    keep_class, keep_plausible = mask_filters.plausibility(stats, reference)
    assert keep_class.tolist() == [True, True, True, False, True]
    assert keep_plausible.tolist() == [True, False, False, True, False]


def test_dice_per_pair_matches_the_downstream_metric() -> None:
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 3, (6, 16, 16))
    pred = np.where(rng.random((6, 16, 16)) < 0.7, truth, rng.integers(0, 3, (6, 16, 16)))
    pred[0] = truth[0]  # a perfect pair
    truth[1][truth[1] == 2] = 0  # class 2 absent from the truth of pair 1 ...
    pred[1][pred[1] == 2] = 0  # ... and from its prediction: scores 1 for that class
    ours = mask_filters.dice_per_pair(truth, pred, 3)
    reference = downstream.segmentation_scores(truth, pred, 3)["dice"]
    np.testing.assert_allclose(ours, reference, atol=1e-6)
    assert ours[0] == 1.0 and 0 < ours[2] < 1
