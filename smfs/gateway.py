"""The Maelstrom gateway of one site: ``python -m smfs.gateway ...`` (thin asyncio glue).

Egress: IP packets routed from the site's storage subnet to the peer site's enter a TUN device;
each is sent unaltered inside an authenticated UDP datagram to the peer gateway, numbered, and fed
to the FEC encoder, whose repair datagrams go out alongside. "Sent" means the kernel took the
datagram: the WAN socket has IP_RECVERR, so a datagram the local qdisc or device queue drops fails
its ``sendto`` (ENOBUFS) instead of vanishing behind a success. A data datagram whose send fails is
not tracked (TCP retransmits it); a repair whose send fails (socket buffer full, local queue full,
link down) waits in a bounded backlog and is resent on the next send opportunity or
timer tick, with backoff. The flow tracker turns "sent, with every covering repair" into
per-TCP-flow safe stream offsets, pushed as callbacks to the local storage servers that
subscribed (network-sync), and re-announced for a while (the :class:`Announcer`), since the
control channel may lose datagrams. Subscriptions and callbacks are authenticated under the
testbed key (:mod:`smfs.callbacks`): a subscribe without a good MAC for its sender is counted
(``reasons``) and ignored.

Ingress: datagrams from the peer are authenticated (HMAC, per-testbed key) and checked against a
replay window; data is written to the TUN at once, repairs rebuild lost packets, which are written
as soon as they are rebuilt. Hostile or foreign datagrams are counted and dropped; so are replayed
ones, and late originals of packets already rebuilt (counted apart: they are not replays).
ICMP errors the peer's host or the path report (IP_RECVERR queues them on the WAN socket and fails
the next send or recv with them) are read off the socket's error queue and counted; reading goes on.

Statistics are written to ``--stats`` every second, on SIGUSR1 and on exit.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Hashable
from pathlib import Path
from typing import TYPE_CHECKING

from smfs import defects
from smfs.callbacks import Announcer, FlowTracker, decode_subscription, is_pure_ack
from smfs.fec import Decoder, Encoder, FecParams, Repair
from smfs.pacer import Pacer
from smfs.tunnel import MIN_KEY, ReplayWindow, Sealer, TunnelError, decode_raw, encode_data, encode_repair
from smfs.units import parse_hostport

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI, IFF_VNET_HDR = 0x0001, 0x1000, 0x4000
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # <asm-generic/socket.h>; not in Python's socket module
TSO_SEGS = 64  # gateway.c TSO_SEGS: the TUN's gso_max_segs, so one read fits the gateway's batch
WAN_MTU = 1500  # bytes: the WAN links' MTU; tunnel datagrams must cross them unfragmented
TUN_BATCH = 64  # packets read from the TUN before the encoder takes them
_IPV4_UDP = 20 + 8  # bytes of IPv4 and UDP header around a tunnel datagram
SITE_IDS = {"primary": 1, "mirror": 2}
REPAIR_BACKLOG = 4096  # repairs waiting to be resent after a failed send (~6 MB of 1.4 KB repairs)
RETRY_MIN_S, RETRY_MAX_S = 0.001, 0.05  # resend backoff (s): doubles per failed retry, up to the max
PAUSE_MIN_S = 0.0005  # the shortest pause of the TUN reader (s)
PACER_BURST_DATAGRAMS = 16  # the pacer's credit, in WAN-MTU datagrams: what the WAN's queue absorbs at once
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)  # Linux: report local drops and ICMP errors to the sender
MSG_ERRQUEUE = getattr(socket, "MSG_ERRQUEUE", 0x2000)  # Linux: read the socket's error queue
ERRQUEUE_BATCH = 1024  # error reports read per drain; the rest keep the socket readable and are read next
_QUEUE_FULL = frozenset({errno.EAGAIN, errno.ENOBUFS})  # send errors that put nothing on the error queue
_SOCK_EE = struct.Struct("=IBBBBII")  # struct sock_extended_err: errno, origin, type, code, pad, info, data
_SO_EE_ORIGINS = {1: "local", 2: "ICMP"}

log = logging.getLogger("smfs.gateway")

if TYPE_CHECKING:
    import asyncio
# asyncio and numpy are imported where the Python engine runs (Gateway, _main, snapshot), not at the
# top: the C engine's launcher (main, then exec) never needs them, and in a TCG guest they cost it
# about a second and a half at every gateway start.


def open_tun(name: str, vnet_hdr: bool = False) -> int:
    """The TUN ``name``; ``vnet_hdr``: each packet with a virtio_net_hdr, so the C gateway can offer
    the kernel TSO (one read per TCP super-packet, cut into segments by smfs/native/offload.c)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
    return fd


