"""Tasks of the VM testbed: image, up, status, exec, balloon, snapshot, restore, clone, down.

``up``, ``snapshot``, ``restore``, ``clone`` and ``down`` hold the testbed's lock (:mod:`testbed.lock`)
from the end of their flag checks to their end: a second one fails at once naming the holder, or with
``--wait`` waits for it."""

from __future__ import annotations

import json
import sys
import time

from invoke.exceptions import Exit
from rich.console import Console

from testbed.cli.common import (
    INTERRUPTED,
    WAIT_HELP,
    flag_clone_name,
    flag_int,
    flag_number,
    flag_snapshot_name,
    for_command,
    remainder_argv,
    task,
    user_error,
)
from testbed.progress import spinner

console = Console(highlight=False)


@task(help={"rebuild": "rebuild the image even if it is up to date",
            "rebuild_rootfs": "also rerun mmdebstrap (the Debian tree)"}, interrupted=INTERRUPTED)
def image(c, rebuild=False, rebuild_rootfs=False):
    """Build the guest image (Debian bookworm + the project's packages), or say it is up to date."""
    from testbed.vm.images import ensure_image

    with spinner("image") as say:
        img = ensure_image(rebuild=rebuild, rebuild_rootfs=rebuild_rootfs, progress=say)
    if img.built:
        print(f"image {img.key} built in {img.seconds:.1f} s: {img.dir}")
    else:
        print(f"image {img.key} up to date: {img.dir}")


@task(help={"spec": "testbed spec (TOML)", "rebuild_image": "rebuild the guest image first",
            "clone": "bring up a saved clone (./inv clone SNAP --as NAME) instead of a fresh testbed",
            "wait": WAIT_HELP}, interrupted=INTERRUPTED)
def up(c, spec="specs/ci.toml", rebuild_image=False, clone="", wait=False):
    """Bring up the testbed: image, bridges, overlays, domains; waits until every guest agent answers, then
    shapes the WAN as the spec says (a clone keeps the WAN it was saved with)."""
    from testbed.spec import load
    from testbed.vm import bed as vmbed
    from testbed.vm import wan

    if clone:  # every flag and the whole spec are checked before anything is created
        flag_clone_name("--clone", clone)
    loaded = None if clone else load(spec)
    with for_command("./inv up", wait), spinner("up") as say:
        t0 = time.monotonic()
        tb = vmbed.up(loaded or spec, say=say, rebuild_image=rebuild_image, clone=clone or None)
        if not clone:
            try:
                profile = tb.spec.wan
                shaped = wan.shape(tb, profile)
                wan.remember(tb, profile)
                say(f"WAN shaped as the spec says: {profile.describe()} at {shaped.enforcement_point} "
                    f"(read back on {', '.join(shaped.read_back)})")
            except wan.WanError as err:
                raise vmbed.VmTestbedError(f"the testbed is up but its WAN is not shaped: {err} "
                                         "(./inv shape to retry, ./inv down to remove it)") from None
    print(f"testbed {tb.name} up in {time.monotonic() - t0:.1f} s ({tb.accel}): "
          + ", ".join(f"{v.name} {v.address.split('/')[0]}" for v in tb.vms.values()))


@task(help={"json": "print JSON instead of a table"}, interrupted=INTERRUPTED)
def status(c, json_=False):
    """VMs of the active testbed (and the WAN router guest, if any): state, accelerator, address, memory, agent."""
    from testbed.vm import bed as vmbed

    try:
        st = vmbed.VmTestbed.active().status()
    except vmbed.VmTestbedError as err:
        if json_:
            print(json.dumps({"testbed": None, "error": str(err)}))
            return
        raise
    if json_:
        print(json.dumps(st, indent=1, default=str))
        return
    from rich.table import Table

    t = Table(title=f"testbed {st['testbed']} ({st['accel']}, image {st['image']})")
    for col in ("vm", "site", "state", "address", "memory MiB", "agent", "boot s"):
        t.add_column(col)
    for v in st["vms"]:
        mem = f"{v.get('memory_mib', '-')}/{v.get('max_memory_mib', '-')}"
        t.add_row(v["vm"], v["site"], v["state"], v["address"], mem, "yes" if v.get("agent") else "no",
                  str(v.get("boot_seconds", "")))
    console.print(t)
    if st.get("router"):
        r = st["router"]
        legs = ", ".join(f"{leg.get('ifname') or '?'} {leg['address']} on {leg['bridge']}" for leg in r["legs"].values())
        console.print(f"WAN router {r['vm']}: {legs}; the sites route each other through it")
    for b in st["bridges"]:
        console.print(f"bridge {b['name']}: {b.get('state')} {' '.join(b.get('addresses', []))}")
    if st["snapshots"]:
        console.print(f"snapshots: {', '.join(st['snapshots'])}")


