"""Hostile gRPC requests: malformed bytes, oversized requests, bounds, and rate-limited logs."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from plugin.api import pb
from plugin.daemon.allocate import build_allocators
from plugin.daemon.refusals import RateLimitedLog
from plugin.daemon.server import MAX_REQUEST_BYTES, PluginServer, create_server
from plugin.daemon.state import NodeState
from sharing.allocation import MAX_CONTAINERS_PER_REQUEST, MAX_ID_CHARS, MAX_IDS_PER_CONTAINER
from sharing.plan_types import Plan
from tests.fakes.kubelet import FakeKubelet
from tests.test_e2e_servers import GPUS, time_sliced

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["Allocate", "GetPreferredAllocation", "PreStartContainer", "GetDevicePluginOptions"]
# Tails that no message type accepts; a random, valid unknown field goes before each.
MALFORMED = [
    b"\x0f",  # field 1 with wire type 7
    b"\x12\x05ab",  # a length past the end
    b"\x08" + b"\xff" * 10 + b"\x01",  # a varint longer than 10 bytes
    b"\x0b",  # a group start that never ends
]
MEMORY_GROWTH_LIMIT = 5 * 1024 * 1024


def raw_call(channel: grpc.Channel, method: str) -> grpc.UnaryUnaryMultiCallable:
    """A call that sends bytes as they are."""
    return channel.unary_unary(f"/v1beta1.DevicePlugin/{method}",
                               request_serializer=None, response_deserializer=None)


def send(calls: dict[str, grpc.UnaryUnaryMultiCallable], count: int, rng: random.Random,
         ) -> Counter[str]:
    """`count` malformed requests spread over the methods, 64 in flight; the status codes."""
    codes: Counter[str] = Counter()
    for first in range(0, count, 64):
        pending = []
        for n in range(first, min(count, first + 64)):
            prefix = b"\x78" + bytes([rng.randrange(128)])  # field 15, a one-byte varint
            payload = prefix + MALFORMED[n % len(MALFORMED)]
            pending.append(calls[METHODS[n % len(METHODS)]].future(payload, timeout=30))
        for future in pending:
            error = future.exception()
            codes["OK" if error is None else error.code().name] += 1
    return codes


def test_10000_malformed_requests_are_invalid_argument_and_keep_no_memory(
    tmp_path: Path, kubelet_dir: Path, kubelet: FakeKubelet
) -> None:
    """`gpushare run` as a process: every malformed request is INVALID_ARGUMENT, its memory
    grows by less than 5 MiB over 10,000, and the log holds 10 refusals and a count."""
    from sharing.nvml.sim import create_state

    node = create_state("dgx-a100", tmp_path / "node")
    config = tmp_path / "config.yaml"
    config.write_text("version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
                      "      - {name: nvidia.com/gpu, replicas: 4}\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "plugin.cli", "run", "--config", str(config),
         "--node", str(node), "--kubelet-dir", str(kubelet_dir)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        kubelet.wait_for_list("nvidia.com/gpu", lambda d: len(d.devices) == 32, 30)
        daemon = psutil.Process(process.pid)
        rng = random.Random(10)
        with grpc.insecure_channel(f"unix://{kubelet_dir / 'gpushare-gpu.sock'}") as channel:
            calls = {m: raw_call(channel, m) for m in METHODS}
            assert send(calls, 500, rng) == {"INVALID_ARGUMENT": 500}  # warm-up
            before = daemon.memory_info().rss
            assert send(calls, 10_000, rng) == {"INVALID_ARGUMENT": 10_000}
            grown = daemon.memory_info().rss - before
        assert grown < MEMORY_GROWTH_LIMIT, f"RSS grew by {grown / 2**20:.1f} MiB"
        assert kubelet.allocate("nvidia.com/gpu", 1).response.container_responses
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=20)
    assert process.returncode == 0
    refusals = [line for line in output.splitlines() if " refused: " in line]
    assert len(refusals) == 10
    assert "Traceback" not in output
    assert "further ones are counted, not logged" in output
    assert "10,490 more refused requests for nvidia.com/gpu were not logged" in output


@pytest.fixture
def server(kubelet_dir: Path) -> Iterator[PluginServer]:
    """One resource (4 GPUs x 2 replicas) served on a real socket."""
    plan = Plan(resources=(time_sliced(2),))
    allocators = build_allocators(plan.resources, plan.options)
    made = create_server("nvidia.com/gpu", kubelet_dir / "gpushare-gpu.sock",
                         state=NodeState(plan), allocator=allocators.get)
    made.start()
    yield made
    made.stop()


def call(server: PluginServer, method: str, request: bytes | object) -> grpc.RpcError:
    """Send a request that must be refused; the error."""
    raw = request if isinstance(request, bytes) else request.SerializeToString()  # type: ignore[attr-defined]
    with grpc.insecure_channel(f"unix://{server.socket_path}") as channel:
        with pytest.raises(grpc.RpcError) as refused:
            raw_call(channel, method)(raw, timeout=10)
    return refused.value


def allocate(*containers: list[str]) -> pb.AllocateRequest:
    return pb.AllocateRequest(container_requests=[
        pb.ContainerAllocateRequest(devices_ids=ids) for ids in containers
    ])


def preferred(available: list[str], must: list[str], size: int) -> pb.PreferredAllocationRequest:
    return pb.PreferredAllocationRequest(container_requests=[
        pb.ContainerPreferredAllocationRequest(
            available_deviceIDs=available, must_include_deviceIDs=must, allocation_size=size)
    ])


REPLICA = f"{GPUS[0]}::0"


@pytest.mark.parametrize(
    ("method", "request_", "message"),
    [
        pytest.param("Allocate", allocate(*[[REPLICA]] * (MAX_CONTAINERS_PER_REQUEST + 1)),
                     f"257 container requests; at most {MAX_CONTAINERS_PER_REQUEST}",
                     id="too many containers"),
        pytest.param("Allocate", allocate(["x"] * (MAX_IDS_PER_CONTAINER + 1)),
                     "16,385 device IDs in one container request; at most 16,384",
                     id="too many IDs"),
        pytest.param("Allocate", allocate(["G" * 1_000_000]),
                     f"characters; at most {MAX_ID_CHARS}", id="1 MB ID"),
        pytest.param("GetPreferredAllocation", preferred(["y"] * 20_000, [], 1),
                     "20,000 device IDs in one container request", id="too many available"),
        pytest.param("GetPreferredAllocation",
                     preferred([f"{GPUS[1]}::0", f"{GPUS[1]}::1"], [REPLICA], 2),
                     f'must-include device "{REPLICA}" is not among the available devices',
                     id="must-include not available"),
    ],
)
def test_requests_past_the_bounds_are_invalid_argument_with_a_short_message(
    server: PluginServer, method: str, request_: object, message: str
) -> None:
    """Each bound refused before any ID is looked up; the message names the resource."""
    err = call(server, method, request_)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.details()
    assert '"nvidia.com/gpu"' in err.details()
    assert len(err.details()) < 500


def test_a_request_over_the_size_limit_is_refused_by_grpc(server: PluginServer) -> None:
    """More than MAX_REQUEST_BYTES: RESOURCE_EXHAUSTED before it is parsed."""
    err = call(server, "Allocate", b"\x0a\x00" * (MAX_REQUEST_BYTES // 2 + 1))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_refusal_log_logs_the_first_ten_per_window_then_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """25 refusals: 10 logged and a note; the next window starts with the count of 15."""
    clock = FakeClock()
    logger = logging.getLogger("test.refusals")
    log = RateLimitedLog(logger, "refused requests for x", clock=clock)
    caplog.set_level(logging.WARNING, logger="test.refusals")
    for n in range(25):
        log.warning(f"refusal {n}")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [f"refusal {n}" for n in range(10)] + [
        "10 refused requests for x in 60s: further ones are counted, not logged, "
        "until the window ends"
    ]
    assert log.suppressed == 15
    caplog.clear()
    clock.now = 61.0
    log.warning("refusal 25")
    assert [r.getMessage() for r in caplog.records] == [
        "15 more refused requests for x were not logged", "refusal 25"
    ]
    caplog.clear()
    log.flush()
    assert caplog.records == []  # nothing left to count
