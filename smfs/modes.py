"""The five mirroring modes and what each promises, per disaster.

An append returns to the application when the primary has written it locally *and* the mode's
remote condition holds for the append's last byte on the mirror TCP stream:

==================  ===========  ======  ===========================================================
mode                ack_on       fec     what the ack means
==================  ===========  ======  ===========================================================
local-sync          handoff      no      written locally (DRBD protocol A)
local-sync+fec      handoff      yes     written locally; FEC only repairs WAN loss
remote-sync         mirror       no      on the mirror's disk (DRBD protocol C)
remote-sync+fec     mirror       yes     on the mirror's disk
network-sync        network      yes     on the WAN with its repair packets (the SMFS paper's claim)
==================  ===========  ======  ===========================================================

``handoff``: the frame was handed to the kernel socket; ``mirror``: the mirror's storage-level ack
(after its fsync) covers it; ``network``: the egress gateway's callback says the packets carrying
it and every repair packet covering them are on the WAN.

Whether a mode promises that *no acknowledged append is lost* depends on the disaster (the drill's
``[faults] schedule``); ``PROMISES`` is the table and ``promises(mode, schedule)`` reads it:

==================  ================  ==============  ===================
mode                rolling-disaster  site-power-cut  mirror-power-outage
==================  ================  ==============  ===================
local-sync          no                no              no
local-sync+fec      no                no              no
remote-sync         yes               yes             yes
remote-sync+fec     yes               yes             yes
network-sync        yes               yes             no
==================  ================  ==============  ===================

rolling-disaster and site-power-cut hit the primary site; mirror-power-outage cuts the mirror's
power first, so only an ack given after the mirror's own fsync survives it: network-sync's ack says
the packets are on the WAN, not on the mirror's disk. ``Mode.durable`` is the promise under a
primary-site disaster. Corrupt, unexpected or out-of-order records on the mirror break every mode's
promise under every schedule (the checker's business, not this table's).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

__all__ = [
    "MODES",
    "PRIMARY_SITE_SCHEDULES",
    "PROMISES",
    "SCHEDULES",
    "AckOn",
    "Mode",
    "parse_mode",
    "parse_modes",
    "promises",
]

AckOn = Literal["handoff", "mirror", "network"]

PRIMARY_SITE_SCHEDULES = ("rolling-disaster", "site-power-cut")
"""Disasters that hit the primary site only (the mirror keeps running until it is stopped cleanly)."""

SCHEDULES = (*PRIMARY_SITE_SCHEDULES, "mirror-power-outage")
"""Every disaster a drill can end with; the same names as ``testbed.drill.faults.SCHEDULES``."""


def _row(rolling: bool, site_cut: bool, mirror_outage: bool) -> Mapping[str, bool]:
    return MappingProxyType(dict(zip(SCHEDULES, (rolling, site_cut, mirror_outage), strict=True)))


PROMISES: Mapping[str, Mapping[str, bool]] = MappingProxyType({
    #                                rolling-disaster  site-power-cut  mirror-power-outage
    "local-sync":           _row(False,             False,          False),
    "local-sync+fec":       _row(False,             False,          False),
    "remote-sync":          _row(True,              True,           True),
    "remote-sync+fec":      _row(True,              True,           True),
    "network-sync":         _row(True,              True,           False),
})
"""Mode name -> schedule name -> does the mode promise that no acknowledged append is lost?"""


@dataclass(frozen=True)
class Mode:
    name: str
    ack_on: AckOn
    fec: bool
    durable: bool  # promises that no acknowledged append is lost when the primary site dies

    def __str__(self) -> str:
        return self.name


def _mode(name: str, ack_on: AckOn, fec: bool) -> Mode:
    """A mode whose ``durable`` is read from ``PROMISES`` (every primary-site disaster)."""
    return Mode(name, ack_on, fec=fec, durable=all(PROMISES[name][s] for s in PRIMARY_SITE_SCHEDULES))


MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        _mode("local-sync", "handoff", fec=False),
        _mode("local-sync+fec", "handoff", fec=True),
        _mode("remote-sync", "mirror", fec=False),
        _mode("remote-sync+fec", "mirror", fec=True),
        _mode("network-sync", "network", fec=True),
    )
}


def parse_mode(name: str) -> Mode:
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"mode: unknown mode {name!r}; use one of {', '.join(MODES)}") from None


def parse_modes(text: str) -> list[Mode]:
    """``all`` or a comma-separated list of mode names, in the given order."""
    if text.strip() == "all":
        return list(MODES.values())
    return [parse_mode(part.strip()) for part in text.split(",") if part.strip()]


def promises(mode: Mode | str, schedule: str) -> bool:
    """Does ``mode`` promise that no acknowledged append is lost when the drill ends with ``schedule``?

    Raises ``ValueError`` (one line) for an unknown mode or schedule.
    """
    name = mode.name if isinstance(mode, Mode) else mode
    row = PROMISES.get(name)
    if row is None:
        raise ValueError(f"mode: unknown mode {name!r}; use one of {', '.join(PROMISES)}")
    if schedule not in row:
        raise ValueError(f"schedule: unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    return row[schedule]
