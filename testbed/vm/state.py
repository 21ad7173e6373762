"""What ``state.json`` keeps of a VM testbed, as typed, frozen records, and the atomic write that
keeps it whole; :class:`Bed` is what the WAN and the faults need of a running testbed.

Pure data, no libvirt: :mod:`testbed.vm.bed` (the only writer, through ``VmTestbed.update``) and the
modules that read a testbed's state (:mod:`testbed.vm.wan`) import it from here, so they need not import
each other.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from testbed.spec import Spec
    from testbed.vm.guest import Guest

_WAN_STATE = ("wan_profile", "wan_bare", "wan_enforcement")
"""The state's fields that describe the WAN's realised shape (kept per snapshot, put back by restore)."""


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
    data_socket: str = ""  # nbdkit's unix socket serving the data disk (``data`` is its raw file)


@dataclass(frozen=True)
class RouterLeg:
    """The router guest's NIC on one site's bridge (kept in state.json)."""

    bridge: str
    address: str  # 198.18.1.253/24
    mac: str
    ifname: str = ""  # eth0, eth1...: set once the guest has been asked (:func:`_configure_router`)


@dataclass(frozen=True)
class RouterState:
    """What state.json keeps of the WAN router guest: per site its leg, in the spec's order (the first
    is eth0's), and per site the routes its VMs take through it (``[subnet, via]``)."""

    vm: str
    legs: dict[str, RouterLeg]
    routes: dict[str, list[list[str]]] = field(default_factory=dict)

    def with_legs(self, **changes: dict[str, str]) -> RouterState:
        """A copy with ``changes[field][site]`` set on each named leg, e.g. ``with_legs(ifname={"primary": "eth0"})``."""
        legs = {site: replace(leg, **{k: v[site] for k, v in changes.items() if site in v})
                for site, leg in self.legs.items()}  # fmt: skip
        return replace(self, legs=legs)

    def to_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "legs": {site: asdict(leg) for site, leg in self.legs.items()}, "routes": self.routes}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RouterState:
        return cls(vm=data["vm"], legs={site: RouterLeg(**leg) for site, leg in data["legs"].items()},
                   routes=data.get("routes", {}))


WanShape = dict[str, Any]
"""One of the WAN's recorded facts as JSON (a profile, the bare path's RTT, the enforcement point)."""


@dataclass(frozen=True, kw_only=True)
class VmTestbedState:
    """Everything ``state.json`` keeps of a testbed; the field names are the file's keys, and a field
    that is None is left out of the file (a missing key reads back as its default). Only
    :class:`VmTestbed` writes it (:meth:`VmTestbed.update`)."""

    name: str
    spec: dict[str, Any]  # the spec as a mapping (testbed.spec.thaw), read back with spec.from_mapping
    spec_path: str
    image: str | None = None  # the guest image's key
    accel: str
    accel_reason: str | None = None
    boot_timeout: float = 120
    run_as_root: bool = False
    vms: tuple[VmInfo, ...] = ()
    snapshots: tuple[str, ...] = ()  # oldest first
    t_up: float | None = None
    router: RouterState | None = None
    wan_enforcement: dict[str, str] | None = None  # {"point", "requested", "reason"} (testbed.vm.wan.enforcement)
    wan_profile: WanShape | None = None  # the WAN's current shape (testbed.vm.wan.remember)
    wan_bare: WanShape | None = None  # the bare path's RTT as last measured (testbed.vm.wan.calibrate)
    snapshot_wan: dict[str, dict[str, WanShape | None]] | None = None  # per snapshot the _WAN_STATE fields
    drill_wan: dict[str, Any] | None = None  # the drill's WAN facts of snapshot "ready" (testbed.drill.vm.prepare)

    def wan_state(self) -> dict[str, WanShape | None]:
        """The fields that describe the WAN's realised shape (kept per snapshot, put back by restore)."""
        return {k: getattr(self, k) for k in _WAN_STATE}

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name == "vms":
                value = [asdict(v) for v in value]
            elif f.name == "snapshots":
                value = list(value)
            elif f.name == "router":
                value = value.to_json()
            out[f.name] = value
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any], name: str) -> VmTestbedState:
        """The state of ``data`` (a parsed state.json; keys this version does not know are ignored)."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in data.items() if k in known and v is not None}
        kw.setdefault("name", name)
        kw["vms"] = tuple(VmInfo(**v) for v in data["vms"])
        kw["snapshots"] = tuple(kw.get("snapshots", ()))
        if data.get("router"):
            kw["router"] = RouterState.from_json(data["router"])
        else:
            kw.pop("router", None)
        return cls(**kw)


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync it, then rename it over ``path``: a
    reader (or a crash) sees the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


class Bed(Protocol):
    """What the WAN's shaping (:mod:`testbed.vm.wan`) needs of a running VM testbed
    (:class:`testbed.vm.bed.VmTestbed` is one): its spec and state, the one way to change the state,
    and per VM its record, libvirt domain and guest agent."""

    @property
    def state(self) -> VmTestbedState: ...

    def update(self, **changes: Any) -> VmTestbedState: ...

    @property
    def vms(self) -> dict[str, VmInfo]: ...

    @property
    def spec(self) -> Spec: ...

    def info(self, vm: str) -> VmInfo: ...

    def domain(self, vm: str) -> Any: ...  # libvirt.virDomain

    def guest(self, vm: str) -> Guest: ...
