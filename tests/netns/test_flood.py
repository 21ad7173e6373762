"""Hostile traffic against the storage servers in namespaces (issue 13, "Authenticated traffic"):
the real site processes, a flooding attacker in the primary's namespace (any process of a site
can reach the mirror's port), a legitimate primary site and its clients.

- test_flood: thousands of connections to the mirror servers, silent ones, garbage, frame headers
  announcing 64 MiB, valid frames without the handshake, forged handshakes: the mirror's memory
  (its RSS, from /proc) stays bounded, a primary site that connects in the middle of the flood is
  served and every one of its appends is acked, and nothing the attacker sent is ever stored.
- test_forged_cb: network-sync through the gateways; with the primary's gateway frozen (no real
  callback can come), forged callbacks (another key, another subscription's nonce, the unsigned
  old format, garbage) flood the primary's callback socket: no append is acked; thawed, it is.

Test names are short: unix socket paths under pytest's folders must stay under 108 bytes.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from smfs.auth import create_key_file, read_key_file
from smfs.client import Client
from smfs.logstore import LogStore
from smfs.site import socket_path
from testbed.netns.bed import ADDRS, NamespaceTestbed

PORT = 7700
MIRROR, PRIMARY = ADDRS["mirror"].storage, ADDRS["primary"].storage
RSS_BOUND = 64 << 20  # bytes the mirror's RSS may grow under the flood (it receives far more than this)

_ATTACK = r"""
import json, os, resource, socket, struct, sys, threading, time, zlib
host, ports, seconds = sys.argv[1], [int(p) for p in sys.argv[2].split(",")], float(sys.argv[3])
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
HDR = struct.Struct("!2sBBIQII")
def frame(log, seq, payload):
    return HDR.pack(b"SM", 1, 4, log, seq, len(payload), zlib.crc32(payload)) + payload
PLANTED = b"".join(frame(66, q, b"planted") for q in range(200))
KINDS = [
    b"",                                                         # silent: holds a slot
    os.urandom(1 << 20),                                         # garbage
    HDR.pack(b"SM", 1, 4, 66, 0, 64 << 20, 0) + bytes(4 << 20),  # a 64 MiB frame announced, 4 MiB of it sent
    PLANTED,                                                     # valid frames, no handshake
    b"SMH1" + os.urandom(48) + PLANTED,                          # a forged handshake answer, then frames
]
stats = {"connections": 0, "bytes": 0, "errors": 0, "acks": 0}
lock = threading.Lock()
silent = []
deadline = time.monotonic() + seconds
def worker(w):
    i = w
    while time.monotonic() < deadline:
        i += 1
        data = KINDS[i % len(KINDS)]
        try:
            s = socket.create_connection((host, ports[i % len(ports)]), timeout=2)
        except OSError:
            with lock:
                stats["errors"] += 1
            time.sleep(0.005)
            continue
        with lock:
            stats["connections"] += 1
        if not data:
            with lock:
                silent.append(s)
                while len(silent) > 2000:
                    silent.pop(0).close()
            continue
        try:
            s.sendall(data)
            with lock:
                stats["bytes"] += len(data)
            s.settimeout(0.2)
            back = s.recv(4096)  # the mirror's hello (and its refusal): never a MACK (type 5)
            if b"SM\x01\x05" in back:
                with lock:
                    stats["acks"] += 1
        except OSError:
            with lock:
                stats["errors"] += 1
        s.close()
