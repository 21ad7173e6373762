"""Network-level callbacks (SMFS network-sync). Pure: packets in, (flow, offset) out.

The egress gateway tells a local storage server, per TCP flow, the highest contiguous stream
offset whose packets *and every repair covering them* are on the WAN: from then on, a WAN loss
is repaired by the ingress gateway and a primary-site disaster cannot lose those bytes.

:class:`FlowTracker` is fed what the egress sends: :meth:`FlowTracker.on_packet_sent` for each
tunnelled IP packet (with its tunnel seq) and :meth:`FlowTracker.on_repairs_sent` for each batch
of repairs sent (those of ``Encoder.add`` and ``Encoder.handle_timer``). Report a packet before
the repairs that cover it, as the encoder returns them after ``add``. A tunnel packet is
*safe* once one repair of each of the ``c`` layers covering it was sent (with ``c = 0``, no FEC,
as soon as it is sent itself); a flow's bytes are safe once the packets carrying them are.
:meth:`FlowTracker.safe_offsets` returns the flows whose contiguous safe offset advanced.

Offsets count stream bytes from the first byte after the SYN (``(seq - isn - 1) mod 2**32``,
unwrapped to 64 bits), exclusive end: offset ``n`` means bytes ``0 .. n-1`` are safe, so a server
that wrote ``n`` bytes on the connection waits for a callback with offset ``>= n``. A flow is
tracked from its SYN (or SYN-ACK) on: a flow first seen without one (the gateway started after
the connection) is ignored, its server gets no callback and must fall back on its timeout.
A SYN with a new ISN on a known 4-tuple starts the flow afresh; FIN ends it once all its bytes
are safe and reported, RST after the next report.

Messages on the local control channel (UDP, integers big-endian, addresses IPv4), both
authenticated under the testbed's (tunnel) key: ``mac`` is HMAC-SHA-256 truncated to 16 bytes,
as the tunnel's (:func:`smfs.tunnel._mac`):

- subscribe, server -> gateway control port: ``b"SMSB" src_ip sport dst_ip dport nonce want mac``
  (``!4s4sH4sH8sQ16s``, 48 bytes): send this flow's callbacks to the datagram's source address,
  tagged with ``nonce`` (8 random bytes the server chose for this subscription), for offsets of at
  least ``want`` (0: every advance). A server waiting for one offset (the end of its oldest pending
  append) subscribes again with each new one, so it gets a callback per append rather than one per
  few packets, each of which costs it a MAC check (about 1.5 ms of Python in a TCG guest). ``mac``
  covers the first 32 bytes *and the datagram's source address* (``4s H``), so a subscribe replayed
  from anywhere else is refused and cannot steal a flow's callbacks;
- callback, gateway -> server: ``b"SMCB" src_ip sport dst_ip dport offset nonce mac``
  (``!4s4sH4sHQ8s16s``, 48 bytes), the flow as the server sends it (src = the server), the
  subscription's nonce; ``mac`` covers the first 32 bytes. A server takes only callbacks with a
  good MAC and its own subscription's nonce: a forged callback, or one recorded under an earlier
  subscription (an earlier connection on the same 4-tuple, a restarted server), is dropped.

The channel is a datagram channel and may lose messages, so both are idempotent: a callback
carries the absolute safe offset (a server keeps the highest it was told; a repeated, replayed
or stale one changes nothing), and a repeated subscribe only (re)sets the destination and ``want``
(a replayed older one asks for more callbacks, never fewer than the offsets reached). The
:class:`Announcer` decides who gets which callback, when: at once when a flow's offset
advances or a server subscribes (late subscribers learn the current offset), and again every
``interval`` for ``linger`` after the last of those, so that one lost datagram costs a server
``interval`` rather than its timeout.
"""

from __future__ import annotations

import bisect
import hmac
import socket
import struct
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from smfs.fec import Repair
from smfs.tunnel import MAC_LEN, _mac, _mac_states

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_ACK = 0x10

