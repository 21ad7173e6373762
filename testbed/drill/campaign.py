"""A randomized fault campaign, in the spirit of Jepsen's nemesis loops: ``./inv campaign``.

Each run draws a **schedule** from its own seed (``run_seed(campaign_seed, i)``): the workload's shape
(testers, append size, server pairs, the WAN's base loss), the faults during the run (which, when, how
long: partitions, freezes, loss bursts, mirror restarts) and the disaster that ends it (site power cut
or rolling disaster) at a random instant. It then runs the namespace drill of the chosen modes with that
schedule (:func:`testbed.drill.local.run_local_drill`, faults through the drill's ``during``), and records
the seed and the schedule in the run's folder (``schedule.json``): ``./inv campaign --replay SEED``
draws the same schedule again (or ``--replay FOLDER/schedule.json`` reads it back), so a finding is
one command away from being repeated.

The draw is a pure function of the seed (``random.Random`` seeded with a string: SHA-512, no hash
randomisation) and of ``DRAW_VERSION``; a change to the drawing raises ``DRAW_VERSION``, and a
schedule file replays exactly whatever the version.

Every fault heals at least ``settle`` + its own length before the disaster: network-sync's promise is
about random WAN loss its repairs cover, and a partition's (or a frozen gateway's) dropped packets
come back only when TCP retransmits them, after a backed-off timeout of up to about the fault's length.
A disaster before that retransmission would lose what no mode's ack condition claims to have delivered.

``--testbed vm`` runs the same loop on the VM testbed (:func:`draw_vm`, :func:`vm_drill_config`): the
testbed is brought up and snapshot "ready" prepared once (:func:`testbed.drill.vm.with_testbed`), and every
run's modes go through :func:`testbed.drill.vm.run_mode` from that snapshot. A VM schedule is drawn from
:data:`VM_BOUNDS` (TCG guests are slow: fewer testers, longer runs, at most two faults) and from the VM
fault kinds (disk errors, balloon squeezes and mirror power outages exist only there); what the testbed
fixes at bring-up (the storage server pairs) is the spec's, not drawn. A schedule records the testbed it
was drawn for, and replays only there: a netns partition "to-mirror" or a gateway freeze has no VM
counterpart, and a namespace run's 3-second disaster is shorter than a TCG guest's fault injection.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smfs.modes import Mode
from testbed.progress import Say

if TYPE_CHECKING:  # testbed.vm.bed loads libvirt, which the namespace campaign never needs
    from testbed.vm.bed import VmTestbed

DRAW_VERSION = 1
"""Raised by any change to :func:`draw` or :func:`draw_vm` (old seeds would replay something else)."""
TESTBEDS = ("netns", "vm")
FAULT_KINDS = ("partition", "freeze", "loss-burst", "mirror-restart")
"""The faults a namespace run draws during the run (:data:`testbed.drill.local.FAULTS`)."""
FAULT_WEIGHTS = (3, 3, 3, 2)
"""A mirror restart is drawn less often: the primary does not reconnect, so the rest of that run is quiet."""
DISASTERS = ("site-power-cut", "rolling-disaster")
"""The disasters a namespace run draws (:data:`testbed.drill.local.SCHEDULES`)."""
PARTITIONS = ("both", "to-mirror", "to-primary")
FREEZE_TARGETS = ("mirror", "primary", "mirror-gateway", "primary-gateway")
MAX_SEED = (1 << 63) - 1
GIVE_UP_AFTER = 3  # consecutive runs whose drill crashed: the campaign stops (the harness is broken)
MODE_OVERHEAD_S = 3.5  # s per mode beside the run to the disaster (setup, drain, check, teardown): the first ETA

VM_FAULT_KINDS = ("partition", "freeze", "loss-burst", "mirror-disk-failure", "balloon-squeeze", "mirror-restart")
"""The faults a VM run draws during the run (:mod:`testbed.drill.faults`; the restart is :class:`testbed.drill.faults.MirrorRestart`)."""
VM_FAULT_WEIGHTS = (3, 3, 3, 2, 2, 2)
VM_DISASTERS = ("rolling-disaster", "site-power-cut", "mirror-power-outage")
"""The disasters a VM run draws (:data:`testbed.drill.faults.SCHEDULES`)."""
VM_SITES = ("primary", "mirror")
"""What a VM partition cuts (the site's links, both ways), a freeze stops (QMP) and a squeeze shrinks: a site's VM."""
VM_EXCLUSIVE = ("freeze", "mirror-restart", "mirror-disk-failure")
"""VM faults that overlap no other fault: a frozen guest answers no agent call (a restart, a healed disk's
probe, a balloon, the WAN's shaping in the guests), and a restarting mirror reads its disk."""
MIRROR_LOSES = ("mirror-restart", "mirror-disk-failure")
"""Faults after which the mirror has lost what it had received and not yet stored: not run in a mode that
promises nothing about the mirror's loss (network-sync), as for a mirror power outage (``smfs.modes.PROMISES``)."""
VM_MODE_OVERHEAD_S = 22.0  # s per mode beside the run to the disaster on the VM testbed: the first ETA
VM_BOOT_S = 16.0  # s more for a disaster after which a VM is booted again (site-power-cut, mirror-power-outage)


@dataclass(frozen=True)
class Bounds:
    """What a draw may pick (namespace testbed). Times in seconds after the testers start."""

    fail_at: tuple[float, float] = (2.5, 4.5)  # the disaster's instant
    tail: tuple[float, float] = (1.0, 4.0)  # the testers' duration beyond the disaster (they are still running)
    testers: tuple[int, int] = (8, 16)
    append_sizes: tuple[int, ...] = (32 << 10, 64 << 10, 128 << 10)
    servers: tuple[int, ...] = (2, 4)
    wan_loss: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)  # the WAN's base random loss, % each way
    faults: tuple[int, int] = (1, 3)  # how many during-run faults are drawn (some may not fit and are dropped)
    fault_seconds: tuple[float, float] = (0.2, 1.2)
    first_at: float = 0.5  # the earliest injection: the testers have acked appends by then
    settle: float = 0.8  # s between a fault's heal and the disaster, beyond the fault's own length
    loss: tuple[float, float] = (5.0, 40.0)  # a loss burst's loss, %
    burst_loss: tuple[float, float] = (1.0, 5.0)  # the rolling disaster's loss, % (within what FEC repairs)
    burst_seconds: tuple[float, float] = (0.2, 0.8)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT_BOUNDS = Bounds()


@dataclass(frozen=True)
class VmBounds(Bounds):
    """What a VM draw may pick. Two TCG guests on two cores: a mode's run to the disaster takes 13-19 s
    (plus 20-30 s of restore, start-up, drain and check, and a VM's boot after a power cut), and faults
    last seconds (an injection is a guest agent or QMP call). The first fault comes at ``first_at``: the
    testers' first appends are acked 3-4.5 s after they are started (Python starting in a TCG guest),
    and a fault before any ack leaves nothing to judge. ``settle`` is longer than the namespaces': the
    drill's tick injects a fault up to 3.5 s late (its liveness check is three guest agent calls), which
    shifts the heal towards the disaster by as much. ``servers`` is not drawn: the spec's (the mirror
    site in snapshot "ready" runs that many)."""

    fail_at: tuple[float, float] = (13.0, 19.0)
    tail: tuple[float, float] = (2.0, 6.0)
    testers: tuple[int, int] = (2, 16)
    append_sizes: tuple[int, ...] = (32 << 10, 64 << 10, 128 << 10)
    servers: tuple[int, ...] = ()
    wan_loss: tuple[float, ...] = (0.0, 0.5, 1.0)
    faults: tuple[int, int] = (1, 2)
    fault_seconds: tuple[float, float] = (1.0, 2.0)
    first_at: float = 6.0
    settle: float = 4.0
    loss: tuple[float, float] = (5.0, 30.0)
    squeeze: tuple[float, float] = (0.5, 0.8)  # a balloon squeeze's memory, as a share of the VM's (at least 128 MiB)


VM_BOUNDS = VmBounds()


@dataclass(frozen=True)
class FaultDraw:
    """One during-run fault: ``kind`` at ``at`` s for ``seconds`` s; ``target`` (freeze; on the VM testbed
    also partition and balloon-squeeze: a site), ``direction`` (namespace partition), ``loss`` (loss-burst,
    %), ``share`` (balloon-squeeze: the VM's memory cut to this share of it)."""

    kind: str
    at: float
    seconds: float
    target: str = ""
    direction: str = ""
    loss: float = 0.0
    share: float = 0.0

    def params(self) -> dict[str, Any]:
        """The kind's own parameters (the defaults of the others left out)."""
        got = {"target": self.target, "direction": self.direction, "loss": self.loss, "share": self.share}
        return {k: v for k, v in got.items() if v}

    def describe(self) -> str:
        arg = " ".join(f"{v:g}%" if k == "loss" else f"{v * 100:g}%" if k == "share" else str(v)
                       for k, v in self.params().items())
        return f"{self.kind}{f'({arg})' if arg else ''}@{self.at:g}+{self.seconds:g}s"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "at": self.at, "seconds": self.seconds, **self.params()}


