"""testbed.vm.wan without VMs: the choice of enforcement point, netem on the host taps through a fake
netlink, and calibration's probe sizing and bare-path RTT with fake guests."""

from __future__ import annotations

import errno
import json
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.tcmsg import tcmsg

from netem.profile import LinkProfile
from testbed.vm import wan
from testbed.vm.bed import RouterLeg, RouterState, VmTestbedState

MACS = {"primary": "52:54:00:aa:00:01", "mirror": "52:54:00:aa:00:02"}
TAPS = {"primary": "vnet3", "mirror": "vnet7"}


class FakeHostIPR:
    """The host's netlink, as much as Shaper uses: taps with a root qdisc slot each."""

    def __init__(self, override: dict | None = None) -> None:
        self.links = {"vnet3": 30, "vnet7": 70}
        self.roots: dict[int, tcmsg] = {}
        self.override = override or {}
        self.status: dict = {}
        self.closed = 0

    def __enter__(self) -> FakeHostIPR:
        return self

    def __exit__(self, *exc: object) -> None:
        self.closed += 1

    def link_lookup(self, ifname: str) -> list[int]:
        return [self.links[ifname]] if ifname in self.links else []

    def nlm_request(self, msg: Any, msg_type: int, msg_flags: int) -> list:
        opts = msg.get_attr("TCA_OPTIONS")
        for key, value in self.override.items():
            opts[key] = value
        msg.encode()
        dump = tcmsg(bytes(msg.data[: msg["header"]["length"]]))
        dump.decode()
        self.roots[msg["index"]] = dump
        return []

    def get_qdiscs(self, index: int) -> list:
        return [self.roots[index]] if index in self.roots else []

    def tc(self, command: str, *args: Any, **kwargs: Any) -> list:
        assert command == "del" and kwargs.get("root")
        if self.roots.pop(kwargs["index"], None) is None:
            raise NetlinkError(errno.ENOENT, "No such file or directory")
        return []


class FakeDomain:
    def __init__(self, vm: str, running: bool) -> None:
        self.vm, self.running = vm, running

    def XMLDesc(self, flags: int) -> str:  # noqa: N802 - libvirt's name
        target = f"<target dev='{TAPS[self.vm]}'/>" if self.running else ""
        return (f"<domain><devices><interface type='bridge'><mac address='{MACS[self.vm].upper()}'/>"
                f"<source bridge='smfs-{self.vm}'/>{target}<model type='virtio'/></interface></devices></domain>")


class FakeTb:
    """The part of VmTestbed the WAN uses; no guests unless a test adds them."""

    def __init__(self, enforcement: str = "auto", running: tuple[str, ...] = ("primary", "mirror")) -> None:
        self.state = VmTestbedState(name="fake", spec={}, spec_path="<memory>", accel="tcg")
        self.saves = 0
        self.vms = {vm: SimpleNamespace(site=vm, mac=MACS[vm], address=f"198.18.{i}.10/24")
                    for i, vm in enumerate(("primary", "mirror"), 1)}  # fmt: skip
        self.spec = SimpleNamespace(wan_enforcement=enforcement, wan=LinkProfile.from_mapping({"delay": "10ms"}))
        self.running = set(running)
        self.guests: dict[str, Any] = {}

    def update(self, **changes: Any) -> VmTestbedState:
        self.state = replace(self.state, **changes)
        self.saves += 1
        return self.state

    def info(self, vm: str) -> Any:
        return self.vms[vm]

    def domain(self, vm: str) -> FakeDomain:
        return FakeDomain(vm, vm in self.running)

    def guest(self, vm: str) -> Any:
        return self.guests[vm]


def has(netem: bool) -> Any:
    calls = []

    def probe() -> tuple[bool, str]:
        calls.append(1)
        return netem, "fake probe"

    probe.calls = calls  # type: ignore[attr-defined]
    return probe


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(wan.ENFORCEMENT_ENV, raising=False)


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> FakeHostIPR:
    ipr = FakeHostIPR()
    monkeypatch.setattr(wan, "host_ipr", lambda: ipr)
    return ipr


# --------------------------------------------------------------------------- the choice


def test_auto_takes_the_host_only_when_its_kernel_has_netem() -> None:
    assert wan.choose_enforcement("auto", has(True))[0] == wan.HOST_POINT
    point, reason = wan.choose_enforcement("auto", has(False))
    assert point == wan.GUEST_POINT and "no sch_netem" in reason and "fake probe" in reason