threads = [threading.Thread(target=worker, args=(w * 1000,)) for w in range(12)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(stats), flush=True)
"""


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _wait(path: Path, proc, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"{what} exited"
        assert time.monotonic() < deadline, f"{what} not ready"
        time.sleep(0.05)


def _site(tb: NamespaceTestbed, tmp: Path, role: str, *extra: str):
    site = "mirror" if role == "mirror" else "primary"
    argv = [sys.executable, "-m", "smfs.site", role, "--data", str(tmp / f"d{role[0]}"), "--run", str(tmp / f"r{role[0]}"),
            "--key-file", str(tmp / "k"), *extra]
    proc = tb.spawn(site, f"{role}-site", argv, tmp / f"{role}.log")
    _wait(tmp / f"r{role[0]}" / f"{role}.ready", proc, f"the {role} site")
    return proc


def _stop(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)


def test_flood(tmp_path: Path) -> None:
    tb = NamespaceTestbed()
    try:
        tb.build()
        create_key_file(tmp_path / "k")
        mirror = _site(tb, tmp_path, "mirror", "--servers", "2", "--listen", f"{MIRROR}:{PORT}")
        base = max(_rss(mirror.pid) for _ in range(5) if not time.sleep(0.05))
        peak, stop = [base], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak.append(_rss(mirror.pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        attacker = tb.spawn("primary", "attacker", [sys.executable, "-c", _ATTACK, MIRROR, f"{PORT},{PORT + 1}", "14"],
                            tmp_path / "attack.log")
        time.sleep(2.0)  # the flood is on: the primary site connects in the middle of it
        primary = _site(tb, tmp_path, "primary", "--servers", "2", "--mirror", f"{MIRROR}:{PORT}", "--source", PRIMARY,
                        "--mode", "remote-sync")

        async def clients() -> int:
            conns = [await Client.connect(socket_path(tmp_path / "rp", i)) for i in range(2)]
            acked, seq = 0, 0
            while attacker.poll() is None:
                for log, c in enumerate(conns):
                    await asyncio.wait_for(c.append(log, seq, bytes([seq % 251]) * 65536), 30)  # fails loudly
                    acked += 1
                seq += 1
            for c in conns:
                await c.close()
            return seq

        seqs = asyncio.run(clients())
        assert attacker.wait(timeout=60) == 0
        stop.set()
        sampler.join()
        flood = json.loads((tmp_path / "attack.log").read_text().strip().splitlines()[-1])
        _stop(primary)
        _stop(mirror)
        log = (tmp_path / "mirror.log").read_text()
    finally:
        tb.teardown()
    assert flood["connections"] > 2000 and flood["bytes"] > (200 << 20) and flood["acks"] == 0, flood
    grew = max(peak) - base
    assert grew < RSS_BOUND, f"the mirror's RSS grew by {grew >> 20} MiB under the flood ({flood})"
    assert seqs > 20, seqs  # the legitimate primary was served all along
    rejected = sum(int(n) for n in re.findall(r"closed: \d+ connections, \d+ authenticated, (\d+) rejected", log))
    assert rejected > 1000, log[-2000:]
    for i in range(2):  # only what the legitimate primary sent, every acked append of it
        with LogStore.open(tmp_path / "dm" / f"server-{i}", read_only=True) as store:
            assert store.logs() == [i] and store.next_seq(i) == seqs, (i, store.logs())
            assert {bytes(r.payload[:1]) for r in store.read(i)} <= {bytes([q % 251]) for q in range(seqs)}


_FORGE = r"""
import socket, struct, sys, os
sys.path.insert(0, sys.argv[5])
from smfs.auth import read_key_file
from smfs.callbacks import Flow, encode_callback
port, src, sport, dst, dport = int(sys.argv[1]), *sys.argv[2].split(":"), *sys.argv[3].split(":")
key = read_key_file(sys.argv[4])
flow = Flow(src, int(sport), dst, int(dport))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
forged = [encode_callback(flow, 1 << 40, b"12345678", os.urandom(32)),       # another key
          encode_callback(flow, 1 << 40, b"earlier!", key),                  # another subscription's nonce
          struct.pack("!4s4sH4sHQ", b"SMCB", socket.inet_aton(src), int(sport), socket.inet_aton(dst),
                      int(dport), 1 << 40)]                                  # the old, unsigned format
for i in range(3000):
    s.sendto(forged[i % 3] if i % 4 else os.urandom(48), ("127.0.0.1", port))
"""


def test_forged_cb(tmp_path: Path) -> None:
    from testbed.drill.gateways import CONTROL, start_gateways

    tb = NamespaceTestbed()
    try:
        tb.build()
        create_key_file(tmp_path / "k")
        start_gateways(tb, tmp_path, tmp_path, key_file=tmp_path / "k")
        mirror = _site(tb, tmp_path, "mirror", "--servers", "1", "--listen", f"{MIRROR}:{PORT}")
        primary = _site(tb, tmp_path, "primary", "--servers", "1", "--mirror", f"{MIRROR}:{PORT}", "--source",
                        PRIMARY, "--mode", "network-sync", "--gateway-control", CONTROL)
        plog = tmp_path / "primary.log"
        flow = re.search(r"mirror stream (\S+):(\d+) -> (\S+):(\d+)", plog.read_text())
        assert flow, plog.read_text()
        udp = tb.sh("primary", "cat", f"/proc/{primary.pid}/net/udp").splitlines()[1:]
        ports = [int(f.split()[1].split(":")[1], 16) for f in udp if f.split()[1].startswith("0100007F:")]
        [cb_port] = [p for p in ports if p != int(CONTROL.rsplit(":", 1)[1])]

        async def go() -> tuple[bool, float]:
            client = await Client.connect(socket_path(tmp_path / "rp", 0))
            await asyncio.wait_for(client.append(1, 0, b"first" * 1000), 10)  # real callbacks work
            # SIGSTOP the primary's gateway: no real callback can come now.
            [gw] = [int(r.ident) for r in tb.site_processes("primary") if r.meta.get("name") == "primary:gateway"]
            os.kill(gw, signal.SIGSTOP)
            try:
                append = asyncio.ensure_future(client.append(1, 1, b"second" * 1000))
                await asyncio.sleep(0.3)
                await asyncio.to_thread(
                    tb.sh, "primary", sys.executable, "-c", _FORGE, str(cb_port),
                    f"{flow[1]}:{flow[2]}", f"{flow[3]}:{flow[4]}", str(tmp_path / "k"),
                    str(Path(__file__).resolve().parents[2]))
                await asyncio.sleep(1.5)
                early = append.done()
            finally:
                os.kill(gw, signal.SIGCONT)
            t0 = time.monotonic()
            await asyncio.wait_for(append, 15)  # the real callback, once the gateway runs again
            await client.close()
            return early, time.monotonic() - t0

        early, _took = asyncio.run(go())
        _stop(primary)
        _stop(mirror)
    finally:
        tb.teardown()
    text = plog.read_text()
    assert not early, "a forged callback acked a network-sync append"
    assert "dropping a callback" in text and read_key_file(tmp_path / "k")
