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
    Announcer,
    CallbackError,
    Flow,
    FlowTracker,
    decode_callback,
    decode_subscribe,
    decode_subscription,
    encode_callback,
    encode_subscribe,
    parse_tcp,
    unwrap32,
)
from smfs.fec import Encoder, FecParams, Repair

SRC, DST = "10.0.1.2", "10.0.2.2"
FLOW = Flow(SRC, 40000, DST, 7000)
ISN = 1000
KEY = bytes(range(32))
NONCE = b"nonce-01"


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


def test_c0_a_segment_is_safe_once_sent() -> None:
    """No FEC (c = 0): no repair to wait for, the bytes are safe as soon as their packet is sent
    (latency 0), in order or not; nothing is left pending, and no timer is needed."""
    enc, t = Encoder(FecParams(c=0, interleaves=())), FlowTracker(c=0)
    assert t.c == 0
    t.on_packet_sent(0, tcp(ISN, flags=TCP_SYN), now=1.0)
    t.on_packet_sent(1, tcp(ISN + 1, 1000), now=1.0)
    assert t.safe_offsets() == [(FLOW, 1000)] and t.pending == 0
    t.on_packet_sent(2, tcp(ISN + 2001, 500), now=1.1)  # beyond a hole: not contiguous yet
    assert t.safe_offsets() == [] and t.safe_offset(FLOW) == 1000
    t.on_packet_sent(3, tcp(ISN + 1001, 1000))  # fills it (no time given: no latency kept)
    assert t.safe_offsets() == [(FLOW, 2500)]
    assert list(t.latencies) == [0.0, 0.0] and t.pending == 0
    assert enc.add(4, b"x", 1.2) == [] and enc.get_timer() is None
    t.on_repairs_sent([Repair(0, (1,), (1,), b"\0")])  # a stray repair changes nothing
    t.on_packet_sent(5, tcp(ISN + 2501, 10, flags=TCP_ACK | TCP_FIN), now=1.3)
    assert t.safe_offsets() == [(FLOW, 2510)] and t.flows == 0  # FIN: all safe, flow done
    with pytest.raises(ValueError, match="c must be"):
        FlowTracker(c=-1)
    with pytest.raises(ValueError, match="c must be"):
        FlowTracker(c=9)


@pytest.mark.parametrize("c", [1, 2, 3])
def test_c_layers_are_all_needed(c: int) -> None:
    t = started(c=c)
    t.on_packet_sent(1, tcp(ISN + 1, 100))
    t.on_repairs_sent(all_layers(1, c=c)[:-1])
    assert t.safe_offsets() == []
    t.on_repairs_sent(all_layers(1, c=c)[-1:])
    assert t.safe_offsets() == [(FLOW, 100)]


# -- announcer: callbacks are re-announced over a lossy channel ---------------------------------

SUB = ("127.0.0.1", 45000)


def _offsets(out: list[tuple[object, bytes]]) -> list[tuple[object, Flow, int]]:
    res = []
    for dest, d in out:
        flow, offset, nonce = decode_callback(d, KEY)
        assert nonce == NONCE
        res.append((dest, flow, offset))
    return res


def test_announcer_sends_at_once_then_re_announces_until_quiet() -> None:
    a = Announcer(KEY, interval=0.05, linger=1.0)
    assert a.get_timer() is None
    assert a.on_subscribe(FLOW, SUB, now=0.0, nonce=NONCE) == []  # nothing safe yet: nothing to say
    assert a.get_timer() is None
    assert _offsets(a.on_safe(FLOW, 100, now=0.01)) == [(SUB, FLOW, 100)]
    assert a.get_timer() == pytest.approx(0.06)
    assert a.handle_timer(0.05) == []  # not due yet
    # Every tick re-sends the latest offset (the first callback may have been lost).
    assert _offsets(a.handle_timer(a.get_timer())) == [(SUB, FLOW, 100)]
    assert a.on_safe(FLOW, 100, now=0.07) == []  # no news: only the tick repeats it
    assert _offsets(a.on_safe(FLOW, 300, now=0.08)) == [(SUB, FLOW, 300)]
    assert a.handle_timer(a.get_timer()) == []  # 300 went out at once since the last tick: not yet
    assert _offsets(a.handle_timer(a.get_timer())) == [(SUB, FLOW, 300)]
    now, resent = a.get_timer(), 0
    while now is not None and now < 10:
        resent += len(a.handle_timer(now))
        now = a.get_timer()
    assert now is None and 18 <= resent <= 21  # ~1 s of 50 ms ticks after the last advance
    assert a.resent == resent + 2


