"""Units at the edges: sizes like 64KiB, 512KiB, 1MiB."""

from __future__ import annotations

import re
from fractions import Fraction

_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B?|B)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1024, "KI": 1024, "KIB": 1024, "KB": 1000, "M": 1 << 20, "MI": 1 << 20,
          "MIB": 1 << 20, "MB": 10**6, "G": 1 << 30, "GI": 1 << 30, "GIB": 1 << 30, "GB": 10**9,
          "T": 1 << 40, "TI": 1 << 40, "TIB": 1 << 40, "TB": 10**12}
MAX_SIZE = 1 << 50
"""Bytes (1 PiB): no size the project takes comes near; a larger one is a typo (callers bound tighter)."""
_MAX_TEXT = 1000  # characters: longer is not a size anyone meant (and stays below int's 4300-digit limit)


def parse_size(text: str | int, field: str, *, high: int = MAX_SIZE, example: str = "64KiB, 512KiB, 1MiB") -> int:
    """Parse '64KiB', '512KiB', '1MiB', '100MB' or a whole number of bytes into bytes, 1..``high``.

    Exact (no float rounding, no overflow); a bool, a float, a fraction of a byte or anything out of range
    is a ``ValueError`` with one line naming ``field``."""
    fix = f"use e.g. {example}"
    if isinstance(text, bool) or not isinstance(text, str | int):
        raise ValueError(f"{field}: {show(text)} is not a size; {fix}")
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE.fullmatch(text) if len(text) <= _MAX_TEXT else None
        if not m:
            raise ValueError(f"{field}: cannot parse {show(text)} as a size; {fix}")
        exact = Fraction(m.group(1)) * _UNITS[(m.group(2) or "").upper()]
        if exact.denominator != 1:
            raise ValueError(f"{field}: {show(text)} is not a whole number of bytes; {fix}")
        value = int(exact)
    if value <= 0:
        raise ValueError(f"{field}: size must be positive, got {show(text)}; {fix}")
    if value > high:
        raise ValueError(f"{field}: {show(text)} is above the maximum {format_size(high)}; {fix}")
    return value


def format_size(n: int) -> str:
    """1048576 → '1MiB'; the largest binary unit that divides ``n``."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return f"{n}B"


def show(value: object, limit: int = 60) -> str:
    """``repr(value)`` short enough for a one-line message: long texts are cut, huge integers described
    (their decimal form may exceed Python's conversion limit)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"a {value.bit_length()}-bit integer"
    try:
        text = repr(value)
    except ValueError:  # a container holding a huge integer
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_hostport(text: str) -> tuple[str, int]:
    """'HOST:PORT' -> (host, port), as the site and gateway command lines take addresses."""
    host, _, port = text.rpartition(":")
    return host, int(port)
