"""A spec's fault schedule as data: the disasters a drill can end with and the faults it can inject
during the run, parsed and checked when the spec is loaded (``testbed.spec``), before anything boots.

Pure: no fault objects, no libvirt. :mod:`testbed.drill.faults` turns a :class:`DuringEntry` into the fault
that acts on a testbed, so the spec sits below the faults and imports point down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from netem.profile import parse_percent, parse_time_us
from smfs.modes import SCHEDULES
from smfs.units import parse_size
from testbed.errors import UserError

__all__ = ["DURING", "SCHEDULES", "DuringEntry", "ScheduleError", "parse_during"]


class ScheduleError(UserError, ValueError):
    """A spec's fault schedule is invalid; the message is one line naming the field and the fix."""


DURING = ("freeze", "partition", "loss-burst", "mirror-disk-failure", "balloon-squeeze")
"""Faults a spec can schedule during the run (``[[faults.during]]``), each healed after ``for``."""

_DURING_KEYS = {
    "freeze": {"vm"}, "partition": {"site"}, "loss-burst": {"loss"}, "mirror-disk-failure": {"vm"},
    "balloon-squeeze": {"vm", "to"},
}


@dataclass(frozen=True)
class DuringEntry:
    """One checked ``[[faults.during]]`` entry: the fault's kind, when and for how long, and its target
    (``vm`` for freeze, mirror-disk-failure and balloon-squeeze, ``site`` for partition, ``loss`` for a
    loss burst, ``to_mib``/``memory_mib`` for a balloon squeeze)."""

    kind: str
    at: float
    seconds: float
    vm: str = ""
    site: str = ""
    loss: str = ""
    to_mib: int = 0
    memory_mib: int = 0


def parse_during(entries: Any, spec: Any, fail_at: float) -> tuple[DuringEntry, ...]:
    """Parse and validate ``[[faults.during]]``: ``fault``, ``at``, ``for`` and the fault's own keys.

    Every fault must heal before ``fail_at`` (the disaster); errors are one line naming the entry
    and the field, e.g. ``faults.during[1].vm: no VM 'mirorr'; VMs: primary, mirror``."""
    if entries is None:
        return ()
    if not isinstance(entries, (list, tuple)):
        raise ScheduleError("faults.during: must be a list of tables ([[faults.during]] with fault, at, for)")
    out = [_entry(f"faults.during[{i}]", raw, spec, fail_at) for i, raw in enumerate(entries)]
    out.sort(key=lambda e: e.at)
    return tuple(out)


def _entry(where: str, raw: Any, spec: Any, fail_at: float) -> DuringEntry:
    if not hasattr(raw, "get"):
        raise ScheduleError(f"{where}: must be a table with fault, at and for")
    kind = raw.get("fault")
    if kind not in DURING:
        raise ScheduleError(f"{where}.fault: {kind!r} is not one of {', '.join(DURING)}")
    extra = set(raw) - {"fault", "at", "for"} - _DURING_KEYS[kind]
    if extra:
        raise ScheduleError(f"{where}: unknown key(s) {', '.join(sorted(extra))} for {kind}; "
                            f"it takes at, for{''.join(', ' + k for k in sorted(_DURING_KEYS[kind]))}")
    for key in ("at", "for"):
        if key not in raw:
            raise ScheduleError(f"{where}.{key}: missing; give a time like \"5s\"")
    at = parse_time_us(raw["at"], f"{where}.at") / 1e6
    seconds = parse_time_us(raw["for"], f"{where}.for") / 1e6
    if seconds <= 0:
        raise ScheduleError(f"{where}.for: must be positive, e.g. \"2s\"")
    if at + seconds >= fail_at:
        raise ScheduleError(f"{where}: heals at {at + seconds:g} s, not before faults.fail_at ({fail_at:g} s); "
                            "inject it earlier or make it shorter")
    if kind in ("freeze", "mirror-disk-failure", "balloon-squeeze"):
        vms = {vm.name: vm for vm in spec.vms}
        vm = raw.get("vm", "mirror" if kind != "balloon-squeeze" else "primary")
        if vm not in vms:
            raise ScheduleError(f"{where}.vm: no VM {vm!r}; VMs: {', '.join(vms)}")
        if kind != "balloon-squeeze":
            return DuringEntry(kind, at, seconds, vm=vm)
        if "to" not in raw:
            raise ScheduleError(f"{where}.to: missing; give the squeezed memory, e.g. \"256MiB\"")
        mib = parse_size(str(raw["to"]), f"{where}.to") // (1 << 20)
        if not 128 <= mib < vms[vm].memory_mib:
            raise ScheduleError(f"{where}.to: {mib} MiB must be at least 128 MiB and below the VM's "
                                f"{vms[vm].memory_mib} MiB")
        return DuringEntry(kind, at, seconds, vm=vm, to_mib=mib, memory_mib=vms[vm].memory_mib)
    if kind == "partition":
        sites = {site.name for site in spec.sites}
        site = raw.get("site", "primary")
        if site not in sites:
            raise ScheduleError(f"{where}.site: no site {site!r}; sites: {', '.join(sorted(sites))}")
        return DuringEntry(kind, at, seconds, site=site)
    loss = str(raw.get("loss", "5%"))
    if not 0 < parse_percent(loss, f"{where}.loss") <= 100:
        raise ScheduleError(f"{where}.loss: must be above 0 % and at most 100 %, e.g. \"5%\"")
    return DuringEntry(kind, at, seconds, loss=loss)
