"""The spec loader: shipped specs load, bad fields give one line naming the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed import spec as specmod
from testbed.spec import SpecError, from_mapping

REPO = Path(__file__).resolve().parents[2]


def base() -> dict:
    return {
        "name": "t",
        "sites": [
            {"name": "primary", "subnet": "198.18.1.0/24", "vms": [{"name": "primary", "memory": "384MiB",
                                                                  "max_memory": "512MiB"}]},
            {"name": "mirror", "subnet": "198.18.2.0/24", "vms": [{"name": "mirror"}]},
        ],
        "wan": {"delay": "10ms"},
        "workload": {"testers": 4},
    }


@pytest.mark.parametrize("name", ["ci", "default"])
def test_shipped_specs_load(name: str) -> None:
    s = specmod.load(REPO / "specs" / f"{name}.toml")
    assert s.name == name
    assert [v.name for v in s.vms] == ["primary", "mirror"]
    assert s.site("primary").bridge == "smfs-primary"
    assert str(s.site("mirror").gateway) == "198.18.2.254/24"
    assert "workload" in s.sections


def test_defaults_and_addresses() -> None:
    s = from_mapping(base())
    p = s.vm("primary")
    assert (p.memory_mib, p.max_memory_mib, p.vcpus) == (384, 512, 1)
    assert str(p.address) == "198.18.1.10/24"
    assert s.vm("mirror").max_memory == s.vm("mirror").memory
    assert s.accel == "auto"
    assert s.sections["workload"]["testers"] == 4
    with pytest.raises(TypeError):
        s.sections["workload"]["testers"] = 5  # type: ignore[index]


def mutate(path: str, value: object) -> dict:
    d = base()
    target = d
    keys = path.split(".")
    for k in keys[:-1]:
        target = target[int(k)] if k.isdigit() else target[k]
    target[keys[-1]] = value
    return d


@pytest.mark.parametrize(("path", "value", "expect"), [
    ("sites.0.vms.0.memory", "lots", "sites[0] (primary).vms[0].memory"),
    ("sites.0.vms.0.memory", "64MiB", "below the minimum"),
    ("sites.0.vms.0.max_memory", "256MiB", "raise max_memory"),
    ("sites.0.vms.0.vcpus", 0, "vcpus"),
    ("sites.0.vms.0.colour", "red", "unknown field"),
    ("sites.0.vms.0.address", "198.18.2.10", "not a host address of 198.18.1.0/24"),
    ("sites.0.subnet", "10.0.0.0/24", "outside 198.18.0.0/15"),
    ("sites.1.subnet", "198.18.1.0/25", "overlap"),
    ("sites.0.name", "Primary!", "not a valid name"),
    ("sites.1.name", "primary", "appears twice"),
    ("sites.0.uri", "nope", "libvirt URI"),
    ("sites.0.vms", [], "sites[0] (primary).vms: missing"),
])
def test_bad_fields(path: str, value: object, expect: str) -> None:
    with pytest.raises(SpecError) as err:
        from_mapping(mutate(path, value))
    msg = str(err.value)
    assert expect in msg
    assert "\n" not in msg


def test_bad_accel_and_missing_sites() -> None:
    with pytest.raises(SpecError, match="testbed.accel"):
        from_mapping({**base(), "testbed": {"accel": "xen"}})
    with pytest.raises(SpecError, match="sites: missing"):
        from_mapping({"name": "t"})


def test_bad_wan_names_the_field() -> None:
    pytest.importorskip("netem.profile")
    with pytest.raises(SpecError, match="wan"):
        from_mapping({**base(), "wan": {"delay": "fast"}})


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="not found"):
        specmod.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [")
    with pytest.raises(SpecError, match="not valid TOML"):
        specmod.load(bad)


def test_wan_enforcement_defaults_to_auto_and_is_not_a_profile_key() -> None:
    pytest.importorskip("netem.profile")
    assert from_mapping(base()).wan_enforcement == "auto"
    for value in ("auto", "host", "guest"):
        s = from_mapping({**base(), "wan": {"delay": "10ms", "enforcement": value}})
        assert s.wan_enforcement == value and s.wan.a_to_b.delay_us == 10_000
    assert from_mapping({**base(), "wan": {"mode": "guest"}}).wan_enforcement == "guest"  # the name
    assert from_mapping(base()).router is None


@pytest.mark.parametrize(("wan", "expect"), [
    ({"enforcement": "netns"}, "wan.enforcement: 'netns' is not one of auto, host, guest, router; use auto"),
    ({"mode": "hub"}, "wan.mode: 'hub' is not one of"),
    ({"enforcement": "host", "mode": "guest"}, "keep only wan.enforcement"),
    ({"delay": "10ms", "burst": 5}, "wan.burst: a burst needs a loss"),
])
def test_bad_wan_enforcement_is_one_line(wan: dict, expect: str) -> None:
    pytest.importorskip("netem.profile")
    with pytest.raises(SpecError) as err:
        from_mapping({**base(), "wan": wan})
    assert str(err.value).startswith("wan.") and expect in str(err.value)
    assert "\n" not in str(err.value)


def test_router_enforcement_describes_the_router_guest() -> None:
    pytest.importorskip("netem.profile")
    for key in ("enforcement", "mode"):
        s = from_mapping({**base(), "wan": {"delay": "10ms", key: "router"}})
        assert s.wan_enforcement == "router" and s.router is not None
    r = s.router
    assert (r.vm.name, r.vm.site, r.vm.vcpus, r.vm.memory_mib) == ("router", "wan", 1, 256)
    assert [(leg.site, leg.bridge, str(leg.address)) for leg in r.legs] == [
        ("primary", "smfs-primary", "198.18.1.253/24"), ("mirror", "smfs-mirror", "198.18.2.253/24")]
    assert str(r.vm.address) == "198.18.1.253/24" and r.uri == "qemu:///system"
    assert [v.name for v in s.vms] == ["primary", "mirror"]  # the router is no site's VM
    small = mutate("sites.1.subnet", "198.18.2.0/29")
    small["sites"][1]["vms"][0]["address"] = "198.18.2.2"
    assert str(from_mapping({**small, "wan": {"enforcement": "router"}}).router.legs[1].address) == "198.18.2.5/29"


@pytest.mark.parametrize(("path", "value", "expect"), [
    ("sites", [base()["sites"][0]], 'sites: wan.enforcement = "router" joins two sites named primary and mirror, '
                                    "the spec has primary; add the missing [[sites]]"),
    ("sites.1.name", "dr", "sites: wan.enforcement"),
    ("sites.1.uri", "qemu+ssh://far/system", 'sites[1] (mirror).uri: wan.enforcement = "router" needs both sites on one'),
    ("sites.1.vms.0.address", "198.18.2.253", 'sites[1] (mirror).vms[0].address: 198.18.2.253 is the WAN router'),
    ("sites.0.vms.0.name", "router", "sites[0] (primary).vms[0].name: 'router' is the WAN router guest's name"),
    ("sites.0.gateway", "198.18.1.253", "sites[0] (primary).gateway: 198.18.1.253 is the WAN router's address"),
])
def test_router_needs_two_sites_with_room_for_it(path: str, value: object, expect: str) -> None:
    pytest.importorskip("netem.profile")
    data = mutate(path, value)
    from_mapping(data)  # fine without the router
    with pytest.raises(SpecError) as err:
        from_mapping({**data, "wan": {"enforcement": "router"}})
    assert expect in str(err.value) and "\n" not in str(err.value)


def test_data_fs_is_minix_unless_the_spec_says_ext4() -> None:
    assert from_mapping(base()).data_fs == "minix"
    assert from_mapping(base() | {"testbed": {"data_fs": "ext4"}}).data_fs == "ext4"
    with pytest.raises(SpecError, match="testbed.data_fs: 'xfs' is not one of minix, ext4"):
        from_mapping(base() | {"testbed": {"data_fs": "xfs"}})
