"""The VM testbed end to end on specs/ci.toml: up, exec, files, detached processes, cross-site
network, balloon, QMP freeze, disk failure, snapshot/restore, power cut (what was never flushed is
lost), clone (and a testbed brought up from it), down.

One testbed is shared by the module (boot is the expensive part under TCG); it is always torn
down, and the last test checks that nothing is left behind.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "specs" / "ci.toml"


def test_up_boots_every_vm(tb) -> None:
    st = tb.status()
    assert {v["vm"]: v["state"] for v in st["vms"]} == {"primary": "running", "mirror": "running"}
    assert all(v["agent"] for v in st["vms"])
    assert st["accel"] in ("kvm", "tcg")
    for info in tb.vms.values():
        assert 0 < info.boot_seconds < 60, info


def test_exec(tb) -> None:
    from testbed.vm.guest import CommandFailed, GuestTimeout

    g = tb.guest("primary")
    assert g.exec(["uname", "-r"]).out.strip().endswith("amd64")
    r = g.exec("echo out; echo err >&2; exit 3")
    assert (r.rc, r.out, r.stderr) == (3, "out\n", b"err\n")
    assert g.exec(["cat"], input=b"piped").stdout == b"piped"
    with pytest.raises(CommandFailed, match="exited 3"):
        g.exec("exit 3", check=True)
    with pytest.raises(GuestTimeout):
        g.exec(["sleep", "20"], timeout=1)
    assert "smfs" in g.python("import smfs, netem, workloads; print(smfs.__name__)").out


def test_files_and_detached_processes(tb) -> None:
    g = tb.guest("mirror")
    blob = bytes(range(256)) * 1000
    g.write_file("/data/blob", blob)
    assert g.read_file("/data/blob") == blob
    pid = g.spawn("sleeper", ["sh", "-c", "echo hi; exec sleep 600"])
    assert g.find("sleeper") == pid
    assert g.processes()["sleeper"] == pid
    assert g.read_file("/run/smfs/sleeper.log") == b"hi\n"
    assert g.stop("sleeper")
    assert g.find("sleeper") is None


def test_sites_reach_each_other(tb) -> None:
    mirror_ip = tb.info("mirror").address.split("/")[0]
    primary_ip = tb.info("primary").address.split("/")[0]
    assert tb.guest("primary").exec(["ping", "-c", "2", "-W", "3", mirror_ip], timeout=20).rc == 0
    assert tb.guest("mirror").exec(["ping", "-c", "2", "-W", "3", primary_ip], timeout=20).rc == 0


def test_balloon(tb) -> None:
    before = tb.guest("primary").meminfo_mib()
    r = tb.balloon("primary", 300)
    assert abs(r["actual_mib"] - 300) <= 1
    assert before - r["guest_total_mib"] == pytest.approx(384 - 300, abs=4)
    # what the guest sees is the balloon less what its kernel reserved at boot, and we report that gap
    assert r["guest_total_mib"] + r["kernel_reserved_mib"] == pytest.approx(300, abs=4)
    tb.balloon("primary", 384)


def test_qmp_freeze_and_disk_failure(tb) -> None:
    q = tb.qmp("mirror")
    g = tb.guest("mirror")
    q.freeze()
    assert q.status() == "paused"
    q.thaw()
    assert q.status() == "running"
    g.exec("echo keep > /data/keep && sync /data/keep /data", check=True)
    tb.fail_disk("mirror")
    try:
        r = g.exec("dd if=/dev/urandom of=/data/x bs=64k count=4 conv=fsync", timeout=30)
        assert r.rc != 0 and b"Input/output error" in r.stderr
    finally:
        how = tb.heal_disk("mirror")
    print("healed by", how)
    assert how in ("healed", "rebooted")
    g = tb.guest("mirror")
    assert g.exec("dd if=/dev/urandom of=/data/y bs=64k count=4 conv=fsync", timeout=30).rc == 0
    assert g.read_file("/data/keep") == b"keep\n"


def test_snapshot_restore(tb) -> None:
    p, m = tb.guest("primary"), tb.guest("mirror")
    tb.snapshot("ready", say=print)
    p.exec("echo after > /data/after && sync", check=True)
    m.exec("echo after > /data/after && sync", check=True)
    tb.destroy("mirror")  # a power cut between snapshot and restore must not matter
    tb.restore("ready", say=print)
    for g in (tb.guest("primary"), tb.guest("mirror")):
        assert g.exec(["test", "-e", "/data/after"]).rc == 1
    assert tb.guest("primary").exec(["ping", "-c", "1", "-W", "3", "198.18.2.10"], timeout=20).rc == 0
    assert all(tb.disk_server(vm) for vm in tb.vms)


def test_snapshot_without_resume_then_restore(tb) -> None:
    import libvirt

    tb.guest("primary").exec("echo before > /data/before && sync /data/before /data", check=True)
    tb.snapshot("stopped", say=print, resume=False)
    assert {vm: tb.domain(vm).state()[0] for vm in tb.vms} == {vm: libvirt.VIR_DOMAIN_SHUTOFF for vm in tb.vms}
    secs = tb.restore("stopped", say=print)
    print(f"restore took {secs:.1f} s")
    assert tb.guest("primary").read_file("/data/before") == b"before\n"
    assert tb.state.snapshots[-2:] == ("ready", "stopped")


def test_power_cut_and_boot_again(tb) -> None:
    g = tb.guest("mirror")
    g.exec("echo durable > /data/durable && sync /data/durable /data", check=True)
    assert tb.power_cut("mirror")["mirror"] < 10
    tb.start("mirror")
    assert tb.guest("mirror").read_file("/data/durable") == b"durable\n"


UNFLUSHED = 8 << 20
OVERWRITE_WITHOUT_FLUSH = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
fd = os.open("{path}", os.O_WRONLY)
os.write(fd, os.urandom({size}))
if libc.sync_file_range(fd, 0, 0, 7) != 0:  # WAIT_BEFORE | WRITE | WAIT_AFTER: to the disk, no flush
    raise OSError(ctypes.get_errno(), "sync_file_range")
os.close(fd)
"""


