"""The segment store: appends, rolling, group commit, and recovery after a cut or a flip at every byte."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smfs import logstore
from smfs.logstore import (
    HEADER_BYTES,
    MARKER,
    DroppedRecord,
    LogStore,
    LogStoreError,
    Record,
    RecordInfo,
    SequenceError,
    is_store,
    payload_digest,
    segment_name,
    site_listing,
)

Op = tuple[int, int, bytes]


def _payload(log_id: int, seq: int, size: int) -> bytes:
    """Deterministic bytes that never contain the record magic, so resync only finds real records."""
    data = hashlib.shake_128(f"{log_id}/{seq}".encode()).digest(size)
    return data.replace(b"\xf5", b"\x00")


def _workload() -> list[Op]:
    """3 logs, interleaved, varied sizes (0 to 700 bytes): a few KB in one segment."""
    sizes = {7: [0, 13, 700, 1, 90], 8: [250, 3, 64], 1_000_000: [1, 400, 0, 33]}
    order = [7, 8, 1_000_000, 7, 7, 1_000_000, 8, 7, 1_000_000, 8, 1_000_000, 7]
    nxt = dict.fromkeys(sizes, 0)
    ops = []
    for log_id in order:
        seq = nxt[log_id]
        nxt[log_id] += 1
        ops.append((log_id, seq, _payload(log_id, seq, sizes[log_id][seq])))
    return ops


def _bounds(ops: list[Op]) -> list[tuple[int, int]]:
    """(start, end) byte offsets of each record of ``ops`` written into one segment."""
    out, pos = [], 0
    for _log_id, _seq, payload in ops:
        out.append((pos, pos + HEADER_BYTES + len(payload)))
        pos += HEADER_BYTES + len(payload)
    return out


def _record_ends(data: bytes) -> list[int]:
    """End offsets of the records of an undamaged segment, bytes (walks the length fields)."""
    ends, pos = [], 0
    while pos < len(data):
        pos += HEADER_BYTES + int.from_bytes(data[pos + 20 : pos + 24], "little")
        ends.append(pos)
    return ends


def _logs(ops: list[Op]) -> dict[int, list[bytes]]:
    out: dict[int, list[bytes]] = {}
    for log_id, _seq, payload in ops:
        out.setdefault(log_id, []).append(payload)
    return out


def _contents(store: LogStore) -> dict[int, list[bytes]]:
    out = {}
    for log_id in store.logs():
        records = list(store.read(log_id))
        assert [r.seq for r in records] == list(range(len(records)))
        assert all(r.log_id == log_id for r in records)
        out[log_id] = [r.payload for r in records]
    return out


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.iterdir())}


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Op], bytes]:
    """The workload written to one segment; returns the ops and the segment's bytes."""
    root = tmp_path_factory.mktemp("small") / "store"
    ops = _workload()
    with LogStore.open(root, sync=False) as store:
        for op in ops[:5]:
            store.append(*op)
        store.append_many(ops[5:])
    data = (root / segment_name(1)).read_bytes()
    assert len(data) == _bounds(ops)[-1][1]
    return ops, data


def _store_with(root: Path, data: bytes) -> Path:
    """Make ``root`` (or reuse it) a store whose only segment holds ``data``."""
    root.mkdir(parents=True, exist_ok=True)
    if not (root / MARKER).exists():
        (root / MARKER).write_bytes(b"smfs-logstore 1\n")
    for seg in root.glob("seg-*.smfs"):
        seg.unlink()
    (root / segment_name(1)).write_bytes(data)
    return root


# ---------------------------------------------------------------- appends and reads


def test_round_trip_several_logs(tmp_path: Path) -> None:
    ops = _workload()
    with LogStore.open(tmp_path / "s", sync=False) as store:
        assert store.recovery.records == 0 and store.recovery.clean
        for op in ops:
            store.append(*op)
        assert store.logs() == sorted(_logs(ops))
        assert _contents(store) == _logs(ops)
        assert store.next_seq(7) == 5 and store.next_seq(8) == 3 and store.next_seq(99) == 0
        assert list(store.read(7, start=3)) == [Record(7, 3, ops[7][2]), Record(7, 4, ops[11][2])]
        assert list(store.read(99)) == []
    assert is_store(tmp_path / "s") and not is_store(tmp_path)


