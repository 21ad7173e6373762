"""Scoped forwarding (issue 13), with real packets, never on the host's own forwarding.

``bridges.scope_forwarding`` and the registry's teardown act on the network namespace the calling
thread is in. These tests move the test's thread into a throwaway namespace (``_inside``, setns) that
plays the host: two site bridges made by ``ensure_bridge`` (prefix and mark), a foreign bridge, two
foreign veths, and a peer namespace behind each port, so pings really cross the forward hook.

- forwarding was off: our bridges route to each other and bridge within themselves; foreign to ours,
  ours to foreign and foreign to foreign are dropped; a foreign bridge still bridges (br_netfilter);
  teardown restores ip_forward 0 *before* it deletes the table and leaves a foreign table alone;
- forwarding was on: the table only accepts, foreign traffic still flows, ip_forward stays 1;
- registry entries naming a foreign table, another testbed's table, or our name without our mark
  are refused and the tables stay; an unrecorded table of our name is not taken over.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import re
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.registry import Registry
from testbed.spec import SiteSpec
from testbed.vm import bridges

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def _inside(ns: str) -> Iterator[None]:
    """Run the block with this thread in namespace ``ns`` (netlink, nft, /proc/sys/net all follow),
    and always come back to where it was."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def _sh(*argv: str) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {res.stderr.strip()}")
    return res.stdout


def _ping(ns: str, address: str, expect: bool) -> bool:
    """Whether ``ns`` reaches ``address``: a few tries when a reply is expected (ARP), one when not."""
    count = ["-c", "3", "-i", "0.2"] if expect else ["-c", "1"]
    res = subprocess.run(["ip", "netns", "exec", ns, "ping", "-q", "-n", *count, "-W", "1", address],
                         capture_output=True, timeout=30)
    return res.returncode == 0


# The lab: "r" plays the host. Peers: a, a2 on our site bridge smfs-sa; b on smfs-sb; c and d behind
# foreign veths fc, fd (routed by r); e1, e2 on a foreign bridge fbr.
NET = "10.251"
PEERS = {  # peer: (r's end, address in the peer, its gateway)
    "a": ("va", f"{NET}.1.2/24", f"{NET}.1.1"),
    "a2": ("va2", f"{NET}.1.3/24", f"{NET}.1.1"),
    "b": ("vb", f"{NET}.2.2/24", f"{NET}.2.1"),
    "c": ("fc", f"{NET}.3.2/24", f"{NET}.3.1"),
    "d": ("fd", f"{NET}.4.2/24", f"{NET}.4.1"),
    "e1": ("ve1", f"{NET}.5.2/24", f"{NET}.5.1"),
    "e2": ("ve2", f"{NET}.5.3/24", f"{NET}.5.1"),
}
SITES = [SiteSpec(name="sa", uri="qemu:///system", subnet=ipaddress.IPv4Network(f"{NET}.1.0/24"),
                  gateway=ipaddress.IPv4Interface(f"{NET}.1.1/24"), vms=()),
         SiteSpec(name="sb", uri="qemu:///system", subnet=ipaddress.IPv4Network(f"{NET}.2.0/24"),
                  gateway=ipaddress.IPv4Interface(f"{NET}.2.1/24"), vms=())]
OURS = [s.bridge for s in SITES]  # smfs-sa, smfs-sb
WATCH = "fgn_watch"  # a foreign table of the test's own: counts what crosses the forward hook


def _nft(ns: str, text: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], check=True, text=True, input=text, timeout=30)


def _ip(peer: str) -> str:
    return PEERS[peer][1].split("/")[0]


