"""Authenticated storage traffic and bounded servers, over loopback in one event loop (issue 13,
"Authenticated traffic"): the mirror stream's mutual handshake and tagged acks, the primary's
authenticated callbacks, the servers' connection caps, idle timeouts and bounded buffers and queue,
key files 0600 from their creation, and the mirror never on a wildcard address."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from smfs import auth
from smfs.callbacks import decode_subscribe, encode_callback
from smfs.client import AppendFailed, Client, ConnectionLost
from smfs.logstore import LogStore
from smfs.mirror import MirrorServer
from smfs.modes import MODES
from smfs.primary import PrimaryServer
from smfs.wire import FrameDecoder, FrameType, encode, frame_size

KEY = bytes(range(100, 132))
OTHER_KEY = bytes(range(200, 232))
ROOT = Path(__file__).resolve().parents[2]
FLOW = auth.flow_id("198.18.11.1", 40000, "198.18.12.1", 7700)


# -- the handshake, as messages ------------------------------------------------------------------


def test_the_handshake_binds_the_key_both_nonces_and_the_connection() -> None:
    nm, np_ = auth.new_nonce(), auth.new_nonce()
    assert auth.read_hello(auth.hello(nm)) == nm
    ans = auth.answer(KEY, nm, np_, FLOW)
    assert len(ans) == auth.ANSWER_LEN and auth.check_answer(KEY, nm, ans, FLOW) == np_
    auth.check_confirm(KEY, nm, np_, FLOW, auth.confirm(KEY, nm, np_, FLOW))
    other_flow = auth.flow_id("198.18.11.1", 40001, "198.18.12.1", 7700)
    for bad in (auth.answer(OTHER_KEY, nm, np_, FLOW),  # another key
                auth.answer(KEY, auth.new_nonce(), np_, FLOW),  # replayed: made for another hello
                auth.answer(KEY, nm, np_, other_flow),  # relayed from another connection
                ans[:-1] + bytes([ans[-1] ^ 1]), b"GET / HTTP/1.0\r\n\r\n".ljust(auth.ANSWER_LEN)):
        with pytest.raises(auth.AuthError):
            auth.check_answer(KEY, nm, bad, FLOW)
    # The mirror's proof is its own (not the primary's echoed back), and over the primary's fresh nonce.
    for bad in (ans[-32:], auth.confirm(KEY, nm, auth.new_nonce(), FLOW), auth.confirm(OTHER_KEY, nm, np_, FLOW)):
        with pytest.raises(auth.AuthError):
            auth.check_confirm(KEY, nm, np_, FLOW, bad)
    session = auth.session_key(KEY, nm, np_, FLOW)
    auth.check_mack(session, 12345, auth.mack_tag(session, 12345))
    for offset, tag in ((12346, auth.mack_tag(session, 12345)), (12345, b""),
                        (12345, auth.mack_tag(auth.session_key(KEY, nm, auth.new_nonce(), FLOW), 12345))):
        with pytest.raises(auth.AuthError):
            auth.check_mack(session, offset, tag)


# -- helpers -------------------------------------------------------------------------------------


async def _mirror(tmp: Path, **kw: Any) -> tuple[MirrorServer, LogStore, int]:
    store = LogStore.open(tmp / "m", sync=False)
    mirror = MirrorServer(0, store, [("127.0.0.1", 0)], key=KEY, **kw)
    await mirror.start()
    return mirror, store, mirror.addresses[0][1]


def _primary(tmp: Path, port: int, mode: str = "remote-sync", key: bytes = KEY, **kw: Any) -> PrimaryServer:
    store = LogStore.open(tmp / "p", sync=False)
    return PrimaryServer(0, store, MODES[mode], str(tmp / "p.sock"), ("127.0.0.1", port), key=key, **kw)


async def _fake_mirror(key: bytes, behave: Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes],
                                                     Awaitable[None]]) -> tuple[asyncio.AbstractServer, int]:
    """A mirror server that does the handshake right under ``key``, then ``behave``s."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nm = auth.new_nonce()
        writer.write(auth.hello(nm))
        ans = await reader.readexactly(auth.ANSWER_LEN)
        phost, pport = writer.get_extra_info("peername")[:2]
        lhost, lport = writer.get_extra_info("sockname")[:2]
        flow = auth.flow_id(phost, pport, lhost, lport)
        np_ = auth.check_answer(key, nm, ans, flow)
        writer.write(auth.confirm(key, nm, np_, flow))
        await behave(reader, writer, auth.session_key(key, nm, np_, flow))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _eof(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    return await asyncio.wait_for(reader.read(), timeout)


# -- the mirror refuses what is not authenticated ------------------------------------------------


def test_an_unauthenticated_stream_stores_nothing(tmp_path: Path) -> None:
    """Before: any process that reached the mirror's port could plant records in its logs. Now a
    connection without the key's proof is closed and counted, and nothing it sent is stored."""
    async def go() -> None:
        mirror, store, port = await _mirror(tmp_path)
        frames = b"".join(encode(FrameType.MIRROR, 7, seq, b"planted") for seq in range(3))
        for first in (b"", bytes(auth.ANSWER_LEN), auth.answer(OTHER_KEY, auth.new_nonce(), auth.new_nonce(), FLOW)):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(first + frames)
            got = await _eof(r)
            assert got[:4] == b"SMH1" and got[auth.HELLO_LEN:] == auth.REFUSED, got  # hello, refusal, never an ack
            w.close()
        # A valid answer for another connection (recorded, relayed) fails too.
        r, w = await asyncio.open_connection("127.0.0.1", port)
        nm = auth.read_hello(await r.readexactly(auth.HELLO_LEN))
        w.write(auth.answer(KEY, nm, auth.new_nonce(), FLOW))
        assert await _eof(r) == auth.REFUSED
        w.close()
        assert store.logs() == [] and mirror.stats["rejected"] == 4 and mirror.stats["authenticated"] == 0
        await mirror.close()

    asyncio.run(go())


def test_a_primary_with_another_key_is_refused_and_says_so(tmp_path: Path) -> None:
    async def go() -> None:
        mirror, store, port = await _mirror(tmp_path)
        primary = _primary(tmp_path, port, key=OTHER_KEY)
        with pytest.raises(ConnectionError, match="not the testbed's key"):
            await asyncio.wait_for(primary.start(), 5)  # at once: no retry helps
        assert store.logs() == [] and mirror.stats["rejected"] == 1
        await mirror.close()

    asyncio.run(go())


def test_a_mirror_with_another_key_is_refused_by_the_primary(tmp_path: Path) -> None:
    """The handshake is mutual: a mirror that cannot prove the key (it answers with a proof under its
    own key, or echoes the primary's) gets no frame, and the primary stops at once."""
    async def go(echo: bool) -> None:
        received: list[bytes] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nm = auth.new_nonce()
            writer.write(auth.hello(nm))
            ans = await reader.readexactly(auth.ANSWER_LEN)
            np_ = ans[4:4 + auth.NONCE_LEN]
            writer.write(ans[-32:] if echo else auth.confirm(OTHER_KEY, nm, np_, FLOW))
            received.append(await reader.read())

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        primary = _primary(tmp_path / str(echo), server.sockets[0].getsockname()[1])
        with pytest.raises(ConnectionError, match="bad proof from the mirror"):
            await asyncio.wait_for(primary.start(), 5)
        await asyncio.sleep(0.1)
        assert received == [b""]  # not a frame
        server.close()

    for echo in (False, True):
        asyncio.run(go(echo))


def test_a_forged_mirror_ack_acks_nothing(tmp_path: Path) -> None:
    """remote-sync: a MACK whose tag is not the session's (injected into the stream) must not
    complete an append; the stream is failed instead. With the right tag the append is acked."""
    async def go(tag: Callable[[bytes, int], bytes]) -> Exception | None:
        async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: bytes) -> None:
            dec = FrameDecoder(allowed=frozenset({FrameType.MIRROR}))
            while data := await reader.read(65536):
                if dec.feed(data):
                    offset = auth.ANSWER_LEN + dec.offset
                    writer.write(encode(FrameType.MACK, 0, offset, tag(session, offset)))

        server, port = await _fake_mirror(KEY, behave)
        primary = _primary(tmp_path / tag.__name__, port)
        await primary.start()
        client = await Client.connect(str(tmp_path / tag.__name__ / "p.sock"))
        try:
            await asyncio.wait_for(client.append(1, 0, b"x" * 1000), 5)
            err = None
        except (AppendFailed, ConnectionLost) as e:
            err = e
        await client.close()
        await primary.close()
        server.close()
        return err

    def good(session: bytes, offset: int) -> bytes:
        return auth.mack_tag(session, offset)

    def untagged(_session: bytes, _offset: int) -> bytes:
        return b""

    def other_session(_session: bytes, offset: int) -> bytes:
        return auth.mack_tag(auth.session_key(KEY, bytes(16), bytes(16), FLOW), offset)

    assert asyncio.run(go(good)) is None
    for forged in (untagged, other_session):
        err = asyncio.run(go(forged))
        assert isinstance(err, AppendFailed) and "bad mirror ack" in str(err), err


