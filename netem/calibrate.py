"""Measure the realised WAN path: RTT and loss each way with UDP probes, throughput with bulk TCP.

Runs anywhere Python does (host, namespace, guest) and prints JSON::

    python3 -m netem.calibrate serve --port 7788              # UDP echo + TCP sink on one port
    python3 -m netem.calibrate probe --host 10.0.0.2 --port 7788 --loss-pct 1
    python3 -m netem.calibrate bulk --host 10.0.0.2 --port 7788 --seconds 3

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
from typing import Any

from netem.profile import DirectionProfile, LinkProfile

MAGIC = b"SMFC"
PROBE, STATS = 0, 1
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
    args = parser.parse_args(argv)
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
        if args.command == "probe":
            count = args.count or probes_for_loss(args.loss_pct)
            interval = args.interval if args.interval is not None else probe_interval(count)
            out: dict[str, Any] = probe(args.host, args.port, count, interval, args.timeout)
        else:
            out = {"host": args.host, "port": args.port, "seconds": args.seconds,
                   "bulk_mbps": bulk(args.host, args.port, args.seconds)}  # fmt: skip
    except (OSError, ValueError) as err:
        print(f"calibrate: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(json.dumps({k: None if isinstance(v, float) and math.isnan(v) else v for k, v in out.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
