"""Network-level callbacks in memory: TCP parsing, safe offsets, retransmissions, flush timer."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smfs.callbacks import (
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    CallbackError,
    Flow,
    FlowTracker,
    decode_callback,
    decode_subscribe,
    encode_callback,
    encode_subscribe,
    parse_tcp,
    unwrap32,
)
from smfs.fec import Encoder, FecParams, Repair

SRC, DST = "10.0.1.2", "10.0.2.2"
FLOW = Flow(SRC, 40000, DST, 7000)
ISN = 1000


def tcp(
    seq: int,
    payload: int | bytes = 0,
    flags: int = TCP_ACK,
    flow: Flow = FLOW,
    options: bytes = b"",
    proto: int = 6,
    frag: int = 0x4000,
    trailer: bytes = b"",
) -> bytes:
    """An IPv4/TCP packet (checksums zero: the tracker does not check them)."""
    data = bytes(payload) if isinstance(payload, int) else payload
    tcp_hdr = (
        struct.pack(
            "!HHIIHHHH",
            flow.sport,
            flow.dport,
            seq % 2**32,
            0,
            ((20 + len(options)) // 4) << 12 | flags,
            65535,
            0,
            0,
        )
        + options
    )
    total = 20 + len(tcp_hdr) + len(data)
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        total,
        1,
        frag,
        64,
        proto,
        0,
        socket.inet_aton(flow.src),
        socket.inet_aton(flow.dst),
    )
    return ip + tcp_hdr + data + trailer


def all_layers(*seqs: int, c: int = 3) -> list[Repair]:
    """One repair per layer covering ``seqs``, as an encoder would eventually send."""
    lens = tuple(1 for _ in seqs)
    return [Repair(layer, tuple(seqs), lens, b"\0") for layer in range(c)]


# -- parsing ------------------------------------------------------------------------------------


def test_parse_tcp() -> None:
    seg = parse_tcp(tcp(ISN + 1, 100, TCP_ACK | 0x08, options=b"\x01" * 12, trailer=b"\0" * 6))
    assert seg is not None
    assert (seg.src, seg.dst, seg.sport, seg.dport, seg.seq) == (SRC, DST, 40000, 7000, ISN + 1)
    assert seg.payload_len == 100 and seg.flow == FLOW
    assert not (seg.syn or seg.fin or seg.rst)
    assert parse_tcp(tcp(ISN, flags=TCP_SYN)).syn


@pytest.mark.parametrize(
    "packet",
    [
        tcp(1, 10, proto=17),  # UDP
        tcp(1, 10, frag=0x2000),  # first fragment (MF)
        tcp(1, 10, frag=0x0010),  # later fragment
        tcp(1, 10)[:39],  # truncated headers
        tcp(1, 10)[:-1],  # shorter than the IP total length
        b"\x60" + tcp(1, 10)[1:],  # IPv6 version nibble
        b"\x44" + tcp(1, 10)[1:],  # IHL 16 bytes
        tcp(1, 10)[:32] + b"\x40" + tcp(1, 10)[33:],  # TCP data offset 16 bytes
        tcp(1, 10)[:32] + b"\xf0" + tcp(1, 10)[33:],  # TCP data offset beyond the packet
        b"",
    ],
)
def test_parse_tcp_rejects(packet: bytes) -> None:
    assert parse_tcp(packet) is None


@given(st.binary(max_size=120))
@settings(max_examples=300, deadline=None)
def test_parse_tcp_never_raises(data: bytes) -> None:
    seg = parse_tcp(data)
    assert seg is None or seg.payload_len >= 0


def test_unwrap32() -> None:
    assert unwrap32(5, 0) == 5
    assert unwrap32(2**32 - 1, 0) == -1
    assert unwrap32(10, 2**32 - 5) == 2**32 + 10
    assert unwrap32(2**32 - 5, 2**32 + 10) == 2**32 - 5
    assert unwrap32(7, 5 * 2**32 + 2**31 + 10) == 6 * 2**32 + 7
    assert unwrap32(7, 5 * 2**32 + 2**31 - 10) == 5 * 2**32 + 7
    assert unwrap32(2**31 + 7, 5 * 2**32 + 2**31) == 5 * 2**32 + 2**31 + 7


# -- tracker ------------------------------------------------------------------------------------


def started(isn: int = ISN, c: int = 3) -> FlowTracker:
    t = FlowTracker(c=c)
    t.on_packet_sent(0, tcp(isn, flags=TCP_SYN))
    return t


def test_segment_is_safe_only_when_every_layer_is_sent() -> None:
    t = started()
    t.on_packet_sent(1, tcp(ISN + 1, 1000))
    t.on_repairs_sent(all_layers(1)[:2])
    assert t.safe_offsets() == [] and t.safe_offset(FLOW) == 0
    t.on_repairs_sent(all_layers(1)[:2])  # the same layers again change nothing
    assert t.safe_offsets() == []
    t.on_repairs_sent(all_layers(1)[2:])
    assert t.safe_offsets() == [(FLOW, 1000)]
    assert t.safe_offsets() == [] and t.pending == 0


def test_contiguous_from_zero_across_holes() -> None:
    t = started()
    for i in range(4):
        t.on_packet_sent(10 + i, tcp(ISN + 1 + 100 * i, 100))
    t.on_repairs_sent(all_layers(11, 13))
    assert t.safe_offsets() == []
    t.on_repairs_sent(all_layers(10))
    assert t.safe_offsets() == [(FLOW, 200)]
    t.on_repairs_sent(all_layers(12))
    assert t.safe_offsets() == [(FLOW, 400)]


def test_pure_acks_and_unknown_flows_are_ignored() -> None:
    t = started()
    t.on_packet_sent(1, tcp(ISN + 1, 0))
    other = Flow(SRC, 40001, DST, 7000)
    t.on_packet_sent(2, tcp(5, 100, flow=other))  # no SYN seen: ignored
    t.on_packet_sent(3, b"\x45" + bytes(30))  # not TCP at all
    assert t.pending == 0 and t.ignored == 1 and t.flows == 1
    t.on_repairs_sent(all_layers(1, 2, 3))
    assert t.safe_offsets() == []


def test_retransmissions_count_once() -> None:
    t = started()
    t.on_packet_sent(1, tcp(ISN + 1, 500))
    t.on_packet_sent(2, tcp(ISN + 501, 500))
    t.on_repairs_sent(all_layers(1, 2))
    assert t.safe_offsets() == [(FLOW, 1000)]
    t.on_packet_sent(3, tcp(ISN + 1, 1000))  # retransmission of safe bytes: nothing to do
    assert t.pending == 0
    t.on_packet_sent(4, tcp(ISN + 801, 400))  # overlaps safe bytes, extends them
    t.on_packet_sent(5, tcp(ISN + 1001, 200))  # retransmission overlapping the previous
    t.on_repairs_sent(all_layers(5))
    assert t.safe_offsets() == [(FLOW, 1200)]
    t.on_repairs_sent(all_layers(4))
    assert t.safe_offsets() == []  # [800, 1200) adds nothing beyond 1200
    assert t.safe_offset(FLOW) == 1200


def test_retransmission_fills_a_hole_whose_original_never_became_safe() -> None:
    """The original of [0, 100) went out in tunnel packet 1 whose repairs were never sent
    (the gateway failed to send them): its retransmission in packet 9 fills the hole."""
    t = started()
    t.on_packet_sent(1, tcp(ISN + 1, 100))
    t.on_packet_sent(2, tcp(ISN + 101, 100))
    t.on_repairs_sent(all_layers(2))
    assert t.safe_offsets() == []
    t.on_packet_sent(9, tcp(ISN + 1, 100))
    t.on_repairs_sent(all_layers(9))
    assert t.safe_offsets() == [(FLOW, 200)]


def test_sequence_number_wrap_around() -> None:
    isn = 2**32 - 150
    t = started(isn)
    for i in range(5):  # TCP seq wraps at the third segment
        t.on_packet_sent(1 + i, tcp(isn + 1 + 100 * i, 100))
    t.on_repairs_sent(all_layers(1, 2, 3, 4, 5))
    assert t.safe_offsets() == [(FLOW, 500)]


def test_offsets_beyond_four_gib() -> None:
    """Stream offsets are 64-bit: one-byte segments 64 KiB apart (as if the bytes between
    went by unseen) unwrap past 2**32 without ambiguity."""
    t = started(isn=7)
    size = 65536
    n = (2**32 // size) + 10
    for i in range(n):
        t.on_packet_sent(1 + i, tcp(7 + 1 + size * i, b"x"))
    st = t._flows[FLOW]
    assert st.ref == size * (n - 1) + 1 and st.ref > 2**32


def test_fin_ends_the_flow_after_its_bytes_are_safe() -> None:
    t = started()
    t.on_packet_sent(1, tcp(ISN + 1, 300))
    t.on_packet_sent(2, tcp(ISN + 301, 200, flags=TCP_ACK | TCP_FIN))
    t.on_repairs_sent(all_layers(1))
    assert t.safe_offsets() == [(FLOW, 300)] and t.flows == 1
    t.on_repairs_sent(all_layers(2))
    assert t.safe_offsets() == [(FLOW, 500)]
    assert t.flows == 0 and t.safe_offset(FLOW) is None
    t.on_packet_sent(3, tcp(ISN + 1, 500))  # a late retransmission: no state comes back
    assert t.flows == 0 and t.pending == 0


def test_rst_drops_the_flow_and_a_new_syn_starts_afresh() -> None:
    t = started()
    t.on_packet_sent(1, tcp(ISN + 1, 100))
    t.on_repairs_sent(all_layers(1))
    t.on_packet_sent(2, tcp(ISN + 101, 100))
    t.on_packet_sent(3, tcp(ISN + 101, 0, flags=TCP_RST))
    assert t.safe_offsets() == [(FLOW, 100)] and t.flows == 0
    t.on_repairs_sent(all_layers(2))
    assert t.safe_offsets() == []
    t.on_packet_sent(4, tcp(5000, flags=TCP_SYN))  # same 4-tuple, new connection
    t.on_packet_sent(5, tcp(5001, 10))
    t.on_repairs_sent(all_layers(5))
    assert t.safe_offsets() == [(FLOW, 10)]


def test_flows_are_bounded() -> None:
    t = FlowTracker(max_flows=3)
    for port in range(10):
        t.on_packet_sent(port, tcp(1, flags=TCP_SYN, flow=Flow(SRC, port, DST, 7000)))
    assert t.flows == 3


# -- with the real encoder and its flush timer ------------------------------------------------


def test_single_small_segment_is_safe_once_the_timer_flushes() -> None:
    """An append of 64 bytes and nothing else: the callback comes from the flush timer, one
    flush delay (5 ms) after the packet was sent, not after unrelated traffic."""
    enc, t = Encoder(), FlowTracker()
    syn = tcp(ISN, flags=TCP_SYN)
    t.on_packet_sent(0, syn, now=0.0)
    t.on_repairs_sent(enc.add(0, syn, 0.0), now=0.0)
    t.on_repairs_sent(enc.handle_timer(enc.get_timer()), now=0.005)
    seg = tcp(ISN + 1, 64)
    t.on_packet_sent(1, seg, now=1.0)
    t.on_repairs_sent(enc.add(1, seg, 1.0), now=1.0)
    assert t.safe_offsets() == []
    deadline = enc.get_timer()
    assert deadline == pytest.approx(1.005)
    t.on_repairs_sent(enc.handle_timer(deadline), now=deadline)
    assert t.safe_offsets() == [(FLOW, 64)]
    assert list(t.latencies)[-1] == pytest.approx(0.005)


def test_stream_through_the_encoder_is_reported_in_full() -> None:
    """A 200-segment stream with retransmissions and interleaved unrelated traffic: every
    reported offset increases and the last one is the stream's length."""
    enc, t = Encoder(FecParams()), FlowTracker()
    seq, now, reported = 0, 0.0, []

    def send(pkt: bytes) -> None:
        nonlocal seq, now
        now += 0.0003
        t.on_repairs_sent(enc.handle_timer(now), now=now)
        t.on_packet_sent(seq, pkt, now=now)
        t.on_repairs_sent(enc.add(seq, pkt, now), now=now)
        seq += 1
        reported.extend(off for flow, off in t.safe_offsets() if flow == FLOW)

    send(tcp(ISN, flags=TCP_SYN))
    other = Flow(SRC, 40001, DST, 7000)
    send(tcp(1, flags=TCP_SYN, flow=other))
    for i in range(200):
        send(tcp(ISN + 1 + 1000 * i, 1000))
        if i % 17 == 5:
            send(tcp(ISN + 1 + 1000 * (i - 3), 2000))  # retransmit two earlier segments
        send(tcp(2 + 10 * i, 10, flow=other))
    while enc.get_timer() is not None:
        now = enc.get_timer()
        t.on_repairs_sent(enc.handle_timer(now), now=now)
    reported.extend(off for flow, off in t.safe_offsets() if flow == FLOW)
    assert reported == sorted(set(reported)) and reported[-1] == 200_000
    assert t.pending == 0 and max(t.latencies) <= 0.006


# -- control messages ---------------------------------------------------------------------------


def test_callback_and_subscribe_messages() -> None:
    data = encode_callback(FLOW, 2**40 + 3)
    assert len(data) == 24 and data[:4] == b"SMCB"
    assert data == struct.pack(
        "!4s4sH4sHQ", b"SMCB", socket.inet_aton(SRC), 40000, socket.inet_aton(DST), 7000, 2**40 + 3
    )
    assert decode_callback(data) == (FLOW, 2**40 + 3)
    sub = encode_subscribe(FLOW)
    assert len(sub) == 16 and sub[:4] == b"SMSB" and decode_subscribe(sub) == FLOW
    for bad in (b"", data[:-1], b"XXXX" + data[4:]):
        with pytest.raises(CallbackError):
            decode_callback(bad)
    for bad in (data, b"SMCB" + sub[4:]):
        with pytest.raises(CallbackError):
            decode_subscribe(bad)
    with pytest.raises(ValueError):
        encode_callback(Flow("not-an-ip", 1, DST, 2), 0)


def test_flags_constants() -> None:
    assert (TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK) == (1, 2, 4, 16)