def test_announcer_answers_a_late_or_repeated_subscribe_with_the_current_offset() -> None:
    a = Announcer(KEY)
    assert a.on_safe(FLOW, 500, now=0.0) == []  # no subscriber yet, but the offset is kept
    assert a.get_timer() is None and a.offset(FLOW) == 500
    assert _offsets(a.on_subscribe(FLOW, SUB, now=5.0, nonce=NONCE)) == [(SUB, FLOW, 500)]
    assert _offsets(a.on_subscribe(FLOW, SUB, now=5.1, nonce=NONCE)) == [(SUB, FLOW, 500)]
    other = ("127.0.0.1", 45001)  # the server restarted on another port
    assert _offsets(a.on_subscribe(FLOW, other, now=5.2, nonce=NONCE)) == [(other, FLOW, 500)]
    assert a.subscriber(FLOW) == other
    assert a.handle_timer(5.25) == []  # it had its callback at once, after the ticks started at 5.0
    assert _offsets(a.handle_timer(a.get_timer())) == [(other, FLOW, 500)]


def test_announcer_follows_a_new_connection_on_the_same_4_tuple() -> None:
    a = Announcer(KEY)
    a.on_subscribe(FLOW, SUB, now=0.0, nonce=NONCE)
    a.on_safe(FLOW, 10_000, now=0.0)
    # The tracker restarted the flow (new SYN): its offsets start over, lower.
    assert _offsets(a.on_safe(FLOW, 64, now=1.0)) == [(SUB, FLOW, 64)]


def test_announcer_is_bounded() -> None:
    a = Announcer(KEY, max_flows=3)
    for port in range(10):
        flow = Flow(SRC, port, DST, 7000)
        a.on_subscribe(flow, SUB, now=0.0, nonce=NONCE)
        a.on_safe(flow, 1, now=0.0)
    assert len(a.handle_timer(a.get_timer())) == 3
    assert a.offset(Flow(SRC, 0, DST, 7000)) is None and a.offset(Flow(SRC, 9, DST, 7000)) == 1
    with pytest.raises(ValueError):
        Announcer(KEY, interval=2.0, linger=1.0)


@given(st.lists(st.tuples(st.integers(0, 4), st.floats(0, 0.3)), max_size=40))
@settings(max_examples=100, deadline=None)
def test_announcer_ticks_repeat_the_latest_offset_of_every_recent_flow(events: list[tuple[int, float]]) -> None:
    """Model check: each tick re-announces exactly the subscribed flows whose offset advanced
    within ``linger`` and that got no callback at once since the previous tick, each with its latest
    offset; the ticks go on while any such flow is recent, never more than ``interval`` late."""
    a = Announcer(KEY, interval=0.05, linger=1.0)
    flows = [Flow(SRC, p, DST, 7000) for p in range(4)]
    for f in flows[:3]:  # flows[3] never subscribes
        a.on_subscribe(f, SUB, now=0.0, nonce=NONCE)
    now, latest, changed, announced = 0.0, {}, {}, {}
    since = [0.0]  # the previous tick, or when the ticks started

    def announce(f: Flow, t: float) -> None:
        if a.get_timer() is None:
            since[0] = t
        announced[f] = t

    def run_until(t: float) -> None:
        while (due := a.get_timer()) is not None and due <= t:
            out = {(f, off) for _dest, f, off in _offsets(a.handle_timer(due))}
            recent = {f for f in latest if f != flows[3] and due - changed[f] <= 1.0}
            assert out == {(f, latest[f]) for f in recent if announced[f] <= since[0]}
            since[0] = due
            nxt = a.get_timer()
            assert (nxt is None) == (not recent) and (nxt is None or nxt == pytest.approx(due + 0.05))

    for i, (k, dt) in enumerate(events):
        if k == 4:  # a re-subscribe of flows[0]
            run_until(now + dt)
            now += dt
            was_known = flows[0] in latest
            if was_known:
                announce(flows[0], now)
            out = a.on_subscribe(flows[0], SUB, now, NONCE)
            if was_known:
                changed[flows[0]] = now
                assert _offsets(out) == [(SUB, flows[0], latest[flows[0]])]
            continue
        run_until(now + dt)
        now += dt
        latest[flows[k]] = latest.get(flows[k], 0) + 10 + i
        changed[flows[k]] = now
        if k != 3:
            announce(flows[k], now)
        out = _offsets(a.on_safe(flows[k], latest[flows[k]], now))
        assert out == ([] if k == 3 else [(SUB, flows[k], latest[flows[k]])])
    run_until(now + 5.0)
    assert a.get_timer() is None


