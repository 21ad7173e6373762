"""Measure the realised WAN path: RTT and loss each way with UDP probes, throughput with bulk TCP.

Runs anywhere Python does (host, namespace, guest) and prints JSON::

    python3 -m netem.calibrate serve --port 7788              # UDP echo + TCP sink on one port
    python3 -m netem.calibrate probe --host 10.0.0.2 --port 7788 --loss-pct 1
    python3 -m netem.calibrate bulk --host 10.0.0.2 --port 7788 --seconds 3
    python3 -m netem.calibrate rate-count --port 7789                  # on the mirror: counts a UDP stream
    python3 -m netem.calibrate rate-send --host 10.0.0.2 --port 7789 --rate 44mbit --size 8972

Each echo reply carries how many probes of this session the server has received, so loss splits
into forward (client → server: 1 - received_by_server / sent) and reverse (server → client:
1 - replies / received_by_server).

Probe count for a loss estimate: the standard error of a binomial proportion is √(p(1-p)/n); for
the estimate to be within ±``rel`` (relative) with 95 % confidence, z·√(p(1-p)/n) ≤ rel·p with
z = 1.96, so n = z²(1-p) / (p·rel²): for ±20 %, p = 1 % → 9508 probes, 10 % → 865
(:func:`probes_for_loss`). Bursty (Gilbert-Elliott) loss correlates successive probes and needs
more by :attr:`~netem.profile.GilbertElliott.variance_inflation`. The reverse direction only sees
the probes that crossed the forward one (:func:`probes_for_profile`).

RTT: the configured WAN adds delay a→b + delay b→a to the **bare** path (bridges, host routing,
guest scheduling), so the measured median is compared with 2·delay + the bare RTT, measured once
on the unshaped path (:func:`compare`).

Rate: TCP's congestion control never fills a 50 ms path at 1 % loss, which is no fault of the
emulation, so the rate is measured with a paced UDP stream (:func:`rate_send` → :func:`rate_count`)
offered at :data:`RATE_OVERDRIVE` × the configured a→b rate: what arrives in the steady window is
min(rate, what the path sustains) × (1 - loss a→b) (:func:`rate_rows`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import select
import socket
import statistics
import struct
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from netem.profile import DirectionProfile, LinkProfile, parse_rate_bps

MAGIC = b"SMFC"
PROBE, STATS = 0, 1
RATE_HELLO, RATE_DATA, RATE_END, RATE_READY, RATE_RESULT = 2, 3, 4, 5, 6
"""The rate stream's datagram kinds (same header as a probe): the sender's hello, data and end; the
counter's ready (to a hello) and result (to an end, its JSON after the header)."""
_REQ = struct.Struct("!4sBQIQ")  # magic, kind, session, seq, t_send (ns)
_REP = struct.Struct("!4sBQIQI")  # ... + probes of this session received by the server
DEFAULT_PORT = 7788
MIN_PROBES = 200
MAX_PROBES = 20_000
MAX_SESSIONS = 1024
Z_95 = 1.96
"""Two-sided 95 % normal quantile."""
REL_ERROR = 0.2
"""Target relative half-width of a loss estimate (±20 %)."""
PROBE_SECONDS = 4.0
"""Target probing time (s): with start-up and the tail wait, 10 % loss calibrates in under 10 s."""
FASTEST_INTERVAL = 0.002
SLOWEST_INTERVAL = 0.01
"""Probe spacing bounds (s): faster probing queues behind a TCG guest's own scheduling."""
DEFAULT_RATE_PORT = 7789
"""The rate counter's UDP port: its own, so it runs beside ``serve`` (started together, one Python
start-up under TCG instead of two in a row)."""
RATE_SECONDS = 3.0
"""How long the rate stream is sent (s)."""
RATE_SKIP = 0.5
"""Start-up the counter leaves out (s after the first datagram): the sender's and the guest's
scheduling settle and the shaper's queue fills, so the window sees the steady rate."""
RATE_OVERDRIVE = 1.1
"""The stream is offered at 1.1 × the configured rate: a path that holds the rate then runs full
(its queue grows by 10 % of the rate, far below netem's limit in 3 s) and delivers the rate itself,
not the sender's pace, while a sender that cannot keep up shows as one."""
RATE_OK_FACTOR = 0.9
"""A path is faithful to its rate when it delivers at least 90 % of it (after the loss correction).
The 10 % absorb what the check does not model: netem charges whole Ethernet frames while the counter
counts IP bytes (-0.2 % at MTU 9000, -1 % at 1500), the correction uses the configured loss, not the
realised one (±0.5 points over a few hundred datagrams), and guest scheduling at the window's edges.
A path short by more than that would bound rate-bound results by a different link than the one
plotted, an error of the size of the claims' own tolerances."""
RATE_MIN_DATAGRAMS = 100
"""Datagrams at least in the steady window: at a low rate they are made smaller than the MTU so the
count resolves the rate to about 1 %."""
RATE_MIN_SIZE = 64
"""Smallest rate datagram payload (bytes): the header with room to spare."""
UDP_IP_HEADERS = 28
"""IPv4 (20) + UDP (8) header bytes: a datagram of MTU - 28 bytes fills one IP packet of the MTU."""
_IP_MTU = 14
"""``IP_MTU`` of Linux's <netinet/in.h> (the path MTU of a connected socket); Python does not export it."""


