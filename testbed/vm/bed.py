"""The VM testbed: a spec turned into running libvirt domains on per-site host bridges.

``up(spec)`` builds or reuses the image, creates the bridges, per VM a qcow2 overlay for the root
disk and a raw data disk served by its own nbdkit with a volatile write cache (``testbed.vm.disks``:
a power cut loses what the guest never flushed), defines and starts the domains and waits until
every guest agent answers. ``VmTestbed`` (from ``up`` or ``VmTestbed.active()``) then gives guests
(``guest(vm)``), balloon, whole-testbed snapshots and restore (libvirt's save/restore of memory
plus copies of the disk files: libvirt refuses internal snapshots of NBD disks), clones, QMP
control, disk failures and the power cut the nemesis needs.

State of a testbed lives in ``<cache>/testbeds/<name>/`` (``state.json``: a :class:`VmTestbedState`,
written only by the testbed itself, :meth:`VmTestbed.update`; overlays, data disks and
their servers' sockets in ``disks/``, QMP sockets, console logs, ``snapshots/<name>/``);
``<cache>/testbeds/active`` names the testbed the tasks act on. Every domain, disk, disk server,
socket, bridge and folder is recorded in the registry before it is created (owner
``testbed-<name>``), so ``./inv down`` removes exactly those, also after a crash.

With ``wan.enforcement = "router"`` a small extra VM ``router`` (pseudo-site ``wan``, so never one of
``site_vms(site)``) gets one NIC on each site bridge at the subnet's .253 and forwards between them;
every site VM routes the other sites' subnets through it (configured over the guest agent after
boot, again after any reboot of a VM), so site-to-site traffic crosses the router, not the host.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import libvirt

from testbed.errors import TestbedError
from testbed.paths import cache_dir
from testbed.progress import Say
from testbed.registry import Registry, Resource, Scope, register_teardown
from testbed.spec import ROUTER_SITE, RouterSpec, Spec, SpecError, VmSpec, thaw
from testbed.spec import load as load_spec
from testbed.vm import bridges, disks, hypervisor
from testbed.vm.guest import Guest
from testbed.vm.hypervisor import DomainConfig, HypervisorError
from testbed.vm.state import (
    _WAN_STATE,
    RouterLeg,
    RouterState,
    VmInfo,
    VmTestbedState,
    write_atomically,
)

if TYPE_CHECKING:  # testbed.vm.images (and the builder) is imported where up needs the image
    from vmimages.build import Image

log = logging.getLogger(__name__)

MIB = 1 << 20
QEMU_RUN_DIR = "/run/libvirt/qemu"  # libvirt keeps <domain>.pid here (qemu:///system)


class VmTestbedError(TestbedError, RuntimeError):
    """The VM testbed could not be brought up or changed (the message says what to do)."""


def testbeds_dir() -> Path:
    d = cache_dir() / "testbeds"
    d.mkdir(parents=True, exist_ok=True)
    return d


def domain_name(testbed: str, vm: str) -> str:
    return f"smfs-{testbed}-{vm}"


def _mac(testbed: str, vm: str) -> str:
    h = hashlib.sha256(f"{testbed}/{vm}".encode()).digest()
    return "52:54:00:{:02x}:{:02x}:{:02x}".format(*h[:3])


class VmTestbed:
    """A running (or defined) testbed; cheap to construct from ``state.json``."""

    __test__ = False

    def __init__(self, name: str, state: VmTestbedState) -> None:
        self.name = name
        self._state = state
        self._lock = threading.Lock()
        self.registry = Registry()

    @classmethod
    def create(cls, state: VmTestbedState, registry: Registry) -> VmTestbed:
        """The testbed of a new ``state``, written to its (existing) folder as state.json."""
        tb = cls(state.name, state)
        tb.registry = registry
        tb._write()
        return tb

    # --- state ----------------------------------------------------------------------------------

    @property
    def state(self) -> VmTestbedState:
        """What state.json holds (read-only: change it with :meth:`update`)."""
        return self._state

    def update(self, **changes: Any) -> VmTestbedState:
        """Set fields of the state by name (``tb.update(wan_bare=...)``) and write state.json atomically."""
        with self._lock:
            self._state = replace(self._state, **changes)
            self._write()
            return self._state

    def _write(self) -> None:
        write_atomically(self.dir / "state.json", json.dumps(self._state.to_json(), indent=1))

    @property
    def vms(self) -> dict[str, VmInfo]:
        """Every VM of the testbed (the router guest included) by name."""
        return {v.name: v for v in self._state.vms}

    # --- lookup -------------------------------------------------------------------------------

    @property
    def dir(self) -> Path:
        return testbeds_dir() / self.name

    @property
    def owner(self) -> str:
        return f"testbed-{self.name}"

    @property
    def accel(self) -> str:
        return self.state.accel

    @property
    def spec(self) -> Spec:
        from testbed.spec import from_mapping

        return from_mapping(self.state.spec, path=self.state.spec_path, default_name=self.name)

    @classmethod
    def load(cls, name: str) -> VmTestbed:
        path = testbeds_dir() / name / "state.json"
        if not path.exists():
            raise VmTestbedError(f"no testbed named {name!r} is up; start one with ./inv up --spec specs/ci.toml")
        return cls(name, VmTestbedState.from_json(json.loads(path.read_text()), name))

    @classmethod
    def active(cls) -> VmTestbed:
        marker = testbeds_dir() / "active"
        if not marker.exists():
            raise VmTestbedError("no testbed is up; start one with ./inv up --spec specs/ci.toml")
        return cls.load(marker.read_text().strip())

    def info(self, vm: str) -> VmInfo:
        try:
            return self.vms[vm]
        except KeyError:
            raise VmTestbedError(f"no VM named {vm!r} in testbed {self.name!r}; VMs: {', '.join(self.vms)}") from None

    def domain(self, vm: str) -> libvirt.virDomain:
        info = self.info(vm)
        dom = hypervisor.lookup(hypervisor.connect(info.uri), info.domain)
        if dom is None:
            raise VmTestbedError(f"domain {info.domain} is gone; ./inv down then ./inv up")
        return dom

    def guest(self, vm: str) -> Guest:
        return Guest(self.domain(vm), vm)

    def guests(self) -> dict[str, Guest]:
        return {vm: self.guest(vm) for vm in self.vms}

    def site_vms(self, site: str) -> list[str]:
        """The VMs of ``site`` (the router guest belongs to no site)."""
        return [v.name for v in self.vms.values() if v.site == site]

    @property
    def router(self) -> str | None:
        """The WAN router guest's VM name, or None when this testbed has none."""
        return self.state.router.vm if self.state.router else None

    def qmp(self, vm: str) -> Any:
        from testbed.vm.qmp import Qmp

        return Qmp(self.info(vm).qmp, name=vm)

    # --- status -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Per VM: state, accel, address, memory (MiB), agent; per site: the bridge."""
        out: dict[str, Any] = {"testbed": self.name, "accel": self.accel, "accel_reason": self.state.accel_reason,
                               "image": self.state.image, "vms": [], "bridges": [],
                               "snapshots": list(self.state.snapshots)}
        for info in self.vms.values():
            row: dict[str, Any] = {"vm": info.name, "site": info.site, "domain": info.domain, "address": info.address,
                                   "console": info.console, "boot_seconds": info.boot_seconds,
                                   "disk_server": self.disk_server(info.name)}
            if self.state.router and info.name == self.state.router.vm:
                row["address"] = ", ".join(leg.address for leg in self.state.router.legs.values())
            try:
                dom = self.domain(info.name)
                state, _ = dom.state()
                row["state"] = _STATES.get(state, str(state))
                row["max_memory_mib"] = dom.maxMemory() // 1024
                if dom.isActive():
                    stats = dom.memoryStats()
                    row["memory_mib"] = stats.get("actual", 0) // 1024
                    row["memstat"] = stats
                    row["agent"] = Guest(dom, info.name).ping() if state == libvirt.VIR_DOMAIN_RUNNING else False
            except (VmTestbedError, libvirt.libvirtError) as err:
                row["state"] = f"missing ({err})"
            out["vms"].append(row)
        if self.state.router:
            out["router"] = self.state.router.to_json()
        for site in sorted({v.site for v in self.vms.values()} - {ROUTER_SITE}):
            out["bridges"].append(bridges.bridge_state(f"smfs-{site}") or {"name": f"smfs-{site}", "state": "missing"})
        return out

    # --- balloon ------------------------------------------------------------------------------

    def balloon(self, vm: str, mib: int, timeout: float = 30) -> dict[str, Any]:
        """Set the VM's memory live and wait until the balloon and the guest reach it.

        Returns {'target_mib', 'actual_mib', 'guest_total_mib', 'kernel_reserved_mib', 'seconds', 'memstat'}.
        """
        dom = self.domain(vm)
        maxm = dom.maxMemory() // 1024
        if not 64 <= mib <= maxm:
            raise VmTestbedError(f"balloon {vm}: {mib} MiB is outside 64-{maxm} MiB (max_memory in the spec); pick a value in range")
        guest = Guest(dom, vm)
        t0 = time.monotonic()
        before = guest.meminfo_mib()
        # The guest kernel reserves some memory at boot (memmap, kernel image, crash area) that
        # MemTotal never shows; it is the gap between the balloon and MemTotal before the change.
        reserved = max(0, dom.memoryStats().get("actual", 0) // 1024 - before)
        dom.setMemoryFlags(mib * 1024, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        last = -1
        while True:
            actual = dom.memoryStats().get("actual", 0) // 1024
            total = guest.meminfo_mib()
            if abs(actual - mib) <= 1 and total == last and (total != before or abs(actual - mib) <= 1):
                break
            last = total
            if time.monotonic() - t0 > timeout:
                raise VmTestbedError(f"balloon {vm}: guest still at {total} MiB (balloon {actual} MiB) after {timeout:.0f} s; "
                                   "is virtio_balloon loaded in the guest?")
            time.sleep(0.2)
        return {"vm": vm, "target_mib": mib, "actual_mib": actual, "guest_total_mib": total,
                "kernel_reserved_mib": reserved, "seconds": round(time.monotonic() - t0, 2), "memstat": dom.memoryStats()}

    # --- power ---------------------------------------------------------------------------------

    def destroy(self, vm: str) -> float:
        """Power cut: the VM's QEMU and its data disk server are killed (SIGKILL: no shutdown, no flush;
        what the disk had not written back is lost); returns seconds taken."""
        import signal

        t0 = time.monotonic()
        dom = self.domain(vm)
        if dom.isActive():
            try:
                pid: int | None = self.qemu_pid(vm)
            except VmTestbedError:
                pid = None
            if pid is not None:  # libvirt's destroy sends SIGTERM first, on which QEMU flushes its disks
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            else:
                self.kill_disk(vm)
            self._reap(vm)
        self.kill_disk(vm)
        return time.monotonic() - t0

    def power_cut(self, site: str) -> dict[str, float]:
        """Destroy every VM of ``site``; returns seconds per VM."""
        return {vm: self.destroy(vm) for vm in self.site_vms(site)}

    def qemu_pid(self, vm: str) -> int:
        """The pid of the running QEMU of ``vm`` (libvirt's pid file, checked against its command line)."""
        info = self.info(vm)
        try:
            pid = int(Path(f"{QEMU_RUN_DIR}/{info.domain}.pid").read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError) as err:
            raise VmTestbedError(f"{vm}: no running QEMU found ({err}); is the VM running?") from None
        if f"guest={info.domain}".encode() not in cmdline:
            raise VmTestbedError(f"{vm}: pid {pid} from libvirt's pid file is not {info.domain}'s QEMU")
        return pid

    def disaster(self, site: str) -> dict[str, Any]:
        """The site's disaster as one instant: every QEMU of the site and every data disk server of
        its VMs are stopped at once (SIGSTOP: no vCPU runs, no packet or ledger line leaves, and no
        disk flush happens, unlike QMP ``stop``, which flushes every disk cache), then its host taps
        are taken down, then QEMUs and disk servers are killed (SIGKILL, then libvirt's destroy): what
        a disk had not written back is lost. Returns ``t_instant`` (host ``time.time()`` once all are
        stopped), ``freeze_s`` (SIGSTOP of the first to the last), ``pids`` (QEMUs),
        ``disk_servers`` (nbdkit pids), ``taps`` and per VM ``destroy_s``."""
        import signal

        from testbed.vm import wan

        vms = self.site_vms(site)
        pids = {vm: self.qemu_pid(vm) for vm in vms if self.domain(vm).isActive()}
        servers = {vm: pid for vm in vms if (pid := self.disk_server(vm)) is not None}
        t0 = time.time()
        for vm in vms:
            for pid in (pids.get(vm), servers.get(vm)):
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGSTOP)
        t_instant = time.time()
        taps = {}
        for vm in pids:
            tap = wan.tap_of(self, vm)
            if tap:
                bridges.link_down(tap)
                taps[vm] = tap
        destroy_s = {}
        for vm in vms:
            t1 = time.monotonic()
            for pid in (pids.get(vm), servers.get(vm)):
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            if vm in pids:
                self._reap(vm)
            self.kill_disk(vm)
            if vm in pids or vm in servers:
                destroy_s[vm] = round(time.monotonic() - t1, 3)
        return {"t_instant": t_instant, "freeze_s": round(t_instant - t0, 6), "pids": pids,
                "disk_servers": servers, "taps": taps, "destroy_s": destroy_s}

    def _reap(self, vm: str, timeout: float = 15.0) -> None:
        """Wait until libvirt sees ``vm``'s killed QEMU gone (destroying what remains)."""
        dom = self.domain(vm)
        deadline = time.monotonic() + timeout
        while dom.isActive():
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()
            if time.monotonic() > deadline:
                raise VmTestbedError(f"{vm}: still running {timeout:.0f} s after SIGKILL of its QEMU")
            time.sleep(0.05)

    def start(self, vm: str, timeout: float | None = None) -> float:
        """Boot a destroyed VM again: its data disk server first, on the same file (so its disks are
        what survived: the root overlay, and of the data disk what was flushed); seconds to agent-ready."""
        dom = self.domain(vm)
        t0 = time.monotonic()
        if not dom.isActive():
            self.start_disk(vm)
            dom.create()
        Guest(dom, vm).wait_ready(timeout or self.state.boot_timeout)
        if self.router:  # a fresh boot forgot what the agent configured: the router's NICs, the site routes
            if vm == self.router:
                _configure_router(self)
            else:
                _route_via_router(self, vm)
        from testbed.vm import wan

        try:  # and its part of the WAN's shaping
            wan.after_boot(self, vm)
        except wan.WanError as err:
            raise VmTestbedError(f"{vm} booted again but its part of the WAN is not shaped: {err}") from None
        return time.monotonic() - t0

    def set_link(self, vm: str, up: bool) -> None:
        """Cut or restore the VM's NIC through libvirt (libvirt keeps track of the link state)."""
        if vm == self.router:
            raise VmTestbedError(f"{vm}: the WAN router has a NIC per site; cut a site's link instead (LinkCut)")
        dom = self.domain(vm)
        info = self.info(vm)
        xml = (f"<interface type='bridge'><mac address='{info.mac}'/><source bridge='smfs-{info.site}'/>"
               f"<model type='virtio'/><mtu size='{self.spec.mtu}'/><link state='{'up' if up else 'down'}'/></interface>")
        dom.updateDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)

    # --- data disks ---------------------------------------------------------------------------

    def data_disk(self, vm: str) -> disks.DataDisk:
        """The VM's data disk: its raw file and its nbdkit's socket, error file and log."""
        info = self.info(vm)
        if not info.data_socket:
            raise VmTestbedError(f"{vm}: testbed {self.name!r} predates NBD data disks; ./inv down then ./inv up")
        return disks.DataDisk(vm=vm, site=info.site, file=Path(info.data), folder=Path(info.data_socket).parent)

    def start_disk(self, vm: str) -> int:
        """(Re)start the VM's data disk server on its file (a running one is killed first); its pid."""
        uid, gid = (0, 0) if self.state.run_as_root else hypervisor.qemu_user()[:2]
        return disks.start(self.data_disk(vm), owner=self.owner, registry=self.registry, uid=uid, gid=gid)

    def kill_disk(self, vm: str) -> bool:
        """SIGKILL the VM's data disk server (its unwritten cache is lost); whether one ran."""
        return disks.stop(self.owner, vm, self.registry)

    def disk_server(self, vm: str) -> int | None:
        """The pid of the VM's running data disk server (nbdkit), or None."""
        return disks.pid(self.owner, vm, self.registry)

    def disk_servers(self, site: str) -> dict[str, int]:
        """Per VM of ``site`` the pid of its running data disk server."""
        return {vm: pid for vm in self.site_vms(site) if (pid := self.disk_server(vm)) is not None}

    def fail_disk(self, vm: str) -> None:
        """The VM's data disk (/data) starts failing every read and write with EIO (nbdkit's error
        filter, while the VM's error file exists)."""
        disks.fail(self.data_disk(vm))

    def heal_disk(self, vm: str) -> str:
        """Requests to the data disk succeed again. When the errors left the guest's /data unwritable
        (ext4 aborted its journal and went read-only), the VM is power-cycled, which mounts it again
        (the root overlay and the flushed part of the data disk survive). Returns "healed" or "rebooted"."""
        disks.heal(self.data_disk(vm))
        probe = "echo probe > /data/.probe && sync /data/.probe && rm -f /data/.probe"
        try:
            ok = self.guest(vm).exec(["/bin/sh", "-c", probe], timeout=30).rc == 0
        except Exception as err:  # noqa: BLE001 - an unanswering guest is power-cycled too
            log.info("%s: /data probe failed (%s)", vm, err)
            ok = False
        if ok:
            return "healed"
        log.info("%s: /data is not writable after the disk healed; power-cycling", vm)
        self.destroy(vm)
        self.start(vm)
        return "rebooted"

    # --- snapshots ----------------------------------------------------------------------------

    def snapshot_dir(self, name: str) -> Path:
        """``<testbed>/snapshots/<name>/``: per VM ``<vm>.save`` (libvirt's memory image), copies of the
        root overlay and of the data disk's file, and ``<vm>.xml`` when the snapshot came from a clone."""
        return self.dir / "snapshots" / name

    def snapshot(self, name: str, say: Say = print, resume: bool = True) -> float:
        """Snapshot every VM together: all are paused (QMP ``stop``, which flushes every disk: the
        data disks' caches are written back), each one's memory is saved to a file with libvirt (the
        domain stops), then its root overlay and data disk file are copied beside it. With ``resume``
        the VMs are then restored from those files and resumed together; without it they stay shut
        off (for a caller that restores at once).

        Returns seconds from the pause to the resume (or to the end, without ``resume``)."""
        _check_snap_name(name)
        doms = {vm: self.domain(vm) for vm in self.vms}
        for vm, dom in doms.items():
            if not dom.isActive():
                raise VmTestbedError(f"snapshot {name}: {vm} is not running; restore or start it first")
        if name in self.state.snapshots:
            raise VmTestbedError(f"snapshot {name!r} already exists; pick another name or ./inv restore {name}")
        folder = self.snapshot_dir(name)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        t0 = time.monotonic()
        saved: list[str] = []
        try:
            for dom in doms.values():
                if dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING:
                    dom.suspend()

            def save(vm: str) -> str:
                doms[vm].saveFlags(str(tmp / f"{vm}.save"), None, libvirt.VIR_DOMAIN_SAVE_PAUSED)
                saved.append(vm)
                info = self.info(vm)
                for disk in (info.root, info.data):
                    disks.copy(Path(disk), tmp / Path(disk).name)
                return vm

            with ThreadPoolExecutor(max_workers=len(doms)) as pool:
                for vm in pool.map(save, list(doms)):
                    say(f"  {vm}: memory saved, disks copied")
            shutil.rmtree(folder, ignore_errors=True)  # left by a crash before it was recorded
            tmp.rename(folder)
        except BaseException:
            try:
                if saved:  # those VMs stopped: bring them back from what was saved
                    self._restore_from(tmp, saved, say, copy_disks=False)
                for dom in doms.values():
                    if dom.isActive() and dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                        dom.resume()
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if resume:
            self._restore_from(folder, list(doms), say, copy_disks=False)
            self._resume_all(say)
        secs = time.monotonic() - t0
        self.update(snapshots=(*(s for s in self.state.snapshots if s != name), name),
                    snapshot_wan={**(self.state.snapshot_wan or {}), name: self.state.wan_state()})
        return secs

    def restore(self, name: str, say: Say = print) -> float:
        """Bring every VM back to snapshot ``name``: running VMs and their disk servers are killed, the
        disk files copied back from the snapshot, the disk servers started on them, every VM restored
        from its memory image (paused, in parallel), then all resumed together and guest clocks set.

        Returns seconds until every guest agent answers."""
        folder = self.snapshot_dir(name)
        for vm in self.vms:
            if name not in self.state.snapshots or not (folder / f"{vm}.save").exists():
                have = ", ".join(self.state.snapshots) or "none"
                raise VmTestbedError(f"no snapshot {name!r} of {vm}; snapshots: {have} (take one with ./inv snapshot NAME)")
        t0 = time.monotonic()
        self._restore_from(folder, list(self.vms), say, copy_disks=True)
        self._resume_all(say)
        # The WAN's shaping lives in the guests' (or the router's) memory, so it is back as it was at the
        # snapshot: so must be what the testbed says it is (./inv calibrate and shape build on it).
        wan_then = (self.state.snapshot_wan or {}).get(name, {})
        self.update(**{key: value for key, value in wan_then.items() if key in _WAN_STATE})
        return time.monotonic() - t0

    def _restore_from(self, folder: Path, vms: list[str], say: Say, copy_disks: bool) -> None:
        """Restore ``vms`` from the memory images in ``folder`` (paused). With ``copy_disks`` each VM
        is killed first and its disk files are copied back from ``folder``; its disk server is
        (re)started on the data file either way unless one is running (the snapshot case)."""
        def one(vm: str) -> str:
            info = self.info(vm)
            if copy_disks:
                self.destroy(vm)
                disks.heal(self.data_disk(vm))  # a disk failure of before the restore is over
                for disk in (info.root, info.data):
                    disks.copy(folder / Path(disk).name, Path(disk))
            if copy_disks or self.disk_server(vm) is None:
                self.start_disk(vm)
            xml_file = folder / f"{vm}.xml"  # a clone's: its own domain in place of the one saved
            dxml = xml_file.read_text() if xml_file.exists() else None
            try:
                hypervisor.connect(info.uri).restoreFlags(str(folder / f"{vm}.save"), dxml,
                                                          libvirt.VIR_DOMAIN_SAVE_PAUSED)
            except libvirt.libvirtError as err:
                raise VmTestbedError(f"{vm}: libvirt cannot restore {folder / f'{vm}.save'}: "
                                   f"{err.get_error_message()}") from None
            return vm

        with ThreadPoolExecutor(max_workers=max(1, len(vms))) as pool:
            for vm in pool.map(one, vms):
                say(f"  {vm}: restored from {folder.name} (paused)")

    def _resume_all(self, say: Say) -> None:
        """Resume every paused VM together, wait for their agents and set their clocks to the host's."""
        doms = {vm: self.domain(vm) for vm in self.vms}
        for dom in doms.values():
            if dom.isActive() and dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()

        def ready(vm: str) -> None:  # setting the clock takes the agent about a second under TCG
            Guest(doms[vm], vm).wait_ready(60)
            _sync_clock(doms[vm])

        with ThreadPoolExecutor(max_workers=len(doms)) as pool:
            list(pool.map(ready, list(doms)))

    # --- clone --------------------------------------------------------------------------------

    def clone(self, snapshot: str, new: str, say: Say = print) -> Path:
        """Copy the testbed at ``snapshot`` to ``<cache>/clones/<new>/`` (the snapshot's memory images
        and disk files, the spec, the VMs' MACs, domain names and UUIDs: libvirt restores a memory image
        only into a domain of the same name, UUID and NICs, so a clone's domains keep them; it comes up
        when the testbed it was made from is down).
        ``up(..., clone=new)`` brings up a testbed from it. Returns the clone folder."""
        _check_snap_name(new)
        dest = cache_dir() / "clones" / new
        if dest.exists():
            raise VmTestbedError(f"clone {new!r} exists at {dest}; pick another name or delete that folder")
        src = self.snapshot_dir(snapshot)
        if snapshot not in self.state.snapshots or not src.is_dir():
            raise VmTestbedError(f"no snapshot {snapshot!r} of {next(iter(self.vms))}; take one with ./inv snapshot {snapshot}")
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        _run(["cp", "-r", "--sparse=always", str(src), str(tmp)])
        for xml in tmp.glob("*.xml"):  # a clone of a clone: its domains' XML is the new up's business
            xml.unlink()
        say(f"  {', '.join(self.vms)}: memory images and disks copied")
        router = self.state.router
        meta = {"from": self.name, "snapshot": snapshot, "spec": self.state.spec, "spec_path": self.state.spec_path,
                "image": self.state.image, "wan": (self.state.snapshot_wan or {}).get(snapshot),
                "macs": {vm: info.mac for vm, info in self.vms.items()},
                "domains": {vm: info.domain for vm, info in self.vms.items()},
                "uuids": {vm: self.domain(vm).UUIDString() for vm in self.vms},
                "router_macs": {site: leg.mac for site, leg in router.legs.items()} if router else {},
                "t": time.time()}
        (tmp / "clone.json").write_text(json.dumps(meta, indent=1))
        tmp.rename(dest)
        return dest