_IP = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIH")
_IP_FAST = struct.Struct("!BxHxxHxB")  # version/ihl, total length, flags/fragment offset, protocol
_CALLBACK = struct.Struct("!4s4sH4sHQ8s")  # then the MAC
_SUBSCRIBE = struct.Struct("!4s4sH4sH8sQ")  # then the MAC (over these and the sender's address)
_SENDER = struct.Struct("!4sH")
NONCE_LEN = 8
"""Bytes of a subscription's nonce."""
CALLBACK_LEN = _CALLBACK.size + MAC_LEN
SUBSCRIBE_LEN = _SUBSCRIBE.size + MAC_LEN
CALLBACK_MAGIC = b"SMCB"
SUBSCRIBE_MAGIC = b"SMSB"
_MOD32 = 1 << 32


class Flow(NamedTuple):
    """One direction of a TCP connection: dotted IPv4 addresses and ports."""

    src: str
    sport: int
    dst: str
    dport: int


@dataclass(frozen=True, slots=True)
class TcpSegment:
    """The fields of an IPv4/TCP packet the tracker needs; ``payload_len`` in bytes."""

    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    payload_len: int

    @property
    def flow(self) -> Flow:
        return Flow(self.src, self.sport, self.dst, self.dport)

    @property
    def syn(self) -> bool:
        return bool(self.flags & TCP_SYN)

    @property
    def fin(self) -> bool:
        return bool(self.flags & TCP_FIN)

    @property
    def rst(self) -> bool:
        return bool(self.flags & TCP_RST)


def parse_tcp(packet: bytes) -> TcpSegment | None:
    """The TCP segment in IPv4 packet ``packet``; None for anything else, for fragments and for
    malformed headers. Trailing bytes beyond the IP total length are ignored."""
    if len(packet) < 40:
        return None
    vihl, _tos, total, _id, frag, _ttl, proto, _sum, src, dst = _IP.unpack_from(packet)
    ihl = (vihl & 0x0F) * 4
    if vihl >> 4 != 4 or ihl < 20 or proto != 6 or frag & 0x3FFF or total > len(packet):
        return None
    if total < ihl + 20:
        return None
    sport, dport, seq, ack, off_flags = _TCP.unpack_from(packet, ihl)
    doff = (off_flags >> 12) * 4
    if doff < 20 or ihl + doff > total:
        return None
    return TcpSegment(
        socket.inet_ntoa(src),
        socket.inet_ntoa(dst),
        sport,
        dport,
        seq,
        ack,
        off_flags & 0xFF,
        total - ihl - doff,
    )


def is_pure_ack(ip_packet: bytes) -> bool:
    """A TCP segment with no payload and no SYN, FIN or RST (an IPv4 packet, not a fragment): its
    loss costs little, the next ACK carries the same news. The encoder's ``lazy`` packets
    (:mod:`smfs.fec`); anything else (data, an application's ack frame, a ping) is not."""
    if len(ip_packet) < 40:
        return False
    vihl, total, frag, proto = _IP_FAST.unpack_from(ip_packet)
    ihl = (vihl & 0x0F) * 4
    if vihl >> 4 != 4 or ihl < 20 or proto != 6 or frag & 0x3FFF or total > len(ip_packet) or total < ihl + 20:
        return False
    off_flags = _TCP.unpack_from(ip_packet, ihl)[4]
    doff = (off_flags >> 12) * 4
    return doff >= 20 and ihl + doff == total and not off_flags & (TCP_SYN | TCP_FIN | TCP_RST)


def unwrap32(value: int, ref: int) -> int:
    """The 64-bit number closest to ``ref`` whose low 32 bits are ``value``
    (``ref`` in 64 bits, the result may be negative near 0)."""
    d = (value - ref) % _MOD32
    if d >= 1 << 31:
        d -= _MOD32
    return ref + d


