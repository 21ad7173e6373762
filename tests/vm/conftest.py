"""The vm tests' testbeds (boot is the expensive part under TCG), always torn down.

- ``tb``: one testbed per test module, for the modules that change it at will (destroy a VM, reshape
  the WAN, clone it).
- ``ci_bed``: one testbed for the whole session with the drill's snapshot "ready" taken, shared by every
  test that restores that snapshot for each of its runs (the ci drill, its faults, its self-test, its
  epochs). Bring-up and preparation (~40-70 s under TCG) are paid once instead of once per test; each run
  still starts from the same memory image, as in a drill. tests/conftest.py orders these tests last, after
  the module testbeds are down (only one testbed is up at a time).
"""

from __future__ import annotations

import subprocess
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


@pytest.fixture(scope="session")
def ci_bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """specs/ci.toml's testbed, up, with snapshot "ready" (WAN shaped and calibrated, the mirror site and both
    gateways running): what ``run_drill(..., keep=True)`` and ``run_self_test(..., keep=True)`` reuse."""
    from smfs.modes import parse_mode
    from testbed.drill import vm as drill
    from testbed.drill.faults import Timeline
    from testbed.vm import bed as vmbed

    if (vmbed.testbeds_dir() / "active").exists():
        pytest.skip("a testbed is already up (./inv down first); these tests bring up their own")
    bed = vmbed.up(SPEC, say=print)
    try:
        cfg = drill.DrillConfig.from_spec(bed.spec, (parse_mode("remote-sync"),), tmp_path_factory.mktemp("ready"))
        bed.update(drill_wan=drill.prepare(bed, cfg, Timeline(say=print)))
        yield bed
    finally:
        vmbed.down(say=print)
        # What the drills kept is gone with it: no domain of the ci testbed is left.
        listed = subprocess.run(["virsh", "list", "--all", "--name"], capture_output=True, text=True).stdout
        assert "smfs-ci" not in listed, listed
