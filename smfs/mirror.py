"""Mirror storage server: applies the primary's appends in stream order and acks after fsync.

One TCP connection per primary server. It opens with the mutual handshake of :mod:`smfs.auth`: the
mirror reads no frame before the primary has proved that it holds the testbed's key on this very
connection; a connection that fails (or does not finish) the handshake is closed and counted, and
nothing it sent is stored. Then each read batch is written with one fdatasync (group commit), and a
MACK carries the stream offset now durable, tagged under the connection's session key. Because the
mirror applies frames in the primary's order and the log store refuses gaps, every mirror log is a
prefix of the primary's.

Bounded, whatever its peers do: the server listens only on the addresses it is given (never a wildcard);
at most ``max_pending`` connections may be in their handshake (a new one drops the oldest, so a flood of
silent or hostile connections cannot lock a legitimate primary out) and at most ``max_peers``
authenticated ones (a new one, say a restarted primary, replaces the oldest); a connection holds at most
:data:`auth.ANSWER_LEN` bytes before its handshake and ``PEER_BUFFER`` bytes of read-ahead after it (plus
the frame being decoded, up to ``smfs.wire.MAX_PAYLOAD``); one that sends nothing for ``idle_timeout``
seconds (or has not finished its handshake by then) is closed, and so is one that does not read its acks.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Sequence

from smfs import auth
from smfs.logstore import LogStore, LogStoreError
from smfs.wire import FrameDecoder, FrameType, ProtocolError, encode

READ_CHUNK = 4 << 20  # bytes per read; larger reads mean larger group commits
PEER_BUFFER = 2 * READ_CHUNK  # bytes read ahead of the store per authenticated connection (reading pauses beyond)
IDLE_TIMEOUT = 120.0  # s without a byte (or without a finished handshake) before a connection is closed
MAX_PENDING = 64  # connections in their handshake per server; a new one drops the oldest
MAX_PEERS = 2  # authenticated connections per server (one primary server, and its successor); a new one replaces the oldest
WRITE_LIMIT = 1 << 20  # bytes of acks waiting for a primary that does not read them: the connection is dropped
WILDCARDS = frozenset({"", "0.0.0.0", "::", "*"})
STOPPING = "the mirror server stops"
_LOG_EVERY = 1000  # after the first ten, one rejected connection in this many is logged


class _Closed(Exception):
    """The peer closed the connection (or it was dropped) before the bytes wanted arrived."""


class _Conn(asyncio.Protocol):
    """One TCP connection's bytes: a receive buffer with a cap (reading pauses at it, resumes below it)."""

    def __init__(self, server: MirrorServer) -> None:
        self.server = server
        self.buf = bytearray()
        self.cap = auth.ANSWER_LEN
        self.transport: asyncio.Transport | None = None
        self.peer: object = None
        self.eof = False
        self.reason: str | None = None  # why the server dropped it (eviction, replacement)
        self.task: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    # -- the protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        self.server._accepted(self)  # noqa: SLF001 - the server's bookkeeping of its connections

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) >= self.cap and not self._paused and self.transport is not None:
            self.transport.pause_reading()
            self._paused = True
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return True  # keep the transport open: the last batch is still acked

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self._wake()
        self.server._gone(self)  # noqa: SLF001

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- for the server's coroutines --
    async def _more(self, timeout: float | None) -> None:
        """Wait for bytes or the end of the stream; TimeoutError after ``timeout`` s without either."""
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self._waiter, timeout)
        finally:
            self._waiter = None

    def _take(self, n: int) -> bytes:
        data = bytes(self.buf[:n])
        del self.buf[:n]
        if self._paused and len(self.buf) < self.cap and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def read(self, n: int, timeout: float | None) -> bytes:
        """Up to ``n`` bytes; b"" at the end of the stream."""
        if not self.buf and not self.eof:
            await self._more(timeout)
        return self._take(n)

    async def read_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if self.eof:
                raise _Closed(f"closed after {len(self.buf)} of {n} bytes")
            await self._more(None)
        return self._take(n)

    def set_cap(self, cap: int) -> None:
        self.cap = cap
        if self._paused and len(self.buf) < cap and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def drop(self, reason: str) -> None:
        """Close at once (unsent bytes discarded); the serving coroutine sees the end of the stream."""
        self.reason = self.reason or reason
        if self.transport is not None:
            self.transport.abort()


