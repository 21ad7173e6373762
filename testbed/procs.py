"""Processes the testbed starts, recorded in the registry by pid *and* start time, so teardown
kills exactly them and never a later process that reused the pid."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from testbed.registry import Registry, Resource, register_teardown


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def alive(pid: int, started: int | None) -> bool:
    """True while the recorded process runs (a zombie does not count)."""
    if started is None or start_time(pid) != started:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def spawn(
    argv: list[str], *, owner: str, name: str, log_path: Path, registry: Registry, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session with stdout+stderr to ``log_path`` and record it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env={**os.environ, **(env or {})},
        )
    registry.add("process", f"{proc.pid}", owner, name=name, started=start_time(proc.pid), argv=argv)
    return proc


def kill(pid: int, started: int | None, sig: int = signal.SIGKILL, wait: float = 5.0) -> None:
    """Send ``sig`` to the recorded process group if it is still the recorded process; wait for it."""
    if not alive(pid, started):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + wait
    while alive(pid, started) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        time.sleep(0.02)
    # A zombie's stat still exists; reaped or not, it no longer runs.


def _teardown_process(res: Resource) -> None:
    kill(int(res.ident), res.meta.get("started"))


register_teardown("process", _teardown_process)
