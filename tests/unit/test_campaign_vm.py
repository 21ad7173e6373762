"""The VM campaign's pure parts: the VM draw (reproducible per seed, within the VM bounds, every VM fault
kind and disaster drawn, the namespace draws untouched), the schedule's translation into the VM drill's
configuration (each kind its fault class with its parameters), the faults a mode does not run, replays
refused across testbeds, the campaign loop on a stubbed testbed (brought up once, one ``run_mode`` per
mode and run, torn down also on Ctrl-C), and the command's flag errors."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from invoke import Context
from invoke.exceptions import Exit

from smfs.modes import parse_mode, parse_modes
from testbed.drill import campaign as cp
from testbed.drill.faults import (
    BalloonSqueeze,
    Freeze,
    LossBurst,
    MirrorDiskFailure,
    MirrorRestart,
    Partition,
    Timed,
)
from testbed.drill.runner import EXIT_CODES
from testbed.drill.vm import DrillConfig, mirror_argv
from testbed.spec import load

SEEDS = range(1, 400)
SPEC = Path(__file__).resolve().parents[2] / "specs" / "ci.toml"


@pytest.fixture(scope="module")
def spec() -> Any:
    return load(SPEC)


def _base(spec: Any, modes: str = "all") -> DrillConfig:
    return replace(DrillConfig.from_spec(spec, tuple(parse_modes(modes)), Path("/tmp/unused")), during=())


# --- the draw ------------------------------------------------------------------------------------


def test_vm_draw_is_reproducible_and_pinned() -> None:
    for seed in SEEDS:
        assert cp.draw_vm(seed) == cp.draw_vm(seed)
        assert cp.draw_vm(seed).testbed == "vm"
    assert len({cp.draw_vm(s) for s in SEEDS}) == len(SEEDS)
    # Pinned: a change to the VM draw must raise DRAW_VERSION (old seeds would replay something else).
    assert cp.draw_vm(cp.run_seed(1, 2)).describe() == (
        "7 testers × 64KiB, 2 servers, loss 1%; mirror-disk-failure@6.33+1.94s; site-power-cut@14.7s"), cp.DRAW_VERSION


def test_vm_draw_leaves_the_namespace_draws_alone() -> None:
    """The same pins as test_campaign.py: a VM draw has its own random stream and bounds."""
    assert cp.draw(cp.run_seed(1, 2)).describe() == (
        "14 testers × 64KiB, 2 servers, loss 0%; freeze(primary-gateway)@0.52+1.15s, loss-burst(7.3%)@0.96+0.93s; "
        "site-power-cut@3.7s")
    assert cp.draw(cp.run_seed(1, 2)).testbed == "netns" and cp.DRAW_VERSION == 1
    assert cp.draw(cp.run_seed(1, 2)).to_dict()["faults"][0] == {"kind": "freeze", "at": 0.52, "seconds": 1.15,
                                                                  "target": "primary-gateway"}


def test_vm_draw_within_the_vm_bounds() -> None:
    b = cp.VM_BOUNDS
    for seed in SEEDS:
        s = cp.draw_vm(seed, servers=3)
        assert cp.violations(s) == [], (seed, s)
        assert s.servers == 3, "the spec's server pairs, not drawn"
        assert b.fail_at[0] <= s.fail_at <= b.fail_at[1] and s.fail_at < s.duration
        assert b.testers[0] <= s.testers <= b.testers[1] and len(s.faults) <= b.faults[1]
        for f in s.faults:
            assert b.first_at <= f.at and f.at + 2 * f.seconds + b.settle <= s.fail_at + 1e-9
        for i, f in enumerate(s.faults):  # a freeze, a restart or a disk failure overlaps nothing
            for g in s.faults[i + 1:]:
                if set(cp.VM_EXCLUSIVE) & {f.kind, g.kind} or f.kind == g.kind:
                    assert g.at >= f.at + f.seconds or f.at >= g.at + g.seconds, s
    s = replace(cp.draw_vm(5), fail_at=14.0, duration=16.0)
    assert cp.violations(replace(s, testers=99)) and cp.violations(replace(s, disaster="meteor"))
    early = (cp.FaultDraw("partition", 2.0, 1.0, target="mirror"),)
    assert any("before 6.0" in v for v in cp.violations(replace(s, faults=early))), "acks exist before a fault"
    clash = (cp.FaultDraw("freeze", 6.0, 2.0, target="mirror"), cp.FaultDraw("loss-burst", 7.0, 1.0, loss=10.0))
    assert "freeze overlaps loss-burst" in cp.violations(replace(s, faults=clash))
    together = (cp.FaultDraw("partition", 6.0, 2.0, target="mirror"), cp.FaultDraw("loss-burst", 7.0, 1.0, loss=10.0))
    assert cp.violations(replace(s, faults=together)) == [], "a partition and a loss burst may overlap"
    assert any("not a netns fault" in v for v in cp.violations(replace(
        cp.draw(5), faults=(cp.FaultDraw("mirror-disk-failure", 0.5, 0.3),))))


def test_every_vm_fault_kind_and_disaster_is_drawn() -> None:
    drawn = [cp.draw_vm(s) for s in SEEDS]
    faults = [f for s in drawn for f in s.faults]
    assert {f.kind for f in faults} == set(cp.VM_FAULT_KINDS)
    assert {s.disaster for s in drawn} == set(cp.VM_DISASTERS)
    for kind in ("freeze", "partition", "balloon-squeeze"):
        assert {f.target for f in faults if f.kind == kind} == set(cp.VM_SITES), kind
    assert all(cp.VM_BOUNDS.squeeze[0] <= f.share <= cp.VM_BOUNDS.squeeze[1] for f in faults if f.kind == "balloon-squeeze")
    assert {s.wan_loss for s in drawn} == set(cp.VM_BOUNDS.wan_loss)
    assert sum(1 for s in drawn if len(s.faults) == 2) > len(drawn) / 10


def test_vm_schedule_round_trips_and_says_its_testbed(tmp_path: Path) -> None:
    for seed in SEEDS:
        s = cp.draw_vm(seed)
        assert cp.Schedule.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    s = next(cp.draw_vm(x) for x in SEEDS if any(f.kind == "balloon-squeeze" for f in cp.draw_vm(x).faults))
    raw = s.to_dict()
    assert raw["testbed"] == "vm"
    squeeze = next(f for f in raw["faults"] if f["kind"] == "balloon-squeeze")
    assert set(squeeze) == {"kind", "at", "seconds", "target", "share"}
    for edit, field in [({"disaster": "meteor"}, "disaster"), ({"testbed": "kvm"}, "testbed"),
                        ({"faults": [{"kind": "freeze", "at": 2, "seconds": 1, "target": "mirror-gateway"}]}, "target"),
                        ({"faults": [{"kind": "partition", "at": 2, "seconds": 1, "direction": "both"}]}, "direction"),
                        ({"faults": [{"kind": "balloon-squeeze", "at": 2, "seconds": 1, "target": "primary",
                                      "share": 2}]}, "share")]:
        with pytest.raises(ValueError, match=re.escape(field)) as err:
            cp.Schedule.from_dict(raw | edit)
        assert "\n" not in str(err.value)
    # A mirror power outage is a VM disaster only; a disk failure a VM fault only.
    with pytest.raises(ValueError, match="disaster"):
        cp.Schedule.from_dict(cp.draw(3).to_dict() | {"disaster": "mirror-power-outage"})
    with pytest.raises(ValueError, match="kind"):
        cp.Schedule.from_dict(cp.draw(3).to_dict() | {"faults": [{"kind": "mirror-disk-failure", "at": 1, "seconds": 0.5}]})


# --- the schedule as the VM drill runs it --------------------------------------------------------


def _with(kinds: set[str], **kw: Any) -> cp.Schedule:
    return next(s for s in (cp.draw_vm(x, **kw) for x in range(1, 5000)) if {f.kind for f in s.faults} >= kinds)


def test_vm_drill_config_carries_the_schedule(spec: Any) -> None:
    base = _base(spec)
    s = _with({"loss-burst"})
    s = replace(s, wan_loss=1.0, disaster="rolling-disaster", burst_loss=2.5, burst_seconds=0.4)
    cfg = cp.vm_drill_config(s, base, spec, Path("/tmp/run-001"))
    assert (cfg.testers, cfg.append_size, cfg.duration, cfg.fail_at, cfg.schedule, cfg.burst_loss, cfg.burst_seconds,
            cfg.servers, cfg.out) == (s.testers, s.append_size, s.duration, s.fail_at, "rolling-disaster", "2.5%", 0.4,
                                      base.servers, Path("/tmp/run-001"))
    assert cfg.wan.a_to_b.mean_loss_pct == cfg.wan.b_to_a.mean_loss_pct == 1.0
    assert cfg.wan.a_to_b.delay_us == spec.wan.a_to_b.delay_us and cfg.wan.a_to_b.rate_bps == spec.wan.a_to_b.rate_bps
    assert (cfg.r, cfg.c, cfg.flush_ms) == (base.r, base.c, base.flush_ms), "the spec's gateways: snapshot 'ready's"
    # The spec's own loss: its very profile, so a mode keeps the snapshot's WAN and does not reshape it.
    assert cp.vm_drill_config(replace(s, wan_loss=0.0), base, spec, Path("/tmp/x")).wan is spec.wan
    for disaster in cp.VM_DISASTERS:
        assert cp.vm_drill_config(replace(s, disaster=disaster), base, spec, Path("/tmp/x")).schedule == disaster


def test_each_vm_kind_becomes_its_fault(spec: Any) -> None:
    base = replace(_base(spec), defects=("mirror-acks-before-fsync",))
    faults = (cp.FaultDraw("partition", 2.0, 1.0, target="mirror"), cp.FaultDraw("freeze", 2.0, 1.5, target="primary"),
              cp.FaultDraw("loss-burst", 4.0, 1.25, loss=12.5), cp.FaultDraw("mirror-disk-failure", 6.0, 1.0),
              cp.FaultDraw("balloon-squeeze", 6.0, 2.0, target="primary", share=0.6),
              cp.FaultDraw("mirror-restart", 9.0, 1.0))
    s = replace(cp.draw_vm(7), faults=faults, fail_at=15.0, duration=18.0, wan_loss=0.5)
    cfg = cp.vm_drill_config(s, base, spec, Path("/tmp/x"))
    assert [(t.at, t.seconds) for t in cfg.during] == [(f.at, f.seconds) for f in faults]
    part, freeze, burst, disk, squeeze, restart = (t.fault for t in cfg.during)
    assert part == Partition("mirror") and freeze == Freeze("primary") and disk == MirrorDiskFailure("mirror")
    assert isinstance(burst, LossBurst) and (burst.loss, burst.seconds, burst.base) == ("12.5%", 1.25, cfg.wan)
    assert squeeze == BalloonSqueeze("primary", int(384 * 0.6), 384)
    assert isinstance(restart, MirrorRestart) and restart.vm == "mirror"
    assert list(restart.argv) == mirror_argv(cfg), "restarted with the command line the drill starts it with"
    assert restart.defects == ("mirror-acks-before-fsync",), "a seeded defect stays seeded after the restart"
    assert all(isinstance(t, Timed) for t in cfg.during)
    # The squeeze never goes below 128 MiB, and a VM too small to squeeze is a one-line error.
    low = replace(s, faults=(cp.FaultDraw("balloon-squeeze", 2.0, 1.0, target="mirror", share=0.1),))
    assert cp.vm_drill_config(low, base, spec, Path("/tmp/x")).during[0].fault == BalloonSqueeze("mirror", 128, 384)


def test_a_vm_config_refuses_what_the_testbed_cannot_run(spec: Any) -> None:
    base = _base(spec)
    with pytest.raises(ValueError, match="--testbed netns"):
        cp.vm_drill_config(cp.draw(3), base, spec, Path("/tmp/x"))
    with pytest.raises(ValueError, match=r"server_pairs = 4"):
        cp.vm_drill_config(cp.draw_vm(3, servers=4), base, spec, Path("/tmp/x"))


def test_faults_the_mode_promises_nothing_about_are_not_run(spec: Any) -> None:
    """network-sync's ack means "on the WAN": a mirror that loses what it received (killed, its disk failing)
    breaks no promise of it, so the campaign does not run those there; remote-sync acks after the mirror's
    fsync and keeps its promise through both (the drill's test_vm_faults judges it so)."""
    base = _base(spec)
    faults = (cp.FaultDraw("mirror-disk-failure", 2.0, 1.0), cp.FaultDraw("freeze", 4.0, 1.0, target="mirror"),
              cp.FaultDraw("mirror-restart", 6.0, 1.0))
    for disaster in ("rolling-disaster", "site-power-cut"):
        cfg = cp.vm_drill_config(replace(cp.draw_vm(7), faults=faults, fail_at=14.0, duration=16.0, disaster=disaster),
                                 base, spec, Path("/tmp/x"))
        kept, skipped = cp.mode_faults(cfg, parse_mode("network-sync"))
        assert [t.fault.name for t in kept] == ["freeze"] and len(skipped) == 2
        assert all("promises nothing" in line for line in skipped)
        for mode in ("remote-sync", "remote-sync+fec", "local-sync", "local-sync+fec"):
            assert cp.mode_faults(cfg, parse_mode(mode)) == (cfg.during, []), mode
    # Under a mirror power outage network-sync promises nothing anyway: every fault runs.
    cfg = cp.vm_drill_config(replace(cp.draw_vm(7), faults=faults, fail_at=14.0, duration=16.0,
                                     disaster="mirror-power-outage"), base, spec, Path("/tmp/x"))
    assert cp.mode_faults(cfg, parse_mode("network-sync")) == (cfg.during, [])


# --- replays across testbeds ---------------------------------------------------------------------


def test_replay_stays_on_its_testbed(tmp_path: Path) -> None:
    seed = cp.run_seed(1, 4)
    assert cp.load_replay(str(seed), "vm", 2) == cp.draw_vm(seed, servers=2)
    assert cp.load_replay(str(seed)) == cp.draw(seed), "a seed is drawn again for the testbed given"
    (tmp_path / "ns").mkdir()
    (tmp_path / "ns" / "schedule.json").write_text(json.dumps(cp.draw(seed).to_dict()))
    (tmp_path / "vm").mkdir()
    (tmp_path / "vm" / "schedule.json").write_text(json.dumps(cp.draw_vm(seed).to_dict()))
    assert cp.load_replay(str(tmp_path / "vm"), "vm", 2) == cp.draw_vm(seed)
    with pytest.raises(ValueError, match="drawn for the netns testbed; replay it with --testbed netns") as err:
        cp.load_replay(str(tmp_path / "ns"), "vm", 2)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="drawn for the vm testbed; replay it with --testbed vm"):
        cp.load_replay(str(tmp_path / "vm"))
    with pytest.raises(ValueError, match="server_pairs = 2"):
        cp.load_replay(str(tmp_path / "vm"), "vm", 8)
    cfg = cp.CampaignConfig(modes=(parse_mode("remote-sync"),), out=tmp_path, runs=2, seed=1, testbed="vm", servers=3)
    assert cfg.bounds == cp.VM_BOUNDS and [cfg.schedule(i) for i in (1, 2)] == [
        cp.draw_vm(cp.run_seed(1, i), servers=3) for i in (1, 2)]


