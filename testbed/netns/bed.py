"""Sites as network namespaces on this machine: fast tests of the stack and the gateway (like Mininet).

Topology of one run (``ID`` is the run id; every name is unique so runs never collide)::

    smfs-ID-primary                 smfs-ID-wan                    smfs-ID-mirror
    lo    198.18.11.1/32            to-primary 198.18.1.254/24     lo    198.18.12.1/32
    wan0  198.18.1.1/24  ══veth══   to-mirror  198.18.2.254/24 ══veth══ wan0 198.18.2.1/24

Storage servers use the storage addresses on ``lo``; the sites route to each other through the ``wan``
namespace, which forwards and is where WAN loss is applied. Addresses are from 198.18.0.0/15, the
range reserved for benchmarking (RFC 2544). Every namespace and process is recorded in the registry
before it is created; ``teardown()`` (and ``./inv down`` after a crash) removes exactly those. Each
namespace's ``lo`` carries the testbed's mark as its ``ifalias`` (``Registry.mark``): teardown kills the
processes of, and removes, only a namespace whose name has the testbed's prefix and whose ``lo`` has that mark.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, NetNS, netns

from testbed import procs
from testbed.registry import Registry, Resource, Scope, register_teardown

log = logging.getLogger(__name__)

SITES = ("primary", "mirror")


@dataclass(frozen=True)
class SiteAddr:
    wan: str  # address on the site's WAN-facing link
    wan_gw: str  # the wan namespace's address on that link
    storage: str  # storage servers' address
    storage_net: str  # the site's storage subnet


ADDRS = {
    "primary": SiteAddr("198.18.1.1", "198.18.1.254", "198.18.11.1", "198.18.11.0/24"),
    "mirror": SiteAddr("198.18.2.1", "198.18.2.254", "198.18.12.1", "198.18.12.0/24"),
}


def other(site: str) -> str:
    return "mirror" if site == "primary" else "primary"


def host_has_netem() -> bool:
    """Try a netem qdisc on a scratch namespace's loopback; this machine's kernel may lack sch_netem.

    The namespace is anonymous (``unshare --net``) and ends with the ``tc`` in it: a named one (the
    earlier ``smfs-probe-*``, never recorded) was left behind for good when this process was killed in
    the milliseconds it existed."""
    res = subprocess.run(["unshare", "--net", "--", "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
                         capture_output=True, check=False)
    return res.returncode == 0


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) until the block is done, then raise it (KeyboardInterrupt as usual): for
    the few steps that must not be cut in two. Only in the main thread (the only one Python lets set a
    handler); elsewhere the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        if callable(previous):
            previous(signal.SIGINT, None)
        elif previous == signal.SIG_DFL:
            raise KeyboardInterrupt


def create_marked(name: str, mark: str) -> None:
    """Create namespace ``name`` whose ``lo`` is up and carries ``mark`` from the moment the name exists.

    Teardown removes a namespace only when its ``lo`` carries the testbed's mark. Created first and
    marked after (a few to 90 ms later: pyroute2 forks for each), a namespace was for that moment one
    no teardown may remove: ``./inv interrupts`` found it (a Ctrl-C 0.34 s into a namespace drill left
    an unmarked ``smfs-<run>-primary`` that the drill's own teardown and ``./inv down`` both refused).
    So the namespace is made anonymous in a helper process (``unshare --net``), marked there, and only
    then named (bind-mounted to /run/netns/NAME), with a Ctrl-C held until it is. A kill of this
    process before the naming closes the helper's stdin: it exits and takes the anonymous namespace
    with it; after it, the namespace is named and marked, and teardown removes it."""
    helper = subprocess.Popen(
        ["unshare", "--net", "--", "sh", "-c", 'ip link set dev lo up alias "$1" && echo ready && exec cat >/dev/null',
         "sh", mark], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert helper.stdout is not None
        if helper.stdout.readline().strip() != b"ready":
            err = helper.stderr.read().decode(errors="replace").strip() if helper.stderr else ""
            raise RuntimeError(f"namespace {name}: could not mark its lo in a new namespace: {err[:200]}; "
                               "is unshare (util-linux) installed?")
        with _sigint_deferred():
            netns.attach(name, helper.pid)
    finally:
        if helper.stdin is not None:
            helper.stdin.close()  # the helper ends; the namespace stays, held by its name
        try:
            helper.wait(5)
        except subprocess.TimeoutExpired:
            helper.kill()
            helper.wait()


@dataclass
class NamespaceTestbed:
    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    registry: Registry = field(default_factory=Registry)
    loss_method: str = "none"
    dropped_before: int = 0  # packets the nftables loss rules of earlier shapes dropped

    @property
    def owner(self) -> str:
        return f"netns-{self.run_id}"

    def ns(self, site: str) -> str:
        return f"smfs-{self.run_id}-{site}"

    # -- building --------------------------------------------------------------------------
    def build(self) -> None:
        for site in (*SITES, "wan"):
            self.registry.add("netns", self.ns(site), self.owner)
            create_marked(self.ns(site), self.registry.mark)  # the mark: what teardown checks before touching it
        for site in SITES:
            self._link_site(site)
        self.sh("wan", "sysctl", "-qw", "net.ipv4.ip_forward=1")

    def _link_site(self, site: str) -> None:
        a = ADDRS[site]
        tmp_site, tmp_wan = f"s{self.run_id}{site[0]}", f"w{self.run_id}{site[0]}"
        with IPRoute() as ip:
            ip.link("add", ifname=tmp_site, kind="veth", peer={"ifname": tmp_wan, "net_ns_fd": self.ns("wan")})
            ip.link("set", index=ip.link_lookup(ifname=tmp_site)[0], net_ns_fd=self.ns(site))
        with NetNS(self.ns(site)) as ns:
            idx = ns.link_lookup(ifname=tmp_site)[0]
            ns.link("set", index=idx, ifname="wan0")
            ns.addr("add", index=idx, address=a.wan, prefixlen=24)
            ns.link("set", index=idx, state="up")
            # The storage address lives on lo (this host kernel has no dummy links).
            ns.addr("add", index=ns.link_lookup(ifname="lo")[0], address=a.storage, prefixlen=32)
            ns.route("add", dst="0.0.0.0/0", gateway=a.wan_gw)
        with NetNS(self.ns("wan")) as ns:
            idx = ns.link_lookup(ifname=tmp_wan)[0]
            ns.link("set", index=idx, ifname=f"to-{site}")
            ns.addr("add", index=idx, address=a.wan_gw, prefixlen=24)
            ns.link("set", index=idx, state="up")
            ns.route("add", dst=a.storage_net, gateway=a.wan)

    # -- running ---------------------------------------------------------------------------
    def sh(self, site: str, *argv: str, check: bool = True, input: bytes | None = None) -> str:
        """Run a short command in a site's namespace and return its stdout."""
        res = subprocess.run(["ip", "netns", "exec", self.ns(site), *argv], capture_output=True, input=input)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in {site}: {res.stderr.decode().strip()}")
        return res.stdout.decode()

    def spawn(self, site: str, name: str, argv: list[str], log_path: Path,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start a long-running process in a site's namespace, recorded under this run."""
        return procs.spawn(
            ["ip", "netns", "exec", self.ns(site), *argv], owner=self.owner, name=f"{site}:{name}",
            log_path=log_path, registry=self.registry, env=env,
        )

    def site_processes(self, site: str) -> list[Resource]:
        return [r for r in self.registry.items("process", self.owner) if r.meta.get("name", "").startswith(f"{site}:")]

    # -- the WAN ---------------------------------------------------------------------------
    def shape(self, profile: Any) -> str:
        """Shape the WAN with a :class:`netem.profile.LinkProfile` (``a_to_b`` leaves the wan namespace
        towards the mirror, ``b_to_a`` towards the primary); returns the method used.

        netem (the whole profile) when the host kernel has it; otherwise an nftables random drop per
        direction in the wan namespace (this machine's kernel has no sch_netem), which can only do
        independent random loss: any other field of the profile is refused with a one-line ValueError
        before anything changes."""
        towards = {"to-mirror": profile.a_to_b, "to-primary": profile.b_to_a}
        if all(d.is_identity for d in towards.values()) and self.loss_method in ("none", "nftables-random-drop"):
            self._drop_table()
            self.loss_method = "none"
            return self.loss_method
        if host_has_netem():
            from netem.shaper import Shaper

            with NetNS(self.ns("wan")) as ns:
                for ifname, direction in towards.items():
                    Shaper(ns, ifname).apply(direction)
            self.loss_method = "netem"
            return self.loss_method
        for d in towards.values():
            if d != type(d)(loss_pct=d.loss_pct, limit=d.limit):
                raise ValueError(f"wan: {d.describe()} needs netem, which this host kernel lacks (no sch_netem); "
                                 "the namespace WAN can only drop at random: give wan.loss alone, or run ./inv drill (VMs)")
        rules = "table inet smfs_wan {\n chain loss {\n  type filter hook forward priority 0; policy accept;\n"
        for ifname, d in towards.items():
            if d.loss_pct > 0:  # out of 10000: 0.01 % resolution
                rules += f'  oifname "{ifname}" numgen random mod 10000 < {round(d.loss_pct * 100)} counter drop\n'
        rules += " }\n}\n"
        self._drop_table()
        self.sh("wan", "nft", "-f", "-", input=rules.encode())
        listed = self.sh("wan", "nft", "list", "table", "inet", "smfs_wan")
        for ifname, d in towards.items():
            if d.loss_pct > 0 and f"< {round(d.loss_pct * 100)}" not in listed:
                raise RuntimeError(f"nftables loss rule for {ifname} not in place after applying it: {listed!r}")
        self.loss_method = "nftables-random-drop"
        return self.loss_method

    def _drop_table(self) -> None:
        """Remove the nftables loss rules, keeping the count of what they dropped."""
        self.dropped_before += self._table_drops()
        self.sh("wan", "nft", "delete", "table", "inet", "smfs_wan", check=False)

    def set_loss(self, percent: float) -> str:
        """Independent random loss of ``percent`` on every packet crossing the WAN, each direction
        (:meth:`shape` with a loss-only profile); returns the method used."""
        from netem.profile import LinkProfile

        return self.shape(LinkProfile().with_changes(loss=f"{percent:.10g}%"))

    def wan_drops(self) -> int | None:
        """Packets dropped by the nftables loss rules so far, over every shape (None when never used)."""
        if self.loss_method != "nftables-random-drop":
            return self.dropped_before or None
        return self.dropped_before + self._table_drops()

    def _table_drops(self) -> int:
        out = self.sh("wan", "nft", "list", "table", "inet", "smfs_wan", check=False)
        return sum(int(line.split("counter packets")[1].split()[0]) for line in out.splitlines() if "counter packets" in line)

    # -- failures ---------------------------------------------------------------------------
    def cut_link(self, site: str) -> None:
        """Take the site's WAN link down: nothing more leaves, including data in socket buffers."""
        with NetNS(self.ns(site)) as ns:
            ns.link("set", index=ns.link_lookup(ifname="wan0")[0], state="down")

    def kill_site(self, site: str) -> list[str]:
        """SIGKILL every process of the site (power cut); returns their names."""
        killed = []
        for res in self.site_processes(site):
            procs.kill(int(res.ident), res.meta.get("started"))
            self.registry.remove("process", res.ident)
            killed.append(res.meta.get("name", res.ident))
        return killed

    PARTITIONS = {"both": ("to-mirror", "to-primary"), "to-mirror": ("to-mirror",), "to-primary": ("to-primary",)}
    """A partition's direction -> the wan namespace's links whose outgoing packets it drops."""

    def partition(self, direction: str = "both") -> None:
        """Drop every packet crossing the WAN (``both``), or only those towards one site (``to-mirror``,
        ``to-primary``): an nftables table of its own in the wan namespace, beside the loss rules (which
        keep counting); :meth:`heal_partition` removes it. The sites' links stay up (their routes too), so
        TCP sees only silence and retransmits after the heal."""
        if direction not in self.PARTITIONS:
            raise ValueError(f"partition: direction {direction!r}; use one of {', '.join(self.PARTITIONS)}")
        rules = "table inet smfs_partition {\n chain cut {\n  type filter hook forward priority -10; policy accept;\n"
        rules += "".join(f'  oifname "{ifname}" counter drop\n' for ifname in self.PARTITIONS[direction])
        rules += " }\n}\n"
        self.sh("wan", "nft", "delete", "table", "inet", "smfs_partition", check=False)
        self.sh("wan", "nft", "-f", "-", input=rules.encode())

    def heal_partition(self) -> int:
        """Remove the partition; returns the packets it dropped (0 when there was none)."""
        out = self.sh("wan", "nft", "list", "table", "inet", "smfs_partition", check=False)
        dropped = sum(int(line.split("counter packets")[1].split()[0]) for line in out.splitlines()
                      if "counter packets" in line)
        self.sh("wan", "nft", "delete", "table", "inet", "smfs_partition", check=False)
        return dropped

    def freeze(self, site: str, names: tuple[str, ...] | None = None) -> list[tuple[int, int | None, str]]:
        """SIGSTOP the site's processes (each one's process group), or only those called ``site:NAME`` for a
        NAME in ``names``; returns what was stopped as (pid, start time, name) for :meth:`thaw`. Their sockets
        stay open: the kernel keeps receiving into their buffers until those are full."""
        frozen = []
        for res in self.site_processes(site):
            name = res.meta.get("name", "")
            if names is not None and name.split(":", 1)[-1] not in names:
                continue
            pid, started = int(res.ident), res.meta.get("started")
            if procs.alive(pid, started):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGSTOP)
                    frozen.append((pid, started, name))
        return frozen

    def thaw(self, frozen: list[tuple[int, int | None, str]]) -> list[str]:
        """SIGCONT what :meth:`freeze` stopped and still runs (never a later process that reused a pid)."""
        thawed = []
        for pid, started, name in frozen:
            if procs.alive(pid, started):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGCONT)
                    thawed.append(name)
        return thawed

    def power_cut(self, site: str) -> list[str]:
        self.cut_link(site)
        return self.kill_site(site)

    def disaster(self, site: str) -> dict[str, Any]:
        """The site's power cut as one instant: every process of the site is stopped at once
        (SIGSTOP to each process group: nothing more is sent or acked), then its WAN link is cut,
        then they are killed. ``t_instant`` is the host time once all are stopped."""
        frozen = []
        for res in self.site_processes(site):
            if procs.alive(int(res.ident), res.meta.get("started")):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(int(res.ident), signal.SIGSTOP)
                frozen.append(res.meta.get("name", res.ident))
        t_instant = time.time()
        self.cut_link(site)
        killed = self.kill_site(site)
        return {"t_instant": t_instant, "frozen": frozen, "killed": killed}

    def mirror_probe(self, ports: list[int], tunnel_port: int, store: Path) -> dict[str, Any]:
        """Where the mirror's drain stands: bytes waiting in its storage sockets and its tunnel socket
        (the mirror namespace's /proc/net), packets in the WAN's netem queues (0 with the nftables
        drop, which holds nothing), and the size of its log stores."""
        def rx(table: str, want: set[int]) -> int:
            text = self.sh("mirror", "cat", f"/proc/net/{table}")
            total = 0
            for line in text.splitlines()[1:]:
                f = line.split()
                if int(f[1].split(":")[1], 16) in want:
                    total += int(f[4].split(":")[1], 16)
            return total

        backlog = 0
        if self.loss_method == "netem":
            out = self.sh("wan", "tc", "-s", "qdisc", "show", "dev", "to-mirror", check=False)
            backlog = sum(int(n) for n in re.findall(r"backlog \S+ (\d+)p", out))
        size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) if store.exists() else 0
        return {"wan_backlog": backlog, "tcp_rx": rx("tcp", set(ports)), "udp_rx": rx("udp", {tunnel_port}),
                "store_bytes": size}

    def teardown(self) -> None:
        self.registry.teardown(owner=self.owner)


