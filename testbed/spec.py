"""The testbed spec: a TOML file of sites, VMs, addressing, the WAN profile and the workload.

Loaded once into frozen dataclasses; every problem is a ``SpecError`` whose one-line message names
the field and the fix (``sites[1].vms[0].memory: cannot parse 'lots' as a size; use e.g. 512MiB, 1GiB``).
This is the one validation layer: every field is typed and bounded (the bounds below, shared with the
command line's flags), unknown tables and fields are refused, and it all runs before anything is
created. The drill's tables (``workload``, ``fec``, ``faults``) are checked here too and kept as
read-only mappings in ``Spec.sections`` for the drill to read.
"""

from __future__ import annotations

import ipaddress
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from smfs.units import format_size, parse_size, show
from smfs.wire import MAX_PAYLOAD
from testbed.errors import UserError

MIB = 1 << 20
GIB = 1 << 30
_NAME = re.compile(r"[a-z][a-z0-9-]{0,9}")
_NAME_FIX = "use 1-10 characters a-z, 0-9 or '-', starting with a letter"
_URI = re.compile(r"[a-z][a-z0-9+.-]*://[^\s\x00-\x1f\x7f]*")
_SITE_KEYS = {"name", "uri", "subnet", "gateway", "vms"}
_VM_KEYS = {"name", "vcpus", "memory", "max_memory", "data_disk", "address"}
_TESTBED_KEYS = {"accel", "boot_timeout", "mtu", "data_fs"}
TOP_KEYS = {"name", "testbed", "sites", "wan", "workload", "fec", "faults"}
"""The spec's top-level fields and tables; anything else is a typo (``[wrokload]``)."""
DRILL_KEYS = {
    "workload": {"testers", "append_size", "duration", "server_pairs"},
    "fec": {"r", "c", "flush", "engine"},
    "faults": {"schedule", "fail_at", "instant", "burst_loss", "burst", "during", "drain_timeout"},
}
"""The fields of the [workload], [fec] and [faults] tables (the drill reads them: ``testbed.drill.vm``)."""
INSTANTS = ("time", "ack")
"""``[faults] instant``: the disaster at ``fail_at``, or at the first acked append after it (testbed.drill.runner)."""
DATA_FILESYSTEMS = ("minix", "ext4")
DEFAULT_URI = "qemu:///system"
# RFC 2544 benchmarking range: never routed on the Internet, rarely used on a LAN.
BENCH_NET = ipaddress.ip_network("198.18.0.0/15")

# Bounds, inclusive, shared with the command line's flags (testbed.cli.common). A value outside is a typo
# or a machine this testbed does not run on, refused before anything is created.
MAX_SPEC_BYTES = 1 << 20  # a spec file larger than this is not a spec
SITES = (1, 8)
VMS_PER_SITE = (1, 16)
VCPUS = (1, 64)
MEMORY = (128 * MIB, 64 * GIB)  # bytes: memory and max_memory, whole MiB
DATA_DISK = (64 * MIB, 1 << 40)  # bytes: the data disk (a sparse file), whole MiB
BOOT_TIMEOUT = (5, 3600)  # s
TESTERS = (1, 1024)
SERVER_PAIRS = (1, 64)  # the mirror's servers listen on consecutive ports from 7700
APPEND_SIZE = (1, MAX_PAYLOAD)  # bytes: an append is one frame on the storage sockets (smfs.wire)
DURATION = (0, 86400)  # s, low exclusive: the testers' run
FLUSH = (0, 1)  # s, low exclusive: a partial FEC bin's repair delay
BURST = (0, 60)  # s, low exclusive: the rolling disaster's loss burst
DRAIN_TIMEOUT = (1, 3600)  # s
FEC_ENGINES = ("c", "python")
FEC_LAYERS = (0, 3)  # fec.c: the gateways' repair layers (interleaves 1, 11, 19 cut to c; 0: no repairs)


class SpecError(UserError, ValueError):
    """A spec field is missing or invalid; the message names the field and the fix."""


