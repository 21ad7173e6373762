"""Tasks: drill (the VM drill), local-drill (the namespace drill), check."""

from __future__ import annotations

import json
import time
from pathlib import Path

from invoke import task
from invoke.exceptions import Exit

from testbed.cli.common import parse_size, user_error


def _stamp(start: float) -> callable:
    def say(line: str) -> None:
        if line.startswith("\n"):
            print(line, flush=True)
        else:
            print(f"[{time.monotonic() - start:6.1f}s] {line}", flush=True)
    return say


@task(help={
    "mode": "local-sync, local-sync+fec, remote-sync, remote-sync+fec, network-sync, a comma list, or all",
    "testers": "number of append testers (each its own log)",
    "append_size": "bytes per append: 64KiB, 512KiB, 1MiB",
    "duration": "seconds the testers run",
    "fail_at": "seconds after the testers start when the primary site loses power",
    "wan_loss": "random WAN loss, percent each way",
    "servers": "storage server pairs",
    "out": "result directory (default results/local/<timestamp>)",
    "keep_data": "keep the log stores after the check",
    "schedule": "the disaster at --fail-at: site-power-cut (default) or rolling-disaster (WAN loss raised to "
                "--burst-loss for 0.5 s first)",
    "burst_loss": "WAN loss, percent each way, during the rolling disaster's burst",
    "drain_timeout": "seconds the mirror gets to go quiet after the disaster (then the verdict is unknown)",
    "engine": "the FEC gateways' data path: c (smfs/native, built by make; default) or python (the specification)",
})
def local_drill(c, mode="remote-sync", testers=64, append_size="512KiB", duration=20.0, fail_at=10.0,
                wan_loss=0.0, servers=8, out="", keep_data=False, schedule="site-power-cut", burst_loss=5.0,
                drain_timeout=30.0, engine="c"):
    """Run the SMFS stack in network namespaces, power-cut the primary site, check for data loss."""
    from smfs.modes import parse_modes
    from testbed.localdrill import LocalDrillConfig, run_local_drill
    from testbed.runner import EXIT_CODES

    try:
        cfg = LocalDrillConfig(
            modes=tuple(parse_modes(mode)), testers=int(testers), append_size=parse_size(append_size, "--append-size"),
            duration=float(duration), fail_at=float(fail_at), wan_loss=float(wan_loss), servers=int(servers),
            out=Path(out) if out else Path("results/local") / time.strftime("%Y%m%d-%H%M%S"), keep_data=keep_data,
            schedule=schedule, burst_loss=float(burst_loss), drain_timeout=float(drain_timeout), engine=engine,
        )
    except ValueError as err:
        raise user_error(str(err)) from None
    result = _guarded(lambda: run_local_drill(cfg, _stamp(time.monotonic())), "the namespace drill")
    code = EXIT_CODES[result["verdict"]]
    if code:
        raise Exit(code=code)


def _guarded(run: callable, what: str) -> dict:
    """Run a drill; any crash of the drill itself (including Ctrl-C) is exit 2 with one line, never
    exit 1, which only a checker's data-loss verdict gives. The traceback goes to the log (DEBUG)."""
    import logging

    try:
        return run()
    except KeyboardInterrupt:
        raise Exit(f"{what}: interrupted; no verdict (exit 2); what it created was torn down", code=2) from None
    except Exit:
        raise
    except (ValueError, OSError) as err:
        raise user_error(f"{what}: {err}") from None
    except Exception as err:  # noqa: BLE001 - a drill crash is "no verdict", exit 2
        logging.getLogger("smfs.drill").debug("drill crashed", exc_info=True)
        raise Exit(f"{what} failed: {type(err).__name__}: {err} (no verdict; exit 2)", code=2) from None


@task(help={
    "spec": "spec file (default specs/default.toml: the paper's experiment scaled to one machine)",
    "modes": "all, or a comma list of modes",
    "out": "result directory (default results/<spec>/<timestamp>)",
    "keep": "keep the testbed up afterwards (a later drill of the same spec reuses it and its snapshot)",
    "self_test": "run the seeded stack defects instead of the modes: each must be caught (exit 0) or the "
                 "testbed failed (exit 1)",
    "defects": "with --self-test: all, or a comma list of seeded defects",
    "runs": "with --self-test: runs per defect (a timing-dependent catch shows as k of n)",
})
def drill(c, spec="specs/default.toml", modes="all", out="", keep=False, self_test=False, defects="all", runs=1):
    """The disaster drill in VMs: each mode from one snapshot, the spec's faults, data-loss verdicts, report."""
    from smfs.modes import parse_modes
    from testbed.drill import EXIT_CODES, run_drill
    from testbed.spec import SpecError

    if not Path(spec).is_file():
        raise user_error(f"--spec {spec}: no such file; see specs/")
    try:
        runs = int(runs)
    except ValueError:
        raise user_error(f"--runs {runs!r}: give a whole number of runs, e.g. 10") from None
    say = _stamp(time.monotonic())
    try:
        if self_test:
            from testbed.selftest import cases, run_self_test

            cases(defects)  # a bad name is an error before anything boots
            result = _guarded(lambda: run_self_test(spec, defects, runs, Path(out) if out else None, keep, say),
                              "the self-test")
        else:
            chosen = tuple(parse_modes(modes))
            result = _guarded(lambda: run_drill(spec, chosen, Path(out) if out else None, keep=keep, say=say),
                              "the drill")
    except (ValueError, SpecError) as err:
        raise user_error(str(err)) from None
    code = EXIT_CODES[result["verdict"]]
    if code:
        raise Exit(code=code)


@task(help={"ledger": "directory of tester ledgers (*.jsonl)", "mirror": "mirror store/site directory or listing.json",
            "mode": "mode whose promise decides the verdict", "json_out": "print the full result as JSON"})
def check(c, ledger, mirror, mode="remote-sync", json_out=False):
    """Check ledgers against a mirror's recovered logs; exit 0 ok, 1 data loss, 2 unknown."""
    from smfs.modes import parse_mode
    from testbed.runner import EXIT_CODES
    from workloads.checker import check_dirs, verdict_for

    try:
        m = parse_mode(mode)
    except ValueError as err:
        raise user_error(str(err)) from None
    result = check_dirs(Path(ledger), Path(mirror), durable=m.durable)
    verdict = verdict_for(result, m.durable)
    print(json.dumps(result.to_dict() | {"verdict": verdict}, indent=1) if json_out else f"{result.summary_line()}  verdict: {verdict}")
    if EXIT_CODES[verdict]:
        raise Exit(code=EXIT_CODES[verdict])


TASKS = [local_drill, drill, check]
