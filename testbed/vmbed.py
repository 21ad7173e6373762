"""The VM testbed: a spec turned into running libvirt domains on per-site host bridges.

``up(spec)`` builds or reuses the image, creates the bridges, one qcow2 overlay per disk per VM,
defines and starts the domains and waits until every guest agent answers. ``VmTestbed`` (from
``up`` or ``VmTestbed.active()``) then gives guests (``guest(vm)``), balloon, whole-testbed
snapshots and restore, clones, QMP control and the power cut the nemesis needs.

State of a testbed lives in ``<cache>/testbeds/<name>/`` (``state.json``, overlays, QMP sockets,
console logs); ``<cache>/testbeds/active`` names the testbed the tasks act on. Every domain,
overlay, socket, snapshot, bridge and folder is recorded in the registry before it is created
(owner ``testbed-<name>``), so ``./inv down`` removes exactly those, also after a crash.

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
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

from testbed import bridges, hypervisor
from testbed.guest import Guest
from testbed.hypervisor import DomainConfig, HypervisorError
from testbed.paths import cache_dir
from testbed.registry import Registry, Resource, register_teardown
from testbed.spec import ROUTER_SITE, RouterSpec, Spec, SpecError, VmSpec, thaw
from testbed.spec import load as load_spec

log = logging.getLogger(__name__)

Say = Callable[[str], None]
MIB = 1 << 20
QEMU_RUN_DIR = "/run/libvirt/qemu"  # libvirt keeps <domain>.pid here (qemu:///system)


class TestbedError(RuntimeError):
    """The testbed could not be brought up or changed (the message says what to do)."""

    __test__ = False


def testbeds_dir() -> Path:
    d = cache_dir() / "testbeds"
    d.mkdir(parents=True, exist_ok=True)
    return d


def domain_name(testbed: str, vm: str) -> str:
    return f"smfs-{testbed}-{vm}"


def _mac(testbed: str, vm: str) -> str:
    h = hashlib.sha256(f"{testbed}/{vm}".encode()).digest()
    return "52:54:00:{:02x}:{:02x}:{:02x}".format(*h[:3])


@dataclass(frozen=True)
class VmInfo:
    """What a VM of a running testbed is (kept in state.json)."""

    name: str
    site: str
    domain: str
    uri: str
    address: str  # 198.18.1.10/24
    gateway: str
    mac: str
    root: str
    data: str
    qmp: str
    console: str
    boot_seconds: float = 0.0
    ledger: str = ""  # host unix socket of the guest's ledger port (hypervisor.LEDGER_PORT)


class VmTestbed:
    """A running (or defined) testbed; cheap to construct from ``state.json``."""

    __test__ = False

    def __init__(self, name: str, state: dict[str, Any]) -> None:
        self.name = name
        self.state = state
        self.vms = {v["name"]: VmInfo(**v) for v in state["vms"]}
        self.registry = Registry()

    # --- lookup -------------------------------------------------------------------------------

    @property
    def dir(self) -> Path:
        return testbeds_dir() / self.name

    @property
    def owner(self) -> str:
        return f"testbed-{self.name}"

    @property
    def accel(self) -> str:
        return self.state["accel"]

    @property
    def spec(self) -> Spec:
        from testbed.spec import from_mapping

        return from_mapping(self.state["spec"], path=self.state["spec_path"], default_name=self.name)

    @classmethod
    def load(cls, name: str) -> VmTestbed:
        path = testbeds_dir() / name / "state.json"
        if not path.exists():
            raise TestbedError(f"no testbed named {name!r} is up; start one with ./inv up --spec specs/ci.toml")
        return cls(name, json.loads(path.read_text()))

    @classmethod
    def active(cls) -> VmTestbed:
        marker = testbeds_dir() / "active"
        if not marker.exists():
            raise TestbedError("no testbed is up; start one with ./inv up --spec specs/ci.toml")
        return cls.load(marker.read_text().strip())

    def info(self, vm: str) -> VmInfo:
        try:
            return self.vms[vm]
        except KeyError:
            raise TestbedError(f"no VM named {vm!r} in testbed {self.name!r}; VMs: {', '.join(self.vms)}") from None

    def domain(self, vm: str) -> libvirt.virDomain:
        info = self.info(vm)
        dom = hypervisor.lookup(hypervisor.connect(info.uri), info.domain)
        if dom is None:
            raise TestbedError(f"domain {info.domain} is gone; ./inv down then ./inv up")
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
        return (self.state.get("router") or {}).get("vm")

    def qmp(self, vm: str) -> Any:
        from testbed.qmp import Qmp

        return Qmp(self.info(vm).qmp, name=vm)

    def _save(self) -> None:
        (self.dir / "state.json").write_text(json.dumps(self.state, indent=1))

    # --- status -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Per VM: state, accel, address, memory (MiB), agent; per site: the bridge."""
        out: dict[str, Any] = {"testbed": self.name, "accel": self.accel, "accel_reason": self.state.get("accel_reason"),
                               "image": self.state.get("image"), "vms": [], "bridges": [],
                               "snapshots": self.state.get("snapshots", [])}
        for info in self.vms.values():
            row: dict[str, Any] = {"vm": info.name, "site": info.site, "domain": info.domain, "address": info.address,
                                   "console": info.console, "boot_seconds": info.boot_seconds}
            if info.name == self.router:
                row["address"] = ", ".join(leg["address"] for leg in self.state["router"]["legs"].values())
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
            except (TestbedError, libvirt.libvirtError) as err:
                row["state"] = f"missing ({err})"
            out["vms"].append(row)
        if self.router:
            out["router"] = self.state["router"]
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
            raise TestbedError(f"balloon {vm}: {mib} MiB is outside 64-{maxm} MiB (max_memory in the spec); pick a value in range")
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
                raise TestbedError(f"balloon {vm}: guest still at {total} MiB (balloon {actual} MiB) after {timeout:.0f} s; "
                                   "is virtio_balloon loaded in the guest?")
            time.sleep(0.2)
        return {"vm": vm, "target_mib": mib, "actual_mib": actual, "guest_total_mib": total,
                "kernel_reserved_mib": reserved, "seconds": round(time.monotonic() - t0, 2), "memstat": dom.memoryStats()}

    # --- power ---------------------------------------------------------------------------------

    def destroy(self, vm: str) -> float:
        """Power cut: destroy the VM (no shutdown, no flush); returns seconds taken."""
        t0 = time.monotonic()
        dom = self.domain(vm)
        if dom.isActive():
            dom.destroy()
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
            raise TestbedError(f"{vm}: no running QEMU found ({err}); is the VM running?") from None
        if f"guest={info.domain}".encode() not in cmdline:
            raise TestbedError(f"{vm}: pid {pid} from libvirt's pid file is not {info.domain}'s QEMU")
        return pid

    def disaster(self, site: str) -> dict[str, Any]:
        """The site's disaster as one instant: every QEMU of the site is stopped at once (SIGSTOP: no
        vCPU runs, no packet or ledger line leaves, and no disk flush happens, unlike QMP ``stop``,
        which flushes every disk cache), then its host taps are taken down, then the VMs are killed
        (SIGKILL, then libvirt's destroy). Returns ``t_instant`` (host ``time.time()`` once every
        QEMU of the site is stopped), ``freeze_s`` (SIGSTOP of the first to the last) and per VM
        ``destroy_s``."""
        import signal

        from testbed import wan

        pids = {vm: self.qemu_pid(vm) for vm in self.site_vms(site) if self.domain(vm).isActive()}
        t0 = time.time()
        for pid in pids.values():
            os.kill(pid, signal.SIGSTOP)
        t_instant = time.time()
        taps = {}
        for vm in pids:
            tap = wan.tap_of(self, vm)
            if tap:
                bridges.link_down(tap)
                taps[vm] = tap
        destroy_s = {}
        for vm, pid in pids.items():
            t1 = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._reap(vm)
            destroy_s[vm] = round(time.monotonic() - t1, 3)
        return {"t_instant": t_instant, "freeze_s": round(t_instant - t0, 6), "pids": pids, "taps": taps,
                "destroy_s": destroy_s}

    def _reap(self, vm: str, timeout: float = 15.0) -> None:
        """Wait until libvirt sees ``vm``'s killed QEMU gone (destroying what remains)."""
        dom = self.domain(vm)
        deadline = time.monotonic() + timeout
        while dom.isActive():
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()
            if time.monotonic() > deadline:
                raise TestbedError(f"{vm}: still running {timeout:.0f} s after SIGKILL of its QEMU")
            time.sleep(0.05)

    def start(self, vm: str, timeout: float | None = None) -> float:
        """Boot a destroyed VM again (same overlays, so its disks are what survived); seconds to agent-ready."""
        dom = self.domain(vm)
        t0 = time.monotonic()
        if not dom.isActive():
            dom.create()
        Guest(dom, vm).wait_ready(timeout or self.state.get("boot_timeout", 120))
        if self.router:  # a fresh boot forgot what the agent configured: the router's NICs, the site routes
            if vm == self.router:
                _configure_router(self)
            else:
                _route_via_router(self, vm)
        from testbed import wan

        try:  # and its part of the WAN's shaping
            wan.after_boot(self, vm)
        except wan.WanError as err:
            raise TestbedError(f"{vm} booted again but its part of the WAN is not shaped: {err}") from None
        return time.monotonic() - t0

    def set_link(self, vm: str, up: bool) -> None:
        """Cut or restore the VM's NIC through libvirt (libvirt keeps track of the link state)."""
        if vm == self.router:
            raise TestbedError(f"{vm}: the WAN router has a NIC per site; cut a site's link instead (LinkCut)")
        dom = self.domain(vm)
        info = self.info(vm)
        xml = (f"<interface type='bridge'><mac address='{info.mac}'/><source bridge='smfs-{info.site}'/>"
               f"<model type='virtio'/><mtu size='{self.spec.mtu}'/><link state='{'up' if up else 'down'}'/></interface>")
        dom.updateDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)

    # --- disk failure -------------------------------------------------------------------------

    def fail_disk(self, vm: str) -> None:
        """The VM's data disk (/data) starts failing reads and writes with EIO (QMP blkdebug filter)."""
        self.qmp(vm).disk_fail(self.info(vm).data)

    def heal_disk(self, vm: str) -> str:
        """Remove the failure. QEMU flushes the disk before it can take the filter out; when that
        flush fails too (dirty qcow2 metadata behind the filter), the VM is power-cycled instead,
        which rebuilds its block graph from the domain XML. Returns "reopened" or "rebooted"."""
        from testbed.qmp import QmpError

        try:
            self.qmp(vm).disk_heal(self.info(vm).data)
            return "reopened"
        except QmpError as err:
            log.info("%s: cannot reopen the data disk (%s); power-cycling", vm, err)
            self.destroy(vm)
            self.start(vm)
            return "rebooted"

    # --- snapshots ----------------------------------------------------------------------------

    def snapshot(self, name: str, say: Say = print) -> float:
        """Internal qcow2 snapshots with RAM of every VM, taken together (all paused first).

        Returns seconds with the testbed paused."""
        _check_snap_name(name)
        doms = {vm: self.domain(vm) for vm in self.vms}
        for vm, dom in doms.items():
            if not dom.isActive():
                raise TestbedError(f"snapshot {name}: {vm} is not running; restore or start it first")
            if _find_snapshot(dom, name) is not None:
                raise TestbedError(f"snapshot {name!r} already exists; pick another name or ./inv restore {name}")
        t0 = time.monotonic()
        paused = []
        try:
            for dom in doms.values():
                if dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING:
                    dom.suspend()
                    paused.append(dom)
            for vm, dom in doms.items():
                self.registry.add("snapshot", f"{dom.name()}/{name}", self.owner, uri=self.info(vm).uri,
                                  domain=dom.name(), snapshot=name)
                dom.snapshotCreateXML(f"<domainsnapshot><name>{name}</name>"
                                      "<description>smfs-testbed</description></domainsnapshot>", 0)
                say(f"  {vm}: snapshot {name} taken")
        finally:
            for dom in paused:
                dom.resume()
        snaps = [s for s in self.state.get("snapshots", []) if s != name] + [name]
        self.state["snapshots"] = snaps
        self.state.setdefault("snapshot_wan", {})[name] = {k: self.state.get(k) for k in _WAN_STATE}
        self._save()
        return time.monotonic() - t0

    def restore(self, name: str, say: Say = print) -> float:
        """Revert every VM to snapshot ``name`` (paused), then resume them together and set guest clocks.

        Returns seconds until every guest agent answers."""
        doms = {vm: self.domain(vm) for vm in self.vms}
        snaps = {}
        for vm, dom in doms.items():
            snap = _find_snapshot(dom, name)
            if snap is None:
                have = ", ".join(self.state.get("snapshots", [])) or "none"
                raise TestbedError(f"no snapshot {name!r} of {vm}; snapshots: {have} (take one with ./inv snapshot NAME)")
            snaps[vm] = snap
        t0 = time.monotonic()
        def revert(vm: str) -> str:
            flags = libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_PAUSED | libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_FORCE
            doms[vm].revertToSnapshot(snaps[vm], flags)
            return vm

        with ThreadPoolExecutor(max_workers=len(doms)) as pool:  # each revert restarts QEMU (-loadvm)
            for vm in pool.map(revert, list(doms)):
                say(f"  {vm}: reverted to {name} (paused)")
        for dom in doms.values():
            if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()
        for vm, dom in doms.items():
            Guest(dom, vm).wait_ready(60)
            _sync_clock(dom)
        # The WAN's shaping lives in the guests' (or the router's) memory, so it is back as it was at the
        # snapshot: so must be what the testbed says it is (./inv calibrate and shape build on it).
        for key, value in self.state.get("snapshot_wan", {}).get(name, {}).items():
            if value is None:
                self.state.pop(key, None)
            else:
                self.state[key] = value
        self._save()
        return time.monotonic() - t0

    # --- clone --------------------------------------------------------------------------------

    def clone(self, snapshot: str, new: str, say: Say = print) -> Path:
        """Copy the testbed at ``snapshot`` to ``<cache>/clones/<new>/`` (overlays with their internal
        snapshots, spec, snapshot metadata). The VMs are paused while their overlays are copied.
        ``up(..., clone=new)`` boots a testbed from it. Returns the clone folder."""
        _check_snap_name(new)
        dest = cache_dir() / "clones" / new
        if dest.exists():
            raise TestbedError(f"clone {new!r} exists at {dest}; pick another name or delete that folder")
        doms = {vm: self.domain(vm) for vm in self.vms}
        for vm, dom in doms.items():
            if _find_snapshot(dom, snapshot) is None:
                raise TestbedError(f"no snapshot {snapshot!r} of {vm}; take one with ./inv snapshot {snapshot}")
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        paused = [d for d in doms.values() if d.state()[0] == libvirt.VIR_DOMAIN_RUNNING]
        try:
            for dom in paused:
                dom.suspend()
            for vm in self.vms:
                info = self.info(vm)
                for disk in (info.root, info.data):
                    _run(["cp", "--sparse=always", disk, str(tmp / Path(disk).name)])
                say(f"  {vm}: overlays copied")
        finally:
            for dom in paused:
                dom.resume()
        meta = {"from": self.name, "snapshot": snapshot, "spec": self.state["spec"], "spec_path": self.state["spec_path"],
                "image": self.state["image"], "wan": self.state.get("snapshot_wan", {}).get(snapshot), "t": time.time()}
        (tmp / "clone.json").write_text(json.dumps(meta, indent=1))
        tmp.rename(dest)
        return dest


