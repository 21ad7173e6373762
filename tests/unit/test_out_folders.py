"""Output folders are never reused or deleted implicitly (issue 13, "One testbed at a time, by lock"):
every task that writes a result folder either takes the one given by ``--out`` (refused when it holds an
earlier run's files, before anything runs) or claims a new one under the testbed's lock, so two runs in the
same second (one waiting for the other with ``--wait``) never share a folder. The drill itself is replaced
by a stub that writes what a mode would, so a shared folder shows as the first run's files overwritten or
gone."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from invoke import Context
from invoke.exceptions import Exit

REPO = Path(__file__).resolve().parents[2]
STAMP = "20250101-120000"


@pytest.fixture()
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache of its own (the lock), a working folder of its own (the default result folders) and a
    clock stopped at one second: every default folder name is the same unless it is claimed."""
    monkeypatch.setenv("SMFS_TESTBED_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    real = time.strftime
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: STAMP if fmt == "%Y%m%d-%H%M%S" else real(fmt, *a))
    return work


def _run_into(seen: list[Path], mode: str = "remote-sync") -> Any:
    """A stand-in for a drill: what a mode writes into its folder (the runner clears a mode folder first,
    as ``runner.run_mode`` does), tagged with the run's number."""
    import shutil

    def run(out: Path) -> dict[str, Any]:
        seen.append(out)
        shutil.rmtree(out / mode, ignore_errors=True)
        (out / mode).mkdir(parents=True)
        (out / mode / "result.json").write_text(json.dumps({"run": len(seen)}))
        return {"verdict": "ok"}

    return run


def _recorded(folder: Path) -> int:
    return json.loads((folder / "remote-sync" / "result.json").read_text())["run"]


def test_local_drill_default_folders_are_new_each_run(world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: results/local/<second>, and the runner deleted an existing mode folder in it."""
    from testbed.cli.drill import local_drill
    from testbed.drill import local as localdrill

    seen: list[Path] = []
    run = _run_into(seen)
    monkeypatch.setattr(localdrill, "run_local_drill", lambda cfg, say: run(cfg.out))
    for _ in range(2):
        local_drill.body(Context())
    assert seen[0] != seen[1] and all(p.parent == Path("results/local") for p in seen), seen
    assert [_recorded(p) for p in seen] == [1, 2]


def _result_folder(root: Path) -> Path:
    src = root / "results" / "ci" / "20241231-235959"
    src.mkdir(parents=True)
    (src / "result.json").write_text(json.dumps({"verdict": "ok", "config": {"modes": ["remote-sync"]}}))
    (src / "spec.toml").write_text('name = "ci"\n')
    return src


def test_replay_out_that_holds_a_run_is_refused(world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: ``./inv replay DIR --out USED`` ran the drill into USED, clearing its mode folders."""
    from testbed.cli.experiment import replay
    from testbed.drill import vm as drill_vm

    src = _result_folder(world)
    used = world / "used"
    (used / "remote-sync").mkdir(parents=True)
    (used / "remote-sync" / "result.json").write_text('{"run": 0}')
    monkeypatch.setattr(drill_vm, "run_drill", lambda *a, **k: pytest.fail("the replay ran into a used folder"))
    with pytest.raises(Exit) as err:
        replay.body(Context(), str(src), out=str(used))
    assert err.value.code == 2 and err.value.message.startswith(f"error: --out {used}: exists and is not empty")
    assert _recorded(used) == 0


def test_replays_in_the_same_second_get_their_own_folders(world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the default folder (<second>-replay beside the source) was named before the lock was taken,
    so a second replay (waiting with --wait) ran into the first one's folder and cleared its modes."""
    from testbed.cli.experiment import replay
    from testbed.drill import vm as drill_vm

    src = _result_folder(world)
    seen: list[Path] = []
    run = _run_into(seen)
    monkeypatch.setattr(drill_vm, "run_drill", lambda spec, modes, out, **k: run(out))
    for _ in range(2):
        replay.body(Context(), str(src))
    assert seen[0] != seen[1] and all(p.parent == src.parent and p.name.startswith(f"{STAMP}-replay") for p in seen)
    assert [_recorded(p) for p in seen] == [1, 2] and json.loads((src / "result.json").read_text())["verdict"] == "ok"


def test_experiments_in_the_same_second_get_their_own_folders(world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the default folder was named before the lock; a second experiment in the same second (waiting
    with --wait) found the first one's folder and failed with an error about an --out it was never given."""
    from testbed.cli.experiment import experiment
    from testbed.drill import experiment as expmod

    seen: list[Path] = []
    run = _run_into(seen)
    monkeypatch.setattr(expmod, "run_experiment", lambda exp, out, **k: run(out) | {"claims": []})
    file = str(REPO / "experiments" / "loss.toml")
    for _ in range(2):
        experiment.body(Context(), file, quick=True)
    assert seen[0] != seen[1] and all(p.parent == Path("results/experiments/loss-quick") for p in seen), seen
    assert [_recorded(p) for p in seen] == [1, 2]
    used = world / "used"
    used.mkdir()
    (used / "points.csv").write_text("keep")
    with pytest.raises(Exit) as err:  # refused before the lock and the testbed, as every task's --out
        experiment.body(Context(), file, quick=True, out=str(used))
    assert err.value.code == 2 and "exists and is not empty" in err.value.message and len(seen) == 2
