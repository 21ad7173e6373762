"""The namespace drill: the whole stack on this machine in network namespaces, a primary-site power
cut during the run, then the mirror's recovered state against the testers' ledgers.

For each mode, from a clean state: build the namespaces, shape the WAN, start the mirror site, the
primary site (and the FEC gateways for the +fec modes and network-sync), start the testers, and at
``fail_at`` seconds cut the primary's WAN link and SIGKILL every primary-site process. Then stop the
mirror, recover its logs read-only, and check. Everything created is torn down, also on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from smfs.modes import Mode, promises
from testbed import procs
from testbed.drill.faults import Fault, Runner, Timed
from testbed.drill.report import table
from testbed.drill.runner import InfrastructureError, overall_verdict
from testbed.netns.bed import ADDRS, NamespaceTestbed, host_has_netem
from testbed.progress import Say
from workloads.ledger import is_ack_line

MIRROR_PORT = 7700
GATEWAY_CONTROL_PORT = 7790
TUNNEL_PORT = 7800
SITE_READY_TIMEOUT = 60.0
"""Seconds for a site's storage servers in a namespace to report ready (a gateway's bound is
:data:`testbed.drill.gateways.GATEWAY_READY_TIMEOUT`; in a TCG guest: :data:`testbed.vm.guestproc.GUEST_READY_TIMEOUT`)."""
SCHEDULES = ("site-power-cut", "rolling-disaster")
"""What the namespace drill can do at ``fail_at``. A mirror power outage needs VMs: a killed process
leaves its writes in the host's page cache, which no power cut of a namespace can take away."""
FAULTS = ("partition", "freeze", "loss-burst", "mirror-restart")
"""What the namespace drill can do *during* the run (``LocalDrillConfig.during``), each healed after its
time. A failing disk is not among them: the mirror writes through the host's page cache to the host's
filesystem, with no block device beneath its store to fail (the VM drill's nbdkit error filter is that)."""
FREEZE_TARGETS = {"mirror": ("mirror", ("servers", "gateway")), "primary": ("primary", ("servers", "gateway")),
                  "mirror-gateway": ("mirror", ("gateway",)), "primary-gateway": ("primary", ("gateway",))}
"""A freeze's target -> (site, the site's processes it stops). The testers are never frozen: they are the
application, and the disaster's instant is about the stack."""


@dataclass(frozen=True)
class LocalDrillConfig:
    modes: tuple[Mode, ...]
    testers: int = 64
    append_size: int = 512 * 1024  # bytes
    duration: float = 20.0  # s the testers run
    fail_at: float = 10.0  # s after the testers start
    wan_loss: float = 0.0  # % each way
    servers: int = 8
    segment_bytes: int = 100 << 20
    out: Path = Path("results/local")
    keep_data: bool = False
    schedule: str = "site-power-cut"
    burst_loss: float = 5.0  # % each way during the rolling disaster's burst
    burst_seconds: float = 0.5
    drain_timeout: float = 30.0  # s the mirror gets to go quiet after the disaster
    defects: tuple[str, ...] = ()  # seeded stack defects (the self-test only)
    flush_ms: float = 5.0  # the gateways' FEC flush delay (a partial bin's repair follows its first packet by this)
    engine: str = "c"  # the gateways' data path: c (smfs/native, built by make) or python (the specification)
    during: tuple[Timed, ...] = ()  # faults injected during the run (NsPartition, NsFreeze, ...), healed before fail_at
    instant: str = "time"  # the disaster's instant: at fail_at ("time"), or at the first ack after it ("ack")

    def __post_init__(self) -> None:
        checks = [
            (self.testers >= 1, "testers", "must be at least 1"),
            (self.servers >= 1, "servers", "must be at least 1"),
            (self.duration > 0, "duration", "must be positive seconds"),
            (self.fail_at > 0, "fail_at", "must be positive seconds after the testers start"),
            (0 <= self.wan_loss < 100, "wan_loss", "must be a percentage in [0, 100)"),
            (len(self.modes) > 0, "modes", "give at least one mode"),
            (self.schedule in SCHEDULES, "schedule", f"use one of {', '.join(SCHEDULES)} (a mirror power outage "
             "needs VMs: ./inv drill)"),
            (0 <= self.burst_loss <= 100, "burst_loss", "must be a percentage in [0, 100]"),
            (1 <= self.drain_timeout <= 3600, "drain_timeout", "must be within 1 s and 1 h"),
            (0 < self.flush_ms <= 1000, "flush_ms", "must be within (0, 1000] ms"),
            (self.engine in ("python", "c"), "engine", "use python or c"),
        ]
        for i, t in enumerate(self.during):
            checks += [
                (isinstance(t, Timed) and isinstance(t.fault, NsFault), f"during[{i}]",
                 f"must be a Timed namespace fault ({', '.join(FAULTS)})"),
                (isinstance(t, Timed) and 0 <= t.at and 0 < t.seconds and t.heal_at < self.fail_at, f"during[{i}]",
                 "must start at 0 s or later, last a positive time and heal before fail_at"),
            ]
        for ok, name, fix in checks:
            if not ok:
                raise ValueError(f"{name}: {fix}")


