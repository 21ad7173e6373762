"""The VM drill's pure parts: config from a spec, the fault schedule's order, the report (no VMs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from smfs.modes import parse_modes
from testbed.drill import faults
from testbed.drill.vm import DrillConfig
from testbed.spec import from_mapping, load

REPO = Path(__file__).resolve().parents[2]


def test_config_from_the_ci_spec() -> None:
    spec = load(REPO / "specs" / "ci.toml")
    cfg = DrillConfig.from_spec(spec, tuple(parse_modes("all")), Path("/tmp/x"))
    assert (cfg.testers, cfg.append_size, cfg.servers, cfg.r) == (4, 64 * 1024, 2, 8)
    assert (cfg.duration, cfg.fail_at, cfg.burst_seconds) == (60.0, 16.0, 0.5)
    assert cfg.schedule == "rolling-disaster" and len(cfg.modes) == 5


@pytest.mark.parametrize("name", ["ci", "default", "nightly"])
def test_every_shipped_spec_makes_a_drill(name: str) -> None:
    spec = load(REPO / "specs" / f"{name}.toml")
    cfg = DrillConfig.from_spec(spec, tuple(parse_modes("all")), Path("/tmp/x"))
    assert cfg.fail_at < cfg.duration
    assert faults.schedule(cfg.schedule, spec.wan, cfg.burst_loss, cfg.burst_seconds)


def test_fail_at_beyond_the_run_is_refused() -> None:
    with pytest.raises(ValueError, match="faults.fail_at"):  # by the spec loader, before any VM boots
        spec = from_mapping({"sites": [{"name": "primary", "subnet": "198.18.1.0/24", "vms": [{"name": "primary"}]},
                                       {"name": "mirror", "subnet": "198.18.2.0/24", "vms": [{"name": "mirror"}]}],
                             "workload": {"duration": "10s"}, "faults": {"fail_at": "20s"}})
        DrillConfig.from_spec(spec, tuple(parse_modes("local-sync")), Path("/tmp/x"))


def test_the_fec_flush_comes_from_the_spec_and_is_checked() -> None:
    base = {"sites": [{"name": "primary", "subnet": "198.18.1.0/24", "vms": [{"name": "primary"}]},
                      {"name": "mirror", "subnet": "198.18.2.0/24", "vms": [{"name": "mirror"}]}]}
    cfg = DrillConfig.from_spec(from_mapping({**base, "fec": {"flush": "20ms"}}), parse_modes("all"), Path("out"))
    assert cfg.flush_ms == 20.0
    assert DrillConfig.from_spec(from_mapping(base), parse_modes("all"), Path("out")).flush_ms == 5.0
    with pytest.raises(ValueError, match="fec.flush: must be within"):
        DrillConfig.from_spec(from_mapping({**base, "fec": {"flush": "2s"}}), parse_modes("all"), Path("out"))


def test_the_gateway_engine_comes_from_the_spec_and_reaches_the_gateways() -> None:
    from testbed.drill.vm import gateway_argv

    base = {"sites": [{"name": "primary", "subnet": "198.18.1.0/24", "vms": [{"name": "primary"}]},
                      {"name": "mirror", "subnet": "198.18.2.0/24", "vms": [{"name": "mirror"}]}]}
    assert DrillConfig.from_spec(from_mapping(base), parse_modes("all"), Path("out")).engine == "c"
    cfg = DrillConfig.from_spec(from_mapping({**base, "fec": {"engine": "python"}}), parse_modes("all"), Path("out"))
    assert cfg.engine == "python"
    with pytest.raises(ValueError, match='^fec.engine: use "c"'):
        DrillConfig.from_spec(from_mapping({**base, "fec": {"engine": "rust"}}), parse_modes("all"), Path("out"))

    class Tb:  # what gateway_argv reads of a testbed
        spec = from_mapping(base)

        def site_vms(self, site):
            return [site]

        def info(self, vm):
            return type("I", (), {"address": "198.18.1.10/24" if vm == "primary" else "198.18.2.10/24"})()

    argv = gateway_argv(Tb(), cfg, "primary")
    assert argv[argv.index("--engine") + 1] == "python"


@pytest.mark.parametrize("table,field", [("workload", "testres"), ("fec", "interleave"), ("faults", "failat")])
def test_a_misspelt_drill_field_is_a_one_line_error_naming_it(table: str, field: str) -> None:
    base = {"sites": [{"name": "primary", "subnet": "198.18.1.0/24", "vms": [{"name": "primary"}]},
                      {"name": "mirror", "subnet": "198.18.2.0/24", "vms": [{"name": "mirror"}]}]}
    with pytest.raises(ValueError, match=f"^{table}.{field}: unknown field; use one of "):
        DrillConfig.from_spec(from_mapping({**base, table: {field: 1}}), parse_modes("all"), Path("out"))


def test_unknown_schedule_names_the_field() -> None:
    from netem.profile import LinkProfile

    with pytest.raises(faults.ScheduleError, match="faults.schedule: unknown schedule 'meteor'"):
        faults.schedule("meteor", LinkProfile())


class FakeBed:
    """Records what the nemesis does to a testbed."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def site_vms(self, site: str) -> list[str]:
        return [site]

    def set_link(self, vm: str, up: bool) -> None:
        self.calls.append(("link", vm, up))

    def disaster(self, site: str) -> dict[str, Any]:
        self.calls.append(("disaster", site))
        return {"t_instant": 1000.0 + len(self.calls), "freeze_s": 0.0001, "destroy_s": {site: 0.1}}


