"""The wire check: network-sync acks held against a capture of what left the primary site.

A synthetic capture is built the way the gateway sends (tunnel DATA per TCP segment, the encoder's
repairs as bins fill or their flush timer fires), written as a pcap with the capture tool's writer,
cut to the check's snaplen, and read back. Acks given when the wire made their bytes safe pass; acks
given when only the data was out (the seeded defect network-sync-callback-before-repairs) are caught.
"""

from __future__ import annotations

import io
import socket
import struct
from pathlib import Path

import pytest

from netem.capture import PcapWriter
from smfs import tunnel
from smfs.callbacks import Flow, FlowTracker
from smfs.fec import Encoder, FecParams
from testbed.drill import wirecheck
from testbed.drill.runner import _wire_check

KEY = b"k" * 32
SRC, DST = "10.9.1.1", "10.9.2.1"
FLOW = Flow(SRC, 40000, DST, 7700)
ISN = 1000


def ip_tcp(seq: int, payload_len: int, flags: int = 0x10) -> bytes:
    total = 20 + 20 + payload_len
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0x4000, 64, 6, 0, socket.inet_aton(SRC), socket.inet_aton(DST))
    tcp = struct.pack("!HHIIHHHH", FLOW.sport, FLOW.dport, seq & 0xFFFFFFFF, 0, (5 << 12) | flags, 65535, 0, 0)
    return ip + tcp + bytes(payload_len)


def frame(datagram: bytes) -> bytes:
    eth = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00"
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + len(datagram), 0, 0x4000, 64, 17, 0,
                     socket.inet_aton("198.18.1.10"), socket.inet_aton("198.18.2.10"))
    return eth + ip + struct.pack("!HHHH", 7800, 7800, 8 + len(datagram), 0) + datagram


def send_stream(segments: int, mss: int = 1000, gap: float = 0.002, flush_ms: float = 20.0, site: int = 1,
                defect: bool = False) -> tuple[list[tuple[float, bytes]], list[tuple[float, int]]]:
    """The gateway's output for a SYN then ``segments`` data segments ``gap`` s apart: the frames
    (time, Ethernet frame), and the callbacks (time, safe offset) of a tracker that is correct or, with
    ``defect``, calls bytes safe at send."""
    enc = Encoder(FecParams(flush_ms=flush_ms))
    tracker = FlowTracker(c=3, safe_at_send=defect)
    frames: list[tuple[float, bytes]] = []
    callbacks: list[tuple[float, int]] = []
    t, tseq = 100.0, 1

    def emit(now: float, repairs: list) -> None:
        for rep in repairs:
            frames.append((now, frame(tunnel.encode_repair(rep, site, KEY))))
        tracker.on_repairs_sent(repairs)
        callbacks.extend((now, off) for _flow, off in tracker.safe_offsets())

    packets = [ip_tcp(ISN, 0, flags=0x02)] + [ip_tcp(ISN + 1 + i * mss, mss) for i in range(segments)]
    for pkt in packets:
        emit(t, enc.handle_timer(t))
        frames.append((t, frame(tunnel.encode_data(tseq, pkt, site, KEY))))
        tracker.on_packet_sent(tseq, pkt)
        emit(t, enc.add(tseq, pkt, t))
        tseq += 1
        t += gap
    emit(t + 1.0, enc.flush())
    return frames, callbacks


def write_pcap(path: Path, frames: list[tuple[float, bytes]], snaplen: int = wirecheck.SNAPLEN) -> None:
    buf = io.BytesIO()
    w = PcapWriter(buf, snaplen)
    for ts, fr in frames:
        w.write(round(ts * 1e9), fr)
    path.write_bytes(buf.getvalue())


def acks_at(callbacks: list[tuple[float, int]], mss: int = 1000, append_segments: int = 4) -> list[wirecheck.Ack]:
    """One ack per append of ``append_segments`` segments, at the first callback covering it."""
    acks, seq = [], 0
    end = append_segments * mss
    for t, off in callbacks:
        while off >= end:
            acks.append(wirecheck.Ack(FLOW, 1, seq, end, t))
            seq += 1
            end += append_segments * mss
    return acks


