"""netem arguments, the netlink message against iproute2's, read-back and clear with a fake IPRoute;
IFB plumbing and the missing-netem error for real in a throwaway namespace (skipped unless root)."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import TC_H_ROOT
from pyroute2.netlink.rtnl.tcmsg import tcmsg

from netem.profile import DirectionProfile, LinkProfile
from netem.shaper import (
    IfbShaper,
    NetemMsg,
    ShapeMismatch,
    Shaper,
    ShaperError,
    _main,
    expected_readback,
    ifb_name,
    load_distribution,
    netem_args,
    netem_message,
    netem_options,
    parse_netem,
)


def one(spec: dict) -> DirectionProfile:
    return LinkProfile.from_mapping(spec).a_to_b


# --------------------------------------------------------------------------- arguments (units)


def test_args_units_delay_us_loss_percent() -> None:
    args = netem_args(one({"delay": "50ms", "jitter": "200us", "loss": "1%", "duplicate": "0.5%"}))
    # limit: 1 Gbit/s (assumed line rate) × 50.2 ms / 1500 B = 4184 packets, ×2 headroom
    assert args == {"delay": 50_000, "jitter": 200, "limit": 2 * 4184, "loss": 1.0, "duplicate": 0.5}


def test_args_rate_is_bytes_per_second_and_limit_follows() -> None:
    args = netem_args(one({"delay": "100ms", "rate": "100mbit"}))
    assert args["rate"] == 12_500_000
    assert args["limit"] == 2 * 834
    assert netem_args(one({"delay": "1ms", "rate": "10Mbps"}))["rate"] == 10_000_000


def test_args_reorder_corrupt_and_gap_default() -> None:
    args = netem_args(one({"delay": "10ms", "reorder": "25%", "corrupt": "0.1%"}))
    assert (args["prob_reorder"], args["gap"], args["prob_corrupt"]) == (25.0, 1, 0.1)
    assert netem_args(one({"delay": "10ms", "reorder": "25%", "reorder_gap": 5}))["gap"] == 5
    assert "prob_reorder" not in netem_args(one({"delay": "10ms"}))


def test_args_extras_only_when_used() -> None:
    plain = netem_args(one({"delay": "10ms", "jitter": "1ms"}))
    assert "loss_ge" not in plain and "distribution" not in plain
    ge = netem_args(
        one({"loss_model": "gilbert", "ge_p": "1%", "ge_r": "30%", "ge_h": "50%", "ge_k": "0.1%"})
    )
    assert ge["loss_ge"] == (1.0, 30.0, 50.0, 0.1) and ge["loss"] == 0
    assert (
        netem_args(one({"delay": "10ms", "jitter": "1ms", "jitter_dist": "pareto"}))["distribution"]
        == "pareto"
    )


def test_options_convert_like_pyroute2() -> None:
    from pyroute2.netlink.rtnl.tcmsg.common import tick_in_usec

    opts = netem_options(netem_args(one({"delay": "50ms", "jitter": "10ms", "loss": "1%"})))
    assert opts["delay"] == int(50_000 * tick_in_usec) and opts["jitter"] == int(10_000 * tick_in_usec)
    assert opts["loss"] == round((2**32 - 1) / 100)


# iproute2 `tc qdisc replace dev lo root netem delay 50ms 10ms distribution normal loss gemodel 1% 10% 70% 0.1%
#   rate 1gbit limit 5000 reorder 5% gap 3 duplicate 1% corrupt 0.1%` (captured with strace, psched tick 64 ns):
# TCA_OPTIONS up to the DELAY_DIST header; the table that follows is normal.dist.
TC_NETEM_OPTIONS = bytes.fromhex(
    "c2eb0b00881300000000000003000000295c8f025a6202000c000300cdcccc0c000000000c00040037894100000000"
    "001800058014000200295c8f029a999919cdcccc4c37894100140006004059730700000000000000000000000004200200"
)


def _options_bytes(msg: NetemMsg) -> bytes:
    msg.encode()
    data = bytes(msg.data[: msg["header"]["length"]])
    off = 16 + 20
    while off < len(data):
        length, kind = struct.unpack_from("HH", data, off)
        if kind & 0x7FFF == 2:
            return data[off + 4 : off + length]
        off += (length + 3) & ~3
    raise AssertionError("no TCA_OPTIONS")


def test_message_matches_iproute2_byte_for_byte() -> None:
    from pyroute2.netlink.rtnl.tcmsg.common import tick_in_usec

    if tick_in_usec != 15.625:
        pytest.skip("fixture captured with 64 ns psched ticks")
    try:
        table = load_distribution("normal")
    except ShaperError:
        pytest.skip("iproute2's normal.dist is not installed")
    p = one({"delay": "50ms", "jitter": "10ms", "jitter_dist": "normal", "loss_model": "gilbert", "ge_p": "1%",
             "ge_r": "10%", "ge_h": "70%", "ge_k": "0.1%", "rate": "1gbit", "limit": 5000, "reorder": "5%",
             "reorder_gap": 3, "duplicate": "1%", "corrupt": "0.1%"})  # fmt: skip
    raw = _options_bytes(netem_message(1, netem_args(p)))
    assert raw[: len(TC_NETEM_OPTIONS)] == TC_NETEM_OPTIONS
    assert raw[len(TC_NETEM_OPTIONS) :] == table


# iproute2 `tc qdisc replace dev lo root netem delay 10ms loss gemodel 0.20202020202% 20% 100% 0%` (strace,
# 64 ns ticks): what `--loss 1% --burst 5` must send (p = 0.01·0.2/0.99, r = 1/5, 1-h = 100 %, 1-k = 0 %).
TC_NETEM_BURST = bytes.fromhex(
    "5a620200e80300000000000000000000000000000000000018000580140002005e658400333333330000000000000000"
)


def test_burst_becomes_gemodel_arguments_and_iproute2s_message() -> None:
    from pyroute2.netlink.rtnl.tcmsg.common import tick_in_usec

    p = one({"delay": "10ms", "loss": "1%", "burst": 5, "limit": 1000})
    args = netem_args(p)
    assert args["loss"] == 0 and args["loss_ge"] == (pytest.approx(100 * 0.01 * 0.2 / 0.99), 20.0, 100.0, 0.0)
    if tick_in_usec == 15.625:
        assert _options_bytes(netem_message(1, args)) == TC_NETEM_BURST
    got = parse_netem(_dump(2, args))
    assert got["gilbert"] == pytest.approx([args["loss_ge"][0], 20, 100, 0]) and got["loss_pct"] == 0
    assert Shaper(FakeIPRoute(), "eth0").apply(p)["gilbert"] == pytest.approx(list(args["loss_ge"]))


NLA_ORDER_SCRIPT = """
from pyroute2.netlink.rtnl.tcmsg import tcmsg
plain = tcmsg()
plain["index"] = 1
plain["attrs"] = [["TCA_KIND", "netem"], ["TCA_OPTIONS", {"delay": 1, "limit": 1000, "attrs": []}]]
plain.encode()  # compiles pyroute2's tcmsg and sched_netem.options first, as a qdisc dump would
tcmsg(bytes(plain.data[: plain["header"]["length"]])).decode()
from netem.profile import LinkProfile
from netem.shaper import NetemMsg, netem_args, netem_message, parse_netem
args = netem_args(LinkProfile.from_mapping({"delay": "5ms", "loss": "1%", "burst": 5}).a_to_b)
msg = netem_message(2, args)
msg["attrs"][1][1]["attrs"].append(["TCA_NETEM_LATENCY64", 5_000_123])
msg.encode()
dump = tcmsg(bytes(msg.data[: msg["header"]["length"]]))
dump.decode()
got = parse_netem(dump)
assert got["gilbert"] is not None and abs(got["delay_us"] - 5000.123) < 1e-6, got
print("ok")
"""


def test_netem_classes_keep_their_own_nla_tables_whatever_pyroute2_compiled_first() -> None:
    """pyroute2 caches compiled NLA tables per class, inherited by subclasses: our NetemMsg/NetemOptions must
    not reuse tcmsg's/sched_netem's when those were compiled first (a fresh interpreter, to control the order)."""
    import sys

    res = subprocess.run([sys.executable, "-c", NLA_ORDER_SCRIPT], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # fmt: skip
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_missing_distribution_table_is_one_line(tmp_path: Any) -> None:
    with pytest.raises(ShaperError, match="needs iproute2's normal.dist") as info:
        load_distribution("normal", [str(tmp_path)])
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- fake IPRoute


def _dump(index: int, args: dict, extra_attrs: list | None = None) -> tcmsg:
    """A qdisc dump message as the kernel would send it (encoded, then decoded by pyroute2's tcmsg)."""
    msg = netem_message(index, {k: v for k, v in args.items() if k != "distribution"})
    if extra_attrs:
        msg["attrs"][1][1]["attrs"].extend(extra_attrs)
    msg.encode()
    parsed = tcmsg(bytes(msg.data[: msg["header"]["length"]]))
    parsed.decode()
    return parsed


class FakeIPRoute:
    """Just enough of pyroute2.IPRoute: one interface, a root qdisc slot, call log."""

    def __init__(self, kernel_args_override: dict | None = None, netem_known: bool = True) -> None:
        self.links = {"eth0": 2}
        self.root: tcmsg | None = None
        self.override = kernel_args_override or {}
        self.netem_known = netem_known
        self.calls: list[tuple] = []
        self.status: dict = {}

    def link_lookup(self, ifname: str) -> list[int]:
        return [self.links[ifname]] if ifname in self.links else []

    def nlm_request(self, msg: Any, msg_type: int, msg_flags: int) -> list:
        self.calls.append(("nlm_request", msg_type, msg_flags))
        if not self.netem_known:
            raise NetlinkError(errno.ENOENT, "Specified qdisc kind is unknown.")
        opts = msg.get_attr("TCA_OPTIONS")
        args = {"delay": opts["delay"], "jitter": opts["jitter"]}
        self.applied = args
        self.root = self._kernel(msg)
        return []

    def _kernel(self, msg: Any) -> tcmsg:
        msg.encode()
        raw = bytes(msg.data[: msg["header"]["length"]])
        parsed = NetemMsg(raw)
        parsed.decode()
        opts = parsed.get_attr("TCA_OPTIONS")
        for key, value in self.override.items():
            opts[key] = value
        rebuilt = NetemMsg()
        rebuilt["index"], rebuilt["handle"], rebuilt["parent"] = msg["index"], 0x80010000, TC_H_ROOT
        rebuilt["attrs"] = [["TCA_KIND", "netem"], ["TCA_OPTIONS", {k: opts[k] for k in
                            ("delay", "limit", "loss", "gap", "duplicate", "jitter")} | {"attrs": opts["attrs"]}]]  # fmt: skip
        rebuilt.encode()
        out = tcmsg(bytes(rebuilt.data[: rebuilt["header"]["length"]]))
        out.decode()
        return out

    def get_qdiscs(self, index: int) -> list:
        return [self.root] if self.root is not None else []

    def tc(self, command: str, *args: Any, **kwargs: Any) -> list:
        self.calls.append(("tc", command, args, kwargs))
        if command == "del":
            if self.root is None:
                raise NetlinkError(errno.ENOENT, "No such file or directory")
            self.root = None
        return []


def test_apply_sends_replace_and_verifies() -> None:
    ipr = FakeIPRoute()
    p = one({"delay": "50ms", "jitter": "5ms", "loss": "1%", "rate": "100mbit", "reorder": "5%"})
    got = Shaper(ipr, "eth0").apply(p)
    assert got["delay_us"] == pytest.approx(50_000, abs=1) and got["loss_pct"] == pytest.approx(1.0)
    assert got["rate_bps"] == 100_000_000 and got["limit"] == p.effective_limit
    from pyroute2.netlink import NLM_F_CREATE, NLM_F_REPLACE

    assert (
        ipr.calls[0][0] == "nlm_request"
        and ipr.calls[0][2] & NLM_F_REPLACE
        and ipr.calls[0][2] & NLM_F_CREATE
    )


def test_read_back_catches_a_different_delay() -> None:
    from pyroute2.netlink.rtnl.tcmsg.common import tick_in_usec

    ipr = FakeIPRoute(kernel_args_override={"delay": int(40_000 * tick_in_usec)})
    with pytest.raises(ShapeMismatch) as info:
        Shaper(ipr, "eth0").apply(one({"delay": "50ms"}))
    err = info.value
    assert err.field == "delay_us" and err.configured == 50_000 and err.read_back == pytest.approx(40_000)
    assert "eth0: netem delay_us is 40000" in str(err) and "configured 50000" in str(err)


def test_read_back_catches_a_small_limit() -> None:
    ipr = FakeIPRoute(kernel_args_override={"limit": 1000})
    with pytest.raises(ShapeMismatch, match="limit"):
        Shaper(ipr, "eth0").apply(one({"delay": "50ms", "rate": "1gbit"}))


def test_read_back_tolerates_tick_rounding() -> None:
    ipr = FakeIPRoute()
    p = one({"delay": "1234us", "jitter": "7us", "loss": "0.001%", "rate": "1001bit"})
    Shaper(ipr, "eth0").apply(p)  # 7 µs = 109.375 ticks → 109; rate 1001 bit → 125 B/s


def test_read_back_prefers_the_kernels_64_bit_latency() -> None:
    args = netem_args(one({"delay": "50ms", "jitter": "1ms"}))
    dump = _dump(2, args, [["TCA_NETEM_LATENCY64", 50_000_123], ["TCA_NETEM_JITTER64", 1_000_000]])
    got = parse_netem(dump)
    assert got["delay_us"] == pytest.approx(50_000.123) and got["jitter_us"] == 1000


def test_read_back_decodes_gilbert_elliott() -> None:
    p = one(
        {"delay": "5ms", "loss_model": "gilbert", "ge_p": "2%", "ge_r": "40%", "ge_h": "60%", "ge_k": "1%"}
    )
    got = parse_netem(_dump(2, netem_args(p)))
    assert got["gilbert"] == pytest.approx([2, 40, 60, 1])
    assert not [k for k, v in expected_readback(p).items() if v is None and got[k] is not None]


def test_verify_reports_a_missing_netem() -> None:
    ipr = FakeIPRoute()
    with pytest.raises(ShapeMismatch, match="qdisc"):
        Shaper(ipr, "eth0").verify(one({"delay": "5ms"}))


def test_missing_netem_is_a_one_line_error() -> None:
    ipr = FakeIPRoute(netem_known=False)
    shaper = Shaper(ipr, "eth0")
    shaper._netem_known = lambda: False  # type: ignore[method-assign]
    with pytest.raises(ShaperError, match=r"^eth0: netem is not available in this kernel: ") as info:
        shaper.apply(one({"delay": "5ms"}))
    assert "\n" not in str(info.value) and "sch_netem" in str(info.value)


def test_clear_is_idempotent() -> None:
    ipr = FakeIPRoute()
    shaper = Shaper(ipr, "eth0")
    shaper.apply(one({"delay": "5ms"}))
    shaper.clear()
    shaper.clear()
    Shaper(ipr, "nope0").clear()
    assert ipr.root is None


def test_unknown_interface() -> None:
    with pytest.raises(ShaperError, match="^nope0: no such interface$"):
        Shaper(FakeIPRoute(), "nope0").apply(one({"delay": "5ms"}))


def test_ifb_name_fits_ifnamsiz() -> None:
    assert ifb_name("eth0") == "ifb-eth0"
    assert len(ifb_name("enp0s31f6-long")) == 15


def test_cli_rejects_bad_profile_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(["apply", "--ifname", "eth0", "--json", '{"loss": "2"}']) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("shaper: profile.loss: ")


# --------------------------------------------------------------------------- for real, in a namespace

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


@pytest.fixture
def two_namespaces() -> Iterator[tuple[str, str]]:
    """Namespaces A and B joined by veth nm0 (198.18.251.1) / nm1 (198.18.251.2)."""
    a, b = f"smfs-nm-a{os.getpid()}", f"smfs-nm-b{os.getpid()}"
    created = []
    try:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            created.append(ns)
        subprocess.run(["ip", "-n", a, "link", "add", "nm0", "type", "veth", "peer", "name", "nm1", "netns", b],
                       check=True)  # fmt: skip
        for ns, dev, addr in ((a, "nm0", "198.18.251.1"), (b, "nm1", "198.18.251.2")):
            subprocess.run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
        yield a, b
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], check=False)


