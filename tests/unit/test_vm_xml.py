"""Domain XML, image naming and the registry contract of the VM testbed (no libvirt needed)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from testbed.vm.hypervisor import DomainConfig, domain_xml
from vmimages import build

QEMU_NS = "{http://libvirt.org/schemas/domain/qemu/1.0}"


def config(**kw: object) -> DomainConfig:
    base = dict(name="smfs-ci-primary", domain_type="qemu", vcpus=1, memory_mib=384, max_memory_mib=512,
                kernel=Path("/c/vmlinuz"), initrd=Path("/c/initrd.img"), cmdline="root=/dev/vda smfs_ip=198.18.1.10/24",
                root_disk=Path("/c/root.qcow2"), data_socket=Path("/c/disks/primary.sock"), bridge="smfs-primary",
                mac="52:54:00:01:02:03", qmp_socket=Path("/c/qmp/primary.sock"), console_log=Path("/c/console.log"),
                run_as_root=False)
    base.update(kw)
    return DomainConfig(**base)  # type: ignore[arg-type]


def test_domain_xml_shape() -> None:
    root = ET.fromstring(domain_xml(config()))
    assert root.get("type") == "qemu"
    assert root.findtext("memory") == "512" and root.findtext("currentMemory") == "384"
    disks = root.findall("devices/disk")
    assert [d.find("target").get("dev") for d in disks] == ["vda", "vdb"]
    assert root.find("devices/interface/source").get("bridge") == "smfs-primary"
    assert root.find("devices/channel/target").get("name") == "org.qemu.guest_agent.0"
    assert root.find("devices/memballoon/stats").get("period") == "1"
    args = [a.get("value") for a in root.iter(f"{QEMU_NS}arg")]
    assert args == ["-qmp", "unix:/c/qmp/primary.sock,server=on,wait=off"]
    assert root.find("seclabel") is None


def test_data_disk_is_nbd_on_the_servers_socket() -> None:
    root = ET.fromstring(domain_xml(config()))
    vda, vdb = root.findall("devices/disk")
    assert (vda.get("type"), vda.find("driver").get("type"), vda.find("source").get("file")) == \
        ("file", "qcow2", "/c/root.qcow2")
    assert (vdb.get("type"), vdb.get("device")) == ("network", "disk")
    # raw over NBD, and a write cache the guest sees (so it flushes): nbdkit's cache filter keeps the rest
    assert (vdb.find("driver").get("name"), vdb.find("driver").get("type"), vdb.find("driver").get("cache")) == \
        ("qemu", "raw", "writeback")
    assert vdb.find("source").get("protocol") == "nbd"
    host = vdb.find("source/host")
    assert (host.get("transport"), host.get("socket")) == ("unix", "/c/disks/primary.sock")
    assert (vdb.find("target").get("dev"), vdb.find("target").get("bus")) == ("vdb", "virtio")
    assert vdb.find("alias").get("name") == "ua-data"
    # no socket, no data disk (and no file-backed one either)
    nodata = ET.fromstring(domain_xml(config(data_socket=None)))
    assert [d.find("target").get("dev") for d in nodata.findall("devices/disk")] == ["vda"]


def test_uuid_only_when_given() -> None:
    assert ET.fromstring(domain_xml(config())).find("uuid") is None
    uuid = "6f1b2c3d-0000-4000-8000-123456789abc"
    assert ET.fromstring(domain_xml(config(uuid=uuid))).findtext("uuid") == uuid


def test_nbdkit_filters_stack_error_then_cache_then_file(tmp_path: Path) -> None:
    from testbed.vm import disks

    disk = disks.DataDisk(vm="mirror", site="mirror", file=tmp_path / "mirror-data.raw", folder=tmp_path / "disks")
    argv = disks.argv(disk)
    assert argv[0] == "nbdkit" and "--foreground" in argv
    assert argv[argv.index("--unix") + 1] == str(disk.socket) == str(tmp_path / "disks" / "mirror.sock")
    # the first --filter is the one the client talks to: client → error → cache → file
    filters = [a for a in argv if a.startswith("--filter=")]
    assert filters == ["--filter=error", "--filter=cache"]
    plugin = argv.index("file")
    assert argv.index("--filter=cache") < plugin and argv[plugin + 1] == str(disk.file)
    params = set(argv[plugin + 2:])
    assert params == {"cache=writeback", "error=EIO", "error-rate=100%", f"error-file={disk.fail_file}"}
    assert disk.name == "nbdkit:mirror"
    assert not disks.failing(disk)
    disk.folder.mkdir()
    disks.fail(disk)
    assert disks.failing(disk) and disk.fail_file.exists()
    disks.heal(disk)
    disks.heal(disk)  # idempotent
    assert not disks.failing(disk)


def test_domain_xml_kvm_and_root() -> None:
    root = ET.fromstring(domain_xml(config(domain_type="kvm", run_as_root=True)))
    assert root.get("type") == "kvm"
    assert root.find("cpu").get("mode") == "host-passthrough"
    assert root.find("seclabel/label").text == "+0:+0"


def test_image_key_is_stable_and_follows_the_code() -> None:
    assert build.image_key() == build.image_key()
    recipe = build.Recipe.load()
    assert set(recipe.project_packages) >= {"smfs", "workloads", "netem"}
    assert len(build.rootfs_hash(recipe)) == 16


def test_ledger_channel_only_when_a_socket_is_given() -> None:
    names = lambda xml: [t.get("name") for t in ET.fromstring(xml).findall("devices/channel/target")]  # noqa: E731
    assert names(domain_xml(config())) == ["org.qemu.guest_agent.0"]
    root = ET.fromstring(domain_xml(config(ledger_socket=Path("/c/qmp/primary-ledger.sock"))))
    chans = {c.find("target").get("name"): c for c in root.findall("devices/channel")}
    assert set(chans) == {"org.qemu.guest_agent.0", "smfs.ledger"}
    src = chans["smfs.ledger"].find("source")
    assert (src.get("mode"), src.get("path")) == ("bind", "/c/qmp/primary-ledger.sock")


def test_nic_mtu_follows_the_spec() -> None:
    import pytest

    from testbed.spec import SpecError, from_mapping

    assert ET.fromstring(domain_xml(config())).find("devices/interface/mtu").get("size") == "1500"
    assert ET.fromstring(domain_xml(config(mtu=9000))).find("devices/interface/mtu").get("size") == "9000"
    sites = [{"name": "primary", "subnet": "198.18.1.0/24", "vms": [{"name": "primary"}]}]
    assert from_mapping({"sites": sites, "testbed": {"mtu": 9000}}).mtu == 9000
    assert from_mapping({"sites": sites}).mtu == 1500
    for bad in (100, 65536, "9000", 1500.5):
        with pytest.raises(SpecError, match=r"testbed.mtu: .* use 1500 \(Ethernet\) or 9000"):
            from_mapping({"sites": sites, "testbed": {"mtu": bad}})


def test_router_domain_has_a_nic_on_each_site_bridge() -> None:
    from types import SimpleNamespace

    from testbed.spec import from_mapping
    from testbed.vm import bed as vmbed

    sites = [{"name": "primary", "subnet": "198.18.1.0/24", "vms": [{"name": "primary"}]},
             {"name": "mirror", "subnet": "198.18.2.0/24", "vms": [{"name": "mirror"}]}]  # fmt: skip
    spec = from_mapping({"name": "ci", "sites": sites, "wan": {"enforcement": "router"}, "testbed": {"mtu": 9000}})
    router = spec.router
    state = vmbed._router_state(spec.name, router)
    image = SimpleNamespace(kernel=Path("/c/vmlinuz"), initrd=Path("/c/initrd.img"))

    def info(name: str, site: str, address: str, gateway: str, ledger: str = "") -> vmbed.VmInfo:
        return vmbed.VmInfo(name=name, site=site, domain=f"smfs-ci-{name}", uri="qemu:///system", address=address,
                            gateway=gateway, mac=vmbed._mac("ci", name), root=f"/c/{name}-root.qcow2",
                            data=f"/c/{name}-data.raw", qmp=f"/c/qmp/{name}.sock", console=f"/c/{name}.log",
                            ledger=ledger, data_socket=f"/c/disks/{name}.sock")  # fmt: skip

    rinfo = info("router", "wan", str(router.vm.address), "")
    root = ET.fromstring(domain_xml(vmbed._config(router.vm, rinfo, "qemu", image, False, spec.mtu,
                                                  vmbed._router_nics(state))))  # fmt: skip
    nics = [(n.find("source").get("bridge"), n.find("mac").get("address"), n.find("alias").get("name"),
             n.find("mtu").get("size")) for n in root.findall("devices/interface")]  # fmt: skip
    legs = state.legs
    assert nics == [("smfs-primary", legs["primary"].mac, "ua-net0", "9000"),
                    ("smfs-mirror", legs["mirror"].mac, "ua-net1", "9000")]  # fmt: skip
    assert legs["primary"].mac == rinfo.mac != legs["mirror"].mac
    cmdline = root.findtext("os/cmdline")
    assert "smfs_ip=198.18.1.253/24" in cmdline and "smfs_gw" not in cmdline and "smfs_host=router" in cmdline
    assert (root.findtext("memory"), root.findtext("vcpu")) == ("256", "1")
    # every VM's data disk is served the same way, the router's too
    assert root.find("devices/disk[@type='network']/source/host").get("socket") == "/c/disks/router.sock"
    assert [t.get("name") for t in root.findall("devices/channel/target")] == ["org.qemu.guest_agent.0"]
    # each site routes the other's subnet via the router's address on its own bridge
    assert vmbed.site_routes(router) == state.routes == {"primary": [["198.18.2.0/24", "198.18.1.253"]],
                                                            "mirror": [["198.18.1.0/24", "198.18.2.253"]]}  # fmt: skip
    # a site VM keeps its single NIC on its own bridge and its default route via the host
    pinfo = info("primary", "primary", "198.18.1.10/24", "198.18.1.254", "/c/qmp/primary-ledger.sock")
    proot = ET.fromstring(domain_xml(vmbed._config(spec.vm("primary"), pinfo, "qemu", image, False, spec.mtu)))
    assert [n.find("source").get("bridge") for n in proot.findall("devices/interface")] == ["smfs-primary"]
    assert "smfs_gw=198.18.1.254 smfs_host=primary" in proot.findtext("os/cmdline")


def test_a_missing_nbdkit_says_how_to_get_it(monkeypatch) -> None:
    import pytest

    from testbed.vm import disks

    monkeypatch.setattr(disks.shutil, "which", lambda _name: None)
    monkeypatch.setattr(disks.os.path, "exists", lambda _p: False)
    with pytest.raises(disks.DiskError, match=r"install nbdkit \(./inv installs it\)"):
        disks.nbdkit_path()
