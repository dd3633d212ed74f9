"""`gpushare run --cpu-affinity`: the CPU list is checked, and every daemon thread keeps to it."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.measure import GPU, NODE, ts_config
from benchmarks.node import REPO, DaemonUnderTest
from plugin.cli.affinity import format_cpu_list, parse_cpu_list


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        pytest.param("1", {1}, id="one"),
        pytest.param("0,2", {0, 2}, id="list"),
        pytest.param("2-3,6", {2, 3, 6}, id="range and one"),
        pytest.param(" 1 , 1 ", {1}, id="spaces and repeats"),
    ],
)
def test_cpu_lists_parse(text: str, cpus: set[int]) -> None:
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("", "is not a CPU list", id="empty"),
        pytest.param("a", "bad part 'a'", id="word"),
        pytest.param("1,", "bad part ''", id="trailing comma"),
        pytest.param("-1", "bad part '-1'", id="negative"),
        pytest.param("3-1", "bad CPU range '3-1'", id="reversed range"),
        pytest.param("0-70000", "bad CPU range", id="beyond any CPU"),
        pytest.param("1," * 200, "longer than 256 characters", id="too long"),
    ],
)
def test_bad_cpu_lists_are_refused_with_the_part(text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse_cpu_list(text)


def _thread_affinities(pid: int) -> dict[str, str]:
    """Thread name -> Cpus_allowed_list, for every thread of the process."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        status = (task / "status").read_text()
        allowed = status.split("Cpus_allowed_list:")[1].split()[0]
        found[f"{(task / 'comm').read_text().strip()}/{task.name}"] = allowed
    return found


def test_every_daemon_thread_runs_on_the_given_cpu() -> None:
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip("one CPU: a pinned daemon looks like an unpinned one")
    cpu = max(allowed)
    with DaemonUnderTest(NODE, ts_config(2), args=("--cpu-affinity", str(cpu))) as node:
        kubelet = node.serve([GPU])
        allocation = kubelet.allocate(GPU, 1)  # the gRPC threads have all started by now
        assert len(allocation.response.container_responses) == 1
        threads = _thread_affinities(node.pid)
    assert len(threads) > 3  # main, the gRPC server's threads, the watches
    assert set(threads.values()) == {str(cpu)}, threads


def test_a_cpu_not_available_is_refused_naming_it() -> None:
    allowed = os.sched_getaffinity(0)
    absent = max(allowed) + 1
    done = subprocess.run(
        [sys.executable, "-m", "plugin.cli", "run", "--node", "laptop",
         "--kubelet-dir", "/nonexistent", "--cpu-affinity", f"{min(allowed)},{absent}"],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"gpushare run: --cpu-affinity {min(allowed)},{absent}: CPU {absent} not available to"
        f" this process (available: {format_cpu_list(allowed)})"
    )
