"""The nemesis of the VM testbed: each fault is a small object with ``setup`` / ``inject`` / ``heal``.

Faults act on a running :class:`~testbed.vm.bed.VmTestbed` and log every injection, with its time,
into a :class:`Timeline` so a result shows exactly what happened when. ``schedule(name, ...)`` builds
the fault list of a spec's ``[faults] schedule``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from netem.profile import LinkProfile
from testbed.errors import TestbedError
from testbed.progress import Say
from testbed.schedule import SCHEDULES, DuringEntry, ScheduleError, parse_during

if TYPE_CHECKING:  # testbed.vm.bed loads libvirt, which the namespace drill's faults never need
    from testbed.vm.bed import VmTestbed

Bed = TypeVar("Bed")
"""What a fault acts on: the VM testbed (every fault here), or the namespace drill's bed
(``testbed.drill.local.NsFault``); :class:`Runner` passes it through untouched."""


class FaultError(TestbedError, RuntimeError):
    """A fault could not be injected or healed; the message is one line."""


@dataclass
class Timeline:
    """Events with seconds since ``origin`` (host wall clock); ``mark`` also prints them."""

    say: Say = print
    origin: float = field(default_factory=time.time)
    events: list[dict[str, Any]] = field(default_factory=list)
    prefix: str = ""
    gate: Callable[[], None] | None = None
    """Called once, right before the disaster's instant (:func:`site_instant`): the drill's ``instant =
    "ack"`` waits there for the next acked append (:func:`testbed.drill.runner.await_ack`)."""

    def pass_gate(self) -> None:
        """Run the gate (once) if there is one."""
        gate, self.gate = self.gate, None
        if gate is not None:
            gate()

    def mark(self, event: str, **extra: Any) -> float:
        now = time.time()
        self.events.append({"t": round(now - self.origin, 3), "event": event, **extra})
        self.say(f"{self.prefix}{event}")
        return now


class Fault(Generic[Bed]):
    """Base: ``setup`` before the workload, ``inject`` at its time, ``heal`` after (all optional)."""

    name = "fault"

    def setup(self, tb: Bed, tl: Timeline) -> None:
        return None

    def inject(self, tb: Bed, tl: Timeline) -> None:
        raise NotImplementedError

    def heal(self, tb: Bed, tl: Timeline) -> None:
        return None


VmFault = Fault["VmTestbed"]
"""A fault of the VM testbed."""


@dataclass(frozen=True)
class LinkCut(VmFault):
    """Cut (or restore on heal) every NIC of a site through libvirt: nothing more leaves or enters."""

    site: str
    name = "link-cut"

    def inject(self, tb: VmTestbed, tl: Timeline) -> None:
        for vm in tb.site_vms(self.site):
            tb.set_link(vm, False)
        tl.mark(f"WAN cut: {self.site} link down", site=self.site)

    def heal(self, tb: VmTestbed, tl: Timeline) -> None:
        for vm in tb.site_vms(self.site):
            if tb.domain(vm).isActive():
                tb.set_link(vm, True)
        tl.mark(f"WAN healed: {self.site} link up", site=self.site)


def site_instant(tb: VmTestbed, tl: Timeline, site: str, what: str = "power cut") -> float:
    """The site's disaster as one instant (``tb.disaster``: every VM frozen at once, then its links
    cut, then destroyed); marks it in the timeline with ``instant`` (host time) and returns it."""
    tl.pass_gate()
    took = tb.disaster(site)
    t = took["t_instant"]
    tl.mark(f"{site} site: {what} at the instant (VMs frozen together in {took['freeze_s'] * 1000:.2f} ms, "
            f"then links cut and VMs destroyed)", site=site, instant=t, instant_t=round(t - tl.origin, 3),
            freeze_s=took["freeze_s"], destroy_s=took["destroy_s"], taps=took.get("taps"))
    return t


@dataclass(frozen=True)
class SitePowerCut(VmFault):
    """The site's disaster at one instant: its VMs frozen together, links cut, VMs destroyed (no
    shutdown, no flush)."""

    site: str
    name = "site-power-cut"

    def inject(self, tb: VmTestbed, tl: Timeline) -> None:
        site_instant(tb, tl, self.site)


@dataclass(frozen=True)
class LossBurst(VmFault):
    """Raise the WAN's loss to ``loss`` (both directions) for ``seconds``; heal restores ``base``."""

    base: LinkProfile
    loss: str = "1%"
    seconds: float = 0.5
    name = "loss-burst"

    def inject(self, tb: VmTestbed, tl: Timeline) -> None:
        from testbed.vm import wan

        wan.shape(tb, self.base.with_changes(loss=self.loss))
        tl.mark(f"WAN loss raised to {self.loss}", loss=self.loss)

    def heal(self, tb: VmTestbed, tl: Timeline) -> None:
        from testbed.vm import wan

        wan.shape(tb, self.base)
        tl.mark(f"WAN loss back to {self.base.describe()}")


