"""The checker: which appends did the mirror lose? Compares the ledger with the mirror's recovered logs.

Vocabulary (Jepsen's set checker). Per operation, keyed by (log, seq):

- *attempted*: every op in the ledger; *acked* (outcome ok), *failed* (fail), *indeterminate* (info).
- *lost*: acked and absent on the mirror.
- *corrupt*: present on the mirror with a size or digest other than the ledger's (whatever the outcome).
- *unexpected*: present on the mirror but never invoked (no ledger entry for that (log, seq)).
- *recovered*: present (intact) though its answer never came (info). Fine, counted.
- *recovered_failed*: present (intact) though its append returned fail. Not data loss: a primary may
  fail an append (e.g. its local write or a timeout) after the bytes already left for the mirror; the
  op was invoked, so the record is explained. Counted apart so a report can show it.

Per mirror log, a *prefix violation* is a log whose seqs are not exactly 0..k-1 in order (a hole, a
duplicate, or disorder): log recovery keeps the longest valid prefix, so a hole is a stack bug.

*dropped*: a record the mirror's log recovery threw away (the listing's ``dropped``: ``gap``,
``checksum`` or ``torn``, see ``smfs.logstore``). An acked op dropped so and not on the mirror intact
was on the mirror's disk and lost there: *corrupt* when the mode promised no loss, *lost* otherwise.
Any other dropped record is only counted.

Evidence: a listing without any log store (no ``stores`` entry, or an empty one) says nothing about
the mirror (wrong directory, disk not mounted): the result carries ``error`` and is unknown in every
mode. A listing with stores but no record is evidence: the mirror got nothing.

Verdicts (``verdict_for``), three-valued: *unknown* when the check could not be made (any error, or
no evidence); *data-loss* on any corrupt, unexpected or prefix violation, in every mode (even with no
acked op: the mirror holds bytes nobody wrote, or wrote otherwise); otherwise *unknown* if no op was
acked (nothing was measured); *data-loss* on any lost op in durable modes (the mode promised no
loss under this disaster); else *ok*. Non-durable modes (local-sync) promise nothing about the
mirror's completeness, so their losses are reported but keep the verdict ok.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from workloads.ledger import LedgerEntry, Outcome, load_ledgers

__all__ = [
    "CATEGORIES",
    "CheckError",
    "CheckResult",
    "NO_EVIDENCE",
    "LogSummary",
    "Verdict",
    "check",
    "check_dirs",
    "load_listing",
    "verdict_for",
]

log = logging.getLogger(__name__)

MAX_EXAMPLES = 10
"""(log, seq) examples kept per category."""

NO_EVIDENCE = "no log store on the mirror: missing evidence"
"""``CheckResult.error`` (prefix) of a listing without any log store."""

CATEGORIES = ("lost", "corrupt", "unexpected", "recovered", "recovered_failed", "prefix_violations", "dropped")
"""Categories with examples; for prefix_violations the example is the first missing or misplaced seq."""


class Verdict(StrEnum):
    """Did a mode keep its promise? Maps to a drill's exit code."""

    OK = "ok"
    DATA_LOSS = "data-loss"
    UNKNOWN = "unknown"

    @property
    def exit_code(self) -> int:
        """0 promise kept, 1 data loss where none was promised, 2 unknown."""
        return {Verdict.OK: 0, Verdict.DATA_LOSS: 1, Verdict.UNKNOWN: 2}[self]


class CheckError(Exception):
    """The inputs cannot be checked: malformed listing, ledger ops colliding on one (log, seq)."""


@dataclass(frozen=True)
class LogSummary:
    """One log, for debugging: ledger counts, mirror shape, anomalies and where they start.

    ``mirror_prefix`` is k when the mirror holds exactly seqs 0..k-1 at the start of the log;
    ``first_hole`` is the first seq breaking that order (None when the log is a clean prefix).
    """

    log: str
    attempted: int = 0
    acked: int = 0
    failed: int = 0
    indeterminate: int = 0
    max_acked_seq: int | None = None
    mirror_records: int = 0
    mirror_prefix: int = 0
    first_hole: int | None = None
    lost: int = 0
    first_lost: int | None = None
    corrupt: int = 0
    unexpected: int = 0
    recovered: int = 0
    recovered_failed: int = 0
    dropped: int = 0