def probes_for_loss(loss_pct: float, rel: float = REL_ERROR, z: float = Z_95, inflation: float = 1.0,
                    minimum: int = MIN_PROBES, maximum: int = MAX_PROBES) -> int:  # fmt: skip
    """Probes for a loss of ``loss_pct`` % to be known within ±``rel`` (relative) at confidence ``z``:
    n = z²·(1-p) / (p·rel²) × ``inflation`` (1 for independent loss), clamped to [minimum, maximum]."""
    p = loss_pct / 100
    if p <= 0:
        return minimum
    if p >= 1:
        return minimum  # everything lost: nothing to estimate
    n = z * z * (1 - p) / (p * rel * rel) * inflation
    return max(minimum, min(maximum, math.ceil(n - 1e-9)))


def _inflation(profile: DirectionProfile) -> float:
    return profile.gilbert.variance_inflation if profile.gilbert else 1.0


def probes_for_profile(profile: LinkProfile, rel: float = REL_ERROR, z: float = Z_95,
                       maximum: int = MAX_PROBES) -> int:  # fmt: skip
    """Probes for ±``rel`` on the loss of *each* direction: the reverse one is measured over the probes
    that survived the forward one, n_rev / (1 - loss a→b) sent."""
    fwd, rev = profile.a_to_b, profile.b_to_a
    n_fwd = probes_for_loss(fwd.mean_loss_pct, rel, z, _inflation(fwd), maximum=maximum)
    n_rev = probes_for_loss(rev.mean_loss_pct, rel, z, _inflation(rev), maximum=maximum)
    survive = max(1 - fwd.mean_loss_pct / 100, 1e-3)
    return min(maximum, max(n_fwd, math.ceil(n_rev / survive)))


def probe_interval(count: int, seconds: float = PROBE_SECONDS, fastest: float = FASTEST_INTERVAL,
                   slowest: float = SLOWEST_INTERVAL) -> float:  # fmt: skip
    """Spacing (s) that sends ``count`` probes in about ``seconds``, within [fastest, slowest]."""
    return min(slowest, max(fastest, seconds / max(count, 1)))


def loss_stderr_pct(loss_pct: float, n: int, inflation: float = 1.0) -> float:
    """Standard error (percentage points) of a loss rate measured over ``n`` probes."""
    p = loss_pct / 100
    return 100 * math.sqrt(max(p * (1 - p), 0.0) * inflation / max(n, 1))


def loss_halfwidth_rel(loss_pct: float, n: int, z: float = Z_95, inflation: float = 1.0) -> float:
    """Relative half-width of the ``z`` confidence interval of a loss measured over ``n`` probes."""
    return z * loss_stderr_pct(loss_pct, n, inflation) / loss_pct if loss_pct > 0 else math.inf


# --------------------------------------------------------------------------- server


def serve(host: str = "0.0.0.0", port: int = DEFAULT_PORT, stop: threading.Event | None = None,
          ready: threading.Event | None = None) -> None:  # fmt: skip
    """UDP echo (with per-session receive counts) and TCP sink on ``host:port`` until ``stop`` is set.

    TCP sink protocol: the client sends bytes then shuts down its write side; the server answers
    with the byte count (8 bytes, network order) and closes.
    """
    stop = stop or threading.Event()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        udp.bind((host, port))
        tcp.bind((host, port))
        tcp.listen(8)
        if ready is not None:
            ready.set()
        counts: OrderedDict[int, int] = OrderedDict()
        while not stop.is_set():
            readable, _, _ = select.select([udp, tcp], [], [], 0.2)
            if tcp in readable:
                conn, _ = tcp.accept()
                threading.Thread(target=_sink, args=(conn,), daemon=True).start()
            if udp in readable:
                _echo(udp, counts)
    finally:
        udp.close()
        tcp.close()


