"""`gpushare` command line: run | plan | demo | mig … | sim …

Each sub-command lives in its own module with a `register(subparsers)` function that adds its
parser and sets `func`, a callable taking the parsed arguments and returning the exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from plugin import version
from plugin.cli.logs import FORMATS, LEVELS, configure_logging, describe_os_error

DESCRIPTION = """\
gpushare: GPU sharing manager for Kubernetes nodes.

Reads the node's GPUs through NVML, turns them into virtual devices (time-slicing replicas,
MPS replicas with per-client limits, MIG partitions) as a config file says, and serves them
to the kubelet as device plugin resources, keeping every virtual device's health true to its
physical parent.
"""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose every sub-command parser also takes the logging options.

    The top-level parser holds their defaults; a sub-command's copy is suppressed unless given,
    so `gpushare --log-level DEBUG run` and `gpushare run --log-level DEBUG` mean the same.
    """

    def __init__(self, *args: Any, top: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _add_logging_options(self, top=top)


def _add_logging_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    parser.add_argument(
        "--log-level",
        choices=LEVELS,
        default="INFO" if top else argparse.SUPPRESS,
        help="log verbosity (default: INFO)",
    )
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default="text" if top else argparse.SUPPRESS,
        help="text lines (default), or json: one object per line with time, level, logger,"
        " message and the resource, device and GPU where they apply",
    )


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command registered."""
    from plugin.cli import mig, plan, run, sim

    parser = _Parser(
        prog="gpushare",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        top=True,
    )
    parser.add_argument("--version", action="version", version=f"gpushare {version()}")
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
    configure_logging(args.log_level, args.log_format)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # The reader stopped reading (`gpushare plan | head`): end quietly, and point stdout
        # at /dev/null so the interpreter's last flush does not complain either.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return 0
    except OSError as err:
        # A file or directory the command could not use (a permission, a missing parent): one
        # line naming it, as for every other error, instead of a traceback.
        words = [args.command, getattr(args, "mig_command", ""), getattr(args, "sim_command", "")]
        command = " ".join(word for word in words if word)
        print(f"gpushare {command}: {describe_os_error(err)}", file=sys.stderr)
        return 1
