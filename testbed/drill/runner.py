"""One drill recipe over interchangeable testbeds (Jepsen's shape): the namespace testbed and the VM
testbed implement :class:`Bed`; :func:`run_mode` is the recipe, written once.

Per mode: begin from a clean state (fresh namespaces, or the ``ready`` snapshot), start the primary
site in the mode, start the testers, inject the faults during the run, then at ``fail_at`` the
disaster. The disaster is an **instant**: everything in the primary site is frozen at once (no
packet leaves, no ack is recorded after it), then its links are cut, then it is destroyed. The
mirror is then **drained until quiet** (the WAN's queues empty, the mirror's sockets read, its
stores no longer growing), bounded by ``drain_timeout``; a drain that hits the bound makes the
verdict ``unknown``. The mirror's recovered logs are then checked against the ledger, judged by
what the mode promises under the schedule that ran (:func:`smfs.modes.promises`). An ack whose
completion is after the instant (on the host's clock) is a drill fault: reported, never counted.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from smfs.modes import Mode
from testbed.drill.faults import Timeline
from testbed.errors import InfrastructureError  # InfrastructureError: re-exported
from testbed.progress import Say

DRAIN_INTERVAL = 0.5  # s between two probes of the mirror while draining
QUIET_PROBES = 2  # consecutive quiet comparisons (each DRAIN_INTERVAL apart) that end a drain
EXIT_CODES = {"ok": 0, "data-loss": 1, "unknown": 2}


@dataclass(frozen=True)
class RunConfig:
    """What the recipe needs of a drill, whichever the testbed."""

    out: Path
    testers: int
    append_size: int  # bytes
    duration: float  # s the testers run at most
    fail_at: float  # s after the testers start
    servers: int
    schedule: str = "rolling-disaster"
    drain_timeout: float = 60.0  # s the mirror gets to go quiet after the disaster
    defects: tuple[str, ...] = ()  # seeded stack defects (the self-test only), SMFS_DEFECT in the stack
    instant: str = "time"  # "time": the disaster at fail_at; "ack": right after the first ack after it


INSTANTS = ("time", "ack")
"""When the disaster strikes: at ``fail_at`` (``time``), or right after the first acked append the host sees
after it (``ack``), the adversary's choice: an append acked just before the site dies is the one whose
packets may still be in flight, unrepaired and not yet retransmitted (the paper's data-loss-vs-c figure)."""
ACK_WAIT_S = 30.0
"""How long ``instant = "ack"`` waits for an ack before striking anyway (said in the timeline)."""


class LedgerSource(Protocol):
    bytes: int

    def close(self, wait: float = 5.0) -> int: ...
    def wait_ack(self, timeout: float) -> float | None: ...


def await_ack(stream: LedgerSource, tl: Timeline, timeout: float = ACK_WAIT_S) -> None:
    """The gate of ``instant = "ack"``: wait for the next acked append, then return at once (the disaster
    follows); mark when it was seen, or that none came."""
    t0 = time.time()
    seen = stream.wait_ack(timeout)
    if seen is None:
        tl.mark(f"no ack within {timeout:g} s: the disaster strikes without one")
    else:
        tl.mark(f"an ack arrived {seen - t0:.3f} s into the wait: the disaster strikes now", ack_seen=seen)


class Bed(Protocol):
    """A testbed the recipe drives. Every method may raise :class:`InfrastructureError`."""

    kind: str

    def begin(self, mode: Mode, out: Path, tl: Timeline) -> None: ...
    def start_primary(self, mode: Mode, tl: Timeline) -> None: ...
    def start_testers(self, raw: Path, tl: Timeline) -> LedgerSource: ...
    def clock(self) -> dict[str, float]: ...
    def tick(self, elapsed: float) -> None: ...
    def heal_all(self) -> None: ...
    def before_disaster(self, mode: Mode) -> None: ...
    def disaster(self, tl: Timeline) -> float: ...
    def probe(self) -> dict[str, Any] | None: ...
    def stop_mirror(self, mode: Mode, out: Path, tl: Timeline) -> dict[str, Any] | None: ...
    def listing(self, tl: Timeline) -> dict[str, Any]: ...
    def primary_listing(self, tl: Timeline) -> dict[str, Any]: ...
    def end_mode(self) -> None: ...


# --- drain until quiet -------------------------------------------------------------------------


QUEUES = ("wan_backlog", "tcp_rx", "udp_rx")
"""Probe fields that must be zero for the mirror to be quiet: packets in the WAN's queues towards the
mirror, bytes in the mirror's storage sockets and its gateway's tunnel socket."""
GROWING = ("store_bytes", "gateway_in")
"""Probe fields that must not change between two probes: the mirror's log stores, the gateway's
datagrams in."""


def quiet(prev: Mapping[str, Any], cur: Mapping[str, Any]) -> bool:
    """Is the mirror quiet at ``cur``, compared with the probe ``DRAIN_INTERVAL`` before?

    Every queue is empty (a field that is None could not be read and does not count) and nothing
    grew. A probe without any queue field proves nothing and is never quiet."""
    known = [cur[k] for k in QUEUES if cur.get(k) is not None]
    if not known or any(known):
        return False
    return all(cur.get(k) == prev.get(k) for k in GROWING)


@dataclass(frozen=True)
class Drain:
    """How a drain ended: ``quiet`` (the mirror had nothing more to do) or the bound was hit."""

    quiet: bool
    seconds: float
    probes: int
    last: dict[str, Any] = field(default_factory=dict)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"quiet": self.quiet, "seconds": round(self.seconds, 2), "probes": self.probes, "last": self.last,
                "reason": self.reason}