def tun_mtu(r: int, wan_mtu: int = WAN_MTU) -> int:
    """The TUN MTU: the longest inner packet whose DATA datagram and whose REPAIR datagrams (up to
    ``r`` packets, the XOR as long as the longest) still fit one ``wan_mtu`` IPv4 datagram, so
    nothing is fragmented on the WAN (1398 bytes for r = 8 and 1500). The overhead is measured
    on the wire format itself."""
    key = bytes(MIN_KEY)
    data = len(encode_data(0, b"x", 0, key)) - 1
    repair = len(encode_repair(Repair(0, tuple(range(r)), (1,) * r, b"x"), 0, key)) - 1
    return wan_mtu - _IPV4_UDP - max(data, repair)


def configure_tun(name: str, address: str, routes: list[str], mtu: int, queue: int = 0, tso: bool = False) -> None:
    """Address-free TUN up with ``mtu``, the peer subnets routed into it; ``queue`` (packets, 0: the
    kernel's 500) bounds what waits in it for the gateway: the site edge's buffer when paced. With
    ``tso`` an entry of that queue is one TCP super-packet of up to ``TSO_SEGS`` segments (TCP sizes
    them to about a millisecond of its pacing rate: a few segments at the WAN's rates).

    With iproute2's ``ip`` (two or three short commands) rather than pyroute2, whose import alone
    takes 0.1 s here and seconds in a TCG guest, at every gateway start. OSError naming the command
    and ip's own message when one fails."""
    cmds = [["ip", "link", "set", "dev", name, "mtu", str(mtu), *(["txqueuelen", str(queue)] if queue else []),
             *(["gso_max_segs", str(TSO_SEGS)] if tso else []), "up"]]
    cmds += [["ip", "route", "replace", dst, "dev", name, "src", address] for dst in routes]
    for cmd in cmds:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            raise OSError(f"{' '.join(cmd)}: {done.stderr.strip() or f'exit {done.returncode}'}")


def wan_socket(local: str) -> socket.socket:
    """The gateway's UDP socket on the WAN, bound to ``local`` (HOST:PORT), non-blocking.

    With IP_RECVERR, a datagram the local qdisc or device queue drops fails its ``sendto`` with
    ENOBUFS; without it Linux reports success (``udp_send_skb`` hides ENOBUFS) and the gateway
    would call the packet "on the WAN" and maybe safe. It also makes ICMP errors for this
    unconnected socket visible: queued on its error queue (see :meth:`Gateway._drain_wan_errors`)
    and raised by the next send or recv."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        # As root, the FORCE options get the 4 MiB past net.core.[rw]mem_max (212992 by default: a
        # receive buffer of ~150 datagrams, which a gateway slower than the WAN's bursts overflows,
        # after the WAN, in runs FEC cannot repair); otherwise what the limit allows.
        for force, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, 4 << 20)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, plain, 4 << 20)
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        sock.bind(parse_hostport(local))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def describe_wan_error(ancdata: list[tuple[int, int, bytes]]) -> str:
    """One line for an error-queue message's ancillary data (its ``sock_extended_err``), e.g.
    ``"Connection refused (ICMP 3/3)"``; no addresses, so the reasons stay few."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_RECVERR and len(data) >= _SOCK_EE.size:
            err, origin, icmp_type, icmp_code, *_ = _SOCK_EE.unpack_from(data)
            where = _SO_EE_ORIGINS.get(origin, f"origin {origin}")
            detail = f"{where} {icmp_type}/{icmp_code}" if origin == 2 else where
            return f"{os.strerror(err)} ({detail})"
    return "no extended error"


