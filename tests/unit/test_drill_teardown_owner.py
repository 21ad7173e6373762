"""The VM drill tears down its own testbed only (issue #13: a VM experiment's teardown removed a
concurrent namespace test's resources): ``with_testbed`` hands ``down`` its testbed's owner."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from smfs.modes import parse_modes
from testbed.drill import vm as drill_vm
from testbed.registry import Registry
from testbed.vm import bed as vmbed


@pytest.mark.parametrize("fails", [False, True], ids=["after-the-body", "after-an-error"])
def test_the_drill_removes_its_own_testbed_and_nothing_of_another_owner(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails: bool) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SMFS_TESTBED_CACHE", str(cache))
    ours, theirs = cache / "testbeds" / "d", cache / "netns-test"
    for folder in (ours, theirs):
        folder.mkdir(parents=True)
    reg = Registry()
    reg.add("dir", str(ours), "testbed-d")
    reg.add("dir", str(theirs), "netns-12345")  # a concurrent namespace test's
    tb: Any = SimpleNamespace(name="d", accel="tcg", owner="testbed-d",
                              state=SimpleNamespace(snapshots=(drill_vm.SNAPSHOT,), drill_wan={}))
    monkeypatch.setattr(drill_vm, "_reuse", lambda name, say: None)
    monkeypatch.setattr(vmbed, "up", lambda spec, say: tb)
    cfg = drill_vm.DrillConfig(spec_path=tmp_path / "s.toml", modes=tuple(parse_modes("local-sync")), out=tmp_path)

    def body(_: Any) -> None:
        if fails:
            raise RuntimeError("the body failed")

    said: list[str] = []
    spec = SimpleNamespace(name="d")
    if fails:
        with pytest.raises(RuntimeError, match="the body failed"):
            drill_vm.with_testbed(spec, cfg, tmp_path, keep=False, say=said.append, body=body)
    else:
        drill_vm.with_testbed(spec, cfg, tmp_path, keep=False, say=said.append, body=body)
    assert not ours.exists() and theirs.is_dir()
    assert [(r.ident, r.owner) for r in Registry().items()] == [(str(theirs), "netns-12345")]
