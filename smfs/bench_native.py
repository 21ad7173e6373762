"""The C core beside the Python specification, on one core (``python -m smfs.bench_native``).

Prints JSON, Python and C side by side, for r = 8, c = 3, interleaves (1, 11, 19), 1400 B packets:

- ``encode_gbps``: data bytes encoded per second. ``python``: :meth:`smfs.fec.Encoder.add` per
  packet; ``python_batched``: :meth:`~smfs.fec.Encoder.add_many`, 256 packets per call; ``c``:
  ``smfs_encoder_add`` per packet in a C loop (repairs handed to a callback, not copied);
  ``c_via_ctypes``: the C encoder called from Python per packet (the binding's cost).
- ``decode_gbps``: packets delivered (received + rebuilt) per second, the stream (each packet
  then the repairs it completes) with 1 % of data and repairs lost; ``rebuilt`` / ``lost``:
  per pass of ``packets`` packets.
- ``seal_packets_per_s`` / ``unseal_packets_per_s``: DATA datagrams of 1400 B packets,
  HMAC-SHA-256 included. ``python``: :class:`smfs.tunnel.Sealer` and
  :func:`smfs.tunnel.decode_raw`; ``c``: ``smfs_seal_data`` and ``smfs_unseal`` in a C loop.

GB/s are 10**9 bytes of data packets per second (repairs not counted). The process is pinned to
one CPU. Issue 11's targets: encode >= 4 GB/s, decode >= 2 GB/s.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable

from smfs import native
from smfs.fec import Decoder, Encoder, FecParams, Repair
from smfs.tunnel import Sealer, decode_raw

SIZE = 1400
LOSS = 0.01
BATCH = 256
KEY = b"bench-key-bench-key-bench-key-32"


def _rate(work: Callable[[], int], min_s: float) -> float:
    """Units per second of ``work`` (returns the units it did), repeated for >= ``min_s``."""
    total, start = 0, time.perf_counter()
    while True:
        total += work()
        elapsed = time.perf_counter() - start
        if elapsed >= min_s:
            return total / elapsed


def _python_codec(params: FecParams, pkts: list[bytes], min_s: float) -> dict[str, float]:
    n = len(pkts)
    next_seq = [0]

    def encode_one() -> int:
        enc, base = Encoder(params), next_seq[0]
        for i, p in enumerate(pkts):
            enc.add(base + i, p, 0.0)
        next_seq[0] += n
        return n * SIZE

    def encode_batched() -> int:
        enc = Encoder(params)
        for i in range(0, n, BATCH):
            enc.add_many(i, pkts[i : i + BATCH], 0.0)
        return n * SIZE

    def encode_ctypes() -> int:
        enc = native.Encoder(params)
        for i, p in enumerate(pkts):
            enc.add(i, p, 0.0)
        return n * SIZE

    enc = Encoder(params)
    stream: list[tuple[int, bytes | Repair]] = []
    for i, p in enumerate(pkts):
        stream.append((i, p))
        stream.extend((-1, r) for r in enc.add(i, p, 0.0))
    stream.extend((-1, r) for r in enc.flush())
    rng = random.Random(1)
    kept = [item for item in stream if rng.random() >= LOSS]

    def decode_one() -> int:
        dec, delivered = Decoder(params, window=max(2048, 2 * params.span)), 0
        for s, item in kept:
            if s >= 0:
                dec.on_data(s, item, 0.0)  # type: ignore[arg-type]
                delivered += 1
            else:
                delivered += len(dec.on_repair(item, 0.0))  # type: ignore[arg-type]
        return delivered * SIZE

    return {
        "encode": _rate(encode_one, min_s) / 1e9,
        "encode_batched": _rate(encode_batched, min_s) / 1e9,
        "encode_ctypes": _rate(encode_ctypes, min_s) / 1e9,
        "decode": _rate(decode_one, min_s) / 1e9,
    }


def _python_tunnel(min_s: float) -> dict[str, float]:
    pkt = bytes(i * 7 % 256 for i in range(SIZE))
    sealer = Sealer(KEY, 1)
    seq = [0]

    def seal() -> int:
        base = seq[0]
        for i in range(1000):
            sealer.data(base + i, pkt)
        seq[0] += 1000
        return 1000

    datagram = sealer.data(1, pkt)

    def unseal() -> int:
        for _ in range(1000):
            decode_raw(datagram, KEY, 1)
        return 1000

    return {"seal": _rate(seal, min_s), "unseal": _rate(unseal, min_s)}


def _pin_one_cpu() -> int | None:
    try:
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return cpu
    except (AttributeError, OSError):
        return None


def bench_native(min_s: float = 0.5, n: int = 4096) -> dict[str, object]:
    """Python and C figures side by side (see the module docstring); each measured for at least
    ``min_s`` seconds over ``n`` packets of 1400 bytes (~6 s in all by default)."""
    cpu = _pin_one_cpu()
    params = FecParams()
    rng = random.Random(SIZE)
    pkts = [rng.randbytes(SIZE) for _ in range(n)]
    c_codec = native.bench_codec(params, b"".join(pkts), SIZE, loss=LOSS, seed=1, min_s=min_s)
    c_tunnel = native.bench_tunnel(KEY, SIZE, min_s=min_s)
    py_codec = _python_codec(params, pkts, min_s)
    py_tunnel = _python_tunnel(min_s)
    return {
        "params": {"r": params.r, "c": params.c, "interleaves": list(params.interleaves), "flush_ms": params.flush_ms},
        "packet_bytes": SIZE,
        "packets": n,
        "loss_percent": LOSS * 100,
        "cpu": cpu,
        "encode_gbps": {
            "python": round(py_codec["encode"], 3),
            "python_batched": round(py_codec["encode_batched"], 3),
            "c": round(c_codec["encode_Bps"] / 1e9, 3),
            "c_via_ctypes": round(py_codec["encode_ctypes"], 3),
        },
        "decode_gbps": {
            "python": round(py_codec["decode"], 3),
            "c": round(c_codec["decode_Bps"] / 1e9, 3),
            "c_rebuilt_per_pass": c_codec["rebuilt"],
            "c_lost_per_pass": c_codec["lost"],
        },
        "seal_packets_per_s": {"python": round(py_tunnel["seal"]), "c": round(c_tunnel["seal_pps"])},
        "unseal_packets_per_s": {"python": round(py_tunnel["unseal"]), "c": round(c_tunnel["unseal_pps"])},
        "targets": {"encode_gbps": 4.0, "decode_gbps": 2.0},
    }


if __name__ == "__main__":
    print(json.dumps(bench_native(), indent=2))