@dataclass(frozen=True)
class RollingDisaster(VmFault):
    """The paper's: raise WAN loss briefly, then the primary site's disaster at one instant (frozen,
    links cut, destroyed)."""

    base: LinkProfile
    loss: str = "1%"
    burst_seconds: float = 0.5
    site: str = "primary"
    name = "rolling-disaster"

    def inject(self, tb: VmTestbed, tl: Timeline) -> None:
        LossBurst(self.base, self.loss, self.burst_seconds).inject(tb, tl)
        time.sleep(self.burst_seconds)
        site_instant(tb, tl, self.site, "disaster")


@dataclass(frozen=True)
class Partition(VmFault):
    """Cut both directions between the sites (the primary's links); heal restores them."""

    site: str = "primary"
    name = "partition"

    def inject(self, tb: VmTestbed, tl: Timeline) -> None:
        LinkCut(self.site).inject(tb, tl)

    def heal(self, tb: VmTestbed, tl: Timeline) -> None:
        LinkCut(self.site).heal(tb, tl)


@dataclass(frozen=True)
class Freeze(VmFault):
    """Pause a VM (QMP stop: packets queue, nothing is lost); heal resumes it (QMP cont)."""

    vm: str
    name = "freeze"

    def inject(self, tb: VmTestbed, tl: Timeline) -> None:
        tb.qmp(self.vm).freeze()
        tl.mark(f"{self.vm} frozen (QMP stop)", vm=self.vm)

    def heal(self, tb: VmTestbed, tl: Timeline) -> None:
        tb.qmp(self.vm).thaw()
        tl.mark(f"{self.vm} resumed (QMP cont)", vm=self.vm)


@dataclass(frozen=True)
class MirrorDiskFailure(VmFault):
    """The mirror's data disk fails every read and write with EIO; heal removes the failure."""

    vm: str = "mirror"
    name = "mirror-disk-failure"

    def inject(self, tb: VmTestbed, tl: Timeline) -> None:
        tb.fail_disk(self.vm)
        tl.mark(f"{self.vm} data disk failing (EIO)", vm=self.vm)

    def heal(self, tb: VmTestbed, tl: Timeline) -> None:
        how = tb.heal_disk(self.vm)
        tl.mark(f"{self.vm} data disk healed ({how})", vm=self.vm)


@dataclass(frozen=True)
class BalloonSqueeze(VmFault):
    """Shrink a VM's memory under load to ``mib``; heal gives back ``restore_mib``."""

    vm: str
    mib: int
    restore_mib: int
    name = "balloon-squeeze"

    def inject(self, tb: VmTestbed, tl: Timeline) -> None:
        got = tb.balloon(self.vm, self.mib)
        tl.mark(f"{self.vm} ballooned to {self.mib} MiB", vm=self.vm, guest_total_mib=got["guest_total_mib"])

    def heal(self, tb: VmTestbed, tl: Timeline) -> None:
        tb.balloon(self.vm, self.restore_mib)
        tl.mark(f"{self.vm} ballooned back to {self.restore_mib} MiB", vm=self.vm)


@dataclass(frozen=True)
class MirrorRestart(VmFault):
    """The mirror site's storage servers crash (SIGKILL of their process session in the mirror guest; the
    guest's page cache survives, as after a process crash) and start again on heal with ``argv``, the
    command line the drill starts them with (:func:`testbed.drill.vm.mirror_argv`), recovering their logs
    before they answer. The primary does not reconnect: it fails what is pending and every later append
    (its testers stop), the stack's behaviour, as after the namespace campaign's ``mirror-restart``."""

    argv: tuple[str, ...]
    defects: tuple[str, ...] = ()  # SMFS_DEFECT of the restarted site: a seeded defect stays seeded
    vm: str = "mirror"
    name = "mirror-restart"

    def inject(self, tb: VmTestbed, tl: Timeline) -> None:
        from testbed.vm.guestproc import RUN_DIR as RUN

        g = tb.guest(self.vm)
        pid = g.find("mirror-site")
        g.stop("mirror-site", signal="KILL", wait=2)
        g.sh(f"rm -f {RUN}/mirror/mirror.ready")
        tl.mark(f"mirror site crashed in {self.vm} (SIGKILL of pid {pid})", vm=self.vm, killed=pid)

    def heal(self, tb: VmTestbed, tl: Timeline) -> None:
        from testbed.vm.guestproc import RUN_DIR as RUN
        from testbed.vm.guestproc import wait_file

        g = tb.guest(self.vm)
        t0 = time.monotonic()
        g.spawn("mirror-site", list(self.argv), env={"SMFS_DEFECT": ",".join(self.defects)} if self.defects else None)
        wait_file(g, f"{RUN}/mirror/mirror.ready", "mirror-site", f"{self.vm} mirror site (restarted)")
        tl.mark(f"mirror site restarted in {self.vm}: logs recovered, listening again after {time.monotonic() - t0:.1f} s",
                vm=self.vm)


