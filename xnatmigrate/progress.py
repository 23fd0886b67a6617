"""A small progress display: a live line on a terminal, nothing at all otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """``Progress("scanning", unit="files")(done, total)`` redraws at most 10 times a second.

    NOTE: silent unless the stream is a terminal, so logs and pipes stay clean.
    """

    def __init__(
        self, label: str, unit: str = "files", stream: TextIO | None = None, enabled: bool | None = None
    ):
        self.label = label
        self.unit = unit
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.start = time.monotonic()
        self._last = 0.0
        self._drawn = False
        self.extra = ""
        self._at = (0, 0)  # the last (done, total) drawn

    def note(self, text: str) -> None:
        """Say what the work waits on now after the counts ("" once working again); redrawn at once."""
        if text != self.extra:
            self.extra = text
            self._last = 0.0
            self(*self._at)

    def __call__(self, done: int, total: int) -> None:
        self._at = (done, total)
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and done < total:
            return
        self._last = now
        elapsed = max(now - self.start, 1e-6)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 and total >= done else 0
        width = 24
        filled = int(width * done / total) if total else width
        bar = "█" * filled + "·" * (width - filled)
        line = (
            f"\r{self.label} [{bar}] {done}/{total} {self.unit} "
            f"{rate:,.0f}/s ETA {_fmt_duration(eta)} {self.extra}"
        )
        self.stream.write(line[:200].ljust(80))
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\r" + " " * 100 + "\r")
            self.stream.flush()
            self._drawn = False
