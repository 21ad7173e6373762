"""One testbed at a time, by lock (issue 13): a second command fails at once with exit 2 naming the
holder (pid, command, since when), or with ``--wait`` says so and waits; the kernel frees the lock when
its holder ends, SIGKILL included; within one process the lock is re-entrant."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed import lock

REPO = Path(__file__).resolve().parents[2]
HOLDER = """
import sys, time
from testbed.lock import hold
with hold("./inv drill"):
    print("held", flush=True)
    time.sleep(float(sys.argv[1]))
"""


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("SMFS_TESTBED_CACHE", str(folder))
    return folder


def _holder(seconds: float) -> subprocess.Popen[str]:
    """Another process that takes the lock and keeps it ``seconds`` (returns once it holds it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(seconds)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_second_fails(cache: Path) -> None:
    holder = _holder(60)
    try:
        t0 = time.monotonic()
        with pytest.raises(lock.LockBusy) as err, lock.hold("./inv up"):
            pass
        assert time.monotonic() - t0 < 1  # at once, no wait
        msg = str(err.value)
        assert f"./inv drill (pid {holder.pid}, since " in msg and str(cache / "testbed.lock") in msg
        assert "--wait" in msg and "\n" not in msg
        info = json.loads((cache / "testbed.lock").read_text())
        assert info["pid"] == holder.pid and info["command"] == "./inv drill" and time.time() - info["since"] < 60
        assert (cache / "testbed.lock").stat().st_mode & 0o777 == 0o600
    finally:
        holder.terminate()
        holder.wait()
    with lock.hold("./inv up"):  # ended (SIGTERM): free
        assert lock.held()
    assert not lock.held() and (cache / "testbed.lock").read_text() == ""  # no holder shown once released


def test_sigkill_frees(cache: Path) -> None:
    holder = _holder(60)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with lock.hold("./inv down"):
        assert json.loads((cache / "testbed.lock").read_text())["pid"] == os.getpid()


def test_reentrant(cache: Path) -> None:
    """A drill that brings the testbed up and tears it down holds the lock once: nested holds never
    block, and the lock is released only when the outermost one ends."""
    with lock.hold("./inv drill"):
        with lock.hold("./inv up"), lock.hold("./inv down"):
            assert lock.held()
        assert lock.held() and json.loads((cache / "testbed.lock").read_text())["command"] == "./inv drill"
        probe = subprocess.run([sys.executable, "-c", "from testbed.lock import hold\nwith hold('x'): pass"],
                               capture_output=True, text=True, timeout=30, check=False)
        assert probe.returncode == 1 and "LockBusy" in probe.stderr and f"(pid {os.getpid()}," in probe.stderr
    assert not lock.held()


def _inv(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO / "inv"), *args], env={**os.environ, "NO_COLOR": "1"}, capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_inv_busy(cache: Path) -> None:
    """``./inv down`` while another command holds the testbed: exit 2, one line naming the holder, and
    nothing done (what the registry records is still there)."""
    from testbed.registry import Registry

    (cache / "testbed").mkdir(parents=True)
    Registry().add("dir", str(cache / "testbed"), "testbed-t")
    holder = _holder(60)
    try:
        res = _inv("down")
    finally:
        holder.kill()
        holder.wait()
    assert res.returncode == 2, res.stdout + res.stderr
    assert len(res.stderr.splitlines()) == 1 and res.stderr.startswith("error: the testbed is in use: ./inv drill (pid "
                                                                        f"{holder.pid}, since "), res.stderr
    assert (cache / "testbed").is_dir() and len(Registry().items()) == 1


def test_inv_wait(cache: Path) -> None:
    """``--wait``: a message naming the holder, then the command runs once the holder ends."""
    holder = _holder(2)
    try:
        res = _inv("down", "--wait")
    finally:
        holder.kill()
        holder.wait()
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"waiting for the testbed: ./inv drill (pid {holder.pid}" in res.stderr and "nothing to remove" in res.stdout


