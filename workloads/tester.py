"""Append testers: ``python -m workloads.tester ...``.

Each tester appends to its own log (log id = tester id), one outstanding append at a time, for a
duration or a count. Payloads are derived from (tester, seq), so the checker verifies content by
digest. Every operation is in the tester's ledger before it is sent (outcome ``info``) and again
when it completes (``ok`` or ``fail``): a tester killed mid-append still leaves a record.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from smfs.client import AppendFailed, Client, ConnectionLost
from smfs.site import server_for_log, socket_path
from workloads.ledger import LedgerWriter
from workloads.payload import digest, payload

ANSWER_TIMEOUT = 30.0  # s; no answer by then: outcome info, the tester stops


@dataclass(frozen=True)
class TesterConfig:
    testers: int = 64
    append_size: int = 512 * 1024  # bytes
    duration: float | None = None  # s
    count: int | None = None  # appends per tester
    servers: int = 8
    run_dir: str = "."
    ledger_dir: str = "ledger"
    ledger_stream: str | None = None  # one shared stream (e.g. a virtio-serial port) instead of files


async def run_tester(cfg: TesterConfig, tester: int, deadline: float, stats: dict[str, int],
                     shared: LedgerWriter | None = None) -> None:
    log = tester
    path = socket_path(cfg.run_dir, server_for_log(log, cfg.servers))
    ledger = shared or LedgerWriter(Path(cfg.ledger_dir) / f"tester-{tester:03d}.jsonl")
    try:
        client = await Client.connect(path)
    except OSError as err:
        logging.getLogger("tester").error("tester %d cannot connect to %s: %s", tester, path, err)
        stats["connect_failed"] += 1
        return
    seq = 0
    try:
        while (cfg.count is None or seq < cfg.count) and time.monotonic() < deadline:
            data = payload(tester, seq, cfg.append_size)
            dig = digest(data)
            ledger.invoke(tester, log, seq, len(data), dig)
            try:
                await asyncio.wait_for(client.append(log, seq, data), ANSWER_TIMEOUT)
            except AppendFailed:
                ledger.complete(tester, seq, "fail")
                stats["fail"] += 1
                break  # the log cannot continue past a refused seq
            except (ConnectionLost, TimeoutError):
                stats["info"] += 1
                break  # outcome unknown: stays "info" in the ledger
            ledger.complete(tester, seq, "ok")
            stats["ok"] += 1
            seq += 1
    finally:
        if shared is None:
            ledger.close()
        await client.close()


async def run_all(cfg: TesterConfig) -> dict[str, int]:
    """Run every tester; ledgers go to one file per tester, or all to ``ledger_stream``.

    A stream lets the ledger leave a VM whose power is cut: lines written to a virtio-serial port
    are on the host at once, unlike lines in the guest's page cache.
    """
    shared = LedgerWriter(cfg.ledger_stream) if cfg.ledger_stream else None
    if shared is None:
        Path(cfg.ledger_dir).mkdir(parents=True, exist_ok=True)
    stats = {"ok": 0, "fail": 0, "info": 0, "connect_failed": 0}
    deadline = time.monotonic() + (cfg.duration if cfg.duration is not None else 1e9)
    try:
        await asyncio.gather(*(run_tester(cfg, t, deadline, stats, shared) for t in range(cfg.testers)))
    finally:
        if shared is not None:
            shared.close()
    return stats


def main(argv: list[str] | None = None) -> int:
    from smfs.units import parse_size

    p = argparse.ArgumentParser(prog="workloads.tester", description=__doc__)
    p.add_argument("--testers", type=int, default=64)
    p.add_argument("--append-size", default="512KiB")
    p.add_argument("--duration", type=float, default=None, help="seconds")
    p.add_argument("--count", type=int, default=None, help="appends per tester")
    p.add_argument("--servers", type=int, default=8)
    p.add_argument("--run", required=True, help="directory with the primary servers' sockets")
    p.add_argument("--ledger", default="ledger", help="directory for the per-tester ledgers")
    p.add_argument("--ledger-stream", default=None, help="write every ledger line to this one stream instead")
    args = p.parse_args(argv)
    if args.duration is None and args.count is None:
        p.error("give --duration or --count")
    try:
        size = parse_size(args.append_size, "--append-size")
    except ValueError as err:
        p.error(str(err))
    cfg = TesterConfig(args.testers, size, args.duration, args.count, args.servers, args.run, args.ledger,
                       args.ledger_stream)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stats = asyncio.run(run_all(cfg))
    print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