# -- control messages ---------------------------------------------------------------------------


def test_callback_and_subscribe_messages() -> None:
    from smfs.tunnel import _mac

    data = encode_callback(FLOW, 2**40 + 3, NONCE, KEY)
    body = struct.pack("!4s4sH4sHQ8s", b"SMCB", socket.inet_aton(SRC), 40000, socket.inet_aton(DST), 7000, 2**40 + 3,
                       NONCE)
    assert len(data) == 48 and data == body + _mac(KEY, body)  # HMAC-SHA-256 under the tunnel key, 16 bytes
    assert decode_callback(data, KEY) == (FLOW, 2**40 + 3, NONCE)
    sub = encode_subscribe(FLOW, NONCE, KEY, SUB, want=2**33 + 7)
    sbody = struct.pack("!4s4sH4sH8sQ", b"SMSB", socket.inet_aton(SRC), 40000, socket.inet_aton(DST), 7000, NONCE,
                        2**33 + 7)
    assert len(sub) == 48 and sub == sbody + _mac(KEY, sbody, socket.inet_aton(SUB[0]), struct.pack("!H", SUB[1]))
    assert decode_subscribe(sub, KEY, SUB) == (FLOW, NONCE)
    assert decode_subscription(sub, KEY, SUB) == (FLOW, NONCE, 2**33 + 7)
    assert decode_subscription(encode_subscribe(FLOW, NONCE, KEY, SUB), KEY, SUB)[2] == 0  # every advance
    with pytest.raises(ValueError):
        encode_subscribe(FLOW, NONCE, KEY, SUB, want=-1)
    for bad in (b"", data[:-1], b"XXXX" + data[4:]):
        with pytest.raises(CallbackError):
            decode_callback(bad, KEY)
    for bad in (data, b"SMCB" + sub[4:]):
        with pytest.raises(CallbackError):
            decode_subscribe(bad, KEY, SUB)
    with pytest.raises(ValueError):
        encode_callback(Flow("not-an-ip", 1, DST, 2), 0, NONCE, KEY)
    with pytest.raises(ValueError):
        encode_callback(FLOW, 0, b"short", KEY)


def test_a_forged_or_altered_callback_is_refused() -> None:
    """Before: a callback was 24 bytes with no MAC, and any local process could ack network-sync
    appends early by sending one. Now it must carry a MAC under the testbed key."""
    good = encode_callback(FLOW, 5000, NONCE, KEY)
    forged_other_key = encode_callback(FLOW, 2**40, NONCE, b"x" * 32)
    altered = good[:16] + struct.pack("!Q", 2**40) + good[24:]  # a bigger offset, the old MAC
    unsigned = good[:32] + bytes(16)
    for bad in (forged_other_key, altered, unsigned):
        with pytest.raises(CallbackError, match="bad mac"):
            decode_callback(bad, KEY)
    assert decode_callback(good, KEY)[1] == 5000


def test_a_forged_or_replayed_subscribe_is_refused() -> None:
    """A subscribe must carry a MAC under the key over its content and its sender's address: one
    without, or one replayed from another address (to steal a flow's callbacks), is refused."""
    good = encode_subscribe(FLOW, NONCE, KEY, SUB)
    other = ("127.0.0.1", SUB[1] + 1)
    with pytest.raises(CallbackError, match="bad mac"):
        decode_subscribe(good, KEY, other)  # replayed from elsewhere
    with pytest.raises(CallbackError, match="bad mac"):
        decode_subscribe(encode_subscribe(FLOW, NONCE, b"y" * 32, SUB), KEY, SUB)
    with pytest.raises(CallbackError, match="bad mac"):
        decode_subscribe(good[:-16] + bytes(16), KEY, SUB)
    assert decode_subscribe(good, KEY, SUB) == (FLOW, NONCE)