def test_stream_offsets_count_the_handshake(tmp_path: Path) -> None:
    """The ack trace's END (and the callbacks' offsets) are the TCP stream's: the handshake's
    ANSWER_LEN bytes come first, as the wire check counts them."""
    async def go() -> None:
        mirror, _store, port = await _mirror(tmp_path)
        primary = _primary(tmp_path, port, ack_trace=str(tmp_path / "acks.txt"))
        await primary.start()
        client = await Client.connect(str(tmp_path / "p.sock"))
        await client.append(1, 0, b"y" * 100)
        await client.append(1, 1, b"y" * 50)
        await client.close()
        await primary.close()
        await mirror.close()

    asyncio.run(go())
    lines = (tmp_path / "acks.txt").read_text().splitlines()
    ends = [int(line.split()[2]) for line in lines[1:]]
    assert ends == [auth.ANSWER_LEN + frame_size(100), auth.ANSWER_LEN + frame_size(100) + frame_size(50)]


# -- network-sync: forged callbacks ack nothing --------------------------------------------------


def test_forged_and_replayed_callbacks_ack_nothing(tmp_path: Path) -> None:
    """Before: any 24-byte datagram naming the flow acked network-sync appends. Now a callback
    counts only with a good MAC and this subscription's nonce."""
    async def go() -> None:
        gw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        gw.bind(("127.0.0.1", 0))
        gw.setblocking(False)
        loop = asyncio.get_running_loop()
        mirror, _store, port = await _mirror(tmp_path)
        primary = _primary(tmp_path, port, mode="network-sync", gateway_control=gw.getsockname())
        await primary.start()
        data, addr = await asyncio.wait_for(loop.sock_recvfrom(gw, 256), 5)
        flow, nonce = decode_subscribe(data, KEY, addr)
        client = await Client.connect(str(tmp_path / "p.sock"))
        append = asyncio.ensure_future(client.append(1, 0, b"x" * 5000))
        good = encode_callback(flow, 1 << 40, nonce, KEY)
        for forged in (encode_callback(flow, 1 << 40, nonce, OTHER_KEY),  # another key
                       encode_callback(flow, 1 << 40, b"earlier!", KEY),  # an earlier subscription's, replayed
                       good[:16] + (1 << 41).to_bytes(8, "big") + good[24:],  # altered offset
                       good[:32]):  # no MAC at all (the old format's size, nearly)
            gw.sendto(forged, addr)
        await asyncio.sleep(0.5)
        assert not append.done() and primary.stats["callbacks_rejected"] == 4, primary.stats
        gw.sendto(good, addr)
        await asyncio.wait_for(append, 5)
        assert primary.stats["callbacks"] >= 1
        await client.close()
        await primary.close()
        await mirror.close()
        gw.close()

    asyncio.run(go())


