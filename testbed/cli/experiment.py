"""Tasks: experiment (a parameter sweep from one snapshot), compare (two result folders), replay."""

from __future__ import annotations

import json
import time
from pathlib import Path

from invoke.exceptions import Exit

from testbed.cli.common import (
    WAIT_HELP,
    claim_folder,
    flag_new_out,
    flag_out,
    for_command,
    run_for_verdict,
    stamped,
    task,
    user_error,
)

HELP = ("-h", "--help")


def _usage(task_name: str, usage: str, doc: str | None, given: str) -> None:
    """invoke hands ``--help`` to a positional argument: print the usage (exit 0); a missing one is exit 2."""
    if given in HELP:
        print(f"usage: ./inv {task_name} {usage}\n\n{(doc or '').strip()}")
        raise Exit(code=0)
    raise user_error(f"{task_name}: missing {usage.split()[0]}; usage: ./inv {task_name} {usage}")


@task(help={
    "file": "experiment file, e.g. experiments/latency.toml",
    "quick": "the file's [quick] variant: fewer points, shorter runs (minutes)",
    "out": "result folder (default results/experiments/<name>/<timestamp>); must be new or empty",
    "resume": "a folder of an interrupted run of the same file: finished runs are kept and skipped",
    "keep": "keep the testbed up afterwards",
    "wait": WAIT_HELP,
})
def experiment(c, file, quick=False, out="", resume="", keep=False, wait=False):
    """A parameter sweep over the drill from one snapshot: tidy table, plots, the paper's claims judged."""
    from testbed.drill.experiment import ExperimentError, load, run_experiment
    from testbed.drill.experiment_plots import (
        write_experiment_report,  # matplotlib: only when an experiment runs
    )

    if not file or file in HELP:
        _usage("experiment", "FILE [--quick] [--out DIR] [--resume DIR] [--keep] [--wait]", experiment.__doc__, file)

    try:
        exp = load(file, quick=quick)
    except ExperimentError as err:
        raise user_error(str(err)) from None
    if out and resume:
        raise user_error("--out and --resume: give one; --resume DIR continues in DIR")
    if resume:
        given = flag_out("--resume", resume)
        if given is None or not given.is_dir():
            raise user_error(f"--resume {resume}: not a folder of an earlier run; pass the folder it wrote")
    else:
        try:
            given = flag_new_out("--out", out)  # an earlier run's folder is refused before anything runs
        except Exit as err:
            if "not empty" not in str(err.message):
                raise
            raise user_error(f"{str(err.message).removeprefix('error: ')}, or --resume {out}") from None
    say = stamped(time.monotonic())
    try:
        with for_command("./inv experiment", wait):
            # claimed under the lock: a default name chosen before a wait for it may be another run's by then
            folder = given if resume else claim_folder(given, Path("results/experiments") / (exp.name + ("-quick" if quick else "")))
            say(f"experiment {exp.name}{' (quick)' if quick else ''}: {len(exp.points())} point(s) × {len(exp.modes)} "
                f"mode(s) × {exp.repetitions} repetition(s) into {folder}")
            result = run_for_verdict(lambda: run_experiment(exp, folder, keep=keep, resume=bool(resume), say=say,
                                                            report=write_experiment_report), "the experiment")
    except ExperimentError as err:
        raise user_error(str(err)) from None
    if any(j["verdict"] == "DISAGREES" for j in result["claims"]):
        say("some claims DISAGREE with the paper (see report.md); the experiment itself ran (exit 0)")


@task(help={"a": "first result folder (a drill's or an experiment's)", "b": "second result folder",
            "json_out": "print the comparison as JSON"})
def compare(c, a, b, json_out=False):
    """Two result folders side by side: what differs in the spec, the figures, and what is beyond the spread."""
    from testbed.drill.compare import CompareError, render
    from testbed.drill.compare import compare as run

    try:
        res = run(Path(a), Path(b))
    except (CompareError, OSError, json.JSONDecodeError) as err:
        raise user_error(f"compare: {err}") from None
    print(json.dumps(res, indent=1, default=str) if json_out else render(res))


@task(help={"folder": "a result folder to run again",
            "out": "where the new run goes: a new or empty folder (default: a new one beside the old one)",
            "wait": WAIT_HELP})
def replay(c, folder, out="", wait=False):
    """Run again exactly what a result folder recorded (its spec or experiment file, its modes) into a new folder."""
    from testbed.drill.compare import load_result

    if not folder or folder in HELP:
        _usage("replay", "DIR [--out DIR] [--wait]", replay.__doc__, folder)

    src = Path(folder)
    kind, res = load_result(src)  # a CompareError (not a result folder): one line, exit 2
    given = flag_new_out("--out", out)  # an earlier run's folder is refused: the drill would clear its modes

    def claim() -> Path:  # under the lock: a default name chosen before a wait for it may be another run's by then
        return claim_folder(given, src.parent, suffix="-replay")

    if kind == "experiment":
        file = src / "experiment-file.toml"
        if not file.is_file():
            raise user_error(f"{src}: experiment-file.toml is missing; it cannot be replayed")
        from testbed.drill.experiment import ExperimentError, load, run_experiment
        from testbed.drill.experiment_plots import write_experiment_report  # matplotlib: only when it runs

        try:
            exp = load(file, quick=bool(res.get("quick")))
        except ExperimentError as err:
            raise user_error(str(err)) from None
        say = stamped(time.monotonic())
        with for_command("./inv replay", wait):
            target = claim()
            say(f"replaying experiment {exp.name} from {src} into {target}")
            run_for_verdict(lambda: run_experiment(exp, target, say=say, report=write_experiment_report), "the replay")
        return
    spec = src / "spec.toml"
    if not spec.is_file():
        raise user_error(f"{src}: spec.toml is missing; it cannot be replayed")
    from smfs.modes import parse_modes
    from testbed.drill.vm import EXIT_CODES, run_drill

    modes = tuple(parse_modes(",".join((res.get("config") or {}).get("modes") or ["all"])))
    say = stamped(time.monotonic())
    with for_command("./inv replay", wait):
        target = claim()
        say(f"replaying the drill of {src} ({', '.join(m.name for m in modes)}) into {target}")
        result = run_for_verdict(lambda: run_drill(spec, modes, target, say=say), "the replay")
    code = EXIT_CODES[result["verdict"]]
    if code:
        raise Exit(code=code)


TASKS = [experiment, compare, replay]
