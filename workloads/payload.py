"""Deterministic append payloads and their digests.

Every append a tester sends is ``payload(tester, seq, size)``: pseudo-random bytes that depend only on
(tester, seq, size), so the ledger needs to record only the digest, and any byte of a record can be
re-derived when a corrupt record is investigated.

Two generators, chosen by size because each is fastest in its range (measured on one core, Python 3.11,
numpy 2.4): ``hashlib.shake_128`` below 16 KiB (~500 MB/s, 1.5 µs per call at 256 bytes) and numpy's
PCG64 ``random_raw`` from 16 KiB (0.7-1.8 GB/s; its ~17 µs setup dominates small payloads). Both are
stable across versions: SHAKE is a standard and numpy guarantees the ``random_raw`` stream of a seeded
bit generator. The digest is the log store's: BLAKE2b with a 16-byte digest, as lowercase hex.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

SHAKE_MAX = 16 * 1024
"""Payloads shorter than this (bytes) come from SHAKE-128, longer ones from PCG64."""

MAX_ID = 2**64 - 1
"""Largest tester or seq number a payload can be derived from (both are packed as u64)."""


def payload(tester: int, seq: int, size: int) -> bytes:
    """Return the ``size`` bytes a tester sends as its append number ``seq``.

    Deterministic: the same (tester, seq, size) always gives the same bytes, and different (tester, seq)
    give unrelated bytes, so a record written to the wrong place shows up as corrupt.
    """
    _check_args(tester, seq, size)
    if size < SHAKE_MAX:
        return hashlib.shake_128(struct.pack("<QQ", tester, seq)).digest(size)
    words = np.random.PCG64([tester, seq]).random_raw((size + 7) // 8)
    data = words.astype("<u8", copy=False).tobytes()
    return data if len(data) == size else data[:size]


def digest(data: bytes) -> str:
    """Return the digest of a payload: BLAKE2b, 16-byte digest, lowercase hex (32 characters).

    Identical to ``smfs.logstore.payload_digest``; duplicated here so workloads do not import the stack.
    """
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def expected_digest(tester: int, seq: int, size: int) -> str:
    """Return ``digest(payload(tester, seq, size))``: what the ledger records for that append."""
    return digest(payload(tester, seq, size))


def _check_args(tester: int, seq: int, size: int) -> None:
    for name, value in (("tester", tester), ("seq", seq), ("size", size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if not 0 <= value <= MAX_ID:
            raise ValueError(f"{name} must be in 0..2**64-1, got {value}")
