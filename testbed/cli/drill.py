"""Tasks: drill (the VM drill), local-drill (the namespace drill), check.

``drill`` and ``local-drill`` hold the testbed's lock (:mod:`testbed.lock`) from the end of their flag
checks to their end, teardown included. Their output folder is always a new one: by default one named
by the time (``-2``, ``-3``... when that name is taken); an ``--out`` that exists must be empty. So no
earlier run's folder is ever reused, and no file in one is deleted (the runner clears a mode's folder
before the mode runs)."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from invoke.exceptions import Exit

from testbed.cli.common import (
    WAIT_HELP,
    claim_folder,
    flag_choice,
    flag_int,
    flag_modes,
    flag_new_out,
    flag_number,
    flag_size,
    for_command,
    run_for_verdict,
    stamped,
    task,
    user_error,
)
from testbed.spec import APPEND_SIZE, DRAIN_TIMEOUT, DURATION, FEC_ENGINES, SERVER_PAIRS, TESTERS


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
    "wait": WAIT_HELP,
})
def local_drill(c, mode="remote-sync", testers="64", append_size="512KiB", duration="20", fail_at="10",
                wan_loss="0", servers="8", out="", keep_data=False, schedule="site-power-cut", burst_loss="5",
                drain_timeout="30", engine="c", wait=False):
    """Run the SMFS stack in network namespaces, power-cut the primary site, check for data loss."""
    from testbed.drill.local import SCHEDULES, LocalDrillConfig, run_local_drill
    from testbed.drill.runner import EXIT_CODES

    duration_s = flag_number("--duration", duration, DURATION, "20", low_open=True, what="number of seconds")
    try:
        cfg = LocalDrillConfig(
            modes=flag_modes("--mode", mode), testers=flag_int("--testers", testers, TESTERS, "64"),
            append_size=flag_size("--append-size", append_size, APPEND_SIZE, "64KiB, 512KiB, 1MiB"),
            duration=duration_s, fail_at=flag_number("--fail-at", fail_at, DURATION, "10", low_open=True, what="number of seconds"),
            wan_loss=flag_number("--wan-loss", wan_loss, (0, 100), "1", what="percentage", high_open=True),
            servers=flag_int("--servers", servers, SERVER_PAIRS, "8"),
            out=flag_new_out("--out", out) or Path("results/local"), keep_data=keep_data,
            schedule=flag_choice("--schedule", schedule, SCHEDULES),
            burst_loss=flag_number("--burst-loss", burst_loss, (0, 100), "5", what="percentage"),
            drain_timeout=flag_number("--drain-timeout", drain_timeout, DRAIN_TIMEOUT, "30", what="number of seconds"),
            engine=flag_choice("--engine", engine, FEC_ENGINES),
        )
    except ValueError as err:
        raise user_error(str(err)) from None
    with for_command("./inv local-drill", wait):
        cfg = replace(cfg, out=claim_folder(flag_new_out("--out", out), Path("results/local")))
        result = run_for_verdict(lambda: run_local_drill(cfg, stamped(time.monotonic())), "the namespace drill")
    code = EXIT_CODES[result["verdict"]]
    if code:
        raise Exit(code=code)


@task(help={
    "spec": "spec file (default specs/default.toml: the paper's experiment scaled to one machine)",
    "modes": "all, or a comma list of modes",
    "out": "result directory (default results/<spec>/<timestamp>)",
    "keep": "keep the testbed up afterwards (a later drill of the same spec reuses it and its snapshot)",
    "self_test": "run the seeded stack defects instead of the modes: each must be caught (exit 0) or the "
                 "testbed failed (exit 1)",
    "defects": "with --self-test: all, or a comma list of seeded defects",
    "runs": "with --self-test: runs per defect (a timing-dependent catch shows as k of n)",
    "wait": WAIT_HELP,
})
def drill(c, spec="specs/default.toml", modes="all", out="", keep=False, self_test=False, defects="all", runs="1",
          wait=False):
    """The disaster drill in VMs: each mode from one snapshot, the spec's faults, data-loss verdicts, report."""
    from testbed.drill.vm import EXIT_CODES, run_drill
    from testbed.spec import load

    runs = flag_int("--runs", runs, (1, 1000), "10")
    flag_new_out("--out", out)
    chosen = flag_modes("--modes", modes)
    name = load(spec).name  # the whole spec is checked before anything is created
    say = stamped(time.monotonic())
    try:
        if self_test:
            from testbed.drill.selftest import cases, run_self_test

            cases(defects)  # a bad name is an error before anything boots
            with for_command("./inv drill --self-test", wait):
                folder = claim_folder(flag_new_out("--out", out), Path("results") / name, "self-test-")
                result = run_for_verdict(lambda: run_self_test(spec, defects, runs, folder, keep, say), "the self-test")
        else:
            with for_command("./inv drill", wait):
                folder = claim_folder(flag_new_out("--out", out), Path("results") / name)
                result = run_for_verdict(lambda: run_drill(spec, chosen, folder, keep=keep, say=say), "the drill")
    except ValueError as err:
        raise user_error(str(err)) from None
    code = EXIT_CODES[result["verdict"]]
    if code:
        raise Exit(code=code)


@task(help={"ledger": "directory of tester ledgers (*.jsonl)", "mirror": "mirror store/site directory or listing.json",
            "mode": "mode whose promise decides the verdict", "json_out": "print the full result as JSON"})
def check(c, ledger, mirror, mode="remote-sync", json_out=False):
    """Check ledgers against a mirror's recovered logs; exit 0 ok, 1 data loss, 2 unknown."""
    from smfs.modes import parse_mode
    from testbed.drill.runner import EXIT_CODES
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
