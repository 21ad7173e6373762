"""The testbed spec: a TOML file of sites, VMs, addressing, the WAN profile and the workload.

Loaded once into frozen dataclasses; every problem is a ``SpecError`` whose one-line message names
the field and the fix (``sites[1].vms[0].memory: cannot parse 'lots' as a size; use e.g. 512MiB``).
Sections owned by other parts of the project (``workload``, ``stack``, ``faults``, ``drill``, ...)
are kept as read-only mappings for their owners to validate.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from testbed.cli.common import parse_size

MIB = 1 << 20
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,9}$")
_NAME_FIX = "use 1-10 characters a-z, 0-9 or '-', starting with a letter"
_SITE_KEYS = {"name", "uri", "subnet", "gateway", "vms"}
_VM_KEYS = {"name", "vcpus", "memory", "max_memory", "data_disk", "address"}
_TESTBED_KEYS = {"accel", "boot_timeout", "mtu", "data_fs"}
DATA_FILESYSTEMS = ("minix", "ext4")
DEFAULT_URI = "qemu:///system"
# RFC 2544 benchmarking range: never routed on the Internet, rarely used on a LAN.
BENCH_NET = ipaddress.ip_network("198.18.0.0/15")


class SpecError(ValueError):
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
    wan_enforcement: str = "auto"  # where netem runs: auto | host | guest | router (testbed.wan chooses for auto)
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
    """Read and validate a spec file; raises ``SpecError`` with a one-line message."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise SpecError(f"spec file {p} not found; pass an existing file, e.g. --spec specs/ci.toml") from None
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"{p}: not valid TOML ({err}); fix the syntax") from None
    return from_mapping(data, path=str(p), default_name=p.stem)


def from_mapping(data: Mapping[str, Any], path: str = "<memory>", default_name: str = "testbed") -> Spec:
    name = _name(data.get("name", default_name), "name")
    tb = _table(data.get("testbed", {}), "testbed", _TESTBED_KEYS)
    accel = tb.get("accel", "auto")
    if accel not in ("auto", "kvm", "tcg"):
        raise SpecError(f"testbed.accel: {accel!r} is not one of auto, kvm, tcg; use auto (KVM when it works)")
    boot_timeout = _number(tb.get("boot_timeout", 120), "testbed.boot_timeout", low=5)
    mtu = tb.get("mtu", 1500)
    if not isinstance(mtu, int) or isinstance(mtu, bool) or not 1280 <= mtu <= 9000:
        raise SpecError(f"testbed.mtu: {mtu!r} is not a whole number of bytes from 1280 to 9000; "
                        "use 1500 (Ethernet) or 9000 (jumbo frames)")
    data_fs = tb.get("data_fs", "minix")
    if data_fs not in DATA_FILESYSTEMS:
        raise SpecError(f"testbed.data_fs: {data_fs!r} is not one of {', '.join(DATA_FILESYSTEMS)}; use minix "
                        "(nothing is durable that was not fsynced) or ext4 (its journal commits more than asked)")
    raw_sites = data.get("sites")
    if not isinstance(raw_sites, list) or not raw_sites:
        raise SpecError("sites: missing; add at least one [[sites]] table with name, subnet and [[sites.vms]]")
    sites = tuple(_site(s, i) for i, s in enumerate(raw_sites))
    _unique([s.name for s in sites], "sites[].name")
    _unique([v.name for s in sites for v in s.vms], "sites[].vms[].name")
    for i, a in enumerate(sites):
        for b in sites[i + 1:]:
            if a.subnet.overlaps(b.subnet):
                raise SpecError(f"sites: subnets of {a.name!r} ({a.subnet}) and {b.name!r} ({b.subnet}) overlap; "
                                "give each site its own subnet")
    wan = _wan(data.get("wan", {}))
    wan_enforcement = _wan_enforcement(data.get("wan", {}))
    router = None
    if wan_enforcement == "router":
        router = router_spec(sites, "wan.mode" if "enforcement" not in data.get("wan", {}) else "wan.enforcement")
    known = {"name", "testbed", "sites", "wan"}
    sections = {k: _freeze(v) for k, v in data.items() if k not in known}
    return Spec(name, path, accel, boot_timeout, sites, wan, MappingProxyType(sections), _freeze(data), mtu,
                wan_enforcement=wan_enforcement, router=router, data_fs=data_fs)