def test_guest_is_taken_without_probing_and_host_is_checked() -> None:
    probe = has(True)
    assert wan.choose_enforcement("guest", probe)[0] == wan.GUEST_POINT and probe.calls == []
    assert wan.choose_enforcement("host", has(True))[0] == wan.HOST_POINT
    with pytest.raises(wan.WanError) as info:
        wan.choose_enforcement("host", has(False))
    msg = str(info.value)
    assert msg.startswith('wan.enforcement: "host" needs sch_netem in the host kernel')
    assert "modprobe sch_netem" in msg and '"guest"' in msg and "\n" not in msg


def test_the_environment_overrides_the_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    tb = FakeTb("host")
    assert wan.requested_enforcement(tb) == ("host", "wan.enforcement")
    monkeypatch.setenv(wan.ENFORCEMENT_ENV, "guest")
    assert wan.requested_enforcement(tb) == ("guest", wan.ENFORCEMENT_ENV)
    monkeypatch.setenv(wan.ENFORCEMENT_ENV, "router")
    assert wan.requested_enforcement(tb) == ("router", wan.ENFORCEMENT_ENV)
    with pytest.raises(wan.WanError) as info:  # this testbed was brought up without the router guest
        wan.enforcement(tb, has(True))
    msg = str(info.value)
    assert msg.startswith(f'{wan.ENFORCEMENT_ENV}: "router" needs the router guest') and "\n" not in msg
    assert 'enforcement = "router"' in msg and tb.state.wan_enforcement is None
    monkeypatch.setenv(wan.ENFORCEMENT_ENV, "hots")
    with pytest.raises(wan.WanError, match=rf"^{wan.ENFORCEMENT_ENV}: 'hots' is not one of auto, host, guest"):
        wan.requested_enforcement(tb)


def test_the_choice_is_made_once_and_kept_in_the_state() -> None:
    tb = FakeTb()
    probe = has(False)
    chosen = wan.enforcement(tb, probe)
    assert chosen == {"point": wan.GUEST_POINT, "requested": "auto", "reason": chosen["reason"]}
    assert tb.state.wan_enforcement == chosen and tb.saves == 1
    assert wan.enforcement(tb, probe) == chosen and wan.enforcement_point(tb) == wan.GUEST_POINT
    assert len(probe.calls) == 1 and tb.saves == 1


def test_a_new_request_moves_the_shaping(monkeypatch: pytest.MonkeyPatch, host: FakeHostIPR) -> None:
    tb = FakeTb()
    wan.enforcement(tb, has(True))
    wan.shape(tb, LinkProfile.from_mapping({"delay": "10ms"}))
    assert len(host.roots) == 2
    monkeypatch.setenv(wan.ENFORCEMENT_ENV, "guest")
    assert wan.enforcement_point(tb) == wan.GUEST_POINT
    assert host.roots == {}  # the host taps were cleared before the guests take over


# --------------------------------------------------------------------------- on the host taps


def test_tap_comes_from_the_running_domain_xml() -> None:
    tb = FakeTb(running=("mirror",))
    assert wan.tap_of(tb, "mirror") == "vnet7"  # MAC matched case-insensitively
    assert wan.tap_of(tb, "primary") is None


def test_host_path_shapes_each_sites_ingress_on_its_tap(host: FakeHostIPR) -> None:
    tb = FakeTb()
    wan.enforcement(tb, has(True))
    wan.start_resident(tb)  # nothing to start in the guests (there are none here)
    profile = LinkProfile.from_mapping({"delay": "10ms", "forward": {"delay": "40ms", "loss": "2%"},
                                        "reverse": {"loss": "1%", "burst": 5}})  # fmt: skip
    shaped = wan.shape(tb, profile)
    assert shaped.enforcement_point == wan.HOST_POINT == shaped.to_dict()["enforcement_point"]
    mirror, primary = shaped.read_back["mirror"], shaped.read_back["primary"]
    # the mirror's tap egress is the mirror's ingress: primary → mirror (a→b)
    assert (mirror["direction"], mirror["ifname"], mirror["delay_us"]) == ("a_to_b", "vnet7", pytest.approx(40_000))
    assert mirror["loss_pct"] == pytest.approx(2.0) and mirror["gilbert"] is None
    assert (primary["direction"], primary["ifname"], primary["delay_us"]) == ("b_to_a", "vnet3", pytest.approx(10_000))
    assert primary["gilbert"] == pytest.approx([100 * 0.01 * 0.2 / 0.99, 20, 100, 0])
    shown = wan.read_back(tb)
    assert shown["mirror"]["ifname"] == "vnet7" and shown["mirror"]["read_back"]["delay_us"] == pytest.approx(40_000)
    wan.clear(tb)
    wan.clear(tb)  # idempotent
    assert host.roots == {} and wan.read_back(tb)["mirror"]["read_back"] is None


