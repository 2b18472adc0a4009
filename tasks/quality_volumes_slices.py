"""2.5D set metrics of volume datasets (``preprocess.dims: 3``), as NVIDIA MAISI reports them:
FID, KID, precision/recall and density/coverage computed on 2D slices, per plane (axial,
coronal, sagittal), and their mean over the three planes.

Volumes are float32 ``(N, 1, D, H, W)`` in [0, 1] in the RAS+ layout of ingest
(:mod:`tasks.readers`: axis 0 = x, left to right; axis 1 = y, posterior to anterior; axis
2 = z, inferior to superior), so the planes are cuts along axis 2 (axial), 1 (coronal) and
0 (sagittal). Per plane, every volume gives ``slices_per_volume`` evenly spaced slices (all
of them when the cap allows), at most :data:`MAX_SLICES_PER_PLANE` per set (volumes then
picked evenly, one middle slice each). Slices smaller than :data:`MIN_SLICE_PX` are upscaled
(bilinear) for the extractor.

Features: the project's 2D extractors (:mod:`tasks.features`). ``auto`` /
``self_supervised`` (and ``classifier``, which has no 2D label classifier to come from in a
volume pipeline) is the contrastive DenseNet of :mod:`tasks.contrastive` trained on slices
of the real train volumes of all three planes, without labels and without anything that
chose the kept set, cached under ``paths.state``; ``inception`` needs its local weights file
(never downloaded); ``random`` is the last resort. Numbers are comparable with other runs of
the same extractor, not with MAISI's published values (other extractor).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tasks import contrastive, features, quality_metrics
from tasks.config import PipelineConfig
from tasks.paths import PipelinePaths

logger = logging.getLogger(__name__)

#: plane name -> the volume axis (of D, H, W) the slices are cut along
PLANE_AXES = {"axial": 2, "coronal": 1, "sagittal": 0}
PLANES = tuple(PLANE_AXES)
MAX_SLICES_PER_PLANE = 1024
#: the smallest slice side the 2D extractors take (MONAI DenseNet pools 16 px down to 1)
MIN_SLICE_PX = 16
#: the metrics averaged over the planes into ``mean`` (the others are copied from axial)
MEAN_KEYS = ("fid", "kid_mean", "kid_std", "precision", "recall", "density", "coverage")


def slice_plan(n_volumes: int, side: int, cap: int = MAX_SLICES_PER_PLANE) -> tuple[np.ndarray, np.ndarray]:
    """Which slices to take from ``n_volumes`` volumes of ``side`` slices along a plane's
    axis: ``(volume_rows, positions)`` int64 ``(M,)``, M <= cap. Evenly spaced positions,
    ``min(side, cap // n_volumes)`` per volume (at least 1); when even one per volume is too
    many, ``cap`` volumes picked evenly, each its middle slice."""
    if n_volumes == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if n_volumes > cap:
        rows = np.unique(np.linspace(0, n_volumes - 1, cap).round().astype(np.int64))
        return rows, np.full(rows.size, side // 2, np.int64)
    per_volume = max(1, min(side, cap // n_volumes))
    if per_volume == 1:
        positions = np.asarray([side // 2], np.int64)
    else:
        positions = np.unique(np.linspace(0, side - 1, per_volume).round().astype(np.int64))
    rows = np.repeat(np.arange(n_volumes, dtype=np.int64), positions.size)
    return rows, np.tile(positions, n_volumes)


def plane_slices(volumes: np.ndarray, plane: str, cap: int = MAX_SLICES_PER_PLANE) -> tuple[np.ndarray, np.ndarray]:
    """Slices of float32 volumes ``(N, 1, D, H, W)`` along ``plane``: float32 ``(M, 1, h, w)``
    in [0, 1] (upscaled to at least MIN_SLICE_PX a side) and the volume row of each ``(M,)``."""
    axis = PLANE_AXES[plane]
    rows, positions = slice_plan(volumes.shape[0], volumes.shape[2 + axis], cap)
    moved = np.moveaxis(volumes[:, 0], 1 + axis, 1)  # (N, slice, a, b)
    slices = moved[rows, positions][:, None].astype(np.float32)
    side = min(slices.shape[2:]) if slices.size else MIN_SLICE_PX
    if side < MIN_SLICE_PX and slices.shape[0]:
        scale = MIN_SLICE_PX / side
        size = [max(MIN_SLICE_PX, round(s * scale)) for s in slices.shape[2:]]
        with torch.no_grad():
            resized = F.interpolate(torch.from_numpy(slices), size=size, mode="bilinear", align_corners=False)
        slices = resized.clamp(0, 1).numpy()
    return np.ascontiguousarray(slices), rows


def _extractor(
    cfg: PipelineConfig, paths: PipelinePaths, train_slices: np.ndarray, device: str
) -> tuple[features.Extractor, str]:
    """The 2D extractor for slices and its normalisation (module docstring)."""
    spec = cfg.quality.metrics
    kind = spec.extractor
    if kind == "classifier":
        logger.warning(
            "quality.metrics.extractor 'classifier': a volume pipeline has no 2D label classifier; "
            "the 2.5D metrics use the self-supervised slice encoder"
        )
    if kind == "inception":
        extractor = features.inception_extractor(features.resolve_inception_weights(spec.inception_weights, paths.root))
    elif kind == "random":
        extractor = features.random_extractor(1, seed=cfg.seed)
    else:
        steps = spec.self_supervised_steps
        cache = features.trained_model_path(
            cfg,
            paths,
            "contrastive-slices",
            device=device,
            code_file=contrastive.__file__,
            channels=1,
            recipe=[contrastive.NETWORK, contrastive.PROJECTION_DIM, contrastive.BATCH_SIZE, contrastive.LR, steps],
            slices=[list(train_slices.shape), MAX_SLICES_PER_PLANE, MIN_SLICE_PX],
        )
        model, _ = features.load_or_train(
            cache,
            lambda: contrastive.build_encoder(1, seed=cfg.seed),
            lambda untrained: contrastive.train_encoder(
                untrained, train_slices, steps=steps, seed=cfg.seed, device=device
            ),
        )
        extractor = features.self_supervised_extractor(model.to(device).eval())
    normalisation = extractor.default_normalisation if spec.normalisation == "auto" else spec.normalisation
    return extractor, normalisation


def _mean_over_planes(per_plane: list[dict[str, Any]]) -> dict[str, Any]:
    """The metrics of :func:`quality_metrics.compare_sets` averaged over planes (None when
    a plane lacks one); counts and settings copied from the first plane."""
    mean = dict(per_plane[0])
    for key in MEAN_KEYS:
        values = [entry.get(key) for entry in per_plane]
        mean[key] = None if any(v is None for v in values) else float(np.mean(values))
    return mean


def set_metrics_25d(
    cfg: PipelineConfig,
    paths: PipelinePaths,
    real: tuple[np.ndarray, list[str]],
    generated: tuple[np.ndarray, list[str]],
    kept: np.ndarray,
    real_val: tuple[np.ndarray, list[str], np.ndarray] | None,
    classes: list[str],
    device: str,
) -> dict[str, Any]:
    """The ``set_metrics`` block of a volume pipeline.

    ``real``: real train volumes float32 ``(N, 1, D, H, W)`` in [0, 1] and their labels;
    ``generated``: every usable synthetic volume (train shape) and its label; ``kept``: bool
    ``(len(generated),)``, the kept ones; ``real_val``: real val volumes of the train shape,
    labels and int class targets (for the set ``real_val`` and the extractor's linear probe),
    or None. Features of each slice are computed once (the kept slices are a subset of the
    generated ones). Returns ``{"kind": "2.5D", "extractor", "reference", "slices",
    "planes": {plane: {"axis", "n_real_slices", "slice_px", "sets": {"kept" | "generated" |
    "real_val": {"overall": M, "per_class": {label: M}} | None}}}, "mean": {set: ...}, "sets"
    (= mean: what the gate, the report and the summary read), "ms_ssim_settings": None,
    "real_train_diversity": None}`` with ``M`` the keys of
    :func:`tasks.quality_metrics.compare_sets`."""
    spec = cfg.quality.metrics
    real_volumes, real_labels = real
    sliced = {plane: plane_slices(real_volumes, plane) for plane in PLANES}
    shapes = {sliced[p][0].shape[2:] for p in PLANES}
    # the encoder learns from the slices of all three planes (only the axial ones when the
    # planes' slices differ in size, i.e. non-cubic volumes)
    pooled = np.concatenate([sliced[p][0] for p in PLANES]) if len(shapes) == 1 else sliced["axial"][0]
    extractor, normalisation = _extractor(cfg, paths, pooled, device)

    def feats(slices: np.ndarray) -> np.ndarray:
        return features.extract_features(
            extractor, slices, normalisation=normalisation, batch_size=spec.batch_size, device=device
        )

    def compare(real_f: np.ndarray, real_l: np.ndarray, mine_f: np.ndarray, mine_l: np.ndarray) -> dict[str, Any]:
        def one(r: np.ndarray, m: np.ndarray) -> dict[str, Any]:
            return quality_metrics.compare_sets(
                real_f[r],
                mine_f[m],
                k=spec.nearest_k,
                kid_subsets=spec.kid_subsets,
                kid_subset_size=spec.kid_subset_size,
                seed=cfg.seed,
            )

        overall = one(np.ones(len(real_l), bool), np.ones(len(mine_l), bool))
        per_class = {}
        for c in classes:
            on_real, on_mine = real_l == c, mine_l == c
            # a class that is the whole of both sets measures what overall measured
            per_class[c] = overall if on_real.all() and on_mine.all() else one(on_real, on_mine)
        return {"overall": overall, "per_class": per_class}

    planes: dict[str, Any] = {}
    probe_train, probe_train_targets, probe_val, probe_val_targets = [], [], [], []
    class_index = {c: i for i, c in enumerate(classes)}
    generated_labels = np.asarray(generated[1], dtype=object)
    for plane in PLANES:
        slices, rows = sliced[plane]
        real_f = feats(slices)
        real_l = np.asarray(real_labels, dtype=object)[rows]
        probe_train.append(real_f)
        probe_train_targets.append(np.asarray([class_index.get(str(x), -1) for x in real_l], np.int64))
        measured: dict[str, Any] = {"kept": None, "generated": None, "real_val": None}
        if len(generated[0]):
            gen_slices, gen_rows = plane_slices(generated[0], plane)
            gen_f, gen_l = feats(gen_slices), generated_labels[gen_rows]
            on_kept = kept[gen_rows]
            measured["generated"] = compare(real_f, real_l, gen_f, gen_l)
            if on_kept.any():
                measured["kept"] = compare(real_f, real_l, gen_f[on_kept], gen_l[on_kept])
        if real_val is not None and len(real_val[0]):
            val_slices, val_rows = plane_slices(real_val[0], plane)
            val_f = feats(val_slices)
            measured["real_val"] = compare(real_f, real_l, val_f, np.asarray(real_val[1], dtype=object)[val_rows])
            probe_val.append(val_f)
            probe_val_targets.append(np.asarray(real_val[2], np.int64)[val_rows])
        planes[plane] = {
            "axis": PLANE_AXES[plane],
            "n_real_slices": int(slices.shape[0]),
            "slice_px": list(slices.shape[2:]),
            "sets": measured,
        }
        shown = (measured["kept"] or {}).get("overall") or {}
        logger.info("2.5D %s: kept vs real train FID %s, KID %s", plane, shown.get("fid"), shown.get("kid_mean"))

    mean: dict[str, Any] = {}
    for name in ("kept", "generated", "real_val"):
        blocks = [planes[p]["sets"][name] for p in PLANES]
        if any(b is None for b in blocks):
            mean[name] = None
            continue
        mean[name] = {
            "overall": _mean_over_planes([b["overall"] for b in blocks]),
            "per_class": {c: _mean_over_planes([b["per_class"][c] for b in blocks]) for c in classes},
        }
    record = extractor.describe(normalisation)
    record["trained_on"] = (
        "slices of the real train volumes (three planes)" if extractor.kind == "self_supervised" else None
    )
    record["quality"] = features.extractor_quality(
        np.concatenate(probe_train),
        np.concatenate(probe_train_targets),
        np.concatenate(probe_val) if probe_val else None,
        np.concatenate(probe_val_targets) if probe_val_targets else None,
        len(classes),
        seed=cfg.seed,
    )
    record["used_by_filters"] = []
    record["chose_kept_set"] = False
    return {
        "kind": "2.5D",
        "extractor": record,
        "reference": "real train",
        "slices": {
            "planes": {p: PLANE_AXES[p] for p in PLANES},
            "max_per_plane": MAX_SLICES_PER_PLANE,
            "min_side_px": MIN_SLICE_PX,
            "layout": "RAS+: axial cuts axis 2 (z), coronal axis 1 (y), sagittal axis 0 (x)",
        },
        "planes": planes,
        "mean": mean,
        "sets": mean,
        "ms_ssim_settings": None,
        "real_train_diversity": None,
    }