def _tx_packets(ipr: Any, ifname: str) -> int:
    (link,) = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])
    return link.get_attr("IFLA_STATS64")["tx_packets"]


@needs_root
def test_ifb_redirect_plumbing_for_real(two_namespaces: tuple[str, str]) -> None:
    from pyroute2 import NetNS

    a, b = two_namespaces
    ipr = NetNS(b)
    try:
        shaper = IfbShaper(ipr, "nm1")
        shaper.setup()
        shaper.setup()  # idempotent
        ifb_index = ipr.link_lookup(ifname="ifb-nm1")[0]
        assert shaper.redirect_target() == ifb_index
        before = _tx_packets(ipr, "ifb-nm1")
        ping = subprocess.run(["ip", "netns", "exec", a, "ping", "-c", "5", "-i", "0.05", "-W", "1", "198.18.251.2"],
                              capture_output=True, text=True)  # fmt: skip
        assert ping.returncode == 0, ping.stdout + ping.stderr  # traffic still flows through the ifb
        time.sleep(0.1)
        assert _tx_packets(ipr, "ifb-nm1") - before >= 5  # ...and really went through it
        shaper.clear()
        shaper.clear()
        assert ipr.link_lookup(ifname="ifb-nm1") == [] and shaper.redirect_target() is None
    finally:
        ipr.close()


