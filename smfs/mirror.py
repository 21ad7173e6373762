"""Mirror storage server: applies the primary's appends in stream order and acks after fsync.

One TCP connection per primary server. Each read batch is written with one fdatasync (group
commit), then a MACK carries the stream offset now durable. Because the mirror applies frames in
the primary's order and the log store refuses gaps, every mirror log is a prefix of the primary's.
"""

from __future__ import annotations

import asyncio
import logging

from smfs.logstore import LogStore, LogStoreError
from smfs.wire import FrameDecoder, FrameType, ProtocolError, encode

READ_CHUNK = 4 << 20  # bytes per read; larger reads mean larger group commits


class MirrorServer:
    def __init__(self, index: int, store: LogStore, host: str, port: int) -> None:
        self.index = index
        self.store = store
        self.host, self.port = host, port
        self.log = logging.getLogger(f"smfs.mirror.{index}")
        self._server: asyncio.base_events.Server | None = None
        self.applied = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=READ_CHUNK)
        self.log.info("listening on %s:%d", self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        self.log.info("primary connected from %s", peer)
        decoder = FrameDecoder(allowed=frozenset({FrameType.MIRROR}))
        reason = "primary closed the connection"
        try:
            while True:
                data = await reader.read(READ_CHUNK)
                if not data:
                    break
                frames = decoder.feed(data)
                if not frames:
                    continue
                batch = [(f.log, f.seq, f.payload) for f in frames]
                await asyncio.to_thread(self.store.append_many, batch)
                self.applied += len(batch)
                writer.write(encode(FrameType.MACK, 0, decoder.offset))
        except ProtocolError as err:
            reason = f"protocol error: {err}"
        except LogStoreError as err:
            reason = f"refused append: {err}"
        except (ConnectionError, OSError) as err:
            reason = f"connection lost: {err}"
        finally:
            self.log.warning("closing connection from %s after %d appends: %s", peer, self.applied, reason)
            writer.close()