@dataclass(frozen=True)
class VmSpec:
    name: str
    site: str
    vcpus: int
    memory: int  # bytes at boot
    max_memory: int  # bytes; the balloon can grow the guest up to this
    data_disk: int  # bytes; the second virtio disk (ext4, mounted at /data)
    address: ipaddress.IPv4Interface  # e.g. 198.18.1.10/24

    @property
    def memory_mib(self) -> int:
        return self.memory // MIB

    @property
    def max_memory_mib(self) -> int:
        return self.max_memory // MIB


@dataclass(frozen=True)
class SiteSpec:
    name: str
    uri: str
    subnet: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Interface  # the host's address on the site bridge, the guests' route
    vms: tuple[VmSpec, ...]

    @property
    def bridge(self) -> str:
        """Host bridge name (≤ 15 characters, the kernel's limit)."""
        return f"smfs-{self.name}"


@dataclass(frozen=True)
class Spec:
    name: str
    path: str
    accel: str  # auto | kvm | tcg
    boot_timeout: float  # seconds to agent-ready per VM
    sites: tuple[SiteSpec, ...]
    wan: Any  # netem.profile.LinkProfile (or the raw mapping when netem is not available)
    sections: Mapping[str, Any]  # other top-level tables, raw (workload, stack, faults, drill, ...)
    raw: Mapping[str, Any]
    mtu: int = 1500  # bytes: the site networks' MTU (bridges, taps, guest NICs; the WAN path's MTU)
    wan_enforcement: str = "auto"  # where netem runs: auto | host | guest | router (testbed.vm.wan chooses for auto)
    router: RouterSpec | None = None  # the WAN router guest, when wan.enforcement = "router"
    data_fs: str = "minix"  # the data disks' filesystem (see DATA_FILESYSTEMS and the README's disk model)

    @property
    def vms(self) -> tuple[VmSpec, ...]:
        return tuple(vm for site in self.sites for vm in site.vms)

    def vm(self, name: str) -> VmSpec:
        for vm in self.vms:
            if vm.name == name:
                return vm
        raise SpecError(f"no VM named {name!r} in spec {self.name!r}; VMs: {', '.join(v.name for v in self.vms)}")

    def site(self, name: str) -> SiteSpec:
        for site in self.sites:
            if site.name == name:
                return site
        raise SpecError(f"no site named {name!r} in spec {self.name!r}; sites: {', '.join(s.name for s in self.sites)}")

    def site_of(self, vm: str) -> SiteSpec:
        return self.site(self.vm(vm).site)


ROUTER_VM = "router"
"""The WAN router guest's VM name (``wan.enforcement = "router"``)."""
ROUTER_SITE = "wan"
"""The router's pseudo-site: it has no bridge of its own and is never one of ``site_vms(...)``."""
ROUTER_MEMORY = 256 * MIB
ROUTER_DATA_DISK = 64 * MIB  # unused; keeps snapshots, clones and disk faults uniform across VMs


@dataclass(frozen=True)
class RouterLeg:
    """One NIC of the router guest: on ``site``'s bridge, at ``address`` (the subnet's .253)."""

    site: str
    bridge: str
    address: ipaddress.IPv4Interface


@dataclass(frozen=True)
class RouterSpec:
    """The WAN router guest: one NIC per site, the sites route each other's subnets through it."""

    vm: VmSpec  # site ROUTER_SITE; address: its leg on the first site (eth0, from the kernel command line)
    uri: str  # both sites' libvirt URI (the router's NICs sit on both bridges)
    legs: tuple[RouterLeg, ...]  # in the spec's site order: primary, mirror


def router_address(subnet: ipaddress.IPv4Network) -> ipaddress.IPv4Interface:
    """The router's address on a site subnet: the one below the host's default (.253 on a /24)."""
    return ipaddress.IPv4Interface(f"{subnet.broadcast_address - 2}/{subnet.prefixlen}")


