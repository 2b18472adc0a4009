"""DVC experiments a person can read: record a baseline commit, and one command for the
comparison table that fits a terminal.

``dvc exp show`` compares experiments with the commit they started from; until that commit
holds a pipeline's ``dvc.lock`` entries and ``metrics/<pipeline>/`` its row is all ``!``.
:func:`record_baseline` (``synthmed baseline``) brings the pipeline up to date with
``dvc repro`` (a no-op after ``synthmed run``, which records its outputs with ``dvc
commit``) and commits exactly the files a baseline needs.

:func:`exp_show_args` (``synthmed exp-show``) is the ``dvc exp show`` view of one
pipeline: the experiment, its verdict, the primary delta with its 95% interval, the
two-sample AUC and the params that changed. The other headline numbers (real-only and
augmented means, FID, kept fraction, counts, generator) are in ``dvc metrics diff``;
:func:`exp_diff_args` (``synthmed exp-diff``) runs it and ``dvc plots diff`` for one
pipeline.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.versioning import dvc, pipeline_stages, repo_lock
from generators.errors import ConfigError, SynthmedError
from tasks.paths import PipelinePaths
from tasks.summary import plot_ids, summary_path

log = logging.getLogger(__name__)

#: the summary keys ``synthmed exp-show`` keeps (tasks/summary.py names them)
SHOWN_METRICS = ("verdict", "delta", "delta_lo", "delta_hi", "auc")


def exp_show_args(pipeline: str, shown: tuple[str, ...] = SHOWN_METRICS) -> list[str]:
    """Arguments of ``dvc exp show`` for one pipeline's comparison table.

    ``--drop '(?!pipelines\\.)'`` drops every column that is not a ``pipelines.yaml`` param
    (DVC matches drop/keep patterns from the start of a column name): DVC's creation time,
    queue bookkeeping, one 32-36 character hash per changed data dependency, and headline
    numbers not in ``shown``; ``--keep`` protects the experiment name and ``shown``, even
    when every experiment has the same value; ``--only-changed`` then leaves only the
    params that differ between experiments."""
    keep = rf"Experiment$|{re.escape(pipeline)}\.({'|'.join(shown)})$"
    return ["exp", "show", "--only-changed", "--drop", r"(?!pipelines\.)", "--keep", keep]


@dataclass
class ShownTable:
    """What :func:`show_table` ran and printed."""

    args: list[str]  # the dvc arguments of the table printed
    returncode: int
    stdout: str
    stderr: str
    width: int  # columns of the widest line printed
    left_out: list[str]  # headline columns left out to fit


def show_table(root: Path, pipeline: str, max_width: int, extra: list[str] | tuple[str, ...] = ()) -> ShownTable:
    """Run ``dvc exp show`` with :func:`exp_show_args` (and ``extra``, passed to DVC
    unchanged) and return its output; when the table is wider than ``max_width`` (a long
    pipeline name or verdict, several swept params), run it again without the AUC, then
    without the delta's interval, and say what was left out (``dvc metrics diff`` has it).
    The output is captured, so DVC prints the whole table (no pager), never squeezed."""
    left_out: list[str] = []
    for shown in (SHOWN_METRICS, SHOWN_METRICS[:4], SHOWN_METRICS[:2]):
        args = [*exp_show_args(pipeline, shown), *extra]
        proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)
        width = max((len(line.rstrip()) for line in proc.stdout.splitlines()), default=0)
        left_out = [f"{pipeline}.{key}" for key in SHOWN_METRICS if key not in shown]
        if proc.returncode != 0 or width <= max_width:
            break
    return ShownTable(args, proc.returncode, proc.stdout, proc.stderr, width, left_out)


def exp_diff_args(pipeline: str, revs: list[str], out_dir: str) -> list[list[str]]:
    """``dvc metrics diff`` and ``dvc plots diff`` of ``revs`` (experiment names or git
    revisions: none = the last commit vs the workspace, one = it vs the workspace), limited
    to this pipeline's summary and plots: without targets DVC also tries every other
    pipeline's files and warns "failed to load some metrics/plots" for each one not run."""
    summary = summary_path(PipelinePaths(Path(), pipeline)).as_posix()
    return [
        ["metrics", "diff", *revs, "--targets", summary],
        ["plots", "diff", *revs, "--targets", *plot_ids(pipeline), "-o", out_dir],
    ]


def command_line(dvc_args: list[str]) -> str:
    """``$ dvc ...`` as a shell would take it: what exp-show and exp-diff print before running."""
    return "$ dvc " + " ".join(shlex.quote(a) for a in dvc_args)


