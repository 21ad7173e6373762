"""Interrupted runs and the teardown after them (issue 13): kill a testbed command at random instants
(SIGINT like a user's Ctrl-C, SIGKILL like ``kill -9`` of the orchestrator), run ``./inv down`` after
each, and show that it leaves nothing of the testbed and touches nothing that is not.

Why a checker apart from the teardown's own tests: ``tests/netns/test_teardown_foreign.py`` shows what
``./inv down`` does with a registry it is given; it cannot show that what a killed run leaves behind is
*in* the registry. Only a snapshot of the host (:func:`inventory`) taken before the runs and after each
``./inv down`` shows that: a namespace created before it was recorded, a process started and killed
before its pid was written, a child that outlives the orchestrator. The host is observed from outside
(``ip``, ``nft``, ``/proc``, libvirt read-only), never through the registry it is checking.

What belongs to whom: every run's command gets a tag in its environment (:data:`TAG_ENV`), which every
process it starts inherits (:func:`testbed.procs.spawn` passes the environment on); namespaces, links,
domains and nftables tables carry a testbed's mark (``smfs-testbed:<id>``). So something new after
``./inv down`` that looks like the testbed's (its prefix, its mark, a project command line) is a LEAK
unless it carries *another* testbed's mark or tag (a concurrent test with its own cache: reported as
"appeared", not counted). Something of the baseline that is gone is TOUCHED when it looks like a
testbed's (and is not another testbed's) or went while ``./inv down`` ran; anything else that ended
during a run is reported as "vanished" (on a shared machine, other people's throwaway namespaces come
and go). A sentinel (:func:`sentinels`: foreign things created before the runs, and recorded in the
registry before every ``./inv down`` so that its ownership checks must refuse them) that changed is
TOUCHED whenever it changed: the sentinels are the controlled evidence.

This module never holds the testbed's lock: the commands it runs (the drill, ``./inv down``) take it,
and holding it here would make them wait for ever.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from testbed.errors import TestbedError
from testbed.progress import Say
from testbed.registry import PREFIX

ROOT = Path(__file__).resolve().parents[2]
TAG_ENV = "SMFS_INTERRUPTS_TAG"
"""Set in every interrupted command's environment; its processes (and theirs) carry it in /proc/PID/environ."""
KINDS = ("registry", "domains", "links", "netns", "nft", "processes", "files")
MARK_PREFIX = "smfs-testbed:"
FOREIGN_MARK = "smfs-testbed:ffffffffffffffff"
"""The sentinels' mark: the testbed's form, another testbed's id."""

Entry = dict[str, str]
Inventory = dict[str, list[Entry]]

NETNS_ARGV = (str(ROOT / "inv"), "local-drill", "--mode", "network-sync,remote-sync", "--testers", "4",
              "--duration", "6", "--fail-at", "3", "--servers", "2", "--append-size", "64KiB", "--wait",
              "--out", "{out}")
"""Two modes (the gateways, the wire capture, a mode's teardown and the next one's bring-up inside one
run), about 12 s uninterrupted on a 2-core machine."""
VM_ARGV = (str(ROOT / "inv"), "drill", "--spec", "specs/ci.toml", "--modes", "local-sync", "--wait", "--out", "{out}")
COMMANDS = {"netns": NETNS_ARGV, "vm": VM_ARGV}
GRACE = {"netns": 60.0, "vm": 180.0}
"""Seconds a SIGINT'ed command gets to tear down and exit before it is SIGKILLed (recorded)."""
DOWN_TIMEOUT = {"netns": 120.0, "vm": 600.0}


class CannotRun(TestbedError, RuntimeError):
    """The interrupted runs could not be made (exit 2): the message names why and the fix."""


# --- the host, observed --------------------------------------------------------------------------


def _run(argv: list[str], timeout: float = 30.0) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if res.returncode != 0:
        raise CannotRun(f"{shlex.join(argv)} failed: {res.stderr.strip()[:200]}; is iproute2/nftables installed?")
    return res.stdout


def _read(path: str, binary: bool = False) -> Any:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data if binary else data.decode(errors="replace")


def _pids() -> list[int]:
    return sorted(int(p) for p in os.listdir("/proc") if p.isdigit())


def _ancestors() -> set[int]:
    """This process and its ancestors: the checker itself (``./inv interrupts``, pytest) is not a leak."""
    pid, seen = os.getpid(), set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        stat = _read(f"/proc/{pid}/stat")
        if stat is None:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return seen


def _environ(pid: int) -> dict[str, str]:
    raw = _read(f"/proc/{pid}/environ", binary=True) or b""
    env = {}
    for item in raw.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep and k in (TAG_ENV.encode(), b"SMFS_TESTBED_CACHE"):
            env[k.decode()] = v.decode(errors="replace")
    return env


