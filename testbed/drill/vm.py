"""The VM disaster drill: the spec's testbed, the shaped WAN, the SMFS stack in the guests, a fault
schedule (default: the rolling disaster) during the run, then the mirror's recovered logs against
the testers' ledgers, for each mode from the same snapshot.

Once: bring up (or reuse) the testbed, shape the WAN on each site's ingress, calibrate, give each
site its storage address, start the mirror site and both FEC gateways, wait until they answer, and
take snapshot "ready". Per mode: restore "ready", start the primary site in the mode, stream the
testers' ledger over a virtio-serial port to the host, inject the faults at ``fail_at``, let the
mirror drain what is still in the WAN, stop it, recover its listing read-only, and check.
The result directory and exit codes are those of the namespace drill (:mod:`testbed.drill.local`).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smfs.modes import Mode
from smfs.profiling import ENV as PROFILE_ENV
from testbed.drill.faults import Runner, Timed, Timeline, during, schedule
from testbed.drill.report import table
from testbed.drill.runner import EXIT_CODES, InfrastructureError, RunConfig, overall_verdict
from testbed.errors import TestbedError
from testbed.progress import Say
from testbed.vm.guestproc import RUN_DIR, wait_file
from workloads.ledger import is_ack_line

if TYPE_CHECKING:  # testbed.vm.bed loads libvirt: imported where the drill brings a testbed up
    from netem.profile import LinkProfile
    from testbed.vm.bed import VmTestbed

SNAPSHOT = "ready"
MIRROR_PORT = 7700
TUNNEL_PORT = 7800
CONTROL = "127.0.0.1:7790"
RUN = RUN_DIR  # where the drill's processes keep their pid, log and ready files in a guest
KEY_FILE = "/run/smfs/storage.key"
"""The storage servers' key (mirror stream handshake, MACK tags): written once, before snapshot "ready"."""
TUNNEL_KEY_FILE = "/run/smfs/tunnel.key"
"""The gateways' key (tunnel datagrams, the primary's subscription and callbacks): a fresh one for every FEC
mode (:meth:`VmBed.begin`), so nothing recorded in one mode is accepted in the next."""
STATS_FILE = "/run/smfs/fec.json"
LEDGER_PORT_DEV = "/dev/virtio-ports/smfs.ledger"
RESEED = ("import fcntl, os, sys; fd = os.open('/dev/urandom', os.O_WRONLY); os.write(fd, sys.stdin.buffer.read()); "
          "fcntl.ioctl(fd, 0x5207)")  # RNDRESEEDCRNG = _IO('R', 0x07): reseed the CRNG from the pool now
RETIRE_GATEWAY = """p=$(cat "$1/gateway.pid" 2>/dev/null)
if [ -n "$p" ]; then
  kill -KILL -- "-$p" 2>/dev/null || kill -KILL "$p" 2>/dev/null
  for i in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.05; done
fi
rm -f "$1/gateway.ready" "$2.new" && umask 077 && set -C && cat > "$2.new" && mv -f "$2.new" "$2"
"""
"""Guest shell: kill the gateway whose pid is in $1/gateway.pid, then stdin into key file $2 (mode 0600 from the start)."""
DRILL_PROBES = 2000  # calibration probes at most per drill (about 4 s)
INTERLEAVES = (1, 11, 19)  # the FEC layers' interleaves; fec.c = k runs the first k
STORAGE = {"primary": ("198.18.11.1", "198.18.11.0/24"), "mirror": ("198.18.12.1", "198.18.12.0/24")}
"""Per site: the storage servers' address (on lo) and subnet, routed into the gateway's TUN in the
FEC modes; the bare modes use the VMs' own addresses."""

__all__ = ["EXIT_CODES", "DrillConfig", "run_drill"]


from testbed.spec import DRILL_KEYS  # noqa: E402 - the fields a drill reads; any other is a typo (one list, in the spec)

PROC_CPU_SCRIPT = ("cat /proc/stat; echo @@snmp; grep '^Udp:' /proc/net/snmp; echo @@stat; "
                   "cat /proc/[0-9]*/stat 2>/dev/null; echo @@cmdline; grep -a -H '' /proc/[0-9]*/cmdline 2>/dev/null; true")
"""The guest's counters in one command (four processes, not one per process: a fork costs
milliseconds under TCG): the summed cpu line, the kernel's UDP counters (a receive buffer that
overflowed), then every process's stat line and command line."""