class _FlowState:
    __slots__ = ("isn", "ref", "safe_end", "reported", "holes", "fin_at", "rst")

    def __init__(self, isn: int) -> None:
        self.isn = isn
        self.ref = 0  # highest end offset seen: the unwrapping reference
        self.safe_end = 0  # contiguous safe offset (exclusive)
        self.reported = 0
        self.holes: list[tuple[int, int]] = []  # safe ranges beyond safe_end: sorted, disjoint
        self.fin_at: int | None = None
        self.rst = False

    def offset(self, seq: int) -> int:
        return unwrap32((seq - self.isn - 1) % _MOD32, self.ref)

    def mark_safe(self, start: int, end: int) -> bool:
        """Record [start, end) as safe; True when ``safe_end`` advanced."""
        if end <= self.safe_end:
            return False
        if start > self.safe_end:
            _insert(self.holes, start, end)
            return False
        self.safe_end = end
        holes = self.holes
        while holes and holes[0][0] <= self.safe_end:
            self.safe_end = max(self.safe_end, holes.pop(0)[1])
        return True


def _insert(ivs: list[tuple[int, int]], start: int, end: int) -> None:
    """Insert [start, end) into sorted disjoint ``ivs``, merging overlapping or touching ones."""
    i = bisect.bisect_left(ivs, (start, start))
    if i > 0 and ivs[i - 1][1] >= start:
        i -= 1
        start = ivs[i][0]
        end = max(end, ivs[i][1])
    j = i
    while j < len(ivs) and ivs[j][0] <= end:
        end = max(end, ivs[j][1])
        j += 1
    ivs[i:j] = [(start, end)]