def _echo(udp: socket.socket, counts: OrderedDict[int, int]) -> None:
    for _ in range(256):  # drain what is queued
        try:
            data, addr = udp.recvfrom(2048, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        if len(data) < _REQ.size or data[:4] != MAGIC:
            continue
        _, kind, session, seq, t_send = _REQ.unpack_from(data)
        if kind == PROBE:
            counts[session] = counts.get(session, 0) + 1
            counts.move_to_end(session)
            while len(counts) > MAX_SESSIONS:
                counts.popitem(last=False)
        udp.sendto(_REP.pack(MAGIC, kind, session, seq, t_send, counts.get(session, 0)), addr)


def _sink(conn: socket.socket) -> None:
    total = 0
    with conn:
        while chunk := conn.recv(1 << 18):
            total += len(chunk)
        conn.sendall(struct.pack("!Q", total))


# --------------------------------------------------------------------------- probing


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of already sorted values."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def probe(host: str, port: int = DEFAULT_PORT, count: int = MIN_PROBES, interval: float = 0.002,
          timeout: float = 1.0) -> dict[str, Any]:  # fmt: skip
    """Send ``count`` UDP probes every ``interval`` s; RTT percentiles (ms) and loss each way (%).

    Replies later than ``timeout`` s after the last probe count as lost.
    """
    session = int.from_bytes(os.urandom(8), "big")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.connect((host, port))
    sock.setblocking(False)
    rtts: dict[int, float] = {}
    server_received = 0
    try:
        start = time.monotonic()
        for seq in range(count):
            now = time.monotonic()
            due = start + seq * interval
            if due > now:
                server_received = max(server_received, _collect(sock, session, rtts, due - now))
            try:
                sock.send(_REQ.pack(MAGIC, PROBE, session, seq, time.monotonic_ns()))
            except (BlockingIOError, ConnectionRefusedError):
                pass
        deadline = time.monotonic() + timeout
        while len(rtts) < count and time.monotonic() < deadline:
            server_received = max(server_received, _collect(sock, session, rtts, deadline - time.monotonic()))
        elapsed = time.monotonic() - start
        server_received = max(server_received, _query_stats(sock, session, attempts=20 if rtts else 3))
    finally:
        sock.close()
    values = sorted(rtts.values())
    replies = len(values)
    server_received = max(server_received, replies)
    fwd = 1 - server_received / count if count else math.nan
    rev = 1 - replies / server_received if server_received else math.nan
    return {
        "host": host, "port": port, "sent": count, "server_received": server_received, "replies": replies,
        "interval_s": interval, "elapsed_s": round(elapsed, 3),
        "loss_fwd_pct": 100 * fwd, "loss_rev_pct": 100 * rev if server_received else math.nan,
        "loss_pct": 100 * (1 - replies / count) if count else math.nan,
        "rtt_min_ms": values[0] if values else math.nan, "rtt_p10_ms": _percentile(values, 10),
        "rtt_median_ms": _percentile(values, 50), "rtt_p90_ms": _percentile(values, 90),
        "rtt_p99_ms": _percentile(values, 99), "rtt_max_ms": values[-1] if values else math.nan,
        "rtt_mean_ms": statistics.fmean(values) if values else math.nan,
    }  # fmt: skip


def _collect(sock: socket.socket, session: int, rtts: dict[int, float], wait: float) -> int:
    """Read replies for up to ``wait`` s; returns the highest server count seen."""
    best = 0
    end = time.monotonic() + max(wait, 0)
    while True:
        remaining = end - time.monotonic()
        readable, _, _ = select.select([sock], [], [], max(remaining, 0))
        if not readable:
            return best
        while True:
            try:
                data = sock.recv(2048)
            except BlockingIOError:
                break
            except ConnectionRefusedError:
                continue
            if len(data) < _REP.size or data[:4] != MAGIC:
                continue
            _, kind, sess, seq, t_send, received = _REP.unpack_from(data)
            if sess != session:
                continue
            best = max(best, received)
            if kind == PROBE and seq not in rtts:
                rtts[seq] = (time.monotonic_ns() - t_send) / 1e6
        if remaining <= 0:
            return best


def _query_stats(sock: socket.socket, session: int, attempts: int = 20, wait: float = 0.25) -> int:
    """Ask the server how many probes it received (retried: the query itself can be lost); 0 if no answer."""
    for attempt in range(attempts):
        try:
            sock.send(_REQ.pack(MAGIC, STATS, session, attempt, time.monotonic_ns()))
        except (BlockingIOError, ConnectionRefusedError):
            pass
        end = time.monotonic() + wait
        while (remaining := end - time.monotonic()) > 0:
            readable, _, _ = select.select([sock], [], [], remaining)
            if not readable:
                break
            try:
                data = sock.recv(2048)
            except (BlockingIOError, ConnectionRefusedError):
                continue
            if len(data) >= _REP.size and data[:4] == MAGIC:
                _, kind, sess, _seq, _t, received = _REP.unpack_from(data)
                if kind == STATS and sess == session:
                    return received
    return 0


