"""The namespace drill: the whole stack on this machine in network namespaces, a primary-site power
cut during the run, then the mirror's recovered state against the testers' ledgers.

For each mode, from a clean state: build the namespaces, shape the WAN, start the mirror site, the
primary site (and the FEC gateways for the +fec modes and network-sync), start the testers, and at
``fail_at`` seconds cut the primary's WAN link and SIGKILL every primary-site process. Then stop the
mirror, recover its logs read-only, and check. Everything created is torn down, also on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from smfs.modes import Mode
from testbed import procs
from testbed.netns import ADDRS, NamespaceTestbed, host_has_netem
from testbed.report import ledger_figures, table

MIRROR_PORT = 7700
GATEWAY_CONTROL_PORT = 7790
READY_TIMEOUT = 60.0  # s for a site to report ready
DRAIN_GRACE = 1.5  # s the mirror gets, after the cut, to apply what already crossed the WAN


class InfrastructureError(RuntimeError):
    """The drill itself failed (a process died, a site never became ready): verdict unknown."""


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

    def __post_init__(self) -> None:
        checks = [
            (self.testers >= 1, "testers", "must be at least 1"),
            (self.servers >= 1, "servers", "must be at least 1"),
            (self.duration > 0, "duration", "must be positive seconds"),
            (self.fail_at > 0, "fail_at", "must be positive seconds after the testers start"),
            (0 <= self.wan_loss < 100, "wan_loss", "must be a percentage in [0, 100)"),
            (len(self.modes) > 0, "modes", "give at least one mode"),
        ]
        for ok, name, fix in checks:
            if not ok:
                raise ValueError(f"{name}: {fix}")


Say = Callable[[str], None]


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
    deadline = time.monotonic() + READY_TIMEOUT
    while not path.exists():
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
            raise InfrastructureError(f"{what} exited with code {proc.returncode} before it was ready: {' | '.join(tail)}")
        if time.monotonic() > deadline:
            raise InfrastructureError(f"{what} not ready after {READY_TIMEOUT:.0f} s (see {log})")
        time.sleep(0.05)


def run_mode(cfg: LocalDrillConfig, mode: Mode, say: Say) -> dict[str, Any]:
    """One mode from a clean state; returns its entry for result.json."""
    from workloads.checker import check, verdict_for
    from workloads.ledger import load_ledgers, normalize

    out = cfg.out / mode.name
    if out.exists():
        shutil.rmtree(out)
    work, logs, ledger_raw = out / "work", out / "logs", out / "work" / "ledger-raw"
    for d in (work, logs):
        d.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    tb = NamespaceTestbed()
    timeline: list[dict[str, Any]] = []
    t_origin = time.time()

    def mark(event: str, **extra: Any) -> None:
        timeline.append({"t": round(time.time() - t_origin, 3), "event": event, **extra})
        say(f"{mode.name}: {event}")

    entry: dict[str, Any] = {"mode": mode.name, "durable": mode.durable}
    try:
        tb.build()
        mark("namespaces up", run_id=tb.run_id)
        method = tb.set_loss(cfg.wan_loss)
        entry["wan"] = {"loss_pct": cfg.wan_loss, "method": method}
        mark(f"WAN loss {cfg.wan_loss}% each way via {method}")
        gw = None
        if mode.fec:
            from testbed.gateways import start_gateways

            gw = start_gateways(tb, out, logs)
            mark("FEC gateways up")
        mlog = logs / "mirror-site.log"
        mproc = tb.spawn("mirror", "servers", [
            py, "-m", "smfs.site", "mirror", "--servers", str(cfg.servers), "--data", str(work / "mirror"),
            "--run", str(work / "run-mirror"), "--listen", f"{ADDRS['mirror'].storage}:{MIRROR_PORT}",
            "--segment-bytes", str(cfg.segment_bytes),
        ], mlog)
        _wait_ready(work / "run-mirror" / "mirror.ready", mproc, "mirror site", mlog)
        plog = logs / "primary-site.log"
        pargs = [
            py, "-m", "smfs.site", "primary", "--servers", str(cfg.servers), "--data", str(work / "primary"),
            "--run", str(work / "run-primary"), "--mirror", f"{ADDRS['mirror'].storage}:{MIRROR_PORT}",
            "--source", ADDRS["primary"].storage, "--mode", mode.name, "--segment-bytes", str(cfg.segment_bytes),
        ]
        if mode.ack_on == "network":
            pargs += ["--gateway-control", f"127.0.0.1:{GATEWAY_CONTROL_PORT}"]
        pproc = tb.spawn("primary", "servers", pargs, plog)
        _wait_ready(work / "run-primary" / "primary.ready", pproc, "primary site", plog)
        mark("storage servers up", servers=cfg.servers)
        tproc = tb.spawn("primary", "testers", [
            py, "-m", "workloads.tester", "--testers", str(cfg.testers), "--append-size", str(cfg.append_size),
            "--duration", str(cfg.duration), "--servers", str(cfg.servers), "--run", str(work / "run-primary"),
            "--ledger", str(ledger_raw),
        ], logs / "testers.log")
        t_start = time.time()
        mark("testers started", testers=cfg.testers, append_size=cfg.append_size)
        next_note = 0.0
        while (elapsed := time.time() - t_start) < cfg.fail_at:
            for proc, what in ((pproc, "primary site"), (mproc, "mirror site")):
                if proc.poll() is not None:
                    raise InfrastructureError(f"{what} died during the run (exit {proc.returncode})")
            if tproc.poll() is not None and elapsed < cfg.duration - 1:
                raise InfrastructureError(f"testers exited early (exit {tproc.returncode}); see {logs / 'testers.log'}")
            if elapsed >= next_note:
                say(f"{mode.name}: running {elapsed:4.1f}/{cfg.fail_at:.1f} s until the power cut")
                next_note += 2.0
            time.sleep(0.05)
        t_cut = time.time()
        killed = tb.power_cut("primary")
        mark("primary site power cut: WAN link cut, then SIGKILL", killed=killed)
        time.sleep(DRAIN_GRACE)
        for res in tb.site_processes("mirror"):
            procs.kill(int(res.ident), res.meta.get("started"), sig=signal.SIGTERM, wait=5.0)
            procs.kill(int(res.ident), res.meta.get("started"))
        if gw is not None:
            entry["fec"] = gw.collect_stats()
        mark("mirror stopped; recovering its logs read-only")
        from smfs.logstore import site_listing

        listing = site_listing(work / "mirror")
        (out / "mirror-listing.json").write_text(json.dumps(listing))
        normalize(ledger_raw, out / "ledger")
        ledger = load_ledgers(out / "ledger")
        result = check(ledger.entries, listing, durable=mode.durable)
        entry.update(result.to_dict())
        entry.update(ledger_figures(ledger.entries, t_end=t_cut))
        entry["wan"]["drops"] = tb.wan_drops()
        entry["verdict"] = verdict_for(result, mode.durable)
        mark(f"checked: {result.summary_line()}")
    except InfrastructureError as err:
        entry.update({"verdict": "unknown", "error": str(err)})
        say(f"{mode.name}: INFRASTRUCTURE FAILURE: {err}")
    except Exception as err:  # noqa: BLE001 - a drill bug is "unknown", never "data-loss"
        (logs / "drill-error.txt").write_text(traceback.format_exc())
        entry.update({"verdict": "unknown", "error": f"{type(err).__name__}: {err}"})
        say(f"{mode.name}: DRILL ERROR (verdict unknown): {err}; traceback in {logs / 'drill-error.txt'}")
    finally:
        tb.teardown()
        entry["timeline"] = timeline
        if not cfg.keep_data and work.exists():
            shutil.rmtree(work, ignore_errors=True)
    (out / "mode.json").write_text(json.dumps(entry, indent=1, default=str))
    return entry


def overall_verdict(modes: list[dict[str, Any]]) -> str:
    verdicts = [m.get("verdict", "unknown") for m in modes]
    if "data-loss" in verdicts:
        return "data-loss"
    if "unknown" in verdicts or not verdicts:
        return "unknown"
    return "ok"


EXIT_CODES = {"ok": 0, "data-loss": 1, "unknown": 2}


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
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "modes"}
        | {"modes": [m.name for m in cfg.modes]},
        "modes": modes,
    }
    (cfg.out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    say("\n" + table(modes))
    say(f"\nverdict: {result['verdict']}   (result: {cfg.out / 'result.json'})")
    return result