def got(acks, delay=0.0):
    """When the host received each ack (``delay`` s after it was given)."""
    return {(a.log, a.seq): a.t + delay for a in acks}


def test_correct_gateway_acks_are_all_safe_on_the_wire(tmp_path):
    frames, callbacks = send_stream(400)
    write_pcap(tmp_path / "w.pcap", frames)
    wire = wirecheck.replay(wirecheck.read_pcap(tmp_path / "w.pcap"))
    acks = acks_at(callbacks)
    res = wirecheck.check(acks, wire, {"offset_s": 0.0, "uncertainty_s": 0.001}, received=got(acks))
    assert res["checked"] >= 90 and res["unsafe"] == 0 and res["inconclusive"] is None
    assert res["lag_ms"]["max"] <= 0.0  # every ack came at or after its bytes were safe on the wire
    assert wire.data == 401 and wire.repairs > 0


def test_callback_before_repairs_is_caught_on_every_run(tmp_path):
    frames, callbacks = send_stream(400, defect=True)
    write_pcap(tmp_path / "w.pcap", frames)
    wire = wirecheck.replay(wirecheck.read_pcap(tmp_path / "w.pcap"))
    acks = acks_at(callbacks)
    res = wirecheck.check(acks, wire, {"offset_s": 0.0, "uncertainty_s": 0.001}, received=got(acks, 0.003))
    assert res["unsafe"] > res["checked"] // 2  # most acks precede a repair by up to the flush delay
    assert res["examples"] and res["lag_ms"]["max"] > 5.0


def test_the_verdict_needs_no_guest_clock(tmp_path):
    """The primary's ack times (a guest clock, even a wrong one) are only reported; the host's receipt
    of each ack judges: acks received after the wire made them safe pass, however the guest clock reads."""
    frames, callbacks = send_stream(200)
    write_pcap(tmp_path / "w.pcap", frames)
    wire = wirecheck.replay(wirecheck.read_pcap(tmp_path / "w.pcap"))
    acks = acks_at(callbacks)
    skewed = [wirecheck.Ack(a.flow, a.log, a.seq, a.end, a.t - 0.5) for a in acks]  # a guest clock 0.5 s behind
    res = wirecheck.check(skewed, wire, {"offset_s": 0.0}, received=got(acks, 0.002))
    assert res["unsafe"] == 0 and res["lag_ms"]["min"] >= 499 and res["margin_ms"]["min"] >= 1.9
    # Received before the wire made them safe: unsafe, whatever the guest clock says.
    early = wirecheck.check(acks, wire, {"offset_s": 0.0}, received=got(acks, -0.05))
    assert early["unsafe"] > 0
    # Received up to SLACK_S before the wire (a frame still in a TCG guest's NIC queue): counted, not judged.
    near = wirecheck.check(acks, wire, {"offset_s": 0.0}, received=got(acks, -0.005), slack=wirecheck.SLACK_VM_S)
    assert near["unsafe"] == 0 and near["within_slack"] > 0
    # An ack the ledger never confirmed is not judged.
    assert wirecheck.check(acks, wire, {}, received={})["not_in_ledger"] == len(acks)


def test_ack_for_bytes_never_on_the_wire_is_unsafe(tmp_path):
    frames, callbacks = send_stream(100)
    write_pcap(tmp_path / "w.pcap", frames)
    wire = wirecheck.replay(wirecheck.read_pcap(tmp_path / "w.pcap"))
    far = wirecheck.Ack(FLOW, 1, 99, 10**7, 100.05)  # beyond every byte the capture carried
    res = wirecheck.check([far], wire, {"offset_s": 0.0, "uncertainty_s": 0.0}, received=got([far]))
    assert res["unsafe"] == 1 and res["examples"][0]["wire_after_receipt_ms"] is None