_STATES = {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_PAUSED: "paused",
           libvirt.VIR_DOMAIN_SHUTOFF: "shut off", libvirt.VIR_DOMAIN_CRASHED: "crashed",
           libvirt.VIR_DOMAIN_BLOCKED: "blocked", libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
           libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended"}


"""The testbed state keys that describe the WAN's realised shape; kept per snapshot, put back by restore."""


def _check_snap_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or len(name) > 40:
        raise VmTestbedError(f"name {name!r}: use up to 40 letters, digits, '-', '_' or '.'")


def _find_snapshot(dom: libvirt.virDomain, name: str) -> libvirt.virDomainSnapshot | None:
    try:
        return dom.snapshotLookupByName(name)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
            return None
        raise


def _sync_clock(dom: libvirt.virDomain) -> None:
    """After a revert the guest clock is the snapshot's; set it to the host's now."""
    now = time.time()
    try:
        dom.setTime({"seconds": int(now), "nseconds": int((now % 1) * 1e9)}, 0)
    except libvirt.libvirtError as err:
        log.warning("%s: cannot set the guest clock: %s", dom.name(), err.get_error_message())


def _run(cmd: list[str]) -> None:
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as err:
        raise VmTestbedError(f"{' '.join(cmd[:2])}: {err.stderr.strip()[:200]}") from None


def _qemu_img_overlay(base: Path, out: Path) -> None:
    _run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(out)])


