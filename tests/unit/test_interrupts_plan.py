"""The interrupted runs' plan, the phase a kill landed in, and whose a new thing on the host is
(:mod:`testbed.drill.interrupts`; the runs themselves are in tests/netns/test_interrupts.py)."""

from __future__ import annotations

from testbed.drill.interrupts import Ours, compare, phase_of, plan

OURS = Ours("smfs-testbed:1111111111111111", "/cache", "tag1")


def test_plan_is_seeded_balanced_and_spread() -> None:
    shots = plan(7, 20, 12.0)
    assert shots == plan(7, 20, 12.0) and shots != plan(8, 20, 12.0)
    assert [s.run for s in shots] == list(range(1, 21))
    assert sum(s.signal == "SIGINT" for s in shots) == 10
    delays = sorted(s.delay for s in shots)
    assert all(i * 0.6 <= d <= (i + 1) * 0.6 for i, d in enumerate(delays))  # one per slice of [0, 12]
    for sig in ("SIGINT", "SIGKILL"):  # each signal over the whole span
        mine = [s.delay for s in shots if s.signal == sig]
        assert min(mine) < 1.2 and max(mine) > 10.8
    assert sorted(s.signal for s in plan(1, 3, 5.0)).count("SIGINT") in (1, 2)


def test_phase_of_the_last_line() -> None:
    assert phase_of("") == "start"
    assert phase_of("[   0.0s] local drill in network namespaces -> /tmp/x") == "bring-up"
    assert phase_of("[   0.5s] network-sync: FEC gateways up") == "bring-up"
    assert phase_of("[   2.8s] network-sync: testers running until the disaster:  2.0/3.0 s (276 KiB of ledger)") == "run"
    assert phase_of("[   3.9s] network-sync: primary site: power cut at the instant (3 processes frozen)") == "disaster"
    assert phase_of("[   5.2s] network-sync: mirror listing recovered: 1388 records") == "check"
    assert phase_of("[   5.9s] network-sync: checked: ok (durable): attempted=1391") == "teardown"
    assert phase_of("network-sync   1387     0        0           0          1") == "end"
    assert phase_of("verdict: ok   (result: /tmp/x/result.json)") == "end"
    assert phase_of("[   2.0s] up: bridges: smfs-primary 198.19.1.1/24") == "bring-up"
    assert phase_of("[  90.0s] tearing down the testbed (--keep keeps it)") == "teardown"
    assert phase_of("waiting for the testbed: ./inv drill (pid 1) holds x") == "waiting-for-lock"


def _ns(name: str, mark: str = "") -> dict[str, str]:
    return {"name": name, "mark": mark}


def test_compare_sorts_leaks_from_others() -> None:
    base = {"netns": [_ns("keep"), _ns("smfs-old", "smfs-testbed:2222222222222222")], "processes": []}
    proc = {"name": "10", "start": "1", "cmd": "python -m smfs.site primary", "tag": "", "cache": "/other",
            "domain": "", "domain_mark": ""}
    after = {"netns": [_ns("smfs-1-wan", OURS.mark), _ns("smfs-2-wan"), _ns("smfs-3-wan", "smfs-testbed:2222222222222222"),
                       _ns("plain")],
             "processes": [proc, proc | {"name": "11", "tag": "tag1"}, proc | {"name": "12", "cache": "/cache"}]}
    found = compare(base, after, OURS)
    assert {i["line"].split(" (")[0] for i in found["leaks"]} == {
        "netns smfs-1-wan", "netns smfs-2-wan", "processes 11", "processes 12"}
    assert {i["line"].split(" (")[0] for i in found["appeared"]} == {"netns smfs-3-wan", "netns plain", "processes 10"}
    assert [i["entry"]["name"] for i in found["touched"]] == ["keep"]
    assert [i["entry"]["name"] for i in found["vanished"]] == ["smfs-old"]


def test_a_ctrl_c_is_held_until_the_block_is_done() -> None:
    """testbed.netns.bed names a namespace inside this block: a Ctrl-C must not cut it in two."""
    import os
    import signal
    import time

    import pytest

    from testbed.netns.bed import _sigint_deferred

    done = []
    with pytest.raises(KeyboardInterrupt):
        with _sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            done.append(True)
    assert done == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
