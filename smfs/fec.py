"""Layered interleaving XOR forward error correction, as in Maelstrom (NSDI'08). Pure: no I/O.

The egress gateway numbers the packets it tunnels (``seq``, 64-bit, increasing) and feeds them
to an :class:`Encoder`; it sends every :class:`Repair` the encoder returns next to the data.
The ingress gateway feeds what arrives to a :class:`Decoder`, which rebuilds lost packets.

Code: ``c`` layers, layer ``k`` with interleave ``I_k``. Packet ``s`` goes to bin ``s mod I_k``
of every layer; a bin emits a repair, the XOR of its packets (padded to the longest) naming
their sequence numbers and lengths, once it holds ``r`` packets, or when its flush timer
(``flush_ms`` after its first packet) expires, so that a network-level callback never waits
for unrelated traffic. A packet is therefore covered by exactly one repair per layer; the
bandwidth overhead is ``c / r`` (37.5 % for r = 8, c = 3) when the bins fill, and up to ``c``
repairs per packet when traffic is too sparse to fill a bin within ``flush_ms``.

The flush rule trades overhead against how soon a packet's last repair leaves. A packet is
``lazy`` when losing it costs little (the gateway marks pure TCP ACKs: the next one carries the
same news). A due bin holding any packet that is not lazy flushes on time. A due bin of lazy
packets only, in a ``budgeted`` encoder (a gateway no storage server has subscribed to: where a
network-sync callback waits, every due bin flushes), flushes only while a credit allows: each
packet earns ``5 c`` units, each repair (full bin or flush) costs ``4 r``, and a flush needs
``4 r`` in hand, so a stream of ACKs gets at most ``1.25 c / r`` repairs per packet (plus the
banked credit, at most one repair per bin) whatever its rate. A due lazy bin without credit
waits for the packets that earn it (or fill it).

Time is passed in (``now``, seconds, any monotonic origin), as in aioquic: the caller owns the
clock and the timer (:meth:`Encoder.get_timer`, :meth:`Encoder.handle_timer`).
"""

from __future__ import annotations

import heapq
import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

SEQ_LIMIT = 1 << 64
"""Sequence numbers are unsigned 64-bit."""
MAX_R = 64
"""Largest ``r`` (packets per repair) accepted; the wire format counts them in one byte."""
MAX_LAYERS = 8
"""Largest ``c`` (layers) accepted; callbacks keep one bit per layer."""
MAX_PACKET = 65535
"""Largest packet (bytes) the codec accepts: an IPv4 packet's total length is 16-bit."""
CREDIT_EARN = 5
CREDIT_COST = 4
"""A budgeted encoder's credit: ``CREDIT_EARN * c`` per packet, ``CREDIT_COST * r`` per repair,
so at most ``5/4 * c / r`` repairs per packet (see the module docstring)."""


