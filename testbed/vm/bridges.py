"""Host networking of the VM testbed: one Linux bridge per site (pyroute2) carrying the host's
gateway address for that site's guests, and IPv4 forwarding so the host routes between sites.

No libvirt networks (they need dnsmasq). Guests attach with ``<interface type='bridge'>``; libvirt
creates and removes their taps. The WAN between sites is shaped elsewhere (``netem``): on the host
bridges where the host kernel has sch_netem, otherwise inside the guests (IFB on ingress).

Forwarding is scoped (issue 13): before it turns IPv4 forwarding on, the testbed installs an
nftables table of its own (``inet smfs_fwd_<id>``, its ``comment`` the testbed's mark) whose forward
chain accepts traffic between the testbed's bridges and, when the testbed is what turned forwarding
on, drops the other IPv4 forwarding it caused (:func:`forward_rules`).

Registry kinds: ``bridge`` (ident = bridge name), ``sysctl`` (ident = the /proc/sys path, meta
``previous`` = the value to restore on teardown) and ``nft`` (ident = ``inet smfs_fwd_<id>``). A
bridge carries the testbed's mark as its ``ifalias`` (``Registry.mark``), the table as its comment;
teardown deletes only a link with the testbed's prefix and that mark, only the table of the
testbed's id that carries the mark, and restores only the one sysctl it changes (IPv4 forwarding) to
a value it could have had. ``sysctl`` is not in ``registry._ORDER``, so it is restored first, before
the table goes: at no moment of a teardown is forwarding on without the filter.

Everything here acts on the network namespace the calling thread is in: the host's in production;
``tests/netns/test_forward_scope.py`` runs the same functions inside a throwaway namespace.
"""

from __future__ import annotations

import logging
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

from pyroute2 import IPRoute, NetlinkError

from testbed.errors import TestbedError
from testbed.registry import Registry, Resource, Scope, register_teardown
from testbed.spec import SiteSpec

log = logging.getLogger(__name__)

IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"


class BridgeError(TestbedError, RuntimeError):
    """A bridge could not be created, or exists and was not created by us."""


def ensure_bridge(site: SiteSpec, owner: str, registry: Registry, mtu: int = 1500) -> None:
    """Create the site's bridge with the gateway address, up; reuse it when we recorded it."""
    name = site.bridge
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=name)
        mine = any(r.ident == name for r in registry.items("bridge"))
        if idx and not mine:
            raise BridgeError(f"bridge {name} exists but was not created by smfs-testbed; "
                              f"remove it (ip link del {name}) or rename site {site.name!r}")
        if idx and _alias(ipr, idx[0]) != registry.mark:
            raise BridgeError(f"bridge {name} is recorded but does not carry this testbed's mark; "
                              f"./inv down, then remove it if it is left (ip link del {name})")
        if not idx:
            registry.add("bridge", name, owner, site=site.name, address=str(site.gateway))
            ipr.link("add", ifname=name, kind="bridge", br_stp_state=0, br_forward_delay=0)
            idx = ipr.link_lookup(ifname=name)
            ipr.link("set", index=idx[0], ifalias=registry.mark)  # what teardown checks before deleting it
        index = idx[0]
        try:
            ipr.addr("add", index=index, address=str(site.gateway.ip), prefixlen=site.gateway.network.prefixlen)
        except NetlinkError as err:
            if err.code != 17:  # EEXIST: already there
                raise
        ipr.link("set", index=index, mtu=mtu, state="up")


def enable_forwarding(owner: str, registry: Registry) -> None:
    """Turn on IPv4 forwarding, recording the previous value so teardown restores it."""
    current = Path(IP_FORWARD).read_text().strip()
    if current == "1":
        return
    if not any(r.ident == IP_FORWARD for r in registry.items("sysctl")):
        registry.add("sysctl", IP_FORWARD, owner, previous=current)
    Path(IP_FORWARD).write_text("1\n")


FWD_FAMILY = "inet"
"""The forward filter's table family: one chain sees IPv4 and IPv6 (the drops are IPv4 only)."""
_IFNAME = re.compile(r"[A-Za-z0-9_.:-]{1,15}")


def forward_table(testbed_id: str) -> str:
    """The name of the testbed's forward-filter table: unique to its id, so a second testbed (another
    cache folder, another id) never shares or removes it."""
    return f"smfs_fwd_{testbed_id}"