class Gateway:
    def __init__(self, args: argparse.Namespace, key: bytes, tun: int) -> None:
        self.args = args
        self.key = key
        self.site = SITE_IDS[args.site]
        self.peer_site = SITE_IDS["mirror" if args.site == "primary" else "primary"]
        self.params = FecParams(r=args.r, c=len(args.interleaves), interleaves=tuple(args.interleaves),
                                flush_ms=args.flush_ms)
        self.encoder = Encoder(self.params)
        # No storage server waits on a callback until one subscribes: until then the flush timer
        # is on a repair budget (fec.py: at most 1.25 c/r repairs per packet, e.g. the mirror's
        # ACKs); from the first valid subscription on, every due bin flushes on time.
        self.encoder.budgeted = True
        self.decoder = Decoder(self.params, window=max(4096, 2 * self.params.span))
        self.tracker = FlowTracker(self.params.c,
                                   safe_at_send=defects.active("network-sync-callback-before-repairs"))
        self.announcer = Announcer(key)
        self.replay = ReplayWindow(self.decoder.window)  # as deep as the decoder: it remembers what it rebuilt
        self.sealer = Sealer(key, self.site)  # checks the key once, at start
        # Failed repair sends, oldest first: (repair, datagram); resent at _retry_at (loop time, s).
        self.backlog: collections.deque[tuple[Repair, bytes]] = collections.deque()
        self._retry_at: float | None = None
        self._retry_delay = RETRY_MIN_S
        self._peer_window = self.decoder.window  # the peer's decoder window (same params): older repairs are useless
        # Above any seq a previous run of this gateway used (replay window); tests may pin it.
        self.seq = int(os.environ.get(FIRST_SEQ_ENV) or time.time_ns())
        self.stats = collections.Counter()
        self.reasons: collections.Counter[str] = collections.Counter()
        import asyncio  # see the note at the top

        self._timer: asyncio.TimerHandle | None = None
        self.loop = asyncio.get_running_loop()
        self.tun = tun
        self.wan = wan_socket(args.local)
        self.peer = parse_hostport(args.peer)
        self.control = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.control.bind(parse_hostport(args.control))
        self.control.setblocking(False)
        # Paced to the WAN's rate (when given): the bottleneck queue must never drop in bursts.
        self.pacer = (Pacer(args.wan_rate_bps, PACER_BURST_DATAGRAMS * args.wan_mtu, self.loop.time())
                      if args.wan_rate_bps else None)
        self._tun_paused = False
        # Packets wait in the TUN because the pacer held them back: the bins they will fill need no
        # flush (a flush now would send a repair per partial bin at every pause and multiply the
        # repairs); the flush timer counts again once a read finds the TUN empty.
        self._backlogged = False
        # The running total of seconds the pacer kept the TUN unread (_held_clock: its pauses, the
        # WAN's rate): the tracker splits each callback latency into that part and the gateway's own
        # (which includes any time the gateway fell behind the TUN for want of CPU).
        self._held_s = 0.0
        self._paused_from = 0.0
        self.loop.add_reader(self.tun, self._on_tun)
        self.loop.add_reader(self.wan, self._on_wan)
        self.loop.add_reader(self.control, self._on_control)

    # -- egress ------------------------------------------------------------------------------
    # The per-packet paths below are the gateway's whole CPU cost: they bind what they use to
    # locals and count into locals added to ``stats`` once per batch (stats are only read
    # between event-loop callbacks, never during one).
    def _send_failed(self, err: OSError, what: str) -> None:
        """A ``what`` ("data" or "repair") datagram did not reach the WAN: count it. An error other
        than a full queue may have left a report on the error queue (an ICMP error this send
        raised, EMSGSIZE): read it, or the socket stays readable and the reader spins."""
        self.stats["send_errors"] += 1
        self.stats[f"{what}_send_errors"] += 1
        self.reasons[f"send: {err.strerror}"] += 1
        if err.errno not in _QUEUE_FULL:
            self._drain_wan_errors()

    def _on_tun(self) -> None:
        now = self.loop.time()
        if self.backlog:
            self._resend_backlog(now)
        tun, peer, seal = self.tun, self.peer, self.sealer.data
        read, sendto = os.read, self.wan.sendto
        on_packet_sent = self.tracker.on_packet_sent
        send_repairs = self._send_repairs
        self.tracker.held = self._held_clock(now)
        pacer = self.pacer
        n_in = n_out = 0
        try:
            for _ in range(256 // TUN_BATCH):
                batch = TUN_BATCH
                if pacer is not None:
                    wait = pacer.wait(now)
                    if wait > 0:  # leave the packets in the TUN's queue: the kernel drops there if it fills
                        self._pause_tun(wait)
                        break
                    batch = min(TUN_BATCH, pacer.room(self.args.wan_mtu, now))  # owe one datagram at most
                packets = []
                for _ in range(batch):
                    try:
                        packets.append(read(tun, 65535))
                    except BlockingIOError:
                        self._backlogged = False
                        break
                if not packets:
                    break
                first = self.seq
                self.seq = first + len(packets)
                n_in += len(packets)
                # The encoder takes the batch at once (one numpy XOR for all the bins it fills);
                # its repairs come out in the order per-packet adds would return them, each
                # after the packet that completed its bin (the bin's last seq).
                repairs = self.encoder.add_many(first, packets, now, [is_pure_ack(p) for p in packets])
                j, nrep = 0, len(repairs)
                for seq, packet in enumerate(packets, first):
                    # Per packet, in this order: data datagram, tracker (only once the datagram
                    # was sent), its repairs, tracker again (_send_repairs).
                    datagram = seal(seq, packet)
                    try:
                        sendto(datagram, peer)
                    except OSError as err:  # link cut, buffer or qdisc full: the datagram did not reach the WAN
                        self._send_failed(err, "data")  # and is never tracked: its bytes stay unsafe
                    else:
                        n_out += 1
                        if pacer is not None:
                            pacer.spend(len(datagram), now)
                        on_packet_sent(seq, packet, now)
                    k = j
                    while k < nrep and repairs[k].seqs[-1] == seq:
                        k += 1
                    send_repairs(repairs[j:k])
                    j = k
                if len(packets) < batch:
                    break
        finally:
            self.stats["tun_in"] += n_in
            self.stats["data_out"] += n_out
        self._arm_timer()

    def _held_clock(self, now: float) -> float:
        """Seconds the pacer has kept the TUN unread so far (at ``now``): its pauses only; a TUN left
        full because the gateway is slow is the gateway's own time, not the WAN's."""
        return self._held_s + (now - self._paused_from if self._tun_paused else 0.0)

    def _pause_tun(self, seconds: float) -> None:
        """Stop reading the TUN for ``seconds`` (the pacer's debt; at least :data:`PAUSE_MIN_S`, so a
        debt of a few bytes cannot spin the loop at one clock reading)."""
        self._backlogged = True
        if not self._tun_paused:
            self._tun_paused = True
            self._paused_from = self.loop.time()
            self.loop.remove_reader(self.tun)
            self.loop.call_later(max(seconds, PAUSE_MIN_S), self._resume_tun)

    def _resume_tun(self) -> None:
        self._held_s += self.loop.time() - self._paused_from
        self._tun_paused = False
        self.loop.add_reader(self.tun, self._on_tun)
        self._on_tun()  # read now: if the TUN is empty this ends the backlog, and the flush timer counts again

    def _spend(self, datagram: bytes) -> None:
        if self.pacer is not None:
            self.pacer.spend(len(datagram), self.loop.time())

    def _send_repairs(self, repairs: list[Repair]) -> None:
        if repairs:
            sendto, peer, seal = self.wan.sendto, self.peer, self.sealer.repair
            sent = []
            for r in repairs:
                datagram = seal(r)
                try:
                    sendto(datagram, peer)
                except OSError as err:  # not sent: not reported to the tracker until a resend succeeds
                    self._send_failed(err, "repair")
                    self._defer(r, datagram, err)
                else:
                    self._spend(datagram)
                    sent.append(r)
            if sent:
                self.stats["repairs_out"] += len(sent)
                now = self.loop.time()
                self.tracker.held = self._held_clock(now)
                self.tracker.on_repairs_sent(sent, now)
        self._push_callbacks()

    def _defer(self, repair: Repair, datagram: bytes, err: OSError) -> None:
        """Keep a repair whose send failed for :meth:`_resend_backlog`: until it is out, the
        packets it covers are not safe. The backlog is bounded (oldest abandoned first)."""
        if err.errno == errno.EMSGSIZE:  # will never fit: resending cannot help
            self._abandon("too large")
            return
        if len(self.backlog) >= REPAIR_BACKLOG:
            self.backlog.popleft()
            self._abandon("backlog full")
        self.backlog.append((repair, datagram))
        self.stats["repairs_deferred"] += 1
        if self._retry_at is None:
            self._retry_at = self.loop.time() + self._retry_delay

    def _abandon(self, why: str) -> None:
        """A repair that will never be sent: the packets it covers never become safe."""
        self.stats["repairs_abandoned"] += 1
        self.reasons[f"repair abandoned: {why}"] += 1

    def _resend_backlog(self, now: float) -> None:
        """Resend the deferred repairs, oldest first, until one fails again (then back off)."""
        backlog, sendto, peer = self.backlog, self.wan.sendto, self.peer
        oldest = self.seq - self._peer_window
        sent = []
        while backlog:
            repair, datagram = backlog[0]
            if repair.seqs[0] < oldest:  # below the peer decoder's window: it would be ignored
                backlog.popleft()
                self._abandon("stale")
                continue
            try:
                sendto(datagram, peer)
            except OSError as err:
                if err.errno == errno.EMSGSIZE:
                    backlog.popleft()
                    self._abandon("too large")
                    continue
                self.stats["repair_retry_failures"] += 1
                if err.errno not in _QUEUE_FULL:
                    self._drain_wan_errors()
                self._retry_delay = min(2 * self._retry_delay, RETRY_MAX_S)
                break
            backlog.popleft()
            self._spend(datagram)
            sent.append(repair)
        if backlog:
            self._retry_at = now + self._retry_delay
        else:
            self._retry_at = None
            self._retry_delay = RETRY_MIN_S
        if sent:
            self.stats["repairs_retried"] += len(sent)
            self.stats["repairs_out"] += len(sent)
            self.tracker.held = self._held_clock(now)
            self.tracker.on_repairs_sent(sent, now)
            self._push_callbacks()

    def _arm_timer(self) -> None:
        deadline = None if self._backlogged else self.encoder.get_timer()
        for t in (self.announcer.get_timer(), self._retry_at):
            if t is not None and (deadline is None or t < deadline):
                deadline = t
        timer = self._timer
        if timer is not None:
            if timer.when() == deadline:
                return  # already armed for it (the oldest open bin did not change)
            timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self.loop.time()
        if self.backlog and self._retry_at is not None and now >= self._retry_at:
            self._resend_backlog(now)
        if not self._backlogged:
            self._send_repairs(self.encoder.handle_timer(now))
        resent = self.announcer.handle_timer(now)
        if resent:
            self.stats["callbacks_resent"] += self._send_callbacks(resent)
        self._arm_timer()

    def _push_callbacks(self) -> None:
        advanced = self.tracker.safe_offsets()
        if advanced:
            now, on_safe = self.loop.time(), self.announcer.on_safe
            for flow, offset in advanced:
                self._send_callbacks(on_safe(flow, offset, now))

    def _send_callbacks(self, callbacks: list[tuple[Hashable, bytes]]) -> int:
        """Send ``(dest, datagram)`` callbacks on the control socket; the number sent. A lost one
        is re-announced (:class:`Announcer`), so a failed send is only counted."""
        n = 0
        for dest, datagram in callbacks:
            try:
                self.control.sendto(datagram, dest)
            except OSError as err:
                self.stats["callback_send_errors"] += 1
                self.reasons[f"callback: {err.strerror}"] += 1
            else:
                n += 1
        self.stats["callbacks_sent"] += n
        return n

    def _on_control(self) -> None:
        while True:
            try:
                data, addr = self.control.recvfrom(512)
            except BlockingIOError:
                break
            try:
                flow, nonce, want = decode_subscription(data, self.key, addr)  # authenticated, from this very sender
            except ValueError as err:
                self.reasons[f"control: {err}"] += 1
                continue
            if self.announcer.subscriber(flow) != addr:
                log.info("callbacks for %s -> %s", flow, addr)
            self.encoder.budgeted = False
            self._send_callbacks(self.announcer.on_subscribe(flow, addr, self.loop.time(), nonce, want))
        self._arm_timer()

    # -- ingress -----------------------------------------------------------------------------
    def _on_wan(self) -> None:
        now = self.loop.time()
        recv, key, peer_site, tun, write = self.wan.recv, self.key, self.peer_site, self.tun, os.write
        replay, decoder = self.replay, self.decoder
        check_and_update, has, on_data, on_repair = replay.check_and_update, decoder.has, decoder.on_data, decoder.on_repair
        n_in = n_out = 0
        try:
            for _ in range(256):
                try:
                    data = recv(65535)
                except BlockingIOError:
                    if not n_in:  # woken with nothing to read: maybe an error report (EPOLLERR)
                        self._drain_wan_errors()
                    return
                except OSError as err:  # an ICMP error (IP_RECVERR), not a datagram: read its report, go on
                    self.stats["wan_recv_errors"] += 1
                    self.reasons[f"wan recv: {err.strerror}"] += 1
                    self._drain_wan_errors()
                    continue
                n_in += 1
                try:
                    _site, seq, payload = decode_raw(data, key, peer_site)
                except TunnelError as err:
                    self.stats["rejected"] += 1
                    self.reasons[f"rejected: {err.reason}"] += 1
                    continue
                if seq is not None:
                    if not check_and_update(seq):
                        # A late original of a packet the decoder rebuilt is no replay.
                        self.stats["late_after_rebuild" if replay.late_after_rebuild(seq) else "replayed"] += 1
                        continue
                    if has(seq):
                        self.stats["late_after_rebuild"] += 1  # already rebuilt and delivered
                        continue
                    try:
                        write(tun, payload)
                        n_out += 1
                    except OSError as err:
                        self._tun_write_failed(err)
                    rebuilt = on_data(seq, payload, now)
                else:
                    rebuilt = on_repair(payload, now)
                for rseq, packet in rebuilt:
                    replay.mark_rebuilt(rseq)
                    try:
                        write(tun, packet)
                        n_out += 1
                    except OSError as err:
                        self._tun_write_failed(err)
        finally:
            self.stats["wan_in"] += n_in
            self.stats["tun_out"] += n_out

    def _drain_wan_errors(self) -> int:
        """Read the WAN socket's error queue (IP_RECVERR: ICMP errors, local EMSGSIZE) until it is
        empty, at most :data:`ERRQUEUE_BATCH` reports: each is counted in ``wan_errors``, its
        reason in ``reasons``. Left there, a report keeps the socket readable (EPOLLERR) and
        ``_on_wan`` would be called over and over with nothing to read. The number read."""
        recvmsg, n = self.wan.recvmsg, 0
        while n < ERRQUEUE_BATCH:
            try:
                _data, ancdata, _flags, _addr = recvmsg(64, 512, MSG_ERRQUEUE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as err:
                self.reasons[f"wan error queue: {err.strerror}"] += 1
                break
            n += 1
            self.reasons[f"wan error: {describe_wan_error(ancdata)}"] += 1
        self.stats["wan_errors"] += n
        return n

    def _tun_write_failed(self, err: OSError) -> None:
        self.stats["tun_write_errors"] += 1
        self.reasons[f"tun: {err.strerror}"] += 1

    # -- statistics --------------------------------------------------------------------------
    def snapshot(self) -> dict:
        import numpy as np  # see the note at the top

        d = self.decoder.stats
        lat = np.array(self.tracker.latencies) * 1000.0 if self.tracker.latencies else None
        held = np.array(self.tracker.held_latencies) * 1000.0 if lat is not None else None
        lost_on_wan = d.rebuilt + d.lost + self.decoder.missing_in_window()
        cpu = time.process_time()  # the gateway's CPU (user + system) over packets handled either way
        handled = self.stats["tun_in"] + self.stats["wan_in"]
        return {
            "site": self.args.site,
            "params": {"r": self.params.r, "c": self.params.c, "interleaves": list(self.params.interleaves),
                       "flush_ms": self.params.flush_ms},
            "packets_in": self.stats["tun_in"],
            "packets_out": self.stats["data_out"],
            "repairs_sent": self.stats["repairs_out"],
            "repairs_deferred": self.stats["repairs_deferred"],
            "repairs_retried": self.stats["repairs_retried"],
            "repair_retry_failures": self.stats["repair_retry_failures"],
            "repairs_abandoned": self.stats["repairs_abandoned"],
            "repair_backlog": len(self.backlog),
            "wan_datagrams_in": self.stats["wan_in"],
            "received": d.received,
            "lost_on_wan": lost_on_wan,
            "rebuilt": d.rebuilt,
            "lost_for_good": lost_on_wan - d.rebuilt,
            # sequence numbers the decoder jumped over (a gap of a window or more: a restarted peer, or
            # an outage longer than the window): never received, and not in lost_on_wan
            "jumped_over": d.skipped,
            "rebuilt_fraction": round(d.rebuilt / lost_on_wan, 4) if lost_on_wan else None,
            "rejected": self.stats["rejected"],
            "replayed": self.stats["replayed"],
            "late_after_rebuild": self.stats["late_after_rebuild"],
            "send_errors": self.stats["send_errors"],
            "data_send_errors": self.stats["data_send_errors"],
            "repair_send_errors": self.stats["repair_send_errors"],
            "wan_errors": self.stats["wan_errors"],
            "wan_recv_errors": self.stats["wan_recv_errors"],
            "callbacks_sent": self.stats["callbacks_sent"],
            "callbacks_resent": self.stats["callbacks_resent"],
            "callback_send_errors": self.stats["callback_send_errors"],
            # each callback's latency (TUN read to its last covering repair sent), the part of it
            # the TUN was held back by the pacer (the WAN's rate), and the rest (the gateway's own)
            "callback_latency_ms": None if lat is None else {
                **{f"{name}p{q}": round(float(np.percentile(v, q)), 3)
                   for name, v in (("", lat), ("held_", held), ("own_", lat - held)) for q in (50, 99)},
                "n": int(lat.size)},
            "paced": None if self.pacer is None else {
                "rate_bps": self.args.wan_rate_bps, "pauses": self.pacer.pauses,
                "paused_s": round(self.pacer.paused_s, 3)},
            "edge_drops": _tun_tx_dropped(self.args.tun),
            "tun_offload": None,  # the C engine's TSO reads (this engine reads packet by packet)
            "cpu_s": round(cpu, 3),
            "cpu_sys_s": round(os.times().system, 3),  # the kernel's share: TUN, sockets, the stack
            "cpu_us_per_packet": round(cpu * 1e6 / handled, 2) if handled else None,
            "reasons": dict(self.reasons),
            "t": time.time(),
        }

    def write_stats(self) -> None:
        path = Path(self.args.stats)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.snapshot(), indent=1))
        os.replace(tmp, path)



