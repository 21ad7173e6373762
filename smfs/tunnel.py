"""Wire format of the UDP tunnel between the two gateways. Pure: bytes in, messages out.

Every datagram (integers big-endian)::

    0      1        2     3     4
    magic  version  kind  site  body...                      mac (16 bytes)

- ``magic`` 0xA7, ``version`` 1, ``kind`` 1 = DATA, 2 = REPAIR, ``site`` the sender's site id
  (0..255).
- DATA body: ``seq`` u64 (the tunnel sequence number), then the inner IP packet, unaltered.
- REPAIR body: ``layer`` u8, ``n`` u8 (1..64 packets), ``first`` u64, ``n - 1`` u32 deltas of
  the other covered seqs from ``first`` (strictly increasing), ``n`` u16 lengths (1..65535
  bytes), then the XOR, exactly as long as the longest length.
- ``mac``: HMAC-SHA-256 under the testbed key over everything before it, truncated to 16 bytes.

:func:`decode` checks, in order: size (``short``, ``oversize``), ``bad magic``,
``bad version``, ``bad mac``, ``foreign site``, then the body (``bad kind``,
``malformed lengths``); any failure raises :class:`TunnelError` and nothing else does, for
any input bytes.

Replay. DATA carries a unique seq: the ingress gateway checks it against a
:class:`ReplayWindow` (a sliding bitmap as in IPsec, RFC 4303 section 3.4.3) after the MAC,
and also marks the seqs the decoder rebuilds (:meth:`ReplayWindow.mark_rebuilt`), so a late
original of a rebuilt packet is dropped as a duplicate; :meth:`ReplayWindow.late_after_rebuild`
tells that first late original (ordinary reordering behind a WAN loss) from a replay. REPAIR datagrams are not replay-checked: they carry no unique number,
and a replayed repair is harmless: the decoder ignores repairs below its window, drops
duplicates, and can only rebuild a packet absent from its window, whose content the MAC
guarantees is the peer's. The egress must start its seq above any it used before (e.g. the
boot time in µs, ``time.time_ns() // 1000``) so that a restarted gateway is not taken for a
replay. A restarted *ingress* accepts, once, datagrams recorded before its restart; TCP drops
those as old segments.
"""

from __future__ import annotations

import hashlib
import hmac
import operator
import struct
from dataclasses import dataclass
from functools import lru_cache

from smfs.fec import MAX_PACKET, MAX_R, SEQ_LIMIT, Repair, _trusted_repair

MAGIC = 0xA7
VERSION = 1
KIND_DATA = 1
KIND_REPAIR = 2
MAC_LEN = 16
"""Bytes of HMAC-SHA-256 kept."""
MAX_DATAGRAM = 65507
"""Largest UDP payload over IPv4 (bytes)."""
MIN_KEY = 16
"""Shortest accepted key (bytes)."""

_HEAD = struct.Struct("!BBBB")
_SEQ = struct.Struct("!Q")
_REPAIR_HEAD = struct.Struct("!BBQ")
_DATA_HEAD = struct.Struct("!BBBBQ")
_DATA_OFF = _DATA_HEAD.size
_MIN_LEN = _HEAD.size + MAC_LEN