# --- up ----------------------------------------------------------------------------------------


def up(spec: Spec | str | Path, say: Say = print, rebuild_image: bool = False, clone: str | None = None) -> VmTestbed:
    """Bring up the testbed of ``spec`` (or of clone ``clone``, at the clone's snapshot).

    First every check that creates nothing (:func:`_plan`), then the steps that create the testbed,
    in order. On any failure or Ctrl-C, everything created so far is torn down before the error propagates.
    """
    plan = _plan(spec, say, rebuild_image, clone)
    registry = Registry()
    try:
        _make_folders(plan, registry, say)
        _make_bridges(plan, registry, say)
        vms = _make_disks(plan, registry)
        tb = VmTestbed.create(_initial_state(plan, vms), registry)
        started = _define_and_start(plan, tb, say)
        if plan.clone_dir is not None:
            _restore_clone(plan, tb, say)
        else:
            _wait_agents(tb, started, plan.spec.boot_timeout, say)
        if plan.router:
            _start_router(plan, tb, say)
        return tb
    except BaseException:
        say("up failed; tearing down what was created")
        try:
            registry.teardown(owner=plan.owner)
        except Exception as err:  # noqa: BLE001 - the original error matters more
            say(f"teardown after the failure also failed: {err}")
        raise


@dataclass(frozen=True)
class _Plan:
    """What ``up`` decided before creating anything: the spec, the clone it comes from, the image,
    the accelerator, the domains' names and where the testbed's files go."""

    spec: Spec
    router: RouterSpec | None
    all_vms: list[VmSpec]  # the spec's VMs, then the router guest's
    names: dict[str, str]  # VM -> libvirt domain name
    clone: str | None
    clone_dir: Path | None
    meta: dict[str, Any]  # the clone's clone.json ({} without a clone)
    image: Image
    accel: hypervisor.Accel
    conns: dict[str, libvirt.virConnect]
    tb_dir: Path
    marker: Path
    uid: int
    gid: int
    run_as_root: bool

    @property
    def owner(self) -> str:
        return f"testbed-{self.spec.name}"


