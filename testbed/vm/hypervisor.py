"""libvirt: connections (starting virtlogd/libvirtd when they are not running), the accelerator
(KVM when it works, TCG otherwise, detected by trying), and the domain XML of a testbed VM.

libvirt-python only; no virsh subprocesses.

Every domain the testbed defines carries its mark: ``<metadata><smfs:testbed id='...'/></metadata>``
(namespace :data:`METADATA_NS`, the id of the testbed's folder). Teardown reads the *live* domain XML
and destroys or undefines only a domain with that element and that id (:func:`domain_mark`).
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import re
import select
import shutil
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import libvirt

from testbed.errors import TestbedError
from testbed.paths import cache_dir
from testbed.progress import Say
from testbed.registry import Registry, Resource, Scope, register_teardown

log = logging.getLogger(__name__)

LOCAL_URIS = ("qemu:///system",)


class HypervisorError(TestbedError, RuntimeError):
    """libvirt is unreachable or refused an operation (the message says what to do)."""


def _quiet_libvirt() -> None:
    """libvirt prints every error to stderr by default; we raise them instead."""
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


_quiet_libvirt()


def ensure_daemons(uri: str, say: Say = print) -> None:
    """Start ``virtlogd`` and ``libvirtd`` for a local URI when libvirt is not reachable."""
    if uri not in LOCAL_URIS or _reachable(uri):
        return
    if os.geteuid() != 0:
        raise HypervisorError(f"libvirt at {uri} is not reachable and starting libvirtd needs root; "
                              "run as root or start libvirtd")
    Path("/var/log/libvirt").mkdir(parents=True, exist_ok=True)
    for daemon in ("virtlogd", "libvirtd"):
        if not shutil.which(daemon) and not Path(f"/usr/sbin/{daemon}").exists():
            raise HypervisorError(f"{daemon} not installed; run ./inv once as root to install libvirt-daemon-system")
        if subprocess.run(["pgrep", "-x", daemon], capture_output=True).returncode != 0:
            say(f"starting {daemon} (it was not running)")
            subprocess.run([daemon, "-d"], check=False, capture_output=True)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if _reachable(uri):
            return
        time.sleep(0.2)
    raise HypervisorError(f"libvirtd started but {uri} is still not reachable; see /var/log/libvirt/libvirtd.log")


def _reachable(uri: str) -> bool:
    try:
        libvirt.open(uri).close()
        return True
    except libvirt.libvirtError:
        return False


_CONNS: dict[str, libvirt.virConnect] = {}


def connect(uri: str, say: Say = print) -> libvirt.virConnect:
    """A cached libvirt connection to ``uri`` (starting the local daemons if needed)."""
    conn = _CONNS.get(uri)
    if conn is not None and conn.isAlive():
        return conn
    ensure_daemons(uri, say)
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as err:
        raise HypervisorError(f"cannot connect to {uri}: {err.get_error_message()}") from None
    _CONNS[uri] = conn
    return conn


def lookup(conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def ensure_kvm_access(owner: str, registry: Registry, say: Say = print) -> None:
    """Let the QEMU user open /dev/kvm (root:kvm 0660, as Debian's udev rules set it).

    Without udev (containers) /dev/kvm stays root-only; libvirt then finds its QEMU capabilities
    "KVM was enabled when probing, but it is not available now" and re-probes QEMU on every call
    (a minute per domain define here). The previous owner and mode are recorded and restored on
    teardown."""
    import grp

    dev = Path("/dev/kvm")
    if not dev.exists() or os.geteuid() != 0:
        return
    uid, gid, _ = qemu_user()
    st = dev.stat()
    if uid == 0 or (st.st_gid == gid and st.st_mode & 0o060 == 0o060) or (st.st_mode & 0o006 == 0o006):
        return
    try:
        kvm_gid = grp.getgrnam("kvm").gr_gid
    except KeyError:
        kvm_gid = gid
    registry.add("devperm", str(dev), owner, uid=st.st_uid, gid=st.st_gid, mode=st.st_mode & 0o7777)
    say("note: /dev/kvm is root-only (no udev); setting root:kvm 0660 so libvirt stops re-probing QEMU "
        "(restored by ./inv down)")
    os.chown(dev, st.st_uid, kvm_gid)
    dev.chmod(0o660)


def _devperm_is_ours(res: Resource, scope: Scope) -> str | None:
    """Only /dev/kvm's owner and mode are ever changed, and only back to a plain owner and mode."""
    if res.ident != "/dev/kvm":
        return "the testbed only ever changes the owner and mode of /dev/kvm"
    m = res.meta
    if not all(isinstance(m.get(k), int) and not isinstance(m.get(k), bool) and m[k] >= 0 for k in ("uid", "gid", "mode")):
        return "its recorded owner and mode are not numbers"
    if m["mode"] & ~0o777:
        return f"the mode to restore, {m['mode']:o}, has set-id or sticky bits"
    return None


def _teardown_devperm(res: Resource) -> None:
    p = Path(res.ident)
    if p.exists():
        os.chown(p, int(res.meta["uid"]), int(res.meta["gid"]))
        p.chmod(int(res.meta["mode"]))


# --- accelerator ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Accel:
    domain_type: str  # "kvm" or "qemu"
    reason: str

    @property
    def name(self) -> str:
        return "kvm" if self.domain_type == "kvm" else "tcg"


def detect_accel(kernel: Path, want: str = "auto", timeout: float = 12.0) -> Accel:
    """KVM when it works, TCG otherwise: boot the guest kernel under ``-accel kvm`` into a busybox
    that panics at once, and look for the kernel starting init. The answer is cached per kernel,
    QEMU binary and host kernel (some hosts expose /dev/kvm yet cannot run a guest)."""
    if want == "tcg":
        return Accel("qemu", "spec asks for tcg")
    qemu = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
    if not os.path.exists("/dev/kvm"):
        return _accel_or_fail(want, Accel("qemu", "no /dev/kvm"))
    key = f"{kernel.stat().st_size}:{kernel.stat().st_mtime_ns}:{os.stat(qemu).st_mtime_ns}:{os.uname().release}"
    cache = cache_dir() / "accel.json"
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return _accel_or_fail(want, Accel(cached["domain_type"], cached["reason"] + " (cached)"))
    except (OSError, ValueError, KeyError):
        pass
    accel = _probe_kvm(qemu, kernel, timeout)
    cache.write_text(json.dumps({"key": key, "domain_type": accel.domain_type, "reason": accel.reason}))
    return _accel_or_fail(want, accel)


def _accel_or_fail(want: str, accel: Accel) -> Accel:
    if want == "kvm" and accel.domain_type != "kvm":
        raise HypervisorError(f"testbed.accel = \"kvm\" but KVM does not work here ({accel.reason}); use accel = \"auto\"")
    return accel


def _probe_kvm(qemu: str, kernel: Path, timeout: float) -> Accel:
    busybox = shutil.which("busybox") or "/bin/busybox"
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "bin").mkdir()
        shutil.copy2(busybox, t / "bin" / "busybox")
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], input=b"bin\nbin/busybox\n", cwd=t,
                              capture_output=True, check=True).stdout
        (t / "probe.cpio").write_bytes(cpio)
        cmd = [qemu, "-accel", "kvm", "-m", "128", "-nodefaults", "-display", "none", "-monitor", "none",
               "-serial", "stdio", "-no-reboot", "-kernel", str(kernel), "-initrd", str(t / "probe.cpio"),
               "-append", "console=ttyS0 panic=-1 rdinit=/bin/busybox loglevel=7"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out = b""
        deadline = time.monotonic() + timeout
        try:
            assert proc.stdout is not None
            while time.monotonic() < deadline:
                ready, _, _ = select.select([proc.stdout], [], [], 0.2)
                if ready:
                    chunk = os.read(proc.stdout.fileno(), 65536)
                    if not chunk:
                        break
                    out += chunk
                    if b"as init process" in out:
                        return Accel("kvm", "a KVM guest booted")
        finally:
            proc.kill()
            proc.wait()
    tail = out.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
    return Accel("qemu", f"KVM guest did not boot within {timeout:.0f} s ({tail[0][:80]})")


# --- QEMU user and domain XML -------------------------------------------------------------------


def qemu_user() -> tuple[int, int, str]:
    """(uid, gid, name) QEMU runs as under qemu:///system (qemu.conf ``user``, default libvirt-qemu)."""
    name = "libvirt-qemu"
    try:
        text = Path("/etc/libvirt/qemu.conf").read_text()
        m = re.search(r'^\s*user\s*=\s*"([^"]+)"', text, re.MULTILINE)
        if m:
            name = m.group(1)
    except OSError:
        pass
    if name.startswith("+"):
        uid = int(name[1:])
        return uid, pwd.getpwuid(uid).pw_gid if uid else 0, name
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return 0, 0, "root"
    return pw.pw_uid, pw.pw_gid, name


def reachable_by(path: Path, uid: int, gid: int) -> bool:
    """Can (uid, gid) traverse every folder above ``path`` (others/group execute bits)?"""
    if uid == 0:
        return True
    for d in [path, *path.parents]:
        try:
            st = d.stat()
        except OSError:
            return False
        if st.st_uid == uid:
            ok = st.st_mode & 0o100
        elif st.st_gid == gid:
            ok = st.st_mode & 0o010
        else:
            ok = st.st_mode & 0o001
        if not ok:
            return False
    return True


@dataclass(frozen=True)
class DomainConfig:
    name: str
    domain_type: str  # kvm | qemu
    vcpus: int
    memory_mib: int  # current (balloon target at boot)
    max_memory_mib: int
    kernel: Path
    initrd: Path
    cmdline: str
    root_disk: Path
    bridge: str
    mac: str
    qmp_socket: Path
    console_log: Path
    run_as_root: bool  # static DAC label +0:+0 when QEMU's user cannot reach the cache
    ledger_socket: Path | None = None  # host end of the virtio-serial port LEDGER_PORT (QEMU listens)
    mtu: int = 1500  # the NIC's MTU: the tap's, and the guest's through virtio-net's host_mtu feature
    extra_nics: tuple[tuple[str, str], ...] = ()  # (bridge, mac) of further NICs (the WAN router's eth1...)
    data_socket: Path | None = None  # nbdkit's unix socket serving the data disk (vdb); none: no data disk
    uuid: str | None = None  # the domain's UUID (a clone restored from a save image names its own domain's)
    testbed_id: str = ""  # the testbed's id, in <metadata> (teardown touches only domains that carry it)


METADATA_NS = "https://smfs-testbed.invalid/xmlns/testbed/1"
"""The namespace of the testbed's element in a domain's ``<metadata>`` (libvirt keeps any namespaced element)."""


def metadata_xml(testbed_id: str) -> str:
    """The domain's ``<metadata>``: the testbed's id, checked again before teardown touches the domain."""
    return f"<metadata><smfs:testbed xmlns:smfs='{METADATA_NS}' id='{escape(testbed_id)}'/></metadata>"


def domain_mark(dom: libvirt.virDomain) -> str | None:
    """The testbed id in the live XML of ``dom`` (libvirt's, read now), or None when it carries none."""
    try:
        root = ET.fromstring(dom.XMLDesc(0))
    except ET.ParseError:
        return None
    el = root.find(f"metadata/{{{METADATA_NS}}}testbed")
    return el.get("id") if el is not None else None


def foreign_domain(dom: libvirt.virDomain, scope: Scope) -> str | None:
    """Why ``dom`` is not this testbed's (its name, its live metadata), or None when it is."""
    name = dom.name()
    if not name.startswith(scope.prefix):
        return f"its name lacks the prefix {scope.prefix}"
    mark = domain_mark(dom)
    if mark is None:
        return "its live XML has no smfs-testbed <metadata>"
    if mark != scope.id:
        return f"its metadata names testbed {mark!r}, not this one ({scope.id})"
    return None


LEDGER_PORT = "smfs.ledger"
"""Name of the virtio-serial port the testers' ledger is streamed over (``/dev/virtio-ports/smfs.ledger``
in the guest). Lines written to it are on the host at once, so they survive the guest's power cut."""


def domain_xml(c: DomainConfig) -> str:
    """Direct kernel boot, virtio everywhere, guest agent and ledger channels, balloon with stats, second QMP.

    The data disk (vdb) is an NBD disk on ``data_socket`` (nbdkit with a volatile write cache:
    ``testbed.vm.disks``); QEMU's ``cache='writeback'`` shows the guest a write cache, so it flushes.
    NICs appear in the order given (first ``bridge``/``mac``, then ``extra_nics``); the guest finds
    each by its MAC rather than trusting eth0/eth1 to follow that order."""
    e = lambda p: escape(str(p), {"'": "&apos;", '"': "&quot;"})  # noqa: E731
    ledger = (f"""<channel type='unix'>
      <source mode='bind' path='{e(c.ledger_socket)}'/>
      <target type='virtio' name='{LEDGER_PORT}'/>
    </channel>""" if c.ledger_socket is not None else "")
    seclabel = ("<seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>"
                if c.run_as_root else "")
    data = (f"""<disk type='network' device='disk'>
      <driver name='qemu' type='raw' cache='writeback'/>
      <source protocol='nbd'><host transport='unix' socket='{e(c.data_socket)}'/></source>
      <target dev='vdb' bus='virtio'/>
      <alias name='ua-data'/>
    </disk>""" if c.data_socket is not None else "")
    cpu = "<cpu mode='host-passthrough'/>" if c.domain_type == "kvm" else ""
    nics = "\n    ".join(f"""<interface type='bridge'>
      <source bridge='{e(bridge)}'/>
      <mac address='{mac}'/>
      <model type='virtio'/>
      <mtu size='{c.mtu}'/>
      <alias name='ua-net{i}'/>
    </interface>""" for i, (bridge, mac) in enumerate(((c.bridge, c.mac), *c.extra_nics)))
    return f"""<domain type='{c.domain_type}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{e(c.name)}</name>
  {f"<uuid>{e(c.uuid)}</uuid>" if c.uuid else ""}
  <description>smfs-testbed VM (created by smfs-testbed; ./inv down removes it)</description>
  {metadata_xml(c.testbed_id) if c.testbed_id else ""}
  <memory unit='MiB'>{c.max_memory_mib}</memory>
  <currentMemory unit='MiB'>{c.memory_mib}</currentMemory>
  <vcpu>{c.vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{e(c.kernel)}</kernel>
    <initrd>{e(c.initrd)}</initrd>
    <cmdline>{e(c.cmdline)}</cmdline>
  </os>
  {cpu}
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='unsafe'/>
      <source file='{e(c.root_disk)}'/>
      <target dev='vda' bus='virtio'/>
      <alias name='ua-root'/>
    </disk>
    {data}
    {nics}
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    {ledger}
    <serial type='pty'>
      <log file='{e(c.console_log)}' append='off'/>
      <target port='0'/>
    </serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <memballoon model='virtio'><stats period='1'/><alias name='ua-balloon'/></memballoon>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
  </devices>
  {seclabel}
  <qemu:commandline>
    <qemu:arg value='-qmp'/>
    <qemu:arg value='unix:{e(c.qmp_socket)},server=on,wait=off'/>
  </qemu:commandline>
</domain>
"""


register_teardown("devperm", _teardown_devperm, check=_devperm_is_ours)