def router_spec(sites: tuple[SiteSpec, ...], where: str = "wan.enforcement") -> RouterSpec:
    """The router guest joining ``sites`` (exactly primary and mirror, on one libvirt host); one-line
    ``SpecError`` naming the field when the sites cannot have one. ``where`` names the request."""
    ask = f'{where} = "router"'
    names = [s.name for s in sites]
    if sorted(names) != ["mirror", "primary"]:
        raise SpecError(f"sites: {ask} joins two sites named primary and mirror, the spec has "
                        f"{', '.join(names)}; add the missing [[sites]] or use \"auto\"")
    for i, site in enumerate(sites):
        if site.uri != sites[0].uri:
            raise SpecError(f"sites[{i}] ({site.name}).uri: {ask} needs both sites on one libvirt host "
                            f"({site.uri} vs {sites[0].uri}); use the same uri or \"auto\"")
        address = router_address(site.subnet)
        if site.gateway.ip == address.ip:
            raise SpecError(f"sites[{i}] ({site.name}).gateway: {address.ip} is the WAN router's address with "
                            f"{ask}; use the default gateway ({site.subnet.broadcast_address - 1})")
        for j, vm in enumerate(site.vms):
            if vm.name == ROUTER_VM:
                raise SpecError(f"sites[{i}] ({site.name}).vms[{j}].name: {ROUTER_VM!r} is the WAN router guest's "
                                f"name with {ask}; rename the VM")
            if vm.address.ip == address.ip:
                raise SpecError(f"sites[{i}] ({site.name}).vms[{j}].address: {address.ip} is the WAN router's "
                                f"address with {ask}; pick another address")
    legs = tuple(RouterLeg(s.name, s.bridge, router_address(s.subnet)) for s in sites)
    vm = VmSpec(ROUTER_VM, ROUTER_SITE, 1, ROUTER_MEMORY, ROUTER_MEMORY, ROUTER_DATA_DISK, legs[0].address)
    return RouterSpec(vm, sites[0].uri, legs)


def load(path: str | Path) -> Spec:
    """Read and validate a spec file (a regular UTF-8 TOML file of at most 1 MiB); raises ``SpecError``
    with a one-line message naming the file or the field."""
    p = Path(path)
    shown = show(str(p), limit=300)
    fix = "pass a TOML file, e.g. --spec specs/ci.toml"
    try:
        st = p.stat()
    except FileNotFoundError:
        raise SpecError(f"spec file {shown} not found; pass an existing file, e.g. --spec specs/ci.toml") from None
    except (OSError, ValueError) as err:  # permissions, a loop, a NUL in the path
        raise SpecError(f"spec file {shown}: cannot read it ({getattr(err, 'strerror', None) or err}); {fix}") from None
    if not stat.S_ISREG(st.st_mode):
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise SpecError(f"spec file {shown}: is {what}; {fix}")
    if st.st_size > MAX_SPEC_BYTES:
        raise SpecError(f"spec file {shown}: {st.st_size} bytes is more than a spec's {format_size(MAX_SPEC_BYTES)}; {fix}")
    try:
        raw = p.read_bytes()
    except OSError as err:
        raise SpecError(f"spec file {shown}: cannot read it ({err.strerror or err}); {fix}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(f"spec file {shown}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"{shown}: not valid TOML ({err}); fix the syntax") from None
    except RecursionError:
        raise SpecError(f"{shown}: not valid TOML (nested too deeply); fix the syntax") from None
    return from_mapping(data, path=str(p), default_name=p.stem)


