"""Log-structured segment store: many append-only logs multiplexed onto one directory of segments.

A store root holds a marker file ``STORE`` and segment files ``seg-00000001.smfs``, ``seg-00000002.smfs``...
Every segment is a sequence of records, each a 24-byte header followed by its payload::

    magic (4 bytes) | crc32 (u32) | log_id (u32) | seq (u64) | length (u32) | payload (length bytes)

All integers are little-endian. The CRC-32 (zlib) covers ``log_id | seq | length | payload``; it does not
cover the magic, so recovery can *tombstone* a record it dropped by rewriting the last magic byte
(see below) and the record stays parseable and skippable. Per log, sequence numbers start at 0 and are
contiguous; an append with any other sequence number raises :class:`SequenceError` and writes nothing.

Durability: ``append_many`` writes a batch with one ``pwritev`` and makes it durable with one
``fdatasync`` (one per segment touched when the batch rolls into a new segment). Each record is atomic
(a torn record fails its length or checksum test and is never returned); a batch is validated all or
nothing, but after a crash in the middle of a batch each log keeps a prefix of it.

Recovery (on every open) scans every segment in order. A record is valid when its header parses, its
magic and length are sane and its checksum matches; after an invalid one the scan resyncs on the next
magic that starts a fully valid record. A valid record is accepted only if its seq is the next one of
its log; after the first gap the rest of that log is dropped, so every log is a prefix of what was
written. The torn tail of the last segment is truncated so that new appends follow valid data, and
(writable opens only) the dropped records are tombstoned so that appends made after this recovery are
not shadowed by them at the next one. ``read_only=True`` recovers without modifying anything.

Recovery also names what it dropped (``RecoveryReport.dropped``, one :class:`DroppedRecord` each), so
a checker can tell "the mirror never got it" from "the mirror had it and lost it at recovery":
``gap`` a valid record after a missing seq of its log; ``checksum`` a record whose header looks sane
(live magic, length within the segment) but whose checksum fails; ``torn`` a record starting the
unreadable end of a segment whose 24-byte header is complete with a live magic. For ``checksum``
and ``torn`` the log id and seq come from a header the checksum could not vouch for: suspects.

A payload that itself contains a complete, valid record can be mistaken for one by a resync after
corruption; that is the price of resynchronising without a separate index.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os  # every call that changes or syncs a file goes through this name (a seam: the crash test swaps it)
import re
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

from smfs import defects

__all__ = [
    "DEFAULT_SEGMENT_BYTES",
    "HEADER_BYTES",
    "MARKER",
    "MAX_DROPPED",
    "DroppedRecord",
    "LogStore",
    "LogStoreError",
    "Record",
    "RecordInfo",
    "RecoveryReport",
    "SequenceError",
    "is_store",
    "payload_digest",
    "segment_name",
    "site_listing",
]

DEFAULT_SEGMENT_BYTES = 100 * 1024 * 1024
"""Segment size of the paper, bytes (100 MiB)."""

MARKER = "STORE"
"""Name of the marker file that makes a directory recognisable as a store."""

_MARKER_TEXT = b"smfs-logstore 1\n"
_MAGIC_PREFIX = b"\xf5SM"
_LIVE = ord("R")
_DEAD = ord("X")
_MAGIC_LIVE = _MAGIC_PREFIX + bytes([_LIVE])
_MAGIC_DEAD = _MAGIC_PREFIX + bytes([_DEAD])
_HEADER = struct.Struct("<4sIIQI")
_FIELDS = struct.Struct("<IQI")
HEADER_BYTES = _HEADER.size
"""Size of a record header, bytes (24)."""
_CRC_FROM = 8  # the checksum covers the header from this byte on, then the payload
_U32 = 2**32 - 1
_U64 = 2**64 - 1
_SEGMENT_RE = re.compile(r"^seg-(\d{8})\.smfs$")
_MAX_REASONS = 50
MAX_DROPPED = 100_000
"""Dropped records named one by one, per store and per site listing; the rest are only counted."""
_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)

Payload = bytes | bytearray | memoryview


class LogStoreError(Exception):
    """Root of the errors of the segment store."""


class SequenceError(LogStoreError):
    """An append whose sequence number is not the next one of its log; nothing was written."""

    def __init__(self, log_id: int, expected: int, got: int) -> None:
        super().__init__(f"log {log_id}: expected seq {expected}, got {got}")
        self.log_id = log_id
        self.expected = expected
        self.got = got


@dataclass(frozen=True)
class Record:
    """One record of a log as read back from the store."""

    log_id: int
    seq: int
    payload: bytes


class DroppedRecord(NamedTuple):
    """A record recovery did not keep: its log, its seq, and why (``gap``, ``checksum`` or ``torn``)."""

    log_id: int
    seq: int
    reason: str


class RecordInfo(NamedTuple):
    """What the checker needs to know of a record: its place, its size (bytes) and ``payload_digest``."""

    log_id: int
    seq: int
    size: int
    digest: str


@dataclass(frozen=True)
class RecoveryReport:
    """What recovery kept and threw away.

    ``records``: records kept (all logs); ``logs``: logs with at least one kept record;
    ``bytes_truncated``: torn tail cut off the last segment, bytes (for a read-only open: what a
    writable open would cut); ``records_dropped``: valid records dropped because an earlier record of
    their log was missing; ``reasons``: one short line per problem found, capped at 50;
    ``dropped``: every record not kept, in scan order, capped at ``MAX_DROPPED``;
    ``dropped_omitted``: how many more there were past the cap.
    """

    records: int
    logs: int
    bytes_truncated: int
    records_dropped: int
    reasons: tuple[str, ...]
    dropped: tuple[DroppedRecord, ...] = ()
    dropped_omitted: int = 0

    @property
    def clean(self) -> bool:
        """True when recovery found nothing to repair or drop."""
        return not (self.bytes_truncated or self.records_dropped or self.reasons)


class _Loc(NamedTuple):
    """Where a record lives: segment number, offset of its header in the segment (bytes), payload size."""

    segment: int
    offset: int
    size: int


_Chunk = tuple[bool, list[_Loc], list[Payload]]  # (roll to a new segment first?, locations, buffers)


def payload_digest(payload: Payload) -> str:
    """Digest of a payload used across the project: BLAKE2b with a 16-byte digest, lowercase hex."""
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


def segment_name(number: int) -> str:
    """File name of segment ``number`` (1-based), e.g. ``seg-00000001.smfs``."""
    return f"seg-{number:08d}.smfs"


def is_store(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a directory holding a store (it has the ``STORE`` marker file)."""
    return (Path(path) / MARKER).is_file()