def forward_rules(table: str, mark: str, bridges: Sequence[str], drop_others: bool) -> str:
    """The ``nft -f`` text of the forward filter: table ``inet <table>`` commented with ``mark``.

    Accepted: every packet whose input *and* output interface are among ``bridges``. That is the
    routing between sites, and also frames bridged between two ports of *one* of our bridges (guest
    to guest, guest to the router's leg): with ``br_netfilter`` loaded and
    ``bridge-nf-call-iptables=1`` those traverse the inet forward hook with iifname = oifname = the
    bridge's name, and would otherwise hit the drop. Stateless by interface names: replies match the
    same rule, no conntrack needed.

    ``drop_others`` (the testbed itself turned forwarding on): IPv4 from or to one of our bridges and
    any other interface is dropped, and so is IPv4 between two foreign interfaces, so the host
    forwards nothing it did not forward before (with forwarding off it routed nothing). Two things
    pass: non-IPv4 (the testbed never touches IPv6 forwarding, so what it did is not ours to change),
    and packets between two foreign *bridges*: with ``br_netfilter`` a foreign bridge's own bridged
    traffic (another hypervisor's br0) crosses this hook whatever ip_forward says, and nftables
    cannot compare iif with oif to tell bridged from routed, so it passes both; routing between two
    foreign bridges is then possible while the testbed is up (a leak, never an outage).

    Without ``drop_others`` (forwarding was on before, e.g. docker's) only the accept rule is there:
    an accept ends just this chain, so the table changes nothing for anyone else, while a drop in any
    base chain at the hook would be final for everyone.
    """
    for name in bridges:
        if not _IFNAME.fullmatch(name):
            raise ValueError(f"bridge name {name!r} is not an interface name; rename the site")
    if not bridges:
        raise ValueError("no bridges to forward between; the spec needs at least one site")
    if not re.fullmatch(r"[A-Za-z0-9_]+", table) or not re.fullmatch(r"[A-Za-z0-9_:.-]+", mark):
        raise ValueError(f"table {table!r} or mark {mark!r} has characters nft would misread; check the testbed id")
    ours = "{ " + ", ".join(f'"{b}"' for b in sorted(set(bridges))) + " }"
    rules = [f"iifname {ours} oifname {ours} accept"]
    if drop_others:
        rules += [
            "meta nfproto != ipv4 accept",
            f"iifname {ours} drop",
            f"oifname {ours} drop",
            'meta iifkind "bridge" meta oifkind "bridge" accept',
            "drop",
        ]
    body = "".join(f"\t\t{r}\n" for r in rules)
    return (f"table {FWD_FAMILY} {table} {{\n\tcomment \"{mark}\"\n\tchain forward {{\n"
            f"\t\ttype filter hook forward priority filter; policy accept;\n{body}\t}}\n}}\n")