_STATES = {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_PAUSED: "paused",
           libvirt.VIR_DOMAIN_SHUTOFF: "shut off", libvirt.VIR_DOMAIN_CRASHED: "crashed",
           libvirt.VIR_DOMAIN_BLOCKED: "blocked", libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
           libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended"}


_WAN_STATE = ("wan_profile", "wan_bare", "wan_enforcement")
"""The testbed state keys that describe the WAN's realised shape; kept per snapshot, put back by restore."""


def _check_snap_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or len(name) > 40:
        raise TestbedError(f"name {name!r}: use up to 40 letters, digits, '-', '_' or '.'")


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
        raise TestbedError(f"{' '.join(cmd[:2])}: {err.stderr.strip()[:200]}") from None


def _qemu_img_overlay(base: Path, out: Path) -> None:
    _run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(out)])


# --- up ----------------------------------------------------------------------------------------


def up(spec: Spec | str | Path, say: Say = print, rebuild_image: bool = False, clone: str | None = None) -> VmTestbed:
    """Bring up the testbed of ``spec`` (or of clone ``clone``, at the clone's snapshot).

    On any failure or Ctrl-C, everything created so far is torn down before the error propagates.
    """
    from vmimages.build import data_base, ensure_image

    clone_dir: Path | None = None
    if clone is not None:
        clone_dir = cache_dir() / "clones" / clone
        if not (clone_dir / "clone.json").exists():
            raise TestbedError(f"no clone named {clone!r} in {clone_dir.parent}; make one with ./inv clone SNAP --as NAME")
        meta = json.loads((clone_dir / "clone.json").read_text())
        from testbed.spec import from_mapping

        spec = from_mapping(meta["spec"], path=meta["spec_path"], default_name=clone)
        spec = _renamed(spec, clone)
    elif not isinstance(spec, Spec):
        spec = load_spec(spec)
    from testbed.wan import router_for

    router = router_for(spec)
    for site in spec.sites:
        if site.uri not in hypervisor.LOCAL_URIS:
            raise SpecError(f"sites ({site.name}).uri: {site.uri} — only local sites (qemu:///system) are "
                            "supported so far; use qemu:///system")
    marker = testbeds_dir() / "active"
    if marker.exists():
        raise TestbedError(f"testbed {marker.read_text().strip()!r} is up; ./inv down first (one testbed at a time)")
    registry = Registry()
    owner = f"testbed-{spec.name}"
    if registry.items(owner=owner):
        raise TestbedError(f"resources of testbed {spec.name!r} are still recorded; run ./inv down first")

    image = ensure_image(rebuild=rebuild_image, progress=say)
    built = f"built in {image.seconds:.0f} s" if image.built else "cached"
    say(f"image {image.key} ({built})")
    if clone_dir is not None and json.loads((clone_dir / "clone.json").read_text())["image"] != image.key:
        say("note: the clone was made from another image; its overlays still name their own base")
    conns = {s.uri: hypervisor.connect(s.uri, say) for s in spec.sites}
    accel = hypervisor.detect_accel(image.kernel, spec.accel)
    say(f"accelerator: {accel.name} ({accel.reason})")
    all_vms = [*spec.vms, *([router.vm] if router else [])]
    for vm in all_vms:
        uri = router.uri if router and vm is router.vm else spec.site_of(vm.name).uri
        if hypervisor.lookup(conns[uri], domain_name(spec.name, vm.name)) is not None:
            raise TestbedError(f"domain {domain_name(spec.name, vm.name)} exists but is not recorded by smfs-testbed; "
                               "remove it with virsh undefine, or rename the spec")

    tb_dir = testbeds_dir() / spec.name
    uid, gid, qemu_name = hypervisor.qemu_user()
    run_as_root = not hypervisor.reachable_by(cache_dir(), uid, gid)
    if run_as_root:
        say(f"note: {cache_dir()} is not reachable by the QEMU user {qemu_name}; QEMU runs as root "
            "(set SMFS_TESTBED_CACHE to a world-traversable folder to avoid it)")
    try:
        registry.add("dir", str(tb_dir), owner)
        hypervisor.ensure_kvm_access(owner, registry, say)
        registry.add("marker", str(marker), owner)
        shutil.rmtree(tb_dir, ignore_errors=True)
        (tb_dir / "qmp").mkdir(parents=True)
        if not run_as_root:
            os.chown(tb_dir / "qmp", uid, gid)
        marker.write_text(spec.name)
        for site in spec.sites:
            bridges.ensure_bridge(site, owner, registry, mtu=spec.mtu)
        bridges.enable_forwarding(owner, registry)
        say(f"bridges: {', '.join(f'{s.bridge} {s.gateway}' for s in spec.sites)}")

        vms: list[VmInfo] = []
        for vm in all_vms:
            if router and vm is router.vm:  # eth0 from the command line; no default route, no ledger
                site_name, uri, gateway, ledger = ROUTER_SITE, router.uri, "", ""
            else:
                site = spec.site_of(vm.name)
                site_name, uri, gateway = site.name, site.uri, str(site.gateway.ip)
                ledger = str(tb_dir / "qmp" / f"{vm.name}-ledger.sock")
            info = VmInfo(name=vm.name, site=site_name, domain=domain_name(spec.name, vm.name), uri=uri,
                          address=str(vm.address), gateway=gateway, mac=_mac(spec.name, vm.name),
                          root=str(tb_dir / f"{vm.name}-root.qcow2"), data=str(tb_dir / f"{vm.name}-data.qcow2"),
                          qmp=str(tb_dir / "qmp" / f"{vm.name}.sock"), console=str(tb_dir / f"{vm.name}-console.log"),
                          ledger=ledger)
            for disk, base in ((info.root, image.base), (info.data, data_base(vm.data_disk))):
                registry.add("overlay", disk, owner, image=image.key)
                if clone_dir is not None:
                    _run(["cp", "--sparse=always", str(clone_dir / Path(disk).name), disk])
                else:
                    _qemu_img_overlay(base, Path(disk))
            vms.append(info)
        state: dict[str, Any] = {
            "name": spec.name, "spec": thaw(spec.raw), "spec_path": spec.path, "image": image.key,
            "accel": accel.name, "accel_reason": accel.reason, "boot_timeout": spec.boot_timeout,
            "run_as_root": run_as_root, "vms": [vars(v) for v in vms], "snapshots": [], "t_up": time.time(),
        }
        if router:
            state["router"] = _router_state(spec.name, router)
        (tb_dir / "state.json").write_text(json.dumps(state, indent=1))
        tb = VmTestbed(spec.name, state)

        started: dict[str, float] = {}
        for vm, info in zip(all_vms, vms, strict=True):
            conn = conns[info.uri]
            nics = _router_nics(state["router"]) if info.site == ROUTER_SITE else None
            xml = hypervisor.domain_xml(_config(vm, info, accel.domain_type, image, run_as_root, spec.mtu, nics))
            registry.add("domain", info.domain, owner, uri=info.uri)
            registry.add("qmp", info.qmp, owner)
            if info.ledger:
                registry.add("qmp", info.ledger, owner)
            dom = conn.defineXML(xml)
            if clone_dir is None:
                say(f"starting {vm.name} ({vm.vcpus} vCPU, {vm.memory_mib}/{vm.max_memory_mib} MiB, {info.address})")
                started[vm.name] = time.monotonic()
                dom.create()
        if clone_dir is not None:
            snap = json.loads((clone_dir / "clone.json").read_text())["snapshot"]
            _redefine_snapshots(tb, clone_dir, snap)
            say(f"restoring clone {clone} at snapshot {snap}")
            tb.restore(snap, say)
        else:
            _wait_agents(tb, started, spec.boot_timeout, say)
        if router:
            _configure_router(tb)
            for vm in spec.vms:
                _route_via_router(tb, vm.name)
            legs = ", ".join("{ifname} {address} ({site})".format(site=site, **leg)
                             for site, leg in tb.state["router"]["legs"].items())
            say(f"router: {legs}; the sites route each other through it")
        tb._save()
        return tb
    except BaseException:
        say("up failed; tearing down what was created")
        try:
            registry.teardown(owner=owner)
        except Exception as err:  # noqa: BLE001 - the original error matters more
            say(f"teardown after the failure also failed: {err}")
        raise