def from_mapping(data: Mapping[str, Any], path: str = "<memory>", default_name: str = "testbed") -> Spec:
    """Validate a spec's tables (every field typed and bounded, unknown tables and fields refused) and
    build the ``Spec``; the first problem is a one-line ``SpecError`` naming the field and the fix."""
    if not isinstance(data, Mapping):
        raise SpecError("spec: must be a table of name, [testbed], [[sites]], [wan], [workload], [fec], [faults]")
    _known(data, "", TOP_KEYS, "table")
    name = _name(data.get("name", default_name), "name")
    tb = _table(data.get("testbed", {}), "testbed", _TESTBED_KEYS)
    accel = tb.get("accel", "auto")
    if accel not in ("auto", "kvm", "tcg"):
        raise SpecError(f"testbed.accel: {show(accel)} is not one of auto, kvm, tcg; use auto (KVM when it works)")
    boot_timeout = _number(tb.get("boot_timeout", 120), "testbed.boot_timeout", BOOT_TIMEOUT, "120")
    mtu = tb.get("mtu", 1500)
    if not isinstance(mtu, int) or isinstance(mtu, bool) or not 1280 <= mtu <= 9000:
        raise SpecError(f"testbed.mtu: {show(mtu)} is not a whole number of bytes from 1280 to 9000; "
                        "use 1500 (Ethernet) or 9000 (jumbo frames)")
    data_fs = tb.get("data_fs", "minix")
    if data_fs not in DATA_FILESYSTEMS:
        raise SpecError(f"testbed.data_fs: {show(data_fs)} is not one of {', '.join(DATA_FILESYSTEMS)}; use minix "
                        "(nothing is durable that was not fsynced) or ext4 (its journal commits more than asked)")
    raw_sites = data.get("sites")
    if not isinstance(raw_sites, list | tuple) or not raw_sites:
        raise SpecError("sites: missing; add at least one [[sites]] table with name, subnet and [[sites.vms]]")
    if len(raw_sites) > SITES[1]:
        raise SpecError(f"sites: {len(raw_sites)} sites, more than {SITES[1]}; use at most {SITES[1]} [[sites]]")
    sites = tuple(_site(s, i) for i, s in enumerate(raw_sites))
    _unique([s.name for s in sites], "sites[].name")
    _unique([v.name for s in sites for v in s.vms], "sites[].vms[].name")
    for i, a in enumerate(sites):
        for b in sites[i + 1:]:
            if a.subnet.overlaps(b.subnet):
                raise SpecError(f"sites: subnets of {a.name!r} ({a.subnet}) and {b.name!r} ({b.subnet}) overlap; "
                                "give each site its own subnet")
    raw_wan = data.get("wan", {})
    wan = _wan(raw_wan)
    wan_enforcement = _wan_enforcement(raw_wan)
    router = None
    if wan_enforcement == "router":
        router = router_spec(sites, "wan.mode" if "enforcement" not in raw_wan else "wan.enforcement")
    sections = {k: _freeze(v) for k, v in data.items() if k not in {"name", "testbed", "sites", "wan"}}
    spec = Spec(name, path, accel, boot_timeout, sites, wan, MappingProxyType(sections), _freeze(data), mtu,
                wan_enforcement=wan_enforcement, router=router, data_fs=data_fs)
    _drill_tables(data, spec)
    return spec


def _site(raw: Any, i: int) -> SiteSpec:
    where = f"sites[{i}]"
    t = _table(raw, where, _SITE_KEYS)
    name = _name(t.get("name"), f"{where}.name")
    where = f"sites[{i}] ({name})"
    uri = t.get("uri", DEFAULT_URI)
    if not isinstance(uri, str) or len(uri) > 200 or not _URI.fullmatch(uri):
        raise SpecError(f"{where}.uri: {show(uri)} is not a libvirt URI; use e.g. qemu:///system or qemu+ssh://host/system")
    text = t.get("subnet", "")
    try:
        if not isinstance(text, str):
            raise ValueError(text)
        subnet = ipaddress.ip_network(text, strict=True)
    except ValueError:
        raise SpecError(f"{where}.subnet: {show(text)} is not an IPv4 network; use e.g. 198.18.1.0/24") from None
    if subnet.version != 4 or subnet.prefixlen > 29:
        raise SpecError(f"{where}.subnet: {subnet} must be IPv4 with a prefix of /29 or shorter; use e.g. 198.18.1.0/24")
    if not subnet.subnet_of(BENCH_NET):  # type: ignore[arg-type]
        raise SpecError(f"{where}.subnet: {subnet} is outside 198.18.0.0/15 (RFC 2544); use e.g. 198.18.1.0/24")
    gw_text = t.get("gateway", str(subnet.broadcast_address - 1))
    gateway = _address(gw_text, subnet, f"{where}.gateway")
    raw_vms = t.get("vms")
    if not isinstance(raw_vms, list | tuple) or not raw_vms:
        raise SpecError(f"{where}.vms: missing; add a [[sites.vms]] table with at least a name")
    if len(raw_vms) > VMS_PER_SITE[1]:
        raise SpecError(f"{where}.vms: {len(raw_vms)} VMs, more than {VMS_PER_SITE[1]}; "
                        f"use at most {VMS_PER_SITE[1]} [[sites.vms]] per site")
    vms = []
    taken = {gateway.ip}
    for j, rv in enumerate(raw_vms):
        vm = _vm(rv, name, subnet, f"{where}.vms[{j}]", default_ip=subnet.network_address + 10 + j)
        if vm.address.ip in taken:
            raise SpecError(f"{where}.vms[{j}].address: {vm.address.ip} is already used in site {name!r}; "
                            "give every VM and the gateway its own address")
        taken.add(vm.address.ip)
        vms.append(vm)
    return SiteSpec(name, uri, subnet, gateway, tuple(vms))


