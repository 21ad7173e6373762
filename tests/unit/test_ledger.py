"""Ledger writer and reader: kill-safety, torn tails, validation; payload determinism and digests."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from workloads.ledger import (
    LedgerEntry,
    LedgerError,
    LedgerWriter,
    Outcome,
    load_ledgers,
    normalize,
)
from workloads.payload import SHAKE_MAX, digest, expected_digest, payload

D = "0" * 32


def line(**over: object) -> str:
    fields: dict[str, object] = {"tester": 1, "log": 1, "seq": 0, "size": 10, "digest": D, "t_invoke": 1.5,
                                 "t_complete": 2.5, "outcome": "ok"}
    fields.update(over)
    return json.dumps(fields)


# --- payload ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 7, 4096, SHAKE_MAX - 1, SHAKE_MAX, SHAKE_MAX + 3, 1 << 20])
def test_payload_is_deterministic_and_sized(size: int) -> None:
    data = payload(3, 17, size)
    assert len(data) == size
    assert data == payload(3, 17, size)
    if size >= 16:
        assert data != payload(3, 18, size) and data != payload(4, 17, size)


def test_digest_is_blake2b_16_hex() -> None:
    data = payload(0, 0, 100)
    assert digest(data) == hashlib.blake2b(data, digest_size=16).hexdigest()
    assert expected_digest(0, 0, 100) == digest(data)
    assert len(digest(b"")) == 32


def test_digest_matches_logstore_when_available() -> None:
    logstore = pytest.importorskip("smfs.logstore")
    if not hasattr(logstore, "payload_digest"):
        pytest.skip("smfs.logstore.payload_digest not written yet")
    data = payload(5, 9, 5000)
    assert logstore.payload_digest(data) == digest(data)


@pytest.mark.parametrize("args", [(-1, 0, 1), (0, -1, 1), (0, 0, -1), (True, 0, 1), (0, 2**64, 1)])
def test_payload_rejects_bad_arguments(args: tuple[int, int, int]) -> None:
    with pytest.raises((TypeError, ValueError)):
        payload(*args)


# --- entries -----------------------------------------------------------------------------------------

def test_entry_round_trips() -> None:
    entry = LedgerEntry(1, 2, 3, 4, D, 10.0, None, Outcome.INFO)
    assert LedgerEntry.from_json(entry.to_json()) == entry
    done = LedgerEntry(1, 2, 3, 4, D, 10, 11, "fail")  # type: ignore[arg-type]
    assert done.outcome is Outcome.FAIL and isinstance(done.t_complete, float)
    assert json.loads(done.to_json())["outcome"] == "fail"


@pytest.mark.parametrize(("over", "field"), [
    ({"seq": "3"}, "seq"),
    ({"seq": True}, "seq"),
    ({"size": -1}, "size"),
    ({"digest": "XYZ"}, "digest"),
    ({"t_invoke": None}, "t_invoke"),
    ({"outcome": "maybe"}, "outcome"),
    ({"outcome": "info"}, "t_complete"),  # info must have t_complete null
    ({"t_complete": None}, "t_complete"),  # ok must have a t_complete
    ({"t_ack": 2.0}, "t_ack"),  # unknown field
])
def test_entry_validation_names_the_field(over: dict[str, object], field: str) -> None:
    with pytest.raises(LedgerError) as info:
        LedgerEntry.from_json(line(**over))
    assert info.value.field == field


def test_missing_field_is_named() -> None:
    obj = json.loads(line())
    del obj["digest"]
    with pytest.raises(LedgerError, match="'digest'"):
        LedgerEntry.from_json(json.dumps(obj))


# --- writer ------------------------------------------------------------------------------------------

def test_writer_invoke_then_complete_folds_to_final(tmp_path: Path) -> None:
    with LedgerWriter(tmp_path / "t1.jsonl") as writer:
        t0 = writer.invoke(1, 1, 0, 10, D)
        writer.invoke(1, 1, 1, 10, D)
        writer.invoke(1, 1, 2, 10, D)
        done = writer.complete(1, 0, "ok")
        writer.complete(1, 2, Outcome.FAIL)
        assert writer.pending == 1
    raw = (tmp_path / "t1.jsonl").read_text().splitlines()
    assert len(raw) == 5 and json.loads(raw[0])["outcome"] == "info"
    ledger = load_ledgers(tmp_path)
    assert [e.outcome for e in ledger] == [Outcome.OK, Outcome.INFO, Outcome.FAIL]
    assert ledger.entries[0] == done and done.t_invoke == t0 and done.t_complete >= t0
    assert ledger.stats.to_dict() == {"files": 1, "lines": 5, "torn_tail": 0}


def test_writer_misuse_is_an_error(tmp_path: Path) -> None:
    with LedgerWriter(tmp_path / "t.jsonl") as writer:
        with pytest.raises(LedgerError, match="never invoked"):
            writer.complete(1, 0, "ok")
        writer.invoke(1, 1, 0, 10, D)
        with pytest.raises(LedgerError, match="twice"):
            writer.invoke(1, 1, 0, 10, D)
        with pytest.raises(LedgerError, match="pending"):
            writer.complete(1, 0, "info")
    with pytest.raises(LedgerError, match="closed"):
        writer.invoke(1, 1, 1, 10, D)


_KILLED_CHILD = """
import os, signal, sys
from workloads.ledger import LedgerWriter
w = LedgerWriter(sys.argv[1], sync=True)
for seq in range(5):
    w.invoke(7, 7, seq, 10, "0" * 32)
    w.complete(7, seq, "ok")
