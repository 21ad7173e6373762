"""The gateway's pacer: a token bucket on wire bytes, pure (time in)."""

from __future__ import annotations

import pytest

from smfs.pacer import HEADROOM, WIRE_OVERHEAD, Pacer


def test_a_full_bucket_sends_at_once_then_waits_for_the_debt() -> None:
    p = Pacer(8_000_000, burst=10_000, now=0.0)  # 1 MB/s on the wire, paced at 95 %
    assert p.wait(0.0) == 0.0
    p.spend(10_000 - WIRE_OVERHEAD, 0.0)  # exactly the credit
    assert p.wait(0.0) == 0.0
    p.spend(5_000 - WIRE_OVERHEAD, 0.0)  # 5 kB of debt
    assert p.wait(0.0) == pytest.approx(5_000 / (1e6 * HEADROOM))
    assert p.pauses == 1


def test_long_run_rate_is_the_paced_rate_whatever_the_datagram_sizes() -> None:
    p = Pacer(40e6, burst=64 * 1024, now=0.0)
    now, sent = 0.0, 0
    sizes = [9000, 1400, 9000, 60, 9000, 3000]
    for i in range(20_000):  # a sender that always has data: send, then wait as told
        size = sizes[i % len(sizes)]
        p.spend(size, now)
        sent += size + WIRE_OVERHEAD
        now += p.wait(now)
    assert sent / now == pytest.approx(40e6 / 8 * HEADROOM, rel=0.01)


def test_credit_never_exceeds_the_burst_after_idle_time() -> None:
    p = Pacer(8e6, burst=20_000, now=0.0)
    p.spend(1_000, 0.0)
    p.wait(3600.0)  # an idle hour earns no more than the bucket holds
    assert p.tokens == 20_000
    p.spend(25_000 - WIRE_OVERHEAD, 3600.0)
    assert p.wait(3600.0) == pytest.approx(5_000 / (1e6 * HEADROOM))


def test_room_is_what_the_credit_covers_plus_the_one_datagram_it_may_owe() -> None:
    p = Pacer(8e6, burst=10 * (1000 + WIRE_OVERHEAD) + 1, now=0.0)
    assert p.room(1000, 0.0) == 11
    p.spend(10 * 1000 + 9 * WIRE_OVERHEAD, 0.0)  # credit left: less than one datagram
    assert p.room(1000, 0.0) == 1
    p.spend(1000, 0.0)  # now in debt
    assert p.room(1000, 0.0) == 0 and p.wait(0.0) > 0


def test_time_going_backwards_earns_nothing() -> None:
    p = Pacer(8e6, burst=1_000, now=10.0)
    p.spend(2_000, 10.0)
    before = p.tokens
    assert p.wait(9.0) > 0 and p.tokens == before


@pytest.mark.parametrize("rate,burst,field", [(0, 1000, "rate"), (-5, 1000, "rate"), (8e6, 0, "burst")])
def test_bad_parameters_are_one_line_errors(rate: float, burst: int, field: str) -> None:
    with pytest.raises(ValueError, match=f"pacer {field}"):
        Pacer(rate, burst, 0.0)


def test_each_sites_gateway_is_paced_to_its_egress_direction_of_the_wan() -> None:
    from netem.profile import LinkProfile
    from testbed.drill.vm import egress_rate_bps

    wan = LinkProfile.from_mapping({"delay": "50ms", "rate": "40mbit", "reverse": {"rate": "10mbit"}}, "wan")
    assert (egress_rate_bps(wan, "primary"), egress_rate_bps(wan, "mirror")) == (40_000_000, 10_000_000)
    assert egress_rate_bps(LinkProfile.from_mapping({"delay": "50ms"}, "wan"), "primary") == 0  # no rate: not paced


def test_the_edge_buffer_is_the_wans_queue_limit() -> None:
    """The paced edge holds what the WAN's bottleneck queue would (netem's limit: the explicit one,
    else max(1000, 2 BDP)), per direction; nothing is set when the gateway is not paced."""
    from netem.profile import LinkProfile
    from testbed.drill.vm import edge_queue_packets

    wan = LinkProfile.from_mapping({"delay": "50ms", "rate": "40mbit"}, "wan")
    assert edge_queue_packets(wan, "primary", 9000) == 1000 == wan.a_to_b.effective_limit
    fast = LinkProfile.from_mapping({"delay": "100ms", "rate": "1gbit", "reverse": {"rate": "100mbit", "limit": 64}}, "wan")
    assert edge_queue_packets(fast, "primary", 1500) == fast.a_to_b.effective_limit > 1000  # 2 BDP
    assert edge_queue_packets(fast, "mirror", 1500) == 64
    assert edge_queue_packets(LinkProfile.from_mapping({"delay": "50ms"}, "wan"), "primary", 9000) == 0

