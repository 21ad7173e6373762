"""offload.c: a TCP/IPv4 packet read from a TUN with IFF_VNET_HDR and TSO is cut into exactly the
segments the kernel's software GSO makes (held here to scapy's packets, built and checksummed one
by one), and a checksum left to the device is finished. The gateway's data path after the TUN then
sees the same packets with and without offloads."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP

from smfs import native


@pytest.fixture(scope="module", autouse=True)
def _library() -> None:
    try:
        native.load()
    except native.NativeError as err:
        if "not found" in str(err):
            pytest.skip(str(err))
        raise


def vnet(flags: int = 0, gso: int = 0, hdr_len: int = 0, gso_size: int = 0, start: int = 0, off: int = 0) -> bytes:
    return struct.pack("<BBHHHH", flags, gso, hdr_len, gso_size, start, off)


def _gso_packet(payload: bytes, tflags: str, seq: int = 4_000_000_000, ident: int = 65530,
                options: list | None = None) -> IP:
    return IP(src="198.18.1.10", dst="198.18.2.10", id=ident, flags="DF", ttl=64) / TCP(
        sport=40000, dport=7001, seq=seq, ack=77, flags=tflags, window=500, options=options or []) / payload


def _expected(big: IP, mss: int) -> list[bytes]:
    """The kernel's segments (tcp_gso_segment), built by scapy with its own checksums."""
    payload, tcp = bytes(big[TCP].payload), big[TCP]
    out = []
    chunks = [payload[i:i + mss] for i in range(0, len(payload), mss)] or [b""]
    for i, chunk in enumerate(chunks):
        flags = int(tcp.flags)
        if i + 1 < len(chunks):
            flags &= ~0x09
        if i:
            flags &= ~0x80
        seg = IP(src=big.src, dst=big.dst, id=(big.id + i) & 0xFFFF, flags=big.flags, ttl=big.ttl, tos=big.tos) / TCP(
            sport=tcp.sport, dport=tcp.dport, seq=(tcp.seq + i * mss) & 0xFFFFFFFF, ack=tcp.ack, flags=flags,
            window=tcp.window, options=tcp.options) / chunk
        out.append(bytes(seg))
    return out


def test_a_tso_packet_becomes_the_kernels_segments() -> None:
    payload = random.Random(1).randbytes(10_000)
    big = _gso_packet(payload, "FPAC", options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2))])
    raw = bytearray(bytes(big))
    raw[20 + 16:20 + 18] = b"\x12\x34"  # what the kernel leaves there (a partial sum) does not matter
    got = native.vnet_segment(vnet(1, 1, 52, 1346, 20, 16), bytes(raw))
    want = _expected(big, 1346)
    assert len(got) == 8 and got == want
    assert [IP(g)[TCP].flags for g in got] == ["AC"] + ["A"] * 6 + ["FPA"]  # CWR first, FIN and PSH last
    assert IP(got[1]).id == 65531 and IP(got[6]).id == 0  # the id wraps
    assert b"".join(bytes(IP(g)[TCP].payload) for g in got) == payload


@settings(max_examples=60, deadline=None)
@given(size=st.integers(0, 65_000), mss=st.integers(1, 1460), ecn=st.booleans(), seq=st.integers(0, 2**32 - 1))
def test_any_tso_packet_matches_scapys_segments(size: int, mss: int, ecn: bool, seq: int) -> None:
    payload = random.Random(size).randbytes(size)
    big = _gso_packet(payload, "PA", seq=seq, ident=seq & 0xFFFF)
    n = max(1, -(-size // mss))
    if n > 256:
        with pytest.raises(ValueError):
            native.vnet_segment(vnet(1, 1 | (0x80 if ecn else 0), 40, mss, 20, 16), bytes(big))
        return
    got = native.vnet_segment(vnet(1, 1 | (0x80 if ecn else 0), 40, mss, 20, 16), bytes(big))
    assert got == _expected(big, mss)


def _partial(pkt: IP, l4: int) -> bytes:
    """The packet as the kernel hands it when the device finishes the checksum: the field holds
    the pseudo-header's folded sum (not complemented)."""
    raw = bytearray(bytes(pkt))
    length = len(raw) - 20
    words = struct.unpack("!4H", raw[12:20]) + (l4, length)
    s = sum(words)
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    at = 20 + (16 if l4 == 6 else 6)
    raw[at:at + 2] = struct.pack("!H", s)
    return bytes(raw)


@pytest.mark.parametrize("layer,off", [(TCP(sport=1, dport=2, seq=9, flags="PA"), 16), (UDP(sport=5, dport=6), 6)])
def test_a_checksum_left_to_the_device_is_finished(layer: object, off: int) -> None:
    pkt = IP(src="198.18.1.10", dst="198.18.2.10") / layer / b"hello offloads"
    l4 = 6 if off == 16 else 17
    got = native.vnet_segment(vnet(1, 0, 0, 0, 20, off), _partial(pkt, l4))
    assert got == [bytes(pkt)]
    plain = bytes(pkt)
    assert native.vnet_segment(vnet(), plain) == [plain]  # no offload asked: as it is


@pytest.mark.parametrize("hdr,mutate", [
    (vnet(1, 4, 60, 1000, 40, 16), None),          # TCPv6 GSO: never offered
    (vnet(1, 3, 28, 1000, 20, 6), None),           # UFO: never offered
    (vnet(1, 1, 40, 0, 20, 16), None),             # gso_size 0
    (vnet(1, 1, 40, 1000, 20, 16), "fragment"),
    (vnet(1, 1, 40, 1000, 20, 16), "short"),
    (vnet(1, 0, 0, 0, 20, 5000), None),            # checksum field outside the packet
    (vnet(1, 0, 0, 0, 9000, 0), None),
])
def test_what_a_tun_never_hands_is_refused(hdr: bytes, mutate: str | None) -> None:
    raw = bytearray(bytes(_gso_packet(bytes(3000), "A")))
    if mutate == "fragment":
        raw[6] |= 0x20
    if mutate == "short":
        raw = raw[:30]
    with pytest.raises(ValueError):
        native.vnet_segment(hdr, bytes(raw))


def test_more_segments_than_room_is_refused_not_overrun() -> None:
    big = bytes(_gso_packet(bytes(20_000), "A"))
    with pytest.raises(ValueError):
        native.vnet_segment(vnet(1, 1, 40, 100, 20, 16), big, max_segments=10)
    with pytest.raises(ValueError):
        native.vnet_segment(vnet(1, 1, 40, 1460, 20, 16), big, stride=1000)
