"""Throughput of the FEC codec on this machine (``./inv bench fec``). Pure CPU, no I/O.

For 1400 B and 8 KB packets, with the default parameters (r=8, c=3, interleaves 1, 11, 19):

- ``encode.per_packet_gbps``: :meth:`Encoder.add`, one packet per call;
- ``encode.batched_gbps``: :meth:`Encoder.add_many`, 256 packets per call (the XORs of all
  bins completed by the batch in one numpy call);
- ``decode.per_packet_gbps``: :class:`Decoder` fed the data and repairs of the encoder with
  1 % of both lost (packets delivered, received plus rebuilt, per second);
- ``xor.per_bin_gbps`` / ``xor.batched_gbps``: the XOR kernel alone, one bin of r packets per
  numpy call vs 256 bins per call: the ceiling of encoding and of rebuilding.

GB/s are 10**9 bytes of data packets per second (repairs not counted).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from smfs.fec import Decoder, Encoder, FecParams, Repair, xor_many, xor_packets

SIZES = {"1400B": 1400, "8KB": 8192}
BATCH = 256


def _rate(work: Callable[[], int], min_s: float) -> float:
    """Bytes per second of ``work`` (returns the bytes it processed), repeated for >= min_s."""
    total, start = 0, time.perf_counter()
    while True:
        total += work()
        elapsed = time.perf_counter() - start
        if elapsed >= min_s:
            return total / elapsed


def _packets(size: int, n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(size) for _ in range(n)]


def _bench_size(params: FecParams, size: int, n: int, min_s: float) -> dict[str, dict[str, float]]:
    pkts = _packets(size, n, seed=size)
    seq = [0]

    def encode_one() -> int:
        enc, base = Encoder(params), seq[0]
        for i, p in enumerate(pkts):
            enc.add(base + i, p, 0.0)
        seq[0] += n
        return n * size

    def encode_batched() -> int:
        enc = Encoder(params)
        for i in range(0, n, BATCH):
            enc.add_many(i, pkts[i : i + BATCH], 0.0)
        return n * size

    enc = Encoder(params)
    stream: list[tuple[int, bytes | Repair]] = []
    for i, p in enumerate(pkts):
        reps = enc.add(i, p, 0.0)
        stream.append((i, p))
        stream.extend((-1, r) for r in reps)
    stream.extend((-1, r) for r in enc.flush())
    rng = random.Random(1)
    kept = [item for item in stream if rng.random() >= 0.01]

    def decode_one() -> int:
        dec, delivered = Decoder(params, window=max(2048, 2 * params.span)), 0
        for s, item in kept:
            if s >= 0:
                dec.on_data(s, item, 0.0)  # type: ignore[arg-type]
                delivered += 1
            else:
                delivered += len(dec.on_repair(item, 0.0))  # type: ignore[arg-type]
        return delivered * size

    bins = [pkts[i : i + params.r] for i in range(0, n - params.r + 1, params.r)]

    def xor_one() -> int:
        for b in bins:
            xor_packets(b)
        return len(bins) * params.r * size

    def xor_batched() -> int:
        for i in range(0, len(bins), BATCH):
            xor_many(bins[i : i + BATCH])
        return len(bins) * params.r * size

    gbps = {
        name: round(_rate(f, min_s) / 1e9, 3)
        for name, f in (
            ("encode_one", encode_one),
            ("encode_batched", encode_batched),
            ("decode_one", decode_one),
            ("xor_one", xor_one),
            ("xor_batched", xor_batched),
        )
    }
    return {
        "encode": {"per_packet_gbps": gbps["encode_one"], "batched_gbps": gbps["encode_batched"]},
        "decode": {"per_packet_gbps": gbps["decode_one"], "loss_percent": 1.0},
        "xor": {"per_bin_gbps": gbps["xor_one"], "batched_gbps": gbps["xor_batched"]},
    }


def bench_fec(min_s: float = 0.5, n: int = 4096) -> dict[str, object]:
    """Encode, decode and XOR throughput (GB/s) for 1400 B and 8 KB packets; each figure is
    measured for at least ``min_s`` seconds over ``n`` packets (~8 s in all by default)."""
    params = FecParams()
    out: dict[str, object] = {
        "params": {
            "r": params.r,
            "c": params.c,
            "interleaves": list(params.interleaves),
            "flush_ms": params.flush_ms,
        },
        "batch_packets": BATCH,
    }
    for name, size in SIZES.items():
        result = _bench_size(params, size, n, min_s)
        for figures in result.values():
            if "per_packet_gbps" in figures:
                figures["packets_per_s"] = round(figures["per_packet_gbps"] * 1e9 / size)
        out[name] = result
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(bench_fec(), indent=2))