@needs_root
def test_apply_without_netem_fails_cleanly_for_real(two_namespaces: tuple[str, str]) -> None:
    from pyroute2 import NetNS

    from netem.shaper import Shaper as RealShaper

    _, b = two_namespaces
    ipr = NetNS(b)
    try:
        shaper = RealShaper(ipr, "nm1")
        if shaper._netem_known():
            pytest.skip("this kernel has sch_netem")
        with pytest.raises(ShaperError, match=r"^nm1: netem is not available in this kernel: ") as info:
            shaper.apply(one({"delay": "25ms", "loss": "1%"}))
        assert "\n" not in str(info.value)
        assert shaper.read_back() is None
        shaper.clear()
        shaper.clear()
    finally:
        ipr.close()


def test_resident_shaper_answers_each_request_in_its_own_reply_file(tmp_path) -> None:
    import json as _json
    import threading
    import time as _time

    from netem.shaper import ShapeMismatch, serve

    class FakeShaper:
        def __init__(self) -> None:
            self.applied = []

        def apply(self, profile):
            self.applied.append(profile.delay_us)
            if profile.delay_us == 7000:
                raise ShapeMismatch("ifb-eth0", "delay_us", 7000, 6000)
            return {"delay_us": profile.delay_us}

    fake = FakeShaper()
    fifo = str(tmp_path / "shaper.fifo")
    threading.Thread(target=serve, args=(fake, "eth0", True, fifo), daemon=True).start()
    while not (tmp_path / "shaper.fifo").exists():
        _time.sleep(0.01)

    def ask(rid: str, profile: dict) -> dict:
        with open(fifo, "w") as f:
            f.write(_json.dumps({"id": rid, "command": "apply", "json": _json.dumps(profile)}) + "\n")
        reply = tmp_path / f"shaper.fifo.{rid}.reply"
        while not reply.exists():
            _time.sleep(0.01)
        return _json.loads(reply.read_text())

    ok = ask("a1", {"delay": "25ms"})
    assert ok["rc"] == 0 and ok["out"]["read_back"] == {"delay_us": 25000}
    bad = ask("a2", {"delay": "7ms"})
    assert bad["rc"] == 1 and "mismatch" in bad["out"] and "delay_us" in bad["out"]
    invalid = ask("a3", {"delay": "fast"})
    assert invalid["rc"] == 2 and "delay" in invalid["out"]
    assert fake.applied == [25000, 7000]