class TunnelError(Exception):
    """A datagram that is not a valid tunnel message; ``reason`` is a short tag
    (short, oversize, bad magic, bad version, bad mac, foreign site, bad kind, malformed lengths)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class DataMsg:
    """A tunnelled IP packet: ``seq`` (u64) from site ``site``."""

    site: int
    seq: int
    packet: bytes


@dataclass(frozen=True, slots=True)
class RepairMsg:
    """A repair from site ``site``."""

    site: int
    repair: Repair


_BLOCK = 64
"""SHA-256 block size (bytes): the HMAC key is padded (or first hashed) to it."""
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


@lru_cache(maxsize=16)
def _mac_states(key: bytes) -> tuple[hashlib._Hash, hashlib._Hash]:
    """HMAC-SHA-256 (RFC 2104) under ``key``: the SHA-256 states after the inner and the outer
    key blocks, computed once per key; a MAC copies them instead of re-keying per datagram."""
    if not isinstance(key, bytes) or len(key) < MIN_KEY:
        raise ValueError(f"tunnel key must be at least {MIN_KEY} bytes")
    block = (hashlib.sha256(key).digest() if len(key) > _BLOCK else key).ljust(_BLOCK, b"\0")
    return hashlib.sha256(block.translate(_IPAD)), hashlib.sha256(block.translate(_OPAD))


def _mac(key: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA-256 under ``key`` of the concatenated ``parts``, truncated to :data:`MAC_LEN`."""
    inner, outer = _mac_states(key)
    h = inner.copy()
    for p in parts:
        h.update(p)
    o = outer.copy()
    o.update(h.digest())
    return o.digest()[:MAC_LEN]


def _check_site(site: int) -> None:
    if not isinstance(site, int) or not 0 <= site <= 255:
        raise ValueError(f"site must be 0..255, got {site!r}")


def encode_data(seq: int, packet: bytes, site: int, key: bytes) -> bytes:
    """DATA datagram carrying ``packet`` (1..65535 bytes) as tunnel seq ``seq`` (u64)."""
    _check_site(site)
    if not 0 <= seq < SEQ_LIMIT:
        raise ValueError(f"seq must be a u64, got {seq!r}")
    if not 1 <= len(packet) <= MAX_DATAGRAM - _MIN_LEN - _SEQ.size:
        raise ValueError(f"packet length {len(packet)} does not fit a tunnel datagram")
    head = _DATA_HEAD.pack(MAGIC, VERSION, KIND_DATA, site, seq)
    inner, outer = _mac_states(key)
    h = inner.copy()
    h.update(head)
    h.update(packet)
    o = outer.copy()
    o.update(h.digest())
    return b"".join((head, packet, o.digest()[:MAC_LEN]))


def encode_repair(repair: Repair, site: int, key: bytes) -> bytes:
    """REPAIR datagram carrying ``repair``."""
    _check_site(site)
    n, first = len(repair.seqs), repair.first
    if n > MAX_R or not 0 <= repair.layer <= 255:
        raise ValueError(f"repair does not fit the wire format: {n} packets, layer {repair.layer}")
    if not (0 <= first and repair.last < SEQ_LIMIT and repair.last - first < 1 << 32):
        raise ValueError("repair seqs must be u64 within 2**32 of each other")
    body = b"".join(
        (
            _HEAD.pack(MAGIC, VERSION, KIND_REPAIR, site),
            _REPAIR_HEAD.pack(repair.layer, n, first),
            _table(n).pack(*(s - first for s in repair.seqs[1:]), *repair.lengths),
            repair.xor,
        )
    )
    if len(body) + MAC_LEN > MAX_DATAGRAM:
        raise ValueError("repair too large for a datagram")
    return body + _mac(key, body)