def drain_until_quiet(probe: Callable[[], dict[str, Any] | None], timeout: float,
                      interval: float = DRAIN_INTERVAL, clock: Callable[[], float] = time.monotonic,
                      sleep: Callable[[float], None] = time.sleep) -> Drain:
    """Probe the mirror every ``interval`` s until :func:`quiet` holds ``QUIET_PROBES`` times in a
    row, or ``timeout`` s pass (then ``quiet`` is False and ``reason`` says what was still busy)."""
    t0 = clock()
    prev = probe()
    n, streak = 1, 0
    last = prev or {}
    while True:
        if clock() - t0 >= timeout:
            busy = {k: last.get(k) for k in (*QUEUES, *GROWING) if last.get(k)}
            return Drain(False, clock() - t0, n, last,
                         f"not quiet after {timeout:g} s (faults.drain_timeout); last probe: {busy or last}")
        sleep(interval)
        cur = probe()
        n += 1
        if cur is None or prev is None:
            streak = 0
        elif quiet(prev, cur):
            streak += 1
            if streak >= QUIET_PROBES:
                return Drain(True, clock() - t0, n, cur)
        else:
            streak = 0
        prev = cur
        last = cur or last


# --- acks after the instant --------------------------------------------------------------------


def split_after_instant(entries: list[Any], instant: float | None, clock: Mapping[str, float] | None
                        ) -> tuple[list[Any], list[Any]]:
    """Acks completed after the disaster's instant, and the entries to check without them.

    ``t_complete`` is on the clock of whoever wrote the ledger; ``clock`` holds that clock's offset
    from the host's (``offset_s``, guest minus host) and the measurement's ``uncertainty_s``. An ack
    is after the instant when ``t_complete - offset_s > instant + uncertainty_s``: such an ack cannot
    have been given by a frozen site, so it is a drill fault; it is reported and checked as ``info``
    (its answer does not count), never as acked."""
    from workloads.ledger import Outcome

    if instant is None:
        return [], entries
    offset = (clock or {}).get("offset_s", 0.0)
    slack = (clock or {}).get("uncertainty_s", 0.0)
    late, kept = [], []
    for e in entries:
        if e.outcome is Outcome.OK and e.t_complete - offset > instant + slack:
            late.append(e)
            kept.append(replace(e, outcome=Outcome.INFO, t_complete=None))
        else:
            kept.append(e)
    return late, kept


# --- the recipe --------------------------------------------------------------------------------


