"""The campaign's pure parts: the schedule draw (deterministic per seed, replayable, within its bounds,
every fault kind drawn), its translation into the namespace drill's faults, the summary and exit codes
(with the drill replaced by a stub), and the command's refusals."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from invoke import Context
from invoke.exceptions import Exit

from smfs.modes import parse_mode, parse_modes
from testbed.drill import campaign as cp
from testbed.drill.faults import Timed
from testbed.drill.local import LocalDrillConfig, NsFreeze, NsLossBurst, NsMirrorRestart, NsPartition
from testbed.drill.runner import EXIT_CODES

SEEDS = range(1, 400)


def test_same_seed_same_schedule() -> None:
    for seed in SEEDS:
        assert cp.draw(seed) == cp.draw(seed)
    assert len({cp.draw(s) for s in SEEDS}) == len(SEEDS), "different seeds, different schedules"
    # Pinned: a change to the draw must raise DRAW_VERSION (old seeds would replay something else).
    assert cp.run_seed(1, 1) == 158935870147465
    assert cp.draw(cp.run_seed(1, 2)).describe() == (
        "14 testers × 64KiB, 2 servers, loss 0%; freeze(primary-gateway)@0.52+1.15s, loss-burst(7.3%)@0.96+0.93s; "
        "site-power-cut@3.7s"), cp.DRAW_VERSION


def test_run_seeds_are_distinct() -> None:
    seeds = {cp.run_seed(c, i) for c in (1, 2, 3) for i in range(1, 1001)}
    assert len(seeds) == 3000 and all(0 <= s < 1 << 48 for s in seeds)


def test_long_out_is_refused(tmp_path: Path) -> None:
    assert cp.socket_room(Path("results/campaign/20260101-000000"), 100, 8) is None
    assert "too long" in (cp.socket_room(Path("/tmp/" + "x" * 50), 100, 8) or "")
    with pytest.raises(ValueError, match="give a shorter --out"):
        cp.run_campaign(cp.CampaignConfig(modes=(parse_mode("remote-sync"),), out=tmp_path / ("x" * 60)))
    assert not (tmp_path / ("x" * 60)).exists()


def test_replay(tmp_path: Path) -> None:
    for seed in (cp.run_seed(1, 3), cp.run_seed(7, 42)):
        s = cp.draw(seed)
        assert cp.load_replay(str(seed)) == s
        assert cp.Schedule.from_dict(json.loads(json.dumps(s.to_dict()))) == s
        (tmp_path / "schedule.json").write_text(json.dumps(s.to_dict()))
        assert cp.load_replay(str(tmp_path / "schedule.json")) == s
        assert cp.load_replay(str(tmp_path)) == s, "a run's folder names its schedule.json"
    cfg = cp.CampaignConfig(modes=(parse_mode("remote-sync"),), out=tmp_path, runs=3, replay=cp.draw(5))
    assert [cfg.schedule(i) for i in (1, 2, 3)] == [cp.draw(5)] * 3


@pytest.mark.parametrize("bounds", [cp.DEFAULT_BOUNDS, cp.Bounds(fail_at=(6.0, 9.0), faults=(2, 5), fault_seconds=(0.1, 0.5),
                                                                   testers=(1, 2), servers=(8,), wan_loss=(0.0,))])
def test_bounds_respected(bounds: cp.Bounds) -> None:
    for seed in SEEDS:
        s = cp.draw(seed, bounds)
        assert cp.violations(s, bounds) == [], (seed, s)
        for f in s.faults:  # heal, settle and the fault's own length again before the disaster
            assert bounds.first_at <= f.at and f.at + 2 * f.seconds + bounds.settle <= s.fail_at + 1e-9
        assert s.fail_at < s.duration, "the testers still run at the disaster"


def test_violations_sees_what_is_out_of_bounds() -> None:
    s = cp.draw(cp.run_seed(1, 3))
    from dataclasses import replace

    late = replace(s, faults=(cp.FaultDraw("partition", s.fail_at - 0.5, 0.4, direction="both"),))
    assert any("before the disaster" in v for v in cp.violations(late))
    assert cp.violations(replace(s, testers=99)) and cp.violations(replace(s, disaster="meteor"))


def test_every_fault_kind_is_drawn() -> None:
    drawn = [cp.draw(s) for s in SEEDS]
    faults = [f for s in drawn for f in s.faults]
    assert {f.kind for f in faults} == set(cp.FAULT_KINDS)
    assert {f.target for f in faults if f.kind == "freeze"} == set(cp.FREEZE_TARGETS)
    assert {f.direction for f in faults if f.kind == "partition"} == set(cp.PARTITIONS)
    assert {s.disaster for s in drawn} == set(cp.DISASTERS)
    assert sum(1 for s in drawn if len(s.faults) >= 2) > len(drawn) / 4, "overlapping and sequential faults"


def test_schedule_file_errors_are_one_line() -> None:
    good = cp.draw(3).to_dict()
    for edit, field in [({"testers": True}, "testers"), ({"fail_at": float("nan")}, "fail_at"), ({"wrok": 1}, "wrok"),
                        ({"disaster": "meteor"}, "disaster"),
                        ({"faults": [{"kind": "freeze", "at": 1, "seconds": 0.5, "target": "router"}]}, "target"),
                        ({"faults": [{"kind": "partition", "at": 1, "seconds": 99, "direction": "both"}]}, "faults[0]")]:
        with pytest.raises(ValueError, match=re.escape(field)) as err:
            cp.Schedule.from_dict(good | edit)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="give a run's seed"):
        cp.load_replay("no-such-file.json")


def test_drill_config_carries_the_schedule(tmp_path: Path) -> None:
    s = next(cp.draw(seed) for seed in SEEDS if {f.kind for f in cp.draw(seed).faults} >= {"freeze", "loss-burst"})
    cfg = cp.drill_config(s, tuple(parse_modes("all")), tmp_path)
    assert (cfg.testers, cfg.append_size, cfg.servers, cfg.fail_at, cfg.duration, cfg.schedule, cfg.wan_loss) == (
        s.testers, s.append_size, s.servers, s.fail_at, s.duration, s.disaster, s.wan_loss)
    assert [(t.at, t.seconds, t.fault.name) for t in cfg.during] == [(f.at, f.seconds, f.kind) for f in s.faults]
    kinds = {type(t.fault) for t in cfg.during}
    assert kinds <= {NsPartition, NsFreeze, NsLossBurst, NsMirrorRestart}
    with pytest.raises(ValueError, match=r"during\[0\]"):  # the drill refuses a fault healing after its disaster
        LocalDrillConfig(modes=cfg.modes, fail_at=3.0, during=(Timed(2.5, 1.0, NsFreeze("mirror")),))
    with pytest.raises(ValueError, match="target"):
        NsFreeze("router")


def test_faults_not_run_where_the_mode_promises_nothing_about_them() -> None:
    ns, rs, ls, rsf = (parse_mode(m) for m in ("network-sync", "remote-sync", "local-sync", "remote-sync+fec"))
    for sched in ("site-power-cut", "rolling-disaster"):
        # network-sync's ack means "on the WAN": a mirror that crashes loses what it had received
        assert "promises nothing" in (NsMirrorRestart().skip(ns, sched) or "")
        assert NsMirrorRestart().skip(rs, sched) is None and NsMirrorRestart().skip(ls, sched) is None
    assert "no gateway" in (NsFreeze("mirror-gateway").skip(rs, "site-power-cut") or "")
    assert NsFreeze("mirror-gateway").skip(rsf, "site-power-cut") is None
    assert NsFreeze("mirror").skip(rs, "site-power-cut") is None


# --- the campaign loop, with the drill stubbed ---------------------------------------------------


def _entry(mode: str, verdict: str, lost: int = 0, **kw: Any) -> dict[str, Any]:
    durable = mode != "local-sync"
    return {"mode": mode, "verdict": verdict, "durable": durable, "acked": 100, "lost": lost, "corrupt": 0,
            "unexpected": 0, "prefix_violations": 0, "recovered": 1, "timeline": [], **kw}


def _stub(monkeypatch: pytest.MonkeyPatch, outcomes: list[Any]) -> list[Any]:
    seen: list[Any] = []

    def fake(cfg: LocalDrillConfig, say: Any) -> dict[str, Any]:
        seen.append(cfg)
        out = outcomes[len(seen) - 1]
        if isinstance(out, BaseException):
            raise out
        return {"verdict": "data-loss" if any(e["verdict"] == "data-loss" for e in out) else
                ("unknown" if any(e["verdict"] == "unknown" for e in out) else "ok"), "modes": out}

    monkeypatch.setattr("testbed.drill.local.run_local_drill", fake)
    return seen


@pytest.fixture()
def short() -> Any:
    """A short output folder (the campaign refuses one too long for the stack's unix sockets)."""
    path = Path(tempfile.mkdtemp(prefix="cp-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _campaign(tmp_path: Path, runs: int, **kw: Any) -> dict[str, Any]:
    cfg = cp.CampaignConfig(modes=tuple(parse_modes("local-sync,remote-sync")), out=tmp_path, runs=runs, seed=11, **kw)
    return cp.run_campaign(cfg, say=lambda _l: None)


def test_all_ok_is_exit_0(short: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp_path = short
    seen = _stub(monkeypatch, [[_entry("local-sync", "ok", lost=3), _entry("remote-sync", "ok")]] * 2)
    res = _campaign(tmp_path, 2)
    assert res["verdict"] == "ok" and EXIT_CODES[res["verdict"]] == 0
    assert res["runs_done"] == 2 and res["data_loss"] == [] and res["unknown"] == []
    assert res["per_mode"]["local-sync"] == {"runs": 2, "ok": 2, "data-loss": 0, "unknown": 0, "acked": 200, "lost": 6}
    # Each run's folder holds its seed's schedule, and the drill ran exactly that schedule.
    for i, cfg in enumerate(seen, 1):
        folder = tmp_path / f"run-{i:03d}"
        assert cfg.out == folder
        assert cp.Schedule.from_dict(json.loads((folder / "schedule.json").read_text())) == cp.draw(cp.run_seed(11, i))
    on_disk = json.loads((tmp_path / "campaign.json").read_text())
    assert on_disk["verdict"] == "ok" and len(on_disk["runs"]) == 2
    md = (tmp_path / "summary.md").read_text()
    assert md.startswith("# Campaign: ok") and "ok (3 lost)" in md, "local-sync's losses are reported, not failures"


def test_data_loss_is_exit_1_with_its_seed(short: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp_path = short
    _stub(monkeypatch, [[_entry("local-sync", "ok"), _entry("remote-sync", "ok")],
                        [_entry("local-sync", "ok"), _entry("remote-sync", "data-loss", lost=4,
                                                            broken_promises=["4 acked appends lost"])],
                        [_entry("local-sync", "unknown", error="drain: not quiet"), _entry("remote-sync", "ok")]])
    res = _campaign(tmp_path, 3)
    assert res["verdict"] == "data-loss" and EXIT_CODES[res["verdict"]] == 1, "data loss outranks unknown"
    [loss] = res["data_loss"]
    seed = cp.run_seed(11, 2)
    assert (loss["run"], loss["seed"], loss["mode"], loss["lost"]) == (2, seed, "remote-sync", 4)
    assert loss["schedule"] == cp.draw(seed).describe() and loss["replay"] == f"./inv campaign --replay {seed} --modes remote-sync"
    [unk] = res["unknown"]
    assert (unk["run"], unk["mode"], unk["reason"]) == (3, "local-sync", "drain: not quiet")
    text = cp.summary_text(res)
    assert f"DATA LOSS  run 2 seed {seed} remote-sync: 4 acked appends lost" in text and "UNKNOWN    run 3" in text


def test_unknown_is_exit_2_and_a_crashing_drill_gives_up(short: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp_path = short
    _stub(monkeypatch, [RuntimeError("boom")] * 5)
    res = _campaign(tmp_path, 5)
    assert res["verdict"] == "unknown" and EXIT_CODES[res["verdict"]] == 2
    assert res["runs_done"] == cp.GIVE_UP_AFTER and "gave_up" in res
    assert all(u["reason"] == "the drill crashed: RuntimeError: boom" for u in res["unknown"])
    assert (tmp_path / "run-001" / "campaign-error.txt").exists()


def test_interrupt_leaves_the_summary_so_far(short: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp_path = short
    _stub(monkeypatch, [[_entry("local-sync", "ok"), _entry("remote-sync", "ok")], KeyboardInterrupt()])
    with pytest.raises(KeyboardInterrupt):
        _campaign(tmp_path, 4)
    on_disk = json.loads((tmp_path / "campaign.json").read_text())
    assert on_disk["interrupted"] and on_disk["runs_done"] == 1 and on_disk["runs"][1]["error"] == "interrupted (Ctrl-C)"
    assert on_disk["verdict"] == "unknown"
    assert "(interrupted in run 2)" in (tmp_path / "summary.md").read_text()


# --- the command ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "says"), [
    ({"spec": "specs/ci.toml"}, "--spec specs/ci.toml: only with --testbed vm"),
    ({"testbed": "kvm"}, "--testbed 'kvm'"),
    ({"replay": "12", "seed": "3"}, "--replay and --seed"),
    ({"runs": "0"}, "--runs 0"),
    ({"seed": "-1"}, "--seed -1"),
    ({"modes": "remote-snyc"}, "--modes"),
    ({"defects": "nope"}, "--defects: unknown defect 'nope'"),
    ({"replay": "/no/such/schedule.json"}, "--replay /no/such/schedule.json"),
    ({"out": "/tmp/" + "x" * 60}, "too long a path for the stack's unix sockets"),
])
def test_bad_flags_exit_2_with_one_line(flags: dict[str, str], says: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from testbed.cli.campaign import campaign

    monkeypatch.setattr("testbed.cli.campaign.for_command", None)  # a bad flag never reaches the lock (nor creates anything)
    with pytest.raises(Exit) as err:
        campaign.body(Context(), **flags)
    assert err.value.code == 2 and says in str(err.value.message) and "\n" not in str(err.value.message)