def _plan(spec: Spec | str | Path, say: Say, rebuild_image: bool, clone: str | None) -> _Plan:
    """Every check and choice of ``up`` that creates nothing of the testbed (the image may be built)."""
    spec, clone_dir, meta = _resolve_spec(spec, clone)
    from testbed.vm.wan import router_for

    router = router_for(spec)
    marker = _preflight(spec)
    image = _image(rebuild_image, meta if clone_dir is not None else None, say)
    conns, accel = _accelerator(spec, image, say)
    all_vms = [*spec.vms, *([router.vm] if router else [])]
    names = _domain_names(spec, router, all_vms, meta, conns)
    uid, gid, run_as_root = _qemu_user(say)
    return _Plan(spec=spec, router=router, all_vms=all_vms, names=names, clone=clone, clone_dir=clone_dir, meta=meta,
                 image=image, accel=accel, conns=conns, tb_dir=testbeds_dir() / spec.name, marker=marker,
                 uid=uid, gid=gid, run_as_root=run_as_root)


def _resolve_spec(spec: Spec | str | Path, clone: str | None) -> tuple[Spec, Path | None, dict[str, Any]]:
    """(spec, clone folder, clone.json): a clone's spec is the one it was made from, renamed to the clone."""
    if clone is None:
        return (spec if isinstance(spec, Spec) else load_spec(spec)), None, {}
    clone_dir = cache_dir() / "clones" / clone
    if not (clone_dir / "clone.json").exists():
        raise VmTestbedError(f"no clone named {clone!r} in {clone_dir.parent}; make one with ./inv clone SNAP --as NAME")
    meta = json.loads((clone_dir / "clone.json").read_text())
    from testbed.spec import from_mapping

    spec = from_mapping(meta["spec"], path=meta["spec_path"], default_name=clone)
    return _renamed(spec, clone), clone_dir, meta


