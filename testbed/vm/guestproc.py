"""The drill's processes in a guest: where they keep their pid, log and ready files, and how the host
waits for one to be ready. No libvirt here (the guest's agent is :mod:`testbed.vm.guest`), so the drill,
its faults and the namespace side can import it at the top."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from testbed.errors import InfrastructureError


class _Done(Protocol):
    rc: int


class Guest(Protocol):
    """What :func:`wait_file` needs of a guest (:class:`testbed.vm.guest.Guest` has it): run a command and
    get its exit code, run a shell script and get its output."""

    def exec(self, argv: Sequence[str] | str, timeout: float = ...) -> _Done: ...

    def sh(self, script: str, timeout: float = ..., check: bool = ...) -> str: ...

RUN_DIR = "/run/smfs"
"""A guest's folder for the processes the testbed starts (``<name>.pid``, ``<name>.log``, ready files)."""

GUEST_READY_TIMEOUT = 90.0
"""Seconds for a site or gateway in a guest to be ready: a TCG guest starts Python processes many times
slower than the host (compare :data:`testbed.drill.local.SITE_READY_TIMEOUT`)."""

WAIT_READY = """n=0
while [ "$n" -lt "$3" ]; do
  [ -e "$1" ] && exit 0
  if [ $((n % 10)) -eq 0 ]; then
    p=$(cat "$2" 2>/dev/null)
    grep -q '^State:.*[^Z] (' "/proc/$p/status" 2>/dev/null || { [ -e "$1" ] && exit 0; exit 3; }
  fi
  sleep 0.05
  n=$((n + 1))
done
exit 4
"""
"""Guest shell: wait for file $1 while the process whose pid is in $2 lives (checked every 10th poll), at
most $3 polls of 50 ms; exit 0 ready, 3 the process is gone, 4 timed out."""


def wait_file(g: Guest, path: str, proc: str, what: str, timeout: float = GUEST_READY_TIMEOUT) -> None:
    """Wait until ``proc`` (a process started with ``g.spawn``) has made ``path``, polling in the guest: one
    guest command instead of two per poll (each costs ~0.4 s under TCG), so readiness is seen within 50 ms."""
    polls = max(1, int(timeout / 0.05))
    res = g.exec(["/bin/sh", "-c", WAIT_READY, "sh", path, f"{RUN_DIR}/{proc}.pid", str(polls)], timeout=timeout + 30)
    if res.rc == 0:
        return
    if res.rc == 3:
        tail = g.sh(f"tail -n 3 {RUN_DIR}/{proc}.log", check=False).strip().replace("\n", " | ")
        raise InfrastructureError(f"{what} exited before it was ready: {tail[:300]}")
    raise InfrastructureError(f"{what} not ready after {timeout:.0f} s (see {RUN_DIR}/{proc}.log in the guest)")
