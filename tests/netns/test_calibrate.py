"""Calibration between two namespaces joined by a veth (198.18.250.0/24), with and without nftables drops."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from netem.calibrate import compare, format_table
from netem.profile import LinkProfile

ROOT = Path(__file__).resolve().parents[2]
NS_A, NS_B = f"smfs-cal-a{os.getpid()}", f"smfs-cal-b{os.getpid()}"
ADDR_A, ADDR_B = "198.18.250.1", "198.18.250.2"
PORT = 7788


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _in(ns: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)  # fmt: skip


@pytest.fixture(scope="module")
def link() -> Iterator[None]:
    """Two namespaces, a veth between them, and an echo/sink server in B."""
    created: list[str] = []
    server = None
    try:
        for ns in (NS_A, NS_B):
            _ip("netns", "add", ns)
            created.append(ns)
        _ip("-n", NS_A, "link", "add", "cal0", "type", "veth", "peer", "name", "cal1", "netns", NS_B)
        for ns, dev, addr in ((NS_A, "cal0", ADDR_A), (NS_B, "cal1", ADDR_B)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        server = subprocess.Popen(
            ["ip", "netns", "exec", NS_B, sys.executable, "-m", "netem.calibrate", "serve", "--host", ADDR_B,
             "--port", str(PORT), "--seconds", "120"],
            stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        assert server.stdout is not None
        assert "serving" in server.stdout.readline()
        yield
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], check=False)


def _probe(count: int, interval: float) -> dict:
    out = _in(NS_A, sys.executable, "-m", "netem.calibrate", "probe", "--host", ADDR_B, "--port", str(PORT),
              "--count", str(count), "--interval", str(interval))  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_clean_path_has_no_loss_and_a_sane_rtt(link: None) -> None:
    m = _probe(2000, 0.0005)
    print(json.dumps(m, indent=1))
    assert m["sent"] == 2000
    assert m["loss_fwd_pct"] <= 0.1 and m["loss_rev_pct"] <= 0.1
    assert 0 < m["rtt_p10_ms"] <= m["rtt_median_ms"] <= m["rtt_p90_ms"] <= m["rtt_p99_ms"]
    assert m["rtt_median_ms"] < 5.0
    rows = compare(LinkProfile(), m, base_rtt_ms=m["rtt_median_ms"])
    print(format_table(rows))
    assert all(r["ok"] is not False for r in rows)


def test_bulk_throughput(link: None) -> None:
    out = _in(NS_A, sys.executable, "-m", "netem.calibrate", "bulk", "--host", ADDR_B, "--port", str(PORT),
              "--seconds", "1")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["bulk_mbps"] > 10


@pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft")
def test_ten_percent_forward_drop_is_measured_forward(link: None) -> None:
    """nft drops 10 % of probes entering B: forward loss ≈ 10 %, reverse ≈ 0.

    6000 probes: σ = √(0.1·0.9/6000) = 0.39 points, so 8-12 % is ±5.2σ (false failure ~2e-7).
    """
    table = "smfscal"
    rules = [
        ["add", "table", "inet", table],
        ["add", "chain", "inet", table, "input", "{ type filter hook input priority 0 ; }"],
        ["add", "rule", "inet", table, "input", "udp", "dport", str(PORT), "numgen", "random", "mod", "100", "<", "10",
         "drop"],
    ]  # fmt: skip
    try:
        for rule in rules:
            out = _in(NS_B, "nft", *rule)
            assert out.returncode == 0, out.stderr
        n = 6000
        m = _probe(n, 0.0003)
        print(json.dumps(m, indent=1))
        assert 100 * math.sqrt(0.1 * 0.9 / n) * 5 <= 2.0  # the 8-12 % window is ≥ 5σ wide each side
        assert 8.0 <= m["loss_fwd_pct"] <= 12.0
        assert m["loss_rev_pct"] <= 0.2
        profile = LinkProfile.from_mapping({"forward": {"loss": "10%"}})
        rows = compare(profile, m, base_rtt_ms=m["rtt_median_ms"])
        print(format_table(rows))
        assert {r["metric"]: r["ok"] for r in rows}["loss a→b"] is True
    finally:
        _in(NS_B, "nft", "delete", "table", "inet", table)