def _preflight(spec: Spec) -> Path:
    """Local sites only, no testbed up, nothing of this one still recorded; returns the active marker's path."""
    for site in spec.sites:
        if site.uri not in hypervisor.LOCAL_URIS:
            raise SpecError(f"sites ({site.name}).uri: {site.uri} — only local sites (qemu:///system) are "
                            "supported so far; use qemu:///system")
    marker = testbeds_dir() / "active"
    if marker.exists():
        raise VmTestbedError(f"testbed {marker.read_text().strip()!r} is up; ./inv down first (one testbed at a time)")
    if Registry().items(owner=f"testbed-{spec.name}"):
        raise VmTestbedError(f"resources of testbed {spec.name!r} are still recorded; run ./inv down first")
    return marker


def _image(rebuild: bool, clone_meta: dict[str, Any] | None, say: Say) -> Image:
    """The guest image (built when missing or ``rebuild``); ``clone_meta``: the clone's clone.json, if any."""
    from testbed.vm.images import ensure_image

    image = ensure_image(rebuild=rebuild, progress=say)
    built = f"built in {image.seconds:.0f} s" if image.built else "cached"
    say(f"image {image.key} ({built})")
    if clone_meta is not None and clone_meta["image"] != image.key:
        say("note: the clone was made from another image; its overlays still name their own base")
    disks.nbdkit_path()  # before anything is created: "install nbdkit" is the whole message
    return image


