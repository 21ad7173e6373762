"""The C gateway (``python -m smfs.gateway --engine c``) between real namespaces: a C pair carries
TCP over a lossy WAN and rebuilds the losses, it interoperates with the Python gateway both ways,
sends network-sync callbacks to a subscribed server, and writes the Python gateway's statistics."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from smfs.fec import Repair
from smfs.gateway import C_BINARY_ENV
from smfs.tunnel import encode_data, encode_repair
from testbed.bench.gateway import _transfer
from testbed.bench.gateway_c import Pair, start_pair
from testbed.drill.gateways import CONTROL, TUNNEL_PORT
from testbed.netns.bed import ADDRS, NamespaceTestbed, other

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "smfs" / "native" / "build"
SANITIZER_MARKS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer")


@pytest.fixture(scope="session")
def c_gateway() -> dict[str, Path]:
    """The C gateway built once per session: the binary ``--engine c`` picks, and the ASan one."""
    res = subprocess.run(["make", "-f", "smfs/native/gateway.mk", "all", "asan"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return {"static": BUILD / "smfs-gateway-static", "asan": BUILD / "smfs-gateway-asan"}


def _stats(pair: Pair, site: str) -> dict[str, Any]:
    """Fresh statistics: SIGUSR1, then the rewritten file."""
    path = pair.stats_files[site]
    before = path.stat().st_mtime_ns
    os.kill(pair.procs[site].pid, signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while path.stat().st_mtime_ns == before and time.monotonic() < deadline:
        time.sleep(0.02)
    return pair.read(site)


def _stop(pair: Pair, site: str) -> int:
    """SIGTERM and wait: the exit status (the last statistics are written on the way out)."""
    proc = pair.procs[site]
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=10)


@pytest.fixture()
def testbed_ns():
    tb = NamespaceTestbed()
    try:
        tb.build()
        yield tb
    finally:
        tb.teardown()


def _ping(tb: NamespaceTestbed) -> str:
    return tb.sh("primary", "ping", "-c", "3", "-i", "0.2", "-W", "2", "-I", ADDRS["primary"].storage,
                 ADDRS["mirror"].storage, check=False)


def test_a_c_pair_carries_tcp_over_a_lossy_wan_and_rebuilds_the_losses(testbed_ns, tmp_path: Path,
                                                                        c_gateway) -> None:
    """2 % random loss each way (nftables drop in the wan namespace); the mirror runs the ASan build."""
    tb = testbed_ns
    assert tb.set_loss(2.0) in ("netem", "nftables-random-drop")
    pair = start_pair(tb, tmp_path, {"primary": "c", "mirror": "c"}, {"mirror": c_gateway["asan"]})
    got = _transfer(tb, tmp_path, 9110, 2.0)
    prim, mirr = _stats(pair, "primary"), _stats(pair, "mirror")
    assert _stop(pair, "mirror") == 0 and _stop(pair, "primary") == 0
    log = pair.logs["mirror"].read_text() + pair.logs["primary"].read_text()
    assert "C engine" in log and not any(m in log for m in SANITIZER_MARKS), log[-3000:]
    assert got["bytes"] > 1_000_000, got
    assert prim["packets_in"] > 1000 and prim["repairs_sent"] > 0 and prim["callback_latency_ms"] is not None
    # The drops the nftables rule counted are what the mirror saw missing; (8, 3) rebuilds nearly all.
    assert tb.wan_drops() and mirr["lost_on_wan"] > 0, (tb.wan_drops(), mirr)
    assert mirr["rebuilt_fraction"] >= 0.9 and mirr["rejected"] == 0 and mirr["replayed"] == 0, mirr
    assert mirr["received"] + mirr["lost_on_wan"] >= prim["packets_out"] * 0.99, (prim, mirr)


def test_c0_pair(testbed_ns, tmp_path: Path, c_gateway) -> None:
    """c = 0 (``--interleaves`` bare: no FEC) between C gateways, the mirror's the ASan build: TCP
    crosses a WAN with 2 % loss, no repair is ever sent, what the WAN drops is lost for good (TCP
    retransmits it), and network-sync callbacks come as soon as the data is sent."""
    tb = testbed_ns
    tb.set_loss(2.0)
    pair = start_pair(tb, tmp_path, {"primary": "c", "mirror": "c"}, {"mirror": c_gateway["asan"]},
                      extra=["--interleaves"])
    got = _transfer(tb, tmp_path, 9115, 1.5)
    prim, mirr = _stats(pair, "primary"), _stats(pair, "mirror")
    assert _stop(pair, "mirror") == 0 and _stop(pair, "primary") == 0
    log = pair.logs["mirror"].read_text() + pair.logs["primary"].read_text()
    assert log.count("(C engine)") == 2 and log.count("interleaves=()") == 2, log[-3000:]
    assert not any(m in log for m in SANITIZER_MARKS), log[-3000:]
    assert got["bytes"] > 500_000, got
    for st in (prim, mirr):
        assert st["params"] == {"r": 8, "c": 0, "interleaves": [], "flush_ms": 5.0}, st["params"]
        assert st["repairs_sent"] == 0 and st["rebuilt"] == 0 and st["rejected"] == 0, st
    assert prim["packets_in"] > 500 and prim["callback_latency_ms"]["p99"] == 0.0, prim
    assert tb.wan_drops() and mirr["lost_on_wan"] > 0 and mirr["lost_for_good"] == mirr["lost_on_wan"], mirr
    assert mirr["rebuilt_fraction"] == 0.0, mirr


@pytest.mark.parametrize("engines", [{"primary": "c", "mirror": "python"}, {"primary": "python", "mirror": "c"}],
                         ids=["c-to-python", "python-to-c"])
def test_a_c_gateway_interoperates_with_a_python_one(testbed_ns, tmp_path: Path, c_gateway,
                                                     engines: dict[str, str]) -> None:
    tb = testbed_ns
    tb.set_loss(1.0)
    pair = start_pair(tb, tmp_path, engines)
    assert " 0% packet loss" in _ping(tb)
    got = _transfer(tb, tmp_path, 9111, 1.5)
    stats = {site: _stats(pair, site) for site in engines}
    assert got["bytes"] > 500_000, got
    for site, st in stats.items():
        assert st["received"] > 100 and st["rejected"] == 0, (site, st)
        assert st["lost_on_wan"] == 0 or st["rebuilt"] > 0, (site, st)
    # The statistics files have the same keys, nested ones included.
    c_site = next(s for s, e in engines.items() if e == "c")
    py_site = other(c_site)
    c_st, py_st = stats[c_site], stats[py_site]
    assert list(c_st) == list(py_st)
    for key, value in c_st.items():
        if isinstance(value, dict) and isinstance(py_st[key], dict) and key != "reasons":
            assert list(value) == list(py_st[key]), key
    assert list(c_st["params"].values()) == list(py_st["params"].values())


_CALLBACK_CLIENT = """
import json, socket, sys, time
from smfs.auth import read_key_file
from smfs.callbacks import Flow, decode_callback, encode_subscribe
dst, port, src, n, control = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
key = read_key_file(sys.argv[6])
want = int(sys.argv[7]) if len(sys.argv) > 7 else 0
chost, cport = control.rsplit(":", 1)
s = socket.create_connection((dst, port), source_address=(src, 0), timeout=10)
flow = Flow(src, s.getsockname()[1], dst, port)
ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
ctl.bind(("127.0.0.1", 0))
ctl.settimeout(0.2)
nonce = b"c-nonce!"
ctl.sendto(encode_subscribe(flow, nonce, b"not-the-key-" * 3, ctl.getsockname()), (chost, int(cport)))  # refused
thief = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
thief.bind(("127.0.0.1", 0))
thief.setblocking(False)
thief.sendto(encode_subscribe(flow, nonce, key, ctl.getsockname()), (chost, int(cport)))  # replayed elsewhere: refused
time.sleep(0.2)
ctl.sendto(encode_subscribe(flow, nonce, key, ctl.getsockname(), want), (chost, int(cport)))
t0 = time.monotonic()
s.sendall(b"x" * n)
best, count, foreign, below = 0, 0, 0, 0
while best < n and time.monotonic() < t0 + 10:
    try:
        data, _ = ctl.recvfrom(64)
    except socket.timeout:
        continue
    got, offset, tag = decode_callback(data, key)  # the C gateway's MAC checks out
    if got != flow or tag != nonce:
        foreign += 1
        continue
    best, count, below = max(best, offset), count + 1, below + (offset < want)