def test_host_path_errors_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    tb = FakeTb(running=("mirror",))
    wan.enforcement(tb, has(True))
    monkeypatch.setattr(wan, "host_ipr", FakeHostIPR)
    with pytest.raises(wan.WanError, match=r"^primary: no tap on the host \(is the VM running\?\)"):
        wan.shape(tb, LinkProfile())
    wan.clear(tb)  # a VM that is not running has nothing to clear
    tb.running.add("primary")
    monkeypatch.setattr(wan, "host_ipr", lambda: FakeHostIPR(override={"limit": 10}))
    with pytest.raises(wan.WanError) as info:
        wan.shape(tb, LinkProfile.from_mapping({"delay": "10ms"}))
    assert "read-back mismatch" in str(info.value) and "limit" in str(info.value) and "\n" not in str(info.value)


def test_cleared_means_the_bare_path_not_the_specs_profile() -> None:
    tb = FakeTb()
    assert wan.current_profile(tb) == tb.spec.wan
    wan.remember(tb, None)
    assert wan.current_profile(tb) == LinkProfile()


# --------------------------------------------------------------------------- calibration


class FakeGuest:
    """Answers ``netem.calibrate probe`` with canned figures; records what ran."""

    def __init__(self, tb: FakeTb, host: FakeHostIPR) -> None:
        self.tb, self.host = tb, host
        self.probes: list[dict[str, Any]] = []

    def spawn(self, name: str, argv: list[str]) -> None:
        self.probes.append({"spawn": argv})

    def stop(self, name: str) -> bool:
        return True

    def exec(self, argv: list[str], timeout: float = 60) -> Any:
        args = dict(zip(argv[4::2], argv[5::2], strict=False))
        shaped = bool(self.host.roots)
        self.probes.append({"count": int(args["--count"]), "interval": float(args["--interval"]), "shaped": shaped})
        n = int(args["--count"])
        rtt = 23.0 if shaped else 3.0
        out = {"sent": n, "server_received": n, "replies": n, "interval_s": float(args["--interval"]),
               "loss_fwd_pct": 0.0, "loss_rev_pct": 0.0, "loss_pct": 0.0, "rtt_median_ms": rtt,
               "rtt_p10_ms": rtt - 0.2, "rtt_p90_ms": rtt + 0.2, "rtt_p99_ms": rtt + 1, "elapsed_s": 1.0}  # fmt: skip
        return SimpleNamespace(rc=0, out=json.dumps(out), stderr=b"")


def test_calibrate_measures_the_bare_path_once_and_compares_with_it(
    monkeypatch: pytest.MonkeyPatch, host: FakeHostIPR
) -> None:
    monkeypatch.setattr(wan.time, "sleep", lambda s: None)
    tb = FakeTb()
    g = FakeGuest(tb, host)
    tb.guests = {"primary": g, "mirror": g}
    wan.enforcement(tb, has(True))
    profile = LinkProfile.from_mapping({"delay": "10ms", "loss": "10%"})
    wan.shape(tb, profile)
    result = wan.calibrate(tb, profile)
    runs = [p for p in g.probes if "count" in p]
    assert [r["shaped"] for r in runs] == [False, True]  # bare first (WAN cleared), then shaped again
    assert runs[0]["count"] == wan.BARE_PROBES and runs[1]["count"] == 962  # ±20 % each way at 95 %
    assert runs[1]["count"] * runs[1]["interval"] <= 4.5
    assert tb.state.wan_bare["rtt_median_ms"] == 3.0 and len(host.roots) == 2
    rows = {r["metric"]: r for r in result["rows"]}
    assert rows["rtt bare"]["measured"] == 3.0
    assert rows["rtt median"]["configured"] == result["expected_rtt_ms"] == 23.0 and rows["rtt median"]["ok"]
    assert result["enforcement_point"] == wan.HOST_POINT and result["bare"]["enforcement_point"] == wan.HOST_POINT
    g.probes.clear()
    wan.calibrate(tb, profile, probes=300)
    assert [p["count"] for p in g.probes if "count" in p] == [300]  # the bare RTT is known now
    g.probes.clear()
    wan.calibrate(tb, profile, probes=300, remeasure_bare=True)
    assert [p["count"] for p in g.probes if "count" in p] == [wan.BARE_PROBES, 300]


