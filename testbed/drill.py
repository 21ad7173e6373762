"""The VM disaster drill: the spec's testbed, the shaped WAN, the SMFS stack in the guests, a fault
schedule (default: the rolling disaster) during the run, then the mirror's recovered logs against
the testers' ledgers, for each mode from the same snapshot.

Once: bring up (or reuse) the testbed, shape the WAN on each site's ingress, calibrate, give each
site its storage address, start the mirror site and both FEC gateways, wait until they answer, and
take snapshot "ready". Per mode: restore "ready", start the primary site in the mode, stream the
testers' ledger over a virtio-serial port to the host, inject the faults at ``fail_at``, let the
mirror drain what is still in the WAN, stop it, recover its listing read-only, and check.
The result directory and exit codes are those of the namespace drill (:mod:`testbed.localdrill`).
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smfs.modes import Mode
from testbed.faults import Runner, Timed, Timeline, during, schedule
from testbed.localdrill import EXIT_CODES, InfrastructureError, overall_verdict
from testbed.progress import Progress
from testbed.report import ledger_figures, table

Say = Callable[[str], None]
SNAPSHOT = "ready"
MIRROR_PORT = 7700
TUNNEL_PORT = 7800
CONTROL = "127.0.0.1:7790"
RUN = "/run/smfs"
KEY_FILE = "/run/smfs/tunnel.key"
STATS_FILE = "/run/smfs/fec.json"
LEDGER_PORT_DEV = "/dev/virtio-ports/smfs.ledger"
READY_TIMEOUT = 90.0  # s for a site or gateway to answer under TCG
DRILL_PROBES = 2000  # calibration probes at most per drill (about 4 s)
STORAGE = {"primary": ("198.18.11.1", "198.18.11.0/24"), "mirror": ("198.18.12.1", "198.18.12.0/24")}
"""Per site: the storage servers' address (on lo) and subnet, routed into the gateway's TUN in the
FEC modes; the bare modes use the VMs' own addresses."""

__all__ = ["EXIT_CODES", "DrillConfig", "run_drill"]


DRILL_KEYS = {
    "workload": {"testers", "append_size", "duration", "server_pairs"},
    "fec": {"r", "c", "flush"},
    "faults": {"schedule", "fail_at", "burst_loss", "burst", "during"},
}
"""The fields a drill reads from the spec's [workload], [fec] and [faults] tables; any other is a typo."""


