"""WAN link profiles: what netem should do to packets, per direction, validated once.

A :class:`LinkProfile` holds one :class:`DirectionProfile` per direction (``a_to_b`` is the
spec's ``forward``, ``b_to_a`` its ``reverse``). Values are stored in fixed units:
time in µs (int), probabilities in % (float, 0-100), rate in bit/s (int), queue limit in packets.

Spec values are strings with units, parsed like tc does: ``50ms``, ``200us``, ``1s``;
``1%``, ``0.5%``; ``1gbit``, ``100mbit``, ``1kbit`` (bits/s) and ``10Mbps`` (bytes/s, as in tc).
``burst`` (packets) turns ``loss`` into bursty Gilbert-Elliott loss of the same mean
(:func:`gilbert_for_burst`).
Bad input raises :class:`ProfileError` with one line naming the field path and the fix.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

MTU_BYTES = 1500
"""Packet size assumed for the bandwidth-delay product (bytes)."""
ASSUMED_LINE_RATE_BPS = 1_000_000_000
"""Rate used for the queue limit when the profile sets none (bit/s): netem still queues every
packet for ``delay``, so an unshaped 1 Gbit/s path needs rate × delay packets of queue."""
NETEM_DEFAULT_LIMIT = 1000
"""netem's own default queue limit (packets); ours is never below it."""
BDP_HEADROOM = 2
MAX_DELAY_US = 60_000_000
"""netem keeps delay in 32-bit ticks (64 ns: ~274 s); 60 s is plenty for a WAN."""
MAX_RATE_BPS = (2**32 - 1) * 8
"""TCA_NETEM_RATE is 32-bit bytes/s (~34 Gbit/s)."""
JITTER_DISTS = ("uniform", "normal", "pareto", "paretonormal")
LOSS_MODELS = ("random", "gilbert")

PROFILE_KEYS = (
    "delay", "jitter", "jitter_dist", "loss", "burst", "loss_model", "ge_p", "ge_r", "ge_h", "ge_k",
    "rate", "limit", "reorder", "reorder_gap", "duplicate", "corrupt",
)  # fmt: skip
SUBTABLES = {"forward": "a_to_b", "reverse": "b_to_a"}


class ProfileError(ValueError):
    """A spec value that cannot become a netem profile; the message is one line: ``path: problem; fix``."""

    def __init__(self, path: str, problem: str, fix: str) -> None:
        super().__init__(f"{path}: {problem}; {fix}")
        self.path = path


class Direction(StrEnum):
    """Which way packets travel: site A (primary) to site B (mirror), or back."""

    A_TO_B = "a_to_b"
    B_TO_A = "b_to_a"


# --------------------------------------------------------------------------- unit parsing

_NUM_RE = re.compile(r"^\s*((?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)\s*([A-Za-zµ%]*)\s*$")
_TIME_US = {"us": 1, "usec": 1, "µs": 1, "ms": 1000, "msec": 1000, "s": 1_000_000, "sec": 1_000_000}
_RATE_BPS = {
    "bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
    "kibit": 2**10, "mibit": 2**20, "gibit": 2**30, "tibit": 2**40,
    "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9, "tbps": 8 * 10**12,
    "kibps": 8 * 2**10, "mibps": 8 * 2**20, "gibps": 8 * 2**30, "tibps": 8 * 2**40,
}  # fmt: skip