def _site(raw: Any, i: int) -> SiteSpec:
    where = f"sites[{i}]"
    t = _table(raw, where, _SITE_KEYS)
    name = _name(t.get("name"), f"{where}.name")
    where = f"sites[{i}] ({name})"
    uri = t.get("uri", DEFAULT_URI)
    if not isinstance(uri, str) or "://" not in uri:
        raise SpecError(f"{where}.uri: {uri!r} is not a libvirt URI; use e.g. qemu:///system or qemu+ssh://host/system")
    try:
        subnet = ipaddress.ip_network(t.get("subnet", ""), strict=True)
    except ValueError:
        raise SpecError(f"{where}.subnet: {t.get('subnet')!r} is not an IPv4 network; use e.g. 198.18.1.0/24") from None
    if subnet.version != 4 or subnet.prefixlen > 29:
        raise SpecError(f"{where}.subnet: {subnet} must be IPv4 with a prefix of /29 or shorter; use e.g. 198.18.1.0/24")
    if not subnet.subnet_of(BENCH_NET):  # type: ignore[arg-type]
        raise SpecError(f"{where}.subnet: {subnet} is outside 198.18.0.0/15 (RFC 2544); use e.g. 198.18.1.0/24")
    gw_text = t.get("gateway", str(subnet.broadcast_address - 1))
    gateway = _address(gw_text, subnet, f"{where}.gateway")
    raw_vms = t.get("vms")
    if not isinstance(raw_vms, list) or not raw_vms:
        raise SpecError(f"{where}.vms: missing; add a [[sites.vms]] table with at least a name")
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
    if not isinstance(vcpus, int) or isinstance(vcpus, bool) or not 1 <= vcpus <= 64:
        raise SpecError(f"{where}.vcpus: {vcpus!r} must be an integer 1-64; use 1 under TCG")
    memory = _size(t.get("memory", "384MiB"), f"{where}.memory", low=128 * MIB)
    max_memory = _size(t.get("max_memory", memory), f"{where}.max_memory", low=128 * MIB)
    if max_memory < memory:
        raise SpecError(f"{where}.max_memory: {max_memory // MIB} MiB is below memory ({memory // MIB} MiB); "
                        "raise max_memory or lower memory")
    data_disk = _size(t.get("data_disk", "1GiB"), f"{where}.data_disk", low=64 * MIB)
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
    try:
        from netem.profile import LinkProfile, ProfileError
    except ImportError:  # netem.profile not written yet: keep the raw table
        return _freeze(raw)
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
        raise SpecError(f"{where}: {value!r} is not one of {', '.join(WAN_ENFORCEMENT)}; use auto "
                        "(netem on the host when its kernel has sch_netem, else in the guests)")
    return value


def _address(text: Any, subnet: ipaddress.IPv4Network, where: str) -> ipaddress.IPv4Interface:
    try:
        ip = ipaddress.ip_address(str(text).split("/")[0])
    except ValueError:
        raise SpecError(f"{where}: {text!r} is not an IPv4 address; use e.g. {subnet.network_address + 10}") from None
    if ip not in subnet or ip in (subnet.network_address, subnet.broadcast_address):
        raise SpecError(f"{where}: {ip} is not a host address of {subnet}; pick one inside the site's subnet")
    return ipaddress.IPv4Interface(f"{ip}/{subnet.prefixlen}")


def _table(raw: Any, where: str, keys: set[str]) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise SpecError(f"{where}: must be a table; see specs/ci.toml for the layout")
    extra = sorted(set(raw) - keys)
    if extra:
        raise SpecError(f"{where}.{extra[0]}: unknown field; known fields are {', '.join(sorted(keys))}")
    return raw


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise SpecError(f"{where}: {value!r} is not a valid name; {_NAME_FIX}")
    return value


def _size(value: Any, where: str, low: int) -> int:
    try:
        n = parse_size(value, where)
    except ValueError as err:
        raise SpecError(str(err).replace("64KiB, 512KiB, 1MiB", "512MiB, 1GiB")) from None
    if n < low:
        raise SpecError(f"{where}: {value!r} is below the minimum {low // MIB} MiB; raise it")
    return n


def _number(value: Any, where: str, low: float) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or value < low:
        raise SpecError(f"{where}: {value!r} must be a number ≥ {low}")
    return float(value)


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
