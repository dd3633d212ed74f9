"""`gpushare run --cpu-affinity CPUS`: keep every thread of the daemon on the given CPUs.

The gRPC server hands each call from thread to thread (completion queue, worker, I/O threads);
when all of them share one CPU those hand-offs stay on it, which lowers the time per Allocate
(README, Performance). Linux only (sched_setaffinity).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

log = logging.getLogger("gpushare.daemon")

MAX_CPU_LIST_CHARS = 256
MAX_CPU_ID = 65535


def parse_cpu_list(text: str) -> frozenset[int]:
    """CPUs from a Linux CPU list such as `1`, `0,2` or `2-3,6`.

    Raises:
        argparse.ArgumentTypeError: not a CPU list, or one that names no CPU.
    """
    if len(text) > MAX_CPU_LIST_CHARS:
        raise argparse.ArgumentTypeError(f"longer than {MAX_CPU_LIST_CHARS} characters")
    cpus: set[int] = set()
    for part in text.split(","):
        first, sep, last = part.strip().partition("-")
        if not first.isdigit() or (sep and not last.isdigit()):
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a CPU list (examples: 1, 0,2, 2-3,6); bad part {part!r}"
            )
        low, high = int(first), int(last) if sep else int(first)
        if low > high or high > MAX_CPU_ID:
            raise argparse.ArgumentTypeError(f"bad CPU range {part!r} in {text!r}")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def format_cpu_list(cpus: frozenset[int] | set[int]) -> str:
    """The CPUs as a comma-separated list, ascending."""
    return ",".join(str(c) for c in sorted(cpus))


def pin_process(cpus: frozenset[int]) -> None:
    """Set the CPU affinity of every thread of this process; threads started later inherit it.

    Raises:
        OSError: a CPU is not available to this process (the message lists those that are).
    """
    allowed = os.sched_getaffinity(0)
    missing = cpus - allowed
    if missing:
        raise OSError(
            f"--cpu-affinity {format_cpu_list(cpus)}: CPU {format_cpu_list(missing)} not available"
            f" to this process (available: {format_cpu_list(allowed)})"
        )
    threads = [int(t.name) for t in Path("/proc/self/task").iterdir() if t.name.isdigit()]
    for tid in threads:
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:
            continue  # the thread ended meanwhile
    log.info("daemon pinned to CPU %s (--cpu-affinity), %d threads", format_cpu_list(cpus),
             len(threads))  # fmt: skip