def run_mode(bed: Bed, cfg: RunConfig, mode: Mode, say: Say, progress: Callable[..., Any] | None = None
             ) -> dict[str, Any]:
    """One mode on ``bed``, from a clean state; returns its entry for result.json."""
    from smfs.modes import promises
    from testbed.drill.report import ledger_figures
    from workloads.checker import check, verdict_for
    from workloads.ledger import normalize

    out = cfg.out / mode.name
    shutil.rmtree(out, ignore_errors=True)
    (out / "logs").mkdir(parents=True)
    tl = Timeline(say=say, prefix=f"{mode.name}: ")
    promised = promises(mode, cfg.schedule)
    entry: dict[str, Any] = {"mode": mode.name, "durable": promised, "schedule": cfg.schedule,
                             "promise": "no acked append lost" if promised else "none"}
    if cfg.defects:
        entry["defects"] = list(cfg.defects)
    stream: LedgerSource | None = None
    try:
        bed.begin(mode, out, tl)
        bed.start_primary(mode, tl)
        # The first figures before the testers start: a guest command takes seconds under TCG, and taken
        # after, they delayed the faults' clock (a fault due at 2 s came at 4.8 s).
        sample_cpu = getattr(bed, "cpu_times", None)  # {machine: /proc/stat's cpu line}, where the bed can
        sample_taps = getattr(bed, "tap_counters", None)  # {site: host tap counters}, where the VMs have taps
        cpu0 = sample_cpu() if sample_cpu is not None else None
        taps0 = sample_taps() if sample_taps is not None else None
        stream = bed.start_testers(out / "ledger-raw", tl)
        t_start = tl.mark(f"testers started ({cfg.testers} × {cfg.append_size} B appends)")
        clocks = [bed.clock()]
        _run_until(bed, cfg, mode, t_start, stream, say, progress)
        bed.heal_all()
        # The closing figures (a file read per guest, fast) before what dies with the primary: every
        # second between fail_at and the disaster lets the WAN drain what a broken stack acked early.
        cpu1 = sample_cpu() if sample_cpu is not None else None
        taps1 = sample_taps() if sample_taps is not None else None
        if cpu0 is not None and cpu1 is not None:
            entry["cpu"] = cpu_busy(cpu0, cpu1)
            if by_process := cpu_by_process(cpu0, cpu1):
                entry["cpu_by_process"] = by_process
            if udp := udp_drops(cpu0, cpu1):
                entry["udp"] = udp
        if taps0 is not None and taps1 is not None:
            entry["host_tap"] = tap_deltas(taps0, taps1)
        # What dies with the primary (its gateway's statistics, its ack traces) last, just before the
        # disaster: read earlier, the acks given meanwhile went unchecked by the wire check.
        bed.before_disaster(mode)
        clocks.append(bed.clock())
        if cfg.instant == "ack":
            tl.gate = lambda: await_ack(stream, tl)
        instant = bed.disaster(tl)
        tl.gate = None
        entry["instant"] = {"t": instant, "t_rel": round(instant - tl.origin, 3)}
        entry["clock"] = clocks[-1] | {"measured": clocks}
        ledger_bytes = stream.close()
        stream = None
        drain = None
        probe = bed.probe()
        if probe is not None:  # the mirror survived: drain it until quiet
            drain = drain_until_quiet(bed.probe, cfg.drain_timeout)
            entry["drain"] = drain.to_dict()
            tl.mark(f"mirror drained: {'quiet' if drain.quiet else 'NOT quiet'} after {drain.seconds:.1f} s "
                    f"({drain.probes} probes)", ledger_bytes=ledger_bytes)
        fec = bed.stop_mirror(mode, out, tl)
        if fec is not None:
            entry["fec"] = fec
        listing = bed.listing(tl)
        (out / "mirror-listing.json").write_text(json.dumps(listing))
        tl.mark(f"mirror listing recovered: {sum(len(v) for v in listing.get('logs', {}).values())} records")
        ledger = normalize(out / "ledger-raw", out / "ledger")
        late, entries = split_after_instant(list(ledger.entries), instant, entry["clock"])
        if late:
            entry["acks_after_instant"] = {"count": len(late), "examples": [[e.log, e.seq, e.t_complete]
                                                                            for e in late[:10]]}
            entry.setdefault("drill_faults", []).append(
                f"{len(late)} acks completed after the disaster's instant; not counted (checked as info)")
            tl.mark(f"DRILL FAULT: {len(late)} acks after the instant (not counted)")
        result = check(entries, listing, durable=promised)
        entry.update(result.to_dict())
        entry.update(ledger_figures(entries, t_end=instant))
        entry["verdict"] = str(verdict_for(result, promised))
        if cfg.schedule in LOCAL_EVIDENCE:
            entry["primary_disk"] = _local_durability(bed, entries, tl)
            if entry["primary_disk"]["lost"] or entry["primary_disk"]["corrupt"]:
                entry["verdict"] = "data-loss"
        wire = getattr(bed, "wire_evidence", None)
        if wire is not None and mode.ack_on == "network":
            _wire_check(entry, wire(entry["clock"], entries), tl)
        if drain is not None and not drain.quiet:
            entry["verdict"] = "unknown"
            entry["error"] = f"drain: {drain.reason}"
        tl.mark(f"checked: {result.summary_line()}"
                + ("" if entry["verdict"] == str(result.verdict)
                   else f"; verdict {entry['verdict']} ({entry.get('error') or '; '.join(entry.get('broken_promises', []))})"))
    except InfrastructureError as err:
        entry.update({"verdict": "unknown", "error": str(err)})
        say(f"{mode.name}: INFRASTRUCTURE FAILURE: {err}")
    except Exception as err:  # noqa: BLE001 - a drill bug is "unknown", never "data-loss"
        (out / "logs" / "drill-error.txt").write_text(traceback.format_exc())
        entry.update({"verdict": "unknown", "error": f"{type(err).__name__}: {err}"})
        say(f"{mode.name}: DRILL ERROR (verdict unknown): {err}; traceback in {out / 'logs' / 'drill-error.txt'}")
    finally:
        if stream is not None:
            stream.close(wait=0)
        try:
            bed.end_mode()
        except Exception as err:  # noqa: BLE001 - the verdict stands; the leftover is reported
            entry.setdefault("drill_faults", []).append(f"cleanup after the mode failed: {err}")
            say(f"{mode.name}: cleanup failed: {err} (./inv down removes what is left)")
        entry["timeline"] = tl.events
        (out / "mode.json").write_text(json.dumps(entry, indent=1, default=str))
    return entry


