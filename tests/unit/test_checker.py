"""Checker: every category on hand-made ledgers and listings, verdicts, unknown on bad input, a property."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workloads.checker import CheckError, CheckResult, Verdict, check, check_dirs, verdict_for
from workloads.ledger import LedgerEntry, LedgerWriter, Outcome
from workloads.payload import expected_digest

SIZE = 64


def op(log: int, seq: int, outcome: str = "ok", size: int = SIZE) -> LedgerEntry:
    """The ledger entry of tester ``log`` (one tester per log) appending ``seq``."""
    done = None if outcome == "info" else 2.0
    return LedgerEntry(log, log, seq, size, expected_digest(log, seq, size), 1.0, done, Outcome(outcome))


def rec(log: int, seq: int, size: int = SIZE) -> list[object]:
    """The mirror record a correct stack holds for that append."""
    return [seq, size, expected_digest(log, seq, size)]


def listing(**logs: list[list[object]]) -> dict[str, object]:
    """A site listing; keyword ``l3=[...]`` is log "3"."""
    return {"logs": {name.removeprefix("l"): records for name, records in logs.items()}, "stores": []}


def ops(log: int, outcomes: str) -> list[LedgerEntry]:
    """Ops seq 0.. of ``log``; outcomes as letters: o ok, f fail, i info."""
    names = {"o": "ok", "f": "fail", "i": "info"}
    return [op(log, seq, names[c]) for seq, c in enumerate(outcomes)]


# --- categories ---------------------------------------------------------------------------------------

def test_clean_run_is_ok() -> None:
    r = check(ops(1, "ooo") + ops(2, "oo"), listing(l1=[rec(1, s) for s in range(3)], l2=[rec(2, 0), rec(2, 1)]))
    assert (r.attempted, r.acked, r.lost, r.corrupt, r.unexpected, r.prefix_violations) == (5, 5, 0, 0, 0, 0)
    assert r.mirror_logs == 2 and r.mirror_records == 5
    assert r.verdict is Verdict.OK and r.verdict.exit_code == 0


def test_lost_acked_suffix() -> None:
    r = check(ops(1, "oooo"), listing(l1=[rec(1, 0), rec(1, 1)]))
    assert r.lost == 2 and r.lost_examples == (("1", 2), ("1", 3))
    assert r.logs["1"].first_lost == 2 and r.logs["1"].max_acked_seq == 3 and r.logs["1"].mirror_prefix == 2
    assert r.verdict is Verdict.DATA_LOSS and r.verdict.exit_code == 1
    assert "first lost: log 1 seq 2" in r.summary_line()


def test_whole_log_missing_on_mirror_is_lost() -> None:
    r = check(ops(1, "oo") + ops(2, "oo"), listing(l1=[rec(1, 0), rec(1, 1)]))
    assert r.lost == 2 and r.lost_examples == (("2", 0), ("2", 1))


def test_unacked_absent_ops_are_not_lost() -> None:
    r = check(ops(1, "ofi"), listing(l1=[rec(1, 0)]))
    assert (r.acked, r.failed, r.indeterminate, r.lost) == (1, 1, 1, 0)
    assert r.verdict is Verdict.OK


def test_corrupt_digest() -> None:
    bad = [1, SIZE, expected_digest(1, 2, SIZE)]  # seq 1 holds seq 2's payload
    r = check(ops(1, "oo"), listing(l1=[rec(1, 0), bad]))
    assert r.corrupt == 1 and r.examples["corrupt"] == (("1", 1),) and r.lost == 0
    assert "log 1 seq 1: mirror has size 64" in r.notes[0]
    assert r.verdict is Verdict.DATA_LOSS


def test_corrupt_size() -> None:
    r = check(ops(1, "oo"), listing(l1=[rec(1, 0), [1, SIZE - 1, expected_digest(1, 1, SIZE)]]))
    assert r.corrupt == 1 and r.logs["1"].corrupt == 1


def test_corrupt_counts_whatever_the_outcome() -> None:
    r = check(ops(1, "oi"), listing(l1=[rec(1, 0), rec(1, 1, size=5)]))
    assert r.corrupt == 1 and r.recovered == 0


def test_unexpected_record_never_invoked() -> None:
    r = check(ops(1, "oo"), listing(l1=[rec(1, 0), rec(1, 1), rec(1, 2)], l9=[rec(9, 0)]))
    assert r.unexpected == 2 and r.examples["unexpected"] == (("1", 2), ("9", 0))
    assert r.prefix_violations == 0
    assert r.verdict is Verdict.DATA_LOSS and verdict_for(r, durable=False) is Verdict.DATA_LOSS


def test_recovered_info_op_is_counted_not_an_error() -> None:
    r = check(ops(1, "ooi"), listing(l1=[rec(1, 0), rec(1, 1), rec(1, 2)]))
    assert r.recovered == 1 and r.indeterminate == 1 and r.examples["recovered"] == (("1", 2),)
    assert r.verdict is Verdict.OK


def test_failed_op_present_on_mirror_is_recovered_failed_not_loss() -> None:
    # An append may fail at the primary after its bytes left for the mirror: explained, not data loss.
    r = check(ops(1, "of"), listing(l1=[rec(1, 0), rec(1, 1)]))
    assert r.recovered_failed == 1 and r.failed == 1 and r.unexpected == 0 and r.recovered == 0
    assert r.examples["recovered_failed"] == (("1", 1),)
    assert r.verdict is Verdict.OK


def test_prefix_violation_hole_at_start() -> None:
    r = check(ops(1, "ooo"), listing(l1=[rec(1, 1), rec(1, 2)]))
    assert r.prefix_violations == 1 and r.lost == 1
    assert r.logs["1"].first_hole == 0 and r.logs["1"].mirror_prefix == 0
    assert r.examples["prefix_violations"] == (("1", 0),)
    assert r.verdict is Verdict.DATA_LOSS and verdict_for(r, durable=False) is Verdict.DATA_LOSS


def test_prefix_violation_hole_in_the_middle() -> None:
    r = check(ops(1, "oooo") + ops(2, "oo"),
              listing(l1=[rec(1, 0), rec(1, 1), rec(1, 3)], l2=[rec(2, 0), rec(2, 1)]))
    assert r.prefix_violations == 1 and r.lost == 1 and r.lost_examples == (("1", 2),)
    assert r.logs["1"].first_hole == 2 and r.logs["2"].first_hole is None
    assert "seqs 0..1 then 3" in " ".join(r.notes)


def test_prefix_violation_duplicate_and_disorder() -> None:
    dup = check(ops(1, "oo"), listing(l1=[rec(1, 0), rec(1, 0), rec(1, 1)]))
    swapped = check(ops(1, "oo"), listing(l1=[rec(1, 1), rec(1, 0)]))
    assert dup.prefix_violations == 1 and dup.corrupt == 0
    assert swapped.prefix_violations == 1 and swapped.lost == 0


def test_examples_are_capped_and_sorted_numerically() -> None:
    entries = ops(10, "o" * 30) + ops(2, "o" * 30)
    r = check(entries, listing())
    assert r.lost == 60 and len(r.lost_examples) == 10
    assert r.lost_examples[0] == ("2", 0) and list(r.logs) == ["2", "10"]


def test_two_testers_on_one_log_seq_is_a_check_error() -> None:
    clash = LedgerEntry(5, 1, 0, SIZE, expected_digest(1, 0, SIZE), 1.0, 2.0, Outcome.OK)
    with pytest.raises(CheckError, match="testers 1 and 5"):
        check([op(1, 0), clash], listing())


@pytest.mark.parametrize("bad", [
    {}, {"logs": []}, {"logs": {"1": {}}}, {"logs": {"1": [[0, 1]]}}, {"logs": {"1": [[-1, 1, "x"]]}},
    {"logs": {"1": [["0", 1, "x"]]}},
])
def test_malformed_listing_is_a_check_error(bad: dict[str, object]) -> None:
    with pytest.raises(CheckError):
        check(ops(1, "o"), bad)


# --- verdicts -----------------------------------------------------------------------------------------

def test_non_durable_mode_reports_losses_but_keeps_ok() -> None:
    r = check(ops(1, "ooo"), listing(l1=[rec(1, 0)]), durable=False)
    assert r.lost == 2 and r.verdict is Verdict.OK
    assert verdict_for(r, durable=True) is Verdict.DATA_LOSS
    assert r.summary_line().startswith("ok (non-durable): ")


def test_nothing_acked_is_unknown_even_with_unexpected_records() -> None:
    # With no acked op nothing was measured; typically the ledger is missing and every record would
    # look unexpected: unknown, never a false data-loss alarm.
    r = check(ops(1, "ii"), listing(l1=[rec(1, 0), rec(1, 1), rec(1, 2)]))
    assert r.acked == 0 and r.unexpected == 1
    assert r.verdict is Verdict.UNKNOWN and verdict_for(r, durable=False) is Verdict.UNKNOWN
    assert check([], listing()).verdict is Verdict.UNKNOWN


def test_error_result_is_unknown() -> None:
    r = CheckResult(acked=5, lost=5, error="boom")
    assert verdict_for(r, durable=True) is Verdict.UNKNOWN and r.verdict.exit_code == 2


def test_to_dict_is_json_friendly() -> None:
    r = check(ops(1, "ooi"), listing(l1=[rec(1, 0), rec(1, 2)]))
    d = json.loads(json.dumps(r.to_dict()))
    assert d["verdict"] == "data-loss" and d["lost"] == 1 and d["examples"]["lost"] == [["1", 1]]
    assert d["logs"]["1"]["first_hole"] == 1 and d["error"] is None


# --- check_dirs: files, directories, unknown on bad input --------------------------------------------

def write_ledger(directory: Path, entries: list[LedgerEntry]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ledger.jsonl").write_text("".join(e.to_json() + "\n" for e in entries))


def test_check_dirs_with_listing_file_and_listing_dir(tmp_path: Path) -> None:
    write_ledger(tmp_path / "ledgers", ops(1, "ooo"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "listing.json").write_text(json.dumps(listing(l1=[rec(1, 0), rec(1, 1)])))
    for mirror in (tmp_path / "m" / "listing.json", tmp_path / "m"):
        r = check_dirs(tmp_path / "ledgers", mirror)
        assert r.error is None and r.lost == 1 and r.verdict is Verdict.DATA_LOSS
        assert r.inputs["ledger"] == {"files": 1, "lines": 3, "torn_tail": 0}


def test_check_dirs_tolerates_torn_tail(tmp_path: Path) -> None:
    write_ledger(tmp_path / "ledgers", ops(1, "oo"))
    with open(tmp_path / "ledgers" / "ledger.jsonl", "a") as f:
        f.write(op(1, 2).to_json()[:30])
    (tmp_path / "listing.json").write_text(json.dumps(listing(l1=[rec(1, 0), rec(1, 1)])))
    r = check_dirs(tmp_path / "ledgers", tmp_path / "listing.json")
    assert r.verdict is Verdict.OK and r.inputs["ledger"]["torn_tail"] == 1


@pytest.mark.parametrize("case", ["bad-json", "missing-mirror", "missing-ledger", "bad-ledger", "bad-listing"])
def test_check_dirs_bad_input_is_unknown(tmp_path: Path, case: str) -> None:
    ledgers, mirror = tmp_path / "ledgers", tmp_path / "listing.json"
    write_ledger(ledgers, ops(1, "oo"))
    mirror.write_text(json.dumps(listing()))  # everything lost: data-loss if it were read
    if case == "bad-json":
        mirror.write_text("{not json")
    elif case == "missing-mirror":
        mirror = tmp_path / "nowhere"
    elif case == "missing-ledger":
        ledgers = tmp_path / "no-ledgers"
    elif case == "bad-ledger":
        (ledgers / "ledger.jsonl").write_text('{"tester": 1}\n' + op(1, 1).to_json() + "\n")
    elif case == "bad-listing":
        mirror.write_text(json.dumps({"logs": {"1": "oops"}}))
    r = check_dirs(ledgers, mirror)
    assert r.verdict is Verdict.UNKNOWN and r.error and r.lost == 0
    assert r.summary_line().startswith("unknown (durable): check failed: ")


def test_check_dirs_checker_bug_is_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import workloads.checker as checker

    def boom(*args: object, **kwargs: object) -> CheckResult:
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(checker, "check", boom)
    write_ledger(tmp_path / "l", ops(1, "o"))
    (tmp_path / "listing.json").write_text(json.dumps(listing()))
    r = check_dirs(tmp_path / "l", tmp_path / "listing.json")
    assert r.verdict is Verdict.UNKNOWN and "ZeroDivisionError" in (r.error or "")


def test_check_dirs_on_a_real_site_directory(tmp_path: Path) -> None:
    logstore = pytest.importorskip("smfs.logstore")
    from workloads.payload import payload

    (tmp_path / "ledgers").mkdir()
    with LedgerWriter(tmp_path / "ledgers" / "t3.jsonl") as w:
        for seq in range(4):
            w.invoke(3, 3, seq, SIZE, expected_digest(3, seq, SIZE))
            w.complete(3, seq, "ok")
    with logstore.LogStore.open(tmp_path / "site" / "server-0", sync=False) as store:
        for seq in range(3):
            store.append(3, seq, payload(3, seq, SIZE))
    r = check_dirs(tmp_path / "ledgers", tmp_path / "site")
    assert r.error is None, r.error
    assert (r.acked, r.lost, r.corrupt, r.lost_examples) == (4, 1, 0, (("3", 3),))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no log store" in (check_dirs(tmp_path / "ledgers", empty).error or "")


# --- property: deleting a suffix of each log loses exactly its acked ops -------------------------------

@st.composite
def ledgers_and_cuts(draw: st.DrawFn) -> tuple[list[LedgerEntry], dict[str, int]]:
    """Random logs of random outcomes, and for each a kept-prefix length."""
    entries: list[LedgerEntry] = []
    keep: dict[str, int] = {}
    for log in draw(st.lists(st.integers(0, 300), max_size=6, unique=True)):
        outcomes = draw(st.text(alphabet="ofi", max_size=25))
        entries += ops(log, outcomes)
        keep[str(log)] = draw(st.integers(0, len(outcomes)))
    return entries, keep


@settings(max_examples=200, deadline=None)
@given(ledgers_and_cuts())
def test_lost_equals_acked_ops_in_deleted_suffixes(case: tuple[list[LedgerEntry], dict[str, int]]) -> None:
    entries, keep = case
    mirror = {"logs": {name: [rec(int(name), s) for s in range(k)] for name, k in keep.items()}}
    r = check(entries, mirror)
    cut = [e for e in entries if e.seq >= keep[str(e.log)]]
    kept = [e for e in entries if e.seq < keep[str(e.log)]]
    assert r.lost == sum(e.outcome is Outcome.OK for e in cut)
    assert r.recovered == sum(e.outcome is Outcome.INFO for e in kept)
    assert r.recovered_failed == sum(e.outcome is Outcome.FAIL for e in kept)
    assert (r.corrupt, r.unexpected, r.prefix_violations) == (0, 0, 0)
    assert r.attempted == len(entries) and r.mirror_records == len(kept)
    expected = Verdict.UNKNOWN if r.acked == 0 else (Verdict.DATA_LOSS if r.lost else Verdict.OK)
    assert r.verdict is expected
