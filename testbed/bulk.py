"""A bulk TCP transfer for benchmarks: ``python -m testbed.bulk serve|send ...`` prints JSON."""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

CHUNK = 256 * 1024


def serve(host: str, port: int, ready: str | None) -> dict:
    with socket.create_server((host, port)) as srv:
        if ready:
            open(ready, "w").close()
        conn, _ = srv.accept()
        total, t0 = 0, time.monotonic()
        with conn:
            while data := conn.recv(CHUNK):
                total += len(data)
        return {"bytes": total, "seconds": round(time.monotonic() - t0, 3)}


def send(host: str, port: int, seconds: float, source: str | None) -> dict:
    buf = b"\x5a" * CHUNK
    with socket.create_connection((host, port), source_address=(source, 0) if source else None) as s:
        total, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < seconds:
            s.sendall(buf)
            total += len(buf)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)
        elapsed = time.monotonic() - t0
    return {"bytes": total, "seconds": round(elapsed, 3), "MBps": round(total / elapsed / 1e6, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="testbed.bulk")
    p.add_argument("role", choices=["serve", "send"])
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--source", default=None)
    p.add_argument("--ready", default=None)
    a = p.parse_args(argv)
    out = serve(a.host, a.port, a.ready) if a.role == "serve" else send(a.host, a.port, a.seconds, a.source)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
