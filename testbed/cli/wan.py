"""Tasks of the emulated WAN: shape (live reshape, read back) and calibrate (configured vs measured)."""

from __future__ import annotations

import json as _json

from invoke.exceptions import Exit

from testbed.cli.common import INTERRUPTED, flag_int, flag_number, for_command, task, user_error
from testbed.progress import spinner


def shape_changes(delay: str = "", loss: str = "", jitter: str = "", rate: str = "", burst: str = "") -> dict[str, str]:
    """The profile keys ``./inv shape`` changes (empty flags are left alone); each is validated here (type,
    unit and the profile's bounds) so that a bad value is one line before any testbed is touched."""
    from netem.profile import parse_burst, parse_direction

    changes = {k: v for k, v in {"delay": delay, "loss": loss, "jitter": jitter, "rate": rate}.items() if v}
    for key, value in changes.items():
        parse_direction({key: value}, "shape")  # shape.delay: ... on a bad value
    if burst:
        parse_burst(burst, "shape.burst")
        changes["burst"] = burst
    return changes


@task(help={
    "delay": "one-way delay, e.g. 50ms", "loss": "loss, e.g. 1% (independent unless --burst)",
    "jitter": "delay jitter, e.g. 5ms", "rate": "rate limit, e.g. 100mbit",
    "burst": "mean loss-burst length in packets (Gilbert-Elliott), e.g. 5: with --loss 1%, 1% lost in bursts of ~5",
    "direction": "a_to_b (primary → mirror), b_to_a, or both (default)",
    "clear": "remove the shaping (back to the bare path)",
}, interrupted=INTERRUPTED)
def shape(c, delay="", loss="", jitter="", rate="", burst="", direction="both", clear=False):
    """Reshape the running testbed's WAN live (netem on each site's ingress), verified by read-back."""
    from netem.profile import ProfileError
    from testbed.vm import wan
    from testbed.vm.bed import VmTestbed

    try:  # the flags first: a bad one creates nothing, not even the lock file
        changes = shape_changes(delay, loss, jitter, rate, burst)
    except ProfileError as err:
        raise user_error(str(err)) from None
    if direction not in ("both", "a_to_b", "b_to_a"):
        raise user_error(f"--direction {direction!r}: use a_to_b, b_to_a or both")
    if not changes and not clear:
        raise user_error("shape: give --delay, --loss, --burst, --jitter or --rate (or --clear)")
    with for_command("./inv shape"):
        try:
            tb = VmTestbed.active()
            if clear:
                wan.clear(tb)
                wan.remember(tb, None)
                print(f"WAN shaping cleared on every site (bare path; {wan.enforcement_point(tb)})")
                return
            profile = wan.current_profile(tb).with_changes(None if direction == "both" else direction, **changes)
            with spinner("shape") as say:
                shaped = wan.shape(tb, profile)
                say(f"applied and read back on {', '.join(shaped.read_back)} ({shaped.enforcement_point})")
            wan.remember(tb, profile)
            print(f"WAN: {profile.describe()}")
        except ProfileError as err:
            raise user_error(str(err)) from None
        except wan.WanError as err:
            raise Exit(f"error: {err}", code=1 if "mismatch" in str(err) else 2) from None


@task(help={"json": "print the full result as JSON",
            "probes": "UDP probes (default: enough for ±20 % on each direction's loss at 95 % confidence)",
            "bulk": "seconds of bulk TCP throughput (0: skip)",
            "bare": "measure the bare path's RTT again (clears the WAN for about a second)"}, interrupted=INTERRUPTED)
def calibrate(c, json=False, probes="0", bulk="0", bare=False):
    """Measure RTT and loss between the sites and print them next to the configured WAN (RTT: 2·delay + bare path)."""
    from netem.calibrate import format_table
    from testbed.vm import wan
    from testbed.vm.bed import VmTestbed

    probes = flag_int("--probes", probes, (0, 1_000_000), "2000")
    bulk = flag_number("--bulk", bulk, (0, 600), "5")
    with for_command("./inv calibrate"):
        tb = VmTestbed.active()
        profile = wan.current_profile(tb)
        try:
            result = wan.calibrate(tb, profile, probes=int(probes) or None, bulk_seconds=float(bulk),
                                   remeasure_bare=bare)
            chosen = wan.enforcement(tb)
        except wan.WanError as err:
            raise user_error(str(err)) from None
    if json:
        print(_json.dumps(result, indent=1))
        return
    print(f"configured: {profile.describe()}")
    print(f"enforcement: {chosen['point']} ({chosen['reason']})")
    b = result.get("bare") or {}
    if b.get("rtt_median_ms") is not None:
        print(f"bare path: RTT median {b['rtt_median_ms']:.3f} ms (p10 {b.get('rtt_p10_ms') or 0:.3f}, "
              f"p90 {b.get('rtt_p90_ms') or 0:.3f}) measured {b.get('measured_at', '?')}; "
              f"expected RTT {result['expected_rtt_ms']:.3f} ms")
    m = result["measured"]
    print(f"probes: {m.get('sent')} every {1000 * (m.get('interval_s') or 0):.1f} ms in {m.get('elapsed_s')} s")
    print(format_table(result["rows"]))


TASKS = [shape, calibrate]