def _renamed(spec: Spec, name: str) -> Spec:
    from dataclasses import replace

    return replace(spec, name=name)


def _config(vm: VmSpec, info: VmInfo, domain_type: str, image: Any, run_as_root: bool,
            mtu: int = 1500, nics: tuple[tuple[str, str], ...] | None = None) -> DomainConfig:
    """``nics``: (bridge, mac) of every NIC (the router's); default one on the VM's site bridge."""
    (bridge, mac), *extra = nics or ((f"smfs-{info.site}", info.mac),)
    gw = f"smfs_gw={info.gateway} " if info.gateway else ""
    cmdline = f"console=ttyS0 root=/dev/vda rw quiet mitigations=off smfs_ip={info.address} {gw}smfs_host={vm.name}"
    return DomainConfig(
        name=info.domain, domain_type=domain_type, vcpus=vm.vcpus, memory_mib=vm.memory_mib,
        max_memory_mib=vm.max_memory_mib, kernel=image.kernel, initrd=image.initrd, cmdline=cmdline,
        root_disk=Path(info.root), data_disk=Path(info.data), bridge=bridge, mac=mac,
        qmp_socket=Path(info.qmp), console_log=Path(info.console), run_as_root=run_as_root,
        ledger_socket=Path(info.ledger) if info.ledger else None, mtu=mtu, extra_nics=tuple(extra),
    )


