"""Crash consistency of the log store, the ALICE/CrashMonkey way but in-process.

A workload (several logs, batches of 0 to 2,000-byte records on 1 KiB segments: records spanning
sectors, batches spanning segments, records larger than a segment, a close and reopen, and appends
failing with an injected ENOSPC, which the store undoes by truncating and unlinking) runs against
the real store with ``smfs.logstore.os`` swapped for a recorder. The recorder passes every call
through to the real ``os`` and writes down, in program order, each call that changes a file or a
name (``mkdir``/``makedirs``, ``open`` with ``O_CREAT`` of a new name or ``O_TRUNC``, ``write``,
``pwrite``, ``pwritev``, ``ftruncate``, ``replace``/``rename``, ``unlink``) and each durability call
(``fsync``/``fdatasync`` of a file, ``fsync`` of a directory fd), with path, offset and bytes. The
driver marks where each ``append_many`` was called and where it returned. The store's promise
(module docstring of smfs/logstore.py) as seen in such a trace: a batch returns only after its
``pwritev`` and an ``fdatasync`` of every segment it wrote (the segment being left is fdatasynced
before the next one is created); a new segment's name is made durable by an ``fsync`` of the store's
folder before anything goes into it; ``STORE`` is written as ``STORE.tmp``, fsynced, renamed, folder
fsynced; every folder the store made is fsynced into its parent. (Real fsyncs are not issued while
recording or checking: the disk is modelled, not the host's ext4.)

Crash model. Crash point k: the first k recorded operations happened, the next did not; every append
that returned before operation k+1 was issued is *acknowledged*. The state of the disk is then:

* File data, per inode. ``fsync`` and ``fdatasync`` of a file make every earlier write and truncate
  of that file durable, file size included (POSIX fdatasync flushes the metadata needed to read the
  data back). Writes and truncates since the file's last sync are *unsynced*, and a crash keeps of
  them (a) none, (b) all, (c) a random subset of their 512-byte sector pieces (pieces cut on
  512-aligned file offsets; a later write or page may reach the disk before an earlier one, so this
  is the "reordered" case; a kept piece past the file's end extends it and the gap reads as zeros,
  a hole), or (d) all but the last write, which is torn: a prefix of its bytes (a random length, and
  a cut on a sector boundary), or all of it but with its last sector piece garbage (random bytes of
  the right length: the size reached the journal before the data block, ext4 ``data=writeback``), or
  (e) every unsynced write as zeros of its length (the size got there, none of the data did).
  Files are independent: one's unsynced data may survive while another's is lost.
* Sectors are atomic at the device: bytes already durable are never damaged by a later write (bit
  rot and torn durable sectors are test_logstore's flipped-byte and cut tests, not crashes).
* Names, per directory. ``mkdir``, create, ``rename`` and ``unlink`` in directory D become durable
  with an ``fsync`` of a descriptor of D, and only then (POSIX; ext4 also commits a create with the
  file's own fsync, which a store must not rely on, so it is not modelled). Unsynced name operations
  of D survive as a prefix in program order (ext4's journal commits metadata in order; a rename is
  atomic, old name or new): none, all, or a random prefix. A name is there only if every folder on
  its path is durable in its parent; the test's base folder is durable. A file whose name is lost
  is lost with its data, synced or not.
* Not modelled: disks that ignore flushes, fsync errors, bit rot.

Every distinct crash state (disk contents plus what was acknowledged and what was called) is written
to a fresh folder and checked: read-only recovery (``site_listing``) raises nothing and modifies
nothing; writable recovery (``LogStore.open``, as the servers open it) raises nothing, and (1) every
acknowledged append is there byte for byte, (2) the store is well formed (report counts match,
``next_seq`` follows each log, the read-only listing agrees, and after an append to every log and a
reopen, everything reads back and the second recovery drops and truncates nothing), (3) no record
appears that was never appended (or whose append was not yet called), (4) each log is a prefix of
its appends (contiguous seqs, no holes). An append that failed was not acknowledged and may or may
not come back, like any other: a log may also be its successful appends up to where a failed one
began followed by a prefix of the failed one's records, never a mix of both histories. Crashes during recovery: states that recovery had to
repair (torn tail truncated, records after a gap tombstoned) become the durable start of a second
recording (recovery, then more appends), crashed at every point too.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smfs import logstore
from smfs.logstore import LogStore, LogStoreError, RecoveryReport, is_store, payload_digest, site_listing

SECTOR = 512
SEGMENT_BYTES = 1024
ROOT = "data/store"  # the store, relative to a base folder that is durable; the store makes data/ and store/
NEW_LOG = 424_242  # a log no workload uses: appended to after recovery

Event = tuple  # ("mkdir", rel) ("create", rel, ino) ("write", ino, offset, bytes) ("trunc", ino, size)
# ("sync", ino, "fsync" | "fdatasync") ("dirsync", rel) ("rename", src, dst) ("unlink", rel)
Files = dict[str, bytes]


def _parent(rel: str) -> str:
    return os.path.dirname(rel)


def _ancestors(rel: str) -> Iterator[str]:
    d = _parent(rel)
    while d:
        yield d
        d = _parent(d)


def _payload(tag: str, log_id: int, seq: int, size: int) -> bytes:
    """Deterministic bytes without the record magic's first byte, so a resync only finds real records."""
    return hashlib.shake_128(f"{tag}/{log_id}/{seq}".encode()).digest(size).replace(b"\xf5", b"\x00")