@dataclass(frozen=True)
class FecParams:
    """Code parameters, validated once.

    - ``r``: data packets per repair (8, as Maelstrom and SMFS).
    - ``c``: layers, one repair per layer covers each packet (3); must equal ``len(interleaves)``.
      ``c = 0`` (``interleaves=()``) is no FEC at all: data is numbered and sent, no repair ever
      is, a lost packet stays lost, and a packet is safe (network-sync) once it is on the wire.
    - ``interleaves``: the interleave of each layer, strictly increasing. Default ``(1, 11, 19)``:

      * ``1``: bins of ``r`` consecutive packets; recovers one loss per 8 consecutive packets,
        i.e. the isolated losses that dominate random (iid) loss, with the lowest delay.
      * ``11``: a bin holds packets 11 apart, so a burst of up to 11 consecutive losses (15 KB
        of 1400 B packets) costs each bin at most one packet. 11 >= r, so a layer-1 bin and a
        layer-11 bin share at most one packet: their repairs are independent equations.
      * ``19``: bursts up to 19 consecutive losses (27 KB of 1400 B packets, ~1.5 ms at the
        13 k packets/s measured between two TCG guests). 19 is coprime with 11 and the bin
        span r * 19 = 152 < lcm(11, 19) = 209, so any two bins of different layers share at
        most one packet, which keeps two losses from sharing all their repairs and lets the
        decoder cascade.

      Larger interleaves (Maelstrom also shows e.g. 57) recover longer bursts but, with the
      flush timer, a layer-``I`` bin only fills when the rate exceeds ``r * I / flush_ms``
      (30 k packets/s for I = 19 and 5 ms); below that it flushes nearly single-packet repairs
      and the overhead of that layer tends to 100 %. Measured repairs per data packet with
      (1, 11, 19): 0.54 at 13 k packets/s, 0.96 at 5 k, 2.2 at 1 k, 0.376 from 50 k; with
      (1, 11, 57): 0.79 at 13 k, 1.46 at 5 k. 19 keeps that cost down while covering the
      tail-drop bursts of a queue-limited WAN.
    - ``flush_ms``: a non-empty bin emits its partial repair this long (ms) after its first
      packet. It bounds the delay a network-sync callback adds (5 ms against 25+ ms one way).
    """

    r: int = 8
    c: int = 3
    interleaves: tuple[int, ...] = (1, 11, 19)
    flush_ms: float = 5.0

    def __post_init__(self) -> None:
        if not _is_int(self.r) or not 1 <= self.r <= MAX_R:
            raise ValueError(f"r must be an integer in 1..{MAX_R}, got {self.r!r}")
        if not _is_int(self.c) or not 0 <= self.c <= MAX_LAYERS:
            raise ValueError(f"c must be an integer in 0..{MAX_LAYERS}, got {self.c!r}")
        ivs = self.interleaves
        if not isinstance(ivs, tuple) or not all(_is_int(i) and i >= 1 for i in ivs):
            raise ValueError(f"interleaves must be a tuple of integers >= 1, got {ivs!r}")
        if len(ivs) != self.c:
            raise ValueError(f"interleaves must have c={self.c} entries, got {len(ivs)}")
        if any(b <= a for a, b in zip(ivs, ivs[1:], strict=False)):
            raise ValueError(f"interleaves must be strictly increasing, got {ivs!r}")
        f = self.flush_ms
        if not isinstance(f, int | float) or isinstance(f, bool) or not math.isfinite(f) or not 0 < f <= 1000:
            raise ValueError(f"flush_ms must be a number in (0, 1000] ms, got {f!r}")

    @property
    def flush_s(self) -> float:
        """The flush delay in seconds."""
        return self.flush_ms / 1000.0

    @property
    def span(self) -> int:
        """Sequence-number span of a full bin of the widest layer: ``r * max(interleaves)``
        (0 when ``c = 0``: there are no bins)."""
        return self.r * self.interleaves[-1] if self.interleaves else 0


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True, slots=True)
class Repair:
    """One repair packet: the XOR of the packets ``seqs`` of one bin of layer ``layer``.

    ``lengths[i]`` is the length (bytes) of packet ``seqs[i]``; ``xor`` is padded with zeros to
    the longest of them. ``seqs`` are strictly increasing.
    """

    layer: int
    seqs: tuple[int, ...]
    lengths: tuple[int, ...]
    xor: bytes

    def __post_init__(self) -> None:
        seqs, lengths = self.seqs, self.lengths
        n = len(seqs)
        if n == 0 or n != len(lengths):
            raise ValueError("repair seqs and lengths must be non-empty and of equal count")
        if len(self.xor) != max(lengths) or min(lengths) < 1:
            raise ValueError("repair xor length must equal the longest packet length (>= 1)")
        if n > 1 and not all(map(operator.lt, seqs, seqs[1:])):
            raise ValueError("repair seqs must be strictly increasing")

    def covers(self, seq: int) -> bool:
        """Whether packet ``seq`` is one of this repair's packets."""
        return seq in self.seqs

    def length_of(self, seq: int) -> int:
        """Length (bytes) of covered packet ``seq``; ValueError when not covered."""
        return self.lengths[self.seqs.index(seq)]

    @property
    def first(self) -> int:
        """Lowest covered sequence number."""
        return self.seqs[0]

    @property
    def last(self) -> int:
        """Highest covered sequence number."""
        return self.seqs[-1]