def test_rolling_disaster_raises_loss_then_the_primary_site_dies_at_one_instant(monkeypatch: pytest.MonkeyPatch) -> None:
    from netem.profile import LinkProfile
    from testbed.vm import wan

    bed = FakeBed()
    monkeypatch.setattr(wan, "shape", lambda tb, p: bed.calls.append(("shape", p.a_to_b.loss_pct, p.b_to_a.loss_pct)))
    tl = faults.Timeline(say=lambda _m: None)
    base = LinkProfile.from_mapping({"delay": "10ms", "loss": "0%"})
    faults.RollingDisaster(base, "2%", burst_seconds=0.0).inject(bed, tl)
    assert bed.calls == [("shape", 2.0, 2.0), ("disaster", "primary")]
    assert [e["event"].split(" at the instant")[0] for e in tl.events] == ["WAN loss raised to 2%",
                                                                         "primary site: disaster"]
    assert tl.events[-1]["instant"] == 1002.0 and tl.events[-1]["site"] == "primary"
    assert all(a["t"] <= b["t"] for a, b in zip(tl.events, tl.events[1:], strict=False))


def _result(remote_lost: int) -> dict[str, Any]:
    mode = lambda name, acked, lost, fec=None: {"mode": name, "acked": acked, "lost": lost, "corrupt": 0,  # noqa: E731
                                               "throughput_MBps": 1.5, "latency_ms": {"p50": 5, "p99": 9},
                                               "verdict": "ok", "fec": fec, "timeline": [{"t": 1.0, "event": "cut"}]}
    return {"verdict": "ok", "spec": "ci", "environment": {"testbed": "vm", "wan_enforcement": "site-ingress-ifb"},
            "modes": [mode("local-sync", 100, 7), mode("local-sync+fec", 50, 9, {"lost_on_wan": 4, "rebuilt": 4}),
                      mode("remote-sync", 90, remote_lost)]}


