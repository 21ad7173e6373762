"""The ack policy of each mode, in memory: when an append may return to the client."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from smfs.acks import AckTracker, SequenceRejected
from smfs.modes import MODES, parse_mode, parse_modes
from smfs.wire import HEADER_SIZE


def _submit(t: AckTracker, n: int, size: int = 100) -> list:
    return [t.submit(f"c{i}", i, 0, size) for i in range(n)]


@pytest.mark.parametrize("mode, kind", [("local-sync", "handoff"), ("remote-sync", "mirror"), ("network-sync", "network")])
def test_ack_needs_local_write_and_the_modes_condition(mode: str, kind: str) -> None:
    t = AckTracker(MODES[mode])
    items = _submit(t, 3)
    assert items[0].end == HEADER_SIZE + 100
    # The other conditions never suffice.
    for other in {"handoff", "mirror", "network"} - {kind}:
        assert t.advance(other, t.assigned) == []
    assert t.local_written(items) == []
    done = t.advance(kind, items[1].end)
    assert [d.client for d in done] == ["c0", "c1"]
    assert t.pending() == 1
    assert [d.client for d in t.advance(kind, items[2].end)] == ["c2"]


def test_remote_condition_first_then_local_write() -> None:
    t = AckTracker(MODES["remote-sync"])
    items = _submit(t, 2)
    assert t.advance("mirror", t.assigned) == []
    assert [d.client for d in t.local_written(items[:1])] == ["c0"]
    assert [d.client for d in t.local_written(items[1:])] == ["c1"]


def test_partial_coverage_of_a_frame_does_not_ack_it() -> None:
    t = AckTracker(MODES["network-sync"])
    [item] = _submit(t, 1)
    t.local_written([item])
    assert t.advance("network", item.end - 1) == []
    assert len(t.advance("network", item.end)) == 1


def test_offsets_never_go_back_and_never_pass_the_stream_end() -> None:
    t = AckTracker(MODES["remote-sync"])
    items = _submit(t, 2)
    t.local_written(items)
    t.advance("mirror", items[1].end)
    t.advance("mirror", 5)
    assert t.offsets["mirror"] == items[1].end
    with pytest.raises(ValueError):
        t.advance("mirror", t.assigned + 1)


def test_sequence_must_be_next_of_its_log() -> None:
    t = AckTracker(MODES["local-sync"], next_seq={7: 3})
    with pytest.raises(SequenceRejected):
        t.submit("c", 7, 0, 10)
    t.submit("c", 7, 3, 10)
    with pytest.raises(SequenceRejected):
        t.submit("c", 7, 3, 10)  # a duplicate is refused, nothing assigned
    assert t.assigned == HEADER_SIZE + 10


def test_fail_all_returns_pending_and_marks_failed() -> None:
    t = AckTracker(MODES["remote-sync"])
    items = _submit(t, 2)
    failed = t.fail_all()
    assert failed == items and t.failed and t.pending() == 0


def test_mode_parsing() -> None:
    assert [m.name for m in parse_modes("all")] == list(MODES)
    assert parse_mode("network-sync").durable and not parse_mode("local-sync+fec").durable
    with pytest.raises(ValueError, match="mode: unknown mode 'fast'"):
        parse_mode("fast")


# -- seeded defects (smfs.defects): each breaks the policy only when SMFS_DEFECT names it --------


@pytest.mark.parametrize("mode", ["remote-sync", "remote-sync+fec"])
@pytest.mark.parametrize("seeded", [False, True])
def test_remote_sync_acks_at_handoff_only_with_the_seeded_defect(
    mode: str, seeded: bool, seed_defect: Callable[[str], None]
) -> None:
    if seeded:
        seed_defect("remote-sync-acks-at-handoff")
    t = AckTracker(MODES[mode])
    items = _submit(t, 2)
    t.local_written(items)
    handed = [d.client for d in t.advance("handoff", t.assigned)]
    assert handed == (["c0", "c1"] if seeded else [])
    if not seeded:
        assert [d.client for d in t.advance("mirror", t.assigned)] == ["c0", "c1"]


@pytest.mark.parametrize("mode", ["local-sync", "network-sync"])
def test_the_handoff_defect_leaves_the_other_modes_alone(mode: str, seed_defect: Callable[[str], None]) -> None:
    seed_defect("remote-sync-acks-at-handoff")
    t = AckTracker(MODES[mode])
    items = _submit(t, 1)
    t.local_written(items)
    kind = MODES[mode].ack_on
    assert len(t.advance(kind, t.assigned)) == 1


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("seeded", [False, True])
def test_acks_before_the_local_write_only_with_the_seeded_defect(
    mode: str, seeded: bool, seed_defect: Callable[[str], None]
) -> None:
    if seeded:
        seed_defect("primary-acks-before-local-write")
    t = AckTracker(MODES[mode])
    items = _submit(t, 2)
    remote = [d.client for d in t.advance(MODES[mode].ack_on, t.assigned)]  # not written locally yet
    assert remote == (["c0", "c1"] if seeded else [])
    assert [d.client for d in t.local_written(items)] == ([] if seeded else ["c0", "c1"])
    assert t.pending() == 0


def test_what_the_network_condition_waits_for_is_the_oldest_uncovered_end() -> None:
    """The offset a network-sync server subscribes for (smfs.callbacks' ``want``): the end of its oldest
    append the callbacks do not cover yet, past one covered but not yet written locally; none when
    nothing waits."""
    t = AckTracker(MODES["network-sync"])
    assert t.waiting_for("network") is None
    items = _submit(t, 3)
    assert t.waiting_for("network") == items[0].end
    assert t.advance("network", items[0].end) == []  # covered, not written locally: still pending
    assert t.waiting_for("network") == items[1].end
    t.local_written(items)
    t.advance("network", items[2].end)
    assert t.pending() == 0 and t.waiting_for("network") is None
