"""The emulated WAN of a VM testbed: netem on each site's **ingress**, applied and read back with the
same ``netem`` code (pyroute2) wherever it runs, and calibrated by probing from the primary to the mirror.

Why ingress: a packet queued in the *receiver's* netem is already "in the WAN": it still arrives after
the sender's site loses power. The mirror's ingress carries the a→b (primary → mirror) direction, the
primary's ingress b→a. Three enforcement points, chosen once per testbed and recorded in every result
(:func:`enforcement`):

- ``host-tap-egress``: netem at the root of each site VM's tap on the host (the tap's egress is the
  VM's ingress), through pyroute2 in the host namespace. Needs sch_netem in the host kernel.
- ``site-ingress-ifb``: inside each guest, an IFB redirect of eth0's ingress with netem on the ifb,
  through a resident ``python3 -m netem.shaper serve`` driven over the guest agent.
- ``router-egress``: a router guest with one NIC on each site bridge (``testbed.vm.bed`` boots it and
  routes the sites through it); netem at the root of each of its NICs, through one resident shaper
  per NIC: the NIC towards the mirror carries a→b, the one towards the primary b→a. The router is
  its own failure domain, so its queues are "in the WAN" too.

``[wan] enforcement = "auto" | "host" | "guest" | "router"`` (or ``SMFS_WAN_ENFORCEMENT``) picks one;
auto takes the host when its kernel has sch_netem, and never the router (a third TCG guest starves
the others). The host and guest points shape everything entering a site VM, site-local traffic
included; the router shapes only what crosses between the sites.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from netem.profile import Direction, LinkProfile
from testbed.errors import TestbedError

if TYPE_CHECKING:  # pyroute2 loads only where the host shapes; a testbed is anything with the Bed protocol
    from pyroute2 import IPRoute

    from testbed.spec import RouterSpec, Spec
    from testbed.vm.guest import Guest
    from testbed.vm.state import Bed

HOST_POINT = "host-tap-egress"
"""netem on the host, at the root of each site VM's tap (packets towards the VM)."""
GUEST_POINT = "site-ingress-ifb"
"""netem in each site VM, on eth0's ingress redirected through ifb-eth0."""
ROUTER_POINT = "router-egress"
"""netem in the router guest, at the root of its NIC towards each site (packets towards that site)."""
ENFORCEMENT_POINT = GUEST_POINT
"""Deprecated: the point is chosen per testbed; results should record :func:`enforcement_point`."""
ENFORCEMENT_ENV = "SMFS_WAN_ENFORCEMENT"
"""Overrides ``[wan] enforcement`` (auto, host, guest or router)."""
IFNAME = "eth0"
CALIBRATE_PORT = 7788
RATE_PORT = 7789
"""The rate counter's port on the mirror (beside the echo server's)."""
BARE_PROBES = 100
"""Probes of the bare-path RTT measurement (a median, no loss to estimate)."""
INGRESS_DIRECTION = {"primary": Direction.B_TO_A, "mirror": Direction.A_TO_B}
"""Which WAN direction a site's ingress carries: packets *arriving* at the site."""


class WanError(TestbedError, RuntimeError):
    """The WAN could not be shaped, read back or measured; the message is one line."""


@dataclass(frozen=True)
class Shaped:
    """What the kernels report after :func:`shape`: the read-back per VM, and where netem runs."""

    profile: LinkProfile
    read_back: dict[str, dict[str, Any]]
    enforcement_point: str = ENFORCEMENT_POINT
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"enforcement_point": self.enforcement_point, "profile": self.profile.to_dict(),
                "describe": self.profile.describe(), "read_back": self.read_back, "seconds": round(self.seconds, 2)}


def _site_vms(tb: Bed) -> dict[str, str]:
    """VM -> site for the two sites the WAN joins (every VM of a site shapes its own ingress); the
    router guest is in neither."""
    from testbed.spec import ROUTER_SITE

    out = {vm: info.site for vm, info in tb.vms.items() if info.site != ROUTER_SITE}
    missing = {"primary", "mirror"} - set(out.values())
    if missing:
        raise WanError(f"sites: the WAN joins sites 'primary' and 'mirror'; the spec lacks {', '.join(sorted(missing))}")
    return out


