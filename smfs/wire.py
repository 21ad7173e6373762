"""Frames on the storage sockets (client↔primary over a Unix socket, primary↔mirror over TCP).

Layout, big-endian, 24-byte header then payload::

    magic 'SM' | version u8 | type u8 | log u32 | seq u64 | length u32 | crc32(payload) u32

``FrameDecoder`` is pure: feed it bytes, get frames, and the stream offset (bytes consumed since the
start of the stream) at which each frame ends. A malformed frame raises ``ProtocolError`` with a short
reason; the caller closes that connection and nothing else.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass

MAGIC = b"SM"
VERSION = 1
HEADER = struct.Struct("!2sBBIQII")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 64 << 20  # bytes; a larger length is treated as garbage, not allocated


class FrameType(enum.IntEnum):
    APPEND = 1  # client -> primary: log, seq, payload
    ACK = 2  # primary -> client: log, seq
    FAIL = 3  # primary -> client: log, seq, payload = reason (utf-8)
    MIRROR = 4  # primary -> mirror: log, seq, payload
    MACK = 5  # mirror -> primary: seq = mirror stream offset made durable (bytes), payload = its tag (smfs.auth)


class ProtocolError(Exception):
    """A peer sent bytes that are not a valid frame; the connection is closed with this reason."""


@dataclass(frozen=True)
class Frame:
    type: FrameType
    log: int
    seq: int
    payload: bytes = b""
    end: int = 0  # stream offset just after this frame (set by the decoder)


def encode(ftype: FrameType, log: int, seq: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(MAGIC, VERSION, ftype, log, seq, len(payload), zlib.crc32(payload)) + payload


def encode_header(ftype: FrameType, log: int, seq: int, payload: bytes | memoryview) -> bytes:
    """Header only, for writev-style sends of large payloads without a copy."""
    return HEADER.pack(MAGIC, VERSION, ftype, log, seq, len(payload), zlib.crc32(payload))


def frame_size(payload_len: int) -> int:
    return HEADER_SIZE + payload_len


class FrameDecoder:
    """Incremental decoder; ``allowed`` restricts the frame types this endpoint accepts, ``max_payload``
    the payload length (bytes) it accepts (a longer one is refused from its header, never buffered)."""

    def __init__(self, allowed: frozenset[FrameType] | None = None, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self._consumed = 0  # stream offset of self._buf[0]
        self._allowed = allowed
        self._max_payload = min(max_payload, MAX_PAYLOAD)  # a connection's frames may be bounded tighter

    @property
    def offset(self) -> int:
        """Stream offset up to which bytes formed complete frames."""
        return self._consumed

    @property
    def pending(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while len(self._buf) >= HEADER_SIZE:
            magic, version, ftype, log, seq, length, crc = HEADER.unpack_from(self._buf)
            if magic != MAGIC:
                raise ProtocolError(f"bad magic {bytes(magic)!r} at stream offset {self._consumed}")
            if version != VERSION:
                raise ProtocolError(f"unsupported version {version}")
            try:
                kind = FrameType(ftype)
            except ValueError:
                raise ProtocolError(f"unknown frame type {ftype}") from None
            if self._allowed is not None and kind not in self._allowed:
                raise ProtocolError(f"frame type {kind.name} not allowed on this connection")
            if length > self._max_payload:
                raise ProtocolError(f"frame length {length} exceeds {self._max_payload}")
            if len(self._buf) < HEADER_SIZE + length:
                break
            payload = bytes(self._buf[HEADER_SIZE : HEADER_SIZE + length])
            if zlib.crc32(payload) != crc:
                raise ProtocolError(f"payload checksum mismatch in {kind.name} log {log} seq {seq}")
            del self._buf[: HEADER_SIZE + length]
            self._consumed += HEADER_SIZE + length
            frames.append(Frame(kind, log, seq, payload, self._consumed))
        return frames
