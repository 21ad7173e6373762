"""The router guest as the WAN's enforcement point: specs/ci.toml with ``[wan] enforcement = "router"``.

``up`` boots a third VM ``router`` with a NIC on each site bridge (.253); the sites route each other
through it, netem runs on its egress towards each site (read back), calibration measures 2·delay +
the bare path, packets queued in the router outlive the primary's power cut, and ``down`` removes
the router with everything else.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NAME = "ci-router"
PORT = 7799
COUNT = 200
RECEIVER = f"""
import os, socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind(("0.0.0.0", {PORT}))
s.settimeout(0.2)
n, shown = 0, -1
while True:
    try:
        s.recv(2048)
        n += 1
        if n % 50:
            continue
    except TimeoutError:
        pass
    if n != shown:
        open("/run/smfs/udp.count.tmp", "w").write(str(n))
        os.replace("/run/smfs/udp.count.tmp", "/run/smfs/udp.count")
        shown = n
"""


@pytest.fixture(scope="module")
def rtb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from testbed.vm import bed as vmbed

    if (vmbed.testbeds_dir() / "active").exists():
        pytest.skip("a testbed is already up (./inv down first); this test brings up its own")
    text = (REPO / "specs" / "ci.toml").read_text()
    text = text.replace('name = "ci"', f'name = "{NAME}"', 1).replace("[wan]\n", '[wan]\nenforcement = "router"\n', 1)
    spec = tmp_path_factory.mktemp("spec") / f"{NAME}.toml"
    spec.write_text(text)
    bed = vmbed.up(spec, say=print)
    try:
        yield bed
    finally:
        vmbed.down(say=print)


def _ifnames(tb) -> dict[str, str]:
    return {site: leg.ifname for site, leg in tb.state.router.legs.items()}


def test_the_router_is_a_vm_of_no_site(rtb) -> None:
    assert rtb.router == "router"
    assert (rtb.site_vms("primary"), rtb.site_vms("mirror"), rtb.site_vms("wan")) == (["primary"], ["mirror"], ["router"])
    st = rtb.status()
    rows = {v["vm"]: v for v in st["vms"]}
    assert {vm: r["state"] for vm, r in rows.items()} == {"primary": "running", "mirror": "running", "router": "running"}
    assert all(r["agent"] for r in rows.values())
    assert (rows["router"]["site"], rows["router"]["address"]) == ("wan", "198.18.1.253/24, 198.18.2.253/24")
    assert sorted(b["name"] for b in st["bridges"]) == ["smfs-mirror", "smfs-primary"]
    assert sorted(_ifnames(rtb).values()) == ["eth0", "eth1"]
    shown = subprocess.run([str(REPO / "inv"), "status"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert shown.returncode == 0 and "WAN router router:" in shown.stdout, shown.stdout + shown.stderr


def test_sites_route_each_other_through_the_router(rtb) -> None:
    p, m = rtb.guest("primary"), rtb.guest("mirror")
    assert "via 198.18.1.253" in p.sh("ip route get 198.18.2.10")
    assert "via 198.18.2.253" in m.sh("ip route get 198.18.1.10")
    m.spawn("tcpdump", ["tcpdump", "-e", "-n", "-l", "-c", "3", "-i", "eth0", "icmp and src host 198.18.1.10"])
    deadline = time.monotonic() + 30
    while b"listening on" not in m.read_file("/run/smfs/tcpdump.log"):
        assert time.monotonic() < deadline, "tcpdump did not start in the mirror"
        time.sleep(0.3)
    assert p.exec(["ping", "-c", "3", "-i", "0.3", "-W", "3", "198.18.2.10"], timeout=30).rc == 0
    deadline = time.monotonic() + 15
    while m.find("tcpdump") is not None and time.monotonic() < deadline:
        time.sleep(0.3)
    m.stop("tcpdump")
    seen = [ln for ln in m.read_file("/run/smfs/tcpdump.log").decode().splitlines() if "echo request" in ln]
    router_mac = rtb.state.router.legs["mirror"].mac
    assert seen and all(router_mac in ln.split(">")[0] for ln in seen), seen  # sent by the router's mirror NIC


def test_shape_reads_back_on_the_routers_egress(rtb) -> None:
    from testbed.vm import wan

    chosen = wan.enforcement(rtb)
    assert (chosen["point"], chosen["requested"]) == ("router-egress", "router")
    wan.start_resident(rtb)
    profile = rtb.spec.wan.with_changes(delay="20ms", loss="0%")
    shaped = wan.shape(rtb, profile)
    wan.remember(rtb, profile)
    names = _ifnames(rtb)
    to_mirror, to_primary = f"router/{names['mirror']}", f"router/{names['primary']}"
    assert set(shaped.read_back) == {to_mirror, to_primary} and shaped.enforcement_point == "router-egress"
    assert (shaped.read_back[to_mirror]["direction"], shaped.read_back[to_mirror]["delay_us"]) == ("a_to_b", 20000)
    assert (shaped.read_back[to_primary]["direction"], shaped.read_back[to_primary]["delay_us"]) == ("b_to_a", 20000)
    assert "netem" in rtb.guest("router").sh(f"tc qdisc show dev {names['mirror']}")  # iproute2 agrees
    assert wan.read_back(rtb)[to_mirror]["read_back"]["delay_us"] == 20000
    for vm in ("primary", "mirror"):  # nothing is shaped in the sites themselves
        assert "netem" not in rtb.guest(vm).sh("tc qdisc show")


def test_calibration_measures_twice_the_delay_plus_the_bare_path(rtb) -> None:
    from netem.calibrate import format_table
    from testbed.vm import wan

    profile = wan.current_profile(rtb)
    cal = wan.calibrate(rtb, profile)
    print(format_table(cal["rows"]))
    rows = {r["metric"]: r for r in cal["rows"]}
    bare = rtb.state.wan_bare
    assert cal["enforcement_point"] == bare["enforcement_point"] == "router-egress"
    # Within 5 ms, not calibrate's own ±(5 % + bare p10-p90) band: the bare path's median through a TCG
    # router moves by ~3 ms between measurements (1.6-4.5 ms here), the shaped one stayed at 42.6-44.8 ms.
    assert abs(rows["rtt median"]["measured"] - (40 + bare["rtt_median_ms"])) <= 5, (rows["rtt median"], bare)
    assert cal["measured"]["loss_pct"] < 2


def test_packets_queued_in_the_router_reach_the_mirror_after_the_primary_is_destroyed(rtb) -> None:
    from testbed.vm import wan

    mirror, primary = rtb.guest("mirror"), rtb.guest("primary")
    wan.shape(rtb, wan.current_profile(rtb))
    primary.sh("ping -c 2 -i 0.3 -W 2 198.18.2.10")  # the router learns the mirror's MAC before the long delay
    wan.shape(rtb, wan.current_profile(rtb).with_changes("a_to_b", delay="5s"))
    mirror.write_file("/run/smfs/receiver.py", RECEIVER.encode())
    mirror.spawn("receiver", ["python3", "/run/smfs/receiver.py"])
    while mirror.exec(["test", "-e", "/run/smfs/udp.count"]).rc != 0:
        time.sleep(0.2)
    sent = primary.python(f"import socket, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                          f"for i in range({COUNT}): s.sendto(i.to_bytes(4, 'big') * 64, ('198.18.2.10', {PORT})); "
                          f"time.sleep(0.002)\nprint({COUNT})").out.strip()
    rtb.set_link("primary", False)
    rtb.destroy("primary")
    at_cut = int(mirror.read_file("/run/smfs/udp.count"))
    assert sent == str(COUNT) and at_cut < COUNT, "the packets should still be queued in the router"
    deadline = time.monotonic() + 60
    got = at_cut
    while got < COUNT and time.monotonic() < deadline:
        time.sleep(0.5)
        got = int(mirror.read_file("/run/smfs/udp.count"))
    assert got == COUNT, f"{COUNT - got} of {COUNT} packets sent before the power cut never arrived"


def test_a_rebooted_site_vm_routes_through_the_router_again(rtb) -> None:
    from testbed.vm import wan

    wan.shape(rtb, wan.current_profile(rtb))  # 20 ms again, not the test before's 5 s
    rtb.start("primary")  # destroyed by the test before; a fresh boot only has the host's default route
    p = rtb.guest("primary")
    assert "via 198.18.1.253" in p.sh("ip route get 198.18.2.10")
    assert p.exec(["ping", "-c", "2", "-W", "3", "198.18.2.10"], timeout=20).rc == 0


def test_a_rebooted_router_forwards_and_shapes_again(rtb) -> None:
    from testbed.vm import wan

    profile = wan.current_profile(rtb)
    assert profile.a_to_b.delay_us == 20000  # remembered by the shaping test
    rtb.destroy("router")
    rtb.start("router")  # a fresh kernel: no addresses, no forwarding, no netem until start puts them back
    assert {leg["read_back"]["delay_us"] for leg in wan.read_back(rtb).values()} == {20000}
    assert rtb.guest("primary").exec(["ping", "-c", "2", "-W", "3", "198.18.2.10"], timeout=20).rc == 0


def test_restore_and_a_booted_clone_keep_the_wan_shaped_as_at_the_snapshot(rtb) -> None:
    """The shaping lives in the router's memory: a restore or a clone brings it back, and the testbed's
    record of the WAN (what ./inv calibrate compares with, what ./inv shape changes) must follow it."""
    import shutil

    from testbed.vm import bed as vmbed
    from testbed.vm import wan

    def delays(tb) -> set[int]:
        return {leg["read_back"]["delay_us"] for leg in wan.read_back(tb).values()}

    at_snap = rtb.spec.wan.with_changes(delay="20ms", loss="0%")
    wan.shape(rtb, at_snap)
    wan.remember(rtb, at_snap)
    rtb.snapshot("shaped", say=print)
    dest = rtb.clone("shaped", "pytest-router-clone", say=print)
    try:
        later = at_snap.with_changes(delay="5ms")
        wan.shape(rtb, later)
        wan.remember(rtb, later)
        rtb.restore("shaped", say=print)
        assert delays(rtb) == {20000} and wan.current_profile(rtb) == at_snap
        vmbed.down(say=print)
        bed = vmbed.up(rtb.spec, say=print, clone="pytest-router-clone")
        try:
            assert bed.router == "router" and delays(bed) == {20000} and wan.current_profile(bed) == at_snap
            p = bed.guest("primary")
            assert "via 198.18.1.253" in p.sh("ip route get 198.18.2.10")
            assert p.exec(["ping", "-c", "2", "-W", "3", "198.18.2.10"], timeout=20).rc == 0
        finally:
            vmbed.down(say=print)
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def test_down_leaves_nothing(rtb) -> None:
    import libvirt

    from testbed.registry import Registry
    from testbed.vm import bed as vmbed

    overlays = [Path(v.root) for v in rtb.vms.values()] + [Path(v.data) for v in rtb.vms.values()]
    assert len(overlays) == 6
    vmbed.down(say=print)
    conn = libvirt.open("qemu:///system")
    assert not [d.name() for d in conn.listAllDomains() if d.name().startswith(f"smfs-{NAME}-")]
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert "smfs-primary" not in links and "smfs-mirror" not in links
    assert not any(p.exists() for p in overlays)
    assert not Registry().items(owner=rtb.owner)
    assert vmbed.down(say=print) == []