def _each(tb: Bed, fn: Callable[[str, str], dict[str, Any]], only: str | None = None) -> dict[str, dict[str, Any]]:
    """``fn(vm, site)`` for every site VM at once (or only for VM ``only``), keyed by VM."""
    vms = {vm: site for vm, site in _site_vms(tb).items() if only in (None, vm)}
    if not vms:
        return {}
    with ThreadPoolExecutor(max_workers=len(vms)) as pool:
        futures = {vm: pool.submit(fn, vm, site) for vm, site in vms.items()}
        return {vm: f.result() for vm, f in futures.items()}


# --------------------------------------------------------------------------- enforcement point


def choose_enforcement(requested: str, has_netem: Callable[[], tuple[bool, str]],
                       where: str = "wan.enforcement") -> tuple[str, str]:  # fmt: skip
    """(point, reason) for ``requested`` (auto, host, guest or router, validated by the caller);
    ``has_netem()`` says whether the host kernel has sch_netem and how that was found."""
    if requested == "guest":
        return GUEST_POINT, f'{where} = "guest"'
    if requested == "router":
        return ROUTER_POINT, f'{where} = "router"'
    netem, how = has_netem()
    if requested == "host":
        if not netem:
            raise WanError(f'{where}: "host" needs sch_netem in the host kernel, and {platform.release()} has none '
                           f'({how}); use "auto" or "guest", or load it (modprobe sch_netem)')
        return HOST_POINT, f'{where} = "host" ({how})'
    if netem:
        return HOST_POINT, f"auto: the host kernel has sch_netem ({how})"
    return GUEST_POINT, f"auto: the host kernel has no sch_netem ({how})"


def host_netem() -> tuple[bool, str]:
    """Does the host kernel take a netem qdisc? Tried on a scratch namespace's loopback (once per testbed)."""
    from pyroute2 import NetlinkError

    from testbed.netns.bed import host_has_netem

    try:
        ok = host_has_netem()
    except (NetlinkError, OSError) as err:
        return False, f"probe failed: {' '.join(str(err).split())}"
    return ok, "netem accepted on a scratch namespace" if ok else "netem refused on a scratch namespace"


def requested_enforcement(tb: Bed) -> tuple[str, str]:
    """(choice, where it came from): ``SMFS_WAN_ENFORCEMENT`` when set, else the spec's ``wan.enforcement``."""
    from testbed.spec import SpecError, check_wan_enforcement

    env = os.environ.get(ENFORCEMENT_ENV, "").strip()
    where, value = (ENFORCEMENT_ENV, env) if env else ("wan.enforcement", getattr(tb.spec, "wan_enforcement", "auto"))
    try:
        return check_wan_enforcement(value, where), where
    except SpecError as err:
        raise WanError(str(err)) from None


def enforcement(tb: Bed, probe: Callable[[], tuple[bool, str]] | None = None) -> dict[str, str]:
    """The testbed's enforcement point ``{"point", "requested", "reason"}``: chosen on first use and kept
    in ``tb.state.wan_enforcement``; chosen again (the old point cleared) when the request changes.
    ``probe`` answers "has the host kernel sch_netem?" (default :func:`host_netem`)."""
    requested, where = requested_enforcement(tb)
    saved = tb.state.wan_enforcement
    if saved and saved.get("requested") == requested:
        return saved
    point, reason = choose_enforcement(requested, probe or host_netem, where)
    if point == ROUTER_POINT:
        router_legs(tb, where)
    if saved and saved.get("point") != point:
        _enforcer(saved["point"]).clear(tb)  # never shape at two points at once
    chosen = {"point": point, "requested": requested, "reason": reason}
    tb.update(wan_enforcement=chosen)
    return chosen


def enforcement_point(tb: Bed) -> str:
    """Where this testbed's netem runs (:data:`HOST_POINT`, :data:`GUEST_POINT` or :data:`ROUTER_POINT`);
    record it in results."""
    return enforcement(tb)["point"]


# --------------------------------------------------------------------------- in the guests (IFB)

SHAPER_FIFO = "/run/smfs/shaper.fifo"
"""The resident shaper's FIFO in each guest (:func:`start_resident`)."""


