"""Seeded defects: deliberately broken variants of the stack, for the testbed's self-test.

A drill that reports "0 acknowledged appends lost" is only worth something if it would have
reported losses for a stack that breaks its promise. Each defect here breaks one promise at
one place; the self-test runs the drill with it and expects the checker to catch it.

A defect is on only when the environment variable ``SMFS_DEFECT`` names it (a comma-separated
list of names; unset or empty: none, the default). The variable is read once per process, at
first use, and cached; an unknown name raises :class:`ValueError` then. Processes with a defect
on say so loudly at start (:func:`announce`).
"""

from __future__ import annotations

import functools
import logging
import os

ENV = "SMFS_DEFECT"

DEFECTS: dict[str, str] = {
    "remote-sync-acks-at-handoff":
        "remote-sync modes ack once the frame is handed to the kernel socket, not on the mirror's ack",
    "network-sync-callback-before-repairs":
        "the egress gateway reports bytes safe once their data datagram is sent, before the repairs covering them",
    "mirror-acks-before-fsync":
        "the mirror acks appends without fsync: its stores open with sync=False, acked data sits in the page cache",
    "primary-acks-before-local-write":
        "the primary acks on the mode's remote condition without waiting for its own local write",
    "mirror-skips-directory-fsync":
        "the log store does not fsync its directory after creating a segment file",
}
"""Every seeded defect: name -> what it breaks (one line)."""


@functools.cache
def enabled() -> tuple[str, ...]:
    """The defects ``SMFS_DEFECT`` turns on, in the order given, without repeats (cached per process).

    Raises ValueError naming the first unknown name and the choices."""
    raw = os.environ.get(ENV, "")
    names = tuple(dict.fromkeys(part.strip() for part in raw.split(",") if part.strip()))
    for name in names:
        if name not in DEFECTS:
            raise ValueError(f"{ENV}: unknown defect {name!r}; choose from {', '.join(DEFECTS)}")
    return names


def active(name: str) -> bool:
    """Whether seeded defect ``name`` is on in this process (False unless ``SMFS_DEFECT`` names it)."""
    if name not in DEFECTS:  # a typo at a hook would silently never fire
        raise ValueError(f"defect {name!r} is not registered in smfs.defects.DEFECTS")
    return name in enabled()


def announce(logger: logging.Logger) -> None:
    """Log a loud WARNING when any defect is on: results of this process are not the real stack's."""
    names = enabled()
    if names:
        logger.warning("SEEDED DEFECT ACTIVE: %s", ", ".join(names))


def reset() -> None:
    """Forget the cached ``SMFS_DEFECT`` (tests that change the environment)."""
    enabled.cache_clear()