@dataclass(frozen=True)
class DrillConfig:
    """A drill as run: the spec's [workload]/[fec]/[faults] tables resolved, plus the flags."""

    spec_path: Path
    modes: tuple[Mode, ...]
    out: Path
    keep: bool = False
    testers: int = 64
    append_size: int = 512 * 1024  # bytes
    duration: float = 60.0  # s the testers run at most
    fail_at: float = 30.0  # s after the testers start
    servers: int = 8
    r: int = 8
    flush_ms: float = 5.0  # [fec] flush: a partial bin's repair goes out this long after its first packet
    schedule: str = "rolling-disaster"
    instant: str = "time"  # [faults] instant: the disaster at fail_at ("time") or at the first ack after it ("ack")
    burst_loss: str = "1%"
    burst_seconds: float = 0.5
    drain_timeout: float = 60.0  # [faults] drain_timeout: s the mirror gets to go quiet after the disaster
    during: tuple[Timed, ...] = ()  # faults injected (and healed) during the run, before the disaster
    defects: tuple[str, ...] = ()  # seeded stack defects (the self-test only)
    segment_bytes: int = 100 << 20  # log store segment size (the self-test makes it small)
    restart_stack: bool = False  # restart the mirror site and gateways after the restore (the self-test's variants)
    engine: str = "c"  # [fec] engine: the gateways' data path, c (smfs/native) or python (the specification)
    c: int = 3  # [fec] c: repair layers (interleaves 1, 11, 19 cut to c)
    wan: Any = None  # the WAN profile the modes run under (None: the testbed spec's); an experiment's point

    def run_config(self) -> RunConfig:
        """What the shared recipe needs of this drill."""
        return RunConfig(out=self.out, testers=self.testers, append_size=self.append_size, duration=self.duration,
                         fail_at=self.fail_at, servers=self.servers, schedule=self.schedule,
                         drain_timeout=self.drain_timeout, defects=self.defects, instant=self.instant)

    def __post_init__(self) -> None:
        checks = [
            (self.testers >= 1, "workload.testers", "must be at least 1"),
            (self.servers >= 1, "workload.server_pairs", "must be at least 1"),
            (self.duration > 0, "workload.duration", "must be positive, e.g. \"20s\""),
            (0 < self.fail_at <= self.duration, "faults.fail_at", "must be within workload.duration"),
            (len(self.modes) > 0, "modes", "give at least one mode"),
            (0 < self.flush_ms <= 1000, "fec.flush", "must be within (0, 1000] ms, e.g. \"5ms\""),
            (0 <= self.c <= len(INTERLEAVES), "fec.c", f"must be within 0 and {len(INTERLEAVES)} repair layers"),
            (self.engine in ("c", "python"), "fec.engine", "use \"c\" (the compiled data path) or \"python\" (the specification)"),
            (1 <= self.drain_timeout <= 3600, "faults.drain_timeout", "must be within 1 s and 1 h, e.g. \"60s\""),
        ]
        for ok, name, fix in checks:
            if not ok:
                raise ValueError(f"{name}: {fix}")

    @classmethod
    def from_spec(cls, spec: Any, modes: tuple[Mode, ...], out: Path, keep: bool = False) -> DrillConfig:
        from netem.profile import parse_time_us
        from smfs.units import parse_size

        wl, fec, faults = (dict(spec.sections.get(k, {})) for k in ("workload", "fec", "faults"))
        for section, got in (("workload", wl), ("fec", fec), ("faults", faults)):
            unknown = sorted(set(got) - DRILL_KEYS[section])
            if unknown:
                known = ", ".join(sorted(DRILL_KEYS[section]))
                raise ValueError(f"{section}.{unknown[0]}: unknown field; use one of {known}")
        duration = parse_time_us(wl.get("duration", "60s"), "workload.duration") / 1e6
        fail_at = parse_time_us(faults.get("fail_at", f"{duration * 0.6:g}s"), "faults.fail_at") / 1e6
        name = str(faults.get("schedule", "rolling-disaster"))
        schedule(name, spec.wan)  # validates the name: a typo is a one-line error before any VM boots
        return cls(
            spec_path=Path(spec.path), modes=modes, out=out, keep=keep, testers=int(wl.get("testers", 64)),
            append_size=parse_size(str(wl.get("append_size", "512KiB")), "workload.append_size"),
            duration=duration, fail_at=fail_at, servers=int(wl.get("server_pairs", 8)), r=int(fec.get("r", 8)),
            flush_ms=parse_time_us(fec.get("flush", "5ms"), "fec.flush") / 1000, engine=str(fec.get("engine", "c")),
            c=int(fec.get("c", 3)), wan=spec.wan,
            schedule=str(faults.get("schedule", "rolling-disaster")), instant=str(faults.get("instant", "time")),
            burst_loss=str(faults.get("burst_loss", "1%")),
            burst_seconds=parse_time_us(faults.get("burst", "500ms"), "faults.burst") / 1e6,
            during=during(faults.get("during"), spec, fail_at),
            drain_timeout=parse_time_us(faults.get("drain_timeout", "60s"), "faults.drain_timeout") / 1e6,
        )


# --- the ledger stream --------------------------------------------------------------------------


class LedgerStream:
    """Reads the primary's ledger port (a unix socket QEMU listens on) into a file until EOF or close.

    The guest blocks on writes to the port until a host end is connected, so connect before the
    testers start; a power cut ends the stream with EOF, and every line written before it is here."""

    def __init__(self, sock_path: str, out: Path) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(sock_path)
        self.sock.settimeout(0.5)
        self.bytes = 0
        self._acks = 0  # acked appends seen (whole "ok" lines), and when the last one arrived
        self._last_ack = 0.0
        self._partial = b""
        self._seen = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ledger-stream", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # Beside the lines, when each chunk arrived (host clock): "BYTES_SO_FAR TIME" per chunk. An ack
        # line's arrival bounds the ack from above without any guest clock (the wire check uses it).
        with open(self.out, "ab") as f, open(self.out.with_suffix(".recv"), "a") as times:
            while not self._stop.is_set():
                try:
                    data = self.sock.recv(1 << 16)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    break
                t = time.time()
                f.write(data)
                f.flush()
                self.bytes += len(data)
                times.write(f"{self.bytes} {t:.6f}\n")
                times.flush()
                self._count_acks(data, t)
        with self._seen:
            self._seen.notify_all()  # the stream ended: nobody waits for an ack that cannot come

    def _count_acks(self, data: bytes, t: float) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        acks = sum(1 for line in lines if is_ack_line(line))
        if acks:
            with self._seen:
                self._acks += acks
                self._last_ack = t
                self._seen.notify_all()

    def wait_ack(self, timeout: float) -> float | None:
        """Wait for the next acked append to arrive after this call; its arrival (host time), or None after
        ``timeout`` s or when the stream ended."""
        with self._seen:
            before = self._acks
            self._seen.wait_for(lambda: self._acks > before or not self._thread.is_alive(), timeout)
            return self._last_ack if self._acks > before else None

    def close(self, wait: float = 5.0) -> int:
        """Stop reading (after EOF or ``wait`` s) and return the bytes received."""
        self._thread.join(wait)
        self._stop.set()
        self._thread.join()
        self.sock.close()
        return self.bytes


# --- the stack in the guests --------------------------------------------------------------------