def _resident(tb: Bed, vm: str, args: list[str], fifo: str = SHAPER_FIFO) -> tuple[int, Any] | None:
    """Send the command to the resident shaper reading ``fifo``; None when there is none in this guest."""
    g = tb.guest(vm)
    opts = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--json", "--direction")}
    rid = f"{int(time.time() * 1000)}-{vm}-{fifo.rsplit('/', 1)[-1].split('.')[0]}"
    req = json.dumps({"id": rid, "command": args[0], "json": opts.get("--json", "{}"),
                      "direction": opts.get("--direction", Direction.A_TO_B.value)})
    script = (f'f={fifo}; [ -p "$f" ] || exit 9; printf "%s\\n" "$SMFS_REQ" > "$f"; i=0; '
              f'while [ ! -e "$f.{rid}.reply" ]; do sleep 0.02; i=$((i+1)); [ $i -gt 1500 ] && exit 8; done; '
              f'cat "$f.{rid}.reply"; rm -f "$f.{rid}.reply"')
    res = g.exec(["/bin/sh", "-c", script], timeout=45, env={"SMFS_REQ": req})
    if res.rc == 9:
        return None
    if res.rc != 0:
        raise WanError(f"{vm}: the resident shaper did not answer (exit {res.rc}); see /run/smfs/shaper.log")
    reply = json.loads(res.out)
    return reply["rc"], reply["out"]


def _shaper(tb: Bed, vm: str, args: list[str], ifname: str = IFNAME, fifo: str = SHAPER_FIFO) -> dict[str, Any]:
    """``netem.shaper`` in the guest: through the resident shaper when it runs, else a fresh process."""
    answer = _resident(tb, vm, args, fifo)
    if answer is None:
        res = tb.guest(vm).exec(["python3", "-m", "netem.shaper", *args, "--ifname", ifname], timeout=60)
        err = res.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        answer = (res.rc, json.loads(res.out) if res.rc == 0 else err[0].removeprefix("shaper: "))
    rc, out = answer
    if rc == 1:
        raise WanError(f"{vm}: read-back {out}")
    if rc != 0:
        raise WanError(f"{vm}: netem.shaper {args[0]} failed: {str(out)[:200]}")
    return out


def _start_resident_shaper(tb: Bed, vm: str, name: str, ifname: str, fifo: str, ingress: bool) -> None:
    """Spawn ``python3 -m netem.shaper serve`` as ``name`` in ``vm`` (niced up, so a loaded guest still
    answers in well under a second) and wait until its FIFO exists."""
    g = tb.guest(vm)
    g.spawn(name, ["nice", "-n", "-10", "python3", "-m", "netem.shaper", "serve", *(["--ingress"] if ingress else []),
                   "--ifname", ifname, "--fifo", fifo])
    deadline = time.monotonic() + 60
    while g.exec(["test", "-p", fifo], timeout=10).rc != 0:
        if g.find(name) is None or time.monotonic() > deadline:
            raise WanError(f"{vm}: the resident shaper did not start (see /run/smfs/{name}.log)")
        time.sleep(0.2)


class GuestIngress:
    """netem in each site VM on eth0's ingress (IFB), through the guest's resident shaper."""

    point = GUEST_POINT

    def start(self, tb: Bed) -> None:
        """Start ``python3 -m netem.shaper serve`` in every site VM: later calls go through it instead
        of a fresh interpreter."""

        def one(vm: str, _site: str) -> dict[str, Any]:
            _start_resident_shaper(tb, vm, "shaper", IFNAME, SHAPER_FIFO, ingress=True)
            return {}

        _each(tb, one)

    def apply(self, tb: Bed, profile: LinkProfile, only: str | None = None) -> dict[str, dict[str, Any]]:
        def one(vm: str, site: str) -> dict[str, Any]:
            out = _shaper(tb, vm, ["apply", "--ingress", "--json", json.dumps(profile.to_dict()),
                                   "--direction", INGRESS_DIRECTION[site].value])
            return {"direction": INGRESS_DIRECTION[site].value, **out["read_back"]}

        return _each(tb, one, only)

    def read_back(self, tb: Bed) -> dict[str, dict[str, Any]]:
        return _each(tb, lambda vm, _site: _shaper(tb, vm, ["show", "--ingress"]))

    def clear(self, tb: Bed) -> None:
        _each(tb, lambda vm, _site: _shaper(tb, vm, ["clear", "--ingress"]))


