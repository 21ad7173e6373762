"""Client library: append to a log on a primary server over its Unix socket."""

from __future__ import annotations

import asyncio

from smfs.wire import FrameDecoder, FrameType, ProtocolError, encode_header


class AppendFailed(Exception):
    """The server answered FAIL: the append was not acknowledged (it may still be on the mirror)."""


class ConnectionLost(Exception):
    """No answer: the outcome of the outstanding append is unknown."""


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self._decoder = FrameDecoder(allowed=frozenset({FrameType.ACK, FrameType.FAIL}))

    @classmethod
    async def connect(cls, path: str) -> Client:
        reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
        return cls(reader, writer)

    async def append(self, log: int, seq: int, payload: bytes) -> None:
        """Send one append and wait for its answer (one outstanding append per client)."""
        self._writer.write(encode_header(FrameType.APPEND, log, seq, payload))
        self._writer.write(payload)
        try:
            await self._writer.drain()
            while True:
                data = await self._reader.read(65536)
                if not data:
                    raise ConnectionLost("server closed the connection")
                for frame in self._decoder.feed(data):
                    if (frame.log, frame.seq) != (log, seq):
                        raise ConnectionLost(f"answer for log {frame.log} seq {frame.seq}, expected {log}/{seq}")
                    if frame.type == FrameType.FAIL:
                        raise AppendFailed(frame.payload.decode(errors="replace"))
                    return
        except ProtocolError as err:
            raise ConnectionLost(f"bad answer: {err}") from err
        except (ConnectionError, OSError) as err:
            raise ConnectionLost(str(err)) from err

    async def close(self) -> None:
        self._writer.close()