def _show(value: object) -> str:
    """``repr(value)`` for a one-line message: cut when long; a huge integer described (its decimal form
    may exceed Python's int-to-text limit)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"a {value.bit_length()}-bit integer"
    try:
        text = repr(value)
    except ValueError:  # a container holding a huge integer
        return f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def _split(value: object, path: str, fix: str) -> tuple[float, str]:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ProfileError(path, f"expected a string, got {type(value).__name__} {_show(value)}", fix)
    if isinstance(value, (int, float)):
        if value == 0:
            return 0.0, ""
        raise ProfileError(path, f"bare number {_show(value)} has no unit", fix)
    m = _NUM_RE.match(value)
    if not m:
        raise ProfileError(path, f"cannot parse {_show(value)}", fix)
    number = float(m.group(1))
    if not math.isfinite(number):
        raise ProfileError(path, f"{_show(value)} is not finite", fix)
    return number, m.group(2)


def parse_time_us(value: object, path: str = "time") -> int:
    """``"50ms"`` → 50000: a duration in whole µs (``us``, ``ms``, ``s``; 0 may be bare)."""
    example = "50ms, 200us or 1s"
    number, unit = _split(value, path, f"use a value like {example}")
    if number == 0 and unit == "":
        return 0
    factor = _TIME_US.get(unit.lower())
    if factor is None:
        raise ProfileError(path, f"unknown time unit {unit!r} in {_show(value)}", f"use a duration like {example}")
    return round(number * factor)


def parse_percent(value: object, path: str = "percent") -> float:
    """``"0.5%"`` → 0.5: a probability in %, 0-100 (0 may be bare)."""
    fix = "use a percentage like 1% or 0.5%"
    number, unit = _split(value, path, fix)
    if number == 0 and unit == "":
        return 0.0
    if unit != "%":
        raise ProfileError(path, f"{_show(value)} is not a percentage", fix)
    if number > 100:
        raise ProfileError(path, f"{_show(value)} is above 100%", fix + " (at most 100%)")
    return number


def parse_rate_bps(value: object, path: str = "rate") -> int:
    """``"100mbit"`` → 100_000_000 bit/s; ``"10Mbps"`` is bytes/s as in tc (80_000_000 bit/s)."""
    example = "100mbit, 1gbit or 10Mbps (bytes/s)"
    number, unit = _split(value, path, f"use a value like {example}")
    if number == 0 and unit == "":
        return 0
    factor = _RATE_BPS.get(unit.lower())
    if factor is None:
        raise ProfileError(path, f"unknown rate unit {unit!r} in {_show(value)}", f"use a rate like {example}")
    return round(number * factor)


MAX_COUNT = 2**32 - 1
"""netem's packet counts (limit, reorder gap) are u32."""


def parse_count(value: object, path: str, what: str, minimum: int = 0) -> int:
    """A whole number (packets, or a reorder gap) from ``minimum`` to :data:`MAX_COUNT`."""
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9]{1,10}\s*", value):
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_COUNT:
        raise ProfileError(
            path,
            f"{_show(value)} is not a whole number of {what} from {minimum} to {MAX_COUNT}",
            f"use an integer like {max(minimum, 1000) if what == 'packets' else max(minimum, 5)}",
        )
    return value


MAX_BURST = 1e6
"""Packets: the longest mean loss burst (r = 1/B stays well above netem's resolution)."""


def parse_burst(value: object, path: str = "burst") -> float:
    """``5`` or ``"5"`` → 5.0: a mean loss-burst length in packets, 1 to :data:`MAX_BURST`."""
    fix = "use a mean burst length in packets ≥ 1, like 5"
    number: float | None = None
    if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**53):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip().removesuffix("packets").removesuffix("pkt").strip())
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        raise ProfileError(path, f"cannot parse {_show(value)} as a number of packets", fix)
    if number < 1:
        raise ProfileError(path, f"{_show(value)} is below 1 packet", fix)
    if number > MAX_BURST:
        raise ProfileError(path, f"{_show(value)} is above {MAX_BURST:g} packets", fix)
    return number


def _sig(x: float) -> float:
    """``x`` rounded to the 12 significant digits :func:`format_percent` writes (so to_dict round-trips)."""
    return float(f"{x:.12g}")


def format_time_us(us: int) -> str:
    """50000 → ``"50ms"``; 250 → ``"250us"``."""
    if us and us % 1_000_000 == 0:
        return f"{us // 1_000_000}s"
    if us and us % 1000 == 0:
        return f"{us // 1000}ms"
    return f"{us}us"


def format_percent(pct: float) -> str:
    """0.5 → ``"0.5%"`` (round-trips through :func:`parse_percent`)."""
    return f"{pct:.12g}%"


