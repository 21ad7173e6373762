"""Two result folders side by side (``./inv compare A B``): drills (``result.json``) or experiments
(``experiment.json``).

First what differs in what was run (the spec's fields, the environment), then the figures per mode
(drills) or per point × mode (experiments) with their deltas, each marked when the difference is
beyond the spread:

- an experiment's spread is its repetitions' range: two cells differ when their ranges do not overlap;
- a drill runs each mode once, so its spread is the testers' own: each tester's log is one sample of
  the per-tester throughput (acked bytes over the run's window); two drills differ when the means are
  further apart than twice the combined standard error *and* than :data:`REPEATABILITY` (the testers
  share one WAN and one host, so their spread alone understates the spread between runs).
"""

from __future__ import annotations

import json
import math
import statistics
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from testbed.errors import UserError


class CompareError(UserError, ValueError):
    """A folder is not a result (the message says what it needs)."""


def load_result(folder: Path) -> tuple[str, dict[str, Any]]:
    """``("drill" | "experiment", content)`` of a result folder."""
    if (folder / "experiment.json").is_file():
        return "experiment", json.loads((folder / "experiment.json").read_text())
    if (folder / "result.json").is_file():
        return "drill", json.loads((folder / "result.json").read_text())
    raise CompareError(f"{folder}: no result.json (a drill) or experiment.json (an experiment); pass a result "
                       "folder, e.g. results/default/20261201-010651")


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def _spec_fields(folder: Path, kind: str) -> dict[str, Any]:
    name = "spec.toml" if kind == "drill" else "experiment-file.toml"
    path = folder / name
    if not path.is_file():
        return {}
    try:
        return _flat(tomllib.loads(path.read_text()))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        return {"(unreadable)": name}


def differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def tester_rates(mode: Mapping[str, Any], append_size: int) -> list[float]:
    """Per-tester throughput samples (MB/s) of a drill's mode: acked appends × size over the window."""
    window = mode.get("window_s")
    if not window:
        return []
    logs = mode.get("logs") or []
    logs = list(logs.values()) if isinstance(logs, Mapping) else logs  # result.json keys them by log
    return [log.get("acked", 0) * append_size / window / 1e6 for log in logs if "acked" in log]


REPEATABILITY = 0.10
"""Two drills of one spec on one machine differ by this much per mode without any change (measured
here: local-sync 4.99-5.24 MB/s, network-sync 2.56-2.79 over four and two default drills): a smaller
difference is never called beyond the spread, whatever the testers' standard error says (the testers
of one run share its WAN and its host, so their spread understates the spread between runs)."""


def _beyond_drill(ra: list[float], rb: list[float]) -> tuple[bool | None, str]:
    if len(ra) < 2 or len(rb) < 2:
        return None, "no spread (fewer than 2 testers)"
    se = math.sqrt(statistics.variance(ra) / len(ra) + statistics.variance(rb) / len(rb))
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    d = mb - ma
    small = ma > 0 and abs(d) / ma <= REPEATABILITY
    if se == 0:
        return d != 0 and not small, "testers identical"
    return abs(d) > 2 * se and not small, f"Δ {d / se:+.1f} standard errors, {d / ma * 100 if ma else 0:+.0f} %"