_PROJECT = re.compile(r"(?:^|[\s/=])(?:smfs|workloads|netem)\.[a-z_]+|ip netns exec smfs-")


def _is_project(argv: list[str]) -> bool:
    """A command line the testbed starts: its modules (``-m smfs.site``, ``workloads.tester``,
    ``netem.capture``), the C gateway, nbdkit, tcpdump, a QEMU of an ``smfs-`` domain, or this
    project's invoke (the orchestrator, and any child it forked without exec)."""
    exe = Path(argv[0]).name
    line = " ".join(argv)
    if exe.startswith("smfs-gateway") or exe in ("nbdkit", "tcpdump") or _PROJECT.search(line):
        return True
    if exe.startswith("qemu") and f"guest={PREFIX}" in line:
        return True
    return any(Path(a).name == "invoke" for a in argv[:2]) and str(ROOT) in line


def _processes(domains: list[Entry]) -> list[Entry]:
    marks = {d["name"]: d["mark"] for d in domains}
    skip = _ancestors()
    out = []
    for pid in _pids():
        if pid in skip:
            continue
        raw = _read(f"/proc/{pid}/cmdline", binary=True)
        if not raw:  # kernel threads and zombies: nothing runs
            continue
        argv = [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]] or [raw.decode(errors="replace")]
        env = _environ(pid)
        if TAG_ENV not in env and not _is_project(argv):
            continue
        stat = _read(f"/proc/{pid}/stat")
        if stat is None:
            continue
        guest = next((m.group(1) for a in argv if (m := re.search(r"guest=([^,\s]+)", a))), "")
        out.append({"name": str(pid), "start": stat.rsplit(")", 1)[1].split()[19], "cmd": shlex.join(argv)[:240],
                    "tag": env.get(TAG_ENV, ""), "cache": env.get("SMFS_TESTBED_CACHE", ""),
                    "domain": guest, "domain_mark": marks.get(guest, "") if guest else ""})
    return out


def _libvirtd_running() -> bool:
    return any((_read(f"/proc/{p}/comm") or "").strip() in ("libvirtd", "virtqemud") for p in _pids())


def _domains() -> list[Entry]:
    """Every libvirt domain, read-only, only when a libvirt daemon runs (never started from here)."""
    if not _libvirtd_running():
        return []
    import libvirt

    from testbed.vm.hypervisor import domain_mark

    try:
        conn = libvirt.openReadOnly("qemu:///system")
    except libvirt.libvirtError:
        return []
    try:
        return [{"name": d.name(), "mark": domain_mark(d) or ""} for d in conn.listAllDomains(0)]
    finally:
        conn.close()


def _links() -> list[Entry]:
    links = json.loads(_run(["ip", "-j", "-d", "link", "show"]) or "[]")
    alias = {link["ifname"]: link.get("ifalias", "") for link in links}
    return [{"name": link["ifname"], "kind": (link.get("linkinfo") or {}).get("info_kind", ""),
             "alias": link.get("ifalias", ""), "master": link.get("master", ""),
             "master_alias": alias.get(link.get("master", ""), "")} for link in links]


def _netns() -> list[Entry]:
    from testbed.netns.bed import mark_of

    names = [n["name"] for n in json.loads(_run(["ip", "-j", "netns", "list"]) or "[]")]
    out = []
    for name in names:
        try:
            mark = mark_of(name)
        except (RuntimeError, ValueError) as err:
            mark = f"? {str(err)[:60]}"
        if mark is not None:  # None: gone meanwhile
            out.append({"name": name, "mark": mark})
    return out


def _nft_comment(family: str, name: str) -> str:
    """A table's comment (its testbed's mark): nft 1.0.6's JSON leaves it out, so from the text listing,
    where it is the only line indented once."""
    res = subprocess.run(["nft", "list", "table", family, name], capture_output=True, text=True, timeout=30, check=False)
    m = re.search(r'^\tcomment "([^"]*)"', res.stdout, re.MULTILINE)
    return m.group(1) if m else ""


def _nft() -> list[Entry]:
    """The host's nftables tables (tables inside the testbed's namespaces go with the namespaces), with
    the comment of those named like a testbed's."""
    tables = [t["table"] for t in json.loads(_run(["nft", "-j", "list", "tables"]) or "{}").get("nftables", [])
              if "table" in t]
    return [{"name": f"{t['family']} {t['name']}", "handle": str(t.get("handle", "")),
             "mark": str(t.get("comment", "")) or (_nft_comment(t["family"], t["name"]) if t["name"].startswith("smfs") else "")}
            for t in tables]


