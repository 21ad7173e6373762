"""Figures from a ledger: throughput and latency of acknowledged appends; the one-screen table."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


def ledger_figures(entries: Iterable[Any], t_end: float | None = None) -> dict[str, Any]:
    """Throughput (MB/s, 10^6 bytes) and latency (ms) of the ok appends.

    The window runs from the first invoke to ``t_end`` (the failure) or the last ack, whichever
    is earlier, so time after the power cut does not dilute the rate.
    """
    entries = list(entries)
    ok = [e for e in entries if e.outcome == "ok"]
    if not entries or not ok:
        return {"throughput_MBps": 0.0, "latency_ms": {"p50": None, "p99": None}, "acked_bytes": 0}
    start = min(e.t_invoke for e in entries)
    end = max(e.t_complete for e in ok)
    if t_end is not None:
        end = min(end, t_end)
    lat = np.array([(e.t_complete - e.t_invoke) * 1000.0 for e in ok])
    acked_bytes = sum(e.size for e in ok)
    return {
        "throughput_MBps": round(acked_bytes / max(end - start, 1e-6) / 1e6, 2),
        "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 2), "p99": round(float(np.percentile(lat, 99)), 2)},
        "acked_bytes": acked_bytes,
        "window_s": round(end - start, 3),
    }


def table(modes: Sequence[dict[str, Any]]) -> str:
    """The summary table, one row per mode."""
    cols = ["mode", "acked", "lost", "corrupt", "unexpected", "recovered", "prefix_viol", "MB/s", "p50 ms", "p99 ms", "verdict"]
    rows = [cols]
    for m in modes:
        lat = m.get("latency_ms") or {}
        rows.append([
            m["mode"], m.get("acked", "-"), m.get("lost", "-"), m.get("corrupt", "-"), m.get("unexpected", "-"),
            m.get("recovered", "-"), m.get("prefix_violations", "-"), m.get("throughput_MBps", "-"),
            "-" if lat.get("p50") is None else lat["p50"], "-" if lat.get("p99") is None else lat["p99"],
            m.get("verdict", "-"),
        ])
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(cols))]
    lines = ["  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