class FlowTracker:
    """Per-flow contiguous safe offsets for network-level callbacks (see the module docstring).

    ``c``: the number of FEC layers (repairs needed per packet); 0: none, a packet's bytes are
    safe once :meth:`on_packet_sent` reports it (latency 0). Memory is bounded: at most
    ``max_flows`` flows (least recently active dropped first) and ``max_pending`` tunnel
    packets waiting for their repairs (oldest dropped first, their bytes never reported).
    ``latencies`` keeps the last ``max_latencies`` delays (s) from a segment's packet being
    sent to its being safe, when the caller passes ``now``; ``held_latencies`` the part of each
    that the gateway spent held back by its pacer (``held``: the gateway's running total of such
    seconds, kept current by the gateway before it reports a send). The rest is the gateway's own.

    ``safe_at_send`` is the seeded defect ``network-sync-callback-before-repairs`` (see
    :mod:`smfs.defects`), never on in a real run: a packet's bytes are safe as soon as it is
    sent, without waiting for the repairs that cover it.
    """

    def __init__(
        self, c: int = 3, max_flows: int = 4096, max_pending: int = 65536, max_latencies: int = 10000,
        safe_at_send: bool = False,
    ):
        if not 0 <= c <= 8:
            raise ValueError(f"c must be 0..8, got {c!r}")
        self.c = c
        self._full = (1 << c) - 1
        self.max_flows = max_flows
        self.max_pending = max_pending
        self._flows: OrderedDict[Flow, _FlowState] = OrderedDict()
        self._carried: dict[int, list[tuple[Flow, _FlowState, int, int, float | None, float]]] = {}
        self._done: dict[int, int] = {}  # tunnel seq -> bitmask of layers whose repair was sent
        self._advanced: set[Flow] = set()
        self._closing: set[Flow] = set()
        self.latencies: deque[float] = deque(maxlen=max_latencies)
        self.held_latencies: deque[float] = deque(maxlen=max_latencies)
        self.held = 0.0
        """Seconds the gateway has been held back by its pacer so far (it keeps this current)."""
        self.ignored = 0
        """Data segments of flows seen without a SYN."""
        self._flow_names: dict[bytes, Flow] = {}  # raw addresses and ports -> Flow
        self._safe_at_send = safe_at_send

    def on_packet_sent(self, tunnel_seq: int, ip_packet: bytes, now: float | None = None) -> None:
        """Note that tunnel packet ``tunnel_seq`` carrying ``ip_packet`` was sent at ``now`` (s)."""
        # parse_tcp inlined (same checks), with the Flow of the raw addresses and ports cached:
        # this runs for every packet the gateway sends.
        if len(ip_packet) < 40:
            return
        vihl, total, frag, proto = _IP_FAST.unpack_from(ip_packet)
        ihl = (vihl & 0x0F) * 4
        if vihl >> 4 != 4 or ihl < 20 or proto != 6 or frag & 0x3FFF or total > len(ip_packet) or total < ihl + 20:
            return
        sport, dport, seq, _ack, off_flags = _TCP.unpack_from(ip_packet, ihl)
        doff = (off_flags >> 12) * 4
        if doff < 20 or ihl + doff > total:
            return
        payload_len = total - ihl - doff
        raw = ip_packet[12:24] if ihl == 20 else ip_packet[12:20] + ip_packet[ihl : ihl + 4]
        flow = self._flow_names.get(raw)
        if flow is None:
            flow = Flow(socket.inet_ntoa(raw[:4]), sport, socket.inet_ntoa(raw[4:8]), dport)
            if len(self._flow_names) >= 2 * self.max_flows:
                self._flow_names.clear()
            self._flow_names[raw] = flow
        flows = self._flows
        st = flows.get(flow)
        if off_flags & TCP_SYN:
            if st is None or st.isn != seq:
                st = self._new_flow(flow, seq)
            start = 0
        elif st is None:
            if payload_len:
                self.ignored += 1
            return
        else:
            start = st.offset(seq)
        flows.move_to_end(flow)
        end = start + payload_len
        if off_flags & TCP_RST:
            st.rst = True
            self._closing.add(flow)
            return
        if off_flags & TCP_FIN:
            st.fin_at = end
            self._closing.add(flow)
        if not payload_len or end <= st.safe_end:
            return
        if end > st.ref:
            st.ref = end
        if not self.c:  # no FEC: no repair to wait for, safe once on the wire
            if now is not None:
                self.latencies.append(0.0)
                self.held_latencies.append(0.0)
            if st.mark_safe(start, end):
                self._advanced.add(flow)
            return
        if self._safe_at_send:  # seeded defect: safe before a single repair covering it is out
            if st.mark_safe(start, end):
                self._advanced.add(flow)
            return
        carried = self._carried
        entries = carried.get(tunnel_seq)
        if entries is None:
            carried[tunnel_seq] = [(flow, st, start, end, now, self.held)]
            while len(carried) > self.max_pending:
                old = next(iter(carried))
                del carried[old]
                self._done.pop(old, None)
        else:
            entries.append((flow, st, start, end, now, self.held))

    def on_repairs_sent(self, repairs: Iterable[Repair], now: float | None = None) -> None:
        """Note that ``repairs`` were sent at ``now`` (s)."""
        carried, done_bits, full, flows = self._carried, self._done, self._full, self._flows
        for rep in repairs:
            bit = 1 << rep.layer
            for s in rep.seqs:
                entries = carried.get(s)
                if entries is None:
                    continue
                done = done_bits.get(s, 0) | bit
                if done != full:
                    done_bits[s] = done
                    continue
                del carried[s]
                done_bits.pop(s, None)
                for flow, st, start, end, sent, held in entries:
                    if now is not None and sent is not None:
                        self.latencies.append(now - sent)
                        self.held_latencies.append(self.held - held)
                    if flows.get(flow) is st and st.mark_safe(start, end):
                        self._advanced.add(flow)

    def safe_offsets(self) -> list[tuple[Flow, int]]:
        """Flows whose contiguous safe offset advanced since the last call, with that offset
        (bytes, exclusive end). Flows ended by FIN (all bytes safe) or RST are then dropped."""
        if not self._advanced and not self._closing:
            return []
        out = []
        for flow in self._advanced:
            st = self._flows.get(flow)
            if st is not None and st.safe_end > st.reported:
                st.reported = st.safe_end
                out.append((flow, st.safe_end))
        self._advanced.clear()
        for flow in list(self._closing):
            st = self._flows.get(flow)
            if st is None:
                self._closing.discard(flow)
            elif st.rst or (st.fin_at is not None and st.safe_end >= st.fin_at):
                del self._flows[flow]
                self._closing.discard(flow)
        return out

    def safe_offset(self, flow: Flow) -> int | None:
        """The current contiguous safe offset of ``flow``, None when not tracked."""
        st = self._flows.get(flow)
        return None if st is None else st.safe_end

    @property
    def flows(self) -> int:
        """Number of flows tracked."""
        return len(self._flows)

    @property
    def pending(self) -> int:
        """Tunnel packets carrying tracked bytes still waiting for some repairs."""
        return len(self._carried)

    def _new_flow(self, flow: Flow, isn: int) -> _FlowState:
        st = _FlowState(isn)
        self._flows[flow] = st
        self._closing.discard(flow)
        while len(self._flows) > self.max_flows:
            old, _ = self._flows.popitem(last=False)
            self._closing.discard(old)
        return st


