"""Sizes at the command line, and the resource registry's bookkeeping."""

from __future__ import annotations

from pathlib import Path

import pytest

from smfs.units import parse_size
from testbed.registry import Registry, RegistryError, TeardownError, register_teardown


@pytest.mark.parametrize("text, value", [("64KiB", 65536), ("512KiB", 524288), ("1MiB", 1 << 20), ("100MB", 10**8), ("4096", 4096)])
def test_sizes(text: str, value: int) -> None:
    assert parse_size(text, "--append-size") == value


@pytest.mark.parametrize("text", ["", "abc", "-1KiB", "0", "12 parsecs"])
def test_bad_sizes_name_the_field(text: str) -> None:
    with pytest.raises(ValueError, match="--append-size"):
        parse_size(text, "--append-size")


def test_teardown_removes_only_recorded_and_keeps_failures(tmp_path: Path) -> None:
    removed: list[str] = []

    def ok(res):  # noqa: ANN001
        removed.append(res.ident)

    def broken(res):  # noqa: ANN001
        raise OSError("busy")

    def ours(res, scope):  # noqa: ANN001 - these made-up kinds are always this testbed's
        return None

    register_teardown("test-ok", ok, check=ours)
    register_teardown("test-broken", broken, check=ours)
    reg = Registry(tmp_path / "registry.json")
    reg.add("test-ok", "a", "run1")
    reg.add("test-broken", "b", "run1")
    reg.add("test-ok", "c", "run2")
    with pytest.raises(TeardownError, match="test-broken b: busy"):
        reg.teardown(owner="run1")
    assert removed == ["a"]
    assert [(r.kind, r.ident) for r in reg.items()] == [("test-broken", "b"), ("test-ok", "c")]
    # A fresh Registry object reads the same file (state survives a crashed run).
    assert len(Registry(tmp_path / "registry.json").items(owner="run2")) == 1


def test_unreadable_registry_is_kept_aside(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    path.write_text("{not json")
    with pytest.raises(RegistryError, match="could not be parsed"):  # never an empty registry: nothing is guessed
        Registry(path).items()
    assert list(tmp_path.glob("registry.broken-*"))
