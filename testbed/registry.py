"""The resource registry: every namespace, process, domain, bridge, overlay or snapshot a run
creates is recorded here *before* it is created, so teardown removes exactly those, also after a
crash or Ctrl-C of an earlier run, and never touches anything it did not create.

The registry is one JSON file (``<cache>/registry.json``) guarded by an flock; each entry is
``{"kind", "ident", "owner", "meta", "t"}``. Teardown handlers are registered per kind by the
modules that create the resources; they must be idempotent (a missing resource is success).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.paths import cache_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resource:
    kind: str
    ident: str
    owner: str
    meta: dict[str, Any] = field(default_factory=dict)
    t: float = 0.0


Teardown = Callable[[Resource], None]
_TEARDOWNS: dict[str, Teardown] = {}
# Kinds torn down first to last; unknown kinds go first (most recently created first within a kind).
_ORDER = ["process", "nft", "qmp", "domain", "snapshot", "tap", "veth", "bridge", "netns", "overlay", "dir"]


def register_teardown(kind: str, fn: Teardown) -> None:
    """Install the function that removes resources of ``kind`` (idempotent)."""
    _TEARDOWNS[kind] = fn


class Registry:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_dir() / "registry.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[list[dict[str, Any]]]:
        with open(self.path.with_suffix(".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                entries = json.loads(self.path.read_text()) if self.path.exists() else []
            except (json.JSONDecodeError, OSError) as err:
                broken = self.path.with_suffix(f".broken-{int(time.time())}")
                log.error("registry %s unreadable (%s); kept as %s, starting empty", self.path, err, broken)
                os.replace(self.path, broken)
                entries = []
            before = json.dumps(entries)
            yield entries
            if json.dumps(entries) != before:
                tmp = self.path.with_suffix(".tmp")
                with open(tmp, "w") as f:
                    json.dump(entries, f, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)

    def add(self, kind: str, ident: str, owner: str, **meta: Any) -> Resource:
        """Record a resource (call before creating it, so a crash in between still cleans it)."""
        res = Resource(kind, ident, owner, meta, time.time())
        with self._locked() as entries:
            entries[:] = [e for e in entries if not (e["kind"] == kind and e["ident"] == ident)]
            entries.append({"kind": kind, "ident": ident, "owner": owner, "meta": meta, "t": res.t})
        return res

    def remove(self, kind: str, ident: str) -> None:
        with self._locked() as entries:
            entries[:] = [e for e in entries if not (e["kind"] == kind and e["ident"] == ident)]

    def items(self, kind: str | None = None, owner: str | None = None) -> list[Resource]:
        with self._locked() as entries:
            return [
                Resource(e["kind"], e["ident"], e["owner"], e.get("meta", {}), e.get("t", 0.0))
                for e in entries
                if (kind is None or e["kind"] == kind) and (owner is None or e["owner"] == owner)
            ]

    def teardown(self, owner: str | None = None) -> list[Resource]:
        """Remove every recorded resource (of ``owner`` if given) in dependency order.

        Returns what was removed. A resource whose handler fails stays recorded and the error
        is raised after every other resource had its turn, so one failure never leaks the rest.
        """
        def rank(r: Resource) -> tuple[int, float]:
            pos = _ORDER.index(r.kind) if r.kind in _ORDER else -1
            return (pos, -r.t)

        removed: list[Resource] = []
        errors: list[str] = []
        for res in sorted(self.items(owner=owner), key=rank):
            fn = _TEARDOWNS.get(res.kind)
            if fn is None:
                errors.append(f"{res.kind} {res.ident}: no teardown handler loaded")
                continue
            try:
                fn(res)
            except Exception as err:  # noqa: BLE001 - collected and re-raised below
                log.debug("teardown of %s %s failed", res.kind, res.ident, exc_info=True)
                errors.append(f"{res.kind} {res.ident}: {err}")
                continue
            self.remove(res.kind, res.ident)
            removed.append(res)
        if errors:
            raise TeardownError("; ".join(errors))
        return removed


class TeardownError(RuntimeError):
    """Some resources could not be removed; they stay in the registry for the next ``./inv down``."""