def _vm(tb: VmTestbed, site: str) -> str:
    vms = tb.site_vms(site)
    if len(vms) != 1:
        raise InfrastructureError(f"sites.{site}: the drill runs one VM per site, found {len(vms)}")
    return vms[0]


def _ip(tb: VmTestbed, vm: str) -> str:
    return tb.info(vm).address.split("/")[0]


def prepare(tb: VmTestbed, cfg: DrillConfig, tl: Timeline) -> dict[str, Any]:
    """Shape, calibrate, start the mirror site and both gateways, snapshot "ready"; returns the WAN facts."""

    from testbed.vm import wan

    profile = wan_of(tb, cfg)
    wan.start_resident(tb)
    shaped = wan.shape(tb, profile)
    wan.remember(tb, profile)
    tl.mark(f"WAN shaped at {shaped.enforcement_point}: {profile.describe()} (read back on {', '.join(shaped.read_back)})")
    from netem.calibrate import probes_for_profile

    # A short calibration: low loss rates need ~20k probes for ±20 % (a minute under TCG); the drill
    # caps them and the rows carry the precision reached. `./inv calibrate` measures in full.
    cal = wan.calibrate(tb, profile, probes=min(probes_for_profile(profile), DRILL_PROBES))
    rtt, loss = cal["measured"].get("rtt_median_ms"), cal["measured"].get("loss_pct")
    tl.mark(f"calibrated: RTT median {rtt if rtt is None else round(rtt, 2)} ms, "
            f"loss {loss if loss is None else round(loss, 3)} % round trip")
    key, tunnel_key = secrets.token_hex(32).encode(), secrets.token_hex(32).encode()
    prim, mirr = _vm(tb, "primary"), _vm(tb, "mirror")
    for site, vm in (("primary", prim), ("mirror", mirr)):
        g = tb.guest(vm)
        # The gateways ask for 4 MiB socket buffers; the kernel caps them at rmem_max/wmem_max (~208 KiB),
        # and a full receive buffer under TCG would look like WAN loss.
        g.sh(f"mkdir -p {RUN} /data && ip addr replace {STORAGE[site][0]}/32 dev lo && "
             "echo 8388608 > /proc/sys/net/core/rmem_max && echo 8388608 > /proc/sys/net/core/wmem_max")
        g.write_file(KEY_FILE, key, mode=0o600)
        g.write_file(TUNNEL_KEY_FILE, tunnel_key, mode=0o600)
    mg = tb.guest(mirr)
    mg.spawn("mirror-site", mirror_argv(cfg))
    for site, vm in (("mirror", mirr), ("primary", prim)):
        tb.guest(vm).spawn("gateway", gateway_argv(tb, cfg, site))
    wait_file(mg, f"{RUN}/mirror/mirror.ready", "mirror-site", "mirror site")
    for vm in (mirr, prim):
        wait_file(tb.guest(vm), f"{RUN}/gateway.ready", "gateway", f"{vm} gateway")
    tl.mark(f"mirror site ({cfg.servers} servers) and both FEC gateways (r = {cfg.r}) answer")
    secs = tb.snapshot(SNAPSHOT, say=lambda _m: None, resume=False)  # each mode restores it at once
    tl.mark(f"snapshot {SNAPSHOT!r} taken ({secs:.1f} s paused)")
    return {"shaped": shaped.to_dict(), "calibration": cal, "stack": stack_of(tb, cfg)}


def mirror_argv(cfg: DrillConfig) -> list[str]:
    """The mirror site's command line in its guest."""
    from smfs.site import idle_argv

    # The site's storage address (the FEC modes) and the NIC's (eth0: the bare modes), never a wildcard.
    return ["python3", "-m", "smfs.site", "mirror", "--servers", str(cfg.servers), "--data", "/data/mirror",
            "--run", f"{RUN}/mirror", "--listen", f"{STORAGE['mirror'][0]}:{MIRROR_PORT}", "--listen",
            f"@eth0:{MIRROR_PORT}", "--key-file", KEY_FILE, "--segment-bytes", str(cfg.segment_bytes),
            *idle_argv([t.seconds for t in cfg.during])]  # a partition or freeze is silence, not idleness


def gateway_argv(tb: VmTestbed, cfg: DrillConfig, site: str) -> list[str]:
    """A site's FEC gateway's command line in its guest."""
    peer = "mirror" if site == "primary" else "primary"
    vm, peer_vm = _vm(tb, site), _vm(tb, peer)
    return ["python3", "-m", "smfs.gateway", "--site", site, "--tun", "smfs0", "--address", STORAGE[site][0],
            "--route", STORAGE[peer][1], "--local", f"{_ip(tb, vm)}:{TUNNEL_PORT}",
            "--peer", f"{_ip(tb, peer_vm)}:{TUNNEL_PORT}", "--control", CONTROL, "--key-file", TUNNEL_KEY_FILE,
            "--stats", STATS_FILE, "--ready", f"{RUN}/gateway.ready", "--r", str(cfg.r),
            "--wan-mtu", str(tb.spec.mtu), "--wan-rate-bps", str(egress_rate_bps(wan_of(tb, cfg), site)),
            "--edge-queue", str(edge_queue_packets(wan_of(tb, cfg), site, tb.spec.mtu)), "--flush-ms", f"{cfg.flush_ms:g}",
            "--interleaves", *map(str, INTERLEAVES[:cfg.c]), "--engine", cfg.engine]


def wan_of(tb: VmTestbed, cfg: DrillConfig) -> LinkProfile:
    """The WAN profile the drill runs under: an experiment point's, else the testbed spec's."""
    return cfg.wan if cfg.wan is not None else tb.spec.wan