def bulk(host: str, port: int = DEFAULT_PORT, seconds: float = 3.0, chunk: int = 1 << 16) -> float:
    """Throughput of one TCP stream (MB/s, 10⁶ bytes): bytes the server confirms ÷ time until it confirms."""
    payload = b"\0" * chunk
    with socket.create_connection((host, port), timeout=max(10.0, seconds * 4)) as sock:
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while len(reply) < 8 and (part := sock.recv(8 - len(reply))):
            reply += part
        elapsed = time.monotonic() - start
    if len(reply) != 8:
        raise ConnectionError(f"{host}:{port}: the sink closed without a byte count")
    return struct.unpack("!Q", reply)[0] / elapsed / 1e6


# --------------------------------------------------------------------------- rate


def rate_datagram_size(rate_bps: float, max_size: int, seconds: float = RATE_SECONDS, skip: float = RATE_SKIP,
                       min_datagrams: int = RATE_MIN_DATAGRAMS) -> int:  # fmt: skip
    """Payload bytes of one rate datagram: ``max_size`` (the path MTU - 28) unless the rate is so low
    that fewer than ``min_datagrams`` would arrive in the steady window; never below :data:`RATE_MIN_SIZE`."""
    window_bytes = rate_bps * max(seconds - skip, 0.0) / 8
    fit = int(window_bytes / min_datagrams) - UDP_IP_HEADERS
    return max(RATE_MIN_SIZE, min(max_size, fit))


def rate_count(host: str = "0.0.0.0", port: int = DEFAULT_RATE_PORT, seconds: float = 60.0, skip: float = RATE_SKIP,
               linger: float = 1.0, ready: threading.Event | None = None,
               stop: threading.Event | None = None) -> dict[str, Any]:  # fmt: skip
    """Count one rate stream (the first session to say hello) on UDP ``host:port``; returns its figures.

    Bytes are IP bytes (payload + 28). The steady window starts at the first datagram arriving
    ``skip`` s after the first one and ends at the last: read = bytes after the window's first datagram
    ÷ the time from it to the last (an inter-arrival estimate, no edge bias). Delivered adds the
    datagrams of the window that reached this host but overflowed the socket (UDP ``RcvbufErrors``,
    this namespace's, while the window ran): the path carried them, this Python could not read them
    as fast (a TCG guest reads ~10⁴ datagrams/s), which is the reader's limit, not the path's.
    An end from the sender is answered with the figures (again for every retry) and the counter stops
    ``linger`` s later, or after ``seconds`` in any case."""
    stop = stop or threading.Event()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    st: dict[str, Any] = {"session": None, "first": None, "w0": None, "last": None, "datagrams": 0, "bytes": 0,
                          "window_bytes": 0, "window_datagrams": 0, "highest_seq": -1}  # fmt: skip
    result: dict[str, Any] | None = None
    ended_at: float | None = None
    buf = bytearray(65536)  # one buffer for every datagram: a TCG guest's Python allocates slowly
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        sock.bind((host, port))
        if ready is not None:
            ready.set()
        deadline = time.monotonic() + seconds
        while not stop.is_set() and (now := time.monotonic()) < deadline:
            if ended_at is not None and now > ended_at + linger:
                break
            readable, _, _ = select.select([sock], [], [], 0.2)
            if not readable:
                continue
            while True:
                try:
                    n, addr = sock.recvfrom_into(buf, 0, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                t = time.monotonic()
                if n < _REQ.size or buf[:4] != MAGIC:
                    continue
                _, kind, session, seq, _t = _REQ.unpack_from(buf)
                if kind == RATE_HELLO and st["first"] is None:
                    st["session"] = session  # the latest hello before any data: a retried sender wins
                    sock.sendto(_REQ.pack(MAGIC, RATE_READY, session, seq, 0), addr)
                elif session != st["session"]:
                    continue
                elif kind == RATE_HELLO:
                    sock.sendto(_REQ.pack(MAGIC, RATE_READY, session, seq, 0), addr)
                elif kind == RATE_DATA and result is None:
                    _count(st, t, n + UDP_IP_HEADERS, seq, skip)
                elif kind == RATE_END:
                    if result is None:
                        result = _rate_summary(st, skip)
                        ended_at = t
                    reply = json.dumps(result, separators=(",", ":")).encode()
                    sock.sendto(_REQ.pack(MAGIC, RATE_RESULT, session, seq, 0) + reply, addr)
    finally:
        sock.close()
    return result if result is not None else {**_rate_summary(st, skip), "ended": False}


def _count(st: dict[str, Any], t: float, nbytes: int, seq: int, skip: float) -> None:
    if st["first"] is None:
        st["first"] = t
    st["datagrams"] += 1
    st["bytes"] += nbytes
    st["highest_seq"] = max(st["highest_seq"], seq)
    if t >= st["first"] + skip:
        if st["w0"] is None:
            st["w0"] = t  # the window's first datagram marks its start; its bytes arrived before
            st["overflow_w0"] = udp_rcvbuf_errors()
            st["size"] = nbytes  # every data datagram has the same size
        else:
            st["window_bytes"] += nbytes
            st["window_datagrams"] += 1
        st["last"] = t


def _rate_summary(st: dict[str, Any], skip: float) -> dict[str, Any]:
    window = (st["last"] - st["w0"]) if st["w0"] is not None and st["last"] is not None else 0.0
    sent = st["highest_seq"] + 1
    now, then = udp_rcvbuf_errors(), st.get("overflow_w0")
    overflowed = max(now - then, 0) if now is not None and then is not None else None
    arrived = st["window_bytes"] + (overflowed or 0) * st.get("size", 0)
    return {
        "ended": True, "datagrams": st["datagrams"], "bytes": st["bytes"], "skip_s": skip,
        "window_s": round(window, 4), "window_bytes": st["window_bytes"], "window_datagrams": st["window_datagrams"],
        "window_overflowed": overflowed,
        "read_mbps": round(st["window_bytes"] * 8 / window / 1e6, 4) if window > 0 else None,
        "delivered_mbps": round(arrived * 8 / window / 1e6, 4) if window > 0 else None,
        "loss_pct": round(100 * (1 - st["datagrams"] / sent), 3) if sent > 0 else None,
    }  # fmt: skip


def udp_rcvbuf_errors() -> int | None:
    """UDP datagrams this network namespace dropped because a socket's receive buffer was full
    (``RcvbufErrors`` of /proc/net/snmp), None where there is no such file."""
    try:
        lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines() if line.startswith("Udp:")]
        return int(dict(zip(lines[0], lines[1], strict=True))["RcvbufErrors"])
    except (OSError, IndexError, KeyError, ValueError):
        return None


