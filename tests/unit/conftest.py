"""Unit tests run the real stack: no seeded defect (``SMFS_DEFECT``) leaks in from the environment
or from one test into the next."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from smfs import defects


@pytest.fixture(autouse=True)
def _no_seeded_defects(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(defects.ENV, raising=False)
    defects.reset()
    yield
    defects.reset()


@pytest.fixture()
def seed_defect(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """``seed_defect(name)`` turns seeded defect ``name`` on for the rest of the test."""

    def seed(name: str) -> None:
        monkeypatch.setenv(defects.ENV, name)
        defects.reset()

    yield seed