wait = time.monotonic() - t0
stolen = 0
while True:
    try:
        thief.recvfrom(64)
        stolen += 1
    except BlockingIOError:
        break
s.close()
print(json.dumps({"offset": best, "callbacks": count, "foreign": foreign, "stolen": stolen, "n": n, "below": below,
                  "s": round(wait, 3)}))
"""


@pytest.mark.parametrize("want", [0, 2_000_000])
def test_network_sync_callbacks_arrive_from_the_c_gateway(testbed_ns, tmp_path: Path, c_gateway, want: int) -> None:
    """A server subscribes its flow on the primary's control port; the C gateway's callbacks (with
    a MAC under the testbed key and the subscription's nonce) reach the whole stream's length once
    every byte and its repairs are on the WAN. A subscribe under another key, and one replayed from
    another address, are refused: no callback goes anywhere else. A subscription that waits for
    the stream's end (``want``) hears of no offset below it: one callback (and its re-announcements)
    instead of one per few packets."""
    tb = testbed_ns
    pair = start_pair(tb, tmp_path, {"primary": "c", "mirror": "c"})
    ready = tmp_path / "sink.ready"
    sink = tb.spawn("mirror", "sink", [sys.executable, "-m", "testbed.bulk", "serve", ADDRS["mirror"].storage,
                                       "9112", "--ready", str(ready)], tmp_path / "sink.log")
    deadline = time.monotonic() + 10
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    n = 2_000_000
    out = tb.sh("primary", sys.executable, "-c", _CALLBACK_CLIENT, ADDRS["mirror"].storage, "9112",
                ADDRS["primary"].storage, str(n), CONTROL, str(tmp_path / "tunnel.key"), str(want))
    sink.wait(timeout=10)
    res = json.loads(out.strip().splitlines()[-1])
    st = _stats(pair, "primary")
    assert res["offset"] >= n and res["foreign"] == 0 and res["stolen"] == 0, res
    assert st["reasons"].get("control: bad mac") == 2, st["reasons"]  # the forged and the replayed subscribe
    assert st["callbacks_sent"] >= res["callbacks"] > 0, (res, st)
    if want:
        assert res["below"] == 0 and res["callbacks"] <= 1 + st["callbacks_resent"], (res, st)
    else:
        assert res["callbacks"] > 10, res  # every advance: many along a 2 MB stream
    assert st["callback_latency_ms"]["n"] > 0 and st["callback_latency_ms"]["p50"] < 100, st


def test_the_c_gateway_reports_a_missing_binary_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "key").write_text(secrets.token_hex(32))
    res = subprocess.run(
        [sys.executable, "-m", "smfs.gateway", "--engine", "c", "--site", "primary", "--address", "198.18.11.1",
         "--local", "127.0.0.1:0", "--peer", "127.0.0.1:9", "--key-file", str(tmp_path / "key"), "--stats",
         str(tmp_path / "s.json"), "--ready", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
        env={**os.environ, C_BINARY_ENV: str(tmp_path / "no-such-gateway")},
    )
    assert res.returncode == 2 and "make -f smfs/native/gateway.mk" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_the_c_gateway_counts_and_drops_hostile_datagrams(testbed_ns, tmp_path: Path, c_gateway) -> None:
    """Garbage, foreign keys and a replay against the ASan build: counted, dropped, still serving."""
    tb = testbed_ns
    pair = start_pair(tb, tmp_path, {"primary": "c", "mirror": "c"}, {"mirror": c_gateway["asan"]})
    wrong_key = b"k" * 32
    key = bytes.fromhex((tmp_path / "tunnel.key").read_text())
    replayed = encode_data(7, b"\x45" + b"\x00" * 39, 1, key)  # well formed, the right key, sent twice
    hostile = [b"\xa7", os.urandom(40), os.urandom(1400), encode_data(5, b"\x45" + b"\x00" * 39, 1, wrong_key),
               encode_repair(Repair(0, (1, 2), (3, 3), b"abc"), 1, wrong_key),
               encode_data(8, b"\x45" + b"\x00" * 39, 2, key), replayed, replayed]
    script = ("import socket,sys,json\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
              "for h in json.load(sys.stdin):\n"
              f"    s.sendto(bytes.fromhex(h),('{ADDRS['mirror'].wan}',{TUNNEL_PORT}))\n")
    tb.sh("primary", sys.executable, "-c", script, input=json.dumps([h.hex() for h in hostile]).encode())
    time.sleep(0.3)
    st = _stats(pair, "mirror")
    assert st["rejected"] == 6 and st["replayed"] >= 1, st  # 2 when seq 7 is below the window already
    assert st["reasons"]["rejected: bad mac"] == 2 and st["reasons"]["rejected: foreign site"] == 1, st["reasons"]
    assert " 0% packet loss" in _ping(tb)
    assert _stop(pair, "mirror") == 0
    log = pair.logs["mirror"].read_text()
    assert not any(m in log for m in SANITIZER_MARKS), log[-3000:]


def test_a_paced_c_gateway_holds_its_rate(testbed_ns, tmp_path: Path, c_gateway) -> None:
    rate = 16_000_000
    tb = testbed_ns
    pair = start_pair(tb, tmp_path, {"primary": "c", "mirror": "c"},
                      extra=["--wan-rate-bps", str(rate), "--edge-queue", "32"])
    got = _transfer(tb, tmp_path, 9113, 2.0)
    st = _stats(pair, "primary")
    assert st["paced"]["rate_bps"] == rate and st["paced"]["pauses"] > 0, st["paced"]
    assert 0 < got["MBps"] * 1e6 * 8 < rate, got
