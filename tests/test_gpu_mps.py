"""MPS on a real GPU through gpushare's own parts: the limits hold for a real CUDA client.

A Daemon over the real pynvml runs the real `nvidia-cuda-mps-control -f` for one MPS resource on
GPU 0 (4 replicas, pinnedMemoryLimit 2048M) through its supervisor, in a temporary mpsRoot, with
compute mode `leave`: no test changes the card's compute mode, MIG mode, clocks or power. A
kubelet stand-in allocates over the real unix socket, and tests/cuda_client.py (ctypes on
libcuda.so.1, nothing else) runs as a subprocess with the Allocate response's environment,
container paths mapped to the host paths of the response's mounts. The context itself counts
against the limit (facts §4), so 1 GiB must fit under 2048M and 3 GiB must not.

Every test marked `gpu` skips, with the reason, where there is no GPU, driver, libcuda or
nvidia-cuda-mps-control. The first test runs the same harness on a simulated node with the
stand-in control program, so the mapping from response to client is checked everywhere.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from plugin.api import pb
from plugin.daemon.core import Daemon
from sharing.devices import ComputeMode
from sharing.nvml import Nvml, load_library, read_inventory
from tests.fakes.kubelet import FakeKubelet
from tests.fakes.sockets import short_dir
from tests.gpu_node import mps_control_program, nvidia_smi_gpus, require_libcuda
from tests.mps_client import base_env, client_env, run_client

RESOURCE = "nvidia.com/gpu-mps"
REPLICAS = 4
LIMIT = "0=2048M"
CONFIG = f"""\
version: v1
sharing:
  mps:
    resources:
      - name: nvidia.com/gpu
        rename: {RESOURCE}
        devices: [0]
        replicas: {REPLICAS}
        pinnedMemoryLimit: 2048M
"""
GIB = 1024**3
CUDA_SUCCESS = 0
CUDA_ERROR_OUT_OF_MEMORY = 2
PID_FILE = "nvidia-cuda-mps-control.pid"


@dataclass
class MpsNode:
    """A running Daemon with one MPS resource, the kubelet stand-in that talks to it."""

    daemon: Daemon
    kubelet: FakeKubelet
    mps_root: Path
    leftovers: list[psutil.Process] = field(default_factory=list)

    def allocate(self) -> pb.ContainerAllocateResponse:
        """One replica for one container, the kubelet's way (preferred, then Allocate)."""
        return self.kubelet.allocate(RESOURCE, 1).response.container_responses[0]

    def control_pid(self) -> int:
        """Pid of the resource's control daemon (our child)."""
        daemon = self.daemon.mps_supervisor.daemon(RESOURCE)
        assert daemon is not None
        assert daemon.pid is not None
        return daemon.pid

    def command(self, line: str) -> str:
        """One control command to the resource's daemon, as gpushare sends them."""
        return self.daemon.mps_supervisor.daemon(RESOURCE).command([line])


@contextmanager
def mps_node(nvml_lib: Any, control: str | None) -> Iterator[MpsNode]:
    """Start the Daemon with CONFIG on a fresh kubelet and mpsRoot; stop it (and any MPS server
    left by a killed control daemon) after."""
    with short_dir("gs-k-") as kubelet_dir, short_dir("gs-m-") as mps_root, \
            short_dir("gs-c-") as config_dir:
        config = config_dir / "config.yaml"
        config.write_text(CONFIG)
        kubelet = FakeKubelet(kubelet_dir)
        daemon = Daemon(config_path=config, kubelet_dir=kubelet_dir, nvml_lib=nvml_lib,
                        env=dict(os.environ), overrides={"mps-root": str(mps_root)},
                        config_poll_s=3600, mps_control=control, mps_compute_mode="leave")
        node = MpsNode(daemon, kubelet, mps_root)
        try:
            daemon.start()
            _wait_healthy(node)
            yield node
        finally:
            daemon.stop()
            kubelet.stop()
            for process in node.leftovers:
                if process.is_running():
                    process.kill()


def _wait_healthy(node: MpsNode, timeout_s: float = 30) -> None:
    """Every replica Healthy at the kubelet; else fail with what the control daemon said."""
    try:
        node.kubelet.wait_for_list(RESOURCE, lambda d: len(d.healthy_ids) == REPLICAS,
                                   timeout_s=timeout_s)
    except TimeoutError:
        log_dir = Path(node.daemon.plan.resource(RESOURCE).mps.log_dir)
        said = {f.name: f.read_text(errors="replace")[-1500:]
                for f in sorted(log_dir.glob("*")) if f.is_file()}
        pytest.fail(f"{RESOURCE} not Healthy within {timeout_s}s; MPS state "
                    f"{node.daemon.mps_supervisor.healthy()}; logs {said}")


def test_client_environment_leads_to_the_daemon_on_a_simulated_node(sim_state) -> None:
    """The harness without a GPU: the mapped pipe directory is the daemon's, limits as planned."""
    state = sim_state("dgx-a100")
    with mps_node(load_library(str(state)), None) as node:
        response = node.allocate()
        spec = node.daemon.plan.resource(RESOURCE).mps
        env = client_env(response)
        assert env["CUDA_MPS_PIPE_DIRECTORY"] == spec.pipe_dir
        assert (Path(spec.pipe_dir) / PID_FILE).read_text().strip() == str(node.control_pid())
        assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == LIMIT
        assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "25"
        assert "CUDA_VISIBLE_DEVICES" not in env
        only_pipe = client_env(response, ["CUDA_MPS_PIPE_DIRECTORY"])
        assert not {"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"} & set(
            only_pipe)
        standin = json.loads((Path(spec.log_dir) / "standin-state.json").read_text())
        assert standin["pinned_mem_limits"] == {"0": "2048M"}, "the daemon's default limit"
        assert float(node.command("get_default_active_thread_percentage")) == 25
    nvml = Nvml(load_library(str(state)))
    nvml.init()
    try:
        assert {g.compute_mode for g in read_inventory(nvml).gpus} == {ComputeMode.DEFAULT}
    finally:
        nvml.shutdown()


