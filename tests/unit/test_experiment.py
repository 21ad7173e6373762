"""Experiment files, their points and specs, the tidy rows, the claims judged on hand-made tables, and
``./inv compare`` on hand-made result folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from testbed.drill import experiment as ex
from testbed.drill.compare import compare, render

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "e.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = f'''
name = "t"
spec = "{ROOT / 'specs' / 'default.toml'}"
modes = ["remote-sync", "network-sync"]
repetitions = 2
[set]
"workload.testers" = 2
[matrix]
"wan.delay" = ["10ms", "50ms", "100ms"]
'''


def test_the_shipped_experiments_load_full_and_quick() -> None:
    for f in sorted((ROOT / "experiments").glob("*.toml")):
        for quick in (False, True):
            exp = ex.load(f, quick=quick)
            assert exp.points(), f
            assert exp.claims, f"{f.name}: an experiment judges at least one claim"
    quick = ex.load(ROOT / "experiments" / "latency.toml", quick=True)
    full = ex.load(ROOT / "experiments" / "latency.toml")
    assert len(quick.points()) * len(quick.modes) * quick.repetitions < len(full.points()) * len(full.modes) * full.repetitions


def test_points_are_the_cartesian_product_in_file_order(tmp_path: Path) -> None:
    exp = ex.load(write(tmp_path, BASE.replace('[matrix]\n', '[matrix]\n"wan.loss" = ["0%", "1%"]\n')))
    pts = exp.points()
    assert len(pts) == 6
    assert pts[0] == {"wan.loss": "0%", "wan.delay": "10ms"} and pts[1] == {"wan.loss": "0%", "wan.delay": "50ms"}
    assert exp.swept == "wan.delay"


def test_point_specs_carry_the_set_and_the_point(tmp_path: Path) -> None:
    exp = ex.load(write(tmp_path, BASE + '"fec.c" = [1]\n'))
    spec = ex.point_spec(exp, exp.points()[2])
    assert spec.wan.a_to_b.delay_us == 100_000
    assert spec.sections["workload"]["testers"] == 2
    assert spec.sections["fec"]["c"] == 1
    no_rate = ex.load(write(tmp_path, BASE.replace("[set]\n", '[set]\n"wan.rate" = "none"\n'), "n.toml"))
    assert not ex.point_spec(no_rate, no_rate.points()[0]).wan.a_to_b.rate_bps


@pytest.mark.parametrize(("edit", "message"), [
    (("[matrix]", '[matrix]\n"testbed.mtu" = [1500]'), "matrix.testbed.mtu: not a sweepable field"),
    (("[matrix]", '[matrix]\n"wan.dleay" = ["1ms"]'), "matrix.wan.dleay: unknown WAN field"),
    (('"wan.delay" = ["10ms", "50ms", "100ms"]', '"wan.delay" = "10ms"'), "matrix.wan.delay: must be a non-empty list"),
    (('"wan.delay" = ["10ms", "50ms", "100ms"]', '"wan.delay" = ["10ms", "10ms"]'), "matrix.wan.delay: a value appears twice"),
    (('"wan.delay" = ["10ms", "50ms", "100ms"]', '"wan.delay" = ["10parsecs"]'), "matrix point wan.delay = 10parsecs: wan"),
    (("repetitions = 2", "repetitions = 0"), "repetitions: 0 must be a whole number from 1 to 20"),
    (('modes = ["remote-sync", "network-sync"]', 'modes = ["remote-snyc"]'), "modes[0]:"),
    (("[set]", "[set]\n\"wan.delay\" = \"5ms\""), "set.wan.delay: also in [matrix]"),
    (('name = "t"', 'name = "t"\nwrong = 1'), "wrong: unknown field"),
    (('"wan.delay" = ["10ms", "50ms", "100ms"]', '"fec.c" = [4, 3]'), "matrix point fec.c = 4: fec.c: 4 is not a whole number"),
])
def test_a_bad_file_is_one_line_naming_the_field(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    with pytest.raises(ex.ExperimentError) as err:
        ex.load(write(tmp_path, BASE.replace(*edit)))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_claim_naming_a_mode_not_run_is_refused(tmp_path: Path) -> None:
    bad = BASE + '[[claims]]\nclaim = "x"\nkind = "flat"\nmode = "local-sync"\n'
    with pytest.raises(ex.ExperimentError, match=r"claims\[0\]\.mode: 'local-sync' is not one of the experiment's modes"):
        ex.load(write(tmp_path, bad))
    bad = BASE + '[[claims]]\nclaim = "x"\nkind = "above"\nmode = "network-sync"\n'
    with pytest.raises(ex.ExperimentError, match=r"claims\[0\]\.than"):
        ex.load(write(tmp_path, bad))


# --- judgments on hand-made tables ----------------------------------------------------------------


def exp_with(tmp_path: Path, claims: str) -> ex.Experiment:
    return ex.load(write(tmp_path, BASE + claims))


def rows(values: dict[str, list[list[float]]], metric: str = "throughput_per_tester_MBps",
         faithful: dict[int, bool] | None = None) -> list[dict[str, Any]]:
    """``{mode: [[rep values of point 0], [point 1], ...]}`` as tidy rows."""
    out = []
    for mode, per_point in values.items():
        for i, reps in enumerate(per_point):
            for rep, v in enumerate(reps):
                out.append({"point": i, "mode": mode, "rep": rep, "verdict": "ok", metric: v,
                            "faithful": (faithful or {}).get(i, True)})
    return out


FLAT = '[[claims]]\nclaim = "flat"\nkind = "flat"\nmode = "network-sync"\nmetric = "throughput_per_tester_MBps"\ntolerance = 0.1\n'
FALLS = '[[claims]]\nclaim = "falls"\nkind = "falls"\nmode = "remote-sync"\nmetric = "throughput_per_tester_MBps"\nfactor = 2\n'
ABOVE = ('[[claims]]\nclaim = "above"\nkind = "above"\nmode = "network-sync"\nthan = "remote-sync"\n'
         'metric = "throughput_per_tester_MBps"\n')


def test_a_flat_curve_agrees_and_a_falling_one_disagrees_with_flat(tmp_path: Path) -> None:
    exp = exp_with(tmp_path, FLAT)
    flat = rows({"network-sync": [[10, 10.4], [9.8, 10.1], [10.2, 9.9]]})
    assert ex.judge_all(exp, flat)[0]["verdict"] == "agrees"
    falling = rows({"network-sync": [[10, 10], [7, 7], [5, 5]]})
    j = ex.judge_all(exp, falling)[0]
    assert j["verdict"] == "DISAGREES" and "varies by 100 %" in j["detail"]


def test_falls_needs_the_factor_between_first_and_last(tmp_path: Path) -> None:
    exp = exp_with(tmp_path, FALLS)
    assert ex.judge_all(exp, rows({"remote-sync": [[8, 8], [4, 4], [2, 3]]}))[0]["verdict"] == "agrees"
    assert ex.judge_all(exp, rows({"remote-sync": [[8, 8], [6, 6], [5, 5]]}))[0]["verdict"] == "DISAGREES"


def test_noisy_repetitions_are_judged_on_their_median(tmp_path: Path) -> None:
    """One wild repetition among three does not move the median, so it does not flip the judgment."""
    exp = ex.load(write(tmp_path, BASE.replace("repetitions = 2", "repetitions = 3") + FLAT))
    noisy = rows({"network-sync": [[10, 10.5, 1.0], [9.9, 30.0, 10.2], [10.1, 10.0, 9.7]]})
    j = ex.judge_all(exp, noisy)[0]
    assert j["verdict"] == "agrees", j


def test_above_is_judged_at_every_point(tmp_path: Path) -> None:
    exp = exp_with(tmp_path, ABOVE)
    good = rows({"network-sync": [[5], [5], [5]], "remote-sync": [[4], [2], [1]]})
    assert ex.judge_all(exp, good)[0]["verdict"] == "agrees"
    crossing = rows({"network-sync": [[5], [5], [5]], "remote-sync": [[6], [2], [1]]})
    j = ex.judge_all(exp, crossing)[0]
    assert j["verdict"] == "DISAGREES" and "delay 10ms" in j["detail"]


def test_unfaithful_points_are_left_out_and_said(tmp_path: Path) -> None:
    exp = exp_with(tmp_path, FLAT)
    table = rows({"network-sync": [[10], [10], [3]]}, faithful={2: False})
    j = ex.judge_all(exp, table)[0]
    assert j["verdict"] == "agrees"
    assert "no faithful value at wan.delay = 100ms" in j["detail"]
    only_one = rows({"network-sync": [[10], [10], [3]]}, faithful={1: False, 2: False})
    assert ex.judge_all(exp, only_one)[0]["verdict"] == "not judged"


def test_zero_and_positive_sum_the_repetitions(tmp_path: Path) -> None:
    claims = ('[[claims]]\nclaim = "z"\nkind = "zero"\nmode = "network-sync"\nmetric = "lost"\n'
              '[[claims]]\nclaim = "p"\nkind = "positive"\nmode = "network-sync"\nmetric = "lost"\n'
              'where = { "wan.delay" = ["10ms"] }\n')
    exp = exp_with(tmp_path, claims)
    table = rows({"network-sync": [[0, 2], [0, 0], [0, 0]]}, metric="lost")
    z, p = ex.judge_all(exp, table)
    assert z["verdict"] == "DISAGREES" and "delay 10ms: 2" in z["detail"]
    assert p["verdict"] == "agrees"


def test_runs_without_a_verdict_are_not_counted(tmp_path: Path) -> None:
    exp = exp_with(tmp_path, FLAT)
    table = rows({"network-sync": [[10], [10], [10]]})
    table.append({"point": 0, "mode": "network-sync", "rep": 1, "verdict": "unknown",
                  "throughput_per_tester_MBps": 0.0, "faithful": True})
    assert ex.judge_all(exp, table)[0]["verdict"] == "agrees"


def test_a_row_from_a_mode_entry(tmp_path: Path) -> None:
    exp = ex.load(write(tmp_path, BASE))
    entry = {"mode": "network-sync", "verdict": "ok", "throughput_MBps": 4.0, "latency_ms": {"p50": 120.0, "p99": 300.0},
             "acked": 40, "lost": 0, "fec": {"sites": {"primary": {"packets_out": 100, "repairs_sent": 40}}}}
    cal = {"measured": {"rtt_median_ms": 21.2, "loss_pct": 0.0},
           "rows": [{"metric": "rtt median", "ok": False, "measured": 40, "configured": 21, "tolerance": 2, "unit": "ms"}]}
    r = ex.row_of(entry, exp, 0, exp.points()[0], 1, 2, cal)
    assert r["throughput_per_tester_MBps"] == 2.0 and r["repairs_per_data"] == 0.4 and r["wan.delay"] == "10ms"
    assert r["faithful"] is False and "calibration off: rtt median measured 40" in r["note"]
    ex.write_csv([r], tmp_path / "p.csv")
    assert (tmp_path / "p.csv").read_text().splitlines()[0].startswith("experiment,point,wan.delay,mode,rep")


def test_an_existing_result_folder_is_never_reused_without_resume(tmp_path: Path) -> None:
    exp = ex.load(write(tmp_path, BASE))
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("earlier")
    with pytest.raises(ex.ExperimentError, match="exists and is not empty"):
        ex.run_experiment(exp, out)
    assert (out / "x").read_text() == "earlier"


def test_the_report_and_plots_are_written_from_a_table(tmp_path: Path) -> None:
    from testbed.drill.experiment_plots import write_experiment_report

    exp = exp_with(tmp_path, FLAT + FALLS)
    table = rows({"network-sync": [[10, 10.4], [9.8, 10.1], [10.2, 9.9]], "remote-sync": [[8, 8], [4, 4], [2, 3]]})
    for r in table:
        r["latency_p50_ms"], r["lost"] = 100.0, 0
    result = {"rows": table, "claims": ex.judge_all(exp, table)}
    plots = write_experiment_report(result, exp, tmp_path)
    assert {p.name for p in plots} >= {"throughput.png", "latency.png"}
    md = (tmp_path / "report.md").read_text()
    assert "**agrees** — flat" in md and "**agrees** — falls" in md
    assert "| wan.delay = 10ms | network-sync | 10.2 |" in md


# --- compare ---------------------------------------------------------------------------------------


def drill_folder(path: Path, loss: str, per_tester: list[int], lost_on_wan: int = 0) -> Path:
    path.mkdir(parents=True)
    (path / "spec.toml").write_text(f'name = "d"\n[wan]\nloss = "{loss}"\n')
    logs = {str(i): {"log": i, "acked": a} for i, a in enumerate(per_tester)}  # keyed by log, as result.json
    mode = {"mode": "remote-sync", "throughput_MBps": sum(per_tester) * 0.5 / 10, "window_s": 10.0, "logs": logs,
            "latency_ms": {"p50": 100}, "lost": 0, "verdict": "ok", "fec": {"lost_on_wan": lost_on_wan}}
    (path / "result.json").write_text(json.dumps({"config": {"append_size": 500_000}, "modes": [mode],
                                                  "environment": {"accel": "tcg"}}))
    return path


def test_compare_two_drills_of_the_same_spec_finds_no_difference(tmp_path: Path) -> None:
    a = drill_folder(tmp_path / "a", "0.5%", [10, 11, 9, 10, 12, 8, 10, 10])
    b = drill_folder(tmp_path / "b", "0.5%", [11, 10, 9, 9, 12, 9, 10, 11])
    res = compare(a, b)
    assert res["spec_differences"] == [] and res["differ"] == []
    assert "no difference beyond the spread" in render(res)


def test_compare_shows_a_changed_spec_and_a_change_beyond_the_spread(tmp_path: Path) -> None:
    a = drill_folder(tmp_path / "a", "0.5%", [10, 11, 9, 10, 12, 8, 10, 10])
    b = drill_folder(tmp_path / "b", "1%", [5, 6, 4, 5, 6, 5, 4, 5], lost_on_wan=40)
    res = compare(a, b)
    assert res["spec_differences"] == [("wan.loss", "0.5%", "1%")]
    assert res["differ"] == ["remote-sync", "remote-sync (packets lost on the WAN)"]
    text = render(res)
    assert "wan.loss: '0.5%' -> '1%'" in text and "DIFFERS" in text and "lost on WAN 0 -> 40 (DIFFERS)" in text


def test_compare_refuses_a_folder_without_a_result(tmp_path: Path) -> None:
    from testbed.drill.compare import CompareError

    (tmp_path / "x").mkdir()
    with pytest.raises(CompareError, match="no result.json"):
        compare(tmp_path / "x", tmp_path / "x")


def test_compare_a_small_change_within_run_to_run_repeatability_is_not_a_difference(tmp_path: Path) -> None:
    """Testers of one run agree closely, so a 5 % change is many standard errors; it is still within what
    two runs of one spec differ by here (REPEATABILITY), so it is not called a difference."""
    a = drill_folder(tmp_path / "a", "0.5%", [20, 20, 20, 20, 21, 20, 20, 20])
    b = drill_folder(tmp_path / "b", "0.5%", [19, 19, 19, 19, 20, 19, 19, 19])
    res = compare(a, b)
    assert res["differ"] == [] and "standard errors, -5 %" in render(res)
