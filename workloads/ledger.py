"""The testers' ledger: one JSONL line per append operation, written so that a kill never loses an op.

A line is ``{"tester", "log", "seq", "size", "digest", "t_invoke", "t_complete", "outcome"}``; times are
``time.time()`` seconds, ``outcome`` is ``ok`` | ``fail`` | ``info`` (Jepsen: *info* = no answer before
the failure, the op may or may not have happened) and ``t_complete`` is null exactly for ``info``.

Protocol (``LedgerWriter``): before an append is sent the tester writes an ``info`` line (``invoke``);
after the answer it writes the final line for the same (tester, seq) (``complete``). Readers fold lines
per (tester, seq), the last line wins, so an op whose tester was killed mid-flight stays ``info``. Each
line is one ``os.write`` on an ``O_APPEND`` descriptor (no Python buffering), so a SIGKILL can tear at
most the very last line of a file; readers ignore a final unterminated line that does not parse and count
it as ``torn_tail``. Any other malformed line is a ``LedgerError`` naming file, line and field.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

__all__ = [
    "Ledger",
    "LedgerEntry",
    "LedgerError",
    "LedgerStats",
    "LedgerWriter",
    "Outcome",
    "load_ledgers",
    "normalize",
]

_DIGEST_RE = re.compile(r"[0-9a-f]{32}")
_FIELDS = ("tester", "log", "seq", "size", "digest", "t_invoke", "t_complete", "outcome")
_FIELD_SET = frozenset(_FIELDS)
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode
_DECODE = json.JSONDecoder().decode


class Outcome(StrEnum):
    """How an append ended, as far as its tester knows."""

    OK = "ok"
    FAIL = "fail"
    INFO = "info"


_OUTCOMES: dict[str, Outcome] = {outcome.value: outcome for outcome in Outcome}


class LedgerError(Exception):
    """A ledger cannot be written or read: malformed line, unreadable file, misuse of the writer.

    ``path``, ``line`` (1-based) and ``field`` locate the problem when known; ``str()`` names them all.
    """

    def __init__(self, msg: str, path: str | None = None, line: int | None = None, field: str | None = None):
        self.msg = msg
        self.path = path
        self.line = line
        self.field = field
        where = path if line is None else f"{path}:{line}"
        prefix = f"{where}: " if path is not None else ""
        what = f"field {field!r}: " if field is not None else ""
        super().__init__(f"{prefix}{what}{msg}")

    def at(self, path: str, line: int) -> LedgerError:
        """Return the same error located at ``path:line``."""
        return LedgerError(self.msg, path, line, self.field)


@dataclass(frozen=True)
class LedgerEntry:
    """One append operation: who wrote what where, when, and how it ended.

    ``log`` is the log the tester appends to (the checker matches it with the mirror's string log ids via
    ``str(log)``), ``size`` in bytes, ``digest`` the payload's BLAKE2b-16 hex, times in seconds since the
    epoch. Validated on construction.
    """

    tester: int
    log: int
    seq: int
    size: int
    digest: str
    t_invoke: float
    t_complete: float | None
    outcome: Outcome

    def __post_init__(self) -> None:
        for name in ("tester", "log", "seq", "size"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:  # bool is not an int here
                raise LedgerError(f"expected a non-negative integer, got {value!r}", field=name)
        if type(self.digest) is not str or not _DIGEST_RE.fullmatch(self.digest):
            raise LedgerError(f"expected 32 lowercase hex digits, got {self.digest!r}", field="digest")
        try:
            outcome = _OUTCOMES[self.outcome]
        except (KeyError, TypeError):
            raise LedgerError(f"expected ok, fail or info, got {self.outcome!r}", field="outcome") from None
        object.__setattr__(self, "outcome", outcome)
        object.__setattr__(self, "t_invoke", _seconds(self.t_invoke, "t_invoke"))
        if outcome is Outcome.INFO:
            if self.t_complete is not None:
                raise LedgerError(f"must be null for outcome info, got {self.t_complete!r}", field="t_complete")
        else:
            object.__setattr__(self, "t_complete", _seconds(self.t_complete, "t_complete"))

    @property
    def key(self) -> tuple[int, int]:
        """The ledger's identity of an op: (tester, seq)."""
        return (self.tester, self.seq)

    def same_op(self, other: LedgerEntry) -> bool:
        """True if both lines describe the same append (only timing and outcome may differ)."""
        return (self.tester, self.log, self.seq, self.size, self.digest) == (
            other.tester, other.log, other.seq, other.size, other.digest)

    def to_json(self) -> str:
        """Return the entry as one JSON line, without the newline."""
        return _ENCODE({"tester": self.tester, "log": self.log, "seq": self.seq, "size": self.size,
                        "digest": self.digest, "t_invoke": self.t_invoke, "t_complete": self.t_complete,
                        "outcome": self.outcome.value})

    @classmethod
    def from_json(cls, text: str | bytes) -> LedgerEntry:
        """Parse one line; a missing, unknown or wrong-typed field is a ``LedgerError`` naming the field."""
        try:
            obj = _DECODE(text.decode() if isinstance(text, bytes) else text)
        except ValueError as err:  # includes UnicodeDecodeError
            raise LedgerError(f"not JSON: {err}") from None
        if not isinstance(obj, dict):
            raise LedgerError(f"expected a JSON object, got {type(obj).__name__}")
        if obj.keys() != _FIELD_SET:
            for name in _FIELDS:
                if name not in obj:
                    raise LedgerError("missing", field=name)
            raise LedgerError("unknown field", field=sorted(obj.keys() - _FIELD_SET)[0])
        return cls(**obj)


