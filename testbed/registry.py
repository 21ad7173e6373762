"""The resource registry: every namespace, process, domain, bridge, overlay or snapshot a run
creates is recorded here *before* it is created, so teardown removes exactly those, also after a
crash or Ctrl-C of an earlier run, and never touches anything it did not create.

The registry is one JSON file (``<cache>/registry.json``) guarded by an flock; each entry is
``{"kind", "ident", "owner", "meta", "t"}``. Teardown handlers are registered per kind by the
modules that create the resources; they must be idempotent (a missing resource is success).

A registry entry is a claim, not a proof: the file may be stale (a name reused by someone else
since), damaged, or written by someone else. So teardown re-checks, per resource and at teardown,
what was true at creation (:class:`Scope`): names carry the testbed's prefix, paths lie inside the
testbed's own folder (the registry's), domains carry the testbed's ``<metadata>`` with its id,
links and namespaces its mark (``ifalias``), processes their recorded start time and command line.
Each kind registers that check beside its handler (``register_teardown(kind, fn, check=...)``); a
kind without one is never touched. An entry that fails its check is reported ("refusing to remove
...") and *forgotten*: it is not ours, so no later teardown may remove it either, and keeping it
would make every ``./inv down`` fail on it and every ``./inv up`` refuse to start ("still
recorded") until someone edits the file by hand. (A check that cannot tell, e.g. libvirt is
unreachable, is an error instead, and the entry stays for the next ``./inv down``.)

The file itself is trusted only when it is the running user's and nobody else can write it or its
folder; it is written atomically (a 0600 temp file, fsync, rename). An unreadable registry is kept
aside and every later use refuses, naming that file, until someone has dealt with what it listed:
starting empty would leak everything it recorded, and guessing could remove what is not ours.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.errors import TestbedError
from testbed.paths import cache_dir, untrusted
from testbed.progress import Say

log = logging.getLogger(__name__)

PREFIX = "smfs-"
"""Every name the testbed gives a domain, bridge or namespace starts with this."""
ID_FILE = "testbed.id"
"""In the testbed's folder: its id, stamped into every domain (``<metadata>``), bridge and namespace."""


class RegistryError(TestbedError, RuntimeError):
    """The registry (or the testbed's id) cannot be trusted or read; the message names the file and the fix."""


@dataclass(frozen=True)
class Resource:
    kind: str
    ident: str
    owner: str
    meta: dict[str, Any] = field(default_factory=dict)
    t: float = 0.0


@dataclass(frozen=True)
class Scope:
    """What everything this testbed makes carries, to be checked again at teardown."""

    dir: Path  # the testbed's folder (the registry's): every file or folder it removes lies inside
    id: str  # this testbed's id (``<dir>/testbed.id``)
    prefix: str = PREFIX

    @property
    def mark(self) -> str:
        """The ``ifalias`` of the testbed's bridges and of its namespaces' ``lo``."""
        return f"smfs-testbed:{self.id}"

    def outside(self, ident: str) -> str | None:
        """Why ``ident`` is not a path this testbed may remove, or None when it lies strictly inside
        its folder (symbolic links resolved: a link inside pointing out is outside)."""
        if not ident.startswith("/"):
            return "not an absolute path"
        real, root = os.path.realpath(ident), os.path.realpath(self.dir)
        if real == root or not real.startswith(root.rstrip("/") + "/"):
            return f"{real} is not inside the testbed's folder {root}"
        return None


Teardown = Callable[[Resource], None]
Check = Callable[[Resource, Scope], str | None]
"""Whether this testbed made a resource: None when it did (or it is gone: nothing to touch), else why not."""
_TEARDOWNS: dict[str, Teardown] = {}
_CHECKS: dict[str, Check] = {}
# Kinds torn down first to last; unknown kinds go first (most recently created first within a kind).
_ORDER = ["process", "nft", "qmp", "domain", "snapshot", "tap", "veth", "bridge", "netns", "overlay", "dir"]


