"""Frame codec: round trips at any split, and every malformed input is a ProtocolError."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smfs.wire import HEADER_SIZE, MAX_PAYLOAD, FrameDecoder, FrameType, ProtocolError, encode


def _stream() -> tuple[bytes, list[tuple[int, int, bytes]]]:
    items = [(1, 0, b"a" * 10), (2, 5, b""), (1, 1, bytes(range(256)) * 3)]
    return b"".join(encode(FrameType.MIRROR, lg, sq, p) for lg, sq, p in items), items


@given(st.lists(st.integers(min_value=1, max_value=50), max_size=40))
def test_any_split_decodes_the_same(cuts: list[int]) -> None:
    data, items = _stream()
    dec = FrameDecoder()
    frames, pos = [], 0
    for n in cuts:
        frames += dec.feed(data[pos : pos + n])
        pos += n
    frames += dec.feed(data[pos:])
    assert [(f.log, f.seq, f.payload) for f in frames] == items
    assert frames[-1].end == len(data) == dec.offset
    assert dec.pending == 0


def test_end_offsets_are_stream_positions() -> None:
    data, items = _stream()
    frames = FrameDecoder().feed(data)
    ends = [f.end for f in frames]
    sizes = [HEADER_SIZE + len(p) for _, _, p in items]
    assert ends == [sum(sizes[: i + 1]) for i in range(len(sizes))]


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda b: b"XX" + b[2:], "bad magic"),
        (lambda b: b[:2] + b"\x09" + b[3:], "version"),
        (lambda b: b[:3] + b"\x63" + b[4:], "unknown frame type"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "checksum"),
    ],
)
def test_malformed_frames_raise(mutate, reason: str) -> None:
    good = encode(FrameType.MIRROR, 3, 4, b"payload")
    with pytest.raises(ProtocolError, match=reason):
        FrameDecoder().feed(mutate(good))


def test_oversize_length_is_rejected_before_buffering() -> None:
    import struct

    header = struct.pack("!2sBBIQII", b"SM", 1, FrameType.MIRROR, 0, 0, MAX_PAYLOAD + 1, 0)
    with pytest.raises(ProtocolError, match="exceeds"):
        FrameDecoder().feed(header)


def test_disallowed_type_is_rejected() -> None:
    dec = FrameDecoder(allowed=frozenset({FrameType.APPEND}))
    with pytest.raises(ProtocolError, match="not allowed"):
        dec.feed(encode(FrameType.MACK, 0, 10))


def test_truncated_frame_waits_for_more() -> None:
    good = encode(FrameType.APPEND, 1, 2, b"x" * 100)
    dec = FrameDecoder()
    assert dec.feed(good[:-1]) == []
    assert dec.offset == 0
    [frame] = dec.feed(good[-1:])
    assert frame.payload == b"x" * 100
