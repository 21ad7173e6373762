"""Checker: every category on hand-made ledgers and listings, verdicts, unknown on bad input, a property."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workloads.checker import NO_EVIDENCE, CheckError, CheckResult, Verdict, check, check_dirs, verdict_for
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


STORE = {"path": "mirror/server-0", "records": 0, "bytes_truncated": 0, "records_dropped": 0, "reasons": []}
"""A ``stores`` entry: the listing came from a log store (evidence)."""


def listing(dropped: list[list[object]] | None = None, **logs: list[list[object]]) -> dict[str, object]:
    """A site listing read from one store; keyword ``l3=[...]`` is log "3"; ``dropped`` as site_listing's."""
    out: dict[str, object] = {"logs": {name.removeprefix("l"): records for name, records in logs.items()},
                              "stores": [STORE]}
    if dropped is not None:
        out["dropped"] = dropped
    return out


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


def test_nothing_acked_and_nothing_wrong_is_unknown() -> None:
    # With no acked op and a clean mirror nothing was measured: unknown, in every mode.
    r = check(ops(1, "ii"), listing(l1=[rec(1, 0), rec(1, 1)]))
    assert r.acked == 0 and r.recovered == 2
    assert r.verdict is Verdict.UNKNOWN and verdict_for(r, durable=False) is Verdict.UNKNOWN
    assert check([], listing()).verdict is Verdict.UNKNOWN
    assert check(ops(1, "fi"), listing(), durable=False).verdict is Verdict.UNKNOWN


@pytest.mark.parametrize("case", ["unexpected", "corrupt", "prefix"])
@pytest.mark.parametrize("durable", [True, False])
def test_nothing_acked_but_a_bad_mirror_is_data_loss(case: str, durable: bool) -> None:
    # Bytes nobody wrote, other bytes than were written, or a hole: data loss even with no acked op.
    mirror = {"unexpected": listing(l1=[rec(1, 0), rec(1, 1), rec(1, 2)]),
              "corrupt": listing(l1=[rec(1, 0), rec(1, 1, size=5)]),
              "prefix": listing(l1=[rec(1, 1)])}[case]
    r = check(ops(1, "ii"), mirror, durable=durable)
    assert r.acked == 0 and (r.unexpected, r.corrupt, r.prefix_violations) == (
        case == "unexpected", case == "corrupt", case == "prefix")
    assert r.verdict is Verdict.DATA_LOSS and r.verdict.exit_code == 1


# --- evidence: a listing from no log store is unknown, in every mode -----------------------------------

@pytest.mark.parametrize("stores", ["missing", "empty"])
@pytest.mark.parametrize("durable", [True, False])
def test_listing_from_no_store_is_unknown_in_every_mode(stores: str, durable: bool) -> None:
    # Every acked op absent: without a store this is missing evidence, not "all lost" (nor "ok").
    empty: dict[str, object] = {"logs": {}} if stores == "missing" else {"logs": {}, "stores": []}
    r = check(ops(1, "ooo") + ops(2, "of"), empty, durable=durable)
    assert r.verdict is Verdict.UNKNOWN and r.verdict.exit_code == 2
    assert r.error == f"{NO_EVIDENCE} (4 acked of 5 ops in the ledger)"
    assert (r.acked, r.lost, r.mirror_stores) == (0, 0, 0)
    assert verdict_for(r, durable=True) is Verdict.UNKNOWN and verdict_for(r, durable=False) is Verdict.UNKNOWN
    assert r.to_dict()["error"].startswith("no log store on the mirror: missing evidence")
    assert "check failed: no log store on the mirror" in r.summary_line()


def test_listing_from_no_store_is_unknown_even_with_records() -> None:
    # A hand-made listing with records but no store entry is still not evidence of a mirror's disk.
    r = check(ops(1, "oo"), {"logs": {"1": [rec(1, 0), rec(1, 1)]}})
    assert r.verdict is Verdict.UNKNOWN and (r.error or "").startswith(NO_EVIDENCE)