@dataclass(frozen=True)
class Schedule:
    """Everything a run draws; with the modes, it decides the run."""

    seed: int
    testers: int
    append_size: int  # bytes
    servers: int
    wan_loss: float  # %
    duration: float  # s the testers run at most
    fail_at: float  # s: the disaster's instant
    disaster: str
    burst_loss: float  # % (rolling-disaster)
    burst_seconds: float  # s (rolling-disaster)
    faults: tuple[FaultDraw, ...] = ()
    testbed: str = "netns"
    draw_version: int = DRAW_VERSION

    def describe(self) -> str:
        faults = ", ".join(f.describe() for f in self.faults) or "no faults"
        disaster = self.disaster + (f"({self.burst_loss:g}% {self.burst_seconds:g}s)" if self.disaster == "rolling-disaster" else "")
        return (f"{self.testers} testers × {self.append_size // 1024}KiB, {self.servers} servers, loss {self.wan_loss:g}%; "
                f"{faults}; {disaster}@{self.fail_at:g}s")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "faults"}
        return d | {"faults": [f.to_dict() for f in self.faults]}

    @classmethod
    def from_dict(cls, raw: Any, where: str = "schedule") -> Schedule:
        """A schedule as ``to_dict`` wrote it; a one-line ValueError naming the field otherwise."""
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: not a JSON object")
        want = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - want)
        if unknown:
            raise ValueError(f"{where}.{unknown[0]}: unknown field")
        missing = sorted(want - set(raw) - {"testbed", "draw_version", "faults"})
        if missing:
            raise ValueError(f"{where}.{missing[0]}: missing")
        testbed = _choice(raw.get("testbed", "netns"), f"{where}.testbed", TESTBEDS)
        s = cls(
            seed=_int(raw["seed"], f"{where}.seed", 0, MAX_SEED),
            testers=_int(raw["testers"], f"{where}.testers", 1, 256),
            append_size=_int(raw["append_size"], f"{where}.append_size", 1, 8 << 20),
            servers=_int(raw["servers"], f"{where}.servers", 1, 64),
            wan_loss=_num(raw["wan_loss"], f"{where}.wan_loss", 0, 99),
            duration=_num(raw["duration"], f"{where}.duration", 0.1, 600),
            fail_at=_num(raw["fail_at"], f"{where}.fail_at", 0.1, 600),
            disaster=_choice(raw["disaster"], f"{where}.disaster", VM_DISASTERS if testbed == "vm" else DISASTERS),
            burst_loss=_num(raw["burst_loss"], f"{where}.burst_loss", 0, 100),
            burst_seconds=_num(raw["burst_seconds"], f"{where}.burst_seconds", 0, 60),
            faults=tuple(_fault(f, f"{where}.faults[{i}]", testbed)
                         for i, f in enumerate(_list(raw.get("faults", []), f"{where}.faults"))),
            testbed=testbed,
            draw_version=_int(raw.get("draw_version", DRAW_VERSION), f"{where}.draw_version", 1, 1000),
        )
        for i, f in enumerate(s.faults):
            if f.at + f.seconds >= s.fail_at:
                raise ValueError(f"{where}.faults[{i}]: heals at {f.at + f.seconds:g} s, not before fail_at ({s.fail_at:g} s)")
        return s