def test_callbacks_echo_the_subscription_nonce() -> None:
    """A new subscription (another nonce: a new connection on the 4-tuple, a restarted server) gets
    callbacks under its own nonce, so those recorded under the old one are told apart and dropped."""
    a = Announcer(KEY)
    a.on_safe(FLOW, 700, now=0.0)
    [(_, first)] = a.on_subscribe(FLOW, SUB, now=1.0, nonce=NONCE)
    [(_, second)] = a.on_subscribe(FLOW, SUB, now=2.0, nonce=b"nonce-02")
    assert decode_callback(first, KEY)[2] == NONCE and decode_callback(second, KEY)[2] == b"nonce-02"
    a.handle_timer(2.05)  # the tick after the second subscribe's own callback
    assert [decode_callback(d, KEY)[2] for _, d in a.handle_timer(a.get_timer())] == [b"nonce-02"]
    with pytest.raises(ValueError):
        a.on_subscribe(FLOW, SUB, now=3.0, nonce=b"")


@given(st.binary(max_size=64))
@settings(max_examples=300, deadline=None)
def test_control_messages_from_random_bytes_are_refused_cleanly(data: bytes) -> None:
    for decode in (lambda d: decode_callback(d, KEY), lambda d: decode_subscribe(d, KEY, SUB)):
        with pytest.raises(CallbackError):
            decode(data)


def test_flags_constants() -> None:
    assert (TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK) == (1, 2, 4, 16)


def test_pure_acks_are_the_lazy_packets() -> None:
    """Only a TCP segment with no payload and no SYN, FIN or RST is lazy for the encoder."""
    from smfs.callbacks import is_pure_ack

    def seg(payload: bytes = b"", flags: int = TCP_ACK, proto: int = 6, frag: int = 0) -> bytes:
        tcp_hdr = struct.pack("!HHIIHHHH", 40000, 7000, 1, 1, (5 << 12) | flags, 65535, 0, 0)
        total = 20 + len(tcp_hdr) + len(payload)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, frag, 64, proto, 0, socket.inet_aton(SRC), socket.inet_aton(DST))
        return ip + tcp_hdr + payload

    assert is_pure_ack(seg())
    assert not is_pure_ack(seg(b"x")) and not is_pure_ack(seg(flags=TCP_SYN | TCP_ACK))
    assert not is_pure_ack(seg(flags=TCP_FIN | TCP_ACK)) and not is_pure_ack(seg(flags=TCP_RST))
    assert not is_pure_ack(seg(proto=17)) and not is_pure_ack(seg(frag=0x2000)) and not is_pure_ack(seg()[:39])
    assert not is_pure_ack(b"\x60" + seg()[1:])  # IPv6 version nibble


def test_a_subscriber_hears_only_of_the_offsets_it_waits_for() -> None:
    """A subscription's ``want``: no callback below it, at once (and re-announced) from it on; a new
    subscribe with another ``want`` replaces it and learns the current offset when that reaches it."""
    ann = Announcer(KEY, interval=0.05, linger=1.0)
    assert ann.on_subscribe(FLOW, "srv", 0.0, NONCE, want=5000) == []
    assert ann.on_safe(FLOW, 1000, 0.01) == [] and ann.on_safe(FLOW, 4999, 0.02) == []
    assert ann.handle_timer(1.0) == []  # nothing announced: no re-announcement either
    [(dest, data)] = ann.on_safe(FLOW, 6000, 0.03)
    assert dest == "srv" and decode_callback(data, KEY) == (FLOW, 6000, NONCE)
    assert [decode_callback(d, KEY)[1] for _dest, d in ann.handle_timer(0.09)] == [6000]  # re-announced
    assert ann.on_subscribe(FLOW, "srv", 0.1, NONCE, want=9000) == []  # 6000 < 9000: wait
    assert ann.on_safe(FLOW, 8000, 0.11) == [] and ann.handle_timer(0.2) == []
    [(_d, data)] = ann.on_subscribe(FLOW, "srv", 0.21, NONCE, want=7000)  # already there: at once
    assert decode_callback(data, KEY)[1] == 8000
