"""Calibration arithmetic, the configured-vs-measured table, and the probe/bulk protocol over loopback."""

from __future__ import annotations

import json
import math
import socket
import threading
from collections.abc import Iterator

import pytest

from netem.calibrate import (
    Z_95,
    _main,
    bulk,
    compare,
    format_table,
    loss_halfwidth_rel,
    loss_stderr_pct,
    probe,
    probe_interval,
    probes_for_loss,
    probes_for_profile,
    serve,
)
from netem.profile import LinkProfile


def test_probe_count_gives_twenty_percent_at_95_percent_confidence() -> None:
    assert probes_for_loss(1.0) == 9508  # 1.96² · (1-0.01) / (0.01 · 0.2²) = 9507.96
    assert probes_for_loss(10.0) == 865  # 1.96² · 0.9 / (0.1 · 0.04) = 864.36
    assert probes_for_loss(0.0) == 200  # nothing to estimate: the minimum
    assert probes_for_loss(100.0) == 200
    assert probes_for_loss(0.001) == 20_000  # clamped
    for pct in (1.0, 5.0, 10.0, 30.0):
        n = probes_for_loss(pct)
        assert Z_95 * loss_stderr_pct(pct, n) / pct <= 0.2 < Z_95 * loss_stderr_pct(pct, n - 1) / pct
        assert loss_halfwidth_rel(pct, n) == pytest.approx(0.2, rel=0.01)


def test_the_old_count_was_one_standard_error() -> None:
    # ~300 probes at 10 %: ±34 % at 95 % (13.3 % / 8.2 % per direction was no surprise)
    assert loss_halfwidth_rel(10.0, 300) == pytest.approx(0.34, abs=0.005)


def test_probe_count_covers_the_reverse_direction_and_bursts() -> None:
    ten = LinkProfile.from_mapping({"delay": "10ms", "loss": "10%"})
    # b→a sees only the 90 % that crossed a→b: 865 / 0.9
    assert probes_for_profile(ten) == 962
    assert probes_for_profile(LinkProfile.from_mapping({"delay": "10ms"})) == 200
    only_reverse = LinkProfile.from_mapping({"reverse": {"loss": "10%"}})
    assert probes_for_profile(only_reverse) == 865
    bursty = LinkProfile.from_mapping({"loss": "10%", "burst": 2})
    g = bursty.a_to_b.gilbert
    assert g is not None and g.variance_inflation == pytest.approx((2 - 0.5 - 1 / 18) / (0.5 + 1 / 18))
    assert probes_for_profile(bursty) > probes_for_profile(ten) * 2


def test_ten_percent_loss_calibrates_within_ten_seconds() -> None:
    n = probes_for_profile(LinkProfile.from_mapping({"delay": "10ms", "loss": "10%"}))
    interval = probe_interval(n)
    assert 0.002 <= interval <= 0.01
    assert n * interval <= 4.5  # + ~1.5 s server start + ~1 s tail + stats query: under 10 s
    assert probe_interval(200) == 0.01  # few probes: not faster than a TCG guest keeps up with
    assert probe_interval(20_000) == 0.002


def _measured(**kw: float) -> dict:
    base = {"sent": 2475, "server_received": 2450, "replies": 2426, "rtt_median_ms": 100.4, "rtt_p10_ms": 100.1,
            "rtt_p90_ms": 101.0, "rtt_p99_ms": 102.0, "loss_fwd_pct": 1.0, "loss_rev_pct": 1.0, "loss_pct": 1.98}  # fmt: skip
    return base | kw


def test_compare_rows() -> None:
    profile = LinkProfile.from_mapping({"delay": "50ms", "loss": "1%", "rate": "100mbit"})
    rows = {r["metric"]: r for r in compare(profile, _measured(bulk_mbps=11.9))}
    assert rows["rtt median"]["configured"] == 100 and rows["rtt median"]["ok"] is True
    assert "rtt bare" not in rows and "not measured" in rows["rtt median"]["note"]
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


def test_rtt_is_compared_with_twice_the_delay_plus_the_bare_path() -> None:
    profile = LinkProfile.from_mapping({"delay": "10ms"})
    measured = _measured(rtt_median_ms=23.1, loss_fwd_pct=0.0, loss_rev_pct=0.0, loss_pct=0.0)
    # a TCG guest pair: 3 ms bare RTT; 2 × 10 ms alone would call 23.1 ms a miss
    assert {r["metric"]: r for r in compare(profile, measured)}["rtt median"]["ok"] is False
    rows = {r["metric"]: r for r in compare(profile, measured, base_rtt_ms=3.0, base_spread_ms=0.4)}
    assert rows["rtt bare"]["measured"] == 3.0 and rows["rtt bare"]["ok"] is None
    assert rows["rtt median"]["configured"] == 23.0 and rows["rtt median"]["ok"] is True
    assert rows["rtt median"]["tolerance"] == pytest.approx(23.0 * 0.05 + 0.4)
    table = format_table(list(rows.values()))
    assert "rtt bare" in table and "20 delay a→b + b→a + 3.000 bare" in table


def test_bursty_loss_widens_the_tolerance() -> None:
    plain = LinkProfile.from_mapping({"loss": "1%"})
    bursty = LinkProfile.from_mapping({"loss": "1%", "burst": 5})
    tol = {name: {r["metric"]: r for r in compare(p, _measured())}["loss a→b"]["tolerance"]
           for name, p in (("plain", plain), ("bursty", bursty))}  # fmt: skip
    assert tol["bursty"] > 2 * tol["plain"]


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
