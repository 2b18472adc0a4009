"""The retrain stage's training runs: what one run is (:class:`Run`), what every run reads
(:class:`RunInputs`), training and testing one network (:func:`train_and_test`), and
running many, deduplicated, in spawned worker processes (:func:`execute_runs`).

Each run uses one torch thread on CPU; results do not depend on the number of workers.

Volumes (train images ``(N, 1, D, H, W)``) train 3D networks on random crops of
``retrain.roi_size`` and segment the whole test volumes with a gaussian sliding window of
that size and ``retrain.sw_overlap`` (see :mod:`tasks.downstream`); their results also
carry per-class Dice/HD95 (:attr:`RunResult.per_class`).
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import pickle
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from generators.errors import DataError, SynthmedError, worker_cannot_see
from tasks import downstream
from tasks.config import PipelineConfig
from tasks.progress import Progress
from tasks.runtime import setup_torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Run:
    """One training run: rows of the real train split and of the synthetic pool (sorted
    index tuples), the seed and the optimizer steps. Equal runs give equal results."""

    real: tuple[int, ...]
    synthetic: tuple[int, ...]
    seed: int
    steps: int


@dataclass(frozen=True)
class RunInputs:
    """What every run reads (sent once to each worker). Images float32 ``(N, C, H, W)`` in
    [0, 1]; targets int64 ``(N,)`` class indices or ``(N, H, W)`` mask indices. Volumes:
    ``(N, 1, D, H, W)`` and ``(N, D, H, W)``; test (and val) volumes may be larger than the
    train ones."""

    cfg: PipelineConfig
    classes: tuple[str, ...]
    num_classes: int
    device: str
    train_images: np.ndarray
    train_targets: np.ndarray
    pool_images: np.ndarray
    pool_targets: np.ndarray
    test_images: np.ndarray
    test_targets: np.ndarray
    val_images: np.ndarray | None = None  # for model selection only (retrain.select_on_val)
    val_targets: np.ndarray | None = None


@dataclass(frozen=True)
class RunResult:
    """``scores``: ``{metric: float}`` on the real test split; ``output``: what the bootstrap
    resamples (classification: predicted classes int64 ``(n_test,)``; segmentation:
    ``{metric: float64 (n_test,)}`` per image); ``time_s``: wall time (logs only);
    ``per_class``: volumes segmentation only, ``{metric: [mean over test volumes of each
    foreground class 1..K-1]}`` (None otherwise)."""

    scores: dict[str, float]
    output: Any
    time_s: float
    per_class: dict[str, list[float]] | None = None


def volume_roi(inputs: RunInputs) -> tuple[int, int, int] | None:
    """The (D, H, W) training crop and sliding window of a volume dataset (None for 2D)."""
    if inputs.train_images.ndim != 5:
        return None
    spec = inputs.cfg.retrain
    roi = downstream.resolve_roi(spec.roi_size, inputs.train_images.shape[2:])
    downstream.check_volume_roi(spec.task, spec.network, roi)
    return roi


def train_and_test(inputs: RunInputs, run: Run) -> RunResult:
    """Train one network on ``run``'s rows with one torch thread (CPU) and score it on the test split."""
    started = time.perf_counter()
    spec = inputs.cfg.retrain
    setup_torch(inputs.cfg, run.seed)
    if inputs.device == "cpu":
        torch.set_num_threads(1)
    real = np.asarray(run.real, dtype=np.int64)
    synthetic = np.asarray(run.synthetic, dtype=np.int64)
    images = np.concatenate([inputs.train_images[real], inputs.pool_images[synthetic]])
    targets = np.concatenate([inputs.train_targets[real], inputs.pool_targets[synthetic]])
    roi = volume_roi(inputs)
    model = downstream.build_network(
        spec.task, spec.network, images.shape[1], inputs.num_classes, spatial_dims=images.ndim - 2
    )
    model = downstream.train_model(
        model,
        images,
        targets,
        task=spec.task,
        steps=run.steps,
        batch_size=spec.batch_size,
        lr=spec.lr,
        seed=run.seed,
        augment=spec.augment,
        device=inputs.device,
        val=None if inputs.val_images is None else (inputs.val_images, inputs.val_targets),
        eval_every=spec.eval_every,
        roi_size=roi,
        sw_overlap=spec.sw_overlap,
    )
    window = roi if spec.task == "segmentation" else None  # classification reads whole volumes
    proba = downstream.predict_proba(
        model,
        inputs.test_images,
        batch_size=spec.batch_size,
        device=inputs.device,
        roi_size=window,
        sw_overlap=spec.sw_overlap,
    )
    per_class = None
    if spec.task == "classification":
        scores = downstream.evaluate_classification(inputs.test_targets, proba, list(inputs.classes))
        output: Any = proba.argmax(axis=1)
        scores = {m: scores[m] for m in downstream.CLASSIFICATION_METRICS}
    elif roi is None:
        output = downstream.segmentation_scores(inputs.test_targets, proba.argmax(axis=1), inputs.num_classes)
        scores = {m: float(v.mean()) for m, v in output.items()}
    else:
        by_class = downstream.segmentation_scores_per_class(
            inputs.test_targets, proba.argmax(axis=1), inputs.num_classes
        )
        output = {m: v.mean(axis=1) for m, v in by_class.items()}
        scores = {m: float(v.mean()) for m, v in output.items()}
        per_class = {m: [float(c) for c in v.mean(axis=0)] for m, v in by_class.items()}
    return RunResult(scores=scores, output=output, time_s=time.perf_counter() - started, per_class=per_class)