# --- the campaign loop on a stubbed VM testbed ---------------------------------------------------


def _entry(mode: str, verdict: str = "ok", lost: int = 0, **kw: Any) -> dict[str, Any]:
    return {"mode": mode, "verdict": verdict, "durable": mode != "local-sync", "acked": 50, "lost": lost, "corrupt": 0,
            "unexpected": 0, "prefix_violations": 0, "recovered": 1, "timeline": [], **kw}


class _Stub:
    """with_testbed and run_mode replaced: counts bring-ups and teardowns, records each mode's config."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, verdicts: dict[tuple[int, str], Any] | None = None) -> None:
        self.ups = self.downs = 0
        self.calls: list[tuple[Any, str]] = []
        self.verdicts = verdicts or {}
        monkeypatch.setattr("testbed.drill.vm.with_testbed", self.with_testbed)
        monkeypatch.setattr("testbed.drill.vm.run_mode", self.run_mode)

    def with_testbed(self, spec: Any, cfg: Any, out: Path, keep: bool, say: Any, body: Any, tl: Any = None) -> dict:
        self.ups += 1
        self.prepared = cfg
        try:
            body("TB")
        finally:
            self.downs += 1
        return {"tb": "TB"}

    def run_mode(self, tb: Any, cfg: Any, mode: Any, say: Any) -> dict[str, Any]:
        assert tb == "TB"
        self.calls.append((cfg, mode.name))
        run = int(cfg.out.name.split("-")[1])
        got = self.verdicts.get((run, mode.name), "ok")
        if isinstance(got, BaseException):
            raise got
        return _entry(mode.name, *got) if isinstance(got, tuple) else _entry(mode.name, got)


def _vm_campaign(tmp_path: Path, runs: int, modes: str = "remote-sync,network-sync", **kw: Any) -> dict[str, Any]:
    cfg = cp.CampaignConfig(modes=tuple(parse_modes(modes)), out=tmp_path, runs=runs, seed=1, testbed="vm", spec=SPEC,
                            **kw)
    return cp.run_campaign(cfg, say=lambda _l: None)


def test_vm_campaign_brings_the_testbed_up_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stub = _Stub(monkeypatch)
    res = _vm_campaign(tmp_path, 3)
    assert (stub.ups, stub.downs) == (1, 1)
    assert stub.prepared.during == () and stub.prepared.servers == 2, "snapshot 'ready' of the spec's stack"
    assert [m for _, m in stub.calls] == ["remote-sync", "network-sync"] * 3
    assert res["verdict"] == "ok" and EXIT_CODES[res["verdict"]] == 0 and res["testbed"] == "vm"
    assert res["runs_done"] == 3 and res["spec"] == str(SPEC) and res["bounds"] == cp.VM_BOUNDS.to_dict()
    for i in (1, 2, 3):
        folder = tmp_path / f"run-{i:03d}"
        s = cp.Schedule.from_dict(json.loads((folder / "schedule.json").read_text()))
        assert s == cp.draw_vm(cp.run_seed(1, i), servers=2) and s.testbed == "vm"
        cfg, _ = stub.calls[2 * (i - 1)]
        assert (cfg.out, cfg.fail_at, cfg.testers, cfg.schedule) == (folder, s.fail_at, s.testers, s.disaster)
    on_disk = json.loads((tmp_path / "campaign.json").read_text())
    assert on_disk["testbed"] == "vm" and len(on_disk["runs"]) == 3
    assert "testbed: vm" in (tmp_path / "summary.md").read_text() and (tmp_path / "spec.toml").exists()


def test_vm_data_loss_is_exit_1_with_a_vm_replay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _Stub(monkeypatch, {(2, "remote-sync"): ("data-loss", 3)})
    res = _vm_campaign(tmp_path, 2)
    assert res["verdict"] == "data-loss" and EXIT_CODES[res["verdict"]] == 1
    [loss] = res["data_loss"]
    assert loss["replay"] == f"./inv campaign --testbed vm --spec {SPEC} --replay {cp.run_seed(1, 2)} --modes remote-sync"


def test_vm_faults_not_run_are_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seed = next(x for x in range(1, 5000) if any(f.kind in cp.MIRROR_LOSES for f in cp.draw_vm(cp.run_seed(x, 1)).faults)
                and cp.draw_vm(cp.run_seed(x, 1)).disaster != "mirror-power-outage")
    stub = _Stub(monkeypatch)
    cfg = cp.CampaignConfig(modes=tuple(parse_modes("remote-sync,network-sync")), out=tmp_path, runs=1, seed=seed,
                            testbed="vm", spec=SPEC)
    res = cp.run_campaign(cfg, say=lambda _l: None)
    (rs_cfg, _), (ns_cfg, _) = stub.calls
    assert len(ns_cfg.during) < len(rs_cfg.during)
    row = res["runs"][0]["modes"]
    assert "faults_not_run" in row["network-sync"] and "faults_not_run" not in row["remote-sync"]


def test_vm_interrupt_tears_down_and_leaves_the_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stub = _Stub(monkeypatch, {(2, "network-sync"): KeyboardInterrupt()})
    with pytest.raises(KeyboardInterrupt):
        _vm_campaign(tmp_path, 4)
    assert stub.downs == 1
    on_disk = json.loads((tmp_path / "campaign.json").read_text())
    assert on_disk["interrupted"] and on_disk["runs_done"] == 1 and on_disk["verdict"] == "unknown"
    assert "(interrupted in run 2)" in (tmp_path / "summary.md").read_text()


def test_vm_bring_up_failure_is_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_a: Any, **_k: Any) -> None:
        raise RuntimeError("no KVM, no TCG")

    monkeypatch.setattr("testbed.drill.vm.with_testbed", broken)
    res = _vm_campaign(tmp_path, 2)
    assert res["verdict"] == "unknown" and EXIT_CODES[res["verdict"]] == 2 and res["runs"] == []
    assert "no KVM, no TCG" in res["error"] and "the whole campaign" in cp.summary_text(res)


def test_vm_runs_without_any_verdict_give_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stub = _Stub(monkeypatch, {(i, m): "unknown" for i in range(1, 6) for m in ("remote-sync", "network-sync")})
    res = _vm_campaign(tmp_path, 5)
    assert res["runs_done"] == cp.GIVE_UP_AFTER and "no mode had a verdict" in res["gave_up"] and stub.downs == 1


# --- the command ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "says"), [
    ({"spec": "specs/ci.toml"}, "--spec specs/ci.toml: only with --testbed vm"),
    ({"testbed": "netns", "spec": "specs/ci.toml"}, "only with --testbed vm"),
    ({"testbed": "vm", "spec": "/no/such.toml"}, "--spec /no/such.toml: spec file"),
    ({"testbed": "vm", "runs": "0"}, "--runs 0"),
    ({"testbed": "vm", "modes": "remote-snyc"}, "--modes"),
    ({"testbed": "vm", "defects": "nope"}, "--defects: unknown defect 'nope'"),
    ({"testbed": "vm", "replay": "12", "seed": "3"}, "--replay and --seed"),
    ({"testbed": "vm", "replay": "/no/such/schedule.json"}, "--replay /no/such/schedule.json"),
    ({"testbed": "vm", "drain_timeout": "0"}, "--drain-timeout"),
])
def test_vm_flag_errors_exit_2_with_one_line(flags: dict[str, str], says: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from testbed.cli.campaign import campaign

    monkeypatch.setattr("testbed.cli.campaign.for_command", None)  # a bad flag never reaches the lock
    with pytest.raises(Exit) as err:
        campaign.body(Context(), **flags)
    assert err.value.code == 2 and says in str(err.value.message) and "\n" not in str(err.value.message)


def test_cross_testbed_replays_are_refused_by_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from testbed.cli.campaign import campaign

    monkeypatch.setattr("testbed.cli.campaign.for_command", None)
    (tmp_path / "ns.json").write_text(json.dumps(cp.draw(5).to_dict()))
    (tmp_path / "vm.json").write_text(json.dumps(cp.draw_vm(5, servers=2).to_dict()))
    (tmp_path / "vm8.json").write_text(json.dumps(cp.draw_vm(5, servers=8).to_dict()))
    (tmp_path / "bad.toml").write_text((SPEC.read_text()).replace('memory = "384MiB"', 'memory = "128MiB"', 1))
    for flags, says in [({"testbed": "vm", "replay": str(tmp_path / "ns.json")}, "replay it with --testbed netns"),
                        ({"replay": str(tmp_path / "vm.json")}, "replay it with --testbed vm"),
                        ({"testbed": "vm", "replay": str(tmp_path / "vm8.json")}, "workload.server_pairs = 8"),
                        ({"testbed": "vm", "spec": str(tmp_path / "bad.toml")}, "need more than 128 MiB")]:
        with pytest.raises(Exit) as err:
            campaign.body(Context(), **flags)
        assert err.value.code == 2 and says in str(err.value.message), (flags, err.value.message)
        assert "\n" not in str(err.value.message)
