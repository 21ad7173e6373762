"""The gateway's egress and ingress paths in memory: a fake event loop and clock, fake WAN and
control sockets, a datagram socketpair as the TUN. Failed data and repair sends, lost callbacks,
late originals of rebuilt packets, ICMP errors on the WAN socket (and, on loopback, the real
socket's IP_RECVERR behaviour)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import select
import socket
import struct
from collections.abc import Callable, Iterator

import pytest

from smfs import gateway as gw_mod
from smfs.callbacks import TCP_ACK, TCP_SYN, Flow, decode_callback, encode_subscribe
from smfs.fec import Encoder, FecParams
from smfs.gateway import Gateway
from smfs.tunnel import KIND_REPAIR, Sealer

KEY = b"k" * 32
FLOW = Flow("198.18.1.10", 40000, "198.18.2.10", 7000)
ISN = 5000
SUBSCRIBER = ("127.0.0.1", 45000)
NONCE = b"\x01" * 8  # the subscription's nonce
PARAMS = FecParams()  # r=8, interleaves (1, 11, 19), flush 5 ms


def tcp(seq: int, payload: int = 0, flags: int = TCP_ACK) -> bytes:
    """An IPv4/TCP packet of ``FLOW`` (checksums zero: nothing checks them)."""
    hdr = struct.pack("!HHIIHHHH", FLOW.sport, FLOW.dport, seq % 2**32, 0, 5 << 12 | flags, 65535, 0, 0)
    total = 40 + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0x4000, 64, 6, 0, socket.inet_aton(FLOW.src),
                     socket.inet_aton(FLOW.dst))
    return ip + hdr + bytes(payload)


class FakeTimer:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self._when, self.callback, self.cancelled = when, callback, False

    def when(self) -> float:
        return self._when

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """The parts of an asyncio loop the gateway uses; time only moves in :meth:`advance`."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.timers: list[FakeTimer] = []
        self.reading_tun = True  # the TUN reader is registered (the pacer takes it off and puts it back)

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> FakeTimer:
        t = FakeTimer(when, callback)
        self.timers.append(t)
        return t

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeTimer:
        return self.call_at(self.now + delay, callback)

    def add_reader(self, *_args: object) -> None:
        self.reading_tun = True

    def remove_reader(self, *_args: object) -> None:
        self.reading_tun = False

    def next_timer(self) -> float | None:
        live = [t.when() for t in self.timers if not t.cancelled]
        return min(live) if live else None

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` on, running the timers due on the way, in order."""
        end = self.now + seconds
        while True:
            due = [t for t in self.timers if not t.cancelled and t.when() <= end]
            if not due:
                break
            t = min(due, key=FakeTimer.when)
            self.timers.remove(t)
            self.now = max(self.now, t.when())
            t.callback()
        self.now = end


class FakeWan:
    """The WAN socket: records what was sent; ``fail`` decides which sends raise. ``inbox`` holds
    datagrams or OSErrors (an ICMP error the next recv raises); ``errqueue`` the error queue's
    reports (ancillary data), read with ``recvmsg(..., MSG_ERRQUEUE)``."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.inbox: list[bytes | OSError] = []
        self.errqueue: list[list[tuple[int, int, bytes]]] = []
        self.errqueue_reads = 0
        self.fail: Callable[[bytes], OSError | None] = lambda _d: None

    def sendto(self, data: bytes, _addr: object) -> int:
        err = self.fail(data)
        if err is not None:
            raise err
        self.sent.append(data)
        return len(data)

    def recv(self, _size: int) -> bytes:
        if not self.inbox:
            raise BlockingIOError
        item = self.inbox.pop(0)
        if isinstance(item, OSError):
            raise item
        return item

    def recvmsg(self, _size: int, _ancsize: int, flags: int) -> tuple[bytes, list, int, None]:
        assert flags & gw_mod.MSG_ERRQUEUE, "only the error queue is read with recvmsg"
        self.errqueue_reads += 1
        if not self.errqueue:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        return b"", self.errqueue.pop(0), 0, None

    def repairs(self) -> list[bytes]:
        return [d for d in self.sent if d[2] == KIND_REPAIR]


class FakeControl:
    """The control socket: subscriptions in, callbacks out; ``lose`` drops a callback silently
    (a lost datagram), ``fail`` makes its send raise."""

    def __init__(self) -> None:
        self.inbox: list[tuple[bytes, tuple[str, int]]] = []
        self.delivered: list[tuple[Flow, int]] = []
        self.lose: Callable[[int], bool] = lambda _n: False
        self.fail: Callable[[int], OSError | None] = lambda _n: None
        self.attempts = 0

    def recvfrom(self, _size: int) -> tuple[bytes, tuple[str, int]]:
        if not self.inbox:
            raise BlockingIOError
        return self.inbox.pop(0)

    def sendto(self, data: bytes, addr: object) -> int:
        self.attempts += 1
        err = self.fail(self.attempts)
        if err is not None:
            raise err
        assert addr == SUBSCRIBER
        if not self.lose(self.attempts):
            flow, offset, nonce = decode_callback(data, KEY)  # authenticated under the testbed key
            assert nonce == NONCE
            self.delivered.append((flow, offset))
        return len(data)

    def offsets(self) -> list[int]:
        return [off for flow, off in self.delivered if flow == FLOW]


class Harness:
    def __init__(self, gw: Gateway, loop: FakeLoop, tun: socket.socket) -> None:
        self.gw, self.loop, self.tun = gw, loop, tun
        self.wan: FakeWan = gw.wan  # type: ignore[assignment]
        self.control: FakeControl = gw.control  # type: ignore[assignment]

    def send(self, *packets: bytes) -> None:
        """Packets routed into the TUN, then the gateway's TUN reader."""
        for p in packets:
            self.tun.send(p)
        self.gw._on_tun()

    def subscribe(self) -> None:
        self.control.inbox.append((encode_subscribe(FLOW, NONCE, KEY, SUBSCRIBER), SUBSCRIBER))
        self.gw._on_control()

    def receive(self, *datagrams: bytes | OSError) -> None:
        self.wan.inbox.extend(datagrams)
        self.gw._on_wan()

    def delivered(self) -> list[bytes]:
        """Packets the gateway wrote to the TUN so far."""
        out = []
        while True:
            try:
                out.append(self.tun.recv(65535))
            except BlockingIOError:
                return out

    def safe(self) -> int | None:
        return self.gw.tracker.safe_offset(FLOW)


def _args(site: str, wan_rate_bps: int = 0, interleaves: tuple[int, ...] = PARAMS.interleaves) -> argparse.Namespace:
    return argparse.Namespace(site=site, r=PARAMS.r, interleaves=list(interleaves), flush_ms=PARAMS.flush_ms,
                              local="127.0.0.1:0", peer="127.0.0.1:9", control="127.0.0.1:0", tun="smfs-test",
                              wan_mtu=1500, wan_rate_bps=wan_rate_bps)


def _make(monkeypatch: pytest.MonkeyPatch, site: str, wan_rate_bps: int = 0, real_wan: bool = False,
          interleaves: tuple[int, ...] = PARAMS.interleaves) -> Iterator[Harness]:
    """A gateway on a fake loop and fake sockets; ``real_wan`` keeps its real WAN socket (on loopback)."""
    loop = FakeLoop()
    monkeypatch.setattr(asyncio, "get_running_loop", lambda: loop)  # the Gateway imports asyncio when made
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    mine.setblocking(False)
    theirs.setblocking(False)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    gw = Gateway(_args(site, wan_rate_bps, interleaves), KEY, mine.fileno())
    gw.control.close()
    gw.control = FakeControl()  # type: ignore[assignment]
    if not real_wan:
        gw.wan.close()
        gw.wan = FakeWan()  # type: ignore[assignment]
    try:
        yield Harness(gw, loop, theirs)
    finally:
        if real_wan:
            gw.wan.close()
        mine.close()
        theirs.close()


@pytest.fixture()
def egress(monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    yield from _make(monkeypatch, "primary")


@pytest.fixture()
def ingress(monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    yield from _make(monkeypatch, "mirror")


def _repairs_fail(err: OSError) -> Callable[[bytes], OSError | None]:
    return lambda d: err if d[2] == KIND_REPAIR else None


def test_the_harness_reports_a_safe_offset(egress: Harness) -> None:
    egress.subscribe()
    egress.send(tcp(ISN, flags=TCP_SYN), tcp(ISN + 1, 100))
    assert egress.safe() == 0
    egress.loop.advance(0.006)  # flush timer: every bin's repair goes out
    assert egress.safe() == 100 and egress.control.offsets() == [100]
    assert egress.gw.snapshot()["send_errors"] == 0


# -- bug 1: a failed repair send must not stall the safe offset -------------------------------


@pytest.mark.parametrize("err", [BlockingIOError(errno.EAGAIN, "busy"), OSError(errno.ENOBUFS, "No buffer space")])
def test_offset_advances_after_a_failed_repair_is_resent_on_a_timer_tick(egress: Harness, err: OSError) -> None:
    egress.subscribe()
    egress.wan.fail = _repairs_fail(err)
    egress.send(tcp(ISN, flags=TCP_SYN), tcp(ISN + 1, 100))
    egress.loop.advance(0.006)  # the flush: 5 repairs (SYN and data: 1 + 2 + 2 bins), all fail
    assert egress.safe() == 0 and not egress.wan.repairs()
    assert egress.gw.snapshot()["send_errors"] == 5
    egress.wan.fail = lambda _d: None  # the socket buffer drained
    egress.loop.advance(0.1)  # no traffic: the retry timer resends them
    assert len(egress.wan.repairs()) == 5
    assert egress.safe() == 100 and egress.control.offsets()[-1] == 100
    snap = egress.gw.snapshot()
    assert snap["repairs_deferred"] == 5 and snap["repairs_retried"] == 5 and snap["repairs_sent"] == 5
    assert snap["repair_backlog"] == 0 and snap["repairs_abandoned"] == 0


def test_failed_repairs_are_resent_on_the_next_send_with_backoff(egress: Harness) -> None:
    egress.subscribe()
    egress.wan.fail = _repairs_fail(BlockingIOError(errno.EAGAIN, "busy"))
    egress.send(tcp(ISN, flags=TCP_SYN), tcp(ISN + 1, 100))
    egress.loop.advance(0.006)
    egress.loop.advance(0.2)  # still full: retried with backoff (1 ms doubling to 50 ms), not busily
    assert egress.safe() == 0
    egress.wan.fail = lambda _d: None
    egress.send(tcp(ISN + 101, 50))  # the next packet is a send opportunity: the backlog goes first
    assert len(egress.wan.repairs()) == 5 and egress.safe() == 100
    egress.loop.advance(0.006)
    assert egress.safe() == 150 and egress.control.offsets()[-1] == 150
    snap = egress.gw.snapshot()
    assert snap["repairs_retried"] == 5 and 3 <= snap["repair_retry_failures"] <= 12


def test_the_backlog_is_bounded_and_drops_what_the_peer_could_not_use(
    egress: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gw_mod, "REPAIR_BACKLOG", 4)
    egress.gw.encoder.budgeted = False  # as with a subscriber: every due bin flushes
    egress.wan.fail = _repairs_fail(BlockingIOError(errno.EAGAIN, "busy"))
    egress.send(tcp(ISN, flags=TCP_SYN), tcp(ISN + 1, 100), tcp(ISN + 101, 100))
    egress.loop.advance(0.006)  # 7 repairs: 1 + 3 + 3 bins flushed
    snap = egress.gw.snapshot()
    assert snap["repair_backlog"] == 4 and snap["repairs_abandoned"] == 3
    assert snap["reasons"]["repair abandoned: backlog full"] == 3
    # Repairs below the peer decoder's window would be ignored there: never sent, never "safe".
    egress.gw.seq += egress.gw.decoder.window + 10
    egress.wan.fail = lambda _d: None
    egress.loop.advance(0.1)
    snap = egress.gw.snapshot()
    assert snap["repair_backlog"] == 0 and snap["repairs_abandoned"] == 7 and not egress.wan.repairs()
    assert egress.safe() == 0


def test_a_repair_too_large_to_send_is_not_retried(egress: Harness) -> None:
    egress.gw.encoder.budgeted = False  # as with a subscriber: every due bin flushes
    egress.wan.fail = _repairs_fail(OSError(errno.EMSGSIZE, "Message too long"))
    egress.send(tcp(ISN, flags=TCP_SYN), tcp(ISN + 1, 100))
    egress.loop.advance(0.006)
    snap = egress.gw.snapshot()
    assert snap["repair_backlog"] == 0 and snap["repairs_abandoned"] == 5
    assert egress.loop.next_timer() is None


# -- "sent" means the kernel took it: a datagram whose send failed never counts as on the WAN ---


FILL = PARAMS.r * 11 * 19  # data packets that fill every bin of every layer exactly: no partial bin left


def _send_in_chunks(h: Harness, packets: list[bytes], chunk: int = 128) -> None:
    """Route ``packets`` into the TUN a chunk at a time (its socket buffer is bounded), reading each."""
    for i in range(0, len(packets), chunk):
        h.send(*packets[i : i + chunk])


def _spy_on_repairs(h: Harness) -> list[int]:
    """Count what the gateway reports to the tracker as sent repairs from now on; each report must
    already be on the (fake) WAN."""
    reported: list[int] = []
    real, before = h.gw.tracker.on_repairs_sent, len(h.wan.repairs())

    def spy(repairs: list, now: float | None = None) -> None:
        reported.append(len(repairs))
        assert sum(reported) <= len(h.wan.repairs()) - before, "a repair reported sent that never went out"
        real(repairs, now)

    h.gw.tracker.on_repairs_sent = spy  # type: ignore[method-assign]
    return reported


@pytest.mark.parametrize("repairs_fail", [False, True])
def test_full_bins_are_safe_only_once_their_repairs_are_really_sent(egress: Harness, repairs_fail: bool) -> None:
    egress.subscribe()
    egress.send(tcp(ISN, flags=TCP_SYN))
    egress.loop.advance(0.006)  # the SYN's partial bins flushed: the next FILL packets fill bins exactly
    reported = _spy_on_repairs(egress)
    if repairs_fail:  # the local qdisc drops them: with IP_RECVERR, sendto says so
        egress.wan.fail = _repairs_fail(OSError(errno.ENOBUFS, "No buffer space available"))
    _send_in_chunks(egress, [tcp(ISN + 1 + 100 * i, 100) for i in range(FILL)])
    full = 100 * FILL
    if not repairs_fail:  # every bin filled and went out in the send path: safe at once, no timer
        assert egress.safe() == full and egress.control.offsets()[-1] == full
        return
    assert egress.safe() == 0 and egress.control.offsets() == [] and sum(reported) == 0
    egress.loop.advance(0.2)  # flush and retry timers: still failing, still nothing safe
    assert egress.safe() == 0 and egress.control.offsets() == [] and sum(reported) == 0
    snap = egress.gw.snapshot()
    assert snap["repair_send_errors"] == snap["repairs_deferred"] == 3 * FILL // PARAMS.r
    assert snap["data_send_errors"] == 0 and snap["repair_retry_failures"] >= 3
    egress.wan.fail = lambda _d: None  # the queue drained: the next retry gets them out
    egress.loop.advance(0.1)
    assert egress.safe() == full and egress.control.offsets()[-1] == full
    assert sum(reported) == 3 * FILL // PARAMS.r == len(egress.wan.repairs()) - 3  # 3: the SYN's


def test_a_failed_data_send_keeps_its_bytes_unacked_until_resent(egress: Harness) -> None:
    egress.subscribe()
    data_sends = 0

    def fail_second_data(d: bytes) -> OSError | None:
        nonlocal data_sends
        if d[2] == KIND_REPAIR:
            return None
        data_sends += 1
        return OSError(errno.ENOBUFS, "No buffer space available") if data_sends == 3 else None

    egress.wan.fail = fail_second_data
    reported = _spy_on_repairs(egress)
    sent = egress.gw.tracker.on_packet_sent
    seen: list[int] = []
    egress.gw.tracker.on_packet_sent = lambda seq, p, now=None: (seen.append(seq), sent(seq, p, now))  # type: ignore[method-assign]
    # SYN, then bytes 0-99 sent, 100-199 dropped by the local queue, 200-299 sent.
    egress.send(tcp(ISN, flags=TCP_SYN), tcp(ISN + 1, 100), tcp(ISN + 101, 100), tcp(ISN + 201, 100))
    egress.loop.advance(0.006)  # every repair out, including the ones covering the lost packet
    assert len(seen) == 3  # the failed datagram was never given to the tracker
    assert egress.safe() == 100 and egress.control.offsets() == [100]  # 100-199 unacked, so 200-299 too
    snap = egress.gw.snapshot()
    assert snap["data_send_errors"] == snap["send_errors"] == 1 and snap["packets_out"] == 3
    assert sum(reported) == len(egress.wan.repairs())
    egress.loop.advance(1.0)
    assert egress.safe() == 100
    egress.send(tcp(ISN + 101, 100))  # TCP retransmits the segment: a new tunnel packet
    egress.loop.advance(0.006)
    assert egress.safe() == 300 and egress.control.offsets()[-1] == 300


def test_a_send_failing_with_a_queued_icmp_error_is_not_sent_and_reads_the_report(egress: Harness) -> None:
    """With IP_RECVERR an ICMP error (the peer's port closed while its gateway restarts) fails the
    next send: that datagram did not go out. Its report is read off the error queue."""
    egress.subscribe()
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    egress.wan.errqueue.append(_icmp_report(errno.ECONNREFUSED))
    egress.wan.fail = lambda d: refused if d[2] == KIND_REPAIR else None
    egress.send(tcp(ISN, flags=TCP_SYN), tcp(ISN + 1, 100))
    egress.loop.advance(0.006)  # the flush: every repair send fails
    assert egress.safe() == 0 and egress.wan.errqueue == []  # the report was read at the first failure
    egress.wan.fail = lambda _d: None
    egress.loop.advance(0.1)
    assert egress.safe() == 100
    snap = egress.gw.snapshot()
    assert snap["repairs_deferred"] == 5 and snap["repairs_retried"] == 5 and snap["wan_errors"] == 1
    assert snap["reasons"]["wan error: Connection refused (ICMP 3/3)"] == 1


def _icmp_report(err: int, icmp_type: int = 3, icmp_code: int = 3) -> list[tuple[int, int, bytes]]:
    """The ancillary data of an error-queue message: an ICMP error's ``sock_extended_err``."""
    ee = struct.pack("=IBBBBII", err, 2, icmp_type, icmp_code, 0, 0, 0) + bytes(16)
    return [(socket.IPPROTO_IP, gw_mod.IP_RECVERR, ee)]


def test_the_ingress_reader_survives_an_icmp_error_and_drains_the_error_queue(ingress: Harness) -> None:
    data, repairs = _peer_stream(8)
    ingress.wan.errqueue.extend([_icmp_report(errno.ECONNREFUSED), _icmp_report(errno.EHOSTUNREACH, 3, 1)])
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    ingress.receive(data[0][2], refused, *[d for _s, _p, d in data[1:]], *repairs)
    assert [p for _s, p, _d in data] == ingress.delivered()  # read on after the error: nothing lost
    assert ingress.wan.errqueue == [] and ingress.wan.inbox == []
    snap = ingress.gw.snapshot()
    assert snap["wan_recv_errors"] == 1 and snap["wan_errors"] == 2 and snap["wan_datagrams_in"] == len(data) + len(repairs)
    assert snap["reasons"]["wan recv: Connection refused"] == 1
    assert snap["reasons"]["wan error: No route to host (ICMP 3/1)"] == 1


def test_the_ingress_reader_woken_with_nothing_drains_the_error_queue(ingress: Harness) -> None:
    """A send consumed the socket's pending error: its report stays queued and keeps the socket
    readable (EPOLLERR), so a reader that found nothing to read must read the report, or spin."""
    ingress.wan.errqueue.append(_icmp_report(errno.ECONNREFUSED))
    ingress.gw._on_wan()
    assert ingress.wan.errqueue == [] and ingress.gw.snapshot()["wan_errors"] == 1
    reads = ingress.wan.errqueue_reads
    data, _ = _peer_stream(2)
    ingress.receive(*[d for _s, _p, d in data])  # datagrams read: no extra error-queue read per batch
    assert ingress.wan.errqueue_reads == reads


def test_the_ingress_reader_gives_up_after_a_batch_of_errors(ingress: Harness) -> None:
    ingress.receive(*[OSError(errno.EHOSTUNREACH, "No route to host")] * 300)
    assert len(ingress.wan.inbox) == 300 - 256  # returned to the loop: it is called again, never stuck
    assert ingress.gw.snapshot()["wan_recv_errors"] == 256


def test_the_wan_socket_reports_local_drops() -> None:
    sock = gw_mod.wan_socket("127.0.0.1:0")
    try:
        assert sock.getsockopt(socket.IPPROTO_IP, gw_mod.IP_RECVERR) == 1
        assert not sock.getblocking() and sock.getsockname()[0] == "127.0.0.1"
    finally:
        sock.close()


def _closed_udp_port() -> int:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


def _wait_for_error(sock: socket.socket) -> None:
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    assert poller.poll(2000), "no ICMP error came back on loopback"


@pytest.fixture()
def real_egress(monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    yield from _make(monkeypatch, "primary", real_wan=True)


def test_icmp_errors_on_the_real_wan_socket_fail_a_send_and_are_drained(real_egress: Harness) -> None:
    """On loopback, for real: the peer's port is closed, so the kernel answers a datagram with ICMP
    port unreachable. The next send fails (nothing sent, nothing tracked), a recv fails likewise,
    and the gateway reads the reports so that the socket does not stay readable."""
    h, gw = real_egress, real_egress.gw
    assert gw.wan.getsockopt(socket.IPPROTO_IP, gw_mod.IP_RECVERR) == 1
    gw.peer = ("127.0.0.1", _closed_udp_port())
    seen: list[int] = []
    sent = gw.tracker.on_packet_sent
    gw.tracker.on_packet_sent = lambda seq, p, now=None: (seen.append(seq), sent(seq, p, now))  # type: ignore[method-assign]
    h.send(tcp(ISN, flags=TCP_SYN))  # goes out; the ICMP error comes back
    _wait_for_error(gw.wan)
    h.send(tcp(ISN + 1, 100))  # fails with the queued error: not on the WAN, not tracked
    snap = gw.snapshot()
    assert snap["data_send_errors"] == 1 and snap["packets_out"] == 1 and len(seen) == 1
    assert snap["wan_errors"] == 1 and snap["reasons"]["wan error: Connection refused (ICMP 3/3)"] == 1
    h.send(tcp(ISN + 1, 100))  # goes out; another ICMP error, now raised by the ingress recv
    _wait_for_error(gw.wan)
    gw._on_wan()
    snap = gw.snapshot()
    assert snap["wan_recv_errors"] == 1 and snap["wan_errors"] == 2
    assert select.select([gw.wan], [], [gw.wan], 0) == ([], [], [])  # nothing left: the reader will not spin


# -- seeded defect: callbacks before the repairs (smfs.defects) ----------------------------------


@pytest.mark.parametrize("seeded", [False, True])
def test_a_callback_before_the_repairs_only_with_the_seeded_defect(
    monkeypatch: pytest.MonkeyPatch, seed_defect: Callable[[str], None], seeded: bool
) -> None:
    if seeded:
        seed_defect("network-sync-callback-before-repairs")
    for h in _make(monkeypatch, "primary"):
        h.subscribe()
        h.wan.fail = _repairs_fail(OSError(errno.ENOBUFS, "No buffer space available"))
        h.send(tcp(ISN, flags=TCP_SYN), tcp(ISN + 1, 100))
        h.loop.advance(0.006)
        assert not h.wan.repairs()  # not one repair is out
        assert h.safe() == (100 if seeded else 0)
        assert h.control.offsets() == ([100] if seeded else [])
        h.wan.fail = lambda _d: None
        h.loop.advance(0.1)
        assert len(h.wan.repairs()) == 5 and h.safe() == 100  # repairs still go out as usual


# -- bug 2: a lost callback is re-announced ---------------------------------------------------


def test_a_lost_callback_is_re_announced(egress: Harness) -> None:
    egress.subscribe()
    egress.control.lose = lambda n: n == 1  # the first callback datagram is lost
    egress.send(tcp(ISN, flags=TCP_SYN), tcp(ISN + 1, 100))
    egress.loop.advance(0.006)
    assert egress.safe() == 100 and egress.control.attempts == 1 and egress.control.offsets() == []
    egress.loop.advance(0.05)  # within one re-announcement period
    assert egress.control.offsets() == [100]
    assert egress.gw.snapshot()["callbacks_resent"] >= 1


def test_forged_and_replayed_subscribes_steal_no_callbacks(egress: Harness) -> None:
    """The control channel takes a subscribe only with a good MAC for its sender: one under another
    key, one replayed from another address, one with garbage where the MAC goes are counted and
    ignored (FakeControl.sendto asserts every callback goes to the real subscriber)."""
    egress.subscribe()
    thief = ("127.0.0.1", 46000)
    good = encode_subscribe(FLOW, NONCE, KEY, SUBSCRIBER)
    for data in (encode_subscribe(FLOW, NONCE, b"z" * 32, thief), good, good[:-16] + bytes(16)):
        egress.control.inbox.append((data, thief))
    egress.gw._on_control()
    egress.send(tcp(ISN, flags=TCP_SYN), tcp(ISN + 1, 100))
    egress.loop.advance(0.3)
    assert egress.gw.announcer.subscriber(FLOW) == SUBSCRIBER and egress.control.offsets()[-1] == 100
    assert egress.gw.reasons["control: bad mac"] == 3, egress.gw.reasons


def test_a_failed_callback_send_is_re_announced(egress: Harness) -> None:
    egress.subscribe()
    egress.control.fail = lambda n: OSError(errno.ENOBUFS, "No buffer space") if n == 1 else None
    egress.send(tcp(ISN, flags=TCP_SYN), tcp(ISN + 1, 100))
    egress.loop.advance(0.006)
    assert egress.control.offsets() == []
    egress.loop.advance(0.05)
    assert egress.control.offsets() == [100]
    assert egress.gw.snapshot()["callback_send_errors"] == 1


def test_a_late_subscriber_learns_the_current_offset_at_once(egress: Harness) -> None:
    """Data is never a lazy packet: its bins flush on time with nobody subscribed (the repair budget
    holds pure ACKs only), so a subscriber that comes late hears the offset at once."""
    egress.send(tcp(ISN, flags=TCP_SYN), tcp(ISN + 1, 100))
    egress.loop.advance(2.0)  # long safe, nobody listening
    assert egress.safe() == 100 and egress.control.attempts == 0 and egress.gw.encoder.budgeted
    egress.subscribe()
    assert egress.control.offsets() == [100] and not egress.gw.encoder.budgeted
    egress.subscribe()  # a repeated subscribe (its first answer lost, say) is answered again
    assert egress.control.offsets() == [100, 100]


def test_pure_acks_of_an_unsubscribed_gateway_are_on_the_repair_budget(egress: Harness) -> None:
    """The mirror's side: a stream of pure ACKs, 200 a second, every bin due before it fills. On the
    budget, about 1.25 c/r repairs per ACK leave, not c; data among them still flushes on time."""
    egress.send(tcp(ISN, flags=TCP_SYN))
    egress.loop.advance(0.01)
    before = len(egress.wan.repairs())
    for _ in range(400):
        egress.send(tcp(ISN + 1, 0, flags=TCP_ACK))
        egress.loop.advance(0.005)
    acks = len(egress.wan.repairs()) - before
    assert 0.8 * 400 * 1.25 * PARAMS.c / PARAMS.r <= acks <= 400 * 1.25 * PARAMS.c / PARAMS.r + sum(PARAMS.interleaves)
    before = len(egress.wan.repairs())
    egress.send(tcp(ISN + 1, 100))  # an application's frame among the ACKs
    egress.loop.advance(PARAMS.flush_ms / 1000 + 0.001)
    assert egress.safe() == 100 and len(egress.wan.repairs()) - before >= PARAMS.c


def test_a_flow_that_keeps_advancing_is_not_re_announced(egress: Harness) -> None:
    """Every advance sends a fresh callback: re-announcing it on top (every 50 ms) would only cost the
    storage server CPU. Re-announcements start once the flow has been quiet for an interval."""
    egress.subscribe()
    egress.send(tcp(ISN, flags=TCP_SYN))
    for i in range(100):  # 100 bytes every 10 ms for a second, each safe 5 ms later
        egress.send(tcp(ISN + 1 + 100 * i, 100))
        egress.loop.advance(0.010)
    offsets = egress.control.offsets()
    assert offsets == sorted(set(offsets)) and offsets[-1] == 10_000  # each advance once, none repeated
    assert egress.gw.snapshot()["callbacks_resent"] == 0
    egress.loop.advance(0.2)
    assert egress.control.offsets()[len(offsets):] == [10_000] * 3 and egress.gw.snapshot()["callbacks_resent"] == 3


def test_re_announcements_stop_once_the_flow_is_quiet(egress: Harness) -> None:
    egress.subscribe()
    egress.send(tcp(ISN, flags=TCP_SYN), tcp(ISN + 1, 100))
    egress.loop.advance(0.006)
    egress.loop.advance(3.0)
    n = len(egress.control.offsets())
    assert 10 <= n <= 30 and set(egress.control.offsets()) == {100}  # ~every 50 ms for ~1 s
    assert egress.loop.next_timer() is None  # idle: no more wake-ups
    egress.loop.advance(3.0)
    assert len(egress.control.offsets()) == n


# -- bug 3: a late original of a rebuilt packet is not a replay -------------------------------


def _peer_stream(n: int, first: int = 1000) -> tuple[list[tuple[int, bytes, bytes]], list[bytes]]:
    """``n`` DATA datagrams from the primary's gateway, (seq, packet, datagram), and the repairs."""
    seal, enc = Sealer(KEY, gw_mod.SITE_IDS["primary"]), Encoder(PARAMS)
    data, repairs = [], []
    for seq in range(first, first + n):
        packet = bytes([seq % 256]) * 60
        data.append((seq, packet, seal.data(seq, packet)))
        repairs.extend(seal.repair(r) for r in enc.add(seq, packet, 0.0))
    repairs.extend(seal.repair(r) for r in enc.flush())
    return data, repairs


def test_a_late_original_after_a_rebuild_is_not_counted_as_replayed(ingress: Harness) -> None:
    data, repairs = _peer_stream(8)
    lost_seq, lost_packet, lost_datagram = data[3]
    ingress.receive(*[d for s, _p, d in data if s != lost_seq], *repairs)
    assert lost_packet in ingress.delivered()
    snap = ingress.gw.snapshot()
    assert snap["rebuilt"] == 1 and snap["replayed"] == 0
    ingress.receive(lost_datagram)  # the original, delayed on the WAN, arrives after all
    assert ingress.gw.snapshot()["replayed"] == 0
    assert ingress.delivered() == []  # not written twice
    ingress.receive(lost_datagram)  # a second copy is a replay
    ingress.receive(data[0][2])  # and so is any datagram seen before
    snap = ingress.gw.snapshot()
    assert snap["replayed"] == 2 and snap["late_after_rebuild"] == 1
    assert ingress.delivered() == []


# -- pacing: the egress never outruns the WAN's rate, and announces only what it sent -----------


@pytest.fixture()
def paced(monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    yield from _make(monkeypatch, "primary", wan_rate_bps=8_000_000)  # 1 MB/s; 24 kB of credit


def test_a_paced_egress_leaves_packets_in_the_tun_until_its_debt_is_paid(paced: Harness) -> None:
    paced.subscribe()
    sends: list[tuple[float, int, bool]] = []  # (loop time, wire bytes, repair?) of every datagram sent
    paced.wan.fail = lambda d: sends.append((paced.loop.now, len(d) + 42, d[2] == KIND_REPAIR))  # type: ignore[func-returns-value]
    packets = [tcp(ISN, flags=TCP_SYN)] + [tcp(ISN + 1 + 1000 * i, 1000) for i in range(100)]
    t0 = paced.loop.now
    paced.send(*packets)  # what the credit covers goes out (owing one datagram), the rest waits in the TUN
    sent = len(paced.wan.sent) - len(paced.wan.repairs())
    assert 24_000 // (1500 + 42) < sent < len(packets) and not paced.loop.reading_tun
    wire = sum(b for _t, b, _r in sends)
    assert paced.gw.pacer.paused_s == pytest.approx((wire - 24_000) / (1e6 * 0.95), rel=0.01)
    # Safe offsets cover only what was sent: the packets still in the TUN are not "on the WAN".
    assert paced.safe() is None or paced.safe() <= 1000 * (sent - 1)
    paced.loop.advance(1.0)  # each pause ends in a read of the TUN, until it is empty
    assert len(paced.wan.sent) - len(paced.wan.repairs()) == len(packets)
    assert paced.safe() == 100_000  # the TUN ran dry: the flush timer counted again, every bin is out
    # Pauses do not flush the bins the waiting packets are about to fill: repairs stay about c/r of
    # the data (one flush of the open bins at the end), not one per partial bin per pause.
    assert paced.gw.pacer.pauses >= 5
    assert len(paced.wan.repairs()) <= len(packets) * PARAMS.c / PARAMS.r + sum(PARAMS.interleaves) + PARAMS.c
    # Up to the last data datagram, what went out on the wire at any moment is the credit plus the
    # paced rate since the start, give or take the one datagram (and the repairs it completes) owed.
    last_data = max(t for t, _b, rep in sends if not rep)
    slack = max(b for _t, b, _r in sends) * (1 + PARAMS.c)
    total = 0
    for t, b, _rep in sends:
        if t > last_data:
            break
        total += b
        assert total <= 24_000 + 1e6 * 0.95 * (t - t0) + slack
    assert last_data - t0 >= (total - 24_000 - slack) / (1e6 * 0.95) > 0
    assert paced.gw.snapshot()["paced"]["rate_bps"] == 8_000_000


def test_the_callback_latency_is_split_into_the_pacers_part_and_the_gateways(paced: Harness) -> None:
    """100 packets at once against 24 kB of credit at 1 MB/s: most wait in the TUN, and their open
    bins wait with them (no flush while backlogged) until the TUN runs dry about 0.15 s later. That
    wait is the WAN's rate (``held_``); what is left (``own_``) is the gateway's: the flush delay."""
    paced.subscribe()
    paced.send(tcp(ISN, flags=TCP_SYN), *[tcp(ISN + 1 + 1000 * i, 1000) for i in range(100)])
    paced.loop.advance(1.0)
    assert paced.safe() == 100_000
    lat = paced.gw.snapshot()["callback_latency_ms"]
    held_s = paced.gw._held_clock(paced.loop.now)
    assert 0.1 < paced.gw.pacer.paused_s <= held_s < 0.3 and not paced.gw._backlogged  # held: the pacer's pauses
    assert lat["n"] == 100 and 50 < lat["p50"] < 200 and lat["held_p99"] <= held_s * 1000
    assert lat["held_p50"] > 0.5 * lat["p50"]  # mostly the pacer's
    assert lat["own_p99"] <= PARAMS.flush_ms + 1  # the gateway's own: at most the flush delay (+ a tick)
    assert lat["own_p50"] + lat["held_p50"] == pytest.approx(lat["p50"], abs=PARAMS.flush_ms + 1)


def test_an_unpaced_egress_sends_every_packet_it_can_read(egress: Harness) -> None:
    egress.send(*[tcp(ISN + 1000 * i, 1000) for i in range(100)])
    assert len(egress.wan.sent) - len(egress.wan.repairs()) == 100 and egress.loop.reading_tun
    assert egress.gw.snapshot()["paced"] is None


# -- c = 0: no FEC (the data-loss-vs-c experiment's baseline) -------------------------------------


@pytest.fixture()
def no_fec(monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    yield from _make(monkeypatch, "primary", interleaves=())


def test_c0_sends_no_repairs_and_calls_back_once_the_data_is_sent(no_fec: Harness) -> None:
    h = no_fec
    h.subscribe()
    h.send(tcp(ISN, flags=TCP_SYN), tcp(ISN + 1, 100))
    assert h.safe() == 100 and h.control.offsets() == [100]  # at once: no repair to wait for
    assert h.gw.encoder.get_timer() is None  # no flush timer armed (only the announcer's)
    h.send(*[tcp(ISN + 101 + 1000 * i, 1000) for i in range(50)])
    assert h.safe() == 50_100 and h.control.offsets()[-1] == 50_100
    h.loop.advance(3.0)
    assert h.loop.next_timer() is None and not h.wan.repairs() and len(h.wan.sent) == 52
    snap = h.gw.snapshot()
    assert snap["params"]["c"] == 0 and snap["params"]["interleaves"] == []
    assert snap["repairs_sent"] == 0 and snap["packets_out"] == 52
    assert snap["callback_latency_ms"] == {"p50": 0.0, "p99": 0.0, "held_p50": 0.0, "held_p99": 0.0,
                                           "own_p50": 0.0, "own_p99": 0.0, "n": 51}  # the SYN carries no byte


def test_c0_a_failed_data_send_is_never_safe(no_fec: Harness) -> None:
    h = no_fec
    h.send(tcp(ISN, flags=TCP_SYN))
    h.wan.fail = lambda _d: OSError(errno.ENOBUFS, "No buffer space available")
    h.send(tcp(ISN + 1, 100))
    assert h.safe() == 0
    h.wan.fail = lambda _d: None
    h.send(tcp(ISN + 1, 100))  # TCP's retransmission
    assert h.safe() == 100 and h.gw.snapshot()["data_send_errors"] == 1


def test_c0_a_lost_packet_is_lost_for_good(monkeypatch: pytest.MonkeyPatch) -> None:
    for h in _make(monkeypatch, "mirror", interleaves=()):
        seal = Sealer(KEY, gw_mod.SITE_IDS["primary"])
        n = h.gw.decoder.window + 600
        lost = {1003, 1000 + n - 50}  # the first leaves the window (the decoder's lost), the second not
        for first in range(1000, 1000 + n, 200):
            h.receive(*[seal.data(s, bytes([s % 256]) * 60) for s in range(first, min(first + 200, 1000 + n))
                        if s not in lost])
            got = h.delivered()
            assert len(got) == len([s for s in range(first, min(first + 200, 1000 + n)) if s not in lost])
        snap = h.gw.snapshot()
        assert snap["params"]["c"] == 0 and snap["rebuilt"] == 0 and snap["repairs_sent"] == 0
        assert snap["received"] == n - 2 and snap["lost_on_wan"] == 2 and snap["lost_for_good"] == 2
        assert h.gw.decoder.stats.lost == 1 and h.gw.decoder.missing_in_window() == 1
        assert snap["rebuilt_fraction"] == 0.0


class _Execd(Exception):
    """Raised by a fake ``os.execv``: the argv the gateway would have replaced itself with."""

    def __init__(self, argv: list[str]) -> None:
        super().__init__(argv)
        self.argv = argv


def test_the_cli_takes_a_bare_interleaves_flag_as_c0(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """``--interleaves`` with no value is c = 0; the C program gets it as an empty string."""
    key_file = tmp_path / "key"
    key_file.write_text(KEY.hex())

    def execv(_path: str, argv: list[str]) -> None:
        raise _Execd(argv)

    monkeypatch.setattr(gw_mod, "c_binary", lambda: "/nonexistent/smfs-gateway")
    monkeypatch.setattr(gw_mod, "open_tun", lambda _name, vnet_hdr=False: 99)
    monkeypatch.setattr(gw_mod, "configure_tun", lambda *_a: None)
    monkeypatch.setattr(gw_mod.os, "set_inheritable", lambda *_a: None)
    monkeypatch.setattr(gw_mod.os, "execv", execv)
    base = ["--site", "primary", "--address", "198.18.11.1", "--local", "127.0.0.1:7800", "--peer", "127.0.0.1:7801",
            "--key-file", str(key_file), "--stats", str(tmp_path / "s.json"), "--ready", str(tmp_path / "ready"),
            "--engine", "c"]
    for flag, text in ((["--interleaves"], ""), (["--interleaves", "1"], "1"), (["--interleaves", "1", "11"], "1,11"),
                       ([], "1,11,19")):
        with pytest.raises(_Execd) as run:
            gw_mod.main(base[:2] + flag + base[2:])  # the bare flag before another option
        argv = run.value.argv
        assert argv[argv.index("--interleaves") + 1] == text
        with pytest.raises(_Execd) as run:
            gw_mod.main(base + flag)  # ... or last
        assert run.value.argv == argv
    assert gw_mod.main([*base, "--interleaves", "1", "1"]) == 2  # still validated: strictly increasing
