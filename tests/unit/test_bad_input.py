"""Bad input is one line naming the field and exit 2: never a traceback, a hang or a silent default, and
nothing is created before the check (issue 13, first section).

The named findings first, each as it was reported; then property-based tests (hypothesis) that generate
malformed specs and flags: wrong types, NaN and infinities, huge and negative numbers, unknown keys,
non-UTF-8, path-like names. The spec loader is pure and tested in-process; the command line both
in-process (the task functions) and as ``./inv`` subprocesses that must fail before creating anything.
"""

from __future__ import annotations

import copy
import math
import os
import re
import string
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from invoke import Context
from invoke.exceptions import Exit

from smfs.units import parse_size
from testbed import spec as specmod
from testbed.spec import SpecError, from_mapping

REPO = Path(__file__).resolve().parents[2]


def base() -> dict[str, Any]:
    """A valid spec with every drill table present."""
    return {
        "name": "t",
        "testbed": {"accel": "auto", "boot_timeout": 90, "mtu": 1500},
        "sites": [
            {"name": "primary", "subnet": "198.18.1.0/24", "vms": [{"name": "primary", "memory": "384MiB",
                                                                  "max_memory": "512MiB", "data_disk": "512MiB"}]},
            {"name": "mirror", "subnet": "198.18.2.0/24", "vms": [{"name": "mirror"}]},
        ],
        "wan": {"delay": "10ms", "loss": "0%"},
        "workload": {"testers": 4, "append_size": "64KiB", "duration": "60s", "server_pairs": 2},
        "fec": {"r": 8, "c": 3, "flush": "5ms"},
        "faults": {"schedule": "rolling-disaster", "fail_at": "10s", "burst_loss": "1%", "burst": "500ms",
                   "drain_timeout": "60s"},
    }


def with_value(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    d = base()
    target: Any = d
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = value
    return d


def refused(data: Any) -> str:
    """The ``SpecError`` message for ``data``; fails the test on any other outcome."""
    with pytest.raises(SpecError) as err:
        from_mapping(data)
    msg = str(err.value)
    assert len(msg.splitlines()) == 1, msg
    return msg


# --- the findings, as reported ---------------------------------------------------------------------


def test_parse_size_of_a_huge_number_is_an_error_not_an_overflow() -> None:
    with pytest.raises(ValueError, match=r"^--append-size: .* is above the maximum"):
        parse_size("9" * 400, "--append-size")
    with pytest.raises(ValueError, match="above the maximum"):
        parse_size(10**5000, "f")  # too long for Python's int-to-text: described, not printed


@pytest.mark.parametrize("value", [True, False, 1.5, None, [1], {"a": 1}])
def test_parse_size_refuses_what_is_not_a_size(value: Any) -> None:
    with pytest.raises(ValueError, match=r"^f: .* is not a size"):
        parse_size(value, "f")


def test_parse_size_is_exact() -> None:
    assert parse_size("0.5KiB", "f") == 512 and parse_size("1.5MiB", "f") == 3 << 19
    with pytest.raises(ValueError, match="not a whole number of bytes"):
        parse_size("1.3B", "f")


@pytest.mark.parametrize(("field", "bound"), [("memory", "64GiB"), ("max_memory", "64GiB"), ("data_disk", "1TiB")])
def test_huge_vm_sizes_are_refused(field: str, bound: str) -> None:
    msg = refused(with_value(("sites", 0, "vms", 0, field), "100000TiB"))
    assert msg.startswith(f"sites[0] (primary).vms[0].{field}: '100000TiB' is above the maximum {bound}")


def test_vm_sizes_are_whole_mib() -> None:
    assert "whole number of 1MiB" in refused(with_value(("sites", 0, "vms", 0, "memory"), "384.5MiB"))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e300, 4, True, "120"])
def test_boot_timeout_must_be_finite_and_bounded(value: Any) -> None:
    assert refused(with_value(("testbed", "boot_timeout"), value)).startswith("testbed.boot_timeout: ")