# --- faults during the run ---------------------------------------------------------------------
# Each acts on the NsBed (``bed.tb`` is the NamespaceTestbed) and marks its injection and its heal, with
# what it did, in the mode's timeline. ``skip(mode, schedule)`` says why it must not run in a mode (None: it runs).


class NsFault(Fault):
    def skip(self, mode: Mode, schedule: str) -> str | None:
        return None

    def params(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class NsPartition(NsFault):
    """The WAN drops everything in ``direction`` (both, to-mirror, to-primary); heal restores it."""

    direction: str = "both"
    name = "partition"

    def __post_init__(self) -> None:
        if self.direction not in NamespaceTestbed.PARTITIONS:
            raise ValueError(f"partition: direction {self.direction!r}; use one of {', '.join(NamespaceTestbed.PARTITIONS)}")

    def params(self) -> dict[str, Any]:
        return {"direction": self.direction}

    def inject(self, bed: Any, tl: Any) -> None:
        bed.tb.partition(self.direction)
        tl.mark(f"WAN partitioned ({self.direction})", fault=self.name, direction=self.direction)

    def heal(self, bed: Any, tl: Any) -> None:
        dropped = bed.tb.heal_partition()
        tl.mark(f"WAN partition healed ({dropped} packets dropped)", fault=self.name, healed=True, dropped=dropped)


@dataclass(frozen=True)
class NsFreeze(NsFault):
    """SIGSTOP the ``target``'s processes (mirror, primary: the site's servers and gateway; mirror-gateway,
    primary-gateway); heal sends SIGCONT."""

    target: str = "mirror"
    name = "freeze"

    def __post_init__(self) -> None:
        if self.target not in FREEZE_TARGETS:
            raise ValueError(f"freeze: target {self.target!r}; use one of {', '.join(FREEZE_TARGETS)}")

    def params(self) -> dict[str, Any]:
        return {"target": self.target}

    def skip(self, mode: Mode, schedule: str) -> str | None:
        if self.target.endswith("-gateway") and not mode.fec:
            return f"{mode.name} runs no gateway"
        return None

    def inject(self, bed: Any, tl: Any) -> None:
        site, names = FREEZE_TARGETS[self.target]
        bed.frozen[self.target] = frozen = bed.tb.freeze(site, names)
        tl.mark(f"{self.target} frozen (SIGSTOP: {', '.join(n for _, _, n in frozen) or 'nothing running'})",
                fault=self.name, target=self.target, frozen=[n for _, _, n in frozen])

    def heal(self, bed: Any, tl: Any) -> None:
        thawed = bed.tb.thaw(bed.frozen.pop(self.target, []))
        tl.mark(f"{self.target} resumed (SIGCONT: {', '.join(thawed) or 'nothing left'})", fault=self.name,
                healed=True, target=self.target)


@dataclass(frozen=True)
class NsLossBurst(NsFault):
    """The WAN's random loss raised to ``loss`` % each way; heal restores the drill's ``wan_loss``."""

    loss: float = 10.0
    name = "loss-burst"

    def __post_init__(self) -> None:
        if not 0 < self.loss <= 100:
            raise ValueError(f"loss-burst: loss {self.loss!r}; give a percentage above 0 and at most 100")

    def params(self) -> dict[str, Any]:
        return {"loss": self.loss}

    def inject(self, bed: Any, tl: Any) -> None:
        bed.burst_drops = bed.tb.wan_drops() or 0
        method = bed.tb.set_loss(self.loss)
        tl.mark(f"WAN loss raised to {self.loss:g}% ({method})", fault=self.name, loss=self.loss)

    def heal(self, bed: Any, tl: Any) -> None:
        dropped = (bed.tb.wan_drops() or 0) - bed.burst_drops
        bed.tb.shape(bed.profile)
        tl.mark(f"WAN loss back to {bed.profile.describe()} ({dropped} packets dropped by the burst)", fault=self.name,
                healed=True, dropped=dropped)


@dataclass(frozen=True)
class NsMirrorRestart(NsFault):
    """The mirror site's storage servers crash (SIGKILL) and are started again after the fault's time: the
    same command line, recovering their logs. The primary does not reconnect: it fails what is pending
    and every later append (its testers stop), which is the stack's behaviour, not the drill's."""

    name = "mirror-restart"

    def skip(self, mode: Mode, schedule: str) -> str | None:
        if promises(mode, schedule) and not promises(mode, "mirror-power-outage"):
            return (f"{mode.name} promises nothing when the mirror loses what it received (its ack means on the "
                    "WAN, not on the mirror's disk)")
        return None

    def inject(self, bed: Any, tl: Any) -> None:
        bed.crash_mirror(tl)

    def heal(self, bed: Any, tl: Any) -> None:
        bed.restart_mirror(tl)


def during_entry(t: Timed) -> dict[str, Any]:
    """A during-run fault as result.json shows it."""
    fault: Any = t.fault
    return {"fault": fault.name, "at": t.at, "for": t.seconds, **fault.params()}


def describe(t: Timed) -> str:
    """``freeze(mirror) at 1.2 s for 0.5 s``."""
    params = ", ".join(f"{v:g}%" if k == "loss" else str(v) for k, v in t.fault.params().items())  # type: ignore[attr-defined]
    return f"{t.fault.name}{f'({params})' if params else ''} at {t.at:g} s for {t.seconds:g} s"


def environment(loss_method: str) -> dict[str, Any]:
    from importlib.metadata import version

    vers = {}
    for pkg in ("pyroute2", "numpy", "smfs-testbed"):
        try:
            vers[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - informational only
            vers[pkg] = None
    return {
        "testbed": "netns",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "host_netem": loss_method == "netem",
        "wan_loss_method": loss_method,
        "wan_delay": "none (namespaces: nftables can drop but not delay)" if loss_method != "netem" else "none",
        "versions": vers,
    }


def _wait_ready(path: Path, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + SITE_READY_TIMEOUT
    while not path.exists():
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
            raise InfrastructureError(f"{what} exited with code {proc.returncode} before it was ready: {' | '.join(tail)}")
        if time.monotonic() > deadline:
            raise InfrastructureError(f"{what} not ready after {SITE_READY_TIMEOUT:.0f} s (see {log})")
        time.sleep(0.05)


class NsBed:
    """The namespace testbed as the drill recipe's :class:`~testbed.drill.runner.Bed`: per mode fresh
    namespaces, the WAN's loss, the mirror site (and the gateways in the FEC modes), the primary site."""

    kind = "netns"

    def __init__(self, cfg: LocalDrillConfig, say: Say) -> None:
        self.cfg, self.say = cfg, say
        self.env = {"SMFS_DEFECT": ",".join(cfg.defects)} if cfg.defects else None
        self.tb: NamespaceTestbed | None = None
        self.gw: Any = None
        self.work = cfg.out / "work"
        self.method = "none"
        self.drops: int | None = None
        self.capture: Any = None  # testbed.drill.wirecheck.Capture in network-sync modes
        self.runner: Runner | None = None  # the during-run faults of this mode
        self.frozen: dict[str, list[tuple[int, int | None, str]]] = {}
        self.burst_drops = 0
        self.appends_may_fail = False  # a fault ended the primary's mirror stream: testers may stop early
        self.mirror_argv: list[str] | None = None
        self.during: list[Timed] = []
        self.tl: Any = None

    def begin(self, mode: Mode, out: Path, tl: Any) -> None:
        self.out, self.work, self.logs = out, out / "work", out / "logs"
        self.tl, self.runner, self.frozen, self.appends_may_fail = tl, None, {}, False
        self.work.mkdir(parents=True, exist_ok=True)
        self.tb = tb = NamespaceTestbed()
        tb.build()
        tl.mark("namespaces up", run_id=tb.run_id)
        from netem.profile import LinkProfile

        self.profile = LinkProfile().with_changes(loss=f"{self.cfg.wan_loss:.10g}%")
        self.method = method = tb.shape(self.profile)
        tl.mark(f"WAN shaped: {self.profile.describe()} via {method}", method=method)
        self.gw = None
        from smfs.auth import create_key_file
        from smfs.site import idle_argv

        create_key_file(self.work / "tunnel.key")  # the testbed's key (0600): gateways and storage servers
        if mode.fec:
            from testbed.drill.gateways import start_gateways

            self.gw = start_gateways(tb, out, self.logs, env=self.env, flush_ms=self.cfg.flush_ms, engine=self.cfg.engine,
                                     key_file=self.work / "tunnel.key")
            tl.mark("FEC gateways up")
        mlog = self.logs / "mirror-site.log"
        self.mproc = tb.spawn("mirror", "servers", [
            sys.executable, "-m", "smfs.site", "mirror", "--servers", str(self.cfg.servers), "--data",
            str(self.work / "mirror"), "--run", str(self.work / "run-mirror"),
            "--listen", f"{ADDRS['mirror'].storage}:{MIRROR_PORT}", "--segment-bytes", str(self.cfg.segment_bytes),
            "--key-file", str(self.work / "tunnel.key"), *idle_argv([t.seconds for t in getattr(self.cfg, "during", ())]),
        ], mlog, env=self.env)
        _wait_ready(self.work / "run-mirror" / "mirror.ready", self.mproc, "mirror site", mlog)
        self.during = []
        for t in self.cfg.during:
            why = t.fault.skip(mode, self.cfg.schedule)  # type: ignore[attr-defined]
            if why is None:
                self.during.append(t)
            else:
                tl.mark(f"fault not run in this mode: {describe(t)} ({why})", fault=t.fault.name, skipped=why)

    def start_primary(self, mode: Mode, tl: Any) -> None:
        assert self.tb is not None
        plog = self.logs / "primary-site.log"
        pargs = [
            sys.executable, "-m", "smfs.site", "primary", "--servers", str(self.cfg.servers), "--data",
            str(self.work / "primary"), "--run", str(self.work / "run-primary"),
            "--mirror", f"{ADDRS['mirror'].storage}:{MIRROR_PORT}", "--source", ADDRS["primary"].storage,
            "--mode", mode.name, "--segment-bytes", str(self.cfg.segment_bytes), "--key-file", str(self.work / "tunnel.key"),
        ]
        if mode.ack_on == "network":
            pargs += ["--gateway-control", f"127.0.0.1:{GATEWAY_CONTROL_PORT}", "--ack-trace", str(self.work / "acks")]
            self._start_capture(tl)
        self.pproc = self.tb.spawn("primary", "servers", pargs, plog, env=self.env)
        _wait_ready(self.work / "run-primary" / "primary.ready", self.pproc, "primary site", plog)
        tl.mark("storage servers up", servers=self.cfg.servers)

    def _start_capture(self, tl: Any) -> None:
        """The wire check's capture: what leaves the primary namespace on its WAN link (host clock),
        from before the primary servers connect to the disaster."""
        from testbed.drill.wirecheck import Capture, WireError

        assert self.tb is not None
        try:
            self.capture = Capture("wan0", self.out / "wan-primary.pcap", prefix=("ip", "netns", "exec", self.tb.ns("primary")),
                                   port=TUNNEL_PORT, registry=self.tb.registry, owner=self.tb.owner)
        except WireError as err:
            raise InfrastructureError(str(err)) from None
        tl.mark("wire capture on the primary's wan0")

    def wire_evidence(self, clock: dict[str, Any], entries: list[Any]) -> dict[str, Any] | None:
        """Stop the capture and hold the primary's acks against it (:mod:`testbed.drill.wirecheck`)."""
        from testbed.drill import wirecheck

        cap, self.capture = self.capture, None
        if cap is None:
            return None
        traces: dict[str, str | None] = {}
        for i in range(self.cfg.servers):
            path = self.work / "acks" / f"acks-{i}.txt"
            traces[path.name] = path.read_text() if path.exists() else None
        if (self.work / "acks").exists():  # the evidence beside the verdict
            shutil.copytree(self.work / "acks", self.out / "acks", dirs_exist_ok=True)
        # The testers run on this host: their completion times are on the capture's clock.
        received = {(e.log, e.seq): e.t_complete for e in entries if e.t_complete is not None}
        res = wirecheck.evaluate(cap.out, traces, clock, cap.stop(), received)
        (self.out / "wire.json").write_text(json.dumps(res, indent=1))
        return res

    def start_testers(self, raw: Path, tl: Any) -> _LedgerDir:
        assert self.tb is not None
        cfg = self.cfg
        self.tproc = self.tb.spawn("primary", "testers", [
            sys.executable, "-m", "workloads.tester", "--testers", str(cfg.testers), "--append-size",
            str(cfg.append_size), "--duration", str(cfg.duration), "--servers", str(cfg.servers),
            "--run", str(self.work / "run-primary"), "--ledger", str(raw),
        ], self.logs / "testers.log", env=self.env)
        return _LedgerDir(raw)

    def clock(self) -> dict[str, float]:
        return {"offset_s": 0.0, "uncertainty_s": 0.0}  # the testers write the host's clock

    def cpu_times(self) -> dict[str, str]:
        """Both sites share the host's CPUs here: its /proc/stat (see :func:`testbed.drill.runner.cpu_busy`)."""
        return {"host": Path("/proc/stat").read_text()}

    def tick(self, elapsed: float) -> None:
        if self.runner is None:  # the faults' clock: seconds since the testers started
            t_start = time.time() - elapsed
            self.runner = Runner(tuple(self.during), self, self.tl, clock=lambda: time.time() - t_start)
        self.runner.tick(elapsed)
        for proc, what in ((self.pproc, "primary site"), (self.mproc, "mirror site")):
            if proc is not None and proc.poll() is not None:  # None: the mirror is down for a restart
                raise InfrastructureError(f"{what} died during the run (exit {proc.returncode})")
        if self.tproc.poll() is not None and elapsed < self.cfg.duration - 1 and not self.appends_may_fail:
            raise InfrastructureError(f"testers exited early (exit {self.tproc.returncode}); see {self.logs / 'testers.log'}")

    def heal_all(self) -> None:
        if self.runner is not None:
            self.runner.heal_all()

    def crash_mirror(self, tl: Any) -> None:
        """The mirror site's storage servers crash: SIGKILL (their page cache survives, as after a process
        crash); the primary's mirror streams end, so from here the testers may stop early."""
        assert self.tb is not None
        killed = []
        for res in self.tb.site_processes("mirror"):
            if res.meta.get("name") == "mirror:servers":
                self.mirror_argv = res.meta.get("argv")
                procs.kill(int(res.ident), res.meta.get("started"))
                self.tb.registry.remove("process", res.ident)
                killed.append(int(res.ident))
        if self.mproc is not None:
            with contextlib.suppress(Exception):
                self.mproc.wait(5)
        self.mproc, self.appends_may_fail = None, True
        (self.work / "run-mirror" / "mirror.ready").unlink(missing_ok=True)
        tl.mark(f"mirror site crashed (SIGKILL of its storage servers, pid {', '.join(map(str, killed)) or 'none'})",
                fault="mirror-restart", killed=killed)

    def restart_mirror(self, tl: Any) -> None:
        """Start the mirror site again with the command line it had; it recovers its logs before it is ready."""
        assert self.tb is not None
        if self.mirror_argv is None:
            raise InfrastructureError("mirror restart: the mirror site's command line was not recorded")
        mlog = self.logs / "mirror-site.log"
        t0 = time.monotonic()
        self.mproc = procs.spawn(self.mirror_argv, owner=self.tb.owner, name="mirror:servers", log_path=mlog,
                                 registry=self.tb.registry, env=self.env)
        _wait_ready(self.work / "run-mirror" / "mirror.ready", self.mproc, "mirror site (restarted)", mlog)
        tl.mark(f"mirror site restarted: logs recovered, listening again after {time.monotonic() - t0:.2f} s",
                fault="mirror-restart", healed=True, pid=self.mproc.pid)

    def before_disaster(self, mode: Mode) -> None:
        return None

    def disaster(self, tl: Any) -> float:
        assert self.tb is not None
        if self.cfg.schedule == "rolling-disaster":
            burst = self.profile.with_changes(loss=f"{self.cfg.burst_loss:.10g}%")
            method = self.tb.shape(burst)
            tl.mark(f"WAN loss raised: {burst.describe()} ({method})")
            time.sleep(self.cfg.burst_seconds)
        tl.pass_gate()
        took = self.tb.disaster("primary")
        t = took["t_instant"]
        tl.mark(f"primary site: power cut at the instant ({len(took['frozen'])} processes frozen together, "
                "then the WAN link cut, then SIGKILL)", site="primary", instant=t, instant_t=round(t - tl.origin, 3),
                killed=took["killed"])
        return t

    def probe(self) -> dict[str, Any] | None:
        assert self.tb is not None
        return self.tb.mirror_probe([MIRROR_PORT + i for i in range(self.cfg.servers)], TUNNEL_PORT,
                                    self.work / "mirror")

    def stop_mirror(self, mode: Mode, out: Path, tl: Any) -> dict[str, Any] | None:
        assert self.tb is not None
        for res in self.tb.site_processes("mirror"):
            procs.kill(int(res.ident), res.meta.get("started"), sig=signal.SIGTERM, wait=5.0)
            procs.kill(int(res.ident), res.meta.get("started"))
        tl.mark("mirror stopped; recovering its logs read-only")
        return self.gw.collect_stats() if self.gw is not None else None

    def listing(self, tl: Any) -> dict[str, Any]:
        from smfs.logstore import site_listing

        return site_listing(self.work / "mirror")

    def primary_listing(self, tl: Any) -> dict[str, Any]:
        from smfs.logstore import site_listing

        return site_listing(self.work / "primary")

    def end_mode(self) -> None:
        cap, self.capture = self.capture, None
        if cap is not None:
            cap.kill()
        if self.tb is not None:
            self.drops = self.tb.wan_drops()
            from testbed.netns.bed import _sigint_deferred

            with _sigint_deferred():  # a Ctrl-C here would leave namespaces recorded but said torn down
                self.tb.teardown()
                self.tb = None
        if not self.cfg.keep_data and self.work.exists():
            shutil.rmtree(self.work, ignore_errors=True)


class _LedgerDir:
    """The testers' ledger files on this machine, as the recipe's ledger source."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.glob("*.jsonl")) if self.path.exists() else 0

    def close(self, wait: float = 5.0) -> int:
        return self.bytes

    def wait_ack(self, timeout: float) -> float | None:
        """Wait for the next acked append written to any tester's file after this call; the host time it
        was seen (polled every 2 ms), or None after ``timeout`` s."""
        files = sorted(self.path.glob("*.jsonl")) if self.path.exists() else []
        offsets = {f: f.stat().st_size for f in files}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for f in sorted(self.path.glob("*.jsonl")):
                size = f.stat().st_size
                start = offsets.get(f, 0)
                if size > start:
                    with open(f, "rb") as fh:
                        fh.seek(start)
                        chunk = fh.read(size - start)
                    done = chunk.rfind(b"\n") + 1  # whole lines only; the rest is read again next time
                    offsets[f] = start + done
                    if any(is_ack_line(line) for line in chunk[:done].splitlines()):
                        return time.time()
            time.sleep(0.002)
        return None


def run_mode(cfg: LocalDrillConfig, mode: Mode, say: Say) -> dict[str, Any]:
    """One mode from a clean state through the shared recipe; returns its entry for result.json."""
    from testbed.drill.runner import RunConfig
    from testbed.drill.runner import run_mode as recipe

    run = RunConfig(out=cfg.out, testers=cfg.testers, append_size=cfg.append_size, duration=cfg.duration,
                    fail_at=cfg.fail_at, servers=cfg.servers, schedule=cfg.schedule,
                    drain_timeout=cfg.drain_timeout, defects=cfg.defects, instant=cfg.instant)
    bed = NsBed(cfg, say)
    entry = recipe(bed, run, mode, say, progress=_Notes)
    entry["wan"] = {"loss_pct": cfg.wan_loss, "method": bed.method, "drops": bed.drops}
    (cfg.out / mode.name / "mode.json").write_text(json.dumps(entry, indent=1, default=str))
    return entry


class _Notes:
    """Progress as a line every 2 s (the namespace drill's runs are short)."""

    def __init__(self, description: str, total: float, say: Say) -> None:
        self.description, self.total, self.say, self.next = description, total, say, 0.0

    def __enter__(self) -> _Notes:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, done: float, status: str = "") -> None:
        if done >= self.next:
            self.say(f"{self.description}: {done:4.1f}/{self.total:.1f} s ({status})")
            self.next += 2.0


def run_local_drill(cfg: LocalDrillConfig, say: Say = print) -> dict[str, Any]:
    cfg.out.mkdir(parents=True, exist_ok=True)
    netem = host_has_netem()
    say(f"local drill in network namespaces -> {cfg.out}")
    if not netem and cfg.wan_loss > 0:
        say("this kernel has no sch_netem: WAN loss is an nftables random drop in the wan namespace, with no delay")
    modes = [run_mode(cfg, mode, say) for mode in cfg.modes]
    result = {
        "verdict": overall_verdict(modes),
        "environment": environment("netem" if netem else ("nftables-random-drop" if cfg.wan_loss > 0 else "none")),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k not in ("modes", "during")}
        | {"modes": [m.name for m in cfg.modes], "during": [during_entry(t) for t in cfg.during]},
        "modes": modes,
    }
    (cfg.out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    say("\n" + table(modes))
    broken = [f"{m['mode']}: {b}" for m in modes for b in m.get("broken_promises", [])]
    if broken:
        say("\nbroken promises (the stack acked what it had not made safe):\n" + "\n".join(f"  {b}" for b in broken))
    say(f"\nverdict: {result['verdict']}   (result: {cfg.out / 'result.json'})")
    return result
