"""The nemesis in real VMs: faults during the run (freeze, partition, loss burst, balloon squeeze,
mirror disk failure) and the mirror power outage, each under remote-sync, whose promise (every
acked append is on the mirror's disk) must survive all of them."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def _spec(tmp_path: Path, faults: str) -> Path:
    text = (REPO / "specs" / "ci.toml").read_text()
    head = text[: text.index("[faults]")]
    path = tmp_path / "ci.toml"  # the same name: the testbed and its snapshot are the ci ones
    path.write_text(head + faults)
    tomllib.loads(path.read_text())
    return path


def _drill(spec: Path, out: Path) -> dict[str, Any]:
    """The drill on the session's ci testbed (the spec has its name): it restores the shared snapshot
    "ready" and restarts the mirror site, whose idle timeout the faults lengthen."""
    from smfs.modes import parse_modes
    from testbed.drill.vm import run_drill

    run_drill(spec, tuple(parse_modes("remote-sync")), out, keep=True, say=print)
    return json.loads((out / "result.json").read_text())


def _events(mode: dict[str, Any]) -> list[str]:
    return [e["event"] for e in mode["timeline"]]


def test_faults_during_the_run_are_injected_healed_and_cost_remote_sync_nothing(ci_bed: object, tmp_path: Path) -> None:
    spec = _spec(tmp_path, """[faults]
schedule = "rolling-disaster"
fail_at = "16s"
[[faults.during]]
fault = "freeze"
vm = "mirror"
at = "2s"
for = "2s"
[[faults.during]]
fault = "partition"
at = "5s"
for = "2s"
[[faults.during]]
fault = "loss-burst"
loss = "10%"
at = "8s"
for = "1s"
[[faults.during]]
fault = "balloon-squeeze"
vm = "primary"
to = "256MiB"
at = "10s"
for = "3s"
""")
    result = _drill(spec, tmp_path / "drill")
    m = result["modes"][0]
    assert result["verdict"] == "ok", m.get("error")
    assert m["acked"] > 0 and m["lost"] == 0 and m["corrupt"] == 0 and m["prefix_violations"] == 0, m
    ev = _events(m)
    order = ["mirror frozen (QMP stop)", "mirror resumed (QMP cont)", "WAN cut: primary link down",
             "WAN healed: primary link up", "WAN loss raised to 10%", "primary ballooned to 256 MiB",
             "primary ballooned back to 384 MiB", "WAN loss raised to 1%", "primary site: disaster at the instant"]
    idx = [next(i for i, x in enumerate(ev) if x.startswith(e)) for e in order]
    assert idx == sorted(idx), ev
    t = {e["event"]: e["t"] for e in m["timeline"]}
    assert t["mirror resumed (QMP cont)"] - t["mirror frozen (QMP stop)"] >= 1.5  # a late tick never shortens it
    squeezed = next(e for e in m["timeline"] if e["event"] == "primary ballooned to 256 MiB")
    assert squeezed["guest_total_mib"] <= 256 + 16
    assert len(result["config"]["during"]) == 4


def test_mirror_disk_failure_and_mirror_power_outage_keep_remote_sync_acked_appends(ci_bed: object, tmp_path: Path) -> None:
    spec = _spec(tmp_path, """[faults]
schedule = "mirror-power-outage"
fail_at = "28s"
[[faults.during]]
fault = "mirror-disk-failure"
at = "18s"
for = "2s"
""")
    # The failure comes late enough for the first appends to be acked on a slow (TCG, loaded) machine,
    # where the first ack came 5.5-11.6 s after the testers' start in a full ./inv test: a remote-sync
    # primary fails every pending and later append once its mirror's disk fails them.
    result = _drill(spec, tmp_path / "drill")
    m = result["modes"][0]
    assert result["verdict"] == "ok", (m.get("error"), m["acked"], m["failed"])
    assert m["acked"] > 0 and m["lost"] == 0 and m["corrupt"] == 0 and m["prefix_violations"] == 0, m
    ev = _events(m)
    assert "mirror data disk failing (EIO)" in ev and any(e.startswith("mirror data disk healed") for e in ev)
    first = {site: next(i for i, e in enumerate(m["timeline"]) if e.get("site") == site and "instant" in e)
             for site in ("mirror", "primary")}
    assert first["mirror"] < first["primary"], ev
    assert m["instant"]["t"] == m["timeline"][first["primary"]]["instant"]  # the ack cut-off is the primary's
    assert any(e.startswith("mirror was hit: booted it again") for e in ev), ev