def _int(v: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{name}: {v!r}; give a whole number from {lo} to {hi}")
    return v


def _num(v: Any, name: str, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise ValueError(f"{name}: {v!r}; give a number from {lo:g} to {hi:g}")
    return float(v)


def _choice(v: Any, name: str, choices: tuple[str, ...]) -> str:
    if v not in choices:
        raise ValueError(f"{name}: {v!r}; use one of {', '.join(choices)}")
    return str(v)


def _list(v: Any, name: str) -> list[Any]:
    if not isinstance(v, list):
        raise ValueError(f"{name}: must be a list")
    return v


_VM_PARAMS = {"freeze": {"target"}, "partition": {"target"}, "loss-burst": {"loss"}, "balloon-squeeze": {"target", "share"}}


def _fault(raw: Any, where: str, testbed: str = "netns") -> FaultDraw:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: not a JSON object")
    if testbed == "vm":
        return _vm_fault(raw, where)
    kind = _choice(raw.get("kind"), f"{where}.kind", FAULT_KINDS)
    extra = {"freeze": {"target"}, "partition": {"direction"}, "loss-burst": {"loss"}}.get(kind, set())
    unknown = sorted(set(raw) - {"kind", "at", "seconds"} - extra)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown field for {kind}")
    at = _num(raw.get("at"), f"{where}.at", 0, 600)
    seconds = _num(raw.get("seconds"), f"{where}.seconds", 0.01, 600)
    if kind == "freeze":
        return FaultDraw(kind, at, seconds, target=_choice(raw.get("target"), f"{where}.target", FREEZE_TARGETS))
    if kind == "partition":
        return FaultDraw(kind, at, seconds, direction=_choice(raw.get("direction"), f"{where}.direction", PARTITIONS))
    if kind == "loss-burst":
        return FaultDraw(kind, at, seconds, loss=_num(raw.get("loss"), f"{where}.loss", 0.01, 100))
    return FaultDraw(kind, at, seconds)


def _vm_fault(raw: dict[str, Any], where: str) -> FaultDraw:
    kind = _choice(raw.get("kind"), f"{where}.kind", VM_FAULT_KINDS)
    unknown = sorted(set(raw) - {"kind", "at", "seconds"} - _VM_PARAMS.get(kind, set()))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown field for {kind} on the VM testbed")
    at = _num(raw.get("at"), f"{where}.at", 0, 600)
    seconds = _num(raw.get("seconds"), f"{where}.seconds", 0.01, 600)
    target = _choice(raw.get("target"), f"{where}.target", VM_SITES) if "target" in _VM_PARAMS.get(kind, ()) else ""
    loss = _num(raw.get("loss"), f"{where}.loss", 0.01, 100) if kind == "loss-burst" else 0.0
    share = _num(raw.get("share"), f"{where}.share", 0.05, 0.99) if kind == "balloon-squeeze" else 0.0
    return FaultDraw(kind, at, seconds, target=target, loss=loss, share=share)


# --- the draw ----------------------------------------------------------------------------------


def run_seed(campaign_seed: int, run: int) -> int:
    """Run ``run``'s seed (1-based) in the campaign of ``campaign_seed``: 48 bits of SHA-256, so it is
    short to type and independent of every other run's."""
    digest = hashlib.sha256(f"smfs-campaign:{campaign_seed}:{run}".encode()).digest()
    return int.from_bytes(digest[:6], "big")


def _floor2(x: float) -> float:
    return math.floor(x * 100) / 100


def draw(seed: int, bounds: Bounds = DEFAULT_BOUNDS) -> Schedule:
    """The schedule of ``seed``: the same seed, the same schedule, on any machine."""
    rng = random.Random(f"smfs-campaign/v{DRAW_VERSION}/{seed}")
    b = bounds
    fail_at = round(rng.uniform(*b.fail_at), 1)
    duration = round(fail_at + rng.uniform(*b.tail), 1)
    testers = rng.randint(*b.testers)
    append_size = rng.choice(b.append_sizes)
    servers = rng.choice(b.servers)
    wan_loss = rng.choice(b.wan_loss)
    disaster = rng.choice(DISASTERS)
    burst_loss = round(rng.uniform(*b.burst_loss), 1)
    burst_seconds = round(rng.uniform(*b.burst_seconds), 2)
    faults: list[FaultDraw] = []
    for _ in range(rng.randint(*b.faults)):
        kind = rng.choices(FAULT_KINDS, FAULT_WEIGHTS)[0]
        seconds = round(rng.uniform(*b.fault_seconds), 2)
        u = rng.random()  # where in its window (drawn whether or not it fits: one draw per slot)
        target, direction, loss = rng.choice(FREEZE_TARGETS), rng.choice(PARTITIONS), round(rng.uniform(*b.loss), 1)
        latest = fail_at - b.settle - 2 * seconds  # heal + settle + its own length before the disaster
        if latest < b.first_at:
            continue
        at = max(b.first_at, _floor2(b.first_at + u * (latest - b.first_at)))
        f = FaultDraw(kind, at, seconds, target=target if kind == "freeze" else "",
                      direction=direction if kind == "partition" else "", loss=loss if kind == "loss-burst" else 0.0)
        # Two faults of one kind never overlap (one partition table, one loss setting, one mirror process).
        if any(g.kind == kind and g.at < f.at + f.seconds and f.at < g.at + g.seconds for g in faults):
            continue
        faults.append(f)
    faults.sort(key=lambda f: (f.at, f.kind))
    return Schedule(seed=seed, testers=testers, append_size=append_size, servers=servers, wan_loss=wan_loss,
                    duration=duration, fail_at=fail_at, disaster=disaster, burst_loss=burst_loss,
                    burst_seconds=burst_seconds, faults=tuple(faults))


def _overlap(f: FaultDraw, g: FaultDraw) -> bool:
    return g.at < f.at + f.seconds and f.at < g.at + g.seconds


def _vm_clash(f: FaultDraw, g: FaultDraw) -> bool:
    """May ``f`` and ``g`` not overlap on the VM testbed? Two of one kind never do (one disk error file, one
    balloon, one WAN setting, one mirror process), nor an exclusive fault with any (:data:`VM_EXCLUSIVE`)."""
    return _overlap(f, g) and (f.kind == g.kind or f.kind in VM_EXCLUSIVE or g.kind in VM_EXCLUSIVE)


def draw_vm(seed: int, bounds: Bounds = VM_BOUNDS, servers: int = 2) -> Schedule:
    """The VM schedule of ``seed`` for a testbed whose mirror site runs ``servers`` server pairs (the spec's:
    fixed at bring-up, so not drawn): the same seed and servers, the same schedule, on any machine. Its own
    random stream (a VM draw never shifts a namespace draw). Faults of :data:`VM_FAULT_KINDS`; the disaster
    one of :data:`VM_DISASTERS`."""
    rng = random.Random(f"smfs-campaign-vm/v{DRAW_VERSION}/{seed}")
    b = bounds
    squeeze = getattr(b, "squeeze", VM_BOUNDS.squeeze)
    fail_at = round(rng.uniform(*b.fail_at), 1)
    duration = round(fail_at + rng.uniform(*b.tail), 1)
    testers = rng.randint(*b.testers)
    append_size = rng.choice(b.append_sizes)
    wan_loss = rng.choice(b.wan_loss)
    disaster = rng.choice(VM_DISASTERS)
    burst_loss = round(rng.uniform(*b.burst_loss), 1)
    burst_seconds = round(rng.uniform(*b.burst_seconds), 2)
    faults: list[FaultDraw] = []
    for _ in range(rng.randint(*b.faults)):
        kind = rng.choices(VM_FAULT_KINDS, VM_FAULT_WEIGHTS)[0]
        seconds = round(rng.uniform(*b.fault_seconds), 2)
        u = rng.random()  # one draw per slot and parameter, whether or not it fits
        site, loss, share = rng.choice(VM_SITES), round(rng.uniform(*b.loss), 1), round(rng.uniform(*squeeze), 2)
        latest = fail_at - b.settle - 2 * seconds
        if latest < b.first_at:
            continue
        at = max(b.first_at, _floor2(b.first_at + u * (latest - b.first_at)))
        f = FaultDraw(kind, at, seconds, target=site if kind in ("freeze", "partition", "balloon-squeeze") else "",
                      loss=loss if kind == "loss-burst" else 0.0, share=share if kind == "balloon-squeeze" else 0.0)
        if any(_vm_clash(f, g) for g in faults):
            continue
        faults.append(f)
    faults.sort(key=lambda f: (f.at, f.kind))
    return Schedule(seed=seed, testers=testers, append_size=append_size, servers=servers, wan_loss=wan_loss,
                    duration=duration, fail_at=fail_at, disaster=disaster, burst_loss=burst_loss,
                    burst_seconds=burst_seconds, faults=tuple(faults), testbed="vm")


def violations(s: Schedule, bounds: Bounds | None = None) -> list[str]:
    """What in ``s`` lies outside ``bounds`` (default: its testbed's; empty: every drawn value is within them).
    A VM schedule's servers are the spec's, not drawn, and not checked here."""
    vm = s.testbed == "vm"
    b, out = bounds or (VM_BOUNDS if vm else DEFAULT_BOUNDS), []

    def within(name: str, v: float, lo: float, hi: float) -> None:
        if not lo - 1e-9 <= v <= hi + 1e-9:
            out.append(f"{name} {v} outside [{lo}, {hi}]")

    within("fail_at", s.fail_at, *b.fail_at)
    within("duration - fail_at", s.duration - s.fail_at, b.tail[0] - 0.1, b.tail[1] + 0.1)
    within("testers", s.testers, *b.testers)
    for name, v, choices in (("append_size", s.append_size, b.append_sizes),
                             *((("servers", s.servers, b.servers),) if not vm else ()),
                             ("wan_loss", s.wan_loss, b.wan_loss),
                             ("disaster", s.disaster, VM_DISASTERS if vm else DISASTERS)):
        if v not in choices:
            out.append(f"{name} {v} not one of {choices}")
    within("burst_loss", s.burst_loss, *b.burst_loss)
    within("burst_seconds", s.burst_seconds, *b.burst_seconds)
    if len(s.faults) > b.faults[1]:
        out.append(f"{len(s.faults)} faults, more than {b.faults[1]}")
    for i, f in enumerate(s.faults):
        within(f"faults[{i}].seconds", f.seconds, *b.fault_seconds)
        if f.at < b.first_at - 1e-9:
            out.append(f"faults[{i}] at {f.at} before {b.first_at}")
        if f.at + 2 * f.seconds + b.settle > s.fail_at + 1e-9:
            out.append(f"faults[{i}] heals at {f.at + f.seconds}: less than {b.settle} + {f.seconds} s before "
                       f"the disaster at {s.fail_at}")
        if f.kind == "loss-burst":
            within(f"faults[{i}].loss", f.loss, *b.loss)
        if f.kind not in (VM_FAULT_KINDS if vm else FAULT_KINDS):
            out.append(f"faults[{i}].kind {f.kind} is not a {s.testbed} fault")
        if vm and f.kind == "balloon-squeeze":
            within(f"faults[{i}].share", f.share, *getattr(b, "squeeze", VM_BOUNDS.squeeze))
        for g in s.faults[i + 1:]:
            if vm and _vm_clash(f, g) and f.kind != g.kind:
                out.append(f"{f.kind} overlaps {g.kind}")
            elif g.kind == f.kind and _overlap(f, g):
                out.append(f"two {f.kind} faults overlap")
    return out


def timed_faults(s: Schedule) -> tuple[Any, ...]:
    """The schedule's faults as the namespace drill runs them (``LocalDrillConfig.during``)."""
    from testbed.drill.faults import Timed
    from testbed.drill.local import NsFreeze, NsLossBurst, NsMirrorRestart, NsPartition

    make = {"partition": lambda f: NsPartition(f.direction), "freeze": lambda f: NsFreeze(f.target),
            "loss-burst": lambda f: NsLossBurst(f.loss), "mirror-restart": lambda f: NsMirrorRestart()}
    return tuple(Timed(f.at, f.seconds, make[f.kind](f)) for f in s.faults)


def drill_config(s: Schedule, modes: tuple[Mode, ...], out: Path, defects: tuple[str, ...] = (), engine: str = "c",
                 drain_timeout: float = 30.0) -> Any:
    """The namespace drill's configuration for one run of ``s``."""
    from testbed.drill.local import LocalDrillConfig

    return LocalDrillConfig(modes=modes, testers=s.testers, append_size=s.append_size, duration=s.duration,
                            fail_at=s.fail_at, wan_loss=s.wan_loss, servers=s.servers, out=out, schedule=s.disaster,
                            burst_loss=s.burst_loss, burst_seconds=s.burst_seconds, drain_timeout=drain_timeout,
                            defects=defects, engine=engine, during=timed_faults(s))


# --- the VM testbed's runs -----------------------------------------------------------------------


def site_vm(spec: Any, site: str) -> Any:
    """The one VM of ``site`` in ``spec`` (its :class:`~testbed.spec.VmSpec`); a one-line ValueError otherwise."""
    from testbed.spec import SpecError

    try:
        vms = spec.site(site).vms
    except SpecError as err:
        raise ValueError(str(err)) from None
    if len(vms) != 1:
        raise ValueError(f"sites.{site}: the VM campaign runs one VM per site, the spec has {len(vms)}; give a spec "
                         "like specs/ci.toml")
    return vms[0]


def vm_spec_problem(spec: Any) -> str | None:
    """Why the VM campaign cannot run on ``spec`` (None: it can): one VM in each of the sites primary and
    mirror, each with more than 128 MiB (a balloon squeeze leaves at least 128)."""
    try:
        for site in VM_SITES:
            vm = site_vm(spec, site)
            if vm.memory_mib <= 128:
                return (f"sites.{site}: VM {vm.name!r} has {vm.memory_mib} MiB; the campaign's balloon squeezes need "
                        "more than 128 MiB (memory = \"384MiB\")")
    except ValueError as err:
        return str(err)
    return None


def run_wan(s: Schedule, spec: Any) -> Any:
    """The WAN a VM run uses: the spec's with the schedule's base loss each way (the spec's own profile when
    it has that loss already: a mode then keeps the WAN of snapshot "ready" instead of reshaping it)."""
    base = spec.wan
    if all(abs(d.mean_loss_pct - s.wan_loss) < 1e-9 for d in (base.a_to_b, base.b_to_a)):
        return base
    return base.with_changes(loss=f"{s.wan_loss:g}%")


def vm_timed_faults(s: Schedule, cfg: Any, spec: Any) -> tuple[Any, ...]:
    """The schedule's faults as the VM drill runs them (``DrillConfig.during``): a site's partition cuts its
    links both ways (``Partition``), a freeze stops the site's VM (QMP, ``Freeze``), a loss burst raises the
    run's WAN loss (``LossBurst``), a disk failure fails the mirror's data disk (``MirrorDiskFailure``), a
    squeeze shrinks the site's VM to ``share`` of its memory, at least 128 MiB (``BalloonSqueeze``), and a
    mirror restart kills the mirror site and starts it again with the run's command line (``MirrorRestart``)."""
    from testbed.drill.faults import (
        BalloonSqueeze,
        Fault,
        Freeze,
        LossBurst,
        MirrorDiskFailure,
        MirrorRestart,
        Partition,
        Timed,
    )
    from testbed.drill.vm import mirror_argv

    argv = tuple(mirror_argv(replace(cfg, during=tuple(Timed(f.at, f.seconds, Fault()) for f in s.faults))))
    mirror = site_vm(spec, "mirror").name

    def make(f: FaultDraw) -> Fault:
        if f.kind == "partition":
            return Partition(f.target)
        if f.kind == "freeze":
            return Freeze(site_vm(spec, f.target).name)
        if f.kind == "loss-burst":
            return LossBurst(cfg.wan, f"{f.loss:g}%", f.seconds)
        if f.kind == "mirror-disk-failure":
            return MirrorDiskFailure(mirror)
        if f.kind == "balloon-squeeze":
            vm = site_vm(spec, f.target)
            mib = max(128, int(vm.memory_mib * f.share))
            if mib >= vm.memory_mib:
                raise ValueError(f"balloon-squeeze: VM {vm.name!r} has {vm.memory_mib} MiB, nothing to squeeze "
                                 "above 128 MiB; give the spec's VMs more memory")
            return BalloonSqueeze(vm.name, mib, vm.memory_mib)
        if f.kind == "mirror-restart":
            return MirrorRestart(argv, tuple(cfg.defects), mirror)
        raise ValueError(f"faults: {f.kind!r} is not a VM fault; use one of {', '.join(VM_FAULT_KINDS)}")

    return tuple(Timed(f.at, f.seconds, make(f)) for f in s.faults)


def vm_drill_config(s: Schedule, base: Any, spec: Any, out: Path) -> Any:
    """The VM drill's configuration (:class:`testbed.drill.vm.DrillConfig`) for one run of ``s``: ``base`` (the
    spec's, with the campaign's flags) with the schedule's workload, WAN loss, disaster and faults."""
    if s.testbed != "vm":
        raise ValueError(f"schedule of seed {s.seed}: drawn for the {s.testbed} testbed; replay it with "
                         f"--testbed {s.testbed}")
    if s.servers != base.servers:
        raise ValueError(f"schedule of seed {s.seed}: drawn for {s.servers} server pairs, the spec's mirror site runs "
                         f"{base.servers}; give a --spec with workload.server_pairs = {s.servers}")
    cfg = replace(base, out=out, testers=s.testers, append_size=s.append_size, duration=s.duration, fail_at=s.fail_at,
                  schedule=s.disaster, burst_loss=f"{s.burst_loss:g}%", burst_seconds=s.burst_seconds,
                  wan=run_wan(s, spec), during=())
    return replace(cfg, during=vm_timed_faults(s, cfg, spec))


def vm_skip(kind: str, mode: Mode, schedule: str) -> str | None:
    """Why a fault of ``kind`` must not run in ``mode`` ending with ``schedule`` (None: it runs). A mirror that
    loses what it had received (its site killed, its disk failing: :data:`MIRROR_LOSES`) breaks no promise of
    a mode whose ack means "on the WAN" (network-sync), as a mirror power outage breaks none; remote-sync acks
    only after the mirror's fsync, so it keeps its promise through both (the drill judges it so)."""
    from smfs.modes import promises

    if kind in MIRROR_LOSES and promises(mode, schedule) and not promises(mode, "mirror-power-outage"):
        return (f"{mode.name} promises nothing when the mirror loses what it received (its ack means on the WAN, "
                "not on the mirror's disk)")
    return None


def mode_faults(cfg: Any, mode: Mode) -> tuple[tuple[Any, ...], list[str]]:
    """The run's faults that ``mode`` runs, and a line for each it does not (with why)."""
    kept, skipped = [], []
    for t in cfg.during:
        why = vm_skip(t.fault.name, mode, cfg.schedule)
        if why is None:
            kept.append(t)
        else:
            skipped.append(f"{t.describe()} ({why})")
    return tuple(kept), skipped


def load_replay(text: str, testbed: str = "netns", servers: int | None = None) -> Schedule:
    """``--replay``: a run's seed (a whole number: drawn again for ``testbed``; a VM draw for ``servers``
    server pairs) or a schedule.json (read back as it ran; only on the testbed it was drawn for)."""
    if text.strip().isdigit():
        seed = int(text.strip())
        if seed > MAX_SEED:
            raise ValueError(f"--replay {text}: a seed is at most {MAX_SEED}")
        return draw_vm(seed, VM_BOUNDS, servers or 2) if testbed == "vm" else draw(seed)
    path = Path(text)
    if path.is_dir():
        path = path / "schedule.json"
    try:
        raw = json.loads(path.read_text()[:1 << 20])
    except (OSError, UnicodeDecodeError, ValueError) as err:
        why = err.strerror if isinstance(err, OSError) else "not a JSON schedule"
        raise ValueError(f"--replay {text}: {why}; give a run's seed or its schedule.json") from None
    s = Schedule.from_dict(raw, f"--replay {path}")
    if s.testbed != testbed:
        raise ValueError(f"--replay {text}: a schedule drawn for the {s.testbed} testbed; replay it with --testbed "
                         f"{s.testbed} (its faults and timings have no {testbed} counterpart)")
    if testbed == "vm" and servers is not None and s.servers != servers:
        raise ValueError(f"--replay {text}: drawn for {s.servers} server pairs, the spec runs {servers}; give a --spec "
                         f"with workload.server_pairs = {s.servers}")
    return s


# --- the campaign ------------------------------------------------------------------------------

SUN_PATH_MAX = 107  # bytes of a unix socket's path (108 with its NUL)


def run_folder(run: int) -> str:
    """A run's folder in the campaign's (short: the primary's unix sockets live below it)."""
    return f"run-{run:03d}"


def socket_room(out: Path, runs: int, servers: int) -> str | None:
    """Why the stack's unix sockets would not fit below ``out`` (None: they fit). The longest is the primary's
    last server socket in a +fec mode's work folder."""
    longest = Path(str(out)) / run_folder(runs) / "remote-sync+fec" / "work" / "run-primary" / f"primary-{servers - 1}.sock"
    if len(str(longest).encode()) > SUN_PATH_MAX:
        return (f"{out}: too long a path for the stack's unix sockets ({len(str(longest).encode())} bytes below it, at "
                f"most {SUN_PATH_MAX}); give a shorter --out")
    return None


@dataclass(frozen=True)
class CampaignConfig:
    modes: tuple[Mode, ...]
    out: Path
    runs: int = 10
    seed: int = 0  # the campaign's seed (run i's seed is run_seed(seed, i))
    replay: Schedule | None = None  # every run replays this schedule
    defects: tuple[str, ...] = ()  # seeded stack defects (testing the campaign itself)
    engine: str = "c"
    drain_timeout: float = 30.0
    bounds: Bounds = field(default_factory=Bounds)  # the testbed's default: DEFAULT_BOUNDS or VM_BOUNDS
    verbose: bool = False  # every drill line on the terminal (always in each run's drill.log)
    testbed: str = "netns"
    spec: Path | None = None  # vm: the testbed's spec (default specs/ci.toml)
    servers: int = 2  # vm: the spec's server pairs (fixed at bring-up; every VM schedule has them)

    def __post_init__(self) -> None:
        if self.testbed not in TESTBEDS:
            raise ValueError(f"testbed: {self.testbed!r}; use one of {', '.join(TESTBEDS)}")
        if self.testbed == "vm" and self.bounds == DEFAULT_BOUNDS:
            object.__setattr__(self, "bounds", VM_BOUNDS)

    def schedule(self, run: int) -> Schedule:
        if self.replay is not None:
            return self.replay
        if self.testbed == "vm":
            return draw_vm(run_seed(self.seed, run), self.bounds, self.servers)
        return draw(run_seed(self.seed, run), self.bounds)


DURABLE_KEYS = ("acked", "lost", "corrupt", "unexpected", "prefix_violations", "recovered")


def _mode_row(entry: dict[str, Any]) -> dict[str, Any]:
    from testbed.drill.selftest import evidence

    row = {"verdict": entry.get("verdict", "unknown"), "durable": entry.get("durable"), "evidence": evidence(entry)}
    row.update({k: entry.get(k) for k in DURABLE_KEYS})
    for key in ("error", "broken_promises", "unsafe_acks", "primary_disk", "drill_faults"):
        if entry.get(key):
            row[key] = entry[key]
    skipped = [e["event"] for e in entry.get("timeline", []) if e.get("skipped")] + list(entry.get("faults_not_run", []))
    if skipped:
        row["faults_not_run"] = skipped
    return row


def _verdict(runs: list[dict[str, Any]]) -> str:
    verdicts = [m["verdict"] for r in runs for m in r["modes"].values()] + [r["verdict"] for r in runs if not r["modes"]]
    if "data-loss" in verdicts:
        return "data-loss"
    if "unknown" in verdicts or not verdicts:
        return "unknown"
    return "ok"


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class _RunLog:
    """A run's drill lines: all into its drill.log, and on the terminal only each mode's outcome (or all with
    ``verbose``)."""

    KEEP = (": checked:", "INFRASTRUCTURE FAILURE", "DRILL ERROR", "cleanup failed", "DRILL FAULT")

    def __init__(self, path: Path, say: Say, verbose: bool) -> None:
        self.f = open(path, "a", buffering=1)  # noqa: SIM115 - closed in close()
        self.say, self.verbose, self.t0 = say, verbose, time.monotonic()

    def __call__(self, line: str) -> None:
        self.f.write(f"[{time.monotonic() - self.t0:6.1f}s] {line}\n" if not line.startswith("\n") else line + "\n")
        if self.verbose or any(k in line for k in self.KEEP):
            self.say(f"    {line.strip()}")

    def close(self) -> None:
        self.f.close()


def _new_result(cfg: CampaignConfig) -> dict[str, Any]:
    result: dict[str, Any] = {
        "verdict": "unknown", "testbed": cfg.testbed, "seed": cfg.seed if cfg.replay is None else None,
        "replay": cfg.replay.seed if cfg.replay is not None else None, "runs_planned": cfg.runs, "runs_done": 0,
        "modes": [m.name for m in cfg.modes], "defects": list(cfg.defects), "engine": cfg.engine,
        "draw_version": DRAW_VERSION, "bounds": cfg.bounds.to_dict(), "interrupted": False, "runs": [],
    }
    if cfg.testbed == "vm":
        result["spec"] = str(cfg.spec)
        result["servers"] = cfg.servers
    return result


def run_campaign(cfg: CampaignConfig, say: Say = print) -> dict[str, Any]:
    """Run the campaign into ``cfg.out`` (which exists); returns campaign.json's content. campaign.json and
    summary.md are written after every run, so an interrupted campaign leaves its summary so far."""
    if cfg.testbed == "vm":
        return _run_vm_campaign(cfg, say)
    from testbed.drill.local import run_local_drill

    why = socket_room(cfg.out, cfg.runs, cfg.replay.servers if cfg.replay else max(cfg.bounds.servers))
    if why:
        raise ValueError(why)
    cfg.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    result = _new_result(cfg)
    what = (f"replaying seed {cfg.replay.seed}" if cfg.replay is not None else f"seed {cfg.seed}")
    say(f"campaign: {cfg.runs} run(s) of {', '.join(m.name for m in cfg.modes)} in network namespaces, {what} -> {cfg.out}")
    if cfg.defects:
        say(f"campaign: SEEDED DEFECTS in the stack: {', '.join(cfg.defects)} (the campaign must report data loss)")
    est = [len(cfg.modes) * (cfg.schedule(i).fail_at + MODE_OVERHEAD_S) for i in range(1, cfg.runs + 1)]
    say(f"campaign: about {_hms(sum(est))} by the schedules' lengths (the ETA after each run is measured)")

    def drill(sched: Schedule, folder: Path, log: Say) -> dict[str, Any]:
        return run_local_drill(drill_config(sched, cfg.modes, folder, cfg.defects, cfg.engine, cfg.drain_timeout), say=log)

    _runs(cfg, say, result, t0, est, drill)
    return _finish(cfg, say, result, t0)


def _run_vm_campaign(cfg: CampaignConfig, say: Say) -> dict[str, Any]:
    """The campaign on the VM testbed: up and snapshot "ready" once (:func:`testbed.drill.vm.with_testbed`, which
    also tears the testbed down at the end, on Ctrl-C or error), then every run's modes from that snapshot."""
    from testbed.drill.faults import Timeline
    from testbed.drill.vm import DrillConfig, TeardownFailed, with_testbed
    from testbed.spec import load as load_spec

    if cfg.spec is None:
        raise ValueError("spec: the VM campaign needs a spec, e.g. specs/ci.toml")
    spec = load_spec(cfg.spec)
    why = vm_spec_problem(spec)
    if why:
        raise ValueError(f"{cfg.spec}: {why}")
    base = replace(DrillConfig.from_spec(spec, cfg.modes, cfg.out), during=(), engine=cfg.engine,
                   drain_timeout=cfg.drain_timeout, defects=cfg.defects)
    if cfg.replay is not None and cfg.replay.servers != base.servers:
        raise ValueError(f"--replay: drawn for {cfg.replay.servers} server pairs, the spec runs {base.servers}; give a "
                         f"--spec with workload.server_pairs = {cfg.replay.servers}")
    cfg = replace(cfg, servers=base.servers)
    cfg.out.mkdir(parents=True, exist_ok=True)
    shutil.copy(cfg.spec, cfg.out / "spec.toml")
    t0 = time.monotonic()
    result = _new_result(cfg)
    what = (f"replaying seed {cfg.replay.seed}" if cfg.replay is not None else f"seed {cfg.seed}")
    say(f"campaign: {cfg.runs} run(s) of {', '.join(m.name for m in cfg.modes)} on the VM testbed (spec {spec.name}, "
        f"{base.servers} server pairs), {what} -> {cfg.out}")
    if cfg.defects:
        say(f"campaign: SEEDED DEFECTS in the stack: {', '.join(cfg.defects)} (the campaign must report data loss)")
    est = [len(cfg.modes) * (s.fail_at + VM_MODE_OVERHEAD_S + (VM_BOOT_S if s.disaster != "rolling-disaster" else 0.0))
           for s in (cfg.schedule(i) for i in range(1, cfg.runs + 1))]
    say(f"campaign: about {_hms(sum(est))} by the schedules' lengths, after the testbed's bring-up (the ETA after "
        "each run is measured)")

    def body(tb: VmTestbed) -> None:
        result["setup_seconds"] = round(time.monotonic() - t0, 1)
        say(f"campaign: testbed up and snapshot ready after {_hms(result['setup_seconds'])}")
        _runs(cfg, say, result, t0, est, lambda s, folder, log: _vm_run(tb, base, spec, s, cfg.modes, folder, log))

    try:
        with_testbed(spec, base, cfg.out, False, say, body, Timeline(say=say))
    except TeardownFailed as err:
        result["teardown_error"] = str(err)
    except KeyboardInterrupt:  # torn down by with_testbed; the summary so far stays
        result["interrupted"] = True
        _save(result, cfg, time.monotonic() - t0)
        raise
    except Exception as err:  # noqa: BLE001 - the bring-up failed: no verdict (exit 2), with its reason
        (cfg.out / "campaign-error.txt").write_text(traceback.format_exc())
        result["error"] = f"the VM testbed failed: {type(err).__name__}: {err}"
        say(f"INFRASTRUCTURE FAILURE: {result['error']}")
    return _finish(cfg, say, result, t0)


def _vm_run(tb: VmTestbed, base: Any, spec: Any, s: Schedule, modes: tuple[Mode, ...], folder: Path, log: Say) -> dict[str, Any]:
    """One VM run: every mode from snapshot "ready" with the schedule's configuration; the faults a mode
    promises nothing about are not run in it (:func:`vm_skip`; ``faults_not_run`` in its entry)."""
    from testbed.drill.runner import overall_verdict
    from testbed.drill.vm import run_mode

    cfg = vm_drill_config(s, base, spec, folder)
    entries = []
    for mode in modes:
        during, skipped = mode_faults(cfg, mode)
        for line in skipped:
            log(f"{mode.name}: fault not run in this mode: {line}")
        entry = run_mode(tb, replace(cfg, during=during), mode, log)
        if skipped:
            entry["faults_not_run"] = skipped
        entries.append(entry)
    return {"verdict": overall_verdict(entries), "modes": entries}


def _runs(cfg: CampaignConfig, say: Say, result: dict[str, Any], t0: float, est: list[float],
          drill: Callable[[Schedule, Path, Say], dict[str, Any]]) -> None:
    """The runs, each into its folder; campaign.json and summary.md saved after each. The ETA is the remaining
    runs' estimated lengths at the pace measured so far (on the VM testbed, from the first run: not the bring-up)."""
    crashed = 0
    t_runs = time.monotonic()
    try:
        for i in range(1, cfg.runs + 1):
            sched = cfg.schedule(i)
            folder = cfg.out / run_folder(i)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "schedule.json").write_text(json.dumps(sched.to_dict(), indent=1) + "\n")
            say(f"run {i}/{cfg.runs}  seed {sched.seed}: {sched.describe()}")
            log = _RunLog(folder / "drill.log", say, cfg.verbose)
            t_run = time.monotonic()
            row: dict[str, Any] = {"run": i, "seed": sched.seed, "folder": folder.name, "schedule": sched.to_dict(),
                                   "describe": sched.describe(), "modes": {}}
            try:
                drilled = drill(sched, folder, log)
                row["modes"] = {e["mode"]: _mode_row(e) for e in drilled["modes"]}
                row["verdict"] = drilled["verdict"]
                # On the VM testbed a mode's crash is its own "unknown": a run with no verdict at all counts.
                dead = cfg.testbed == "vm" and all(m["verdict"] == "unknown" for m in row["modes"].values())
                crashed = crashed + 1 if dead else 0
            except KeyboardInterrupt:
                row["verdict"], row["error"], row["interrupted"] = "unknown", "interrupted (Ctrl-C)", True
                raise
            except Exception as err:  # noqa: BLE001 - a crashed drill is this run's "unknown", with its reason
                (folder / "campaign-error.txt").write_text(traceback.format_exc())
                row["verdict"], row["error"] = "unknown", f"the drill crashed: {type(err).__name__}: {err}"
                log(f"DRILL ERROR (verdict unknown): {row['error']}")
                crashed += 1
            finally:
                log.close()
                row["seconds"] = round(time.monotonic() - t_run, 1)
                result["runs"].append(row)
                _save(result, cfg, time.monotonic() - t0)
            now = time.monotonic()
            eta = (now - t_runs) / sum(est[:i]) * sum(est[i:])  # the remaining runs' lengths at the pace so far
            say(f"run {i}/{cfg.runs}  seed {sched.seed}: {_verdicts_line(row)}  ({row['seconds']:.0f} s; "
                f"{_hms(now - t0)} so far" + (f", ETA {_hms(eta)})" if i < cfg.runs else ")"))
            if crashed >= GIVE_UP_AFTER:
                why = (f"no mode had a verdict in {crashed} runs in a row" if cfg.testbed == "vm" and not row.get("error")
                       else f"the drill crashed in {crashed} runs in a row")
                say(f"campaign: {why}; stopping (see the runs' drill.log and campaign-error.txt)")
                result["gave_up"] = why
                break
    except KeyboardInterrupt:
        result["interrupted"] = True
        _save(result, cfg, time.monotonic() - t0)
        say(f"campaign: interrupted in run {len(result['runs'])} ({result['runs_done']} complete); summary so far in "
            f"{cfg.out / 'summary.md'}")
        raise


def _finish(cfg: CampaignConfig, say: Say, result: dict[str, Any], t0: float) -> dict[str, Any]:
    _save(result, cfg, time.monotonic() - t0)
    say("\n" + summary_text(result))
    if result.get("teardown_error"):
        say(f"\nTEARDOWN FAILED: {result['teardown_error']}; run ./inv down")
    say(f"\ncampaign verdict: {result['verdict']}   ({cfg.out / 'campaign.json'}, {cfg.out / 'summary.md'})")
    return result


def _verdicts_line(row: dict[str, Any]) -> str:
    if not row["modes"]:
        return f"unknown ({row.get('error', '')})"
    parts = []
    for name, m in row["modes"].items():
        lost = f", {m['lost']} lost" if m.get("lost") else ""
        parts.append(f"{name} {m['verdict']}{lost}")
    return "; ".join(parts)


def _save(result: dict[str, Any], cfg: CampaignConfig, seconds: float) -> None:
    runs = result["runs"]
    complete = [r for r in runs if not r.get("interrupted")]
    result["runs_done"] = len(complete)
    result["verdict"] = _verdict(runs)
    result["seconds"] = round(seconds, 1)
    result["seconds_per_run"] = round(sum(r["seconds"] for r in complete) / len(complete), 1) if complete else None
    per_mode: dict[str, dict[str, int]] = {}
    for m in result["modes"]:
        got = [r["modes"][m] for r in runs if m in r["modes"]]
        per_mode[m] = {"runs": len(got), "ok": sum(g["verdict"] == "ok" for g in got),
                       "data-loss": sum(g["verdict"] == "data-loss" for g in got),
                       "unknown": sum(g["verdict"] == "unknown" for g in got) + sum(1 for r in runs if not r["modes"]),
                       "acked": sum(g.get("acked") or 0 for g in got), "lost": sum(g.get("lost") or 0 for g in got)}
    result["per_mode"] = per_mode
    extra = (f" --defects {','.join(cfg.defects)}" if cfg.defects else "") + (f" --engine {cfg.engine}" if cfg.engine != "c" else "")
    where = f" --testbed vm --spec {cfg.spec}" if cfg.testbed == "vm" else ""
    replay = "./inv campaign" + where + " --replay {seed} --modes {mode}" + extra
    result["data_loss"] = [
        {"run": r["run"], "seed": r["seed"], "mode": name, "lost": m.get("lost"), "corrupt": m.get("corrupt"),
         "unexpected": m.get("unexpected"), "prefix_violations": m.get("prefix_violations"),
         "broken_promises": m.get("broken_promises", []), "evidence": m.get("evidence", ""), "schedule": r["describe"],
         "folder": r["folder"],
         "replay": replay.format(seed=r["seed"], mode=name)}
        for r in runs for name, m in r["modes"].items() if m["verdict"] == "data-loss"]
    result["unknown"] = (
        [{"run": r["run"], "seed": r["seed"], "mode": name, "reason": m.get("error") or (
            "no append was acked: no promise to check" if m.get("acked") == 0 else "no verdict (see mode.json)"),
          "schedule": r["describe"], "folder": r["folder"]}
         for r in runs for name, m in r["modes"].items() if m["verdict"] == "unknown"]
        + [{"run": r["run"], "seed": r["seed"], "mode": None, "reason": r.get("error", "unknown"), "schedule": r["describe"],
            "folder": r["folder"]} for r in runs if not r["modes"]])
    (cfg.out / "campaign.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (cfg.out / "summary.md").write_text(summary_markdown(result))


def _cell(m: dict[str, Any] | None) -> str:
    if m is None:
        return "-"
    v = m["verdict"]
    if v == "ok" and m.get("lost"):
        return f"ok ({m['lost']} lost)"  # a mode that promised nothing: reported, not a failure
    if v == "data-loss":
        local, unsafe = (m.get("primary_disk") or {}).get("lost"), m.get("unsafe_acks")
        what = (f"{m['lost']} lost" if m.get("lost") else f"{local} missing on the primary" if local
                else f"{unsafe} acked early" if unsafe else "see findings")
        return f"DATA-LOSS ({what})"
    return v.upper() if v == "unknown" else v


def _rows(result: dict[str, Any]) -> tuple[list[list[str]], list[list[str]]]:
    modes = result["modes"]
    runs = [["run", "seed", "schedule", *modes, "s"]]
    for r in result["runs"]:
        runs.append([str(r["run"]), str(r["seed"]), r["describe"], *(_cell(r["modes"].get(m)) if r["modes"] else "UNKNOWN"
                                                                     for m in modes), f"{r['seconds']:.0f}"])
    totals = [["mode", "runs", "ok", "data-loss", "unknown", "acked", "lost"]]
    for m, t in result.get("per_mode", {}).items():
        totals.append([m, *(str(t[k]) for k in ("runs", "ok", "data-loss", "unknown", "acked", "lost"))])
    return runs, totals


def _plain(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _md(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(v.replace("|", "\\|") for v in r) + " |" for r in rows[1:]]
    return "\n".join(out)


def _findings(result: dict[str, Any]) -> list[str]:
    lines = []
    for d in result.get("data_loss", []):
        why = "; ".join(d["broken_promises"]) or d.get("evidence") or "see mode.json"
        lines.append(f"DATA LOSS  run {d['run']} seed {d['seed']} {d['mode']}: {why}\n"
                     f"           schedule: {d['schedule']}\n           folder: {d['folder']}   replay: {d['replay']}")
    for u in result.get("unknown", []):
        lines.append(f"UNKNOWN    run {u['run']} seed {u['seed']} {u['mode'] or '(whole run)'}: {u['reason']}\n"
                     f"           schedule: {u['schedule']}")
    if result.get("error"):
        lines.append(f"UNKNOWN    the whole campaign: {result['error']}")
    return lines


def summary_text(result: dict[str, Any]) -> str:
    runs, totals = _rows(result)
    head = (f"campaign: {result['runs_done']} of {result['runs_planned']} run(s)"
            + (f", seed {result['seed']}" if result.get("seed") is not None else f", replay of seed {result['replay']}")
            + f", {_hms(result.get('seconds') or 0)} ({result.get('seconds_per_run')} s per run)"
            + (f", on the VM testbed ({result['spec']}; bring-up {_hms(result['setup_seconds'])})"
               if result.get("setup_seconds") else ", on the VM testbed" if result.get("testbed") == "vm" else ""))
    parts = [head, "", _plain(runs), "", _plain(totals)]
    findings = _findings(result)
    if findings:
        parts += ["", *findings]
    return "\n".join(parts)


def summary_markdown(result: dict[str, Any]) -> str:
    runs, totals = _rows(result)
    lines = [f"# Campaign: {result['verdict']}", "",
             f"- runs: {result['runs_done']} of {result['runs_planned']} complete"
             + (f" (interrupted in run {len(result['runs'])})" if result.get("interrupted") else "") + (f" ({result['gave_up']})" if result.get("gave_up") else ""),
             f"- seed: {result['seed']}" if result.get("seed") is not None else f"- replay of seed {result['replay']}",
             f"- modes: {', '.join(result['modes'])}; testbed: {result['testbed']}; engine: {result['engine']}"
             + (f"; spec: {result['spec']} ({result.get('servers')} server pairs)" if result.get("spec") else ""),
             f"- time: {_hms(result.get('seconds') or 0)}, {result.get('seconds_per_run')} s per run"
             + (f" (the testbed's bring-up: {_hms(result['setup_seconds'])})" if result.get("setup_seconds") else ""),
             f"- draw version: {result['draw_version']}"]
    if result.get("defects"):
        lines.append(f"- SEEDED DEFECTS: {', '.join(result['defects'])}")
    lines += ["", "## Verdicts per mode", "", _md(totals), "", "## Runs", "", _md(runs)]
    if result.get("data_loss"):
        lines += ["", "## Data loss", ""]
        lines += [f"- run {d['run']}, seed `{d['seed']}`, {d['mode']}: {'; '.join(d['broken_promises']) or d.get('evidence')} — "
                  f"{d['schedule']} — `{d['replay']}`" for d in result["data_loss"]]
    if result.get("unknown") or result.get("error"):
        lines += ["", "## Unknown verdicts", ""]
        lines += [f"- run {u['run']}, seed `{u['seed']}`, {u['mode'] or 'whole run'}: {u['reason']} — {u['schedule']}"
                  for u in result.get("unknown", [])]
        lines += [f"- the whole campaign: {result['error']}"] if result.get("error") else []
    return "\n".join(lines) + "\n"