# -- bounded servers -----------------------------------------------------------------------------


def test_the_mirror_closes_silent_connections(tmp_path: Path) -> None:
    """A connection that sends nothing (before or after its handshake) is closed after the idle
    timeout, and a primary that went silent is counted as idle."""
    async def go() -> None:
        mirror, _store, port = await _mirror(tmp_path, idle_timeout=0.3)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert len(await _eof(r, 3)) == auth.HELLO_LEN  # hello, then closed: no handshake in time
        w.close()
        primary = _primary(tmp_path, port)
        await primary.start()
        await asyncio.sleep(1.0)
        assert mirror.stats["idle"] == 1 and mirror.stats["rejected"] == 1, mirror.stats
        assert primary.tracker.failed  # the primary learns it: its appends now fail, none hangs
        await primary.close()
        await mirror.close()

    asyncio.run(go())


def test_a_flood_of_handshakes_cannot_lock_the_primary_out(tmp_path: Path) -> None:
    """Connections in their handshake are capped; the oldest is dropped for a new one, so silent
    connections cannot use up the server; authenticated ones are capped too (a newer replaces the oldest)."""
    async def go() -> None:
        mirror, store, port = await _mirror(tmp_path, max_pending=4, max_peers=1)
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
        await asyncio.sleep(0.2)
        assert len(mirror._pending) <= 4  # noqa: SLF001
        primary = _primary(tmp_path, port)
        await primary.start()
        client = await Client.connect(str(tmp_path / "p.sock"))
        await client.append(1, 0, b"ok")
        await client.close()
        assert store.logs() == [1] and mirror.stats["evicted"] >= 16, mirror.stats
        second = PrimaryServer(1, LogStore.open(tmp_path / "p2", sync=False), MODES["remote-sync"],
                               str(tmp_path / "p2.sock"), ("127.0.0.1", port), key=KEY)
        await second.start()
        await asyncio.sleep(0.2)
        assert mirror.stats["replaced"] == 1 and primary.tracker.failed and not second.tracker.failed
        for _r, w in silent:
            w.close()
        await second.close()
        await primary.close()
        await mirror.close()

    asyncio.run(go())