def cpu_busy(before: Mapping[str, str], after: Mapping[str, str]) -> dict[str, dict[str, float]]:
    """Per machine, the share of its CPU time that was busy (user, nice, system, irq, softirq) and
    stolen (steal: a guest's vCPU waiting for the host) between two readings of /proc/stat's ``cpu``
    line (all CPUs summed), and its CPU count. A machine that reads near 1.0 busy bounded the mode's
    throughput by the emulation's CPU, not by the WAN; a machine missing from either reading is left out."""
    out = {}
    for name in before.keys() & after.keys():
        a, b = _cpu_fields(before[name]), _cpu_fields(after[name])
        if a is None or b is None:
            continue
        d = [y - x for x, y in zip(a[0], b[0], strict=True)]
        total = sum(d[:8])
        if total <= 0:
            continue
        user, nice, system, idle, iowait, irq, softirq, steal = d[:8]
        out[name] = {"busy": round((user + nice + system + irq + softirq) / total, 3),
                     "kernel": round((system + irq + softirq) / total, 3),  # of which the kernel's
                     "steal": round(steal / total, 3), "cpus": b[1]}
    return dict(sorted(out.items()))


def udp_drops(before: Mapping[str, str], after: Mapping[str, str]) -> dict[str, dict[str, int]]:
    """Per machine, its kernel's UDP datagrams received and dropped for a full socket receive buffer
    (``/proc/net/snmp``'s ``InDatagrams`` and ``RcvbufErrors``, between two readings that carry them
    after ``@@snmp``): a receiving gateway too slow for the WAN's bursts loses datagrams there, after
    the WAN, and FEC sees them as WAN loss. Machines without the counters are left out."""
    out = {}
    for name in sorted(before.keys() & after.keys()):
        a, b = _udp_counters(before[name]), _udp_counters(after[name])
        if a and b:
            out[name] = {"in_datagrams": b["InDatagrams"] - a["InDatagrams"],
                         "rcvbuf_errors": b["RcvbufErrors"] - a["RcvbufErrors"]}
    return out


