"""The wire check: was every network-sync ack given only once its bytes were on the WAN with their repairs?

network-sync's promise is made at the egress gateway: an append is acknowledged once the packets
carrying it *and every repair covering them* have left the site. Whether a disaster then loses an
acked append depends on luck (a WAN loss in the few milliseconds between a packet and its last
repair, and the disaster inside them), so a drill that only counts losses catches a gateway that
breaks this promise rarely. The wire check catches it every time, from evidence outside the stack:

- a capture of what left the primary site, taken on the host at the primary VM's tap (host clock:
  the frame has left the guest; the gateway's own counters are not trusted), with
  :mod:`netem.capture`;
- the primary servers' ack traces (``smfs.primary``: per server the mirror flow, then per ack the
  stream offset just after the append and the guest's wall-clock time of the ack);
- the guest's clock offset from the host's, measured by the drill.

- when the host received each ack: the ledger line the tester writes once the ack is in (the VM
  drill records the host's time of arrival of each chunk of the ledger stream; the namespace
  drill's testers write the host's clock). The ack was given before that, so comparing the wire's
  times with it needs no guest clock, and can never accuse a correct stack of being early.

The capture is replayed through the specification of "safe" (:class:`smfs.callbacks.FlowTracker`,
never with a seeded defect): each flow's safe stream offset over time, as the wire shows it. An ack
is **unsafe** when its offset became safe on the wire later than the host received the ack (beyond
:data:`SLACK_S`), or never while the capture still ran for :data:`HORIZON_S` after it. The lag
against the primary's own ack time (its guest clock, less the measured offset) is reported beside
it, for information.
The check is **inconclusive** (and judges nothing) when the capture lost frames, or when it saw none
of a flow's SYN (the replay cannot number its bytes).

The pcap parser needs no scapy and reads only the headers (a snaplen of :data:`SNAPLEN` bytes is
enough). :class:`Capture` runs the capture beside a testbed (on a VM's host tap, or in a namespace)
and :func:`evaluate` turns the capture and the ack traces into the result both testbeds report.
"""

from __future__ import annotations

import bisect
import json
import struct
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from smfs import tunnel
from smfs.callbacks import Flow, FlowTracker
from testbed.errors import TestbedError

SNAPLEN = 192
"""Bytes of each frame the capture keeps: Ethernet, IPv4, UDP, the tunnel header and the inner IPv4
and TCP headers of a DATA datagram (14 + 20 + 8 + 12 + 60 + 60), or a REPAIR's header and table."""
SLACK_S = 0.001
"""Seconds an ack's receipt may precede the wire's evidence where the capture sees the gateway's own
interface (the namespace testbed): the capture's timestamp granularity."""
SLACK_VM_S = 0.010
"""Seconds an ack's receipt on the host may precede the wire's evidence in the VM testbed. A correct stack's gateway
counts a datagram sent once the guest kernel took it; under a TCG guest the frame can still wait in
the guest's NIC queue while the ack travels to the host: measured up to 1.4 ms beyond the ack's
receipt (once in about 500 correct-stack acks), against 7-48 acks per run of 35-89 at 10-270 ms for
the seeded defect (100 ms flush). Acks inside the slack but after the receipt are counted apart
(``within_slack``): the emulation's window, not hidden."""
HORIZON_S = 1.0
"""An ack whose offset the wire never made safe is unsafe only when the capture ran this long after it."""
MAX_EXAMPLES = 10

_GLOBAL = struct.Struct("=IHHiIII")
_RECORD = struct.Struct("=IIII")
_ETH_P_IP = 0x0800


class WireError(TestbedError, ValueError):
    """A capture or an ack trace that cannot be read; the message names the file."""