# --- the WAN router guest ----------------------------------------------------------------------


def _router_state(testbed: str, router: RouterSpec) -> dict[str, Any]:
    """What state.json keeps of the router: per site its leg (bridge, address, MAC; ``ifname`` once
    the guest has been asked) and the routes each site's VMs take through it."""
    legs = {leg.site: {"bridge": leg.bridge, "address": str(leg.address),
                       "mac": _mac(testbed, router.vm.name if i == 0 else f"{router.vm.name}/{leg.site}"), "ifname": ""}
            for i, leg in enumerate(router.legs)}  # fmt: skip
    return {"vm": router.vm.name, "legs": legs, "routes": site_routes(router)}


def site_routes(router: RouterSpec) -> dict[str, list[list[str]]]:
    """Per site, ``[subnet, via]`` for every other site: via the router's leg on the site's own bridge."""
    return {leg.site: [[str(other.address.network), str(leg.address.ip)] for other in router.legs if other is not leg]
            for leg in router.legs}  # fmt: skip


def _router_nics(router: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """(bridge, mac) of the router's NICs, one per site in the spec's order (the first is eth0's)."""
    return tuple((leg["bridge"], leg["mac"]) for leg in router["legs"].values())


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
    router = tb.state["router"]
    legs = " ".join(f"{site}={leg['mac']},{leg['address']}" for site, leg in router["legs"].items())
    res = tb.guest(router["vm"]).exec(["/bin/sh", "-c", _ROUTER_SCRIPT], timeout=30, env={"SMFS_LEGS": legs})
    if res.rc != 0:
        err = res.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {res.rc}"]
        raise TestbedError(f"{router['vm']}: cannot configure the WAN router: {err[0][:200]}")
    for line in res.out.split():
        site, dev = line.split("=", 1)
        router["legs"][site]["ifname"] = dev
    tb._save()


def _route_via_router(tb: VmTestbed, vm: str) -> None:
    """Route the other sites' subnets from ``vm`` through the router's leg on its own bridge."""
    routes = tb.state["router"]["routes"].get(tb.info(vm).site, [])
    script = "; ".join(f"ip route replace {net} via {via} dev eth0" for net, via in routes) or "true"
    tb.guest(vm).sh(f"set -e; {script}", timeout=30)


def _wait_agents(tb: VmTestbed, started: dict[str, float], timeout: float, say: Say) -> None:
    def wait(vm: str) -> tuple[str, float]:
        tb.guest(vm).wait_ready(timeout)
        return vm, time.monotonic() - started[vm]

    with ThreadPoolExecutor(max_workers=max(1, len(started))) as pool:
        for vm, secs in pool.map(wait, list(started)):
            say(f"  {vm}: agent ready {secs:.1f} s after start")
            for v in tb.state["vms"]:
                if v["name"] == vm:
                    v["boot_seconds"] = round(secs, 2)
    tb.vms = {v["name"]: VmInfo(**v) for v in tb.state["vms"]}


def _redefine_snapshots(tb: VmTestbed, clone_dir: Path, snap: str) -> None:
    """Make libvirt aware of the internal snapshot the copied overlays carry (and the testbed of the WAN's
    shape in it)."""
    for vm in tb.vms:
        dom = tb.domain(vm)
        dom_xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE)
        xml = (f"<domainsnapshot><name>{snap}</name><state>paused</state><memory snapshot='internal'/>"
               f"<creationTime>{int(time.time())}</creationTime>{dom_xml}</domainsnapshot>")
        tb.registry.add("snapshot", f"{dom.name()}/{snap}", tb.owner, uri=tb.info(vm).uri, domain=dom.name(), snapshot=snap)
        dom.snapshotCreateXML(xml, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE)
    tb.state["snapshots"] = [snap]
    wan_at_snap = json.loads((clone_dir / "clone.json").read_text()).get("wan")
    if wan_at_snap is not None:
        tb.state["snapshot_wan"] = {snap: wan_at_snap}
    tb._save()


