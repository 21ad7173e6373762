"""Local append throughput of the segment store: fdatasync per append versus group commit of 8.

This is the disk's share of an SMFS append (the paper's 512 KiB appends): what the primary and the
mirror servers can sustain before the network is involved. MB/s are decimal (10**6 bytes per second).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from smfs.logstore import LogStore

GROUP = 8
"""Records per group commit (one pwritev and one fdatasync for all of them)."""


def bench_logstore(
    tmpdir: Path,
    append_size: int = 512 * 1024,
    count: int = 512,
    time_budget_s: float = 4.0,
) -> dict[str, float | int]:
    """Measure durable appends into a fresh store under ``tmpdir``; print nothing, return a JSON dict.

    First ``count`` appends of ``append_size`` bytes, each made durable by its own fdatasync; then the
    same number in group commits of 8. Each phase stops early once ``time_budget_s`` seconds have
    passed, so a slow disk still ends in bounded time (about twice the budget). Returns
    ``append_size`` (bytes), ``appends`` (of the first phase), ``MBps_sync_each``, ``MBps_group8``
    (MB/s) and the per-append latency percentiles of the first phase ``p50_ms``, ``p99_ms`` (ms).
    The store is deleted afterwards.
    """
    if append_size <= 0 or count <= 0:
        raise ValueError("append_size and count must be positive")
    root = Path(tempfile.mkdtemp(prefix="bench-logstore-", dir=tmpdir))
    payload = os.urandom(append_size)
    try:
        with LogStore.open(root / "each", sync=True) as store:
            latencies = _sync_each(store, payload, count, time_budget_s)
        appends = len(latencies)
        with LogStore.open(root / "group", sync=True) as store:
            grouped, group_s = _group(store, payload, appends, time_budget_s)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    total_mb = appends * append_size / 1e6
    ordered = sorted(latencies)
    return {
        "append_size": append_size,
        "appends": appends,
        "MBps_sync_each": round(total_mb / sum(latencies), 2),
        "MBps_group8": round(grouped * append_size / 1e6 / group_s, 2),
        "p50_ms": round(_percentile(ordered, 0.50) * 1e3, 3),
        "p99_ms": round(_percentile(ordered, 0.99) * 1e3, 3),
    }


def _sync_each(store: LogStore, payload: bytes, count: int, budget_s: float) -> list[float]:
    """Append one record at a time; return each append's latency, seconds."""
    latencies: list[float] = []
    deadline = time.perf_counter() + budget_s
    for seq in range(count):
        t0 = time.perf_counter()
        store.append(0, seq, payload)
        t1 = time.perf_counter()
        latencies.append(t1 - t0)
        if t1 > deadline:
            break
    return latencies


def _group(store: LogStore, payload: bytes, appends: int, budget_s: float) -> tuple[int, float]:
    """Append up to ``appends`` records in group commits of ``GROUP``; return (records, seconds)."""
    t0 = time.perf_counter()
    done = 0
    while done < appends and time.perf_counter() - t0 <= budget_s:
        batch = range(done, min(done + GROUP, appends))
        store.append_many([(0, seq, payload) for seq in batch])
        done += len(batch)
    return done, time.perf_counter() - t0


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending, non-empty list."""
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]
