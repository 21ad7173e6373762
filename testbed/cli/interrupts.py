"""Task: interrupts (issue 13): runs of the drill killed at random instants, ``./inv down`` after each,
and the host checked for what the testbed left or touched (:mod:`testbed.drill.interrupts`).

This task does *not* hold the testbed's lock: every command it runs (the drill, ``./inv down``) takes
the lock itself, and holding it here would make each of them wait for ever (or, without ``--wait``,
fail at once). It refuses to start while another command holds the lock or a testbed is recorded."""

from __future__ import annotations

import contextlib
import secrets
import time
from pathlib import Path

from invoke.exceptions import Exit

from testbed.cli.common import claim_folder, flag_choice, flag_int, flag_new_out, flag_number, task


@task(help={
    "runs": "interrupted runs (about half SIGINT to the command's process group, half SIGKILL of its pid)",
    "seed": "seed of the instants and signals (default: drawn, and printed so the runs can be replayed)",
    "testbed": "netns (./inv local-drill, small: about 12 s a run) or vm (./inv drill --spec specs/ci.toml "
               "--modes local-sync)",
    "out": "result directory (default results/interrupts/<timestamp>)",
    "max_delay": "seconds after the start within which the kills are drawn (default: measured by an "
                 "uninterrupted run first)",
})
def interrupts(c, runs="20", seed="", testbed="netns", out="", max_delay=""):
    """Kill the drill at random instants (SIGINT or SIGKILL), run ./inv down after each, and check that
    nothing of the testbed is left and nothing else was touched. Exit 0 clean, 1 leak or touched, 2 could
    not run. Run it when no testbed is up (it refuses otherwise: ./inv down would remove it)."""
    from testbed.drill.interrupts import COMMANDS, CannotRun, run_interrupted

    n = flag_int("--runs", runs, (1, 1000), "20")
    s = flag_int("--seed", seed, (0, 2**63 - 1), "1") if seed != "" else secrets.randbelow(2**31)
    which = flag_choice("--testbed", testbed, tuple(COMMANDS))
    delay = flag_number("--max-delay", max_delay, (0, 86400), "12", low_open=True, what="number of seconds") \
        if max_delay != "" else None
    folder = claim_folder(flag_new_out("--out", out), Path("results/interrupts"))
    start = time.monotonic()

    def say(line: str) -> None:
        print(f"[{time.monotonic() - start:6.1f}s] {line}", flush=True)

    say(f"interrupts: {n} runs of the {which} drill, seed {s} -> {folder}")
    try:
        summary = run_interrupted(COMMANDS[which], s, n, which, folder, max_delay=delay, say=say)
    except CannotRun:
        with contextlib.suppress(OSError):
            folder.rmdir()  # refused before any run: no empty folder left (one with logs stays)
        raise  # one line, exit 2 (a TestbedError)
    except KeyboardInterrupt:
        raise Exit(f"interrupts: interrupted; the summary so far is in {folder / 'summary.json'} (exit 2)",
                   code=2) from None
    for item in summary["leaks"] + summary["touched"]:
        print(f"  run {item['run']} ({item['signal']} at {item['delay']} s, {item['phase']}, seed {item['seed']}): "
              f"{item['what']}")
    print(summary["line"])
    if summary["verdict"] != "clean":
        raise Exit(code=1)


TASKS = [interrupts]