class Sealer:
    """:func:`encode_data` and :func:`encode_repair` bound to one ``key`` and ``site`` (checked
    once): the same datagrams, for the gateway's per-packet path."""

    __slots__ = ("site", "_inner", "_outer", "_data_head", "_repair_head")

    def __init__(self, key: bytes, site: int) -> None:
        _check_site(site)
        self.site = site
        self._inner, self._outer = _mac_states(key)
        self._data_head = _HEAD.pack(MAGIC, VERSION, KIND_DATA, site)
        self._repair_head = _HEAD.pack(MAGIC, VERSION, KIND_REPAIR, site)

    def data(self, seq: int, packet: bytes) -> bytes:
        """``encode_data(seq, packet, site, key)``."""
        if not 0 <= seq < SEQ_LIMIT:
            raise ValueError(f"seq must be a u64, got {seq!r}")
        if not 1 <= len(packet) <= MAX_DATAGRAM - _MIN_LEN - _SEQ.size:
            raise ValueError(f"packet length {len(packet)} does not fit a tunnel datagram")
        head = self._data_head + _SEQ.pack(seq)
        h = self._inner.copy()
        h.update(head)
        h.update(packet)
        o = self._outer.copy()
        o.update(h.digest())
        return b"".join((head, packet, o.digest()[:MAC_LEN]))

    def repair(self, repair: Repair) -> bytes:
        """``encode_repair(repair, site, key)``."""
        seqs = repair.seqs
        n, first, layer = len(seqs), seqs[0], repair.layer
        if n > MAX_R or not 0 <= layer <= 255:
            raise ValueError(f"repair does not fit the wire format: {n} packets, layer {layer}")
        if not (0 <= first and seqs[-1] < SEQ_LIMIT and seqs[-1] - first < 1 << 32):
            raise ValueError("repair seqs must be u64 within 2**32 of each other")
        body = b"".join(
            (
                self._repair_head,
                _REPAIR_HEAD.pack(layer, n, first),
                _table(n).pack(*[s - first for s in seqs[1:]], *repair.lengths),
                repair.xor,
            )
        )
        if len(body) + MAC_LEN > MAX_DATAGRAM:
            raise ValueError("repair too large for a datagram")
        h = self._inner.copy()
        h.update(body)
        o = self._outer.copy()
        o.update(h.digest())
        return body + o.digest()[:MAC_LEN]


@lru_cache(maxsize=MAX_R)
def _table(n: int) -> struct.Struct:
    """The repair table of ``n`` packets: ``n - 1`` u32 deltas, ``n`` u16 lengths."""
    return struct.Struct(f"!{n - 1}I{n}H")


def decode(datagram: bytes, key: bytes, expect_site: int | None = None) -> DataMsg | RepairMsg:
    """Parse and authenticate ``datagram``; raise :class:`TunnelError` when it is not a valid
    message under ``key`` (from site ``expect_site`` when given)."""
    site, seq, payload = decode_raw(datagram, key, expect_site)
    if seq is None:
        return RepairMsg(site, payload)  # type: ignore[arg-type]
    return DataMsg(site, seq, payload)  # type: ignore[arg-type]


def decode_raw(datagram: bytes, key: bytes, expect_site: int | None = None) -> tuple[int, int | None, bytes | Repair]:
    """:func:`decode` without the message object: ``(site, seq, packet)`` for DATA,
    ``(site, None, repair)`` for REPAIR; same checks, same :class:`TunnelError` reasons."""
    data = datagram if type(datagram) is bytes else bytes(datagram)
    size = len(data)
    if size < _MIN_LEN:
        raise TunnelError("short", f"{size} bytes")
    if size > MAX_DATAGRAM:
        raise TunnelError("oversize", f"{size} bytes")
    magic, version, kind, site = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise TunnelError("bad magic", f"0x{magic:02x}")
    if version != VERSION:
        raise TunnelError("bad version", str(version))
    end = size - MAC_LEN
    inner, outer = _mac_states(key)
    h = inner.copy()
    h.update(memoryview(data)[:end])
    o = outer.copy()
    o.update(h.digest())
    if not hmac.compare_digest(o.digest()[:MAC_LEN], data[end:]):
        raise TunnelError("bad mac")
    if expect_site is not None and site != expect_site:
        raise TunnelError("foreign site", f"{site} != {expect_site}")
    if kind == KIND_DATA:
        if end <= _DATA_OFF:
            raise TunnelError("malformed lengths", "data without packet")
        return site, _SEQ.unpack_from(data, _HEAD.size)[0], data[_DATA_OFF:end]
    if kind == KIND_REPAIR:
        return site, None, _decode_repair(data[:end])
    raise TunnelError("bad kind", str(kind))


