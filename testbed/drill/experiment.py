"""Experiments: a parameter sweep over the drill, from one snapshot, judged against the paper's claims.

An experiment file (``experiments/*.toml``) names a base spec, the fields it sets for every point
(``[set]``), the fields it sweeps (``[matrix]``: the points are their cartesian product, in file
order), the modes, the repetitions, and the claims to judge on the curves (``[[claims]]``). A
``[quick]`` table overrides any of these for ``--quick`` (the same figure, fewer points and shorter
runs). Every point's spec is built and validated before anything boots, so a typo costs nothing.

The testbed comes up once (snapshot ``ready``); each point × mode × repetition restores it, reshapes
the WAN live when the point's WAN differs from the snapshot's, restarts the gateways and the mirror
site when their command lines differ (FEC parameters, the WAN's rate and delay size the gateway's
pacing and edge queue), runs the drill's recipe (:func:`testbed.drill.runner.run_mode`) and records one
row of the tidy table. A point whose calibration is off by more than its tolerance, or whose a→b
rate the guests and the path cannot carry (a paced UDP stream at the rate, :func:`netem.calibrate.rate_rows`),
is marked ``faithful = false`` and left out of the judgments (never silently plotted as if it were right).

Results: ``experiment.json`` (everything), ``points.csv`` (one row per point × mode × repetition),
``report.md`` (each claim: agrees / DISAGREES / not judged, with the numbers) and plots. An
interrupted experiment is resumed with ``--resume DIR``: every finished run is kept in
``DIR/runs/<point>/<mode>-<rep>.json`` and skipped.
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import math
import statistics
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smfs.units import show
from testbed.errors import UserError
from testbed.progress import Say

if TYPE_CHECKING:  # testbed.vm.bed loads libvirt; the drill imports it where it brings the testbed up
    from testbed.vm.bed import VmTestbed

ROOT = Path(__file__).resolve().parents[2]

SWEEPABLE_TABLES = ("wan", "workload", "fec", "faults")
"""Spec tables a matrix or ``[set]`` may change between points: they need no new testbed (the WAN is
reshaped live, the rest is the drill's configuration). ``testbed`` and ``sites`` need a new testbed."""
WAN_KEYS = ("delay", "jitter", "loss", "rate", "limit", "ge_p", "ge_r", "ge_loss_bad", "ge_loss_good")
CLAIM_KINDS = ("flat", "falls", "rises", "above", "zero", "positive")
METRICS = ("throughput_MBps", "throughput_per_tester_MBps", "latency_p50_ms", "latency_p99_ms", "acked", "lost",
           "repairs_per_data")
MAX_POINTS = 64
MAX_REPETITIONS = 20
TOP_KEYS = {"name", "title", "spec", "modes", "repetitions", "set", "matrix", "claims", "quick", "figures"}
QUICK_KEYS = {"modes", "repetitions", "set", "matrix"}
CLAIM_KEYS = {"claim", "kind", "mode", "than", "metric", "tolerance", "factor", "margin", "where"}


SEEDS = {
    "testers": None, "faults": None, "wan_loss": None,
    "why": "nothing the testbed controls is random: the testers' payloads and the fault schedules are "
           "deterministic; the WAN's loss is drawn by netem in the guest kernel (6.1), which takes no seed, "
           "so a replay repeats the spec and the schedule, not the individual losses",
}
"""The random seeds an experiment could record (``./inv replay`` reuses them): none to record today."""


class ExperimentError(UserError, ValueError):
    """The experiment file is wrong (the message names the field and the fix)."""


@dataclass(frozen=True)
class Claim:
    """One statement of the paper, judged on the table's per-point medians.

    - ``flat``: ``metric`` of ``mode`` varies by at most ``tolerance`` (max/min − 1) over the points.
    - ``falls`` / ``rises``: ``metric`` of ``mode`` at the last point is at most 1/``factor`` (falls)
      or at least ``factor`` (rises) times its value at the first point.
    - ``above``: ``metric`` of ``mode`` is at least (1 + ``margin``) × that of ``than`` at every point.
    - ``zero`` / ``positive``: ``metric`` (summed over repetitions) of ``mode`` is 0 / above 0 at every
      point in ``where``.
    ``where`` (a table ``{field = [values]}``) restricts the points judged; by default all of them."""

    text: str
    kind: str
    mode: str
    metric: str = "throughput_MBps"
    than: str | None = None
    tolerance: float = 0.1
    factor: float = 2.0
    margin: float = 0.0
    where: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    path: Path
    spec_path: Path
    modes: tuple[str, ...]
    repetitions: int
    set: Mapping[str, Any]
    matrix: Mapping[str, tuple[Any, ...]]
    claims: tuple[Claim, ...]
    quick: bool = False
    figures: tuple[str, ...] = ("throughput",)

    def points(self) -> list[dict[str, Any]]:
        """The matrix's cartesian product, first key slowest: ``[{field: value}, ...]``."""
        keys = list(self.matrix)
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(self.matrix[k] for k in keys))]

    @property
    def swept(self) -> str | None:
        """The field on the plots' x axis: the matrix's last field with more than one value."""
        multi = [k for k, v in self.matrix.items() if len(v) > 1]
        return multi[-1] if multi else (next(iter(self.matrix), None))


