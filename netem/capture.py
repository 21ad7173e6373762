"""Capture the WAN traffic of one interface to a pcap file, and summarise a capture.

The capture runs anywhere Python does, in particular in the Debian guests (python3, no tcpdump,
no scapy): an ``AF_PACKET`` raw socket, a filter in Python, a libpcap file (magic 0xa1b2c3d4,
linktype 1 Ethernet, µs timestamps). Standard library only::

    python3 -m netem.capture --iface eth0 --seconds 5 --out /var/tmp/wan.pcap [--udp-port 7800]
                             [--max-packets N] [--snaplen N]

It keeps IPv4/UDP frames from or to ``--udp-port`` (the gateways' tunnel port; 0 keeps every
frame), stops after ``--seconds``, ``--max-packets``, SIGTERM or SIGINT (the file is complete in
every case) and prints one JSON line: packets written, frames seen, kernel drops.

Where it looks: the tap sees a host's own packets as they leave (after its egress qdisc) and the
arriving ones *before* its ingress qdisc. On a VM testbed shaped at each site's ingress, a
capture on ``eth0`` therefore shows what the peer sent, before the WAN's loss; on ``ifb-eth0`` it
shows the arriving direction after netem (what the gateway receives).

:func:`summarise` (host side, needs scapy) reads a capture back and classifies the tunnel
datagrams with the wire format of :mod:`smfs.tunnel`: DATA and REPAIR per direction, their bytes,
and gaps in the DATA sequence numbers ("missing in capture": lost before the tap, or dropped by
it, see ``kernel_drops``).
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

TUNNEL_PORT = 7800
"""The gateways' UDP tunnel port (``testbed.drill.gateways.TUNNEL_PORT``; not imported: the guests do not
have the ``testbed`` package)."""
PCAP_MAGIC = 0xA1B2C3D4
LINKTYPE_ETHERNET = 1
DEFAULT_SNAPLEN = 65535
"""Bytes kept per frame (the rest is counted in the record's original length)."""
MAX_GAPS = 20
"""Gap ranges listed per direction in a summary (all are counted)."""

_ETH_P_ALL = 0x0003
_ETH_P_IP = 0x0800
_VLAN_TYPES = (0x8100, 0x88A8)
_SOL_PACKET = 263
_PACKET_STATISTICS = 6
_SO_TIMESTAMPNS = 35
_SO_RCVBUFFORCE = 33
_SOCK_BUF = 8 << 20
"""Socket receive buffer (bytes)."""
_ETHERNET_HATYPES = {1: "ether", 772: "loopback"}
"""ARPHRD types whose frames start with an Ethernet header (the loopback's is zeros)."""
_RECV_BUF = 1 << 18
"""Receive buffer (bytes): larger than any GSO/GRO frame; longer ones are cut, still counted."""
_POLL = 0.2
"""Seconds between checks of the deadline and of a stop signal while the link is idle."""

_GLOBAL = struct.Struct("=IHHiIII")
_RECORD = struct.Struct("=IIII")
_TIMESPEC = struct.Struct("@ll")


class CaptureError(RuntimeError):
    """A capture could not be taken or read back; the message is one line."""


# --- pcap -------------------------------------------------------------------------------------


class PcapWriter:
    """A libpcap file (native byte order, as libpcap writes it): the global header at open, then
    one record per :meth:`write`."""

    def __init__(self, out: BinaryIO, snaplen: int = DEFAULT_SNAPLEN, linktype: int = LINKTYPE_ETHERNET) -> None:
        if not 1 <= snaplen <= 0x3FFFFFFF:
            raise ValueError(f"snaplen must be 1..{0x3FFFFFFF}, got {snaplen}")
        self.out = out
        self.snaplen = snaplen
        self.packets = 0
        self.bytes = 0
        out.write(_GLOBAL.pack(PCAP_MAGIC, 2, 4, 0, 0, snaplen, linktype))

    def write(self, ts_ns: int, frame: bytes | memoryview, orig_len: int | None = None) -> None:
        """One record: ``frame`` cut to the snaplen, captured at ``ts_ns`` (ns since the epoch);
        ``orig_len`` is the frame's length on the wire (default ``len(frame)``)."""
        kept = frame[: self.snaplen]
        orig = len(frame) if orig_len is None else orig_len
        sec, nsec = divmod(ts_ns, 1_000_000_000)
        self.out.write(_RECORD.pack(sec, nsec // 1000, len(kept), orig))
        self.out.write(kept)
        self.packets += 1
        self.bytes += orig


def matches(frame: bytes | memoryview, port: int) -> bool:
    """True when ``frame`` (Ethernet) is an IPv4 UDP datagram from or to ``port``; every frame when
    ``port`` is 0. Only first fragments carry the ports: the tunnel never fragments (its datagrams
    are sized for the WAN MTU, ``smfs.gateway.tun_mtu``)."""
    if port == 0:
        return True
    off = 12
    if len(frame) < off + 2:
        return False
    ethertype = int.from_bytes(frame[off : off + 2], "big")
    while ethertype in _VLAN_TYPES and len(frame) >= off + 6:
        off += 4
        ethertype = int.from_bytes(frame[off : off + 2], "big")
    ip = off + 2
    if ethertype != _ETH_P_IP or len(frame) < ip + 20 or frame[ip] >> 4 != 4 or frame[ip + 9] != 17:
        return False
    if int.from_bytes(frame[ip + 6 : ip + 8], "big") & 0x1FFF:
        return False
    udp = ip + (frame[ip] & 0x0F) * 4
    if len(frame) < udp + 4:
        return False
    sport, dport = struct.unpack_from("!HH", frame, udp)
    return port in (sport, dport)


# --- capture ----------------------------------------------------------------------------------


def _hatype(iface: str) -> int:
    try:
        return int(Path(f"/sys/class/net/{iface}/type").read_text())
    except FileNotFoundError:
        raise CaptureError(f"--iface {iface}: no such interface (see ip link)") from None


def open_socket(iface: str) -> socket.socket:
    """A raw packet socket bound to ``iface`` (every protocol, both directions), kernel timestamps on."""
    hatype = _hatype(iface)
    if hatype not in _ETHERNET_HATYPES:
        raise CaptureError(f"--iface {iface}: not an Ethernet interface (ARPHRD type {hatype})")
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
    except PermissionError:
        raise CaptureError("a raw packet socket needs root (CAP_NET_RAW)") from None
    try:
        sock.bind((iface, _ETH_P_ALL))
        try:  # root may exceed net.core.rmem_max: a burst then waits in the buffer instead of being dropped
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, _SOCK_BUF)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCK_BUF)
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        sock.settimeout(_POLL)
    except OSError as err:
        sock.close()
        raise CaptureError(f"--iface {iface}: {err.strerror or err}") from None
    return sock


def _kernel_drops(sock: socket.socket) -> int | None:
    """Frames the kernel dropped for this socket (its buffer was full), or None if unknown."""
    try:
        _packets, drops = struct.unpack("=II", sock.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, 8))
    except OSError:
        return None
    return drops


