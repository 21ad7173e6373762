"""Benchmark: a bulk TCP transfer between the site namespaces over the bare path and through the
two FEC gateways, in one run: MB/s, packets/s through the gateways, and the ratio."""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from testbed.drill.gateways import start_gateways
from testbed.netns.bed import ADDRS, NamespaceTestbed


def _transfer(tb: NamespaceTestbed, tmp: Path, port: int, seconds: float) -> dict[str, Any]:
    ready = tmp / f"bulk-{port}.ready"
    server = tb.spawn("mirror", f"bulk-{port}", [sys.executable, "-m", "testbed.bulk", "serve",
                      ADDRS["mirror"].storage, str(port), "--ready", str(ready)], tmp / f"bulk-{port}.log")
    deadline = time.monotonic() + 10
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    out = tb.sh("primary", sys.executable, "-m", "testbed.bulk", "send", ADDRS["mirror"].storage, str(port),
                "--seconds", str(seconds), "--source", ADDRS["primary"].storage)
    server.wait(timeout=10)
    return json.loads(out.strip().splitlines()[-1])


def bench_gateway(seconds: float = 4.0, wan_loss: float = 0.0) -> dict[str, Any]:
    tb = NamespaceTestbed()
    with tempfile.TemporaryDirectory(prefix="smfs-gwbench-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            tb.build()
            tb.set_loss(wan_loss)
            bare = _transfer(tb, tmp, 9100, seconds)
            gw = start_gateways(tb, tmp, tmp)
            before = gw.read("primary") or {}
            fec = _transfer(tb, tmp, 9101, seconds)
            for res in tb.site_processes("primary"):
                if res.meta.get("name") == "primary:gateway":
                    os.kill(int(res.ident), signal.SIGUSR1)
            time.sleep(0.3)
            after = gw.read("primary") or {}
        finally:
            tb.teardown()
    packets = (after.get("packets_in", 0) - before.get("packets_in", 0))
    return {
        "seconds": seconds,
        "wan_loss_pct": wan_loss,
        "bare": {"MBps": bare["MBps"]},
        "gateway": {"MBps": fec["MBps"], "packets_per_s": round(packets / fec["seconds"]),
                    "repairs_sent": after.get("repairs_sent", 0) - before.get("repairs_sent", 0)},
        "ratio_gateway_to_bare": round(fec["MBps"] / bare["MBps"], 3) if bare["MBps"] else None,
    }


if __name__ == "__main__":
    print(json.dumps(bench_gateway(), indent=1))