@dataclass(frozen=True)
class DrillConfig:
    """A drill as run: the spec's [workload]/[fec]/[faults] tables resolved, plus the flags."""

    spec_path: Path
    modes: tuple[Mode, ...]
    out: Path
    keep: bool = False
    testers: int = 64
    append_size: int = 512 * 1024  # bytes
    duration: float = 60.0  # s the testers run at most
    fail_at: float = 30.0  # s after the testers start
    servers: int = 8
    r: int = 8
    flush_ms: float = 5.0  # [fec] flush: a partial bin's repair goes out this long after its first packet
    schedule: str = "rolling-disaster"
    burst_loss: str = "1%"
    burst_seconds: float = 0.5
    drain: float = 2.0  # s the mirror gets after the power cut, on top of the WAN's one-way delay
    during: tuple[Timed, ...] = ()  # faults injected (and healed) during the run, before the disaster

    def __post_init__(self) -> None:
        checks = [
            (self.testers >= 1, "workload.testers", "must be at least 1"),
            (self.servers >= 1, "workload.server_pairs", "must be at least 1"),
            (self.duration > 0, "workload.duration", "must be positive, e.g. \"20s\""),
            (0 < self.fail_at <= self.duration, "faults.fail_at", "must be within workload.duration"),
            (len(self.modes) > 0, "modes", "give at least one mode"),
            (0 < self.flush_ms <= 1000, "fec.flush", "must be within (0, 1000] ms, e.g. \"5ms\""),
        ]
        for ok, name, fix in checks:
            if not ok:
                raise ValueError(f"{name}: {fix}")

    @classmethod
    def from_spec(cls, spec: Any, modes: tuple[Mode, ...], out: Path, keep: bool = False) -> DrillConfig:
        from netem.profile import parse_time_us
        from smfs.units import parse_size

        wl, fec, faults = (dict(spec.sections.get(k, {})) for k in ("workload", "fec", "faults"))
        for section, got in (("workload", wl), ("fec", fec), ("faults", faults)):
            unknown = sorted(set(got) - DRILL_KEYS[section])
            if unknown:
                known = ", ".join(sorted(DRILL_KEYS[section]))
                raise ValueError(f"{section}.{unknown[0]}: unknown field; use one of {known}")
        if int(fec.get("c", 3)) != 3:
            raise ValueError("fec.c: the gateways run c = 3 layers (interleaves 1, 11, 19); leave c = 3 or remove it")
        duration = parse_time_us(wl.get("duration", "60s"), "workload.duration") / 1e6
        fail_at = parse_time_us(faults.get("fail_at", f"{duration * 0.6:g}s"), "faults.fail_at") / 1e6
        name = str(faults.get("schedule", "rolling-disaster"))
        schedule(name, spec.wan)  # validates the name: a typo is a one-line error before any VM boots
        return cls(
            spec_path=Path(spec.path), modes=modes, out=out, keep=keep, testers=int(wl.get("testers", 64)),
            append_size=parse_size(str(wl.get("append_size", "512KiB")), "workload.append_size"),
            duration=duration, fail_at=fail_at, servers=int(wl.get("server_pairs", 8)), r=int(fec.get("r", 8)),
            flush_ms=parse_time_us(fec.get("flush", "5ms"), "fec.flush") / 1000,
            schedule=str(faults.get("schedule", "rolling-disaster")), burst_loss=str(faults.get("burst_loss", "1%")),
            burst_seconds=parse_time_us(faults.get("burst", "500ms"), "faults.burst") / 1e6,
            during=during(faults.get("during"), spec, fail_at),
        )


# --- the ledger stream --------------------------------------------------------------------------


class LedgerStream:
    """Reads the primary's ledger port (a unix socket QEMU listens on) into a file until EOF or close.

    The guest blocks on writes to the port until a host end is connected, so connect before the
    testers start; a power cut ends the stream with EOF, and every line written before it is here."""

    def __init__(self, sock_path: str, out: Path) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(sock_path)
        self.sock.settimeout(0.5)
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ledger-stream", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with open(self.out, "ab") as f:
            while not self._stop.is_set():
                try:
                    data = self.sock.recv(1 << 16)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    break
                f.write(data)
                f.flush()
                self.bytes += len(data)

    def close(self, wait: float = 5.0) -> int:
        """Stop reading (after EOF or ``wait`` s) and return the bytes received."""
        self._thread.join(wait)
        self._stop.set()
        self._thread.join()
        self.sock.close()
        return self.bytes


# --- the stack in the guests --------------------------------------------------------------------


def _vm(tb: Any, site: str) -> str:
    vms = tb.site_vms(site)
    if len(vms) != 1:
        raise InfrastructureError(f"sites.{site}: the drill runs one VM per site, found {len(vms)}")
    return vms[0]


def _ip(tb: Any, vm: str) -> str:
    return tb.info(vm).address.split("/")[0]