def _udp_counters(text: str) -> dict[str, int] | None:
    if "@@snmp" not in text:
        return None
    lines = [ln.split() for ln in text.split("@@snmp", 1)[1].splitlines() if ln.startswith("Udp:")]
    if len(lines) < 2 or len(lines[0]) != len(lines[1]):
        return None
    try:
        got = dict(zip(lines[0][1:], map(int, lines[1][1:]), strict=True))
    except ValueError:
        return None
    return got if {"InDatagrams", "RcvbufErrors"} <= got.keys() else None


def tap_deltas(before: Mapping[str, Mapping[str, int]], after: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    """Per site, what its VM's host tap counted between two readings (packets into the VM, and those
    dropped at its full queue); a site missing from either reading is left out."""
    return {site: {k: after[site][k] - before[site][k] for k in before[site].keys() & after[site].keys()}
            for site in sorted(before.keys() & after.keys())}


def cpu_by_process(before: Mapping[str, str], after: Mapping[str, str], top: int = 6) -> dict[str, list[dict[str, Any]]]:
    """Per machine, where its busy CPU went between two readings that carry each process's stat line
    (``@@stat``) and command line (``@@cmdline``, see :data:`testbed.drill.vm.PROC_CPU_SCRIPT`): the
    ``top`` biggest shares of all its CPU time by what ran (a ``-m`` module, the compiled gateway, a
    program's name, ``kernel threads`` for softirq and worker threads), the rest summed as ``other``,
    and ``irq+softirq`` charged to no process. Machines without process lines are left out."""
    out = {}
    for name in before.keys() & after.keys():
        a, b = _cpu_fields(before[name]), _cpu_fields(after[name])
        procs_a, procs_b = _process_ticks(before[name]), _process_ticks(after[name])
        if a is None or b is None or not procs_b:
            continue
        d = [y - x for x, y in zip(a[0], b[0], strict=True)]
        total = sum(d[:8])
        if total <= 0:
            continue
        shares: dict[str, int] = {}
        for pid, (what, ticks) in procs_b.items():
            prev = procs_a.get(pid)
            used = ticks - (prev[1] if prev is not None and prev[0] == what else 0)
            if used > 0:
                shares[what] = shares.get(what, 0) + used
        ranked = sorted(shares.items(), key=lambda kv: (-kv[1], kv[0]))
        rows = [{"what": w, "share": round(t / total, 3)} for w, t in ranked[:top]]
        if rest := sum(t for _w, t in ranked[top:]):
            rows.append({"what": "other", "share": round(rest / total, 3)})
        rows.append({"what": "irq+softirq", "share": round((d[5] + d[6]) / total, 3)})
        out[name] = rows
    return dict(sorted(out.items()))


def _process_ticks(text: str) -> dict[int, tuple[str, int]]:
    """``{pid: (what it runs, utime + stime)}`` from a reading's ``@@stat`` and ``@@cmdline`` parts."""
    if "@@stat" not in text or "@@cmdline" not in text:
        return {}
    stats, cmdlines = text.split("@@stat", 1)[1].split("@@cmdline", 1)
    argv: dict[int, list[str]] = {}
    for line in cmdlines.splitlines():
        m = re.match(r"/proc/(\d+)/cmdline:(.*)", line)
        if m:
            argv[int(m.group(1))] = [w for w in m.group(2).split("\0") if w]
    out = {}
    for line in stats.splitlines():
        head, sep, rest = line.rpartition(")")
        fields = rest.split()
        if not sep or len(fields) < 13 or not head.split(" (", 1)[0].strip().isdigit():
            continue
        pid = int(head.split(" (", 1)[0])
        comm = head.split(" (", 1)[1] if " (" in head else "?"
        out[pid] = (_what_runs(argv.get(pid, []), comm), int(fields[11]) + int(fields[12]))
    return out


def _what_runs(argv: list[str], comm: str) -> str:
    """A process's label: the module of ``python3 -m M``, the compiled gateway, a program's name;
    a process without a command line is a kernel thread."""
    if not argv:
        return "kernel threads"
    if "-m" in argv[:-1]:
        return argv[argv.index("-m") + 1]
    if argv[0].endswith("smfs-gateway") or argv[0].endswith("smfs-gateway-static"):
        return "gateway (C)"
    return Path(argv[0]).name or comm


def _cpu_fields(proc_stat: str) -> tuple[list[int], int] | None:
    """The summed ``cpu`` line's first eight counters (jiffies) and the number of ``cpuN`` lines."""
    lines = proc_stat.splitlines()
    for line in lines:
        parts = line.split()
        if parts and parts[0] == "cpu" and len(parts) >= 9:
            try:
                return [int(v) for v in parts[1:9]], sum(1 for ln in lines if re.match(r"cpu\d+ ", ln))
            except ValueError:
                return None
    return None


LOCAL_EVIDENCE = ("site-power-cut",)
"""Schedules after which the primary's own disk is evidence too: its power was cut, not its site
destroyed, so every acked append must be on it (every mode acks after its local write)."""


def _wire_check(entry: dict[str, Any], res: dict[str, Any] | None, tl: Timeline) -> None:
    """network-sync's ack condition, checked on the wire (:mod:`testbed.drill.wirecheck`): an ack given before
    its bytes and repairs left the site breaks the mode's promise whatever the disaster found, so the
    verdict is ``data-loss`` (the append was acked while a WAN loss could take it); reported apart."""
    from testbed.drill.wirecheck import summary_line

    if res is None:
        return
    entry["wire"] = res
    tl.mark(summary_line(res))
    if res["unsafe"] and not res.get("inconclusive"):
        entry["unsafe_acks"] = res["unsafe"]
        entry["verdict"] = "data-loss"
        entry.setdefault("broken_promises", []).append(
            f"{res['unsafe']} of {res['checked']} acks were given before their bytes and every repair covering "
            "them were on the WAN (wire check)")


def _local_durability(bed: Bed, entries: list[Any], tl: Timeline) -> dict[str, Any]:
    """Every acked append on the primary's own disk after its power cut? (every mode promises it)."""
    from workloads.checker import check

    local = check(entries, bed.primary_listing(tl), durable=True)
    got = {"acked": local.acked, "lost": local.lost, "corrupt": local.corrupt, "records": local.mirror_records,
           "examples": {k: [list(p) for p in v] for k, v in local.examples.items() if v and k in ("lost", "corrupt")},
           "error": local.error}
    tl.mark(f"primary's own disk: {local.mirror_records} records; {local.lost} acked appends missing, "
            f"{local.corrupt} corrupt")
    return got


def _run_until(bed: Bed, cfg: RunConfig, mode: Mode, t_start: float, stream: LedgerSource, say: Say,
               progress: Callable[..., Any] | None) -> None:
    """Let the testers run until ``fail_at``, injecting the faults due and checking liveness."""
    from testbed.progress import Progress

    bar = (progress or Progress)(f"{mode.name}: testers running until the disaster", cfg.fail_at, say)
    with bar:
        while (elapsed := time.time() - t_start) < cfg.fail_at:
            bed.tick(elapsed)
            bar.update(elapsed, f"{stream.bytes // 1024} KiB of ledger")
            time.sleep(0.05 if bed.kind == "netns" else 0.2)


def overall_verdict(modes: list[dict[str, Any]]) -> str:
    verdicts = [m.get("verdict", "unknown") for m in modes]
    if "data-loss" in verdicts:
        return "data-loss"
    if "unknown" in verdicts or not verdicts:
        return "unknown"
    return "ok"
