"""The promise table: what each mode promises under each disaster, and how the checker's verdict follows it."""

from __future__ import annotations

import pytest

from smfs.modes import MODES, PRIMARY_SITE_SCHEDULES, PROMISES, SCHEDULES, parse_mode, promises
from workloads.checker import Verdict, check
from workloads.ledger import LedgerEntry, Outcome
from workloads.payload import expected_digest

EXPECTED = {
    "local-sync": {"rolling-disaster": False, "site-power-cut": False, "mirror-power-outage": False},
    "local-sync+fec": {"rolling-disaster": False, "site-power-cut": False, "mirror-power-outage": False},
    "remote-sync": {"rolling-disaster": True, "site-power-cut": True, "mirror-power-outage": True},
    "remote-sync+fec": {"rolling-disaster": True, "site-power-cut": True, "mirror-power-outage": True},
    "network-sync": {"rolling-disaster": True, "site-power-cut": True, "mirror-power-outage": False},
}


def test_the_table() -> None:
    assert {mode: dict(row) for mode, row in PROMISES.items()} == EXPECTED
    assert list(PROMISES) == list(MODES)
    for mode, row in EXPECTED.items():
        for schedule, promised in row.items():
            assert promises(mode, schedule) is promised and promises(parse_mode(mode), schedule) is promised


def test_schedules_are_the_drills() -> None:
    from testbed.drill.faults import SCHEDULES as DRILL_SCHEDULES

    assert SCHEDULES == DRILL_SCHEDULES and set(PRIMARY_SITE_SCHEDULES) < set(SCHEDULES)


def test_durable_is_the_promise_under_a_primary_site_disaster() -> None:
    for mode in MODES.values():
        assert all(mode.durable is promises(mode, s) for s in PRIMARY_SITE_SCHEDULES), mode
    assert parse_mode("network-sync").durable and not promises("network-sync", "mirror-power-outage")


def test_unknown_schedule_or_mode_is_a_one_line_error() -> None:
    with pytest.raises(ValueError, match=r"^schedule: unknown schedule 'meteor'; use one of rolling-disaster, "
                                         r"site-power-cut, mirror-power-outage$"):
        promises("remote-sync", "meteor")
    with pytest.raises(ValueError, match=r"^mode: unknown mode 'drbd'; use one of local-sync, "):
        promises("drbd", "site-power-cut")


def test_the_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        PROMISES["local-sync"]["site-power-cut"] = True  # type: ignore[index]
    with pytest.raises(TypeError):
        PROMISES["meteor"] = {}  # type: ignore[index]


# --- the verdict follows the promise; a bad mirror is data loss under every promise ----------------

def _acked(seqs: range) -> list[LedgerEntry]:
    return [LedgerEntry(1, 1, s, 64, expected_digest(1, s, 64), 1.0, 2.0, Outcome.OK) for s in seqs]


def _listing(records: list[list[object]]) -> dict[str, object]:
    return {"logs": {"1": records}, "stores": [{"path": "mirror/server-0"}]}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("mode", list(MODES))
def test_lost_appends_break_only_a_promise(mode: str, schedule: str) -> None:
    mirror = _listing([[0, 64, expected_digest(1, 0, 64)]])
    r = check(_acked(range(3)), mirror, durable=promises(mode, schedule))
    assert r.lost == 2
    assert r.verdict is (Verdict.DATA_LOSS if EXPECTED[mode][schedule] else Verdict.OK)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("mode", list(MODES))
def test_corrupt_records_are_data_loss_under_every_promise(mode: str, schedule: str) -> None:
    mirror = _listing([[0, 64, expected_digest(1, 0, 64)], [1, 64, expected_digest(1, 2, 64)]])
    r = check(_acked(range(2)), mirror, durable=promises(mode, schedule))
    assert r.corrupt == 1 and r.verdict is Verdict.DATA_LOSS