@contextmanager
def _stop_on_signals() -> Iterator[list[str]]:
    """SIGTERM and SIGINT set a flag (the returned list gets the signal's name) instead of killing:
    the capture loop ends at its next poll and the file is closed complete."""
    stopped: list[str] = []

    def handler(signum: int, _frame: Any) -> None:
        stopped.append(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stopped
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def capture(iface: str, seconds: float, out: Path, port: int = TUNNEL_PORT, max_packets: int = 0,
            snaplen: int = DEFAULT_SNAPLEN) -> dict[str, Any]:
    """Capture ``iface`` for ``seconds`` (or ``max_packets`` written, 0: no limit, or a SIGTERM /
    SIGINT) into the pcap file ``out``; returns the figures printed as JSON."""
    if not 0 < seconds < math.inf:
        raise CaptureError(f"--seconds {seconds:g}: give a positive duration")
    if not 0 <= port <= 65535:
        raise CaptureError(f"--udp-port {port}: use 1..65535 (or 0 for every frame)")
    if max_packets < 0:
        raise CaptureError(f"--max-packets {max_packets}: use a count >= 1 (or 0 for no limit)")
    if not 1 <= snaplen <= 0x3FFFFFFF:
        raise CaptureError(f"--snaplen {snaplen}: use 1..{0x3FFFFFFF} bytes")
    buf = bytearray(_RECV_BUF)
    view = memoryview(buf)
    anc = socket.CMSG_SPACE(_TIMESPEC.size)
    seen = downs = 0
    reason = "time"
    loopback = _hatype(iface) == 772
    with _stop_on_signals() as stopped, open_socket(iface) as sock, open(out, "wb") as f:
        writer = PcapWriter(f, snaplen)
        print(f"capture: listening on {iface}" + (f", UDP port {port}" if port else ", every frame"),
              file=sys.stderr, flush=True)
        t0 = time.monotonic()
        deadline = t0 + seconds
        while True:
            if stopped:
                reason = stopped[0]
                break
            if max_packets and writer.packets >= max_packets:
                reason = "max-packets"
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(min(_POLL, left))
            try:
                n, ancdata, _flags, addr = sock.recvmsg_into([buf], anc, socket.MSG_TRUNC)
            except TimeoutError:
                continue
            except OSError as err:
                if err.errno != errno.ENETDOWN:
                    raise
                downs += 1  # the link was set down (a cut): the kernel re-attaches the socket when it is up
                time.sleep(min(_POLL, max(0.0, deadline - time.monotonic())))
                continue
            if loopback and addr[2] == socket.PACKET_OUTGOING:
                continue  # the loopback shows every frame twice, as it leaves and as it arrives (as libpcap)
            seen += 1
            frame = view[: min(n, _RECV_BUF)]
            if not matches(frame, port):
                continue
            writer.write(_timestamp(ancdata), frame, n)
        elapsed = time.monotonic() - t0
        drops = _kernel_drops(sock)
    return {"iface": iface, "out": str(out), "packets": writer.packets, "bytes": writer.bytes, "seen": seen,
            "kernel_drops": drops, "iface_down": downs, "seconds": round(elapsed, 3), "stopped_by": reason,
            "udp_port": port or None, "snaplen": snaplen}


def _timestamp(ancdata: list[tuple[int, int, bytes]]) -> int:
    """The kernel's receive time (ns) from SO_TIMESTAMPNS, else now."""
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(data)
            return sec * 1_000_000_000 + nsec
    return time.time_ns()


# --- summary (host side, scapy) ---------------------------------------------------------------


def summarise(pcap_path: str | Path, tunnel_port: int = TUNNEL_PORT, key: bytes | None = None) -> dict[str, Any]:
    """Read a capture with scapy and classify its tunnel datagrams (UDP from or to ``tunnel_port``)
    by :mod:`smfs.tunnel`'s wire format; a plain dict, ready for JSON.

    Per direction (``src`` → ``dst`` address:port, sender ``site``): ``data`` and ``repairs``
    (datagrams) with their UDP payload bytes as on the wire (also when the capture cut them),
    repairs per FEC layer, the DATA seq range seen and ``missing_in_capture`` (seqs absent between
    the first and the last seen; the first ``gaps`` as ``[first, last]`` ranges) and
    ``duplicates``. The MAC is checked only when ``key`` is given and the datagram is whole
    (``verified`` / ``bad_mac``); ``not_tunnel`` counts UDP on the port that is not a tunnel
    datagram, ``other`` every other frame."""
    from scapy.error import Scapy_Exception
    from scapy.layers.inet import IP, UDP
    from scapy.utils import PcapReader

    path = Path(pcap_path)
    if not path.is_file():
        raise CaptureError(f"{path}: no such capture file")
    flows: dict[tuple[str, str, int], _Flow] = {}
    counts = {"packets": 0, "other": 0, "not_tunnel": 0, "truncated": 0}
    first_ts = last_ts = None
    try:
        with PcapReader(str(path)) as reader:
            for pkt in reader:
                counts["packets"] += 1
                ts = float(pkt.time)
                first_ts = ts if first_ts is None else first_ts
                last_ts = ts
                if IP not in pkt or UDP not in pkt or tunnel_port not in (pkt[UDP].sport, pkt[UDP].dport):
                    counts["other"] += 1
                    continue
                ip, udp = pkt[IP], pkt[UDP]
                payload = bytes(udp.payload)
                wire_len = udp.len - 8 if udp.len and udp.len >= 8 else len(payload)
                head = _parse_head(payload, wire_len)
                if head is None:
                    counts["not_tunnel"] += 1
                    continue
                kind, site, number, layer = head
                whole = len(payload) >= wire_len
                counts["truncated"] += not whole
                k = (f"{ip.src}:{udp.sport}", f"{ip.dst}:{udp.dport}", site)
                flow = flows.setdefault(k, _Flow())
                flow.add(kind, number, layer, wire_len)
                if key is not None and whole:
                    flow.check_mac(payload[:wire_len], key)
    except Scapy_Exception as err:
        raise CaptureError(f"{path}: not a readable pcap file ({err})") from None
    except (struct.error, EOFError, ValueError) as err:
        raise CaptureError(f"{path}: damaged pcap file ({err})") from None
    directions = [{"src": s, "dst": d, "site": site, **flow.to_dict(key is not None)}
                  for (s, d, site), flow in sorted(flows.items())]
    totals = {f: sum(x[f] for x in directions) for f in
              ("data", "data_bytes", "repairs", "repair_bytes", "missing_in_capture", "duplicates")}
    totals["repair_overhead"] = round(totals["repair_bytes"] / totals["data_bytes"], 4) if totals["data_bytes"] else None
    return {"file": str(path), "tunnel_port": tunnel_port, **counts,
            "seconds": round(last_ts - first_ts, 6) if first_ts is not None and last_ts is not None else 0.0,
            "totals": totals, "directions": directions}


def _parse_head(payload: bytes, wire_len: int) -> tuple[int, int, int, int | None] | None:
    """``(kind, site, seq or first covered seq, layer or None)`` of a tunnel datagram's header
    (magic, version, kind, site, then the DATA seq or the REPAIR layer, n, first), or None when the
    bytes are not one. ``payload`` may be cut by the snaplen; ``wire_len`` is its length on the wire."""
    from smfs import tunnel

    if len(payload) < 12 or wire_len < 12 + tunnel.MAC_LEN:
        return None
    magic, version, kind, site = payload[:4]
    if magic != tunnel.MAGIC or version != tunnel.VERSION:
        return None
    if kind == tunnel.KIND_DATA:
        return kind, site, int.from_bytes(payload[4:12], "big"), None
    if kind == tunnel.KIND_REPAIR and len(payload) >= 14:
        layer, _n, first = struct.unpack_from("!BBQ", payload, 4)
        return kind, site, first, layer
    return None


class _Flow:
    """The tunnel datagrams of one direction."""

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.data_bytes = 0
        self.repairs = 0
        self.repair_bytes = 0
        self.layers: dict[str, int] = {}
        self.verified = 0
        self.bad_mac = 0

    def add(self, kind: int, number: int, layer: int | None, size: int) -> None:
        if layer is None:
            self.seqs.append(number)
            self.data_bytes += size
        else:
            self.repairs += 1
            self.repair_bytes += size
            self.layers[str(layer)] = self.layers.get(str(layer), 0) + 1

    def check_mac(self, datagram: bytes, key: bytes) -> None:
        from smfs.tunnel import TunnelError, decode_raw

        try:
            decode_raw(datagram, key)
        except TunnelError as err:
            if err.reason == "bad mac":
                self.bad_mac += 1
                return
        self.verified += 1

    def to_dict(self, keyed: bool) -> dict[str, Any]:
        distinct = sorted(set(self.seqs))
        gaps = [[a + 1, b - 1] for a, b in zip(distinct, distinct[1:], strict=False) if b - a > 1]
        missing = sum(b - a + 1 for a, b in gaps)
        out: dict[str, Any] = {
            "data": len(self.seqs), "data_bytes": self.data_bytes, "repairs": self.repairs,
            "repair_bytes": self.repair_bytes, "repairs_by_layer": dict(sorted(self.layers.items())),
            "seq_first": distinct[0] if distinct else None, "seq_last": distinct[-1] if distinct else None,
            "missing_in_capture": missing, "duplicates": len(self.seqs) - len(distinct), "gaps": gaps[:MAX_GAPS],
        }
        if keyed:
            out |= {"verified": self.verified, "bad_mac": self.bad_mac}
        return out


# --- command line -----------------------------------------------------------------------------


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m netem.capture", description=__doc__.splitlines()[0])
    parser.add_argument("--iface", required=True, help="interface to capture on, e.g. eth0")
    parser.add_argument("--seconds", type=float, required=True, help="how long to capture (s)")
    parser.add_argument("--out", type=Path, required=True, help="pcap file to write")
    parser.add_argument("--udp-port", type=int, default=TUNNEL_PORT,
                        help=f"keep IPv4/UDP from or to this port (default {TUNNEL_PORT}); 0 keeps every frame")
    parser.add_argument("--max-packets", type=int, default=0, help="stop after this many packets (0: no limit)")
    parser.add_argument("--snaplen", type=int, default=DEFAULT_SNAPLEN, help="bytes kept per packet")
    args = parser.parse_args(argv)
    try:
        result = capture(args.iface, args.seconds, args.out, args.udp_port, args.max_packets, args.snaplen)
    except CaptureError as err:
        print(f"capture: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"capture: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
