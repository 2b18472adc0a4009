"""The quiet console of the ``synthmed`` command line: one line per event, no library tracebacks.

What a local run prints without ``-v``:

- synthmed's own log lines (``tasks.*``, ``generators.*``, ``flows.*``) as they are;
- one line per finished Prefect task, in place of Prefect's ``Finished in state ...``:
  ``[3/6] train: Completed in 6.9 s (total 41.0 s)`` (stages numbered in
  :data:`tasks.stages.ORDER`, other tasks such as the preflight by name); Prefect's
  failed-run lines are WARNINGs, since the CLI ends with one ``error: ...`` line saying why;
- progress records of :mod:`tasks.progress` (``synthesize: 128/300 images (43%), ETA 4 s``):
  on a terminal one line rewritten in place, in a log file one line per update;
- a library's log record that carries a traceback, or is logged at ERROR, becomes one
  WARNING line ``<logger>: <message> (<ExceptionType>: <first line>)``; Python warnings
  (``warnings.warn``, e.g. from torch or MONAI) are logged through ``py.warnings`` as one
  line each, the same text only once per run;
- a multi-line message keeps its first line (Prefect's temporary-server notice is two).

``-v`` keeps everything: full tracebacks, Prefect's state lines, every warning.

Telemetry: :func:`telemetry_off` sets ``PREFECT_SERVER_ANALYTICS_ENABLED=false`` (Prefect's
server heartbeat to sens-o-matic.prefect.io, which fails offline with ``ERROR ... Failed to
send telemetry`` and, when two servers start at once on one SQLite database, a 60-line
``database is locked`` traceback) and ``DO_NOT_TRACK=1`` (Prefect's SDK analytics, read at
``import prefect``), and ``DVC_NO_ANALYTICS=1`` (the analytics daemon each ``dvc`` call
would start) unless the user set them. The CLI calls it before Prefect is imported;
the temporary server inherits the environment.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import TextIO

#: environment switches for local runs (the user's own values win)
TELEMETRY_OFF = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1"}
OWN_LOGGERS = ("tasks", "generators", "flows", "__main__")
PREFECT_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
PROGRESS_LOGGER = "tasks.progress"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MAX_LINE = 400  # characters of one console message


def telemetry_off() -> dict[str, str]:
    """Switch Prefect's server heartbeat and SDK analytics off for this process and its
    children, unless the environment already says otherwise; returns what was set."""
    set_now = {key: value for key, value in TELEMETRY_OFF.items() if key not in os.environ}
    os.environ.update(set_now)
    return set_now


def _own(name: str) -> bool:
    return any(name == root or name.startswith(root + ".") for root in OWN_LOGGERS)


def _first_line(text: str) -> str:
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    return line if len(line) <= MAX_LINE else line[: MAX_LINE - 3] + "..."


class QuietFilter(logging.Filter):
    """Rewrites records for the console handler (see the module docstring); with
    ``verbose`` it lets everything through unchanged."""

    def __init__(self, verbose: bool = False, stages: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.verbose = verbose
        self.stages = stages
        self.started = time.monotonic()
        self.last_finished = self.started
        self.seen_warnings: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose:
            return True
        if record.name == "py.warnings":
            return self._warning(record)
        if record.name in PREFECT_RUN_LOGGERS:
            message = record.getMessage()
            if message.startswith("Beginning flow run"):
                self.started = self.last_finished = time.monotonic()
            if record.levelno >= logging.ERROR:  # the CLI's last line says why, once: `error: ...`
                record.levelno, record.levelname = logging.WARNING, "WARNING"
            if message.startswith("Finished in state"):
                return self._stage_line(record)
        if record.exc_info or record.exc_text:
            self._one_line_exception(record)
        if not _own(record.name) and record.name not in PREFECT_RUN_LOGGERS and record.levelno >= logging.ERROR:
            record.levelno, record.levelname = logging.WARNING, "WARNING"  # a library's error: one warning line
        message = record.getMessage()
        if "\n" in message or len(message) > MAX_LINE:
            record.msg, record.args = _first_line(message), None
        return True

    def _warning(self, record: logging.LogRecord) -> bool:
        """``warnings.warn`` text is ``path:line: Category: message\\n  source line``."""
        text = _first_line(record.getMessage())
        path, _, rest = text.partition(": ")
        text = rest or path  # drop the machine path of the library file
        if text in self.seen_warnings:
            return False
        self.seen_warnings.add(text)
        record.msg, record.args = text, None
        return True

    def _stage_line(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        name = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None) or "run"
        state = record.getMessage().removeprefix("Finished in state").strip().split("(")[0]
        label = f"[{self.stages.index(name) + 1}/{len(self.stages)}] {name}" if name in self.stages else str(name)
        if record.name == "prefect.flow_runs":
            label = f"flow {name}"
        elapsed = now - self.last_finished
        self.last_finished = now
        record.msg = "%s: %s in %.1f s (total %.1f s)"
        record.args = (label, state or "finished", elapsed, now - self.started)
        return True

    @staticmethod
    def _one_line_exception(record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        detail = f"{type(exc).__name__}: {_first_line(str(exc))}" if exc is not None else "see -v for the traceback"
        message = _first_line(record.getMessage())
        if exc is not None and _first_line(str(exc)) in message:
            record.msg = message
        else:
            record.msg = f"{message} ({detail}; run with -v for the traceback)"
        record.args, record.exc_info, record.exc_text, record.stack_info = None, None, None, None


class ProgressHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes progress records on one line rewritten in place when the stream is a
    terminal (``\\r``), and as ordinary lines otherwise; any other record first ends a
    pending progress line."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream or sys.stderr)
        self.pending = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tty = bool(getattr(self.stream, "isatty", lambda: False)())
            if record.name == PROGRESS_LOGGER and tty:
                self.stream.write("\r\x1b[2K" + self.format(record))
                self.stream.flush()
                self.pending = True
                return
            if self.pending:
                self.stream.write("\n")
                self.pending = False
            super().emit(record)
        except Exception:  # noqa: BLE001 - logging must never raise (logging.Handler.handleError's contract)
            self.handleError(record)


def configure_console(verbose: bool = False, stages: tuple[str, ...] = ()) -> logging.Handler | None:
    """Install the console handler on the root logger and route Python warnings through
    logging; returns the handler, or None when the root logger already has other handlers
    (pytest's, an embedding application's), which are left alone as ``logging.basicConfig``
    would. A handler installed by an earlier call is replaced."""
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, ProgressHandler)]
    if len(ours) != len(root.handlers):
        return None
    for handler in ours:
        root.removeHandler(handler)
    handler = ProgressHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(QuietFilter(verbose=verbose, stages=stages))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)
    if not verbose:  # one line per HTTP call to the local Prefect API is noise
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)
    return handler