def _git(root: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        last = next((line for line in reversed((proc.stderr + proc.stdout).splitlines()) if line.strip()), "")
        raise SynthmedError(f"git {' '.join(args)} failed in {root}: {last or 'no output'}")
    return proc.stdout


def _report_stage(root: Path, pipeline: str) -> str:
    stages = pipeline_stages(root, pipeline)
    report = [name for name in stages if name.split("-")[0] == "report"]
    if not report:
        raise ConfigError(
            f"pipeline '{pipeline}' has no report stage in {root / 'dvc.yaml'}; run `synthmed dvc-yaml --write` "
            "and commit dvc.yaml first"
        )
    return report[0]


def baseline_paths(root: Path, pipeline: str, config: Path) -> list[str]:
    """The files a baseline commit holds, relative to ``root``: ``dvc.lock`` (the hashes of
    every output), ``dvc.yaml`` and the pipelines file (the params that made them), the
    pipeline's small metrics and plot files (``metrics/<pipeline>/``, kept in git) and the
    ``.gitignore`` files DVC wrote beside the pipeline's outputs (so ``git add`` never picks
    up a dataset); those that do not exist are left out."""
    try:
        config_rel = Path(config).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        raise ConfigError(f"{config} is outside the project {root}: a baseline commits it with dvc.lock") from None
    layout = PipelinePaths(Path(root), pipeline)
    ignores = [
        layout.real.parent / ".gitignore",
        layout.generator.parent / ".gitignore",
        layout.reports.parent / ".gitignore",
    ]
    rel = [p.relative_to(root).as_posix() for p in (layout.metrics, *ignores)]
    return [p for p in ("dvc.lock", "dvc.yaml", config_rel, *rel) if (Path(root) / p).exists()]


def record_baseline(root: Path, pipeline: str, config: Path, *, push: bool = False) -> dict[str, Any]:
    """Make ``pipeline``'s current results the baseline of ``dvc exp show``.

    Refuses (one line, nothing written) outside a git + DVC project, and when tracked files
    other than the baseline's own have uncommitted changes: ``dvc.lock`` hashes the code
    it ran, so a baseline of uncommitted code would show as changed in every clone. Then
    ``dvc repro <report stage>`` (reruns only stale stages; prints DVC's progress), ``git
    add`` + ``git commit --only`` of :func:`baseline_paths` (other staged changes stay
    staged), and ``dvc push`` of the pipeline's stages with ``push``. Returns ``{"commit",
    "message", "verdict", "recorded"}``; ``recorded`` is False when HEAD already held
    these results (nothing to commit)."""
    root = Path(root).resolve()
    if not (root / ".git").exists() or not (root / ".dvc").is_dir():
        raise SynthmedError(f"{root} is not a git + DVC project (`git init && dvc init` there first)")
    paths = baseline_paths(root, pipeline, config)
    report = _report_stage(root, pipeline)
    if subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=root, capture_output=True).returncode:
        raise SynthmedError(
            f"{root} has no git commit yet: commit the project first (`git add -A && git commit -m project`: "
            "DVC keeps the data out of git), then record the baseline"
        )
    status = _git(root, "status", "--porcelain", "--untracked-files=no").splitlines()
    dirty = [line[3:] for line in status if not any(line[3:] == p or line[3:].startswith(p + "/") for p in paths)]
    if dirty:
        raise SynthmedError(
            f"{len(dirty)} tracked file(s) have uncommitted changes (first: {dirty[0]}); commit or stash them "
            f"first: a baseline commits only {', '.join(paths)}, and its dvc.lock must describe committed code"
        )
    with repo_lock(root):
        # streamed, not captured: a pipeline that was never run trains and retrains here
        proc = subprocess.run([sys.executable, "-m", "dvc", "repro", report], cwd=root)
    if proc.returncode != 0:
        raise SynthmedError(f"dvc repro {report} failed (exit {proc.returncode}); see DVC's message above")
    summary = json.loads(summary_path(PipelinePaths(root, pipeline)).read_text()).get(pipeline, {})
    message = f"baseline: {pipeline} ({_headline(summary)})"
    paths = baseline_paths(root, pipeline, config)  # again: the run may have written new ones
    _git(root, "add", "--", *paths)
    staged = subprocess.run(["git", "diff", "--cached", "--quiet", "--", *paths], cwd=root).returncode != 0
    if staged:
        _git(root, "commit", "--quiet", "-m", message, "--only", "--", *paths)
    if push:
        with repo_lock(root):
            dvc(root, "push", *pipeline_stages(root, pipeline))
    commit = _git(root, "rev-parse", "--short", "HEAD").strip()
    return {"commit": commit, "message": message, "verdict": summary.get("verdict"), "recorded": staged}


def _headline(summary: dict[str, Any]) -> str:
    """``no measurable effect, delta -0.1245 [-0.31, 0.06]`` from a summary.json object."""
    text = str(summary.get("verdict") or "no verdict")
    if summary.get("delta") is not None:
        text += f", delta {summary['delta']:+.4f}"
        if summary.get("delta_lo") is not None and summary.get("delta_hi") is not None:
            text += f" [{summary['delta_lo']:+.4f}, {summary['delta_hi']:+.4f}]"
    return text
