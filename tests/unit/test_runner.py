"""The shared drill recipe's pure parts: when a drained mirror is quiet, the drain's bound, and
acks completed after the disaster's instant."""

from __future__ import annotations

from typing import Any

from testbed.drill.runner import Drain, drain_until_quiet, quiet, split_after_instant
from workloads.ledger import LedgerEntry

QUIET = {"wan_backlog": 0, "tcp_rx": 0, "udp_rx": 0, "store_bytes": 100, "gateway_in": 7}


def test_quiet_needs_empty_queues_and_nothing_growing() -> None:
    assert quiet(QUIET, QUIET)
    assert not quiet(QUIET, QUIET | {"wan_backlog": 3}), "packets still in the WAN's queue"
    assert not quiet(QUIET, QUIET | {"tcp_rx": 1}), "bytes the mirror servers have not read"
    assert not quiet(QUIET, QUIET | {"udp_rx": 1400}), "datagrams the gateway has not read"
    assert not quiet(QUIET, QUIET | {"store_bytes": 101}), "the stores still grow"
    assert not quiet(QUIET, QUIET | {"gateway_in": 8}), "the gateway still receives"
    assert quiet(QUIET, QUIET | {"wan_backlog": None}), "an unreadable point does not count"
    assert not quiet(QUIET, {"store_bytes": 100}), "a probe with no queue proves nothing"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_drain_waits_until_the_wan_queue_empties_then_two_quiet_probes() -> None:
    clock = Clock()
    backlog = [40, 20, 5, 0, 0, 0, 0, 0]
    stored = [0, 10, 20, 30, 30, 30, 30, 30]

    def probe() -> dict[str, Any]:
        i = min(int(clock.now / 0.5), len(backlog) - 1)
        return QUIET | {"wan_backlog": backlog[i], "store_bytes": stored[i]}

    d = drain_until_quiet(probe, timeout=30, clock=clock, sleep=clock.sleep)
    # Quiet from 1.5 s on (queue empty, stores no longer growing); two quiet comparisons later: 2.5 s.
    assert d.quiet and d.seconds == 2.5 and d.probes == 6, d
    assert d.last["wan_backlog"] == 0 and d.last["store_bytes"] == 30


def test_a_drain_that_hits_its_bound_says_what_was_busy() -> None:
    clock = Clock()
    d = drain_until_quiet(lambda: QUIET | {"tcp_rx": 4096}, timeout=3, clock=clock, sleep=clock.sleep)
    assert isinstance(d, Drain) and not d.quiet and d.seconds >= 3
    assert "not quiet after 3 s" in d.reason and "tcp_rx" in d.reason


def _ack(seq: int, t_complete: float | None, outcome: str = "ok") -> LedgerEntry:
    return LedgerEntry(tester=0, log=0, seq=seq, size=1, digest="0" * 32, t_invoke=t_complete - 0.1 if t_complete else 1.0,
                       t_complete=t_complete, outcome=outcome)


def test_acks_after_the_instant_are_drill_faults_and_not_counted() -> None:
    entries = [_ack(0, 100.0), _ack(1, 100.9), _ack(2, 101.3), _ack(3, None, "info")]
    # The guest's clock runs 0.5 s ahead of the host's, measured to ±0.1 s; the instant is host 100.5.
    late, kept = split_after_instant(entries, 100.5, {"offset_s": 0.5, "uncertainty_s": 0.1})
    assert [e.seq for e in late] == [2]
    assert [str(e.outcome) for e in kept] == ["ok", "ok", "info", "info"]
    assert kept[2].t_complete is None
    assert split_after_instant(entries, None, None) == ([], entries)
