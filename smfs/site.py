"""One site's storage servers in one process: ``python -m smfs.site primary|mirror ...``.

Hosts N servers (default 8, as in the paper) on one asyncio loop; server i keeps its log store in
``DATA/server-i``. When every server is up the process writes ``RUN/<role>.ready``; SIGTERM closes
the stores cleanly (SIGKILL is the power cut and needs no cooperation).

Both roles take the testbed's key (``--key-file``, the gateways' file): the mirror stream opens with a
mutual handshake and its acks are tagged (:mod:`smfs.auth`), the gateway's callbacks are authenticated
(:mod:`smfs.callbacks`). The mirror listens only on the addresses given (``--listen``, the site's
storage address; never a wildcard).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
from pathlib import Path

from smfs import defects, profiling
from smfs.auth import read_key_file
from smfs.logstore import LogStore
from smfs.mirror import IDLE_TIMEOUT, WILDCARDS, MirrorServer
from smfs.modes import parse_mode
from smfs.primary import PrimaryServer
from smfs.units import parse_hostport

SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's address


def server_for_log(log: int, servers: int) -> int:
    """Logs are spread over the servers by log id."""
    return log % servers


def socket_path(run_dir: Path | str, index: int) -> str:
    return str(Path(run_dir) / f"primary-{index}.sock")



def interface_ipv4(name: str) -> str:
    """The IPv4 address of network interface ``name`` (ValueError when it has none)."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            res = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError as err:
            raise ValueError(f"--listen @{name}: no IPv4 address on interface {name} ({err.strerror})") from None
    return socket.inet_ntoa(res[20:24])


def idle_argv(silences: list[float]) -> list[str]:
    """``--idle-timeout`` for a run whose faults keep a connection silent for up to ``max(silences)`` s
    (partitions, freezes): longer than any of them by a minute, never below the default; [] when the
    default covers them (a command line unchanged for the usual runs)."""
    need = max(silences, default=0.0) + 60.0
    return ["--idle-timeout", f"{need:g}"] if need > IDLE_TIMEOUT else []


def listen_addresses(specs: list[str]) -> list[tuple[str, int]]:
    """The mirror's ``--listen`` values as (address, base port): ``HOST:PORT``, or ``@IFACE:PORT`` for the
    IPv4 address of interface IFACE (a VM's NIC, whatever its address); never a wildcard address."""
    out = []
    for spec in specs:
        host, port = parse_hostport(spec)
        if host.startswith("@"):
            host = interface_ipv4(host[1:])
        if host in WILDCARDS or not host:
            raise ValueError(f"--listen {spec}: a wildcard address; give the site's storage address (HOST:PORT)")
        if not 0 < port < 65536:
            raise ValueError(f"--listen {spec}: the port must be 1-65535")
        out.append((host, port))
    return out


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
    key = read_key_file(args.key_file)
    gateway_key = read_key_file(args.gateway_key_file) if args.gateway_key_file else None
    listen = listen_addresses(args.listen or []) if args.role == "mirror" else []
    if args.role == "mirror" and not listen:
        raise ValueError("--listen is required for the mirror: the site's storage address, HOST:BASEPORT")
    if args.idle_timeout <= 0:
        raise ValueError("--idle-timeout must be positive seconds")
    run.mkdir(parents=True, exist_ok=True)  # the data folders are made (durably) by LogStore.open
    stores = open_stores(args.role, data, args.servers, args.segment_bytes)
    servers: list[PrimaryServer | MirrorServer]
    if args.role == "mirror":
        servers = [MirrorServer(i, stores[i], [(host, port + i) for host, port in listen], key=key,
                                idle_timeout=args.idle_timeout) for i in range(args.servers)]
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
                          ack_trace=str(Path(args.ack_trace) / f"acks-{i}.txt") if args.ack_trace else None,
                          key=key, gateway_key=gateway_key, idle_timeout=args.idle_timeout)
            for i in range(args.servers)
        ]
    await asyncio.gather(*(s.start() for s in servers))
    profiling.start(f"{args.role}-site")
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
    p.add_argument("--listen", action="append",
                   help="mirror: HOST:BASEPORT (server i: BASEPORT+i), the site's storage address, never a "
                        "wildcard; @IFACE:BASEPORT for an interface's IPv4 address; repeat to listen on several")
    p.add_argument("--key-file", required=True,
                   help="the testbed's key (hex), as the gateways': authenticates the mirror stream and the callbacks")
    p.add_argument("--gateway-key-file", default=None,
                   help="primary: the gateway's key (hex) for the subscription and its callbacks, when it is not "
                        "--key-file's (the VM drill gives each mode a fresh tunnel key)")
    p.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT,
                   help="s a connection may send nothing (a client: with no append outstanding) before it is closed")
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
    except (OSError, ValueError) as err:  # a mirror unreachable or refusing our key, an address not ours...
        logging.getLogger("smfs.site").error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