# --------------------------------------------------------------------------- on the host (taps)


def host_ipr() -> IPRoute:
    """A pyroute2 handle on the host's network namespace (a context manager)."""
    from pyroute2 import IPRoute

    return IPRoute()


def tap_of(tb: Bed, vm: str) -> str | None:
    """The host tap of ``vm``'s site NIC, from the running domain's XML (libvirt names it, e.g. vnet3,
    anew at every start); None when the VM is not running."""
    mac = tb.info(vm).mac.lower()
    root = ET.fromstring(tb.domain(vm).XMLDesc(0))
    for iface in root.iter("interface"):
        found = iface.find("mac")
        target = iface.find("target")
        if found is not None and found.get("address", "").lower() == mac and target is not None:
            return target.get("dev")
    return None


class HostTaps:
    """netem on the host at the root of each site VM's tap: the tap's egress is the VM's ingress."""

    point = HOST_POINT

    def start(self, tb: Bed) -> None:
        """Nothing runs in the guests: the host applies netem itself in milliseconds."""

    def _taps(self, tb: Bed, running: bool = True) -> dict[str, tuple[str, str]]:
        """VM -> (site, tap); a VM that is not running raises when ``running`` is asked, else is left out."""
        out = {}
        for vm, site in _site_vms(tb).items():
            tap = tap_of(tb, vm)
            if tap is None and running:
                raise WanError(f"{vm}: no tap on the host (is the VM running?); start it, then shape again")
            if tap is not None:
                out[vm] = (site, tap)
        return out

    def apply(self, tb: Bed, profile: LinkProfile, only: str | None = None) -> dict[str, dict[str, Any]]:
        from netem.shaper import ShapeMismatch, Shaper, ShaperError

        taps = {vm: t for vm, t in self._taps(tb, running=only is None).items() if only in (None, vm)}
        out: dict[str, dict[str, Any]] = {}
        with host_ipr() as ipr:
            for vm, (site, tap) in taps.items():
                direction = INGRESS_DIRECTION[site]
                try:
                    got = Shaper(ipr, tap).apply(profile.direction(direction))
                except ShapeMismatch as err:
                    raise WanError(f"{vm}: read-back mismatch: {err}") from None
                except ShaperError as err:
                    raise WanError(f"{vm}: {err}") from None
                out[vm] = {"direction": direction.value, "ifname": tap, **got}
        return out

    def read_back(self, tb: Bed) -> dict[str, dict[str, Any]]:
        from netem.shaper import Shaper

        with host_ipr() as ipr:
            return {vm: {"ifname": tap, "ingress": False, "read_back": Shaper(ipr, tap).read_back()}
                    for vm, (_site, tap) in self._taps(tb, running=False).items()}  # fmt: skip

    def clear(self, tb: Bed) -> None:
        from netem.shaper import Shaper, ShaperError

        with host_ipr() as ipr:
            for vm, (_site, tap) in self._taps(tb, running=False).items():
                try:
                    Shaper(ipr, tap).clear()
                except ShaperError as err:
                    raise WanError(f"{vm}: {err}") from None


# --------------------------------------------------------------------------- in the router guest


def router_legs(tb: Bed, where: str = "wan.enforcement") -> tuple[str, dict[str, str]]:
    """(router VM, {site: its NIC towards that site}) as ``testbed.vm.bed`` configured them; a one-line
    error when this testbed has no router guest (``up`` boots one only when asked to)."""
    router = tb.state.router
    if not router or not router.legs:
        raise WanError(f'{where}: "router" needs the router guest, and testbed {getattr(tb, "name", "?")} has none; '
                       './inv down, then ./inv up with [wan] enforcement = "router" (or SMFS_WAN_ENFORCEMENT=router)')
    return router.vm, {site: leg.ifname for site, leg in router.legs.items()}


def router_directions(legs: dict[str, str]) -> dict[str, Direction]:
    """NIC -> the WAN direction its egress carries: the NIC towards a site carries what arrives there
    (towards the mirror a→b, towards the primary b→a)."""
    return {ifname: INGRESS_DIRECTION[site] for site, ifname in legs.items()}


def router_fifo(ifname: str) -> str:
    """The resident shaper's FIFO for one of the router's NICs."""
    return f"/run/smfs/shaper-{ifname}.fifo"


