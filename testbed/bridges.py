"""Host networking of the VM testbed: one Linux bridge per site (pyroute2) carrying the host's
gateway address for that site's guests, and IPv4 forwarding so the host routes between sites.

No libvirt networks (they need dnsmasq). Guests attach with ``<interface type='bridge'>``; libvirt
creates and removes their taps. The WAN between sites is shaped elsewhere (``netem``): on the host
bridges where the host kernel has sch_netem, otherwise inside the guests (IFB on ingress).

Registry kinds: ``bridge`` (ident = bridge name) and ``sysctl`` (ident = the /proc/sys path,
meta ``previous`` = the value to restore on teardown). A bridge carries the testbed's mark as its
``ifalias`` (``Registry.mark``); teardown deletes only a link with the testbed's prefix and that mark,
and restores only the one sysctl it changes (IPv4 forwarding) to a value it could have had.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pyroute2 import IPRoute, NetlinkError

from testbed.registry import Registry, Resource, Scope, register_teardown
from testbed.spec import SiteSpec

log = logging.getLogger(__name__)

IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"


class BridgeError(RuntimeError):
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
