"""A progress bar on stderr, without a dependency.

On a terminal it redraws one line in place (at most every ``REDRAW_S``). Anywhere else (CI logs, a
pipe, a file) redrawing would leave a mess, so it prints a plain line at each tenth of the work and one
at the end.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

REDRAW_S = 0.1
BAR_WIDTH = 30


class ProgressBar:
    """Counts finished requests of one run; ``advance`` per request, ``close`` once at the end."""

    def __init__(
        self, total: int, label: str, *, stream: TextIO | None = None, is_tty: bool | None = None
    ) -> None:
        self.total = max(0, total)
        self.label = label
        self.done = 0
        self.failed = 0
        self._stream = stream if stream is not None else sys.stderr
        self._tty = self._stream.isatty() if is_tty is None else is_tty
        self._started = time.monotonic()
        self._last_draw = 0.0
        self._last_tenth = 0
        self._closed = False

    def advance(self, *, failed: bool = False) -> None:
        """One request finished (``failed`` if it ended in an error)."""
        self.done += 1
        self.failed += int(failed)
        if self._tty:
            now = time.monotonic()
            if now - self._last_draw >= REDRAW_S or self.done == self.total:
                self._last_draw = now
                self._stream.write("\r" + self._line(bar=True))
                self._stream.flush()
            return
        tenth = self.done * 10 // self.total if self.total else 10
        if tenth > self._last_tenth and self.done < self.total:
            self._last_tenth = tenth
            self._stream.write(self._line(bar=False) + "\n")
            self._stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        prefix = "\r" if self._tty else ""
        self._stream.write(prefix + self._line(bar=self._tty) + "\n")
        self._stream.flush()

    def _line(self, *, bar: bool) -> str:
        fraction = self.done / self.total if self.total else 1.0
        elapsed = time.monotonic() - self._started
        counts = f"{self.done}/{self.total} done, {self.failed} failed, {elapsed:.1f}s"
        if not bar:
            return f"{self.label}: {fraction:4.0%} {counts}"
        filled = round(BAR_WIDTH * fraction)
        return f"{self.label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {fraction:4.0%} {counts}"

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
