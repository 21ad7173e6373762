"""The rate check of a calibration (issue 12): the rows it makes from a paced UDP stream, how they mark
a point unfaithful, and the stream's sender and counter over loopback."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from netem.calibrate import (
    RATE_OK_FACTOR,
    RATE_OVERDRIVE,
    _main,
    compare,
    format_table,
    rate_count,
    rate_datagram_size,
    rate_measured,
    rate_rows,
    rate_send,
)
from netem.profile import LinkProfile
from testbed.drill import experiment as ex
from testbed.vm.wan import calibration_result

ROOT = Path(__file__).resolve().parents[2]


def _rows(wan: dict[str, Any], **measured: Any) -> dict[str, dict[str, Any]]:
    return {r["metric"]: r for r in rate_rows(LinkProfile.from_mapping(wan).a_to_b, measured)}


def _stream(rate: float, sent: float | None, delivered: float | None) -> dict[str, Any]:
    return {"rate_wanted_mbps": RATE_OVERDRIVE * rate, "rate_sent_mbps": sent, "rate_delivered_mbps": delivered}


def test_a_path_that_carries_the_rate_is_ok() -> None:
    rows = _rows({"rate": "8mbit"}, **_stream(8, 8.8, 7.97))
    assert rows["rate sent a→b"]["ok"] is True and rows["rate sent a→b"]["configured"] == pytest.approx(8.8)
    rate = rows["rate a→b"]
    assert rate["ok"] is True and rate["configured"] == 8 and rate["measured"] == pytest.approx(7.97)
    assert rate["unit"] == "Mbit/s" and rate["tolerance"] is None and "needs ≥ 7.2 Mbit/s" in rate["note"]


def test_a_path_short_of_the_rate_is_not_ok_and_says_the_path() -> None:
    rows = _rows({"rate": "100mbit"}, **_stream(100, 110.0, 19.8))
    assert rows["rate sent a→b"]["ok"] is True
    assert rows["rate a→b"]["ok"] is False and rows["rate a→b"]["measured"] == pytest.approx(19.8)
    assert "the path is short" in rows["rate a→b"]["note"]
    just_under = _rows({"rate": "100mbit"}, **_stream(100, 110.0, 100 * RATE_OK_FACTOR - 0.01))
    assert just_under["rate a→b"]["ok"] is False
    # datagrams that reached the receiver but overflowed its socket were carried by the path: they count
    slow_reader = _rows({"rate": "1gbit"}, **_stream(1000, 1097.0, 984.0), rate_read_mbps=870.0, rate_overflowed=5256)
    assert slow_reader["rate a→b"]["ok"] is True and slow_reader["rate a→b"]["measured"] == pytest.approx(984)
    assert "delivered 984 Mbit/s (870 read, 5256 datagrams overflowed the reader's socket)" in (
        slow_reader["rate a→b"]["note"])


def test_a_sender_short_of_the_rate_makes_the_point_unfaithful() -> None:
    """The paper's 1 Gbit/s from a TCG guest: the sender itself cannot offer it."""
    rows = _rows({"rate": "1gbit"}, **_stream(1000, 45.2, 44.9))
    sent = rows["rate sent a→b"]
    assert sent["ok"] is False and sent["configured"] == pytest.approx(1100) and sent["measured"] == 45.2
    assert "the guest could send only 45.2 Mbit/s" in sent["note"]
    assert rows["rate a→b"]["ok"] is False and "the sender was short" in rows["rate a→b"]["note"]
    # a sender that offers less than 1.1x but at least 0.9x the rate has tested the path well enough
    assert _rows({"rate": "10mbit"}, **_stream(10, 9.5, 9.4))["rate sent a→b"]["ok"] is True


def test_the_delivered_rate_is_corrected_for_the_configured_loss() -> None:
    rows = _rows({"rate": "10mbit", "loss": "5%"}, **_stream(10, 11.0, 8.7))
    rate = rows["rate a→b"]
    assert rate["measured"] == pytest.approx(8.7 / 0.95, abs=1e-3)  # 9.158: ok, where 8.7 alone is not
    assert rate["ok"] is True and "÷ (1 - 5 % loss)" in rate["note"]
    only_reverse_loss = _rows({"rate": "10mbit", "reverse": {"loss": "5%"}}, **_stream(10, 11.0, 8.7))
    assert only_reverse_loss["rate a→b"]["ok"] is False  # b→a loss does not touch the a→b stream


def test_no_rate_no_row() -> None:
    assert _rows({"delay": "50ms"}, **_stream(8, 8.8, 8.0)) == {}  # nothing to check against
    assert _rows({"rate": "8mbit"}) == {}  # not measured (rate_seconds = 0): no row either
    assert [r["metric"] for r in compare(LinkProfile.from_mapping({"rate": "8mbit"}), {"rtt_median_ms": 1.0})
            if r["metric"].startswith("rate")] == []  # fmt: skip


def test_a_failed_measurement_is_one_row_not_ok() -> None:
    rows = _rows({"rate": "8mbit"}, **rate_measured(None, "rate-send: no rate counter answered at 1.2.3.4:7789"))
    assert list(rows) == ["rate a→b"] and rows["rate a→b"]["ok"] is False
    assert "not measured: rate-send: no rate counter" in rows["rate a→b"]["note"]
    lost_result = rate_measured({"wanted_mbps": 8.8, "sent_mbps": 8.8, "counter": None})
    rows = _rows({"rate": "8mbit"}, **lost_result)
    assert rows["rate sent a→b"]["ok"] is True and rows["rate a→b"]["ok"] is False
    assert "did not report" in rows["rate a→b"]["note"]