def site_listing(path: str | os.PathLike[str]) -> dict[str, object]:
    """Recover read-only every store at ``path`` or in its immediate subdirectories and merge their logs.

    A site runs one store per server (``mirror/server-0/``, ``mirror/server-1/``...); their logs are
    disjoint, so a log id found in two stores raises :class:`LogStoreError`. Nothing is modified.
    Returns a JSON-friendly dict::

        {"logs": {"<log_id>": [[seq, size, digest], ...]},
         "stores": [{"path", "records", "bytes_truncated", "records_dropped", "reasons"}],
         "dropped": [["<log_id>", seq, "gap" | "checksum" | "torn"], ...],
         "dropped_omitted": n}

    ``dropped`` names every record recovery threw away (see the module docstring), capped at
    ``MAX_DROPPED`` over the site; ``dropped_omitted`` counts the rest. An existing directory without
    any store gives empty ``logs``, ``stores`` and ``dropped`` (no evidence at all, which a checker
    must not read as "the mirror holds nothing"); a missing one raises.
    """
    root = Path(path)
    if not root.is_dir():
        raise LogStoreError(f"{root}: no such directory")
    roots = [root] if is_store(root) else []
    roots += sorted(child for child in root.iterdir() if child.is_dir() and is_store(child))
    logs: dict[int, list[list[object]]] = {}
    owner: dict[int, Path] = {}
    stores: list[dict[str, object]] = []
    dropped: list[list[object]] = []
    omitted = 0
    for store_root in roots:
        with LogStore.open(store_root, read_only=True) as store:
            rep = store.recovery
            for log_id, infos in store.listing().items():
                if log_id in owner:
                    raise LogStoreError(f"log {log_id} is in two stores: {owner[log_id]} and {store_root}")
                owner[log_id] = store_root
                logs[log_id] = [[i.seq, i.size, i.digest] for i in infos]
        stores.append(
            {
                "path": str(store_root),
                "records": rep.records,
                "bytes_truncated": rep.bytes_truncated,
                "records_dropped": rep.records_dropped,
                "reasons": list(rep.reasons),
            }
        )
        room = MAX_DROPPED - len(dropped)
        dropped += [[str(d.log_id), d.seq, d.reason] for d in rep.dropped[:room]]
        omitted += rep.dropped_omitted + max(0, len(rep.dropped) - room)
    return {"logs": {str(k): logs[k] for k in sorted(logs)}, "stores": stores, "dropped": dropped,
            "dropped_omitted": omitted}


