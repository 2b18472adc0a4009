"""One run of a pipeline at a time in one project: ``.synthmed/<pipeline>/run.lock``.

The lock is ``fcntl.flock`` on that file, taken without waiting: a second ``synthmed run``
or ``synthmed stage`` of the same pipeline fails at once with
:class:`PipelineBusyError` (the CLI prints one line and exits with status 2), and the
first is unaffected. The kernel releases the lock when its holder exits or is killed, so
a lock file left by a dead process is simply taken over. The file holds the holder's pid,
for the message. Within one process the lock is re-entrant (the flow holds it while its
stage tasks take it again), so threads of one process are not kept apart by it.

Local file systems only: ``flock`` on NFS may not exclude other machines.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from generators.errors import SynthmedError
from tasks.paths import PipelinePaths

log = logging.getLogger(__name__)
LOCK_NAME = "run.lock"

_held: dict[Path, list[int]] = {}  # lock file -> [file descriptor, depth] held by this process
_guard = threading.Lock()


class PipelineBusyError(SynthmedError):
    """Another process is running the same pipeline of the same project."""


def lock_path(paths: PipelinePaths) -> Path:
    return paths.state / LOCK_NAME


def _holder(fd: int) -> str:
    """The pid recorded in a held lock file (``unknown`` while the holder writes it)."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return text if text.isdigit() else "unknown"


def _acquire(path: Path, pipeline: str) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)  # never truncate before the lock is ours
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _holder(fd)
        os.close(fd)
        raise PipelineBusyError(
            f"pipeline '{pipeline}' is already running in this project (pid {pid}); "
            f"wait for it to finish, or stop it (kill {pid}) and rerun"
        ) from None
    except OSError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@contextmanager
def pipeline_lock(paths: PipelinePaths) -> Iterator[None]:
    """Hold the pipeline's lock for the ``with`` block (re-entrant within this process).

    Raises :class:`PipelineBusyError` at once when another process holds it."""
    path = lock_path(paths).resolve()
    with _guard:
        entry = _held.get(path)
        if entry is None:
            _held[path] = [_acquire(path, paths.pipeline), 1]
        else:
            entry[1] += 1
    try:
        yield
    finally:
        with _guard:
            entry = _held[path]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[path]
                os.close(entry[0])  # closing the descriptor releases the flock
