"""Calibration arithmetic, the configured-vs-measured table, and the probe/bulk protocol over loopback."""

from __future__ import annotations

import json
import math
import socket
import threading
from collections.abc import Iterator

import pytest

from netem.calibrate import _main, bulk, compare, format_table, loss_stderr_pct, probe, probes_for_loss, serve
from netem.profile import LinkProfile


def test_probe_count_for_twenty_percent_relative_error() -> None:
    assert probes_for_loss(1.0) == 2475  # (1-0.01) / (0.01 · 0.04)
    assert probes_for_loss(10.0) == 225
    assert probes_for_loss(0.0) == 200  # nothing to estimate: the minimum
    assert probes_for_loss(0.001) == 20_000  # clamped
    p, n = 5.0, probes_for_loss(5.0)
    assert loss_stderr_pct(p, n) / p == pytest.approx(0.2, rel=0.01)


def _measured(**kw: float) -> dict:
    base = {"sent": 2475, "server_received": 2450, "replies": 2426, "rtt_median_ms": 100.4, "rtt_p10_ms": 100.1,
            "rtt_p90_ms": 101.0, "rtt_p99_ms": 102.0, "loss_fwd_pct": 1.0, "loss_rev_pct": 1.0, "loss_pct": 1.98}  # fmt: skip
    return base | kw


def test_compare_rows() -> None:
    profile = LinkProfile.from_mapping({"delay": "50ms", "loss": "1%", "rate": "100mbit"})
    rows = {r["metric"]: r for r in compare(profile, _measured(bulk_mbps=11.9))}
    assert rows["rtt median"]["configured"] == 100 and rows["rtt median"]["ok"] is True
    assert rows["loss a→b"]["configured"] == 1 and rows["loss a→b"]["ok"] is True
    assert rows["loss round trip"]["configured"] == pytest.approx(1.99)
    assert rows["throughput a→b"]["configured"] == 12.5 and rows["throughput a→b"]["ok"] is True
    assert rows["rtt p90"]["ok"] is None
    table = format_table(list(rows.values()))
    assert "rtt median" in table and "NO" not in table


def test_compare_flags_misses() -> None:
    profile = LinkProfile.from_mapping({"delay": "50ms", "loss": "1%"})
    rows = {r["metric"]: r for r in compare(profile, _measured(rtt_median_ms=120.0, loss_fwd_pct=3.0))}
    assert rows["rtt median"]["ok"] is False and rows["loss a→b"]["ok"] is False
    assert rows["loss b→a"]["ok"] is True
    nan = {r["metric"]: r for r in compare(profile, _measured(rtt_median_ms=math.nan))}
    assert nan["rtt median"]["ok"] is False


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=serve, args=("127.0.0.1", port, stop, ready), daemon=True)
    thread.start()
    assert ready.wait(5)
    yield port
    stop.set()
    thread.join(5)


def test_probe_over_loopback(server: int) -> None:
    m = probe("127.0.0.1", server, count=300, interval=0.0005, timeout=0.5)
    assert m["sent"] == 300 and m["server_received"] == 300 and m["replies"] == 300
    assert m["loss_fwd_pct"] == 0 and m["loss_rev_pct"] == 0
    assert 0 < m["rtt_min_ms"] <= m["rtt_p10_ms"] <= m["rtt_median_ms"] <= m["rtt_p99_ms"] <= m["rtt_max_ms"]


def test_probe_with_no_server_reports_total_loss() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never answers
        m = probe("127.0.0.1", port, count=20, interval=0.001, timeout=0.2)
    assert m["replies"] == 0 and m["loss_pct"] == 100 and m["loss_fwd_pct"] == 100
    assert math.isnan(m["rtt_median_ms"])


def test_bulk_over_loopback(server: int) -> None:
    assert bulk("127.0.0.1", server, seconds=0.3) > 1.0


def test_cli_probe_prints_json(server: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(["probe", "--host", "127.0.0.1", "--port", str(server), "--count", "50", "--interval", "0.001",
                  "--timeout", "0.3"]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert out["sent"] == 50 and out["replies"] == 50
