"""The five mirroring modes and what each promises.

An append returns to the application when the primary has written it locally *and* the mode's
remote condition holds for the append's last byte on the mirror TCP stream:

==================  ===========  ======  ===========================================================
mode                ack_on       fec     promise in a primary-site disaster
==================  ===========  ======  ===========================================================
local-sync          handoff      no      none (DRBD protocol A): acked appends may be lost
local-sync+fec      handoff      yes     none; FEC only repairs WAN loss
remote-sync         mirror       no      no acked append lost (DRBD protocol C)
remote-sync+fec     mirror       yes     no acked append lost
network-sync        network      yes     no acked append lost (the SMFS paper's claim under test)
==================  ===========  ======  ===========================================================

``handoff``: the frame was handed to the kernel socket; ``mirror``: the mirror's storage-level ack
(after its fsync) covers it; ``network``: the egress gateway's callback says the packets carrying
it and every repair packet covering them are on the WAN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

AckOn = Literal["handoff", "mirror", "network"]


@dataclass(frozen=True)
class Mode:
    name: str
    ack_on: AckOn
    fec: bool
    durable: bool  # promises that no acknowledged append is lost when the primary site dies

    def __str__(self) -> str:
        return self.name


MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("local-sync", "handoff", fec=False, durable=False),
        Mode("local-sync+fec", "handoff", fec=True, durable=False),
        Mode("remote-sync", "mirror", fec=False, durable=True),
        Mode("remote-sync+fec", "mirror", fec=True, durable=True),
        Mode("network-sync", "network", fec=True, durable=True),
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