REANNOUNCE_S = 0.05
"""Default re-announcement period of a flow's safe offset (s)."""
LINGER_S = 1.0
"""Default time (s) after a flow's last advance or subscribe during which it is re-announced."""


class _Subscription:
    __slots__ = ("offset", "dest", "nonce", "want", "changed", "announced")

    def __init__(self) -> None:
        self.offset = 0  # highest safe offset known (bytes)
        self.dest: Hashable | None = None  # the subscriber's address
        self.nonce = bytes(NONCE_LEN)  # the subscription's nonce, echoed in each callback
        self.want = 0  # the lowest offset the subscriber wants to hear of (0: every advance)
        self.changed = 0.0  # time (s) of the last advance or subscribe
        self.announced = 0.0  # time (s) of the last callback sent at once (not a re-announcement)


class Announcer:
    """The callbacks to send, per flow: pure, fed safe offsets, subscriptions and time (s),
    answering ``(dest, datagram)`` pairs (see the module docstring).

    :meth:`on_safe` takes each ``(flow, offset)`` of :meth:`FlowTracker.safe_offsets`,
    :meth:`on_subscribe` each subscription; both answer the callbacks to send now.
    :meth:`handle_timer` answers the re-announcements due at :meth:`get_timer`: every flow with
    a subscriber and an offset whose offset advanced, or which subscribed, at most ``linger``
    s ago is re-announced every ``interval`` s, unless it advanced (and so got a fresh callback)
    since the previous tick: a flow that keeps advancing needs no re-announcement. The last offset of a flow is kept after the
    tracker forgets it (FIN, RST), for at most ``max_flows`` flows (least recently changed
    dropped first). Callbacks are authenticated under ``key`` (see the module docstring).
    """

    def __init__(self, key: bytes, interval: float = REANNOUNCE_S, linger: float = LINGER_S,
                 max_flows: int = 4096) -> None:
        if not 0 < interval <= linger:
            raise ValueError(f"need 0 < interval <= linger (s), got {interval!r} and {linger!r}")
        _mac_states(key)  # checks the key
        self.key = key
        self.interval = interval
        self.linger = linger
        self.max_flows = max_flows
        self._subs: OrderedDict[Flow, _Subscription] = OrderedDict()
        self._active: dict[Flow, _Subscription] = {}  # subscribed, with an offset, changed recently
        self._next: float | None = None  # next re-announcement tick (s), while any flow is active
        self._since = 0.0  # the last tick (or when the ticks started): flows changed after it are not due
        self.resent = 0
        """Re-announcements answered by :meth:`handle_timer`."""

    def on_safe(self, flow: Flow, offset: int, now: float) -> list[tuple[Hashable, bytes]]:
        """``flow`` is safe up to ``offset`` (bytes) at ``now`` (s): the callback to send now,
        if the flow has a subscriber and the offset changed (a lower one is a new connection on
        the same 4-tuple: the tracker's offsets only grow within one)."""
        sub = self._touch(flow, now)
        if offset == sub.offset:
            return []
        sub.offset = offset
        return self._announce(flow, sub, now)

    def on_subscribe(self, flow: Flow, dest: Hashable, now: float, nonce: bytes,
                     want: int = 0) -> list[tuple[Hashable, bytes]]:
        """Send ``flow``'s callbacks for offsets of at least ``want`` to ``dest`` from ``now`` (s) on,
        tagged with the subscription's ``nonce`` (of a checked subscribe message): the callback with
        its current offset, when one is known and reaches ``want``."""
        if len(nonce) != NONCE_LEN:
            raise ValueError(f"a subscription's nonce is {NONCE_LEN} bytes, got {len(nonce)}")
        sub = self._touch(flow, now)
        sub.dest = dest
        sub.nonce = bytes(nonce)
        sub.want = want
        return self._announce(flow, sub, now)

    def get_timer(self) -> float | None:
        """When (s) :meth:`handle_timer` must next run, or None while no flow is re-announced."""
        return self._next

    def handle_timer(self, now: float) -> list[tuple[Hashable, bytes]]:
        """The re-announcements due at ``now`` (s)."""
        if self._next is None or now < self._next:
            return []
        out = []
        expired = []
        for flow, sub in self._active.items():
            if now - sub.changed > self.linger:
                expired.append(flow)
            elif sub.announced <= self._since and sub.offset >= sub.want:  # one announced since the last tick got a fresh callback then
                out.append((sub.dest, encode_callback(flow, sub.offset, sub.nonce, self.key)))
        for flow in expired:
            del self._active[flow]
        self._next = now + self.interval if self._active else None
        self._since = now
        self.resent += len(out)
        return out

    def offset(self, flow: Flow) -> int | None:
        """The last safe offset known for ``flow`` (bytes), None when not known."""
        sub = self._subs.get(flow)
        return None if sub is None or not sub.offset else sub.offset

    def subscriber(self, flow: Flow) -> Hashable | None:
        """Where ``flow``'s callbacks go, None without a subscriber."""
        sub = self._subs.get(flow)
        return None if sub is None else sub.dest

    def _touch(self, flow: Flow, now: float) -> _Subscription:
        subs = self._subs
        sub = subs.get(flow)
        if sub is None:
            sub = subs[flow] = _Subscription()
            while len(subs) > self.max_flows:
                old, _ = subs.popitem(last=False)
                self._active.pop(old, None)
        else:
            subs.move_to_end(flow)
        sub.changed = now
        return sub

    def _announce(self, flow: Flow, sub: _Subscription, now: float) -> list[tuple[Hashable, bytes]]:
        if sub.dest is None or not sub.offset or sub.offset < sub.want:
            return []
        self._active[flow] = sub
        sub.announced = now
        if self._next is None:
            self._next = now + self.interval
            self._since = now
        return [(sub.dest, encode_callback(flow, sub.offset, sub.nonce, self.key))]


