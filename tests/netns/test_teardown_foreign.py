"""``./inv down`` touches nothing this testbed did not make (issue 13), with real namespaces and links.

A registry names a foreign namespace (another name, a process inside), a namespace with the testbed's
prefix but not its mark, a foreign host bridge, a bridge with the prefix but not the mark, a path
outside the cache, a process that is not the recorded one and a domain without the prefix: teardown
(``./inv down``, and ``Registry.teardown`` in-process) refuses each with a line, touches none, and
still removes the namespace and the bridge that carry the testbed's mark (so the checks do not simply
refuse everything). (Domains with and without the testbed's libvirt <metadata> are in
tests/unit/test_teardown_scope.py, libvirt faked: no domain is defined here.)
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from testbed import procs
from testbed.netns.bed import mark_of
from testbed.registry import Registry
from testbed.vm import bed as vmbed

REPO = Path(__file__).resolve().parents[2]


def _ns(name: str, alias: str = "") -> subprocess.Popen[bytes]:
    """A namespace (its lo with ``alias`` when given) with a sleeping process inside."""
    subprocess.run(["ip", "netns", "add", name], check=True)
    if alias:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "alias", alias], check=True)
    return subprocess.Popen(["ip", "netns", "exec", name, "sleep", "120"], start_new_session=True)


def _bridge(name: str, alias: str = "") -> None:
    with IPRoute() as ip:
        ip.link("add", ifname=name, kind="bridge")
        if alias:
            ip.link("set", index=ip.link_lookup(ifname=name)[0], ifalias=alias)


def _link(name: str) -> bool:
    with IPRoute() as ip:
        return bool(ip.link_lookup(ifname=name))


def _netns() -> list[str]:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()


@pytest.fixture()
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Foreign things and our own, on this host; all removed afterwards whatever teardown did."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SMFS_TESTBED_CACHE", str(cache))
    vmbed.load_teardown_handlers()
    mark = Registry().mark
    h = secrets.token_hex(3)
    w: dict[str, Any] = {
        "cache": cache, "ns": f"fgn{h}", "ns_pfx": f"smfs-fg{h}", "ns_ours": f"smfs-{h}-primary",
        "br": f"fgn{h}", "br_pfx": f"smfs-fg{h}", "br_ours": f"smfs-o{h}", "file": tmp_path / "outside.txt",
    }
    w["file"].write_text("keep")
    sleeps = {"ns": _ns(w["ns"]), "ns_pfx": _ns(w["ns_pfx"], "smfs-testbed:ffffffffffffffff"),
              "ns_ours": _ns(w["ns_ours"], mark)}
    w["sleeps"] = sleeps
    w["proc"] = subprocess.Popen(["sleep", "121"], start_new_session=True)
    try:
        _bridge(w["br"])
        _bridge(w["br_pfx"])
        _bridge(w["br_ours"], mark)
        yield w
    finally:
        for p in [*sleeps.values(), w["proc"]]:
            p.kill()
            p.wait()
        for name in (w["ns"], w["ns_pfx"], w["ns_ours"]):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        for name in (w["br"], w["br_pfx"], w["br_ours"]):
            subprocess.run(["ip", "link", "del", name], capture_output=True)


def _record(w: dict[str, Any]) -> Registry:
    reg = Registry()
    for key in ("ns", "ns_pfx", "ns_ours"):
        reg.add("netns", w[key], "netns-x")
    for key in ("br", "br_pfx", "br_ours"):
        reg.add("bridge", w[key], "testbed-x", site="primary")
    reg.add("overlay", str(w["file"]), "testbed-x")
    reg.add("dir", str(w["file"].parent), "testbed-x")
    reg.add("process", str(w["proc"].pid), "netns-x", name="primary:server", started=procs.start_time(w["proc"].pid),
            argv=[sys.executable, "-m", "smfs.server"])
    reg.add("domain", f"fgn-{w['ns']}", "testbed-x", uri="qemu:///system")
    return reg


@pytest.mark.parametrize("how", ["inv", "registry"])
def test_foreign(world: dict[str, Any], how: str) -> None:
    w = world
    reg = _record(w)
    if how == "inv":
        res = subprocess.run([str(REPO / "inv"), "down"], env={**os.environ, "NO_COLOR": "1", "COLUMNS": "300"},
                             capture_output=True, text=True, timeout=120, check=False)
        assert res.returncode == 0, res.stdout + res.stderr
        said = [line for line in res.stdout.splitlines() if "refusing to remove" in line]
    else:
        said = []
        reg.teardown(say=said.append)
    refused = {ident for line in said for ident in [line.split("refusing to remove ", 1)[1].split(":")[0]]}
    assert refused == {f"netns {w['ns']}", f"netns {w['ns_pfx']}", f"bridge {w['br']}", f"bridge {w['br_pfx']}",
                       f"overlay {w['file']}", f"dir {w['file'].parent}", f"process {w['proc'].pid}",
                       f"domain fgn-{w['ns']}"}, said
    # untouched: the foreign namespaces and their processes, the links, the file, the process
    present = _netns()
    assert w["ns"] in present and w["ns_pfx"] in present
    assert w["sleeps"]["ns"].poll() is None and w["sleeps"]["ns_pfx"].poll() is None
    assert mark_of(w["ns_pfx"]) == "smfs-testbed:ffffffffffffffff"
    assert _link(w["br"]) and _link(w["br_pfx"])
    assert w["file"].read_text() == "keep" and w["proc"].poll() is None
    # ours, marked, is gone (with the process inside the namespace)
    assert w["ns_ours"] not in present and not _link(w["br_ours"])
    assert w["sleeps"]["ns_ours"].wait(5) is not None
    assert Registry().items() == []


def test_bridge_mark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bridge ``up`` makes carries the mark, so teardown removes it; a recorded bridge of the same
    name without the mark is not reused."""
    import ipaddress

    from testbed.spec import SiteSpec
    from testbed.vm.bridges import BridgeError, ensure_bridge

    monkeypatch.setenv("SMFS_TESTBED_CACHE", str(tmp_path / "cache"))
    vmbed.load_teardown_handlers()
    site = SiteSpec(name=f"t{secrets.token_hex(3)}", uri="qemu:///system",
                    subnet=ipaddress.IPv4Network("198.19.251.0/24"),
                    gateway=ipaddress.IPv4Interface("198.19.251.1/24"), vms=())
    reg = Registry()
    try:
        ensure_bridge(site, "testbed-x", reg)
        assert _link(site.bridge)
        with IPRoute() as ip:
            assert ip.get_links(ip.link_lookup(ifname=site.bridge)[0])[0].get_attr("IFLA_IFALIAS") == reg.mark
        assert [r.ident for r in reg.teardown()] == [site.bridge] and not _link(site.bridge)
        _bridge(site.bridge)  # same name, no mark: someone else's now
        reg.add("bridge", site.bridge, "testbed-x")
        with pytest.raises(BridgeError, match="does not carry this testbed's mark"):
            ensure_bridge(site, "testbed-x", reg)
    finally:
        subprocess.run(["ip", "link", "del", site.bridge], capture_output=True)