def rate_send(host: str, port: int = DEFAULT_RATE_PORT, rate_bps: float = 10e6, seconds: float = RATE_SECONDS,
              size: int = 1472, hello_timeout: float = 20.0, end_timeout: float = 10.0) -> dict[str, Any]:  # fmt: skip
    """Send one paced UDP stream of ``rate_bps`` (IP bytes) for ``seconds`` to :func:`rate_count` at
    ``host:port``; returns what was sent and the counter's figures (``counter``, None if it never answered).

    Datagrams carry ``size`` payload bytes (clamped to the route's MTU - 28, and smaller at a low rate:
    :func:`rate_datagram_size`). Pacing is by the clock: a datagram is due every (size + 28)·8 / rate s
    and a sender that fell behind sends at once until it is due again, so ``sent_mbps`` is what this
    host can send when it cannot keep up. A datagram the kernel refuses (ENOBUFS) counts as not sent.
    """
    if not rate_bps > 0 or not seconds > 0:
        raise ValueError(f"rate-send: rate {rate_bps:g} bit/s and {seconds:g} s must both be positive")
    session = int.from_bytes(os.urandom(8), "big")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.connect((host, port))
        try:
            size = min(size, sock.getsockopt(socket.IPPROTO_IP, _IP_MTU) - UDP_IP_HEADERS)
        except OSError:
            pass
        size = rate_datagram_size(rate_bps, size, seconds)
        hello_s = _rate_handshake(sock, session, RATE_HELLO, RATE_READY, hello_timeout, 0.2)
        if hello_s is None:
            raise ConnectionError(f"no rate counter answered at {host}:{port} in {hello_timeout:g} s")
        buf = bytearray(size)
        gap = (size + UDP_IP_HEADERS) * 8 / rate_bps
        sent = errors = 0
        start = time.monotonic()
        end = start + seconds
        due = start
        while (now := time.monotonic()) < end:
            if now < due:
                time.sleep(min(due, end) - now)
                continue
            _REQ.pack_into(buf, 0, MAGIC, RATE_DATA, session, sent + errors, 0)
            try:
                sock.send(buf)
                sent += 1
            except OSError:  # ENOBUFS (the host's own queue is full), ECONNREFUSED (the counter went away)
                errors += 1
            due += gap
        elapsed = time.monotonic() - start
        reply = _rate_handshake(sock, session, RATE_END, RATE_RESULT, end_timeout, 0.25, payload=True)
    finally:
        sock.close()
    counter = json.loads(reply) if isinstance(reply, bytes) and reply else None
    return {
        "host": host, "port": port, "wanted_mbps": round(rate_bps / 1e6, 4), "seconds": round(elapsed, 4),
        "datagram_bytes": size, "sent": sent, "send_errors": errors,
        "sent_mbps": round(sent * (size + UDP_IP_HEADERS) * 8 / elapsed / 1e6, 4),
        "hello_s": round(hello_s, 3), "counter": counter,
    }  # fmt: skip


