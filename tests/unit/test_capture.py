"""WAN captures: the pcap writer read back by scapy, the frame filter, the summary of tunnel
datagrams built with smfs.tunnel's own encoders, bad files, and the task's flag errors."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
from invoke import Context
from invoke.exceptions import Exit
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw
from scapy.utils import PcapReader, rdpcap

from netem.capture import (
    LINKTYPE_ETHERNET,
    PCAP_MAGIC,
    TUNNEL_PORT,
    CaptureError,
    PcapWriter,
    capture,
    matches,
    summarise,
)
from smfs.fec import Repair
from smfs.tunnel import Sealer, encode_data, encode_repair

KEY = b"k" * 32
A, B = "10.1.0.1", "10.2.0.1"
T0 = 1_700_000_000_123_456_789  # ns


def udp_frame(payload: bytes, src: str = A, dst: str = B, sport: int = TUNNEL_PORT,
              dport: int = TUNNEL_PORT) -> bytes:
    return bytes(Ether(src="52:54:00:00:00:01", dst="52:54:00:00:00:02") / IP(src=src, dst=dst)
                 / UDP(sport=sport, dport=dport) / Raw(payload))


def write_pcap(path: Path, frames: list[bytes], snaplen: int = 65535) -> Path:
    with open(path, "wb") as f:
        w = PcapWriter(f, snaplen)
        for i, frame in enumerate(frames):
            w.write(T0 + i * 1_000_000, frame)
    return path


def repair(layer: int, seqs: tuple[int, ...]) -> Repair:
    return Repair(layer, seqs, tuple(100 for _ in seqs), bytes(100))


# --- pcap writer ------------------------------------------------------------------------------


def test_writer_header_is_libpcap() -> None:
    buf = io.BytesIO()
    PcapWriter(buf, snaplen=1000)
    magic, major, minor, _tz, _sig, snaplen, linktype = struct.unpack("=IHHiIII", buf.getvalue())
    assert (magic, major, minor, snaplen, linktype) == (PCAP_MAGIC, 2, 4, 1000, LINKTYPE_ETHERNET)


def test_scapy_reads_back_frames_and_timestamps(tmp_path: Path) -> None:
    frames = [udp_frame(bytes([i]) * (50 + i)) for i in range(5)] + [bytes(Ether() / ARP())]
    path = write_pcap(tmp_path / "a.pcap", frames)
    with PcapReader(str(path)) as reader:
        assert reader.linktype == LINKTYPE_ETHERNET
        pkts = list(reader)
    assert [bytes(p) for p in pkts] == frames
    assert [round(float(p.time) * 1e6) for p in pkts] == [(T0 + i * 1_000_000) // 1000 for i in range(6)]
    assert pkts[0][UDP].dport == TUNNEL_PORT


def test_snaplen_cuts_frames_and_keeps_the_wire_length(tmp_path: Path) -> None:
    frame = udp_frame(b"x" * 1000)
    pkts = rdpcap(str(write_pcap(tmp_path / "s.pcap", [frame], snaplen=100)))
    assert len(bytes(pkts[0])) == 100 and pkts[0].wirelen == len(frame)


def test_writer_rejects_a_bad_snaplen() -> None:
    with pytest.raises(ValueError, match="snaplen"):
        PcapWriter(io.BytesIO(), snaplen=0)


# --- filter -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("frame", "port", "kept"), [
    (udp_frame(b"x"), TUNNEL_PORT, True),
    (udp_frame(b"x", sport=40000), TUNNEL_PORT, True),
    (udp_frame(b"x", dport=40000), TUNNEL_PORT, True),
    (udp_frame(b"x", sport=1, dport=2), TUNNEL_PORT, False),
    (bytes(Ether() / Dot1Q(vlan=5) / IP() / UDP(sport=5, dport=TUNNEL_PORT)), TUNNEL_PORT, True),
    (bytes(Ether() / IP() / TCP(sport=TUNNEL_PORT, dport=TUNNEL_PORT)), TUNNEL_PORT, False),
    (bytes(Ether() / IPv6() / UDP(sport=TUNNEL_PORT, dport=TUNNEL_PORT)), TUNNEL_PORT, False),
    (bytes(Ether() / IP(frag=10) / Raw(struct.pack("!HH", TUNNEL_PORT, TUNNEL_PORT) + bytes(20))), TUNNEL_PORT, False),
    (bytes(Ether() / ARP()), TUNNEL_PORT, False),
    (b"\x00" * 13, TUNNEL_PORT, False),
    (bytes(Ether() / ARP()), 0, True),
])  # fmt: skip
def test_filter(frame: bytes, port: int, kept: bool) -> None:
    assert matches(frame, port) is kept


# --- summary ----------------------------------------------------------------------------------


def tunnel_capture(tmp_path: Path, snaplen: int = 65535) -> Path:
    """A → B: DATA seqs 100..119 without 104, 110, 111, seq 115 twice, 3 repairs (layers 0, 0, 2);
    B → A: DATA 7..9 (site 1); noise: UDP elsewhere, ARP, and non-tunnel bytes on the tunnel port."""
    sealer = Sealer(KEY, 1)
    frames = [udp_frame(encode_data(s, bytes(60 + s % 7), 0, KEY)) for s in range(100, 120) if s not in (104, 110, 111)]
    frames.append(udp_frame(encode_data(115, bytes(60 + 115 % 7), 0, KEY)))
    frames += [udp_frame(encode_repair(repair(0, tuple(range(100, 108))), 0, KEY)),
               udp_frame(encode_repair(repair(0, tuple(range(108, 116))), 0, KEY)),
               udp_frame(encode_repair(repair(2, (100, 119, 138)), 0, KEY))]
    frames += [udp_frame(sealer.data(s, b"reverse"), src=B, dst=A) for s in (7, 8, 9)]
    frames += [udp_frame(b"noise", sport=5353, dport=5353), bytes(Ether() / ARP()),
               udp_frame(b"\x45not a tunnel datagram, just bytes")]
    return write_pcap(tmp_path / "t.pcap", frames, snaplen)


def test_summary_classifies_data_and_repairs(tmp_path: Path) -> None:
    s = summarise(tunnel_capture(tmp_path))
    assert (s["packets"], s["other"], s["not_tunnel"], s["truncated"]) == (27, 2, 1, 0)
    fwd, rev = s["directions"]
    assert (fwd["src"], fwd["dst"], fwd["site"]) == (f"{A}:{TUNNEL_PORT}", f"{B}:{TUNNEL_PORT}", 0)
    assert (fwd["data"], fwd["duplicates"], fwd["missing_in_capture"]) == (18, 1, 3)
    assert fwd["gaps"] == [[104, 104], [110, 111]]
    assert (fwd["seq_first"], fwd["seq_last"]) == (100, 119)
    assert fwd["data_bytes"] == sum(60 + q % 7 + 28 for q in range(100, 120) if q not in (104, 110, 111)) + 60 + 115 % 7 + 28
    assert fwd["repairs"] == 3 and fwd["repairs_by_layer"] == {"0": 2, "2": 1}
    assert fwd["repair_bytes"] == 2 * len(encode_repair(repair(0, tuple(range(8))), 0, KEY)) + len(
        encode_repair(repair(2, (100, 119, 138)), 0, KEY))
    assert (rev["src"], rev["site"], rev["data"], rev["repairs"], rev["missing_in_capture"]) == (f"{B}:{TUNNEL_PORT}", 1, 3, 0, 0)
    assert s["totals"]["data"] == 21 and s["totals"]["missing_in_capture"] == 3
    assert "verified" not in fwd
    assert json.loads(json.dumps(s)) == s


def test_summary_checks_the_mac_only_with_a_key(tmp_path: Path) -> None:
    path = tunnel_capture(tmp_path)
    fwd, rev = summarise(path, key=KEY)["directions"]
    assert (fwd["verified"], fwd["bad_mac"], rev["verified"]) == (21, 0, 3)
    fwd, _ = summarise(path, key=b"w" * 32)["directions"]
    assert (fwd["verified"], fwd["bad_mac"]) == (0, 21)


def test_summary_of_a_cut_capture_counts_wire_bytes(tmp_path: Path) -> None:
    whole = summarise(tunnel_capture(tmp_path))
    cut = summarise(tunnel_capture(tmp_path, snaplen=60), key=KEY)
    assert cut["truncated"] == 24
    assert cut["totals"] == whole["totals"]
    assert cut["directions"][0]["verified"] == 0  # a cut datagram cannot be authenticated


def test_summary_of_another_port_sees_no_tunnel(tmp_path: Path) -> None:
    s = summarise(tunnel_capture(tmp_path), tunnel_port=9)
    assert s["directions"] == [] and s["other"] == s["packets"] and s["totals"]["repair_overhead"] is None


@pytest.mark.parametrize(("content", "why"), [
    (None, "no such capture file"), (b"", "not a readable pcap"), (b"this is not a pcap file" * 4, "not a readable pcap"),
])  # fmt: skip
def test_bad_pcap_is_a_clear_error(tmp_path: Path, content: bytes | None, why: str) -> None:
    path = tmp_path / "bad.pcap"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CaptureError, match=why) as err:
        summarise(path)
    assert str(path) in str(err.value)


# --- capture arguments (no socket needed) ---------------------------------------------------


@pytest.mark.parametrize(("kwargs", "flag"), [
    ({"seconds": 0}, "--seconds"), ({"seconds": float("nan")}, "--seconds"), ({"port": 70000}, "--udp-port"),
    ({"max_packets": -1}, "--max-packets"), ({"snaplen": 0}, "--snaplen"),
    ({"iface": "no-such-if0"}, "--iface no-such-if0: no such interface"),
])  # fmt: skip
def test_capture_rejects_bad_arguments(tmp_path: Path, kwargs: dict[str, object], flag: str) -> None:
    args: dict[str, object] = {"iface": "lo", "seconds": 1.0, "out": tmp_path / "x.pcap"} | kwargs
    with pytest.raises(CaptureError, match=flag):
        capture(**args)  # type: ignore[arg-type]
    assert not (tmp_path / "x.pcap").exists()


# --- the task's flags -----------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "message"), [
    ({"seconds": "0"}, "--seconds 0: give a positive duration"),
    ({"seconds": "-3"}, "--seconds -3: give a positive duration"),
    ({"seconds": "soon"}, "--seconds 'soon': give a duration in seconds"),
    ({"snaplen": "-1"}, "--snaplen -1"),
    ({"max_packets": "many"}, "--max-packets 'many'"),
    ({"site": "moon"}, "--site 'moon': testbed tb1 has sites mirror, primary; use one of them"),
])  # fmt: skip
def test_task_flag_errors_are_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, flags: dict[str, str],
                                       message: str) -> None:
    from testbed.cli.capture import capture as task
    from testbed.vm.bed import VmTestbed

    monkeypatch.setenv("SMFS_TESTBED_CACHE", str(tmp_path / "cache"))  # its own lock: a running testbed holds the real one

    vms = {"p": SimpleNamespace(site="primary"), "m": SimpleNamespace(site="mirror")}
    monkeypatch.setattr(VmTestbed, "active", classmethod(lambda cls: SimpleNamespace(name="tb1", vms=vms)))
    with pytest.raises(Exit) as err:
        task(Context(), **flags)
    assert err.value.code == 2
    assert err.value.message.startswith(f"error: {message}")
    assert "\n" not in err.value.message


def test_summary_table(tmp_path: Path) -> None:
    from testbed.cli.capture import format_summary

    text = format_summary(summarise(tunnel_capture(tmp_path)))
    assert f"{A}:{TUNNEL_PORT} → {B}:{TUNNEL_PORT}" in text
    assert "21 data, 3 repairs" in text