def load(path: str | Path, quick: bool = False) -> Experiment:
    """Read and validate an experiment file; every point's spec is built once here (a bad value is a
    one-line :class:`ExperimentError` naming the field before anything boots)."""
    from smfs.modes import parse_mode

    p = Path(path)
    shown = show(str(p), limit=200)
    if not p.is_file():
        raise ExperimentError(f"experiment file {shown}: not found (or not a file); pass e.g. experiments/latency.toml")
    try:
        data = tomllib.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ExperimentError(f"{shown}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as err:
        raise ExperimentError(f"{shown}: not valid TOML ({err}); fix the syntax") from None
    _known(data, "", TOP_KEYS)
    if quick:
        q = data.get("quick", {})
        if not isinstance(q, Mapping):
            raise ExperimentError(f"{shown}: quick: must be a table ([quick]) of {', '.join(sorted(QUICK_KEYS))}")
        _known(q, "quick.", QUICK_KEYS)
        data = {**data, **{k: v for k, v in q.items() if k not in ("set", "matrix")},
                "set": {**data.get("set", {}), **q.get("set", {})},
                "matrix": {**data.get("matrix", {}), **q.get("matrix", {})}}
    name = data.get("name", p.stem)
    if not isinstance(name, str) or not name.replace("-", "").isalnum() or len(name) > 40:
        raise ExperimentError(f"name: {show(name)} must be 1-40 letters, digits or '-', e.g. \"latency\"")
    spec_rel = data.get("spec", "specs/default.toml")
    if not isinstance(spec_rel, str):
        raise ExperimentError(f"spec: {show(spec_rel)} is not a path; e.g. spec = \"specs/default.toml\"")
    spec_path = Path(spec_rel) if Path(spec_rel).is_absolute() else (ROOT / spec_rel)
    modes_raw = data.get("modes", ["local-sync", "local-sync+fec", "remote-sync", "remote-sync+fec", "network-sync"])
    if not isinstance(modes_raw, list) or not modes_raw or not all(isinstance(m, str) for m in modes_raw):
        raise ExperimentError("modes: must be a list of mode names, e.g. [\"remote-sync\", \"network-sync\"]")
    modes = []
    for i, m in enumerate(modes_raw):
        try:
            modes.append(parse_mode(m).name)
        except ValueError as err:
            raise ExperimentError(f"modes[{i}]: {err}") from None
    if len(set(modes)) != len(modes):
        raise ExperimentError("modes: a mode appears twice; give each mode once")
    reps = data.get("repetitions", 1)
    if not isinstance(reps, int) or isinstance(reps, bool) or not 1 <= reps <= MAX_REPETITIONS:
        raise ExperimentError(f"repetitions: {show(reps)} must be a whole number from 1 to {MAX_REPETITIONS}")
    sets = _fields(data.get("set", {}), "set", lists=False)
    matrix = {k: tuple(v) for k, v in _fields(data.get("matrix", {}), "matrix", lists=True).items()}
    if not matrix:
        raise ExperimentError("matrix: empty; sweep at least one field, e.g. [matrix] \"wan.delay\" = [\"25ms\", \"50ms\"]")
    both = sorted(set(sets) & set(matrix))
    if both:
        raise ExperimentError(f"set.{both[0]}: also in [matrix]; a field is either set for every point or swept")
    n_points = math.prod(len(v) for v in matrix.values())
    if n_points > MAX_POINTS:
        raise ExperimentError(f"matrix: {n_points} points, more than {MAX_POINTS}; sweep fewer values")
    figures = data.get("figures", ["throughput"])
    if not isinstance(figures, list) or not all(f in ("throughput", "latency", "loss") for f in figures):
        raise ExperimentError("figures: a list of throughput, latency, loss; e.g. figures = [\"throughput\", \"latency\"]")
    exp = Experiment(name=name, title=str(data.get("title", name)), path=p, spec_path=spec_path, modes=tuple(modes),
                     repetitions=reps, set=sets, matrix=matrix, claims=(), quick=quick, figures=tuple(figures))
    claims = tuple(_claim(c, i, exp) for i, c in enumerate(_list(data.get("claims", []), "claims")))
    exp = replace(exp, claims=claims)
    _spec(exp, exp.set, "set")  # the spec file and [set] are valid
    for point in exp.points():
        point_spec(exp, point)  # and so is every point
    return exp


def _known(raw: Mapping[str, Any], prefix: str, keys: set[str]) -> None:
    unknown = sorted(str(k) for k in raw if k not in keys)
    if unknown:
        raise ExperimentError(f"{prefix}{unknown[0]}: unknown field; use one of {', '.join(sorted(keys))}")


def _list(raw: Any, where: str) -> list[Any]:
    if not isinstance(raw, list):
        raise ExperimentError(f"{where}: must be a list ([[{where}]] tables)")
    return raw


def _fields(raw: Any, where: str, lists: bool) -> dict[str, Any]:
    """``{"table.field": value}`` (``lists``: a non-empty list of values) of sweepable spec fields."""
    if not isinstance(raw, Mapping):
        raise ExperimentError(f"{where}: must be a table of \"table.field\" = value, e.g. \"wan.loss\" = \"1%\"")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        table, _, name = str(key).partition(".")
        if table not in SWEEPABLE_TABLES or not name or "." in name:
            raise ExperimentError(f"{where}.{key}: not a sweepable field; use \"table.field\" with table one of "
                                  f"{', '.join(SWEEPABLE_TABLES)} (testbed and sites need a new testbed)")
        if table == "wan" and name not in WAN_KEYS:
            raise ExperimentError(f"{where}.{key}: unknown WAN field; use one of {', '.join(WAN_KEYS)}")
        if lists:
            if not isinstance(value, list) or not value:
                raise ExperimentError(f"{where}.{key}: must be a non-empty list of values, e.g. [\"0%\", \"1%\"]")
            if len({json.dumps(v) for v in value}) != len(value):
                raise ExperimentError(f"{where}.{key}: a value appears twice; give each value once")
        out[str(key)] = value
    return out


def _claim(raw: Any, i: int, exp: Experiment) -> Claim:
    where = f"claims[{i}]"
    if not isinstance(raw, Mapping):
        raise ExperimentError(f"{where}: must be a table ([[claims]]) with claim, kind, mode")
    _known(raw, f"{where}.", CLAIM_KEYS)
    kind = raw.get("kind")
    if kind not in CLAIM_KINDS:
        raise ExperimentError(f"{where}.kind: {show(kind)} is not one of {', '.join(CLAIM_KINDS)}")
    text = raw.get("claim")
    if not isinstance(text, str) or not text:
        raise ExperimentError(f"{where}.claim: missing; say the claim in words, as the paper does")
    for key in ("mode", "than"):
        m = raw.get(key)
        if key == "than" and m is None and kind != "above":
            continue
        if m not in exp.modes:
            raise ExperimentError(f"{where}.{key}: {show(m)} is not one of the experiment's modes ({', '.join(exp.modes)})")
    metric = raw.get("metric", "throughput_MBps")
    if metric not in METRICS:
        raise ExperimentError(f"{where}.metric: {show(metric)} is not one of {', '.join(METRICS)}")
    nums = {}
    for key, default, low in (("tolerance", 0.1, 0.0), ("factor", 2.0, 1.0), ("margin", 0.0, -1.0)):
        v = raw.get(key, default)
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or v < low:
            raise ExperimentError(f"{where}.{key}: {show(v)} must be a number of at least {low:g}")
        nums[key] = float(v)
    where_raw = raw.get("where", {})
    if not isinstance(where_raw, Mapping):
        raise ExperimentError(f"{where}.where: must be a table {{\"table.field\" = [values]}}")
    restrict: dict[str, tuple[Any, ...]] = {}
    for k, vals in where_raw.items():
        if k not in exp.matrix:
            raise ExperimentError(f"{where}.where.{k}: not a matrix field ({', '.join(exp.matrix)})")
        vals = vals if isinstance(vals, list) else [vals]
        restrict[k] = tuple(vals)
    return Claim(text=text, kind=kind, mode=raw["mode"], metric=metric, than=raw.get("than"), where=restrict, **nums)


# --- specs per point ----------------------------------------------------------------------------


def _raw_spec(exp: Experiment) -> dict[str, Any]:
    from testbed.spec import SpecError
    from testbed.spec import load as load_spec

    try:
        return copy.deepcopy(_thaw(load_spec(exp.spec_path).raw))
    except SpecError as err:
        raise ExperimentError(f"spec: {err}") from None


def _thaw(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _thaw(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_thaw(v) for v in obj]
    return obj


def _with(raw: dict[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` with the dotted ``fields`` set; the value ``"none"`` removes a field (e.g. ``"wan.rate" = "none"``:
    no rate limit, whatever the base spec says)."""
    out = copy.deepcopy(raw)
    for key, value in fields.items():
        table, _, name = key.partition(".")
        if value == "none":
            out.get(table, {}).pop(name, None)
        else:
            out.setdefault(table, {})[name] = value
    return out


def _spec(exp: Experiment, fields: Mapping[str, Any], what: str) -> Any:
    from testbed.spec import SpecError, from_mapping

    try:
        return from_mapping(_with(_raw_spec(exp), fields), path=str(exp.spec_path),
                            default_name=exp.spec_path.stem)
    except SpecError as err:
        raise ExperimentError(f"{what}: {err}") from None


def base_spec(exp: Experiment) -> Any:
    """The spec the testbed comes up with: the base spec with ``[set]`` (and the first point, so the
    snapshot is taken in the first point's shape)."""
    return point_spec(exp, exp.points()[0])


def point_spec(exp: Experiment, point: Mapping[str, Any]) -> Any:
    return _spec(exp, {**exp.set, **point}, "matrix point " + point_label(point))


def point_label(point: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} = {v}" for k, v in point.items())


def point_id(i: int, point: Mapping[str, Any]) -> str:
    """A folder name for a point: its index and values, file-system safe."""
    text = "_".join(f"{k.split('.')[-1]}-{v}" for k, v in point.items())
    safe = "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in text.replace("%", "pct"))
    return f"p{i:02d}_{safe}"[:80]


# --- tidy rows ----------------------------------------------------------------------------------


def row_of(entry: Mapping[str, Any], exp: Experiment, i: int, point: Mapping[str, Any], rep: int, testers: int,
           calibration: Mapping[str, Any] | None) -> dict[str, Any]:
    """One run (a point × mode × repetition) as a row of the tidy table."""
    lat = entry.get("latency_ms") or {}
    fec = entry.get("fec") or {}
    prim = ((fec.get("sites") or {}).get("primary") or {})
    data = prim.get("packets_out")
    faithful, why = faithfulness(calibration)
    tput = entry.get("throughput_MBps")
    return {
        "experiment": exp.name, "point": i, **{k: point[k] for k in point}, "mode": entry.get("mode"), "rep": rep,
        "verdict": entry.get("verdict"), "throughput_MBps": tput,
        "throughput_per_tester_MBps": round(tput / testers, 3) if isinstance(tput, int | float) and testers else None,
        "latency_p50_ms": lat.get("p50"), "latency_p99_ms": lat.get("p99"), "acked": entry.get("acked"),
        "lost": entry.get("lost"),
        "repairs_per_data": round(prim["repairs_sent"] / data, 3) if data and "repairs_sent" in prim else None,
        "calib_rtt_ms": _measured(calibration, "rtt_median_ms"), "calib_loss_pct": _measured(calibration, "loss_pct"),
        "calib_rate_Mbps": _row_measured(calibration, "rate a→b"), "faithful": faithful, "note": why or (entry.get("error") or ""),
    }


def _measured(cal: Mapping[str, Any] | None, key: str) -> float | None:
    v = ((cal or {}).get("measured") or {}).get(key)
    return round(v, 3) if isinstance(v, int | float) and math.isfinite(v) else None


def _row_measured(cal: Mapping[str, Any] | None, metric: str) -> float | None:
    """The measured figure of the calibration row ``metric`` (e.g. ``rate a→b``), or None when there is none."""
    for r in (cal or {}).get("rows", []):
        if r.get("metric") == metric:
            v = r.get("measured")
            return round(v, 3) if isinstance(v, int | float) and math.isfinite(v) else None
    return None


def faithfulness(cal: Mapping[str, Any] | None) -> tuple[bool, str]:
    """Did the point's calibration land within its tolerances? A row that was measured and is off
    (``ok`` false) makes the point unfaithful: it is kept in the table and left out of the claims.
    The note names every row that is off, with its own note (a one-sided bound such as the rate's
    ``needs ≥ 900 Mbit/s`` has no ± tolerance, and why a rate fell short is in its note)."""
    if cal is None:
        return True, "not calibrated"
    if cal.get("error"):
        return False, f"calibration failed: {cal['error']}"
    off = [r for r in cal.get("rows", []) if r.get("ok") is False]
    if off:
        parts = []
        for r in off:
            tol = "" if r.get("tolerance") is None else f" ± {r.get('tolerance')}"
            why = f" ({r['note']})" if r.get("note") else ""
            parts.append(f"{r.get('metric')} measured {r.get('measured')} {r.get('unit', '')}, "
                         f"configured {r.get('configured')}{tol}{why}")
        return False, "calibration off: " + "; ".join(parts)
    return True, ""


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})


# --- claims -------------------------------------------------------------------------------------


def num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def curve(rows: Sequence[Mapping[str, Any]], exp: Experiment, mode: str, metric: str,
          where: Mapping[str, tuple[Any, ...]] | None = None, agg: str = "median"
          ) -> list[tuple[int, dict[str, Any], float | None, list[float]]]:
    """Per point (in matrix order): ``(index, point, aggregate, values)`` of ``metric`` for ``mode`` over
    the faithful repetitions with a known verdict. ``agg`` is ``median`` or ``sum``."""
    out = []
    for i, point in enumerate(exp.points()):
        if where and any(point.get(k) not in vals for k, vals in where.items()):
            continue
        vals = [v for r in rows
                if r.get("point") == i and r.get("mode") == mode and truthy(r.get("faithful"))
                and r.get("verdict") in ("ok", "data-loss") and (v := num(r.get(metric))) is not None]
        agg_v = (statistics.median(vals) if agg == "median" else sum(vals)) if vals else None
        out.append((i, point, agg_v, vals))
    return out


def truthy(v: Any) -> bool:
    return v is True or str(v).lower() == "true"


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else (f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}")


def judge(claim: Claim, rows: Sequence[Mapping[str, Any]], exp: Experiment) -> dict[str, Any]:
    """``{"claim", "verdict": agrees | DISAGREES | not judged, "detail"}`` for one claim on the table."""
    agg = "sum" if claim.kind in ("zero", "positive") else "median"
    pts = curve(rows, exp, claim.mode, claim.metric, claim.where, agg)
    known = [(i, p, v) for i, p, v, _ in pts if v is not None]
    missing = [point_label(p) for _i, p, v, _ in pts if v is None]
    res: dict[str, Any] = {"claim": claim.text, "kind": claim.kind, "mode": claim.mode, "metric": claim.metric}

    def out(ok: bool | None, detail: str) -> dict[str, Any]:
        res["verdict"] = "not judged" if ok is None else ("agrees" if ok else "DISAGREES")
        res["detail"] = detail + (f" (no faithful value at {'; '.join(missing)})" if missing and ok is not None else "")
        return res

    if claim.kind in ("zero", "positive"):
        if not known:
            return out(None, "no faithful run with a verdict")
        vals = ", ".join(f"{_label_x(exp, p)}: {_fmt(v)}" for _i, p, v in known)
        ok = all(v == 0 for _i, _p, v in known) if claim.kind == "zero" else all(v > 0 for _i, _p, v in known)
        return out(ok, f"{claim.mode} {claim.metric} {vals}")
    if claim.kind == "above":
        other = {i: v for i, _p, v, _ in curve(rows, exp, claim.than or "", claim.metric, claim.where, agg)
                 if v is not None}
        pairs = [(p, v, other[i]) for i, p, v in known if i in other]
        if not pairs:
            return out(None, f"no point where both {claim.mode} and {claim.than} have a faithful value")
        worst = min(pairs, key=lambda t: (t[1] / t[2]) if t[2] else math.inf)
        ok = all(v >= (1 + claim.margin) * o for _p, v, o in pairs)
        ratio = worst[1] / worst[2] if worst[2] else math.inf
        return out(ok, f"{claim.mode} / {claim.than} {claim.metric}: lowest ratio {_fmt(ratio)} at "
                       f"{_label_x(exp, worst[0])} ({_fmt(worst[1])} vs {_fmt(worst[2])}; needs ≥ {1 + claim.margin:g})")
    if len(known) < 2:
        return out(None, f"needs at least 2 points with a faithful value of {claim.mode} {claim.metric}")
    vals = [v for _i, _p, v in known]
    series = ", ".join(f"{_label_x(exp, p)}: {_fmt(v)}" for _i, p, v in known)
    if claim.kind == "flat":
        lo, hi = min(vals), max(vals)
        spread = (hi / lo - 1) if lo > 0 else (0.0 if hi == 0 else math.inf)
        return out(spread <= claim.tolerance, f"{claim.mode} {claim.metric} varies by {spread * 100:.0f} % "
                                              f"(≤ {claim.tolerance * 100:.0f} % claimed): {series}")
    first, last = vals[0], vals[-1]
    if claim.kind == "falls":
        ratio = first / last if last > 0 else math.inf
        return out(ratio >= claim.factor, f"{claim.mode} {claim.metric} falls {_fmt(ratio)}× from first to last point "
                                          f"(≥ {claim.factor:g}× claimed): {series}")
    ratio = last / first if first > 0 else math.inf
    return out(ratio >= claim.factor, f"{claim.mode} {claim.metric} rises {_fmt(ratio)}× from first to last point "
                                      f"(≥ {claim.factor:g}× claimed): {series}")


def _label_x(exp: Experiment, point: Mapping[str, Any]) -> str:
    x = exp.swept
    return f"{x.split('.')[-1]} {point.get(x)}" if x and len(exp.matrix) == 1 else point_label(point)


def judge_all(exp: Experiment, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [judge(c, rows, exp) for c in exp.claims]


# --- the run ------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What is left to run, for the progress line's ETA."""

    total: int
    done: int = 0
    t0: float = field(default_factory=time.monotonic)
    ran: int = 0

    def eta(self) -> str:
        if not self.ran:
            return "ETA after the first run"
        per = (time.monotonic() - self.t0) / self.ran
        left = (self.total - self.done) * per
        return f"ETA {int(left // 60)} min {int(left % 60):02d} s"


def run_experiment(exp: Experiment, out: Path, keep: bool = False, resume: bool = False, say: Say = print,
                   report: Callable[[dict[str, Any], Experiment, Path], Any] | None = None) -> dict[str, Any]:
    """Run every point × mode × repetition from one snapshot; returns ``experiment.json``'s content.
    ``report(result, exp, out)`` then writes the report and plots (the CLI passes
    :func:`testbed.drill.experiment_plots.write_experiment_report`, which imports this module)."""
    from smfs.modes import parse_mode
    from testbed.drill.faults import Timeline
    from testbed.drill.vm import DrillConfig, with_testbed

    if out.exists() and not resume and any(out.iterdir()):
        raise ExperimentError(f"--out {out}: exists and is not empty; pick a new folder, or --resume {out}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(exist_ok=True)
    header = out / "experiment-file.toml"
    if resume and header.exists() and header.read_bytes() != exp.path.read_bytes():
        raise ExperimentError(f"--resume {out}: it ran another version of {exp.path.name}; resume with the same "
                              "file, or start a new folder")
    header.write_bytes(exp.path.read_bytes())
    modes = tuple(parse_mode(m) for m in exp.modes)
    points = exp.points()
    base = base_spec(exp)
    base_cfg = DrillConfig.from_spec(base, modes, out / "runs")
    plan = Plan(total=len(points) * len(modes) * exp.repetitions)
    rows: list[dict[str, Any]] = []
    calibrations: dict[str, Any] = {}
    tl = Timeline(say=say)

    def body(tb: VmTestbed) -> None:
        for i, point in enumerate(points):
            pid = point_id(i, point)
            pdir = out / "runs" / pid
            pdir.mkdir(parents=True, exist_ok=True)
            spec = point_spec(exp, point)
            cfg = DrillConfig.from_spec(spec, modes, pdir)
            cal = _point_calibration(tb, cfg, pdir, say, i, point, len(points))
            calibrations[pid] = cal
            for rep in range(exp.repetitions):
                for mode in modes:
                    done_file = pdir / f"{mode.name}-{rep}.json"
                    if done_file.exists():
                        entry = json.loads(done_file.read_text())
                        plan.done += 1
                        say(f"[{plan.done}/{plan.total}] {pid} {mode.name} rep {rep}: done before (resumed)")
                    else:
                        run_cfg = replace(cfg, out=pdir / f"rep{rep}")
                        say(f"[{plan.done + 1}/{plan.total}] {point_label(point)}: {mode.name}, repetition "
                            f"{rep + 1}/{exp.repetitions} ({plan.eta()})")
                        entry = _run_one(tb, run_cfg, mode, say)
                        done_file.write_text(json.dumps(entry, default=str))
                        plan.done += 1
                        plan.ran += 1
                    rows.append(row_of(entry, exp, i, point, rep, cfg.testers, cal))
                    write_csv(rows, out / "points.csv")  # a partial table survives an interruption

    facts = with_testbed(base, base_cfg, out, keep, say, body, tl)
    wan_facts = {k: v for k, v in facts.items() if k != "tb"}
    judgments = judge_all(exp, rows)
    result = {
        "experiment": exp.name, "title": exp.title, "file": str(exp.path), "quick": exp.quick,
        "spec": str(exp.spec_path), "modes": list(exp.modes), "repetitions": exp.repetitions,
        "set": dict(exp.set), "matrix": {k: list(v) for k, v in exp.matrix.items()}, "swept": exp.swept,
        "points": [{"id": point_id(i, p), **p, "calibration": calibrations.get(point_id(i, p))}
                   for i, p in enumerate(points)],
        "snapshot_wan": wan_facts.get("shaped"), "claims": judgments, "rows": rows, "seeds": SEEDS,
        "setup_timeline": tl.events,
    }
    write_csv(rows, out / "points.csv")
    (out / "experiment.json").write_text(json.dumps(result, indent=1, default=str))
    if report is not None:  # the caller's (testbed.drill.experiment_plots.write_experiment_report: it imports this module)
        try:
            report(result, exp, out)
        except Exception as err:  # noqa: BLE001 - the table and judgments stand without the plots
            say(f"report: plots failed: {err}")
    say("\n" + claims_text(judgments))
    say(f"\nexperiment {exp.name}: {len(rows)} runs; table {out / 'points.csv'}, report {out / 'report.md'}")
    return result


def claims_text(judgments: Sequence[Mapping[str, Any]]) -> str:
    if not judgments:
        return "no claims to judge"
    return "against the paper:\n" + "\n".join(
        f"  {j['verdict']:<10} {j['claim']}: {j['detail']}" for j in judgments)


def _point_calibration(tb: VmTestbed, cfg: Any, pdir: Path, say: Say, i: int, point: Mapping[str, Any], n: int
                       ) -> dict[str, Any] | None:
    """The point's WAN, calibrated once (from snapshot ``ready``, reshaped): kept in ``calibration.json``
    (and reused on resume)."""
    from testbed.drill.vm import DRILL_PROBES, SNAPSHOT
    from testbed.vm import wan

    path = pdir / "calibration.json"
    if path.exists():
        return json.loads(path.read_text())
    from netem.calibrate import RATE_SECONDS, probes_for_profile

    say(f"point {i + 1}/{n} ({point_label(point)}): restoring {SNAPSHOT!r}, shaping {cfg.wan.describe()}, calibrating")
    # a point with an a→b rate also sends a paced UDP stream at it: a rate this host's guests or path
    # cannot carry (the paper's 1 Gbit/s under TCG) is then marked, not plotted as if it were the link
    rate_seconds = RATE_SECONDS if cfg.wan.a_to_b.rate_bps else 0.0
    try:
        tb.restore(SNAPSHOT, say=lambda _m: None)
        wan.shape(tb, cfg.wan)
        cal = wan.calibrate(tb, cfg.wan, probes=min(probes_for_profile(cfg.wan), DRILL_PROBES),
                            rate_seconds=rate_seconds)
    except Exception as err:  # noqa: BLE001 - the point is then marked unfaithful, never guessed
        cal = {"error": f"{type(err).__name__}: {err}"}
    path.write_text(json.dumps(cal, indent=1, default=str))
    ok, why = faithfulness(cal)
    rate = _row_measured(cal, "rate a→b")
    say(f"point {i + 1}/{n}: {'calibrated' if ok else 'NOT FAITHFUL: ' + why}"
        + (f" (RTT median {_measured(cal, 'rtt_median_ms')} ms, loss {_measured(cal, 'loss_pct')} %"
           + (f", rate a→b {rate} Mbit/s" if rate is not None else "") + ")" if ok else ""))
    return cal


def _run_one(tb: VmTestbed, cfg: Any, mode: Any, say: Say) -> dict[str, Any]:
    from testbed.drill.vm import run_mode

    cfg.out.mkdir(parents=True, exist_ok=True)
    entry = run_mode(tb, cfg, mode, say)
    entry.pop("logs", None)  # per-log rows stay in the run's own mode.json
    return entry