def _rate_handshake(sock: socket.socket, session: int, kind: int, answer: int, timeout: float, every: float,
                    payload: bool = False) -> Any:  # fmt: skip
    """Send ``kind`` every ``every`` s until the counter answers ``answer`` for ``session``: the seconds it
    took (or, with ``payload``, the answer's bytes after the header); None after ``timeout`` s."""
    t0 = time.monotonic()
    attempt = 0
    while (elapsed := time.monotonic() - t0) < timeout:
        try:
            sock.send(_REQ.pack(MAGIC, kind, session, attempt, 0))
        except OSError:
            pass  # refused: the counter is not bound yet (it is still starting)
        attempt += 1
        end = time.monotonic() + min(every, timeout - elapsed)
        while (remaining := end - time.monotonic()) > 0:
            readable, _, _ = select.select([sock], [], [], remaining)
            if not readable:
                break
            try:
                data = sock.recv(65535)
            except OSError:
                continue
            if len(data) >= _REQ.size and data[:4] == MAGIC:
                _, k, sess, _seq, _t = _REQ.unpack_from(data)
                if k == answer and sess == session:
                    return data[_REQ.size:] if payload else time.monotonic() - t0
    return None


def rate_measured(sent: dict[str, Any] | None, error: str | None = None) -> dict[str, Any]:
    """The flat ``rate_*`` fields :func:`compare` reads, from :func:`rate_send`'s output (or an error)."""
    if error is not None or sent is None:
        return {"rate_error": error or "no output from rate-send"}
    counter = sent.get("counter") or {}
    out = {"rate_wanted_mbps": sent.get("wanted_mbps"), "rate_sent_mbps": sent.get("sent_mbps"),
           "rate_datagram_bytes": sent.get("datagram_bytes"), "rate_sent": sent.get("sent"),
           "rate_received": counter.get("datagrams"), "rate_window_s": counter.get("window_s"),
           "rate_delivered_mbps": counter.get("delivered_mbps"), "rate_read_mbps": counter.get("read_mbps"),
           "rate_overflowed": counter.get("window_overflowed")}  # fmt: skip
    if not counter:
        out["rate_error"] = "the rate counter did not report (its answers to the stream's end were lost)"
    return out


def rate_rows(profile: DirectionProfile, measured: dict[str, Any],
              factor: float = RATE_OK_FACTOR) -> list[dict[str, Any]]:  # fmt: skip
    """Rows ``rate sent a→b`` and ``rate a→b`` (Mbit/s) for a direction with a rate; none without a rate
    or without a rate measurement.

    ``rate a→b``: measured = delivered ÷ (1 - configured loss), ok when ≥ ``factor`` × the rate;
    delivered counts what reached the receiving host, read or overflowed (:func:`rate_count`).
    (netem drops lost packets before its rate stage, so when the rate is the bottleneck this overstates
    by 1 / (1 - loss), 1 % at 1 % loss: well inside the factor.) ``rate sent a→b``: what the sending
    guest put on the wire of the :data:`RATE_OVERDRIVE` × rate wanted, ok when ≥ ``factor`` × the rate:
    a sender short of that never tested the path, and limits anything the guest sends as much."""
    if not profile.rate_bps or not any(k.startswith("rate_") for k in measured):
        return []
    rate = profile.rate_bps / 1e6
    floor = factor * rate
    need = f"needs ≥ {floor:.6g} Mbit/s ({factor:g} × configured)"
    if measured.get("rate_error") and measured.get("rate_sent_mbps") is None:
        return [_row("rate a→b", "Mbit/s", _whole(rate), None, None, False, f"not measured: {measured['rate_error']}")]
    sent = _finite(measured.get("rate_sent_mbps"))
    wanted = _finite(measured.get("rate_wanted_mbps")) or RATE_OVERDRIVE * rate
    sender_ok = sent is not None and sent >= floor
    why = (f"the guest could send only {sent:.4g} Mbit/s, {need}" if sent is not None and not sender_ok
           else f"offered {wanted / rate:.3g} × the rate" if sender_ok else "the sender reported nothing")
    rows = [_row("rate sent a→b", "Mbit/s", _whole(wanted), sent, None, sender_ok, why)]
    delivered = _finite(measured.get("rate_delivered_mbps"))
    loss = profile.mean_loss_pct / 100
    got = delivered / (1 - loss) if delivered is not None and loss < 1 else None
    if got is None:
        note = measured.get("rate_error") or "nothing arrived in the steady window"
    else:
        corr = f" ÷ (1 - {profile.mean_loss_pct:g} % loss)" if loss else ""
        short = "" if got >= floor else (": the sender was short" if not sender_ok else ": the path is short")
        overflowed, read = measured.get("rate_overflowed") or 0, _finite(measured.get("rate_read_mbps"))
        slow = f" ({read:.4g} read, {overflowed} datagrams overflowed the reader's socket)" if overflowed and read else ""
        note = f"delivered {delivered:.4g} Mbit/s{slow}{corr}; {need}{short}"
        got = round(got, 3)
    rows.append(_row("rate a→b", "Mbit/s", _whole(rate), got, None, got is not None and got >= floor, note))
    return rows


