"""MPS limit arithmetic and directory layout (sharing.mps)."""

from __future__ import annotations

import pytest

from sharing import mps


@pytest.mark.parametrize(
    ("replicas", "percentage"),
    [
        pytest.param(1, 100, id="1"),
        pytest.param(3, 33, id="3"),
        pytest.param(10, 10, id="10"),
        pytest.param(48, 2, id="48"),
        pytest.param(200, 1, id="never below 1"),
    ],
)
def test_active_thread_percentage(replicas: int, percentage: int) -> None:
    assert mps.active_thread_percentage(replicas) == percentage


def test_pinned_memory_is_total_over_replicas() -> None:
    assert mps.pinned_mem_limit_mib(40960, 10) == 4096
    assert mps.pinned_mem_limit_mib(81920, 3) == 27306


@pytest.mark.parametrize(
    "function", [mps.active_thread_percentage, lambda r: mps.pinned_mem_limit_mib(100, r)]
)
def test_zero_replicas_is_an_error(function: object) -> None:
    with pytest.raises(ValueError, match="replicas must be >= 1, got 0"):
        function(0)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("cc", "clients"),
    [
        pytest.param((7, 0), 16, id="Volta"),
        pytest.param((7, 5), 48, id="Turing"),
        pytest.param((9, 0), 48, id="Hopper"),
    ],
)
def test_max_clients(cc: tuple[int, int], clients: int) -> None:
    assert mps.max_clients(cc) == clients


def test_limit_formats() -> None:
    assert mps.format_mem_limit(4096) == "4096M"
    assert mps.pinned_mem_env(((0, 4096), (1, 2048))) == "0=4096M,1=2048M"


def test_paths_follow_the_upstream_layout() -> None:
    paths = mps.MpsPaths("/run/nvidia/mps")
    assert paths.pipe_dir("nvidia.com/gpu") == "/run/nvidia/mps/gpu/pipe"
    assert paths.log_dir("nvidia.com/gpu.shared") == "/run/nvidia/mps/gpu.shared/log"
    assert paths.shm_dir() == "/run/nvidia/mps/shm"