def stack_of(tb: VmTestbed, cfg: DrillConfig) -> dict[str, Any]:
    """What snapshot "ready" holds running for ``cfg``: the WAN's shape and the mirror site's and gateways'
    command lines. A mode whose stack differs from the snapshot's reshapes or restarts what differs."""
    return {"wan": wan_of(tb, cfg).to_dict(), "mirror": mirror_argv(cfg),
            "gateways": {site: gateway_argv(tb, cfg, site) for site in ("primary", "mirror")}}


def egress_rate_bps(profile: Any, site: str) -> int:
    """The WAN rate a site's gateway paces its egress to (0: the WAN has no rate, nothing to pace):
    a→b for the primary, b→a for the mirror. Repairs share it, so FEC never overruns the WAN's queue."""
    return (profile.a_to_b if site == "primary" else profile.b_to_a).rate_bps or 0


def edge_queue_packets(profile: Any, site: str, mtu: int) -> int:
    """The site edge's buffer in front of a paced gateway, in packets: the WAN's own queue limit in
    that direction (netem's ``limit``, the bare path's bottleneck buffer); 0 (the kernel's default)
    when not paced. Pacing moves the bottleneck from the WAN's queue to the site's edge, so the edge
    gets the buffer the WAN would have had: with a smaller one the FEC modes were measured against a
    shallower bottleneck than the bare modes (one bandwidth-delay product: 0.56 and 0.46 of their
    bare counterparts in the default drill, against 0.75 and 0.66 with the WAN's limit). The cost is
    where that buffer is: at the primary's edge it dies with the site, so local-sync+fec can lose
    more acked data than with a shallow edge. ``mtu`` is unused (the limit counts packets)."""
    if not egress_rate_bps(profile, site):
        return 0
    return (profile.a_to_b if site == "primary" else profile.b_to_a).effective_limit


def _gateway_stats(g: Any) -> dict[str, Any] | None:
    try:
        return json.loads(g.read_file(STATS_FILE))
    except Exception:  # noqa: BLE001 - a missing stats file is reported as None
        return None


def _fec_totals(per_site: dict[str, dict[str, Any] | None], out: Path) -> dict[str, Any]:
    """Both gateways' statistics, saved as ``fec-<site>.json``, with the namespace drill's totals."""
    from testbed.drill.gateways import GatewayPair

    files = {site: out / f"fec-{site}.json" for site in per_site}
    for site, stats in per_site.items():
        files[site].write_text(json.dumps(stats))
    return GatewayPair(files).collect_stats()


PROBE = r"""
import json, os, re, subprocess, sys
ports, tunnel, store = set(json.loads(sys.argv[1])), int(sys.argv[2]), sys.argv[3]
def rx(path, want):
    total = 0
    try:
        lines = open(path).read().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        f = line.split()
        if int(f[1].split(":")[1], 16) in want:
            total += int(f[4].split(":")[1], 16)
    return total
size = 0
for d, _, files in os.walk(store):
    for name in files:
        try:
            size += os.path.getsize(os.path.join(d, name))
        except OSError:
            pass
backlog = None
if os.path.exists("/sys/class/net/ifb-eth0"):
    out = subprocess.run(["tc", "-s", "qdisc", "show", "dev", "ifb-eth0"], capture_output=True, text=True).stdout
    backlog = sum(int(n) for n in re.findall(r"backlog \S+ (\d+)p", out))
print(json.dumps({"wan_backlog": backlog, "tcp_rx": rx("/proc/net/tcp", ports), "udp_rx": rx("/proc/net/udp", {tunnel}),
                  "store_bytes": size}))
"""
"""The mirror guest's side of a drain probe: packets in its ingress netem (site-ingress-ifb), bytes
waiting in its storage and tunnel sockets, and the size of its log stores."""