_ZEROS = bytes(MAX_PACKET)
_NEW = object.__new__
_SET = object.__setattr__


def _trusted_repair(layer: int, seqs: tuple[int, ...], lengths: tuple[int, ...], xor: bytes) -> Repair:
    """A :class:`Repair` whose fields the caller has already checked (the encoder builds valid ones
    by construction, the tunnel decoder checks them on the wire): skips ``__post_init__``."""
    rep = _NEW(Repair)
    _SET(rep, "layer", layer)
    _SET(rep, "seqs", seqs)
    _SET(rep, "lengths", lengths)
    _SET(rep, "xor", xor)
    return rep


def _numpy() -> Any:
    """numpy, imported on first use: only the XORs need it, and it is the heaviest import of the
    gateway (about 40 ms here, 1-2 s in a TCG guest), which the C engine's launcher, importing this
    module for :class:`FecParams` alone, should not pay at every gateway start."""
    import numpy

    return numpy


def _padded(packets: Sequence[bytes], size: int) -> bytes:
    """``packets`` zero-padded (or truncated) to ``size`` bytes each, concatenated."""
    parts = []
    for p in packets:
        n = len(p)
        if n == size:
            parts.append(p)
        elif n < size:
            parts.append(p)
            parts.append(_ZEROS[: size - n] if size - n <= MAX_PACKET else bytes(size - n))
        else:
            parts.append(p[:size])
    return b"".join(parts)


def xor_packets(packets: Sequence[bytes], length: int | None = None) -> bytes:
    """XOR of ``packets``, each zero-padded to ``length`` bytes (default: the longest).

    One numpy reduction over a (n, length) uint8 array (faster than a uint64 view for packet
    sizes, and needs no padding to a multiple of 8); packets longer than ``length`` are
    truncated (callers never pass one).
    """
    n = len(packets)
    longest = max(map(len, packets))
    size = longest if length is None else length
    if n == 1:
        return bytes(_padded(packets, size))
    buf = b"".join(packets)
    if longest > size or len(buf) != n * size:  # not all exactly ``size`` bytes long
        buf = _padded(packets, size)
    np = _numpy()
    return np.bitwise_xor.reduce(np.frombuffer(buf, dtype=np.uint8).reshape(n, size), axis=0).tobytes()


def xor_many(groups: Sequence[Sequence[bytes]]) -> list[bytes]:
    """XOR of each group of packets (as :func:`xor_packets`), batched.

    Groups that share their packet count and longest length are padded and reduced together in
    one numpy call over a (groups, n, length) uint8 array.
    """
    out: list[bytes | None] = [None] * len(groups)
    batches: dict[tuple[int, int], list[int]] = {}
    for i, g in enumerate(groups):
        batches.setdefault((len(g), max(map(len, g))), []).append(i)
    for (n, size), idx in batches.items():
        if len(idx) == 1:
            out[idx[0]] = xor_packets(groups[idx[0]], size)
            continue
        buf = b"".join([p for i in idx for p in groups[i]])
        if len(buf) != len(idx) * n * size:  # some packets shorter than ``size``: pad them
            buf = b"".join([_padded(groups[i], size) for i in idx])
        np = _numpy()
        red = np.bitwise_xor.reduce(np.frombuffer(buf, dtype=np.uint8).reshape(len(idx), n, size), axis=1)
        for j, i in enumerate(idx):
            out[i] = red[j].tobytes()
    return out  # type: ignore[return-value]