class RouterEgress:
    """netem in the router guest at the root of each NIC (its egress towards a site), through one
    resident shaper per NIC."""

    point = ROUTER_POINT

    def _legs(self, tb: Bed, fn: Callable[[str, str, Direction], dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """``fn(router, ifname, direction)`` for each NIC at once; keyed ``router/ifname``."""
        vm, legs = router_legs(tb)
        directions = router_directions(legs)
        with ThreadPoolExecutor(max_workers=len(legs)) as pool:
            futures = {f"{vm}/{ifname}": pool.submit(fn, vm, ifname, directions[ifname]) for ifname in legs.values()}
            return {key: f.result() for key, f in futures.items()}

    def start(self, tb: Bed) -> None:
        def one(vm: str, ifname: str, _d: Direction) -> dict[str, Any]:
            _start_resident_shaper(tb, vm, f"shaper-{ifname}", ifname, router_fifo(ifname), ingress=False)
            return {}

        self._legs(tb, one)

    def apply(self, tb: Bed, profile: LinkProfile, only: str | None = None) -> dict[str, dict[str, Any]]:
        router, legs = router_legs(tb)
        if only not in (None, router):
            return {}  # a site VM holds none of the router's shaping
        towards = {ifname: site for site, ifname in legs.items()}

        def one(vm: str, ifname: str, direction: Direction) -> dict[str, Any]:
            out = _shaper(tb, vm, ["apply", "--json", json.dumps(profile.to_dict()), "--direction", direction.value],
                          ifname, router_fifo(ifname))
            return {"direction": direction.value, "ifname": ifname, "towards": towards[ifname], **out["read_back"]}

        return self._legs(tb, one)

    def read_back(self, tb: Bed) -> dict[str, dict[str, Any]]:
        return self._legs(tb, lambda vm, ifname, _d: _shaper(tb, vm, ["show"], ifname, router_fifo(ifname)))

    def clear(self, tb: Bed) -> None:
        self._legs(tb, lambda vm, ifname, _d: _shaper(tb, vm, ["clear"], ifname, router_fifo(ifname)))


def _enforcer(point: str) -> GuestIngress | HostTaps | RouterEgress:
    if point == ROUTER_POINT:
        return RouterEgress()
    return HostTaps() if point == HOST_POINT else GuestIngress()


def router_for(spec: Spec) -> RouterSpec | None:
    """The router guest ``up`` boots for ``spec`` (a ``testbed.spec.RouterSpec``), or None: the spec's
    ``wan.enforcement = "router"``, or ``SMFS_WAN_ENFORCEMENT=router`` (validated against the sites)."""
    from testbed.spec import router_spec

    if os.environ.get(ENFORCEMENT_ENV, "").strip() == "router" and spec.router is None:
        return router_spec(spec.sites, ENFORCEMENT_ENV)
    return spec.router


# --------------------------------------------------------------------------- shaping


def start_resident(tb: Bed) -> None:
    """Choose the enforcement point and get it ready (in the guests: start the resident shapers)."""
    _enforcer(enforcement_point(tb)).start(tb)


def shape(tb: Bed, profile: LinkProfile, only: str | None = None) -> Shaped:
    """Apply ``profile`` at the enforcement point (both directions at once), verified by read-back;
    ``only``: just VM ``only``'s part of it (nothing when that VM holds none).

    A reshape of a running WAN keeps the packets already queued (netem ``change``)."""
    t0 = time.monotonic()
    point = enforcement_point(tb)
    read = _enforcer(point).apply(tb, profile, only)
    return Shaped(profile, read, enforcement_point=point, seconds=time.monotonic() - t0)


def after_boot(tb: Bed, vm: str) -> Shaped | None:
    """Put back the WAN's current shape on ``vm`` after it booted again: its qdiscs died with its
    kernel (site ingress, router egress) or its host tap is a new one. Only ``vm`` is touched, so this
    works while the other site is down. None when the WAN was never shaped on this testbed."""
    if tb.state.wan_profile is None:
        return None
    shaped = shape(tb, current_profile(tb), only=vm)
    return shaped if shaped.read_back else None


def read_back(tb: Bed) -> dict[str, dict[str, Any] | None]:
    """The netem parameters each VM's ingress (or router NIC, ``router/ethN``) holds:
    ``{key: {"ifname", "read_back"}}`` (read_back None: not shaped)."""
    return _enforcer(enforcement_point(tb)).read_back(tb)  # type: ignore[return-value]


def clear(tb: Bed) -> None:
    """Remove the shaping at the enforcement point (idempotent): back to the bare path."""
    _enforcer(enforcement_point(tb)).clear(tb)


def current_profile(tb: Bed) -> LinkProfile:
    """The profile last applied by ``./inv shape`` or a drill (kept in the testbed state), else the spec's."""
    saved = tb.state.wan_profile
    if saved is not None:
        return LinkProfile.from_mapping(saved, "wan")
    return tb.spec.wan


def remember(tb: Bed, profile: LinkProfile | None) -> None:
    """Keep ``profile`` as the WAN's current shape; None: cleared (the bare path, not the spec's profile)."""
    tb.update(wan_profile=(profile or LinkProfile()).to_dict())


# --------------------------------------------------------------------------- calibration


def _vm_of(tb: Bed, site: str) -> str:
    for vm, s in _site_vms(tb).items():
        if s == site:
            return vm
    raise WanError(f"no VM in site {site!r}")


def _is_bare(profile: LinkProfile) -> bool:
    return profile.a_to_b.is_identity and profile.b_to_a.is_identity


def bare_rtt(tb: Bed) -> dict[str, Any] | None:
    """The bare path's RTT (ms: median, p10, p90) as last measured, or None."""
    return tb.state.wan_bare


def _remember_bare(tb: Bed, measured: dict[str, Any], point: str) -> dict[str, Any]:
    bare = {k: measured.get(k) for k in ("rtt_median_ms", "rtt_p10_ms", "rtt_p90_ms", "replies")}
    bare |= {"enforcement_point": point, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tb.update(wan_bare=bare)
    return bare


def calibrate(tb: Bed, profile: LinkProfile, probes: int | None = None, bulk_seconds: float = 0.0,
              remeasure_bare: bool = False, rate_seconds: float = 0.0) -> dict[str, Any]:  # fmt: skip
    """Probe primary → mirror (UDP echo on the mirror); returns measured figures and the comparison rows.

    ``profile`` must be the one applied. ``probes`` defaults to enough for ±20 % on each direction's loss
    at 95 % confidence, sent in about :data:`netem.calibrate.PROBE_SECONDS` (4 s). The measured RTT is
    compared with 2·delay + the bare path's RTT: taken from this run when ``profile`` is bare, else from
    ``tb.state.wan_bare``, measured first (WAN cleared for ~1 s, then ``profile`` applied again) when
    unknown or ``remeasure_bare``.

    ``rate_seconds`` > 0 and an a→b rate: also a paced UDP stream primary → mirror for that long at
    :data:`netem.calibrate.RATE_OVERDRIVE` × the rate (rows ``rate sent a→b``, ``rate a→b``): whether
    the sending guest and the path carry the rate at all, which TCP's bulk figure cannot tell."""
    from netem.calibrate import probe_interval, probes_for_profile

    point = enforcement_point(tb)
    src, dst = tb.guest(_vm_of(tb, "primary")), tb.guest(_vm_of(tb, "mirror"))
    host = tb.info(_vm_of(tb, "mirror")).address.split("/")[0]
    count = probes or probes_for_profile(profile)
    interval = probe_interval(count)
    one_way_s = max(profile.a_to_b.delay_us + profile.a_to_b.jitter_us, profile.b_to_a.delay_us
                    + profile.b_to_a.jitter_us) / 1e6  # fmt: skip
    tail = round(1.0 + 2 * one_way_s, 2)  # s to wait for the last replies

    def run_probe(n: int, every: float) -> dict[str, Any]:
        res = src.exec(["python3", "-m", "netem.calibrate", "probe", "--host", host, "--port", str(CALIBRATE_PORT),
                        "--count", str(n), "--interval", str(every), "--timeout", str(tail)],
                       timeout=n * every + tail + 60)  # fmt: skip
        if res.rc != 0:
            raise WanError(f"calibrate probe exited {res.rc}: {res.stderr.decode(errors='replace').strip()[-200:]}")
        return {k: (math.nan if v is None else v) for k, v in json.loads(res.out).items()}

    bare = None if remeasure_bare else bare_rtt(tb)
    measure_bare = not _is_bare(profile) and bare is None
    budget = count * interval + bulk_seconds + (BARE_PROBES * 0.01 + tail + 30 if measure_bare else 0)
    check_rate = rate_seconds > 0 and bool(profile.a_to_b.rate_bps)
    budget += (rate_seconds + 30) if check_rate else 0
    dst.spawn("calibrate", ["python3", "-m", "netem.calibrate", "serve", "--port", str(CALIBRATE_PORT),
                            "--seconds", str(int(budget + tail + 60))])
    if check_rate:  # started now: its Python start-up under TCG overlaps the server's and the probes
        dst.spawn("calibrate-rate", ["python3", "-m", "netem.calibrate", "rate-count", "--port", str(RATE_PORT),
                                     "--seconds", str(int(budget + tail + 60))])
    try:
        time.sleep(1.5)  # the server imports and binds (TCG python start)
        if measure_bare:
            clear(tb)
            try:
                bare = _remember_bare(tb, run_probe(BARE_PROBES, 0.01), point)
            finally:
                shape(tb, profile)
        measured = run_probe(count, interval)
        if _is_bare(profile):
            bare = _remember_bare(tb, measured, point)
        if bulk_seconds > 0:
            b = src.exec(["python3", "-m", "netem.calibrate", "bulk", "--host", host, "--port", str(CALIBRATE_PORT),
                          "--seconds", str(bulk_seconds)], timeout=bulk_seconds + 60)
            if b.rc == 0:
                measured["bulk_mbps"] = json.loads(b.out)["bulk_mbps"]
        if check_rate:
            measured |= _measure_rate(tb, src, host, profile, rate_seconds)
    finally:
        dst.stop("calibrate")
        if check_rate:
            dst.stop("calibrate-rate")
    return calibration_result(profile, measured, bare, point)


def _measure_rate(tb: Bed, src: Guest, host: str, profile: LinkProfile, seconds: float) -> dict[str, Any]:
    """Run ``rate-send`` in the primary against the mirror's ``rate-count``: the flat ``rate_*`` fields of
    :func:`netem.calibrate.rate_measured` (``rate_error`` when it failed: the point is then unfaithful)."""
    from netem.calibrate import RATE_OVERDRIVE, UDP_IP_HEADERS, rate_measured

    size = int(getattr(tb.spec, "mtu", 1500)) - UDP_IP_HEADERS  # one IP packet of the sites' MTU (9000: jumbo)
    offered = int(profile.a_to_b.rate_bps * RATE_OVERDRIVE)
    res = src.exec(["python3", "-m", "netem.calibrate", "rate-send", "--host", host, "--port", str(RATE_PORT),
                    "--rate", f"{offered}bit", "--seconds", str(seconds), "--size", str(size)],
                   timeout=seconds + 60)  # fmt: skip
    if res.rc != 0:
        err = res.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exited {res.rc}"]
        return rate_measured(None, f"rate-send: {err[0][-200:]}")
    try:
        return rate_measured(json.loads(res.out))
    except ValueError:
        return rate_measured(None, f"rate-send: not JSON: {res.out.strip()[:100]!r}")


def calibration_result(profile: LinkProfile, measured: dict[str, Any], bare: dict[str, Any] | None,
                       point: str) -> dict[str, Any]:  # fmt: skip
    """The calibration record: configured, measured, the bare path, the rows (NaN as None for JSON)."""
    from netem.calibrate import compare

    base = spread = None
    if bare and bare.get("rtt_median_ms") is not None:
        base = float(bare["rtt_median_ms"])
        if bare.get("rtt_p90_ms") is not None and bare.get("rtt_p10_ms") is not None:
            spread = float(bare["rtt_p90_ms"]) - float(bare["rtt_p10_ms"])
    rows = compare(profile, measured, base_rtt_ms=base, base_spread_ms=spread or 0.0)

    def clean(d: dict[str, Any]) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}

    return {"enforcement_point": point, "configured": profile.to_dict(), "measured": clean(measured),
            "bare": bare, "expected_rtt_ms": next(r["configured"] for r in rows if r["metric"] == "rtt median"),
            "rows": [clean(r) for r in rows]}
