"""Progress of a run on stderr: a live bar on a terminal, plain timestamped lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """Counts toys as tasks finish and shows toys/s and an ETA (stdout stays for JSON)."""

    def __init__(self, total: int, stream: TextIO | None = None, every: float = 10.0) -> None:
        self.total, self.done = total, 0
        self.stream = stream or sys.stderr
        self.every = every
        self._start = self._last = time.monotonic()
        self._bar = None
        if self.stream.isatty() and total > 0:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(TextColumn("toys"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]} toys/s"), TimeRemainingColumn(),
                            console=Console(file=self.stream), transient=False)
            self._task = self._bar.add_task("toys", total=total, rate="-")
            self._bar.start()

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self._start, 1e-9)

    def advance(self, toys: int) -> None:
        self.done += toys
        if self._bar is not None:
            self._bar.update(self._task, advance=toys, rate=f"{self.rate():.0f}")
            return
        now = time.monotonic()
        if now - self._last >= self.every or self.done >= self.total:
            self._last = now
            self.note(self._line())

    def _line(self) -> str:
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        share = 100.0 * self.done / self.total if self.total else 100.0
        return (f"toys {self.done}/{self.total} ({share:.0f}%), {rate:.1f} toys/s, "
                f"ETA {eta:.0f} s")

    def note(self, message: str) -> None:
        """A line for the user (above the bar on a terminal)."""
        if self._bar is not None:
            self._bar.console.print(message)
        else:
            stamp = time.strftime("%H:%M:%S")
            print(f"[{stamp}] {message}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
