"""Interrupted namespace drills and ``./inv down`` after each leave nothing and touch nothing (issue 13),
and the checker that says so does see a leak when there is one.

The runs use a cache of their own (``SMFS_TESTBED_CACHE``): their ``./inv down`` must never reach a
testbed someone else has up on this machine.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from testbed.drill.interrupts import (
    FOREIGN_MARK,
    NETNS_ARGV,
    TAG_ENV,
    Ours,
    compare,
    inventory,
    run_interrupted,
)
from testbed.netns.bed import NamespaceTestbed, create_marked, mark_of
from testbed.vm import bed as vmbed


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("SMFS_TESTBED_CACHE", str(folder))
    vmbed.load_teardown_handlers()
    return folder


def test_interrupted_runs_leave_nothing(cache: Path) -> None:
    """Four runs of the small namespace drill, two SIGINT'ed (process group) and two SIGKILLed (the
    orchestrator alone) at drawn instants within its ~12 s; after each ``./inv down`` the host is as
    before, and the sentinels (foreign things, recorded in the registry before each down) are intact."""
    lines: list[str] = []
    # a short folder: the drill's unix sockets lie under it (AF_UNIX paths <= 108 bytes; pytest's are long)
    out = Path(tempfile.mkdtemp(prefix="smfs-int-"))
    try:
        summary = run_interrupted(NETNS_ARGV, seed=5, runs=4, testbed="netns", out=out, max_delay=12.0,
                                  say=lines.append)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    runs = summary["runs"]
    assert sorted(r["signal"] for r in runs) == ["SIGINT", "SIGINT", "SIGKILL", "SIGKILL"]
    assert summary["leaks"] == [] and summary["touched"] == [], "\n".join(lines)
    for r in runs:
        assert r["down"]["rc"] == 0, r
        assert r["down"]["refused"] == 7, r  # every sentinel named in the registry was refused
        assert r["lock_free"], r  # the kernel dropped the lock with its dead holder
    assert summary["verdict"] == "clean" and "clean" in summary["line"]


def test_checker_sees_a_leak(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip ``./inv down`` after a namespace testbed is built through the real API: the checker reports
    its namespaces, registry entries and (tagged) process as leaks; a namespace with another testbed's
    mark only as appeared; a foreign bridge removed as touched. After the real teardown: nothing."""
    tag = secrets.token_hex(4)
    monkeypatch.setenv(TAG_ENV, tag)  # what run_interrupted gives its commands; spawned processes inherit it
    h = secrets.token_hex(3)
    foreign_ns, foreign_br = f"smfs-fx{h}", f"fgx{h}"
    subprocess.run(["ip", "link", "add", foreign_br, "type", "bridge"], check=True)
    tb = NamespaceTestbed()
    try:
        baseline = inventory()
        tb.build()
        tb.spawn("primary", "sleeper", ["sleep", "60"], tmp_path / "sleeper.log")
        subprocess.run(["ip", "netns", "add", foreign_ns], check=True)
        subprocess.run(["ip", "-n", foreign_ns, "link", "set", "lo", "alias", FOREIGN_MARK], check=True)
        subprocess.run(["ip", "link", "del", foreign_br], check=True)
        ours = Ours.current(tag)
        found = compare(baseline, inventory(), ours)
        leaked = {(i["kind"], i["entry"]["name"]) for i in found["leaks"]}
        assert {("netns", tb.ns(site)) for site in ("primary", "mirror", "wan")} <= leaked, found["leaks"]
        assert ("registry", f"netns {tb.ns('wan')}") in leaked
        assert any(i["kind"] == "processes" and "sleep 60" in i["entry"]["cmd"] and i["owner"] == "ours"
                   for i in found["leaks"]), found["leaks"]
        assert all(i["owner"] == "ours" for i in found["leaks"] if i["kind"] == "netns")
        assert ("netns", foreign_ns) in {(i["kind"], i["entry"]["name"]) for i in found["appeared"]}
        assert ("netns", foreign_ns) not in leaked
        assert foreign_br in [i["entry"]["name"] for i in found["touched"]]
        # reported once: what an earlier comparison reported is not reported again
        assert compare(baseline, inventory(), ours, {i["key"] for i in found["leaks"]})["leaks"] == []
        tb.teardown()
        after = compare(baseline, inventory(), ours)
        assert after["leaks"] == [], after["leaks"]
    finally:
        tb.teardown()
        subprocess.run(["ip", "netns", "del", foreign_ns], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", foreign_br], capture_output=True, check=False)


def test_a_leaking_command_is_caught(cache: Path, tmp_path: Path) -> None:
    """End to end: a "drill" that makes a namespace it never records, killed at a drawn instant; ./inv
    down cannot know it, so the run reports it as leaked and the verdict is not clean."""
    name = f"smfs-lk{secrets.token_hex(3)}"
    argv = ["sh", "-c", f"ip netns add {name} && echo 'namespaces up' && exec sleep 30"]  # killed at 0.85 s (seed 1)
    try:
        summary = run_interrupted(argv, seed=1, runs=1, testbed="netns", out=tmp_path / "out", max_delay=1.5,
                                  say=lambda _line: None)
        assert [leak["what"] for leak in summary["leaks"]] == [f"netns {name}"], summary["leaks"]
        assert summary["verdict"] == "leak" and "1 LEAKED" in summary["line"]
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def test_a_namespace_has_its_mark_when_its_name_appears() -> None:
    """The namespace is marked before it is named (a kill in between leaves nothing, see
    testbed.netns.bed.create_marked): named, it carries the mark, its lo is up, the helper is gone."""
    name, mark = f"smfs-cm{secrets.token_hex(3)}", f"smfs-testbed:{secrets.token_hex(8)}"
    try:
        create_marked(name, mark)
        assert mark_of(name) == mark
        lo = subprocess.run(["ip", "-n", name, "-j", "link", "show", "dev", "lo"], capture_output=True, text=True)
        assert "UP" in json.loads(lo.stdout)[0]["flags"]
        helpers = subprocess.run(["pgrep", "-f", mark], capture_output=True, text=True)
        assert helpers.stdout.strip() == ""
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
