"""The drill's self-test in VMs on specs/ci.toml: seeded stack defects the drill must catch, each
next to a control run of the correct stack in the same mode and disaster (which must be ok)."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CAUGHT_RELIABLY = ("remote-sync-acks-at-handoff,mirror-acks-before-fsync,primary-acks-before-local-write,"
                   "network-sync-callback-before-repairs,mirror-skips-directory-fsync")
"""Every seeded defect, one run each (network-sync-callback-before-repairs by the wire check)."""


def test_seeded_defects_are_caught_and_the_correct_stack_is_not_accused(ci_bed: object, tmp_path: Path) -> None:
    from testbed.drill.selftest import run_self_test

    # On the session's ci testbed and its snapshot "ready", as `./inv self-test` reuses a running testbed.
    result = run_self_test(REPO / "specs" / "ci.toml", CAUGHT_RELIABLY, runs=1, out=tmp_path / "st", keep=True,
                           say=print)
    on_disk = json.loads((tmp_path / "st" / "self-test.json").read_text())
    assert on_disk["verdict"] == result["verdict"] == "ok", (result["controls"], result["rows"])
    assert {c["schedule"] for c in result["controls"]} == {"rolling-disaster", "mirror-power-outage", "site-power-cut"}
    assert any(c["segment_bytes"] for c in result["controls"]), "a control with the defect's small segments"
    assert all(c["verdict"] == "ok" for c in result["controls"]), result["controls"]
    rows = {r["defect"]: r for r in result["rows"]}
    assert set(rows) == set(CAUGHT_RELIABLY.split(","))
    assert all(r["caught"] and r["verdict"] == "data-loss" for r in rows.values()), rows
    assert "wire check" in rows["network-sync-callback-before-repairs"]["evidence"]
    [wired] = [c for c in result["controls"] if c["mode"] == "network-sync"]
    assert wired["flush_ms"] == 100.0 and wired["verdict"] == "ok"  # the correct stack passes the wire check