def test_report_writes_the_plots_and_says_when_the_paper_disagrees(tmp_path: Path) -> None:
    from testbed.drill.plots import write_report

    files = write_report(_result(remote_lost=0), tmp_path)
    assert {f.name for f in files} == {"throughput.png", "latency-cdf.png", "acked-vs-lost.png", "fec.png", "report.md"}
    assert all(f.stat().st_size > 0 for f in files)
    assert (tmp_path / "throughput.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "report.md").read_text()
    assert "- agrees: remote-sync loses no acked append in the disaster: acked 90, lost 0" in md
    assert ("- DISAGREES: local-sync+fec loses fewer acked appends than local-sync (in number and share): "
            "local-sync+fec lost 9 of 50 (18.0 %), local-sync 7 of 100 (7.0 %)") in md
    assert "DISAGREES with the paper on 1 of 3 claims" in md
    # the FEC table has a row for the mode with gateways only, with what its gateways counted
    assert "| local-sync+fec | - | - | 4 | 4 | - | - | - | - | - |\n" in md and "| local-sync |" not in md
    assert "Not counted above" not in md  # nothing was jumped over
    jumped = _result(remote_lost=0)
    jumped["modes"][1]["fec"]["jumped_over"] = 2048
    write_report(jumped, tmp_path)
    assert "'lost on WAN' does not include: local-sync+fec 2048." in (tmp_path / "report.md").read_text()
    assert "DISAGREES" in json.dumps(write_report(_result(remote_lost=3), tmp_path) and (tmp_path / "report.md").read_text())


def _spec_with(faults_table: dict[str, Any]) -> Any:
    return from_mapping({
        "sites": [{"name": "primary", "subnet": "198.18.1.0/24", "vms": [{"name": "primary", "memory": "384MiB"}]},
                  {"name": "mirror", "subnet": "198.18.2.0/24", "vms": [{"name": "mirror", "memory": "384MiB"}]}],
        "workload": {"duration": "60s"}, "faults": {"fail_at": "20s", **faults_table}})


def test_faults_during_the_run_are_parsed_sorted_and_healed_before_the_disaster() -> None:
    spec = _spec_with({"during": [
        {"fault": "partition", "at": "8s", "for": "2s"},
        {"fault": "freeze", "at": "2s", "for": "1s", "vm": "mirror"},
        {"fault": "balloon-squeeze", "at": "4s", "for": "3s", "vm": "primary", "to": "256MiB"},
        {"fault": "loss-burst", "at": "12s", "for": "500ms", "loss": "5%"},
        {"fault": "mirror-disk-failure", "at": "14s", "for": "2s"},
    ]})
    cfg = DrillConfig.from_spec(spec, tuple(parse_modes("remote-sync")), Path("/tmp/x"))
    assert [t.fault.name for t in cfg.during] == ["freeze", "balloon-squeeze", "partition", "loss-burst",
                                                  "mirror-disk-failure"]
    squeeze = cfg.during[1].fault
    assert (squeeze.vm, squeeze.mib, squeeze.restore_mib) == ("primary", 256, 384)
    assert cfg.during[3].fault.loss == "5%" and cfg.during[3].seconds == 0.5
    assert cfg.during[4].fault.vm == "mirror" and cfg.during[4].heal_at == 16.0


@pytest.mark.parametrize(("entry", "message"), [
    ({"fault": "meteor", "at": "1s", "for": "1s"}, r"faults.during\[0\].fault: 'meteor' is not one of"),
    ({"fault": "freeze", "at": "1s"}, r"faults.during\[0\].for: missing"),
    ({"fault": "freeze", "at": "1s", "for": "1s", "vm": "mirorr"}, r"faults.during\[0\].vm: no VM 'mirorr'"),
    ({"fault": "freeze", "at": "19s", "for": "2s"}, r"faults.during\[0\]: heals at 21 s, not before faults.fail_at"),
    ({"fault": "partition", "at": "1s", "for": "1s", "site": "moon"}, r"faults.during\[0\].site: no site 'moon'"),
    ({"fault": "balloon-squeeze", "at": "1s", "for": "1s"}, r"faults.during\[0\].to: missing"),
    ({"fault": "balloon-squeeze", "at": "1s", "for": "1s", "to": "1GiB"}, r"faults.during\[0\].to: 1024 MiB must be"),
    ({"fault": "freeze", "at": "1s", "for": "1s", "loss": "5%"}, r"faults.during\[0\]: unknown key\(s\) loss for freeze"),
    ({"fault": "loss-burst", "at": "1s", "for": "1s", "loss": "0%"}, r"faults.during\[0\].loss: must be above 0"),
])
def test_bad_fault_entries_name_the_field(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DrillConfig.from_spec(_spec_with({"during": [entry]}), tuple(parse_modes("remote-sync")), Path("/tmp/x"))


def test_unknown_schedule_is_refused_before_any_vm_boots() -> None:
    with pytest.raises(ValueError, match="faults.schedule: unknown schedule 'meteor'"):
        DrillConfig.from_spec(_spec_with({"schedule": "meteor"}), tuple(parse_modes("remote-sync")), Path("/tmp/x"))


class FreezeBed(FakeBed):
    class _Qmp:
        def __init__(self, calls: list[tuple[Any, ...]], vm: str) -> None:
            self.calls, self.vm = calls, vm

        def freeze(self) -> None:
            self.calls.append(("stop", self.vm))

        def thaw(self) -> None:
            self.calls.append(("cont", self.vm))

    def qmp(self, vm: str) -> Any:
        return self._Qmp(self.calls, vm)

    def domain(self, vm: str) -> Any:
        class Dom:
            def isActive(self) -> bool:  # noqa: N802 - libvirt's name
                return True

        return Dom()


def test_runner_injects_and_heals_on_the_runs_clock_and_heals_the_rest_before_the_disaster() -> None:
    bed = FreezeBed()
    tl = faults.Timeline(say=lambda _m: None)
    timed = (faults.Timed(1.0, 2.0, faults.Freeze("mirror")), faults.Timed(2.0, 10.0, faults.Partition("primary")))
    now = [0.0]
    runner = faults.Runner(timed, bed, tl, clock=lambda: now[0])

    def at(t: float) -> None:
        now[0] = t
        runner.tick(t)

    at(0.5)
    assert bed.calls == [] and not runner.injected
    at(1.5)  # a late tick: the freeze begins at 1.5 and must last its 2 s from there
    assert bed.calls == [("stop", "mirror")] and runner.injected
    at(3.2)
    assert bed.calls[-1] == ("link", "primary", False)  # not healed at 3.0 + ...: 1.5 + 2 = 3.5
    assert ("cont", "mirror") not in bed.calls
    at(3.5)
    assert bed.calls[-1] == ("cont", "mirror")
    runner.heal_all()  # the partition is still active at the disaster: healed first, and logged
    assert bed.calls[-1] == ("link", "primary", True)
    assert [e["event"] for e in tl.events] == ["mirror frozen (QMP stop)", "WAN cut: primary link down",
                                                "mirror resumed (QMP cont)", "WAN healed: primary link up"]


def test_mirror_power_outage_takes_the_mirror_first_then_the_primary() -> None:
    bed = FakeBed()
    tl = faults.Timeline(say=lambda _m: None)
    faults.MirrorPowerOutage(gap=0.0).inject(bed, tl)
    assert bed.calls == [("disaster", "mirror"), ("disaster", "primary")]
    assert [e["site"] for e in tl.events if "instant" in e] == ["mirror", "primary"]


def test_paper_findings_check_the_throughput_claim_against_local_sync() -> None:
    from testbed.drill.plots import paper_findings

    modes = [{"mode": "local-sync", "acked": 10, "lost": 2, "throughput_MBps": 4.0},
             {"mode": "local-sync+fec", "acked": 8, "lost": 1, "throughput_MBps": 2.0},
             {"mode": "network-sync", "acked": 6, "lost": 0, "throughput_MBps": 1.8},
             {"mode": "remote-sync", "acked": 0, "lost": 0, "error": "primary site died"}]
    got = {f["claim"]: f for f in paper_findings(modes)}
    speed = got["network-sync runs nearly as fast as local-sync (≥ 80% of its MB/s)"]
    assert speed["agrees"] is False and "ratio 0.45" in speed["detail"] and "ratio 0.9" in speed["detail"]
    assert got["local-sync+fec loses fewer acked appends than local-sync (in number and share)"]["agrees"] is True
    fewer_but_larger_share = [{**modes[0], "lost": 25, "acked": 388}, {**modes[1], "lost": 24, "acked": 137}]
    claim = paper_findings(fewer_but_larger_share)[-1]
    assert claim["agrees"] is False and "17.5 %" in claim["detail"]
    assert got["network-sync loses no acked append in the disaster"]["agrees"] is True
    assert not any(c.startswith("remote-sync") for c in got)  # a mode that failed to run checks no claim


def test_paper_findings_count_corrupt_and_skip_schedules_where_the_mode_promises_nothing() -> None:
    from testbed.drill.plots import paper_findings

    corrupt = [{"mode": "remote-sync", "acked": 10, "lost": 0, "corrupt": 2, "durable": True}]
    (f,) = paper_findings(corrupt)
    assert not f["agrees"] and "corrupt 2" in f["detail"]
    outage = [{"mode": "network-sync", "acked": 10, "lost": 3, "durable": False}]  # mirror power outage
    assert paper_findings(outage) == []


def test_cpu_busy_from_two_proc_stat_readings() -> None:
    """/proc/stat's summed cpu line, twice: busy (user, nice, system, irq, softirq) and stolen shares
    of the time between, per machine, with its CPU count; a machine read once is left out."""
    from testbed.drill.runner import cpu_busy

    def stat(user: int, idle: int, steal: int = 0) -> str:
        return (f"cpu  {user} 0 {user // 2} {idle} 10 0 0 {steal} 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n"
                "cpu1 1 2 3 4 5 6 7 8 0 0\nintr 5\n")

    got = cpu_busy({"primary": stat(100, 1000), "mirror": stat(0, 0), "gone": stat(1, 1)},
                   {"primary": stat(700, 1090, steal=10), "mirror": stat(20, 970)})
    assert got == {"mirror": {"busy": 0.03, "kernel": 0.01, "steal": 0.0, "cpus": 2},
                   "primary": {"busy": 0.9, "kernel": 0.3, "steal": 0.01, "cpus": 2}}
    assert cpu_busy({"x": "garbage"}, {"x": stat(1, 1)}) == {} and cpu_busy({"x": stat(1, 1)}, {"x": stat(1, 1)}) == {}


def test_the_report_shows_each_machines_cpu_per_mode(tmp_path: Path) -> None:
    from testbed.drill.plots import report_md

    res = _result(remote_lost=0)
    res["modes"][0]["cpu"] = {"primary": {"busy": 0.97, "kernel": 0.6, "steal": 0.02, "cpus": 1},
                             "mirror": {"busy": 0.4, "steal": 0.0, "cpus": 1}}
    md = report_md(res)
    assert "| mode | mirror | primary |" in md
    assert "| local-sync | 40 % (stolen 0 %) | 97 % (kernel 60 %, stolen 2 %) |" in md
    assert "## CPU" not in report_md(_result(remote_lost=0))


def _reading(cpu: tuple[int, int, int, int, int], procs: dict[int, tuple[str, int, int, str]]) -> str:
    """A guest reading as PROC_CPU_SCRIPT prints it: cpu line (user, system, idle, irq, softirq), then
    each process's stat line (comm, utime, stime) and command line (NUL-separated, empty for a kthread)."""
    user, system, idle, irq, softirq = cpu
    text = f"cpu  {user} 0 {system} {idle} 0 {irq} {softirq} 0 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n@@stat\n"
    for pid, (comm, ut, st, _cmd) in procs.items():
        text += f"{pid} ({comm}) S 1 1 1 0 -1 4194560 1 0 0 0 {ut} {st} 0 0 20 0 1 0 5 0 0\n"
    text += "@@cmdline\n"
    for pid, (_comm, _ut, _st, cmd) in procs.items():
        text += f"/proc/{pid}/cmdline:{cmd}\n"
    return text


def test_cpu_by_process_names_what_ran_and_charges_only_the_window() -> None:
    """Each machine's CPU by what ran between two readings: a module run with -m, the compiled gateway,
    kernel threads; a process that started in the window counts whole, a pid reused by another program
    counts from zero; irq and softirq apart; a reading without process lines (the host's) is left out."""
    from testbed.drill.runner import cpu_by_process

    before = _reading((100, 50, 1000, 0, 0), {
        10: ("python3", 50, 10, "python3\0-m\0smfs.site\0--mode\0x\0"),
        11: ("smfs-gateway-st", 5, 5, "/opt/smfs/smfs-gateway-static\0--tun\0smfs0\0"),
        12: ("ksoftirqd/0", 1, 1, ""),
        13: ("sleep", 0, 0, "sleep\0100\0")})
    after = _reading((500, 250, 1150, 10, 40), {
        10: ("python3", 250, 60, "python3\0-m\0smfs.site\0--mode\0x\0"),
        11: ("smfs-gateway-st", 105, 85, "/opt/smfs/smfs-gateway-static\0--tun\0smfs0\0"),
        12: ("ksoftirqd/0", 21, 31, ""),
        13: ("python3", 30, 0, "python3\0-m\0workloads.tester\0"),   # pid 13 reused
        20: ("cat", 4, 6, "cat\0/proc/stat\0")})
    got = cpu_by_process({"primary": before, "host": "cpu  1 2 3 4 5 6 7 8\n"},
                         {"primary": after, "host": "cpu  9 9 9 9 9 9 9 9\n"})
    assert list(got) == ["primary"]
    # the window: user 400 + system 200 + idle 150 + irq 10 + softirq 40 = 800 ticks
    assert got["primary"] == [{"what": "smfs.site", "share": 0.312}, {"what": "gateway (C)", "share": 0.225},
                              {"what": "kernel threads", "share": 0.062}, {"what": "workloads.tester", "share": 0.037},
                              {"what": "cat", "share": 0.013}, {"what": "irq+softirq", "share": 0.062}]
    assert cpu_by_process({"primary": after}, {"primary": before}) == {}  # nothing ran: no rows at all


def test_the_report_says_where_each_machines_cpu_went() -> None:
    from testbed.drill.plots import report_md

    res = _result(remote_lost=0)
    res["modes"][0]["cpu"] = {"primary": {"busy": 0.97, "kernel": 0.6, "steal": 0.02, "cpus": 1}}
    res["modes"][0]["cpu_by_process"] = {"primary": [{"what": "smfs.site", "share": 0.5},
                                                     {"what": "gateway (C)", "share": 0.25}]}
    assert "- local-sync, primary: smfs.site 50 %, gateway (C) 25 %" in report_md(res)


def test_packets_the_host_dropped_into_a_vm_are_reported() -> None:
    """A site VM's host tap counts packets dropped at its full queue (a guest too slow): the report
    names them per mode and site; none, no note."""
    from testbed.drill.plots import report_md
    from testbed.drill.runner import tap_deltas

    got = tap_deltas({"mirror": {"tx_packets": 100, "tx_dropped": 2}, "gone": {"tx_packets": 1, "tx_dropped": 0}},
                     {"mirror": {"tx_packets": 5100, "tx_dropped": 537}, "primary": {"tx_packets": 9, "tx_dropped": 0}})
    assert got == {"mirror": {"tx_packets": 5000, "tx_dropped": 535}}
    res = _result(remote_lost=0)
    assert "Dropped by the host" not in report_md(res)
    res["modes"][0]["host_tap"] = got | {"primary": {"tx_packets": 10, "tx_dropped": 0}}
    assert "local-sync mirror 535 of 5535." in report_md(res)


def test_udp_receive_buffer_overflows_inside_a_guest_are_counted_and_reported() -> None:
    """The guest's /proc/net/snmp Udp counters between the testers' start and the disaster: datagrams
    dropped at a full socket buffer (a receiving gateway too slow) are named in the report."""
    from testbed.drill.plots import report_md
    from testbed.drill.runner import udp_drops

    def reading(in_dgrams: int, rcvbuf: int) -> str:
        return ("cpu  1 0 1 1 0 0 0 0 0 0\n@@snmp\nUdp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors "
                f"SndbufErrors\nUdp: {in_dgrams} 3 {rcvbuf} 9 {rcvbuf} 0\n@@stat\n@@cmdline\n")

    got = udp_drops({"mirror": reading(100, 5), "primary": reading(1, 0), "host": "cpu  1 1 1 1"},
                    {"mirror": reading(5100, 300), "primary": reading(7, 0), "host": "cpu  2 2 2 2"})
    assert got == {"mirror": {"in_datagrams": 5000, "rcvbuf_errors": 295},
                   "primary": {"in_datagrams": 6, "rcvbuf_errors": 0}}
    res = _result(remote_lost=0)
    res["modes"][0]["udp"] = got
    assert "local-sync mirror 295 of 5295." in report_md(res) and "local-sync primary" not in report_md(res)