def test_listing_gives_sizes_and_digests(tmp_path: Path) -> None:
    ops = _workload()
    with LogStore.open(tmp_path / "s", sync=False) as store:
        store.append_many(ops)
        listing = store.listing()
        store.append(8, 3, b"late")
        again = store.listing()
    want = {
        log_id: [RecordInfo(log_id, seq, len(p), payload_digest(p)) for seq, p in enumerate(payloads)]
        for log_id, payloads in _logs(ops).items()
    }
    assert listing == want
    assert again[8][-1] == RecordInfo(8, 3, 4, hashlib.blake2b(b"late", digest_size=16).hexdigest())
    assert payload_digest(b"") == hashlib.blake2b(b"", digest_size=16).hexdigest()


def test_payload_buffers_of_any_kind(tmp_path: Path) -> None:
    with LogStore.open(tmp_path / "s", sync=False) as store:
        store.append_many([(1, 0, bytearray(b"ab")), (1, 1, memoryview(b"xcdx")[1:3]), (1, 2, b"")])
        with pytest.raises(ValueError):
            store.append(1, 3, memoryview(b"abcd")[::2])
        with pytest.raises(ValueError):
            store.append(-1, 0, b"")
        assert [r.payload for r in store.read(1)] == [b"ab", b"cd", b""]


def test_reopen_keeps_everything(tmp_path: Path) -> None:
    ops = _workload()
    with LogStore.open(tmp_path / "s", segment_bytes=300, sync=False) as store:
        store.append_many(ops[:6])
        for op in ops[6:]:
            store.append(*op)
    with LogStore.open(tmp_path / "s", segment_bytes=300) as store:
        assert store.recovery.clean and store.recovery.records == len(ops) and store.recovery.logs == 3
        assert _contents(store) == _logs(ops)
        store.append(8, 3, b"more")
    with LogStore.open(tmp_path / "s", create=False) as store:
        assert _contents(store)[8][-1] == b"more"