def _whole(x: float) -> float | int:
    """1000.0 → 1000: a configured rate reads as written."""
    return int(x) if float(x).is_integer() else x


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


# --------------------------------------------------------------------------- comparison


def compare(configured: LinkProfile, measured: dict[str, Any], base_rtt_ms: float | None = None,
            rtt_rel_tol: float = 0.05, loss_sigmas: float = 3.0, base_spread_ms: float = 0.0,
            ) -> list[dict[str, Any]]:  # fmt: skip
    """Rows of configured vs measured: metric, unit, configured, measured, tolerance, ok (None: no verdict).

    RTT: configured = delay a→b + delay b→a + ``base_rtt_ms`` (the bare path's median RTT, shown in
    its own row ``rtt bare`` when known), ok within ±(``rtt_rel_tol`` × configured + ``base_spread_ms``,
    the bare path's own p10-p90 spread).
    Loss: ok within ``loss_sigmas`` standard errors (plus 0.1 point) for the probes each direction saw,
    widened for bursty loss by the Gilbert-Elliott variance inflation.
    Throughput (``bulk_mbps`` in ``measured``): ok when at least 80 % of the a→b rate.
    Rate (``rate_*`` in ``measured``, from :func:`rate_send`): :func:`rate_rows`.
    """
    fwd, rev = configured.a_to_b, configured.b_to_a
    rows: list[dict[str, Any]] = []
    delays = (fwd.delay_us + rev.delay_us) / 1000
    if base_rtt_ms is not None:
        rows.append(_row("rtt bare", "ms", None, base_rtt_ms, base_spread_ms or None, None,
                         "unshaped path, measured once"))  # fmt: skip
        note = f"= {delays:g} delay a→b + b→a + {base_rtt_ms:.3f} bare"
    else:
        note = "bare path not measured: delays only"
    rtt = delays + (base_rtt_ms or 0.0)
    tol = rtt * rtt_rel_tol + base_spread_ms
    got = measured.get("rtt_median_ms", math.nan)
    ok = abs(got - rtt) <= tol if got is not None and not math.isnan(got) else False
    rows.append(_row("rtt median", "ms", rtt, got, tol, ok, note))
    jitter_ms = (fwd.jitter_us + rev.jitter_us) / 1000
    for q in ("p10", "p90", "p99"):
        rows.append(_row(f"rtt {q}", "ms", None, measured.get(f"rtt_{q}_ms"), jitter_ms or None, None))
    sent = int(measured.get("sent", 0))
    server = int(measured.get("server_received", sent))
    combined = 100 * (1 - (1 - fwd.mean_loss_pct / 100) * (1 - rev.mean_loss_pct / 100))
    worst = max(_inflation(fwd), _inflation(rev))
    for name, want, key, n, inflation in (
        ("loss a→b", fwd.mean_loss_pct, "loss_fwd_pct", sent, _inflation(fwd)),
        ("loss b→a", rev.mean_loss_pct, "loss_rev_pct", server, _inflation(rev)),
        ("loss round trip", combined, "loss_pct", sent, worst),
    ):
        got = measured.get(key, math.nan)
        tol = loss_sigmas * loss_stderr_pct(want, n, inflation) + 0.1
        ok = abs(got - want) <= tol if got is not None and not math.isnan(got) else False
        rel = loss_halfwidth_rel(want, n, inflation=inflation)
        rows.append(_row(name, "%", want, got, tol, ok, f"{n} probes: ±{100 * rel:.0f} % at 95 %" if want else ""))
    if "bulk_mbps" in measured:
        rate = fwd.rate_bps / 8e6 if fwd.rate_bps else None
        got = measured["bulk_mbps"]
        rows.append(
            _row("throughput a→b", "MB/s", rate, got, None, None if rate is None else got >= 0.8 * rate)
        )
    rows += rate_rows(fwd, measured)
    return rows


