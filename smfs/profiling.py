"""Opt-in profiling of the stack's Python programs, a diagnostic: with ``SMFS_PROFILE_DIR`` set, an
asyncio program's loop runs under cProfile and every few seconds its top functions by own time are
written to ``DIR/NAME.txt`` (text, replaced atomically), so the figures survive a power cut of the VM
up to the last dump. ``SMFS_PROFILE=1 ./inv drill`` sets it for the primary site and
keeps the files in each mode's ``logs/``. cProfile slows the profiled program (under TCG, by about
half): read the shares, not the absolute times."""

from __future__ import annotations

import asyncio
import cProfile
import io
import os
import pstats
from pathlib import Path

ENV = "SMFS_PROFILE_DIR"


def start(name: str, every: float = 5.0, top: int = 40) -> None:
    """Profile the running loop's thread from now on when ``SMFS_PROFILE_DIR`` is set; else nothing."""
    folder = os.environ.get(ENV)
    if not folder:
        return
    loop = asyncio.get_running_loop()
    prof = cProfile.Profile()
    path = Path(folder) / f"{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)

    def dump() -> None:
        prof.disable()
        try:
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text.getvalue())
            os.replace(tmp, path)
        finally:
            prof.enable()
        loop.call_later(every, dump)

    prof.enable()
    loop.call_later(every, dump)