def down(say: Say = print) -> list[Resource]:
    """Tear down every recorded resource of every kind (VM testbeds, namespaces, processes...)."""
    load_teardown_handlers()
    return Registry().teardown()


def load_teardown_handlers() -> None:
    """Import the modules that register teardown handlers (those that exist yet)."""
    import importlib

    for mod in ("testbed.procs", "testbed.netns", "testbed.bridges", "testbed.qmp"):
        try:
            importlib.import_module(mod)
        except ImportError as err:
            log.debug("teardown handlers of %s not loaded: %s", mod, err)


# --- teardown handlers -------------------------------------------------------------------------


def _teardown_domain(res: Resource) -> None:
    uri = res.meta.get("uri", "qemu:///system")
    try:
        conn = hypervisor.connect(uri, say=lambda m: log.info("%s", m))
    except HypervisorError:
        if uri in hypervisor.LOCAL_URIS and subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True).returncode:
            return  # no libvirtd at all: nothing can be running
        raise
    dom = hypervisor.lookup(conn, res.ident)
    if dom is None:
        return
    if dom.isActive():
        try:
            dom.destroy()
        except libvirt.libvirtError as err:
            if dom.isActive():
                raise TestbedError(f"cannot destroy {res.ident}: {err.get_error_message()}") from None
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


register_teardown("domain", _teardown_domain)
register_teardown("snapshot", _teardown_snapshot)
register_teardown("overlay", _teardown_file)
register_teardown("qmp", _teardown_file)
register_teardown("marker", _teardown_file)
register_teardown("dir", _teardown_dir)
