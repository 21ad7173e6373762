"""Tasks of the emulated WAN: shape (live reshape, read back) and calibrate (configured vs measured)."""

from __future__ import annotations

import json as _json

from invoke import task
from invoke.exceptions import Exit

from testbed.cli.common import user_error
from testbed.cli.vm import _progress, _user_errors


@task(help={
    "delay": "one-way delay, e.g. 50ms", "loss": "random loss, e.g. 1%", "jitter": "delay jitter, e.g. 5ms",
    "rate": "rate limit, e.g. 100mbit", "direction": "a_to_b (primary → mirror), b_to_a, or both (default)",
    "clear": "remove the shaping (back to the bare path)",
})
def shape(c, delay="", loss="", jitter="", rate="", direction="both", clear=False):
    """Reshape the running testbed's WAN live (netem on each site's ingress), verified by read-back."""
    from netem.profile import ProfileError
    from testbed import wan
    from testbed.vmbed import VmTestbed

    with _user_errors():
        tb = VmTestbed.active()
        try:
            if clear:
                wan.clear(tb)
                wan.remember(tb, None)
                print("WAN shaping cleared on every site (bare path)")
                return
            changes = {k: v for k, v in {"delay": delay, "loss": loss, "jitter": jitter, "rate": rate}.items() if v}
            if not changes:
                raise user_error("shape: give --delay, --loss, --jitter or --rate (or --clear)")
            if direction not in ("both", "a_to_b", "b_to_a"):
                raise user_error(f"--direction {direction!r}: use a_to_b, b_to_a or both")
            profile = wan.current_profile(tb).with_changes(None if direction == "both" else direction, **changes)
            with _progress("shape") as say:
                shaped = wan.shape(tb, profile)
                say(f"applied and read back on {', '.join(shaped.read_back)} ({shaped.enforcement_point})")
            wan.remember(tb, profile)
            print(f"WAN: {profile.describe()}")
        except ProfileError as err:
            raise user_error(str(err)) from None
        except wan.WanError as err:
            raise Exit(f"error: {err}", code=1 if "mismatch" in str(err) else 2) from None


@task(help={"json": "print the full result as JSON", "probes": "UDP probes (default: enough for ±20 % loss)",
            "bulk": "seconds of bulk TCP throughput (0: skip)"})
def calibrate(c, json=False, probes=0, bulk=0.0):
    """Measure RTT and loss between the sites and print them next to the configured WAN."""
    from netem.calibrate import format_table
    from testbed import wan
    from testbed.vmbed import VmTestbed

    with _user_errors():
        tb = VmTestbed.active()
        profile = wan.current_profile(tb)
        try:
            result = wan.calibrate(tb, profile, probes=int(probes) or None, bulk_seconds=float(bulk))
        except wan.WanError as err:
            raise user_error(str(err)) from None
    if json:
        print(_json.dumps(result, indent=1))
    else:
        print(f"configured: {profile.describe()}  (enforcement: {result['enforcement_point']})")
        print(format_table(result["rows"]))


TASKS = [shape, calibrate]
