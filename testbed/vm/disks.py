"""Data disks with a volatile write cache: one nbdkit per VM, attached by libvirt as an NBD disk.

A VM's data disk (vdb, /data in the guest) is a raw sparse file served by nbdkit on a unix socket:

    client (QEMU) → error filter → cache filter (cache=writeback) → file plugin → the raw file

The cache filter keeps every write in nbdkit's own (unlinked, temporary) cache file and writes it to
the raw file only when the client flushes; a write with FUA goes through at once. So the raw file is
the disk's stable storage: killing nbdkit (SIGKILL, the VM's power cut) loses exactly what the guest
never flushed, as a real disk's volatile cache would. The error filter fails every request with EIO
while the VM's error file exists (``fail`` / ``heal``: the mirror-disk-failure fault).

Every nbdkit is recorded in the registry as a ``process`` (``name`` ``nbdkit:<vm>``, meta ``vm``,
``site``, ``socket``), so ``./inv down`` kills exactly those and ``servers(owner, site)`` finds a
site's disk servers.

nbdkit 1.32 (Debian 12) sets its parent-death signal to SIGTERM even without
``--exit-with-parent`` (measured: ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` in every run), so a server
started by ``./inv up`` would shut down as soon as that command exits (and answer every request
with ESHUTDOWN while QEMU stays connected). Each server therefore runs in the foreground under a
small ``sh`` that waits for it (recorded too, as ``nbdkit-parent:<vm>``); the server's pid comes
from its pid file, which nbdkit writes once its socket listens.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from testbed import procs
from testbed.errors import TestbedError
from testbed.paths import cache_dir
from testbed.registry import Registry, Resource

NBDKIT = "nbdkit"
PREFIX = "nbdkit:"


class DiskError(TestbedError, RuntimeError):
    """A data disk server could not be started or changed (the message says what to do)."""


@dataclass(frozen=True)
class DataDisk:
    """One VM's data disk: the raw backing file and, in ``folder``, the server's socket, error file,
    log and cache (``TMPDIR`` of nbdkit)."""

    vm: str
    site: str
    file: Path
    folder: Path

    @property
    def socket(self) -> Path:
        return self.folder / f"{self.vm}.sock"

    @property
    def fail_file(self) -> Path:
        return self.folder / f"{self.vm}.fail"

    @property
    def log(self) -> Path:
        return self.folder / f"{self.vm}-nbdkit.log"

    @property
    def pidfile(self) -> Path:
        return self.folder / f"{self.vm}-nbdkit.pid"

    @property
    def name(self) -> str:
        return f"{PREFIX}{self.vm}"


def argv(disk: DataDisk, nbdkit: str = NBDKIT) -> list[str]:
    """The server's command line. Filters are stacked in command-line order from the client down to
    the plugin: the first ``--filter`` is the one the client talks to."""
    return [nbdkit, "--foreground", "--pidfile", str(disk.pidfile), "--unix", str(disk.socket),
            "--filter=error", "--filter=cache", "file", str(disk.file), "cache=writeback",
            "error=EIO", "error-rate=100%", f"error-file={disk.fail_file}"]


PARENT = ["/bin/sh", "-c", '"$@"; exit $?', "nbdkit-parent"]
"""Runs the server as its child and waits (``exit`` after it keeps sh from exec'ing it)."""


def nbdkit_path() -> str:
    path = shutil.which(NBDKIT) or ("/usr/sbin/nbdkit" if os.path.exists("/usr/sbin/nbdkit") else None)
    if path is None:
        raise DiskError("nbdkit not found: install nbdkit (./inv installs it)")
    return path


def create_image(path: Path, size: int, fs: str = "ext4") -> None:
    """A raw sparse file of ``size`` bytes with an empty filesystem ``fs`` (ext4 or minix)."""
    from vmimages.build import ImageError, data_raw

    try:
        _cp(data_raw(cache_dir(), size, fs), path)
    except ImageError as err:
        raise DiskError(str(err)) from None


def start(disk: DataDisk, *, owner: str, registry: Registry, uid: int = 0, gid: int = 0,
          timeout: float = 10.0) -> int:
    """Start the VM's server (recorded before it serves), wait until its socket accepts a connection,
    and make the socket connectable by QEMU's user (``uid``/``gid``). Returns its pid."""
    exe = nbdkit_path()
    if not disk.file.exists():
        raise DiskError(f"{disk.vm}: data disk {disk.file} is missing; ./inv down then ./inv up")
    stop(owner, disk.vm, registry)
    disk.folder.mkdir(parents=True, exist_ok=True)
    for stale in (disk.socket, disk.pidfile):  # left behind by a killed server: nbdkit would not bind
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    cmd = argv(disk, exe)
    parent = procs.spawn([*PARENT, *cmd], owner=owner, name=f"{PARENT_PREFIX}{disk.vm}", log_path=disk.log,
                         registry=registry, env={"TMPDIR": str(disk.folder)})
    deadline = time.monotonic() + timeout
    while (pid := _read_pid(disk.pidfile)) is None or not disk.socket.exists():
        if parent.poll() is not None or time.monotonic() > deadline:
            procs.kill(parent.pid, procs.start_time(parent.pid))
            registry.remove("process", str(parent.pid))
            why = f"exited {parent.returncode}" if parent.returncode is not None else f"not ready in {timeout:.0f} s"
            raise DiskError(f"{disk.vm}: nbdkit did not serve {disk.socket} ({why}): {_tail(disk.log)}")
        time.sleep(0.01)
    registry.add("process", str(pid), owner, name=disk.name, started=procs.start_time(pid), argv=cmd,
                 vm=disk.vm, site=disk.site, socket=str(disk.socket), parent=parent.pid)
    if uid or gid:
        os.chown(disk.socket, uid, gid)
    return pid


PARENT_PREFIX = "nbdkit-parent:"


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1][:200] if lines else "no output"


