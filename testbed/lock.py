"""One testbed at a time: an ``flock`` on ``<cache>/testbed.lock``, held for the whole of every command
that creates, changes or removes the testbed (``up``, ``drill``, ``local-drill``, ``restore``, ``down``...).

Without it, a second ``./inv drill`` reuses the first one's running testbed, and one drill's teardown
removes a concurrent local drill's namespaces. A second command fails at once (exit 2) naming the
holder, which writes its pid, command and start time into the lock file once it holds it; with
``--wait`` it says whom it waits for and waits. The kernel drops an flock when its holder dies (also on
SIGKILL), so a crashed command never leaves the testbed locked; the file's text is then stale and is
overwritten by the next holder.

The lock is re-entrant within one process (a drill that brings the testbed up, then tears it down, holds
it once): a module-level depth counts the nested holds. The file is opened close-on-exec, so the
processes a command starts (disk servers, captures) never hold it after the command ends. A task of
``./inv`` takes it with :func:`testbed.cli.common.for_command`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from testbed.errors import TestbedError
from testbed.paths import cache_dir, untrusted
from testbed.progress import Say

LOCK_NAME = "testbed.lock"

_guard = threading.Lock()
_depth = 0  # nested holds in this process (0: not held)


class LockError(TestbedError, RuntimeError):
    """The testbed's lock cannot be taken (the message names the holder or the file, and what to do)."""


class LockBusy(LockError):
    """Another command holds the testbed."""


def lock_path() -> Path:
    return cache_dir() / LOCK_NAME


def held() -> bool:
    """Whether this process holds the testbed's lock."""
    return _depth > 0


def holder(path: Path | None = None) -> str:
    """Who holds (or last held) the lock, as the holder wrote it: "./inv drill (pid 123, since ...)"."""
    try:
        info = json.loads((path or lock_path()).read_text()[:4096] or "{}")
        pid, command, since = int(info["pid"]), str(info["command"])[:200], float(info["since"])
    except (OSError, ValueError, KeyError, TypeError):
        return "another command (it has not written its name yet)"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
    gone = "" if os.path.exists(f"/proc/{pid}") else "; that process is gone, a child of it still holds the file"
    return f"{command} (pid {pid}, since {when}{gone})"


def _open(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as err:
        why = "a symbolic link" if err.errno == errno.ELOOP else err.strerror
        raise LockError(f"testbed lock {path}: {why}; remove it (rm {path}) when no testbed command runs") from None
    why = untrusted(os.fstat(fd))
    if why:
        os.close(fd)
        raise LockError(f"testbed lock {path} is {why}; remove it (rm {path}) when no testbed command runs")
    return fd


@contextlib.contextmanager
def hold(command: str, wait: bool = False, say: Say = print,
         path: Path | None = None) -> Iterator[None]:
    """Hold the testbed's lock for the ``with`` block. Busy: :class:`LockBusy` at once, naming the holder,
    or with ``wait`` a message and a wait. Held already by this process: a nested hold (no-op)."""
    global _depth
    with _guard:
        nested = _depth > 0
        if nested:
            _depth += 1
    if nested:
        try:
            yield
        finally:
            with _guard:
                _depth -= 1
        return
    path = path or lock_path()
    fd = _open(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = holder(path)
            if not wait:
                raise LockBusy(f"the testbed is in use: {who} holds {path}; wait until it ends, or run again "
                               "with --wait") from None
            say(f"waiting for the testbed: {who} holds {path}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "command": command, "since": time.time()}).encode() + b"\n", 0)
        with _guard:
            _depth = 1
        try:
            yield
        finally:
            with _guard:
                _depth = 0
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # nobody holds it: no name to show
    finally:
        os.close(fd)  # drops the flock
