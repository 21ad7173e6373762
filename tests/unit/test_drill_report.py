"""The VM drill's pure parts: config from a spec, the fault schedule's order, the report (no VMs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from smfs.modes import parse_modes
from testbed import faults
from testbed.drill import DrillConfig
from testbed.spec import from_mapping, load

REPO = Path(__file__).resolve().parents[2]


def test_config_from_the_ci_spec() -> None:
    spec = load(REPO / "specs" / "ci.toml")
    cfg = DrillConfig.from_spec(spec, tuple(parse_modes("all")), Path("/tmp/x"))
    assert (cfg.testers, cfg.append_size, cfg.servers, cfg.r) == (4, 64 * 1024, 2, 8)
    assert (cfg.duration, cfg.fail_at, cfg.burst_seconds) == (60.0, 10.0, 0.5)
    assert cfg.schedule == "rolling-disaster" and len(cfg.modes) == 5


@pytest.mark.parametrize("name", ["ci", "default", "nightly"])
def test_every_shipped_spec_makes_a_drill(name: str) -> None:
    spec = load(REPO / "specs" / f"{name}.toml")
    cfg = DrillConfig.from_spec(spec, tuple(parse_modes("all")), Path("/tmp/x"))
    assert cfg.fail_at < cfg.duration
    assert faults.schedule(cfg.schedule, spec.wan, cfg.burst_loss, cfg.burst_seconds)


def test_fail_at_beyond_the_run_is_refused() -> None:
    spec = from_mapping({"sites": [{"name": "primary", "subnet": "198.18.1.0/24", "vms": [{"name": "primary"}]},
                                   {"name": "mirror", "subnet": "198.18.2.0/24", "vms": [{"name": "mirror"}]}],
                         "workload": {"duration": "10s"}, "faults": {"fail_at": "20s"}})
    with pytest.raises(ValueError, match="faults.fail_at"):
        DrillConfig.from_spec(spec, tuple(parse_modes("local-sync")), Path("/tmp/x"))


def test_unknown_schedule_names_the_field() -> None:
    from netem.profile import LinkProfile

    with pytest.raises(faults.FaultError, match="faults.schedule: unknown schedule 'meteor'"):
        faults.schedule("meteor", LinkProfile())


class FakeBed:
    """Records what the nemesis does to a testbed."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def site_vms(self, site: str) -> list[str]:
        return [site]

    def set_link(self, vm: str, up: bool) -> None:
        self.calls.append(("link", vm, up))

    def power_cut(self, site: str) -> dict[str, float]:
        self.calls.append(("power_cut", site))
        return {site: 0.1}


def test_rolling_disaster_raises_loss_then_cuts_the_wan_then_the_power(monkeypatch: pytest.MonkeyPatch) -> None:
    from netem.profile import LinkProfile
    from testbed import wan

    bed = FakeBed()
    monkeypatch.setattr(wan, "shape", lambda tb, p: bed.calls.append(("shape", p.a_to_b.loss_pct, p.b_to_a.loss_pct)))
    tl = faults.Timeline(say=lambda _m: None)
    base = LinkProfile.from_mapping({"delay": "10ms", "loss": "0%"})
    faults.RollingDisaster(base, "2%", burst_seconds=0.0).inject(bed, tl)
    assert bed.calls == [("shape", 2.0, 2.0), ("link", "primary", False), ("power_cut", "primary")]
    assert [e["event"] for e in tl.events] == ["WAN loss raised to 2%", "WAN cut: primary link down",
                                                "primary site: power cut (VMs destroyed)"]
    assert all(a["t"] <= b["t"] for a, b in zip(tl.events, tl.events[1:], strict=False))


def _result(remote_lost: int) -> dict[str, Any]:
    mode = lambda name, acked, lost, fec=None: {"mode": name, "acked": acked, "lost": lost, "corrupt": 0,  # noqa: E731
                                               "throughput_MBps": 1.5, "latency_ms": {"p50": 5, "p99": 9},
                                               "verdict": "ok", "fec": fec, "timeline": [{"t": 1.0, "event": "cut"}]}
    return {"verdict": "ok", "spec": "ci", "environment": {"testbed": "vm", "wan_enforcement": "site-ingress-ifb"},
            "modes": [mode("local-sync", 100, 7), mode("local-sync+fec", 50, 9, {"lost_on_wan": 4, "rebuilt": 4}),
                      mode("remote-sync", 90, remote_lost)]}


def test_report_writes_the_plots_and_says_when_the_paper_disagrees(tmp_path: Path) -> None:
    from testbed.plots import write_report

    files = write_report(_result(remote_lost=0), tmp_path)
    assert {f.name for f in files} == {"throughput.png", "latency-cdf.png", "acked-vs-lost.png", "fec.png", "report.md"}
    assert all(f.stat().st_size > 0 for f in files)
    assert (tmp_path / "throughput.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "report.md").read_text()
    assert "remote-sync: kept every acked append" in md
    assert "local-sync+fec lost 9 vs local-sync 7: NOT fewer" in md
    assert "DISAGREES" in json.dumps(write_report(_result(remote_lost=3), tmp_path) and (tmp_path / "report.md").read_text())
