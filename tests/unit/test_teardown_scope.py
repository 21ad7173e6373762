"""Teardown touches only what this testbed made (issue 13, "Teardown can only touch what this testbed made").

A registry entry is a claim: each is checked again at teardown (names with the testbed's prefix, paths
inside its folder, domains with its id in their live libvirt <metadata>, processes with their recorded
command line), and one that fails is said, forgotten and never touched. The registry file itself is
trusted only when it is the user's own and nobody else's to write; an unreadable one is kept aside and
every later use, ``./inv down`` first, refuses with one line naming it. (Foreign namespaces and links,
which need root, are in tests/netns/test_teardown_foreign.py.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from invoke import Context
from invoke.exceptions import Exit

from testbed import procs
from testbed.registry import (
    Registry,
    RegistryError,
    Scope,
    TeardownError,
    identity,
    register_teardown,
)
from testbed.vm import bed as vmbed
from testbed.vm import hypervisor

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A testbed folder of its own (``SMFS_TESTBED_CACHE``), with every teardown handler loaded."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("SMFS_TESTBED_CACHE", str(folder))
    vmbed.load_teardown_handlers()
    return folder


# --- the registry file --------------------------------------------------------------------------


def test_file_0600(cache: Path) -> None:
    old = os.umask(0)  # whatever the umask allows, the registry and its lock are the user's alone
    try:
        reg = Registry()
        reg.add("dir", str(cache / "x"), "o")
        assert reg.scope.id
    finally:
        os.umask(old)
    for name in ("registry.json", "registry.lock", "testbed.id"):
        st = (cache / name).stat()
        assert (st.st_mode & 0o777, st.st_uid) == (0o600, os.geteuid()), name
    assert not (cache / "registry.tmp").exists()


def test_group_writable(cache: Path) -> None:
    reg = Registry()
    reg.add("dir", str(cache / "x"), "o")
    reg.path.chmod(0o664)
    with pytest.raises(RegistryError) as err:
        Registry().items()
    msg = str(err.value)
    assert str(reg.path) in msg and "writable by group" in msg and f"chmod 600 {reg.path}" in msg
    assert "\n" not in msg


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_other_owner(cache: Path) -> None:
    reg = Registry()
    reg.add("dir", str(cache / "x"), "o")
    os.chown(reg.path, 65534, 65534)
    with pytest.raises(RegistryError, match=rf"registry {reg.path} is owned by uid 65534, not by you"):
        Registry().items()


def test_open_folder(cache: Path) -> None:
    Registry()
    cache.chmod(0o777)
    with pytest.raises(RegistryError, match=rf"registry folder {cache} is writable by group and others .*chmod go-w"):
        Registry().items()


def test_written_atomically(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry is written whole or not at all: its new content is synced in a temp file before the
    rename over the old one (then the folder is synced), so a crash (here, the rename failing) leaves the
    previous registry readable and complete; a temp file left by such a crash, even a link planted in its
    place, is replaced, never written through."""
    reg = Registry()
    reg.add("dir", str(cache / "a"), "o")
    events: list[tuple[str, int]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(("replace", os.stat(src).st_ino))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    reg.add("dir", str(cache / "b"), "o")
    new, folder = reg.path.stat().st_ino, cache.stat().st_ino
    assert events == [("fsync", new), ("replace", new), ("fsync", folder)], events  # data synced, renamed, name synced

    def crash(src: Any, dst: Any) -> None:
        raise OSError(5, "crashed before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="crashed"):
        reg.add("dir", str(cache / "c"), "o")
    monkeypatch.setattr(os, "replace", real_replace)
    assert [r.ident for r in Registry().items()] == [str(cache / "a"), str(cache / "b")]
    tmp = reg.path.with_suffix(".tmp")
    assert tmp.exists()  # what the crash left
    victim = tmp_path / "victim"
    victim.write_text("keep")
    tmp.unlink()
    tmp.symlink_to(victim)
    reg.add("dir", str(cache / "d"), "o")
    assert victim.read_text() == "keep" and not tmp.exists() and not reg.path.is_symlink()
    assert [r.ident for r in Registry().items()] == [str(cache / x) for x in "abd"]
    assert (reg.path.stat().st_mode & 0o777) == 0o600


@pytest.mark.parametrize("text", ["{not json", '{"kind": "dir"}', '[{"kind": "dir", "owner": "o"}]', "\xff\xfe", ""])
def test_unreadable(cache: Path, text: str) -> None:
    """Kept aside and named; nothing removed, and every later use refuses until someone deals with it."""
    reg = Registry()
    reg.path.write_bytes(text.encode("latin-1"))
    with pytest.raises(RegistryError, match="could not be parsed") as err:
        reg.items()
    kept = list(cache.glob("registry.broken-*"))
    assert len(kept) == 1 and str(kept[0]) in str(err.value) and kept[0].read_bytes() == text.encode("latin-1")
    with pytest.raises(RegistryError, match=f"kept as {kept[0]}"):  # still refuses: nothing is guessed
        Registry().teardown()
    with pytest.raises(RegistryError):
        Registry().add("dir", str(cache / "x"), "o")
    assert not reg.path.exists()


def test_inv_down_unreadable(cache: Path) -> None:
    """``./inv down`` on an unreadable registry: exit 2, one line naming the kept-aside file."""
    cache.mkdir()
    (cache / "registry.json").write_text('[{"kind": "netns", "ident": "smfs-1-primary", "owner": "netns-1"')
    res = subprocess.run([str(REPO / "inv"), "down"], env={**os.environ, "NO_COLOR": "1"}, capture_output=True,
                         text=True, timeout=120, check=False)
    kept = list(cache.glob("registry.broken-*"))
    assert res.returncode == 2, res.stdout + res.stderr
    assert len(res.stderr.splitlines()) == 1 and "Traceback" not in res.stderr + res.stdout, res.stderr
    assert "could not be parsed" in res.stderr and len(kept) == 1 and str(kept[0]) in res.stderr


def test_down_task_unreadable(cache: Path) -> None:
    from testbed.cli.vm import down

    cache.mkdir()
    (cache / "registry.json").write_text("[1, 2")
    with pytest.raises(Exit) as err:
        down.body(Context())
    assert err.value.code == 2 and "registry.broken-" in err.value.message and "\n" not in err.value.message


def test_id_is_stable(tmp_path: Path) -> None:
    a = identity(tmp_path)
    assert a == identity(tmp_path) and len(a) == 16
    (tmp_path / "testbed.id").write_text("../../etc\n")
    with pytest.raises(RegistryError, match="not an id"):
        identity(tmp_path)


# --- paths: only inside the testbed's folder ---------------------------------------------------


def test_paths_outside(cache: Path, tmp_path: Path) -> None:
    """A file and a folder outside the cache, the cache itself, a relative path and a link inside the
    cache that points out are refused and untouched; a file and a folder inside are removed."""
    reg = Registry()
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "sub").mkdir(parents=True)
    (elsewhere / "sub" / "f").write_text("keep")
    link = cache / "link"
    link.symlink_to(elsewhere)
    inside = cache / "testbeds" / "t"
    (inside / "qmp").mkdir(parents=True)
    (inside / "t-root.qcow2").write_text("ours")
    reg.add("overlay", str(outside), "o")
    reg.add("dir", str(elsewhere), "o")
    reg.add("dir", str(cache), "o")
    reg.add("dir", str(cache / ".." / "elsewhere"), "o")
    reg.add("dir", str(link / "sub"), "o")
    reg.add("qmp", "relative.sock", "o")
    reg.add("marker", str(outside), "o2")
    reg.add("overlay", str(inside / "t-root.qcow2"), "o")
    reg.add("dir", str(inside), "o")
    said: list[str] = []
    removed = reg.teardown(say=said.append)
    assert outside.read_text() == "keep" and (elsewhere / "sub" / "f").read_text() == "keep" and link.is_symlink()
    assert cache.is_dir() and not inside.exists()
    assert sorted(r.ident for r in removed) == sorted([str(inside / "t-root.qcow2"), str(inside)])
    assert len(said) == 7 and all(s.startswith("refusing to remove ") and "not made by this testbed" in s for s in said)
    assert any(f"refusing to remove overlay {outside}: not made by this testbed ({outside} is not inside" in s
               for s in said), said
    assert reg.items() == []  # forgotten: no later teardown may touch them either


# --- domains: the testbed's id in the live <metadata> -----------------------------------------


class FakeDomain:
    """What teardown sees of a libvirt domain: its name and live XML; records what is done to it."""

    def __init__(self, name: str, xml: str) -> None:
        self._name, self.xml, self.calls = name, xml, []

    def name(self) -> str:
        return self._name

    def XMLDesc(self, flags: int = 0) -> str:  # noqa: N802 - libvirt's name
        self.calls.append("XMLDesc")
        return self.xml

    def isActive(self) -> bool:  # noqa: N802
        return "destroy" not in self.calls

    def destroy(self) -> None:
        self.calls.append("destroy")

    def undefineFlags(self, flags: int) -> None:  # noqa: N802
        self.calls.append("undefine")


def _xml(name: str, testbed: str | None) -> str:
    cfg = hypervisor.DomainConfig(
        name=name, domain_type="qemu", vcpus=1, memory_mib=256, max_memory_mib=256, kernel=Path("/k"),
        initrd=Path("/i"), cmdline="", root_disk=Path("/r"), bridge="smfs-primary", mac="52:54:00:00:00:01",
        qmp_socket=Path("/q"), console_log=Path("/c"), run_as_root=False, testbed_id=testbed or "")
    return hypervisor.domain_xml(cfg)


@pytest.fixture()
def libvirt_of(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Domains by name in place of libvirt (a connection is never opened)."""
    doms: dict[str, FakeDomain] = {}
    connected: list[str] = []

    def connect(uri: str, say: Any = print) -> object:
        connected.append(uri)
        return object()

    monkeypatch.setattr(hypervisor, "connect", connect)
    monkeypatch.setattr(hypervisor, "lookup", lambda conn, name: doms.get(name))
    return doms, connected


def test_metadata_round_trip() -> None:
    root = ET.fromstring(_xml("smfs-t-vm", "0123456789abcdef"))
    el = root.find(f"metadata/{{{hypervisor.METADATA_NS}}}testbed")
    assert el is not None and el.get("id") == "0123456789abcdef"
    assert hypervisor.domain_mark(FakeDomain("smfs-t-vm", _xml("smfs-t-vm", "0123456789abcdef"))) == "0123456789abcdef"
    assert hypervisor.domain_mark(FakeDomain("smfs-t-vm", _xml("smfs-t-vm", None))) is None


def test_foreign_domains(cache: Path, libvirt_of: Any) -> None:
    """A domain without the metadata, one with another testbed's id, one without the prefix and one on a
    remote URI are refused and never destroyed or undefined; ours (the live XML carries our id) is."""
    doms, connected = libvirt_of
    reg = Registry()
    mine = reg.scope.id
    doms["smfs-t-bare"] = FakeDomain("smfs-t-bare", _xml("smfs-t-bare", None))
    doms["smfs-t-other"] = FakeDomain("smfs-t-other", _xml("smfs-t-other", "ffffffffffffffff"))
    doms["smfs-t-mine"] = FakeDomain("smfs-t-mine", _xml("smfs-t-mine", mine))
    doms["webserver"] = FakeDomain("webserver", _xml("webserver", mine))
    for name in doms:
        reg.add("domain", name, "testbed-t", uri="qemu:///system")
    reg.add("domain", "smfs-t-remote", "testbed-t", uri="qemu+ssh://elsewhere/system")
    said: list[str] = []
    removed = reg.teardown(say=said.append)
    assert [r.ident for r in removed] == ["smfs-t-mine"] and doms["smfs-t-mine"].calls == ["XMLDesc", "XMLDesc", "destroy", "undefine"]
    for name in ("smfs-t-bare", "smfs-t-other"):
        assert "destroy" not in doms[name].calls and "undefine" not in doms[name].calls
        assert doms[name].calls == ["XMLDesc"]  # the live XML was read, and that is all
    assert doms["webserver"].calls == [] and "qemu+ssh://elsewhere/system" not in connected
    why = {line.split(":")[0].removeprefix("refusing to remove domain "): line for line in said}
    assert "no smfs-testbed <metadata>" in why["smfs-t-bare"]
    assert "names testbed 'ffffffffffffffff'" in why["smfs-t-other"]
    assert "lacks the prefix smfs-" in why["webserver"]
    assert "not a URI this testbed uses" in why["smfs-t-remote"]
    assert reg.items() == []


class FakeSnapshot:
    def __init__(self, dom: FakeDomain) -> None:
        self.dom = dom

    def delete(self, flags: int = 0) -> None:
        self.dom.calls.append("snapshot-delete")


def test_foreign_snapshots(cache: Path, libvirt_of: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A registry entry naming a snapshot is checked by its domain, as a domain is: a snapshot of a domain
    without the metadata, of another testbed's or of one without the prefix is never deleted; ours is."""
    doms, _ = libvirt_of
    monkeypatch.setattr(FakeDomain, "snapshotLookupByName", lambda self, name: FakeSnapshot(self), raising=False)
    reg = Registry()
    for name, testbed in (("smfs-t-bare", None), ("smfs-t-other", "ffffffffffffffff"), ("smfs-t-mine", reg.scope.id),
                          ("webserver", reg.scope.id)):
        doms[name] = FakeDomain(name, _xml(name, testbed))
        reg.add("snapshot", f"{name}/ready", "testbed-t", uri="qemu:///system", domain=name, snapshot="ready")
    said: list[str] = []
    removed = reg.teardown(say=said.append)
    assert [r.ident for r in removed] == ["smfs-t-mine/ready"] and "snapshot-delete" in doms["smfs-t-mine"].calls
    for name in ("smfs-t-bare", "smfs-t-other", "webserver"):
        assert "snapshot-delete" not in doms[name].calls, name
    assert sorted(line.split(":")[0] for line in said) == [
        f"refusing to remove snapshot {n}/ready" for n in ("smfs-t-bare", "smfs-t-other", "webserver")], said
    assert reg.items() == []


def test_libvirt_test_driver(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same through libvirt itself (its in-process test driver, ``test:///default``: real domain XML
    parsing, no daemon, no VM): teardown reads each domain's live XML; a running domain without the
    metadata stays defined and running, ours is destroyed and undefined."""
    import libvirt

    conn = libvirt.open("test:///default")
    monkeypatch.setattr(hypervisor, "connect", lambda uri, say=print: conn)
    reg = Registry()
    h = os.urandom(3).hex()
    names = {"bare": f"smfs-{h}-bare", "mine": f"smfs-{h}-mine"}
    doms = {k: conn.defineXML(_xml(n, reg.scope.id if k == "mine" else None).replace("type='qemu'", "type='test'", 1))
            for k, n in names.items()}
    try:
        for d in doms.values():
            d.create()
            reg.add("domain", d.name(), "testbed-t", uri="qemu:///system")
        said: list[str] = []
        assert [r.ident for r in reg.teardown(say=said.append)] == [names["mine"]]
        assert said == [f"refusing to remove domain {names['bare']}: not made by this testbed (its live XML has no "
                        "smfs-testbed <metadata>); forgotten"]
        assert conn.lookupByName(names["bare"]).isActive()
        with pytest.raises(libvirt.libvirtError):
            conn.lookupByName(names["mine"])
    finally:
        for n in names.values():
            try:
                d = conn.lookupByName(n)
            except libvirt.libvirtError:
                continue
            if d.isActive():
                d.destroy()
            d.undefine()


def test_inv_down_task(cache: Path, libvirt_of: Any, tmp_path: Path) -> None:
    """The ``./inv down`` task itself (in-process, libvirt faked): says each refusal, touches none."""
    from testbed.cli.vm import down

    doms, _ = libvirt_of
    doms["smfs-t-bare"] = FakeDomain("smfs-t-bare", _xml("smfs-t-bare", None))
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    reg = Registry()
    reg.add("domain", "smfs-t-bare", "testbed-t", uri="qemu:///system")
    reg.add("overlay", str(outside), "testbed-t")
    reg.add("devperm", str(outside), "testbed-t", uid=65534, gid=65534, mode=0o777)
    reg.add("sysctl", str(outside), "testbed-t", previous="1")
    before = outside.stat()
    down.body(Context())
    after = outside.stat()
    assert outside.read_text() == "keep" and (after.st_uid, after.st_mode) == (before.st_uid, before.st_mode)
    assert doms["smfs-t-bare"].calls == ["XMLDesc"] and reg.items() == []


# --- processes, and the kinds with no check ------------------------------------------------------


def test_foreign_process(cache: Path) -> None:
    """A running process whose command line is not the recorded one (a stale or forged entry, with the
    right start time even) is refused and keeps running; the recorded one is killed."""
    reg = Registry()
    foreign = subprocess.Popen(["sleep", "60"], start_new_session=True)
    ours = subprocess.Popen(["sleep", "61"], start_new_session=True)
    try:
        reg.add("process", str(foreign.pid), "o", name="primary:server", started=procs.start_time(foreign.pid),
                argv=["ip", "netns", "exec", "smfs-1-primary", sys.executable, "-m", "smfs.server"])
        reg.add("process", str(ours.pid), "o", name="x", started=procs.start_time(ours.pid), argv=["sleep", "61"])
        said: list[str] = []
        removed = reg.teardown(say=said.append)
        assert [r.ident for r in removed] == [str(ours.pid)] and ours.wait(5) == -signal.SIGKILL
        assert foreign.poll() is None and len(said) == 1 and f"pid {foreign.pid} runs 'sleep 60'" in said[0]
    finally:
        for p in (foreign, ours):
            p.kill()
            p.wait()


def test_gateway_exec_is_ours(cache: Path, tmp_path: Path) -> None:
    """``python -m smfs.gateway --engine c`` execs the C program under the same pid and start time: the
    recorded gateway is still ours and is killed (it was refused and forgotten before); a recorded
    Python-engine gateway that now runs that program is not."""
    fake = tmp_path / "smfs-gateway-static"  # argv[0] of the exec'd C program (bash's exec -a sets it)
    reg = Registry()
    procs_ = [subprocess.Popen(["bash", "-c", f"exec -a {fake} sleep 60"], start_new_session=True) for _ in range(2)]
    try:
        deadline = time.monotonic() + 5
        while any((procs.cmdline(p.pid) or [""])[0] != str(fake) for p in procs_):  # exec done (not mid-way)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        base = ["ip", "netns", "exec", "smfs-1-primary", sys.executable, "-m", "smfs.gateway", "--site", "primary"]
        c, py = procs_
        reg.add("process", str(c.pid), "o", name="gateway", started=procs.start_time(c.pid), argv=[*base, "--engine", "c"])
        reg.add("process", str(py.pid), "o", name="gateway", started=procs.start_time(py.pid), argv=base)
        said: list[str] = []
        removed = reg.teardown(say=said.append)
        assert [r.ident for r in removed] == [str(c.pid)]
        # Gone: ``sleep 60`` ends within 5 s only if it was killed (TimeoutExpired otherwise). Its exit
        # status is not asserted: procs.kill reaps a child of its own, so Popen may only see ECHILD (0).
        assert c.wait(5) in (-signal.SIGKILL, 0)
        assert py.poll() is None and len(said) == 1 and f"pid {py.pid} runs" in said[0]
    finally:
        for p in procs_:
            p.kill()
            p.wait()


def test_no_check_kept(cache: Path) -> None:
    """A kind whose module registered a handler but no check is never touched, and stays recorded."""
    touched: list[str] = []
    register_teardown("test-unchecked", lambda res: touched.append(res.ident))
    reg = Registry()
    reg.add("test-unchecked", "x", "o")
    with pytest.raises(TeardownError, match="no check that this testbed made it"):
        reg.teardown()
    assert touched == [] and [r.ident for r in reg.items()] == ["x"]


def test_cannot_tell_kept(cache: Path) -> None:
    """A check that cannot tell (libvirt unreachable...) is an error: kept for the next ./inv down."""
    def unsure(res: Any, scope: Scope) -> str | None:
        raise OSError("libvirt unreachable")

    touched: list[str] = []
    register_teardown("test-unsure", lambda res: touched.append(res.ident), check=unsure)
    reg = Registry()
    reg.add("test-unsure", "x", "o")
    with pytest.raises(TeardownError, match="cannot tell whether this testbed made it: libvirt unreachable"):
        reg.teardown()
    assert touched == [] and [r.ident for r in reg.items()] == ["x"]
