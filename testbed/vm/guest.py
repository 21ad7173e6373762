"""Commands and files inside a guest through qemu-guest-agent (libvirt's agent API).

``Guest.exec`` runs a program and returns its exit code, stdout and stderr (bounded by a timeout
enforced in the guest with coreutils ``timeout`` and on the host by a deadline). ``spawn`` starts a
long-running process detached (new session, output to a log, pid in ``/run/smfs/NAME.pid``) and
``find``/``alive``/``stop`` find it again later, also from another host process.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import libvirt
import libvirt_qemu

from testbed.errors import TestbedError
from testbed.vm.guestproc import RUN_DIR

GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CHUNK = 48 << 10  # bytes per guest-file-read/write: 256 KiB messages stall the agent channel


class GuestError(TestbedError, RuntimeError):
    """The agent failed or refused (not connected, paused domain, bad path)."""


class GuestTimeout(GuestError):
    """A command outlived its timeout (it was killed in the guest)."""


class CommandFailed(GuestError):
    def __init__(self, vm: str, argv: Sequence[str], result: ExecResult) -> None:
        err = result.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        super().__init__(f"{vm}: {shlex.join(argv)[:120]} exited {result.rc}: {err[0][:200]}")
        self.result = result


@dataclass(frozen=True)
class ExecResult:
    rc: int
    stdout: bytes
    stderr: bytes
    seconds: float

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")

    @property
    def ok(self) -> bool:
        return self.rc == 0


class Guest:
    """One VM seen through its guest agent."""

    def __init__(self, domain: libvirt.virDomain, name: str | None = None) -> None:
        self.domain = domain
        self.name = name or domain.name()

    # --- agent --------------------------------------------------------------------------------

    def agent(self, command: str, arguments: Mapping[str, Any] | None = None, timeout: int = 10) -> Any:
        """One agent command; returns its ``return`` value."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = dict(arguments)
        try:
            reply = libvirt_qemu.qemuAgentCommand(self.domain, json.dumps(msg), timeout, 0)
        except libvirt.libvirtError as err:
            raise GuestError(f"{self.name}: agent {command}: {err.get_error_message()}") from None
        return json.loads(reply).get("return")

    def ping(self) -> bool:
        try:
            self.agent("guest-ping", timeout=2)
            return True
        except GuestError:
            return False

    def wait_ready(self, timeout: float) -> float:
        """Wait until the agent answers; returns the seconds waited."""
        t0 = time.monotonic()
        while not self.ping():
            if time.monotonic() - t0 > timeout:
                raise GuestTimeout(f"{self.name}: guest agent not ready after {timeout:.0f} s; "
                                   "see the console log (./inv status shows its path)")
            time.sleep(0.25)
        return time.monotonic() - t0

    # --- commands -----------------------------------------------------------------------------

    def exec(self, argv: Sequence[str] | str, timeout: float = 60, input: bytes | None = None,
             env: Mapping[str, str] | None = None, check: bool = False) -> ExecResult:
        """Run ``argv`` (a list, or a string for ``/bin/sh -c``) and wait for it."""
        if isinstance(argv, str):
            argv = ["/bin/sh", "-c", argv]
        t0 = time.monotonic()
        envs = [f"PATH={GUEST_PATH}", "PYTHONPATH=/opt/smfs-testbed", "HOME=/root", "LANG=C.UTF-8"]
        envs += [f"{k}={v}" for k, v in (env or {}).items()]
        args: dict[str, Any] = {
            "path": "/usr/bin/timeout",
            "arg": ["-s", "KILL", f"{timeout:g}", *argv],
            "env": envs,
            "capture-output": True,
        }
        if input is not None:
            args["input-data"] = base64.b64encode(input).decode()
        pid = self.agent("guest-exec", args)["pid"]
        deadline = t0 + timeout + 10
        delay = 0.02
        while True:
            st = self.agent("guest-exec-status", {"pid": pid})
            if st.get("exited"):
                break
            if time.monotonic() > deadline:
                raise GuestTimeout(f"{self.name}: {shlex.join(argv)[:120]} did not finish in {timeout:g} s")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)
        rc = st.get("exitcode", -st.get("signal", 0) or -1)
        result = ExecResult(rc, base64.b64decode(st.get("out-data", "")), base64.b64decode(st.get("err-data", "")),
                            time.monotonic() - t0)
        if rc == 137 or st.get("signal") == 9:
            raise GuestTimeout(f"{self.name}: {shlex.join(argv)[:120]} killed after {timeout:g} s")
        if check and rc != 0:
            raise CommandFailed(self.name, argv, result)
        return result

    def sh(self, script: str, timeout: float = 60, check: bool = True) -> str:
        """Run a shell snippet; return its stdout (raises on a non-zero exit when ``check``)."""
        return self.exec(["/bin/sh", "-c", script], timeout=timeout, check=check).out

    def python(self, code: str, timeout: float = 60, check: bool = True) -> ExecResult:
        """Run Python in the guest with the project's packages importable (``netem``, ``smfs``...)."""
        return self.exec(["python3", "-c", code], timeout=timeout, check=check)

    # --- files --------------------------------------------------------------------------------

    def write_file(self, path: str, data: bytes, mode: int | None = None) -> None:
        """Write ``data`` to ``path`` in the guest. With ``mode``, the file has that mode from its creation,
        before a byte is written (a key is never readable by others, not even for an instant): it is
        created empty and exclusively (``set -C``) under a temporary name with the matching umask, filled
        (the agent opens an existing file without changing its mode), then renamed over ``path``."""
        target = path
        if mode is not None:
            if not 0 <= mode <= 0o7777:
                raise ValueError(f"write_file {path}: mode {mode:o} is not a file mode")
            path = f"{target}.tmp-{secrets.token_hex(4)}"
            self.exec(["/bin/sh", "-c", 'umask "$1" && set -C && : > "$2"', "sh", f"{~mode & 0o777:03o}", path],
                      check=True)
        try:
            handle = self.agent("guest-file-open", {"path": path, "mode": "w"})
            try:
                for off in range(0, len(data), CHUNK) or [0]:
                    chunk = data[off:off + CHUNK]
                    self.agent("guest-file-write", {"handle": handle, "buf-b64": base64.b64encode(chunk).decode()})
            finally:
                self.agent("guest-file-close", {"handle": handle})
            if mode is not None:  # the bits a umask cannot give (setuid, sticky, x on a new file), then in place
                self.exec(["/bin/sh", "-c", 'chmod "$1" "$2" && mv -f "$2" "$3"', "sh", f"{mode:o}", path, target],
                          check=True)
        except BaseException:
            if mode is not None:
                with contextlib.suppress(GuestError):
                    self.exec(["rm", "-f", path])
            raise

    def read_file(self, path: str) -> bytes:
        handle = self.agent("guest-file-open", {"path": path, "mode": "r"})
        parts = []
        try:
            while True:
                r = self.agent("guest-file-read", {"handle": handle, "count": CHUNK})
                parts.append(base64.b64decode(r.get("buf-b64", "")))
                if r.get("eof") or not r.get("count"):
                    break
        finally:
            self.agent("guest-file-close", {"handle": handle})
        return b"".join(parts)

    # --- detached processes -------------------------------------------------------------------

    def spawn(self, name: str, argv: Sequence[str], cwd: str = "/", env: Mapping[str, str] | None = None,
              log: str | None = None) -> int:
        """Start ``argv`` detached (own session, stdin /dev/null, output appended to ``log``, default
        ``/run/smfs/NAME.log``); returns its pid, also kept in ``/run/smfs/NAME.pid``."""
        _check_name(name)
        log = log or f"{RUN_DIR}/{name}.log"
        exports = "".join(f"export {k}={shlex.quote(v)}; " for k, v in (env or {}).items())
        inner = f'echo $$ > {RUN_DIR}/{name}.pid; {exports}cd {shlex.quote(cwd)} && exec "$@" >>{shlex.quote(log)} 2>&1 </dev/null'
        script = (f"mkdir -p {RUN_DIR}; rm -f {RUN_DIR}/{name}.pid; "
                  f"setsid /bin/sh -c {shlex.quote(inner)} {shlex.quote(name)} {shlex.join(argv)} "
                  f">/dev/null 2>&1 </dev/null & "
                  f"for i in $(seq 100); do [ -s {RUN_DIR}/{name}.pid ] && break; sleep 0.02; done; "
                  f"cat {RUN_DIR}/{name}.pid")
        out = self.sh(script, timeout=30).strip()
        if not out.isdigit():
            raise GuestError(f"{self.name}: {name} did not start ({out[:100]!r}); see {log}")
        return int(out)

    def find(self, name: str) -> int | None:
        """The pid of the detached process ``name`` if it is still running, else None."""
        _check_name(name)
        out = self.exec(["/bin/sh", "-c", f"p=$(cat {RUN_DIR}/{name}.pid 2>/dev/null) && "
                         "[ -n \"$p\" ] && grep -q '^State:.*[^Z] (' /proc/$p/status 2>/dev/null && echo $p"],
                        timeout=10).out.strip()
        return int(out) if out.isdigit() else None

    def processes(self) -> dict[str, int | None]:
        """Every detached process started here: name -> pid (None when it has exited)."""
        out = self.sh(f"ls {RUN_DIR} 2>/dev/null | sed -n 's/\\.pid$//p'", timeout=10, check=False)
        return {name: self.find(name) for name in out.split()}

    def stop(self, name: str, signal: str = "TERM", wait: float = 5.0) -> bool:
        """Signal the detached process (its whole session); True if it was running."""
        pid = self.find(name)
        if pid is None:
            return False
        self.exec(["/bin/sh", "-c", f"kill -{signal} -- -{pid} 2>/dev/null || kill -{signal} {pid}; "
                   f"for i in $(seq {int(wait * 10)}); do kill -0 {pid} 2>/dev/null || exit 0; sleep 0.1; done; "
                   f"kill -KILL -- -{pid} 2>/dev/null; kill -KILL {pid} 2>/dev/null; true"], timeout=wait + 10)
        return True

    # --- facts --------------------------------------------------------------------------------

    def meminfo_mib(self) -> int:
        """MemTotal as the guest sees it, MiB."""
        for line in self.read_file("/proc/meminfo").decode().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
        raise GuestError(f"{self.name}: no MemTotal in /proc/meminfo")


def _check_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"process name {name!r}: use letters, digits, '-', '_' or '.'")
