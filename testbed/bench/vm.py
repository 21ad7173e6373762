"""Benchmark of the VM testbed: image build (cold/cached), boot to agent-ready per VM, snapshot,
restore, clone and teardown times. ``./inv bench`` prints the dict ``bench_vm()`` returns."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from testbed.paths import cache_dir

REPO = Path(__file__).resolve().parents[2]


def bench_vm(spec: str | Path = REPO / "specs" / "ci.toml", cold: bool = False,
             say: Any = lambda msg: None) -> dict[str, Any]:
    """Times in seconds. ``cold`` also reruns mmdebstrap (minutes; needs Debian's mirror)."""
    from testbed.vm import bed as vmbed
    from testbed.vm.images import ensure_image

    out: dict[str, Any] = {"spec": str(spec)}
    if cold:
        out["image_cold_s"] = round(ensure_image(rebuild_rootfs=True, progress=say).seconds, 1)
    out["image_rebuild_s"] = round(ensure_image(rebuild=True, progress=say).seconds, 2)  # rootfs cached
    out["image_cached_s"] = round(ensure_image(progress=say).seconds, 3)
    t0 = time.monotonic()
    tb = vmbed.up(spec, say=say)
    try:
        out["up_s"] = round(time.monotonic() - t0, 1)
        out["accel"] = tb.accel
        out["boot_to_agent_s"] = {vm: info.boot_seconds for vm, info in tb.vms.items()}
        out["snapshot_s"] = round(tb.snapshot("bench", say), 2)
        out["restore_s"] = round(tb.restore("bench", say), 2)
        name = f"bench-{int(time.time())}"
        t = time.monotonic()
        dest = tb.clone("bench", name, say)
        out["clone_s"] = round(time.monotonic() - t, 2)
        shutil.rmtree(dest, ignore_errors=True)
        first = next(iter(tb.vms))
        out["power_cut_s"] = round(tb.destroy(first), 2)
        out["reboot_to_agent_s"] = round(tb.start(first), 1)
    finally:
        t = time.monotonic()
        vmbed.down(say)
        out["down_s"] = round(time.monotonic() - t, 1)
    out["cache"] = str(cache_dir())
    return out


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(bench_vm(cold="--cold" in sys.argv, say=print), indent=1))
