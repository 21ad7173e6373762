"""The seeded-defect registry: off unless SMFS_DEFECT names a defect, loud when on, and strict
about names (a typo must not silently run the real stack as if it were the broken one)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from smfs import defects


def test_no_defect_is_on_by_default(caplog: pytest.LogCaptureFixture) -> None:
    assert defects.enabled() == ()
    assert not any(defects.active(name) for name in defects.DEFECTS)
    with caplog.at_level(logging.WARNING):
        defects.announce(logging.getLogger("test"))
    assert caplog.records == []


def test_the_environment_names_the_defects_once_per_process(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("SMFS_DEFECT", " mirror-acks-before-fsync, ,remote-sync-acks-at-handoff,mirror-acks-before-fsync")
    defects.reset()
    assert defects.enabled() == ("mirror-acks-before-fsync", "remote-sync-acks-at-handoff")
    assert defects.active("remote-sync-acks-at-handoff") and not defects.active("primary-acks-before-local-write")
    monkeypatch.setenv("SMFS_DEFECT", "")
    assert defects.active("mirror-acks-before-fsync")  # cached: read once per process
    with caplog.at_level(logging.WARNING):
        defects.announce(logging.getLogger("test"))
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == "SEEDED DEFECT ACTIVE: mirror-acks-before-fsync, remote-sync-acks-at-handoff"


def test_an_empty_variable_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMFS_DEFECT", " , ")
    defects.reset()
    assert defects.enabled() == ()


def test_an_unknown_name_raises_one_line(seed_defect: Callable[[str], None]) -> None:
    seed_defect("remote-sync-acks-at-handoff,fast-acks")
    with pytest.raises(ValueError) as info:
        defects.active("remote-sync-acks-at-handoff")
    msg = str(info.value)
    assert "\n" not in msg and "'fast-acks'" in msg and "SMFS_DEFECT" in msg
    assert all(name in msg for name in defects.DEFECTS)


def test_a_hook_asking_for_an_unregistered_defect_raises() -> None:
    with pytest.raises(ValueError, match="not registered"):
        defects.active("remote-sync-acks-at-hand0ff")


def test_every_defect_has_a_one_line_description() -> None:
    assert len(defects.DEFECTS) == 5 and "mirror-skips-directory-fsync" in defects.DEFECTS
    for name, text in defects.DEFECTS.items():
        assert name == name.strip().lower() and "," not in name
        assert text and "\n" not in text
