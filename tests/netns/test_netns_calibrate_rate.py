"""The rate check's real sender and counter (``rate-send`` → ``rate-count``) between two namespaces joined
by a veth (198.18.251.0/24): a rate the veth carries, one a tbf on the sender's side cuts to 20 Mbit/s,
and one no sender can offer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from netem.calibrate import RATE_OVERDRIVE, format_table, rate_measured, rate_rows
from netem.profile import LinkProfile

ROOT = Path(__file__).resolve().parents[2]
NS_A, NS_B = f"smfs-rate-a{os.getpid()}", f"smfs-rate-b{os.getpid()}"
ADDR_A, ADDR_B = "198.18.251.1", "198.18.251.2"
PORT = 7789
TBF_MBIT = 20


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def link() -> Iterator[None]:
    created: list[str] = []
    try:
        for ns in (NS_A, NS_B):
            _ip("netns", "add", ns)
            created.append(ns)
        _ip("-n", NS_A, "link", "add", "rate0", "type", "veth", "peer", "name", "rate1", "netns", NS_B)
        for ns, dev, addr in ((NS_A, "rate0", ADDR_A), (NS_B, "rate1", ADDR_B)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], check=False)


def _measure(rate: str, seconds: float = 2.0, pause: tuple[float, float] | None = None) -> dict:
    """One counter in B, one paced stream from A offered at RATE_OVERDRIVE × ``rate`` (as ``wan.calibrate``
    does): the flat ``rate_*`` fields. ``pause``: stop the counter (SIGSTOP) from ``pause[0]`` to
    ``pause[1]`` s after the sender starts, a reader too slow for the stream."""
    offered = int(LinkProfile.from_mapping({"rate": rate}).a_to_b.rate_bps * RATE_OVERDRIVE)
    counter = subprocess.Popen(["ip", "netns", "exec", NS_B, sys.executable, "-m", "netem.calibrate", "rate-count",
                                "--host", ADDR_B, "--port", str(PORT), "--seconds", "60"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    timers = [threading.Timer(at, counter.send_signal, (sig,))
              for at, sig in zip(pause or (), (signal.SIGSTOP, signal.SIGCONT), strict=False)]  # fmt: skip
    try:
        for t in timers:
            t.start()
        sender = subprocess.run(["ip", "netns", "exec", NS_A, sys.executable, "-m", "netem.calibrate", "rate-send",
                                 "--host", ADDR_B, "--port", str(PORT), "--rate", f"{offered}bit", "--seconds",
                                 str(seconds), "--size", "1472"],
                                capture_output=True, text=True, timeout=90, cwd=ROOT)  # fmt: skip
        assert sender.returncode == 0, sender.stderr
        out, _err = counter.communicate(timeout=30)
    finally:
        for t in timers:
            t.cancel()
        if counter.poll() is None:
            counter.send_signal(signal.SIGCONT)
            counter.kill()
            counter.wait()
    sent = json.loads(sender.stdout)
    print(json.dumps(sent, indent=1))
    assert json.loads(out.strip().splitlines()[-1]) == sent["counter"]  # the counter printed what it answered
    return rate_measured(sent)


def _rows(rate: str, measured: dict) -> dict[str, dict]:
    rows = rate_rows(LinkProfile.from_mapping({"rate": rate}).a_to_b, measured)
    print(format_table(rows))
    return {r["metric"]: r for r in rows}


def test_a_rate_the_veth_carries_is_ok(link: None) -> None:
    m = _measure("50mbit")
    rows = _rows("50mbit", m)
    assert rows["rate sent a→b"]["ok"] is True and rows["rate a→b"]["ok"] is True
    assert m["rate_delivered_mbps"] == pytest.approx(55, rel=0.1)  # the veth is not the limit: all 1.1x arrive


def test_a_path_cut_below_the_rate_is_not_ok(link: None) -> None:
    """tbf on A's veth at 20 Mbit/s: 20 Mbit/s passes, 100 Mbit/s is refused as the path's shortfall."""
    # A 25 kB bucket (10 ms of the rate): with a 4 kB one (2.6 frames) every late wake-up of tbf's watchdog
    # on a loaded host lost tokens, and the path delivered 18.0 Mbit/s, not 20 (a full ./inv test, once).
    _ip("netns", "exec", NS_A, "tc", "qdisc", "add", "dev", "rate0", "root", "tbf", "rate", f"{TBF_MBIT}mbit",
        "burst", "25kb", "latency", "50ms")  # fmt: skip
    try:
        m = _measure(f"{TBF_MBIT}mbit")
        rows = _rows(f"{TBF_MBIT}mbit", m)
        assert rows["rate a→b"]["ok"] is True  # tbf charges 1514-byte frames: 19.8 Mbit/s of IP
        assert m["rate_delivered_mbps"] == pytest.approx(TBF_MBIT * 1500 / 1514, rel=0.05)
        m = _measure("100mbit")
        rows = _rows("100mbit", m)
        assert rows["rate sent a→b"]["ok"] is True  # the sender offered 110
        assert rows["rate a→b"]["ok"] is False and "the path is short" in rows["rate a→b"]["note"]
        assert rows["rate a→b"]["measured"] == pytest.approx(TBF_MBIT * 1500 / 1514, rel=0.05)
    finally:
        _ip("netns", "exec", NS_A, "tc", "qdisc", "del", "dev", "rate0", "root")


def test_a_rate_no_sender_can_offer_is_not_ok(link: None) -> None:
    """30 Gbit/s (near netem's 34 Gbit/s ceiling): one Python sender of 1472-byte datagrams cannot offer it."""
    m = _measure("30gbit", seconds=1.0)
    rows = _rows("30gbit", m)
    assert rows["rate sent a→b"]["ok"] is False and "could send only" in rows["rate sent a→b"]["note"]
    assert rows["rate a→b"]["ok"] is False


def test_datagrams_the_reader_could_not_take_count_as_delivered(link: None) -> None:
    """The counter stopped for 1 s of a 3 s stream: its socket overflows (what reached B, past the path),
    the reader reads far less than the stream, and the delivered rate is still the stream's."""
    m = _measure("50mbit", seconds=3.0, pause=(1.0, 2.3))
    rows = _rows("50mbit", m)
    # 1.3 s of 55 Mbit/s is 6000 datagrams; the socket holds what rmem_max allows (~3000 at 4 MiB)
    assert m["rate_overflowed"] > 500
    assert m["rate_read_mbps"] < 0.95 * m["rate_delivered_mbps"]
    assert m["rate_delivered_mbps"] == pytest.approx(55, rel=0.1)
    assert rows["rate a→b"]["ok"] is True and "overflowed the reader's socket" in rows["rate a→b"]["note"]