class CallbackError(ValueError):
    """A control-channel message that is not a valid callback or subscribe message (the reason:
    its length, its magic, or ``bad mac``)."""


def _pack_flow(flow: Flow) -> tuple[bytes, int, bytes, int]:
    try:
        return socket.inet_aton(flow.src), flow.sport, socket.inet_aton(flow.dst), flow.dport
    except OSError as err:
        raise ValueError(f"flow addresses must be dotted IPv4: {flow!r}") from err


def _sender(addr: tuple[str, int]) -> bytes:
    try:
        return _SENDER.pack(socket.inet_aton(addr[0]), addr[1])
    except (OSError, struct.error, TypeError, IndexError) as err:
        raise ValueError(f"the sender must be an IPv4 (host, port): {addr!r}") from err


def _check_nonce(nonce: bytes) -> None:
    if len(nonce) != NONCE_LEN:
        raise ValueError(f"a subscription's nonce is {NONCE_LEN} bytes, got {len(nonce)}")


def encode_callback(flow: Flow, offset: int, nonce: bytes, key: bytes) -> bytes:
    """Callback datagram: ``flow`` is safe up to ``offset`` bytes (exclusive end), for the
    subscription ``nonce``, authenticated under ``key``."""
    _check_nonce(nonce)
    src, sport, dst, dport = _pack_flow(flow)
    body = _CALLBACK.pack(CALLBACK_MAGIC, src, sport, dst, dport, offset, nonce)
    return body + _mac(key, body)