def _seconds(value: Any, name: str) -> float:
    """Validate a time field: a finite number of seconds (int accepted), returned as float."""
    if type(value) is float and math.isfinite(value):
        return value
    if type(value) is int:
        return float(value)
    raise LedgerError(f"expected seconds (a finite number), got {value!r}", field=name)


class LedgerWriter:
    """Appends ledger lines for one or more testers to one file, one ``os.write`` per line.

    ``invoke`` must be called before the append is sent, ``complete`` after its answer. With
    ``sync=True`` the file is opened ``O_DSYNC`` so every line is on disk before the call returns: needed
    when the ledger lives where a power cut (not just a kill) can strike, because an invoke line lost
    while its append survives would make the checker see an *unexpected* record.
    """

    def __init__(self, path: str | os.PathLike[str], *, sync: bool = False) -> None:
        self.path = Path(path)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | (os.O_DSYNC if sync else 0)
        try:
            self._fd: int | None = os.open(self.path, flags, 0o644)
        except OSError as err:
            raise LedgerError(f"cannot open for appending: {err}", str(self.path)) from err
        self._pending: dict[tuple[int, int], LedgerEntry] = {}

    def invoke(self, tester: int, log: int, seq: int, size: int, digest: str) -> float:
        """Record that ``tester`` is about to append ``seq`` to ``log``; return t_invoke (seconds).

        Writes an ``info`` line, so the op is on record even if the tester dies before ``complete``.
        """
        if (tester, seq) in self._pending:
            raise LedgerError(f"tester {tester} seq {seq} invoked twice", str(self.path))
        entry = LedgerEntry(tester, log, seq, size, digest, time.time(), None, Outcome.INFO)
        self._write(entry)
        self._pending[entry.key] = entry
        return entry.t_invoke

    def complete(self, tester: int, seq: int, outcome: Outcome | str) -> LedgerEntry:
        """Record the answer to an invoked append (``ok`` or ``fail``) and return the final entry.

        An op that never gets an answer is simply never completed: it stays ``info``.
        """
        outcome = Outcome(outcome)
        if outcome is Outcome.INFO:
            raise LedgerError("complete() takes ok or fail; an unanswered op is left pending", str(self.path))
        invoked = self._pending.pop((tester, seq), None)
        if invoked is None:
            raise LedgerError(f"tester {tester} seq {seq} completed but never invoked", str(self.path))
        entry = LedgerEntry(invoked.tester, invoked.log, invoked.seq, invoked.size, invoked.digest,
                            invoked.t_invoke, time.time(), outcome)
        self._write(entry)
        return entry

    @property
    def pending(self) -> int:
        """Number of invoked ops not yet completed."""
        return len(self._pending)

    def close(self) -> None:
        """Close the file; pending ops stay ``info`` on record."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> LedgerWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, entry: LedgerEntry) -> None:
        if self._fd is None:
            raise LedgerError("writer is closed", str(self.path))
        line = (entry.to_json() + "\n").encode()
        try:
            written = os.write(self._fd, line)
        except OSError as err:
            raise LedgerError(f"write failed: {err}", str(self.path)) from err
        if written != len(line):
            raise LedgerError(f"short write ({written} of {len(line)} bytes)", str(self.path))


@dataclass(frozen=True)
class LedgerStats:
    """What ``load_ledgers`` read: files, non-empty lines parsed, torn final lines ignored."""

    files: int
    lines: int
    torn_tail: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Ledger:
    """The folded ledger: one entry per (tester, seq), sorted by (tester, seq), and read statistics."""

    entries: tuple[LedgerEntry, ...]
    stats: LedgerStats

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[LedgerEntry]:
        return iter(self.entries)


def load_ledgers(source: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> Ledger:
    """Read ledgers and fold them: one entry per (tester, seq), the last line wins.

    ``source`` is a directory (every ``*.jsonl`` in it, sorted by name), one file, or several files
    (folded in the order given). A torn final line is ignored and counted; anything else malformed, an
    unreadable file, a missing directory, or two lines for the same (tester, seq) that disagree on log,
    size or digest, raises ``LedgerError``.
    """
    folded, stats = _fold(_ledger_files(source))
    entries = tuple(entry for _, (entry, _) in sorted(folded.items()))
    return Ledger(entries, stats)


def normalize(src_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Ledger:
    """Write the folded view of ``src_dir``'s ledgers to ``out_dir``: one line per operation.

    Each op goes to a file named like the file its last line came from, sorted by (tester, seq); files
    are replaced atomically, so ``out_dir`` may be ``src_dir``. Returns what was read.
    """
    files = _ledger_files(src_dir)
    folded, stats = _fold(files)
    by_file: dict[str, list[LedgerEntry]] = {path.name: [] for path in files}
    for _, (entry, name) in sorted(folded.items()):
        by_file[name].append(entry)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, entries in by_file.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text("".join(entry.to_json() + "\n" for entry in entries))
        os.replace(tmp, out / name)
    return Ledger(tuple(entry for _, (entry, _) in sorted(folded.items())), stats)


def _ledger_files(source: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if path.is_dir():
            return sorted(path.glob("*.jsonl"))
        if not path.exists():
            raise LedgerError("no such file or directory", str(path))
        return [path]
    return [Path(p) for p in source]


def _fold(files: list[Path]) -> tuple[dict[tuple[int, int], tuple[LedgerEntry, str]], LedgerStats]:
    """Fold all lines of ``files``: (tester, seq) -> (last entry, name of the file it came from)."""
    folded: dict[tuple[int, int], tuple[LedgerEntry, str]] = {}
    where: dict[tuple[int, int], tuple[Path, int]] = {}
    lines = torn = 0
    for path in files:
        for number, entry in _read_file(path):
            if entry is None:
                torn += 1
                continue
            lines += 1
            previous = folded.get(entry.key)
            if previous is not None and not previous[0].same_op(entry):
                first, at = where[entry.key]
                raise LedgerError(f"tester {entry.tester} seq {entry.seq} disagrees with {first}:{at}"
                                  " on log, size or digest", str(path), number)
            folded[entry.key] = (entry, path.name)
            where[entry.key] = (path, number)
    return folded, LedgerStats(files=len(files), lines=lines, torn_tail=torn)


def _read_file(path: Path) -> Iterator[tuple[int, LedgerEntry | None]]:
    """Yield (line number, entry) per non-empty line; entry None for a torn (ignored) final line."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise LedgerError(f"cannot read: {err}", str(path)) from err
    chunks = data.split(b"\n")
    tail = chunks.pop()  # b"" when the file ends with a newline
    for number, chunk in enumerate(chunks, start=1):
        if not chunk.strip():
            raise LedgerError("empty line", str(path), number)
        try:
            yield number, LedgerEntry.from_json(chunk)
        except LedgerError as err:
            raise err.at(str(path), number) from None
    if tail:
        try:
            yield len(chunks) + 1, LedgerEntry.from_json(tail)
        except LedgerError:
            yield len(chunks) + 1, None


def is_ack_line(line: bytes) -> bool:
    """Whether one raw ledger line records an acked append (outcome ``ok``): cheap enough for a stream
    read as it arrives (the drill's ``instant = "ack"``); any other or broken line is not one."""
    if b'"ok"' not in line:
        return False
    try:
        return LedgerEntry.from_json(line).outcome is Outcome.OK
    except LedgerError:
        return False
