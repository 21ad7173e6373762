"""The emulated WAN of a VM testbed: netem on each site VM's ingress (IFB), applied and read back in
the guests with their own pyroute2 through ``python3 -m netem.shaper`` (the same ``netem`` code as on
the host), and calibrated by probing from the primary to the mirror.

Why ingress: this host kernel has no sch_netem, and a packet queued in the *receiver's* ingress
netem is already "in the WAN": it still arrives after the sender's site loses power. The mirror's
ingress carries the a→b (primary → mirror) direction, the primary's ingress b→a.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from netem.profile import Direction, LinkProfile

ENFORCEMENT_POINT = "site-ingress-ifb"
"""Recorded in every result: netem on each site VM's ingress, redirected through ifb-eth0."""
IFNAME = "eth0"
CALIBRATE_PORT = 7788
INGRESS_DIRECTION = {"primary": Direction.B_TO_A, "mirror": Direction.A_TO_B}
"""Which WAN direction a site's ingress carries: packets *arriving* at the site."""


class WanError(RuntimeError):
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


def _site_vms(tb: Any) -> dict[str, str]:
    """VM -> site for the two sites the WAN joins (every VM of a site shapes its own ingress)."""
    out = {vm: info.site for vm, info in tb.vms.items()}
    missing = {"primary", "mirror"} - set(out.values())
    if missing:
        raise WanError(f"sites: the WAN joins sites 'primary' and 'mirror'; the spec lacks {', '.join(sorted(missing))}")
    return out


SHAPER_FIFO = "/run/smfs/shaper.fifo"
"""The resident shaper's FIFO in each guest (:func:`start_resident`)."""


def start_resident(tb: Any) -> None:
    """Start ``python3 -m netem.shaper serve`` in every site VM (niced up, so a loaded guest still answers
    in well under a second): later :func:`shape` calls go through it instead of a fresh interpreter."""
    def one(vm: str, _site: str) -> dict[str, Any]:
        g = tb.guest(vm)
        g.spawn("shaper", ["nice", "-n", "-10", "python3", "-m", "netem.shaper", "serve", "--ingress",
                           "--ifname", IFNAME, "--fifo", SHAPER_FIFO])
        deadline = time.monotonic() + 60
        while g.exec(["test", "-p", SHAPER_FIFO], timeout=10).rc != 0:
            if g.find("shaper") is None or time.monotonic() > deadline:
                raise WanError(f"{vm}: the resident shaper did not start (see /run/smfs/shaper.log)")
            time.sleep(0.2)
        return {}

    _each(tb, one)


def _resident(tb: Any, vm: str, args: list[str]) -> tuple[int, Any] | None:
    """Send the command to the resident shaper; None when there is none in this guest."""
    g = tb.guest(vm)
    opts = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--json", "--direction")}
    rid = f"{int(time.time() * 1000)}-{vm}"
    req = json.dumps({"id": rid, "command": args[0], "json": opts.get("--json", "{}"),
                      "direction": opts.get("--direction", Direction.A_TO_B.value)})
    script = (f'f={SHAPER_FIFO}; [ -p "$f" ] || exit 9; printf "%s\\n" "$SMFS_REQ" > "$f"; i=0; '
              f'while [ ! -e "$f.{rid}.reply" ]; do sleep 0.02; i=$((i+1)); [ $i -gt 1500 ] && exit 8; done; '
              f'cat "$f.{rid}.reply"; rm -f "$f.{rid}.reply"')
    res = g.exec(["/bin/sh", "-c", script], timeout=45, env={"SMFS_REQ": req})
    if res.rc == 9:
        return None
    if res.rc != 0:
        raise WanError(f"{vm}: the resident shaper did not answer (exit {res.rc}); see /run/smfs/shaper.log")
    reply = json.loads(res.out)
    return reply["rc"], reply["out"]


def _shaper(tb: Any, vm: str, args: list[str]) -> dict[str, Any]:
    """``netem.shaper`` in the guest: through the resident shaper when it runs, else a fresh process."""
    answer = _resident(tb, vm, args)
    if answer is None:
        res = tb.guest(vm).exec(["python3", "-m", "netem.shaper", *args, "--ifname", IFNAME], timeout=60)
        err = res.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        answer = (res.rc, json.loads(res.out) if res.rc == 0 else err[0].removeprefix("shaper: "))
    rc, out = answer
    if rc == 1:
        raise WanError(f"{vm}: read-back {out}")
    if rc != 0:
        raise WanError(f"{vm}: netem.shaper {args[0]} failed: {str(out)[:200]}")
    return out


