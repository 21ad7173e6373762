"""The VM testbed's state.json: typed fields, the old file's keys, written atomically by the testbed alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from testbed.vm.bed import RouterLeg, RouterState, VmInfo, VmTestbed, VmTestbedState

VM = {"name": "primary", "site": "primary", "domain": "smfs-ci-primary", "uri": "qemu:///system",
      "address": "198.18.1.10/24", "gateway": "198.18.1.254", "mac": "52:54:00:01:02:03",
      "root": "/c/primary-root.qcow2", "data": "/c/primary-data.raw", "qmp": "/c/qmp/primary.sock",
      "console": "/c/primary-console.log", "boot_seconds": 4.2, "ledger": "/c/qmp/primary-ledger.sock",
      "data_socket": "/c/disks/primary.sock"}  # fmt: skip
ROUTER = {"vm": "router", "legs": {"primary": {"bridge": "smfs-primary", "address": "198.18.1.253/24",
                                               "mac": "52:54:00:aa:00:01", "ifname": "eth0"}},
          "routes": {"primary": [["198.18.2.0/24", "198.18.1.253"]]}}  # fmt: skip
OLD = {"name": "ci", "spec": {"name": "ci"}, "spec_path": "specs/ci.toml", "image": "img1", "accel": "tcg",
       "accel_reason": "no /dev/kvm", "boot_timeout": 300, "run_as_root": False, "vms": [VM],
       "snapshots": ["ready"], "t_up": 1.5, "router": ROUTER,
       "snapshot_wan": {"ready": {"wan_profile": {"delay": "10ms"}, "wan_bare": None, "wan_enforcement": None}},
       "wan_profile": {"delay": "10ms"}, "drill_wan": {"stack": {"wan": {}}}}  # fmt: skip


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SMFS_TESTBED_CACHE", str(tmp_path))
    (tmp_path / "testbeds" / "ci").mkdir(parents=True)
    return tmp_path / "testbeds" / "ci"


def test_a_state_file_reads_into_named_fields_and_writes_back_the_same_keys() -> None:
    state = VmTestbedState.from_json(OLD, "ci")
    assert state.vms == (VmInfo(**VM),) and state.snapshots == ("ready",) and state.boot_timeout == 300
    assert state.router == RouterState("router", {"primary": RouterLeg("smfs-primary", "198.18.1.253/24",
                                                                      "52:54:00:aa:00:01", "eth0")},
                                       ROUTER["routes"])  # fmt: skip
    assert state.wan_profile == {"delay": "10ms"} and state.wan_bare is None and state.wan_enforcement is None
    assert state.to_json() == OLD


def test_missing_keys_take_the_old_defaults() -> None:
    bare = {"spec": {}, "spec_path": "specs/ci.toml", "accel": "kvm", "vms": [{k: v for k, v in VM.items()
                                                                               if k not in ("ledger", "data_socket")}]}
    state = VmTestbedState.from_json(bare, "ci")
    assert state.name == "ci" and state.boot_timeout == 120 and state.run_as_root is False
    assert state.snapshots == () and state.snapshot_wan is None and state.drill_wan is None and state.router is None
    assert state.image is None and state.accel_reason is None and state.vms[0].data_socket == ""
    out: dict[str, Any] = state.to_json()
    assert "router" not in out and "wan_profile" not in out and out["snapshots"] == []


def test_update_writes_state_json_atomically_and_only_the_testbed_does(cache: Path) -> None:
    (cache / "state.json").write_text(json.dumps(OLD))
    tb = VmTestbed.load("ci")
    assert tb.vms["primary"].boot_seconds == 4.2 and tb.router == "router" and tb.accel == "tcg"
    with pytest.raises(AttributeError):
        tb.state = tb.state  # type: ignore[misc]  # read-only: change it with update
    tb.update(wan_bare={"rtt_median_ms": 3.0}, snapshots=("ready", "stopped"))
    assert tb.state.wan_bare == {"rtt_median_ms": 3.0}
    on_disk = json.loads((cache / "state.json").read_text())
    assert on_disk == OLD | {"wan_bare": {"rtt_median_ms": 3.0}, "snapshots": ["ready", "stopped"]}
    assert VmTestbed.load("ci").state == tb.state
    assert [p.name for p in cache.iterdir()] == ["state.json"]  # no temporary file left
    with pytest.raises(TypeError):
        tb.update(wan_shape={})  # a typo is an error, not a new key