@contextlib.contextmanager
def _store_os(proxy: object) -> Iterator[None]:
    """Make smfs.logstore do its file-system calls through ``proxy`` (the seam: the module's ``os``)."""
    saved = logstore.os
    logstore.os = proxy
    try:
        yield
    finally:
        logstore.os = saved


class _NoSyncOS:
    """``os`` for the store while checking: fsync/fdatasync only check their descriptor (the disk is modelled)."""

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)

    @staticmethod
    def fsync(fd: int) -> None:
        os.fstat(fd)

    fdatasync = fsync


_NOSYNC = _NoSyncOS()


class RecordingOS:
    """Stands in for ``os`` inside smfs.logstore: every call goes through, the ones that matter are recorded.

    ``names`` (path relative to ``base`` -> inode number) and ``dirs`` describe what exists at the
    start; they track the live namespace, so a path opened later is mapped to its inode.
    """

    def __init__(self, base: Path, names: dict[str, int], dirs: set[str]) -> None:
        self.base = os.fspath(base)
        self.names = dict(names)
        self.dirs = set(dirs)
        self.next_ino = max(names.values(), default=0) + 1
        self.fds: dict[int, list] = {}  # fd -> ["file", ino, position] or ["dir", rel, 0]
        self.io: list[Event] = []
        self.fail_after: int | None = None  # pwritev calls still allowed before one fails with ENOSPC

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)

    def _rel(self, path: object) -> str:
        rel = os.path.relpath(os.fspath(path), self.base)
        assert not rel.startswith(".."), f"the store touched {path}, outside {self.base}"
        return "" if rel == "." else rel

    def _file(self, fd: int) -> list:
        entry = self.fds[fd]
        assert entry[0] == "file", f"fd {fd} is a directory"
        return entry

    def makedirs(self, name: object, mode: int = 0o777, exist_ok: bool = False) -> None:
        rel = self._rel(name)
        missing, d = [], rel
        while d and not os.path.isdir(os.path.join(self.base, d)):
            missing.append(d)
            d = _parent(d)
        os.makedirs(name, mode, exist_ok)
        for d in reversed(missing):
            self.dirs.add(d)
            self.io.append(("mkdir", d))

    def mkdir(self, name: object, mode: int = 0o777) -> None:
        rel = self._rel(name)
        os.mkdir(name, mode)
        self.dirs.add(rel)
        self.io.append(("mkdir", rel))

    def open(self, path: object, flags: int, mode: int = 0o777) -> int:
        rel = self._rel(path)
        existed = rel in self.names
        fd = os.open(path, flags, mode)
        if flags & os.O_DIRECTORY:
            assert rel in self.dirs or rel == "", f"{rel}: not a directory the recorder knows"
            self.fds[fd] = ["dir", rel, 0]
            return fd
        if not existed:
            assert flags & os.O_CREAT, f"{rel} exists on disk but not in the recorder"
            self.names[rel] = self.next_ino
            self.next_ino += 1
            self.io.append(("create", rel, self.names[rel]))
        elif flags & os.O_TRUNC and flags & (os.O_WRONLY | os.O_RDWR):
            self.io.append(("trunc", self.names[rel], 0))
        self.fds[fd] = ["file", self.names[rel], 0]
        return fd

    def close(self, fd: int) -> None:
        self.fds.pop(fd, None)
        os.close(fd)

    def write(self, fd: int, data: bytes) -> int:
        entry = self._file(fd)
        n = os.write(fd, data)
        self.io.append(("write", entry[1], entry[2], bytes(memoryview(data)[:n])))
        entry[2] += n
        return n

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        n = os.pwrite(fd, data, offset)
        self.io.append(("write", self._file(fd)[1], offset, bytes(memoryview(data)[:n])))
        return n

    def pwritev(self, fd: int, buffers: list, offset: int) -> int:
        if self.fail_after == 0:  # a full disk: half the buffers reach the file, then ENOSPC
            self.fail_after = None
            half = buffers[: len(buffers) // 2]
            if half:
                self.pwritev(fd, half, offset)
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        if self.fail_after is not None:
            self.fail_after -= 1
        n = os.pwritev(fd, buffers, offset)
        data = b"".join(bytes(b) for b in buffers)[:n]
        self.io.append(("write", self._file(fd)[1], offset, data))
        return n

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)
        self.io.append(("trunc", self._file(fd)[1], length))

    def fsync(self, fd: int) -> None:
        kind, what, _pos = self.fds[fd]
        os.fstat(fd)
        self.io.append(("dirsync", what) if kind == "dir" else ("sync", what, "fsync"))

    def fdatasync(self, fd: int) -> None:
        self.io.append(("sync", self._file(fd)[1], "fdatasync"))
        os.fstat(fd)

    def replace(self, src: object, dst: object) -> None:
        s, d = self._rel(src), self._rel(dst)
        assert _parent(s) == _parent(d), "renames across folders are not modelled"
        os.replace(src, dst)
        self.names[d] = self.names.pop(s)
        self.io.append(("rename", s, d))

    rename = replace

    def unlink(self, path: object) -> None:
        rel = self._rel(path)
        os.unlink(path)
        self.names.pop(rel)
        self.io.append(("unlink", rel))


