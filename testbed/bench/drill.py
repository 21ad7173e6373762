"""Benchmark: throughput of each mode through the namespace drill (one run, same settings)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from smfs.modes import MODES
from testbed.drill.local import LocalDrillConfig, run_local_drill


def bench_local_drill(duration: float = 6.0, testers: int = 16, append_size: int = 512 * 1024,
                      wan_loss: float = 1.0) -> dict[str, Any]:
    """MB/s and latency per mode, with the failure after the run so it does not cut the window."""
    with tempfile.TemporaryDirectory(prefix="smfs-bench-") as tmp:
        cfg = LocalDrillConfig(
            modes=tuple(MODES.values()), testers=testers, append_size=append_size, duration=duration,
            fail_at=duration + 0.5, wan_loss=wan_loss, out=Path(tmp),
        )
        result = run_local_drill(cfg, say=lambda _line: None)
    per_mode = {
        m["mode"]: {"MBps": m.get("throughput_MBps"), "latency_ms": m.get("latency_ms"), "verdict": m.get("verdict"),
                    "error": m.get("error")}
        for m in result["modes"]
    }
    base = (per_mode.get("local-sync") or {}).get("MBps") or None
    for fig in per_mode.values():
        fig["ratio_to_local_sync"] = round(fig["MBps"] / base, 3) if base and fig.get("MBps") else None
    return {"testers": testers, "append_size": append_size, "duration_s": duration, "wan_loss_pct": wan_loss,
            "wan": result["environment"]["wan_loss_method"], "modes": per_mode}