class VmBed:
    """The VM testbed as the drill recipe's :class:`~testbed.drill.runner.Bed`: each mode from snapshot
    "ready", the primary site started in the mode, the ledger streamed over a virtio-serial port,
    the spec's faults during the run and its disaster schedule at the end."""

    kind = "vm"

    def __init__(self, tb: VmTestbed, cfg: DrillConfig, say: Say) -> None:
        self.tb, self.cfg, self.say = tb, cfg, say
        self.prim, self.mirr = _vm(tb, "primary"), _vm(tb, "mirror")
        self.env = {"SMFS_DEFECT": ",".join(cfg.defects)} if cfg.defects else None
        self.runner: Runner | None = None
        self.fec_sites: dict[str, dict[str, Any] | None] = {}
        self.tl: Timeline | None = None
        self.capture: Any = None  # testbed.drill.wirecheck.Capture in network-sync modes
        self.ack_traces: dict[str, str | None] = {}

    def begin(self, mode: Mode, out: Path, tl: Timeline) -> None:
        self.out, self.tl, self.runner, self.fec_sites = out, tl, None, {}
        self.ack_traces = {}
        secs = self.tb.restore(SNAPSHOT, say=lambda _m: None)
        tl.mark(f"restored {SNAPSHOT!r} ({secs:.1f} s)")
        self.pg, self.mg = self.tb.guest(self.prim), self.tb.guest(self.mirr)
        from smfs.logstore import DEFAULT_SEGMENT_BYTES

        # The mirror site and the gateways in the snapshot run the correct stack with the default segment size,
        # the WAN and the gateway parameters the snapshot was prepared with (``stack``): what differs is redone.
        snap = (self.tb.state.drill_wan or {}).get("stack") or stack_of(self.tb, replace(self.cfg, wan=None))
        want = stack_of(self.tb, self.cfg)
        if want["wan"] != snap["wan"]:
            from testbed.vm import wan

            shaped = wan.shape(self.tb, wan_of(self.tb, self.cfg))
            tl.mark(f"WAN reshaped live: {shaped.profile.describe()} ({shaped.seconds:.1f} s)")
        self._fresh_randomness(tl)
        stack = "SEEDED DEFECT " + ", ".join(self.cfg.defects) if self.env else "correct stack"
        redo = bool(self.env) or self.cfg.segment_bytes != DEFAULT_SEGMENT_BYTES or self.cfg.restart_stack
        if redo or want["mirror"] != snap["mirror"]:
            self.mg.stop("mirror-site", wait=5)
            self.mg.sh(f"rm -f {RUN}/mirror/mirror.ready")
            self.mg.spawn("mirror-site", mirror_argv(self.cfg), env=self.env)
            wait_file(self.mg, f"{RUN}/mirror/mirror.ready", "mirror-site", f"{self.mg.name} mirror-site (restarted)")
            tl.mark(f"mirror site restarted ({stack}, {self.cfg.segment_bytes // 1024} KiB segments)")
        if mode.fec:
            self._fresh_tunnel(tl, stack)
        elif redo or want["gateways"] != snap["gateways"]:
            # Nothing crosses the tunnel in a bare mode; its gateways keep the snapshot's key, which no FEC
            # mode uses (each gets a fresh one), so they are only stopped when they would be the wrong stack.
            for g in (self.pg, self.mg):
                g.stop("gateway", wait=5)
        if mode.ack_on == "network":
            self._start_capture(out, tl)

    def _fresh_randomness(self, tl: Timeline) -> None:
        """Reseed both guests' kernel random generators from the host's. Every mode restores the same memory
        image, and with it the generators' state: measured, the primary's /dev/urandom gave the same bytes
        after each restore, so its handshake and subscription nonces (smfs.auth, smfs.callbacks) would
        repeat from mode to mode and a handshake or a callback recorded in one mode would pass in the next.
        64 host bytes are written into the pool and RNDRESEEDCRNG makes the generator draw from it at once."""
        def one(vm: str) -> None:
            self.tb.guest(vm).exec(["python3", "-c", RESEED], input=secrets.token_bytes(64), check=True)

        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(one, (self.prim, self.mirr)))
        tl.mark("guest random generators reseeded from the host")

    def _fresh_tunnel(self, tl: Timeline, stack: str) -> None:
        """A fresh tunnel key for this mode, and both gateways restarted with it (fresh sequence numbers,
        replay windows and decoders): a datagram, a subscription or a callback recorded in an earlier mode
        (which ran from the same snapshot, under another key) fails its MAC here."""
        key = secrets.token_hex(32).encode()

        def one(site: str) -> None:
            vm = self.prim if site == "primary" else self.mirr
            g = self.tb.guest(vm)
            # One guest command (each costs ~0.4 s under TCG): kill the gateway (nothing of it needs a clean
            # exit; its TUN goes with it), then the key from stdin into a file that is 0600 from its creation.
            g.exec(["/bin/sh", "-c", RETIRE_GATEWAY, "sh", RUN, TUNNEL_KEY_FILE], input=key, check=True)
            g.spawn("gateway", gateway_argv(self.tb, self.cfg, site), env=self.env)
            wait_file(g, f"{RUN}/gateway.ready", "gateway", f"{vm} gateway (restarted)")

        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(one, ("mirror", "primary")))
        tl.mark(f"gateways restarted with a fresh tunnel key ({stack}, flush {self.cfg.flush_ms:g} ms; "
                f"{time.monotonic() - t0:.1f} s)")

    def _start_capture(self, out: Path, tl: Timeline) -> None:
        """The wire check's capture: what leaves the primary VM, on its host tap, from before its
        primary servers connect (the replay numbers each flow's bytes from its SYN) to the disaster."""
        from testbed.drill.wirecheck import Capture, WireError
        from testbed.vm import wan

        tap = wan.tap_of(self.tb, self.prim)
        if not tap:
            raise InfrastructureError(f"{self.prim} has no host tap to capture the WAN on")
        try:
            self.capture = Capture(tap, out / "wan-primary.pcap", port=TUNNEL_PORT, registry=self.tb.registry,
                                   owner=self.tb.owner)
        except WireError as err:
            raise InfrastructureError(str(err)) from None
        tl.mark(f"wire capture on {tap} (the primary's WAN side, host clock)")

    def start_primary(self, mode: Mode, tl: Timeline) -> None:
        if mode.fec:
            target, source = STORAGE["mirror"][0], STORAGE["primary"][0]
        else:
            target, source = _ip(self.tb, self.mirr), _ip(self.tb, self.prim)
        args = ["python3", "-m", "smfs.site", "primary", "--servers", str(self.cfg.servers), "--data",
                "/data/primary", "--run", f"{RUN}/primary", "--mirror", f"{target}:{MIRROR_PORT}", "--source", source,
                "--mode", mode.name, "--segment-bytes", str(self.cfg.segment_bytes), "--key-file", KEY_FILE]
        if mode.ack_on == "network":
            args += ["--gateway-control", CONTROL, "--gateway-key-file", TUNNEL_KEY_FILE, "--ack-trace", f"{RUN}/acks"]
        env = dict(self.env or {})
        if os.environ.get("SMFS_PROFILE"):  # diagnostics: smfs/profiling.py, fetched before the disaster
            env[PROFILE_ENV] = f"{RUN}/profile"
        self.pg.spawn("primary-site", args, env=env or None)
        wait_file(self.pg, f"{RUN}/primary/primary.ready", "primary-site", "primary site")
        tl.mark(f"primary site up ({self.cfg.servers} servers, {'through the gateways' if mode.fec else 'bare TCP'})")

    def start_testers(self, raw: Path, tl: Timeline) -> LedgerStream:
        stream = LedgerStream(self.tb.info(self.prim).ledger, raw / "stream.jsonl")
        cfg = self.cfg
        self.pg.spawn("testers", ["python3", "-m", "workloads.tester", "--testers", str(cfg.testers), "--append-size",
                                  str(cfg.append_size), "--duration", str(cfg.duration), "--servers", str(cfg.servers),
                                  "--run", f"{RUN}/primary", "--ledger-stream", LEDGER_PORT_DEV], env=self.env)
        return stream

    def tap_counters(self) -> dict[str, dict[str, int]]:
        """Each site VM's host tap: packets handed into the VM (tx) and dropped there because the VM's
        queue was full (tx_dropped: a guest too slow to take them, a loss in no WAN's figures)."""
        from testbed.vm.wan import tap_of

        out = {}
        for site, vm in (("primary", self.prim), ("mirror", self.mirr)):
            try:
                tap = tap_of(self.tb, vm)
                base = Path(f"/sys/class/net/{tap}/statistics")
                out[site] = {k: int((base / k).read_text()) for k in ("tx_packets", "tx_dropped")}
            except Exception:  # noqa: BLE001 - a figure for the report, never a reason to fail the mode
                continue
        return out

    def cpu_times(self) -> dict[str, str]:
        """Each site VM's /proc/stat, then each process's stat line and command line, in one guest command
        (see :func:`testbed.drill.runner.cpu_busy` and :func:`~testbed.drill.runner.cpu_by_process`); a
        guest that does not answer is left out."""
        detail = bool(os.environ.get("SMFS_PROFILE"))  # per process: a guest command, seconds under TCG

        def read(vm: str) -> str | None:
            try:
                if not detail:  # /proc/stat alone: a file read through the agent, fast
                    return self.tb.guest(vm).read_file("/proc/stat").decode(errors="replace")
                return self.tb.guest(vm).sh(PROC_CPU_SCRIPT, timeout=20, check=False)
            except Exception:  # noqa: BLE001 - a figure for the report, never a reason to fail the mode
                return None

        with ThreadPoolExecutor(2) as pool:  # both guests at once: the disaster waits for these
            got = dict(zip(("primary", "mirror"), pool.map(read, (self.prim, self.mirr)), strict=True))
        return {site: text for site, text in got.items() if text is not None}

    def clock(self) -> dict[str, float]:
        """The primary guest's clock against the host's (the ledger's times are the guest's)."""
        dom = self.tb.domain(self.prim)
        t0 = time.time()
        got = dom.getTime()
        t1 = time.time()
        guest = got["seconds"] + got.get("nseconds", 0) / 1e9
        return {"offset_s": round(guest - (t0 + t1) / 2, 4), "uncertainty_s": round((t1 - t0) / 2, 4)}

    def tick(self, elapsed: float) -> None:
        assert self.tl is not None
        if self.runner is None:
            t_start = time.time() - elapsed
            self.runner = Runner(self.cfg.during, self.tb, self.tl, clock=lambda: time.time() - t_start)
            self.next_check = 0.0
        self.runner.tick(elapsed)
        if elapsed >= self.next_check and not self.runner.injected:  # a frozen VM cannot answer
            for g, name in ((self.pg, "primary-site"), (self.mg, "mirror-site"), (self.pg, "testers")):
                if g.find(name) is None:
                    tail = g.sh(f"tail -n 3 {RUN}/{name}.log", check=False).strip().replace("\n", " | ")
                    raise InfrastructureError(f"{name} died during the run: {tail[:300]}")
            self.next_check = elapsed + 3.0

    def heal_all(self) -> None:
        if self.runner is not None:
            self.runner.heal_all()

    def before_disaster(self, mode: Mode) -> None:
        if os.environ.get("SMFS_PROFILE") and self.out is not None:  # the primary's profile dies with it
            with contextlib.suppress(Exception):
                text = self.pg.read_file(f"{RUN}/profile/primary-site.txt")
                (self.out / "logs" / "primary-site-profile.txt").write_bytes(text)
        if mode.fec:
            self.fec_sites["primary"] = _gateway_stats(self.pg)  # its stats die with it: read just before
        if self.capture is not None:  # the acks given so far; later ones die with the primary unchecked
            self.ack_traces = {}
            for i in range(self.cfg.servers):
                try:
                    self.ack_traces[f"acks-{i}.txt"] = self.pg.read_file(f"{RUN}/acks/acks-{i}.txt").decode()
                except Exception:  # noqa: BLE001 - a missing trace makes the check inconclusive
                    self.ack_traces[f"acks-{i}.txt"] = None

    def wire_evidence(self, clock: dict[str, Any], entries: list[Any]) -> dict[str, Any] | None:
        """Stop the capture (the site is gone) and hold the primary's acks against it (:mod:`testbed.drill.wirecheck`):
        each ack is bounded by the host's receipt of its ledger line (no guest clock in the verdict)."""
        from smfs.gateway import SITE_IDS
        from testbed.drill import wirecheck

        cap, self.capture = self.capture, None
        if cap is None:
            return None
        (self.out / "acks").mkdir(exist_ok=True)
        for name, text in self.ack_traces.items():  # the evidence beside the verdict
            if text is not None:
                (self.out / "acks" / name).write_text(text)
        stream = self.out / "ledger-raw" / "stream.jsonl"
        received = wirecheck.ledger_receipts(stream, stream.with_suffix(".recv"))
        res = wirecheck.evaluate(cap.out, self.ack_traces, clock, cap.stop(), received, site=SITE_IDS["primary"],
                                 c=self.cfg.c, slack=wirecheck.SLACK_VM_S)
        (self.out / "wire.json").write_text(json.dumps(res, indent=1))
        return res

    def disaster(self, tl: Timeline) -> float:
        for fault in schedule(self.cfg.schedule, wan_of(self.tb, self.cfg), self.cfg.burst_loss, self.cfg.burst_seconds):
            fault.inject(self.tb, tl)
        return next(e["instant"] for e in reversed(tl.events) if e.get("site") == "primary" and "instant" in e)

    def probe(self) -> dict[str, Any] | None:
        """Where the mirror's drain stands (None when the mirror itself was hit: nothing to drain)."""
        if not self.tb.domain(self.mirr).isActive():
            return None
        ports = list(range(MIRROR_PORT, MIRROR_PORT + self.cfg.servers))
        res = self.mg.exec(["python3", "-c", PROBE, json.dumps(ports), str(TUNNEL_PORT), "/data/mirror"], timeout=30)
        if res.rc != 0:
            raise InfrastructureError(f"drain probe failed in the mirror: {res.stderr.decode(errors='replace')[-200:]}")
        got = json.loads(res.out)
        elsewhere = wan_backlog(self.tb, "mirror")
        if elsewhere is not None:
            got["wan_backlog"] = (got.get("wan_backlog") or 0) + elsewhere
        stats = _gateway_stats(self.mg)
        got["gateway_in"] = (stats or {}).get("wan_datagrams_in")
        return got

    def stop_mirror(self, mode: Mode, out: Path, tl: Timeline) -> dict[str, Any] | None:
        if self.tb.domain(self.mirr).isActive():
            self.mg.stop("mirror-site", wait=10)
            tl.mark("mirror site stopped")
            if mode.fec:
                self.mg.stop("gateway", wait=5)  # writes its final statistics on exit
                self.fec_sites["mirror"] = _gateway_stats(self.mg)
            for name in ("mirror-site", "gateway"):
                try:
                    (out / "logs" / f"mirror-{name}.log").write_bytes(self.mg.read_file(f"{RUN}/{name}.log"))
                except Exception:  # noqa: BLE001 - a healed disk may have rebooted the mirror: no log
                    pass
        else:
            secs = self.tb.start(self.mirr)
            self.mg = self.tb.guest(self.mirr)
            tl.mark(f"mirror was hit: booted it again ({secs:.1f} s) to recover its logs")
            self.fec_sites["mirror"] = None
        return _fec_totals(self.fec_sites, out) if mode.fec else None

    def listing(self, tl: Timeline) -> dict[str, Any]:
        self.mg.sh(f"mkdir -p {RUN}")  # a rebooted mirror starts with an empty /run
        res = self.mg.exec(["python3", "-c", "import json; from smfs.logstore import site_listing; "
                            "json.dump(site_listing('/data/mirror'), open('/run/smfs/listing.json', 'w'))"], timeout=180)
        if res.rc != 0:
            raise InfrastructureError(f"mirror listing failed: {res.stderr.decode(errors='replace').strip()[-200:]}")
        return json.loads(self.mg.read_file(f"{RUN}/listing.json"))

    def primary_listing(self, tl: Timeline) -> dict[str, Any]:
        """Boot the power-cut primary again and recover its own logs read-only."""
        secs = self.tb.start(self.prim)
        self.pg = self.tb.guest(self.prim)
        tl.mark(f"primary booted again ({secs:.1f} s) to read its own disk")
        self.pg.sh(f"mkdir -p {RUN}")
        res = self.pg.exec(["python3", "-c", "import json; from smfs.logstore import site_listing; "
                            "json.dump(site_listing('/data/primary'), open('/run/smfs/listing.json', 'w'))"], timeout=180)
        if res.rc != 0:
            raise InfrastructureError(f"primary listing failed: {res.stderr.decode(errors='replace').strip()[-200:]}")
        return json.loads(self.pg.read_file(f"{RUN}/listing.json"))

    def end_mode(self) -> None:
        cap, self.capture = self.capture, None
        if cap is not None:  # the mode ended before its wire check (an error): the capture ends here
            cap.kill()


