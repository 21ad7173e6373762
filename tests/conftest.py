"""Markers follow the folder: tests/unit -> unit, tests/netns -> netns, tests/vm -> vm.

netns and vm tests are skipped (with the reason) when not root; ``./inv test`` selects them.
The tests on the session's shared ci testbed (``ci_bed``, tests/vm/conftest.py) run last, once every
module-scoped testbed is down: one testbed is up at a time.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            folder = Path(str(item.fspath)).relative_to(_HERE).parts[0]
        except ValueError:
            continue
        if folder in ("unit", "netns", "vm"):
            item.add_marker(getattr(pytest.mark, folder))
            if folder in ("netns", "vm") and os.geteuid() != 0:
                item.add_marker(pytest.mark.skip(reason=f"{folder} tests need root"))
    items.sort(key=lambda item: "ci_bed" in getattr(item, "fixturenames", ()))  # stable: the rest keep their order