# ---------------------------------------------------------------- the disk model


def _apply_data(content: bytearray, op: Event) -> None:
    if op[0] == "write":
        _, _ino, offset, data = op
        if len(content) < offset:
            content.extend(bytes(offset - len(content)))
        content[offset : offset + len(data)] = data
    else:
        size = op[2]
        if len(content) > size:
            del content[size:]
        else:
            content.extend(bytes(size - len(content)))


def _apply_name(names: dict[str, int], dirs: set[str], op: Event) -> None:
    kind = op[0]
    if kind == "mkdir":
        dirs.add(op[1])
    elif kind == "create":
        names[op[1]] = op[2]
    elif kind == "rename":
        names[op[2]] = names.pop(op[1])
    elif kind == "unlink":
        names.pop(op[1])


def _sector_pieces(ops: list[Event]) -> list[Event]:
    """Unsynced operations with every write cut into pieces on 512-byte aligned file offsets."""
    out = []
    for op in ops:
        if op[0] != "write":
            out.append(op)
            continue
        _, ino, offset, data = op
        pos = 0
        while pos < len(data):
            end = min(len(data), ((offset + pos) // SECTOR + 1) * SECTOR - offset)
            out.append(("write", ino, offset + pos, data[pos:end]))
            pos = end
    return out


def _initial_inodes(files: Files) -> dict[str, int]:
    return {rel: ino for ino, rel in enumerate(sorted(files), 1)}


class Model:
    """The durable state and the unsynced operations after a prefix of a trace."""

    def __init__(self, files: Files, dirs: set[str]) -> None:
        self.names = _initial_inodes(files)
        self.dirs = set(dirs)
        self.data = {self.names[rel]: bytearray(data) for rel, data in files.items()}
        self.label = {ino: rel for rel, ino in self.names.items()}  # for messages
        self.unsynced_names: dict[str, list[Event]] = {}  # directory -> name operations since its fsync
        self.unsynced_data: dict[int, list[Event]] = {}  # inode -> writes and truncates since its sync

    def apply(self, ev: Event) -> None:
        kind = ev[0]
        if kind in ("mkdir", "create", "unlink"):
            if kind == "create":
                self.data[ev[2]] = bytearray()
                self.label[ev[2]] = ev[1]
            self.unsynced_names.setdefault(_parent(ev[1]), []).append(ev)
        elif kind == "rename":
            self.label[self._ino_named(ev[1])] = ev[2]
            self.unsynced_names.setdefault(_parent(ev[1]), []).append(ev)
        elif kind in ("write", "trunc"):
            self.unsynced_data.setdefault(ev[1], []).append(ev)
        elif kind == "sync":
            for op in self.unsynced_data.pop(ev[1], []):
                _apply_data(self.data[ev[1]], op)
        elif kind == "dirsync":
            for op in self.unsynced_names.pop(ev[1], []):
                _apply_name(self.names, self.dirs, op)
        else:
            raise AssertionError(f"unknown event {ev!r}")

    def _ino_named(self, rel: str) -> int:
        return next(ino for ino, name in self.label.items() if name == rel)

    def describe(self, ev: Event) -> str:
        kind = ev[0]
        if kind == "write":
            return f"write {self.label[ev[1]]}@{ev[2]}+{len(ev[3])}"
        if kind == "trunc":
            return f"ftruncate {self.label[ev[1]]} to {ev[2]}"
        if kind == "sync":
            return f"{ev[2]} {self.label[ev[1]]}"
        if kind == "dirsync":
            return f"fsync folder {ev[1] or '.'}"
        if kind == "rename":
            return f"rename {ev[1]} -> {ev[2]}"
        return f"{kind} {ev[1]}"

    def crash_states(
        self, rng: random.Random, subsets: int = 2
    ) -> Iterator[tuple[str, Files, frozenset[str]]]:
        """Every disk state a crash now may leave, as (label, files, folders); see the module docstring."""
        pending_dirs = sorted(d for d, ops in self.unsynced_names.items() if ops)
        choices = [("names synced only", dict.fromkeys(pending_dirs, 0))]
        if pending_dirs:
            lengths = {d: len(self.unsynced_names[d]) for d in pending_dirs}
            choices.append(("unsynced names kept", lengths))
            if any(n > 1 for n in lengths.values()):
                choices.append(
                    ("a prefix of unsynced names", {d: rng.randint(0, n) for d, n in lengths.items()})
                )
        for names_label, keep in choices:
            names, dirs = dict(self.names), set(self.dirs)
            for d in pending_dirs:
                for op in self.unsynced_names[d][: keep[d]]:
                    _apply_name(names, dirs, op)
            visible_dirs = frozenset(d for d in dirs if all(a in dirs for a in _ancestors(d)))
            visible = {
                rel: ino for rel, ino in names.items() if all(a in visible_dirs for a in _ancestors(rel))
            }
            inodes = set(visible.values())
            pending = {ino: ops for ino, ops in self.unsynced_data.items() if ops and ino in inodes}
            for data_label, kept in self._data_choices(pending, rng, subsets):
                files = {
                    rel: kept[ino] if ino in kept else bytes(self.data[ino]) for rel, ino in visible.items()
                }
                yield f"{names_label}; {data_label}", files, visible_dirs

    def volatile(self) -> tuple[Files, frozenset[str]]:
        """What a reader saw before the crash: every operation applied, synced or not."""
        names, dirs = dict(self.names), set(self.dirs)
        for ops in self.unsynced_names.values():
            for op in ops:
                _apply_name(names, dirs, op)
        files = {rel: self._content(ino, self.unsynced_data.get(ino, [])) for rel, ino in names.items()}
        return files, frozenset(d for d in dirs if d)

    def _content(self, ino: int, ops: list[Event]) -> bytes:
        content = bytearray(self.data[ino])
        for op in ops:
            _apply_data(content, op)
        return bytes(content)

    def _data_choices(
        self, pending: dict[int, list[Event]], rng: random.Random, subsets: int
    ) -> Iterator[tuple[str, dict[int, bytes]]]:
        if not pending:
            yield "nothing unsynced", {}
            return
        yield "unsynced writes dropped", {ino: self._content(ino, []) for ino in pending}
        yield "unsynced writes kept", {ino: self._content(ino, ops) for ino, ops in pending.items()}
        yield (
            "unsynced writes as zeros",
            {
                ino: self._content(
                    ino, [op if op[0] == "trunc" else (*op[:3], bytes(len(op[3]))) for op in ops]
                )
                for ino, ops in pending.items()
            },
        )
        pieces = {ino: _sector_pieces(ops) for ino, ops in pending.items()}
        if any(len(p) > 1 for p in pieces.values()):  # a later sector reached the disk, the first did not
            yield "first unsynced sector lost", {ino: self._content(ino, p[1:]) for ino, p in pieces.items()}
        for i in range(subsets):
            kept = {}
            for ino in pending:
                kept[ino] = self._content(ino, [op for op in pieces[ino] if rng.random() < 0.5])
            yield f"random sectors of unsynced writes kept #{i}", kept
        torn = {ino: ops for ino, ops in pending.items() if ops[-1][0] == "write" and len(ops[-1][3]) > 1}
        if not torn:
            return

        def tear(how: str, last: Callable[[int, bytes], bytes | None]) -> tuple[str, dict[int, bytes]] | None:
            kept = {}
            for ino, ops in pending.items():
                if ino in torn:
                    _, _, offset, data = ops[-1]
                    new = last(offset, data)
                    if new is None:
                        return None
                    ops = [*ops[:-1], ("write", ino, offset, new)]
                kept[ino] = self._content(ino, ops)
            return how, kept

        def sector_cut(offset: int, data: bytes) -> bytes | None:
            cut = ((offset + len(data) - 1) // SECTOR) * SECTOR - offset
            return data[:cut] if cut > 0 else None

        def garbage(offset: int, data: bytes) -> bytes:
            start = max(0, ((offset + len(data) - 1) // SECTOR) * SECTOR - offset)
            return data[:start] + rng.randbytes(len(data) - start)

        for choice in (
            tear("last unsynced write torn at a random byte", lambda _o, d: d[: rng.randrange(1, len(d))]),
            tear("last unsynced write torn at a sector boundary", sector_cut),
            tear("last unsynced write with a garbage last sector", garbage),
        ):
            if choice is not None:
                yield choice


# ---------------------------------------------------------------- recording a workload


class Entry(NamedTuple):
    """One appended record: payload, trace position when its append was called, and when it returned."""

    payload: bytes
    called: int
    returned: int


class Failed(NamedTuple):
    """The records of one log in an append that failed (and was undone): they would have had seqs
    ``base``, ``base + 1``...; ``called`` as in :class:`Entry`."""

    base: int
    payloads: list[bytes]
    called: int


class Expect(NamedTuple):
    """What a recovery may return at one crash point, per log: ``main`` the successful appends as
    (payload, called?, acknowledged?), ``failed`` the (base seq, payloads) of failed appends called."""

    main: dict[int, list[tuple[bytes, bool, bool]]]
    failed: dict[int, list[tuple[int, list[bytes]]]]


@dataclass
class Recording:
    segment_bytes: int
    files: Files  # the durable state the recording started from
    dirs: frozenset[str]
    io: list[Event] = field(default_factory=list)
    entries: dict[int, list[Entry]] = field(default_factory=dict)  # per log, its successful appends
    failed: dict[int, list[Failed]] = field(default_factory=dict)

    def expect_at(self, k: int) -> tuple[Expect, tuple[int, int, int]]:
        """What recovery may return at crash point ``k``; and a signature of it (for deduplication)."""
        main = {
            log_id: [(e.payload, e.called < k, e.returned <= k) for e in es]
            for log_id, es in self.entries.items()
        }
        failed = {
            log_id: [(f.base, f.payloads) for f in fs if f.called < k] for log_id, fs in self.failed.items()
        }
        called = sum(c for es in main.values() for _p, c, _a in es)
        acked = sum(a for es in main.values() for _p, _c, a in es)
        return Expect(main, failed), (called, acked, sum(map(len, failed.values())))


def _materialize(dest: Path, files: Files, dirs: frozenset[str] | set[str]) -> None:
    os.mkdir(dest)
    for d in sorted(dirs, key=lambda d: d.count("/")):
        if d:
            os.mkdir(dest / d)
    for rel, data in files.items():
        (dest / rel).write_bytes(data)


def _disk(dest: Path) -> tuple[Files, frozenset[str]]:
    files, dirs = {}, set()
    for top, subdirs, names in os.walk(dest):
        for d in subdirs:
            dirs.add(os.path.relpath(os.path.join(top, d), dest))
        for n in names:
            path = os.path.join(top, n)
            files[os.path.relpath(path, dest)] = Path(path).read_bytes()
    return files, frozenset(dirs)


def _read_all(store: LogStore) -> dict[int, list[bytes]]:
    out = {}
    for log_id in store.logs():
        records = list(store.read(log_id))
        if [(r.log_id, r.seq) for r in records] != [(log_id, s) for s in range(len(records))]:
            raise AssertionError(f"log {log_id}: read gave seqs {[r.seq for r in records]}")
        out[log_id] = [r.payload for r in records]
    return out


def record(
    base: Path,
    batches: list[list[tuple[int, int]]],
    *,
    tag: str,
    segment_bytes: int = SEGMENT_BYTES,
    reopen_before: tuple[int, ...] = (),
    fail: dict[int, int] | None = None,
    start: tuple[Files, frozenset[str]] = ({}, frozenset()),
) -> Recording:
    """Run ``batches`` (each a list of (log id, payload size)) on a store under ``base``, every call recorded.

    ``fail``: batch index -> how many of its ``pwritev`` calls succeed before one fails with ENOSPC
    (the store undoes the batch: truncate, unlink of a segment it had just made); a later batch then
    appends other bytes at the same seqs. ``start``: the durable files and folders under ``base`` to
    begin from (a crash state); the records a recovery of it keeps are the first entries of their
    logs, acknowledged from the start.
    """
    fail = fail or {}
    files, dirs = start
    _materialize(base, files, dirs)
    rec = Recording(segment_bytes, dict(files), frozenset(dirs))
    if is_store(base / ROOT):
        with LogStore.open(base / ROOT, read_only=True) as store:
            rec.entries = {log_id: [Entry(p, -1, 0) for p in ps] for log_id, ps in _read_all(store).items()}
    recorder = RecordingOS(base, _initial_inodes(files), set(dirs))
    with _store_os(recorder):
        store = LogStore.open(base / ROOT, segment_bytes=segment_bytes)
        try:
            for i, batch in enumerate(batches):
                if i in reopen_before:
                    store.close()
                    store = LogStore.open(base / ROOT, segment_bytes=segment_bytes)
                ops, seqs = [], {}
                for log_id, size in batch:
                    seq = seqs.get(log_id, len(rec.entries.get(log_id, ())))
                    seqs[log_id] = seq + 1
                    ops.append((log_id, seq, _payload(f"{tag}/{i}", log_id, seq, size)))
                called = len(recorder.io)
                recorder.fail_after = fail.get(i)
                try:
                    store.append_many(ops)
                except LogStoreError as err:
                    assert i in fail and "injected" in str(err), err
                    for log_id in dict.fromkeys(log_id for log_id, _s, _p in ops):
                        mine = [p for lid, _s, p in ops if lid == log_id]
                        base_seq = len(rec.entries.get(log_id, ()))
                        rec.failed.setdefault(log_id, []).append(Failed(base_seq, mine, called))
                    continue
                finally:
                    recorder.fail_after = None
                returned = len(recorder.io)
                for log_id, _seq, payload in ops:
                    rec.entries.setdefault(log_id, []).append(Entry(payload, called, returned))
        finally:
            store.close()
    rec.io = recorder.io
    model = Model(rec.files, set(rec.dirs))
    for ev in rec.io:
        model.apply(ev)
    assert model.volatile() == _disk(base), "the recording misses some of what the store did to its files"
    return rec


# ---------------------------------------------------------------- checking a crash state


def _judge(got: dict[int, list[object]], expect: Expect, fp: Callable[[bytes], object]) -> list[str]:
    """Invariants (1), (3) and (4) on what a recovery returned, per log a list of payload fingerprints.

    A log must be a prefix of its successful appends (each called by now), or follow them up to a
    failed append and then be a prefix of that append's records; it must hold every acknowledged one.
    """
    bad = []
    for log_id in sorted({*got, *expect.main}):
        items = got.get(log_id, [])
        main = [(fp(p), called, acked) for p, called, acked in expect.main.get(log_id, [])]
        n = 0  # records that follow the successful appends
        while n < len(items) and n < len(main) and main[n][1] and items[n] == main[n][0]:
            n += 1
        if n < len(items):
            branches = expect.failed.get(log_id, [])
            if not any(
                base <= n and items[base:] == [fp(p) for p in payloads[: len(items) - base]]
                for base, payloads in branches
            ):
                if any(base <= n < base + len(ps) and fp(ps[n - base]) == items[n] for base, ps in branches):
                    what = "a failed append's record, on top of records it was not appended after"
                elif n >= len(main) or not main[n][1]:
                    what = "a record that was never appended"
                else:
                    what = "not the bytes appended (garbage taken for a record)"
                bad.append(f"log {log_id} seq {n}: {what}")
        acked = sum(1 for _f, _c, a in main if a)
        if n < acked:
            bad.append(f"log {log_id}: acknowledged seq {n}..{acked - 1} lost")
    return bad


@dataclass
class Outcome:
    problems: list[str]
    report: RecoveryReport | None = None


def check_state(
    dest: Path, files: Files, dirs: frozenset[str], expect: Expect, segment_bytes: int
) -> Outcome:
    """Materialise a crash state at ``dest``, recover it read-only and writable, and judge what comes back."""
    _materialize(dest, files, dirs)
    root = dest / ROOT
    bad: list[str] = []
    listing = None
    if is_store(root):
        try:
            listing = site_listing(root)
        except Exception as err:  # noqa: BLE001 - any exception is a finding
            bad.append(f"read-only recovery raised {type(err).__name__}: {err}")
        if _disk(dest) != (files, dirs):
            bad.append("read-only recovery modified the store")
        if listing is not None:
            got = {int(k): [(size, digest) for _s, size, digest in v] for k, v in listing["logs"].items()}
            bad += [
                f"read-only recovery: {p}" for p in _judge(got, expect, lambda p: (len(p), payload_digest(p)))
            ]
    report = None
    with _store_os(_NOSYNC):
        try:
            store = LogStore.open(root, segment_bytes=segment_bytes)
        except Exception as err:  # noqa: BLE001
            return Outcome([*bad, f"recovery raised {type(err).__name__}: {err}"])
        try:
            got = _read_all(store)
            report = store.recovery
            bad += _judge(got, expect, bytes)
            if report.records != sum(map(len, got.values())) or report.logs != len(got):
                bad.append(f"recovery report {report.records} records in {report.logs} logs, read {got}")
            if any(store.next_seq(log_id) != len(ps) for log_id, ps in got.items()):
                bad.append("next_seq does not follow a log")
            if listing is not None:
                mine = {
                    str(k): [[s, len(p), payload_digest(p)] for s, p in enumerate(ps)]
                    for k, ps in got.items()
                }
                if listing["logs"] != mine:
                    bad.append("read-only and writable recovery disagree")
            more = [
                (log_id, len(got.get(log_id, ())), b"after recovery %d" % log_id)
                for log_id in sorted({*expect.main, *got, NEW_LOG})
            ]
            store.append_many(more)
            store.close()
            with LogStore.open(root, segment_bytes=segment_bytes) as again:
                for log_id, seq, payload in more:
                    got.setdefault(log_id, []).append(payload)
                    assert seq == len(got[log_id]) - 1
                if _read_all(again) != got:
                    bad.append(
                        "after recovery, an append to every log and a reopen: not read back as written"
                    )
                if again.recovery.records_dropped or again.recovery.bytes_truncated:
                    bad.append(f"a second recovery still dropped or truncated: {again.recovery}")
        except Exception as err:  # noqa: BLE001
            bad.append(f"the recovered store failed: {type(err).__name__}: {err}")
        finally:
            store.close()
    return Outcome(bad, report)


@dataclass
class Campaign:
    states: int = 0
    problems: list[str] = field(default_factory=list)
    repaired: list[tuple[str, Files, frozenset[str], RecoveryReport]] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0

    def add(self, other: Campaign) -> None:
        self.states += other.states
        self.problems += other.problems
        self.repaired += other.repaired
        self.truncated += other.truncated
        self.dropped += other.dropped


def crash_everywhere(
    rec: Recording, scratch: Path, seed: int, *, subsets: int = 2, stop_after: int | None = None
) -> Campaign:
    """Crash ``rec`` at every point, check every distinct crash state; stop after ``stop_after`` problems."""
    rng = random.Random(seed)
    model = Model(rec.files, set(rec.dirs))
    out = Campaign()
    seen: set[tuple] = set()
    for k in range(len(rec.io) + 1):
        where = "before the first operation"
        if k:
            where = f"after {model.describe(rec.io[k - 1])}"
            model.apply(rec.io[k - 1])
        expect, signature = rec.expect_at(k)
        for label, files, dirs in model.crash_states(rng, subsets):
            digest = hashlib.blake2b(repr((sorted(files.items()), sorted(dirs))).encode(), digest_size=16)
            key = (digest.digest(), signature)
            if key in seen:
                continue
            seen.add(key)
            dest = scratch / f"state-{out.states}"
            result = check_state(dest, files, dirs, expect, rec.segment_bytes)
            shutil.rmtree(dest)
            out.states += 1
            at = f"crash point {k}/{len(rec.io)} ({where}) [{label}]"
            out.problems += [f"{at}: {p}" for p in result.problems]
            rep = result.report
            if rep is not None and (rep.bytes_truncated or rep.records_dropped):
                out.truncated += bool(rep.bytes_truncated)
                out.dropped += bool(rep.records_dropped)
                out.repaired.append((at, files, dirs, rep))
            if stop_after is not None and len(out.problems) >= stop_after:
                return out
    return out


# ---------------------------------------------------------------- workloads

LOGS = (0, 1, 7, 2**32 - 1)


def _size(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.1:
        return 0
    if r < 0.5:
        return rng.randint(1, 60)
    if r < 0.85:
        return rng.randint(100, 600)
    return rng.randint(900, 2000)  # larger than a 1 KiB segment: a segment of its own


def _batches(rng: random.Random, n: int, max_records: int = 6) -> list[list[tuple[int, int]]]:
    """``n`` batches of 1 to ``max_records`` records of one or two logs (a batch holding several records of
    one log is what can leave a gap when its sectors reach the disk out of order)."""
    out = []
    for _ in range(n):
        logs = rng.sample(LOGS, rng.randint(1, 2))
        out.append([(rng.choice(logs), _size(rng)) for _ in range(rng.randint(1, max_records))])
    return out


# Batches ([(log id, payload size)]) whose third fails with ENOSPC in its second segment, after its first
# chunk was written and fdatasynced into the first; the first two leave that segment nearly empty.
# "truncate": the next batch goes straight to a new segment, so nothing syncs the rolled-back segment;
# "unlink": the failed batch's second chunk starts with the next seq of a log its first chunk wrote, and
# the next batch re-appends that first seq into the rolled-back segment.
FAILED_APPENDS = {
    "truncate": [[(0, 1500)], [(0, 10)], [(1, 100), (2, 1500)], [(1, 1500)]],
    "unlink": [[(0, 1500)], [(0, 10)], [(2, 100), (2, 900), (0, 10)], [(2, 5)]],
}
FAILING_BATCH = 2
FAILING_AFTER = 1  # pwritev calls that succeed first


def _failing_workload(rng: random.Random, n: int) -> tuple[list[list[tuple[int, int]]], dict[int, int]]:
    """The FAILED_APPENDS cases, then ``n`` batches of which about one in four fails (in its first or second write)."""
    batches, fail = [], {}
    for case in FAILED_APPENDS.values():
        fail[len(batches) + FAILING_BATCH] = FAILING_AFTER
        batches += case
    for _ in range(n):
        if rng.random() < 0.25:
            fail[len(batches)] = rng.randint(0, 1)
        batches += _batches(rng, 1)
    return batches, fail


def _pick_repairs(repaired: list, n: int) -> list:
    """A few repaired states, as different as can be: most records dropped, longest tail, and some others."""
    if not repaired:
        return []
    by_drop = max(repaired, key=lambda r: (r[3].records_dropped, r[3].bytes_truncated))
    by_tail = max(repaired, key=lambda r: (r[3].bytes_truncated, r[3].records_dropped))
    both = [r for r in repaired if r[3].records_dropped and r[3].bytes_truncated]
    picks = [by_drop, by_tail, *both[:1], *repaired[:: max(1, len(repaired) // n)]]
    out = []
    for r in picks:
        if all(r is not o for o in out):
            out.append(r)
    return out[:n]


def _fail(problems: list[str]) -> str:
    return f"{len(problems)} problems, first ones:\n" + "\n".join(problems[:15])


# ---------------------------------------------------------------- tests


@pytest.fixture()
def scratch(tmp_path: Path) -> Iterator[Path]:
    """Where recordings run and crash states are materialised: a tmpfs when there is one (thousands of
    small folders made and removed; on ext4 that is I/O-bound, twice as slow), else pytest's tmp_path."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="smfs-crash-", dir=shm))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_every_crash_point_of_a_workload_recovers(scratch: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Four workloads (one with a close and reopen halfway, one with failed appends) crashed at every
    point, then crashes during the recovery of some of the states that recovery had to repair, and
    during the appends after it. At least 1,000 distinct crash states, all recovered correctly."""
    started = time.monotonic()
    rng = random.Random(13)
    first, operations = Campaign(), 0
    for run in range(4):
        batches, fail = _failing_workload(rng, 22) if run == 3 else (_batches(rng, 26), {})
        reopen = (13,) if run == 0 else ()
        rec = record(scratch / f"run-{run}", batches, tag=f"run-{run}", reopen_before=reopen, fail=fail)
        kinds = {ev[0] for ev in rec.io}
        seen_everything = {"mkdir", "create", "write", "sync", "dirsync", "rename"} <= kinds
        assert seen_everything, f"the seam (smfs.logstore.os) missed calls: only {kinds}"
        if fail:
            assert {"trunc", "unlink"} <= kinds and len(rec.failed) >= 3, "the failed appends were not undone"
        assert sum(1 for ev in rec.io if ev[0] == "create" and "seg-" in ev[1]) >= 10, "too few segment rolls"
        first.add(crash_everywhere(rec, scratch, seed=run))
        operations += len(rec.io)
    assert not first.problems, _fail(first.problems)
    assert first.truncated >= 100 and first.dropped >= 10, "crash states must exercise torn tails and gaps"

    # Crashes during recovery: repaired states become the durable start of a recovery plus more appends.
    second, recovery_ops = Campaign(), []
    for i, (_at, files, dirs, _rep) in enumerate(_pick_repairs(first.repaired, 6)):
        again = record(scratch / f"again-{i}", _batches(rng, 10), tag=f"again-{i}", start=(files, dirs))
        recovery_ops += again.io[
            : next(n for n, ev in enumerate(again.io) if ev[0] == "write" and len(ev[3]) > 4)
        ]
        second.add(crash_everywhere(again, scratch, seed=100 + i))
    assert not second.problems, _fail(second.problems)
    assert any(ev[0] == "trunc" for ev in recovery_ops), "no crash during the truncation of a torn tail"
    assert any(ev[0] == "write" and ev[3] == b"\xf5SMX" for ev in recovery_ops), "no crash during tombstoning"
    total = first.states + second.states
    with capsys.disabled():
        print(
            f"\ncrash consistency: {total} distinct crash states checked, 0 problems: {first.states} at every"
            f" point of 4 workloads ({operations} operations), {second.states} during and after the recovery"
            f" of {len(_pick_repairs(first.repaired, 6))} repaired states; {time.monotonic() - started:.1f} s"
        )
    assert total >= 1000


@pytest.mark.parametrize("case", list(FAILED_APPENDS))
def test_a_failed_append_is_undone_durably(scratch: Path, case: str) -> None:
    """A batch fails (ENOSPC) in its second segment, after its first chunk was written and fdatasynced
    into the first; the store undoes it (ftruncate of the first segment, unlink of the second) and the
    next batch is acknowledged. That ack must survive any crash, and no record of the failed batch may
    come back on top of it: the undo has to be durable before the next ack.

    "truncate": the next batch goes straight to a new segment, so nothing syncs the truncated one; a
    crash leaves the failed batch's first record (log 1 seq 0) in front of the acknowledged one (log 1
    seq 0) in the next segment, which recovery then drops as a gap. "unlink": the next batch goes into
    the truncated segment; a crash brings back the unlinked segment with the failed batch's log 2 seq 1,
    which recovery accepts after the acknowledged log 2 seq 0 of another batch."""
    rec = record(scratch / "run", FAILED_APPENDS[case], tag=case, fail={FAILING_BATCH: FAILING_AFTER})
    assert rec.failed and {"trunc", "unlink"} <= {ev[0] for ev in rec.io}
    result = crash_everywhere(rec, scratch, seed=3)
    assert not result.problems, _fail(result.problems)


_random_batches = st.lists(
    st.lists(st.tuples(st.sampled_from(LOGS), st.integers(0, 1500)), min_size=1, max_size=5),
    min_size=1,
    max_size=14,
)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batches=_random_batches,
    segment_bytes=st.integers(200, 3000),
    fail=st.dictionaries(st.integers(0, 13), st.integers(0, 2), max_size=3),
    seed=st.integers(0, 2**32),
)
def test_random_workloads_recover_at_every_crash_point(
    scratch: Path, batches: list[list[tuple[int, int]]], segment_bytes: int, fail: dict[int, int], seed: int
) -> None:
    """Random batches on random segment sizes, some failing with ENOSPC, crashed at every point."""
    here = scratch / f"h-{os.urandom(6).hex()}"
    here.mkdir()
    try:
        rec = record(here / "run", batches, tag="h", segment_bytes=segment_bytes, fail=fail)
        result = crash_everywhere(rec, here, seed=seed, subsets=1)
        assert not result.problems, _fail(result.problems)
        assert result.states > len(batches)
    finally:
        shutil.rmtree(here)


# ---------------------------------------------------------------- the checker catches broken stores


def _lagging_sync(real: Callable[[LogStore], None]) -> Callable[[LogStore], None]:
    """Each batch's fdatasync is done at the next batch: every append is acknowledged before its sync."""

    def sync(self: LogStore) -> None:
        owed = getattr(self, "_test_owes_sync", False)
        self._test_owes_sync = True
        if owed:
            real(self)

    return sync


BROKEN = {
    "skips fdatasync": "acknowledged seq",
    "acks before fdatasync": "acknowledged seq",
    "skips the directory fsync of a new segment": "acknowledged seq",
    "recovery skips tombstones": "not read back as written",
}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_the_checker_catches_a_broken_store(
    scratch: Path, monkeypatch: pytest.MonkeyPatch, seed_defect, broken
) -> None:
    """The checker is worth something only if it fails a store that breaks its promise: each broken
    variant (skip the fdatasync, ack before it, skip the folder fsync of a new segment, recover without
    tombstoning) must give a problem of the expected kind in some crash state."""
    rng = random.Random(5)
    batches = [[(1, 300), (1, 300), (2, 50)], *_batches(rng, 12)]  # two sector-spanning records of one log
    if broken == "skips fdatasync":
        monkeypatch.setattr(LogStore, "_sync_data", lambda self: None)
    elif broken == "acks before fdatasync":
        monkeypatch.setattr(LogStore, "_sync_data", _lagging_sync(LogStore._sync_data))
    elif broken == "skips the directory fsync of a new segment":
        seed_defect("mirror-skips-directory-fsync")
    rec = record(scratch / "run", batches, tag="b")
    if broken == "recovery skips tombstones":
        monkeypatch.setattr(LogStore, "_tombstone", lambda self, dropped: None)
    result = crash_everywhere(rec, scratch, seed=2, stop_after=1)
    assert result.problems, f"the checker found nothing wrong with a store that {broken}"
    assert BROKEN[broken] in result.problems[0], result.problems[0]