def _nft(*argv: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["nft", *argv], input=input, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise BridgeError("nft not found; install nftables (apt-get install nftables, or run ./inv once)") from None


def _absent(res: subprocess.CompletedProcess[str]) -> bool:
    return res.returncode != 0 and "No such file or directory" in res.stderr


def _table_comment(ident: str) -> str | None:
    """The comment of table ``ident`` ("inet NAME"): "" when it has none, None when there is no such
    table. (nft 1.0.6's JSON output leaves table comments out, so the text listing is read: only the
    table's own ``comment`` line is indented once; chains' and rules' are deeper.)"""
    res = _nft("list", "table", *ident.split(" ", 1))
    if _absent(res):
        return None
    if res.returncode != 0:
        raise BridgeError(f"nft list table {ident}: {res.stderr.strip()[:200]}; check that nftables works (nft list tables)")
    found = re.search(r'^\tcomment "([^"\n]*)"$', res.stdout, re.MULTILINE)
    return found.group(1) if found else ""


def scope_forwarding(bridges: Sequence[str], owner: str, registry: Registry) -> bool:
    """Install the testbed's forward filter (:func:`forward_rules`) between ``bridges``, then turn on
    IPv4 forwarding (:func:`enable_forwarding`); returns whether the filter drops others' forwarding.

    The filter comes first so there is no moment with forwarding on and no filter. It drops when
    forwarding is off now, or was off before this testbed turned it on (a recorded ``previous`` of
    0); when it was on for someone else, it only accepts. The table is recorded before it is made; a
    table of that name that the registry does not hold, or that lacks the mark, is refused.
    """
    table = forward_table(registry.scope.id)
    ident = f"{FWD_FAMILY} {table}"
    current = Path(IP_FORWARD).read_text().strip()
    ours_on = any(r.ident == IP_FORWARD and str(r.meta.get("previous")) == "0" for r in registry.items("sysctl"))
    drop = current != "1" or ours_on
    text = forward_rules(table, registry.mark, bridges, drop)
    comment = _table_comment(ident)
    if comment is not None:
        if not any(r.ident == ident for r in registry.items("nft")):
            raise BridgeError(f"nft table {ident} exists but was not recorded by smfs-testbed; "
                              f"remove it (nft delete table {ident}) if it is a leftover")
        if comment != registry.mark:
            raise BridgeError(f"nft table {ident} is recorded but does not carry this testbed's mark; "
                              f"./inv down, then remove it if it is left (nft delete table {ident})")
        text = f"delete table {ident}\n{text}"  # replaced whole, in the same transaction
    registry.add("nft", ident, owner, bridges=sorted(set(bridges)), drop_others=drop)
    res = _nft("-f", "-", input=text)
    if res.returncode != 0:
        raise BridgeError(f"nft could not load the forward filter {ident}: {res.stderr.strip()[:300]}; "
                          "check that the kernel has nf_tables (nft list tables)")
    enable_forwarding(owner, registry)
    return drop


def bridge_state(name: str) -> dict[str, object] | None:
    """{'name', 'state', 'addresses'} of a bridge, or None if it does not exist."""
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            return None
        link = ipr.get_links(idx[0])[0]
        addrs = [f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(index=idx[0])]
        return {"name": name, "state": link.get_attr("IFLA_OPERSTATE"), "addresses": addrs}


def _alias(ipr: IPRoute, index: int) -> str:
    links = ipr.get_links(index)
    return str(links[0].get_attr("IFLA_IFALIAS") or "") if links else ""


def _bridge_is_ours(res: Resource, scope: Scope) -> str | None:
    """Our prefix in the name and our mark as its ``ifalias`` (a link of the same name made by anyone
    else since, or a bridge of an older testbed without the mark, is left alone)."""
    if not res.ident.startswith(scope.prefix):
        return f"its name lacks the prefix {scope.prefix}"
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=res.ident)
        if not idx:
            return None
        alias = _alias(ipr, idx[0])
    if alias == scope.mark:
        return None
    return f"its alias is {alias!r}, not this testbed's mark {scope.mark!r}" if alias else "it carries no smfs-testbed mark"


def _sysctl_is_ours(res: Resource, scope: Scope) -> str | None:
    """Only IPv4 forwarding, and only back to 0 or 1."""
    if res.ident != IP_FORWARD:
        return f"the testbed only ever changes {IP_FORWARD}"
    if str(res.meta.get("previous")) not in ("0", "1"):
        return f"the value to restore, {str(res.meta.get('previous'))[:20]!r}, is not 0 or 1"
    return None


def _nft_is_ours(res: Resource, scope: Scope) -> str | None:
    """Exactly this testbed's table name (its id), and, while the table exists, the mark as its comment
    (a table of that name made by anyone else since is left alone)."""
    want = f"{FWD_FAMILY} {forward_table(scope.id)}"
    if res.ident != want:
        return f"it is not this testbed's forward filter {want}"
    comment = _table_comment(res.ident)
    if comment is None or comment == scope.mark:
        return None
    return f"its comment is {comment[:60]!r}, not this testbed's mark {scope.mark!r}" if comment else "it carries no smfs-testbed mark"


def _teardown_nft(res: Resource) -> None:
    out = _nft("delete", "table", *res.ident.split(" ", 1))
    if out.returncode != 0 and not _absent(out):  # a missing table is success
        raise BridgeError(f"nft delete table {res.ident}: {out.stderr.strip()[:200]}; remove it by hand")


def _teardown_bridge(res: Resource) -> None:
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=res.ident)
        if not idx:
            return
        try:
            ipr.link("del", index=idx[0])
        except NetlinkError as err:
            if err.code != 19:  # ENODEV: already gone
                raise


def _teardown_sysctl(res: Resource) -> None:
    previous = res.meta.get("previous")
    if previous is not None and Path(res.ident).exists():
        Path(res.ident).write_text(f"{previous}\n")


register_teardown("bridge", _teardown_bridge, check=_bridge_is_ours)
register_teardown("sysctl", _teardown_sysctl, check=_sysctl_is_ours)
register_teardown("nft", _teardown_nft, check=_nft_is_ours)


def link_down(ifname: str) -> bool:
    """Take a host interface (a VM's tap) down; False when it is already gone."""
    with IPRoute() as ip:
        idx = ip.link_lookup(ifname=ifname)
        if not idx:
            return False
        try:
            ip.link("set", index=idx[0], state="down")
        except NetlinkError as err:
            if err.code == 19:  # ENODEV: the tap went away with its QEMU
                return False
            raise
    return True