# --- on a GPU node --------------------------------------------------------------------------


@dataclass(frozen=True)
class Gpu0:
    """GPU 0 as found before the tests: its UUID, compute mode and free memory."""

    uuid: str
    compute_mode: ComputeMode
    free_mib: int


@pytest.fixture(scope="module")
def gpu0(real_nvml: Nvml) -> Gpu0:
    """GPU 0, if MPS can run on it without changing its settings; skips with the reason."""
    nvidia_smi_gpus()
    require_libcuda()
    gpu = read_inventory(real_nvml).gpus[0]
    if gpu.mig_enabled:
        pytest.skip("GPU 0 has MIG mode on: gpushare does not run MPS on MIG devices")
    if gpu.compute_mode == ComputeMode.PROHIBITED:
        pytest.skip("GPU 0 is in PROHIBITED compute mode: no CUDA context can be created")
    memory = real_nvml.call("nvmlDeviceGetMemoryInfo", real_nvml.handle(0))
    return Gpu0(gpu.uuid, gpu.compute_mode, int(memory.free) // 2**20)


@pytest.fixture(scope="module")
def real_mps(gpu0: Gpu0) -> Iterator[MpsNode]:
    """gpushare serving the MPS resource on the real GPU 0 with the real control program."""
    control = mps_control_program()
    with mps_node(load_library(None), control) as node:
        yield node


def _held_to_the_limit(result: dict) -> None:
    assert (result.get("init"), result.get("device"), result.get("context")) == (0, 0, 0), result
    assert result["alloc"] == [[GIB, CUDA_SUCCESS], [3 * GIB, CUDA_ERROR_OUT_OF_MEMORY]], result


@pytest.mark.gpu
def test_allocate_response_leads_to_the_real_control_daemon(real_mps: MpsNode) -> None:
    response = real_mps.allocate()
    assert response.envs["CUDA_MPS_PIPE_DIRECTORY"] == "/mps/gpu-mps/pipe"
    assert response.envs["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == LIMIT
    pipe = Path(client_env(response)["CUDA_MPS_PIPE_DIRECTORY"])
    assert pipe.is_relative_to(real_mps.mps_root)
    assert {"control", PID_FILE} <= set(os.listdir(pipe))
    assert float(real_mps.command("get_default_active_thread_percentage")) == 25


@pytest.mark.gpu
def test_client_with_the_allocate_environment_is_held_to_the_pinned_limit(
    real_mps: MpsNode,
) -> None:
    _held_to_the_limit(run_client(client_env(real_mps.allocate()), GIB, 3 * GIB))


@pytest.mark.gpu
def test_client_with_only_the_pipe_directory_gets_the_daemon_default_limit(
    real_mps: MpsNode,
) -> None:
    env = client_env(real_mps.allocate(), ["CUDA_MPS_PIPE_DIRECTORY"])
    assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in env
    _held_to_the_limit(run_client(env, GIB, 3 * GIB))


@pytest.mark.gpu
def test_client_outside_mps_is_not_limited(real_mps: MpsNode, gpu0: Gpu0, tmp_path: Path) -> None:
    """The refusal above is the MPS limit, not the card: without MPS 3 GiB is allocated."""
    if gpu0.compute_mode == ComputeMode.EXCLUSIVE_PROCESS:
        pytest.skip("GPU 0 is in EXCLUSIVE_PROCESS mode: only the MPS server may use it")
    if gpu0.free_mib < 4096:
        pytest.skip(f"GPU 0 has {gpu0.free_mib} MiB free, the check needs 4096")
    no_daemon = tmp_path / "no-mps"  # an empty pipe directory: the client runs without MPS
    no_daemon.mkdir()
    env = {**base_env(), "CUDA_VISIBLE_DEVICES": gpu0.uuid,
           "CUDA_MPS_PIPE_DIRECTORY": str(no_daemon)}
    result = run_client(env, 3 * GIB)
    assert (result.get("context"), result["alloc"]) == (0, [[3 * GIB, CUDA_SUCCESS]]), result


@pytest.mark.gpu
def test_killed_control_daemon_unhealthy_then_healthy_and_the_limit_holds(
    real_mps: MpsNode,
) -> None:
    old = real_mps.control_pid()
    real_mps.leftovers += psutil.Process(old).children(recursive=True)  # its MPS server
    os.kill(old, signal.SIGKILL)
    killed = time.monotonic()
    real_mps.kubelet.wait_for_list(RESOURCE, lambda d: len(d.unhealthy_ids) == REPLICAS,
                                   timeout_s=5)
    _wait_healthy(real_mps)
    assert time.monotonic() - killed < 30
    assert real_mps.control_pid() != old
    _held_to_the_limit(run_client(client_env(real_mps.allocate()), GIB, 3 * GIB))


@pytest.mark.gpu
def test_compute_mode_was_left_as_found(real_mps: MpsNode, gpu0: Gpu0, real_nvml: Nvml) -> None:
    """--mps-compute-mode leave on the real card: the mode is what it was before the tests."""
    assert read_inventory(real_nvml).gpus[0].compute_mode == gpu0.compute_mode
