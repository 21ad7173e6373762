"""Apply a :class:`~netem.profile.DirectionProfile` with netem through pyroute2, and read it back.

``netem_args`` turns a profile into pyroute2's ``tc(..., 'netem', **kwargs)`` keywords (delay and
jitter in µs, loss/duplicate/reorder/corrupt in %, rate in bytes/s, limit in packets). pyroute2's
netem plugin converts them (µs → kernel ticks, % → u32) but cannot send Gilbert-Elliott loss or a
jitter distribution table, so :class:`Shaper` builds the same message with pyroute2's own converter
plus those two attributes (the layout of iproute2's ``tc``), sends it with ``nlm_request`` and
then dumps the qdisc and compares every field (:class:`ShapeMismatch` on any difference).

Works with ``IPRoute()`` or ``NetNS(name)``; runs on the host or inside a guest::

    python3 -m netem.shaper apply --json '{"delay": "25ms", "loss": "1%"}' --ifname eth0 --ingress
"""

from __future__ import annotations

import argparse
import errno
import glob
import json
import os
import sys
from array import array
from collections.abc import Iterable, Mapping
from typing import Any

from pyroute2.netlink import (
    NLA_F_NESTED,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    nla,
    nlmsg_base,
)
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_NEWQDISC, TC_H_ROOT
from pyroute2.netlink.rtnl.tcmsg import sched_netem, tcmsg
from pyroute2.netlink.rtnl.tcmsg.common import tick_in_usec

from netem.profile import Direction, DirectionProfile, LinkProfile, ProfileError

U32_MAX = 2**32 - 1
INGRESS_HANDLE = 0xFFFF0000
ETH_P_ALL = 0x0003
DIST_DIRS = (
    "/usr/lib/tc",
    "/usr/lib64/tc",
    "/usr/local/lib/tc",
    "/lib/tc",
    *sorted(glob.glob("/usr/lib/*/tc")),
)
"""Where iproute2 installs its jitter distribution tables (``normal.dist``...); ``TC_LIB_DIR`` first."""

TIME_TOLERANCE_US = 1.0
"""Read-back tolerance for delay/jitter (µs): the kernel keeps 64 ns ticks, tc truncates."""
PCT_TOLERANCE = 1e-6
"""Read-back tolerance for probabilities (%): one u32 step is 2.3e-8 %."""
RATE_TOLERANCE_BPS = 8
"""Read-back tolerance for rate (bit/s): the kernel keeps whole bytes/s."""


class ShaperError(RuntimeError):
    """netem could not be applied, read or cleared; the message is one line."""


class ShapeMismatch(ShaperError):
    """The kernel's qdisc differs from the profile: names the field, configured and read-back values."""

    def __init__(self, ifname: str, field: str, configured: Any, read_back: Any) -> None:
        super().__init__(f"{ifname}: netem {field} is {read_back!r} in the kernel, configured {configured!r}")
        self.field, self.configured, self.read_back = field, configured, read_back


# --------------------------------------------------------------------------- arguments


def netem_args(profile: DirectionProfile) -> dict[str, Any]:
    """pyroute2 ``tc('replace', 'netem', ...)`` keywords for one direction.

    Units as pyroute2 expects: ``delay``/``jitter`` µs, ``loss``/``duplicate``/``prob_reorder``/
    ``prob_corrupt`` %, ``rate`` bytes/s, ``limit`` packets. Two keys pyroute2 does not know are
    added only when used: ``loss_ge`` = (p, r, 1-h, 1-k) in % and ``distribution`` = table name.
    """
    args: dict[str, Any] = {
        "delay": profile.delay_us,
        "jitter": profile.jitter_us,
        "limit": profile.effective_limit,
        "loss": 0.0 if profile.gilbert else profile.loss_pct,
        "duplicate": profile.duplicate_pct,
    }
    if profile.reorder_pct:
        args["prob_reorder"] = profile.reorder_pct
        args["gap"] = profile.reorder_gap or 1
    if profile.corrupt_pct:
        args["prob_corrupt"] = profile.corrupt_pct
    if profile.rate_bps:
        args["rate"] = profile.rate_bps // 8
    if profile.gilbert:
        g = profile.gilbert
        args["loss_ge"] = (g.p, g.r, g.h, g.k)
    if profile.jitter_us and profile.jitter_dist != "uniform":
        args["distribution"] = profile.jitter_dist
    return args


