"""Captures for real: ``python3 -m netem.capture`` on a veth between two namespaces while tunnel
datagrams flow, the task's guest orchestration against a local stand-in guest, and a capture of
the real gateways' tunnel checked against their own statistics."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from netem.capture import TUNNEL_PORT, summarise
from smfs.fec import Repair
from smfs.tunnel import encode_data, encode_repair
from testbed.vm.guest import ExecResult

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]
NS_A, NS_B = f"smfs-capa{os.getpid()}", f"smfs-capb{os.getpid()}"
ADDR_A, ADDR_B = "198.18.252.1", "198.18.252.2"
KEY = b"c" * 32
LOST = {7, 150, 151}
"""DATA seqs the sender skips: the capture must report them missing."""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def veth() -> Iterator[None]:
    """Namespaces A and B joined by a veth (cap0 in A, cap1 in B), deleted whatever happens."""
    created: list[str] = []
    try:
        for ns in (NS_A, NS_B):
            _ip("netns", "add", ns)
            created.append(ns)
        _ip("-n", NS_A, "link", "add", "cap0", "type", "veth", "peer", "name", "cap1", "netns", NS_B)
        for ns, dev, addr in ((NS_A, "cap0", ADDR_A), (NS_B, "cap1", ADDR_B)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _start_capture(ns: str, out: Path, *args: str) -> subprocess.Popen[str]:
    """The capture in ``ns``, returned once it listens (its stderr says so)."""
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "netem.capture", "--out", str(out),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert "listening" in line, line + proc.stderr.read()
    return proc


def _finish(proc: subprocess.Popen[str], sig: int | None = None) -> dict:
    if sig is not None:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    [line] = out.splitlines()
    return json.loads(line)


def _send(ns: str, src: str, dst: str, datagrams: list[bytes], port: int = TUNNEL_PORT, sport: int = TUNNEL_PORT) -> None:
    """Send ``datagrams`` from ``src``:``sport`` (7800, as a gateway does; 0: any) to ``dst``:``port``,
    in namespace ``ns``."""
    script = ("import socket,sys,json\n"
              "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
              f"s.bind(({src!r},{sport}))\n"
              "for h in json.load(sys.stdin):\n"
              f"    s.sendto(bytes.fromhex(h),({dst!r},{port}))\n")
    subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", script], check=True, timeout=60,
                   input=json.dumps([d.hex() for d in datagrams]), text=True, capture_output=True)


def _tunnel_traffic() -> None:
    """A → B: DATA 1000 + 0..299 but :data:`LOST`, 40 repairs (layers 0..3), 50 datagrams to
    another port; B → A: DATA 0..19 of site 1."""
    data = [encode_data(1000 + i, bytes(100 + i % 50), 0, KEY) for i in range(300) if i not in LOST]
    repairs = [encode_repair(Repair(i % 4, (1000 + 8 * i, 1001 + 8 * i), (40, 50), bytes(50)), 0, KEY)
               for i in range(40)]
    _send(NS_A, ADDR_A, ADDR_B, data + repairs)
    _send(NS_A, ADDR_A, ADDR_B, [b"noise"] * 50, port=9999, sport=0)
    _send(NS_B, ADDR_B, ADDR_A, [encode_data(i, b"reverse", 1, KEY) for i in range(20)])


def test_capture_counts_what_was_sent(veth: None, tmp_path: Path) -> None:
    out = tmp_path / "tunnel.pcap"
    proc = _start_capture(NS_B, out, "--iface", "cap1", "--seconds", "60")
    try:
        _tunnel_traffic()
        time.sleep(0.5)
    finally:
        figures = _finish(proc, signal.SIGTERM)
    assert figures["stopped_by"] == "SIGTERM" and figures["kernel_drops"] == 0
    assert figures["packets"] == 297 + 40 + 20
    s = summarise(out, key=KEY)
    assert (s["packets"], s["other"], s["not_tunnel"], s["truncated"]) == (357, 0, 0, 0)
    fwd, rev = s["directions"]
    print(json.dumps(fwd, indent=1))
    assert (fwd["src"], fwd["dst"], fwd["site"]) == (f"{ADDR_A}:{TUNNEL_PORT}", f"{ADDR_B}:{TUNNEL_PORT}", 0)
    assert (fwd["data"], fwd["repairs"], fwd["missing_in_capture"], fwd["duplicates"]) == (297, 40, 3, 0)
    assert fwd["gaps"] == [[1007, 1007], [1150, 1151]]
    assert fwd["repairs_by_layer"] == {"0": 10, "1": 10, "2": 10, "3": 10}
    assert (fwd["verified"], fwd["bad_mac"]) == (337, 0)
    assert (rev["site"], rev["data"], rev["missing_in_capture"], rev["seq_first"], rev["seq_last"]) == (1, 20, 0, 0, 19)


def test_every_frame_and_max_packets(veth: None, tmp_path: Path) -> None:
    out = tmp_path / "all.pcap"
    proc = _start_capture(NS_B, out, "--iface", "cap1", "--seconds", "60", "--udp-port", "0",
                          "--max-packets", "25", "--snaplen", "64")
    try:
        _send(NS_A, ADDR_A, ADDR_B, [b"n" * 200] * 100, port=9999)
        figures = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert figures["stopped_by"] == "max-packets" and figures["packets"] == 25
    s = summarise(out)
    assert s["packets"] == 25 and s["directions"] == []


def test_seconds_end_an_idle_capture_with_a_valid_file(veth: None, tmp_path: Path) -> None:
    out = tmp_path / "idle.pcap"
    t0 = time.monotonic()
    figures = _finish(_start_capture(NS_B, out, "--iface", "cap1", "--seconds", "1", "--udp-port", "9"))
    assert figures["stopped_by"] == "time" and figures["packets"] == 0
    assert time.monotonic() - t0 < 10
    assert summarise(out)["packets"] == 0


def test_a_link_cut_does_not_end_the_capture_and_sigint_does(veth: None, tmp_path: Path) -> None:
    out = tmp_path / "cut.pcap"
    proc = _start_capture(NS_B, out, "--iface", "cap1", "--seconds", "60")
    try:
        _ip("-n", NS_B, "link", "set", "cap1", "down")
        time.sleep(0.5)
        _ip("-n", NS_B, "link", "set", "cap1", "up")
        time.sleep(0.5)
        _tunnel_traffic()
        time.sleep(0.5)
    finally:
        _ip("-n", NS_B, "link", "set", "cap1", "up")
        figures = _finish(proc, signal.SIGINT)
    assert figures["stopped_by"] == "SIGINT" and figures["iface_down"] >= 1
    assert figures["packets"] == summarise(out)["packets"] == 357


# --- the task's guest side, against a local stand-in ---------------------------------------------


class LocalGuest:
    """The part of :class:`testbed.vm.guest.Guest` the capture task uses, run in namespace ``ns``
    (``python3`` is this interpreter, the project importable as in the image)."""

    def __init__(self, ns: str) -> None:
        self.ns, self.name = ns, ns
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.commands: list[list[str]] = []

    def _argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *[sys.executable if a == "python3" else a for a in argv]]

    def exec(self, argv: Sequence[str], timeout: float = 60, check: bool = False,
             env: Mapping[str, str] | None = None) -> ExecResult:
        t0 = time.monotonic()
        r = subprocess.run(self._argv(argv), capture_output=True, timeout=timeout, env=os.environ | (env or {}))
        if check:
            assert r.returncode == 0, r.stderr
        return ExecResult(r.returncode, r.stdout, r.stderr, time.monotonic() - t0)

    def sh(self, script: str, timeout: float = 60, check: bool = True) -> str:
        return self.exec(["/bin/sh", "-c", script], timeout=timeout, check=check).out

    def spawn(self, name: str, argv: Sequence[str], log: str) -> int:
        self.commands.append(list(argv))
        with open(log, "ab") as f:
            self.procs[name] = subprocess.Popen(self._argv(argv), stdout=f, stderr=f, stdin=subprocess.DEVNULL,
                                                cwd="/", env=os.environ | {"PYTHONPATH": str(ROOT)})
        return self.procs[name].pid

    def find(self, name: str) -> int | None:
        p = self.procs.get(name)
        return p.pid if p is not None and p.poll() is None else None

    def stop(self, name: str, signal: str = "TERM", wait: float = 5.0) -> bool:
        p = self.procs.get(name)
        if p is None or p.poll() is not None:
            return False
        p.terminate()
        p.wait(timeout=wait + 10)
        return True

    def read_file(self, path: str) -> bytes:
        return Path(path).read_bytes()

    def write_file(self, path: str, data: bytes) -> None:
        Path(path).write_bytes(data)


@pytest.mark.parametrize("image_has_module", [True, False])
def test_task_takes_and_copies_a_capture(veth: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         image_has_module: bool) -> None:
    from testbed.cli import capture as task
    from testbed.vm import guest

    guest_dir = tmp_path / "guest"
    guest_dir.mkdir()
    monkeypatch.setattr(guest, "RUN_DIR", str(guest_dir))
    monkeypatch.setattr(task, "GUEST_DIR", str(guest_dir))
    monkeypatch.setattr(task, "GUEST_PROJECT", str(ROOT) if image_has_module else str(tmp_path / "old-image"))
    g = LocalGuest(NS_B)

    def traffic() -> None:
        deadline = time.monotonic() + 30
        while not any("listening" in p.read_text() for p in guest_dir.glob("*.log")) and time.monotonic() < deadline:
            time.sleep(0.05)
        _tunnel_traffic()

    sender = threading.Thread(target=traffic)
    sender.start()
    dest = tmp_path / "host" / "primary.pcap"
    figures = task._take(g, ["--iface", "cap1", "--seconds", "4", "--udp-port", str(TUNNEL_PORT), "--max-packets", "0",
                             "--snaplen", "128"], 4.0, dest)
    sender.join()
    print(shlex.join(g.commands[0]))
    assert (g.commands[0][1:3] == ["-m", "netem.capture"]) is image_has_module
    assert figures["packets"] == 357 and figures["stopped_by"] == "time"
    s = summarise(dest)
    assert s["totals"]["data"] == 317 and s["totals"]["repairs"] == 40 and s["totals"]["missing_in_capture"] == 3
    assert s["truncated"] == 297 + 40  # every A → B frame is longer than 128 bytes
    assert list(guest_dir.iterdir()) == []  # the guest's pcap, log, pid and script are gone


# --- the real gateways --------------------------------------------------------------------------


@pytest.fixture()
def gateways(tmp_path: Path):
    from testbed.drill.gateways import start_gateways
    from testbed.netns.bed import NamespaceTestbed

    tb = NamespaceTestbed()
    try:
        tb.build()
        yield tb, start_gateways(tb, tmp_path, tmp_path)
    finally:
        tb.teardown()


def _gateway_stats(tb, gw, site: str) -> dict:
    """A gateway's statistics, written on SIGUSR1 (as in test_gateway)."""
    [res] = [r for r in tb.site_processes(site) if r.meta["name"] == f"{site}:gateway"]
    path = gw.stats_files[site]
    before = path.stat().st_mtime_ns if path.exists() else 0
    os.kill(int(res.ident), signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while (not path.exists() or path.stat().st_mtime_ns == before) and time.monotonic() < deadline:
        time.sleep(0.02)
    return json.loads(path.read_text())


def test_capture_of_the_gateways_tunnel_matches_their_statistics(gateways, tmp_path: Path) -> None:
    from testbed.netns.bed import ADDRS

    tb, gw = gateways
    out = tmp_path / "wan.pcap"
    proc = _start_capture(tb.ns("primary"), out, "--iface", "wan0", "--seconds", "60")
    try:
        before = {site: _gateway_stats(tb, gw, site) for site in ("primary", "mirror")}
        ping = tb.sh("primary", "ping", "-c", "20", "-i", "0.05", "-W", "2", "-I", ADDRS["primary"].storage,
                     ADDRS["mirror"].storage, check=False)
        time.sleep(1.0)  # the last bins' repairs
        after = {site: _gateway_stats(tb, gw, site) for site in ("primary", "mirror")}
    finally:
        figures = _finish(proc, signal.SIGTERM)
    assert " 0% packet loss" in ping
    s = summarise(out)
    print(json.dumps({"capture": figures, "summary": s, "before": before, "after": after}, indent=1, default=str))
    by_src = {d["src"]: d for d in s["directions"]}
    # Everything a gateway sent after the capture started is in it, and nothing more than it ever sent
    # (a TUN device may carry a stray IPv6 packet of its own while the gateways start).
    for site, field, kind in (("primary", "packets_out", "data"), ("primary", "repairs_sent", "repairs"),
                              ("mirror", "packets_out", "data"), ("mirror", "repairs_sent", "repairs")):
        seen = by_src[f"{ADDRS[site].wan}:{TUNNEL_PORT}"][kind]
        assert after[site][field] - before[site][field] <= seen <= after[site][field], (site, kind)
    assert all(d["data"] >= 20 and d["missing_in_capture"] == 0 for d in s["directions"])
    assert s["other"] == s["not_tunnel"] == 0