def register_teardown(kind: str, fn: Teardown, check: Check | None = None) -> None:
    """Install the function that removes resources of ``kind`` (idempotent) and, when given, the check
    that a resource of that kind is this testbed's (a handler installed without one keeps the kind's
    check: the path kinds have theirs here)."""
    _TEARDOWNS[kind] = fn
    if check is not None:
        _CHECKS[kind] = check


def _path_check(res: Resource, scope: Scope) -> str | None:
    return scope.outside(res.ident)


for _kind in ("dir", "overlay", "qmp", "marker"):  # files and folders: inside the testbed's folder only
    _CHECKS[_kind] = _path_check


def identity(folder: Path) -> str:
    """The id of the testbed whose folder is ``folder``, made on first use (16 hex digits, written
    whole: a temp file linked into place, so a concurrent first use reads the same id)."""
    path = folder / ID_FILE
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            tmp = folder / f".{ID_FILE}.{os.getpid()}"
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(8) + "\n")
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
            tmp.unlink()
            continue
        except OSError as err:
            raise RegistryError(f"testbed id {path}: {err.strerror}; remove it if it is not a plain file") from None
        with os.fdopen(fd) as f:
            why = untrusted(os.fstat(f.fileno()))
            text = f.read(100).strip()
        if why:
            raise RegistryError(f"testbed id {path} is {why}; chown it to yourself and chmod 600 {path}")
        if not re.fullmatch(r"[0-9a-f]{16}", text):
            raise RegistryError(f"testbed id {path} holds {text[:40]!r}, not an id; delete it (then what was made "
                                "under the old id is no longer removed by ./inv down)")
        return text
    raise RegistryError(f"testbed id {path} could not be made; check that {folder} is writable")


def _parse(data: bytes) -> tuple[list[dict[str, Any]] | None, str]:
    """The registry's entries, or None and what is wrong with them."""
    try:
        entries = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        return None, f"not JSON: {str(err)[:120]}"
    if not isinstance(entries, list):
        return None, f"a JSON {type(entries).__name__}, not a list of entries"
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not all(isinstance(e.get(k), str) for k in ("kind", "ident", "owner")):
            return None, f"entry {i} has no kind, ident and owner strings"
        t = e.get("t", 0.0)
        if not isinstance(e.get("meta", {}), dict) or isinstance(t, bool) or not isinstance(t, int | float):
            return None, f"entry {i} ({e['kind']} {e['ident'][:60]}) has a malformed meta or t"
    return entries, ""


