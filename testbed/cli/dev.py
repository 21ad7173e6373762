"""Tasks: test, bench, lint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from invoke.exceptions import Exit

from testbed.cli.common import for_command, task, user_error

ROOT = Path(__file__).resolve().parents[2]


@task(help={"k": "pytest -k expression", "marker": "unit, netns, vm, or a pytest -m expression",
            "verbose": "pytest -v"})
def test(c, k="", marker="", verbose=False):
    """Run the test suite: unit + netns (as root) + the vm tests that fit CI's budget."""
    # --durations: the slowest tests are named in every run (CI's budget is watched from its output)
    args = [sys.executable, "-m", "pytest", str(ROOT / "tests"), "-q" if not verbose else "-v", "--durations=25"]
    if marker:
        args += ["-m", marker]
    if k:
        args += ["-k", k]
    if os.geteuid() != 0:
        print("note: not root: netns and vm tests are skipped")
    sys.stdout.flush()
    rc = subprocess.run(args, check=False).returncode  # an argv: -k/-m reach pytest as given, no shell
    if rc:
        raise Exit(code=rc if 0 < rc < 256 else 1)


@task
def lint(c):
    """ruff over the project."""
    rc = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], check=False).returncode
    if rc:
        raise Exit(code=rc if 0 < rc < 256 else 1)


BENCHES = ("logstore", "local-drill", "fec", "native", "gateway", "gateway-c", "vm")


@task(positional=["which"], help={"which": f"all, or a comma list of: {', '.join(BENCHES)}",
                                  "cold": "vm: also time a cold image build (mmdebstrap again, about a minute; "
                                          "needs Debian's mirror)"})
def bench(c, which=None, cold=False):
    """Benchmarks; prints one JSON object with the figures (never asserts timings)."""
    if which in ("-h", "--help"):  # invoke hands a flag to an optional positional argument
        print(f"usage: ./inv bench [all | {','.join(BENCHES)}] [--cold]\n\n{bench.__doc__}\n"
              "--cold: the vm benchmark also times a cold image build (reruns mmdebstrap, about a minute)")
        return
    chosen = BENCHES if which in (None, "all") else tuple(w.strip() for w in which.split(","))
    for w in chosen:
        if w not in BENCHES:
            raise user_error(f"bench: unknown benchmark {w!r}; use all or some of {', '.join(BENCHES)}")
    results: dict[str, object] = {}
    with for_command("./inv bench"):  # the vm and drill benchmarks bring testbeds up and down
        for name in chosen:
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            try:
                results[name] = _run_bench(name, cold)
            except ImportError as err:
                results[name] = {"skipped": f"not available yet: {err}"}
    print(json.dumps(results, indent=1))


def _run_bench(name: str, cold: bool = False) -> object:
    if name == "logstore":
        from smfs.bench_logstore import bench_logstore

        with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
            return bench_logstore(Path(tmp))
    if name == "fec":
        from smfs.bench_fec import bench_fec

        return bench_fec()
    if name == "native":  # the FEC codec and the tunnel in C beside Python, one core
        from smfs import native
        from smfs.bench_native import bench_native

        native.build()
        return bench_native()
    if name == "gateway-c":  # a gateway pair in namespaces: Python and C engines beside the bare path
        from testbed.bench.gateway_c import bench_gateway_c
        from testbed.drill.gateways import ensure_c_gateway

        ensure_c_gateway()
        return {f"loss_{loss:g}pct": bench_gateway_c(loss=loss) for loss in (0.0, 0.1, 1.0, 2.0)}
    if name == "local-drill":
        from testbed.bench.drill import bench_local_drill

        return bench_local_drill()
    if name == "gateway":
        from testbed.bench.gateway import bench_gateway

        return bench_gateway()
    if name == "vm":
        from testbed.bench.vm import bench_vm

        return bench_vm(cold=cold, say=lambda msg: print(f"bench: vm: {msg}", file=sys.stderr, flush=True))
    raise AssertionError(name)


TASKS = [test, lint, bench]