def test_the_primary_queue_is_bounded(tmp_path: Path) -> None:
    """A mirror that stops reading: the primary's queue holds at most ``queue_bytes`` (clients then
    wait, unread) instead of every append the clients pipeline."""
    async def stall(reader: asyncio.StreamReader, _w: asyncio.StreamWriter, _s: bytes) -> None:
        await asyncio.sleep(3600)

    async def go() -> None:
        server, port = await _fake_mirror(KEY, stall)
        primary = _primary(tmp_path, port, queue_bytes=256 << 10)
        await primary.start()
        _r, w = await asyncio.open_unix_connection(str(tmp_path / "p.sock"))
        payload = b"z" * (64 << 10)
        n = 400  # 25 MiB pipelined: more than every socket buffer on the way
        writer_task = asyncio.ensure_future(_pipeline(w, n, payload))
        peak = 0
        for _ in range(40):
            await asyncio.sleep(0.05)
            queued = sum(len(p) for _, p in list(primary._queue._queue))  # type: ignore[attr-defined]  # noqa: SLF001
            peak = max(peak, queued)
        accepted = primary.tracker.expected_seq(1)
        assert peak <= (256 << 10) + len(payload), peak
        assert accepted < n, accepted  # the rest waits in the client's socket: backpressure
        writer_task.cancel()
        w.close()
        await primary.close()
        server.close()

    asyncio.run(go())


async def _pipeline(w: asyncio.StreamWriter, n: int, payload: bytes) -> None:
    for seq in range(n):
        w.write(encode(FrameType.APPEND, 1, seq, payload))
        await w.drain()


def test_the_primary_caps_its_clients_and_drops_idle_ones(tmp_path: Path) -> None:
    async def go() -> None:
        mirror, _store, port = await _mirror(tmp_path)
        primary = _primary(tmp_path, port, max_clients=3, idle_timeout=0.3)
        await primary.start()
        conns = [await asyncio.open_unix_connection(str(tmp_path / "p.sock")) for _ in range(4)]
        assert await _eof(conns[3][0], 3) == b"" and primary.stats["clients_refused"] == 1
        # A client that appends and then waits for its answers is served; idle ones are dropped.
        client = await Client.connect(str(tmp_path / "p.sock"))  # room again: the first three go idle first
        await asyncio.sleep(0.5)
        assert primary.stats["clients_idle"] >= 3
        with pytest.raises(ConnectionLost):
            await client.append(1, 0, b"late")  # it idled too
        client = await Client.connect(str(tmp_path / "p.sock"))
        for seq in range(3):
            await client.append(1, seq, b"a")
            await asyncio.sleep(0.2)
        await client.close()
        await primary.close()
        await mirror.close()

    asyncio.run(go())