class Registry:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_dir() / "registry.json"
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        self.refused: list[tuple[Resource, str]] = []  # by the last teardown: (resource, why not ours)
        self._scope: Scope | None = None

    @property
    def scope(self) -> Scope:
        """This testbed's scope: its folder (the registry's) and its id."""
        if self._scope is None:
            self._check_folder()
            self._scope = Scope(self.path.parent, identity(self.path.parent))
        return self._scope

    @property
    def mark(self) -> str:
        """What this testbed's bridges and namespaces carry (their ``ifalias``)."""
        return self.scope.mark

    def _check_folder(self) -> None:
        folder = self.path.parent
        why = untrusted(folder.stat(), directory=True)
        if why:
            raise RegistryError(f"registry folder {folder} is {why}; chmod go-w {folder}, or set "
                                "SMFS_TESTBED_CACHE to a folder of your own")

    def _kept_aside(self) -> list[Path]:
        return sorted(self.path.parent.glob(f"{self.path.stem}.broken-*"))

    def _read(self) -> list[dict[str, Any]]:
        kept = self._kept_aside()
        if kept:
            _, why = _parse(kept[-1].read_bytes()) if kept[-1].is_file() else (None, "not a file")
            raise RegistryError(f"registry {self.path} could not be parsed ({why or 'see the file'}) and is kept as "
                                f"{kept[-1]}; nothing is guessed: remove what it lists by hand (ip netns, ip link, "
                                f"virsh list --all), then delete {kept[-1]}")
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return []
        except OSError as err:
            why = "a symbolic link" if err.errno == errno.ELOOP else err.strerror
            raise RegistryError(f"registry {self.path}: {why}; move it away (a registry is a plain file of yours)") from None
        with os.fdopen(fd, "rb") as f:
            why = untrusted(os.fstat(f.fileno()))
            if why:
                raise RegistryError(f"registry {self.path} is {why}; if it is yours, chown it to yourself and "
                                    f"chmod 600 {self.path}, otherwise move it away")
            data = f.read()
        entries, problem = _parse(data)
        if entries is None:
            broken = self.path.with_name(f"{self.path.stem}.broken-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json")
            os.replace(self.path, broken)
            raise RegistryError(f"registry {self.path} could not be parsed ({problem}); kept as {broken} and nothing "
                                f"removed: remove what it lists by hand (ip netns, ip link, virsh list --all), "
                                f"then delete {broken}")
        return entries

    def _write(self, entries: list[dict[str, Any]]) -> None:
        """Atomically: a temp file created 0600, fsync, rename over the registry, fsync of the folder."""
        tmp = self.path.with_suffix(".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # left by a crash (possibly with another mode): never written through
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[list[dict[str, Any]]]:
        self._check_folder()
        lock_path = self.path.with_suffix(".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise RegistryError(f"registry lock {lock_path}: {err.strerror}; move it away") from None
        with os.fdopen(fd, "r+b") as lock:
            why = untrusted(os.fstat(fd))
            if why:
                raise RegistryError(f"registry lock {lock_path} is {why}; remove it (rm {lock_path})")
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = self._read()
            before = json.dumps(entries)
            yield entries
            if json.dumps(entries) != before:
                self._write(entries)

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

    def teardown(self, owner: str | None = None, say: Say | None = None) -> list[Resource]:
        """Remove every recorded resource (of ``owner`` if given) that passes its kind's check, in
        dependency order.

        Returns what was removed. One that fails its check is not touched: it is said (``say``, and
        logged), forgotten, and listed in ``self.refused``. A resource whose handler (or check) fails
        stays recorded and the error is raised after every other resource had its turn, so one
        failure never leaks the rest.
        """
        def rank(r: Resource) -> tuple[int, float]:
            pos = _ORDER.index(r.kind) if r.kind in _ORDER else -1
            return (pos, -r.t)

        todo = sorted(self.items(owner=owner), key=rank)
        scope = self.scope if todo else None
        self.refused = []
        removed: list[Resource] = []
        errors: list[str] = []
        for res in todo:
            assert scope is not None
            fn, check = _TEARDOWNS.get(res.kind), _CHECKS.get(res.kind)
            if fn is None:
                errors.append(f"{res.kind} {res.ident}: no teardown handler loaded")
                continue
            if check is None:
                errors.append(f"{res.kind} {res.ident}: no check that this testbed made it is loaded for kind "
                              f"{res.kind!r}, so it is left alone (give register_teardown a check)")
                continue
            try:
                why = check(res, scope)
            except Exception as err:  # noqa: BLE001 - cannot tell: kept, reported below
                log.debug("check of %s %s failed", res.kind, res.ident, exc_info=True)
                errors.append(f"{res.kind} {res.ident}: cannot tell whether this testbed made it: {err}")
                continue
            if why is not None:
                line = f"refusing to remove {res.kind} {res.ident}: not made by this testbed ({why}); forgotten"
                if say is not None:
                    say(line)
                log.log(logging.INFO if say is not None else logging.WARNING, "%s", line)
                self.remove(res.kind, res.ident)
                self.refused.append((res, why))
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


class TeardownError(TestbedError, RuntimeError):
    """Some resources could not be removed; they stay in the registry for the next ``./inv down``."""
