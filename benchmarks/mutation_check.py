"""Scripted mutation check of the statistics and set-metric code.

Each mutation replaces one exact line fragment (it must occur exactly once) in one of
``tasks/statistics.py``, ``tasks/downstream.py`` (segmentation scores) and
``tasks/quality_metrics.py``, then runs only the fast test files that cover it. A mutant
is *killed* when a test fails and *survives* when they all pass. Mutants are applied to a
private copy of the sources (``tasks``, ``generators``, ``tests`` and the pytest config in
a temporary folder), never to the working tree, so people and tools using the tree are
not disturbed; the copy is checked to be the one Python imports.

    python -m benchmarks.mutation_check              # every mutant (~3-5 min on 2 CPU cores)
    python -m benchmarks.mutation_check --only a e   # some mutants by id
    python -m benchmarks.mutation_check --list       # the mutants, not run

Prints one line per mutant and the score (killed / total); exits 1 when a mutant
survives or the unmutated tests fail. Results in ``benchmarks/results/mutation_check.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATS_TESTS = ("tests/tasks/test_statistics.py",)
#: the set-metric tests plus the fast unit tests of test_quality_metrics.py (its stage tests take minutes)
METRIC_TESTS = (
    "tests/tasks/test_quality_metrics_stats.py",
    *(
        f"tests/tasks/test_quality_metrics.py::{name}"
        for name in (
            "test_fid_and_kid_agree_with_torchmetrics",
            "test_kid_is_the_unbiased_estimator_on_a_small_case",
            "test_precision_recall_density_coverage",
            "test_nearest_neighbours_and_greedy_duplicate_removal",
            "test_ms_ssim_scales_fall_back_for_small_images",
        )
    ),
)
COPIED = ("tasks", "generators", "tests", "pyproject.toml")


@dataclass(frozen=True)
class Mutation:
    """Replace ``old`` (exactly once in ``path``) by ``new``; ``tests``: the files to run."""

    id: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = (
    # the seven mutations of issue 12 (an independent review found 7 of 9 passed the suite)
    Mutation(
        "a",
        "balanced accuracy -> plain accuracy",
        "tasks/statistics.py",
        "balanced = recall.sum(axis=-1) / present.sum(axis=-1)",
        "balanced = tp.sum(axis=-1) / total",
        STATS_TESTS,
    ),
    Mutation(
        "b",
        "bootstrap interval 95% -> 50%",
        "tasks/statistics.py",
        "BOOTSTRAP_PERCENTILES = (2.5, 97.5)",
        "BOOTSTRAP_PERCENTILES = (25.0, 75.0)",
        STATS_TESTS,
    ),
    Mutation(
        "c",
        "HD95 -> median distance",
        "tasks/downstream.py",
        "include_background=False, percentile=95)",
        "include_background=False, percentile=50)",
        STATS_TESTS,
    ),
    Mutation(
        "d",
        "Dice of a class absent from both masks -> 0",
        "tasks/downstream.py",
        "ignore_empty=False)",
        "ignore_empty=True)",
        STATS_TESTS,
    ),
    Mutation(
        "e",
        "verdict ignores the seed interval",
        "tasks/statistics.py",
        "for low, high in _intervals(delta).values()]",
        'for low, high in [_intervals(delta)["test images"]]]',
        STATS_TESTS,
    ),
    Mutation(
        "f",
        "coverage radius doubled",
        "tasks/quality_metrics.py",
        "coverage = float((nearest <= radii).mean())",
        "coverage = float((nearest <= 2 * radii).mean())",
        METRIC_TESTS,
    ),
    Mutation(
        "g",
        "MS-SSIM may pair an image with itself",
        "tasks/quality_metrics.py",
        "second = (first + rng.integers(1, n, size=pairs)) % n",
        "second = (first + rng.integers(0, n, size=pairs)) % n",
        METRIC_TESTS,
    ),
    # more of our own
    Mutation(
        "h",
        "macro F1 averaged over every class, also unseen ones",
        "tasks/statistics.py",
        "macro_f1 = f1.sum(axis=-1) / seen.sum(axis=-1)",
        "macro_f1 = f1.sum(axis=-1) / f1.shape[-1]",
        STATS_TESTS,
    ),
    Mutation(
        "i",
        "t critical value one-sided (t_0.95)",
        "tasks/statistics.py",
        "scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, df)",
        "scipy_stats.t.ppf(CONFIDENCE, df)",
        STATS_TESTS,
    ),
    Mutation(
        "j",
        "t-interval with the population sd (ddof=0)",
        "tasks/statistics.py",
        "float(array.std(ddof=1)) / math.sqrt(array.size)",
        "float(array.std(ddof=0)) / math.sqrt(array.size)",
        STATS_TESTS,
    ),
    Mutation(
        "k",
        "t-interval standard error over sqrt(n - 1)",
        "tasks/statistics.py",
        "float(array.std(ddof=1)) / math.sqrt(array.size)",
        "float(array.std(ddof=1)) / math.sqrt(array.size - 1)",
        STATS_TESTS,
    ),
    Mutation(
        "l",
        "bootstrap sums the seeds instead of averaging them",
        "tasks/statistics.py",
        "np.nanpercentile(d / seeds, BOOTSTRAP_PERCENTILES)",
        "np.nanpercentile(d, BOOTSTRAP_PERCENTILES)",
        STATS_TESTS,
    ),
    Mutation(
        "m",
        "helped when any interval is above 0",
        "tasks/statistics.py",
        "if bounds and all(low > 0 for low, _ in bounds):",
        "if bounds and any(low > 0 for low, _ in bounds):",
        STATS_TESTS,
    ),
    Mutation(
        "n",
        "lower-is-better metrics not mirrored",
        "tasks/statistics.py",
        "sign = -1.0 if lower_is_better else 1.0",
        "sign = 1.0",
        STATS_TESTS,
    ),
    Mutation(
        "o",
        "MDE from the narrower interval",
        "tasks/statistics.py",
        "governing = max(halves, key=lambda name: (halves[name], name))",
        "governing = min(halves, key=lambda name: (halves[name], name))",
        STATS_TESTS,
    ),
    Mutation(
        "p",
        "HD95 of a class in only one mask -> image side, not diagonal",
        "tasks/downstream.py",
        "diagonal = float(np.hypot(height, width))",
        "diagonal = float(max(height, width))",
        STATS_TESTS,
    ),
    Mutation(
        "q",
        "k-NN radii: self-distance masked at the wrong column after the first chunk",
        "tasks/quality_metrics.py",
        "sq[np.arange(stop - start), np.arange(start, stop)] = np.inf",
        "sq[np.arange(stop - start), np.arange(0, stop - start)] = np.inf",
        METRIC_TESTS,
    ),
    Mutation(
        "r",
        "density not divided by k",
        "tasks/quality_metrics.py",
        "density = float(_ball_counts(synthetic, real, radii).sum() / (k * synthetic.shape[0]))",
        "density = float(_ball_counts(synthetic, real, radii).sum() / synthetic.shape[0])",
        METRIC_TESTS,
    ),
    Mutation(
        "s",
        "KID above 4,096 rows: the 'synthetic' subset drawn from the real set",
        "tasks/quality_metrics.py",
        "y = synthetic[rng.permutation(synthetic.shape[0])[:size]]",
        "y = real[rng.permutation(real.shape[0])[:size]]",
        METRIC_TESTS,
    ),
    Mutation(
        "t",
        "MMD cross term not doubled",
        "tasks/quality_metrics.py",
        "yy_off_diagonal / (n * (n - 1)) - 2.0 * xy_mean)",
        "yy_off_diagonal / (n * (n - 1)) - xy_mean)",
        METRIC_TESTS,
    ),
    Mutation(
        "u",
        "KID std with ddof=1 instead of the population std",
        "tasks/quality_metrics.py",
        '"std": float(scores.std()), "subsets"',
        '"std": float(scores.std(ddof=1)), "subsets"',
        METRIC_TESTS,
    ),
    Mutation(
        "v",
        "MS-SSIM exhaustive pairs include each image with itself",
        "tasks/quality_metrics.py",
        "first, second = np.triu_indices(n, k=1)",
        "first, second = np.triu_indices(n, k=0)",
        METRIC_TESTS,
    ),
    Mutation(
        "w",
        "close pairs include a row with itself",
        "tasks/quality_metrics.py",
        "keep = cols > rows",
        "keep = cols >= rows",
        METRIC_TESTS,
    ),
    Mutation(
        "x",
        "precision counts a sample inside two real balls only",
        "tasks/quality_metrics.py",
        "precision = float((_ball_counts(synthetic, real, real_radii) > 0).mean())",
        "precision = float((_ball_counts(synthetic, real, real_radii) > 1).mean())",
        METRIC_TESTS,
    ),
)


def make_copy(target: Path) -> None:
    """Copy the sources the tests import (no data, no caches) into ``target``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=ignore)
        else:
            shutil.copy2(source, target / name)