def _vm(raw: Any, site: str, subnet: ipaddress.IPv4Network, where: str, default_ip: Any) -> VmSpec:
    t = _table(raw, where, _VM_KEYS)
    name = _name(t.get("name"), f"{where}.name")
    vcpus = t.get("vcpus", 1)
    if not isinstance(vcpus, int) or isinstance(vcpus, bool) or not VCPUS[0] <= vcpus <= VCPUS[1]:
        raise SpecError(f"{where}.vcpus: {show(vcpus)} must be an integer {VCPUS[0]}-{VCPUS[1]}; use 1 under TCG")
    memory = _size(t.get("memory", "384MiB"), f"{where}.memory", MEMORY, "512MiB, 1GiB", unit=MIB)
    max_memory = _size(t.get("max_memory", memory), f"{where}.max_memory", MEMORY, "768MiB, 1GiB", unit=MIB)
    if max_memory < memory:
        raise SpecError(f"{where}.max_memory: {max_memory // MIB} MiB is below memory ({memory // MIB} MiB); "
                        "raise max_memory or lower memory")
    data_disk = _size(t.get("data_disk", "1GiB"), f"{where}.data_disk", DATA_DISK, "1GiB, 2GiB", unit=MIB)
    address = _address(t.get("address", str(default_ip)), subnet, f"{where}.address")
    return VmSpec(name, site, vcpus, memory, max_memory, data_disk, address)


WAN_ENFORCEMENT = ("auto", "host", "guest", "router")
"""``[wan] enforcement``: netem on the host's tap interfaces (needs sch_netem in the host kernel), in
the guests on each site VM's ingress (IFB), on the egress of a router guest between the sites, or
auto (host when it has sch_netem, else guest)."""
_WAN_OWN_KEYS = ("enforcement", "mode")


def _wan(raw: Any) -> Any:
    if not isinstance(raw, Mapping):
        raise SpecError("wan: must be a table, e.g. [wan] delay = \"25ms\"")
    from netem.profile import PROFILE_KEYS, SUBTABLES, LinkProfile, ProfileError

    _known(raw, "wan", {*PROFILE_KEYS, *SUBTABLES, *_WAN_OWN_KEYS})
    for sub in SUBTABLES:
        if isinstance(raw.get(sub), Mapping):
            _known(raw[sub], f"wan.{sub}", set(PROFILE_KEYS))
    try:
        return LinkProfile.from_mapping(dict(raw), "wan", ignore=_WAN_OWN_KEYS)
    except ProfileError as err:
        raise SpecError(str(err)) from None


def _wan_enforcement(raw: Any) -> str:
    """``wan.enforcement`` (``wan.mode`` is an alias): auto, host, guest or router."""
    if not isinstance(raw, Mapping):
        return "auto"
    given = {k: raw[k] for k in _WAN_OWN_KEYS if k in raw}
    for key, value in given.items():
        check_wan_enforcement(value, f"wan.{key}")
    if len(set(given.values())) > 1:
        raise SpecError(f"wan.mode: {given['mode']!r} contradicts wan.enforcement = {given['enforcement']!r}; "
                        "keep only wan.enforcement")
    return next(iter(given.values()), "auto")


def check_wan_enforcement(value: Any, where: str) -> str:
    """Validate an enforcement choice (spec field or environment variable ``where``); one-line errors."""
    if value not in WAN_ENFORCEMENT:
        raise SpecError(f"{where}: {show(value)} is not one of {', '.join(WAN_ENFORCEMENT)}; use auto "
                        "(netem on the host when its kernel has sch_netem, else in the guests)")
    return value


# --- [workload], [fec], [faults]: checked here, read by the drill (testbed.drill.vm.DrillConfig) ----------