w.invoke(7, 7, 5, 10, "0" * 32)  # sent, then the tester is killed before the answer
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sigkill_mid_operation_leaves_the_op_as_info(tmp_path: Path) -> None:
    path = tmp_path / "t7.jsonl"
    proc = subprocess.run([sys.executable, "-c", _KILLED_CHILD, str(path)], cwd=Path(__file__).parents[2],
                          capture_output=True)
    assert proc.returncode == -9, proc.stderr
    ledger = load_ledgers(tmp_path)
    assert [(e.seq, e.outcome) for e in ledger] == [(s, Outcome.OK) for s in range(5)] + [(5, Outcome.INFO)]


# --- reader ------------------------------------------------------------------------------------------

def test_torn_last_line_is_ignored_and_counted(tmp_path: Path) -> None:
    good = line(seq=0)
    (tmp_path / "a.jsonl").write_text(good + "\n" + line(seq=1)[:25])
    (tmp_path / "b.jsonl").write_text(line(tester=2, log=2) + "\n" + "\0" * 40)
    ledger = load_ledgers(tmp_path)
    assert len(ledger) == 2
    assert ledger.stats.torn_tail == 2 and ledger.stats.lines == 2 and ledger.stats.files == 2


def test_unterminated_last_line_that_parses_is_kept(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(line(seq=0) + "\n" + line(seq=1))
    ledger = load_ledgers(tmp_path)
    assert [e.seq for e in ledger] == [0, 1] and ledger.stats.torn_tail == 0


def test_malformed_middle_line_names_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join([line(seq=0), line(seq=1, size="big"), line(seq=2)]) + "\n")
    with pytest.raises(LedgerError) as info:
        load_ledgers(tmp_path)
    assert (info.value.path, info.value.line, info.value.field) == (str(path), 2, "size")
    assert f"{path}:2: field 'size'" in str(info.value)


def test_malformed_terminated_last_line_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(line(seq=0) + "\n{not json\n")
    with pytest.raises(LedgerError, match=r"a\.jsonl:2: not JSON"):
        load_ledgers(tmp_path)


def test_conflicting_lines_for_one_op_are_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(line(seq=0) + "\n")
    (tmp_path / "b.jsonl").write_text(line(seq=0, size=11) + "\n")
    with pytest.raises(LedgerError, match=r"b\.jsonl:1: .*disagrees with .*a\.jsonl:1"):
        load_ledgers(tmp_path)


def test_missing_or_unreadable_input_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="no such file"):
        load_ledgers(tmp_path / "nope")
    with pytest.raises(LedgerError, match="cannot read"):
        load_ledgers([tmp_path / "nope.jsonl"])


def test_last_line_wins_across_files_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(line(outcome="info", t_complete=None) + "\n")
    (tmp_path / "b.jsonl").write_text(line(outcome="ok") + "\n")
    assert [e.outcome for e in load_ledgers(tmp_path)] == [Outcome.OK]
    assert [e.outcome for e in load_ledgers([tmp_path / "b.jsonl", tmp_path / "a.jsonl"])] == [Outcome.INFO]


def test_normalize_writes_one_line_per_op(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    src.mkdir()
    for tester in (1, 2):
        with LedgerWriter(src / f"t{tester}.jsonl") as writer:
            for seq in range(3):
                writer.invoke(tester, tester, seq, 10, D)
            writer.complete(tester, 0, "ok")
            writer.complete(tester, 2, "fail")
    with open(src / "t2.jsonl", "a") as f:
        f.write(line(tester=2, log=2, seq=3)[:20])
    out = tmp_path / "norm"
    ledger = normalize(src, out)
    assert ledger.stats.torn_tail == 1
    assert sorted(os.listdir(out)) == ["t1.jsonl", "t2.jsonl"]
    assert len((out / "t1.jsonl").read_text().splitlines()) == 3
    again = load_ledgers(out)
    assert again.entries == ledger.entries and again.stats.lines == 6 and again.stats.torn_tail == 0
    normalize(src, src)  # in place
    assert load_ledgers(src).entries == ledger.entries
