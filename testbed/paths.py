"""Where the testbed keeps state outside the repository, and the checks that it is ours to trust."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path


def cache_dir() -> Path:
    """Images, overlays and the resource registry: ``$SMFS_TESTBED_CACHE`` or ``~/.cache/smfs-testbed``.

    This folder is *the testbed's directory*: its registry, id, lock, and every file or folder
    teardown may remove lie in it. Created 0755 whatever the umask adds (QEMU's user must traverse it,
    nobody else may write to it: see :func:`untrusted`)."""
    env = os.environ.get("SMFS_TESTBED_CACHE")
    path = Path(env) if env else Path.home() / ".cache" / "smfs-testbed"
    path.mkdir(parents=True, exist_ok=True, mode=0o755)
    return path


def untrusted(st: os.stat_result, directory: bool = False) -> str | None:
    """Why a file (or folder) with these stats cannot be trusted as the running user's own, or None.

    Another user's file, or one that group or others may write, could have been written by someone
    else: the registry it holds would then decide what a root teardown removes. A folder may be
    root's (``/tmp/...`` parents are), never writable by others."""
    me = os.geteuid()
    if st.st_uid != me and not (directory and st.st_uid == 0):
        return f"owned by uid {st.st_uid}, not by you (uid {me})"
    if st.st_mode & 0o022:
        who = {0o020: "group", 0o002: "others"}.get(st.st_mode & 0o022, "group and others")
        return f"writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def fresh_folder(parent: Path, stamp: str | None = None) -> Path:
    """A new, empty folder under ``parent`` named by the time (``20250101-120000``, then ``-2``, ``-3``...
    when that name is taken): an output folder is never one that exists already, so nothing in an
    earlier run's folder is reused or deleted. ``mkdir`` without ``exist_ok`` claims the name atomically."""
    parent.mkdir(parents=True, exist_ok=True)
    base = stamp or time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 10_000):
        folder = parent / (base if n == 1 else f"{base}-{n}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise FileExistsError(f"{parent}: 10000 folders named {base}-N exist; give --out a new folder")
