"""Progress for long steps: a rich progress bar on a terminal, a plain line every few seconds otherwise.

CI logs and pipes get lines (``[  12.3s] network-sync: running 12/40 s ...``) rather than bar
redraws; a terminal gets one live bar per step that stays on screen when the step ends::

    with Progress("network-sync: testers running", total=40.0, say=say) as bar:
        while ...:
            bar.update(elapsed, "1.2 MiB of ledger")
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

Say = Callable[[str], None]


def interactive() -> bool:
    """True when stdout is a terminal (and not a dumb one): bars are drawn only then."""
    import os

    return sys.stdout.isatty() and os.environ.get("TERM", "") not in ("", "dumb")


class Progress:
    """A bar from 0 to ``total`` (seconds, bytes, items) with a short free-text status."""

    def __init__(self, description: str, total: float, say: Say = print, every: float = 3.0,
                 unit: str = "s") -> None:
        self.description, self.total, self.say, self.every, self.unit = description, total, say, every, unit
        self._rich: Any = None
        self._task: Any = None
        self._next = 0.0

    def __enter__(self) -> Progress:
        if interactive():
            from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(TextColumn("{task.description}"), BarColumn(),
                                      TextColumn("{task.completed:.0f}/{task.total:.0f} " + self.unit),
                                      TextColumn("{task.fields[status]}"), TimeElapsedColumn())
            self._rich.start()
            self._task = self._rich.add_task(self.description, total=self.total, status="")
        return self

    def update(self, done: float, status: str = "") -> None:
        if self._rich is not None:
            self._rich.update(self._task, completed=min(done, self.total), status=status)
            return
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.every
            self.say(f"{self.description}: {done:5.1f}/{self.total:.0f} {self.unit}" + (f" ({status})" if status else ""))

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.stop()
