"""When may the primary acknowledge an append? The pure ack policy of one primary server.

Every append gets the byte range it occupies on the mirror TCP stream (its frame). It may be
acknowledged once it is written locally and the mode's remote condition covers its last byte:

- ``handoff``: the stream offset handed to the kernel socket (local-sync),
- ``mirror``: the stream offset the mirror made durable and acknowledged (remote-sync),
- ``network``: the stream offset the egress gateway reports safely on the WAN with its repairs
  (network-sync).

All three advance monotonically; a report below the current value is ignored. Offsets are bytes
from the start of the stream (the first byte after the SYN): the frames start after the connection's
handshake (:meth:`AckTracker.start_at`).

Two seeded defects (:mod:`smfs.defects`) break this policy on purpose: ``remote-sync-acks-at-handoff``
(``mirror`` waits for ``handoff`` instead) and ``primary-acks-before-local-write`` (every append
counts as written locally when submitted).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from smfs import defects
from smfs.modes import AckOn, Mode
from smfs.wire import frame_size


class SequenceRejected(Exception):
    """The client's seq is not the next one of its log; the append is refused, nothing is written."""


@dataclass
class Pending:
    client: Hashable
    log: int
    seq: int
    start: int  # stream offset of the frame's first byte
    end: int  # stream offset just after the frame's last byte
    local: bool = False


class AckTracker:
    def __init__(self, mode: Mode, next_seq: dict[int, int] | None = None) -> None:
        self.mode = mode
        self.assigned = 0  # stream offset assigned to submitted frames so far
        self.offsets: dict[AckOn, int] = {"handoff": 0, "mirror": 0, "network": 0}
        self._expected: dict[int, int] = dict(next_seq or {})
        self._pending: list[Pending] = []  # in submission (= stream) order
        self.failed = False
        # The offset that completes an append: the mode's, but for the seeded defect.
        self._limit: AckOn = mode.ack_on
        if mode.ack_on == "mirror" and defects.active("remote-sync-acks-at-handoff"):
            self._limit = "handoff"
        self._local_at_submit = defects.active("primary-acks-before-local-write")

    def start_at(self, offset: int) -> None:
        """The stream's frames begin at ``offset`` (the bytes of the connection's handshake before them,
        :mod:`smfs.auth`): offsets stay those of the TCP stream, as the gateway's callbacks count them."""
        if self.assigned or self._pending:
            raise ValueError("the stream's start is set before the first append")
        self.assigned = offset
        self.offsets = {kind: offset for kind in self.offsets}

    def expected_seq(self, log: int) -> int:
        return self._expected.get(log, 0)

    def submit(self, client: Hashable, log: int, seq: int, payload_len: int) -> Pending:
        """Accept an append and assign its stream range; raises SequenceRejected for a wrong seq."""
        want = self._expected.get(log, 0)
        if seq != want:
            raise SequenceRejected(f"log {log}: seq {seq} is not the next one ({want})")
        self._expected[log] = seq + 1
        start = self.assigned
        self.assigned += frame_size(payload_len)
        item = Pending(client, log, seq, start, self.assigned, local=self._local_at_submit)
        self._pending.append(item)
        return item

    def local_written(self, items: list[Pending]) -> list[Pending]:
        for item in items:
            item.local = True
        return self._complete()

    def advance(self, kind: AckOn, offset: int) -> list[Pending]:
        """The ``kind`` condition now holds for every stream byte below ``offset``."""
        if offset > self.assigned:
            raise ValueError(f"{kind} offset {offset} beyond the stream end {self.assigned}")
        if offset > self.offsets[kind]:
            self.offsets[kind] = offset
        return self._complete()

    def fail_all(self) -> list[Pending]:
        """The mirror stream is gone: every pending append fails (and later ones are refused)."""
        self.failed = True
        items, self._pending = self._pending, []
        return items

    def pending(self) -> int:
        return len(self._pending)

    def waiting_for(self, kind: AckOn) -> int | None:
        """The lowest ``kind`` offset that would complete a pending append (the end of the oldest one
        that ``kind`` does not cover yet), None when none waits for it."""
        limit = self.offsets[kind]
        return next((item.end for item in self._pending if item.end > limit), None)

    def _complete(self) -> list[Pending]:
        limit = self.offsets[self._limit]
        done: list[Pending] = []
        keep: list[Pending] = []
        for i, item in enumerate(self._pending):
            if item.end > limit:
                keep.extend(self._pending[i:])
                break
            (done if item.local else keep).append(item)
        self._pending = keep
        return done
