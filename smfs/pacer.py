"""A token bucket that paces a gateway's WAN output to the WAN's bottleneck rate (pure: time in).

Maelstrom's FEC repairs random loss on the WAN; it cannot repair a congested bottleneck queue, which
drops in bursts (tail drop) far beyond any code's power. A gateway that sends faster than the WAN
carries turns its site's TCP overload into exactly those bursts, behind packets whose callbacks have
already told network-sync they are safe. Pacing moves the queue to the site's edge instead: when the
bucket is empty the gateway stops reading its TUN, the TUN's queue fills and the kernel drops there,
*before* the gateway has sent anything or announced any offset, so TCP retransmits as for any edge
congestion and no callback covers a packet the WAN could drop for want of room.

Every datagram spends its size on the wire (``WIRE_OVERHEAD`` for IPv4, UDP and Ethernet headers).
The bucket holds at most ``burst`` bytes of credit, may run into debt by one batch, and says how long
to wait until the debt is paid.
"""

from __future__ import annotations

WIRE_OVERHEAD = 20 + 8 + 14  # bytes around each tunnel datagram on the WAN: IPv4, UDP, Ethernet
HEADROOM = 0.95  # pace at this fraction of the WAN rate: netem counts a little more than we do


class Pacer:
    """``rate_bps`` (bit/s of the WAN, > 0) paced at :data:`HEADROOM`; ``burst`` bytes of credit."""

    def __init__(self, rate_bps: float, burst: int, now: float) -> None:
        if rate_bps <= 0:
            raise ValueError(f"pacer rate: {rate_bps} bit/s; give the WAN's rate, above 0 (or do not pace)")
        if burst <= 0:
            raise ValueError(f"pacer burst: {burst} bytes; give at least one datagram's size")
        self.bytes_per_s = rate_bps / 8 * HEADROOM
        self.burst = burst
        self.tokens = float(burst)
        self.t = now
        self.paused_s = 0.0  # total time the caller was told to wait
        self.pauses = 0

    def _refill(self, now: float) -> None:
        if now > self.t:
            self.tokens = min(float(self.burst), self.tokens + (now - self.t) * self.bytes_per_s)
            self.t = now

    def spend(self, datagram_bytes: int, now: float) -> None:
        """A datagram of ``datagram_bytes`` (UDP payload) went out at ``now``."""
        self._refill(now)
        self.tokens -= datagram_bytes + WIRE_OVERHEAD

    def room(self, datagram_bytes: int, now: float) -> int:
        """How many datagrams of up to ``datagram_bytes`` the credit covers now (0 when in debt)."""
        self._refill(now)
        return max(0, int(self.tokens // (datagram_bytes + WIRE_OVERHEAD)) + (self.tokens > 0))

    def wait(self, now: float) -> float:
        """Seconds until sending may go on (0: now); a positive answer counts as one pause."""
        self._refill(now)
        if self.tokens >= 0:
            return 0.0
        delay = -self.tokens / self.bytes_per_s
        self.paused_s += delay
        self.pauses += 1
        return delay
