"""`gpushare` command line: run | plan | demo | mig … | sim …

Each sub-command lives in its own module with a `register(subparsers)` function that adds its
parser and sets `func`, a callable taking the parsed arguments and returning the exit status.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

DESCRIPTION = """\
gpushare: GPU sharing manager for Kubernetes nodes.

Reads the node's GPUs through NVML, turns them into virtual devices (time-slicing replicas,
MPS replicas with per-client limits, MIG partitions) as a config file says, and serves them
to the kubelet as device plugin resources, keeping every virtual device's health true to its
physical parent.
"""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command registered."""
    from plugin.cli import mig, plan, run, sim

    parser = argparse.ArgumentParser(
        prog="gpushare",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log verbosity (default: INFO)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run.register(sub)
    plan.register(sub)
    mig.register(sub)
    sim.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gpushare` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return int(args.func(args) or 0)


