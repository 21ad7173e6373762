"""Helpers shared by the task modules: the ``task`` decorator that turns every project error into one line
and exit 2, the testbed's lock for a task, and the checks of every flag.

Every task is declared with :func:`task` (never invoke's own): a :class:`~testbed.errors.TestbedError`
that leaves a task's body is caught there, once, and becomes ``error: <message>`` and exit 2, whether
it is bad input (:class:`~testbed.errors.UserError`) or a failure of the testbed. A task catches an
error itself only to say more (``--spec x.toml: ...``), to clean up, or for another exit code (``./inv
down``: 1 when resources are left). Exit 1 is only ever a data-loss verdict.

Flags arrive as text (a task's defaults are strings, so that invoke's parser never converts a value and
fails with a traceback): each is checked here, typed and bounded, before a task creates anything, and a
bad one is one line naming the flag, exit 2. Bounds shared with the spec live in :mod:`testbed.spec`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import invoke
from invoke.exceptions import Exit

from smfs.units import parse_size, show
from testbed.errors import TestbedError
from testbed.paths import fresh_folder
from testbed.progress import Say

__all__ = ["INTERRUPTED", "WAIT_HELP", "claim_folder", "flag_choice", "flag_clone_name", "flag_int", "flag_modes",
           "flag_new_out", "flag_number", "flag_out", "flag_size", "flag_snapshot_name", "for_command",
           "remainder_argv", "run_for_verdict", "stamped", "task", "user_error"]

_SNAPSHOT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}")
WAIT_HELP = "when another command holds the testbed, wait for it (default: fail at once, naming it)"
INTERRUPTED = 130
"""The exit code of a Ctrl-C in the tasks that give no verdict and ask for it (``@task(interrupted=INTERRUPTED)``:
the VM testbed's, the WAN's, capture): the shell's 128 + SIGINT."""


def user_error(message: str, code: int = 2) -> Exit:
    """An invoke Exit carrying a one-line message; raise it for bad input (no traceback)."""
    return Exit(f"error: {' '.join(message.split())}", code=code)


def task(*args: Any, interrupted: int | None = None, **kwargs: Any) -> Any:
    """invoke's ``@task`` (bare or with its options), with the body guarded: a TestbedError is one line
    and exit 2. ``interrupted``: the exit code of a Ctrl-C in the body (``interrupted`` on stderr);
    without it, a Ctrl-C is left to the task, or to invoke.

    The guard wraps the function itself (``Task.body``), not the task's call from the command line, so a
    test calling ``some_task.body(Context(), ...)`` sees the same ``Exit`` as ``./inv`` does."""
    if len(args) == 1 and callable(args[0]) and not isinstance(args[0], invoke.Task) and not kwargs \
            and interrupted is None:  # bare @task
        return invoke.task(_guard(args[0], None))
    return lambda body: invoke.task(*args, **kwargs)(_guard(body, interrupted))


def _guard(body: Callable[..., Any], interrupted: int | None) -> Callable[..., Any]:
    @functools.wraps(body)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return body(*args, **kwargs)
        except TestbedError as err:
            raise user_error(str(err)) from None
        except KeyboardInterrupt:
            if interrupted is None:
                raise
            raise Exit("interrupted", code=interrupted) from None

    guarded.guarded = True  # type: ignore[attr-defined]  # every task must be; tests/unit/test_errors.py checks
    return guarded


@contextlib.contextmanager
def for_command(command: str, wait: bool = False) -> Iterator[None]:
    """The testbed's lock (:func:`testbed.lock.hold`) for a task of ``./inv``, with the registry read under
    it, so that an untrusted or unreadable registry stops the task before it starts. Take it after the
    task's flags are checked: a bad flag creates nothing, not even the lock file. A busy lock or a bad
    registry is a TestbedError (one line, exit 2, by :func:`task`); a Ctrl-C while waiting is exit 2."""
    from testbed.lock import hold
    from testbed.registry import Registry

    holding = False
    try:
        with hold(command, wait=wait, say=lambda m: print(m, file=sys.stderr, flush=True)):
            holding = True
            Registry().items()
            yield
    except KeyboardInterrupt:
        if holding:
            raise
        raise Exit("interrupted while waiting for the testbed; nothing was started", code=2) from None


def run_for_verdict(run: Callable[[], dict[str, Any]], what: str) -> dict[str, Any]:
    """Run a drill (or a self-test, an experiment, a campaign); any crash of it (including Ctrl-C) is exit 2
    with one line, never exit 1, which only a checker's data-loss verdict gives. The traceback goes to the
    log (DEBUG)."""
    try:
        return run()
    except KeyboardInterrupt:
        raise Exit(f"{what}: interrupted; no verdict (exit 2); what it created was torn down", code=2) from None
    except Exit:
        raise
    except (ValueError, OSError) as err:
        raise user_error(f"{what}: {err}") from None
    except Exception as err:  # noqa: BLE001 - a drill crash is "no verdict", exit 2
        logging.getLogger("smfs.drill").debug("drill crashed", exc_info=True)
        raise Exit(f"{what} failed: {type(err).__name__}: {err} (no verdict; exit 2)", code=2) from None


def stamped(start: float) -> Say:
    """A ``say`` that prints each line with the seconds since ``start`` (a line starting with a newline as it is)."""
    def say(line: str) -> None:
        if line.startswith("\n"):
            print(line, flush=True)
        else:
            print(f"[{time.monotonic() - start:6.1f}s] {line}", flush=True)
    return say


def flag_new_out(flag: str, value: str) -> Path | None:
    """``--out``: a folder that does not exist yet, or an empty one (a run never mixes its files with an
    earlier run's, and never deletes them); None when not given."""
    out = flag_out(flag, value)
    try:
        used = out is not None and out.is_dir() and any(out.iterdir())
    except OSError as err:
        raise user_error(f"{flag} {out}: {err.strerror}; give a new folder") from None
    if used:
        raise user_error(f"{flag} {out}: exists and is not empty; give a new folder (results are never "
                         "overwritten)")
    return out


def claim_folder(out: Path | None, parent: Path, stamp: str = "", suffix: str = "") -> Path:
    """The run's output folder: ``out`` (created), or a new folder under ``parent`` named by the time
    (``{stamp}<time>{suffix}``, then ``-2``, ``-3``... when taken). Claim it under the testbed's lock: a
    name chosen before a wait for the lock may be another run's by then."""
    try:
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            return out
        return fresh_folder(parent, f"{stamp}{time.strftime('%Y%m%d-%H%M%S')}{suffix}")
    except OSError as err:
        raise user_error(f"output folder {out or parent}: {err.strerror or err}; give --out a folder you can write") from None


def flag_modes(flag: str, text: str) -> tuple:
    """``all`` or a comma list of distinct modes; a one-line error naming ``flag`` otherwise."""
    from smfs.modes import parse_modes

    try:
        modes = tuple(parse_modes(text))
    except ValueError as err:
        raise user_error(f"{flag}: {str(err).removeprefix('mode: ')}") from None
    if not modes:
        raise user_error(f"{flag} {show(text)}: give at least one mode, or all")
    names = [m.name for m in modes]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice:
        raise user_error(f"{flag}: {twice} appears twice; give each mode once")
    return modes


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
    from testbed.spec import check_name

    return check_name(value, flag)  # a SpecError: one line by the task's guard


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