def test_datagrams_fill_the_mtu_unless_the_rate_is_low() -> None:
    assert rate_datagram_size(8.8e6, 8972) == 8972  # 2.75 MB in the window: ~300 jumbo datagrams
    small = rate_datagram_size(110e3, 8972)  # 100 kbit/s: 100 datagrams in the window need ~340 bytes
    assert 64 < small < 400 and 110e3 * 2.5 / 8 / (small + 28) >= 100
    assert rate_datagram_size(1e3, 8972) == 64


def test_an_unfaithful_rate_flows_into_the_row_and_the_claims(tmp_path: Path) -> None:
    profile = LinkProfile.from_mapping({"delay": "10ms", "rate": "1gbit"})
    measured = {"sent": 200, "server_received": 200, "replies": 200, "rtt_median_ms": 22.0, "rtt_p10_ms": 21.9,
                "rtt_p90_ms": 22.1, "loss_fwd_pct": 0.0, "loss_rev_pct": 0.0, "loss_pct": 0.0,
                **_stream(1000, 45.2, 44.9)}  # fmt: skip
    cal = calibration_result(profile, measured, {"rtt_median_ms": 2.0, "rtt_p10_ms": 1.9, "rtt_p90_ms": 2.1}, "x")
    assert "rate a→b" in format_table(cal["rows"])
    ok, note = ex.faithfulness(cal)
    assert ok is False
    assert "rate a→b measured 44.9 Mbit/s, configured 1000 (delivered 44.9 Mbit/s" in note
    assert "the guest could send only 45.2 Mbit/s" in note and "± None" not in note
    exp = ex.load(ROOT / "experiments" / "latency.toml", quick=True)
    entry = {"mode": "remote-sync", "verdict": "ok", "throughput_MBps": 4.0}
    row = ex.row_of(entry, exp, 0, exp.points()[0], 0, 1, cal)
    assert row["faithful"] is False and row["calib_rate_Mbps"] == 44.9 and "rate a→b" in row["note"]
    good = calibration_result(LinkProfile.from_mapping({"delay": "10ms", "rate": "8mbit"}),
                              {**measured, **_stream(8, 8.8, 7.97)}, {"rtt_median_ms": 2.0}, "x")  # fmt: skip
    assert ex.faithfulness(good) == (True, "")
    # the unfaithful point is left out of a claim, the faithful one is kept
    rows = [{**row, "throughput_per_tester_MBps": 4.0}, {**row, "point": 1, "faithful": True,
                                                        "throughput_per_tester_MBps": 1.0}]  # fmt: skip
    judged = ex.judge(ex.Claim(text="t", kind="falls", mode="remote-sync", metric="throughput_per_tester_MBps"),
                      rows, exp)  # fmt: skip
    assert judged["verdict"] == "not judged"


# --- the stream over loopback ----------------------------------------------------------------------


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pair(rate_bps: float, seconds: float = 1.0) -> tuple[dict[str, Any], dict[str, Any]]:
    port = _free_udp_port()
    ready, counted = threading.Event(), {}
    t = threading.Thread(target=lambda: counted.update(rate_count("127.0.0.1", port, 30, skip=0.25, linger=0.2,
                                                                  ready=ready)), daemon=True)  # fmt: skip
    t.start()
    assert ready.wait(5)
    sent = rate_send("127.0.0.1", port, rate_bps, seconds, 1472)
    t.join(10)
    return sent, counted


def test_a_paced_stream_over_loopback_arrives_at_its_rate() -> None:
    sent, counted = _pair(20e6)
    assert sent["counter"] == counted and counted["ended"] is True
    assert sent["datagram_bytes"] == 1472 and sent["send_errors"] == 0
    assert sent["sent_mbps"] == pytest.approx(20, rel=0.05)  # paced: not faster than asked
    assert counted["delivered_mbps"] == pytest.approx(20, rel=0.1)
    m = rate_measured(sent)
    assert _rows({"rate": "18mbit"}, **m)["rate a→b"]["ok"] is True


def test_rate_send_without_a_counter_is_one_line() -> None:
    port = _free_udp_port()
    with pytest.raises(ConnectionError, match=f"no rate counter answered at 127.0.0.1:{port} in 0.5 s"):
        rate_send("127.0.0.1", port, 1e6, 0.2, hello_timeout=0.5)
    with pytest.raises(ValueError, match="must both be positive"):
        rate_send("127.0.0.1", port, 0, 1.0)


def test_cli_rate_send_refuses_a_bad_rate(capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(["rate-send", "--host", "127.0.0.1", "--rate", "fast"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("calibrate: --rate:") and err.count("\n") == 1


def test_cli_pair_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    port = _free_udp_port()
    ready = threading.Event()
    t = threading.Thread(target=rate_count, args=("127.0.0.1", port, 30), kwargs={"linger": 0.2, "ready": ready},
                         daemon=True)  # fmt: skip
    t.start()
    assert ready.wait(5)
    assert _main(["rate-send", "--host", "127.0.0.1", "--port", str(port), "--rate", "5mbit", "--seconds", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["wanted_mbps"] == 5 and out["counter"]["delivered_mbps"] > 4
    t.join(10)