def _each(tb: Any, fn: Callable[[str, str], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    vms = _site_vms(tb)
    with ThreadPoolExecutor(max_workers=len(vms)) as pool:
        futures = {vm: pool.submit(fn, vm, site) for vm, site in vms.items()}
        return {vm: f.result() for vm, f in futures.items()}


def shape(tb: Any, profile: LinkProfile) -> Shaped:
    """Apply ``profile`` on every site VM's ingress (both sites at once), verified by read-back.

    A reshape of a running WAN keeps the packets already queued (netem ``change``)."""
    t0 = time.monotonic()

    def one(vm: str, site: str) -> dict[str, Any]:
        out = _shaper(tb, vm, ["apply", "--ingress", "--json", json.dumps(profile.to_dict()),
                               "--direction", INGRESS_DIRECTION[site].value])
        return {"direction": INGRESS_DIRECTION[site].value, **out["read_back"]}

    return Shaped(profile, _each(tb, one), seconds=time.monotonic() - t0)


def read_back(tb: Any) -> dict[str, dict[str, Any] | None]:
    """The netem parameters each VM's kernel holds (None: not shaped)."""
    return _each(tb, lambda vm, _site: _shaper(tb, vm, ["show", "--ingress"]))  # type: ignore[return-value]


def clear(tb: Any) -> None:
    """Remove the shaping from every VM (idempotent): back to the bare path."""
    _each(tb, lambda vm, _site: _shaper(tb, vm, ["clear", "--ingress"]))


def current_profile(tb: Any) -> LinkProfile:
    """The profile last applied by ``./inv shape`` or a drill (kept in the testbed state), else the spec's."""
    saved = tb.state.get("wan_profile")
    if saved is not None:
        return LinkProfile.from_mapping(saved, "wan")
    return tb.spec.wan


def remember(tb: Any, profile: LinkProfile | None) -> None:
    tb.state["wan_profile"] = None if profile is None else profile.to_dict()
    tb._save()


def _vm_of(tb: Any, site: str) -> str:
    for vm, s in _site_vms(tb).items():
        if s == site:
            return vm
    raise WanError(f"no VM in site {site!r}")


def calibrate(tb: Any, profile: LinkProfile, probes: int | None = None, bulk_seconds: float = 0.0) -> dict[str, Any]:
    """Probe primary → mirror (UDP echo on the mirror); returns measured figures and the comparison rows.

    ``probes`` defaults to enough for a ±20 % loss estimate (bounded to keep TCG runs short)."""
    from netem.calibrate import MAX_PROBES, MIN_PROBES, compare, probes_for_loss

    src, dst = tb.guest(_vm_of(tb, "primary")), tb.guest(_vm_of(tb, "mirror"))
    host = tb.info(_vm_of(tb, "mirror")).address.split("/")[0]
    fwd, rev = profile.a_to_b.mean_loss_pct, profile.b_to_a.mean_loss_pct
    count = probes or min(MAX_PROBES, max(MIN_PROBES, probes_for_loss(max(fwd, rev))))
    interval = 0.01  # s: faster probing queues behind the TCG guests' own scheduling
    dst.spawn("calibrate", ["python3", "-m", "netem.calibrate", "serve", "--port", str(CALIBRATE_PORT),
                            "--seconds", str(int(count * interval + 60 + bulk_seconds))])
    try:
        time.sleep(1.5)  # the server imports and binds (TCG python start)
        res = src.exec(["python3", "-m", "netem.calibrate", "probe", "--host", host, "--port", str(CALIBRATE_PORT),
                        "--count", str(count), "--interval", str(interval), "--timeout", "2"],
                       timeout=count * interval + 60)
        if res.rc != 0:
            raise WanError(f"calibrate probe exited {res.rc}: {res.stderr.decode(errors='replace').strip()[-200:]}")
        measured = json.loads(res.out)
        if bulk_seconds > 0:
            b = src.exec(["python3", "-m", "netem.calibrate", "bulk", "--host", host, "--port", str(CALIBRATE_PORT),
                          "--seconds", str(bulk_seconds)], timeout=bulk_seconds + 60)
            if b.rc == 0:
                measured["bulk_mbps"] = json.loads(b.out)["bulk_mbps"]
    finally:
        dst.stop("calibrate")
    measured = {k: (math.nan if v is None else v) for k, v in measured.items()}
    rows = compare(profile, measured)
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in measured.items()}
    return {"enforcement_point": ENFORCEMENT_POINT, "configured": profile.to_dict(), "measured": clean,
            "rows": [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]}