def run_tests(copy: Path, tests: tuple[str, ...], timeout_s: int) -> tuple[int, float, str]:
    """``(exit code, seconds, last line)`` of pytest on ``tests`` in the copy; stops at the first failure."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-W", "ignore", *tests]
    try:
        done = subprocess.run(command, cwd=copy, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return 124, time.perf_counter() - started, f"timed out after {timeout_s} s"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return done.returncode, time.perf_counter() - started, lines[-1] if lines else done.stderr.strip()[-200:]


def check_imports_the_copy(copy: Path) -> None:
    """The copy's modules, not the working tree's, must be the ones imported there."""
    probe = "import tasks.statistics as s, tasks.quality_metrics as q; print(s.__file__); print(q.__file__)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=copy, capture_output=True, text=True, check=True).stdout
    for line in out.split():
        if not Path(line).resolve().is_relative_to(copy.resolve()):
            raise SystemExit(f"expected the copy in {copy} to be imported, got {line}; run from a clean checkout")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="mutant ids to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout-s", type=int, default=300, help="per mutant")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.id in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.id}: {m.what} ({m.path}): {m.old!r} -> {m.new!r}")
        return 0
    with tempfile.TemporaryDirectory(prefix="synthmed-mutants-") as tmp:
        copy = Path(tmp)
        make_copy(copy)
        check_imports_the_copy(copy)
        originals = {m.path: (copy / m.path).read_bytes() for m in chosen}
        for m in chosen:  # every mutation must apply to today's code, exactly once
            count = originals[m.path].decode().count(m.old)
            if count != 1:
                raise SystemExit(f"mutant {m.id}: expected {m.old!r} once in {m.path}, found it {count} times")
        for tests in sorted({m.tests for m in chosen}):
            code, seconds, last = run_tests(copy, tests, args.timeout_s)
            print(f"baseline {' '.join(tests)}: exit {code} in {seconds:.0f} s: {last}", flush=True)
            if code != 0:
                print("the unmutated tests must pass first")
                return 1
        rows = []
        for m in chosen:
            target = copy / m.path
            try:
                target.write_bytes(originals[m.path].replace(m.old.encode(), m.new.encode(), 1))
                code, seconds, last = run_tests(copy, m.tests, args.timeout_s)
            finally:
                target.write_bytes(originals[m.path])
            if target.read_bytes() != originals[m.path]:
                raise SystemExit(f"could not restore {target}")
            status = "killed" if code != 0 else "SURVIVED"
            rows.append(
                {
                    "id": m.id,
                    "what": m.what,
                    "file": m.path,
                    "status": status,
                    "exit": code,
                    "seconds": round(seconds, 1),
                    "pytest": last,
                }
            )
            print(f"{m.id}: {status:8s} {m.what} [{m.path}] exit {code}, {seconds:.0f} s: {last}", flush=True)
    killed = sum(r["status"] == "killed" for r in rows)
    print(f"mutation score: {killed}/{len(rows)} killed ({killed / len(rows):.0%})")
    survivors = [r["id"] for r in rows if r["status"] != "killed"]
    if survivors:
        print(f"survived: {', '.join(survivors)}")
    if not args.only:
        results = ROOT / "benchmarks" / "results"
        results.mkdir(parents=True, exist_ok=True)
        summary = {
            "command": "python -m benchmarks.mutation_check",
            "killed": killed,
            "total": len(rows),
            "mutants": rows,
        }
        (results / "mutation_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if survivors else 0


if __name__ == "__main__":
    raise SystemExit(main())