def _row(metric: str, unit: str, configured: Any, measured: Any, tolerance: Any, ok: bool | None,
         note: str = "") -> dict[str, Any]:  # fmt: skip
    def fmt(x: Any) -> Any:
        return round(x, 4) if isinstance(x, float) and not math.isnan(x) else x

    row = {"metric": metric, "unit": unit, "configured": fmt(configured), "measured": fmt(measured),
           "tolerance": fmt(tolerance), "ok": ok}  # fmt: skip
    return row | {"note": note} if note else row


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of :func:`compare` rows."""
    lines = [f"{'metric':<18} {'configured':>12} {'measured':>12} {'±':>8}  unit  ok"]
    for r in rows:
        cells = ["-" if r[k] is None else (f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]))
                 for k in ("configured", "measured", "tolerance")]  # fmt: skip
        verdict = {True: "yes", False: "NO", None: ""}[r["ok"]]
        note = f"  ({r['note']})" if r.get("note") else ""
        lines.append(
            f"{r['metric']:<18} {cells[0]:>12} {cells[1]:>12} {cells[2]:>8}  {r['unit']:<5} {verdict:<3}{note}".rstrip()
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m netem.calibrate", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="UDP echo + TCP sink")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    s.add_argument("--seconds", type=float, default=None, help="stop after this long (default: never)")
    p = sub.add_parser("probe", help="RTT and loss with UDP probes")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--count", type=int, default=None, help="probes (default: from --loss-pct)")
    p.add_argument("--loss-pct", type=float, default=0.0,
                   help="expected loss (%%), sizes the probe count for ±20 %% at 95 %% confidence")
    p.add_argument("--interval", type=float, default=None,
                   help=f"seconds between probes (default: the count in about {PROBE_SECONDS:g} s)")
    p.add_argument("--timeout", type=float, default=1.0, help="seconds to wait for late replies")
    b = sub.add_parser("bulk", help="TCP throughput (MB/s)")
    b.add_argument("--host", required=True)
    b.add_argument("--port", type=int, default=DEFAULT_PORT)
    b.add_argument("--seconds", type=float, default=3.0)
    c = sub.add_parser("rate-count", help="count one paced UDP stream (run it on the receiving side)")
    c.add_argument("--host", default="0.0.0.0")
    c.add_argument("--port", type=int, default=DEFAULT_RATE_PORT)
    c.add_argument("--seconds", type=float, default=60.0, help="stop after this long in any case")
    c.add_argument("--skip", type=float, default=RATE_SKIP, help="seconds of start-up left out of the window")
    r = sub.add_parser("rate-send", help="send one paced UDP stream to rate-count")
    r.add_argument("--host", required=True)
    r.add_argument("--port", type=int, default=DEFAULT_RATE_PORT)
    r.add_argument("--rate", required=True, help="IP-level rate to offer, e.g. 44mbit (tc units)")
    r.add_argument("--seconds", type=float, default=RATE_SECONDS)
    r.add_argument("--size", type=int, default=1472, help="datagram payload bytes at most (the path MTU - 28)")
    args = parser.parse_args(argv)
    out: dict[str, Any]
    try:
        if args.command == "serve":
            stop = threading.Event()
            if args.seconds is not None:
                threading.Timer(args.seconds, stop.set).start()
            ready = threading.Event()
            threading.Thread(target=lambda: (ready.wait(), print(json.dumps({"serving": f"{args.host}:{args.port}"}),
                                                                 flush=True)), daemon=True).start()  # fmt: skip
            serve(args.host, args.port, stop, ready)
            return 0
        if args.command == "rate-count":
            ready = threading.Event()
            threading.Thread(target=lambda: (ready.wait(), print(json.dumps({"counting": f"{args.host}:{args.port}"}),
                                                                 flush=True)), daemon=True).start()  # fmt: skip
            out = rate_count(args.host, args.port, args.seconds, args.skip, ready=ready)
        elif args.command == "rate-send":
            out = rate_send(args.host, args.port, parse_rate_bps(args.rate, "--rate"), args.seconds, args.size)
        elif args.command == "probe":
            count = args.count or probes_for_loss(args.loss_pct)
            interval = args.interval if args.interval is not None else probe_interval(count)
            out = probe(args.host, args.port, count, interval, args.timeout)
        else:
            out = {"host": args.host, "port": args.port, "seconds": args.seconds,
                   "bulk_mbps": bulk(args.host, args.port, args.seconds)}  # fmt: skip
    except (OSError, ValueError) as err:  # a ProfileError is a ValueError
        print(f"calibrate: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(json.dumps({k: None if isinstance(v, float) and math.isnan(v) else v for k, v in out.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