SKIP_FOLDERS = ("images", "rootfs")
"""Under the cache: the guest image and its Debian tree are built once and kept on purpose."""
DISK_SUFFIXES = (".qcow2", ".raw", ".img", ".save", ".sock")


def _files(cache: Path) -> list[Entry]:
    """Run folders (``testbeds/*``, ``clones/*``) and disk images anywhere else under the cache."""
    out = []
    for top in ("testbeds", "clones"):
        with contextlib.suppress(OSError):
            out += [{"name": f"{top}/{p.name}", "kind": "dir" if p.is_dir() else "file"}
                    for p in (cache / top).iterdir()]
    for dirpath, dirnames, filenames in os.walk(cache):
        rel = Path(dirpath).relative_to(cache)
        if rel.parts[:1] and rel.parts[0] in SKIP_FOLDERS:
            dirnames[:] = []
            continue
        out += [{"name": str(rel / f), "kind": "file"} for f in filenames if f.endswith(DISK_SUFFIXES)]
    return out


def _recorded() -> list[Entry]:
    from testbed.registry import Registry

    return [{"name": f"{r.kind} {r.ident}", "owner": r.owner} for r in Registry().items()]


def _sorted(entries: list[Entry]) -> list[Entry]:
    unique = {json.dumps(e, sort_keys=True): e for e in entries}
    return [unique[k] for k in sorted(unique)]


def inventory(cache: Path | None = None) -> Inventory:
    """Everything on this host that could be a testbed's, as sorted lists of flat dicts (so two
    inventories diff by value): the registry's entries, libvirt domains, host links (bridges, taps,
    veths) with their ifalias, network namespaces with their mark, host nftables tables, processes with
    a project command line or the run tag (this process and its ancestors excepted), and run folders
    and disk images under the cache (``cache``, default the testbed's)."""
    from testbed.paths import cache_dir

    domains = _domains()
    inv: Inventory = {"registry": _recorded(), "domains": domains, "links": _links(), "netns": _netns(),
                      "nft": _nft(), "processes": _processes(domains), "files": _files(cache or cache_dir())}
    return {k: _sorted(v) for k, v in inv.items()}


# --- whose is it ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ours:
    """What marks this checker's testbed: its mark (``smfs-testbed:<id>``), its cache, the runs' tag."""

    mark: str
    cache: str
    tag: str

    @classmethod
    def current(cls, tag: str = "") -> Ours:
        from testbed.paths import cache_dir
        from testbed.registry import Registry

        return cls(Registry().mark, str(cache_dir().resolve()), tag)


def _by_mark(mark: str, ours: Ours) -> str:
    if mark == ours.mark or mark == ours.mark.removeprefix(MARK_PREFIX):
        return "ours"
    if mark.startswith(MARK_PREFIX) or re.fullmatch(r"[0-9a-f]{16}", mark or ""):
        return "other"
    return "unknown"


def owner(kind: str, e: Entry, ours: Ours) -> str:
    """"ours", "other" (carries another testbed's mark, tag or cache) or "unknown"."""
    if kind in ("registry", "files"):
        return "ours"
    if kind in ("domains", "netns", "nft"):
        return _by_mark(e.get("mark", ""), ours)
    if kind == "links":
        return _by_mark(e["alias"] or e["master_alias"], ours)
    if kind == "processes":
        if e["tag"]:
            return "ours" if e["tag"] == ours.tag else "other"
        if e["domain_mark"]:
            return _by_mark(e["domain_mark"], ours)
        cache = e["cache"] or str(Path.home() / ".cache" / "smfs-testbed")
        with contextlib.suppress(OSError):
            cache = str(Path(cache).resolve())
        return "unknown" if cache == ours.cache else "other"
    return "unknown"


_TEMP_VETH = re.compile(r"[sw][0-9a-f]{6}[pm]")
"""The namespace drill's veth ends before they move into their namespaces (``s<run>p``, ``w<run>m``)."""


def testbed_like(kind: str, e: Entry) -> bool:
    """Whether it looks like something a testbed makes (its prefix, its mark, a project process)."""
    name = e["name"]
    if kind in ("registry", "files", "processes"):
        return True
    if kind == "domains":
        return name.startswith(PREFIX) or bool(e["mark"])
    if kind == "netns":
        return name.startswith(PREFIX) or e["mark"].startswith(MARK_PREFIX)
    if kind == "links":
        return (name.startswith(PREFIX) or e["alias"].startswith(MARK_PREFIX) or e["master"].startswith(PREFIX)
                or bool(_TEMP_VETH.fullmatch(name)))
    if kind == "nft":
        return name.split(" ", 1)[-1].startswith("smfs") or e["mark"].startswith(MARK_PREFIX)
    return False


def _key(kind: str, e: Entry) -> str:
    return f"{kind} {json.dumps(e, sort_keys=True)}"