def _drill_tables(data: Mapping[str, Any], spec: Spec) -> None:
    """Type and bound every field of the drill's tables, so that a bad one is refused when the spec is
    loaded, before any VM boots (the drill reads them again, already valid)."""
    from netem.profile import ProfileError, parse_percent, parse_time_us
    from smfs.fec import MAX_R
    from testbed.schedule import SCHEDULES, ScheduleError, parse_during

    wl = _table(data.get("workload", {}), "workload", DRILL_KEYS["workload"])
    fec = _table(data.get("fec", {}), "fec", DRILL_KEYS["fec"])
    faults = _table(data.get("faults", {}), "faults", DRILL_KEYS["faults"])
    try:
        _whole(wl.get("testers", 64), "workload.testers", TESTERS, "64")
        _whole(wl.get("server_pairs", 8), "workload.server_pairs", SERVER_PAIRS, "8")
        _size(wl.get("append_size", "512KiB"), "workload.append_size", APPEND_SIZE, "64KiB, 512KiB, 1MiB")
        duration = _seconds(wl.get("duration", "60s"), "workload.duration", DURATION, '"60s"', parse_time_us)
        _whole(fec.get("r", 8), "fec.r", (1, MAX_R), "8")
        _whole(fec.get("c", 3), "fec.c", FEC_LAYERS, "3 (repair layers with interleaves 1, 11, 19; c = k runs the "
               "first k)")
        flush = parse_time_us(fec.get("flush", "5ms"), "fec.flush") / 1e6
        if not FLUSH[0] < flush <= FLUSH[1]:
            raise SpecError(f'fec.flush: must be within (0, 1000] ms, e.g. "5ms"; got {show(fec["flush"])}')
        if fec.get("engine", "c") not in FEC_ENGINES:
            raise SpecError('fec.engine: use "c" (the compiled data path) or "python" (the specification); '
                            f"got {show(fec['engine'])}")
        name = faults.get("schedule", "rolling-disaster")
        if name not in SCHEDULES:
            raise SpecError(f"faults.schedule: unknown schedule {show(name)}; use one of {', '.join(SCHEDULES)}")
        fail_at = parse_time_us(faults.get("fail_at", f"{duration * 0.6:g}s"), "faults.fail_at") / 1e6
        if not 0 < fail_at <= duration:
            raise SpecError(f"faults.fail_at: {show(faults.get('fail_at'))} must be within workload.duration "
                            f"({duration:g} s) and after 0 s; e.g. \"{duration * 0.6:g}s\"")
        if faults.get("instant", "time") not in INSTANTS:
            raise SpecError(f"faults.instant: {show(faults.get('instant'))} is not one of {', '.join(INSTANTS)}; "
                            "\"time\" strikes at fail_at, \"ack\" at the first acked append after it")
        if not 0 < parse_percent(faults.get("burst_loss", "1%"), "faults.burst_loss") <= 100:
            raise SpecError(f"faults.burst_loss: {show(faults['burst_loss'])} must be above 0% and at most 100%; "
                            "use e.g. \"1%\"")
        _seconds(faults.get("burst", "500ms"), "faults.burst", BURST, '"500ms"', parse_time_us)
        _seconds(faults.get("drain_timeout", "60s"), "faults.drain_timeout", DRAIN_TIMEOUT, '"60s"', parse_time_us,
                 low_open=False)
        entries = faults.get("during")
        if isinstance(entries, list | tuple):
            for i, entry in enumerate(entries):
                if isinstance(entry, Mapping):
                    _known(entry, f"faults.during[{i}]", {"fault", "at", "for", "vm", "site", "to", "loss"})
                    for key in ("vm", "site", "loss", "to"):
                        if key in entry and not isinstance(entry[key], str):
                            raise SpecError(f"faults.during[{i}].{key}: {show(entry[key])} is not a string; "
                                            "write it in quotes, e.g. \"mirror\", \"5%\", \"256MiB\"")
        parse_during(entries, spec, fail_at)
    except (ProfileError, ScheduleError) as err:
        raise SpecError(str(err)) from None


# --- typed fields ---------------------------------------------------------------------------------