def format_rate_bps(bps: int) -> str:
    """1_000_000_000 → ``"1gbit"``."""
    for unit, factor in (("tbit", 10**12), ("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bps % factor == 0:
            return f"{bps // factor}{unit}"
    return f"{bps}bit"


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class GilbertElliott:
    """Gilbert-Elliott burst loss, with tc-netem's ``gemodel p r 1-h 1-k`` meaning (all in %).

    ``p``: good → bad transition; ``r``: bad → good; ``h``: the ``1-h`` value (loss in the bad
    state); ``k``: the ``1-k`` value (loss in the good state).
    """

    p: float
    r: float
    h: float = 100.0
    k: float = 0.0

    @property
    def mean_loss_pct(self) -> float:
        """Stationary loss rate (%): π_bad·(1-h) + π_good·(1-k), π_bad = p / (p + r)."""
        bad = self.p / (self.p + self.r)
        return bad * self.h + (1 - bad) * self.k

    @property
    def mean_burst_packets(self) -> float:
        """Mean stay in the bad state (packets): 1 / r."""
        return 100.0 / self.r

    @property
    def is_simple(self) -> bool:
        """The simple Gilbert model: every packet lost in the bad state, none in the good one."""
        return self.h == 100.0 and self.k == 0.0

    @property
    def variance_inflation(self) -> float:
        """How much more a loss estimate varies than with independent loss (≥ 1): (1 + λ) / (1 - λ).

        λ = 1 - p - r is the chain's second eigenvalue, so successive packets' states correlate as λ^lag;
        the variance of a mean over n packets is then π(1-π)/n·(1 + λ)/(1 - λ) for large n. Exact for
        the simple model (loss = bad state), an upper bound otherwise (h, k add independent noise)."""
        lam = 1 - (self.p + self.r) / 100
        return max(1.0, (1 + lam) / (1 - lam)) if lam < 1 else math.inf


def gilbert_for_burst(loss_pct: float, burst_packets: float, path: str = "burst") -> GilbertElliott:
    """Simple Gilbert parameters for a mean loss of ``loss_pct`` % in bursts of ``burst_packets`` on average.

    Every packet sent in the bad state is lost (1-h = 100 %), none in the good state (1-k = 0 %),
    so a loss burst is a stay in the bad state. Each packet leaves the bad state with probability r,
    the stay is geometric with mean 1/r packets, hence r = 1/B for a mean burst of B packets. The
    chain spends π_bad = p / (p + r) of the packets in the bad state, which is the loss rate L;
    solving p / (p + r) = L gives p = L·r / (1 - L). Example: L = 1 %, B = 5 → r = 20 %,
    p = 0.01 · 0.2 / 0.99 = 0.202 %. Needs 0 < L < 100 % and p ≤ 100 %, i.e. L ≤ 1 / (1 + r).
    """
    if not 0 < loss_pct < 100:
        raise ProfileError(path, f"a burst needs a loss between 0% and 100%, got {format_percent(loss_pct)}",
                           "set loss (e.g. 1%) together with burst")  # fmt: skip
    if not math.isfinite(burst_packets) or burst_packets < 1:
        raise ProfileError(path, f"{burst_packets!r} is below 1 packet", "use a mean burst length ≥ 1, like 5")
    loss, r = loss_pct / 100, 1 / burst_packets
    p = loss * r / (1 - loss)
    if p > 1:
        raise ProfileError(path, f"loss {format_percent(loss_pct)} in bursts of {burst_packets:g} packets needs "
                           f"ge_p {format_percent(round(100 * p, 4))} > 100%",
                           f"lower the loss or raise burst to at least {loss / (1 - loss):.4g}")  # fmt: skip
    return GilbertElliott(p=_sig(100 * p), r=_sig(100 * r))


@dataclass(frozen=True)
class DirectionProfile:
    """netem for one direction. Units: µs, %, bit/s, packets. ``limit=None`` means automatic."""

    delay_us: int = 0
    jitter_us: int = 0
    jitter_dist: str = "uniform"
    loss_pct: float = 0.0
    gilbert: GilbertElliott | None = None
    rate_bps: int | None = None
    limit: int | None = None
    reorder_pct: float = 0.0
    reorder_gap: int = 0
    duplicate_pct: float = 0.0
    corrupt_pct: float = 0.0

    @property
    def mean_loss_pct(self) -> float:
        """Expected loss (%) of either model."""
        return self.gilbert.mean_loss_pct if self.gilbert else self.loss_pct

    @property
    def bdp_packets(self) -> int:
        """Bandwidth-delay product in packets of :data:`MTU_BYTES`: rate × (delay + jitter)."""
        rate = self.rate_bps or ASSUMED_LINE_RATE_BPS
        seconds = (self.delay_us + self.jitter_us) / 1e6
        return math.ceil(rate / 8 * seconds / MTU_BYTES)

    @property
    def effective_limit(self) -> int:
        """Queue limit applied (packets): the explicit one, else max(1000, 2 × BDP)."""
        if self.limit is not None:
            return self.limit
        return max(NETEM_DEFAULT_LIMIT, BDP_HEADROOM * self.bdp_packets)

    @property
    def is_identity(self) -> bool:
        """True when this direction does nothing (no netem needed)."""
        return self == DirectionProfile(limit=self.limit)

    def to_dict(self) -> dict[str, Any]:
        """Spec-form mapping (strings with units) that :meth:`LinkProfile.from_mapping` accepts."""
        out: dict[str, Any] = {"delay": format_time_us(self.delay_us)}
        if self.jitter_us:
            out["jitter"] = format_time_us(self.jitter_us)
            out["jitter_dist"] = self.jitter_dist
        if self.gilbert:
            g = self.gilbert
            out |= {"loss_model": "gilbert", "ge_p": format_percent(g.p), "ge_r": format_percent(g.r),
                    "ge_h": format_percent(g.h), "ge_k": format_percent(g.k)}  # fmt: skip
        else:
            out["loss"] = format_percent(self.loss_pct)
        if self.rate_bps:
            out["rate"] = format_rate_bps(self.rate_bps)
        if self.limit is not None:
            out["limit"] = self.limit
        if self.reorder_pct:
            out["reorder"] = format_percent(self.reorder_pct)
            if self.reorder_gap:
                out["reorder_gap"] = self.reorder_gap
        if self.duplicate_pct:
            out["duplicate"] = format_percent(self.duplicate_pct)
        if self.corrupt_pct:
            out["corrupt"] = format_percent(self.corrupt_pct)
        return out

    def describe(self) -> str:
        """One line, e.g. ``delay 50ms ±5ms normal, loss 1%, rate 100mbit, limit 1000``."""
        parts = [f"delay {format_time_us(self.delay_us)}"]
        if self.jitter_us:
            parts[0] += f" ±{format_time_us(self.jitter_us)} {self.jitter_dist}"
        if self.gilbert:
            g = self.gilbert
            mean = f"~{format_percent(round(g.mean_loss_pct, 4))}"
            if g.is_simple:
                mean += f" in bursts of {round(g.mean_burst_packets, 2):g} packets"
            parts.append(f"loss gemodel p {format_percent(g.p)} r {format_percent(g.r)} 1-h {format_percent(g.h)} "
                         f"1-k {format_percent(g.k)} ({mean})")  # fmt: skip
        else:
            parts.append(f"loss {format_percent(self.loss_pct)}")
        if self.rate_bps:
            parts.append(f"rate {format_rate_bps(self.rate_bps)}")
        if self.reorder_pct:
            parts.append(f"reorder {format_percent(self.reorder_pct)} gap {self.reorder_gap or 1}")
        if self.duplicate_pct:
            parts.append(f"duplicate {format_percent(self.duplicate_pct)}")
        if self.corrupt_pct:
            parts.append(f"corrupt {format_percent(self.corrupt_pct)}")
        parts.append(f"limit {self.effective_limit}")
        return ", ".join(parts)


def parse_direction(
    mapping: Mapping[str, Any], path: str, origins: Mapping[str, str] | None = None
) -> DirectionProfile:
    """Build and validate one direction from spec keys (see :data:`PROFILE_KEYS`).

    Errors name ``<origin>.<key>``: ``origins[key]`` when given (where the key was written), else ``path``.
    """
    origins = origins or {}

    def at(key: str) -> str:
        return f"{origins.get(key, path)}.{key}"

    for key in mapping:
        if key not in PROFILE_KEYS:
            raise ProfileError(at(key), "unknown key", f"use one of {', '.join(PROFILE_KEYS)}")

    def get(key: str, parse: Any, default: Any) -> Any:
        return parse(mapping[key], at(key)) if key in mapping else default

    delay = get("delay", parse_time_us, 0)
    jitter = get("jitter", parse_time_us, 0)
    for key, us in (("delay", delay), ("jitter", jitter)):
        if us > MAX_DELAY_US:
            raise ProfileError(at(key), f"{format_time_us(us)} is too long", "use at most 60s")
    dist = mapping.get("jitter_dist", "uniform")
    if dist not in JITTER_DISTS:
        raise ProfileError(
            at("jitter_dist"), f"unknown distribution {dist!r}", f"use one of {', '.join(JITTER_DISTS)}"
        )
    if dist != "uniform" and not jitter:
        raise ProfileError(
            at("jitter_dist"), f"{dist} needs a jitter", "set jitter (e.g. 5ms) or drop jitter_dist"
        )

    model = mapping.get("loss_model", "random")
    if model not in LOSS_MODELS:
        raise ProfileError(at("loss_model"), f"unknown loss model {model!r}", "use random or gilbert")
    gilbert = None
    loss = 0.0
    if model == "random":
        ge_keys = [k for k in ("ge_p", "ge_r", "ge_h", "ge_k") if k in mapping]
        if ge_keys:
            raise ProfileError(at(ge_keys[0]), "Gilbert-Elliott parameter with loss_model random",
                               'set loss_model = "gilbert" or drop the ge_* keys')  # fmt: skip
        loss = get("loss", parse_percent, 0.0)
        if "burst" in mapping:
            gilbert = gilbert_for_burst(loss, get("burst", parse_burst, 1.0), at("burst"))
            loss = 0.0
    else:
        if "burst" in mapping:
            raise ProfileError(at("burst"), "burst with loss_model gilbert",
                               "give loss and burst, or ge_p and ge_r, not both")  # fmt: skip
        if "loss" in mapping:
            raise ProfileError(
                at("loss"), "loss with loss_model gilbert", "give ge_p, ge_r (and ge_h, ge_k) instead"
            )
        for key in ("ge_p", "ge_r"):
            if key not in mapping:
                raise ProfileError(at(key), "missing for loss_model gilbert", f"set {key} like 1%")
        gilbert = GilbertElliott(get("ge_p", parse_percent, 0.0), get("ge_r", parse_percent, 0.0),
                                 get("ge_h", parse_percent, 100.0), get("ge_k", parse_percent, 0.0))  # fmt: skip
        if gilbert.r == 0:
            raise ProfileError(at("ge_r"), "ge_r = 0 never leaves the bad state", "use ge_r > 0 (e.g. 30%)")

    rate = get("rate", parse_rate_bps, None)
    if rate is not None and not 8 <= rate <= MAX_RATE_BPS:
        raise ProfileError(
            at("rate"), f"{format_rate_bps(rate)} is out of range", "use a rate from 8bit to 34gbit"
        )
    limit = get("limit", lambda v, p: parse_count(v, p, "packets", 1), None)

    reorder = get("reorder", parse_percent, 0.0)
    gap = get("reorder_gap", lambda v, p: parse_count(v, p, "packets", 0), 0)
    if reorder and not delay:
        raise ProfileError(
            at("reorder"), "reorder without delay is a netem no-op", "set delay (e.g. 10ms) or drop reorder"
        )
    if gap and not reorder:
        raise ProfileError(
            at("reorder_gap"), "reorder_gap without reorder", "set reorder (e.g. 25%) or drop reorder_gap"
        )

    return DirectionProfile(
        delay_us=delay, jitter_us=jitter, jitter_dist=dist, loss_pct=loss, gilbert=gilbert,
        rate_bps=rate or None, limit=limit, reorder_pct=reorder, reorder_gap=gap,
        duplicate_pct=get("duplicate", parse_percent, 0.0), corrupt_pct=get("corrupt", parse_percent, 0.0),
    )  # fmt: skip


def _merge_changes(current: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """Spec keys of ``current`` updated by ``changes``; keys that no longer make sense are dropped."""
    merged = {**current, **changes}
    if "loss_model" not in changes:
        if any(k.startswith("ge_") for k in changes):
            merged["loss_model"] = "gilbert"
        elif "loss" in changes or "burst" in changes:
            merged["loss_model"] = "random"
    stale: set[str] = set()
    if merged.get("loss_model") == "gilbert":
        stale.add("loss")
    else:
        stale |= {"ge_p", "ge_r", "ge_h", "ge_k"}
    if not merged.get("jitter"):
        stale.add("jitter_dist")
    if not merged.get("reorder"):
        stale.add("reorder_gap")
    return {k: v for k, v in merged.items() if v is not None and not (k in stale and k not in changes)}


@dataclass(frozen=True)
class LinkProfile:
    """The WAN's shape in both directions; symmetric unless the spec overrides one side."""

    a_to_b: DirectionProfile = field(default_factory=DirectionProfile)
    b_to_a: DirectionProfile = field(default_factory=DirectionProfile)

    @classmethod
    def from_mapping(
        cls, mapping: Mapping[str, Any], field: str = "wan", *, ignore: tuple[str, ...] = ("mode",)
    ) -> LinkProfile:
        """Parse a spec section: base keys for both directions, ``forward``/``reverse`` sub-tables override.

        Keys in ``ignore`` belong to the caller (e.g. ``wan.mode``) and are skipped.
        """
        if not isinstance(mapping, Mapping):
            raise ProfileError(
                field, f"expected a table, got {type(mapping).__name__}", "write it as a TOML table"
            )
        base = {k: v for k, v in mapping.items() if k not in SUBTABLES and k not in ignore}
        sides: dict[str, DirectionProfile] = {}
        for sub, attr in SUBTABLES.items():
            override = mapping.get(sub, {})
            if not isinstance(override, Mapping):
                raise ProfileError(
                    f"{field}.{sub}", "expected a table", f"write [{field}.{sub}] with profile keys"
                )
            origins = {k: f"{field}.{sub}" for k in override}
            sides[attr] = parse_direction({**base, **override}, field, origins)
        return cls(**sides)

    @classmethod
    def symmetric(cls, profile: DirectionProfile) -> LinkProfile:
        return cls(profile, profile)

    def direction(self, direction: Direction | str) -> DirectionProfile:
        """The profile of one direction."""
        return getattr(self, Direction(direction).value)

    @property
    def is_symmetric(self) -> bool:
        return self.a_to_b == self.b_to_a

    def with_changes(self, direction: Direction | str | None = None, **changes: Any) -> LinkProfile:
        """A reshaped copy: spec keys (``delay="50ms"``, ``loss="1%"``...) applied to one or both directions.

        A key given ``None`` is removed (back to its default); loss/ge_* switch the loss model as needed.
        ``burst`` (packets) makes the direction's loss bursty with the same mean (``loss`` if given,
        else the direction's current mean loss); ``loss`` without ``burst`` is independent loss again.
        """
        targets = [Direction(direction)] if direction is not None else list(Direction)
        sides = {d.value: self.direction(d) for d in Direction}
        for d in targets:
            these = dict(changes)
            if these.get("burst") is not None and "loss" not in these:
                these["loss"] = f"{self.direction(d).mean_loss_pct:.10g}%"
            sides[d.value] = parse_direction(_merge_changes(self.direction(d).to_dict(), these), "shape")
        return LinkProfile(**sides)

    def to_dict(self) -> dict[str, Any]:
        """Spec-form mapping: flat when symmetric, else ``forward``/``reverse`` tables; round-trips."""
        if self.is_symmetric:
            return self.a_to_b.to_dict()
        return {"forward": self.a_to_b.to_dict(), "reverse": self.b_to_a.to_dict()}

    def to_json_dict(self) -> dict[str, Any]:
        """Numeric form for results (µs, %, bit/s, packets), per direction, with the effective limit."""
        return {
            d.value: {**asdict(self.direction(d)), "effective_limit": self.direction(d).effective_limit}
            for d in Direction
        }

    def describe(self) -> str:
        """One line: the shared profile, or ``a→b: ...; b→a: ...``."""
        if self.is_symmetric:
            return self.a_to_b.describe()
        return f"a→b: {self.a_to_b.describe()}; b→a: {self.b_to_a.describe()}"