_WORKER_INPUTS: RunInputs | None = None


def _init_worker(inputs_file: str) -> None:
    """Load the pickled :class:`RunInputs` this stage wrote for its own workers."""
    global _WORKER_INPUTS
    with open(inputs_file, "rb") as handle:
        _WORKER_INPUTS = pickle.load(handle)  # noqa: S301 - written by this process a moment ago


def _run_in_worker(run: Run) -> RunResult:
    if _WORKER_INPUTS is None:
        raise RuntimeError("retrain worker started without its inputs")
    return train_and_test(_WORKER_INPUTS, run)


@dataclass(frozen=True)
class SharedInputs:
    """The pickled :class:`RunInputs` in a file every worker can read (shared storage),
    named by its sha256; a worker loads it once (:func:`run_on_shared_inputs`)."""

    path: str
    sha256: str


_SHARED: dict[str, RunInputs] = {}
_SHARED_LOCK = threading.Lock()


def shared_inputs(shared: SharedInputs) -> RunInputs:
    """The inputs of ``shared``, read and checked once per process (one entry kept)."""
    with _SHARED_LOCK:
        inputs = _SHARED.get(shared.sha256)
        if inputs is not None:
            return inputs
        path = Path(shared.path)
        if not path.is_file():
            raise worker_cannot_see(path)
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != shared.sha256:
            raise DataError(f"{path}: the retrain inputs changed while the stage ran; rerun the stage")
        inputs = pickle.loads(data)  # noqa: S301 - written by this stage a moment ago, checked by sha256
        _SHARED.clear()
        _SHARED[shared.sha256] = inputs
        return inputs


def run_on_shared_inputs(shared: SharedInputs, run: Run) -> RunResult:
    """:func:`train_and_test` of ``run`` on the inputs of ``shared`` (loaded once per worker)."""
    return train_and_test(shared_inputs(shared), run)


RunMap = Callable[[SharedInputs, Sequence[Run]], Iterable[tuple[Run, RunResult]]]
"""``run_many(shared, runs)``: ``(run, run_on_shared_inputs(shared, run))`` for every run,
in any order, computed anywhere that sees the file (e.g. Dask workers:
``flows/scaleout.py``)."""


def _write_shared(inputs: RunInputs, folder: Path) -> SharedInputs:
    folder.mkdir(parents=True, exist_ok=True)
    data = pickle.dumps(inputs, protocol=pickle.HIGHEST_PROTOCOL)
    digest = hashlib.sha256(data).hexdigest()
    path = folder / f"retrain-inputs-{digest[:16]}.pkl"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return SharedInputs(str(path.resolve()), digest)


def execute_runs(
    inputs: RunInputs,
    runs: Sequence[Run],
    workers: int,
    run_many: RunMap | None = None,
    shared_dir: Path | None = None,
) -> dict[Run, RunResult]:
    """Every distinct run once: in this process when ``workers <= 1``, else in ``workers``
    spawned processes (longest runs first); with ``run_many``, wherever it sends them,
    the inputs written once to ``shared_dir`` (which its workers must see). Results do
    not depend on ``workers`` or ``run_many``."""
    batch = inputs.cfg.retrain.batch_size
    queue = sorted(dict.fromkeys(runs), key=lambda r: -r.steps * min(batch, len(r.real) + len(r.synthetic)))
    results: dict[Run, RunResult] = {}
    counter = Progress("retrain", len(queue), "runs", every_s=20.0)

    def record(run: Run, result: RunResult) -> None:
        results[run] = result
        counter.advance(1)
        logger.debug(
            "run %d/%d: seed %d, %d real + %d synthetic, %d steps: %s (%.1f s)",
            len(results),
            len(queue),
            run.seed,
            len(run.real),
            len(run.synthetic),
            run.steps,
            ", ".join(f"{m}={v:.4f}" for m, v in result.scores.items()),
            result.time_s,
        )

    if run_many is not None:
        if shared_dir is None:
            raise ValueError("run_many needs shared_dir, a folder its workers see")
        shared = _write_shared(inputs, shared_dir)
        try:
            for run, result in run_many(shared, queue):
                record(run, result)
        finally:
            Path(shared.path).unlink(missing_ok=True)
        return results
    if workers <= 1 or len(queue) <= 1:
        for run in queue:
            record(run, train_and_test(inputs, run))
        return results
    # the arrays go through a file, not the spawn pipe: a worker that dies while starting
    # then breaks the pool (an error) instead of leaving this process blocked on the pipe
    with tempfile.TemporaryDirectory(prefix="synthmed-retrain-") as tmp:
        inputs_file = Path(tmp) / "inputs.pkl"
        with open(inputs_file, "wb") as handle:
            pickle.dump(inputs, handle, protocol=pickle.HIGHEST_PROTOCOL)
        pool = ProcessPoolExecutor(
            max_workers=min(workers, len(queue)),
            mp_context=multiprocessing.get_context("spawn"),  # fork after torch started threads can hang
            initializer=_init_worker,
            initargs=(str(inputs_file),),
        )
        try:
            futures = {pool.submit(_run_in_worker, run): run for run in queue}
            for future in as_completed(futures):
                record(futures[future], future.result())
        except BrokenProcessPool as exc:
            raise SynthmedError(
                f"a retrain worker process died ({exc}); expected it to finish: check memory, and that a "
                "script calling the stage guards it with `if __name__ == '__main__':`, or set threads: 1 "
                "to train in this process"
            ) from exc
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return results