def test_an_unknown_top_level_table_is_refused() -> None:
    d = base()
    d["wrokload"] = d.pop("workload")
    assert refused(d) == "wrokload: unknown table; use one of faults, fec, name, sites, testbed, wan, workload"


@pytest.mark.parametrize("value", [True, 3.9, "4", 0, 100000])
def test_testers_must_be_a_whole_number_in_range(value: Any) -> None:
    assert refused(with_value(("workload", "testers"), value)).startswith(
        f"workload.testers: {value!r} is not a whole number from 1 to 1024")


@pytest.mark.parametrize(("path", "value", "expect"), [
    (("fec", "r"), 0, "fec.r: 0 is not a whole number from 1 to 64"),
    (("fec", "r"), 1000, "fec.r: 1000 is not a whole number from 1 to 64"),
    (("fec", "c"), True, "fec.c: True is not a whole number from 0 to 3"),
    (("fec", "c"), 4, "fec.c: 4 is not a whole number from 0 to 3"),
    (("workload", "server_pairs"), 100000, "workload.server_pairs: 100000 is not a whole number from 1 to 64"),
    (("workload", "append_size"), "1GiB", "workload.append_size: '1GiB' is above the maximum 64MiB"),
    (("workload", "append_size"), 64 * 2**20 + 1, "workload.append_size: 67108865 is above the maximum 64MiB"),
    (("workload", "duration"), "inf", "workload.duration: cannot parse 'inf'"),
    (("workload", "duration"), "1e400s", "workload.duration: '1e400s' is not finite"),
    (("workload", "duration"), "100000s", "workload.duration: '100000s' is outside (0 s, 86400 s]"),
    (("faults", "drain_timeout"), "0.5s", "faults.drain_timeout: '0.5s' is outside [1 s, 3600 s]"),
    (("faults", "burst"), "2h", "faults.burst: unknown time unit 'h'"),
    (("faults", "burst_loss"), "0%", "faults.burst_loss: '0%' must be above 0%"),
    (("faults", "schedule"), ["x"], "faults.schedule: unknown schedule ['x']"),
    (("faults", "during"), [{"fault": "freeze", "at": "1s", "for": "1s", "vm": ["mirror"]}],
     "faults.during[0].vm: ['mirror'] is not a string"),
    pytest.param(("wan", "limit"), 10**5000, "wan.limit: a 16610-bit integer is not a whole number of packets",
                 id="wan.limit-huge"),
    (("wan", "a\nb"), 1, "wan.'a\\nb': unknown field; use one of"),
])  # fmt: skip
def test_drill_tables_are_checked_when_the_spec_loads(path: tuple[str, ...], value: Any, expect: str) -> None:
    assert refused(with_value(path, value)).startswith(expect)


def test_the_drill_tables_match_what_the_drill_reads() -> None:
    from testbed.drill.vm import DRILL_KEYS

    assert DRILL_KEYS == specmod.DRILL_KEYS


def test_the_mirror_ports_of_the_most_server_pairs_stay_below_the_control_port() -> None:
    from testbed.drill.vm import CONTROL, MIRROR_PORT

    assert MIRROR_PORT + specmod.SERVER_PAIRS[1] <= int(CONTROL.rsplit(":", 1)[1])


def test_a_spec_path_that_is_a_directory_or_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"^spec file '.*': is a directory; pass a TOML file"):
        specmod.load(tmp_path)
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'name = "caf\xe9"\n')
    with pytest.raises(SpecError, match=r"^spec file '.*latin1.toml': not UTF-8 text \(byte 11\)"):
        specmod.load(bad)
    odd = tmp_path / os.fsdecode(b"\xff.toml")  # a file name that is not UTF-8 either
    odd.write_bytes(bad.read_bytes())
    with pytest.raises(SpecError, match=r"\\udcff.toml': not UTF-8") as err:
        specmod.load(odd)
    str(err.value).encode("utf-8")  # printable as it is
    with pytest.raises(SpecError, match="not a regular file"):
        specmod.load("/dev/zero")  # would never end if read
    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 100_000)
    with pytest.raises(SpecError, match="not valid TOML"):
        specmod.load(deep)