class _Bin:
    __slots__ = ("layer", "seqs", "packets", "deadline", "lazy")

    def __init__(self, layer: int) -> None:
        self.layer = layer
        self.seqs: list[int] = []
        self.packets: list[bytes] = []
        self.deadline = 0.0
        self.lazy = False  # every packet in it is lazy

    def take(self) -> tuple[int, tuple[int, ...], list[bytes]]:
        seqs, packets = tuple(self.seqs), self.packets
        self.seqs, self.packets = [], []
        return self.layer, seqs, packets


@dataclass
class EncoderStats:
    """Encoder counters: packets added, repairs emitted (full bins and timer flushes)."""

    packets: int = 0
    bytes: int = 0
    repairs: int = 0
    flushed: int = 0
    held: int = 0
    """Timer runs that found a due bin and no credit (``budgeted`` only)."""


class Encoder:
    """Builds repairs for a stream of numbered packets (see the module docstring).

    ``add`` takes packets with strictly increasing ``seq``; bins keep references to the packets
    (no copy) until their repair is emitted, at most ``sum(interleaves) * (r - 1)`` packets.
    """

    def __init__(self, params: FecParams | None = None) -> None:
        self.params = params or FecParams()
        self.stats = EncoderStats()
        self._bins = [[_Bin(k) for _ in range(i)] for k, i in enumerate(self.params.interleaves)]
        self._open: dict[int, _Bin] = {}  # id(bin) -> bin, in the order the bins opened
        self._last_seq = -1
        self._flush_s = self.params.flush_s
        self.budgeted = False
        """Flush due bins only on credit (see the module docstring); the gateway sets it."""
        self._earn = CREDIT_EARN * self.params.c
        self._cost = CREDIT_COST * self.params.r
        self._credit_cap = self._cost * sum(self.params.interleaves)
        self.credit = 0
        """Units in hand: ``5 c`` per packet added, ``- 4 r`` per repair, at most one repair per bin."""

    def add(self, seq: int, packet: bytes, now: float, lazy: bool = False) -> list[Repair]:
        """Add packet ``seq`` (sent at ``now``, s; ``lazy``: see the module docstring); return the
        repairs it completes."""
        full = self._place(seq, packet, now, lazy)
        if not full:
            return full  # (a new empty list)
        return [self._emit(b, xor_packets(b[2])) for b in full]

    def add_many(self, first_seq: int, packets: Sequence[bytes], now: float,
                 lazy: Sequence[bool] | None = None) -> list[Repair]:
        """Add ``packets`` numbered ``first_seq, first_seq + 1, ...`` (``lazy[i]`` each); XOR all
        completed bins in one batched numpy call (:func:`xor_many`). Same result as :meth:`add`."""
        full = []
        for i, p in enumerate(packets):
            full.extend(self._place(first_seq + i, p, now, bool(lazy[i]) if lazy is not None else False))
        return [self._emit(b, x) for b, x in zip(full, xor_many([b[2] for b in full]), strict=True)]

    def get_timer(self) -> float | None:
        """When (s) :meth:`handle_timer` must next run: the deadline of the oldest open bin that may
        flush then, or None (no bin open, or, when ``budgeted`` and out of credit, only lazy ones:
        the next packet's credit may let one flush)."""
        free = not self.budgeted or self.credit >= self._cost
        for b in self._open.values():
            if free or not b.lazy:
                return b.deadline
        return None

    def handle_timer(self, now: float) -> list[Repair]:
        """Flush the open bins whose deadline is at or before ``now``, oldest first; when
        ``budgeted``, a lazy one only while the credit lasts (``held`` counts those left open)."""
        out = []
        for key, b in list(self._open.items()):
            if b.deadline > now:
                break
            if self.budgeted and b.lazy and self.credit < self._cost:
                self.stats.held += 1
                continue
            del self._open[key]
            self.credit -= self._cost
            taken = b.take()
            out.append(self._emit(taken, xor_packets(taken[2])))
        self.stats.flushed += len(out)
        return out

    def flush(self) -> list[Repair]:
        """Flush every open bin now (e.g. on shutdown)."""
        return self._flush(list(self._open))

    @property
    def open_bins(self) -> int:
        """Number of non-empty bins."""
        return len(self._open)

    def _flush(self, keys: list[int]) -> list[Repair]:
        out = []
        for key in keys:
            b = self._open.pop(key)
            self.credit -= self._cost
            taken = b.take()
            out.append(self._emit(taken, xor_packets(taken[2])))
        self.stats.flushed += len(out)
        return out

    def _place(self, seq: int, packet: bytes, now: float, lazy: bool = False
               ) -> list[tuple[int, tuple[int, ...], list[bytes]]]:
        if not _is_int(seq) or not self._last_seq < seq < SEQ_LIMIT:
            raise ValueError(f"seq must increase and be < 2**64: {seq!r} after {self._last_seq}")
        size = len(packet)
        if not 1 <= size <= MAX_PACKET:
            raise ValueError(f"packet length must be 1..{MAX_PACKET} bytes, got {size}")
        self._last_seq = seq
        stats = self.stats
        stats.packets += 1
        stats.bytes += size
        self.credit = min(self.credit + self._earn, self._credit_cap)
        r = self.params.r
        full = []
        for layer in self._bins:
            b = layer[seq % len(layer)]
            seqs = b.seqs
            if not seqs:
                b.deadline = now + self._flush_s
                b.lazy = lazy
                self._open[id(b)] = b
            elif not lazy:
                b.lazy = False
            seqs.append(seq)
            b.packets.append(packet)
            if len(seqs) == r:
                del self._open[id(b)]
                self.credit -= self._cost  # spent as the bin fills (as C does), not when add_many XORs it
                full.append(b.take())
        return full

    def _emit(self, taken: tuple[int, tuple[int, ...], list[bytes]], xor: bytes) -> Repair:
        layer, seqs, packets = taken
        self.stats.repairs += 1
        return _trusted_repair(layer, seqs, tuple(map(len, packets)), xor)