def test_local_drill_busy(cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The namespace drill takes the lock after its flags are checked, before its output folder or
    anything else is made."""
    from invoke import Context
    from invoke.exceptions import Exit

    from testbed.cli.drill import local_drill
    from testbed.drill import local as localdrill

    monkeypatch.setattr(localdrill, "run_local_drill", lambda cfg, say: pytest.fail("ran while the testbed was held"))
    holder = _holder(60)
    try:
        with pytest.raises(Exit) as err:
            local_drill.body(Context(), out=str(tmp_path / "out"))
    finally:
        holder.kill()
        holder.wait()
    assert err.value.code == 2 and f"(pid {holder.pid}," in err.value.message and not (tmp_path / "out").exists()


def test_fresh_folders(tmp_path: Path) -> None:
    """Output folders are never reused: a second run in the same second gets its own folder."""
    from testbed.paths import fresh_folder

    first = fresh_folder(tmp_path / "results", "20250101-120000")
    (first / "remote-sync").mkdir()
    second = fresh_folder(tmp_path / "results", "20250101-120000")
    assert second.name == "20250101-120000-2" and first.name == "20250101-120000" and (first / "remote-sync").is_dir()
    assert fresh_folder(tmp_path / "results", "20250101-120000").name == "20250101-120000-3"


def test_used_out_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An --out that holds an earlier run is refused before anything runs: the runner would clear its
    mode folders."""
    from invoke import Context
    from invoke.exceptions import Exit

    from testbed.cli.drill import local_drill
    from testbed.drill import local as localdrill

    monkeypatch.setattr(localdrill, "run_local_drill", lambda cfg, say: pytest.fail("ran"))
    (tmp_path / "out" / "remote-sync").mkdir(parents=True)
    (tmp_path / "out" / "remote-sync" / "result.json").write_text("{}")
    with pytest.raises(Exit) as err:
        local_drill.body(Context(), out=str(tmp_path / "out"))
    assert err.value.code == 2 and err.value.message.startswith("error: --out ") and "not empty" in err.value.message
    assert (tmp_path / "out" / "remote-sync" / "result.json").read_text() == "{}"


@pytest.mark.parametrize("argv", [
    ("up",), ("drill",), ("drill", "--self-test"), ("local-drill",), ("experiment", "experiments/loss.toml", "--quick"),
    ("snapshot", "s1"), ("restore", "ready"), ("shape", "--loss", "1%"), ("calibrate",),
    ("capture",), ("bench", "vm"), ("campaign", "--runs", "1"), ("clone", "ready", "--as", "copy"), ("down",),
], ids=lambda argv: "-".join(argv))
def test_every_task_that_makes_or_removes_things_waits_its_turn(cache: Path, tmp_path: Path,
                                                                 argv: tuple[str, ...]) -> None:
    """Each task that creates, changes or removes a testbed's resources takes the one-testbed lock
    (issue #13: a drill reused a running testbed with no lock): while another command holds it, the
    task exits 2 with one line naming the holder, before it creates anything (its --out included)."""
    import shutil
    import tempfile

    # the campaign refuses an --out too long for the stack's unix sockets (pytest's folders are)
    short = Path(tempfile.mkdtemp(prefix="lk-", dir="/tmp")) if argv[0] == "campaign" else tmp_path
    holder = _holder(120)
    out = short / "out"
    extra = ("--out", str(out)) if argv[0] in ("drill", "local-drill", "experiment", "campaign") else ()
    try:
        try:
            res = _inv(*argv, *extra)
        finally:
            holder.kill()
            holder.wait()
        assert res.returncode == 2, res.stdout + res.stderr
        assert res.stderr.splitlines() == [line for line in res.stderr.splitlines() if line.startswith(
            f"error: the testbed is in use: ./inv drill (pid {holder.pid}, since ")], res.stderr
        assert len(res.stderr.splitlines()) == 1 and not out.exists()
    finally:
        if short != tmp_path:
            shutil.rmtree(short, ignore_errors=True)