def wan_backlog(tb: VmTestbed, towards: str) -> int | None:
    """Packets queued in the WAN towards ``towards`` where it is enforced outside that site's guest:
    the router's NIC towards it, or the host tap of its VM. None at the site-ingress point (the guest
    probe reads its ifb) or when it cannot be read."""
    from testbed.vm import wan

    point = wan.enforcement_point(tb)
    if point == wan.ROUTER_POINT:
        router, legs = wan.router_legs(tb)
        out = tb.guest(router).exec(["tc", "-s", "qdisc", "show", "dev", legs[towards]], timeout=15).out
        return sum(int(n) for n in re.findall(r"backlog \S+ (\d+)p", out))
    if point == wan.HOST_POINT:
        total = 0
        with wan.host_ipr() as ipr:
            for vm in tb.site_vms(towards):
                tap = wan.tap_of(tb, vm)
                idx = ipr.link_lookup(ifname=tap) if tap else []
                for q in ipr.get_qdiscs(index=idx[0]) if idx else []:
                    st = q.get_attr("TCA_STATS2")
                    queue = st.get_attr("TCA_STATS_QUEUE") if st is not None else None
                    total += (queue or {}).get("qlen", 0)
        return total
    return None


def run_mode(tb: VmTestbed, cfg: DrillConfig, mode: Mode, say: Say) -> dict[str, Any]:
    """One mode from snapshot "ready" through the shared recipe; returns its entry for result.json."""
    from testbed.drill.runner import run_mode as recipe

    return recipe(VmBed(tb, cfg, say), cfg.run_config(), mode, say)


