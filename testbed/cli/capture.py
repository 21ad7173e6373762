"""Task capture: a pcap of the WAN traffic (tunnel and repair packets) taken in a site's guest, summarised."""

from __future__ import annotations

import hashlib
import json as _json
import re
import shlex
import time
from pathlib import Path
from typing import Any

from invoke.exceptions import Exit

from smfs.units import show
from testbed.cli.common import INTERRUPTED, flag_int, flag_number, for_command, task, user_error
from testbed.progress import Say, spinner

GUEST_PROJECT = "/opt/smfs-testbed"
"""Where the image installs the project's packages (vmimages.build)."""
GUEST_DIR = "/var/tmp"
"""Guest directory of the pcap while it is taken: on disk (``/run`` is a small tmpfs)."""
GRACE = 60.0
"""Seconds allowed beyond ``--seconds`` for the guest's python3 to start and finish (TCG is slow)."""


@task(help={
    "site": "site whose VM captures (primary or mirror)", "seconds": "how long to capture (s)",
    "out": "pcap file on the host (default results/captures/<site>-<timestamp>.pcap)",
    "json": "print the capture figures and the summary as JSON",
    "iface": "guest interface: eth0 (default: what the site sends, and receives before the ingress WAN "
             "shaping) or ifb-eth0 (what it receives after the WAN's delay and loss)",
    "snaplen": "bytes kept per packet (default 128: the headers the summary reads; 0: whole packets)",
    "max_packets": "stop after this many packets (0: no limit)",
}, interrupted=INTERRUPTED)
def capture(c, site="primary", seconds="5", out="", json=False, iface="eth0", snaplen="128", max_packets="0"):
    """Capture the WAN (tunnel port 7800) in a site's VM to a pcap on the host and summarise it with scapy."""
    from netem import capture as cap
    from testbed.vm.bed import VmTestbed

    seconds = flag_number("--seconds", seconds, (0, 3600), "5", low_open=True, what="duration in seconds")
    snaplen = flag_int("--snaplen", snaplen, (0, 65535), "128", what="number of bytes per packet (0: whole packets)")
    max_packets = flag_int("--max-packets", max_packets, (0, 10**9), "10000", what="count (0: no limit)")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", iface) or iface in (".", ".."):
        raise user_error(f"--iface {show(iface)}: give a network interface name, e.g. eth0 or ifb-eth0")
    if out and Path(out).is_dir():
        raise user_error(f"--out {show(out)}: is a folder; give a file name, e.g. --out results/captures/x.pcap")
    with for_command("./inv capture"):
        tb = VmTestbed.active()
        sites = sorted({v.site for v in tb.vms.values()})
        if site not in sites:
            raise user_error(f"--site {site!r}: testbed {tb.name} has sites {', '.join(sites)}; use one of them")
        vm = tb.site_vms(site)[0]
        dest = Path(out) if out else Path("results/captures") / f"{site}-{time.strftime('%Y%m%d-%H%M%S')}.pcap"
        args = ["--iface", iface, "--seconds", f"{seconds:g}", "--udp-port", str(cap.TUNNEL_PORT),
                "--max-packets", str(max_packets), "--snaplen", str(snaplen or cap.DEFAULT_SNAPLEN)]
        figures = _take(tb.guest(vm), args, seconds, dest)
    try:
        summary = cap.summarise(dest, cap.TUNNEL_PORT)
    except cap.CaptureError as err:
        raise user_error(str(err)) from None
    if json:
        print(_json.dumps({"site": site, "vm": vm, "pcap": str(dest), "capture": figures, "summary": summary}, indent=1))
        return
    print(f"{site} ({vm}, {iface}): {figures['packets']} packets in {figures['seconds']:g} s, "
          f"kernel drops {figures['kernel_drops']}, stopped by {figures['stopped_by']} → {dest}")
    print(format_summary(summary))