def _decode_repair(body: bytes) -> Repair:
    off = _HEAD.size
    if len(body) < off + _REPAIR_HEAD.size:
        raise TunnelError("malformed lengths", "repair header")
    layer, n, first = _REPAIR_HEAD.unpack_from(body, off)
    off += _REPAIR_HEAD.size
    if not 1 <= n <= MAX_R:
        raise TunnelError("malformed lengths", f"{n} packets")
    table = _table(n)
    if len(body) < off + table.size:
        raise TunnelError("malformed lengths", "repair table")
    fields = table.unpack_from(body, off)
    off += table.size
    deltas, lengths = fields[: n - 1], fields[n - 1 :]
    if deltas and (deltas[0] <= 0 or not all(map(operator.lt, deltas, deltas[1:]))):
        raise TunnelError("malformed lengths", "seqs not increasing")
    if first + (deltas[-1] if deltas else 0) >= SEQ_LIMIT:
        raise TunnelError("malformed lengths", "seq overflow")
    longest = max(lengths)
    if min(lengths) < 1 or len(body) - off != longest or longest > MAX_PACKET:
        raise TunnelError("malformed lengths", "xor length")
    # Every field checked as Repair.__post_init__ would: build it without checking again.
    return _trusted_repair(layer, (first, *[first + d for d in deltas]), lengths, body[off:])


class ReplayWindow:
    """Sliding bitmap of the last ``size`` tunnel seqs seen (IPsec-style anti-replay).

    :meth:`check` says whether ``seq`` is new (not seen, not older than the window);
    :meth:`update` records it; call it only after the datagram's MAC was verified.
    :meth:`mark_rebuilt` records a seq the FEC decoder rebuilt before its original arrived;
    when :meth:`check` refuses a seq, :meth:`late_after_rebuild` says (once per seq) whether it
    is that late original rather than a replay.
    """

    def __init__(self, size: int = 4096) -> None:
        if not isinstance(size, int) or size < 64:
            raise ValueError(f"replay window size must be >= 64, got {size!r}")
        self.size = size
        self._top = -1
        self._bits = 0  # bit i set: seq (_top - i) seen
        self._mask = (1 << size) - 1
        self._rebuilt: set[int] = set()  # rebuilt seqs whose original has not arrived yet

    @property
    def top(self) -> int:
        """Highest seq recorded (-1 before the first)."""
        return self._top

    def check(self, seq: int) -> bool:
        """True when ``seq`` is neither already seen nor older than the window."""
        if seq > self._top:
            return True
        back = self._top - seq
        return back < self.size and not (self._bits >> back) & 1

    def update(self, seq: int) -> None:
        """Record ``seq`` as seen."""
        if seq > self._top:
            shift = seq - self._top
            self._bits = ((self._bits << shift) | 1) & self._mask if shift < self.size else 1
            self._top = seq
        else:
            back = self._top - seq
            if back < self.size:
                self._bits |= 1 << back

    def check_and_update(self, seq: int) -> bool:
        """:meth:`check`, then :meth:`update` when new; returns the check."""
        if not self.check(seq):
            return False
        self.update(seq)
        return True

    def mark_rebuilt(self, seq: int) -> None:
        """Record ``seq`` as seen, rebuilt by the FEC decoder: its original may still arrive late.

        Memory: the rebuilt seqs still in the window (older ones are pruned in bulk, amortised)."""
        self.update(seq)
        rebuilt = self._rebuilt
        rebuilt.add(seq)
        if len(rebuilt) > 2 * self.size:
            low = self._top - self.size
            self._rebuilt = {s for s in rebuilt if s > low}

    def late_after_rebuild(self, seq: int) -> bool:
        """For a ``seq`` that :meth:`check` refused: True when it was rebuilt and this is the
        first copy of its original (not a replay); a later copy is a replay (False)."""
        rebuilt = self._rebuilt
        if seq in rebuilt:
            rebuilt.discard(seq)
            return True
        return False
