"""LinkProfile parsing and validation: units, ranges, bad combinations, per-direction overrides, messages."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netem.profile import (
    Direction,
    DirectionProfile,
    LinkProfile,
    ProfileError,
    gilbert_for_burst,
    parse_percent,
    parse_rate_bps,
    parse_time_us,
)


@pytest.mark.parametrize(
    ("text", "us"),
    [("50ms", 50_000), ("200us", 200), ("1s", 1_000_000), ("1.5ms", 1500), ("0", 0), (0, 0), ("2 ms", 2000),
     ("10µs", 10), ("0.25s", 250_000)],
)  # fmt: skip
def test_time_units(text: object, us: int) -> None:
    assert parse_time_us(text) == us


@pytest.mark.parametrize(
    ("text", "pct"), [("1%", 1.0), ("0.5%", 0.5), ("100%", 100.0), ("0%", 0.0), (0, 0.0)]
)
def test_percent_units(text: object, pct: float) -> None:
    assert parse_percent(text) == pct


@pytest.mark.parametrize(
    ("text", "bps"),
    [("1gbit", 10**9), ("100mbit", 10**8), ("1kbit", 1000), ("10Mbps", 80 * 10**6), ("1mibit", 2**20),
     ("500kbps", 4 * 10**6), ("2.5gbit", 25 * 10**8)],
)  # fmt: skip
def test_rate_units(text: str, bps: int) -> None:
    assert parse_rate_bps(text) == bps


@pytest.mark.parametrize(
    ("spec", "path", "words"),
    [
        ({"loss": "150%"}, "wan.loss", "use a percentage like 1% or 0.5%"),
        ({"loss": 1}, "wan.loss", "use a percentage like 1% or 0.5%"),
        ({"loss": "1"}, "wan.loss", "use a percentage"),
        ({"loss": "-1%"}, "wan.loss", "use a percentage"),
        ({"delay": "50"}, "wan.delay", "use a duration like 50ms"),
        ({"delay": "5 parsecs"}, "wan.delay", "unknown time unit"),
        ({"delay": "2min"}, "wan.delay", "unknown time unit"),
        ({"delay": "61s"}, "wan.delay", "at most 60s"),
        ({"rate": "fast"}, "wan.rate", "use a value like 100mbit"),
        ({"rate": "1qbit"}, "wan.rate", "unknown rate unit"),
        ({"rate": "100tbit"}, "wan.rate", "34gbit"),
        ({"limit": 0}, "wan.limit", "integer"),
        ({"limit": "lots"}, "wan.limit", "integer"),
        ({"delay": "10ms", "jitter_dist": "normal"}, "wan.jitter_dist", "needs a jitter"),
        ({"delay": "10ms", "jitter": "1ms", "jitter_dist": "gauss"}, "wan.jitter_dist", "uniform, normal"),
        ({"reorder": "5%"}, "wan.reorder", "no-op"),
        ({"delay": "5ms", "reorder_gap": 3}, "wan.reorder_gap", "set reorder"),
        ({"loss_model": "bursty"}, "wan.loss_model", "random or gilbert"),
        ({"loss_model": "gilbert", "ge_r": "10%"}, "wan.ge_p", "set ge_p"),
        ({"loss_model": "gilbert", "ge_p": "1%", "ge_r": "0%"}, "wan.ge_r", "ge_r > 0"),
        ({"loss_model": "gilbert", "ge_p": "1%", "ge_r": "5%", "loss": "1%"}, "wan.loss", "ge_p"),
        ({"ge_p": "1%"}, "wan.ge_p", 'loss_model = "gilbert"'),
        ({"lose": "1%"}, "wan.lose", "unknown key"),
        ({"forward": {"loss": "1"}}, "wan.forward.loss", "use a percentage"),
        ({"reverse": "fast"}, "wan.reverse", "table"),
        ({"reorder": "5%", "forward": {"delay": "5ms"}}, "wan.reorder", "no-op"),
    ],
)
def test_errors_are_one_line_and_name_the_field(spec: dict, path: str, words: str) -> None:
    with pytest.raises(ProfileError) as info:
        LinkProfile.from_mapping(spec)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert words in message
    assert isinstance(info.value, ValueError)


def test_field_prefix_is_the_callers() -> None:
    with pytest.raises(ProfileError, match=r"^spec\.links\.wan\.loss: "):
        LinkProfile.from_mapping({"loss": "2"}, "spec.links.wan")


def test_symmetric_by_default_and_overrides_per_direction() -> None:
    p = LinkProfile.from_mapping(
        {"delay": "25ms", "loss": "1%", "mode": "router", "reverse": {"loss": "0.5%"}}
    )
    assert p.a_to_b.delay_us == p.b_to_a.delay_us == 25_000
    assert p.direction(Direction.A_TO_B).loss_pct == 1.0
    assert p.direction("b_to_a").loss_pct == 0.5
    assert not p.is_symmetric
    q = LinkProfile.from_mapping({"delay": "25ms"})
    assert q.is_symmetric and q.a_to_b == DirectionProfile(delay_us=25_000)


def test_reorder_needs_delay_in_the_same_direction_only() -> None:
    p = LinkProfile.from_mapping({"forward": {"delay": "5ms", "reorder": "10%", "reorder_gap": 5}})
    assert p.a_to_b.reorder_pct == 10 and p.a_to_b.reorder_gap == 5
    assert p.b_to_a.reorder_pct == 0


def test_gilbert_elliott() -> None:
    p = LinkProfile.from_mapping({"loss_model": "gilbert", "ge_p": "1%", "ge_r": "30%"}).a_to_b
    assert p.gilbert is not None
    assert (p.gilbert.p, p.gilbert.r, p.gilbert.h, p.gilbert.k) == (1.0, 30.0, 100.0, 0.0)
    assert p.mean_loss_pct == pytest.approx(100 / 31)
    assert p.loss_pct == 0


def test_queue_limit_defaults_to_twice_the_bdp() -> None:
    assert LinkProfile.from_mapping({"delay": "1ms", "rate": "10mbit"}).a_to_b.effective_limit == 1000
    # 1 Gbit/s × 100 ms = 12.5 MB = 8334 packets of 1500 B; ×2
    big = LinkProfile.from_mapping({"delay": "90ms", "jitter": "10ms", "rate": "1gbit"}).a_to_b
    assert big.bdp_packets == 8334 and big.effective_limit == 16668
    # no rate: assume 1 Gbit/s line rate
    assert LinkProfile.from_mapping({"delay": "50ms"}).a_to_b.effective_limit == 2 * 4167
    assert LinkProfile.from_mapping({"delay": "50ms", "limit": 500}).a_to_b.effective_limit == 500


def test_with_changes_reshapes_live() -> None:
    p = LinkProfile.from_mapping({"delay": "25ms", "jitter": "2ms", "jitter_dist": "normal", "loss": "1%"})
    q = p.with_changes(loss="10%")
    assert q.a_to_b.loss_pct == q.b_to_a.loss_pct == 10 and q.a_to_b.delay_us == 25_000
    r = p.with_changes(direction="b_to_a", delay="50ms", jitter=None)
    assert r.a_to_b == p.a_to_b and r.b_to_a.delay_us == 50_000 and r.b_to_a.jitter_us == 0
    assert r.b_to_a.jitter_dist == "uniform"
    g = p.with_changes(ge_p="2%", ge_r="20%")
    assert g.a_to_b.gilbert is not None and g.a_to_b.loss_pct == 0
    back = g.with_changes(loss="1%")
    assert back.a_to_b.gilbert is None and back.a_to_b.loss_pct == 1
    rated = p.with_changes(rate="1gbit", delay="100ms")
    assert rated.a_to_b.effective_limit > 1000  # the automatic limit follows the new rate × delay
    with pytest.raises(ProfileError, match=r"^shape\.loss: "):
        p.with_changes(loss="200%")


def test_describe_and_to_dict_round_trip() -> None:
    spec = {"delay": "50ms", "jitter": "5ms", "jitter_dist": "pareto", "rate": "100mbit", "limit": 4000,
            "reorder": "1%", "reorder_gap": 3, "duplicate": "0.1%", "corrupt": "0.01%",
            "forward": {"loss_model": "gilbert", "ge_p": "1%", "ge_r": "25%", "ge_h": "80%", "ge_k": "0.5%"},
            "reverse": {"loss": "0.5%"}}  # fmt: skip
    p = LinkProfile.from_mapping(spec)
    assert LinkProfile.from_mapping(p.to_dict()) == p
    line = p.describe()
    assert "\n" not in line and "50ms" in line and "gemodel" in line and "100mbit" in line
    assert LinkProfile.from_mapping({"delay": "50ms"}).describe() == "delay 50ms, loss 0%, limit 8334"
    assert p.to_json_dict()["a_to_b"]["effective_limit"] == 4000


@given(
    delay=st.integers(0, 60_000_000),
    jitter=st.integers(0, 1_000_000),
    loss=st.floats(0, 100, allow_nan=False),
    rate=st.one_of(st.none(), st.integers(8, 34 * 10**9)),
)
def test_to_dict_round_trips(delay: int, jitter: int, loss: float, rate: int | None) -> None:
    loss = float(f"{loss:.6g}")
    p = LinkProfile.symmetric(
        DirectionProfile(delay_us=delay, jitter_us=jitter, loss_pct=loss, rate_bps=rate)
    )
    assert LinkProfile.from_mapping(p.to_dict()) == p


def test_burst_maps_to_simple_gilbert_with_the_same_mean_loss() -> None:
    p = LinkProfile.from_mapping({"delay": "10ms", "loss": "1%", "burst": 5}).a_to_b
    g = p.gilbert
    assert g is not None and p.loss_pct == 0
    # r = 1/B = 20 %; p = L·r/(1-L) = 0.01·0.2/0.99
    assert (g.r, g.h, g.k) == (20.0, 100.0, 0.0)
    assert g.p == pytest.approx(100 * 0.01 * 0.2 / 0.99, rel=1e-11)
    assert g.mean_loss_pct == pytest.approx(1.0, rel=1e-10)
    assert g.mean_burst_packets == pytest.approx(5.0)
    assert "in bursts of 5 packets" in p.describe()


@pytest.mark.parametrize(("loss", "burst"), [(0.1, 1.0), (1.0, 5.0), (10.0, 3.0), (30.0, 2.5), (50.0, 1.0)])
def test_burst_mapping_round_trips(loss: float, burst: float) -> None:
    g = gilbert_for_burst(loss, burst)
    assert g.mean_loss_pct == pytest.approx(loss, rel=1e-10)
    assert g.mean_burst_packets == pytest.approx(burst, rel=1e-10)
    p = LinkProfile.from_mapping({"loss": f"{loss}%", "burst": burst})
    assert LinkProfile.from_mapping(p.to_dict()) == p  # to_dict writes ge_*; exact floats


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"burst": 5}, "a burst needs a loss"),
        ({"loss": "0%", "burst": 5}, "a burst needs a loss"),
        ({"loss": "100%", "burst": 5}, "a burst needs a loss"),
        ({"loss": "1%", "burst": 0.5}, "below 1 packet"),
        ({"loss": "1%", "burst": "many"}, "cannot parse"),
        ({"loss": "1%", "burst": True}, "cannot parse"),
        ({"loss": "60%", "burst": 1}, "raise burst to at least 1.5"),
        ({"loss_model": "gilbert", "ge_p": "1%", "ge_r": "20%", "burst": 5}, "not both"),
    ],
)
def test_burst_errors_are_one_line(spec: dict, words: str) -> None:
    with pytest.raises(ProfileError) as info:
        LinkProfile.from_mapping(spec)
    assert str(info.value).startswith("wan.burst: ") and "\n" not in str(info.value)
    assert words in str(info.value)


def test_with_changes_burst() -> None:
    p = LinkProfile.from_mapping({"delay": "25ms", "loss": "2%"})
    b = p.with_changes(loss="1%", burst="5")
    assert b.a_to_b.gilbert == gilbert_for_burst(1.0, 5.0) == b.b_to_a.gilbert
    kept = p.with_changes(direction="a_to_b", burst=4)  # the direction's own loss, now bursty
    assert kept.a_to_b.mean_loss_pct == pytest.approx(2.0) and kept.a_to_b.gilbert.mean_burst_packets == 4
    assert kept.b_to_a == p.b_to_a
    again = b.with_changes(burst=2)  # from a bursty profile: same mean, shorter bursts
    assert again.a_to_b.mean_loss_pct == pytest.approx(1.0) and again.a_to_b.gilbert.r == 50
    back = b.with_changes(loss="3%")  # loss alone: independent loss again
    assert back.a_to_b.gilbert is None and back.a_to_b.loss_pct == 3
    with pytest.raises(ProfileError, match=r"^shape\.burst: a burst needs a loss"):
        LinkProfile.from_mapping({"delay": "5ms"}).with_changes(burst=5)
