"""Progress for long steps: the ``Say`` type of every progress callback, a bar for a step of known length
(:class:`Progress`), and a spinner for steps of unknown length on the command line (:func:`spinner`).

The bar: CI logs and pipes get lines (``[  12.3s] network-sync: running 12/40 s ...``) rather than bar
redraws; a terminal gets one live bar per step that stays on screen when the step ends::

    with Progress("network-sync: testers running", total=40.0, say=say) as bar:
        while ...:
            bar.update(elapsed, "1.2 MiB of ledger")
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

Say = Callable[[str], None]
"""What every long step takes to report progress: a function printing one line (``print`` by default)."""


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


class Spinner:
    """What :func:`spinner` yields: call it with a step (printed with the elapsed time, and shown beside the
    spinner), or :meth:`update` the text beside the spinner alone."""

    def __init__(self, title: str, console: Any, status: Any) -> None:
        self.title, self._console, self._status, self._t0 = title, console, status, time.monotonic()

    def __call__(self, msg: str) -> None:
        self._console.print(f"[dim]{time.monotonic() - self._t0:6.1f}s[/dim] {msg}")
        self._status.update(f"{self.title}: {msg.strip()}")

    def update(self, text: str) -> None:
        self._status.update(text)


@contextmanager
def spinner(title: str) -> Iterator[Spinner]:
    """A spinner with the current step, for the steps of a task (``./inv up``, ``./inv capture``) whose
    length is not known; every step is also printed with the elapsed time, so the steps stay on screen."""
    from rich.console import Console

    console = Console(highlight=False)
    with console.status(title) as status:
        yield Spinner(title, console, status)