NATIVE_BUILD = Path(__file__).resolve().parent / "native" / "build"
C_BINARIES = ("smfs-gateway-static", "smfs-gateway")  # the static one first: it runs in any Debian guest
C_BINARY_ENV = "SMFS_GATEWAY_BINARY"  # a path overriding the choice (e.g. the ASan build, for tests)
FIRST_SEQ_ENV = "SMFS_GATEWAY_FIRST_SEQ"  # tests only: the first tunnel seq (differential tests pin it)


def c_binary() -> Path:
    """The C gateway program (``$SMFS_GATEWAY_BINARY``, else the first of :data:`C_BINARIES` built in
    smfs/native/build); ValueError with the command that builds it when there is none."""
    override = os.environ.get(C_BINARY_ENV)
    candidates = [Path(override)] if override else [NATIVE_BUILD / name for name in C_BINARIES]
    for path in candidates:
        if os.access(path, os.X_OK):
            return path
    raise ValueError(f"--engine c: no C gateway at {' or '.join(map(str, candidates))}; "
                     "build it with `make -f smfs/native/gateway.mk`")


def exec_c_gateway(args: argparse.Namespace, binary: Path, tun: int) -> None:
    """Replace this process by the C gateway (same pid: signals and the stats file stay the
    contract), handing it the configured TUN's fd; the key stays in its file (never in argv).
    Addresses are resolved here: the C program takes dotted IPv4 only."""
    def ipv4(hostport: str) -> str:
        host, port = parse_hostport(hostport)
        return f"{socket.gethostbyname(host)}:{port}"

    os.set_inheritable(tun, True)
    argv = [str(binary), "--tun-fd", str(tun), "--tun", args.tun, "--site", args.site,
            "--local", ipv4(args.local), "--peer", ipv4(args.peer), "--control", ipv4(args.control),
            "--key-file", str(Path(args.key_file).resolve()), "--stats", args.stats, "--ready", args.ready,
            "--r", str(args.r), "--wan-mtu", str(args.wan_mtu), "--wan-rate-bps", str(args.wan_rate_bps),
            # comma-separated; c = 0 is the empty string
            "--interleaves", ",".join(map(str, args.interleaves)), "--flush-ms", repr(float(args.flush_ms))]
    if args.tun_offload == "tso":
        argv.append("--vnet-hdr")
    if defects.active("network-sync-callback-before-repairs"):
        argv.append("--safe-at-send")
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.execv(binary, argv)


