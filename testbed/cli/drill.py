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

from invoke import task
from invoke.exceptions import Exit

from smfs.units import show
from testbed.cli.common import flag_choice, flag_int, flag_number, flag_out, flag_size, user_error
from testbed.lock import for_command
from testbed.paths import fresh_folder
from testbed.spec import APPEND_SIZE, DRAIN_TIMEOUT, DURATION, FEC_ENGINES, SERVER_PAIRS, TESTERS

WAIT_HELP = "when another command holds the testbed, wait for it (default: fail at once, naming it)"


def _new_out(flag: str, value: str) -> Path | None:
    """``--out``: a folder that does not exist yet, or an empty one (a run never mixes its files with an
    earlier run's, and never deletes them); None when not given."""
    out = flag_out(flag, value)
    try:
        used = out is not None and out.is_dir() and any(out.iterdir())
    except OSError as err:
        raise user_error(f"{flag} {out}: {err.strerror}; give a new folder") from None
    if used:
        raise user_error(f"{flag} {out}: exists and is not empty; give a new folder (results are never "
                         "overwritten)")
    return out


def _claim(out: Path | None, parent: Path, stamp: str = "") -> Path:
    """The run's output folder: ``out`` (created), or a new folder under ``parent`` named by the time."""
    try:
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            return out
        return fresh_folder(parent, f"{stamp}{time.strftime('%Y%m%d-%H%M%S')}")
    except OSError as err:
        raise user_error(f"output folder {out or parent}: {err.strerror or err}; give --out a folder you can write") from None


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
    "wait": WAIT_HELP,
})
def local_drill(c, mode="remote-sync", testers="64", append_size="512KiB", duration="20", fail_at="10",
                wan_loss="0", servers="8", out="", keep_data=False, schedule="site-power-cut", burst_loss="5",
                drain_timeout="30", engine="c", wait=False):
    """Run the SMFS stack in network namespaces, power-cut the primary site, check for data loss."""
    from testbed.localdrill import SCHEDULES, LocalDrillConfig, run_local_drill
    from testbed.runner import EXIT_CODES

    duration_s = flag_number("--duration", duration, DURATION, "20", low_open=True, what="number of seconds")
    try:
        cfg = LocalDrillConfig(
            modes=_modes("--mode", mode), testers=flag_int("--testers", testers, TESTERS, "64"),
            append_size=flag_size("--append-size", append_size, APPEND_SIZE, "64KiB, 512KiB, 1MiB"),
            duration=duration_s, fail_at=flag_number("--fail-at", fail_at, DURATION, "10", low_open=True, what="number of seconds"),
            wan_loss=flag_number("--wan-loss", wan_loss, (0, 100), "1", what="percentage", high_open=True),
            servers=flag_int("--servers", servers, SERVER_PAIRS, "8"),
            out=_new_out("--out", out) or Path("results/local"), keep_data=keep_data,
            schedule=flag_choice("--schedule", schedule, SCHEDULES),
            burst_loss=flag_number("--burst-loss", burst_loss, (0, 100), "5", what="percentage"),
            drain_timeout=flag_number("--drain-timeout", drain_timeout, DRAIN_TIMEOUT, "30", what="number of seconds"),
            engine=flag_choice("--engine", engine, FEC_ENGINES),
        )
    except ValueError as err:
        raise user_error(str(err)) from None
    with for_command("./inv local-drill", wait):
        cfg = replace(cfg, out=_claim(_new_out("--out", out), Path("results/local")))
        result = _guarded(lambda: run_local_drill(cfg, _stamp(time.monotonic())), "the namespace drill")
    code = EXIT_CODES[result["verdict"]]
    if code:
        raise Exit(code=code)


def _modes(flag: str, text: str) -> tuple:
    """``all`` or a comma list of distinct modes; a one-line error naming ``flag`` otherwise."""
    from smfs.modes import parse_modes

    try:
        modes = tuple(parse_modes(text))
    except ValueError as err:
        raise user_error(f"{flag}: {str(err).removeprefix('mode: ')}") from None
    if not modes:
        raise user_error(f"{flag} {show(text)}: give at least one mode, or all")
    names = [m.name for m in modes]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice:
        raise user_error(f"{flag}: {twice} appears twice; give each mode once")
    return modes


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
    "wait": WAIT_HELP,
})
def drill(c, spec="specs/default.toml", modes="all", out="", keep=False, self_test=False, defects="all", runs="1",
          wait=False):
    """The disaster drill in VMs: each mode from one snapshot, the spec's faults, data-loss verdicts, report."""
    from testbed.drill import EXIT_CODES, run_drill
    from testbed.spec import SpecError, load

    runs = flag_int("--runs", runs, (1, 1000), "10")
    _new_out("--out", out)
    chosen = _modes("--modes", modes)
    try:
        name = load(spec).name  # the whole spec is checked before anything is created
    except SpecError as err:
        raise user_error(str(err)) from None
    say = _stamp(time.monotonic())
    try:
        if self_test:
            from testbed.selftest import cases, run_self_test

            cases(defects)  # a bad name is an error before anything boots
            with for_command("./inv drill --self-test", wait):
                folder = _claim(_new_out("--out", out), Path("results") / name, "self-test-")
                result = _guarded(lambda: run_self_test(spec, defects, runs, folder, keep, say), "the self-test")
        else:
            with for_command("./inv drill", wait):
                folder = _claim(_new_out("--out", out), Path("results") / name)
                result = _guarded(lambda: run_drill(spec, chosen, folder, keep=keep, say=say), "the drill")
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
