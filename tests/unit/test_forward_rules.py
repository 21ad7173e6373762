"""The forward filter's rules, its ownership check and the drop decision (issue 13), nft faked.
The packets themselves are in tests/netns/test_forward_scope.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from testbed.registry import Registry, Resource, Scope
from testbed.vm import bridges

MARK = "smfs-testbed:0123456789abcdef"


def test_rules_accept_between_ours_and_drop_only_when_asked() -> None:
    keep = bridges.forward_rules("smfs_fwd_x", MARK, ["smfs-primary", "smfs-mirror", "smfs-primary"], False)
    ours = '{ "smfs-mirror", "smfs-primary" }'
    assert f"iifname {ours} oifname {ours} accept" in keep
    assert f'\tcomment "{MARK}"\n' in keep and "hook forward priority filter; policy accept;" in keep
    assert "drop" not in keep  # forwarding was someone else's: a drop here would be final for them too
    drop = bridges.forward_rules("smfs_fwd_x", MARK, ["smfs-primary", "smfs-mirror"], True)
    lines = [line.strip() for line in drop.splitlines()]
    first = lines.index(f"iifname {ours} oifname {ours} accept")
    assert lines[first + 1:first + 6] == ["meta nfproto != ipv4 accept", f"iifname {ours} drop",
                                          f"oifname {ours} drop", 'meta iifkind "bridge" meta oifkind "bridge" accept',
                                          "drop"]


@pytest.mark.parametrize("names", [[], ['smfs-a" accept'], ["a-name-longer-than-15"]])
def test_rules_refuse_what_nft_would_misread(names: list[str]) -> None:
    with pytest.raises(ValueError, match="interface name|no bridges"):
        bridges.forward_rules("smfs_fwd_x", MARK, names, True)


@pytest.mark.parametrize(("ident", "comment", "why"), [
    ("inet smfs_fwd_0123456789abcdef", MARK, None),
    ("inet smfs_fwd_0123456789abcdef", None, None),  # gone: nothing to touch
    ("inet smfs_fwd_0123456789abcdef", "", "carries no smfs-testbed mark"),
    ("inet smfs_fwd_0123456789abcdef", "smfs-testbed:ffffffffffffffff", "not this testbed's mark"),
    ("inet smfs_fwd_ffffffffffffffff", MARK, "not this testbed's forward filter"),
    ("inet filter", MARK, "not this testbed's forward filter"),
    ("ip smfs_fwd_0123456789abcdef", MARK, "not this testbed's forward filter"),
])
def test_check(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ident: str, comment: str | None, why: str | None) -> None:
    monkeypatch.setattr(bridges, "_table_comment", lambda _ident: comment)
    got = bridges._nft_is_ours(Resource("nft", ident, "testbed-x"), Scope(tmp_path, "0123456789abcdef"))
    assert (got is None) if why is None else (got is not None and why in got), got


@pytest.fixture()
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """ip_forward is a file, nft a recorder with no tables."""
    monkeypatch.setenv("SMFS_TESTBED_CACHE", str(tmp_path / "cache"))
    forward = tmp_path / "ip_forward"
    monkeypatch.setattr(bridges, "IP_FORWARD", str(forward))
    calls: list[tuple[tuple[str, ...], str | None, str]] = []  # argv, input, ip_forward at the time

    def nft(*argv: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        calls.append((argv, input, forward.read_text().strip()))
        if argv[0] == "list":
            return subprocess.CompletedProcess(argv, 1, "", "Error: No such file or directory\n")
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(bridges, "_nft", nft)
    return {"forward": forward, "calls": calls}


@pytest.mark.parametrize(("now", "recorded", "drop"), [("0", None, True), ("1", None, False), ("1", "0", True),
                                                      ("1", "1", False)])
def test_drop_when_the_testbed_turned_forwarding_on(fake: dict[str, object], now: str, recorded: str | None,
                                                    drop: bool) -> None:
    forward = fake["forward"]
    assert isinstance(forward, Path)
    forward.write_text(f"{now}\n")
    reg = Registry()
    if recorded is not None:  # an earlier up of this testbed turned it on and has not restored it yet
        reg.add("sysctl", str(forward), "testbed-x", previous=recorded)
    assert bridges.scope_forwarding(["smfs-primary", "smfs-mirror"], "testbed-x", reg) is drop
    assert forward.read_text().strip() == "1"
    loaded = [(text, at) for argv, text, at in fake["calls"] if argv == ("-f", "-")]  # type: ignore[attr-defined]
    assert len(loaded) == 1 and ("\t\tdrop\n" in loaded[0][0]) is drop
    assert loaded[0][1] == now  # the filter is in place before forwarding is turned on
    entry = reg.items("nft")
    assert [r.ident for r in entry] == [f"inet smfs_fwd_{reg.scope.id}"] and entry[0].meta["drop_others"] is drop
    sysctl = reg.items("sysctl")
    assert [r.meta["previous"] for r in sysctl] == ([recorded] if recorded else ["0"] if now == "0" else [])