def test_capture_drops_or_a_missing_syn_make_it_inconclusive(tmp_path):
    frames, callbacks = send_stream(100, defect=True)
    write_pcap(tmp_path / "w.pcap", frames)
    wire = wirecheck.replay(wirecheck.read_pcap(tmp_path / "w.pcap"))
    acks = acks_at(callbacks)
    res = wirecheck.check(acks, wire, {}, {"kernel_drops": 3}, received=got(acks))
    assert "lost 3 frames" in res["inconclusive"]
    write_pcap(tmp_path / "late.pcap", frames[1:])  # the SYN is not in the capture
    late = wirecheck.replay(wirecheck.read_pcap(tmp_path / "late.pcap"))
    res = wirecheck.check(acks, late, {}, received=got(acks))
    assert "SYN" in res["inconclusive"]
    entry: dict = {"verdict": "ok"}
    from testbed.drill.faults import Timeline

    _wire_check(entry, res, Timeline(say=lambda _m: None))
    assert entry["verdict"] == "ok"  # inconclusive evidence judges nothing


def test_unsafe_acks_make_the_verdict_data_loss(tmp_path):
    from testbed.drill.faults import Timeline

    entry: dict = {"verdict": "ok"}
    _wire_check(entry, {"unsafe": 4, "checked": 50, "inconclusive": None, "slack_ms": 1.0}, Timeline(say=lambda _m: None))
    assert entry["verdict"] == "data-loss" and entry["unsafe_acks"] == 4 and "wire check" in entry["broken_promises"][0]


def test_other_sites_and_foreign_frames_are_ignored(tmp_path):
    frames, _ = send_stream(50, site=2)
    frames.append((200.0, b"\x00" * 60))
    write_pcap(tmp_path / "w.pcap", frames)
    wire = wirecheck.replay(wirecheck.read_pcap(tmp_path / "w.pcap"), site=1)
    assert wire.data == 0 and wire.repairs == 0 and wire.offsets == {}


def test_ack_trace_parsing():
    text = "flow 10.9.1.1 40000 10.9.2.1 7700\n3 0 4096 1700000000.5\n3 1 8192 1700000000.75\n3 2 81"
    acks = wirecheck.read_ack_trace(text)
    assert [(a.log, a.seq, a.end) for a in acks] == [(3, 0, 4096), (3, 1, 8192)] and acks[0].flow == FLOW
    with pytest.raises(wirecheck.WireError, match="first line"):
        wirecheck.read_ack_trace("3 0 4096 1.0\n")
    with pytest.raises(wirecheck.WireError, match=":2: expected"):
        wirecheck.read_ack_trace("flow 10.9.1.1 40000 10.9.2.1 7700\nx y\n3 1 8192 1.0\n")


def test_ledger_receipts_map_each_ok_line_to_its_chunk(tmp_path):
    lines = [b'{"tester":0,"log":7,"seq":0,"outcome":"info"}', b'{"tester":0,"log":7,"seq":0,"outcome":"ok"}',
             b'{"tester":1,"log":8,"seq":0,"outcome":"ok"}']
    data = b"\n".join(lines) + b"\n"
    cut = len(lines[0]) + len(lines[1]) + 2  # the first chunk ends after the second line
    (tmp_path / "s.jsonl").write_bytes(data)
    (tmp_path / "s.recv").write_text(f"{cut - 5} 10.0\n{cut} 11.0\n{len(data)} 12.5\n")
    assert wirecheck.ledger_receipts(tmp_path / "s.jsonl", tmp_path / "s.recv") == {(7, 0): 11.0, (8, 0): 12.5}
    assert wirecheck.ledger_receipts(tmp_path / "none.jsonl", tmp_path / "s.recv") == {}


def test_not_a_pcap_is_a_one_line_error(tmp_path):
    (tmp_path / "x.pcap").write_bytes(b"hello world, not a capture at all")
    with pytest.raises(wirecheck.WireError, match="not a pcap"):
        list(wirecheck.read_pcap(tmp_path / "x.pcap"))