@dataclass(frozen=True)
class CheckResult:
    """Counts per category, examples, per-log summaries, and the verdict under ``durable``.

    ``error`` is set (and every count is 0) when the check could not be made, including when the
    listing came from no log store (``NO_EVIDENCE``); the verdict is then unknown. ``mirror_stores``:
    log stores the listing came from. ``dropped``: records the mirror's recovery threw away (listed
    or only counted). ``inputs`` describes what was read (ledger stats, mirror source) when known.
    """

    attempted: int = 0
    acked: int = 0
    failed: int = 0
    indeterminate: int = 0
    lost: int = 0
    corrupt: int = 0
    unexpected: int = 0
    recovered: int = 0
    recovered_failed: int = 0
    prefix_violations: int = 0
    dropped: int = 0
    mirror_stores: int = 0
    mirror_logs: int = 0
    mirror_records: int = 0
    examples: Mapping[str, tuple[tuple[str, int], ...]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    logs: Mapping[str, LogSummary] = field(default_factory=dict)
    durable: bool = True
    error: str | None = None
    inputs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> Verdict:
        """``verdict_for(self, self.durable)``."""
        return verdict_for(self, self.durable)

    @property
    def lost_examples(self) -> tuple[tuple[str, int], ...]:
        """Up to ``MAX_EXAMPLES`` lost (log, seq) pairs, lowest first."""
        return self.examples.get("lost", ())

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (for result.json), including the verdict."""
        return {
            "verdict": str(self.verdict),
            "durable": self.durable,
            "error": self.error,
            **{name: getattr(self, name) for name in _COUNTS},
            "examples": {cat: [list(pair) for pair in pairs] for cat, pairs in self.examples.items()},
            "notes": list(self.notes),
            "logs": {name: asdict(summary) for name, summary in self.logs.items()},
            "inputs": dict(self.inputs),
        }

    def summary_line(self) -> str:
        """One line: verdict, mode kind, the counts, and the first example of the worst anomaly."""
        kind = "durable" if self.durable else "non-durable"
        if self.error is not None:
            return f"{self.verdict} ({kind}): check failed: {self.error}"
        counts = " ".join(f"{name}={getattr(self, name)}" for name in _COUNTS if name not in _SHAPE)
        line = f"{self.verdict} ({kind}): {counts}"
        for cat in ("corrupt", "unexpected", "prefix_violations", "lost"):
            if self.examples.get(cat):
                log_id, seq = self.examples[cat][0]
                line += f"; first {cat}: log {log_id} seq {seq}"
                break
        return line


_COUNTS = ("attempted", "acked", "failed", "indeterminate", "lost", "corrupt", "unexpected", "recovered",
           "recovered_failed", "prefix_violations", "dropped", "mirror_stores", "mirror_logs", "mirror_records")
_SHAPE = ("mirror_stores", "mirror_logs")  # in to_dict, not in the summary line; set by check, not tallied


def verdict_for(result: CheckResult, durable: bool) -> Verdict:
    """Judge ``result`` for a mode; ``durable``: the mode promised no acked append is lost (in this disaster).

    unknown if the check failed (``error``, which includes no evidence); data-loss on any corrupt,
    unexpected or prefix violation, whatever the mode; unknown if no op was acked (nothing measured);
    data-loss on any lost op when ``durable``; ok otherwise.
    """
    if result.error is not None:
        return Verdict.UNKNOWN
    if result.corrupt or result.unexpected or result.prefix_violations:
        return Verdict.DATA_LOSS
    if result.acked == 0:
        return Verdict.UNKNOWN
    if durable and result.lost:
        return Verdict.DATA_LOSS
    return Verdict.OK


Record = tuple[int, int, str]  # seq, size (bytes), digest


def check(entries: Iterable[LedgerEntry], listing: Mapping[str, Any], *, durable: bool = True) -> CheckResult:
    """Compare every ledger op with the mirror's recovered logs (``site_listing`` format).

    ``listing["logs"]`` maps a log id (string) to ``[[seq, size, digest], ...]`` in log order; ledger
    logs are matched as ``str(entry.log)``. ``listing["stores"]`` lists the log stores read: without
    any, the result has ``error`` set (``NO_EVIDENCE``) and is unknown. ``listing["dropped"]`` (optional)
    lists ``[log, seq, reason]`` records recovery threw away, ``listing["dropped_omitted"]`` how many
    more. ``durable``: the mode promised no acked append is lost in this disaster. Raises
    ``CheckError`` on a malformed listing or two ops on one (log, seq); ``check_dirs`` turns any
    exception into an unknown result.
    """
    ops = _ops_by_key(entries)
    mirror = _parse_listing(listing)
    dropped, omitted = _parse_dropped(listing)
    stores = _count_stores(listing)
    if not stores:
        return _no_evidence(ops, durable)
    tally = _Tally(durable)
    for (log_id, seq), entry in ops.items():
        tally.op(log_id, seq, entry, mirror.get(log_id, {}).get(seq), dropped.get((log_id, seq), ()))
    for log_id, records in mirror.items():
        for seq, copies in records.items():
            if (log_id, seq) not in ops:
                tally.unexpected(log_id, seq, len(copies))
    for log_id, order in _mirror_orders(listing).items():
        tally.shape(log_id, order)
    tally.dropped(dropped, omitted)
    return tally.result(durable, mirror_stores=stores, mirror_logs=len(mirror))


def load_listing(mirror: str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    """Read the mirror's listing; return it and a description of where it came from.

    ``mirror`` is a JSON listing file, a directory holding ``listing.json``, or a site/store directory
    (listed with ``smfs.logstore.site_listing``, imported only then). A site directory without any store
    gives a listing with no ``stores``, which ``check`` judges unknown (no evidence), never "all lost".
    """
    path = Path(mirror)
    if path.is_file():
        return json.loads(path.read_text()), f"listing file {path}"
    if (path / "listing.json").is_file():
        return json.loads((path / "listing.json").read_text()), f"listing file {path / 'listing.json'}"
    if path.is_dir():
        from smfs.logstore import site_listing

        return site_listing(path), f"site directory {path}"
    raise FileNotFoundError(f"mirror {path}: no such file or directory")


def check_dirs(ledger_dir: str | os.PathLike[str], mirror: str | os.PathLike[str], *,
               durable: bool = True) -> CheckResult:
    """Load the ledgers in ``ledger_dir`` and the mirror's listing, and ``check`` them.

    Never raises for bad input or a checker bug: any exception becomes a result with ``error`` set and
    verdict unknown (a crashed checker must never report data loss).
    """
    inputs: dict[str, Any] = {"ledger_dir": str(ledger_dir), "mirror": str(mirror)}
    try:
        ledger = load_ledgers(ledger_dir)
        inputs["ledger"] = ledger.stats.to_dict()
        listing, source = load_listing(mirror)
        inputs["mirror_source"] = source
        inputs["mirror_stores"] = listing.get("stores", []) if isinstance(listing, dict) else None
        return replace(check(ledger.entries, listing, durable=durable), inputs=inputs)
    except Exception as err:  # any failure is "unknown", never "data loss"
        log.error("check failed: %s: %s", type(err).__name__, err)
        log.debug("check failed", exc_info=True)
        return CheckResult(durable=durable, error=f"{type(err).__name__}: {err}", inputs=inputs)


def _ops_by_key(entries: Iterable[LedgerEntry]) -> dict[tuple[str, int], LedgerEntry]:
    ops: dict[tuple[str, int], LedgerEntry] = {}
    for entry in entries:
        key = (str(entry.log), entry.seq)
        other = ops.get(key)
        if other is not None and other.key != entry.key:
            raise CheckError(f"log {key[0]} seq {key[1]} written by testers {other.tester} and {entry.tester}")
        ops[key] = entry
    return ops


def _parse_listing(listing: Mapping[str, Any]) -> dict[str, dict[int, list[tuple[int, str]]]]:
    """Validate the listing; return log id -> seq -> every (size, digest) copy the mirror holds."""
    if not isinstance(listing, Mapping) or not isinstance(listing.get("logs"), Mapping):
        raise CheckError("listing: expected an object with a 'logs' object")
    mirror: dict[str, dict[int, list[tuple[int, str]]]] = {}
    for log_id, records in listing["logs"].items():
        if not isinstance(records, list):
            raise CheckError(f"listing: log {log_id!r}: expected a list of [seq, size, digest]")
        by_seq: dict[int, list[tuple[int, str]]] = defaultdict(list)
        for index, record in enumerate(records):
            seq, size, digest = _parse_record(log_id, index, record)
            by_seq[seq].append((size, digest))
        mirror[str(log_id)] = dict(by_seq)
    return mirror


def _count_stores(listing: Mapping[str, Any]) -> int:
    """How many log stores the listing came from (0 when it has no ``stores`` entry)."""
    stores = listing.get("stores")
    if stores is None:
        return 0
    if not isinstance(stores, list):
        raise CheckError(f"listing: 'stores': expected a list, got {type(stores).__name__}")
    return len(stores)


def _parse_dropped(listing: Mapping[str, Any]) -> tuple[dict[tuple[str, int], list[str]], int]:
    """The listing's dropped records as (log, seq) -> reasons, and the count of omitted ones."""
    entries, omitted = listing.get("dropped", []), listing.get("dropped_omitted", 0)
    if not isinstance(entries, list):
        raise CheckError("listing: 'dropped': expected a list of [log, seq, reason]")
    if not isinstance(omitted, int) or isinstance(omitted, bool) or omitted < 0:
        raise CheckError(f"listing: 'dropped_omitted': expected a count, got {omitted!r}")
    dropped: dict[tuple[str, int], list[str]] = defaultdict(list)
    for index, item in enumerate(entries):
        if not (isinstance(item, list | tuple) and len(item) == 3 and isinstance(item[0], str | int)
                and isinstance(item[1], int) and not isinstance(item[1], bool) and item[1] >= 0
                and isinstance(item[2], str)):
            raise CheckError(f"listing: dropped {index}: expected [log, seq, reason], got {item!r}")
        dropped[(str(item[0]), item[1])].append(item[2])
    return dict(dropped), omitted


def _no_evidence(ops: Mapping[tuple[str, int], LedgerEntry], durable: bool) -> CheckResult:
    """The unknown result of a listing without any log store; the error says how much was at stake."""
    acked = sum(entry.outcome is Outcome.OK for entry in ops.values())
    return CheckResult(durable=durable, error=f"{NO_EVIDENCE} ({acked} acked of {len(ops)} ops in the ledger)")


def _parse_record(log_id: str, index: int, record: Any) -> Record:
    if (isinstance(record, list | tuple) and len(record) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in record[:2])
            and isinstance(record[2], str)):
        return record[0], record[1], record[2]
    raise CheckError(f"listing: log {log_id!r} record {index}: expected [seq, size, digest], got {record!r}")


