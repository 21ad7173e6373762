"""Processes the testbed starts, recorded in the registry by pid *and* start time *and* command line,
so teardown kills exactly them: never a later process that reused the pid, and never a process a
stale or foreign registry entry names (its command line is not the one recorded)."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

from testbed.registry import Registry, Resource, Scope, register_teardown


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
        if os.getpgid(pid) == pid:  # its own group (spawn's sessions): take its children with it
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


def cmdline(pid: int) -> list[str] | None:
    """The process's command line (/proc/PID/cmdline), or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="surrogateescape") for a in raw.split(b"\0")[:-1]] if raw else []


def _is_ours(res: Resource, scope: Scope) -> str | None:
    """The recorded process, if it still runs, must run the recorded command line (``ip netns exec NS``
    execs its command, so that prefix may be gone); a recorded pid that no longer runs the recorded
    start time is gone, and :func:`kill` leaves it alone anyway."""
    if not res.ident.isdigit():
        return "not a pid"
    pid, started = int(res.ident), res.meta.get("started")
    if not alive(pid, started):
        return None
    argv = res.meta.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        return "no command line was recorded for it"
    live = cmdline(pid)
    if live is None:
        return None
    if live == argv or (argv[:3] == ["ip", "netns", "exec"] and live == argv[4:]):
        return None
    if _exec_of_gateway(argv, live):
        return None
    return f"pid {pid} runs {shlex.join(live)[:80]!r}, not the recorded {shlex.join(argv)[:80]!r}"


def _exec_of_gateway(argv: list[str], live: list[str]) -> bool:
    """``python -m smfs.gateway --engine c`` execs the C program in its place (same pid, same start
    time, another command line): the recorded gateway is still ours."""
    if "smfs.gateway" not in argv or "--engine" not in argv or not live:
        return False
    i = argv.index("--engine")
    return argv[i + 1:i + 2] == ["c"] and Path(live[0]).name.startswith("smfs-gateway")


def _teardown_process(res: Resource) -> None:
    kill(int(res.ident), res.meta.get("started"))


register_teardown("process", _teardown_process, check=_is_ours)