@dataclass
class DecoderStats:
    """Decoder counters (packets unless named otherwise).

    ``received``: new data packets; ``duplicates``: data already received or rebuilt;
    ``late``: data below the window; ``rebuilt``: packets rebuilt from repairs; ``lost``:
    sequence numbers that left the window neither received nor rebuilt (counted from the first
    sequence number seen); ``skipped``: sequence numbers jumped over by a jump of a window or
    more (a restarted egress, or an outage longer than the window: not counted in ``lost``); ``repairs``: repairs received; ``repairs_useless``: nothing missing;
    ``repairs_stale``: covering a packet below the window; ``repairs_duplicate``;
    ``repairs_inconsistent``: a covered packet's length differs from the repair's;
    ``repairs_expired``: pending repairs dropped unused.
    """

    received: int = 0
    duplicates: int = 0
    late: int = 0
    rebuilt: int = 0
    lost: int = 0
    skipped: int = 0
    repairs: int = 0
    repairs_useless: int = 0
    repairs_stale: int = 0
    repairs_duplicate: int = 0
    repairs_inconsistent: int = 0
    repairs_expired: int = 0


@dataclass(eq=False)
class _Pending:
    repair: Repair
    missing: set[int] = field(default_factory=set)


class Decoder:
    """Rebuilds lost packets from the repairs of an :class:`Encoder` with the same ``params``.

    Keeps the packets (received or rebuilt) whose seq is within ``window`` of the highest seen
    and the repairs still missing two or more packets (at most ``c * window``). A repair that
    misses exactly one packet rebuilds it at once; the rebuilt packet may complete other
    pending repairs (cascade). Everything below the window is forgotten: a repair covering it
    is ignored, so a packet is never rebuilt twice nor reported after it was received.
    Duplicate and reordered packets and repairs are harmless. With ``c = 0`` no repair is kept
    pending (``c * window`` = 0): a peer sends none, and one that arrives anyway only rebuilds
    the packet it misses when it misses exactly one.
    """

    def __init__(self, params: FecParams | None = None, window: int = 2048) -> None:
        self.params = params or FecParams()
        if not _is_int(window) or window < max(1, 2 * self.params.span):
            raise ValueError(f"window must be an integer >= 2 * r * max(interleaves) and >= 1, got {window!r}")
        self.window = window
        self.max_repairs = self.params.c * window
        self.stats = DecoderStats()
        self._packets: dict[int, bytes] = {}
        self._heap: list[int] = []  # seqs of _packets
        self._pending: dict[tuple[int, tuple[int, ...]], _Pending] = {}  # insertion ordered
        self._waiting: dict[int, list[_Pending]] = {}  # missing seq -> pending repairs
        self._high = -1
        self._low = 0  # every seq < _low is forgotten
        self._floor = -1  # first seq seen: losses are counted from here

    def has(self, seq: int) -> bool:
        """Whether packet ``seq`` was received or rebuilt and is still in the window."""
        return seq in self._packets

    def get(self, seq: int) -> bytes | None:
        """Packet ``seq`` when held, else None."""
        return self._packets.get(seq)

    @property
    def low(self) -> int:
        """Lowest sequence number still in the window."""
        return self._low

    def on_data(self, seq: int, packet: bytes, now: float) -> list[tuple[int, bytes]]:
        """Take data packet ``seq``; return the packets it lets the decoder rebuild.

        ``now`` (s) is accepted for symmetry with the encoder; state expires by sequence
        number and count, not by time. The packet itself is never in the result.
        """
        self._advance(seq)
        if seq < self._low:
            self.stats.late += 1
            return []
        if seq in self._packets:
            self.stats.duplicates += 1
            return []
        self.stats.received += 1
        out: list[tuple[int, bytes]] = []
        self._store(seq, packet, out)
        return out

    def on_repair(self, repair: Repair, now: float) -> list[tuple[int, bytes]]:
        """Take ``repair``; return the packets rebuilt thanks to it (with cascades)."""
        self.stats.repairs += 1
        if repair.last - repair.first >= self.window:
            self.stats.repairs_stale += 1
            return []
        self._advance(repair.last)
        if repair.first < self._low:
            self.stats.repairs_stale += 1
            return []
        key = (repair.layer, repair.seqs)
        if key in self._pending:
            self.stats.repairs_duplicate += 1
            return []
        missing = {s for s in repair.seqs if s not in self._packets}
        out: list[tuple[int, bytes]] = []
        if not missing:
            self.stats.repairs_useless += 1
        elif len(missing) == 1:
            self._rebuild(repair, missing.pop(), out)
        else:
            p = _Pending(repair, missing)
            self._pending[key] = p
            for s in missing:
                self._waiting.setdefault(s, []).append(p)
            self._bound_repairs()
        return out

    def missing_in_window(self) -> int:
        """Sequence numbers between the first seen (or the window's low) and the highest seen
        that are neither received nor rebuilt: on shutdown, the packets lost for good."""
        lo = max(self._low, self._floor)
        if self._high < lo:
            return 0
        return (self._high - lo + 1) - sum(1 for s in self._packets if s >= lo)

    def _store(self, seq: int, packet: bytes, out: list[tuple[int, bytes]]) -> None:
        """Hold ``seq`` and cascade through the repairs that were waiting for it."""
        self._packets[seq] = packet
        heapq.heappush(self._heap, seq)
        work = [seq] if self._waiting else []  # (nothing waits: nothing to cascade)
        while work:
            for p in self._waiting.pop(work.pop(), ()):
                p.missing = {m for m in p.missing if m not in self._packets}
                if len(p.missing) == 1:
                    (m,) = p.missing
                    self._drop_pending(p)
                    rebuilt = self._xor(p.repair, m)
                    if rebuilt is not None:
                        self._hold(m, rebuilt)
                        self.stats.rebuilt += 1
                        out.append((m, rebuilt))
                        work.append(m)
                elif not p.missing:
                    self._drop_pending(p)
        if len(self._packets) > self.window:
            self._bound_packets()

    def _hold(self, seq: int, packet: bytes) -> None:
        self._packets[seq] = packet
        heapq.heappush(self._heap, seq)

    def _rebuild(self, repair: Repair, seq: int, out: list[tuple[int, bytes]]) -> None:
        rebuilt = self._xor(repair, seq)
        if rebuilt is not None:
            self.stats.rebuilt += 1
            out.append((seq, rebuilt))
            self._store(seq, rebuilt, out)

    def _xor(self, repair: Repair, seq: int) -> bytes | None:
        """Packet ``seq`` from ``repair`` and its other packets (all held), or None."""
        if repair.first < self._low:
            return None
        others = []
        length = 0
        for s, n in zip(repair.seqs, repair.lengths, strict=True):
            if s == seq:
                length = n
                continue
            pkt = self._packets.get(s)
            if pkt is None or len(pkt) != n:
                self.stats.repairs_inconsistent += 1
                return None
            others.append(pkt)
        return xor_packets([repair.xor, *others], len(repair.xor))[:length]

    def _drop_pending(self, p: _Pending) -> None:
        self._pending.pop((p.repair.layer, p.repair.seqs), None)
        for s in p.repair.seqs:
            lst = self._waiting.get(s)
            if lst is not None and p in lst:
                lst.remove(p)
                if not lst:
                    del self._waiting[s]

    def _advance(self, seq: int) -> None:
        """Note ``seq`` as seen; slide the window when it is the highest so far."""
        if seq <= self._high:
            return
        if self._floor < 0:
            self._floor = seq
            self._low = max(0, seq - self.window + 1)
        elif seq - self._high >= self.window:
            self.stats.skipped += seq - self._high - 1
            self._floor = seq  # a restarted egress or a long outage: the gap is not counted as lost
        prev = self._high
        self._high = seq
        self._raise_low(seq - self.window + 1, prev)

    def _raise_low(self, new_low: int, prev_high: int) -> None:
        if new_low <= self._low:
            return
        old = self._low
        self._low = new_low
        held = 0
        heap, packets, floor = self._heap, self._packets, self._floor
        while heap and heap[0] < new_low:
            s = heapq.heappop(heap)
            if packets.pop(s, None) is not None and s >= floor:
                held += 1
        start, end = max(old, floor), min(new_low, prev_high + 1)
        if end > start:
            self.stats.lost += (end - start) - held
        if self._pending:
            self._expire_repairs()

    def _expire_repairs(self) -> None:
        while self._pending:
            p = next(iter(self._pending.values()))
            if p.repair.first >= self._low:
                break
            self.stats.repairs_expired += 1
            self._drop_pending(p)

    def _bound_packets(self) -> None:
        while len(self._packets) > self.window:
            self._raise_low(self._heap[0] + 1, self._high)

    def _bound_repairs(self) -> None:
        while len(self._pending) > self.max_repairs:
            self.stats.repairs_expired += 1
            self._drop_pending(next(iter(self._pending.values())))


def encode_all(
    params: FecParams, packets: Iterable[tuple[int, bytes]], now: float = 0.0
) -> tuple[list[tuple[int, bytes]], list[Repair]]:
    """Encode ``packets`` (seq, bytes) at time ``now`` and flush: (the packets, every repair).
    A helper for tests and benchmarks."""
    enc = Encoder(params)
    pkts = list(packets)
    repairs: list[Repair] = []
    for seq, p in pkts:
        repairs.extend(enc.add(seq, p, now))
    repairs.extend(enc.flush())
    return pkts, repairs