def _mirror_orders(listing: Mapping[str, Any]) -> dict[str, list[int]]:
    return {str(log_id): [record[0] for record in records] for log_id, records in listing["logs"].items()}


class _Tally:
    """Accumulates counts, examples, notes and per-log summaries while ``check`` walks the data."""

    def __init__(self, durable: bool) -> None:
        self.durable = durable
        self.counts: dict[str, int] = defaultdict(int)
        self.examples: dict[str, list[tuple[str, int]]] = {cat: [] for cat in CATEGORIES}
        self.notes: list[tuple[str, int, str]] = []
        self.logs: dict[str, dict[str, Any]] = defaultdict(dict)

    def _log(self, log_id: str, name: str, seq: int | None = None) -> None:
        """Count ``name`` for the run and the log; remember the first seq where it happened."""
        self.counts[name] += 1
        summary = self.logs[log_id]
        summary[name] = summary.get(name, 0) + 1
        if seq is not None and name in CATEGORIES:
            self.examples[name].append((log_id, seq))
            if name == "lost" and (summary.get("first_lost") is None or seq < summary["first_lost"]):
                summary["first_lost"] = seq

    def op(self, log_id: str, seq: int, entry: LedgerEntry, copies: list[tuple[int, str]] | None,
           dropped: Iterable[str] = ()) -> None:
        """Classify one ledger op against the copies of its record on the mirror (None: absent).

        ``dropped``: why the mirror's recovery threw records with this (log, seq) away, if it did.
        """
        self._log(log_id, "attempted")
        summary = self.logs[log_id]
        if entry.outcome is Outcome.OK:
            self._log(log_id, "acked")
            summary["max_acked_seq"] = max(seq, summary.get("max_acked_seq", seq))
        else:
            self._log(log_id, "failed" if entry.outcome is Outcome.FAIL else "indeterminate")
        if copies is None:
            if entry.outcome is Outcome.OK:
                self._absent(log_id, seq, tuple(dropped))
            return
        bad = [(size, digest) for size, digest in copies if (size, digest) != (entry.size, entry.digest)]
        if bad:
            self._log(log_id, "corrupt", seq)
            size, digest = bad[0]
            self.notes.append((log_id, seq, f"log {log_id} seq {seq}: mirror has size {size} digest {digest},"
                                            f" ledger says size {entry.size} digest {entry.digest}"
                                            f" ({entry.outcome})"))
        elif entry.outcome is Outcome.INFO:
            self._log(log_id, "recovered", seq)
        elif entry.outcome is Outcome.FAIL:
            self._log(log_id, "recovered_failed", seq)

    def _absent(self, log_id: str, seq: int, dropped: tuple[str, ...]) -> None:
        """An acked op absent on the mirror: lost, or corrupt if a durable mirror dropped it at recovery."""
        if not (dropped and self.durable):
            self._log(log_id, "lost", seq)
            return
        self._log(log_id, "corrupt", seq)
        self.notes.append((log_id, seq, f"log {log_id} seq {seq}: acked, but the mirror's recovery dropped it"
                                        f" ({', '.join(sorted(set(dropped)))})"))

    def dropped(self, dropped: Mapping[tuple[str, int], list[str]], omitted: int) -> None:
        """Count every record the mirror's recovery dropped, listed (per log) or only counted."""
        for (log_id, seq), reasons in dropped.items():
            self._log(log_id, "dropped", seq)
            for _again in reasons[1:]:  # one example per (log, seq), one count per record
                self._log(log_id, "dropped")
        self.counts["dropped"] += omitted
        if omitted:
            self.notes.append(("", -1, f"{omitted} more records dropped by the mirror's recovery, not listed"))

    def unexpected(self, log_id: str, seq: int, copies: int) -> None:
        """A mirror record no tester invoked."""
        self._log(log_id, "unexpected", seq)
        self.notes.append((log_id, seq, f"log {log_id} seq {seq}: on the mirror ({copies} copies)"
                                        " but never invoked"))

    def shape(self, log_id: str, order: list[int]) -> None:
        """Check that a mirror log is exactly seqs 0..k-1 in order."""
        summary = self.logs[log_id]
        summary["mirror_records"] = len(order)
        self.counts["mirror_records"] += len(order)
        prefix = 0
        while prefix < len(order) and order[prefix] == prefix:
            prefix += 1
        summary["mirror_prefix"] = prefix
        if prefix < len(order):
            summary["first_hole"] = prefix
            self._log(log_id, "prefix_violations", prefix)
            self.notes.append((log_id, prefix, f"log {log_id}: seqs 0..{prefix - 1} then {order[prefix]}"
                                               f" at position {prefix} (not a prefix)"))

    def result(self, durable: bool, mirror_stores: int, mirror_logs: int) -> CheckResult:
        counts = {name: self.counts.get(name, 0) for name in _COUNTS if name not in _SHAPE}
        examples = {cat: tuple(sorted(pairs, key=_order)[:MAX_EXAMPLES]) for cat, pairs in self.examples.items()}
        notes = tuple(text for *_, text in sorted(self.notes, key=lambda n: _order(n[:2])))[:2 * MAX_EXAMPLES]
        logs = {log_id: LogSummary(log=log_id, **{k: v for k, v in fields.items() if k in _SUMMARY_FIELDS})
                for log_id, fields in sorted(self.logs.items(), key=lambda item: _order((item[0], 0)))}
        return CheckResult(**counts, mirror_stores=mirror_stores, mirror_logs=mirror_logs, examples=examples,
                           notes=notes, logs=logs, durable=durable)


_SUMMARY_FIELDS = frozenset(LogSummary.__dataclass_fields__) - {"log"}


def _order(pair: tuple[str, int]) -> tuple[int, int | str, int]:
    """Sort key: numeric log ids numerically, before any other ids; then seq."""
    log_id, seq = pair
    return (0, int(log_id), seq) if log_id.isascii() and log_id.isdigit() else (1, log_id, seq)