def test_a_client_waiting_for_its_ack_is_not_idle(tmp_path: Path) -> None:
    async def stall(reader: asyncio.StreamReader, _w: asyncio.StreamWriter, _s: bytes) -> None:
        await reader.read(1 << 20)  # takes the frame, never acks (remote-sync waits)
        await asyncio.sleep(3600)

    async def go() -> None:
        server, port = await _fake_mirror(KEY, stall)
        primary = _primary(tmp_path, port, idle_timeout=0.2)
        await primary.start()
        client = await Client.connect(str(tmp_path / "p.sock"))
        append = asyncio.ensure_future(client.append(1, 0, b"waiting"))
        await asyncio.sleep(1.0)
        assert not append.done() and primary.stats["clients_idle"] == 0
        append.cancel()
        await client.close()
        await primary.close()
        server.close()

    asyncio.run(go())


# -- addresses and key files ---------------------------------------------------------------------


def test_the_mirror_never_listens_on_a_wildcard(tmp_path: Path) -> None:
    from smfs.site import listen_addresses

    store = LogStore.open(tmp_path / "m", sync=False)
    for host in ("0.0.0.0", "", "::"):
        with pytest.raises(ValueError, match="wildcard"):
            MirrorServer(0, store, [(host, 7700)], key=KEY)
    assert listen_addresses(["198.18.12.1:7700", "@lo:7701"]) == [("198.18.12.1", 7700), ("127.0.0.1", 7701)]
    key = tmp_path / "key"
    auth.create_key_file(key)
    for listen in (["--listen", "0.0.0.0:7700"], [], ["--listen", "@no-such-nic0:7700"]):
        res = subprocess.run([sys.executable, "-m", "smfs.site", "mirror", "--data", str(tmp_path / "d"), "--run",
                              str(tmp_path / "r"), "--key-file", str(key), *listen],
                             capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert res.returncode == 2 and "--listen" in res.stderr and "Traceback" not in res.stderr, res.stderr
    res = subprocess.run([sys.executable, "-m", "smfs.site", "mirror", "--data", str(tmp_path / "d"), "--run",
                          str(tmp_path / "r"), "--listen", "127.0.0.1:7700"],
                         capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert res.returncode == 2 and "--key-file" in res.stderr, res.stderr  # the key is required
    assert not (tmp_path / "d").exists()


def test_the_vm_drill_mirror_takes_the_key_and_no_wildcard(tmp_path: Path) -> None:
    """The VM drill's mirror command line (its guest runs this smfs): the storage address and the
    NIC's for the bare modes, never 0.0.0.0, and the key file the gateways use."""
    from smfs.modes import parse_modes
    from smfs.site import listen_addresses
    from testbed.drill.vm import KEY_FILE, STORAGE, DrillConfig, mirror_argv

    argv = mirror_argv(DrillConfig(spec_path=tmp_path / "s.toml", modes=tuple(parse_modes("remote-sync")), out=tmp_path))
    listen = [argv[i + 1] for i, a in enumerate(argv) if a == "--listen"]
    assert listen == [f"{STORAGE['mirror'][0]}:7700", "@eth0:7700"] and "0.0.0.0" not in " ".join(argv)
    assert argv[argv.index("--key-file") + 1] == KEY_FILE
    assert listen_addresses([listen[0], "@lo:7700"])[1] == ("127.0.0.1", 7700)  # @IFACE: its address
    assert "--idle-timeout" not in argv  # the default (120 s) outlasts the usual faults
    from testbed.drill.faults import Timed

    long = DrillConfig(spec_path=tmp_path / "s.toml", modes=tuple(parse_modes("remote-sync")), out=tmp_path,
                       during=(Timed(1.0, 300.0, None),))  # type: ignore[arg-type]
    argv = mirror_argv(long)  # a 5-minute partition is silence, not an idle primary
    assert argv[argv.index("--idle-timeout") + 1] == "360"


def _spy_creations(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """Every file os.open creates: (path, flags, its mode right after the open)."""
    seen: list[tuple[str, int, int]] = []
    real = os.open

    def spy(path: Any, flags: int, mode: int = 0o777, *a: Any, **kw: Any) -> int:
        fd = real(path, flags, mode, *a, **kw)
        if flags & os.O_CREAT:
            seen.append((str(path), flags, stat.S_IMODE(os.fstat(fd).st_mode)))
        return fd

    monkeypatch.setattr(os, "open", spy)
    return seen


def test_key_files_are_0600_from_their_creation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the gateways' key was written with the default mode, then chmod-ed. Now it is created
    exclusively with mode 0600 (whatever the umask), then renamed into place."""
    from testbed.drill.gateways import start_gateways

    class Stop(Exception):
        pass

    class Tb:
        def spawn(self, *_a: Any, **_k: Any) -> Any:
            raise Stop

    seen = _spy_creations(monkeypatch)
    old = os.umask(0)
    try:
        with pytest.raises(Stop):
            start_gateways(Tb(), tmp_path, tmp_path)  # type: ignore[arg-type]
        key = tmp_path / "work" / "tunnel.key"
        (tmp_path / "old.key").write_text("stale")
        os.chmod(tmp_path / "old.key", 0o644)
        auth.create_key_file(tmp_path / "old.key")  # an existing file is replaced, not written into
    finally:
        os.umask(old)
    for path in (key, tmp_path / "old.key"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(auth.read_key_file(path)) == 32
    assert len(seen) == 2, seen
    for _path, flags, mode in seen:
        assert flags & os.O_EXCL and mode == 0o600, (flags, oct(mode))


def test_a_guest_file_with_a_mode_has_it_before_its_first_byte(tmp_path: Path) -> None:
    """Guest.write_file(..., mode=0o600) (the drill's key in each guest): the agent is played on this
    machine as qemu-ga behaves (a new file 0644, an existing one keeps its mode); every write must
    land in a file that already has mode 0600, and the file ends in place with it."""
    import base64

    from testbed.vm.guest import ExecResult, Guest

    class FakeGuest(Guest):
        def __init__(self) -> None:
            self.name = "fake"
            self.handles: dict[int, int] = {}
            self.modes_at_write: list[int] = []

        def agent(self, command: str, arguments: Any = None, timeout: int = 10) -> Any:
            if command == "guest-file-open":
                path = arguments["path"]
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_TRUNC, 0)
                    os.fchmod(fd, 0o644)  # qemu-ga's mode for the files it creates
                except FileExistsError:
                    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
                self.handles[fd] = fd
                return fd
            if command == "guest-file-write":
                fd = arguments["handle"]
                self.modes_at_write.append(stat.S_IMODE(os.fstat(fd).st_mode))
                os.write(fd, base64.b64decode(arguments["buf-b64"]))
                return {}
            if command == "guest-file-close":
                os.close(self.handles.pop(arguments["handle"]))
                return {}
            raise AssertionError(command)

        def exec(self, argv: Any, timeout: float = 60, input: bytes | None = None, env: Any = None,
                 check: bool = False) -> ExecResult:
            res = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
            assert not check or res.returncode == 0, res.stderr
            return ExecResult(res.returncode, res.stdout, res.stderr, 0.0)

    g = FakeGuest()
    target = tmp_path / "tunnel.key"
    target.write_text("an old, readable key")
    os.chmod(target, 0o644)
    g.write_file(str(target), b"ab" * 32, mode=0o600)
    assert g.modes_at_write == [0o600], [oct(m) for m in g.modes_at_write]
    assert target.read_bytes() == b"ab" * 32 and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tunnel.key"]  # no temporary file left
