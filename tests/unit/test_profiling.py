"""smfs/profiling.py: opt-in (SMFS_PROFILE_DIR), the loop's profile dumped as text every few seconds,
so the figures survive the VM's power cut up to the last dump; without the variable, nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from smfs import profiling


def _busy(n: int) -> int:
    return sum(i * i for i in range(n))


async def _run(seconds: float) -> None:
    profiling.start("site", every=0.05)
    end = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < end:
        _busy(20_000)
        await asyncio.sleep(0.01)


def test_the_profile_is_written_while_the_program_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(profiling.ENV, str(tmp_path / "profile"))
    asyncio.run(_run(0.3))
    text = (tmp_path / "profile" / "site.txt").read_text()
    assert "Ordered by: internal time" in text and "_busy" in text
    assert not list((tmp_path / "profile").glob("*.tmp"))  # replaced atomically


def test_nothing_without_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(profiling.ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    asyncio.run(_run(0.1))
    assert not list(tmp_path.rglob("*"))
