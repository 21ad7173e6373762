"""The campaign on the namespace testbed: each fault kind has an effect on the running stack, a 2-run
campaign through the command line ends with its summary and exit 0, and a seeded stack defect makes the
campaign report data loss with the run's seed. (Short test names: unix socket paths under tmp_path.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from smfs.modes import parse_mode, parse_modes
from testbed.drill import campaign as cp
from testbed.drill.faults import Timed
from testbed.drill.local import (
    LocalDrillConfig,
    NsFreeze,
    NsLossBurst,
    NsMirrorRestart,
    NsPartition,
    run_local_drill,
)
from testbed.drill.runner import EXIT_CODES
from testbed.registry import Registry

REPO = Path(__file__).parents[2]


def _acks(mode_dir: Path, origin: float) -> tuple[list[float], int]:
    """Completion times of the acked appends (s on the timeline's clock) and the count of failed ones."""
    oks, failed = [], 0
    for f in (mode_dir / "ledger").glob("*.jsonl"):
        for line in f.read_text().splitlines():
            d = json.loads(line)
            if d["outcome"] == "ok":
                oks.append(d["t_complete"] - origin)
            failed += d["outcome"] == "fail"
    return sorted(oks), failed


def test_faults(tmp_path: Path) -> None:
    """One drill with every fault kind the namespace bed injects; each shows in the ledger or its counters."""
    during = (Timed(0.6, 0.7, NsPartition("both")), Timed(1.9, 0.7, NsFreeze("mirror-gateway")),
              Timed(3.2, 0.7, NsFreeze("primary")), Timed(4.5, 0.7, NsLossBurst(50.0)),
              Timed(5.8, 0.3, NsMirrorRestart()))
    cfg = LocalDrillConfig(modes=(parse_mode("remote-sync+fec"),), testers=8, append_size=64 * 1024, duration=9.0,
                           fail_at=7.2, servers=2, out=tmp_path, during=during)
    [mode] = run_local_drill(cfg, say=lambda _line: None)["modes"]
    assert mode["verdict"] == "ok" and mode["lost"] == 0, mode.get("error")
    origin = mode["instant"]["t"] - mode["instant"]["t_rel"]
    oks, failed = _acks(tmp_path / "remote-sync+fec", origin)
    events = [e for e in mode["timeline"] if e.get("fault")]
    assert [(e["fault"], bool(e.get("healed"))) for e in events] == [
        (k, h) for k in ("partition", "freeze", "freeze", "loss-burst", "mirror-restart") for h in (False, True)], events
    start, end = events[0::2], events[1::2]

    def acks_in(i: int) -> int:
        """Acks completed while fault i was on: an ack already on its way may land just after the start,
        and the heal's mark is taken after the heal (a partition's counters are read after its rules
        went: acks 8-11 ms before the mark were seen in a loaded full run)."""
        return sum(1 for t in oks if start[i]["t"] + 0.15 < t < end[i]["t"] - 0.1)

    assert oks[0] < start[0]["t"] and len(oks) > 100
    assert end[0]["dropped"] > 0 and acks_in(0) == 0, "the partition dropped packets and stalled every ack"
    assert start[1]["frozen"] == ["mirror:gateway"] and acks_in(1) == 0, "a frozen gateway stalls the mirror stream"
    assert set(start[2]["frozen"]) == {"primary:servers", "primary:gateway"} and acks_in(2) == 0
    assert any(end[2]["t"] < t < start[3]["t"] for t in oks), "the stack went on after each heal"
    assert end[3]["dropped"] > 0, "the loss burst dropped packets"
    assert start[4]["killed"] and end[4]["pid"] not in start[4]["killed"], "a new mirror process"
    assert not any(t > start[4]["t"] + 0.15 for t in oks) and failed > 0, "the primary fails appends once its mirror crashed"
    assert mode["fec"]["lost_on_wan"] > 0
    run_id = mode["timeline"][0]["run_id"]
    assert Registry().items(owner=f"netns-{run_id}") == []


def test_two_runs(tmp_path: Path) -> None:
    """``campaign --runs 2`` through the command line (its own cache: own lock and registry)."""
    seed, out = 35, tmp_path / "o"
    env = os.environ | {"SMFS_TESTBED_CACHE": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(REPO), "campaign", "--runs", "2", "--seed",
                          str(seed), "--modes", "remote-sync,network-sync", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=150)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "campaign verdict: ok" in res.stdout and "ETA" in res.stdout
    got = json.loads((out / "campaign.json").read_text())
    assert (got["verdict"], got["runs_done"], got["seed"]) == ("ok", 2, seed)
    assert got["per_mode"]["remote-sync"]["ok"] == 2 and got["per_mode"]["network-sync"]["ok"] == 2
    assert got["data_loss"] == [] and got["unknown"] == []
    for i, run in enumerate(got["runs"], 1):
        want = cp.draw(cp.run_seed(seed, i))
        assert run["seed"] == want.seed and (out / run["folder"] / "schedule.json").exists()
        assert cp.load_replay(str(out / run["folder"])) == want == cp.load_replay(str(want.seed))
        assert all(m["acked"] > 0 and m["lost"] == 0 for m in run["modes"].values())
    # Run 2 restarts the mirror: remote-sync survives it; network-sync promises nothing there, and is spared it.
    run2 = got["runs"][1]["modes"]
    assert "faults_not_run" not in run2["remote-sync"]
    assert "mirror-restart" in run2["network-sync"]["faults_not_run"][0]
    md = (out / "summary.md").read_text()
    assert md.startswith("# Campaign: ok") and str(got["runs"][0]["seed"]) in md


def test_defect(tmp_path: Path) -> None:
    """A stack that acks before its own local write (the write lags 1 s): the campaign reports data loss (the
    primary's own disk after the site power cut), with the run's seed and the command that replays it."""
    seed = 11  # run 1: a partition and a freeze of the primary during the run, then a site power cut
    assert cp.draw(cp.run_seed(seed, 1)).disaster == "site-power-cut"
    cfg = cp.CampaignConfig(modes=tuple(parse_modes("remote-sync")), out=tmp_path, runs=1, seed=seed,
                            defects=("primary-acks-before-local-write",))
    said: list[str] = []
    res = cp.run_campaign(cfg, say=said.append)
    assert res["verdict"] == "data-loss" and EXIT_CODES[res["verdict"]] == 1, res["runs"]
    [loss] = res["data_loss"]
    run_seed = cp.run_seed(seed, 1)
    assert (loss["seed"], loss["mode"]) == (run_seed, "remote-sync")
    assert res["runs"][0]["modes"]["remote-sync"]["primary_disk"]["lost"] > 0
    assert loss["schedule"] == cp.draw(run_seed).describe()
    assert loss["replay"] == f"./inv campaign --replay {run_seed} --modes remote-sync --defects primary-acks-before-local-write"
    text: Any = "\n".join(said)
    assert f"DATA LOSS  run 1 seed {run_seed} remote-sync" in text
    assert "missing on the primary's disk" in text and f"seed `{run_seed}`" in (tmp_path / "summary.md").read_text()
