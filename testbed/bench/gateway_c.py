"""Benchmark: the gateway pair between the site namespaces, the C engine beside the Python one, in
one run: a bulk TCP transfer through the pair (TUN MTU 1398 for r = 8 and a 1500-byte WAN: the
inner packets are ~1400 bytes), and the bare path with its route MTU set to the same 1398 bytes.
Prints JSON: MB/s, packets/s through the gateways, repairs per data packet, rebuilt fraction.

``python -m testbed.bench.gateway_c [--seconds 4] [--loss 0]`` (root)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smfs.auth import create_key_file
from smfs.gateway import C_BINARY_ENV, tun_mtu
from testbed.bench.gateway import _transfer
from testbed.drill.gateways import CONTROL, GATEWAY_READY_TIMEOUT, TUNNEL_PORT
from testbed.netns.bed import ADDRS, SITES, NamespaceTestbed, other


@dataclass
class Pair:
    """A gateway per site, each with its own engine; ``procs`` the gateway processes (same pid after
    the Python front end execs the C program)."""

    procs: dict[str, subprocess.Popen[bytes]]
    stats_files: dict[str, Path]
    logs: dict[str, Path]

    def read(self, site: str) -> dict[str, Any]:
        return json.loads(self.stats_files[site].read_text())


def start_pair(tb: NamespaceTestbed, out: Path, engines: dict[str, str],
               binaries: dict[str, Path] | None = None, extra: list[str] | None = None) -> Pair:
    """:func:`testbed.drill.gateways.start_gateways` with an engine per site (``python`` or ``c``);
    ``binaries`` overrides the C program of a site (e.g. the ASan build)."""
    key = out / "tunnel.key"
    create_key_file(key)  # 0600 from its creation
    procs, stats, logs = {}, {}, {}
    for site in ("mirror", "primary"):
        me, peer = ADDRS[site], ADDRS[other(site)]
        stats[site], logs[site] = out / f"fec-{site}.json", out / f"gateway-{site}.log"
        ready = out / f"gateway-{site}.ready"
        argv = [sys.executable, "-m", "smfs.gateway", "--engine", engines[site], "--site", site, "--tun", "smfs0",
                "--address", me.storage, "--route", peer.storage_net, "--local", f"{me.wan}:{TUNNEL_PORT}",
                "--peer", f"{peer.wan}:{TUNNEL_PORT}", "--control", CONTROL, "--key-file", str(key),
                "--stats", str(stats[site]), "--ready", str(ready), *(extra or [])]
        env = {C_BINARY_ENV: str(binaries[site])} if binaries and site in binaries else None
        procs[site] = tb.spawn(site, "gateway", argv, logs[site], env=env)
        deadline = time.monotonic() + GATEWAY_READY_TIMEOUT  # the same start as start_gateways': one bound
        while not ready.exists():
            if procs[site].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{site} gateway did not start: {logs[site].read_text()[-2000:]}")
            time.sleep(0.05)
    return Pair(procs, stats, logs)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _run_engine(engine: str, seconds: float, loss: float, tmp: Path, offload: str = "tso") -> dict[str, Any]:
    tb = NamespaceTestbed()
    try:
        tb.build()
        tb.set_loss(loss)
        pair = start_pair(tb, tmp, {"primary": engine, "mirror": engine}, extra=["--tun-offload", offload])
        time.sleep(0.2)
        cpu0 = {s: _cpu_s(pair.procs[s].pid) for s in SITES}
        got = _transfer(tb, tmp, 9120, seconds)
        cpu = {s: _cpu_s(pair.procs[s].pid) - cpu0[s] for s in SITES}
        for proc in pair.procs.values():
            proc.terminate()
            proc.wait(timeout=10)
        prim, mirr = pair.read("primary"), pair.read("mirror")
    finally:
        tb.teardown()
    packets = prim["packets_in"]
    return {
        "MBps": got["MBps"],
        "packets_per_s": round(packets / got["seconds"]),
        "repairs_per_packet": round(prim["repairs_sent"] / packets, 3) if packets else None,
        "rebuilt_fraction": mirr["rebuilt_fraction"],
        "lost_for_good": mirr["lost_for_good"],
        "edge_drops": prim["edge_drops"],
        "cpu_us_per_packet": {s: round(cpu[s] * 1e6 / max(1, packets), 2) for s in SITES},
        # the sender's TUN reads (TSO: one per TCP super-packet) and the packets per read
        "tun_offload": prim.get("tun_offload"),
        "packets_per_read": (round(packets / prim["tun_offload"]["reads"], 2)
                             if prim.get("tun_offload") and prim["tun_offload"]["reads"] else None),
    }


OFFLOADS = ("tso", "gso", "gro")
"""Segmentation offloads a veth has and a TUN path cannot use: off for the like-for-like bare path."""


def _run_bare(seconds: float, loss: float, mtu: int, tmp: Path, offloads: bool = True) -> dict[str, Any]:
    """The same namespaces and transfer without gateways, at the TUN's MTU; ``offloads`` False turns the
    veths' segmentation offloads off (ethtool), so every packet is MTU-sized as through the gateways."""
    tb = NamespaceTestbed()
    try:
        tb.build()
        tb.set_loss(loss)
        for site in SITES:
            a = ADDRS[site]
            tb.sh(site, "ip", "route", "replace", ADDRS[other(site)].storage_net, "via", a.wan_gw, "mtu", str(mtu))
            if not offloads:
                off = [x for o in OFFLOADS for x in (o, "off")]
                tb.sh(site, "ethtool", "-K", "wan0", *off)
                tb.sh("wan", "ethtool", "-K", f"to-{site}", *off)
        got = _transfer(tb, tmp, 9121, seconds)
    finally:
        tb.teardown()
    return {"MBps": got["MBps"], "route_mtu": mtu, "offloads": offloads}


def bench_gateway_c(seconds: float = 4.0, loss: float = 0.0) -> dict[str, Any]:
    mtu = tun_mtu(8)
    with tempfile.TemporaryDirectory(prefix="smfs-gwcbench-") as tmpdir:
        tmp = Path(tmpdir)
        bare = _run_bare(seconds, loss, mtu, tmp)
        plain = _run_bare(seconds, loss, mtu, tmp, offloads=False)
        res = {"seconds": seconds, "wan_loss_pct": loss, "inner_mtu": mtu, "bare": bare, "bare_no_offloads": plain}
        # "c" reads TSO super-packets from the TUN and cuts them itself; "c_no_tso" reads what the kernel
        # cut, packet by packet, as the Python engine does
        for engine, kind, offload in (("python", "python", "none"), ("c_no_tso", "c", "none"), ("c", "c", "tso")):
            (tmp / engine).mkdir()
            res[engine] = _run_engine(kind, seconds, loss, tmp / engine, offload)
            res[engine]["ratio_to_bare"] = round(res[engine]["MBps"] / bare["MBps"], 3) if bare["MBps"] else None
            res[engine]["ratio_to_bare_no_offloads"] = (round(res[engine]["MBps"] / plain["MBps"], 3)
                                                        if plain["MBps"] else None)
    res["c_over_python_packets"] = round(res["c"]["packets_per_s"] / max(1, res["python"]["packets_per_s"]), 2)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--loss", type=float, default=0.0, help="random loss on the WAN, each way (%%)")
    args = p.parse_args()
    print(json.dumps(bench_gateway_c(args.seconds, args.loss), indent=1))


if __name__ == "__main__":
    main()
