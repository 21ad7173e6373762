"""Start a Maelstrom gateway in each site namespace and gather their statistics."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smfs.auth import create_key_file
from testbed.errors import InfrastructureError
from testbed.netns.bed import ADDRS, NamespaceTestbed, other

TUNNEL_PORT = 7800
CONTROL = "127.0.0.1:7790"
GATEWAY_READY_TIMEOUT = 30.0
"""Seconds for a gateway in a namespace to write its ready file (one process, no log store to recover)."""


@dataclass
class GatewayPair:
    stats_files: dict[str, Path]

    def read(self, site: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.stats_files[site].read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def collect_stats(self) -> dict[str, Any]:
        """Both gateways' statistics plus the totals a result reports (``rebuilt``, ``lost_on_wan``...)."""
        per_site = {site: self.read(site) for site in self.stats_files}
        total = {"lost_on_wan": 0, "rebuilt": 0, "lost_for_good": 0, "jumped_over": 0, "repairs_sent": 0, "rejected": 0,
                 "edge_drops": 0}
        for st in per_site.values():
            for key in total:
                total[key] += (st or {}).get(key) or 0
        total["rebuilt_fraction"] = round(total["rebuilt"] / total["lost_on_wan"], 4) if total["lost_on_wan"] else None
        prim = per_site.get("primary") or {}
        total["callback_latency_ms"] = prim.get("callback_latency_ms")
        total["params"] = prim.get("params") or (per_site.get("mirror") or {}).get("params")
        return total | {"sites": per_site}


def ensure_c_gateway() -> None:
    """Build the C gateway on this host if its sources changed (``make -f smfs/native/gateway.mk static``);
    InfrastructureError with make's last lines when it cannot be built."""
    import subprocess

    mk = Path(__file__).resolve().parents[2] / "smfs" / "native" / "gateway.mk"
    res = subprocess.run(["make", "-s", "-f", str(mk), "static"], capture_output=True, text=True)
    if res.returncode != 0:
        tail = " | ".join((res.stderr or res.stdout).strip().splitlines()[-3:])
        raise InfrastructureError(f"building the C gateway failed ({tail}); ./inv installs gcc, make and libssl-dev")


def start_gateways(tb: NamespaceTestbed, out: Path, logs: Path, r: int = 8,
                   interleaves: tuple[int, ...] | None = None, wan_rate_bps: int = 0,
                   edge_queue: int = 0, env: dict[str, str] | None = None, flush_ms: float | None = None,
                   engine: str = "python", key_file: Path | None = None) -> GatewayPair:
    """One gateway per site namespace; storage traffic between the sites is routed through them
    (each paced to ``wan_rate_bps`` when given). ``key_file``: the testbed's key (the storage servers'
    too); without one, a fresh key in ``out/work/tunnel.key`` (mode 0600 from its creation)."""
    if engine == "c":
        ensure_c_gateway()
    (out / "work").mkdir(parents=True, exist_ok=True)
    if key_file is None:
        key_file = out / "work" / "tunnel.key"
        create_key_file(key_file)
    stats = {}
    waiting = []
    for site in ("mirror", "primary"):
        me, peer = ADDRS[site], ADDRS[other(site)]
        stats[site] = out / f"fec-{site}.json"
        ready = out / "work" / f"gateway-{site}.ready"
        argv = [
            sys.executable, "-m", "smfs.gateway", "--site", site, "--tun", "smfs0", "--address", me.storage,
            "--route", peer.storage_net, "--local", f"{me.wan}:{TUNNEL_PORT}", "--peer", f"{peer.wan}:{TUNNEL_PORT}",
            "--control", CONTROL, "--key-file", str(key_file), "--stats", str(stats[site]), "--ready", str(ready),
            "--r", str(r),
        ]
        if interleaves is not None:
            argv += ["--interleaves", *map(str, interleaves)]
        if wan_rate_bps:
            argv += ["--wan-rate-bps", str(wan_rate_bps)]
        if edge_queue:
            argv += ["--edge-queue", str(edge_queue)]
        if flush_ms is not None:
            argv += ["--flush-ms", f"{flush_ms:g}"]
        if engine != "python":
            argv += ["--engine", engine]
        proc = tb.spawn(site, "gateway", argv, logs / f"gateway-{site}.log", env=env)
        waiting.append((site, proc, ready))
    deadline = time.monotonic() + GATEWAY_READY_TIMEOUT
    for site, proc, ready in waiting:
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise InfrastructureError(f"{site} gateway did not start (see {logs / f'gateway-{site}.log'})")
            time.sleep(0.05)
    return GatewayPair(stats)
