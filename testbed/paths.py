"""Where the testbed keeps state outside the repository."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Images, overlays and the resource registry: ``$SMFS_TESTBED_CACHE`` or ``~/.cache/smfs-testbed``."""
    env = os.environ.get("SMFS_TESTBED_CACHE")
    path = Path(env) if env else Path.home() / ".cache" / "smfs-testbed"
    path.mkdir(parents=True, exist_ok=True)
    return path
