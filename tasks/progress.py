"""Progress of a long loop as throttled log lines: ``synthesize: 128/300 images (43%), ETA 4 s``.

A stage that knows how much work it has makes one :class:`Progress` and calls
:meth:`Progress.advance` as work gets done; a line is logged (logger ``tasks.progress``,
INFO) at most every ``every_s`` seconds and once at the end. The CLI's console
(:mod:`flows.console`) shows these lines rewritten in place on a terminal, one line per
update in a log file. The ETA assumes the remaining items take as long as the done ones.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3 min 05 s`` or ``1 h 02 min`` (``seconds`` >= 0)."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {(seconds % 3600) // 60:02d} min"


class Progress:
    """Counts ``done`` of ``total`` items of ``what`` (e.g. ``"images"``) for ``stage``."""

    def __init__(self, stage: str, total: int, what: str = "images", every_s: float = 2.0) -> None:
        if total < 0:
            raise ValueError(f"total must be >= 0, got {total}")
        self.stage, self.total, self.what, self.every_s = stage, total, what, every_s
        self.done = 0
        self.started = time.monotonic()
        self.last_logged = self.started

    def line(self) -> str:
        """The current progress line."""
        elapsed = time.monotonic() - self.started
        share = self.done / self.total if self.total else 1.0
        text = f"{self.stage}: {self.done}/{self.total} {self.what} ({share:.0%})"
        if self.done >= self.total:
            return f"{text} in {format_seconds(elapsed)}"
        if self.done:
            return f"{text}, ETA {format_seconds(elapsed / self.done * (self.total - self.done))}"
        return text

    def advance(self, n: int = 1) -> None:
        """``n`` more items done; logs a line when ``every_s`` has passed or all are done."""
        self.done = min(self.total, self.done + n)
        now = time.monotonic()
        if self.done >= self.total or now - self.last_logged >= self.every_s:
            self.last_logged = now
            log.info("%s", self.line())