def read_pcap(path: str | Path) -> Iterator[tuple[float, bytes]]:
    """``(timestamp s, frame bytes as kept)`` per record of a libpcap file (either byte order, µs or ns)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise WireError(f"{path}: {err.strerror or err}") from None
    if len(data) < _GLOBAL.size:
        raise WireError(f"{path}: not a pcap file ({len(data)} bytes)")
    magic = int.from_bytes(data[:4], "little")
    orders = {0xA1B2C3D4: ("<", 1e-6), 0xD4C3B2A1: (">", 1e-6), 0xA1B23C4D: ("<", 1e-9), 0x4D3CB2A1: (">", 1e-9)}
    if magic not in orders:
        raise WireError(f"{path}: not a pcap file (magic 0x{magic:08x})")
    order, unit = orders[magic]
    rec = struct.Struct(order + "IIII")
    off = _GLOBAL.size
    while off + rec.size <= len(data):
        sec, frac, incl, _orig = rec.unpack_from(data, off)
        off += rec.size
        if off + incl > len(data):
            break  # a record cut by a capture that was killed: the rest is not evidence
        yield sec + frac * unit, data[off : off + incl]
        off += incl


class _Cover(NamedTuple):
    """What the tracker reads of a repair: its layer and the tunnel seqs it covers."""

    layer: int
    seqs: tuple[int, ...]


def parse_tunnel(frame: bytes, site: int) -> tuple[int, bytes] | _Cover | None:
    """From an Ethernet frame: ``(seq, inner IP packet padded to its total length)`` for a DATA datagram
    of ``site``, a :class:`_Cover` for its REPAIR, None for anything else. Only headers are read (the MAC
    is not checked: the capture is taken on the sender's own tap, and its frames may be cut)."""
    if len(frame) < 14 + 20 + 8 + 4 or int.from_bytes(frame[12:14], "big") != _ETH_P_IP:
        return None
    ip = 14
    if frame[ip] >> 4 != 4 or frame[ip + 9] != 17:
        return None
    udp = ip + (frame[ip] & 0x0F) * 4
    body = udp + 8
    if len(frame) < body + 4:
        return None
    magic, version, kind, sender = frame[body : body + 4]
    if magic != tunnel.MAGIC or version != tunnel.VERSION or sender != site:
        return None
    if kind == tunnel.KIND_DATA:
        if len(frame) < body + 12 + 20:
            return None
        seq = int.from_bytes(frame[body + 4 : body + 12], "big")
        inner = frame[body + 12 :]
        total = int.from_bytes(inner[2:4], "big")
        if total > len(inner):  # cut by the snaplen: the tracker reads headers and the total length only
            inner = inner + bytes(total - len(inner))
        return seq, inner
    if kind == tunnel.KIND_REPAIR:
        head = body + 4
        if len(frame) < head + 10:
            return None
        layer, n, first = struct.unpack_from("!BBQ", frame, head)
        if not 1 <= n <= 64 or len(frame) < head + 10 + 4 * (n - 1):
            return None
        deltas = struct.unpack_from(f"!{n - 1}I", frame, head + 10)
        return _Cover(layer, (first, *(first + d for d in deltas)))
    return None


@dataclass
class WireTimeline:
    """Per flow, when (capture time, s) each safe offset was reached on the wire, in order."""

    times: dict[Flow, list[float]]
    offsets: dict[Flow, list[int]]
    data: int = 0
    repairs: int = 0
    first: float | None = None
    last: float | None = None

    def safe_at(self, flow: Flow, offset: int) -> float | None:
        """The capture time at which ``flow``'s bytes below ``offset`` were all safe; None if never."""
        offs = self.offsets.get(flow)
        if not offs:
            return None
        i = bisect.bisect_left(offs, offset)
        return self.times[flow][i] if i < len(offs) else None


def replay(frames: Iterable[tuple[float, bytes]], site: int = 1, c: int = 3) -> WireTimeline:
    """Replay a capture's tunnel datagrams from ``site`` through the tracker of "safe" (c layers)."""
    tracker = FlowTracker(c=c)
    out = WireTimeline({}, {})
    for ts, frame in frames:
        got = parse_tunnel(frame, site)
        if got is None:
            continue
        out.first = ts if out.first is None else out.first
        out.last = ts
        if isinstance(got, _Cover):
            out.repairs += 1
            tracker.on_repairs_sent([got])  # type: ignore[list-item]
        else:
            out.data += 1
            tracker.on_packet_sent(got[0], got[1])
        for flow, offset in tracker.safe_offsets():
            out.times.setdefault(flow, []).append(ts)
            out.offsets.setdefault(flow, []).append(offset)
    return out


@dataclass(frozen=True)
class Ack:
    flow: Flow
    log: int
    seq: int
    end: int
    t: float  # the guest's clock


def read_ack_trace(text: str, name: str = "ack trace") -> list[Ack]:
    """Parse one primary server's ack trace (``smfs.primary``); the last line may be cut."""
    lines = text.splitlines()
    if not lines:
        return []
    head = lines[0].split()
    if len(head) != 5 or head[0] != "flow":
        raise WireError(f"{name}: first line must be 'flow SRC SPORT DST DPORT', got {lines[0][:80]!r}")
    try:
        flow = Flow(head[1], int(head[2]), head[3], int(head[4]))
    except ValueError:
        raise WireError(f"{name}: bad flow line {lines[0][:80]!r}") from None
    acks = []
    for n, line in enumerate(lines[1:], start=2):
        f = line.split()
        try:
            if len(f) != 4:
                raise ValueError
            acks.append(Ack(flow, int(f[0]), int(f[1]), int(f[2]), float(f[3])))
        except ValueError:
            if n == len(lines):
                break  # the last line, cut while being written
            raise WireError(f"{name}:{n}: expected 'LOG SEQ END T', got {line[:80]!r}") from None
    return acks


def ledger_receipts(stream: Path, recv: Path) -> dict[tuple[int, int], float]:
    """(log, seq) -> host time at which the ``ok`` ledger line of that append arrived, from the VM
    drill's ledger stream and its chunk times (``BYTES_SO_FAR TIME`` lines); {} when either is missing."""
    try:
        data = stream.read_bytes()
        marks = [(int(a), float(b)) for a, b in (line.split() for line in recv.read_text().splitlines() if line.strip())]
    except (OSError, ValueError):
        return {}
    ends = [m[0] for m in marks]
    out: dict[tuple[int, int], float] = {}
    pos = 0
    for line in data.split(b"\n"):
        pos += len(line) + 1
        if b'"ok"' not in line:
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        i = bisect.bisect_left(ends, pos - 1)  # the chunk holding the line's last byte
        if obj.get("outcome") == "ok" and i < len(marks):
            out.setdefault((int(obj["log"]), int(obj["seq"])), marks[i][1])
    return out


def check(acks: list[Ack], wire: WireTimeline, clock: dict[str, Any], capture: dict[str, Any] | None = None,
          received: dict[tuple[int, int], float] | None = None, slack: float = SLACK_S,
          horizon: float = HORIZON_S) -> dict[str, Any]:
    """Hold every ack against the wire: a plain dict for result.json (see the module docstring).

    ``received``: (log, seq) -> host time the ack was known to have been given by (its ledger line's
    arrival); an ack not in it is not judged (``not_in_ledger``). ``clock``: the primary guest's
    ``offset_s`` (guest minus host) and ``uncertainty_s``, for the reported lag against the primary's
    own ack time. ``capture``: the capture's figures (``kernel_drops`` above 0: inconclusive)."""
    offset = float(clock.get("offset_s", 0.0))
    received = received or {}
    out: dict[str, Any] = {"acks": len(acks), "checked": 0, "unsafe": 0, "within_slack": 0, "beyond_capture": 0,
                           "not_in_ledger": 0,
                           "slack_ms": round(slack * 1000, 2), "data": wire.data, "repairs": wire.repairs,
                           "flows": len(wire.offsets), "examples": []}
    reasons = []
    drops = (capture or {}).get("kernel_drops")
    if drops:
        reasons.append(f"the capture lost {drops} frames")
    unseen = sorted({a.flow for a in acks} - set(wire.offsets))
    if unseen:
        reasons.append(f"no safe offset on the wire for {len(unseen)} of the primary's flows "
                       "(capture started after their SYN?), e.g. {}:{} -> {}:{}".format(*unseen[0]))
    lags: list[float] = []
    margins: list[float] = []
    for a in acks:
        got = received.get((a.log, a.seq))
        if got is None:
            out["not_in_ledger"] += 1
            continue
        if wire.last is None or got + horizon > wire.last:
            out["beyond_capture"] += 1
            continue
        out["checked"] += 1
        w = wire.safe_at(a.flow, a.end)
        if w is not None:
            lags.append(w - (a.t - offset))
            margins.append(got - w)
        if w is not None and got < w <= got + slack:
            out["within_slack"] += 1
        if w is None or w > got + slack:
            out["unsafe"] += 1
            if len(out["examples"]) < MAX_EXAMPLES:
                out["examples"].append({"log": a.log, "seq": a.seq, "end": a.end,
                                        "wire_after_receipt_ms": None if w is None else round((w - got) * 1000, 2)})
    for name, vals in (("lag_ms", lags), ("margin_ms", margins)):
        if vals:
            vals.sort()
            out[name] = {"min": round(vals[0] * 1000, 2), "median": round(vals[len(vals) // 2] * 1000, 2),
                         "max": round(vals[-1] * 1000, 2)}
    out["inconclusive"] = "; ".join(reasons) if reasons else None
    if not out["checked"] and not reasons:
        out["inconclusive"] = "no ack early enough in the capture (and in the ledger) to be checked"
    return out


def summary_line(res: dict[str, Any]) -> str:
    """One line for the timeline."""
    if res.get("inconclusive"):
        return f"wire check inconclusive: {res['inconclusive']}"
    lag, margin = res.get("lag_ms") or {}, res.get("margin_ms") or {}
    return (f"wire check: {res['unsafe']} of {res['checked']} acks received before their bytes and repairs were on the WAN "
            f"(receipt minus wire: min {margin.get('min')} ms, median {margin.get('median')} ms; wire minus the primary's "
            f"ack, guest clock: median {lag.get('median')} ms, max {lag.get('max')} ms)")


class Capture:
    """:mod:`netem.capture` of the tunnel port on ``iface``, as a child process (``prefix`` runs it
    elsewhere, e.g. ``ip netns exec NS``), from :meth:`__init__` (it returns once the socket listens)
    to :meth:`stop`."""

    def __init__(self, iface: str, out: Path, prefix: tuple[str, ...] = (), port: int = 7800,
                 registry: Any = None, owner: str = "") -> None:
        from testbed import procs

        self.iface, self.out, self.registry = iface, out, registry
        self.proc: subprocess.Popen[str] | None = subprocess.Popen(
            [*prefix, sys.executable, "-m", "netem.capture", "--iface", iface, "--seconds", "86400",
             "--out", str(out), "--snaplen", str(SNAPLEN), "--udp-port", str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        if registry is not None:  # ./inv down kills it if this process dies first
            registry.add("process", str(self.proc.pid), owner, name="wire-capture",
                         started=procs.start_time(self.proc.pid), argv=self.proc.args)
        line = self.proc.stderr.readline() if self.proc.stderr else ""
        if "listening" not in line:
            self.kill()
            raise WireError(f"the wire capture on {iface} did not start: {line.strip()[-200:]}")

    def _forget(self, proc: subprocess.Popen[str]) -> None:
        if self.registry is not None:
            self.registry.remove("process", str(proc.pid))

    def stop(self) -> dict[str, Any]:
        """End the capture; its figures (``error`` when it failed)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return {"error": "the capture was already stopped"}
        proc.terminate()
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        self._forget(proc)
        try:
            return dict(json.loads(stdout.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            return {"error": f"the capture failed (exit {proc.returncode}): {stderr.strip()[-200:]}"}

    def kill(self) -> None:
        """End it without its figures (a mode that failed before its check)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.communicate(timeout=10)
            self._forget(proc)


def evaluate(pcap: Path, traces: dict[str, str | None], clock: dict[str, Any], figures: dict[str, Any],
             received: dict[tuple[int, int], float], site: int = 1, c: int = 3, slack: float = SLACK_S) -> dict[str, Any]:
    """The wire check of one mode: the capture ``pcap`` (with its ``figures``), the primary servers'
    ack traces by name (None: unreadable, which makes the check inconclusive), the guest clock."""
    if figures.get("error"):
        return {"inconclusive": figures["error"], "unsafe": 0, "checked": 0, "capture": figures}
    acks: list[Ack] = []
    for name, text in sorted(traces.items()):
        if text is not None:
            acks.extend(read_ack_trace(text, name))
    res = check(acks, replay(read_pcap(pcap), site=site, c=c), clock, figures, received, slack=slack)
    res["capture"] = figures
    missing = sorted(name for name, text in traces.items() if text is None)
    if missing:
        res["inconclusive"] = "; ".join(filter(None, [res.get("inconclusive"), f"ack traces unreadable: {', '.join(missing)}"]))
    if not traces:
        res["inconclusive"] = res.get("inconclusive") or "no ack trace"
    return res