def _tun_tx_dropped(name: str) -> int | None:
    """Packets the kernel dropped at the TUN (its queue full while the gateway was paced or slow): the
    site edge's congestion drops, which TCP retransmits and no callback ever covered."""
    try:
        return int(Path(f"/sys/class/net/{name}/statistics/tx_dropped").read_text())
    except (OSError, ValueError):
        return None


async def _main(args: argparse.Namespace, key: bytes, tun: int) -> None:
    import asyncio  # see the note at the top

    gw = Gateway(args, key, tun)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, gw.write_stats)
    Path(args.ready).write_text("ready\n")
    log.info("gateway %s up: tun %s, %s <-> %s, r=%d interleaves=%s", args.site, args.tun, args.local, args.peer,
             gw.params.r, gw.params.interleaves)
    while not stop.is_set():
        gw.write_stats()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
    gw.write_stats()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="smfs.gateway", description=__doc__)
    p.add_argument("--site", choices=sorted(SITE_IDS), required=True)
    p.add_argument("--tun", default="smfs0")
    p.add_argument("--address", required=True, help="this site's storage address (source of routed traffic)")
    p.add_argument("--route", action="append", default=[], help="peer storage subnet routed into the TUN")
    p.add_argument("--local", required=True, help="HOST:PORT of this gateway on the WAN")
    p.add_argument("--peer", required=True, help="HOST:PORT of the peer gateway")
    p.add_argument("--control", default="127.0.0.1:7790", help="HOST:PORT for callback subscriptions")
    p.add_argument("--key-file", required=True, help="file with the per-testbed tunnel key (hex)")
    p.add_argument("--stats", required=True, help="JSON statistics file")
    p.add_argument("--ready", required=True, help="file written once the gateway runs")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--wan-mtu", type=int, default=WAN_MTU,
                   help="MTU of the path between the gateways (jumbo frames: 9000); sets the TUN's MTU")
    p.add_argument("--wan-rate-bps", type=int, default=0,
                   help="the WAN's rate in bit/s: egress is paced just below it (0: not paced)")
    p.add_argument("--edge-queue", type=int, default=0,
                   help="packets that may wait in the TUN for the gateway (its txqueuelen; 0: the kernel's "
                        "default): the site edge's buffer when paced, e.g. one bandwidth-delay product")
    p.add_argument("--interleaves", type=int, nargs="*", default=list(FecParams().interleaves),
                   help="the interleave of each FEC layer, c = their count (default 1 11 19); the bare "
                        "flag is c = 0: no repairs, a lost packet stays lost, safe once sent")
    p.add_argument("--flush-ms", type=float, default=FecParams().flush_ms)
    p.add_argument("--tun-offload", choices=("tso", "none"), default="tso",
                   help="the C engine: take TCP super-packets from the TUN and cut them itself (tso), or "
                        "let the kernel cut them (none); the Python engine always reads packet by packet")
    p.add_argument("--engine", choices=("python", "c"), default="python",
                   help="the data path: this module (python) or smfs/native's smfs-gateway (c), "
                        "built by `make -f smfs/native/gateway.mk`")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        defects.announce(log)
        binary = c_binary() if args.engine == "c" else None
        key = bytes.fromhex(Path(args.key_file).read_text().strip())
        # pyroute2's synchronous API runs its own event loop: configure before ours starts.
        tso = binary is not None and args.tun_offload == "tso"
        tun = open_tun(args.tun, vnet_hdr=tso)
        if not 576 <= args.wan_mtu <= 65535:
            raise ValueError(f"--wan-mtu: {args.wan_mtu} is outside 576-65535; use the site network's MTU, e.g. 1500 or 9000")
        if args.wan_rate_bps < 0:
            raise ValueError(f"--wan-rate-bps: {args.wan_rate_bps} is negative; give the WAN's rate in bit/s, or 0 not to pace")
        if not 0 <= args.edge_queue <= 100_000:
            raise ValueError(f"--edge-queue: {args.edge_queue} is outside 0-100000 packets; use about one "
                             "bandwidth-delay product, or 0 for the kernel's default")
        configure_tun(args.tun, args.address, args.route, tun_mtu(args.r, args.wan_mtu), args.edge_queue, tso)
        if binary is not None:
            FecParams(r=args.r, c=len(args.interleaves), interleaves=tuple(args.interleaves), flush_ms=args.flush_ms)
            Sealer(key, SITE_IDS[args.site])  # the checks the Python engine makes at start
            exec_c_gateway(args, binary, tun)
        import asyncio  # see the note at the top

        asyncio.run(_main(args, key, tun))
    except (OSError, ValueError) as err:
        log.error("gateway failed: %s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