class MirrorServer:
    def __init__(
        self,
        index: int,
        store: LogStore,
        listen: Sequence[tuple[str, int]],
        *,
        key: bytes,
        idle_timeout: float = IDLE_TIMEOUT,
        max_pending: int = MAX_PENDING,
        max_peers: int = MAX_PEERS,
    ) -> None:
        if not listen:
            raise ValueError("the mirror server needs an address to listen on")
        for host, _port in listen:
            if host in WILDCARDS:
                raise ValueError(f"the mirror listens on the site's storage address, not on the wildcard {host!r}")
        if len(key) < auth.MIN_KEY:
            raise ValueError(f"the storage key must be at least {auth.MIN_KEY} bytes")
        if not (idle_timeout > 0 and max_pending >= 1 and max_peers >= 1):
            raise ValueError("idle_timeout, max_pending and max_peers must be positive")
        self.index = index
        self.store = store
        self.listen = list(listen)
        self.key = key
        self.idle_timeout = idle_timeout
        self.max_pending, self.max_peers = max_pending, max_peers
        self.log = logging.getLogger(f"smfs.mirror.{index}")
        self._servers: list[asyncio.base_events.Server] = []
        self._pending: dict[_Conn, None] = {}  # in their handshake, oldest first
        self._peers: dict[_Conn, None] = {}  # authenticated, oldest first
        self._tasks: set[asyncio.Task[None]] = set()
        self._store_lock = asyncio.Lock()  # one batch at a time into the store, whichever connection
        self.applied = 0
        self.stats: collections.Counter[str] = collections.Counter()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The (host, port) of every listening socket (the ports chosen when 0 was asked)."""
        return [s.getsockname()[:2] for srv in self._servers for s in srv.sockets]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for host, port in self.listen:
            self._servers.append(await loop.create_server(lambda: _Conn(self), host, port))
        self.log.info("listening on %s", ", ".join(f"{h}:{p}" for h, p in self.addresses))

    async def close(self) -> None:
        for srv in self._servers:
            srv.close()
        for conn in [*self._pending, *self._peers]:
            conn.drop(STOPPING)
        if self._tasks:  # each ends at its next read (after the batch it is writing, if any)
            await asyncio.wait(self._tasks, timeout=10)
        for srv in self._servers:
            await srv.wait_closed()
        self.log.info("closed: %s", self.summary())

    def summary(self) -> str:
        s = self.stats
        return (f"{s['connections']} connections, {s['authenticated']} authenticated, {s['rejected']} rejected "
                f"(handshake), {s['evicted']} evicted, {s['replaced']} replaced, {s['idle']} idle, "
                f"{self.applied} appends")

    # -- connections --
    def _accepted(self, conn: _Conn) -> None:
        self.stats["connections"] += 1
        while len(self._pending) >= self.max_pending:
            old = next(iter(self._pending))
            del self._pending[old]
            self.stats["evicted"] += 1
            old.drop(f"evicted: {self.max_pending} connections in their handshake, a newer one came")
        self._pending[conn] = None
        conn.task = task = asyncio.get_running_loop().create_task(self._serve(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _gone(self, conn: _Conn) -> None:
        self._pending.pop(conn, None)
        self._peers.pop(conn, None)

    def _rejected(self, conn: _Conn, reason: str) -> None:
        self.stats["rejected"] += 1
        n = self.stats["rejected"]
        if n <= 10 or n % _LOG_EVERY == 0:
            self.log.warning("refused connection from %s (%d so far): %s", conn.peer, n, reason)

    async def _handshake(self, conn: _Conn) -> bytes:
        """The mutual handshake (smfs.auth); the connection's session key."""
        assert conn.transport is not None
        nonce_m = auth.new_nonce()
        conn.write(auth.hello(nonce_m))
        data = await conn.read_exactly(auth.ANSWER_LEN)
        if conn.buf:
            raise auth.AuthError("bytes beyond the handshake before it ended")
        phost, pport = conn.transport.get_extra_info("peername")[:2]
        lhost, lport = conn.transport.get_extra_info("sockname")[:2]
        flow = auth.flow_id(phost, pport, lhost, lport)
        nonce_p = auth.check_answer(self.key, nonce_m, data, flow)
        conn.write(auth.confirm(self.key, nonce_m, nonce_p, flow))
        return auth.session_key(self.key, nonce_m, nonce_p, flow)

    async def _serve(self, conn: _Conn) -> None:
        try:
            session = await asyncio.wait_for(self._handshake(conn), self.idle_timeout)
        except TimeoutError:
            self._rejected(conn, f"no handshake within {self.idle_timeout:g} s")
            conn.drop("handshake timeout")
            return
        except (ValueError, _Closed) as err:  # auth.AuthError is a ValueError
            if conn.reason == STOPPING:
                return
            self._rejected(conn, conn.reason or f"handshake failed: {err}")
            if isinstance(err, auth.AuthError) and conn.transport is not None and not conn.transport.is_closing():
                conn.write(auth.REFUSED)  # say so (a primary with another key stops at once), then hang up
                conn.transport.close()
            else:
                conn.drop("handshake failed")
            return
        except asyncio.CancelledError:
            conn.drop(STOPPING)
            raise
        self._pending.pop(conn, None)
        if conn.transport is None or conn.transport.is_closing():
            self._rejected(conn, conn.reason or "closed during the handshake")
            return
        self.stats["authenticated"] += 1
        while len(self._peers) >= self.max_peers:
            old = next(iter(self._peers))
            del self._peers[old]
            self.stats["replaced"] += 1
            old.drop("replaced by a newer authenticated connection")
        self._peers[conn] = None
        conn.set_cap(PEER_BUFFER)
        self.log.info("primary connected from %s (authenticated)", conn.peer)
        reason = "primary closed the connection"
        try:
            reason = await self._apply(conn, session) or reason
        except ProtocolError as err:
            reason = f"protocol error: {err}"
        except LogStoreError as err:
            reason = f"refused append: {err}"
        except (ConnectionError, OSError) as err:
            reason = f"connection lost: {err}"
        finally:
            self.log.warning("closing connection from %s after %d appends: %s", conn.peer, self.applied,
                             conn.reason or reason)
            conn.drop(reason)

    async def _apply(self, conn: _Conn, session: bytes) -> str | None:
        """Frames to the store, batch by batch, each acked once durable; why it ended, if not the peer's close."""
        decoder = FrameDecoder(allowed=frozenset({FrameType.MIRROR}))
        while True:
            try:
                data = await conn.read(READ_CHUNK, self.idle_timeout)
            except TimeoutError:
                self.stats["idle"] += 1
                return f"idle for {self.idle_timeout:g} s"
            if not data:
                return None
            frames = decoder.feed(data)
            if not frames:
                continue
            batch = [(f.log, f.seq, f.payload) for f in frames]
            async with self._store_lock:
                await asyncio.to_thread(self.store.append_many, batch)
            self.applied += len(batch)
            offset = auth.ANSWER_LEN + decoder.offset  # the primary's stream offset: its handshake's bytes included
            conn.write(encode(FrameType.MACK, 0, offset, auth.mack_tag(session, offset)))
            if conn.transport is not None and conn.transport.get_write_buffer_size() > WRITE_LIMIT:
                return f"the primary does not read its acks ({WRITE_LIMIT} bytes waiting)"