def servers(owner: str, site: str | None = None, registry: Registry | None = None) -> list[Resource]:
    """The recorded disk servers of ``owner`` (a testbed), of one site when given."""
    return [r for r in (registry or Registry()).items("process", owner)
            if str(r.meta.get("name", "")).startswith(PREFIX) and (site is None or r.meta.get("site") == site)]


def server(owner: str, vm: str, registry: Registry | None = None) -> Resource | None:
    """The recorded disk server of ``vm``, or None."""
    return next((r for r in servers(owner, registry=registry) if r.meta.get("vm") == vm), None)


def pid(owner: str, vm: str, registry: Registry | None = None) -> int | None:
    """The pid of ``vm``'s running disk server, or None."""
    res = server(owner, vm, registry)
    if res is None or not procs.alive(int(res.ident), res.meta.get("started")):
        return None
    return int(res.ident)


def stop(owner: str, vm: str, registry: Registry | None = None, sig: int = signal.SIGKILL) -> bool:
    """Kill ``vm``'s recorded disk server (SIGKILL: its cache is lost, as at a power cut) and forget it.
    Returns whether one was running."""
    registry = registry or Registry()
    res = server(owner, vm, registry)
    was = False
    if res is not None:
        was = procs.alive(int(res.ident), res.meta.get("started"))
        procs.kill(int(res.ident), res.meta.get("started"), sig)
        registry.remove("process", res.ident)
    for r in registry.items("process", owner):  # its sh exits with it; make sure, and forget it
        if r.meta.get("name") == f"{PARENT_PREFIX}{vm}":
            procs.kill(int(r.ident), r.meta.get("started"), sig)
            registry.remove("process", r.ident)
    return was


def fail(disk: DataDisk) -> None:
    """Every request to the disk fails with EIO from now on."""
    disk.fail_file.touch()


def heal(disk: DataDisk) -> None:
    """Requests succeed again."""
    with contextlib.suppress(FileNotFoundError):
        disk.fail_file.unlink()


def failing(disk: DataDisk) -> bool:
    return disk.fail_file.exists()


def copy(src: Path, dst: Path) -> None:
    """Copy a disk file keeping it sparse (holes stay holes)."""
    _cp(src, dst)


def _cp(src: Path, dst: Path) -> None:
    try:
        subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as err:
        raise DiskError(f"cp {src} {dst}: {err.stderr.strip()[:200]}") from None