@dataclass(frozen=True)
class MirrorPowerOutage(VmFault):
    """The mirror site loses power (every VM destroyed: no shutdown, no flush), and ``gap`` s later
    the primary site too: what the mirror's disks kept is all that is left. The drill then boots
    the mirror again and recovers its logs. Only modes that ack after the mirror's own fsync
    (remote-sync) promise to survive this; network-sync's promise covers a primary-site disaster."""

    site: str = "mirror"
    then: str = "primary"
    gap: float = 1.0
    name = "mirror-power-outage"

    def inject(self, tb: VmTestbed, tl: Timeline) -> None:
        site_instant(tb, tl, self.site, "power outage")
        time.sleep(self.gap)
        site_instant(tb, tl, self.then)


def schedule(name: str, base: LinkProfile, loss: str = "1%", burst_seconds: float = 0.5) -> list[VmFault]:
    """The faults of a spec's ``[faults] schedule``, injected in order at the drill's ``fail_at``."""
    if name == "rolling-disaster":
        return [RollingDisaster(base, loss, burst_seconds)]
    if name == "site-power-cut":
        return [SitePowerCut("primary")]
    if name == "mirror-power-outage":
        return [MirrorPowerOutage()]
    raise ScheduleError(f"faults.schedule: unknown schedule {name!r}; use one of {', '.join(SCHEDULES)}")


# --- faults during the run --------------------------------------------------------------------


@dataclass(frozen=True)
class Timed(Generic[Bed]):
    """A fault injected ``at`` s after the testers start and healed ``seconds`` later."""

    at: float
    seconds: float
    fault: Fault[Bed]

    @property
    def heal_at(self) -> float:
        return self.at + self.seconds

    def describe(self) -> str:
        return f"{self.fault.name} at {self.at:g} s for {self.seconds:g} s"


def during(entries: Any, spec: Any, fail_at: float) -> tuple[Timed[VmTestbed], ...]:
    """The faults of ``[[faults.during]]``, parsed and checked by :func:`testbed.schedule.parse_during`."""
    return tuple(Timed(e.at, e.seconds, _during_fault(e, spec)) for e in parse_during(entries, spec, fail_at))


def _during_fault(e: DuringEntry, spec: Any) -> VmFault:
    if e.kind == "freeze":
        return Freeze(e.vm)
    if e.kind == "mirror-disk-failure":
        return MirrorDiskFailure(e.vm)
    if e.kind == "balloon-squeeze":
        return BalloonSqueeze(e.vm, e.to_mib, e.memory_mib)
    if e.kind == "partition":
        return Partition(e.site)
    return LossBurst(spec.wan, e.loss, e.seconds)


class Runner(Generic[Bed]):
    """Injects and heals the ``during`` faults as the run's clock passes their times.

    ``tick(elapsed)`` does what is due: a fault is injected once ``elapsed`` passes its ``at`` and
    healed ``seconds`` after its injection *began* (``clock()``, s since the testers started), so a
    late tick (a slow guest agent under TCG) shifts a fault but never shortens it. ``heal_all``
    heals what is still active (before the disaster). ``injected`` turns true at the first
    injection: from then on a frozen VM or a failing disk may legitimately stop answering, so the
    drill stops its liveness checks."""

    def __init__(self, timed: tuple[Timed[Bed], ...], tb: Bed, tl: Timeline,
                 clock: Callable[[], float] | None = None) -> None:
        self.pending = list(timed)
        self.active: list[tuple[float, Timed[Bed]]] = []  # (heal at, fault)
        self.tb, self.tl = tb, tl
        self.injected = False
        t0 = time.monotonic()
        self.clock = clock or (lambda: time.monotonic() - t0)

    def tick(self, elapsed: float) -> None:
        while self.pending and self.pending[0].at <= elapsed:
            t = self.pending.pop(0)
            began = self.clock()
            t.fault.inject(self.tb, self.tl)
            self.injected = True
            self.active.append((began + t.seconds, t))
        now = self.clock()
        for heal_at, t in [a for a in self.active if a[0] <= now]:
            self.active.remove((heal_at, t))
            t.fault.heal(self.tb, self.tl)

    def heal_all(self) -> None:
        for _, t in self.active:
            t.fault.heal(self.tb, self.tl)
        self.active.clear()
