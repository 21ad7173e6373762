"""One testbed per test module (boot is the expensive part under TCG), always torn down."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

SPEC = Path(__file__).resolve().parents[2] / "specs" / "ci.toml"


@pytest.fixture(scope="module")
def tb() -> Iterator[object]:
    from testbed.vm import bed as vmbed

    if (vmbed.testbeds_dir() / "active").exists():
        pytest.skip("a testbed is already up (./inv down first); these tests bring up their own")
    bed = vmbed.up(SPEC, say=print)
    try:
        yield bed
    finally:
        vmbed.down(say=print)
