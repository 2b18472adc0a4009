"""Which rows the retrain stage trains and tests on: the real splits (validated), the
filtered synthetic pool, and deterministic stratified sampling from both.

- :func:`load_real` / :func:`validation_arrays`: the real train/test (and val for model
  selection) splits as :class:`tasks.downstream.LabelledArrays`;
- :func:`synthetic_pool` / :func:`pick_synthetic` / :func:`load_rows`: the filtered synthetic
  rows by class, a stratified seeded choice of them, and decoding only the chosen ones;
- :func:`real_subset`: a nested, subject-spread stratified fraction of the real train rows;
- :func:`allocate`: largest-remainder split of a count over classes;
- :func:`mask_class_names`: names of the foreground mask classes (per-class volume metrics).

Images are float32 ``(N, C, H, W)`` in [0, 1], volumes ``(N, 1, D, H, W)`` (val/test
volumes may be larger than the train ones: ``preprocess.eval_shape()``); labels are class
names (``""``: unlabelled).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import numpy as np

from generators.errors import DataError
from generators.shards import BASE_COLUMNS, decode_table, iter_tables, read_manifest, read_table
from tasks import downstream
from tasks.paths import PipelinePaths

logger = logging.getLogger(__name__)


def allocate(total: int, weights: dict[str, int], available: dict[str, int], *, warn: bool = True) -> dict[str, int]:
    """Split ``total`` over classes in proportion to ``weights`` (largest remainder, ties
    by class name), capped by ``available``; sorted by class."""
    weight_sum = sum(weights.values())
    if total <= 0 or weight_sum == 0:
        return {c: 0 for c in sorted(weights)}
    exact = {c: total * w / weight_sum for c, w in weights.items()}
    quota = {c: int(math.floor(v)) for c, v in exact.items()}
    leftover = total - sum(quota.values())
    for c in sorted(exact, key=lambda c: (-(exact[c] - quota[c]), c))[:leftover]:
        quota[c] += 1
    capped = {c: min(q, available.get(c, 0)) for c, q in sorted(quota.items())}
    short = {c: quota[c] - capped[c] for c in capped if capped[c] < quota[c]}
    if short and warn:
        logger.warning("not enough filtered synthetic images for %s; using all there are", short)
    return capped


def synthetic_pool(paths: PipelinePaths) -> dict[str, list[str]]:
    """Ids of the filtered synthetic rows by class label (``""``: unlabelled), both sorted."""
    table = read_table(paths.filtered, columns=["id", "label"])
    by_class: dict[str, list[str]] = {}
    for row_id, label in zip(table.column("id").to_pylist(), table.column("label").to_pylist(), strict=True):
        by_class.setdefault("" if label is None else str(label), []).append(row_id)
    return {label: sorted(ids) for label, ids in sorted(by_class.items())}


def pick_synthetic(
    pool: dict[str, list[str]], real_labels: Sequence[str], ratio: float, seed: int, *, warn: bool = True
) -> list[str]:
    """Ids (sorted) of ``round(ratio * len(real_labels))`` pool rows stratified by class in
    the proportions of ``real_labels``, capped by what the pool holds. Within a class the
    rows are a prefix of one permutation per class (classes in sorted order, numpy
    generator seeded with ``seed``), so a larger ratio or real set only adds rows."""
    weights: dict[str, int] = {}
    for label in real_labels:
        weights[label] = weights.get(label, 0) + 1
    quota = allocate(int(round(ratio * len(real_labels))), weights, {c: len(v) for c, v in pool.items()}, warn=warn)
    rng = np.random.default_rng(seed)
    chosen: list[str] = []
    for label, ids in pool.items():
        order = rng.permutation(len(ids))
        chosen.extend(ids[i] for i in order[: quota.get(label, 0)])
    return sorted(chosen)


def select_synthetic(paths: PipelinePaths, real_labels: list[str], ratio: float, seed: int) -> list[str]:
    """:func:`pick_synthetic` from the filtered dataset at ``paths.filtered``."""
    return pick_synthetic(synthetic_pool(paths), real_labels, ratio, seed)


def real_subset(
    labels: Sequence[str], subjects: Sequence[str], fraction: float, seed: int | Sequence[int]
) -> np.ndarray:
    """Sorted int64 indices of a deterministic stratified ``fraction`` of the rows.

    By class: ``max(1, floor(fraction * n_c + 0.5))`` of the ``n_c`` rows of each class (all
    of them at fraction 1). By subject, within a class: every prefix of the ranking takes
    from each subject in proportion to its rows (systematic sampling: the j-th row, in a
    random order, of a subject with ``n_s`` rows sits at ``(j + u_s) / n_s`` with ``u_s``
    uniform in [0, 1) per subject), so a small subset spreads over as many subjects as it
    can. The ranking depends on the rows and ``seed`` only, not on ``fraction``: subsets of
    one seed are nested (a smaller fraction's subset lies inside a larger one's).
    """
    if not 0 < fraction <= 1:
        raise DataError(f"expected a real fraction in (0, 1], got {fraction}; fix retrain.real_fractions")
    if len(labels) != len(subjects):
        raise DataError(f"expected one subject per row ({len(labels)}), got {len(subjects)}")
    label_array = np.asarray(labels, dtype=str)
    subject_array = np.asarray(subjects, dtype=str)
    rng = np.random.default_rng(seed)
    keep = [np.zeros(0, np.int64)]
    for label in sorted(set(label_array.tolist())):
        rows = np.flatnonzero(label_array == label)
        names, inverse, counts = np.unique(subject_array[rows], return_inverse=True, return_counts=True)
        offset = rng.random(len(names))
        rank = np.empty(len(rows))
        for k in range(len(names)):
            members = np.flatnonzero(inverse == k)
            rank[members] = rng.permutation(len(members))
        position = (rank + offset[inverse]) / counts[inverse]
        order = rows[np.lexsort((rng.random(len(rows)), position))]
        keep.append(order[: min(len(rows), max(1, math.floor(fraction * len(rows) + 0.5)))])
    return np.sort(np.concatenate(keep)).astype(np.int64)


def load_rows(paths: PipelinePaths, ids: list[str], classes: list[str]) -> downstream.LabelledArrays:
    """Decode only the rows ``ids`` of the filtered dataset, one shard at a time."""
    wanted = set(ids)
    parts = []
    for table in iter_tables(paths.filtered, columns=list(BASE_COLUMNS)):
        keep = np.asarray([row_id in wanted for row_id in table.column("id").to_pylist()], dtype=bool)
        if keep.any():
            parts.append(decode_table(table.filter(keep)))
    if not parts:
        return downstream.LabelledArrays(np.zeros((0, 1, 1, 1), np.float32), [], np.zeros(0, np.int64), None, [])
    labels = ["" if a is None else str(a) for p in parts for a in p.labels]
    index = {name: i for i, name in enumerate(classes)}
    masks = None if any(p.masks is None for p in parts) else np.concatenate([p.masks for p in parts])
    return downstream.LabelledArrays(
        images=np.concatenate([p.images for p in parts]),
        labels=labels,
        targets=np.asarray([index.get(label, -1) for label in labels], dtype=np.int64),
        masks=masks,
        ids=[i for p in parts for i in p.ids],
    )


def validation_arrays(paths: PipelinePaths, task: str, classes: list[str], wanted: bool) -> dict[str, Any]:
    """``val_images``/``val_targets`` of the real val split for model selection, or
    nothing (final weights are used) when not wanted or the split is empty."""
    if not wanted or not downstream.dataset_labels(paths.real, ["val"]):
        if wanted:
            logger.warning("retrain.select_on_val: the real val split is empty; using each run's final weights")
        return {}
    val = downstream.load_labelled(paths.real, ["val"], classes)
    if task == "classification":
        keep = val.targets >= 0  # val labels unseen in train cannot be scored
        return {"val_images": val.images[keep], "val_targets": val.targets[keep]} if keep.any() else {}
    if val.masks is None:
        logger.warning("retrain.select_on_val: real val rows have no masks; using each run's final weights")
        return {}
    return {"val_images": val.images, "val_targets": val.masks}


def load_real(paths: PipelinePaths, task: str):
    """Real train/test, validated, and the train rows' subjects. Returns
    ``(classes, train, test, subjects)``."""
    counts = downstream.dataset_labels(paths.real, ["test"])
    if not counts:
        raise DataError(
            f"{paths.real}: expected a non-empty 'test' split for retrain, got none; "
            "set preprocess.split.test > 0 and rerun ingest"
        )
    classes = [label for label in downstream.dataset_labels(paths.real, ["train"]) if label]
    train = downstream.load_labelled(paths.real, ["train"], classes)
    test = downstream.load_labelled(paths.real, ["test"], classes)
    if len(train) < 2:
        raise DataError(f"{paths.real}: expected >= 2 real train images, got {len(train)}; ingest more data")
    shape = tuple(train.images.shape[1:])
    if train.images.ndim == 5:  # volumes: test rows may be larger (sliding-window inference)
        if test.images.ndim != 5 or test.images.shape[1] != train.images.shape[1]:
            raise DataError(
                f"{paths.real}: expected test volumes (N, {shape[0]}, D, H, W) like the train split, "
                f"got {tuple(test.images.shape)}; rerun ingest with preprocess.dims: 3"
            )
    elif tuple(test.images.shape[1:]) != shape:
        raise DataError(f"{paths.real}: expected test images of shape {shape}, got {tuple(test.images.shape[1:])}")
    if task == "classification":
        if len(classes) < 2 or (train.targets < 0).any():
            raise DataError(
                f"{paths.real}: expected a class label on every real train row and >= 2 classes, got {classes}; "
                "label the data or use retrain.task: segmentation"
            )
        unknown = sorted({label for label, t in zip(test.labels, test.targets, strict=True) if t < 0})
        if unknown:
            raise DataError(f"{paths.real}: expected test labels among the train classes {classes}, got {unknown}")
    else:
        for name, part in (("real train", train), ("real test", test)):
            if part.masks is None:
                raise DataError(
                    f"{paths.real}: expected a mask on every {name} row for segmentation, found rows without; "
                    "ingest masks, or use retrain.task: classification"
                )
    table = read_table(paths.real, columns=["id", "subject"], splits=["train"])
    subject_of = dict(zip(table.column("id").to_pylist(), table.column("subject").to_pylist(), strict=True))
    subjects = ["" if subject_of.get(i) is None else str(subject_of[i]) for i in train.ids]
    return classes, train, test, subjects


def check_synthetic(paths: PipelinePaths, task: str, synthetic: downstream.LabelledArrays, train, classes) -> None:
    """The synthetic rows a run may use must look like the real train rows."""
    shape = tuple(train.images.shape[1:])
    if len(synthetic) and tuple(synthetic.images.shape[1:]) != shape:
        fix = (
            "synthesize volumes of preprocess.volume_shape() (the model card's volume_size)"
            if len(shape) == 4
            else "synthesize at preprocess.size with preprocess.channels"
        )
        raise DataError(
            f"{paths.filtered}: expected synthetic images of shape {shape} like the real train split, "
            f"got {tuple(synthetic.images.shape[1:])}; {fix}"
        )
    if task == "classification":
        unknown = sorted({label for label, t in zip(synthetic.labels, synthetic.targets, strict=True) if t < 0})
        if unknown:
            raise DataError(
                f"{paths.filtered}: expected synthetic labels among the real classes {classes}, got {unknown}; "
                "synthesize with the real dataset's labels"
            )
    elif len(synthetic) and synthetic.masks is None:
        raise DataError(
            f"{paths.filtered}: expected a mask on every synthetic row for segmentation, found rows without; "
            "set generator.train.with_masks: true, or use retrain.task: classification"
        )


def mask_class_names(provenance: dict[str, Any], num_classes: int) -> list[str]:
    """Names of the foreground mask classes 1..K-1: from the real manifest provenance's
    ``mask_classes`` (a list of K names with the background first, a list of the K-1
    foreground names, or ``{index: name}``) when it has them, else ``class 1``, ``class 2``..."""
    given = provenance.get("mask_classes")
    names = [f"class {k}" for k in range(1, num_classes)]
    if isinstance(given, dict):
        for key, name in given.items():
            if str(key).lstrip("-").isdigit() and 1 <= int(key) < num_classes:
                names[int(key) - 1] = str(name)
    elif isinstance(given, (list, tuple)) and len(given) in (num_classes, num_classes - 1):
        names = [str(name) for name in given[len(given) - (num_classes - 1) :]]
    if len(set(names)) != len(names):  # per-class results are keyed by name
        names = [f"{k} {name}" for k, name in enumerate(names, start=1)]
    return names


def volume_provenance(paths: PipelinePaths) -> dict[str, Any]:
    """The real dataset's manifest provenance (``dims``, ``volume_shape``, ``eval_shape``,
    ``patches_of_one_subject``, ``mask_classes``... as ingest wrote them; ``{}`` if none)."""
    provenance = read_manifest(paths.real).get("provenance")
    return provenance if isinstance(provenance, dict) else {}
