"""Tunnel datagrams: round trips, every rejection reason, hostile bytes, the replay window."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smfs import tunnel
from smfs.fec import Repair
from smfs.tunnel import (
    DataMsg,
    RepairMsg,
    ReplayWindow,
    TunnelError,
    decode,
    encode_data,
    encode_repair,
)

KEY = b"k" * 32
REPAIR = Repair(2, (100, 119, 138), (40, 1400, 7), bytes(range(256)) * 5 + bytes(120))
FUZZ = settings(max_examples=300, deadline=None)


def signed(body: bytes, key: bytes = KEY) -> bytes:
    """``body`` with a valid MAC: reaches the parser past the authentication."""
    return body + tunnel._mac(key, body)


def head(kind: int, site: int = 1) -> bytes:
    return bytes((tunnel.MAGIC, tunnel.VERSION, kind, site))


def test_data_round_trip() -> None:
    pkt = bytes(range(60))
    msg = decode(encode_data(2**64 - 1, pkt, site=3, key=KEY), KEY, expect_site=3)
    assert msg == DataMsg(3, 2**64 - 1, pkt)


def test_repair_round_trip() -> None:
    msg = decode(encode_repair(REPAIR, site=1, key=KEY), KEY)
    assert msg == RepairMsg(1, REPAIR)


def test_datagram_sizes() -> None:
    assert len(encode_data(1, b"x" * 1400, 0, KEY)) == 1400 + 4 + 8 + 16
    assert len(encode_repair(REPAIR, 0, KEY)) == 4 + 10 + 2 * 4 + 3 * 2 + 1400 + 16


def reason(datagram: bytes, key: bytes = KEY, **kw: int) -> str:
    with pytest.raises(TunnelError) as exc:
        decode(datagram, key, **kw)
    return exc.value.reason


def test_every_rejection_reason() -> None:
    good = encode_data(7, b"payload", 1, KEY)
    assert reason(good[:19]) == "short"
    assert reason(b"\xa7" * 70000) == "oversize"
    assert reason(b"\x00" + good[1:]) == "bad magic"
    assert reason(good[:1] + b"\x09" + good[2:]) == "bad version"
    assert reason(good[:-1] + bytes([good[-1] ^ 1])) == "bad mac"
    assert reason(good, key=b"other key of 16+ bytes") == "bad mac"
    assert reason(good, expect_site=2) == "foreign site"
    assert reason(signed(head(9) + bytes(12))) == "bad kind"
    assert reason(signed(head(1) + struct.pack("!Q", 7))) == "malformed lengths"  # no packet
    assert reason(signed(head(2) + bytes(3))) == "malformed lengths"  # repair header
    assert reason(signed(head(2) + struct.pack("!BBQ", 0, 0, 5))) == "malformed lengths"  # 0 packets
    assert reason(signed(head(2) + struct.pack("!BBQ", 0, 65, 5))) == "malformed lengths"  # r > 64
    table = struct.pack("!BBQIH H", 0, 2, 5, 3, 10, 20)
    assert decode(signed(head(2) + table + bytes(20)), KEY).repair.seqs == (5, 8)
    assert reason(signed(head(2) + table + bytes(19))) == "malformed lengths"  # xor too short
    assert (
        reason(signed(head(2) + struct.pack("!BBQIHH", 0, 2, 5, 0, 10, 20) + bytes(20)))
        == "malformed lengths"
    )
    assert (
        reason(signed(head(2) + struct.pack("!BBQIHH", 0, 2, 2**64 - 2, 3, 1, 1) + bytes(1)))
        == "malformed lengths"
    )
    assert (
        reason(signed(head(2) + struct.pack("!BBQIHH", 0, 2, 5, 3, 0, 1) + bytes(1))) == "malformed lengths"
    )


def test_encode_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="site"):
        encode_data(1, b"x", 256, KEY)
    with pytest.raises(ValueError, match="seq"):
        encode_data(-1, b"x", 0, KEY)
    with pytest.raises(ValueError, match="length"):
        encode_data(1, b"", 0, KEY)
    with pytest.raises(ValueError, match="key"):
        encode_data(1, b"x", 0, b"short")
    with pytest.raises(ValueError):
        encode_repair(Repair(0, (0, 2**33), (1, 1), b"x"), 0, KEY)


@given(st.binary(max_size=3000))
@FUZZ
def test_arbitrary_bytes_only_raise_tunnel_error(data: bytes) -> None:
    with pytest.raises(TunnelError):
        decode(data, KEY)


@given(kind=st.sampled_from([1, 2, 3]), body=st.binary(max_size=600))
@FUZZ
def test_authenticated_garbage_never_raises_anything_else(kind: int, body: bytes) -> None:
    """Bodies with a valid MAC exercise the parser itself: a message or a TunnelError."""
    try:
        msg = decode(signed(head(kind) + body), KEY)
    except TunnelError:
        return
    assert isinstance(msg, DataMsg | RepairMsg)


@given(
    which=st.sampled_from(["data", "repair"]),
    cut=st.integers(0, 2000),
    flips=st.lists(st.integers(0, 8 * 2000), min_size=1, max_size=4),
)
@FUZZ
def test_truncations_and_bit_flips_are_rejected(which: str, cut: int, flips: list[int]) -> None:
    good = encode_data(42, bytes(range(200)), 1, KEY) if which == "data" else encode_repair(REPAIR, 1, KEY)
    if cut < len(good):
        with pytest.raises(TunnelError):
            decode(good[:cut], KEY)
    bad = bytearray(good)
    for bit in flips:
        bad[(bit // 8) % len(bad)] ^= 1 << (bit % 8)
    if bytes(bad) != good:
        with pytest.raises(TunnelError):
            decode(bytes(bad), KEY)


def test_replay_window() -> None:
    w = ReplayWindow(size=64)
    assert w.check_and_update(10)
    assert not w.check_and_update(10)
    assert w.check_and_update(8) and w.check_and_update(12)
    assert not w.check(8) and w.check(9) and w.check(11)
    assert w.top == 12
    assert w.check_and_update(12 + 63)
    assert not w.check(11)  # now older than the window
    assert w.check(13) and not w.check(12)
    assert w.check_and_update(10**15)  # a jump far ahead clears the bitmap
    assert not w.check(12 + 63) and not w.check_and_update(10**15)
    assert w.check_and_update(10**15 - 63) and not w.check(10**15 - 64)
    with pytest.raises(ValueError):
        ReplayWindow(size=8)


@given(st.lists(st.integers(0, 300), max_size=200))
@settings(max_examples=100, deadline=None)
def test_replay_window_matches_a_set(seqs: list[int]) -> None:
    """Each seq is accepted at most once; a new seq is refused only when older than the window."""
    w, seen, top = ReplayWindow(size=64), set(), -1
    for s in seqs:
        ok = w.check_and_update(s)
        expect = s not in seen and s > top - 64
        assert ok == expect
        if ok:
            seen.add(s)
            top = max(top, s)


def test_replay_window_tells_a_late_original_of_a_rebuilt_seq_from_a_replay() -> None:
    w = ReplayWindow(size=64)
    for s in (10, 11, 13):
        assert w.check_and_update(s)
    w.mark_rebuilt(12)  # lost on the WAN, rebuilt by the decoder
    w.mark_rebuilt(14)  # rebuilt ahead of the highest seq received
    assert w.top == 14 and not w.check(12) and not w.check(14)
    assert w.late_after_rebuild(12)  # the original, late: not a replay
    assert not w.late_after_rebuild(12)  # a second copy is one
    assert not w.late_after_rebuild(11)  # received, never rebuilt: a replay
    assert w.late_after_rebuild(14)


def test_replay_window_forgets_rebuilt_seqs_with_the_window() -> None:
    w = ReplayWindow(size=64)
    for s in range(0, 10_000, 2):
        w.update(s + 1)
        w.mark_rebuilt(s)
    assert len(w._rebuilt) <= 2 * 64  # bounded by the window, not by the traffic
    assert w.late_after_rebuild(9_998) and not w.check(9_998)


@given(st.lists(st.tuples(st.integers(0, 300), st.booleans()), max_size=200))
@settings(max_examples=100, deadline=None)
def test_late_after_rebuild_matches_a_model(events: list[tuple[int, bool]]) -> None:
    """Each seq is taken once; a refused seq is a late original exactly once if it was rebuilt
    (and not since received), within the window."""
    w, seen, rebuilt, top = ReplayWindow(size=64), set(), set(), -1
    for s, rebuild in events:
        if rebuild:
            if w.check(s):
                w.mark_rebuilt(s)
                seen.add(s)
                rebuilt.add(s)
                top = max(top, s)
            continue
        if w.check_and_update(s):
            assert s not in seen and s > top - 64
            seen.add(s)
            top = max(top, s)
        elif s > top - 64:
            assert w.late_after_rebuild(s) == (s in rebuilt)
            rebuilt.discard(s)
