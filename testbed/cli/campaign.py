"""Task: campaign (randomized fault schedules over the namespace drill or the VM drill, :mod:`testbed.drill.campaign`).

Like ``local-drill`` and ``drill`` it holds the testbed's lock from the end of its flag checks to its end
(with ``--testbed vm``: the bring-up, every run and the teardown), and writes into a new output folder
(default ``results/campaign/<timestamp>``; an ``--out`` that exists must be empty). Every flag, the spec
and a replayed schedule are checked before anything is created.
"""

from __future__ import annotations

import secrets
import time
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
    for_command,
    run_for_verdict,
    stamped,
    task,
    user_error,
)
from testbed.spec import DRAIN_TIMEOUT, FEC_ENGINES

TESTBEDS = ("netns", "vm")


def _defects(text: str) -> tuple[str, ...]:
    from smfs.defects import DEFECTS

    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    for name in names:
        if name not in DEFECTS:
            raise user_error(f"--defects: unknown defect {name!r}; use some of {', '.join(DEFECTS)}")
    return names


@task(help={
    "runs": "runs, each with its own drawn schedule (default 10; with --replay 1: the same schedule N times)",
    "seed": "the campaign's seed: run i's seed is derived from it (default: a random one, printed)",
    "testbed": "netns (the namespace drill, default) or vm (the VM drill: the testbed up once, every run from its snapshot)",
    "spec": "with --testbed vm: the testbed's spec (default specs/ci.toml)",
    "replay": "a run's seed (its schedule drawn again) or its schedule.json: run exactly that schedule",
    "modes": "all (default), or a comma list of modes",
    "out": "result directory (default results/campaign/<timestamp>)",
    "defects": "seeded stack defects, comma list (to show the campaign catches a broken stack; smfs/defects.py)",
    "engine": "the FEC gateways' data path: c (default) or python",
    "drain_timeout": "seconds the mirror gets to go quiet after each disaster (then the verdict is unknown)",
    "verbose": "print every drill line (always in each run's drill.log)",
    "wait": WAIT_HELP,
})
def campaign(c, runs="", seed="", testbed="netns", spec="", replay="", modes="all", out="", defects="", engine="c",
             drain_timeout="30", verbose=False, wait=False):
    """Randomized fault campaign: per run a drawn schedule of faults and a disaster, every mode checked."""
    from testbed.drill.campaign import DEFAULT_BOUNDS, MAX_SEED, CampaignConfig, load_replay, socket_room
    from testbed.drill.runner import EXIT_CODES

    flag_choice("--testbed", testbed, TESTBEDS)
    if spec and testbed != "vm":
        raise user_error(f"--spec {spec}: only with --testbed vm (the namespace campaign has no spec); drop --spec "
                         "or add --testbed vm")
    if replay and seed:
        raise user_error("--replay and --seed: give one (a replay repeats one run's schedule; a seed draws new ones)")
    n = flag_int("--runs", runs, (1, 10_000), "100") if runs else (1 if replay else 10)
    campaign_seed = flag_int("--seed", seed, (0, MAX_SEED), "1") if seed else secrets.randbelow(1_000_000)
    chosen = flag_modes("--modes", modes)
    seeded = _defects(defects)
    eng = flag_choice("--engine", engine, FEC_ENGINES)
    drain = flag_number("--drain-timeout", drain_timeout, DRAIN_TIMEOUT, "30", what="number of seconds")
    spec_path, servers = (_vm_spec(spec or "specs/ci.toml", chosen) if testbed == "vm" else (None, 2))
    schedule = None
    if replay:
        try:
            schedule = load_replay(replay, testbed, servers if testbed == "vm" else None)
        except ValueError as err:
            raise user_error(str(err)) from None
    given = flag_new_out("--out", out)
    if testbed == "netns":  # the VM stack's unix sockets live in the guests
        why = socket_room(given or Path("results/campaign/20260101-000000-99"), n,
                          schedule.servers if schedule else max(DEFAULT_BOUNDS.servers))
        if why:
            raise user_error(f"--out {why}")
    with for_command("./inv campaign", wait):
        folder = claim_folder(flag_new_out("--out", out), Path("results/campaign"))
        cfg = CampaignConfig(modes=chosen, out=folder, runs=n, seed=campaign_seed, replay=schedule, defects=seeded,
                             engine=eng, drain_timeout=drain, verbose=verbose, testbed=testbed, spec=spec_path,
                             servers=servers)
        from testbed.drill.campaign import run_campaign

        result = run_for_verdict(lambda: run_campaign(cfg, stamped(time.monotonic())), "the campaign")
    code = EXIT_CODES[result["verdict"]]
    if code:
        raise Exit(code=code)


def _vm_spec(path: str, modes: tuple) -> tuple[Path, int]:
    """``--spec`` of a VM campaign, checked whole before anything boots: the spec file, its drill tables, one
    VM per site. Returns the path and its server pairs (fixed at bring-up: every VM schedule has them)."""
    from testbed.drill.campaign import vm_spec_problem
    from testbed.drill.vm import DrillConfig
    from testbed.spec import SpecError, load

    try:
        loaded = load(path)
        servers = DrillConfig.from_spec(loaded, modes, Path("results/campaign")).servers
    except (SpecError, ValueError) as err:
        raise user_error(f"--spec {path}: {err}") from None
    why = vm_spec_problem(loaded)
    if why:
        raise user_error(f"--spec {path}: {why}")
    return Path(path), servers


TASKS = [campaign]