def expected_readback(profile: DirectionProfile) -> dict[str, Any]:
    """What :meth:`Shaper.read_back` should report for ``profile`` (same keys and units)."""
    g = profile.gilbert
    return {
        "delay_us": profile.delay_us,
        "jitter_us": profile.jitter_us,
        "limit": profile.effective_limit,
        "loss_pct": 0.0 if g else profile.loss_pct,
        "gilbert": [g.p, g.r, g.h, g.k] if g else None,
        "rate_bps": (profile.rate_bps // 8 * 8) if profile.rate_bps else None,
        "reorder_pct": profile.reorder_pct,
        "reorder_gap": (profile.reorder_gap or 1) if profile.reorder_pct else 0,
        "duplicate_pct": profile.duplicate_pct,
        "corrupt_pct": profile.corrupt_pct,
    }


def load_distribution(name: str, dirs: Iterable[str] | None = None) -> bytes:
    """iproute2's ``<name>.dist`` table as the kernel wants it: s16 values, native order."""
    search = [os.environ["TC_LIB_DIR"]] if os.environ.get("TC_LIB_DIR") else []
    search += list(dirs if dirs is not None else DIST_DIRS)
    for folder in search:
        path = os.path.join(folder, f"{name}.dist")
        if os.path.exists(path):
            with open(path) as f:
                values = [int(tok) for line in f if not line.lstrip().startswith("#") for tok in line.split()]
            return array("h", values).tobytes()
    raise ShaperError(
        f"jitter distribution {name!r} needs iproute2's {name}.dist (not in {', '.join(search)})"
    )


# --------------------------------------------------------------------------- netlink message

_NLA_CACHE = ("_nlmsg_base__compiled_nla", "_nlmsg_base__t_nla_map", "_nlmsg_base__r_nla_map")
"""pyroute2's per-class cache of the compiled ``nla_map`` (``nlmsg_base.__compiled_nla`` and the
two tables, name-mangled), read as ``self.__class__.__compiled_nla``, so through the MRO."""


def _own_nla_table(cls: type[nlmsg_base]) -> type[nlmsg_base]:
    """Give a pyroute2 message subclass its own, not yet compiled, NLA table cache.

    pyroute2 stores the compiled table on the class that compiled it, and a subclass *inherits* the
    "compiled" flag: once anything has encoded or decoded a plain netem qdisc (``tcmsg``, or
    ``sched_netem.options``: a qdisc dump does), a subclass compiled later reuses its parent's table
    and silently loses what it adds (Gilbert-Elliott loss, the 64-bit latency, our ``get_options``)."""
    for attr in _NLA_CACHE:
        if hasattr(nlmsg_base, attr):
            setattr(cls, attr, getattr(nlmsg_base, attr))
    return cls


@_own_nla_table
class NetemOptions(sched_netem.options):
    """pyroute2's netem options plus what it lacks: Gilbert-Elliott loss, distribution table, 64-bit fields."""

    nla_map = (
        ("TCA_NETEM_UNSPEC", "none"),
        ("TCA_NETEM_CORR", "netem_corr"),
        ("TCA_NETEM_DELAY_DIST", "cdata"),
        ("TCA_NETEM_REORDER", "netem_reorder"),
        ("TCA_NETEM_CORRUPT", "netem_corrupt"),
        ("TCA_NETEM_LOSS", "netem_loss"),
        ("TCA_NETEM_RATE", "netem_rate"),
        ("TCA_NETEM_ECN", "uint32"),
        ("TCA_NETEM_RATE64", "uint64"),
        ("TCA_NETEM_PAD", "hex"),
        ("TCA_NETEM_LATENCY64", "int64"),
        ("TCA_NETEM_JITTER64", "int64"),
    )

    @_own_nla_table
    class netem_loss(nla):
        nla_flags = NLA_F_NESTED
        nla_map = (("NETEM_LOSS_UNSPEC", "none"), ("NETEM_LOSS_GI", "hex"), ("NETEM_LOSS_GE", "gemodel"))

        class gemodel(nla):
            fields = (("p", "I"), ("r", "I"), ("h", "I"), ("k1", "I"))


@_own_nla_table
class NetemMsg(tcmsg):
    """A tcmsg whose TCA_OPTIONS always use :class:`NetemOptions` (encode and decode)."""

    @staticmethod
    def get_options(self: Any, *argv: Any, **kwarg: Any) -> type[nla]:  # pyroute2 calls it as a function
        return NetemOptions


def _pct2u32(pct: float) -> int:
    return min(U32_MAX, round(U32_MAX * pct / 100))


def _u322pct(value: int) -> float:
    return value * 100 / U32_MAX


def _ge_attr(loss_ge: tuple[float, float, float, float]) -> list[Any]:
    """TCA_NETEM_LOSS/NETEM_LOSS_GE from (p, r, 1-h, 1-k) in %; the kernel wants h itself (as tc sends)."""
    p, r, one_minus_h, one_minus_k = loss_ge
    ge = {
        "p": _pct2u32(p),
        "r": _pct2u32(r),
        "h": U32_MAX - _pct2u32(one_minus_h),
        "k1": _pct2u32(one_minus_k),
    }
    return ["TCA_NETEM_LOSS", {"attrs": [["NETEM_LOSS_GE", ge]]}]


def netem_options(args: Mapping[str, Any], dist_dirs: Iterable[str] | None = None) -> dict[str, Any]:
    """TCA_OPTIONS for ``args`` from :func:`netem_args`: pyroute2's conversion, plus GE loss and the table."""
    base = {k: v for k, v in args.items() if k not in ("loss_ge", "distribution")}
    opts = sched_netem.get_parameters(base)
    for key in ("delay", "jitter"):
        opts[key] = min(U32_MAX, int(opts[key]))  # µs → ticks, truncated like tc
    for key in ("loss", "duplicate"):
        opts[key] = _pct2u32(base.get(key, 0))  # rounded like tc (pyroute2 truncates)
    attrs = []
    for name, value in opts["attrs"]:
        if name == "TCA_NETEM_REORDER":
            value = {**value, "prob_reorder": _pct2u32(base["prob_reorder"])}
        elif name == "TCA_NETEM_CORRUPT":
            value = {**value, "prob_corrupt": _pct2u32(base["prob_corrupt"])}
        elif name == "TCA_NETEM_RATE" and "loss_ge" in args:
            attrs.append(_ge_attr(args["loss_ge"]))  # tc's order: loss before rate
        attrs.append([name, value])
    if "loss_ge" in args and not any(name == "TCA_NETEM_LOSS" for name, _ in attrs):
        attrs.append(_ge_attr(args["loss_ge"]))
    if "distribution" in args:
        attrs.append(["TCA_NETEM_DELAY_DIST", load_distribution(args["distribution"], dist_dirs)])
    opts["attrs"] = attrs
    return opts


def netem_message(index: int, args: Mapping[str, Any], dist_dirs: Iterable[str] | None = None) -> NetemMsg:
    """The RTM_NEWQDISC body putting netem at the root of interface ``index``."""
    msg = NetemMsg()
    msg["index"] = index
    msg["handle"] = 0
    msg["parent"] = TC_H_ROOT
    msg["attrs"] = [["TCA_KIND", "netem"], ["TCA_OPTIONS", netem_options(args, dist_dirs)]]
    return msg


def parse_netem(msg: Any) -> dict[str, Any]:
    """Normalise a dumped netem qdisc (pyroute2 tcmsg) into :func:`expected_readback`'s keys and units."""
    full = _redecode(msg)
    opts = full.get_attr("TCA_OPTIONS")
    latency_ns, jitter_ns = opts.get_attr("TCA_NETEM_LATENCY64"), opts.get_attr("TCA_NETEM_JITTER64")
    reorder = opts.get_attr("TCA_NETEM_REORDER") or {}
    corrupt = opts.get_attr("TCA_NETEM_CORRUPT") or {}
    rate = opts.get_attr("TCA_NETEM_RATE64") or (opts.get_attr("TCA_NETEM_RATE") or {}).get("rate", 0)
    gilbert = None
    loss = opts.get_attr("TCA_NETEM_LOSS")
    if loss is not None and loss.get_attr("NETEM_LOSS_GE") is not None:
        ge = loss.get_attr("NETEM_LOSS_GE")
        gilbert = [_u322pct(ge["p"]), _u322pct(ge["r"]), 100 - _u322pct(ge["h"]), _u322pct(ge["k1"])]
    return {
        "delay_us": latency_ns / 1000 if latency_ns is not None else opts["delay"] / tick_in_usec,
        "jitter_us": jitter_ns / 1000 if jitter_ns is not None else opts["jitter"] / tick_in_usec,
        "limit": opts["limit"],
        "loss_pct": _u322pct(opts["loss"]),
        "gilbert": gilbert,
        "rate_bps": rate * 8 or None,
        "reorder_pct": _u322pct(reorder.get("prob_reorder", 0)),
        "reorder_gap": opts["gap"],
        "duplicate_pct": _u322pct(opts["duplicate"]),
        "corrupt_pct": _u322pct(corrupt.get("prob_corrupt", 0)),
    }


def _redecode(msg: Any) -> Any:
    """Decode the raw message again with :class:`NetemMsg` (pyroute2's parser skips GE loss)."""
    data, offset, length = getattr(msg, "data", None), getattr(msg, "offset", 0), getattr(msg, "length", 0)
    if isinstance(data, (bytes, bytearray, memoryview)) and length:
        full = NetemMsg(bytes(data[offset : offset + length]))
        full.decode()
        return full
    return msg


def compare(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """Fields that differ beyond the kernel's rounding: (field, configured, read back)."""
    tolerance = {
        "delay_us": TIME_TOLERANCE_US,
        "jitter_us": TIME_TOLERANCE_US,
        "rate_bps": RATE_TOLERANCE_BPS,
    }
    diffs = []
    for key, want in expected.items():
        got = actual.get(key)
        if want is None or got is None:
            ok = want is got
        elif isinstance(want, list):
            ok = len(want) == len(got) and all(
                abs(a - b) <= PCT_TOLERANCE for a, b in zip(want, got, strict=True)
            )
        else:
            ok = abs(want - got) <= tolerance.get(key, PCT_TOLERANCE if key.endswith("_pct") else 0)
        if not ok:
            diffs.append((key, want, got))
    return diffs


# --------------------------------------------------------------------------- shapers


def _nlm_request(ipr: Any, msg: Any, msg_type: int, msg_flags: int) -> list[Any]:
    """``ipr.nlm_request`` returning a list on every pyroute2 version."""
    status = getattr(ipr, "status", None)
    if isinstance(status, dict):
        status.setdefault("nlm_generator", False)  # pyroute2 0.9 sync nlm_request reads a key it never sets
    return list(ipr.nlm_request(msg, msg_type=msg_type, msg_flags=msg_flags) or [])


def _one_line(err: BaseException) -> str:
    if isinstance(err, NetlinkError):
        return f"{os.strerror(err.code)} (errno {err.code})"
    return " ".join(str(err).split()) or type(err).__name__


class Shaper:
    """netem at the root of one interface (egress), through a pyroute2 ``IPRoute``/``NetNS``."""

    def __init__(self, ipr: Any, ifname: str) -> None:
        self.ipr = ipr
        self.ifname = ifname

    @property
    def index(self) -> int:
        found = self.ipr.link_lookup(ifname=self.ifname)
        if not found:
            raise ShaperError(f"{self.ifname}: no such interface")
        return found[0]

    def apply(self, profile: DirectionProfile) -> dict[str, Any]:
        """Replace the root qdisc with netem for ``profile``, read it back and verify; returns the read-back."""
        msg = netem_message(self.index, netem_args(profile))
        flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
        try:
            _nlm_request(self.ipr, msg, RTM_NEWQDISC, flags)
        except NetlinkError as err:
            if err.code in (errno.ENOENT, errno.EINVAL, errno.EOPNOTSUPP) and not self._netem_known():
                raise ShaperError(
                    f"{self.ifname}: netem is not available in this kernel: {os.strerror(err.code)}"
                    " from RTM_NEWQDISC kind netem (load the sch_netem module)"
                ) from err
            raise ShaperError(
                f"{self.ifname}: netem rejected ({profile.describe()}): {_one_line(err)}"
            ) from err
        return self.verify(profile)

    def _netem_known(self) -> bool:
        """Best effort: is sch_netem built in or loaded? (True when unknown, so the kernel's error stands.)"""
        try:
            with open("/proc/modules") as f:
                if any(line.startswith("sch_netem ") for line in f):
                    return True
            release = os.uname().release
            with open(f"/lib/modules/{release}/modules.builtin") as f:
                return any(line.strip().endswith("/sch_netem.ko") for line in f)
        except OSError:
            return False

    def qdisc(self) -> Any | None:
        """The root qdisc message of the interface, or None."""
        index = self.index
        for msg in self.ipr.get_qdiscs(index=index):
            if msg["index"] == index and msg["parent"] == TC_H_ROOT:
                return msg
        return None

    def read_back(self) -> dict[str, Any] | None:
        """The kernel's netem parameters in :func:`expected_readback` units, or None when netem is absent."""
        msg = self.qdisc()
        if msg is None or msg.get_attr("TCA_KIND") != "netem":
            return None
        return parse_netem(msg)

    def verify(self, profile: DirectionProfile) -> dict[str, Any]:
        """Read back and raise :class:`ShapeMismatch` on the first differing field; returns the read-back."""
        actual = self.read_back()
        if actual is None:
            kind = self.qdisc()
            raise ShapeMismatch(self.ifname, "qdisc", "netem", kind.get_attr("TCA_KIND") if kind else None)
        for field, want, got in compare(expected_readback(profile), actual):
            raise ShapeMismatch(self.ifname, field, want, got)
        return actual

    def clear(self) -> None:
        """Remove the root qdisc (back to the default); a missing qdisc or interface is success."""
        try:
            index = self.index
        except ShaperError:
            return
        try:
            self.ipr.tc("del", index=index, root=True)
        except NetlinkError as err:
            if err.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                raise ShaperError(f"{self.ifname}: cannot remove the root qdisc: {_one_line(err)}") from err


def ifb_name(ifname: str) -> str:
    """``ifb-<ifname>``, cut to the kernel's 15 characters."""
    return f"ifb-{ifname}"[:15]


class IfbShaper:
    """netem on the **ingress** of ``ifname``: ingress qdisc + filter redirecting to ``ifb-<ifname>``,
    netem at the ifb's root. Packets already queued there survive the sender's death."""

    def __init__(self, ipr: Any, ifname: str) -> None:
        self.ipr = ipr
        self.ifname = ifname
        self.ifb = ifb_name(ifname)
        self.egress = Shaper(ipr, self.ifb)

    def _index(self, name: str) -> int:
        found = self.ipr.link_lookup(ifname=name)
        if not found:
            raise ShaperError(f"{name}: no such interface")
        return found[0]

    def setup(self) -> None:
        """Create the ifb (up), the ingress qdisc and the redirect filter; idempotent."""
        index = self._index(self.ifname)
        try:
            if not self.ipr.link_lookup(ifname=self.ifb):
                self.ipr.link("add", ifname=self.ifb, kind="ifb")
            ifb_index = self._index(self.ifb)
            self.ipr.link("set", index=ifb_index, state="up")
        except NetlinkError as err:
            raise ShaperError(
                f"{self.ifb}: cannot create the ifb device: {_one_line(err)} (load ifb)"
            ) from err
        if self.redirect_target() == ifb_index:
            return
        try:
            self.ipr.tc("add", "ingress", index, INGRESS_HANDLE)
        except NetlinkError as err:
            if err.code != errno.EEXIST:
                raise ShaperError(f"{self.ifname}: cannot add the ingress qdisc: {_one_line(err)}") from err
        action = {"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": ifb_index}
        try:
            self.ipr.tc(
                "add-filter",
                "matchall",
                index,
                parent=INGRESS_HANDLE,
                prio=1,
                protocol=ETH_P_ALL,
                action=action,
            )
        except NetlinkError:  # no cls_matchall: u32 matching everything does the same
            try:
                self.ipr.tc("add-filter", "u32", index, parent=INGRESS_HANDLE, prio=1, protocol=ETH_P_ALL,
                            target=0x10001, keys=["0x0/0x0+0"], action=action)  # fmt: skip
            except NetlinkError as err:
                raise ShaperError(
                    f"{self.ifname}: cannot redirect ingress to {self.ifb}: {_one_line(err)}"
                ) from err

    def redirect_target(self) -> int | None:
        """ifindex the ingress filter redirects to, or None when there is no redirect."""
        try:
            filters = self.ipr.get_filters(index=self._index(self.ifname), parent=INGRESS_HANDLE)
        except NetlinkError:
            return None
        for flt in filters:
            target = _mirred_target(flt)
            if target is not None:
                return target
        return None

    def apply(self, profile: DirectionProfile) -> dict[str, Any]:
        """Set up the redirect and netem on the ifb; returns the verified read-back (undone if netem fails)."""
        self.setup()
        try:
            return self.egress.apply(profile)
        except ShapeMismatch:
            raise
        except ShaperError:
            self.clear()  # no half-built redirect left behind
            raise

    def read_back(self) -> dict[str, Any] | None:
        return self.egress.read_back() if self.redirect_target() is not None else None

    def verify(self, profile: DirectionProfile) -> dict[str, Any]:
        if self.redirect_target() != self._index(self.ifb):
            raise ShapeMismatch(self.ifname, "ingress redirect", self.ifb, None)
        return self.egress.verify(profile)

    def clear(self) -> None:
        """Remove the ingress qdisc (and its filter) and the ifb; anything already gone is success."""
        try:
            index = self._index(self.ifname)
            self.ipr.tc("del", "ingress", index, INGRESS_HANDLE)
        except ShaperError:
            pass
        except NetlinkError as err:
            if err.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                raise ShaperError(
                    f"{self.ifname}: cannot remove the ingress qdisc: {_one_line(err)}"
                ) from err
        try:
            ifb_index = self._index(self.ifb)
            self.ipr.link("del", index=ifb_index)
        except ShaperError:
            pass
        except NetlinkError as err:
            if err.code != errno.ENODEV:
                raise ShaperError(f"{self.ifb}: cannot delete the ifb: {_one_line(err)}") from err


def _mirred_target(flt: Any) -> int | None:
    """The ifindex of a mirred redirect found anywhere in a dumped filter."""

    def walk(node: Any) -> int | None:
        if isinstance(node, Mapping) or hasattr(node, "get_attr"):
            parms = node.get_attr("TCA_MIRRED_PARMS") if hasattr(node, "get_attr") else None
            if parms is not None:
                return parms["ifindex"]
            attrs = node.get("attrs", []) if isinstance(node, Mapping) or hasattr(node, "get") else []
            for _name, value in attrs:
                found = walk(value)
                if found is not None:
                    return found
        return None

    return walk(flt)


# --------------------------------------------------------------------------- CLI


def _run_command(shaper: Shaper | IfbShaper, ifname: str, ingress: bool, command: str, profile_json: str,
                 direction: str) -> tuple[int, dict[str, Any] | str]:
    """One command; (exit code, output dict) or (exit code, one-line error)."""
    out: dict[str, Any] = {"ifname": ifname, "ingress": ingress}
    try:
        if command == "apply":
            profile = LinkProfile.from_mapping(json.loads(profile_json), "profile").direction(direction)
            out["profile"] = profile.describe()
            out["applied"] = netem_args(profile)
            out["read_back"] = shaper.apply(profile)
        elif command == "show":
            out["read_back"] = shaper.read_back()
        else:
            shaper.clear()
            out["cleared"] = True
    except ShapeMismatch as err:
        return 1, f"mismatch: {err}"
    except (ShaperError, ProfileError, NetlinkError, json.JSONDecodeError, OSError) as err:
        return 2, _one_line(err)
    return 0, out


def serve(shaper: Shaper | IfbShaper, ifname: str, ingress: bool, fifo: str) -> None:
    """Apply commands read from the FIFO ``fifo`` until killed, one JSON line each:
    ``{"id": "x", "command": "apply", "json": "<profile>", "direction": "a_to_b"}``. The answer
    ``{"rc": 0, "out": ...}`` is written atomically to ``<fifo>.<id>.reply``.

    A resident shaper answers in milliseconds where a fresh ``python3 -m netem.shaper`` takes seconds on
    a loaded TCG guest (interpreter and pyroute2 start-up): the nemesis needs its loss bursts on time."""
    if not os.path.exists(fifo):
        os.mkfifo(fifo, 0o600)
    with open(fifo, "r+b", buffering=0) as f:  # r+: never EOF when writers come and go
        for line in iter(f.readline, b""):
            try:
                req = json.loads(line)
                rid = "".join(c for c in str(req["id"]) if c.isalnum() or c in "-_")
                rc, out = _run_command(shaper, ifname, ingress, req.get("command", "apply"), req.get("json", "{}"),
                                       req.get("direction", Direction.A_TO_B.value))
            except (ValueError, KeyError) as err:
                rid, rc, out = "bad", 2, f"bad request: {_one_line(err)}"
            tmp = f"{fifo}.{rid}.tmp"
            with open(tmp, "w") as r:
                json.dump({"rc": rc, "out": out}, r, default=list)
            os.replace(tmp, f"{fifo}.{rid}.reply")


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m netem.shaper", description="Apply netem and read it back."
    )
    parser.add_argument("command", choices=("apply", "show", "clear", "serve"))
    parser.add_argument("--ifname", required=True, help="interface to shape (e.g. eth0)")
    parser.add_argument(
        "--ingress", action="store_true", help="shape the interface's ingress via ifb-<ifname>"
    )
    parser.add_argument("--json", default="{}", help='profile in spec form, e.g. \'{"delay": "25ms"}\'')
    parser.add_argument("--direction", default=Direction.A_TO_B.value, choices=[d.value for d in Direction])
    parser.add_argument("--netns", default=None, help="network namespace name (default: this one)")
    parser.add_argument("--fifo", default=None, help="serve: the FIFO commands are read from")
    args = parser.parse_args(argv)
    try:
        from pyroute2 import IPRoute, NetNS

        ipr = NetNS(args.netns) if args.netns else IPRoute()
    except (NetlinkError, OSError) as err:
        print(f"shaper: {_one_line(err)}", file=sys.stderr)
        return 2
    try:
        shaper: Shaper | IfbShaper = IfbShaper(ipr, args.ifname) if args.ingress else Shaper(ipr, args.ifname)
        if args.command == "serve":
            if not args.fifo:
                print("shaper: serve needs --fifo PATH", file=sys.stderr)
                return 2
            serve(shaper, args.ifname, args.ingress, args.fifo)
            return 0
        rc, out = _run_command(shaper, args.ifname, args.ingress, args.command, args.json, args.direction)
    finally:
        ipr.close()
    if rc:
        print(f"shaper: {out}", file=sys.stderr)
        return rc
    print(json.dumps(out, default=list))
    return 0


__all__ = [
    "IfbShaper",
    "NetemMsg",
    "NetemOptions",
    "ShapeMismatch",
    "Shaper",
    "ShaperError",
    "expected_readback",
    "ifb_name",
    "load_distribution",
    "netem_args",
    "netem_message",
    "netem_options",
    "parse_netem",
]

if __name__ == "__main__":
    sys.exit(_main())