def test_calibrating_the_bare_path_records_it(monkeypatch: pytest.MonkeyPatch, host: FakeHostIPR) -> None:
    monkeypatch.setattr(wan.time, "sleep", lambda s: None)
    tb = FakeTb()
    g = FakeGuest(tb, host)
    tb.guests = {"primary": g, "mirror": g}
    wan.enforcement(tb, has(True))
    result = wan.calibrate(tb, LinkProfile())  # after ./inv shape --clear
    assert [p["count"] for p in g.probes if "count" in p] == [200]
    assert tb.state.wan_bare["rtt_median_ms"] == 3.0 and result["expected_rtt_ms"] == 3.0


# --------------------------------------------------------------------------- in the router guest


ROUTER_LEGS = {"primary": {"ifname": "eth0", "address": "198.18.1.253/24"},
               "mirror": {"ifname": "eth1", "address": "198.18.2.253/24"}}  # fmt: skip


class FakeRouterGuest:
    """The router guest as the WAN drives it: spawned resident shapers (one per NIC, read from their
    argv) answering the FIFO protocol with what the kernel would read back."""

    def __init__(self) -> None:
        self.fifos: dict[str, str] = {}  # fifo -> ifname
        self.spawned: dict[str, list[str]] = {}
        self.qdiscs: dict[str, dict[str, Any] | None] = {}

    def spawn(self, name: str, argv: list[str]) -> int:
        self.spawned[name] = argv
        opts = dict(zip(argv, argv[1:], strict=False))
        self.fifos[opts["--fifo"]] = opts["--ifname"]
        return 42

    def find(self, name: str) -> int | None:
        return 42 if name in self.spawned else None

    def exec(self, argv: list[str], timeout: float = 60, env: dict[str, str] | None = None) -> Any:
        if argv[:2] == ["test", "-p"]:
            return SimpleNamespace(rc=0 if argv[2] in self.fifos else 1, out="", stderr=b"")
        import re

        from netem.shaper import expected_readback

        fifo = re.match(r"f=(\S+);", argv[2]).group(1)  # type: ignore[union-attr]
        if fifo not in self.fifos:
            return SimpleNamespace(rc=9, out="", stderr=b"")
        req = json.loads((env or {})["SMFS_REQ"])
        ifname = self.fifos[fifo]
        out: dict[str, Any] = {"ifname": ifname, "ingress": False}
        if req["command"] == "apply":
            profile = LinkProfile.from_mapping(json.loads(req["json"]), "profile").direction(req["direction"])
            self.qdiscs[ifname] = out["read_back"] = expected_readback(profile)
        elif req["command"] == "show":
            out["read_back"] = self.qdiscs.get(ifname)
        else:
            self.qdiscs[ifname] = None
        return SimpleNamespace(rc=0, out=json.dumps({"rc": 0, "out": out}), stderr=b"")


def router_tb(legs: dict[str, dict[str, str]] = ROUTER_LEGS) -> FakeTb:
    tb = FakeTb("router")
    tb.vms["router"] = SimpleNamespace(site="wan", mac="52:54:00:aa:00:03", address="198.18.1.253/24")
    tb.update(router=RouterState(vm="router", legs={site: RouterLeg(bridge=f"smfs-{site}", mac="52:54:00:aa:00:03", **leg)
                                                    for site, leg in legs.items()}))  # fmt: skip
    tb.guests = {"router": FakeRouterGuest()}
    return tb


