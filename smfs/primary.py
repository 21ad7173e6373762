"""Primary storage server: local log store + one TCP connection to its mirror server.

Clients (the testers) send APPEND frames over a Unix socket. Each append is assigned its range on
the mirror stream, sent to the mirror and written locally (one fdatasync per batch), and
acknowledged when ``AckTracker`` says the mode's condition holds (see ``smfs.modes``).

With ``ack_trace`` (a file path), every ack is also written there as it is given: a first line
``flow SRC SPORT DST DPORT`` (the mirror stream as this server sends it), then one line per acked
append ``LOG SEQ END T``: the stream offset just after its frame and the wall-clock time of the ack.
The drill's wire check (``testbed.drill.wirecheck``) holds these against a capture of what left the site:
a network-sync ack promises that every byte below ``END`` was on the WAN with its repairs at ``T``.

Authenticated under the testbed's key (``key``): the mirror connection opens with the mutual
handshake of :mod:`smfs.auth` (stream offsets, and so ``END``, count its :data:`smfs.auth.ANSWER_LEN`
bytes), every MACK's tag is checked (a forged one fails the stream: nothing is acked by it), and the
gateway's callbacks are taken only with a good MAC (under ``gateway_key``, the tunnel's, when it is
not the storage key) and this connection's subscription nonce (:mod:`smfs.callbacks`). Bounded: at most ``max_clients`` client connections (more are closed at
once), each read ahead by at most :data:`CLIENT_BUFFER` bytes beyond the frame it is decoding; a client
with no append outstanding that sends nothing for ``idle_timeout`` s is disconnected; appends wait for
the mirror stream in a queue of at most ``queue_bytes`` payload bytes and :data:`QUEUE_ITEMS` appends,
and a client whose append does not fit waits, unread (backpressure), instead of growing the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import Any

from smfs import auth, defects
from smfs.acks import AckTracker, Pending, SequenceRejected
from smfs.callbacks import encode_subscribe
from smfs.logstore import LogStore
from smfs.modes import Mode
from smfs.wire import FrameDecoder, FrameType, ProtocolError, encode, encode_header

CONNECT_TIMEOUT = 30.0  # s to reach the mirror (and finish its handshake) at start-up
HANDSHAKE_TIMEOUT = 10.0  # s for each step of the mirror's handshake
LAZY_WRITE_S = 1.0  # s the seeded defect primary-acks-before-local-write holds back each local write
CLIENT_CHUNK = 1 << 20  # bytes per read from a client
CLIENT_BUFFER = 256 << 10  # bytes a client's connection reads ahead (its reading pauses at twice this)
MAX_CLIENTS = 2048  # client connections per server (a tester holds one; the spec allows 1024 testers)
IDLE_TIMEOUT = 120.0  # s a client with no append outstanding may send nothing before it is disconnected
QUEUE_BYTES = 64 << 20  # payload bytes waiting for the mirror stream; clients wait beyond (an append of
# up to smfs.wire.MAX_PAYLOAD always fits an empty queue)
QUEUE_ITEMS = 4096  # appends waiting for the mirror stream


class PrimaryServer:
    def __init__(
        self,
        index: int,
        store: LogStore,
        mode: Mode,
        sock_path: str,
        mirror: tuple[str, int],
        source: str | None = None,
        gateway_control: tuple[str, int] | None = None,
        ack_trace: str | None = None,
        *,
        key: bytes,
        gateway_key: bytes | None = None,
        idle_timeout: float = IDLE_TIMEOUT,
        max_clients: int = MAX_CLIENTS,
        queue_bytes: int = QUEUE_BYTES,
    ) -> None:
        if len(key) < auth.MIN_KEY:
            raise ValueError(f"the storage key must be at least {auth.MIN_KEY} bytes")
        self.index = index
        self.store = store
        self.mode = mode
        self.sock_path = sock_path
        self.mirror = mirror
        self.source = source
        self.gateway_control = gateway_control
        self.ack_trace = ack_trace
        self._trace: Any = None
        self.log = logging.getLogger(f"smfs.primary.{index}")
        self.key = key
        # The callbacks' key: the tunnel's, which the VM drill renews for every mode (the gateways restart
        # with it) while the mirror keeps the storage key of the snapshot; the storage key when not given.
        self.gateway_key = gateway_key if gateway_key is not None else key
        self.idle_timeout, self.max_clients, self.queue_bytes = idle_timeout, max_clients, queue_bytes
        self.tracker = AckTracker(mode, {lg: store.next_seq(lg) for lg in store.logs()})
        # Bounded: a client waits for room (_room) before its append is queued, so a burst of appends
        # becomes backpressure on the clients' sockets instead of this process's memory.
        self._queue: asyncio.Queue[tuple[Pending, bytes]] = asyncio.Queue(QUEUE_ITEMS)
        self._queued = 0  # payload bytes in _queue
        self._drained = asyncio.Event()
        self._clients: dict[asyncio.StreamWriter, int] = {}  # connected clients: appends outstanding
        self._session = b""  # the mirror connection's MACK key (smfs.auth)
        self._tasks: list[asyncio.Task[None]] = []
        self._server: asyncio.base_events.Server | None = None
        self._mreader: asyncio.StreamReader | None = None
        self._mwriter: asyncio.StreamWriter | None = None
        self.flow: tuple[str, int, str, int] | None = None
        self._subscription: _Subscription | None = None  # network-sync, while subscribed to the callbacks
        self.stats = {"acked": 0, "failed": 0, "callbacks": 0, "callbacks_rejected": 0, "clients_refused": 0,
                      "clients_idle": 0}
        # Seeded defect: acks do not wait for the local write (AckTracker), which a write-behind
        # writer makes LAZY_WRITE_S late, so a power cut finds acked appends missing on this disk.
        self._lazy: asyncio.Queue[tuple[float, list[tuple[int, int, bytes]]]] | None = (
            asyncio.Queue() if defects.active("primary-acks-before-local-write") else None)

    async def start(self) -> None:
        await self._connect_mirror()
        self._tasks = [
            asyncio.create_task(self._pipeline(), name=f"pipeline-{self.index}"),
            asyncio.create_task(self._mirror_acks(), name=f"macks-{self.index}"),
        ]
        if self.mode.ack_on == "network":
            self._tasks.append(asyncio.create_task(self._callbacks(), name=f"callbacks-{self.index}"))
        if self._lazy is not None:
            self._tasks.append(asyncio.create_task(self._lazy_writer(), name=f"lazy-{self.index}"))
        for task in self._tasks:
            task.add_done_callback(self._task_done)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock_path)
        self._server = await asyncio.start_unix_server(self._serve_client, self.sock_path, limit=CLIENT_BUFFER)
        self.log.info("serving %s, mirroring to %s:%d in %s", self.sock_path, *self.mirror, self.mode)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._mwriter is not None:
            self._mwriter.close()
        if self._trace is not None:
            self._trace.close()
            self._trace = None

    def _task_done(self, task: asyncio.Task[None]) -> None:
        """A background task must never die silently: log it and fail what is pending."""
        if task.cancelled() or task.exception() is None:
            return
        err = task.exception()
        self.log.error("%s failed: %r", task.get_name(), err, exc_info=err)
        self._fail_all(f"{task.get_name()} failed: {err!r}")

    async def _connect_mirror(self) -> None:
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while True:
            writer = None
            try:
                local = (self.source, 0) if self.source else None
                reader, writer = await asyncio.open_connection(*self.mirror, local_addr=local)
                sock = writer.get_extra_info("socket")
                lhost, lport = sock.getsockname()[:2]
                rhost, rport = sock.getpeername()[:2]
                self._session = await self._handshake(reader, writer, auth.flow_id(lhost, lport, rhost, rport))
                break
            except auth.AuthError as err:  # the mirror does not hold our key: no retry helps
                if writer is not None:
                    writer.close()
                raise ConnectionError(f"mirror {self.mirror[0]}:{self.mirror[1]}: {err}") from None
            except (OSError, EOFError, TimeoutError) as err:  # not reachable yet, or closed during the handshake
                if writer is not None:
                    writer.close()
                if time.monotonic() > deadline:
                    raise ConnectionError(f"mirror {self.mirror[0]}:{self.mirror[1]} unreachable: {err!r}") from err
                await asyncio.sleep(0.2)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # High-water mark 0: drain() returns only when every byte is in the kernel socket buffer,
        # which is what "handed to the socket" means for local-sync.
        writer.transport.set_write_buffer_limits(high=0)
        self.flow = (lhost, lport, rhost, rport)
        self.tracker.start_at(auth.ANSWER_LEN)  # stream offsets count the handshake's bytes, as the wire does
        self._mreader, self._mwriter = reader, writer
        self.log.info("mirror stream %s:%d -> %s:%d", *self.flow)
        if self.ack_trace:
            self._trace = open(self.ack_trace, "w", buffering=1 << 16)  # noqa: SIM115 - closed in close()
            self._trace.write("flow {} {} {} {}\n".format(*self.flow))
            self._trace.flush()

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flow: bytes) -> bytes:
        """The mutual handshake of :mod:`smfs.auth` on a fresh mirror connection; its MACK session key."""
        nonce_m = auth.read_hello(await asyncio.wait_for(reader.readexactly(auth.HELLO_LEN), HANDSHAKE_TIMEOUT))
        nonce_p = auth.new_nonce()
        writer.write(auth.answer(self.key, nonce_m, nonce_p, flow))
        await writer.drain()
        try:
            got = await asyncio.wait_for(reader.readexactly(auth.CONFIRM_LEN), HANDSHAKE_TIMEOUT)
        except asyncio.IncompleteReadError as err:
            if err.partial.startswith(auth.REFUSED):
                raise auth.AuthError("the mirror refused our proof: not the testbed's key") from None
            raise
        auth.check_confirm(self.key, nonce_m, nonce_p, flow, got)
        return auth.session_key(self.key, nonce_m, nonce_p, flow)

    async def _room(self, n: int) -> None:
        """Wait until an append of ``n`` payload bytes fits the queue (one always fits an empty queue)."""
        while not self.tracker.failed and ((self._queued and self._queued + n > self.queue_bytes) or self._queue.full()):
            self._drained.clear()
            await self._drained.wait()

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._clients) >= self.max_clients:
            self.stats["clients_refused"] += 1
            if self.stats["clients_refused"] <= 10 or self.stats["clients_refused"] % 1000 == 0:
                self.log.warning("refusing a client: %d connected already", len(self._clients))
            writer.close()
            return
        self._clients[writer] = 0
        decoder = FrameDecoder(allowed=frozenset({FrameType.APPEND}))
        reason = "client closed"
        try:
            while True:
                try:
                    data = await asyncio.wait_for(reader.read(CLIENT_CHUNK), self.idle_timeout)
                except TimeoutError:
                    if self._clients.get(writer):
                        continue  # not idle: it waits for our answer
                    self.stats["clients_idle"] += 1
                    reason = f"idle for {self.idle_timeout:g} s"
                    break
                if not data:
                    break
                for frame in decoder.feed(data):
                    await self._room(len(frame.payload))  # backpressure: this client waits, unread
                    if self.tracker.failed:
                        self._answer(writer, FrameType.FAIL, frame.log, frame.seq, "mirror connection lost")
                        continue
                    try:
                        item = self.tracker.submit(writer, frame.log, frame.seq, len(frame.payload))
                    except SequenceRejected as err:
                        self._answer(writer, FrameType.FAIL, frame.log, frame.seq, str(err))
                        continue
                    self._clients[writer] = self._clients.get(writer, 0) + 1
                    self._want_callbacks()
                    self._queue.put_nowait((item, frame.payload))
                    self._queued += len(frame.payload)
        except ProtocolError as err:
            reason = f"protocol error: {err}"
        except (ConnectionError, OSError) as err:
            reason = f"connection lost: {err}"
        finally:
            self._clients.pop(writer, None)
            self.log.info("client connection closed: %s", reason)
            writer.close()

    def _answer(self, writer: asyncio.StreamWriter, ftype: FrameType, log: int, seq: int, reason: str = "") -> None:
        self.stats["acked" if ftype == FrameType.ACK else "failed"] += 1
        if not writer.is_closing():
            writer.write(encode(ftype, log, seq, reason.encode()))

    def _ack(self, items: list[Pending]) -> None:
        if not items:
            return
        if self._trace is not None:  # before the answers leave: the time bounds the ack from below
            t = time.time()
            self._trace.write("".join(f"{i.log} {i.seq} {i.end} {t:.6f}\n" for i in items))
            self._trace.flush()
        for item in items:
            self._settled(item)
            self._answer(item.client, FrameType.ACK, item.log, item.seq)  # type: ignore[arg-type]
        self._want_callbacks()

    def _want_callbacks(self, again: bool = False) -> None:
        """network-sync: (re)subscribe when the offset this server waits for changed (the end of its
        oldest append the callbacks do not cover yet; none: the highest offset, so no callback comes
        until an append waits), or ``again`` (a lost subscribe, a restarted gateway): a callback per
        append, not per few packets (see :mod:`smfs.callbacks`)."""
        sub = self._subscription
        if sub is None:
            return
        want = self.tracker.waiting_for("network")
        want = (1 << 64) - 1 if want is None else want
        if want != sub.want or again:
            sub.want = want
            sub.sent = time.monotonic()
            with contextlib.suppress(OSError):  # the loopback socket: a full buffer only delays it to the next tick
                sub.sock.sendto(encode_subscribe(sub.flow, sub.nonce, self.gateway_key, sub.name,
                                                 want), self.gateway_control)

    def _settled(self, item: Pending) -> None:
        """One append of ``item.client`` less outstanding."""
        if self._clients.get(item.client):  # type: ignore[call-overload]
            self._clients[item.client] -= 1  # type: ignore[index]

    def _fail_all(self, reason: str) -> None:
        if not self.tracker.failed:
            self.log.error("failing every pending append: %s", reason)
        for item in self.tracker.fail_all():
            self._settled(item)
            self._answer(item.client, FrameType.FAIL, item.log, item.seq, reason)  # type: ignore[arg-type]
        self._drained.set()  # clients waiting for room learn that the stream is gone

    async def _pipeline(self) -> None:
        """Send to the mirror and write locally, batch by batch, in submission order."""
        assert self._mwriter is not None
        sent = 0
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            self._queued -= sum(len(p) for _, p in batch)
            self._drained.set()
            if self.tracker.failed:
                self._fail_all("mirror connection lost")
                continue
            for item, payload in batch:
                self._mwriter.write(encode_header(FrameType.MIRROR, item.log, item.seq, payload))
                self._mwriter.write(payload)
                sent = item.end
            records = [(i.log, i.seq, p) for i, p in batch]
            if self._lazy is not None:  # seeded defect: write behind, acks do not wait
                self._lazy.put_nowait((time.monotonic() + LAZY_WRITE_S, records))
                records = []
            local = asyncio.create_task(asyncio.to_thread(self.store.append_many, records))
            try:
                await self._mwriter.drain()
                self._ack(self.tracker.advance("handoff", sent))
            except (ConnectionError, OSError) as err:
                self._fail_all(f"mirror connection lost: {err}")
            try:
                await local
            except Exception as err:  # noqa: BLE001 - a local write failure fails the batch, loudly
                self.log.error("local write failed: %s", err)
                self._fail_all(f"local write failed: {err}")
                continue
            self._ack(self.tracker.local_written([i for i, _ in batch]))

    async def _lazy_writer(self) -> None:
        """The seeded defect's write-behind: each batch reaches the local store LAZY_WRITE_S late."""
        assert self._lazy is not None
        while True:
            due, records = await self._lazy.get()
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            await asyncio.to_thread(self.store.append_many, records)

    async def _mirror_acks(self) -> None:
        assert self._mreader is not None
        decoder = FrameDecoder(allowed=frozenset({FrameType.MACK}), max_payload=auth.TAG_LEN)
        reason = "mirror closed the connection"
        try:
            while data := await self._mreader.read(65536):
                for frame in decoder.feed(data):
                    auth.check_mack(self._session, frame.seq, frame.payload)  # a forged ack acks nothing
                    self._ack(self.tracker.advance("mirror", frame.seq))
        except (ProtocolError, ValueError) as err:  # auth.AuthError is a ValueError
            reason = f"bad mirror ack: {err}"
        except (ConnectionError, OSError) as err:
            reason = f"connection lost: {err}"
        self._fail_all(reason)

    async def _callbacks(self) -> None:
        """Subscribe to the gateway's network-level callbacks for our flow and apply them.

        The socket is read by a reader callback that drains every datagram waiting and applies the
        highest offset once (offsets only grow): per datagram only a recv and a MAC check, no task
        or timer. In a TCG guest an ``await wait_for(sock_recv())`` per callback cost about as much
        CPU as the gateway's whole data path, and network-sync's primary ran CPU-bound on it."""
        from smfs.callbacks import NONCE_LEN, Flow, decode_callback

        assert self.flow is not None and self.gateway_control is not None
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        # One subscription for this connection: only callbacks with its nonce and a good MAC count.
        nonce = os.urandom(NONCE_LEN)
        self._subscription = _Subscription(sock, Flow(*self.flow), nonce)
        last_cb = [0.0]
        failed: list[BaseException] = []  # an error in the reader ends this task, as an error here would

        def readable() -> None:
            best = None
            try:
                while True:
                    try:
                        data = sock.recv(256)
                    except BlockingIOError:
                        break
                    try:
                        flow, offset, got = decode_callback(data, self.gateway_key)
                        if got != nonce:
                            raise ValueError("not this subscription's (replayed, or an earlier connection's)")
                    except ValueError as err:
                        self.stats["callbacks_rejected"] += 1
                        n = self.stats["callbacks_rejected"]
                        if n <= 10 or n % 1000 == 0:
                            self.log.warning("dropping a callback (%d so far): %s", n, err)
                        continue
                    if tuple(flow) != self.flow:
                        continue
                    self.stats["callbacks"] += 1
                    best = offset if best is None else max(best, offset)
                if best is not None:
                    last_cb[0] = time.monotonic()
                    self._ack(self.tracker.advance("network", min(best, self.tracker.assigned)))
            except Exception as err:  # noqa: BLE001 - handed to the task below, which raises it
                failed.append(err)
                loop.remove_reader(sock.fileno())

        with sock:
            loop.add_reader(sock.fileno(), readable)
            try:
                while not failed:
                    # (Re)subscribe after a second without callbacks: the first subscription may be
                    # lost, and a restarted gateway has forgotten it. A duplicate is harmless.
                    now = time.monotonic()
                    if now - max(self._subscription.sent, last_cb[0]) > 1.0:
                        self._want_callbacks(again=True)
                    await asyncio.sleep(0.25)  # per server: in a TCG guest each wake-up costs ~1 ms
                raise failed[0]
            finally:
                self._subscription = None
                loop.remove_reader(sock.fileno())


class _Subscription:
    """network-sync: this connection's subscription to its gateway's callbacks (its socket, flow and
    nonce), the offset it last asked for and when it last (re)subscribed."""

    __slots__ = ("sock", "name", "flow", "nonce", "want", "sent")

    def __init__(self, sock: socket.socket, flow: Any, nonce: bytes) -> None:
        self.sock, self.flow, self.nonce = sock, flow, nonce
        self.name = sock.getsockname()  # the subscribe's MAC covers it: asked once, not per subscribe
        self.want: int | None = None
        self.sent = 0.0