def _accelerator(spec: Spec, image: Image, say: Say) -> tuple[dict[str, libvirt.virConnect], hypervisor.Accel]:
    """A libvirt connection per site URI, and the accelerator the guests run with (KVM or TCG)."""
    conns = {s.uri: hypervisor.connect(s.uri, say) for s in spec.sites}
    accel = hypervisor.detect_accel(image.kernel, spec.accel)
    say(f"accelerator: {accel.name} ({accel.reason})")
    return conns, accel


def _domain_names(spec: Spec, router: RouterSpec | None, all_vms: list[VmSpec], meta: dict[str, Any],
                  conns: dict[str, libvirt.virConnect]) -> dict[str, str]:  # fmt: skip
    """VM -> domain name, each checked free in libvirt."""
    # a clone's domains keep the names and UUIDs of the testbed it was made from: libvirt restores a
    # memory image only into a domain of the same name and UUID
    names = {vm.name: meta.get("domains", {}).get(vm.name) or domain_name(spec.name, vm.name) for vm in all_vms}
    for vm in all_vms:
        uri = router.uri if router and vm is router.vm else spec.site_of(vm.name).uri
        if hypervisor.lookup(conns[uri], names[vm.name]) is not None:
            raise VmTestbedError(f"domain {names[vm.name]} exists but is not recorded by smfs-testbed; "
                               "remove it with virsh undefine, or rename the spec")
    return names


def _qemu_user(say: Say) -> tuple[int, int, bool]:
    """(uid, gid, run_as_root): QEMU runs as its own user unless that user cannot reach the cache."""
    uid, gid, qemu_name = hypervisor.qemu_user()
    run_as_root = not hypervisor.reachable_by(cache_dir(), uid, gid)
    if run_as_root:
        say(f"note: {cache_dir()} is not reachable by the QEMU user {qemu_name}; QEMU runs as root "
            "(set SMFS_TESTBED_CACHE to a world-traversable folder to avoid it)")
    return uid, gid, run_as_root


def _make_folders(plan: _Plan, registry: Registry, say: Say) -> None:
    """The testbed's folder (fresh), its qmp/ and disks/, KVM access, and the active marker."""
    owner, tb_dir = plan.owner, plan.tb_dir
    registry.add("dir", str(tb_dir), owner)
    hypervisor.ensure_kvm_access(owner, registry, say)
    registry.add("marker", str(plan.marker), owner)
    shutil.rmtree(tb_dir, ignore_errors=True)
    (tb_dir / "qmp").mkdir(parents=True)
    (tb_dir / "disks").mkdir()
    if not plan.run_as_root:
        os.chown(tb_dir / "qmp", plan.uid, plan.gid)
    plan.marker.write_text(plan.spec.name)


def _make_bridges(plan: _Plan, registry: Registry, say: Say) -> None:
    """A host bridge per site, forwarding between them scoped to them."""
    spec = plan.spec
    for site in spec.sites:
        bridges.ensure_bridge(site, plan.owner, registry, mtu=spec.mtu)
    bridges.scope_forwarding([s.bridge for s in spec.sites], plan.owner, registry)  # filter, then ip_forward
    say(f"bridges: {', '.join(f'{s.bridge} {s.gateway}' for s in spec.sites)}")


def _make_disks(plan: _Plan, registry: Registry) -> list[VmInfo]:
    """Per VM its VmInfo, a qcow2 overlay of the image for the root disk and the raw data disk (a
    clone's disks come from its snapshot instead, at restore)."""
    spec, tb_dir, router = plan.spec, plan.tb_dir, plan.router
    vms: list[VmInfo] = []
    for vm in plan.all_vms:
        if router and vm is router.vm:  # eth0 from the command line; no default route, no ledger
            site_name, uri, gateway, ledger = ROUTER_SITE, router.uri, "", ""
        else:
            site = spec.site_of(vm.name)
            site_name, uri, gateway = site.name, site.uri, str(site.gateway.ip)
            ledger = str(tb_dir / "qmp" / f"{vm.name}-ledger.sock")
        mac = plan.meta.get("macs", {}).get(vm.name) or _mac(spec.name, vm.name)  # a clone keeps its NICs
        info = VmInfo(name=vm.name, site=site_name, domain=plan.names[vm.name], uri=uri,
                      address=str(vm.address), gateway=gateway, mac=mac,
                      root=str(tb_dir / f"{vm.name}-root.qcow2"), data=str(tb_dir / f"{vm.name}-data.raw"),
                      qmp=str(tb_dir / "qmp" / f"{vm.name}.sock"), console=str(tb_dir / f"{vm.name}-console.log"),
                      ledger=ledger, data_socket=str(tb_dir / "disks" / f"{vm.name}.sock"))
        registry.add("overlay", info.root, plan.owner, image=plan.image.key)
        registry.add("overlay", info.data, plan.owner, image=plan.image.key)
        if plan.clone_dir is None:  # a clone's disks come from its snapshot, at restore
            _qemu_img_overlay(plan.image.base, Path(info.root))
            disks.create_image(Path(info.data), vm.data_disk, getattr(spec, "data_fs", "ext4"))
        vms.append(info)
    return vms


def _initial_state(plan: _Plan, vms: list[VmInfo]) -> VmTestbedState:
    """The new testbed's state.json (a clone's router keeps the MACs of the one it was made from)."""
    spec = plan.spec
    router = None
    if plan.router:
        router = _router_state(spec.name, plan.router).with_legs(mac=plan.meta.get("router_macs", {}))
    return VmTestbedState(name=spec.name, spec=thaw(spec.raw), spec_path=spec.path, image=plan.image.key,
                          accel=plan.accel.name, accel_reason=plan.accel.reason, boot_timeout=spec.boot_timeout,
                          run_as_root=plan.run_as_root, vms=tuple(vms), t_up=time.time(), router=router)