def test_router_is_taken_only_when_asked_and_never_probes() -> None:
    probe = has(True)
    point, reason = wan.choose_enforcement("router", probe)
    assert (point, reason, probe.calls) == (wan.ROUTER_POINT, 'wan.enforcement = "router"', [])
    assert wan.choose_enforcement("auto", has(False))[0] == wan.GUEST_POINT  # auto never boots a third guest


def test_each_router_nic_carries_the_direction_towards_its_site() -> None:
    A, B = wan.Direction.A_TO_B, wan.Direction.B_TO_A  # noqa: N806
    assert wan.router_directions({"primary": "eth0", "mirror": "eth1"}) == {"eth0": B, "eth1": A}
    # the NIC names come from the guest (found by MAC), not from their order in the domain XML
    assert wan.router_directions({"primary": "eth1", "mirror": "eth0"}) == {"eth1": B, "eth0": A}
    assert wan.router_fifo("eth1") == "/run/smfs/shaper-eth1.fifo"


def test_router_egress_shapes_both_nics_through_their_resident_shapers() -> None:
    tb = router_tb()
    g = tb.guests["router"]
    assert wan.enforcement(tb, has(True))["point"] == wan.ROUTER_POINT
    assert wan._site_vms(tb) == {"primary": "primary", "mirror": "mirror"}  # the router is in no site
    wan.start_resident(tb)
    assert set(g.spawned) == {"shaper-eth0", "shaper-eth1"}
    argv = g.spawned["shaper-eth1"]
    assert "--ingress" not in argv and argv[argv.index("--ifname") + 1] == "eth1"
    profile = LinkProfile.from_mapping({"delay": "20ms", "forward": {"delay": "40ms", "loss": "2%"}})
    shaped = wan.shape(tb, profile)
    assert shaped.enforcement_point == wan.ROUTER_POINT == shaped.to_dict()["enforcement_point"]
    towards_mirror, towards_primary = shaped.read_back["router/eth1"], shaped.read_back["router/eth0"]
    assert (towards_mirror["direction"], towards_mirror["towards"], towards_mirror["delay_us"]) == ("a_to_b", "mirror", 40_000)
    assert towards_mirror["loss_pct"] == pytest.approx(2.0)
    assert (towards_primary["direction"], towards_primary["towards"], towards_primary["delay_us"]) == ("b_to_a", "primary", 20_000)
    shown = wan.read_back(tb)
    assert shown["router/eth1"]["read_back"]["delay_us"] == 40_000 and shown["router/eth0"]["ifname"] == "eth0"
    wan.clear(tb)
    assert all(v["read_back"] is None for v in wan.read_back(tb).values())


def test_router_for_follows_the_spec_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from testbed.spec import SpecError, from_mapping

    sites = [{"name": "primary", "subnet": "198.18.1.0/24", "vms": [{"name": "primary"}]},
             {"name": "mirror", "subnet": "198.18.2.0/24", "vms": [{"name": "mirror"}]}]  # fmt: skip
    assert wan.router_for(from_mapping({"sites": sites})) is None
    asked = wan.router_for(from_mapping({"sites": sites, "wan": {"enforcement": "router"}}))
    assert [str(leg.address) for leg in asked.legs] == ["198.18.1.253/24", "198.18.2.253/24"]
    monkeypatch.setenv(wan.ENFORCEMENT_ENV, "router")
    assert wan.router_for(from_mapping({"sites": sites})).vm.name == "router"
    with pytest.raises(SpecError, match=rf'^sites: {wan.ENFORCEMENT_ENV} = "router" joins two sites'):
        wan.router_for(from_mapping({"sites": sites[:1]}))


def test_shape_flags_validate_burst_before_touching_the_testbed() -> None:
    from netem.profile import ProfileError
    from testbed.cli.wan import shape_changes

    assert shape_changes(delay="50ms", loss="1%", burst="5") == {"delay": "50ms", "loss": "1%", "burst": "5"}
    assert shape_changes(jitter="2ms") == {"jitter": "2ms"}
    with pytest.raises(ProfileError, match=r"^shape\.burst: '0\.5' is below 1 packet; use a mean burst") as info:
        shape_changes(loss="1%", burst="0.5")
    assert "\n" not in str(info.value)
    profile = LinkProfile.from_mapping({"delay": "25ms"}).with_changes(**shape_changes(loss="1%", burst="5"))
    assert profile.a_to_b.gilbert is not None and profile.a_to_b.gilbert.mean_burst_packets == 5