def describe(kind: str, e: Entry) -> str:
    """One line for a report: the kind, the name, the attributes that tell whose it is."""
    extra = {k: v for k, v in e.items() if k != "name" and v}
    return f"{kind} {e['name']}" + (f" ({', '.join(f'{k}={v}' for k, v in extra.items())})" if extra else "")


def compare(baseline: Inventory, after: Inventory, ours: Ours, known: set[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """What changed from ``baseline`` to ``after``: ``leaks`` (new, the testbed's look, not another
    testbed's), ``appeared`` (new, not counted: another testbed's or not a testbed's
    look), ``touched`` (gone from the baseline, not another testbed's) and ``vanished`` (another
    testbed's, gone: its own lifecycle); what ``known`` holds (keys reported by an earlier call) is left
    out, so a leak is reported once. Each item: kind, entry, owner, key, line."""
    found: dict[str, list[dict[str, Any]]] = {"leaks": [], "appeared": [], "touched": [], "vanished": []}
    for kind in KINDS:
        before = {_key(kind, e): e for e in baseline.get(kind, [])}
        now = {_key(kind, e): e for e in after.get(kind, [])}
        for key in sorted(now.keys() - before.keys() - (known or set())):
            e, who = now[key], owner(kind, now[key], ours)
            item = {"kind": kind, "entry": e, "owner": who, "key": key, "line": describe(kind, e)}
            found["leaks" if testbed_like(kind, e) and who != "other" else "appeared"].append(item)
        for key in sorted(before.keys() - now.keys() - (known or set())):
            e, who = before[key], owner(kind, before[key], ours)
            item = {"kind": kind, "entry": e, "owner": who, "key": key, "line": describe(kind, e)}
            found["vanished" if who == "other" else "touched"].append(item)
    return found


# --- sentinels: foreign things that must survive ---------------------------------------------------


@dataclass
class Sentinels:
    """Foreign things on the host during the runs: names without the prefix, or with it but another
    testbed's mark; a project-looking process that is not the testbed's; files in and out of the cache."""

    h: str
    file_in: Path  # inside the cache, not recorded: ./inv down must not sweep the folder
    file_out: Path  # outside the cache, recorded as an overlay: the path check must refuse it
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    started: dict[str, int | None] = field(default_factory=dict)

    @property
    def namespaces(self) -> dict[str, str]:
        return {f"fgn{self.h}": "", f"{PREFIX}fg{self.h}": FOREIGN_MARK}

    @property
    def bridges(self) -> dict[str, str]:
        return {f"fgn{self.h}": "", f"{PREFIX}fg{self.h}": FOREIGN_MARK}

    @property
    def tables(self) -> list[str]:
        return [f"fgn{self.h}", f"smfs_fg{self.h}"]

    def record(self) -> None:
        """Name them in the registry, as a stale or hostile registry would: ``./inv down`` must refuse
        each (it then forgets them; this runs again before every ``./inv down``)."""
        from testbed.registry import Registry

        reg, who = Registry(), "interrupts-sentinel"
        for name in self.namespaces:
            reg.add("netns", name, who)
        for name in self.bridges:
            reg.add("bridge", name, who, site="primary")
        reg.add("overlay", str(self.file_out), who)
        proc = self.procs["lookalike"]
        reg.add("process", str(proc.pid), who, name="primary:servers", started=self.started["lookalike"],
                argv=[sys.executable, "-m", "smfs.site", "primary"])
        reg.add("domain", f"fgn-{self.h}", who, uri="qemu:///system")

    def problems(self) -> list[str]:
        """What is no longer as it was made: each a line (empty: all intact)."""
        from testbed import procs
        from testbed.netns.bed import mark_of

        bad = []
        for name, mark in self.namespaces.items():
            got = mark_of(name)
            if got != mark:
                bad.append(f"sentinel namespace {name}: " + ("gone" if got is None else f"its mark is now {got!r}"))
        links = {e["name"]: e["alias"] for e in _links()}
        for name, mark in self.bridges.items():
            if links.get(name) != mark:
                bad.append(f"sentinel bridge {name}: " + ("gone" if name not in links else f"its alias is now {links[name]!r}"))
        tables = {e["name"] for e in _nft()}
        bad += [f"sentinel nftables table inet {t}: gone" for t in self.tables if f"inet {t}" not in tables]
        for key, proc in self.procs.items():
            if proc.poll() is not None or not procs.alive(proc.pid, self.started[key]):
                bad.append(f"sentinel process {key} (pid {proc.pid}): killed (exit {proc.poll()})")
        for path in (self.file_in, self.file_out):
            if _read(str(path)) != f"sentinel {self.h}\n":
                bad.append(f"sentinel file {path}: gone or changed")
        return bad


@contextlib.contextmanager
def sentinels() -> Iterator[Sentinels]:
    """Make the foreign things (before the baseline), yield them, and remove them by name afterwards
    whatever happened (the caller checks :meth:`Sentinels.problems` before the end)."""
    from testbed import procs
    from testbed.paths import cache_dir

    h = secrets.token_hex(3)
    folder = Path(f"/tmp/smfs-interrupts-{h}")
    s = Sentinels(h, cache_dir() / f"fgn{h}" / "disk.qcow2", folder / "disk.qcow2")
    try:
        for path in (s.file_in, s.file_out):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"sentinel {h}\n")
        for name, mark in s.namespaces.items():
            _run(["ip", "netns", "add", name])
            if mark:
                _run(["ip", "-n", name, "link", "set", "lo", "alias", mark])
            s.procs[f"in {name}"] = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "86400"],
                                                     start_new_session=True)
        for name, mark in s.bridges.items():
            _run(["ip", "link", "add", name, "type", "bridge"])
            if mark:
                _run(["ip", "link", "set", name, "alias", mark])
        for table in s.tables:
            _run(["nft", "add", "table", "inet", table])
        # a process that looks like the testbed's (its command line names smfs.site) but is not
        s.procs["lookalike"] = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(86400)", "smfs.site", "foreign", h], start_new_session=True)
        time.sleep(0.2)  # ip netns exec has exec'd sleep: the start times below are the sleepers'
        s.started = {k: procs.start_time(p.pid) for k, p in s.procs.items()}
        yield s
    finally:
        for proc in s.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        for name in s.namespaces:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        for name in s.bridges:
            subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)
        for table in s.tables:
            subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True, check=False)
        for path in (s.file_in, s.file_out):
            with contextlib.suppress(OSError):
                path.unlink()
            with contextlib.suppress(OSError):
                path.parent.rmdir()