class LogStore:
    """A segment store on a directory; use :meth:`open`, not the constructor.

    Thread-safe: appends are serialised by a lock, reads work on a snapshot of the index, so servers
    can call ``append_many`` through ``asyncio.to_thread``.
    """

    def __init__(self, root: Path, segment_bytes: int, sync: bool, read_only: bool) -> None:
        self.root = root
        self.segment_bytes = segment_bytes
        self.sync = sync
        self.read_only = read_only
        self.recovery = RecoveryReport(0, 0, 0, 0, ())
        self._lock = threading.Lock()
        self._index: dict[int, list[_Loc]] = {}
        self._digests: dict[int, list[str]] = {}
        self._lock_fd = -1
        self._seg = 0  # number of the segment appends go to
        self._fd = -1  # its descriptor (writable opens only)
        self._end = 0  # its size, bytes
        self._closed = False
        self._broken: str | None = None  # set when a failed fdatasync left the durable state unknown

    # ---------------------------------------------------------------- open / close

    @classmethod
    def open(
        cls,
        root: str | os.PathLike[str],
        *,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        sync: bool = True,
        create: bool = True,
        read_only: bool = False,
    ) -> LogStore:
        """Open (and with ``create`` make) the store at ``root`` and recover it; see ``store.recovery``.

        ``segment_bytes``: size at which appends roll to a new segment, bytes. ``sync=False`` skips
        every fsync/fdatasync (tests and benches only: nothing is durable). ``read_only`` recovers
        without modifying any file (no marker, no truncation, no tombstones) and refuses appends.
        A writable open takes an exclusive ``flock`` on the marker, so one writer at a time.
        """
        if not isinstance(segment_bytes, int) or segment_bytes <= 0:
            raise ValueError(f"segment_bytes must be a positive int, got {segment_bytes!r}")
        path = Path(root)
        store = cls(path, segment_bytes, sync, read_only)
        try:
            store._prepare_root(create and not read_only)
            store._recover()
        except OSError as err:
            store._release()
            raise LogStoreError(f"{path}: cannot open store: {err}") from err
        except BaseException:
            store._release()
            raise
        return store

    def close(self) -> None:
        """Close the store; appends were already durable (``sync=True``), so this only frees descriptors."""
        with self._lock:
            self._closed = True
            self._release()

    def __enter__(self) -> LogStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "closed" if self._closed else "read-only" if self.read_only else "writable"
        return f"<LogStore {str(self.root)!r} {mode} logs={len(self._index)} segment={self._seg}>"

    def _release(self) -> None:
        for attr in ("_fd", "_lock_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                setattr(self, attr, -1)
                os.close(fd)

    def _prepare_root(self, create: bool) -> None:
        marker = self.root / MARKER
        if create:
            made = [d for d in (self.root, *self.root.parents) if not d.exists()]
            os.makedirs(self.root, exist_ok=True)
            for d in made:  # each new folder's name must be durable in its parent, or a crash loses the store
                self._sync_dir(d.parent)
            if not marker.exists():
                tmp = self.root / (MARKER + ".tmp")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    os.write(fd, _MARKER_TEXT)
                    if self.sync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, marker)
                self._sync_dir()
        try:
            text = marker.read_bytes()
        except FileNotFoundError:
            raise LogStoreError(f"{self.root}: not a store (no {MARKER} marker)") from None
        if not text.startswith(b"smfs-logstore "):
            raise LogStoreError(f"{marker}: not a store marker: {text[:40]!r}")
        if not self.read_only:
            self._lock_fd = os.open(marker, os.O_RDONLY)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LogStoreError(f"{self.root}: store is open for writing elsewhere") from None

    def _sync_dir(self, path: Path | None = None) -> None:
        """fsync the store's folder (or ``path``): a new or renamed entry in it is durable only then."""
        if not self.sync:
            return
        fd = os.open(path or self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _segments(self) -> list[int]:
        numbers = []
        for entry in os.scandir(self.root):
            m = _SEGMENT_RE.match(entry.name)
            try:
                is_file = entry.is_file()
            except OSError:  # a name whose inode is gone (see _recover): keep it, its scan says why
                is_file = True
            if m and is_file:
                numbers.append(int(m.group(1)))
        return sorted(numbers)

    def _seg_path(self, number: int) -> Path:
        return self.root / segment_name(number)

    # ---------------------------------------------------------------- recovery

    def _recover(self) -> None:
        scan = _Scan()
        numbers = self._segments()
        for prev, number in zip([0, *numbers], numbers, strict=False):
            if number != prev + 1:
                scan.reason(f"segments {prev + 1}..{number - 1} missing")
            try:
                scan.segment(number, self._seg_path(number), last=number == numbers[-1])
            except OSError as err:
                # After a crash a name can outlive its file (e.g. ESTALE: a directory entry whose inode
                # never reached the disk). Read-only recovery is evidence: say so, and what was in it is
                # missing; a writable open must not build on such a store.
                if not self.read_only:
                    raise
                scan.reason(f"{segment_name(number)}: unreadable ({err.strerror or err}); its records are missing")
        self._index = scan.index
        truncated = scan.tail_bytes
        if not self.read_only:
            self._tombstone(scan.dropped)
            if numbers:
                self._open_tail(numbers[-1], scan.tail_end)
            else:
                self._create_segment(1)
        self.recovery = RecoveryReport(
            records=sum(len(v) for v in scan.index.values()),
            logs=len(scan.index),
            bytes_truncated=truncated,
            records_dropped=len(scan.dropped),
            reasons=scan.all_reasons(),
            dropped=tuple(scan.named),
            dropped_omitted=scan.named_omitted,
        )

    def _tombstone(self, dropped: list[tuple[int, int]]) -> None:
        """Rewrite the magic of dropped records so later recoveries skip them (the CRC stays valid)."""
        by_segment: dict[int, list[int]] = {}
        for number, offset in dropped:
            by_segment.setdefault(number, []).append(offset)
        for number, offsets in by_segment.items():
            fd = os.open(self._seg_path(number), os.O_WRONLY)
            try:
                for offset in offsets:
                    os.pwrite(fd, _MAGIC_DEAD, offset)
                if self.sync:
                    os.fdatasync(fd)
            finally:
                os.close(fd)

    def _open_tail(self, number: int, end: int) -> None:
        fd = os.open(self._seg_path(number), os.O_RDWR)
        try:
            if os.fstat(fd).st_size != end:
                os.ftruncate(fd, end)
                if self.sync:
                    os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._seg, self._fd, self._end = number, fd, end

    def _create_segment(self, number: int) -> None:
        """Create segment ``number``, make its directory entry durable, and make it the append target."""
        fd = os.open(self._seg_path(number), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if not defects.active("mirror-skips-directory-fsync"):  # seeded defect: the self-test's only
                self._sync_dir()
        except BaseException:
            os.close(fd)
            raise
        old = self._fd
        self._seg, self._fd, self._end = number, fd, 0
        if old >= 0:
            os.close(old)

    # ---------------------------------------------------------------- appends

    def append(self, log_id: int, seq: int, payload: Payload) -> None:
        """Append one record; durable on return when ``sync``. Raises :class:`SequenceError` on a bad seq."""
        self.append_many([(log_id, seq, payload)])

    def append_many(self, records: Iterable[tuple[int, int, Payload]]) -> None:
        """Append a batch with one write and one fdatasync (group commit); durable on return when ``sync``.

        Every seq is checked first: if any is not the next one of its log (counting earlier records of
        the same batch), :class:`SequenceError` is raised and nothing is written. A failed write is
        undone durably (the segment is truncated back, segments it made are unlinked, both synced); a
        failed fdatasync leaves the store unusable, since the durable state is then unknown and
        retrying fsync cannot tell.
        """
        batch = list(records)
        with self._lock:
            self._check_writable()
            if not batch:
                return
            encoded = self._encode(batch)
            chunks = self._plan(encoded)
            start = (self._seg, self._end)
            try:
                placed = self._write(chunks)
            except OSError as err:
                self._rollback(start)
                raise LogStoreError(f"{self.root}: append failed: {err}") from err
            for (log_id, _seq, _payload), loc in zip(batch, placed, strict=True):
                self._index.setdefault(log_id, []).append(loc)

    def _check_writable(self) -> None:
        if self._closed:
            raise LogStoreError(f"{self.root}: store is closed")
        if self.read_only:
            raise LogStoreError(f"{self.root}: store is open read-only")
        if self._broken:
            raise LogStoreError(f"{self.root}: store unusable after an earlier failure: {self._broken}")

    def _encode(self, batch: list[tuple[int, int, Payload]]) -> list[tuple[int, bytes, memoryview]]:
        """Check the batch and return ``(log_id, header, payload view)`` per record."""
        nexts: dict[int, int] = {}
        out = []
        for item in batch:
            log_id, seq, payload = item
            if not (isinstance(log_id, int) and 0 <= log_id <= _U32):
                raise ValueError(f"log_id must be an int in 0..2**32-1, got {log_id!r}")
            if not (isinstance(seq, int) and 0 <= seq <= _U64):
                raise ValueError(f"seq must be an int in 0..2**64-1, got {seq!r}")
            view = memoryview(payload)
            if not view.c_contiguous:
                raise ValueError("payload must be a contiguous buffer")
            view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
            if view.nbytes > _U32:
                raise ValueError(f"payload of {view.nbytes} bytes exceeds 2**32-1")
            expected = nexts.get(log_id)
            if expected is None:
                expected = len(self._index.get(log_id, ()))
            if seq != expected:
                raise SequenceError(log_id, expected, seq)
            nexts[log_id] = seq + 1
            crc = zlib.crc32(view, zlib.crc32(_FIELDS.pack(log_id, seq, view.nbytes)))
            out.append((log_id, _HEADER.pack(_MAGIC_LIVE, crc, log_id, seq, view.nbytes), view))
        return out

    def _plan(self, encoded: list[tuple[int, bytes, memoryview]]) -> list[_Chunk]:
        """Split the batch into per-segment chunks: ``(roll first?, locations, buffers)``."""
        chunks: list[_Chunk] = []
        seg, end = self._seg, self._end
        locs: list[_Loc] = []
        bufs: list[Payload] = []
        roll = False
        for _log_id, header, view in encoded:
            size = HEADER_BYTES + view.nbytes
            if end > 0 and end + size > self.segment_bytes:
                if locs:
                    chunks.append((roll, locs, bufs))
                seg, end, locs, bufs, roll = seg + 1, 0, [], [], True
            locs.append(_Loc(seg, end, view.nbytes))
            bufs += (header, view)
            end += size
        chunks.append((roll, locs, bufs))
        return chunks

    def _write(self, chunks: list[_Chunk]) -> list[_Loc]:
        placed: list[_Loc] = []
        for roll, locs, bufs in chunks:
            if roll:
                if placed:  # earlier chunks of this batch went to the segment being left
                    self._sync_data()
                self._create_segment(self._seg + 1)
            n = _pwritev_all(self._fd, bufs, self._end)
            self._end += n
            placed += locs
        self._sync_data()
        return placed

    def _sync_data(self) -> None:
        if not self.sync:
            return
        try:
            os.fdatasync(self._fd)
        except OSError as err:
            self._broken = f"fdatasync of {segment_name(self._seg)} failed: {err}"
            raise LogStoreError(f"{self.root}: {self._broken}") from err

    def _rollback(self, start: tuple[int, int]) -> None:
        """Undo a failed write: truncate back to ``start`` (segment, end) and drop newer segments, durably.

        The undo must reach the disk before a later append is acked: the failed batch's first chunk
        may already be fdatasynced, and if the next batch rolls straight to a new segment nothing
        else syncs this one (a crash would bring that chunk back in front of the acked records, same
        seqs, and recovery would drop those as a gap); an unlinked segment whose name came back would
        put the failed batch's later records after the acked ones.
        """
        seg, end = start
        try:
            unlinked = self._seg > seg
            while self._seg > seg:
                os.close(self._fd)
                os.unlink(self._seg_path(self._seg))
                self._seg -= 1
                self._fd = os.open(self._seg_path(self._seg), os.O_RDWR)
            os.ftruncate(self._fd, end)
            self._end = end
            if self.sync:
                os.fsync(self._fd)
                if unlinked:
                    self._sync_dir()
        except OSError as err:
            self._broken = f"rollback of a failed append failed: {err}"

    # ---------------------------------------------------------------- reads

    def next_seq(self, log_id: int) -> int:
        """Sequence number the next append to ``log_id`` must carry (0 for an unknown log)."""
        return len(self._index.get(log_id, ()))

    def logs(self) -> list[int]:
        """Ids of the logs holding at least one record, ascending."""
        with self._lock:
            return sorted(self._index)

    def read(self, log_id: int, start: int = 0) -> Iterator[Record]:
        """Yield the records of ``log_id`` from seq ``start`` on, checksums verified.

        Uses the in-memory index (no rescan); records appended while iterating are not included.
        Raises :class:`LogStoreError` if a record no longer matches its checksum on disk.
        """
        with self._lock:
            self._check_open()
            locs = self._index.get(log_id, [])[start:]
        reader = _Reader(self.root)
        try:
            for seq, loc in enumerate(locs, start):
                yield Record(log_id, seq, reader.payload(log_id, seq, loc))
        finally:
            reader.close()

    def listing(self) -> dict[int, list[RecordInfo]]:
        """Every record of every log as ``RecordInfo(log_id, seq, size, digest)``, logs ascending.

        Digests are computed on first use (one read of each payload) and cached.
        """
        with self._lock:
            self._check_open()
            snapshot = {log_id: list(locs) for log_id, locs in self._index.items()}
            known = {log_id: list(d) for log_id, d in self._digests.items()}
        reader = _Reader(self.root)
        try:
            out: dict[int, list[RecordInfo]] = {}
            for log_id in sorted(snapshot):
                locs = snapshot[log_id]
                digests = known.get(log_id, [])
                for seq in range(len(digests), len(locs)):
                    digests.append(payload_digest(reader.payload(log_id, seq, locs[seq])))
                out[log_id] = [RecordInfo(log_id, s, loc.size, digests[s]) for s, loc in enumerate(locs)]
                known[log_id] = digests
        finally:
            reader.close()
        with self._lock:
            for log_id, digests in known.items():
                if len(digests) > len(self._digests.get(log_id, ())):
                    self._digests[log_id] = digests
        return out

    def _check_open(self) -> None:
        if self._closed:
            raise LogStoreError(f"{self.root}: store is closed")


class _Reader:
    """Reads records by location with its own read-only descriptors, closed by :meth:`close`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fds: dict[int, int] = {}

    def payload(self, log_id: int, seq: int, loc: _Loc) -> bytes:
        fd = self.fds.get(loc.segment)
        if fd is None:
            try:
                fd = os.open(self.root / segment_name(loc.segment), os.O_RDONLY)
            except OSError as err:
                raise LogStoreError(f"{self.root}: cannot read {segment_name(loc.segment)}: {err}") from err
            self.fds[loc.segment] = fd
        where = f"{self.root}/{segment_name(loc.segment)}@{loc.offset}"
        try:
            data = os.pread(fd, HEADER_BYTES + loc.size, loc.offset)
        except OSError as err:
            raise LogStoreError(f"{where}: cannot read log {log_id} seq {seq}: {err}") from err
        if len(data) != HEADER_BYTES + loc.size:
            raise LogStoreError(f"{where}: short read of log {log_id} seq {seq}")
        magic, crc, got_log, got_seq, length = _HEADER.unpack_from(data)
        view = memoryview(data)
        if (
            magic != _MAGIC_LIVE
            or (got_log, got_seq, length) != (log_id, seq, loc.size)
            or zlib.crc32(view[HEADER_BYTES:], zlib.crc32(view[_CRC_FROM:HEADER_BYTES])) != crc
        ):
            raise LogStoreError(f"{where}: log {log_id} seq {seq} is corrupt on disk")
        return data[HEADER_BYTES:]

    def close(self) -> None:
        fds, self.fds = self.fds, {}
        for fd in fds.values():
            os.close(fd)


class _Scan:
    """State of a recovery scan across segments: the index being rebuilt and what was thrown away."""

    def __init__(self) -> None:
        self.index: dict[int, list[_Loc]] = {}
        self.dead: set[int] = set()
        self.dropped: list[tuple[int, int]] = []  # (segment, offset) of valid records not kept
        self.named: list[DroppedRecord] = []  # every record not kept, valid or not, up to MAX_DROPPED
        self.named_omitted = 0
        self.reasons: list[str] = []
        self.extra_reasons = 0
        self.tail_end = 0  # end of the last valid record of the last segment, bytes
        self.tail_bytes = 0  # bytes after it

    def reason(self, text: str) -> None:
        if len(self.reasons) < _MAX_REASONS:
            self.reasons.append(text)
        else:
            self.extra_reasons += 1

    def drop(self, log_id: int, seq: int, reason: str) -> None:
        """Name a record recovery did not keep (past ``MAX_DROPPED``, only count it)."""
        if len(self.named) < MAX_DROPPED:
            self.named.append(DroppedRecord(log_id, seq, reason))
        else:
            self.named_omitted += 1

    def suspects(self, view: memoryview, start: int, stop: int, reason: str) -> None:
        """Name the records of the unreadable bytes ``start..stop`` by walking their headers.

        Each header must be complete with a live magic; a ``checksum`` suspect also needs its length
        within the segment (``len(view)``). The walk stops at the first header that fails or at ``stop``.
        """
        pos = start
        while pos + HEADER_BYTES <= stop:
            magic, _crc, log_id, seq, length = _HEADER.unpack_from(view, pos)
            in_bounds = length <= len(view) - pos - HEADER_BYTES
            if magic != _MAGIC_LIVE or not (in_bounds or reason == "torn"):
                return
            self.drop(log_id, seq, reason)
            if not in_bounds:
                return
            pos += HEADER_BYTES + length

    def all_reasons(self) -> tuple[str, ...]:
        """The reasons, the ones past the cap summarised in a last line."""
        more = (f"... and {self.extra_reasons} more",) if self.extra_reasons else ()
        return (*self.reasons, *more)

    def segment(self, number: int, path: Path, last: bool) -> None:
        """Scan one segment (read-only, through mmap) and record its valid records."""
        name = segment_name(number)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            end = 0
            if size > 0:
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                    view = memoryview(mm)
                    try:
                        end = self._records(number, name, mm, view, size)
                    finally:
                        view.release()
        if end < size:
            if last:
                self.reason(f"{name}: torn tail of {size - end} bytes at offset {end}")
            else:
                self.reason(f"{name}: {size - end} unreadable bytes at the end (offset {end})")
        if last:
            self.tail_end, self.tail_bytes = end, size - end

    def _records(self, number: int, name: str, mm: mmap.mmap, view: memoryview, size: int) -> int:
        """Walk the records of one mapped segment; return the end of its last valid record, bytes."""
        pos = end = 0
        while pos + HEADER_BYTES <= size:
            why = _check(view, pos, size)
            if why is None:
                magic, _crc, log_id, seq, length = _HEADER.unpack_from(view, pos)
                if magic[3] == _LIVE:
                    self._accept(number, name, pos, log_id, seq, length)
                pos = end = pos + HEADER_BYTES + length
                continue
            nxt = _resync(mm, view, pos + 1, size)
            if nxt < 0:
                self.suspects(view, pos, size, "torn")
                break
            self.suspects(view, pos, nxt, "checksum")
            self.reason(f"{name}: skipped {nxt - pos} bytes at offset {pos} ({why})")
            pos = nxt
        return end

    def _accept(self, number: int, name: str, pos: int, log_id: int, seq: int, length: int) -> None:
        if log_id in self.dead:
            self.dropped.append((number, pos))
            self.drop(log_id, seq, "gap")
            return
        locs = self.index.get(log_id)
        expected = len(locs) if locs else 0
        if seq == expected:
            if locs is None:
                self.index[log_id] = locs = []
            locs.append(_Loc(number, pos, length))
            return
        self.dead.add(log_id)
        self.dropped.append((number, pos))
        self.drop(log_id, seq, "gap")
        self.reason(
            f"log {log_id}: expected seq {expected}, found {seq} at {name}@{pos}; rest of log dropped"
        )


def _check(view: memoryview, pos: int, size: int) -> str | None:
    """Why the record at ``pos`` is invalid, or None if it is valid (live or tombstoned)."""
    magic, crc, _log_id, _seq, length = _HEADER.unpack_from(view, pos)
    if magic[:3] != _MAGIC_PREFIX or magic[3] not in (_LIVE, _DEAD):
        return "bad magic"
    body = pos + HEADER_BYTES
    if length > size - body:
        return "length past end of segment"
    if zlib.crc32(view[body : body + length], zlib.crc32(view[pos + _CRC_FROM : body])) != crc:
        return "checksum mismatch"
    return None


def _resync(mm: mmap.mmap, view: memoryview, start: int, size: int) -> int:
    """Offset of the first magic at or after ``start`` that begins a valid record, or -1."""
    while True:
        pos = mm.find(_MAGIC_PREFIX, start)
        if pos < 0 or pos + HEADER_BYTES > size:
            return -1
        if _check(view, pos, size) is None:
            return pos
        start = pos + 1


def _pwritev_all(fd: int, bufs: list[Payload], offset: int) -> int:
    """Write every buffer at ``offset`` with as few ``pwritev`` calls as possible; return bytes written."""
    total = 0
    i = 0
    pending: list[Payload] = list(bufs)
    while i < len(pending):
        n = os.pwritev(fd, pending[i : i + _IOV_MAX], offset + total)
        if n <= 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        total += n
        while i < len(pending) and n >= len(pending[i]):
            n -= len(pending[i])
            i += 1
        if n:
            pending[i] = memoryview(pending[i])[n:]
    return total