def environment(tb: VmTestbed, wan_facts: dict[str, Any]) -> dict[str, Any]:
    from importlib.metadata import version

    from testbed.vm import wan

    chosen = wan.enforcement(tb)
    vers = {}
    for pkg in ("libvirt-python", "pyroute2", "numpy", "smfs-testbed"):
        try:
            vers[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - informational only
            vers[pkg] = None
    return {"testbed": "vm", "accel": tb.accel, "accel_reason": tb.state.accel_reason,
            "image": tb.state.image, "host_kernel": platform.release(), "python": platform.python_version(),
            "wan_enforcement": chosen["point"], "wan_enforcement_reason": chosen["reason"],
            "wan_loss_method": f"netem ({chosen['point']})",
            "wan": wan_facts.get("shaped"), "versions": vers}


def with_testbed(spec: Any, cfg: DrillConfig, out: Path, keep: bool, say: Say,
                 body: Callable[[VmTestbed], None], tl: Timeline | None = None) -> dict[str, Any]:
    """Bring the spec's testbed up (or reuse the running one of the same spec), prepare snapshot
    "ready" once, run ``body(tb)``, and tear the testbed down unless ``keep`` (also on Ctrl-C or
    error). Returns the WAN's facts. A teardown that fails is said and raised only when ``body``
    itself succeeded, so it never hides the error or the verdict that came before it."""
    from testbed.vm import bed as vmbed

    tl = tl or Timeline(say=say)
    ok = False
    tb: VmTestbed | None = None
    try:
        tb = _reuse(spec.name, say)
        if tb is None:
            tb = vmbed.up(spec, say=lambda m: say(f"up: {m.strip()}"))
        tl.mark(f"testbed {tb.name} up ({tb.accel})")
        if SNAPSHOT in tb.state.snapshots:
            wan_facts = tb.state.drill_wan or {}
            tl.mark(f"reusing snapshot {SNAPSHOT!r}")
        else:
            wan_facts = prepare(tb, cfg, tl)
            tb.update(drill_wan=wan_facts)
        (out / "calibration.json").write_text(json.dumps(wan_facts.get("calibration"), indent=1))
        body(tb)
        ok = True
        return wan_facts | {"tb": tb}
    finally:
        if not keep:
            say("tearing down the testbed (--keep keeps it)")
            try:  # only its own testbed's resources (vmbed.up records them under this owner)
                vmbed.down(say=say, owner=tb.owner if tb is not None else f"testbed-{spec.name}")
            except Exception as err:  # noqa: BLE001 - reported; the verdict (or the first error) stands
                say(f"TEARDOWN FAILED: {err}; run ./inv down")
                if ok:
                    raise TeardownFailed(str(err)) from err


class TeardownFailed(TestbedError, RuntimeError):
    """The drill reached its end but the testbed could not be torn down (./inv down)."""


def run_drill(spec_path: str | Path, modes: tuple[Mode, ...], out: Path | None = None, keep: bool = False,
              say: Say = print) -> dict[str, Any]:
    """The whole drill; returns result.json's content (``verdict`` decides the exit code).

    The testbed is brought up (or the active one of the same spec reused) and torn down at the end
    unless ``keep``, also on Ctrl-C or error. A failed teardown after the verdict is recorded in the
    result (``teardown_error``) and said; it does not replace the verdict."""
    from testbed.spec import load as load_spec

    spec = load_spec(spec_path)
    out = out or Path("results") / spec.name / time.strftime("%Y%m%d-%H%M%S")
    cfg = DrillConfig.from_spec(spec, modes, out, keep)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(spec_path, out / "spec.toml")
    tl = Timeline(say=say)
    result: dict[str, Any] = {"verdict": "unknown", "modes": []}
    entries: list[dict[str, Any]] = []
    try:
        facts = with_testbed(spec, cfg, out, keep, say,
                             lambda tb: entries.extend(run_mode(tb, cfg, mode, say) for mode in cfg.modes), tl)
    except InfrastructureError as err:
        say(f"INFRASTRUCTURE FAILURE: {err}")
        result["error"] = str(err)
        (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
        return result
    except TeardownFailed as err:
        facts = {"teardown_error": str(err)}
    wan_facts = {k: v for k, v in facts.items() if k != "tb"}
    result = {
        "verdict": overall_verdict(entries), "spec": spec.name,
        "environment": environment(facts["tb"], wan_facts) if "tb" in facts else {"testbed": "vm"},
        "config": {"testers": cfg.testers, "append_size": cfg.append_size, "duration": cfg.duration,
                   "fail_at": cfg.fail_at, "servers": cfg.servers, "r": cfg.r, "flush_ms": cfg.flush_ms, "engine": cfg.engine,
                   "schedule": cfg.schedule, "instant": cfg.instant, "burst_loss": cfg.burst_loss, "burst_seconds": cfg.burst_seconds,
                   "drain_timeout": cfg.drain_timeout, "during": [t.describe() for t in cfg.during],
                   "modes": [m.name for m in cfg.modes]},
        "calibration": wan_facts.get("calibration"), "setup_timeline": tl.events, "modes": entries,
    }
    if "teardown_error" in facts:
        result["teardown_error"] = facts["teardown_error"]
    from testbed.drill.plots import paper_findings

    result["paper"] = paper_findings(entries)
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    try:
        from testbed.drill.plots import write_report

        write_report(result, out)
    except Exception as err:  # noqa: BLE001 - the verdict stands without the plots
        say(f"report: plots failed: {err}")
    say("\n" + table(entries))
    if result["paper"]:
        say("\nagainst the paper:\n" + "\n".join(
            f"  {'agrees   ' if f['agrees'] else 'DISAGREES'}  {f['claim']}: {f['detail']}" for f in result["paper"]))
    broken = [f"{m['mode']}: {b}" for m in entries for b in m.get("broken_promises", [])]
    if broken:
        say("\nbroken promises (the stack acked what it had not made safe):\n" + "\n".join(f"  {b}" for b in broken))
    faults = [f"{m['mode']}: {f}" for m in entries for f in m.get("drill_faults", [])]
    if faults:
        say("\ndrill faults:\n" + "\n".join(f"  {f}" for f in faults))
    say(f"\nverdict: {result['verdict']}   (result: {out / 'result.json'})")
    return result


def _reuse(name: str, say: Say) -> VmTestbed | None:
    """The active testbed when it runs this spec; another spec's testbed is an error."""
    from testbed.vm.bed import VmTestbed, VmTestbedError

    try:
        tb = VmTestbed.active()
    except VmTestbedError:
        return None
    if tb.name != name:
        raise InfrastructureError(f"testbed {tb.name!r} is up; ./inv down first, or run the drill with its spec")
    say(f"reusing the running testbed {name!r}")
    return tb
