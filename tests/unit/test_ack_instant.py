"""``[faults] instant = "ack"``: the disaster strikes right after the first acked append the host sees
after ``fail_at`` (the adversary's instant: that append's packets may still be in flight).

The gate sits in the timeline and is passed once, just before the site's instant; the ledger sources
(the VM's virtio-serial stream, the namespace drill's files) tell an acked append's line from every other.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from testbed.drill.faults import Timeline
from testbed.drill.local import _LedgerDir
from testbed.drill.runner import await_ack
from testbed.drill.vm import LedgerStream
from testbed.spec import SpecError
from workloads.ledger import LedgerEntry, Outcome, is_ack_line

DIGEST = "ab" * 16


def _line(seq: int, outcome: Outcome) -> bytes:
    done = None if outcome is Outcome.INFO else 2.0
    return (LedgerEntry(0, 0, seq, 10, DIGEST, 1.0, done, outcome).to_json() + "\n").encode()


def test_only_an_ok_line_is_an_ack() -> None:
    assert is_ack_line(_line(1, Outcome.OK).strip())
    assert not is_ack_line(_line(1, Outcome.INFO).strip())
    assert not is_ack_line(_line(1, Outcome.FAIL).strip())
    assert not is_ack_line(b'{"outcome": "ok"}')  # not a ledger line
    assert not is_ack_line(b'\xff"ok"')


def test_the_gate_runs_once_right_before_the_instant() -> None:
    calls: list[str] = []
    tl = Timeline(say=lambda _m: None, gate=lambda: calls.append("gate"))
    tl.pass_gate()
    tl.pass_gate()
    assert calls == ["gate"] and tl.gate is None


class _Stream:
    def __init__(self, after: float | None) -> None:
        self.after, self.bytes = after, 0

    def close(self, wait: float = 5.0) -> int:
        return 0

    def wait_ack(self, timeout: float) -> float | None:
        if self.after is None:
            return None
        time.sleep(self.after)
        return time.time()


def test_await_ack_marks_the_ack_or_that_none_came() -> None:
    tl = Timeline(say=lambda _m: None)
    await_ack(_Stream(0.01), tl)
    await_ack(_Stream(None), tl, timeout=0.1)
    assert "an ack arrived" in tl.events[0]["event"] and "ack_seen" in tl.events[0]
    assert "no ack within 0.1 s" in tl.events[1]["event"]


def test_the_vm_ledger_stream_wakes_on_the_next_ack_not_on_other_lines(tmp_path: Path) -> None:
    path = str(tmp_path / "ledger.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    stream = LedgerStream(path, tmp_path / "raw" / "stream.jsonl")
    conn, _ = srv.accept()
    try:
        conn.sendall(_line(1, Outcome.OK))  # an ack before the wait does not count
        time.sleep(0.2)
        got: list[float | None] = []
        waiter = threading.Thread(target=lambda: got.append(stream.wait_ack(5)))
        waiter.start()
        time.sleep(0.1)
        whole = _line(2, Outcome.INFO) + _line(2, Outcome.OK)
        conn.sendall(whole[:-30])  # an invoke line, then half an ack line: no ack yet
        time.sleep(0.3)
        assert not got
        t_sent = time.time()
        conn.sendall(whole[-30:])
        waiter.join(5)
        assert got and got[0] is not None and got[0] >= t_sent
        assert stream.wait_ack(0.2) is None  # nothing more came
    finally:
        conn.close()
        stream.close(wait=1)
        srv.close()
    assert stream.wait_ack(0.1) is None  # an ended stream answers at once


def test_the_namespace_ledger_files_wake_on_the_next_ack(tmp_path: Path) -> None:
    (tmp_path / "tester-000.jsonl").write_bytes(_line(1, Outcome.INFO) + _line(1, Outcome.OK))
    src = _LedgerDir(tmp_path)
    assert src.wait_ack(0.2) is None  # what was there before the wait is not a new ack

    def later() -> None:
        time.sleep(0.2)
        with open(tmp_path / "tester-001.jsonl", "ab") as f:
            f.write(_line(5, Outcome.INFO))
            f.flush()
            time.sleep(0.2)
            f.write(_line(5, Outcome.OK))

    threading.Thread(target=later).start()
    t0 = time.time()
    seen = src.wait_ack(5)
    assert seen is not None and seen - t0 >= 0.35


def test_the_spec_takes_time_or_ack_only(tmp_path: Path) -> None:
    from testbed import spec as specmod

    text = (Path(__file__).resolve().parents[2] / "specs" / "ci.toml").read_text()
    for value, ok in (('"ack"', True), ('"time"', True), ('"soon"', False), ("1", False)):
        p = tmp_path / "s.toml"
        p.write_text(text.replace("[faults]", f"[faults]\ninstant = {value}", 1))
        if ok:
            specmod.load(p)
        else:
            with pytest.raises(SpecError, match="faults.instant"):
                specmod.load(p)