def test_store_with_no_record_is_evidence_the_mirror_got_nothing() -> None:
    r = check(ops(1, "ooo"), listing(), durable=True)
    assert r.error is None and r.lost == 3 and r.mirror_stores == 1 and r.verdict is Verdict.DATA_LOSS
    r = check(ops(1, "ooo"), listing(), durable=False)
    assert r.lost == 3 and r.verdict is Verdict.OK


def test_malformed_stores_is_a_check_error() -> None:
    with pytest.raises(CheckError, match="'stores': expected a list"):
        check(ops(1, "o"), {"logs": {}, "stores": {"path": "x"}})


# --- records the mirror's recovery dropped ---------------------------------------------------------------

def test_acked_record_dropped_by_recovery_is_corrupt_when_durable() -> None:
    dropped = [["1", 2, "checksum"], ["1", 3, "gap"], ["1", 3, "torn"]]
    r = check(ops(1, "oooo"), listing(l1=[rec(1, 0), rec(1, 1)], dropped=dropped), durable=True)
    assert (r.lost, r.corrupt, r.dropped) == (0, 2, 3) and r.examples["corrupt"] == (("1", 2), ("1", 3))
    assert r.examples["dropped"] == (("1", 2), ("1", 3)) and r.logs["1"].dropped == 3
    assert "log 1 seq 2: acked, but the mirror's recovery dropped it (checksum)" in r.notes
    assert "log 1 seq 3: acked, but the mirror's recovery dropped it (gap, torn)" in r.notes
    assert r.verdict is Verdict.DATA_LOSS and "first corrupt: log 1 seq 2" in r.summary_line()


def test_acked_record_dropped_by_recovery_is_lost_when_not_durable() -> None:
    r = check(ops(1, "oooo"), listing(l1=[rec(1, 0), rec(1, 1)], dropped=[["1", 2, "torn"]]), durable=False)
    assert (r.lost, r.corrupt, r.dropped) == (2, 0, 1) and r.verdict is Verdict.OK
    assert r.to_dict()["dropped"] == 1 and "dropped=1" in r.summary_line()


def test_dropped_records_not_acked_or_still_intact_are_only_counted() -> None:
    # seq 1 failed, seq 2 indeterminate, log 9 never invoked, seq 0 intact (a duplicate dropped for the gap)
    dropped = [[1, 0, "gap"], ["1", 1, "checksum"], ["1", 2, "torn"], ["9", 0, "checksum"]]
    mirror = listing(l1=[rec(1, 0)], dropped=dropped)
    mirror["dropped_omitted"] = 5
    r = check(ops(1, "ofi"), mirror, durable=True)
    assert (r.lost, r.corrupt, r.unexpected, r.dropped) == (0, 0, 0, 9)
    assert "5 more records dropped by the mirror's recovery, not listed" in r.notes
    assert r.verdict is Verdict.OK


@pytest.mark.parametrize("bad", [
    {"dropped": {"1": 0}}, {"dropped": [["1", 0]]}, {"dropped": [["1", -1, "gap"]]}, {"dropped": [["1", 0, 3]]},
    {"dropped": [[None, 0, "gap"]]}, {"dropped_omitted": -1}, {"dropped_omitted": "many"},
])
def test_malformed_dropped_is_a_check_error(bad: dict[str, object]) -> None:
    with pytest.raises(CheckError, match="dropped"):
        check(ops(1, "o"), {**listing(l1=[rec(1, 0)]), **bad})


def test_error_result_is_unknown() -> None:
    r = CheckResult(acked=5, lost=5, error="boom")
    assert verdict_for(r, durable=True) is Verdict.UNKNOWN and r.verdict.exit_code == 2


