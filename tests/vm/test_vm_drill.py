"""The VM drill end to end on specs/ci.toml, all five modes under the rolling disaster: the verdict
logic from the guests' ledgers and the mirror's recovered listing; a drill interrupted mid-run leaves
nothing behind (its own testbed, brought up and torn down by the drill)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_ci_drill_keeps_durable_promises_and_counts_local_sync_losses(ci_bed: object, tmp_path: Path) -> None:
    from smfs.modes import parse_modes
    from testbed.drill.vm import run_drill
    from workloads.ledger import load_ledgers

    out = tmp_path / "drill"  # on the session's ci testbed and its snapshot "ready" (kept for the next test)
    result = run_drill(REPO / "specs" / "ci.toml", tuple(parse_modes("all")), out, keep=True, say=print)
    on_disk = json.loads((out / "result.json").read_text())
    assert on_disk["verdict"] == result["verdict"] == "ok", [(m["mode"], m.get("error")) for m in result["modes"]]
    assert on_disk["environment"]["wan_enforcement"] == "site-ingress-ifb"
    modes = {m["mode"]: m for m in on_disk["modes"]}
    assert list(modes) == ["local-sync", "local-sync+fec", "remote-sync", "remote-sync+fec", "network-sync"]
    for name in ("remote-sync", "remote-sync+fec", "network-sync"):
        m = modes[name]
        assert m["acked"] > 0 and m["lost"] == 0 and m["corrupt"] == 0 and m["verdict"] == "ok", m
    for name in ("local-sync+fec", "remote-sync+fec", "network-sync"):
        assert modes[name]["fec"]["sites"]["mirror"] is not None, name
    # network-sync's acks held against a host capture of what left the primary: none came early.
    wire = modes["network-sync"]["wire"]
    assert wire["inconclusive"] is None and wire["checked"] > 0 and wire["unsafe"] == 0, wire
    assert wire["capture"]["kernel_drops"] == 0 and wire["flows"] == 2
    for name, m in modes.items():
        # The disaster is an instant on the host's clock; no ack after it; the mirror drained until quiet.
        assert m["instant"]["t"] > 0 and "acks_after_instant" not in m, (name, m.get("acks_after_instant"))
        assert m["drain"]["quiet"] and m["drain"]["last"]["wan_backlog"] == 0, (name, m["drain"])
        disaster = next(e for e in m["timeline"] if e.get("site") == "primary" and "instant" in e)
        assert disaster["freeze_s"] < 0.05, disaster  # every VM of the site stopped within 50 ms
        ledger = load_ledgers(out / name / "ledger").entries
        acks = [e.t_complete - m["clock"]["offset_s"] for e in ledger if e.outcome == "ok"]
        assert max(acks) <= m["instant"]["t"] + m["clock"]["uncertainty_s"], name
    # local-sync's losses are found and counted: recount them from the artefacts independently.
    ls = modes["local-sync"]
    acked = {(e.log, e.seq) for e in load_ledgers(out / "local-sync" / "ledger").entries if e.outcome == "ok"}
    listing = json.loads((out / "local-sync" / "mirror-listing.json").read_text())
    present = {(int(log), rec[0]) for log, recs in listing["logs"].items() for rec in recs}
    assert ls["acked"] == len(acked) > 0
    assert ls["lost"] == len(acked - present)
    # What reached the mirror crossed the WAN at its rate (8 Mbit/s) between the testers' start and the
    # disaster: the mirror holding more is a WAN that was not shaped. Acked beyond that must be lost, so a
    # primary that outran the WAN must show losses; a slow (TCG, loaded) primary may not outrun it at all.
    started = next(e["t"] for e in ls["timeline"] if e["event"].startswith("testers started"))
    capacity = 1e6 * (ls["instant"]["t_rel"] - started) / (64 * 1024) + 8  # appends; + what the queues held
    assert len(acked & present) <= capacity, (len(acked & present), capacity)
    assert ls["lost"] >= len(acked) - capacity, (ls["lost"], len(acked), capacity)
    assert ls["verdict"] == "ok"  # local-sync promised nothing
    assert (out / "report.md").exists() and (out / "latency-cdf.png").exists()


def test_an_interrupted_drill_leaves_nothing_for_down(tmp_path: Path) -> None:
    import os
    import signal
    import sys
    import time

    from testbed.vm import bed as vmbed

    if (vmbed.testbeds_dir() / "active").exists():
        pytest.skip("a testbed is already up (./inv down first); the drill brings up its own")
    proc = subprocess.Popen([sys.executable, "-m", "invoke", "drill", "--spec", str(REPO / "specs" / "ci.toml"),
                             "--modes", "remote-sync", "--out", str(tmp_path / "drill")], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    deadline = time.monotonic() + 300
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # Ctrl-C in the middle of the run, testers writing
            lines.append(line)
            if "testers started" in line or time.monotonic() > deadline:
                break
        assert any("testers started" in ln for ln in lines), "".join(lines[-20:])
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, rest[-2000:]  # a crash or Ctrl-C of the drill: no verdict, never exit 1
    assert "tearing down the testbed" in rest
    assert vmbed.down(say=print) == []  # nothing left: every domain, bridge, overlay was removed
    assert "smfs-ci" not in subprocess.run(["virsh", "list", "--all", "--name"], capture_output=True, text=True).stdout
