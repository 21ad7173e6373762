"""Random bytes against every parser of the verdict's inputs: the storage frame decoder, the ledger's
lines, the mirror listing and the wire check's pcap and ack traces. Each must return a value or raise
its own one-line error: never another exception, never a hang (hypothesis, bounded examples)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smfs.wire import HEADER, MAGIC, VERSION, FrameDecoder, FrameType, ProtocolError, encode
from testbed.drill import wirecheck
from workloads.checker import CheckError, check
from workloads.ledger import LedgerEntry, LedgerError

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=25,
)


@FAST
@given(chunks=st.lists(st.binary(max_size=200), max_size=8))
def test_frame_decoder_on_random_bytes_frames_or_protocol_error(chunks: list[bytes]) -> None:
    dec = FrameDecoder()
    try:
        for chunk in chunks:
            for frame in dec.feed(chunk):
                assert isinstance(frame.ftype, FrameType)
    except ProtocolError as err:
        assert "\n" not in str(err)
    assert dec.pending <= sum(map(len, chunks))


@FAST
@given(flip=st.integers(min_value=0, max_value=10_000), value=st.integers(min_value=0, max_value=255),
       cut=st.integers(min_value=0, max_value=200))
def test_frame_decoder_on_mutated_frames(flip: int, value: int, cut: int) -> None:
    good = b"".join(encode(FrameType.APPEND, log, seq, bytes(range(seq % 50))) for log, seq in ((1, 0), (2, 7), (3, 49)))
    data = bytearray(good)
    data[flip % len(data)] = value
    dec = FrameDecoder()
    try:
        frames = dec.feed(bytes(data[: len(data) - cut]))
    except ProtocolError:
        return
    assert len(frames) <= 3  # a mutation never makes more frames than were written


def test_a_huge_length_is_refused_not_allocated() -> None:
    head = HEADER.pack(MAGIC, VERSION, FrameType.APPEND, 1, 0, (1 << 32) - 1, 0)
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(head)


@FAST
@given(line=st.binary(max_size=300) | _json.map(lambda v: json.dumps(v).encode()))
def test_ledger_lines_parse_or_raise_a_ledger_error(line: bytes) -> None:
    try:
        entry = LedgerEntry.from_json(line)
    except LedgerError as err:
        assert "\n" not in str(err)
    else:
        assert entry.size >= 0 and entry.seq >= 0


@FAST
@given(listing=_json)
def test_a_random_listing_is_checked_or_refused(listing: object) -> None:
    try:
        res = check([], listing if isinstance(listing, dict) else {"logs": listing}, durable=True)
    except CheckError as err:
        assert "\n" not in str(err)
    else:
        assert res.lost == 0 and res.acked == 0


@FAST
@given(data=st.binary(max_size=400))
def test_pcap_reader_and_tunnel_parser_on_random_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "x.pcap"
    path.write_bytes(struct.pack("=IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1) + data)
    timeline = wirecheck.replay(wirecheck.read_pcap(path))  # random records: replayed or skipped, never a crash
    assert timeline.data + timeline.repairs <= len(data) // 16 + 1
    with pytest.raises(wirecheck.WireError, match="y.pcap"):
        next(wirecheck.read_pcap(tmp_path / "y.pcap"))


@FAST
@given(frame=st.binary(max_size=200), site=st.integers(min_value=0, max_value=255))
def test_tunnel_parser_never_raises(frame: bytes, site: int) -> None:
    got = wirecheck.parse_tunnel(frame, site)
    assert got is None or isinstance(got, tuple)


@FAST
@given(text=st.text(max_size=300))
def test_ack_traces_parse_or_raise_a_wire_error(text: str) -> None:
    try:
        acks = wirecheck.read_ack_trace(text)
    except wirecheck.WireError as err:
        assert "\n" not in str(err)
    else:
        assert all(isinstance(a.end, int) and isinstance(a.t, float) for a in acks)
