"""The VM testbed end to end on specs/ci.toml: up, exec, files, detached processes, cross-site
network, balloon, QMP (freeze, disk failure), snapshot/restore, power cut, clone, down.

One testbed is shared by the module (boot is the expensive part under TCG); it is always torn
down, and the last test checks that nothing is left behind.
"""

from __future__ import annotations

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
    from testbed.guest import CommandFailed, GuestTimeout

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
    g.exec("echo keep > /data/keep && sync", check=True)
    tb.fail_disk("mirror")
    try:
        r = g.exec("dd if=/dev/urandom of=/data/x bs=64k count=4 conv=fsync", timeout=30)
        assert r.rc != 0 and b"Input/output error" in r.stderr
    finally:
        how = tb.heal_disk("mirror")
    print("healed by", how)
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


def test_power_cut_and_boot_again(tb) -> None:
    g = tb.guest("mirror")
    g.exec("echo durable > /data/durable && sync", check=True)
    assert tb.power_cut("mirror")["mirror"] < 10
    tb.start("mirror")
    assert tb.guest("mirror").read_file("/data/durable") == b"durable\n"


def test_clone(tb) -> None:
    dest = tb.clone("ready", "pytest-clone", say=print)
    try:
        names = sorted(p.name for p in dest.iterdir())
        assert "clone.json" in names and "primary-root.qcow2" in names and "mirror-data.qcow2" in names
        info = subprocess.run(["qemu-img", "snapshot", "-U", "-l", str(dest / "primary-root.qcow2")],
                              capture_output=True, text=True, check=True).stdout
        assert "ready" in info
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def test_down_leaves_nothing(tb) -> None:
    import libvirt

    from testbed import vmbed
    from testbed.registry import Registry

    overlays = [Path(v.root) for v in tb.vms.values()] + [Path(v.data) for v in tb.vms.values()]
    vmbed.down(say=print)
    conn = libvirt.open("qemu:///system")
    assert not [d.name() for d in conn.listAllDomains() if d.name().startswith("smfs-ci-")]
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert "smfs-primary" not in links and "smfs-mirror" not in links
    assert not any(p.exists() for p in overlays)
    assert not Registry().items(owner=tb.owner)
    assert vmbed.down(say=print) == []  # idempotent