def _address(text: Any, subnet: ipaddress.IPv4Network, where: str) -> ipaddress.IPv4Interface:
    try:
        if not isinstance(text, str):
            raise ValueError(text)
        ip = ipaddress.ip_address(text.split("/")[0])
    except ValueError:
        raise SpecError(f"{where}: {show(text)} is not an IPv4 address; use e.g. {subnet.network_address + 10}") from None
    if ip not in subnet or ip in (subnet.network_address, subnet.broadcast_address):
        raise SpecError(f"{where}: {ip} is not a host address of {subnet}; pick one inside the site's subnet")
    return ipaddress.IPv4Interface(f"{ip}/{subnet.prefixlen}")


def _key(k: Any) -> str:
    """A field name for a message: as written when plain, else quoted and escaped."""
    return k if isinstance(k, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,40}", k) else show(k)


def _known(raw: Mapping[str, Any], where: str, keys: set[str], kind: str = "field") -> None:
    """Refuse the first key of ``raw`` not in ``keys`` (``where.key: unknown field; use one of ...``)."""
    extra = [k for k in raw if k not in keys]
    if extra:
        first = sorted(extra, key=str)[0]
        prefix = f"{where}." if where else ""
        raise SpecError(f"{prefix}{_key(first)}: unknown {kind}; use one of {', '.join(sorted(keys))}")


def _table(raw: Any, where: str, keys: set[str]) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise SpecError(f"{where}: must be a table; see specs/ci.toml for the layout")
    _known(raw, where, keys)
    return raw


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise SpecError(f"{where}: {show(value)} is not a valid name; {_NAME_FIX}")
    return value


def check_name(value: Any, where: str) -> str:
    """A testbed name (``name``, also a clone's: it names the VMs, bridges and folders); one-line error."""
    return _name(value, where)


def _size(value: Any, where: str, bounds: tuple[int, int], example: str, unit: int = 1) -> int:
    """A size in bytes within ``bounds`` and a whole number of ``unit`` bytes."""
    fix = f"use e.g. {example}"
    try:
        n = parse_size(value, where, high=bounds[1], example=example)
    except ValueError as err:
        raise SpecError(str(err)) from None
    if n < bounds[0]:
        raise SpecError(f"{where}: {show(value)} is below the minimum {format_size(bounds[0])}; {fix}")
    if n > bounds[1]:
        raise SpecError(f"{where}: {show(value)} is above the maximum {format_size(bounds[1])}; {fix}")
    if n % unit:
        raise SpecError(f"{where}: {show(value)} is not a whole number of {format_size(unit)}; {fix}")
    return n


def _whole(value: Any, where: str, bounds: tuple[int, int], example: str) -> int:
    """An integer (not a bool, not 3.9) within ``bounds``."""
    if isinstance(value, bool) or not isinstance(value, int) or not bounds[0] <= value <= bounds[1]:
        raise SpecError(f"{where}: {show(value)} is not a whole number from {bounds[0]} to {bounds[1]}; "
                        f"use e.g. {example}")
    return value


def _number(value: Any, where: str, bounds: tuple[float, float], example: str) -> float:
    """A finite number (int or float, not a bool) within ``bounds``; NaN and infinities fail the comparison."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not bounds[0] <= value <= bounds[1]:
        raise SpecError(f"{where}: {show(value)} is not a number from {bounds[0]:g} to {bounds[1]:g}; use e.g. {example}")
    return float(value)


def _seconds(value: Any, where: str, bounds: tuple[float, float], example: str, parse: Any,
             low_open: bool = True) -> float:
    """A duration with its unit ("20s", "500ms") within ``bounds`` (s; the low end excluded when ``low_open``)."""
    s = parse(value, where) / 1e6
    low_ok = s > bounds[0] if low_open else s >= bounds[0]
    if not (low_ok and s <= bounds[1]):
        span = f"{'(' if low_open else '['}{bounds[0]:g} s, {bounds[1]:g} s]"
        raise SpecError(f"{where}: {show(value)} is outside {span}; use e.g. {example}")
    return s


def _unique(names: list[str], where: str) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise SpecError(f"{where}: {n!r} appears twice; names must be unique")
        seen.add(n)


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """A frozen section back as plain dicts and lists (for JSON and for other modules' parsers)."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value
