"""`python -m benchmarks`: run every measurement, print a table, write JSON."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from benchmarks import measure, mig, mig_jobs
from benchmarks.stats import Figure, render_table, write_json

DEFAULT_OUT = Path("benchmarks/results/latest.json")


def _suites(quick: bool) -> dict[str, tuple]:
    scale = 10 if quick else 1
    return {
        "allocate": (measure.allocate_latency, 2000 // scale if not quick else 300),
        "preferred": (measure.preferred, 500 // scale),
        "plan": (measure.plan_build, 20 // (2 if quick else 1)),
        "inventory": (measure.inventory_read, 100 // scale),
        "health": (measure.health_propagation, 30 // (3 if quick else 1)),
        "reregister": (measure.reregistration, 20 // (2 if quick else 1)),
        "coldstart": (measure.cold_start, 5 // (5 if quick else 1) or 1),
        "memory": (measure.resident_memory, 10000 // scale),
        "reload": (measure.config_reload, 10 // (2 if quick else 1)),
        "mig-plan": (mig.plan_configs, 20 // (5 if quick else 1)),
        "mig-apply": (mig.apply_full, 10 // (5 if quick else 1)),
        "idle": (measure.idle_cpu, 2 if quick else 6),
        "mig-job": (mig_jobs.reconfiguration_job, 10 // (5 if quick else 1)),
        "mig-file-load": (mig_jobs.allocate_under_mig_files, 2000 // scale),
    }


def _machine(before: tuple[float, ...], after: tuple[float, ...]) -> dict:
    """CPU count and 1-minute load average at start and end: other work skews the figures."""
    cpus = len(os.sched_getaffinity(0))
    load = {"start": round(before[0], 2), "end": round(after[0], 2)}
    text = (
        f"machine: {cpus} CPUs ({platform.processor() or platform.machine()}), Python "
        f"{platform.python_version()}; 1-minute load average {load['start']:.2f} at start, "
        f"{load['end']:.2f} at end"
    )
    return {"cpus": cpus, "load": load, "text": text}


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks (default: all)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure gpushare: pod admission (GetPreferredAllocation, Allocate) over "
        "the unix socket through a kubelet-style Go client, against a minimal Go device plugin "
        "(Python client and no baseline where Go is missing), preferred allocation, build_plan, "
        "read_inventory, health propagation, re-registration, cold start, resident memory, "
        "config reload, idle CPU, MIG plan, MIG apply and a MIG reconfiguration job, on "
        "simulated nodes. Prints a table and writes JSON.",
    )
    parser.add_argument("--only", nargs="*", metavar="NAME",
                        help=f"run only these benchmarks: {', '.join(_suites(False))}")
    parser.add_argument("--quick", action="store_true", help="fewer runs (a smoke check)")
    parser.add_argument(
        "--runs", type=int, metavar="N",
        help="run every chosen measurement N times instead of its default (checks the machinery; "
        "too few for figures)",
    )  # fmt: skip
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_OUT, help=f"output file (default {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)
    suites = _suites(args.quick)
    if args.runs is not None:
        if not 1 <= args.runs <= 100_000:
            parser.error(f"--runs must be between 1 and 100000, got {args.runs}")
        suites = {name: (fn, args.runs) for name, (fn, _) in suites.items()}
    unknown = set(args.only or []) - set(suites)
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {sorted(suites)}")
    figures: list[Figure] = []
    load_before = os.getloadavg()
    for name, (fn, runs) in suites.items():
        if args.only and name not in args.only:
            continue
        t0 = time.monotonic()
        figures += fn(runs)
        print(f"[{name}] done in {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)
    machine = _machine(load_before, os.getloadavg())
    print(machine["text"])
    print(render_table(figures))
    for f in figures:
        if f.detail:
            print(f"  {f.name}: {f.detail}")
    meta = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "quick": args.quick,
        "runs": args.runs,
        "cpus": machine["cpus"],
        "load": machine["load"],
    }
    write_json(figures, args.json, meta)
    print(f"\nwrote {args.json}")
    print(json.dumps({"missed": [f.name for f in figures if f.met is False]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
