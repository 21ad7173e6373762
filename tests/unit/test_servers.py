"""Primary and mirror servers over loopback, in one event loop: modes end to end, and hostile
bytes on any socket close only that connection, never the server or a log."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from smfs import auth
from smfs.client import AppendFailed, Client, ConnectionLost
from smfs.logstore import LogStore
from smfs.mirror import MirrorServer
from smfs.modes import MODES
from smfs.primary import PrimaryServer
from smfs.wire import FrameType, encode

KEY = bytes(range(100, 132))  # the testbed's key in these tests


async def _mirror(tmp: Path, **kw: object) -> tuple[MirrorServer, LogStore, int]:
    mstore = LogStore.open(tmp / "m", sync=False)
    mirror = MirrorServer(0, mstore, [("127.0.0.1", 0)], key=KEY, **kw)  # type: ignore[arg-type]
    await mirror.start()
    return mirror, mstore, mirror.addresses[0][1]


async def _pair(tmp: Path, mode: str, **kw: object) -> tuple[PrimaryServer, MirrorServer, LogStore, LogStore]:
    mirror, mstore, port = await _mirror(tmp)
    pstore = LogStore.open(tmp / "p", sync=False)
    primary = PrimaryServer(0, pstore, MODES[mode], str(tmp / "p.sock"), ("127.0.0.1", port), key=KEY,
                            **kw)  # type: ignore[arg-type]
    await primary.start()
    return primary, mirror, pstore, mstore


@pytest.mark.parametrize("mode", ["local-sync", "remote-sync"])
def test_appends_reach_both_stores(tmp_path: Path, mode: str) -> None:
    async def go() -> None:
        primary, mirror, pstore, mstore = await _pair(tmp_path, mode)
        client = await Client.connect(str(tmp_path / "p.sock"))
        for seq in range(20):
            await client.append(3, seq, bytes([seq]) * (1000 + seq))
        with pytest.raises(AppendFailed, match="not the next one"):
            await client.append(3, 7, b"again")
        await client.close()
        if mode == "remote-sync":
            # Acked after the mirror's ack: already on the mirror.
            assert mstore.next_seq(3) == 20
        for _ in range(100):
            if mstore.next_seq(3) == 20:
                break
            await asyncio.sleep(0.02)
        assert [r.payload for r in mstore.read(3)] == [r.payload for r in pstore.read(3)]
        await primary.close()
        await mirror.close()

    asyncio.run(go())


def test_garbage_closes_only_that_connection(tmp_path: Path) -> None:
    async def go() -> None:
        primary, mirror, pstore, mstore = await _pair(tmp_path, "remote-sync")
        port = mirror.addresses[0][1]
        # Garbage and a truncated frame to the mirror's TCP port.
        for junk in (b"GET / HTTP/1.0\r\n\r\n" * 3, encode(FrameType.MIRROR, 9, 0, b"x" * 100)[:-5]):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(junk)
            w.write_eof()
            got = await asyncio.wait_for(r.read(), 5)
            assert got[:4] == b"SMH1" and got[auth.HELLO_LEN:] == auth.REFUSED  # its hello, a refusal, nothing more
            w.close()
        # A frame type a client may not send, then a bad checksum, to the primary's socket.
        for junk in (encode(FrameType.MACK, 0, 1), encode(FrameType.APPEND, 1, 0, b"abc")[:-1] + b"X"):
            r, w = await asyncio.open_unix_connection(str(tmp_path / "p.sock"))
            w.write(junk)
            assert await asyncio.wait_for(r.read(), 5) == b""
            w.close()
        # The servers still work, and nothing of the garbage reached a log.
        client = await Client.connect(str(tmp_path / "p.sock"))
        await client.append(1, 0, b"good")
        await client.close()
        assert mstore.logs() == [1] and [r.payload for r in mstore.read(1)] == [b"good"]
        await primary.close()
        await mirror.close()

    asyncio.run(go())


def test_mirror_loss_fails_pending_appends(tmp_path: Path) -> None:
    async def go() -> None:
        primary, mirror, *_ = await _pair(tmp_path, "remote-sync")
        client = await Client.connect(str(tmp_path / "p.sock"))
        await client.append(1, 0, b"one")
        await mirror.close()
        primary._mwriter.transport.abort()  # noqa: SLF001 - the mirror connection drops
        with pytest.raises((AppendFailed, ConnectionLost)):
            await asyncio.wait_for(client.append(1, 1, b"two"), 5)
        await client.close()
        await primary.close()

    asyncio.run(go())


def test_testers_write_one_folded_ledger_to_a_shared_stream(tmp_path: Path) -> None:
    from smfs.site import socket_path
    from workloads.ledger import load_ledgers
    from workloads.tester import TesterConfig, run_all

    async def go() -> dict:
        mirror, _mstore, port = await _mirror(tmp_path)
        pstore = LogStore.open(tmp_path / "p", sync=False)
        primary = PrimaryServer(0, pstore, MODES["remote-sync"], socket_path(tmp_path, 0), ("127.0.0.1", port),
                                key=KEY)
        await primary.start()
        cfg = TesterConfig(testers=3, append_size=4096, count=5, servers=1, run_dir=str(tmp_path),
                           ledger_stream=str(tmp_path / "stream.jsonl"))
        stats = await run_all(cfg)
        await primary.close()
        await mirror.close()
        return stats

    stats = asyncio.run(go())
    assert stats["ok"] == 15
    ledger = load_ledgers(tmp_path / "stream.jsonl")
    assert len(ledger) == 15 and {e.outcome for e in ledger} == {"ok"}
    assert sorted({e.tester for e in ledger}) == [0, 1, 2]


def test_network_sync_resubscribes_when_callbacks_stop(tmp_path: Path) -> None:
    """The first subscription is lost and later the gateway restarts (forgetting it): the primary
    subscribes again after a second without callbacks, and its appends complete once answered."""
    import socket

    from smfs.callbacks import decode_subscribe, encode_callback

    async def go() -> None:
        gw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        gw.bind(("127.0.0.1", 0))
        gw.setblocking(False)
        loop = asyncio.get_running_loop()
        mirror, _mstore, port = await _mirror(tmp_path)
        pstore = LogStore.open(tmp_path / "p", sync=False)
        primary = PrimaryServer(0, pstore, MODES["network-sync"], str(tmp_path / "p.sock"), ("127.0.0.1", port),
                                gateway_control=gw.getsockname(), key=KEY)
        await primary.start()

        async def subscription() -> tuple[object, bytes, tuple[str, int]]:
            data, addr = await asyncio.wait_for(loop.sock_recvfrom(gw, 256), 5)
            return (*decode_subscribe(data, KEY, addr), addr)

        client = await Client.connect(str(tmp_path / "p.sock"))
        append = asyncio.ensure_future(client.append(1, 0, b"x" * 5000))
        await subscription()  # lost: not answered
        flow, nonce, addr = await subscription()  # the retry, about a second later
        assert not append.done()  # no callback yet: network-sync must not ack
        gw.sendto(encode_callback(flow, 1 << 40, nonce, KEY), addr)
        await asyncio.wait_for(append, 5)
        again, _, _ = await subscription()  # callbacks stopped (a gateway restart): it subscribes again
        assert again == flow
        await client.close()
        await primary.close()
        await mirror.close()
        gw.close()

    asyncio.run(go())


def test_network_sync_takes_callbacks_only_under_the_gateway_key_when_it_has_one(tmp_path: Path) -> None:
    """The VM drill gives each mode a fresh tunnel key (the gateways') while the mirror keeps the snapshot's
    storage key: the primary subscribes under the gateway key, and a callback under the storage key (or one
    recorded under an earlier mode's tunnel key) acks nothing."""
    import socket

    from smfs.callbacks import CallbackError, decode_subscribe, encode_callback

    gateway_key = b"g" * 32

    async def go() -> None:
        gw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        gw.bind(("127.0.0.1", 0))
        gw.setblocking(False)
        loop = asyncio.get_running_loop()
        mirror, _mstore, port = await _mirror(tmp_path)
        pstore = LogStore.open(tmp_path / "p", sync=False)
        primary = PrimaryServer(0, pstore, MODES["network-sync"], str(tmp_path / "p.sock"), ("127.0.0.1", port),
                                gateway_control=gw.getsockname(), key=KEY, gateway_key=gateway_key)
        await primary.start()
        client = await Client.connect(str(tmp_path / "p.sock"))
        append = asyncio.ensure_future(client.append(1, 0, b"x" * 5000))
        data, addr = await asyncio.wait_for(loop.sock_recvfrom(gw, 256), 5)
        with pytest.raises(CallbackError):
            decode_subscribe(data, KEY, addr)  # not under the storage key
        flow, nonce = decode_subscribe(data, gateway_key, addr)
        gw.sendto(encode_callback(flow, 1 << 40, nonce, KEY), addr)
        await asyncio.sleep(0.5)
        assert not append.done()  # the storage key's callback was refused
        gw.sendto(encode_callback(flow, 1 << 40, nonce, gateway_key), addr)
        await asyncio.wait_for(append, 5)
        await client.close()
        await primary.close()
        await mirror.close()
        gw.close()

    asyncio.run(go())


@pytest.mark.parametrize("seeded", [False, True])
def test_the_mirror_skips_fsync_only_with_the_seeded_defect(
    tmp_path: Path, seeded: bool, seed_defect: Callable[[str], None]
) -> None:
    from smfs.site import open_stores

    if seeded:
        seed_defect("mirror-acks-before-fsync")
    mirror = open_stores("mirror", tmp_path / "m", 2, 1 << 20)
    primary = open_stores("primary", tmp_path / "p", 2, 1 << 20)
    try:
        assert [s.sync for s in mirror] == [not seeded] * 2
        assert [s.sync for s in primary] == [True, True]  # the primary's stores are never affected
        assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["server-0", "server-1"]
    finally:
        for s in mirror + primary:
            s.close()


@pytest.mark.parametrize("seeded", [False, True])
def test_an_ack_waits_for_the_local_write_unless_the_defect_is_seeded(
    tmp_path: Path, seeded: bool, seed_defect: Callable[[str], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """remote-sync: correct, every acked append is in the primary's own store at its ack; with the
    seeded defect the ack comes first and the write ``LAZY_WRITE_S`` later (what a power cut finds)."""
    import smfs.primary as primary_mod

    if seeded:
        seed_defect("primary-acks-before-local-write")
    monkeypatch.setattr(primary_mod, "LAZY_WRITE_S", 0.3)

    async def go() -> None:
        primary, mirror, pstore, mstore = await _pair(tmp_path, "remote-sync")
        client = await Client.connect(str(tmp_path / "p.sock"))
        for seq in range(5):
            await client.append(3, seq, bytes([seq]) * 1000)
        at_ack = pstore.next_seq(3)
        await asyncio.sleep(0.6)
        later = pstore.next_seq(3)
        await client.close()
        await primary.close()
        await mirror.close()
        assert later == 5
        assert (at_ack < 5) if seeded else (at_ack == 5), at_ack

    asyncio.run(go())
