"""Units at the edges: sizes like 64KiB, 512KiB, 1MiB."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1024, "KI": 1024, "KIB": 1024, "KB": 1000, "M": 1 << 20, "MI": 1 << 20,
          "MIB": 1 << 20, "MB": 10**6, "G": 1 << 30, "GI": 1 << 30, "GIB": 1 << 30, "GB": 10**9,
          "T": 1 << 40, "TI": 1 << 40, "TIB": 1 << 40, "TB": 10**12}


def parse_size(text: str | int, field: str) -> int:
    """Parse '64KiB', '512KiB', '1MiB', '100MB' or a plain byte count into bytes."""
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE.match(str(text))
        if not m:
            raise ValueError(f"{field}: cannot parse {text!r} as a size; use e.g. 64KiB, 512KiB, 1MiB")
        unit = (m.group(2) or "").upper()
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"{field}: size must be positive, got {text!r}")
    return value


def parse_hostport(text: str) -> tuple[str, int]:
    """'HOST:PORT' -> (host, port), as the site and gateway command lines take addresses."""
    host, _, port = text.rpartition(":")
    return host, int(port)
