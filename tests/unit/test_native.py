"""Differential tests: the C core (:mod:`smfs.native`) against the Python executable specification.

Both implementations get the same seeded traces (iid and burst losses, reordering, duplicates,
flows starting mid-stream, SYN/FIN/RST, timer flushes at chosen times, hostile datagrams) and
must answer the same: the same repairs in the same order, the same rebuilt packets, datagrams,
rejection reasons, replay verdicts, callbacks and counters. The datagram fuzz runs the C
ingress path (unseal, replay window, decoder) under AddressSanitizer + UBSan in a subprocess
(libasan preloaded), differentially against Python, and the C fuzz driver likewise.

Run as a script (``python tests/unit/test_native.py fuzz N SEED``) it is the fuzz body.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from smfs import callbacks, fec, native, tunnel
from smfs.callbacks import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Flow
from smfs.fec import FecParams, Repair, _trusted_repair

ROOT = Path(__file__).resolve().parents[2]
KEY = b"differential-key-0123456789abcdef"
DEFAULT = FecParams()
SMALL = FecParams(r=4, c=2, interleaves=(1, 5), flush_ms=2.0)
C0 = FecParams(c=0, interleaves=())  # no FEC
C1 = FecParams(c=1, interleaves=(1,))
C2 = FecParams(c=2, interleaves=(1, 11))
Event = tuple  # ("d", seq, packet) | ("r", Repair)


@pytest.fixture(scope="module", autouse=True)
def _library() -> None:
    try:
        native.load()
    except native.NativeError as err:
        if "not found" in str(err):
            pytest.skip(str(err))
        raise


# -- FEC: encoder ---------------------------------------------------------------------------


def encoder_trace(params: FecParams, n: int, seed: int, rate: float, sizes: Callable[[random.Random], int],
                  budgeted: bool = False) -> None:
    """Drive both encoders with the same packets, times and timer calls; compare every answer.
    ``budgeted``: both start budgeted and the trace turns it off and on again now and then."""
    rng = random.Random(seed)
    py, c = fec.Encoder(params), native.Encoder(params)
    py.budgeted = c.budgeted = budgeted
    seq, now = rng.choice([0, 1, 2**40, 2**64 - 4 * n - 10]), 0.0
    for i in range(n):
        now += rng.expovariate(rate)
        if budgeted and rng.random() < 0.01:
            py.budgeted = c.budgeted = not py.budgeted
        assert c.credit == py.credit
        timer = py.get_timer()
        assert c.get_timer() == timer
        if timer is not None and rng.random() < 0.7:
            # the timer as armed (exactly at the deadline), a little early, or late
            at = rng.choice([timer, timer, timer - 1e-9, timer + rng.random() * params.flush_s, now])
            assert c.handle_timer(at) == py.handle_timer(at), f"handle_timer({at}) at packet {i}"
        seq += rng.choice([1, 1, 1, 1, 2, 7])
        pkt = rng.randbytes(sizes(rng))
        lazy = budgeted and rng.random() < 0.8  # mostly ACKs, now and then a packet that is not
        assert c.add(seq, pkt, now, lazy) == py.add(seq, pkt, now, lazy), f"add({seq}) at packet {i}"
        assert c.open_bins == py.open_bins
    assert c.flush() == py.flush()
    assert c.stats == py.stats and c.get_timer() is None and c.open_bins == 0


@pytest.mark.parametrize(
    "params",
    [DEFAULT, SMALL, FecParams(r=1, c=1, interleaves=(1,)), FecParams(r=64, c=3, interleaves=(1, 2, 5), flush_ms=0.5),
     FecParams(r=8, c=8, interleaves=(1, 2, 3, 5, 8, 13, 21, 34), flush_ms=1000.0), C0, C1, C2],
    ids=["default", "r4c2", "r1c1", "r64", "c8", "c0", "c1", "c2"],
)
@pytest.mark.parametrize("rate", [500.0, 20000.0, 1e6])
def test_encoder_same_repairs(params: FecParams, rate: float) -> None:
    encoder_trace(params, 1500, seed=int(rate) + params.r, rate=rate, sizes=lambda r: r.choice([1, 40, 1400, r.randint(1, 1500)]))


@pytest.mark.parametrize("params", [DEFAULT, SMALL, FecParams(r=1, c=1, interleaves=(1,)), C0, C2], ids=str)
@pytest.mark.parametrize("rate", [200.0, 5000.0, 1e6])
def test_budgeted_encoder_same_repairs(params: FecParams, rate: float) -> None:
    """The repair budget (fec.py's flush rule without a subscriber) in C: the same credit, the
    same held flushes, the same repairs, also when the gateway turns it on and off mid-stream."""
    encoder_trace(params, 1500, seed=int(rate) + 7 * params.r, rate=rate, budgeted=True,
                  sizes=lambda r: r.choice([1, 52, 1400, r.randint(1, 1500)]))


def test_encoder_large_packets_and_batches() -> None:
    encoder_trace(DEFAULT, 300, seed=3, rate=5000.0, sizes=lambda r: r.choice([65535, 1, r.randint(1, 65535)]))
    rng = random.Random(4)
    py, c = fec.Encoder(DEFAULT), native.Encoder(DEFAULT)
    for first in range(0, 3000, 256):
        pkts = [rng.randbytes(rng.randint(1, 1500)) for _ in range(256)]
        assert c.add_many(first, pkts, first / 1e4) == py.add_many(first, pkts, first / 1e4)
    py.budgeted = c.budgeted = True  # and with lazy flags, the held bins flushed by the same timer runs
    for first in range(3200, 6400, 300):
        pkts = [rng.randbytes(rng.randint(1, 1500)) for _ in range(rng.randint(1, 256))]
        lazy = [rng.random() < 0.9 for _ in pkts]
        assert c.add_many(first, pkts, first / 1e4, lazy) == py.add_many(first, pkts, first / 1e4, lazy)
        assert c.get_timer() == py.get_timer() and c.credit == py.credit
        assert c.handle_timer(first / 1e4 + 0.004) == py.handle_timer(first / 1e4 + 0.004)
    assert c.stats == py.stats
    assert c.flush() == py.flush()


def test_encoder_rejects_as_python() -> None:
    py, c = fec.Encoder(), native.Encoder()
    assert c.add(10, b"x", 0.0) == py.add(10, b"x", 0.0)
    for seq, pkt in [(10, b"x"), (9, b"x"), (11, b""), (11, bytes(65536)), (-1, b"x"), (2**64, b"x")]:
        with pytest.raises(ValueError):
            py.add(seq, pkt, 0.0)
        with pytest.raises(ValueError):
            c.add(seq, pkt, 0.0)
    assert c.add(11, b"y", 0.0) == py.add(11, b"y", 0.0)  # nothing changed by the refusals
    assert c.stats == py.stats and c.flush() == py.flush()
    with pytest.raises(ValueError):
        native.Encoder(FecParams(r=8, c=1, interleaves=(4096,)))  # C bound: interleaves <= 2048


def test_c0_encoder_and_windows_as_python() -> None:
    """c = 0: packets numbered (the same refusals), never a repair, no timer; the decoder's
    window only needs to be >= 1."""
    py, c = fec.Encoder(C0), native.Encoder(C0)
    for seq in (5, 6, 100):
        assert c.add(seq, b"x" * seq, 0.0) == py.add(seq, b"x" * seq, 0.0) == []
    with pytest.raises(ValueError):
        c.add(100, b"x", 0.0)
    assert c.add_many(200, [b"y"] * 300, 1.0) == [] and c.get_timer() is None and c.handle_timer(9.0) == []
    assert c.flush() == [] and c.stats == fec.EncoderStats(packets=303, bytes=111 + 300, repairs=0, flushed=0)
    for window, ok in ((0, False), (1, True), (64, True)):
        for cls in (fec.Decoder, native.Decoder):
            if ok:
                assert cls(C0, window).window == window
            else:
                with pytest.raises(ValueError):
                    cls(C0, window)
    for params in (C1, C2):  # the other bounds are unchanged
        with pytest.raises(ValueError):
            native.Decoder(params, 2 * params.span - 1)
        native.Decoder(params, 2 * params.span)


# -- FEC: decoder ---------------------------------------------------------------------------


def stream(params: FecParams, n: int, seed: int, first: int = 0, rate: float = 20000.0,
           sizes: tuple[int, int] = (1, 1500)) -> list[Event]:
    """What the egress sends: each packet then the repairs it completes, timer flushes when due."""
    rng = random.Random(seed)
    enc = fec.Encoder(params)
    events: list[Event] = []
    now = 0.0
    for i in range(n):
        now += rng.expovariate(rate)
        while (deadline := enc.get_timer()) is not None and deadline <= now:
            events += [("r", rep) for rep in enc.handle_timer(deadline)]
        pkt = rng.randbytes(rng.randint(*sizes))
        events.append(("d", first + i, pkt))
        events += [("r", rep) for rep in enc.add(first + i, pkt, now)]
    return events + [("r", rep) for rep in enc.flush()]


def iid(events: list[Event], rng: random.Random, p: float) -> list[Event]:
    return [e for e in events if rng.random() >= p]


def bursts(events: list[Event], rng: random.Random, p_start: float, mean: float) -> list[Event]:
    """Gilbert-Elliott: a burst starts with probability p_start and lasts ``mean`` events on average."""
    out, bad = [], False
    for e in events:
        bad = rng.random() >= 1 / mean if bad else rng.random() < p_start
        if not bad:
            out.append(e)
    return out


def reorder(events: list[Event], rng: random.Random, p: float, dist: int) -> list[Event]:
    out = list(events)
    for i in range(len(out)):
        if rng.random() < p:
            j = min(len(out) - 1, i + rng.randint(1, dist))
            out[i], out[j] = out[j], out[i]
    return out


def duplicate(events: list[Event], rng: random.Random, p: float) -> list[Event]:
    out = list(events)
    for i, e in enumerate(events):
        if rng.random() < p:
            out.insert(min(len(out), i + rng.randint(0, 60)), e)
    return out


def same_decoder(py: fec.Decoder, c: native.Decoder) -> None:
    assert c.stats == py.stats
    assert c.low == py.low
    assert c.missing_in_window() == py.missing_in_window()
    assert c.nomem == 0


def run_decoders(params: FecParams, window: int, events: list[Event], seed: int = 0) -> fec.Decoder:
    """Feed both decoders the same events; every answer and the state must agree."""
    py, c = fec.Decoder(params, window), native.Decoder(params, window)
    rng = random.Random(seed)
    for i, ev in enumerate(events):
        if ev[0] == "d":
            a, b = py.on_data(ev[1], ev[2], 0.0), c.on_data(ev[1], ev[2], 0.0)
        else:
            a, b = py.on_repair(ev[1], 0.0), c.on_repair(ev[1], 0.0)
        assert b == a, f"event {i} ({ev[0]} {ev[1] if ev[0] == 'd' else ev[1].seqs}): C {b!r:.200} != Python {a!r:.200}"
        if i % 101 == 0:
            same_decoder(py, c)
            s = py.low + rng.randrange(window) if rng.random() < 0.9 else rng.randrange(2**64)
            assert c.has(s) == py.has(s) and c.get(s) == py.get(s)
    same_decoder(py, c)
    return py


CHANNELS: dict[str, Callable[[list[Event], random.Random], list[Event]]] = {
    "in-order": lambda ev, rng: ev,
    "iid-1%": lambda ev, rng: iid(ev, rng, 0.01),
    "iid-5%": lambda ev, rng: iid(ev, rng, 0.05),
    "iid-20%": lambda ev, rng: iid(ev, rng, 0.20),
    "bursts-8": lambda ev, rng: bursts(ev, rng, 0.01, 8),
    "bursts-25": lambda ev, rng: bursts(ev, rng, 0.005, 25),
    "reorder-dup": lambda ev, rng: duplicate(reorder(iid(ev, rng, 0.03), rng, 0.1, 40), rng, 0.05),
    "repairs-first": lambda ev, rng: [e for i in range(0, len(ev), 50) for e in sorted(ev[i:i + 50], key=lambda e: e[0] == "d")],
    "mid-stream": lambda ev, rng: iid(ev[700:], rng, 0.02),
    "heavy-reorder": lambda ev, rng: reorder(bursts(ev, rng, 0.02, 5), rng, 0.5, 300),
}


@pytest.mark.parametrize("channel", sorted(CHANNELS))
@pytest.mark.parametrize("params,window", [(DEFAULT, 2048), (DEFAULT, 304), (SMALL, 40), (C0, 64), (C1, 16), (C2, 176)],
                         ids=["w2048", "w304", "small", "c0", "c1", "c2"])
def test_decoder_same_output(channel: str, params: FecParams, window: int) -> None:
    seed = sum(map(ord, channel)) + window
    rng = random.Random(seed)
    events = CHANNELS[channel](stream(params, 2500, seed, first=rng.choice([0, 10**12, 2**64 - 3000])), rng)
    py = run_decoders(params, window, events, seed)
    if channel == "in-order":
        assert py.stats.rebuilt == 0 and py.stats.lost == 0
    if params.c == 0:  # nothing to rebuild from: every loss is for good
        assert py.stats.rebuilt == py.stats.repairs == 0
        if channel.startswith("iid"):
            assert py.stats.lost > 0


def test_decoder_jumps_restarts_and_late_streams() -> None:
    """A restarted egress (a jump of more than a window), then an old stream's packets (late),
    then a jump back inside the window: skipped, late and lost counted alike."""
    rng = random.Random(11)
    a = iid(stream(DEFAULT, 1200, 1, first=5000), rng, 0.05)
    b = iid(stream(DEFAULT, 1200, 2, first=10**9), rng, 0.05)
    c = stream(DEFAULT, 400, 3, first=6000)  # seqs far below: late data, stale repairs
    d = reorder(stream(DEFAULT, 800, 4, first=10**9 + 1500), rng, 0.2, 50)
    run_decoders(DEFAULT, 2048, a + b + c + d)
    run_decoders(DEFAULT, 304, a + b + c + d)


def random_repair(rng: random.Random, center: int, lengths_of: Callable[[int], int]) -> Repair:
    n = rng.choice([1, 2, 2, 3, 8, rng.randint(1, 64)])
    spread = rng.choice([n, 20, 300, 3000, 2**33])
    lo = max(0, center + rng.randint(-400, 200))
    seqs = sorted(rng.sample(range(lo, lo + max(spread, n)), n)) if spread < 10**6 else sorted({lo, *(lo + rng.randrange(spread) for _ in range(n - 1))})
    lengths = tuple(lengths_of(s) if rng.random() < 0.85 else rng.randint(1, 300) for s in seqs)
    return _trusted_repair(rng.choice([0, 1, 2, 2, 7, 255, 300]), tuple(seqs), lengths, rng.randbytes(max(lengths)))


@pytest.mark.parametrize("seed", range(4))
def test_decoder_hostile_repairs(seed: int) -> None:
    """Repairs no encoder would send (any layer, span, lengths that lie, duplicates) mixed with
    data around a moving window: both decoders account for them the same way."""
    rng = random.Random(seed)

    def length_of(s: int) -> int:
        return s * 7919 % 300 + 1

    events: list[Event] = []
    center = 10_000
    for _ in range(6000):
        k = rng.random()
        if k < 0.45:
            s = center + rng.randint(-350, 60)
            events.append(("d", max(0, s), rng.randbytes(length_of(max(0, s)))))
        elif k < 0.95:
            events.append(("r", random_repair(rng, center, length_of)))
        elif k < 0.99 and events:
            events.append(rng.choice(events))  # a duplicate
        else:
            center += rng.choice([5, 50, 400, 5000])
        center += rng.random() < 0.3
    run_decoders(DEFAULT, 304, events, seed)
    run_decoders(SMALL, 40, events, seed)
    py = run_decoders(C0, 304, events, seed)  # repairs reach a c = 0 decoder: never kept pending
    assert py.stats.repairs_expired > 0 and not py._pending


def test_decoder_pending_bound() -> None:
    """More repairs missing two packets than c * window: the oldest are expired, as in Python."""
    rng = random.Random(5)
    window = 304
    events: list[Event] = [("d", 10_000, b"\1" * 10)]
    pairs = set()
    while len(pairs) < 1200:
        a, b = sorted(rng.sample(range(9_700, 10_000), 2))
        pairs.add((a, b))
    for a, b in sorted(pairs, key=lambda _: rng.random()):
        events.append(("r", Repair(rng.randrange(3), (a, b), (10, 10), rng.randbytes(10))))
    events += [("d", s, bytes([s % 256]) * 10) for s in rng.sample(range(9_700, 10_000), 250)]
    py = run_decoders(DEFAULT, window, events)
    assert py.stats.repairs_expired > 0 and py.stats.rebuilt > 0


def test_decoder_refuses_what_python_cannot_get() -> None:
    """Inputs the wire cannot carry: C refuses them (ValueError) and stays usable."""
    c = native.Decoder(DEFAULT)
    with pytest.raises(ValueError):
        c.on_data(1, bytes(65536), 0.0)
    for bad in [
        _trusted_repair(0, (1, 1), (3, 3), b"abc"),  # seqs not increasing
        _trusted_repair(0, (1, 2), (3, 4), b"abc"),  # xor shorter than the longest
        _trusted_repair(0, (1, 2), (0, 3), b"abc"),  # empty packet
        _trusted_repair(0, tuple(range(65)), (1,) * 65, b"a"),  # more than 64 packets
    ]:
        with pytest.raises(ValueError):
            c.on_repair(bad, 0.0)
    assert c.on_data(1, b"abc", 0.0) == [] and c.stats.received == 1


# -- tunnel -------------------------------------------------------------------------------------


def tunnel_result(fn: Callable[..., object], *args: object) -> object:
    """``fn(*args)``, or the exception it raised, as a comparable value."""
    try:
        out = fn(*args)
    except tunnel.TunnelError as err:
        return ("TunnelError", err.reason)
    except ValueError:
        return ("ValueError",)
    return out


KEYS = [b"k" * 16, KEY, bytes(range(64)), bytes(range(65)), bytes(200)]


@pytest.mark.parametrize("key", KEYS, ids=[f"key{len(k)}" for k in KEYS])
def test_seal_same_bytes(key: bytes) -> None:
    rng = random.Random(len(key))
    for seq, size, site in [(0, 1, 0), (2**64 - 1, 1400, 255), (7, tunnel.MAX_DATAGRAM - 28, 3)] + [
        (rng.randrange(2**64), rng.randint(1, 1500), rng.randrange(256)) for _ in range(200)
    ]:
        pkt = rng.randbytes(size)
        d = tunnel.encode_data(seq, pkt, site, key)
        assert native.encode_data(seq, pkt, site, key) == d
        assert native.decode_raw(d, key, site) == tunnel.decode_raw(d, key, site) == (site, seq, pkt)
    enc = fec.Encoder(DEFAULT)
    for s in range(400):
        for rep in enc.add(2**64 - 500 + s, rng.randbytes(rng.randint(1, 1500)), s * 1e-4) + enc.handle_timer(s * 1e-4):
            d = tunnel.encode_repair(rep, 9, key)
            assert native.encode_repair(rep, 9, key) == d
            assert native.decode_raw(d, key, None) == tunnel.decode_raw(d, key, None) == (9, None, rep)
    assert native.Sealer(key, 1).data(5, b"x") == tunnel.Sealer(key, 1).data(5, b"x")
    assert native.Sealer(key, 255).repair(rep) == tunnel.Sealer(key, 255).repair(rep)


@pytest.mark.parametrize("key", KEYS, ids=[f"key{len(k)}" for k in KEYS])
def test_control_mac_same_bytes(key: bytes) -> None:
    """smfs_tunnel_mac, which the C gateway's subscribe check and callbacks use, is tunnel._mac."""
    rng = random.Random(len(key) + 1)
    t = native.Tunnel(key)
    for size in (0, 1, 24, 30, 32, 55, 56, 64, 65, 1000):
        data = rng.randbytes(size)
        assert t.mac(data) == tunnel._mac(key, data)
    flow = Flow("198.18.11.1", 40000, "198.18.12.1", 7700)
    cb = callbacks.encode_callback(flow, 12345, b"n" * 8, key)
    assert t.mac(cb[:32]) == cb[32:]


def test_seal_rejects_as_python() -> None:
    big = Repair(0, tuple(range(64)), (65535,) * 64, bytes(65535))
    wide = Repair(1, (0, 2**32), (1, 1), b"\0")
    many = Repair(1, tuple(range(65)), (1,) * 65, b"\0")
    layer = Repair(256, (1,), (1,), b"\0")
    for fn_py, fn_c in [
        (lambda: tunnel.encode_data(1, b"", 0, KEY), lambda: native.encode_data(1, b"", 0, KEY)),
        (lambda: tunnel.encode_data(1, bytes(65480), 0, KEY), lambda: native.encode_data(1, bytes(65480), 0, KEY)),
        (lambda: tunnel.encode_data(2**64, b"x", 0, KEY), lambda: native.encode_data(2**64, b"x", 0, KEY)),
        (lambda: tunnel.encode_data(1, b"x", 256, KEY), lambda: native.encode_data(1, b"x", 256, KEY)),
        (lambda: tunnel.encode_data(1, b"x", -1, KEY), lambda: native.encode_data(1, b"x", -1, KEY)),
        (lambda: tunnel.encode_data(1, b"x", 0, b"short"), lambda: native.encode_data(1, b"x", 0, b"short")),
        (lambda: tunnel.encode_repair(big, 0, KEY), lambda: native.encode_repair(big, 0, KEY)),
        (lambda: tunnel.encode_repair(wide, 0, KEY), lambda: native.encode_repair(wide, 0, KEY)),
        (lambda: tunnel.encode_repair(many, 0, KEY), lambda: native.encode_repair(many, 0, KEY)),
        (lambda: tunnel.encode_repair(layer, 0, KEY), lambda: native.encode_repair(layer, 0, KEY)),
    ]:
        assert tunnel_result(fn_py) == tunnel_result(fn_c) == ("ValueError",)


def signed(body: bytes, key: bytes = KEY) -> bytes:
    return body + tunnel._mac(key, body)


def repair_body(layer: int, n: int, first: int, deltas: list[int], lengths: list[int], xor: bytes, site: int = 1) -> bytes:
    head = bytes((tunnel.MAGIC, tunnel.VERSION, tunnel.KIND_REPAIR, site)) + struct.pack("!BBQ", layer, n, first)
    return head + b"".join(struct.pack("!I", d) for d in deltas) + b"".join(struct.pack("!H", ln) for ln in lengths) + xor


def hostile_datagrams(rng: random.Random) -> list[bytes]:
    good_data = tunnel.encode_data(77, b"payload" * 30, 1, KEY)
    good_rep = tunnel.encode_repair(Repair(2, (100, 119, 138), (40, 1400, 7), rng.randbytes(1400)), 1, KEY)
    out = [b"", b"\xa7", good_data, good_rep, bytes(19), bytes(20), bytes(65508), signed(bytes(65491)),
           good_data[:-1], good_data + b"\0", tunnel.encode_data(77, b"x", 2, KEY), tunnel.encode_data(77, b"x", 1, b"z" * 32)]
    out += [good_data[:i] for i in range(0, 40)] + [good_rep[:i] for i in range(0, 60)]
    head = bytes((tunnel.MAGIC, tunnel.VERSION))
    out += [signed(head + bytes((k, 1)) + bytes(8)) for k in (0, 1, 2, 3, 255)]  # kinds, empty bodies
    out += [signed(bytes((m, v, 1, 1)) + bytes(12)) for m, v in ((0xA6, 1), (0xA7, 0), (0xA7, 2))]
    out += [
        signed(repair_body(0, 0, 1, [], [], b"")),  # zero packets
        signed(repair_body(0, 65, 1, list(range(1, 65)), [1] * 65, b"x")),  # 65 packets
        signed(repair_body(0, 255, 1, [], [], b"")),  # huge count, no table
        signed(repair_body(0, 3, 1, [0, 5], [1, 1, 1], b"x")),  # zero delta
        signed(repair_body(0, 3, 1, [5, 5], [1, 1, 1], b"x")),  # equal deltas
        signed(repair_body(0, 3, 1, [6, 5], [1, 1, 1], b"x")),  # decreasing
        signed(repair_body(0, 2, 2**64 - 1, [1], [1, 1], b"x")),  # seq overflow
        signed(repair_body(0, 2, 2**64 - 2, [1], [1, 1], b"x")),  # the last u64: fine
        signed(repair_body(0, 2, 5, [1], [0, 1], b"x")),  # zero length
        signed(repair_body(0, 2, 5, [1], [1, 2], b"x")),  # xor too short
        signed(repair_body(0, 2, 5, [1], [1, 2], b"xyz")),  # xor too long
        signed(repair_body(255, 1, 5, [], [65535], bytes(65535))[:65491]),  # truncated giant
        signed(repair_body(9, 1, 5, [], [3], b"abc", site=200)),
        signed(repair_body(9, 64, 0, list(range(1, 64)), [2] * 64, b"ab")),
    ]
    for _ in range(400):  # mutations of genuine datagrams, re-signed or not
        d = bytearray(rng.choice([good_data, good_rep]))
        for _ in range(rng.randint(1, 4)):
            d[rng.randrange(len(d))] = rng.randrange(256)
        if rng.random() < 0.3:
            del d[rng.randrange(len(d)):]
        out.append(signed(bytes(d[:-16])) if rng.random() < 0.7 and len(d) >= 20 else bytes(d))
    out += [rng.randbytes(rng.randint(0, 3000)) for _ in range(200)]
    return out


def test_unseal_same_results_and_reasons() -> None:
    rng = random.Random(8)
    reasons = set()
    for d in hostile_datagrams(rng):
        for site in (None, 1, 2, 300):
            want = tunnel_result(tunnel.decode_raw, d, KEY, site)
            assert tunnel_result(native.decode_raw, d, KEY, site) == want, f"{d[:40]!r}... site {site}"
            if isinstance(want, tuple) and want[0] == "TunnelError":
                reasons.add(want[1])
    assert reasons == {"short", "oversize", "bad magic", "bad version", "bad mac", "foreign site", "bad kind", "malformed lengths"}
    assert native.decode(tunnel.encode_data(1, b"x", 1, KEY), KEY) == tunnel.decode(tunnel.encode_data(1, b"x", 1, KEY), KEY)


@pytest.mark.parametrize("size", [64, 100, 4096])
def test_replay_window_same_verdicts(size: int) -> None:
    rng = random.Random(size)
    py, c = tunnel.ReplayWindow(size), native.ReplayWindow(size)
    for i in range(20000):
        top = max(py.top, 0)
        k = rng.random()
        seq = (
            top + rng.randint(1, 3) if k < 0.4
            else max(0, top - rng.randint(0, 2 * size)) if k < 0.8
            else top + rng.choice([size - 1, size, size + 1, 10 * size]) if k < 0.95
            else rng.choice([0, 2**64 - 1 - rng.randrange(3), rng.randrange(2**64)])
        )
        if seq >= 2**64:
            continue
        op = rng.choice(["check", "update", "check_and_update", "check_and_update", "mark_rebuilt", "late_after_rebuild"])
        assert getattr(c, op)(seq) == getattr(py, op)(seq), f"step {i}: {op}({seq})"
        assert c.top == py.top
        assert c.rebuilt_count == len(py._rebuilt)


# -- flow tracking --------------------------------------------------------------------------------


def ip_tcp(flow: Flow, seq: int, payload: int = 0, flags: int = TCP_ACK, options: bytes = b"", ip_options: bytes = b"",
           proto: int = 6, frag: int = 0x4000, total_delta: int = 0, trailer: bytes = b"") -> bytes:
    """An IPv4/TCP packet (checksums zero: the tracker does not check them)."""
    tcp_hdr = struct.pack("!HHIIHHHH", flow.sport, flow.dport, seq % 2**32, 0,
                          ((20 + len(options)) // 4) << 12 | flags, 65535, 0, 0) + options
    ihl = 20 + len(ip_options)
    total = ihl + len(tcp_hdr) + payload + total_delta
    ip = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl // 4, 0, total % 65536, 1, frag, 64, proto, 0,
                     socket.inet_aton(flow.src), socket.inet_aton(flow.dst))
    return ip + ip_options + tcp_hdr + bytes(payload) + trailer


class FlowScript:
    """A seeded mix of TCP connections as the egress tunnels them: SYN / SYN-ACK, data in order,
    retransmitted and out of order, pure ACKs, FIN, RST, new ISNs on a known 4-tuple, flows seen
    without their SYN, and packets the tracker must ignore."""

    def __init__(self, rng: random.Random, nflows: int) -> None:
        self.rng = rng
        self.flows = [Flow(f"10.0.{i % 3}.{2 + i}", 40000 + i, "10.9.0.1", 7000 + i % 2) for i in range(nflows)]
        self.isn = {f: rng.choice([rng.randrange(2**32), 2**32 - 5000, 0]) for f in self.flows}
        self.sent = {f: 0 for f in self.flows}

    def packet(self) -> bytes:
        rng, f = self.rng, self.rng.choice(self.flows)
        isn, off = self.isn[f], self.sent[f]
        k = rng.random()
        if k < 0.05:
            if rng.random() < 0.3:
                self.isn[f] = isn = rng.randrange(2**32)
                self.sent[f] = 0
            rev = Flow(f.dst, f.dport, f.src, f.sport)
            return ip_tcp(rng.choice([f, rev]), isn, flags=TCP_SYN | (TCP_ACK if rng.random() < 0.5 else 0))
        if k < 0.70:
            n = rng.choice([0, 1, 100, 1400, rng.randint(1, 1460)])
            self.sent[f] = off + n
            flags = TCP_ACK | (TCP_FIN if rng.random() < 0.02 else 0)
            return ip_tcp(f, isn + 1 + off, n, flags, options=rng.choice([b"", b"\x01" * 12]),
                          ip_options=rng.choice([b"", b"", b"\x01" * 4]))
        if k < 0.80 and off:  # retransmission of something already sent
            start = rng.randrange(off)
            return ip_tcp(f, isn + 1 + start, min(off - start, rng.randint(1, 1400)))
        if k < 0.86:  # ahead of what was sent: out of order
            n = rng.randint(1, 1400)
            return ip_tcp(f, isn + 1 + off + rng.randint(1, 3000), n)
        if k < 0.88:
            return ip_tcp(f, isn + 1 + off, flags=TCP_RST | TCP_ACK)
        if k < 0.90:  # a flow never seen with a SYN
            g = Flow("10.7.7.7", 1234, "10.9.0.1", 7000)
            return ip_tcp(g, rng.randrange(2**32), rng.randint(0, 100))
        if k < 0.93:  # far from the stream (unwraps backwards, or beyond)
            return ip_tcp(f, isn + 1 + off + rng.choice([-(2**31), 2**31 - 1, -1, -100]), rng.randint(1, 50))
        pkt = ip_tcp(f, isn + 1 + off, 20)
        return rng.choice([
            ip_tcp(f, isn + 1 + off, 20, proto=17), ip_tcp(f, isn + 1 + off, 20, frag=0x2000),
            ip_tcp(f, isn + 1 + off, 20, frag=0x0010), pkt[:39], pkt[:-1], b"\x60" + pkt[1:], b"\x44" + pkt[1:],
            pkt[:32] + b"\x40" + pkt[33:], pkt[:32] + b"\xf0" + pkt[33:], ip_tcp(f, isn + 1 + off, 20, total_delta=-30),
            ip_tcp(f, isn + 1 + off, 20, trailer=b"\0" * 6), rng.randbytes(rng.randint(0, 80)),
        ])


def run_trackers(seed: int, params: FecParams, steps: int, nflows: int, **limits: int) -> callbacks.FlowTracker:
    rng = random.Random(seed)
    py = callbacks.FlowTracker(params.c, **limits)
    c = native.FlowTracker(params.c, **limits)
    enc = fec.Encoder(params)
    script = FlowScript(rng, nflows)
    tseq, now, reported = rng.choice([0, 2**63]), 0.0, 0
    seen: set[Flow] = set()

    def sent(repairs: list[Repair], t: float) -> None:
        if rng.random() < 0.02:
            return  # a batch that never left (its packets stay unsafe)
        stamp = None if rng.random() < 0.1 else t
        py.on_repairs_sent(repairs, stamp)
        c.on_repairs_sent(repairs, stamp)

    held = 0.0
    for i in range(steps):
        dt = rng.expovariate(20000)
        now += dt
        if rng.random() < 0.3:  # the gateway was held back by its pacer for (part of) that time
            held += rng.random() * dt
            py.held = c.held = held
        if (deadline := enc.get_timer()) is not None and deadline <= now:
            sent(enc.handle_timer(now), now)
        pkt = script.packet()
        tseq += 1
        stamp = None if rng.random() < 0.05 else now
        py.on_packet_sent(tseq, pkt, stamp)
        c.on_packet_sent(tseq, pkt, stamp)
        sent(enc.add(tseq, pkt if pkt else b"\0", now), now)
        if rng.random() < 0.2:
            a, b = py.safe_offsets(), c.safe_offsets()
            assert len({f for f, _ in b}) == len(b)
            assert sorted(b) == sorted(a), f"step {i}"
            reported += len(a)
            seen.update(f for f, _ in a)
        assert (c.flows, c.pending, c.ignored) == (py.flows, py.pending, py.ignored), f"step {i}"
    sent(enc.flush(), now)
    assert sorted(c.safe_offsets()) == sorted(py.safe_offsets())
    assert c.latencies == list(py.latencies)
    assert c.held_latencies == list(py.held_latencies) and len(py.held_latencies) == len(py.latencies)
    assert all(0 <= h <= t + 1e-12 for h, t in zip(py.held_latencies, py.latencies, strict=True))
    assert not py.latencies or params.c * (params.r - 1) == 0 or limits.get("safe_at_send") or any(py.held_latencies)
    for f in [*script.flows, *seen, *(Flow(x.dst, x.dport, x.src, x.sport) for x in script.flows)]:
        assert c.safe_offset(f) == py.safe_offset(f)
    assert c.dropped == 0
    assert reported > 0 or limits.get("max_pending", 1) == 0  # with no room, nothing is ever safe
    return py


@pytest.mark.parametrize("seed", range(3))
def test_flow_tracker_same_callbacks(seed: int) -> None:
    run_trackers(seed, DEFAULT, 6000, nflows=6)


def test_pure_ack_same_as_python() -> None:
    """The packets the encoder takes as lazy (pure TCP ACKs), in C and Python, over the flow script's
    segments (data, ACKs, SYN/FIN/RST, UDP, fragments, truncated and malformed headers) and random bytes."""
    rng = random.Random(21)
    script = FlowScript(rng, 4)
    packets = [script.packet() for _ in range(5000)] + [rng.randbytes(rng.randint(0, 80)) for _ in range(500)]
    got = [(native.is_pure_ack(p), callbacks.is_pure_ack(p)) for p in packets]
    assert all(c == py for c, py in got)
    assert sum(py for _c, py in got) > 100 and sum(not py for _c, py in got) > 1000  # both kinds occur


def test_flow_tracker_small_limits() -> None:
    """Flows and carried packets evicted (least recently active, oldest first) as in Python."""
    run_trackers(10, DEFAULT, 5000, nflows=8, max_flows=3, max_pending=40, max_latencies=50)
    run_trackers(11, SMALL, 4000, nflows=5, max_flows=1, max_pending=0, max_latencies=0)


def test_flow_tracker_other_codes_and_defect() -> None:
    run_trackers(12, SMALL, 4000, nflows=4)
    run_trackers(13, FecParams(r=1, c=1, interleaves=(1,)), 3000, nflows=4)
    run_trackers(14, DEFAULT, 3000, nflows=4, safe_at_send=True)
    run_trackers(15, C2, 3000, nflows=4)


@pytest.mark.parametrize("safe_at_send", [False, True])
def test_flow_tracker_c0(safe_at_send: bool) -> None:
    """No FEC: safe once sent, with the same callbacks and latencies (0) as Python."""
    py = run_trackers(16 + safe_at_send, C0, 4000, nflows=5, safe_at_send=safe_at_send)
    assert py.pending == 0 and py.latencies and set(py.latencies) == {0.0}
    run_trackers(18, C0, 2000, nflows=3, max_flows=2, max_pending=0, max_latencies=7)


# -- the build --------------------------------------------------------------------------------------


def test_build_names_missing_debian_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native.shutil, "which", lambda tool: None if tool == "gcc" else "/usr/bin/" + tool)
    with pytest.raises(native.NativeError, match="Debian package gcc"):
        native.build()
    monkeypatch.undo()
    real_run = subprocess.run

    def no_headers(cmd: list[str], **kw: object) -> subprocess.CompletedProcess:
        if cmd[:2] == ["gcc", "-E"]:
            return subprocess.CompletedProcess(cmd, 1, b"", b"fatal error: openssl/evp.h")
        return real_run(cmd, **kw)

    monkeypatch.setattr(native.subprocess, "run", no_headers)
    with pytest.raises(native.NativeError, match="libssl-dev"):
        native.build()


# -- fuzz: the C ingress path against Python, under AddressSanitizer + UBSan ------------------------


def fuzz(n: int, seed: int) -> dict[str, int]:
    """``n`` random and mutated datagrams through unseal, the replay window and the decoder, as
    the gateway chains them, in C and in Python: every verdict and rebuilt packet must agree."""
    rng = random.Random(seed)
    window = 2 * DEFAULT.span
    sealer = tunnel.Sealer(KEY, 1)
    pool = [sealer.data(e[1], e[2]) if e[0] == "d" else sealer.repair(e[1]) for e in stream(DEFAULT, 500, seed, sizes=(20, 400))]
    counts = {"datagrams": 0, "accepted": 0, "rebuilt": 0, "streams": 0}
    cursor, base, deferred = len(pool), 0, None
    py_dec = c_dec = py_rw = c_rw = None

    def shifted(d: bytes) -> bytes:
        if not base or len(d) < 20:
            return d
        off = 6 if d[2] == tunnel.KIND_REPAIR else 4
        v = (int.from_bytes(d[off:off + 8], "big") + base) % 2**64
        return signed(d[:off] + v.to_bytes(8, "big") + d[off + 8:-16])

    def mutate(d: bytes) -> bytes:
        b = bytearray(d)
        k = rng.randrange(6)
        if k == 0 and b:
            for _ in range(rng.randint(1, 6)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif k == 1:
            del b[rng.randrange(len(b) + 1):]
        elif k == 2:
            b += rng.randbytes(rng.randint(1, 40))
        elif k == 3 and len(b) > 6:
            b[5] = rng.choice([0, 1, 2, 63, 64, 65, 255, rng.randrange(256)])
            b[4] = rng.randrange(256)
        elif k == 4 and len(b) > 30:
            at = rng.randrange(14, len(b) - 16)
            b[at:at + 2] = rng.randbytes(2)
        elif len(b) > 4:
            b[rng.randrange(4)] = rng.randrange(4)
        if rng.random() < 0.75 and len(b) >= 20:
            return signed(bytes(b[:-16]))
        return bytes(b)

    while counts["datagrams"] < n:
        if cursor >= len(pool):  # a fresh ingress for another stream, at another seq base
            py_dec, c_dec = fec.Decoder(DEFAULT, window), native.Decoder(DEFAULT, window)
            py_rw, c_rw = tunnel.ReplayWindow(window), native.ReplayWindow(window)
            cursor, deferred, counts["streams"] = 0, None, counts["streams"] + 1
            base = rng.choice([0, 2**32, 2**64 - 4096, 10**15])
        k = rng.random()
        if k < 0.05:
            d = rng.randbytes(rng.choice([rng.randrange(100), rng.randrange(2000), rng.randrange(66000)]))
            if rng.random() < 0.5 and len(d) >= 20:
                d = signed(bytes((tunnel.MAGIC, tunnel.VERSION, rng.choice([1, 2]), 1)) + bytes(8) + d[12:-16])
        elif k < 0.80:
            if deferred is not None:
                d, deferred = deferred, None
            else:
                d = shifted(pool[cursor])
                cursor += 1
                if rng.random() < 0.05:
                    continue  # lost
                if rng.random() < 0.1 and cursor < len(pool):
                    deferred, d = d, shifted(pool[cursor])
                    cursor += 1
        else:
            d = mutate(shifted(pool[min(len(pool) - 1, max(0, cursor + rng.randint(-32, 32)))]))
        counts["datagrams"] += 1
        site = 1 if rng.random() < 0.9 else None
        want = tunnel_result(tunnel.decode_raw, d, KEY, site)
        got = tunnel_result(native.decode_raw, d, KEY, site)
        assert got == want, f"datagram {d[:48].hex()}"
        if not isinstance(want, tuple) or want[0] in ("TunnelError", "ValueError"):
            continue
        counts["accepted"] += 1
        _site, seq, payload = want
        if seq is not None:
            ok = py_rw.check_and_update(seq)
            assert c_rw.check_and_update(seq) == ok
            if not ok:
                assert c_rw.late_after_rebuild(seq) == py_rw.late_after_rebuild(seq)
                continue
            if py_dec.has(seq):
                assert c_dec.has(seq)
                continue
            a, b = py_dec.on_data(seq, payload, 0.0), c_dec.on_data(seq, payload, 0.0)
        else:
            a, b = py_dec.on_repair(payload, 0.0), c_dec.on_repair(payload, 0.0)
        assert b == a
        for s, _ in a:
            py_rw.mark_rebuilt(s)
            c_rw.mark_rebuilt(s)
        counts["rebuilt"] += len(a)
        if rng.random() < 0.01:
            assert c_dec.stats == py_dec.stats and c_dec.low == py_dec.low
    return counts


def asan_python(*args: str, python_malloc: bool = True) -> subprocess.CompletedProcess:
    env = native.asan_env(python_malloc=python_malloc)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_fuzz_datagrams_under_asan() -> None:
    """>= 100k datagrams, C (AddressSanitizer + UBSan build) against Python, in a subprocess."""
    native.build(variant="asan")
    done = asan_python(__file__, "fuzz", "100000", "21")
    assert done.returncode == 0, f"fuzz under ASan failed:\n{done.stdout[-2000:]}\n{done.stderr[-6000:]}"
    assert "fuzz ok variant=asan {'datagrams': 100000" in done.stdout, done.stdout


def test_sanitizers_are_live_under_asan() -> None:
    """The harness is real: an overflow inside the asan library is reported and aborts."""
    native.build(variant="asan")
    code = ("import ctypes; from smfs import native; lib = native.load(); "
            "lib.smfs_xor_into(ctypes.create_string_buffer(8), b'x' * 64, 64)")
    done = asan_python("-c", code)
    assert done.returncode != 0 and "AddressSanitizer" in done.stderr and "smfs_xor_into" in done.stderr, done.stderr[-3000:]


def test_differential_suite_under_asan() -> None:
    """Every differential test above again, against the AddressSanitizer + UBSan build (Python's
    own allocator kept, for time: the C objects' memory is guarded, Python's small buffers not)."""
    native.build(variant="asan")
    done = asan_python("-m", "pytest", __file__, "-q", "-k", "not asan", "-p", "no:cacheprovider", python_malloc=False)
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"


def test_c_fuzz_driver_under_asan() -> None:
    """The C fuzz driver (fuzz.c: unseal, replay, decoder, flow tracker) with the sanitizers;
    1 M random and mutated datagrams: no crash, no sanitizer report."""
    native.build(variant="asan")
    done = subprocess.run(["make", "--no-print-directory", "-C", str(native.HERE), "check-asan", "FUZZ_N=1000000"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-6000:]}"
    assert "fuzz: 1000000 datagrams" in done.stdout


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "fuzz":
        sys.exit("usage: test_native.py fuzz N SEED")
    lib = native.load()
    variant = os.environ.get(native.VARIANT_ENV, "release")
    result = fuzz(int(sys.argv[2]), int(sys.argv[3]))
    print(f"fuzz ok variant={variant} {result}")
