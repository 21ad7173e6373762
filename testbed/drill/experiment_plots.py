"""An experiment's report: ``report.md`` and its plots, from the tidy table (``points.csv``'s rows).

Plots (matplotlib, Agg): per-client throughput against the swept field per mode (median, the
repetitions' spread as a bar), append latency (p50 and p99) against it, latency CDFs per point, and
acked appends lost per mode against it. Unfaithful points (calibration off) are drawn hollow and
named under the plot, never silently mixed with the rest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen
from matplotlib import ticker  # noqa: E402

from testbed.drill.experiment import Experiment, num, point_id, point_label, truthy  # noqa: E402
from testbed.drill.plots import latencies  # noqa: E402


def _x(exp: Experiment) -> tuple[str, list[str]]:
    """The x axis: the swept field and the tick label of each point (other fields in brackets)."""
    swept = exp.swept or ""
    labels = []
    for p in exp.points():
        others = [f"{k.split('.')[-1]} {v}" for k, v in p.items() if k != swept and len(exp.matrix[k]) > 1]
        labels.append(str(p.get(swept)) + (f"\n({', '.join(others)})" if others else ""))
    return swept, labels


def _series(rows: Sequence[Mapping[str, Any]], exp: Experiment, mode: str, metric: str, agg: str = "median"
            ) -> list[tuple[float | None, float | None, float | None, bool]]:
    """Per point: (aggregate, low, high, faithful) of ``metric`` for ``mode`` over the repetitions with a verdict."""
    import statistics

    out = []
    for i, _p in enumerate(exp.points()):
        mine = [r for r in rows if r.get("point") == i and r.get("mode") == mode
                and r.get("verdict") in ("ok", "data-loss")]
        vals = [v for r in mine if (v := num(r.get(metric))) is not None]
        faithful = all(truthy(r.get("faithful")) for r in mine) if mine else True
        if not vals:
            out.append((None, None, None, faithful))
            continue
        mid = statistics.median(vals) if agg == "median" else sum(vals)
        out.append((mid, min(vals) if agg == "median" else mid, max(vals) if agg == "median" else mid, faithful))
    return out


def _line_plot(path: Path, exp: Experiment, rows: Sequence[Mapping[str, Any]], metric: str, ylabel: str, title: str,
               agg: str = "median", log: bool = False) -> Path:
    swept, labels = _x(exp)
    fig, ax = plt.subplots(figsize=(7.5, 4))
    xs = list(range(len(labels)))
    for mode in exp.modes:
        s = _series(rows, exp, mode, metric, agg)
        pts = [(x, m, lo, hi, f) for x, (m, lo, hi, f) in zip(xs, s, strict=True) if m is not None]
        if not pts:
            continue
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                    yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]], fmt="none", ecolor=line.get_color(),
                    capsize=3)
        bad = [p for p in pts if not p[4]]
        if bad:
            ax.scatter([p[0] for p in bad], [p[1] for p in bad], s=90, facecolors="white", edgecolors="red", zorder=3)
    ax.set_xticks(xs, labels)
    ax.set_xlabel(swept)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _cdf_plot(path: Path, exp: Experiment, out: Path) -> Path | None:
    """Append latency CDFs, one panel per point, one line per mode (the first repetition's ledger)."""
    points = exp.points()
    n = len(points)
    cols = min(3, n)
    rows_n = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.2 * rows_n), squeeze=False)
    drew = False
    for i, p in enumerate(points):
        ax = axes[i // cols][i % cols]
        for mode in exp.modes:
            lat = latencies(out / "runs" / point_id(i, p) / "rep0" / mode)
            if lat:
                ax.plot(lat, [(k + 1) / len(lat) for k in range(len(lat))], label=mode)
                drew = True
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(point_label(p), fontsize=8)
        ax.set_xlabel("append latency (ms)", fontsize=8)
        ax.grid(alpha=0.3)
    for j in range(n, rows_n * cols):
        axes[j // cols][j % cols].axis("off")
    if not drew:
        plt.close(fig)
        return None
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(result: Mapping[str, Any], exp: Experiment, out: Path) -> list[Path]:
    rows = result.get("rows", [])
    files = [_line_plot(out / "throughput.png", exp, rows, "throughput_per_tester_MBps", "MB/s per tester (client)",
                        f"{exp.title}\nthroughput per client (median, spread of {exp.repetitions} repetitions)")]
    if "latency" in exp.figures or "loss" not in exp.figures:
        files.append(_line_plot(out / "latency.png", exp, rows, "latency_p50_ms", "append latency p50 (ms)",
                                f"{exp.title}\nappend latency, median of p50 over repetitions", log=True))
        cdf = _cdf_plot(out / "latency-cdf.png", exp, out)
        if cdf:
            files.append(cdf)
    if "loss" in exp.figures:
        files.append(_line_plot(out / "lost.png", exp, rows, "lost", "acked appends lost (sum over repetitions)",
                                f"{exp.title}\nacked appends lost in the disaster", agg="sum"))
    return files


def report_md(result: Mapping[str, Any], exp: Experiment, plots: Sequence[Path]) -> str:
    rows = result.get("rows", [])
    lines = [f"# Experiment {exp.name}{' (quick)' if exp.quick else ''}: {exp.title}", "",
             f"File `{exp.path.name}`, base spec `{exp.spec_path.name}`, modes {', '.join(exp.modes)}, "
             f"{exp.repetitions} repetition(s), {len(exp.points())} point(s).", ""]
    if exp.set:
        lines += ["Set for every point: " + ", ".join(f"`{k} = {v}`" for k, v in exp.set.items()), ""]
    lines += ["## Claims", ""]
    for j in result.get("claims", []):
        lines.append(f"- **{j['verdict']}** — {j['claim']}: {j['detail']}")
    if not result.get("claims"):
        lines.append("- (the file states no claims)")
    lines += ["", "## Medians per point", ""]
    metrics = [("throughput_per_tester_MBps", "MB/s per tester"), ("latency_p50_ms", "p50 ms"),
               ("latency_p99_ms", "p99 ms"), ("lost", "lost (sum)")]
    head = ["point", "mode"] + [m[1] for m in metrics] + ["verdicts", "faithful"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, p in enumerate(exp.points()):
        for mode in exp.modes:
            mine = [r for r in rows if r.get("point") == i and r.get("mode") == mode]
            if not mine:
                continue
            cells = [point_label(p), mode]
            for metric, _name in metrics:
                s = _series(rows, exp, mode, metric, "sum" if metric == "lost" else "median")[i]
                cells.append("n/a" if s[0] is None else f"{s[0]:.3g}")
            cells.append(", ".join(str(r.get("verdict")) for r in mine))
            faithful = all(truthy(r.get("faithful")) for r in mine)
            cells.append("yes" if faithful else "NO: " + str(mine[0].get("note", "")))
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", "Every run's full record: `runs/<point>/<mode>-<rep>.json`; the table: `points.csv`."]
    return "\n".join(lines) + "\n"


def write_experiment_report(result: Mapping[str, Any], exp: Experiment, out: Path) -> list[Path]:
    plots = write_plots(result, exp, out)
    (out / "report.md").write_text(report_md(result, exp, plots))
    return plots
