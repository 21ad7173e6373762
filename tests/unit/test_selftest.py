"""The self-test's bookkeeping: every seeded defect has a case, names are checked, and a defect
counts as caught only when every one of its runs caught it."""

from __future__ import annotations

import pytest

from smfs.defects import DEFECTS
from smfs.modes import SCHEDULES, parse_mode, promises
from testbed.drill.selftest import CASES, cases, summarize, table


def test_every_seeded_defect_has_a_case_where_its_mode_promises_something() -> None:
    assert sorted(c.defect for c in CASES) == sorted(DEFECTS)
    for c in CASES:
        assert c.schedule in SCHEDULES
        # A defect run under a schedule where the mode promises nothing could never be caught.
        assert promises(parse_mode(c.mode), c.schedule), c


def test_case_names_are_checked() -> None:
    assert [c.defect for c in cases("mirror-acks-before-fsync")] == ["mirror-acks-before-fsync"]
    assert cases("all") == CASES
    with pytest.raises(ValueError, match="--defects: unknown defect 'mirror-acks'"):
        cases("mirror-acks")


def test_a_defect_missed_in_one_run_is_missed() -> None:
    rows = [{"defect": "d", "mode": "remote-sync", "schedule": "site-power-cut", "caught": c, "evidence": e}
            for c, e in ((True, "lost 3"), (False, "lost 0"), (True, "lost 1"))]
    (s,) = summarize(rows)
    assert (s["runs"], s["caught_in"], s["caught"]) == (3, 2, False)
    assert "MISSED 2/3" in table([s]) and "lost 3" in table([s])
    (s,) = summarize(rows[:1])
    assert s["caught"] and "caught 1/1" in table([s])


def test_a_control_runs_the_variant_its_defect_runs_under() -> None:
    """The hand-off defect needs the WAN dark before the site dies; its control must get the same dark
    WAN (else a catch could be the schedule's doing), and other cases keep the spec's burst."""
    from pathlib import Path

    from testbed.drill.selftest import _configure, _variant
    from testbed.drill.vm import DrillConfig
    from testbed.spec import load

    spec = load(Path(__file__).resolve().parents[2] / "specs" / "ci.toml")
    base = DrillConfig.from_spec(spec, (parse_mode("remote-sync"),), Path("/tmp/x"))
    by_name = {c.defect: c for c in CASES}
    handoff = _configure(base, *_variant(by_name["remote-sync-acks-at-handoff"])[2:])
    assert (handoff.burst_loss, handoff.burst_seconds) == ("100%", 3.0)
    assert handoff.burst_seconds < base.duration - base.fail_at  # the testers still run when the WAN goes dark
    other = _configure(base, *_variant(by_name["mirror-acks-before-fsync"])[2:])
    assert (other.burst_loss, other.burst_seconds, other.flush_ms) == (base.burst_loss, base.burst_seconds, base.flush_ms)
    assert _variant(by_name["remote-sync-acks-at-handoff"]) != _variant(by_name["primary-acks-before-local-write"])