# --- the runs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shot:
    run: int
    delay: float  # s after the command started
    signal: str  # SIGINT (to the process group) or SIGKILL (to the orchestrator's pid)


def plan(seed: int, runs: int, max_delay: float) -> list[Shot]:
    """The runs' instants and signals, from ``random.Random(seed)``: one instant drawn in each of
    ``runs`` equal slices of [0, max_delay] (so the kills cover bring-up, run and teardown even in a
    few runs), the signals alternating along the slices from a drawn first one (half each, each over
    the whole span), then the order shuffled."""
    rng = random.Random(seed)
    first = rng.randrange(2)
    shots = [((i + rng.random()) * max_delay / runs, ("SIGINT", "SIGKILL")[(i + first) % 2]) for i in range(runs)]
    rng.shuffle(shots)
    return [Shot(i + 1, round(d, 3), s) for i, (d, s) in enumerate(shots)]


_STAMP = re.compile(r"^\[\s*[0-9.]+s\]\s*")
_PHASES = (  # (phase, patterns of the command's last line, its time stamp removed), first match wins
    ("waiting-for-lock", ("waiting for the testbed",)),
    ("end", (r"^(verdict:|broken promises|mode\s+acked|-{4,}|drill faults:|against the paper|report:)",
             r"^\S+\s+\d+\s+\d+\s+\d+")),  # the report: its verdict, the table's header and rows
    ("teardown", ("checked:", "tearing down", "cleanup failed", "INFRASTRUCTURE FAILURE", "DRILL ERROR",
                  "TEARDOWN FAILED", "up failed")),
    ("check", ("mirror listing recovered", "primary's own disk", "wire check", "DRILL FAULT",
               "booted it again", "primary booted again", "mirror site stopped")),
    ("disaster", ("power cut", "mirror drained", "mirror stopped", "WAN loss raised")),
    ("run", ("testers started", "testers running", "WAN reshaped", "mirror site restarted", "mirror site crashed")),
    ("bring-up", ("local drill in network namespaces", "namespaces up", "WAN shaped", "gateways up",
                  "wire capture", "storage servers up", "fault not run", r"^up:", "testbed ", "snapshot",
                  "restored", "primary site up", "mirror site (", "calibrated", "reseeded", "gateways restarted",
                  "reusing")),
)