def _pct(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "n/a"
    if a == 0:
        return "n/a" if b == 0 else "new"
    return f"{(b - a) / a * 100:+.0f} %"


def compare_drills(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    size_a = (a.get("config") or {}).get("append_size") or 0
    size_b = (b.get("config") or {}).get("append_size") or 0
    by_b = {m["mode"]: m for m in b.get("modes", [])}
    rows = []
    for ma in a.get("modes", []):
        mb = by_b.get(ma["mode"])
        if mb is None:
            continue
        beyond, why = _beyond_drill(tester_rates(ma, size_a), tester_rates(mb, size_b))
        ta, tb = ma.get("throughput_MBps"), mb.get("throughput_MBps")
        la, lb = (ma.get("fec") or {}).get("lost_on_wan"), (mb.get("fec") or {}).get("lost_on_wan")
        rows.append({"what": ma["mode"], "throughput_MBps": (ta, tb, _pct(ta, tb)),
                     "lost_on_wan_differs": _counts_differ(la, lb),
                     "p50_ms": ((ma.get("latency_ms") or {}).get("p50"), (mb.get("latency_ms") or {}).get("p50")),
                     "lost": (ma.get("lost"), mb.get("lost")), "verdict": (ma.get("verdict"), mb.get("verdict")),
                     "fec_lost_on_wan": ((ma.get("fec") or {}).get("lost_on_wan"), (mb.get("fec") or {}).get("lost_on_wan")),
                     "beyond_spread": beyond, "spread": why})
    return rows


def _counts_differ(a: Any, b: Any) -> bool | None:
    """Two event counts (packets lost on the WAN) differ beyond chance: more than twice the standard
    deviation of their difference if each were Poisson (sqrt(a + b))."""
    if not isinstance(a, int) or not isinstance(b, int) or a + b == 0:
        return None
    return abs(b - a) > 2 * math.sqrt(a + b)


def compare_experiments(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    def cells(res: dict[str, Any]) -> dict[tuple[str, str], list[float]]:
        out: dict[tuple[str, str], list[float]] = {}
        for r in res.get("rows", []):
            key = tuple(f"{k}={r[k]}" for k in res.get("matrix", {}) if k in r)
            v = r.get("throughput_MBps")
            if isinstance(v, int | float) and r.get("verdict") in ("ok", "data-loss"):
                out.setdefault((", ".join(key), r["mode"]), []).append(float(v))
        return out

    ca, cb = cells(a), cells(b)
    rows = []
    for key in sorted(set(ca) & set(cb)):
        va, vb = ca[key], cb[key]
        beyond = max(va) < min(vb) or max(vb) < min(va)
        ma, mb = statistics.median(va), statistics.median(vb)
        rows.append({"what": f"{key[0]} {key[1]}", "throughput_MBps": (ma, mb, _pct(ma, mb)),
                     "beyond_spread": beyond if len(va) > 1 and len(vb) > 1 else None,
                     "spread": f"ranges {min(va):.3g}-{max(va):.3g} vs {min(vb):.3g}-{max(vb):.3g}"
                     if len(va) > 1 and len(vb) > 1 else "one repetition: no spread"})
    return rows


def compare(a_dir: Path, b_dir: Path) -> dict[str, Any]:
    ka, a = load_result(a_dir)
    kb, b = load_result(b_dir)
    if ka != kb:
        raise CompareError(f"{a_dir} is a {ka}, {b_dir} an {kb}; compare two drills or two experiments")
    env = differences(_flat(a.get("environment") or {}), _flat(b.get("environment") or {}))
    spec = differences(_spec_fields(a_dir, ka), _spec_fields(b_dir, kb))
    rows = compare_drills(a, b) if ka == "drill" else compare_experiments(a, b)
    differ = [r["what"] for r in rows if r.get("beyond_spread")]
    differ += [f"{r['what']} (packets lost on the WAN)" for r in rows if r.get("lost_on_wan_differs")]
    return {"kind": ka, "a": str(a_dir), "b": str(b_dir), "spec_differences": spec, "environment_differences": env,
            "rows": rows, "differ": differ}


def render(res: Mapping[str, Any]) -> str:
    lines = [f"A: {res['a']}", f"B: {res['b']}", ""]
    lines.append("what was run differs in:" if res["spec_differences"] else "what was run: the same spec")
    lines += [f"  {k}: {va!r} -> {vb!r}" for k, va, vb in res["spec_differences"]]
    skip = ("measured_at", "calibration", "image", "seconds")
    env = [(k, va, vb) for k, va, vb in res["environment_differences"] if not any(s in k for s in skip)]
    if env:
        lines.append("environment differs in:")
        lines += [f"  {k}: {va!r} -> {vb!r}" for k, va, vb in env]
    lines.append("")
    for r in res["rows"]:
        t = r["throughput_MBps"]
        mark = {True: "DIFFERS", False: "same", None: "?"}[r.get("beyond_spread")]
        extra = ""
        if "lost" in r:
            extra = (f"  p50 {r['p50_ms'][0]} -> {r['p50_ms'][1]} ms  lost {r['lost'][0]} -> {r['lost'][1]}"
                     f"  verdict {r['verdict'][0]} -> {r['verdict'][1]}")
            if any(v is not None for v in r["fec_lost_on_wan"]):
                extra += (f"  lost on WAN {r['fec_lost_on_wan'][0]} -> {r['fec_lost_on_wan'][1]}"
                          + (" (DIFFERS)" if r.get("lost_on_wan_differs") else ""))
        lines.append(f"  {mark:<8} {r['what']:<40} MB/s {t[0]} -> {t[1]} ({t[2]}; {r['spread']}){extra}")
    lines.append("")
    lines.append(f"beyond the spread: {', '.join(res['differ'])}" if res["differ"]
                 else "no difference beyond the spread")
    return "\n".join(lines)
