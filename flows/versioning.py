"""Version a run's outputs with DVC: ``dvc commit`` the pipeline's stages (and ``dvc push``
when asked), then read back the hashes from ``dvc.lock`` for the run's artifact.

Runs the real ``dvc`` CLI (``python -m dvc``) under an exclusive file lock, so two runs
finishing at once cannot interleave their writes to ``dvc.lock`` or the cache.
"""

from __future__ import annotations

import fcntl
import logging
import shlex
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml

from generators.errors import SynthmedError, TransientError
from generators.safe_yaml import load_yaml
from tasks.stages import ORDER

log = logging.getLogger(__name__)


@contextmanager
def repo_lock(root: Path) -> Iterator[None]:
    """Exclusive lock for DVC operations in ``root`` (blocks until free)."""
    lock_path = root / ".synthmed" / "dvc-ops.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


DVC_FILE_MAX_BYTES = 16 << 20  # dvc.yaml / dvc.lock: read with the bounded YAML loader
DVC_LOCK_WAIT_S = 300.0  # how long to wait for another DVC process (e.g. a user's push) to finish


def dvc(root: Path, *args: str, timeout_s: float = 1800, lock_wait_s: float = DVC_LOCK_WAIT_S) -> str:
    """Run ``dvc ARGS`` in ``root``; raises SynthmedError (TransientError for push/pull
    network failures) with DVC's own last error line. While another DVC process holds
    the repository lock (DVC fails at once with "Unable to acquire lock"), retries with
    backoff for up to ``lock_wait_s`` seconds."""
    deadline, pause = time.monotonic() + lock_wait_s, 0.5
    while True:
        proc = subprocess.run(
            [sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True, timeout=timeout_s
        )
        locked = proc.returncode != 0 and "unable to acquire lock" in (proc.stderr + proc.stdout).lower()
        if not locked or time.monotonic() + pause > deadline:
            break
        log.info("dvc %s: the repository is locked by another DVC process; retrying in %.1f s", args[0], pause)
        time.sleep(pause)
        pause = min(pause * 2, 10.0)
    if proc.returncode != 0:
        last = next((line for line in reversed(proc.stderr.splitlines()) if line.strip()), "no output")
        error = TransientError if args and args[0] in ("push", "pull", "fetch") else SynthmedError
        raise error(f"dvc {' '.join(args)} failed in {root}: {last}")
    return proc.stdout


DVC_YAML = "dvc.yaml"
RENDERED_MARK = "# Rendered by `synthmed dvc-yaml"  # the first line of a dvc.yaml synthmed wrote


def _header(with_code: bool) -> str:
    """The first line: how to re-render this file (``sync_dvc_yaml`` reads the option back)."""
    command = "synthmed dvc-yaml --write" + ("" if with_code else " --no-code")
    return (
        f"# Rendered by `{command}` from pipelines.yaml and tasks/stages.py; do not edit by hand "
        "(`synthmed dvc-yaml --check` tells whether it is current).\n"
    )


def render_dvc_yaml(config: Path, pipelines: list[str] | None = None, *, with_code: bool = True) -> str:
    """The text of ``dvc.yaml`` for ``pipelines`` of the pipelines file ``config`` (None:
    every pipeline in it): each pipeline's six stages (``<verb>`` for ``demo``,
    ``<verb>-<name>`` for the others) and its plots, after a header line saying how it was
    made. A stage's params name only the keys the file writes out, so a pipeline that
    leaves ``device`` to its default never breaks ``dvc commit``. Raises ConfigError for an
    invalid file or an unknown pipeline name."""
    from tasks.config import load_pipeline, load_pipelines
    from tasks.stages import dvc_yaml

    config = Path(config)
    configs = load_pipelines(config).pipelines
    names = list(pipelines) if pipelines else list(configs)
    for name in names:
        if name not in configs:
            load_pipeline(name, config)  # the one-line error naming the known pipelines
    raw = (load_yaml(config, what="pipelines file") or {}).get("pipelines") or {}
    stages: dict[str, Any] = {}
    plots: list[Any] = []
    for name in names:
        rendered = dvc_yaml(name, configs[name], with_code=with_code, present=set(raw.get(name) or {}))
        stages.update(rendered["stages"])
        plots += rendered["plots"]
    body = yaml.safe_dump({"stages": stages, "plots": plots}, sort_keys=False, width=120)
    return _header(with_code) + body


def rendered_with_code(root: Path) -> bool | None:
    """Whether ``root/dvc.yaml`` was rendered with code deps (its header has no
    ``--no-code``), or None when the file is absent or was not written by ``synthmed
    dvc-yaml`` (hand-written: never rewritten)."""
    path = Path(root) / DVC_YAML
    if not path.is_file():
        return None
    with open(path) as handle:
        first = handle.readline()
    if not first.startswith(RENDERED_MARK):
        return None
    # code deps name synthmed's own files, which only exist in a checkout of synthmed: a
    # project elsewhere (whatever an older header said) is rendered without them
    in_checkout = (Path(root) / "tasks").is_dir() and (Path(root) / "generators").is_dir()
    return in_checkout and "--no-code" not in first


def check_dvc_yaml(root: Path, config: Path, *, with_code: bool = True) -> str:
    """``""`` when ``root/dvc.yaml`` is what :func:`render_dvc_yaml` renders now for every
    pipeline of ``config``, else a one-line description of the difference and the fix."""
    path = Path(root) / DVC_YAML
    expected = render_dvc_yaml(config, with_code=with_code)
    if not path.is_file():
        return f"{path}: missing; run `synthmed dvc-yaml --write` to render it from {Path(config).name}"
    current = path.read_text()
    if current == expected:
        return ""
    have = (yaml.safe_load(current) or {}).get("stages") or {}
    want = yaml.safe_load(expected)["stages"]
    missing = sorted(set(want) - set(have))
    changed = sorted(name for name in set(want) & set(have) if want[name] != have[name])
    extra = sorted(set(have) - set(want))
    parts = [
        f"{label} {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
        for label, names in (("missing stages", missing), ("changed stages", changed), ("stale stages", extra))
        if names
    ]
    what = "; ".join(parts) or "header, plots or layout differ"
    return f"{path} is out of date with {Path(config).name} ({what}); run `synthmed dvc-yaml --write`"


def sync_dvc_yaml(root: Path, config: Path) -> bool:
    """Re-render ``root/dvc.yaml`` for every pipeline of ``config`` (keeping its header's
    ``--no-code``) when synthmed wrote it and it no longer matches; returns True when it
    rewrote the file. A hand-written ``dvc.yaml`` is never touched. Call under
    :func:`repo_lock`."""
    with_code = rendered_with_code(root)
    if with_code is None or not check_dvc_yaml(root, config, with_code=with_code):
        return False
    tmp = Path(root) / f".{DVC_YAML}.tmp"
    tmp.write_text(render_dvc_yaml(config, with_code=with_code))
    tmp.replace(Path(root) / DVC_YAML)
    log.warning("%s/%s was out of date with %s; re-rendered it (commit it with git)", root, DVC_YAML, Path(config).name)
    return True


def pipeline_stages(root: Path, pipeline: str) -> list[str]:
    """Names of the dvc.yaml stages that belong to ``pipeline`` (``<verb>`` for demo-style
    files that name stages by verb and pass ``--pipeline <name>``)."""
    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        return []
    stages = (load_yaml(dvc_yaml, what="dvc.yaml", max_bytes=DVC_FILE_MAX_BYTES) or {}).get("stages", {})
    return [name for name, spec in stages.items() if _cmd_pipeline(str(spec.get("cmd", ""))) == pipeline]


def _cmd_pipeline(cmd: str) -> str | None:
    """The value of ``--pipeline`` in a stage command (whole word: ``tiny`` is not ``tiny2``)."""
    words = shlex.split(cmd)
    for i, word in enumerate(words):
        if word == "--pipeline" and i + 1 < len(words):
            return words[i + 1]
        if word.startswith("--pipeline="):
            return word.partition("=")[2]
    return None


def commit_outputs(root: Path, pipeline: str, push: bool = False, config: Path | None = None) -> dict[str, Any]:
    """Record the pipeline's outputs in DVC; returns ``{"outputs": {path: md5}, "git_commit":
    sha, "dvc_lock": YAML}``: ``dvc_lock`` holds this pipeline's stages of ``dvc.lock``, so a
    run that was never committed to git can still be restored (README: restoring data).

    A ``dvc.yaml`` rendered by ``synthmed dvc-yaml`` that no longer matches the pipelines
    file (``config``, default ``root/pipelines.yaml``: a new pipeline, a key written out or
    removed) is re-rendered first (:func:`sync_dvc_yaml`), so a new pipeline is versioned
    without hand edits. A hand-written ``dvc.yaml`` without the pipeline's stages, or no
    ``.dvc``, leaves the outputs unversioned with a warning naming the fix."""
    root = Path(root)
    config = Path(config) if config is not None else root / "pipelines.yaml"
    if not (root / ".dvc").is_dir():
        log.warning("%s is not a DVC project (no .dvc; `dvc init` there); outputs of %s not versioned", root, pipeline)
        return {"outputs": {}, "git_commit": _git_commit(root), "versioned": False}
    with repo_lock(root):
        if config.is_file():
            sync_dvc_yaml(root, config)
        stages = pipeline_stages(root, pipeline)
        if not stages:
            log.warning(
                "pipeline %s has no stages in %s/dvc.yaml (hand-written); outputs not versioned: run "
                "`synthmed dvc-yaml --write` to render every pipeline's stages",
                pipeline,
                root,
            )
            return {"outputs": {}, "git_commit": _git_commit(root), "versioned": False}
        ordered = sorted(
            stages, key=lambda name: ORDER.index(name.split("-")[0]) if name.split("-")[0] in ORDER else len(ORDER)
        )
        dvc(root, "commit", "--force", *ordered)
        if push:
            dvc(root, "push", *ordered)
    lock = load_yaml(root / "dvc.lock", what="dvc.lock", max_bytes=DVC_FILE_MAX_BYTES) or {}
    outputs = {
        out["path"]: out.get("md5", "")
        for name in ordered
        for out in lock.get("stages", {}).get(name, {}).get("outs", [])
    }
    # this run's entries of dvc.lock: with the git commit, all `dvc pull` needs to restore them
    stages_lock = {name: lock["stages"][name] for name in ordered if name in lock.get("stages", {})}
    dvc_lock = yaml.safe_dump({"schema": lock.get("schema", "2.0"), "stages": stages_lock}, sort_keys=False)
    return {
        "outputs": outputs,
        "git_commit": _git_commit(root),
        "versioned": True,
        "pushed": push,
        "dvc_lock": dvc_lock,
    }


def _git_commit(root: Path) -> str | None:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def configure_s3_remote(
    root: Path, url: str, *, name: str = "s3store", endpoint_url: str | None = None, default: bool = True
) -> dict[str, str]:
    """Add (or replace) an S3 DVC remote in ``root``'s ``.dvc/config``: ``dvc remote add
    [-d] -f NAME URL`` and, for S3-compatible stores, ``dvc remote modify NAME endpointurl
    URL``. Credentials are not written anywhere: DVC reads ``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY`` from the environment. Returns the settings written."""
    from tasks.storage import S3Uri, check_endpoint_url

    S3Uri.parse(url)  # a readable error for anything but s3://bucket/prefix (never echoes credentials)
    if endpoint_url:  # before anything is written: .dvc/config is tracked by git
        check_endpoint_url(endpoint_url, "endpoint URL")
    root = Path(root)
    if not (root / ".dvc").is_dir():
        raise SynthmedError(f"{root}: not a DVC project (no .dvc folder); run `dvc init` there first")
    with repo_lock(root):
        dvc(root, "remote", "add", *(["-d"] if default else []), "-f", name, url)
        if endpoint_url:
            dvc(root, "remote", "modify", name, "endpointurl", endpoint_url)
    settings = {"name": name, "url": url, "default": str(default).lower()}
    if endpoint_url:
        settings["endpointurl"] = endpoint_url
    return settings