def phase_of(line: str | None) -> str:
    """Where a command was when it was killed, from its last line of output (the drills print one per
    step): start (nothing yet: Python and invoke starting, flags, the lock), bring-up, run, disaster
    (the power cut and the drain), check, teardown (after a mode's check: its namespaces or VMs go),
    end (the report), or other."""
    if not line or not line.strip():
        return "start"
    text = _STAMP.sub("", line.strip())
    for phase, patterns in _PHASES:
        if any(re.search(p, text) if p.startswith("^") else p in text for p in patterns):
            return phase
    return "other"


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [ln for ln in tail.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def lock_free(timeout: float = 0.0) -> bool:
    """Whether nobody holds the testbed's lock (probed with a non-blocking flock, released at once),
    retried until ``timeout``. Only when no command of ours runs: the probe could make one fail."""
    from testbed.lock import lock_path

    deadline = time.monotonic() + timeout
    while True:
        fd = os.open(lock_path(), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
        finally:
            os.close(fd)
        time.sleep(0.2)


def _kill_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _start(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """The command in its own session (its process group is the one a terminal's Ctrl-C would hit)."""
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=ROOT, env=env)


def _stop(proc: subprocess.Popen[bytes], grace: float) -> None:
    """End a command of ours when the checker itself is interrupted: Ctrl-C to its group, then SIGKILL."""
    if proc.poll() is None:
        _kill_group(proc, signal.SIGINT)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            _kill_group(proc, signal.SIGKILL)
            proc.wait()


def _down(log: Path, env: dict[str, str], timeout: float) -> dict[str, Any]:
    """``./inv down --wait``, as a user would run it after the interruption."""
    t0 = time.monotonic()
    proc = _start([str(ROOT / "inv"), "down", "--wait"], log, env)
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc, signal.SIGKILL)
        proc.wait()
        return {"rc": None, "seconds": round(time.monotonic() - t0, 2), "said": f"timed out after {timeout:.0f} s",
                "refused": 0}
    lines = (_read(str(log)) or "").splitlines()
    said = next((ln.strip() for ln in reversed(lines) if ln.startswith(("removed ", "nothing to remove", "error"))), "")
    return {"rc": rc, "seconds": round(time.monotonic() - t0, 2), "said": said,
            "refused": sum("refusing to remove" in ln for ln in lines)}


def _settled(baseline: Inventory, ours: Ours, known: set[str], seconds: float = 5.0) -> tuple[Inventory, dict[str, Any]]:
    """The inventory after ``./inv down`` and its comparison; a leak must still be there after
    ``seconds`` (a process killed by down may take a moment to be gone from /proc)."""
    deadline = time.monotonic() + seconds
    while True:
        inv = inventory()
        found = compare(baseline, inv, ours, known)
        if not found["leaks"] or time.monotonic() >= deadline:
            return inv, found
        time.sleep(0.5)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink()) if folder.exists() else 0