def decode_callback(data: bytes, key: bytes) -> tuple[Flow, int, bytes]:
    """(flow, offset, nonce) of a callback datagram with a good MAC under ``key``; CallbackError otherwise."""
    if len(data) != CALLBACK_LEN:
        raise CallbackError(f"callback must be {CALLBACK_LEN} bytes, got {len(data)}")
    body = bytes(data[: _CALLBACK.size])
    magic, src, sport, dst, dport, offset, nonce = _CALLBACK.unpack(body)
    if magic != CALLBACK_MAGIC:
        raise CallbackError("not a callback message")
    if not hmac.compare_digest(data[_CALLBACK.size :], _mac(key, body)):
        raise CallbackError("bad mac")
    return Flow(socket.inet_ntoa(src), sport, socket.inet_ntoa(dst), dport), offset, nonce


def encode_subscribe(flow: Flow, nonce: bytes, key: bytes, sender: tuple[str, int], want: int = 0) -> bytes:
    """Subscribe datagram: send ``flow``'s callbacks for offsets of at least ``want`` (0: every one),
    tagged ``nonce``, to the sender of this datagram, which must be sent from ``sender`` (the
    subscriber's bound IPv4 (host, port))."""
    _check_nonce(nonce)
    if not 0 <= want < 1 << 64:
        raise ValueError(f"want must be an offset in 0..2**64-1, got {want!r}")
    src, sport, dst, dport = _pack_flow(flow)
    body = _SUBSCRIBE.pack(SUBSCRIBE_MAGIC, src, sport, dst, dport, nonce, want)
    return body + _mac(key, body, _sender(sender))


def decode_subscribe(data: bytes, key: bytes, sender: tuple[str, int]) -> tuple[Flow, bytes]:
    """(flow, nonce) of a subscribe datagram received from ``sender`` with a good MAC under ``key``;
    CallbackError otherwise (:func:`decode_subscription` with its ``want``)."""
    flow, nonce, _want = decode_subscription(data, key, sender)
    return flow, nonce


def decode_subscription(data: bytes, key: bytes, sender: tuple[str, int]) -> tuple[Flow, bytes, int]:
    """(flow, nonce, want) of a subscribe datagram received from ``sender`` with a good MAC under
    ``key``; CallbackError otherwise."""
    if len(data) != SUBSCRIBE_LEN:
        raise CallbackError(f"subscribe must be {SUBSCRIBE_LEN} bytes, got {len(data)}")
    body = bytes(data[: _SUBSCRIBE.size])
    magic, src, sport, dst, dport, nonce, want = _SUBSCRIBE.unpack(body)
    if magic != SUBSCRIBE_MAGIC:
        raise CallbackError("not a subscribe message")
    if not hmac.compare_digest(data[_SUBSCRIBE.size :], _mac(key, body, _sender(sender))):
        raise CallbackError("bad mac")
    return Flow(socket.inet_ntoa(src), sport, socket.inet_ntoa(dst), dport), nonce, want
