"""The nemesis of the VM testbed: each fault is a small object with ``setup`` / ``inject`` / ``heal``.

Faults act on a running :class:`~testbed.vmbed.VmTestbed` and log every injection, with its time,
into a :class:`Timeline` so a result shows exactly what happened when. ``schedule(name, ...)`` builds
the fault list of a spec's ``[faults] schedule``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from netem.profile import LinkProfile

Say = Callable[[str], None]


class FaultError(RuntimeError):
    """A fault could not be injected or healed; the message is one line."""


@dataclass
class Timeline:
    """Events with seconds since ``origin`` (host wall clock); ``mark`` also prints them."""

    say: Say = print
    origin: float = field(default_factory=time.time)
    events: list[dict[str, Any]] = field(default_factory=list)
    prefix: str = ""

    def mark(self, event: str, **extra: Any) -> float:
        now = time.time()
        self.events.append({"t": round(now - self.origin, 3), "event": event, **extra})
        self.say(f"{self.prefix}{event}")
        return now


class Fault:
    """Base: ``setup`` before the workload, ``inject`` at its time, ``heal`` after (all optional)."""

    name = "fault"

    def setup(self, tb: Any, tl: Timeline) -> None:
        return None

    def inject(self, tb: Any, tl: Timeline) -> None:
        raise NotImplementedError

    def heal(self, tb: Any, tl: Timeline) -> None:
        return None


@dataclass(frozen=True)
class LinkCut(Fault):
    """Cut (or restore on heal) every NIC of a site through libvirt: nothing more leaves or enters."""

    site: str
    name = "link-cut"

    def inject(self, tb: Any, tl: Timeline) -> None:
        for vm in tb.site_vms(self.site):
            tb.set_link(vm, False)
        tl.mark(f"WAN cut: {self.site} link down", site=self.site)

    def heal(self, tb: Any, tl: Timeline) -> None:
        for vm in tb.site_vms(self.site):
            if tb.domain(vm).isActive():
                tb.set_link(vm, True)
        tl.mark(f"WAN healed: {self.site} link up", site=self.site)


@dataclass(frozen=True)
class SitePowerCut(Fault):
    """Cut the site's links, then destroy every VM of the site (no shutdown, no flush)."""

    site: str
    name = "site-power-cut"

    def inject(self, tb: Any, tl: Timeline) -> None:
        for vm in tb.site_vms(self.site):
            tb.set_link(vm, False)
        tl.mark(f"{self.site} site: links cut", site=self.site)
        took = tb.power_cut(self.site)
        tl.mark(f"{self.site} site: power cut (VMs destroyed)", site=self.site,
                destroy_s={vm: round(s, 2) for vm, s in took.items()})


@dataclass(frozen=True)
class LossBurst(Fault):
    """Raise the WAN's loss to ``loss`` (both directions) for ``seconds``; heal restores ``base``."""

    base: LinkProfile
    loss: str = "1%"
    seconds: float = 0.5
    name = "loss-burst"

    def inject(self, tb: Any, tl: Timeline) -> None:
        from testbed import wan

        wan.shape(tb, self.base.with_changes(loss=self.loss))
        tl.mark(f"WAN loss raised to {self.loss}", loss=self.loss)

    def heal(self, tb: Any, tl: Timeline) -> None:
        from testbed import wan

        wan.shape(tb, self.base)
        tl.mark(f"WAN loss back to {self.base.describe()}")


@dataclass(frozen=True)
class RollingDisaster(Fault):
    """The paper's: raise WAN loss briefly, then cut the WAN, then power-cut the primary site."""

    base: LinkProfile
    loss: str = "1%"
    burst_seconds: float = 0.5
    site: str = "primary"
    name = "rolling-disaster"

    def inject(self, tb: Any, tl: Timeline) -> None:
        LossBurst(self.base, self.loss, self.burst_seconds).inject(tb, tl)
        time.sleep(self.burst_seconds)
        LinkCut(self.site).inject(tb, tl)
        took = tb.power_cut(self.site)
        tl.mark(f"{self.site} site: power cut (VMs destroyed)", site=self.site,
                destroy_s={vm: round(s, 2) for vm, s in took.items()})


@dataclass(frozen=True)
class Partition(Fault):
    """Cut both directions between the sites (the primary's links); heal restores them."""

    site: str = "primary"
    name = "partition"

    def inject(self, tb: Any, tl: Timeline) -> None:
        LinkCut(self.site).inject(tb, tl)

    def heal(self, tb: Any, tl: Timeline) -> None:
        LinkCut(self.site).heal(tb, tl)


@dataclass(frozen=True)
class Freeze(Fault):
    """Pause a VM (QMP stop: packets queue, nothing is lost); heal resumes it (QMP cont)."""

    vm: str
    name = "freeze"

    def inject(self, tb: Any, tl: Timeline) -> None:
        tb.qmp(self.vm).freeze()
        tl.mark(f"{self.vm} frozen (QMP stop)", vm=self.vm)

    def heal(self, tb: Any, tl: Timeline) -> None:
        tb.qmp(self.vm).thaw()
        tl.mark(f"{self.vm} resumed (QMP cont)", vm=self.vm)


@dataclass(frozen=True)
class MirrorDiskFailure(Fault):
    """The mirror's data disk fails every read and write with EIO; heal removes the failure."""

    vm: str = "mirror"
    name = "mirror-disk-failure"

    def inject(self, tb: Any, tl: Timeline) -> None:
        tb.fail_disk(self.vm)
        tl.mark(f"{self.vm} data disk failing (EIO)", vm=self.vm)

    def heal(self, tb: Any, tl: Timeline) -> None:
        how = tb.heal_disk(self.vm)
        tl.mark(f"{self.vm} data disk healed ({how})", vm=self.vm)


@dataclass(frozen=True)
class BalloonSqueeze(Fault):
    """Shrink a VM's memory under load to ``mib``; heal gives back ``restore_mib``."""

    vm: str
    mib: int
    restore_mib: int
    name = "balloon-squeeze"

    def inject(self, tb: Any, tl: Timeline) -> None:
        got = tb.balloon(self.vm, self.mib)
        tl.mark(f"{self.vm} ballooned to {self.mib} MiB", vm=self.vm, guest_total_mib=got["guest_total_mib"])

    def heal(self, tb: Any, tl: Timeline) -> None:
        tb.balloon(self.vm, self.restore_mib)
        tl.mark(f"{self.vm} ballooned back to {self.restore_mib} MiB", vm=self.vm)


SCHEDULES = ("rolling-disaster", "site-power-cut")
"""Schedules a drill can run: each ends with the primary site's power cut (the drill's question)."""


def schedule(name: str, base: LinkProfile, loss: str = "1%", burst_seconds: float = 0.5) -> list[Fault]:
    """The faults of a spec's ``[faults] schedule``, injected in order at the drill's ``fail_at``."""
    if name == "rolling-disaster":
        return [RollingDisaster(base, loss, burst_seconds)]
    if name == "site-power-cut":
        return [SitePowerCut("primary")]
    raise FaultError(f"faults.schedule: unknown schedule {name!r}; use one of {', '.join(SCHEDULES)}")