def _define_and_start(plan: _Plan, tb: VmTestbed, say: Say) -> dict[str, float]:
    """Define every domain; start each one with its data disk server, or for a clone put its snapshot
    in place (restored later). Returns when each VM was started (``time.monotonic()``)."""
    started: dict[str, float] = {}
    for vm, info in zip(plan.all_vms, tb.state.vms, strict=True):
        conn = plan.conns[info.uri]
        nics = _router_nics(tb.state.router) if info.site == ROUTER_SITE and tb.state.router else None
        config = _config(vm, info, plan.accel.domain_type, plan.image, plan.run_as_root, plan.spec.mtu, nics,
                         tb.registry.scope.id)
        if plan.meta.get("uuids", {}).get(vm.name):  # a memory image restores only into its own domain's UUID
            config = replace(config, uuid=plan.meta["uuids"][vm.name])
            _check_uuid_free(conn, config.uuid, plan.clone or "")
        tb.registry.add("domain", info.domain, plan.owner, uri=info.uri)
        tb.registry.add("qmp", info.qmp, plan.owner)
        if info.ledger:
            tb.registry.add("qmp", info.ledger, plan.owner)
        dom = conn.defineXML(hypervisor.domain_xml(config))
        if plan.clone_dir is None:
            say(f"starting {vm.name} ({vm.vcpus} vCPU, {vm.memory_mib}/{vm.max_memory_mib} MiB, {info.address})")
            tb.start_disk(vm.name)
            started[vm.name] = time.monotonic()
            dom.create()
        else:  # the memory image names the original's domain: restore it as this one
            _clone_snapshot(tb, plan.clone_dir, plan.meta["snapshot"], vm.name, replace(config, uuid=dom.UUIDString()))
    return started


def _restore_clone(plan: _Plan, tb: VmTestbed, say: Say) -> None:
    """Record the clone's snapshot (and the WAN's shape at it) and restore every VM from it."""
    snap = plan.meta["snapshot"]
    wan = plan.meta.get("wan")
    tb.update(snapshots=(snap,), snapshot_wan={snap: wan} if wan is not None else tb.state.snapshot_wan)
    say(f"restoring clone {plan.clone} at snapshot {snap}")
    tb.restore(snap, say)


def _start_router(plan: _Plan, tb: VmTestbed, say: Say) -> None:
    """Address the router's NICs, turn on its forwarding, and route every site VM through it."""
    _configure_router(tb)
    for vm in plan.spec.vms:
        _route_via_router(tb, vm.name)
    assert tb.state.router is not None
    legs = ", ".join("{ifname} {address} ({site})".format(site=site, **asdict(leg))
                     for site, leg in tb.state.router.legs.items())
    say(f"router: {legs}; the sites route each other through it")


def _renamed(spec: Spec, name: str) -> Spec:
    return replace(spec, name=name)


def _config(vm: VmSpec, info: VmInfo, domain_type: str, image: Any, run_as_root: bool,
            mtu: int = 1500, nics: tuple[tuple[str, str], ...] | None = None, testbed_id: str = "") -> DomainConfig:
    """``nics``: (bridge, mac) of every NIC (the router's); default one on the VM's site bridge.
    ``testbed_id`` goes into the domain's <metadata>: teardown touches only domains that carry it."""
    (bridge, mac), *extra = nics or ((f"smfs-{info.site}", info.mac),)
    gw = f"smfs_gw={info.gateway} " if info.gateway else ""
    cmdline = f"console=ttyS0 root=/dev/vda rw quiet mitigations=off smfs_ip={info.address} {gw}smfs_host={vm.name}"
    return DomainConfig(
        name=info.domain, domain_type=domain_type, vcpus=vm.vcpus, memory_mib=vm.memory_mib,
        max_memory_mib=vm.max_memory_mib, kernel=image.kernel, initrd=image.initrd, cmdline=cmdline,
        root_disk=Path(info.root), data_socket=Path(info.data_socket) if info.data_socket else None,
        bridge=bridge, mac=mac,
        qmp_socket=Path(info.qmp), console_log=Path(info.console), run_as_root=run_as_root,
        ledger_socket=Path(info.ledger) if info.ledger else None, mtu=mtu, extra_nics=tuple(extra),
        testbed_id=testbed_id,
    )


# --- the WAN router guest ----------------------------------------------------------------------


def _router_state(testbed: str, router: RouterSpec) -> RouterState:
    """What state.json keeps of the router: per site its leg (bridge, address, MAC; ``ifname`` once
    the guest has been asked) and the routes each site's VMs take through it."""
    legs = {leg.site: RouterLeg(bridge=leg.bridge, address=str(leg.address),
                                mac=_mac(testbed, router.vm.name if i == 0 else f"{router.vm.name}/{leg.site}"))
            for i, leg in enumerate(router.legs)}  # fmt: skip
    return RouterState(vm=router.vm.name, legs=legs, routes=site_routes(router))


def site_routes(router: RouterSpec) -> dict[str, list[list[str]]]:
    """Per site, ``[subnet, via]`` for every other site: via the router's leg on the site's own bridge."""
    return {leg.site: [[str(other.address.network), str(leg.address.ip)] for other in router.legs if other is not leg]
            for leg in router.legs}  # fmt: skip


def _router_nics(router: RouterState) -> tuple[tuple[str, str], ...]:
    """(bridge, mac) of the router's NICs, one per site in the spec's order (the first is eth0's)."""
    return tuple((leg.bridge, leg.mac) for leg in router.legs.values())


_ROUTER_SCRIPT = """set -e
for leg in $SMFS_LEGS; do
    site=${leg%%=*}; rest=${leg#*=}; mac=${rest%%,*}; addr=${rest#*,}; dev=
    for d in /sys/class/net/*; do [ "$(cat "$d/address")" = "$mac" ] && dev=${d##*/}; done
    # a clone restored from RAM keeps its old MACs, and its addresses: find the leg by address then
    [ -n "$dev" ] || dev=$(ip -o -4 addr show to "${addr%/*}" | { read -r _n d _r; echo "$d"; })
    [ -n "$dev" ] || { echo "no NIC with MAC $mac or address $addr (towards $site)" >&2; exit 3; }
    ip addr flush dev "$dev" scope global
    ip addr add "$addr" dev "$dev"
    ip link set "$dev" up
    echo "$site=$dev"
done
sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0
"""


def _configure_router(tb: VmTestbed) -> None:
    """Address each of the router's NICs (found by MAC) on its site's subnet and turn on forwarding;
    records each leg's interface name (eth0, eth1...) for the WAN's enforcer. Idempotent."""
    router = tb.state.router
    assert router is not None  # the caller checked tb.router
    legs = " ".join(f"{site}={leg.mac},{leg.address}" for site, leg in router.legs.items())
    res = tb.guest(router.vm).exec(["/bin/sh", "-c", _ROUTER_SCRIPT], timeout=30, env={"SMFS_LEGS": legs})
    if res.rc != 0:
        err = res.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {res.rc}"]
        raise VmTestbedError(f"{router.vm}: cannot configure the WAN router: {err[0][:200]}")
    ifnames = dict(line.split("=", 1) for line in res.out.split())
    tb.update(router=router.with_legs(ifname=ifnames))