def test_segments_roll_and_big_records_get_their_own(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with LogStore.open(root, segment_bytes=100, sync=False) as store:
        store.append(1, 0, b"a" * 50)  # 74 bytes: segment 1
        store.append(1, 1, b"b" * 500)  # larger than a segment: segment 2 alone
        store.append(2, 0, b"c" * 10)  # 34 bytes: segment 3
        store.append(2, 1, b"d" * 10)  # 68 bytes: still segment 3
        store.append_many([(1, 2, b"e" * 40), (2, 2, b"f" * 5)])  # 64 bytes: segment 4, 29 more: 4
    sizes = {p.name: p.stat().st_size for p in root.glob("seg-*.smfs")}
    assert sizes == {segment_name(1): 74, segment_name(2): 524, segment_name(3): 68, segment_name(4): 93}
    with LogStore.open(root, segment_bytes=100, sync=False) as store:
        assert store.recovery.clean
        assert _contents(store) == {
            1: [b"a" * 50, b"b" * 500, b"e" * 40],
            2: [b"c" * 10, b"d" * 10, b"f" * 5],
        }


def test_batch_spanning_segments(tmp_path: Path) -> None:
    ops = [(3, i, _payload(3, i, 30)) for i in range(20)]
    with LogStore.open(tmp_path / "s", segment_bytes=200, sync=False) as store:
        store.append_many(ops)
    assert len(list((tmp_path / "s").glob("seg-*.smfs"))) == 7  # 54 bytes a record, 3 per segment
    with LogStore.open(tmp_path / "s", segment_bytes=200, sync=False) as store:
        assert _contents(store) == _logs(ops)


def test_sequence_error_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with LogStore.open(root, sync=False) as store:
        store.append(1, 0, b"zero")
        before = (root / segment_name(1)).read_bytes()
        with pytest.raises(SequenceError) as info:
            store.append(1, 2, b"two")
        assert (info.value.log_id, info.value.expected, info.value.got) == (1, 1, 2)
        assert isinstance(info.value, LogStoreError)
        with pytest.raises(SequenceError):
            store.append(2, 1, b"new log must start at 0")
        assert (root / segment_name(1)).read_bytes() == before
        assert store.next_seq(1) == 1 and store.logs() == [1]


def test_append_many_is_all_or_nothing_on_a_bad_seq(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with LogStore.open(root, sync=False) as store:
        store.append(1, 0, b"zero")
        before = (root / segment_name(1)).read_bytes()
        for bad in (
            [(2, 0, b"ok"), (1, 1, b"ok"), (1, 3, b"gap")],
            [(1, 1, b"ok"), (1, 1, b"duplicate")],
            [(2, 0, b"ok"), (3, 1, b"gap")],
        ):
            with pytest.raises(SequenceError):
                store.append_many(bad)
        assert (root / segment_name(1)).read_bytes() == before
        assert store.logs() == [1] and store.next_seq(1) == 1 and store.next_seq(2) == 0
        store.append_many([(2, 0, b"a"), (1, 1, b"b"), (2, 1, b"c")])
        store.append_many([])
        assert _contents(store) == {1: [b"zero", b"b"], 2: [b"a", b"c"]}


def test_group_commit_is_one_write_and_one_fdatasync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_pwritev, real_fdatasync = os.pwritev, os.fdatasync

    def pwritev(fd: int, bufs: list[bytes], offset: int) -> int:
        calls.append("pwritev")
        return real_pwritev(fd, bufs, offset)

    def fdatasync(fd: int) -> None:
        calls.append("fdatasync")
        real_fdatasync(fd)

    with LogStore.open(tmp_path / "s", sync=True) as store:
        monkeypatch.setattr(os, "pwritev", pwritev)
        monkeypatch.setattr(os, "fdatasync", fdatasync)
        store.append_many([(log_id, 0, _payload(log_id, 0, 4096)) for log_id in range(8)])
        assert calls == ["pwritev", "fdatasync"]
        calls.clear()
        store.append(0, 1, b"x")
        assert calls == ["pwritev", "fdatasync"]
    monkeypatch.undo()
    with LogStore.open(tmp_path / "s") as store:
        assert store.recovery.records == 9


def test_failed_write_is_undone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "s"
    real_pwritev = os.pwritev

    def half_then_enospc(fd: int, bufs: list[bytes], offset: int) -> int:
        monkeypatch.setattr(os, "pwritev", enospc)
        return real_pwritev(fd, [bufs[0]], offset)

    def enospc(fd: int, bufs: list[bytes], offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    with LogStore.open(root, sync=False) as store:
        store.append(1, 0, b"zero")
        monkeypatch.setattr(os, "pwritev", half_then_enospc)
        with pytest.raises(LogStoreError, match="No space"):
            store.append_many([(1, 1, b"one"), (2, 0, b"two")])
        monkeypatch.setattr(os, "pwritev", real_pwritev)
        assert (root / segment_name(1)).stat().st_size == HEADER_BYTES + 4
        assert store.next_seq(1) == 1
        store.append(1, 1, b"one")
    with LogStore.open(root) as store:
        assert store.recovery.clean and _contents(store) == {1: [b"zero", b"one"]}


def test_one_writer_at_a_time_and_closed_store(tmp_path: Path) -> None:
    root = tmp_path / "s"
    store = LogStore.open(root, sync=False)
    with pytest.raises(LogStoreError, match="elsewhere"):
        LogStore.open(root, sync=False)
    with LogStore.open(root, read_only=True) as reader:
        with pytest.raises(LogStoreError, match="read-only"):
            reader.append(1, 0, b"x")
    store.close()
    with pytest.raises(LogStoreError, match="closed"):
        store.append(1, 0, b"x")
    with pytest.raises(LogStoreError, match="closed"):
        list(store.read(1))
    LogStore.open(root, sync=False).close()


def test_open_refuses_a_non_store(tmp_path: Path) -> None:
    with pytest.raises(LogStoreError, match="not a store"):
        LogStore.open(tmp_path, create=False)
    with pytest.raises(LogStoreError, match="not a store"):
        LogStore.open(tmp_path / "missing", read_only=True)
    with pytest.raises(ValueError):
        LogStore.open(tmp_path / "s", segment_bytes=0)
    assert not (tmp_path / MARKER).exists() and not (tmp_path / "missing").exists()


# ---------------------------------------------------------------- recovery


def test_recovery_after_a_cut_at_every_byte(tmp_path: Path, small_store: tuple[list[Op], bytes]) -> None:
    ops, data = small_store
    bounds = _bounds(ops)
    for cut in range(len(data) + 1):
        whole = [op for op, (_start, end) in zip(ops, bounds, strict=True) if end <= cut]
        valid_end = max([end for _start, end in bounds if end <= cut], default=0)
        root = _store_with(tmp_path / "cut", data[:cut])
        with LogStore.open(root, sync=False) as store:
            rep = store.recovery
            assert rep.records == len(whole), cut
            assert rep.bytes_truncated == cut - valid_end, cut
            assert rep.records_dropped == 0, cut
            assert _contents(store) == _logs(whole), cut
            nexts = {log_id: store.next_seq(log_id) for log_id in (7, 8, 1_000_000)}
            store.append_many([(log_id, seq, b"after %d" % cut) for log_id, seq in nexts.items()])
        assert (root / segment_name(1)).stat().st_size == valid_end + 3 * (
            HEADER_BYTES + len(b"after %d" % cut)
        )
        with LogStore.open(root, sync=False) as store:
            assert store.recovery.clean, (cut, store.recovery)
            got = _contents(store)
            for log_id, seq in nexts.items():
                assert got[log_id] == _logs(whole).get(log_id, [])[:seq] + [b"after %d" % cut]


def test_recovery_after_a_flipped_byte_anywhere(tmp_path: Path, small_store: tuple[list[Op], bytes]) -> None:
    ops, data = small_store
    bounds = _bounds(ops)
    originals = _logs(ops)
    for pos in range(len(data)):
        hit = next(i for i, (start, end) in enumerate(bounds) if start <= pos < end)
        hit_log, hit_seq = ops[hit][0], ops[hit][1]
        bad = bytearray(data)
        bad[pos] ^= 0xFF
        root = _store_with(tmp_path / "flip", bytes(bad))
        with LogStore.open(root, sync=False) as store:
            got = _contents(store)
            for log_id, payloads in got.items():
                assert payloads == originals[log_id][: len(payloads)], pos  # a prefix, nothing altered
            # The damaged record's log is cut there; resync keeps the other logs whole.
            assert got.get(hit_log, []) == originals[hit_log][:hit_seq], pos
            assert all(got[log_id] == originals[log_id] for log_id in originals if log_id != hit_log), pos
            later = len(originals[hit_log]) - hit_seq - 1
            assert store.recovery.records_dropped == later, pos
            assert store.recovery.reasons, pos
            _assert_dropped_named(store.recovery.dropped, ops, hit, pos - bounds[hit][0])
            store.append(hit_log, hit_seq, b"replacement")
        with LogStore.open(root, sync=False) as store:
            assert store.recovery.records_dropped == 0, pos
            again = _contents(store)
            assert again[hit_log] == originals[hit_log][:hit_seq] + [b"replacement"], pos


def _assert_dropped_named(dropped: tuple[DroppedRecord, ...], ops: list[Op], hit: int, at: int) -> None:
    """Recovery names the later records of the damaged one's log (``gap``) and, when the flip at byte
    ``at`` of record ``hit`` left its magic, log id, seq and length alone, the damaged one itself:
    ``checksum``, or ``torn`` when it was the last record of the segment."""
    hit_log, hit_seq = ops[hit][0], ops[hit][1]
    later = [DroppedRecord(hit_log, seq, "gap") for log_id, seq, _p in ops[hit + 1 :] if log_id == hit_log]
    assert [d for d in dropped if d.reason == "gap"] == later, at
    if 4 <= at < 8 or at >= HEADER_BYTES:  # the crc or the payload
        reason = "torn" if hit == len(ops) - 1 else "checksum"
        assert dropped[0] == DroppedRecord(hit_log, hit_seq, reason), at
        assert len(dropped) == len(later) + 1, at
    elif at < 4:  # the magic: nothing names the record
        assert len(dropped) == len(later), at
    assert all(isinstance(d.log_id, int) and d.reason in {"gap", "checksum", "torn"} for d in dropped), at


def test_gap_in_an_old_segment_is_tombstoned(tmp_path: Path) -> None:
    """Records dropped after a gap must not shadow appends made after recovery (next reopen)."""
    root = tmp_path / "s"
    ops = [(1, i, _payload(1, i, 40)) for i in range(6)] + [(2, 0, b"other")]
    with LogStore.open(root, segment_bytes=200, sync=False) as store:
        store.append_many(ops)  # 64 bytes a record: segments of 3, 3, 1 records
    seg1 = root / segment_name(1)
    damaged = bytearray(seg1.read_bytes())
    damaged[64 + HEADER_BYTES + 5] ^= 0x01  # payload of log 1 seq 1
    seg1.write_bytes(damaged)
    with LogStore.open(root, segment_bytes=200, sync=False) as store:
        assert store.recovery.records_dropped == 4 and store.next_seq(1) == 1
        assert store.recovery.bytes_truncated == 0
        assert store.recovery.dropped == (DroppedRecord(1, 1, "checksum"),
                                          *(DroppedRecord(1, seq, "gap") for seq in range(2, 6)))
        store.append_many([(1, 1, b"new one"), (1, 2, b"new two")])
    with LogStore.open(root, segment_bytes=200, sync=False) as store:
        assert store.recovery.records_dropped == 0  # the gap's records were tombstoned; the bad bytes stay
        assert store.recovery.dropped == (DroppedRecord(1, 1, "checksum"),)
        assert _contents(store) == {1: [ops[0][2], b"new one", b"new two"], 2: [b"other"]}


def test_read_detects_corruption_after_open(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with LogStore.open(root, sync=False) as store:
        store.append_many([(1, 0, b"alpha"), (1, 1, b"beta")])
        seg = root / segment_name(1)
        data = bytearray(seg.read_bytes())
        data[-1] ^= 0x40
        seg.write_bytes(data)
        with pytest.raises(LogStoreError, match="corrupt"):
            list(store.read(1))


def test_read_only_recovery_modifies_nothing(tmp_path: Path, small_store: tuple[list[Op], bytes]) -> None:
    ops, data = small_store
    bad = bytearray(data[:-7])  # torn tail
    bad[_bounds(ops)[2][0] + 30] ^= 0x10  # and a damaged record in the middle: a gap in its log
    root = _store_with(tmp_path / "s", bytes(bad))
    before = _snapshot(root)
    with LogStore.open(root, read_only=True) as store:
        rep = store.recovery
        assert rep.bytes_truncated > 0 and rep.records_dropped > 0 and rep.reasons
        assert store.listing()
    assert _snapshot(root) == before
    with LogStore.open(root, sync=False) as store:  # a writable open repairs the same way
        assert (store.recovery.bytes_truncated, store.recovery.records_dropped) == (
            rep.bytes_truncated,
            rep.records_dropped,
        )
    assert _snapshot(root) != before


def test_site_listing_merges_servers(tmp_path: Path) -> None:
    site = tmp_path / "mirror"
    for server, logs in ((0, (1, 5)), (3, (2,))):
        with LogStore.open(site / f"server-{server}", sync=False) as store:
            for log_id in logs:
                store.append_many([(log_id, seq, b"%d-%d" % (log_id, seq)) for seq in range(log_id)])
    (site / "not-a-store").mkdir()
    seg = site / "server-3" / segment_name(1)
    seg.write_bytes(seg.read_bytes() + b"torn")
    before = _snapshot(site / "server-3")
    listing = site_listing(site)
    assert _snapshot(site / "server-3") == before
    assert json.loads(json.dumps(listing)) == listing
    assert listing["logs"] == {
        "1": [[0, 3, payload_digest(b"1-0")]],
        "2": [[0, 3, payload_digest(b"2-0")], [1, 3, payload_digest(b"2-1")]],
        "5": [[seq, 3, payload_digest(b"5-%d" % seq)] for seq in range(5)],
    }
    assert [(s["path"], s["records"], s["bytes_truncated"]) for s in listing["stores"]] == [
        (str(site / "server-0"), 6, 0),
        (str(site / "server-3"), 2, 4),
    ]
    assert listing["dropped"] == [] and listing["dropped_omitted"] == 0  # "torn" is too short for a header
    assert site_listing(site / "server-0")["logs"].keys() == {"1", "5"}
    assert site_listing(tmp_path / "mirror" / "not-a-store") == {
        "logs": {}, "stores": [], "dropped": [], "dropped_omitted": 0}
    with pytest.raises(LogStoreError):
        site_listing(tmp_path / "nowhere")
    with LogStore.open(site / "server-4", sync=False) as store:
        store.append(5, 0, b"duplicate log")
    with pytest.raises(LogStoreError, match="log 5 is in two stores"):
        site_listing(site)


def _damaged_site(tmp_path: Path) -> tuple[Path, bytes]:
    """Site with two stores: server-0 holds log 1 seqs 0..4 (64-byte payloads) with a flipped payload
    byte in seq 1 and seq 4 torn after its header; server-1 holds log 2 seqs 0..2, intact."""
    site = tmp_path / "mirror"
    with LogStore.open(site / "server-0", sync=False) as store:
        store.append_many([(1, seq, _payload(1, seq, 64)) for seq in range(5)])
    with LogStore.open(site / "server-1", sync=False) as store:
        store.append_many([(2, seq, _payload(2, seq, 64)) for seq in range(3)])
    seg = site / "server-0" / segment_name(1)
    data = bytearray(seg.read_bytes())
    step = HEADER_BYTES + 64
    data[step + HEADER_BYTES + 30] ^= 0x40
    seg.write_bytes(bytes(data[: 4 * step + HEADER_BYTES + 10]))
    return site, bytes(data)


def test_site_listing_names_the_dropped_records_and_modifies_nothing(tmp_path: Path) -> None:
    site, _data = _damaged_site(tmp_path)
    before = _snapshot(site / "server-0")
    listing = site_listing(site)
    assert _snapshot(site / "server-0") == before
    assert json.loads(json.dumps(listing)) == listing
    assert listing["logs"]["1"] == [[0, 64, payload_digest(_payload(1, 0, 64))]] and len(listing["logs"]["2"]) == 3
    assert listing["dropped"] == [["1", 1, "checksum"], ["1", 2, "gap"], ["1", 3, "gap"], ["1", 4, "torn"]]
    assert listing["dropped_omitted"] == 0
    store0 = listing["stores"][0]
    assert (store0["records"], store0["bytes_truncated"], store0["records_dropped"]) == (1, HEADER_BYTES + 10, 2)


def test_torn_tail_walks_every_readable_header(tmp_path: Path) -> None:
    """A power cut in a batch can leave several partial records at the tail; each readable one is named."""
    root = tmp_path / "s"
    with LogStore.open(root, sync=False) as store:
        store.append_many([(1, seq, _payload(1, seq, 40)) for seq in range(4)])
    seg = root / segment_name(1)
    data = bytearray(seg.read_bytes())
    step = HEADER_BYTES + 40
    data[step + HEADER_BYTES + 1] ^= 0x01  # seq 1's payload: a bad record the tail starts with
    data[2 * step + HEADER_BYTES + 1] ^= 0x01  # seq 2's too (length still sane)
    seg.write_bytes(bytes(data[: 3 * step + HEADER_BYTES + 3]))  # and seq 3 torn after its header
    with LogStore.open(root, read_only=True) as store:
        assert store.recovery.dropped == tuple(DroppedRecord(1, seq, "torn") for seq in (1, 2, 3))
        assert store.recovery.bytes_truncated == len(data[step : 3 * step + HEADER_BYTES + 3])


def test_dropped_records_past_the_cap_are_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site, _data = _damaged_site(tmp_path)
    monkeypatch.setattr(logstore, "MAX_DROPPED", 3)
    with LogStore.open(site / "server-0", read_only=True) as store:
        assert len(store.recovery.dropped) == 3 and store.recovery.dropped_omitted == 1
    with LogStore.open(site / "server-2", sync=False) as store:  # a third store: a gap in log 3
        store.append(3, 0, b"x")
    seg = site / "server-2" / segment_name(1)
    seg.write_bytes(seg.read_bytes() * 2)  # seq 0 again after seq 0: the second one is dropped
    listing = site_listing(site)
    assert listing["dropped"] == [["1", 1, "checksum"], ["1", 2, "gap"], ["1", 3, "gap"]]
    assert listing["dropped_omitted"] == 2


# ---------------------------------------------------------------- properties

_batches = st.lists(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 300)), min_size=1, max_size=6),
    min_size=1,
    max_size=12,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=_batches, segment_bytes=st.integers(1, 1200), cut=st.integers(0, 2000))
def test_model_with_rolling_and_a_torn_last_segment(
    tmp_path: Path, batches: list[list[tuple[int, int]]], segment_bytes: int, cut: int
) -> None:
    """Random batches over random segment sizes read back as written; a torn last segment loses a suffix."""
    root = tmp_path / f"m-{os.urandom(6).hex()}"
    model: dict[int, list[bytes]] = {}
    with LogStore.open(root, segment_bytes=segment_bytes, sync=False) as store:
        for batch in batches:
            ops = []
            for log_id, size in batch:
                seq = len(model.setdefault(log_id, []))
                model[log_id].append(_payload(log_id, seq, size))
                ops.append((log_id, seq, model[log_id][-1]))
            store.append_many(ops)
        assert _contents(store) == model
    segments = sorted(root.glob("seg-*.smfs"))
    ends = {seg: _record_ends(seg.read_bytes()) for seg in segments}
    assert all(seg.stat().st_size <= segment_bytes or len(ends[seg]) == 1 for seg in segments)
    total = sum(len(v) for v in model.values())
    last = segments[-1]
    last.write_bytes(last.read_bytes()[:cut])
    kept_in_last = sum(1 for end in ends[last] if end <= cut)
    with LogStore.open(root, segment_bytes=segment_bytes, sync=False) as store:
        got = _contents(store)
        for log_id, payloads in got.items():
            assert payloads == model[log_id][: len(payloads)]
        assert store.recovery.records == total - len(ends[last]) + kept_in_last
        assert store.recovery.records_dropped == 0
    shutil.rmtree(root)


def test_module_exports() -> None:
    assert set(logstore.__all__) <= set(dir(logstore))
    assert segment_name(1) == "seg-00000001.smfs"


def test_a_new_store_makes_every_folder_it_created_durable(tmp_path, monkeypatch) -> None:
    """A store at data/mirror/server-0 made from nothing: the names mirror/ and server-0/ must be
    fsynced into their parents, else a power cut before writeback loses the whole store."""
    synced: list[Path] = []
    real = LogStore._sync_dir

    def spy(self, path=None):
        synced.append(Path(path or self.root))
        real(self, path)

    monkeypatch.setattr(LogStore, "_sync_dir", spy)
    root = tmp_path / "data" / "mirror" / "server-0"
    LogStore.open(root).close()
    assert tmp_path in synced and tmp_path / "data" in synced and tmp_path / "data" / "mirror" in synced
    assert root in synced  # the marker and the first segment


@pytest.mark.parametrize("seeded", [False, True])
def test_a_new_segment_is_made_durable_in_its_folder_unless_the_defect_is_seeded(tmp_path, monkeypatch, seeded,
                                                                                   seed_defect) -> None:
    if seeded:
        seed_defect("mirror-skips-directory-fsync")
    store = LogStore.open(tmp_path / "s", segment_bytes=4096)
    synced: list[Path] = []
    monkeypatch.setattr(LogStore, "_sync_dir", lambda self, path=None: synced.append(Path(path or self.root)))
    for seq in range(4):
        store.append(1, seq, b"x" * 3000)  # each append rolls to a new segment
    store.close()
    assert synced == ([] if seeded else [tmp_path / "s"] * 3)


def test_read_only_recovery_reports_a_segment_it_cannot_open_and_goes_on(tmp_path, monkeypatch) -> None:
    """After a crash a segment's name can outlive its inode (minix: ESTALE on open). The listing is
    evidence: the segment is reported unreadable and its records are missing, not a crash."""
    store = LogStore.open(tmp_path / "s", segment_bytes=4096)
    for seq in range(3):
        store.append(1, seq, b"x" * 3000)  # one record per segment
    store.close()
    real_open = open

    def stale(path, *args, **kwargs):
        if str(path).endswith("seg-00000002.smfs"):
            raise OSError(errno.ESTALE, "Stale file handle", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", stale)
    listing = logstore.site_listing(tmp_path / "s")
    assert [r[0] for r in listing["logs"]["1"]] == [0]  # seq 1 unreadable, seq 2 dropped after the gap
    assert any("seg-00000002.smfs: unreadable (Stale file handle)" in r for r in listing["stores"][0]["reasons"])
    with pytest.raises(LogStoreError, match="Stale file handle"):
        LogStore.open(tmp_path / "s")  # a writable open refuses to build on it