def mark_of(name: str) -> str | None:
    """The ``ifalias`` of namespace ``name``'s ``lo`` ("" when it has none), None when the namespace is gone.
    (``ip -n`` only opens the namespace; pyroute2's NetNS would create a missing one.)"""
    res = subprocess.run(["ip", "-n", name, "-j", "link", "show", "dev", "lo"], capture_output=True, text=True)
    if res.returncode != 0:
        if name not in netns.listnetns():
            return None
        raise RuntimeError(f"ip -n {name} link show lo: {res.stderr.strip()[:200]}")
    links = json.loads(res.stdout or "[]")
    return str(links[0].get("ifalias", "")) if links else ""


def _is_ours(res: Resource, scope: Scope) -> str | None:
    """Our prefix in the name and our mark on its ``lo``: only then are its processes ours to kill."""
    if not res.ident.startswith(scope.prefix):
        return f"its name lacks the prefix {scope.prefix}"
    if res.ident not in netns.listnetns():
        return None
    mark = mark_of(res.ident)
    if mark is None or mark == scope.mark:
        return None
    return f"its lo carries {mark!r}, not this testbed's mark {scope.mark!r}" if mark else "its lo carries no smfs-testbed mark"


def _teardown_netns(res: Resource) -> None:
    name = res.ident
    if name not in netns.listnetns():
        return
    # A namespace that passed the check (our prefix, our mark) is ours, and so is everything inside:
    # stop it before removing the namespace.
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)
    netns.remove(name)
    deadline = time.monotonic() + 5
    while name in netns.listnetns() and time.monotonic() < deadline:
        time.sleep(0.05)


register_teardown("netns", _teardown_netns, check=_is_ours)
