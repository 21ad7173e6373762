"""One site's storage servers in one process: ``python -m smfs.site primary|mirror ...``.

Hosts N servers (default 8, as in the paper) on one asyncio loop; server i keeps its log store in
``DATA/server-i``. When every server is up the process writes ``RUN/<role>.ready``; SIGTERM closes
the stores cleanly (SIGKILL is the power cut and needs no cooperation).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

from smfs import defects
from smfs.logstore import LogStore
from smfs.mirror import MirrorServer
from smfs.modes import parse_mode
from smfs.primary import PrimaryServer
from smfs.units import parse_hostport


def server_for_log(log: int, servers: int) -> int:
    """Logs are spread over the servers by log id."""
    return log % servers


def socket_path(run_dir: Path | str, index: int) -> str:
    return str(Path(run_dir) / f"primary-{index}.sock")



def open_stores(role: str, data: Path, servers: int, segment_bytes: int) -> list[LogStore]:
    """The log stores of ``servers`` servers of ``role``, in ``data/server-i``; ``segment_bytes`` per
    segment. Durable (fsync) always, but for the mirror under the seeded defect
    ``mirror-acks-before-fsync``: its acks then cover data that is only in the page cache."""
    stores = [LogStore.open(data / f"server-{i}", segment_bytes=segment_bytes) for i in range(servers)]
    if role == "mirror" and defects.active("mirror-acks-before-fsync"):
        for store in stores:  # created durably (as the correct stack), then appends without fsync
            store.sync = False
    return stores


async def _run(args: argparse.Namespace) -> None:
    data, run = Path(args.data), Path(args.run)
    run.mkdir(parents=True, exist_ok=True)  # the data folders are made (durably) by LogStore.open
    stores = open_stores(args.role, data, args.servers, args.segment_bytes)
    servers: list[PrimaryServer | MirrorServer]
    if args.role == "mirror":
        host, port = parse_hostport(args.listen)
        servers = [MirrorServer(i, stores[i], host, port + i) for i in range(args.servers)]
    else:
        mode = parse_mode(args.mode)
        host, port = parse_hostport(args.mirror)
        control = parse_hostport(args.gateway_control) if args.gateway_control else None
        if mode.ack_on == "network" and control is None:
            raise SystemExit("error: --gateway-control is required for network-sync")
        if args.ack_trace:
            Path(args.ack_trace).mkdir(parents=True, exist_ok=True)
        servers = [
            PrimaryServer(i, stores[i], mode, socket_path(run, i), (host, port + i), args.source, control,
                          ack_trace=str(Path(args.ack_trace) / f"acks-{i}.txt") if args.ack_trace else None)
            for i in range(args.servers)
        ]
    await asyncio.gather(*(s.start() for s in servers))
    (run / f"{args.role}.ready").write_text("ready\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for s in servers:
        with contextlib.suppress(Exception):
            await s.close()
    for st in stores:
        st.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="smfs.site", description=__doc__)
    p.add_argument("role", choices=["primary", "mirror"])
    p.add_argument("--servers", type=int, default=8)
    p.add_argument("--data", required=True, help="directory for the log stores")
    p.add_argument("--run", required=True, help="directory for sockets and the ready file")
    p.add_argument("--segment-bytes", type=int, default=100 << 20)
    p.add_argument("--listen", default="0.0.0.0:7700", help="mirror: HOST:BASEPORT (server i: BASEPORT+i)")
    p.add_argument("--mirror", default="127.0.0.1:7700", help="primary: mirror HOST:BASEPORT")
    p.add_argument("--source", default=None, help="primary: local address for the mirror connections")
    p.add_argument("--mode", default="remote-sync")
    p.add_argument("--gateway-control", default=None, help="network-sync: gateway HOST:PORT for callbacks")
    p.add_argument("--ack-trace", default=None,
                   help="primary: folder for one ack trace per server (acks-I.txt: flow, then LOG SEQ END T per ack)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        defects.announce(logging.getLogger("smfs.site"))
        asyncio.run(_run(args))
    except (ConnectionError, ValueError) as err:
        logging.getLogger("smfs.site").error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