def _route_via_router(tb: VmTestbed, vm: str) -> None:
    """Route the other sites' subnets from ``vm`` through the router's leg on its own bridge."""
    assert tb.state.router is not None  # the caller checked tb.router
    routes = tb.state.router.routes.get(tb.info(vm).site, [])
    script = "; ".join(f"ip route replace {net} via {via} dev eth0" for net, via in routes) or "true"
    tb.guest(vm).sh(f"set -e; {script}", timeout=30)


def _wait_agents(tb: VmTestbed, started: dict[str, float], timeout: float, say: Say) -> None:
    def wait(vm: str) -> tuple[str, float]:
        tb.guest(vm).wait_ready(timeout)
        return vm, time.monotonic() - started[vm]

    boot: dict[str, float] = {}
    with ThreadPoolExecutor(max_workers=max(1, len(started))) as pool:
        for vm, secs in pool.map(wait, list(started)):
            say(f"  {vm}: agent ready {secs:.1f} s after start")
            boot[vm] = round(secs, 2)
    tb.update(vms=tuple(replace(v, boot_seconds=boot[v.name]) if v.name in boot else v for v in tb.state.vms))


def _check_uuid_free(conn: libvirt.virConnect, uuid: str, clone: str) -> None:
    try:
        other = conn.lookupByUUIDString(uuid)
    except libvirt.libvirtError:
        return
    raise VmTestbedError(f"clone {clone}: its VMs keep the names and UUIDs of the testbed it was made from, and "
                       f"domain {other.name()} still has one; ./inv down that testbed first")


def _clone_snapshot(tb: VmTestbed, clone_dir: Path, snap: str, vm: str, config: DomainConfig) -> None:
    """Put the clone's snapshot of ``vm`` into the new testbed's snapshot folder, with ``<vm>.xml``: the
    new domain (its paths; the original's name, UUID and MACs, which libvirt's check of a memory
    image requires) that restore gives libvirt in place of the XML inside the memory image."""
    folder = tb.snapshot_dir(snap)
    folder.mkdir(parents=True, exist_ok=True)
    info = tb.info(vm)
    for name in (f"{vm}.save", Path(info.root).name, Path(info.data).name):
        src = clone_dir / name
        if not src.exists():
            raise VmTestbedError(f"clone {clone_dir.name}: {name} is missing; make the clone again with ./inv clone")
        try:  # never written in place (restore copies from it), so a hard link will do
            os.link(src, folder / name)
        except OSError:
            disks.copy(src, folder / name)
    (folder / f"{vm}.xml").write_text(hypervisor.domain_xml(config))


def down(say: Say = print, owner: str | None = None) -> list[Resource]:
    """Tear down every recorded resource of every kind (VM testbeds, namespaces, processes...) that
    this testbed made, or only ``owner``'s (a drill removes its own VM testbed, never a concurrent
    namespace test's); each one that fails its check is said ("refusing to remove ...") and forgotten."""
    load_teardown_handlers()
    return Registry().teardown(owner=owner, say=say)


def load_teardown_handlers() -> None:
    """Import the modules that register teardown handlers (those that exist yet)."""
    import importlib

    for mod in ("testbed.procs", "testbed.netns.bed", "testbed.vm.bridges", "testbed.vm.qmp"):
        try:
            importlib.import_module(mod)
        except ImportError as err:
            log.debug("teardown handlers of %s not loaded: %s", mod, err)


# --- teardown handlers -------------------------------------------------------------------------


def _live_domain(uri: str, name: str) -> libvirt.virDomain | None:
    """Domain ``name`` at ``uri`` as libvirt has it now; None when it is gone or no libvirtd runs at all."""
    try:
        conn = hypervisor.connect(uri, say=lambda m: log.info("%s", m))
    except HypervisorError:
        if uri in hypervisor.LOCAL_URIS and subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True).returncode:
            return None  # no libvirtd at all: nothing can be running
        raise
    return hypervisor.lookup(conn, name)


def _domain_is_ours(name: str, uri: str, scope: Scope) -> str | None:
    """A local URI, our prefix, and the testbed's id in the domain's live <metadata>."""
    if uri not in hypervisor.LOCAL_URIS:
        return f"{uri} is not a URI this testbed uses"
    if not name.startswith(scope.prefix):
        return f"its name lacks the prefix {scope.prefix}"
    dom = _live_domain(uri, name)
    return None if dom is None else hypervisor.foreign_domain(dom, scope)


def _check_domain(res: Resource, scope: Scope) -> str | None:
    return _domain_is_ours(res.ident, res.meta.get("uri", "qemu:///system"), scope)


def _check_snapshot(res: Resource, scope: Scope) -> str | None:
    return _domain_is_ours(str(res.meta.get("domain", "")), res.meta.get("uri", "qemu:///system"), scope)


def _teardown_domain(res: Resource) -> None:
    dom = _live_domain(res.meta.get("uri", "qemu:///system"), res.ident)
    if dom is None:
        return
    if hypervisor.domain_mark(dom) is None:  # the registry checked the id; never touch an unmarked domain
        raise VmTestbedError(f"{res.ident} carries no smfs-testbed metadata; not destroying it")
    if dom.isActive():
        try:
            dom.destroy()
        except libvirt.libvirtError as err:
            if dom.isActive():
                raise VmTestbedError(f"cannot destroy {res.ident}: {err.get_error_message()}") from None
    flags = libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    try:
        dom.undefineFlags(flags)
    except libvirt.libvirtError as err:
        if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise


def _teardown_snapshot(res: Resource) -> None:
    uri = res.meta.get("uri", "qemu:///system")
    try:
        conn = hypervisor.connect(uri, say=lambda m: log.info("%s", m))
    except HypervisorError:
        return
    dom = hypervisor.lookup(conn, res.meta.get("domain", ""))
    if dom is None:
        return
    snap = _find_snapshot(dom, res.meta.get("snapshot", ""))
    if snap is not None:
        snap.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY if not dom.isActive() else 0)


def _teardown_file(res: Resource) -> None:
    try:
        os.unlink(res.ident)
    except FileNotFoundError:
        pass


def _teardown_dir(res: Resource) -> None:
    shutil.rmtree(res.ident, ignore_errors=True)


register_teardown("domain", _teardown_domain, check=_check_domain)
register_teardown("snapshot", _teardown_snapshot, check=_check_snapshot)
register_teardown("overlay", _teardown_file)
register_teardown("qmp", _teardown_file)
register_teardown("marker", _teardown_file)
register_teardown("dir", _teardown_dir)