@pytest.mark.parametrize("cut", ["power_cut", "disaster"])
def test_a_power_cut_loses_what_the_disk_never_flushed(tb, cut: str) -> None:
    """Written, flushed, written again, cut: exactly the first survives. File A is written and
    fsync'd; file B is allocated and fsync'd as zeros, then overwritten in place and written to the
    disk with sync_file_range (data only, no flush: it sits in the disk's write cache), never
    flushed. On ext4 the journal's commit interval is raised, so that nothing flushes the disk
    before the cut (minix has no journal)."""
    g = tb.guest("mirror")
    g.sh("if grep -q ' /data ext4 ' /proc/mounts; then mount -o remount,commit=600 /data; fi")
    a = g.sh("dd if=/dev/urandom of=/data/A bs=1M count=4 status=none && sync /data/A /data && sha256sum </data/A")
    g.sh(f"dd if=/dev/zero of=/data/B bs=1M count={UNFLUSHED >> 20} status=none && sync /data/B /data")
    g.python(OVERWRITE_WITHOUT_FLUSH.format(path="/data/B", size=UNFLUSHED), timeout=60)
    g.sh("echo 3 > /proc/sys/vm/drop_caches")  # what is read now comes from the disk
    assert g.exec(f"cmp -n {UNFLUSHED} /dev/zero /data/B", timeout=30).rc == 1
    server = tb.disk_server("mirror")
    assert server is not None
    if cut == "power_cut":
        assert tb.power_cut("mirror")["mirror"] < 10
    else:
        took = tb.disaster("mirror")
        assert took["disk_servers"] == {"mirror": server} and "mirror" in took["pids"]
    assert tb.disk_server("mirror") is None
    tb.start("mirror")
    assert tb.disk_server("mirror") not in (None, server)
    g = tb.guest("mirror")
    assert g.sh("sha256sum </data/A") == a
    assert g.exec(f"cmp -n {UNFLUSHED} /dev/zero /data/B", timeout=30).rc == 0  # every block of B: zeros
    g.sh("rm -f /data/A /data/B && sync /data")


def test_clone(tb) -> None:
    from testbed.vm import bed as vmbed

    dest = tb.clone("ready", "pytest-clone", say=print)
    try:
        names = sorted(p.name for p in dest.iterdir())
        for vm in ("primary", "mirror"):
            assert {f"{vm}.save", f"{vm}-root.qcow2", f"{vm}-data.raw"} <= set(names)
        assert "clone.json" in names
        meta = json.loads((dest / "clone.json").read_text())
        assert meta["snapshot"] == "ready" and meta["macs"] == {vm: i.mac for vm, i in tb.vms.items()}
        assert meta["uuids"] == {vm: tb.domain(vm).UUIDString() for vm in tb.vms}
        # a testbed brought up from the clone: restored from the memory images as its own domains
        vmbed.down(say=print)
        bed = vmbed.up(tb.spec, say=print, clone="pytest-clone")
        try:
            assert bed.name == "pytest-clone" and bed.state.snapshots == ("ready",)
            assert {vm: i.mac for vm, i in bed.vms.items()} == meta["macs"]
            for vm in bed.vms:
                # a memory image restores only into a domain of its name and UUID: the clone's keep them
                assert bed.domain(vm).name() == meta["domains"][vm] == f"smfs-ci-{vm}"
                assert bed.domain(vm).UUIDString() == meta["uuids"][vm]
                assert bed.guest(vm).exec(["test", "-e", "/data/after"]).rc == 1
            assert bed.guest("mirror").read_file("/data/keep") == b"keep\n"
            assert bed.guest("primary").exec(["ping", "-c", "1", "-W", "3", "198.18.2.10"], timeout=20).rc == 0
            assert bed.restore("ready", say=print) > 0  # and again, from its own snapshot folder
            assert bed.guest("mirror").read_file("/data/keep") == b"keep\n"
        finally:
            vmbed.down(say=print)
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def test_down_leaves_nothing(tb) -> None:
    import libvirt

    from testbed.registry import Registry
    from testbed.vm import bed as vmbed

    overlays = [Path(v.root) for v in tb.vms.values()] + [Path(v.data) for v in tb.vms.values()]
    servers = {vm: tb.disk_server(vm) for vm in tb.vms}
    vmbed.down(say=print)
    assert not [pid for pid in servers.values() if pid and Path(f"/proc/{pid}").exists()]
    conn = libvirt.open("qemu:///system")
    assert not [d.name() for d in conn.listAllDomains() if d.name().startswith("smfs-ci-")]
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert "smfs-primary" not in links and "smfs-mirror" not in links
    assert not any(p.exists() for p in overlays)
    assert not Registry().items(owner=tb.owner)
    assert vmbed.down(say=print) == []  # idempotent