def _wait_file(g: Any, path: str, proc: str, what: str, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while g.exec(["test", "-e", path], timeout=10).rc != 0:
        if g.find(proc) is None:
            tail = g.sh(f"tail -n 3 {RUN}/{proc}.log", check=False).strip().replace("\n", " | ")
            raise InfrastructureError(f"{what} exited before it was ready: {tail[:300]}")
        if time.monotonic() > deadline:
            raise InfrastructureError(f"{what} not ready after {timeout:.0f} s (see {RUN}/{proc}.log in the guest)")
        time.sleep(0.3)


def prepare(tb: Any, cfg: DrillConfig, tl: Timeline) -> dict[str, Any]:
    """Shape, calibrate, start the mirror site and both gateways, snapshot "ready"; returns the WAN facts."""
    import secrets

    from testbed import wan

    profile = tb.spec.wan
    wan.start_resident(tb)
    shaped = wan.shape(tb, profile)
    wan.remember(tb, profile)
    tl.mark(f"WAN shaped at {shaped.enforcement_point}: {profile.describe()} (read back on {', '.join(shaped.read_back)})")
    from netem.calibrate import probes_for_profile

    # A short calibration: low loss rates need ~20k probes for ±20 % (a minute under TCG); the drill
    # caps them and the rows carry the precision reached. `./inv calibrate` measures in full.
    cal = wan.calibrate(tb, profile, probes=min(probes_for_profile(profile), DRILL_PROBES))
    tl.mark(f"calibrated: RTT median {cal['measured'].get('rtt_median_ms')} ms, "
            f"loss {cal['measured'].get('loss_pct')} % round trip")
    key = secrets.token_hex(32).encode()
    prim, mirr = _vm(tb, "primary"), _vm(tb, "mirror")
    for site, vm in (("primary", prim), ("mirror", mirr)):
        g = tb.guest(vm)
        # The gateways ask for 4 MiB socket buffers; the kernel caps them at rmem_max/wmem_max (~208 KiB),
        # and a full receive buffer under TCG would look like WAN loss.
        g.sh(f"mkdir -p {RUN} /data && ip addr replace {STORAGE[site][0]}/32 dev lo && "
             "echo 8388608 > /proc/sys/net/core/rmem_max && echo 8388608 > /proc/sys/net/core/wmem_max")
        g.write_file(KEY_FILE, key, mode=0o600)
    mg = tb.guest(mirr)
    mg.spawn("mirror-site", ["python3", "-m", "smfs.site", "mirror", "--servers", str(cfg.servers), "--data",
                             "/data/mirror", "--run", f"{RUN}/mirror", "--listen", f"0.0.0.0:{MIRROR_PORT}"])
    for site, vm in (("mirror", mirr), ("primary", prim)):
        peer = "mirror" if site == "primary" else "primary"
        peer_vm = mirr if site == "primary" else prim
        tb.guest(vm).spawn("gateway", [
            "python3", "-m", "smfs.gateway", "--site", site, "--tun", "smfs0", "--address", STORAGE[site][0],
            "--route", STORAGE[peer][1], "--local", f"{_ip(tb, vm)}:{TUNNEL_PORT}",
            "--peer", f"{_ip(tb, peer_vm)}:{TUNNEL_PORT}", "--control", CONTROL, "--key-file", KEY_FILE,
            "--stats", STATS_FILE, "--ready", f"{RUN}/gateway.ready", "--r", str(cfg.r),
            "--wan-mtu", str(tb.spec.mtu), "--wan-rate-bps", str(egress_rate_bps(tb.spec.wan, site)),
            "--edge-queue", str(edge_queue_packets(tb.spec.wan, site, tb.spec.mtu)), "--flush-ms", f"{cfg.flush_ms:g}",
        ])
    _wait_file(mg, f"{RUN}/mirror/mirror.ready", "mirror-site", "mirror site")
    for vm in (mirr, prim):
        _wait_file(tb.guest(vm), f"{RUN}/gateway.ready", "gateway", f"{vm} gateway")
    tl.mark(f"mirror site ({cfg.servers} servers) and both FEC gateways (r = {cfg.r}) answer")
    secs = tb.snapshot(SNAPSHOT, say=lambda _m: None)
    tl.mark(f"snapshot {SNAPSHOT!r} taken ({secs:.1f} s paused)")
    return {"shaped": shaped.to_dict(), "calibration": cal}


def egress_rate_bps(profile: Any, site: str) -> int:
    """The WAN rate a site's gateway paces its egress to (0: the WAN has no rate, nothing to pace):
    a→b for the primary, b→a for the mirror. Repairs share it, so FEC never overruns the WAN's queue."""
    return (profile.a_to_b if site == "primary" else profile.b_to_a).rate_bps or 0


def edge_queue_packets(profile: Any, site: str, mtu: int) -> int:
    """The site edge's buffer in front of a paced gateway: one bandwidth-delay product (the egress rate
    × the round trip's delay) in MTU packets, at least 16; 0 (the kernel's default) when not paced.
    A bigger one would only hold more acked-but-unsent data where a site disaster destroys it."""
    rate = egress_rate_bps(profile, site)
    if not rate:
        return 0
    rtt_s = (profile.a_to_b.delay_us + profile.b_to_a.delay_us) / 1e6
    return max(16, math.ceil(rate / 8 * rtt_s / mtu))


def _gateway_stats(g: Any) -> dict[str, Any] | None:
    try:
        return json.loads(g.read_file(STATS_FILE))
    except Exception:  # noqa: BLE001 - a missing stats file is reported as None
        return None


def _fec_totals(per_site: dict[str, dict[str, Any] | None], out: Path) -> dict[str, Any]:
    """Both gateways' statistics, saved as ``fec-<site>.json``, with the namespace drill's totals."""
    from testbed.gateways import GatewayPair

    files = {site: out / f"fec-{site}.json" for site in per_site}
    for site, stats in per_site.items():
        files[site].write_text(json.dumps(stats))
    return GatewayPair(files).collect_stats()


def _check_alive(pg: Any, mg: Any) -> None:
    for g, name in ((pg, "primary-site"), (mg, "mirror-site"), (pg, "testers")):
        if g.find(name) is None:
            tail = g.sh(f"tail -n 3 {RUN}/{name}.log", check=False).strip().replace("\n", " | ")
            raise InfrastructureError(f"{name} died during the run: {tail[:300]}")


def run_mode(tb: Any, cfg: DrillConfig, mode: Mode, say: Say) -> dict[str, Any]:
    """One mode from snapshot "ready"; returns its entry for result.json."""
    from smfs.logstore import site_listing  # noqa: F401 - the guest runs the same function
    from workloads.checker import check, verdict_for
    from workloads.ledger import load_ledgers, normalize

    out = cfg.out / mode.name
    shutil.rmtree(out, ignore_errors=True)
    (out / "logs").mkdir(parents=True)
    tl = Timeline(say=say, prefix=f"{mode.name}: ")
    entry: dict[str, Any] = {"mode": mode.name, "durable": mode.durable}
    stream: LedgerStream | None = None
    prim, mirr = _vm(tb, "primary"), _vm(tb, "mirror")
    try:
        secs = tb.restore(SNAPSHOT, say=lambda _m: None)
        tl.mark(f"restored {SNAPSHOT!r} ({secs:.1f} s)")
        pg, mg = tb.guest(prim), tb.guest(mirr)
        if mode.fec:
            target, source = STORAGE["mirror"][0], STORAGE["primary"][0]
        else:
            target, source = _ip(tb, mirr), _ip(tb, prim)
        args = ["python3", "-m", "smfs.site", "primary", "--servers", str(cfg.servers), "--data", "/data/primary",
                "--run", f"{RUN}/primary", "--mirror", f"{target}:{MIRROR_PORT}", "--source", source,
                "--mode", mode.name]
        if mode.ack_on == "network":
            args += ["--gateway-control", CONTROL]
        pg.spawn("primary-site", args)
        _wait_file(pg, f"{RUN}/primary/primary.ready", "primary-site", "primary site")
        tl.mark(f"primary site up ({cfg.servers} servers, {'through the gateways' if mode.fec else 'bare TCP'})")
        stream = LedgerStream(tb.info(prim).ledger, out / "ledger-raw" / "stream.jsonl")
        pg.spawn("testers", ["python3", "-m", "workloads.tester", "--testers", str(cfg.testers), "--append-size",
                             str(cfg.append_size), "--duration", str(cfg.duration), "--servers", str(cfg.servers),
                             "--run", f"{RUN}/primary", "--ledger-stream", LEDGER_PORT_DEV])
        t_start = tl.mark(f"testers started ({cfg.testers} × {cfg.append_size} B appends)")
        runner = Runner(cfg.during, tb, tl, clock=lambda: time.time() - t_start)
        next_check = 0.0
        with Progress(f"{mode.name}: testers running until the disaster", cfg.fail_at, say) as bar:
            while (elapsed := time.time() - t_start) < cfg.fail_at:
                runner.tick(elapsed)
                if elapsed >= next_check and not runner.injected:  # a frozen VM cannot answer
                    _check_alive(pg, mg)
                    next_check = elapsed + 3.0
                bar.update(elapsed, f"{stream.bytes // 1024} KiB of ledger")
                time.sleep(0.2)
        runner.heal_all()
        fec_sites: dict[str, dict[str, Any] | None] = {}
        if mode.fec:
            fec_sites["primary"] = _gateway_stats(pg)  # its stats die with it: read just before the faults
        for fault in schedule(cfg.schedule, tb.spec.wan, cfg.burst_loss, cfg.burst_seconds):
            fault.inject(tb, tl)
        t_cut = time.time()
        ledger_bytes = stream.close()
        stream = None
        if tb.domain(mirr).isActive():
            drain = cfg.drain + tb.spec.wan.a_to_b.delay_us / 1e6
            time.sleep(drain)
            tl.mark(f"mirror drained {drain:.1f} s; stopping it", ledger_bytes=ledger_bytes)
            mg.stop("mirror-site", wait=10)
            if mode.fec:
                mg.stop("gateway", wait=5)  # writes its final statistics on exit
                fec_sites["mirror"] = _gateway_stats(mg)
            for name in ("mirror-site", "gateway"):
                try:
                    (out / "logs" / f"mirror-{name}.log").write_bytes(mg.read_file(f"{RUN}/{name}.log"))
                except Exception:  # noqa: BLE001 - a healed disk may have rebooted the mirror: no log
                    pass
        else:
            secs = tb.start(mirr)
            mg = tb.guest(mirr)
            tl.mark(f"mirror was hit: booted it again ({secs:.1f} s) to recover its logs", ledger_bytes=ledger_bytes)
            fec_sites["mirror"] = None
        if mode.fec:
            entry["fec"] = _fec_totals(fec_sites, out)
        mg.sh(f"mkdir -p {RUN}")  # a rebooted mirror starts with an empty /run
        res = mg.exec(["python3", "-c", "import json; from smfs.logstore import site_listing; "
                       "json.dump(site_listing('/data/mirror'), open('/run/smfs/listing.json', 'w'))"], timeout=180)
        if res.rc != 0:
            raise InfrastructureError(f"mirror listing failed: {res.stderr.decode(errors='replace').strip()[-200:]}")
        listing = json.loads(mg.read_file(f"{RUN}/listing.json"))
        (out / "mirror-listing.json").write_text(json.dumps(listing))
        tl.mark(f"mirror listing recovered: {sum(len(v) for v in listing['logs'].values())} records")
        normalize(out / "ledger-raw", out / "ledger")
        ledger = load_ledgers(out / "ledger")
        result = check(ledger.entries, listing, durable=mode.durable)
        entry.update(result.to_dict())
        entry.update(ledger_figures(ledger.entries, t_end=t_cut))
        entry["verdict"] = verdict_for(result, mode.durable)
        tl.mark(f"checked: {result.summary_line()}")
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
        entry["timeline"] = tl.events
        (out / "mode.json").write_text(json.dumps(entry, indent=1, default=str))
    return entry


def environment(tb: Any, wan_facts: dict[str, Any]) -> dict[str, Any]:
    from importlib.metadata import version

    from testbed import wan

    chosen = wan.enforcement(tb)
    vers = {}
    for pkg in ("libvirt-python", "pyroute2", "numpy", "smfs-testbed"):
        try:
            vers[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - informational only
            vers[pkg] = None
    return {"testbed": "vm", "accel": tb.accel, "accel_reason": tb.state.get("accel_reason"),
            "image": tb.state.get("image"), "host_kernel": platform.release(), "python": platform.python_version(),
            "wan_enforcement": chosen["point"], "wan_enforcement_reason": chosen["reason"],
            "wan_loss_method": f"netem ({chosen['point']})",
            "wan": wan_facts.get("shaped"), "versions": vers}


def run_drill(spec_path: str | Path, modes: tuple[Mode, ...], out: Path | None = None, keep: bool = False,
              say: Say = print) -> dict[str, Any]:
    """The whole drill; returns result.json's content (``verdict`` decides the exit code).

    The testbed is brought up (or the active one of the same spec reused) and torn down at the end
    unless ``keep``, also on Ctrl-C or error."""
    from testbed import vmbed
    from testbed.spec import load as load_spec

    spec = load_spec(spec_path)
    out = out or Path("results") / spec.name / time.strftime("%Y%m%d-%H%M%S")
    cfg = DrillConfig.from_spec(spec, modes, out, keep)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(spec_path, out / "spec.toml")
    tl = Timeline(say=say)
    result: dict[str, Any] = {"verdict": "unknown", "modes": []}
    try:
        tb = _reuse(spec.name, say)
        if tb is None:
            tb = vmbed.up(spec, say=lambda m: say(f"up: {m.strip()}"))
        tl.mark(f"testbed {tb.name} up ({tb.accel})")
        if SNAPSHOT in tb.state.get("snapshots", []):
            wan_facts = tb.state.get("drill_wan", {})
            tl.mark(f"reusing snapshot {SNAPSHOT!r}")
        else:
            wan_facts = prepare(tb, cfg, tl)
            tb.state["drill_wan"] = wan_facts
            tb._save()
        (out / "calibration.json").write_text(json.dumps(wan_facts.get("calibration"), indent=1))
        entries = [run_mode(tb, cfg, mode, say) for mode in cfg.modes]
        result = {
            "verdict": overall_verdict(entries), "spec": spec.name, "environment": environment(tb, wan_facts),
            "config": {"testers": cfg.testers, "append_size": cfg.append_size, "duration": cfg.duration,
                       "fail_at": cfg.fail_at, "servers": cfg.servers, "r": cfg.r, "flush_ms": cfg.flush_ms, "schedule": cfg.schedule,
                       "burst_loss": cfg.burst_loss, "burst_seconds": cfg.burst_seconds,
                       "during": [t.describe() for t in cfg.during], "modes": [m.name for m in cfg.modes]},
            "calibration": wan_facts.get("calibration"), "setup_timeline": tl.events, "modes": entries,
        }
        from testbed.plots import paper_findings

        result["paper"] = paper_findings(entries)
        (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
        try:
            from testbed.plots import write_report

            write_report(result, out)
        except Exception as err:  # noqa: BLE001 - the verdict stands without the plots
            say(f"report: plots failed: {err}")
        say("\n" + table(entries))
        if result["paper"]:
            say("\nagainst the paper:\n" + "\n".join(
                f"  {'agrees   ' if f['agrees'] else 'DISAGREES'}  {f['claim']}: {f['detail']}" for f in result["paper"]))
        say(f"\nverdict: {result['verdict']}   (result: {out / 'result.json'})")
        return result
    except InfrastructureError as err:
        say(f"INFRASTRUCTURE FAILURE: {err}")
        result["error"] = str(err)
        (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
        return result
    finally:
        if not keep:
            say("tearing down the testbed (--keep keeps it)")
            vmbed.down(say=say)


def _reuse(name: str, say: Say) -> Any:
    """The active testbed when it runs this spec; another spec's testbed is an error."""
    from testbed.vmbed import TestbedError, VmTestbed

    try:
        tb = VmTestbed.active()
    except TestbedError:
        return None
    if tb.name != name:
        raise InfrastructureError(f"testbed {tb.name!r} is up; ./inv down first, or run the drill with its spec")
    say(f"reusing the running testbed {name!r}")
    return tb
