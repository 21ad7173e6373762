"""Helpers shared by the task modules: user errors without tracebacks, and the checks of every flag.

Flags arrive as text (a task's defaults are strings, so that invoke's parser never converts a value and
fails with a traceback): each is checked here, typed and bounded, before a task creates anything, and a
bad one is one line naming the flag, exit 2. Bounds shared with the spec live in :mod:`testbed.spec`.
"""

from __future__ import annotations

import math
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from invoke.exceptions import Exit

from smfs.units import parse_size, show

__all__ = ["flag_choice", "flag_clone_name", "flag_int", "flag_number", "flag_out", "flag_size", "flag_snapshot_name",
           "parse_size", "remainder_argv", "user_error"]

_SNAPSHOT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}")


def user_error(message: str, code: int = 2) -> Exit:
    """An invoke Exit carrying a one-line message; raise it for bad input (no traceback)."""
    return Exit(f"error: {' '.join(message.split())}", code=code)


def flag_int(flag: str, value: Any, bounds: tuple[int, int], example: str, what: str = "whole number") -> int:
    """``value`` (a flag's text) as a whole number within ``bounds``, or a one-line error naming the flag."""
    text = value if isinstance(value, str) else str(value)
    if not re.fullmatch(r"\s*[+-]?[0-9]{1,18}\s*", text):
        raise user_error(f"{flag} {show(value)}: give a {what}, e.g. {flag} {example}")
    n = int(text)
    if not bounds[0] <= n <= bounds[1]:
        raise user_error(f"{flag} {n}: give a {what} from {bounds[0]} to {bounds[1]}, e.g. {flag} {example}")
    return n


def flag_number(flag: str, value: Any, bounds: tuple[float, float], example: str, low_open: bool = False,
                what: str = "number", high_open: bool = False) -> float:
    """``value`` as a finite number within ``bounds`` (an end excluded when ``low_open``/``high_open``)."""
    try:
        x = float(value) if len(str(value)) <= 40 else math.nan
    except (TypeError, ValueError):
        x = math.nan
    if math.isnan(x):
        raise user_error(f"{flag} {show(value)}: give a {what}, e.g. {flag} {example}")
    low, high = bounds
    if not ((x > low if low_open else x >= low) and (x < high if high_open else x <= high)):  # inf fails too
        top = f"{'below' if high_open else 'at most'} {high:g}"
        if low_open and low == 0:
            span = f"a positive {what} ({top})"
        else:
            span = f"a {what} {'above' if low_open else 'of at least'} {low:g} and {top}"
        raise user_error(f"{flag} {x:g}: give {span}, e.g. {flag} {example}")
    return x


def flag_size(flag: str, value: Any, bounds: tuple[int, int], example: str) -> int:
    """``value`` as a size in bytes ("512KiB") within ``bounds``."""
    try:
        n = parse_size(str(value), flag, high=bounds[1], example=example)
    except ValueError as err:
        raise user_error(str(err)) from None
    if n < bounds[0]:
        raise user_error(f"{flag} {show(value)}: below the minimum of {bounds[0]} bytes; use e.g. {example}")
    return n


def flag_choice(flag: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise user_error(f"{flag} {show(value)}: use one of {', '.join(choices)}")
    return value


def flag_snapshot_name(flag: str, value: Any) -> str:
    """A snapshot's or clone's name: it becomes a folder name, so 1-40 letters, digits, '-', '_' or '.',
    starting with a letter or digit (never '.', '..' or a path)."""
    if not isinstance(value, str) or not _SNAPSHOT_NAME.fullmatch(value):
        raise user_error(f"{flag} {show(value)}: use 1-40 letters, digits, '-', '_' or '.', starting with a "
                         "letter or digit")
    return value


def flag_clone_name(flag: str, value: Any) -> str:
    """A clone brought up as a testbed: its name becomes the testbed's (VMs, folders), so a spec name."""
    from testbed.spec import SpecError, check_name

    try:
        return check_name(value, flag)
    except SpecError as err:
        raise user_error(str(err)) from None


def flag_out(flag: str, value: Any) -> Path | None:
    """An output folder (empty: the task's default); refused when it names an existing non-folder."""
    if not value:
        return None
    p = Path(str(value))
    try:
        taken = p.exists() and not p.is_dir()
    except (OSError, ValueError):  # a NUL in the path, a name too long
        taken = True
    if taken:
        raise user_error(f"{flag} {show(str(value), limit=300)}: exists and is not a folder; give a new folder")
    return p


def remainder_argv(remainder: str) -> list[str]:
    """The words after ``--`` exactly as the user's shell split them.

    invoke joins them with spaces into ``c.remainder`` (losing the quoting of ``sh -c "grep a b"``); the
    process's own argv still has them, after the first ``--`` (where invoke's parser splits too). When
    that does not match ``remainder`` (a task called from Python), ``remainder`` is split as a shell would."""
    argv = sys.argv[1:]
    if "--" in argv:
        words = argv[argv.index("--") + 1:]
        if " ".join(words) == remainder:
            return words
    try:
        return shlex.split(remainder)
    except ValueError as err:
        raise user_error(f"the command after --: {err}") from None