def _take(g: Any, args: list[str], seconds: float, dest: Path) -> dict[str, Any]:
    """Run the capture detached in guest ``g``, wait for it with a progress line, copy the pcap to
    ``dest``; returns the guest's JSON figures. Ctrl-C ends the capture early and keeps what it took.
    The guest's files are removed in every case."""
    from testbed.vm.guest import RUN_DIR

    name = f"capture-{time.strftime('%Y%m%d-%H%M%S')}"
    pcap, log = f"{GUEST_DIR}/smfs-{name}.pcap", f"{RUN_DIR}/{name}.log"
    script = f"{RUN_DIR}/{name}.py"
    t0 = time.monotonic()
    with spinner("capture") as say:
        try:
            argv = ["python3", *_module(g, script, say), *args, "--out", pcap]
            g.spawn(name, argv, log=log)
            say(f"{g.name}: {shlex.join(argv)}")
            _wait(g, name, seconds, t0, say.update, say)
            figures = _figures(g, log)
            size = int(g.sh(f"stat -c %s {shlex.quote(pcap)}", timeout=30).strip() or 0)
            say(f"{figures['packets']} packets captured; copying {size / 1e6:.1f} MB to {dest}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(g.read_file(pcap))
        finally:
            _clean(g, name, [pcap, log, script, f"{RUN_DIR}/{name}.pid"], say)
    return figures


def _clean(g: Any, name: str, paths: list[str], say: Say) -> None:
    """Stop the capture if it still runs and remove its files; a failure here is reported, not raised,
    so that it never hides the error that brought us here."""
    from testbed.vm.guest import GuestError

    try:
        g.stop(name, wait=5.0)
        g.exec(["rm", "-f", *paths], timeout=30)
    except GuestError as err:
        say(f"warning: {g.name}: could not remove {' '.join(paths)}: {err}")


def _module(g: Any, script: str, say: Any) -> list[str]:
    """How to start the capture: ``-m netem.capture`` when the guest image holds this very module,
    else the host's copy written to ``script`` (an image built before it, or a module edited since)."""
    from netem import capture as cap

    data = Path(cap.__file__).read_bytes()
    res = g.exec(["sha256sum", f"{GUEST_PROJECT}/netem/capture.py"], timeout=30)
    if res.ok and res.out.split()[:1] == [hashlib.sha256(data).hexdigest()]:
        return ["-m", "netem.capture"]
    say("the guest image lacks this netem/capture.py: running the host's copy")
    g.exec(["mkdir", "-p", str(Path(script).parent)], timeout=30, check=True)
    g.write_file(script, data)
    return [script]


def _wait(g: Any, name: str, seconds: float, t0: float, update: Any, say: Any) -> None:
    """Poll the detached capture about once a second until it exits (``--seconds`` plus the guest's
    start-up); Ctrl-C or the deadline stops it with SIGTERM, which closes the file complete."""
    deadline = t0 + seconds + GRACE
    try:
        while g.find(name) is not None:
            elapsed = time.monotonic() - t0
            if elapsed > seconds + GRACE:
                say(f"still running after {seconds + GRACE:g} s: stopping it")
                g.stop(name, wait=10.0)
                return
            update(f"capture: {min(elapsed, seconds):.0f}/{seconds:g} s in {g.name}"
                   + (" (finishing)" if elapsed > seconds else ""))
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    except KeyboardInterrupt:
        say("interrupted: stopping the capture, keeping what it took")
        g.stop(name, wait=10.0)


def _figures(g: Any, log: str) -> dict[str, Any]:
    """The capture's JSON line (the last line of its log); its error as one line when it failed."""
    lines = g.read_file(log).decode(errors="replace").strip().splitlines()
    try:
        figures = _json.loads(lines[-1])
        if isinstance(figures, dict) and "packets" in figures:
            return figures
    except (IndexError, ValueError):
        pass
    raise Exit(f"error: capture in {g.name} failed: {(lines or ['no output'])[-1][:200]}", code=2)


def format_summary(s: dict[str, Any]) -> str:
    """The summary as a table, one row per direction, and a line on what the counts mean."""
    head = (f"{'direction':<44} {'site':>4} {'data':>8} {'data MB':>8} {'repairs':>8} {'repair MB':>9} "
            f"{'missing':>8} {'dup':>5}")
    rows = [head]
    for d in s["directions"]:
        rows.append(f"{d['src'] + ' → ' + d['dst']:<44} {d['site']:>4} {d['data']:>8} {d['data_bytes'] / 1e6:>8.2f} "
                    f"{d['repairs']:>8} {d['repair_bytes'] / 1e6:>9.2f} {d['missing_in_capture']:>8} "
                    f"{d['duplicates']:>5}")
    if not s["directions"]:
        rows.append("(no tunnel datagrams: are the gateways running? the FEC modes start them)")
    t = s["totals"]
    overhead = "-" if t["repair_overhead"] is None else f"{t['repair_overhead'] * 100:.1f} %"
    rows.append(f"{s['packets']} packets in {s['seconds']:.1f} s: {t['data']} data, {t['repairs']} repairs "
                f"(repair bytes {overhead} of data), {s['not_tunnel']} not tunnel, {s['other']} other, "
                f"{s['truncated']} cut by the snaplen")
    rows.append("missing: DATA seqs absent between the first and last seen in a direction "
                "(lost before the tap, or dropped by it: see kernel drops)")
    return "\n".join(rows)


TASKS = [capture]