@pytest.fixture()
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Namespaces and links (created inside them, none on the host); every namespace deleted by name
    afterwards, which takes its links, bridges and tables with it."""
    monkeypatch.setenv("SMFS_TESTBED_CACHE", str(tmp_path / "cache"))
    h = secrets.token_hex(3)
    names = {role: f"sfw{h}{role}" for role in ["r", *PEERS]}
    try:
        for ns in names.values():
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        r = names["r"]
        _sh("ip", "-n", r, "link", "add", "fbr", "type", "bridge", "stp_state", "0", "forward_delay", "0")
        _sh("ip", "-n", r, "addr", "add", f"{NET}.5.1/24", "dev", "fbr")
        _sh("ip", "-n", r, "link", "set", "fbr", "up")
        for peer, (end, address, gateway) in PEERS.items():
            _sh("ip", "link", "add", "name", end, "netns", r, "type", "veth", "peer", "name", "eth0",
                "netns", names[peer])
            _sh("ip", "-n", names[peer], "addr", "add", address, "dev", "eth0")
            _sh("ip", "-n", names[peer], "link", "set", "eth0", "up")
            _sh("ip", "-n", names[peer], "route", "add", "default", "via", gateway)
            _sh("ip", "-n", r, "link", "set", end, "up")
        for end, gateway in (("fc", f"{NET}.3.1/24"), ("fd", f"{NET}.4.1/24")):
            _sh("ip", "-n", r, "addr", "add", gateway, "dev", end)
        for end in ("ve1", "ve2"):
            _sh("ip", "-n", r, "link", "set", end, "master", "fbr")
        # a new namespace inherits the host's IPv4 settings: start from forwarding off, whatever the host has
        _sh("ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=0")
        _nft(r, f"table inet {WATCH} {{\n chain forward {{\n  type filter hook forward priority -10; policy accept;\n"
             '  iifname "smfs-sa" oifname "smfs-sa" counter\n  iifname "fbr" oifname "fbr" counter\n }\n}\n')
        yield names
    finally:
        for ns in names.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _up(lab: dict[str, str], previous: str) -> Registry:
    """In ``r``: ip_forward = ``previous``, our two site bridges with a port each (a, a2 / b), then
    the code under test."""
    reg = Registry()
    with _inside(lab["r"]):
        Path(bridges.IP_FORWARD).write_text(f"{previous}\n")
        for site in SITES:
            bridges.ensure_bridge(site, "testbed-t", reg)
        for end, bridge in (("va", "smfs-sa"), ("va2", "smfs-sa"), ("vb", "smfs-sb")):
            _sh("ip", "link", "set", end, "master", bridge)
        bridges.scope_forwarding(OURS, "testbed-t", reg)
        assert Path(bridges.IP_FORWARD).read_text().strip() == "1"
    return reg


def _in_r(lab: dict[str, str], *argv: str) -> str:
    with _inside(lab["r"]):
        return _sh(*argv)


def _table(reg: Registry) -> str:
    return bridges.forward_table(reg.scope.id)


def test_forwarding_was_off(lab: dict[str, str]) -> None:
    reg = _up(lab, "0")
    # (a) between our bridges (routed), and within one of them (bridged)
    assert _ping(lab["a"], _ip("b"), True) and _ping(lab["b"], _ip("a2"), True)
    assert _ping(lab["a"], _ip("a2"), True)
    # (b) foreign to ours, ours to foreign, foreign to foreign: dropped (without the table they would
    # all be routed: ip_forward is 1 now, see test_forwarding_was_on)
    assert not _ping(lab["c"], _ip("a"), False)
    assert not _ping(lab["b"], _ip("c"), False)
    assert not _ping(lab["c"], _ip("d"), False)
    table = _in_r(lab, "nft", "list", "table", "inet", _table(reg))
    assert f'comment "{reg.mark}"' in table and "drop" in table
    # a foreign bridge keeps bridging (with br_netfilter its frames cross the same hook)
    assert _ping(lab["e1"], _ip("e2"), True)
    with _inside(lab["r"]):  # the namespace's own br_netfilter setting
        call = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
        br_nf = call.exists() and call.read_text().strip() == "1"
    if br_nf:  # then bridged frames did cross the inet forward hook, so the two checks above mean something
        counts = [int(n) for n in re.findall(r"packets (\d+)", _in_r(lab, "nft", "list", "table", "inet", WATCH))]
        assert len(counts) == 2 and all(counts), counts
    # (d) teardown: ip_forward back to 0 before the table goes, ours gone, the foreign table kept
    with _inside(lab["r"]):
        removed = [(r.kind, r.ident) for r in reg.teardown()]
        assert Path(bridges.IP_FORWARD).read_text().strip() == "0"
    kinds = [k for k, _ in removed]
    assert kinds.index("sysctl") < kinds.index("nft"), removed
    assert ("nft", f"inet {_table(reg)}") in removed
    tables = _in_r(lab, "nft", "list", "tables")
    assert _table(reg) not in tables and WATCH in tables
    assert reg.items() == []


def test_forwarding_was_on(lab: dict[str, str]) -> None:
    reg = _up(lab, "1")
    table = _in_r(lab, "nft", "list", "table", "inet", _table(reg))
    assert "accept" in table and "drop" not in table, table
    assert not reg.items("sysctl")  # not ours to restore
    assert _ping(lab["a"], _ip("b"), True) and _ping(lab["a"], _ip("a2"), True)
    # (c) what the host forwarded before still flows
    assert _ping(lab["c"], _ip("a"), True) and _ping(lab["c"], _ip("d"), True)
    assert _ping(lab["e1"], _ip("e2"), True)
    with _inside(lab["r"]):
        reg.teardown()
        assert Path(bridges.IP_FORWARD).read_text().strip() == "1"
    assert _table(reg) not in _in_r(lab, "nft", "list", "tables")


def test_foreign_tables_refused(lab: dict[str, str]) -> None:
    reg = Registry()
    ours = f"inet {_table(reg)}"
    other = "inet smfs_fwd_ffffffffffffffff"
    _nft(lab["r"], f'table {other} {{ comment "smfs-testbed:ffffffffffffffff"; }}\ntable inet fgn_keep {{ }}\n')
    for ident in (other, "inet fgn_keep"):
        reg.add("nft", ident, "testbed-t")
    reg.add("nft", f"inet {WATCH}", "testbed-t")
    said: list[str] = []
    with _inside(lab["r"]):
        assert reg.teardown(say=said.append) == []
    assert sorted(line.split(":")[0] for line in said) == sorted(
        f"refusing to remove nft {i}" for i in (other, "inet fgn_keep", f"inet {WATCH}")), said
    tables = _in_r(lab, "nft", "list", "tables")
    assert all(name in tables for name in ("smfs_fwd_ffffffffffffffff", "fgn_keep", WATCH)), tables
    # our name, but made by someone else (no mark): not taken over at up, not removed at down
    _in_r(lab, "nft", "add", "table", *ours.split())
    with _inside(lab["r"]), pytest.raises(bridges.BridgeError, match="not recorded by smfs-testbed"):
        bridges.scope_forwarding(OURS, "testbed-t", reg)
    reg.add("nft", ours, "testbed-t")
    said.clear()
    with _inside(lab["r"]):
        assert reg.teardown(say=said.append) == []
        assert Path(bridges.IP_FORWARD).read_text().strip() == "0"  # refused before touching forwarding
    assert said and "carries no smfs-testbed mark" in said[0], said
    assert _table(reg) in _in_r(lab, "nft", "list", "tables")