def test_testers_abc_is_one_line_not_an_option_parser_traceback(inv: Any) -> None:
    res = inv("local-drill", "--testers", "abc")
    assert (res.returncode, res.stderr) == (2, "error: --testers 'abc': give a whole number, e.g. --testers 64\n")


@pytest.mark.parametrize(("flag", "shown"), [("duration", "--duration"), ("fail_at", "--fail-at"),
                                             ("drain_timeout", "--drain-timeout")])
@pytest.mark.parametrize("value", ["inf", "Infinity", "nan", "-inf", "1e400"])
def test_local_drill_with_an_endless_time_is_refused(flag: str, shown: str, value: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The finding as reported: ``local-drill --duration inf`` was accepted (a run that never ends)."""
    from testbed.cli.drill import local_drill
    from testbed.drill import local as localdrill

    monkeypatch.setattr(localdrill, "run_local_drill", _must_not_run)
    with pytest.raises(Exit) as err:
        local_drill.body(Context(), **{flag: value})
    assert err.value.code == 2 and err.value.message.startswith(f"error: {shown} ") and "\n" not in err.value.message


def test_up_checks_the_clone_name_before_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    from testbed.cli.vm import clone_, up
    from testbed.vm import bed as vmbed

    monkeypatch.setattr(vmbed, "up", _must_not_run)
    for name in ("../x", "..", ".", "a/b", "-rf", "x" * 11, "Big"):
        with pytest.raises(Exit) as err:
            up(Context(), clone=name)
        assert err.value.code == 2 and err.value.message.startswith("error: --clone: ")
    monkeypatch.setattr(vmbed.VmTestbed, "active", _must_not_run)
    with pytest.raises(Exit, match="--as"):
        clone_(Context(), "ready", "../evil")
    with pytest.raises(Exit, match="name '..': use 1-40 letters"):
        clone_(Context(), "..", "fine")


def test_test_task_hands_k_and_m_to_pytest_as_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    from testbed.cli import dev

    seen: list[list[str]] = []
    monkeypatch.setattr(dev.subprocess, "run", lambda argv, check: seen.append(argv) or subprocess.CompletedProcess(argv, 0))
    k = "a and not 'b' or \"c d\"; echo $HOME"
    dev.test(Context(), k=k, marker="unit or (netns and not vm)")
    assert seen[0][-4:] == ["-m", "unit or (netns and not vm)", "-k", k]


def test_exec_passes_the_words_after_dashes_as_the_shell_split_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from testbed.cli.vm import exec_
    from testbed.vm import bed as vmbed

    ran: list[Any] = []

    class Guest:
        def exec(self, argv: Any, timeout: float) -> Any:
            ran.append((argv, timeout))
            return type("R", (), {"stdout": b"", "stderr": b"", "rc": 0})()

    bed = type("Bed", (), {"guest": lambda self, vm: Guest()})()
    monkeypatch.setattr(vmbed.VmTestbed, "active", classmethod(lambda cls: bed))
    words = ["sh", "-c", "grep MemTotal /proc/meminfo"]
    monkeypatch.setattr(sys, "argv", ["invoke", "exec", "primary", "--", *words])
    exec_.body(SimpleNamespace(remainder=" ".join(words)), "primary")  # invoke hands the task the joined words
    assert ran == [(words, 60.0)]
    monkeypatch.setattr(sys, "argv", ["python"])  # called from Python: the remainder is split as a shell would
    exec_.body(SimpleNamespace(remainder="sh -c 'echo a  b'"), "primary", timeout="5")
    assert ran[1] == (["sh", "-c", "echo a  b"], 5.0)
    with pytest.raises(Exit, match=r"^error: --timeout 'never': give a number"):
        exec_.body(SimpleNamespace(remainder="ls"), "primary", timeout="never")
    with pytest.raises(Exit, match="no command"):
        exec_.body(SimpleNamespace(remainder=""), "primary")


def _must_not_run(*_a: Any, **_k: Any) -> Any:
    raise AssertionError("reached past the checks")


# --- property: malformed specs --------------------------------------------------------------------

huge = st.integers(min_value=2**64, max_value=2**4000)
anything = st.recursive(
    st.none() | st.booleans() | st.integers() | huge | st.floats() | st.text(max_size=30)
    | st.binary(max_size=10).map(lambda b: b.decode("utf-8", "surrogateescape")),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
not_digits = st.text(alphabet=string.ascii_letters + string.punctuation + " \n\t\x00é", max_size=20)
bad_whole = (st.booleans() | st.floats() | st.text(max_size=20) | st.integers(max_value=0)
             | st.integers(min_value=10**5) | huge | st.none() | st.lists(st.integers(), max_size=2))
bad_time = (st.booleans() | st.floats().filter(lambda x: x != 0) | st.integers().filter(lambda n: n != 0) | huge
            | not_digits.filter(lambda t: t.strip() != "0") | st.sampled_from(["inf", "nan s", "1e400s", "-5s", "5 parsecs"]))
bad_size = (st.booleans() | st.floats() | st.integers(max_value=0) | huge | not_digits | st.none()
            | st.integers(min_value=2**41, max_value=2**60).map(str)
            | st.integers(min_value=100_000, max_value=10**30).map(lambda n: f"{n}TiB"))

FIELDS: list[tuple[tuple[Any, ...], str, st.SearchStrategy[Any]]] = [
    (("name",), "name", anything.filter(lambda v: not (isinstance(v, str) and re.fullmatch(r"[a-z][a-z0-9-]{0,9}", v)))),
    (("testbed", "boot_timeout"), "testbed.boot_timeout",
     st.booleans() | st.floats().filter(lambda x: not 5 <= x <= 3600) | huge | st.text(max_size=5)),
    (("testbed", "mtu"), "testbed.mtu", bad_whole),
    (("testbed", "accel"), "testbed.accel", anything.filter(lambda v: v not in ("auto", "kvm", "tcg"))),
    (("sites", 0, "subnet"), "sites[0] (primary).subnet",
     anything.filter(lambda v: not (isinstance(v, str) and v.startswith("198.1")))),
    (("sites", 0, "vms", 0, "vcpus"), "sites[0] (primary).vms[0].vcpus", bad_whole),
    (("sites", 0, "vms", 0, "memory"), "sites[0] (primary).vms[0].memory", bad_size),
    (("sites", 0, "vms", 0, "data_disk"), "sites[0] (primary).vms[0].data_disk", bad_size),
    (("workload", "testers"), "workload.testers", bad_whole),
    (("workload", "server_pairs"), "workload.server_pairs", bad_whole),
    (("workload", "append_size"), "workload.append_size",
     bad_size | st.integers(min_value=(64 << 20) + 1, max_value=2**40)),
    (("workload", "duration"), "workload.duration", bad_time),
    (("fec", "r"), "fec.r", bad_whole),
    (("fec", "flush"), "fec.flush", bad_time | st.integers(min_value=2, max_value=10**6).map(lambda n: f"{n}s")),
    (("faults", "drain_timeout"), "faults.drain_timeout", bad_time),
    (("faults", "burst_loss"), "faults.burst_loss", bad_time),
    (("wan", "delay"), "wan.delay", bad_time | st.integers(min_value=61, max_value=10**9).map(lambda n: f"{n}s")),
]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(FIELDS), st.data())
def test_a_bad_value_in_any_field_is_one_line_naming_it(field: Any, data: st.DataObject) -> None:
    path, where, values = field
    value = data.draw(values, label=where)
    msg = refused(with_value(path, value))
    assert msg.startswith(f"{where}: "), msg


TABLES: list[tuple[tuple[Any, ...], str]] = [
    ((), ""), (("testbed",), "testbed."), (("workload",), "workload."), (("fec",), "fec."),
    (("faults",), "faults."), (("wan",), "wan."), (("sites", 0), "sites[0]."),
    (("sites", 0, "vms", 0), "sites[0] (primary).vms[0]."),
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(TABLES), st.text(min_size=1, max_size=12), anything)
def test_an_unknown_key_in_any_table_is_refused_by_name(table: Any, key: str, value: Any) -> None:
    path, prefix = table
    d = base()
    target: Any = d
    for k in path:
        target = target[k]
    assume(key not in target and key not in specmod.TOP_KEYS | {"gateway", "address", "uri", "max_memory",
                                                                 "enforcement", "mode", "forward", "reverse"})
    from netem.profile import PROFILE_KEYS

    assume(key not in PROFILE_KEYS and key not in specmod._TESTBED_KEYS | specmod._SITE_KEYS | specmod._VM_KEYS)
    assume(all(key not in keys for keys in specmod.DRILL_KEYS.values()))
    target[key] = value
    msg = refused(d)
    assert msg.startswith(prefix) and re.search(r": unknown (field|table); use one of ", msg), msg


PATHS = [p for p, _, _ in FIELDS] + [("sites",), ("sites", 0), ("sites", 0, "vms"), ("wan", "forward"),
                                      ("faults", "during"), ("sites", 1, "vms", 0, "address"), ("wan", "burst")]


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(PATHS), anything), min_size=1, max_size=3))
def test_any_value_anywhere_is_a_spec_or_one_line_never_a_crash(changes: list[tuple[Any, Any]]) -> None:
    d = base()
    for path, value in changes:
        target: Any = d
        for k in path[:-1]:
            target = target[k] if isinstance(target, dict | list) and _has(target, k) else None
            if target is None:
                break
        if target is not None and isinstance(target, dict | list) and (isinstance(target, dict) or _has(target, path[-1])):
            target[path[-1]] = value
    try:
        from_mapping(copy.deepcopy(d))
    except SpecError as err:
        assert len(str(err).splitlines()) == 1, str(err)


def _has(container: Any, key: Any) -> bool:
    if isinstance(container, list):
        return isinstance(key, int) and 0 <= key < len(container)
    return key in container


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_any_file_is_a_spec_or_one_line(tmp_path: Path, content: bytes) -> None:
    f = tmp_path / "any.toml"
    f.write_bytes(content)
    try:
        specmod.load(f)
    except SpecError as err:
        assert len(str(err).splitlines()) == 1


@settings(max_examples=300, deadline=None)
@given(anything | st.text(alphabet="0123456789.KMGTiBkmgtb ", max_size=60))
def test_parse_size_is_a_bounded_int_or_one_line_naming_the_field(value: Any) -> None:
    try:
        n = parse_size(value, "the.field")
    except ValueError as err:
        msg = str(err)
        assert msg.startswith("the.field: ") and len(msg.splitlines()) == 1
    else:
        assert type(n) is int and 1 <= n <= 1 << 50


# --- property: malformed flags, in-process --------------------------------------------------------

bad_int_text = (st.text(max_size=12).filter(lambda t: not re.fullmatch(r"\s*\+?[0-9]{1,18}\s*", t))
                | st.integers(min_value=100_000, max_value=10**30).map(str) | st.integers(max_value=0).map(str))
bad_seconds_text = (st.sampled_from(["inf", "-inf", "nan", "NaN", "1e400", "-1", "0", "1e9", "", "20s", "∞"])
                    | st.text(alphabet=string.ascii_letters + "!/ \n", max_size=10))
LOCAL_FLAGS: list[tuple[str, str, st.SearchStrategy[str]]] = [
    ("testers", "--testers", bad_int_text),
    ("servers", "--servers", bad_int_text),
    ("duration", "--duration", bad_seconds_text),
    ("fail_at", "--fail-at", bad_seconds_text),
    ("drain_timeout", "--drain-timeout", bad_seconds_text | st.sampled_from(["0.5", "3601"])),
    ("wan_loss", "--wan-loss", bad_seconds_text.filter(lambda t: t != "0") | st.sampled_from(["100", "101"])),
    ("burst_loss", "--burst-loss", bad_seconds_text.filter(lambda t: t != "0") | st.sampled_from(["101"])),
    ("append_size", "--append-size", not_digits | huge.map(str) | st.integers(max_value=0).map(str)
     | st.integers(min_value=(64 << 20) + 1).map(str) | st.sampled_from(["1GiB", "9" * 400, "1.5B", "-1KiB", "nan"])),
    ("engine", "--engine", st.text(max_size=8).filter(lambda t: t not in ("c", "python"))),
    ("schedule", "--schedule", st.text(max_size=8) | st.just("mirror-power-outage")),
    ("mode", "--mode", st.text(alphabet=",; !xyz", max_size=6) | st.just("remote-sync,remote-sync")),
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(LOCAL_FLAGS), st.data())
def test_a_bad_local_drill_flag_is_exit_2_naming_it_before_anything_runs(flag: Any, data: st.DataObject) -> None:
    import testbed.drill.local as localdrill
    from testbed.cli.drill import local_drill

    name, shown, values = flag
    value = data.draw(values, label=shown)
    before = os.listdir(".")
    real = localdrill.run_local_drill
    localdrill.run_local_drill = _must_not_run
    try:
        with pytest.raises(Exit) as err:
            local_drill.body(Context(), **{name: value})
    finally:
        localdrill.run_local_drill = real
    msg = err.value.message
    assert err.value.code == 2 and msg.startswith(f"error: {shown}") and len(msg.splitlines()) == 1, msg
    assert os.listdir(".") == before


# --- property: the real command line, as subprocesses that must fail before creating anything ------


@pytest.fixture()
def inv(tmp_path: Path) -> Any:
    """Runs ``./inv ARGS`` in an empty folder with its own cache; checks that it created nothing there and
    never touched the cache: every domain, bridge, namespace and process the testbed makes is recorded in
    the cache's registry before it exists, so an untouched cache means none was made. (The host's own
    interfaces are not compared: other testbeds on the machine may come and go meanwhile.)"""
    work, cache = tmp_path / "cwd", tmp_path / "cache"
    work.mkdir()
    env = {**os.environ, "SMFS_TESTBED_CACHE": str(cache), "NO_COLOR": "1"}

    def run(*args: str | bytes, files: dict[str, bytes] | None = None) -> subprocess.CompletedProcess[str]:
        for name, content in (files or {}).items():
            (work / name).write_bytes(content)
        before = sorted(os.listdir(work))
        res = subprocess.run([str(REPO / "inv"), *args], cwd=work, env=env, capture_output=True, timeout=60,
                             text=True, errors="backslashreplace", check=False)
        assert "Traceback" not in res.stderr + res.stdout, res.stderr
        assert sorted(os.listdir(work)) == before, "created something"
        assert not cache.exists(), "touched the cache"
        return res

    return run


CLI_FLAGS = [("--testers", bad_int_text), ("--servers", bad_int_text), ("--duration", bad_seconds_text),
             ("--append-size", st.sampled_from(["1GiB", "9" * 400, "abc", "0", "1.5B"])),
             ("--wan-loss", st.sampled_from(["100", "nan", "inf", "-1"]))]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(CLI_FLAGS), st.data())
def test_inv_local_drill_with_a_bad_flag_exits_2_with_one_line(inv: Any, flag: Any, data: st.DataObject) -> None:
    name, values = flag
    value = data.draw(values.filter(lambda t: "\x00" not in t), label=name)
    res = inv("local-drill", f"{name}={value}")
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stderr
    assert res.stderr.startswith(f"error: {name}"), res.stderr


CI_SPEC = (REPO / "specs" / "ci.toml").read_text()
SPEC_EDITS = [  # (line of specs/ci.toml, a bad replacement, the field the error must name)
    ("testers = 4", ["testers = true", "testers = 3.9", "testers = 0", "testers = 100000", 'testers = "4"',
                     "testers = nan", "testers = [4]"], "workload.testers"),
    ("server_pairs = 2", ["server_pairs = 100000", "server_pairs = -1", "server_pairs = inf"], "workload.server_pairs"),
    ('append_size = "64KiB"', ['append_size = "1GiB"', f'append_size = "{"9" * 400}"', "append_size = true",
                               'append_size = "lots"'], "workload.append_size"),
    ('duration = "60s"', ['duration = "inf"', "duration = 60", 'duration = "1e400s"'], "workload.duration"),
    ("r = 8", ["r = 0", "r = 1000", "r = 8.5"], "fec.r"),
    ("boot_timeout = 90", ["boot_timeout = nan", "boot_timeout = inf", "boot_timeout = -inf", "boot_timeout = 1e9"],
     "testbed.boot_timeout"),
    ('data_disk = "512MiB"', ['data_disk = "100000TiB"', "data_disk = 1.5", 'data_disk = "1.5MiB"'],
     "sites[0] (primary).vms[0].data_disk"),
    ("[workload]", ["[wrokload]"], "wrokload: unknown table"),
    ("[fec]", ["[fec]\nr2 = 1"], "fec.r2: unknown field"),
]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(SPEC_EDITS), st.data())
def test_inv_drill_with_a_bad_spec_exits_2_naming_the_field(inv: Any, edit: Any, data: st.DataObject) -> None:
    line, bad, field = edit
    text = CI_SPEC.replace(line, data.draw(st.sampled_from(bad)), 1)
    assert text != CI_SPEC
    _refused_in_process(text.encode())  # never hand ./inv drill a spec that could boot
    res = inv("drill", "--spec", "bad.toml", files={"bad.toml": text.encode()})
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stderr
    assert res.stderr.startswith(f"error: {field}"), res.stderr


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=1, max_size=200).filter(lambda b: b"\x00" not in b))
def test_inv_up_with_a_garbage_or_non_utf8_spec_exits_2(inv: Any, content: bytes) -> None:
    assume(b"sites" not in content)  # never a spec that could boot
    _refused_in_process(content)
    res = inv("up", "--spec", "x.toml", files={"x.toml": content})
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stderr
    assert res.stderr.startswith("error: "), res.stderr


def _refused_in_process(content: bytes) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "x.toml").write_bytes(content)
        with pytest.raises(SpecError):
            specmod.load(Path(d) / "x.toml")


@pytest.mark.parametrize("args", [
    ("drill", "--spec", "."), ("up", "--spec", "."), ("drill", "--spec", os.fsdecode(b"\xff.toml")),
    ("up", "--clone", "../../etc"), ("drill", "--spec", "nope.toml", "--runs", "abc"),
    ("calibrate", "--probes", "abc"), ("exec", "primary", "--timeout", "nan", "--", "true"),
    ("balloon", "primary", "lots"), ("snapshot", ".."), ("shape", "--delay", "1e400s"),
    ("experiment", "nope.toml"), ("experiment", "."), ("compare", "nope", "nope2"), ("replay", "nope"),
    # what invoke's own parser refuses (invoke exits 1 there: "data loss" in this project)
    ("drill", "--bogus"), ("nosuchtask",), ("--nosuch",), ("drill", "--spec"), ("campaign", "--runs"),
])  # fmt: skip
def test_inv_bad_flags_and_paths_exit_2_with_one_line(inv: Any, args: tuple[str, ...]) -> None:
    res = inv(*args)
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1 and res.stderr.startswith("error: "), res.stderr


def test_a_ctrl_c_no_task_handles_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """invoke's own ``Program.run`` exits 1 on a KeyboardInterrupt, which reads as "data loss" here."""
    from invoke import Collection
    from invoke import task as invoke_task

    from testbed.cli.program import InvProgram

    @invoke_task
    def interrupted(c):  # noqa: ANN001, ANN202 - an invoke task
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as out:
        InvProgram(namespace=Collection(interrupted), name="t", binary="t").run(["t", "interrupted"])
    assert out.value.code == 2
    assert capsys.readouterr().err.strip() == "interrupted (Ctrl-C)"