@task(name="exec", help={"vm": "VM name", "timeout": "seconds before the command is killed"}, interrupted=INTERRUPTED)
def exec_(c, vm, timeout="60"):
    """Run a command in a guest: ./inv exec primary -- uname -r (exit code is the command's). The words after
    -- reach the guest as the shell split them, with no shell in between: ./inv exec primary -- sh -c 'a | b'."""
    from testbed.vm import bed as vmbed

    seconds = flag_number("--timeout", timeout, (0, 86400), "60", low_open=True)
    argv = remainder_argv(c.remainder or "")
    if not argv:
        raise user_error("no command; use: ./inv exec VM -- CMD ARGS...")
    res = vmbed.VmTestbed.active().guest(vm).exec(argv, timeout=seconds)
    sys.stdout.buffer.write(res.stdout)
    sys.stderr.buffer.write(res.stderr)
    sys.stdout.flush()
    if res.rc:
        raise Exit(code=res.rc if 0 < res.rc < 256 else 1)


@task(help={"vm": "VM name", "mib": "target memory, MiB (up to the spec's max_memory)"}, interrupted=INTERRUPTED)
def balloon(c, vm, mib):
    """Set a VM's memory live and wait until the guest sees it; prints dommemstat."""
    from testbed.spec import MEMORY, MIB
    from testbed.vm import bed as vmbed

    target = flag_int("mib", mib, (64, MEMORY[1] // MIB), "512")
    r = vmbed.VmTestbed.active().balloon(vm, target)
    print(f"{vm}: balloon {r['actual_mib']} MiB, guest MemTotal {r['guest_total_mib']} MiB "
          f"(the balloon less the {r['kernel_reserved_mib']} MiB its kernel reserved at boot; {r['seconds']} s)")
    print("dommemstat: " + " ".join(f"{k}={v}" for k, v in r["memstat"].items()))


@task(help={"name": "snapshot name", "wait": WAIT_HELP}, interrupted=INTERRUPTED)
def snapshot(c, name, wait=False):
    """Snapshot every VM of the testbed together (libvirt save files with RAM, plus copies of the disks)."""
    from testbed.vm import bed as vmbed

    flag_snapshot_name("name", name)
    with for_command("./inv snapshot", wait), spinner(f"snapshot {name}") as say:
        secs = vmbed.VmTestbed.active().snapshot(name, say)
    print(f"snapshot {name} taken in {secs:.1f} s")


@task(help={"name": "snapshot name", "wait": WAIT_HELP}, interrupted=INTERRUPTED)
def restore(c, name, wait=False):
    """Revert every VM to a snapshot and resume them together."""
    from testbed.vm import bed as vmbed

    flag_snapshot_name("name", name)
    with for_command("./inv restore", wait), spinner(f"restore {name}") as say:
        secs = vmbed.VmTestbed.active().restore(name, say)
    print(f"restored {name} in {secs:.1f} s")


@task(name="clone", help={"name": "snapshot to clone from", "as_": "name of the clone", "wait": WAIT_HELP},
      interrupted=INTERRUPTED)
def clone_(c, name, as_, wait=False):
    """Copy the testbed at a snapshot to a named clone (bring it up later with ./inv up --clone NEW)."""
    from testbed.vm import bed as vmbed

    flag_snapshot_name("name", name)
    flag_clone_name("--as", as_)  # it becomes the testbed's name at ./inv up --clone
    with for_command("./inv clone", wait), spinner(f"clone {name}") as say:
        t0 = time.monotonic()
        dest = vmbed.VmTestbed.active().clone(name, as_, say)
    print(f"clone {as_} saved in {time.monotonic() - t0:.1f} s: {dest}")


NOUNS = {"process": "processes", "netns": "namespaces", "qmp": "QMP sockets", "nft": "nftables tables",
         "sysctl": "sysctls", "dir": "folders", "devperm": "device permissions"}
"""Plurals of the registry's kinds for ``./inv down``'s summary (a plain ``s`` gives "processs")."""


def _plural(kind: str, n: int) -> str:
    if n == 1:
        return {"netns": "namespace", "qmp": "QMP socket", "nft": "nftables table", "dir": "folder",
                "devperm": "device permission"}.get(kind, kind)
    return NOUNS.get(kind, kind + "s")


@task(help={"wait": WAIT_HELP}, interrupted=INTERRUPTED)
def down(c, wait=False):
    """Remove every recorded resource: domains, snapshots, overlays, bridges, namespaces, processes.

    Each is checked again first (the testbed's prefix and id, its folder): one this testbed did not
    make is never touched; it is said ("refusing to remove ...") and forgotten. An unreadable registry
    is kept aside and named, and nothing is removed (exit 2)."""
    from testbed.registry import TeardownError
    from testbed.vm import bed as vmbed

    refused: list[str] = []  # printed whole after the spinner (one line each, never wrapped)
    try:
        with for_command("./inv down", wait), spinner("down"):
            try:
                removed = vmbed.down(say=refused.append)
            except TeardownError as err:
                raise Exit(f"error: some resources could not be removed (still recorded): {err}", code=1) from None
    finally:
        for line in refused:
            print(line, flush=True)
    if not removed:
        print("nothing to remove")
        return
    kinds: dict[str, int] = {}
    for r in removed:
        kinds[r.kind] = kinds.get(r.kind, 0) + 1
    print("removed " + ", ".join(f"{n} {_plural(k, n)}" for k, n in kinds.items()))


TASKS = [image, up, status, exec_, balloon, snapshot, restore, clone_, down]