def _fmt(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


@dataclass
class Checker:
    """One session of interrupted runs: the baseline, the tag, what was reported so far."""

    argv: list[str]
    testbed: str
    out: Path
    say: Say
    ours: Ours
    baseline: Inventory
    sentinels: Sentinels | None
    env: dict[str, str]
    known: set[str] = field(default_factory=set)

    def command(self, folder: Path) -> list[str]:
        return [a.replace("{out}", str(folder / "drill")) for a in self.argv]

    def after(self, folder: Path, record: dict[str, Any]) -> None:
        """The user's part after an interruption: wait for the lock, ``./inv down``, then the host."""
        t0 = time.monotonic()
        record["lock_free"] = lock_free(timeout=30.0)
        record["lock_free_after_s"] = round(time.monotonic() - t0, 2)
        before_down = {_key(k, e) for k, entries in inventory().items() for e in entries}
        if self.sentinels is not None:
            self.sentinels.record()
        record["down"] = _down(folder / "down.log", self.env, DOWN_TIMEOUT.get(self.testbed, 300.0))
        _, found = _settled(self.baseline, self.ours, self.known)
        # Gone from the baseline: counted when it looks like a testbed's (and is not another's), or when
        # it went while ./inv down ran; anything else ended during the run, with nothing of ours acting
        # on it by name (another user's throwaway namespace): reported as vanished.
        for item in list(found["touched"]):
            if not testbed_like(item["kind"], item["entry"]) and item["key"] not in before_down:
                found["touched"].remove(item)
                found["vanished"].append(item)
        if self.sentinels is not None:
            found["touched"] += [{"kind": "sentinel", "line": p, "key": f"sentinel {p}"} for p in self.sentinels.problems()
                                 if f"sentinel {p}" not in self.known]
        if not record["lock_free"]:  # the kernel drops an flock with its holder: a survivor still holds it
            from testbed.lock import holder

            found["leaks"].append({"line": f"the testbed's lock was still held 30 s after the command ended: {holder()}",
                                   "key": f"lock run {record['run']}"})
        if record["down"]["rc"] != 0:
            found["leaks"].append({"line": f"./inv down failed (exit {record['down']['rc']}): {record['down']['said']}",
                                   "key": f"down run {record['run']}"})
        for item in found["leaks"] + found["touched"] + found["appeared"] + found["vanished"]:
            self.known.add(item["key"])
        record["leaks"] = [i["line"] for i in found["leaks"]]
        record["touched"] = [i["line"] for i in found["touched"]]
        record["appeared"] = [i["line"] for i in found["appeared"]]
        record["vanished"] = [i["line"] for i in found["vanished"]]
        # A killed namespace drill leaves its modes' work/ folders (the sites' log stores) in its result
        # folder: not recorded (outside the cache), so ./inv down leaves them; reported, not counted.
        record["work_left_kib"] = sum(_size(w) for w in (folder / "drill").glob("*/work")) // 1024

    def calibrate(self, timeout: float) -> dict[str, Any]:
        """One uninterrupted run: it must succeed (else nothing here means anything), and its length is
        the span the kills are drawn in."""
        folder = self.out / "run-000"
        folder.mkdir(parents=True)
        t0 = time.monotonic()
        proc = _start(self.command(folder), folder / "output.log", self.env)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _stop(proc, GRACE.get(self.testbed, 60.0))
            raise CannotRun(f"the uninterrupted run took over {timeout:.0f} s; see {folder / 'output.log'}") from None
        except BaseException:
            _stop(proc, GRACE.get(self.testbed, 60.0))
            raise
        record: dict[str, Any] = {"run": 0, "signal": None, "rc": rc, "seconds": round(time.monotonic() - t0, 2),
                                  "last_line": _last_line(folder / "output.log")}
        self.after(folder, record)
        if rc != 0:
            raise CannotRun(f"the uninterrupted run failed (exit {rc}: {record['last_line'][:160]}); see "
                            f"{folder / 'output.log'}")
        return record

    def shot(self, shot: Shot, seed: int) -> dict[str, Any]:
        """Run the command, kill it at the drawn instant, then :meth:`after`."""
        folder = self.out / f"run-{shot.run:03d}"
        folder.mkdir(parents=True)
        log = folder / "output.log"
        t0 = time.monotonic()
        proc = _start(self.command(folder), log, self.env)
        record: dict[str, Any] = {"run": shot.run, "seed": seed, "signal": shot.signal, "delay": shot.delay}
        try:
            self._interrupt(proc, shot, record, t0, log)
        except BaseException:
            _stop(proc, GRACE.get(self.testbed, 60.0))
            raise
        self.after(folder, record)
        return record

    def _interrupt(self, proc: subprocess.Popen[bytes], shot: Shot, record: dict[str, Any], t0: float,
                   log: Path) -> None:
        while (left := t0 + shot.delay - time.monotonic()) > 0 and proc.poll() is None:
            time.sleep(min(left, 0.02))
        record["last_line"] = _last_line(log)
        if proc.poll() is not None:
            record.update(phase="exited", rc=proc.returncode, elapsed=round(time.monotonic() - t0, 2))
        else:
            record["phase"] = phase_of(record["last_line"])
            if shot.signal == "SIGINT":  # a terminal's Ctrl-C: the whole foreground process group
                _kill_group(proc, signal.SIGINT)
            else:  # kill -9 of the orchestrator alone: what it started is left for ./inv down
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGKILL)
            t_sig = time.monotonic()
            record["elapsed"] = round(t_sig - t0, 2)
            try:
                proc.wait(GRACE.get(self.testbed, 60.0) if shot.signal == "SIGINT" else 30.0)
            except subprocess.TimeoutExpired:
                record["escalated"] = True  # it did not exit after SIGINT: SIGKILL, as a user would
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGKILL)
                proc.wait()
            record["rc"] = proc.returncode
            record["exit_after_s"] = round(time.monotonic() - t_sig, 2)


def summarize(summary: dict[str, Any]) -> str:
    """The one-line verdict."""
    runs = summary["runs"]
    sig = {s: sum(r["signal"] == s for r in runs) for s in ("SIGINT", "SIGKILL")}
    phases: dict[str, int] = {}
    for r in runs:
        phases[r["phase"]] = phases.get(r["phase"], 0) + 1
    head = (f"interrupts: {len(runs)} runs ({sig['SIGINT']} SIGINT, {sig['SIGKILL']} SIGKILL; kills in "
            + ", ".join(f"{p} {n}" for p, n in sorted(phases.items())) + f") in {_fmt(summary['seconds'])}")
    leaks, touched = summary["leaks"], summary["touched"]
    others = [f"{len(summary[k])} {k}" for k in ("appeared", "vanished") if summary[k]]
    work = [r["work_left_kib"] for r in runs if r.get("work_left_kib")]
    if work:
        others.append(f"{len(work)} killed runs left {sum(work) / 1024:.0f} MiB of work folders in their results")
    note = f" ({'; '.join(others)}: not counted, listed in summary.json)" if others else ""
    if not leaks and not touched:
        return f"{head}: clean, ./inv down left nothing of the testbed and touched nothing else{note}"
    return f"{head}: {len(leaks)} LEAKED, {len(touched)} TOUCHED (see {summary['out']}/summary.json){note}"