def test_to_dict_is_json_friendly() -> None:
    r = check(ops(1, "ooi"), listing(l1=[rec(1, 0), rec(1, 2)]))
    d = json.loads(json.dumps(r.to_dict()))
    assert d["verdict"] == "data-loss" and d["lost"] == 1 and d["examples"]["lost"] == [["1", 1]]
    assert d["logs"]["1"]["first_hole"] == 1 and d["error"] is None
    assert (d["dropped"], d["mirror_stores"], d["logs"]["1"]["dropped"], d["examples"]["dropped"]) == (0, 1, 0, [])


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
    for durable in (True, False):
        r = check_dirs(tmp_path / "ledgers", empty, durable=durable)
        assert r.verdict is Verdict.UNKNOWN and r.lost == 0
        assert r.error == f"{NO_EVIDENCE} (4 acked of 4 ops in the ledger)"
        assert r.inputs["mirror_source"] == f"site directory {empty}" and r.inputs["mirror_stores"] == []


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
    mirror = {"logs": {name: [rec(int(name), s) for s in range(k)] for name, k in keep.items()}, "stores": [STORE]}
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


# --- a real store damaged on disk: what recovery dropped reaches the verdict --------------------------

def _damaged_site(tmp_path: Path, damage: str) -> Path:
    """Log 1 seqs 0..4 (SIZE-byte payloads) in one store, then ``damage`` on disk: a flipped payload
    byte in seq 2 ("flip"), seq 4 cut after its header ("torn"), or cut inside its header ("header")."""
    logstore = pytest.importorskip("smfs.logstore")
    from workloads.payload import payload

    root = tmp_path / "site" / "server-0"
    with logstore.LogStore.open(root, sync=False) as store:
        store.append_many([(1, seq, payload(1, seq, SIZE)) for seq in range(5)])
    seg = root / logstore.segment_name(1)
    data = bytearray(seg.read_bytes())
    step = logstore.HEADER_BYTES + SIZE
    if damage == "flip":
        data[2 * step + logstore.HEADER_BYTES + 10] ^= 0x01
    else:
        del data[4 * step + (logstore.HEADER_BYTES + 7 if damage == "torn" else 20):]
    seg.write_bytes(bytes(data))
    return tmp_path / "site"


def test_real_store_with_a_flipped_payload_byte_is_corrupt_when_durable(tmp_path: Path) -> None:
    site = _damaged_site(tmp_path, "flip")
    from smfs.logstore import site_listing

    mirror = site_listing(site)
    assert mirror["dropped"] == [["1", 2, "checksum"], ["1", 3, "gap"], ["1", 4, "gap"]]
    r = check(ops(1, "ooooo"), mirror, durable=True)
    assert (r.lost, r.corrupt, r.dropped, r.mirror_records) == (0, 3, 3, 2) and r.verdict is Verdict.DATA_LOSS
    assert r.examples["corrupt"] == (("1", 2), ("1", 3), ("1", 4))
    assert "log 1 seq 2: acked, but the mirror's recovery dropped it (checksum)" in r.notes
    assert "log 1 seq 3: acked, but the mirror's recovery dropped it (gap)" in r.notes
    r = check(ops(1, "ooooo"), mirror, durable=False)
    assert (r.lost, r.corrupt, r.dropped) == (3, 0, 3) and r.verdict is Verdict.OK


def test_real_store_with_a_torn_tail(tmp_path: Path) -> None:
    from smfs.logstore import site_listing

    torn = site_listing(_damaged_site(tmp_path / "a", "torn"))
    assert torn["dropped"] == [["1", 4, "torn"]] and torn["stores"][0]["bytes_truncated"] == 31
    r = check(ops(1, "ooooo"), torn, durable=True)
    assert (r.lost, r.corrupt, r.dropped) == (0, 1, 1) and r.verdict is Verdict.DATA_LOSS
    r = check(ops(1, "ooooi"), torn, durable=True)  # the torn record was never acked: only counted
    assert (r.lost, r.corrupt, r.dropped) == (0, 0, 1) and r.verdict is Verdict.OK
    r = check(ops(1, "ooooo"), torn, durable=False)
    assert (r.lost, r.corrupt) == (1, 0) and r.verdict is Verdict.OK
    header = site_listing(_damaged_site(tmp_path / "b", "header"))  # header incomplete: nothing to name
    assert header["dropped"] == [] and header["stores"][0]["bytes_truncated"] == 20
    r = check(ops(1, "ooooo"), header, durable=True)
    assert (r.lost, r.corrupt, r.dropped) == (1, 0, 0) and r.verdict is Verdict.DATA_LOSS