def run_interrupted(argv: list[str] | tuple[str, ...], seed: int, runs: int, testbed: str, out: Path,
                    max_delay: float | None = None, say: Say = print, check_sentinels: bool = True) -> dict[str, Any]:
    """``runs`` runs of ``argv`` (``{out}`` in it becomes each run's result folder), each killed at an
    instant of :func:`plan` and followed by ``./inv down``; the host's inventory after each against
    the one before the first. ``max_delay`` None: an uninterrupted run first measures it. Returns
    the summary (also ``out/summary.json``, rewritten after every run); raises :class:`CannotRun`.

    Refuses when the testbed's registry records anything (a testbed is up: the runs' ``./inv down``
    would remove it) or its lock is held."""
    from testbed.paths import cache_dir
    from testbed.registry import Registry, RegistryError

    try:
        recorded = Registry().items()
    except RegistryError as err:
        raise CannotRun(str(err)) from None
    if recorded:
        raise CannotRun(f"the registry {cache_dir() / 'registry.json'} records {len(recorded)} resources (a testbed is "
                        "up, and ./inv down after each run would remove it); run ./inv down first, or set "
                        "SMFS_TESTBED_CACHE to a folder of your own")
    if not lock_free():
        from testbed.lock import holder

        raise CannotRun(f"the testbed is in use by {holder()}; run again when it has ended")
    out.mkdir(parents=True, exist_ok=True)
    tag = secrets.token_hex(8)
    t0 = time.monotonic()
    summary: dict[str, Any] = {"testbed": testbed, "seed": seed, "argv": list(argv), "tag": tag, "out": str(out),
                               "cache": str(cache_dir()), "runs": [], "leaks": [], "touched": [], "appeared": [], "vanished": []}

    def save() -> None:
        summary["seconds"] = round(time.monotonic() - t0, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))

    def note(record: dict[str, Any]) -> None:
        for what in ("leaks", "touched", "appeared", "vanished"):
            summary[what] += [{"run": record["run"], "signal": record.get("signal"), "delay": record.get("delay"),
                               "phase": record.get("phase"), "seed": seed, "what": line} for line in record.get(what, [])]

    guard = sentinels() if check_sentinels else contextlib.nullcontext()
    with guard as sent:
        ours = Ours.current(tag)
        checker = Checker(list(argv), testbed, out, say, ours, inventory(), sent, {**os.environ, TAG_ENV: tag})
        summary["baseline"] = checker.baseline
        if max_delay is None:
            say("an uninterrupted run first: it must succeed, and its length is the span of the kills")
            cal = checker.calibrate(timeout=DOWN_TIMEOUT.get(testbed, 300.0) * 10)
            summary["calibration"] = cal
            note(cal)
            max_delay = cal["seconds"]
            say(f"uninterrupted: {cal['seconds']:.1f} s (exit {cal['rc']}); ./inv down after it: {cal['down']['said']}"
                + (f"; LEAKED {len(cal['leaks'])}" if cal["leaks"] else ""))
        summary["max_delay"] = max_delay
        shots = plan(seed, runs, max_delay)
        summary["plan"] = [asdict(s) for s in shots]
        save()
        for shot in shots:
            try:
                rec = checker.shot(shot, seed)
            except KeyboardInterrupt:  # the checker's own Ctrl-C: leave the host as it found it
                summary["interrupted"] = f"at run {shot.run}"
                save()
                say(f"interrupted at run {shot.run}: ./inv down, then the summary so far in {out / 'summary.json'}")
                _down(out / "down-after-interrupt.log", checker.env, DOWN_TIMEOUT.get(testbed, 300.0))
                raise
            summary["runs"].append(rec)
            note(rec)
            save()
            problems = len(rec["leaks"]) + len(rec["touched"])
            say(f"run {shot.run:3d}/{runs}: {shot.signal:7s} at {shot.delay:5.1f} s ({rec['phase']}"
                + (", then SIGKILL" if rec.get("escalated") else "") + f"; exit {rec['rc']}); down {rec['down']['seconds']:.1f} s: "
                + f"{rec['down']['said'] or 'rc ' + str(rec['down']['rc'])}"
                + (f"; {problems} LEAKED/TOUCHED: " + "; ".join(rec["leaks"] + rec["touched"])[:300] if problems else "; clean"))
        summary["after"] = inventory()
    summary["verdict"] = "clean" if not (summary["leaks"] or summary["touched"]) else "leak"
    summary["line"] = summarize(summary)
    save()
    return summary
