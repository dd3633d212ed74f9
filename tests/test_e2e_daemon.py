"""The daemon end to end on a simulated DGX A100 over real unix sockets and a kubelet stand-in."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from plugin.daemon.core import Daemon
from tests.checkout import checkout_env, gpushare_argv
from tests.fakes.kubelet import FakeKubelet

ROOT = Path(__file__).resolve().parents[1]
COMPAT = ROOT / "tests" / "data" / "compat" / "nvidia-device-plugin"  # copied from shared/compat
TIME_SLICING_X4 = """\
version: v1
sharing:
  timeSlicing:
    resources:
      - name: nvidia.com/gpu
        replicas: 4
"""
CDI = "k8s.device-plugin.nvidia.com/gpu"

StartDaemon = Callable[..., Daemon]


@pytest.fixture
def sim_node(tmp_path: Path) -> Path:
    """A fresh simulator state directory of a DGX A100 (8 x A100-SXM4-40GB)."""
    from sharing.nvml.sim import create_state

    state = tmp_path / "node"
    create_state("dgx-a100", state)
    return state


@pytest.fixture
def start_daemon(
    tmp_path: Path, kubelet_dir: Path, sim_node: Path, mps_root: Path
) -> Iterator[StartDaemon]:
    """Start a Daemon on the simulated node with a config text and flag overrides.

    mpsRoot defaults to a fresh directory under /tmp (its MPS daemons are the stand-in's).
    """
    from sharing.nvml import load_library

    daemons: list[Daemon] = []

    def start(config: str = TIME_SLICING_X4, **overrides: object) -> Daemon:
        path = tmp_path / "config.yaml"
        path.write_text(config)
        overrides.setdefault("mps_root", str(mps_root))
        daemon = Daemon(
            config_path=path, kubelet_dir=kubelet_dir, nvml_lib=load_library(str(sim_node)),
            env={}, overrides={k.replace("_", "-"): v for k, v in overrides.items()},
        )
        daemons.append(daemon)
        daemon.start()
        return daemon

    yield start
    for daemon in daemons:
        daemon.stop()


def test_registration_and_first_list(start_daemon: StartDaemon, kubelet: FakeKubelet) -> None:
    """The stand-in sees one registration; the first list holds all 32 replicas with NUMA."""
    daemon = start_daemon()
    kubelet.wait_for(lambda: kubelet.resources() == ["nvidia.com/gpu"])
    [registration] = kubelet.registrations
    assert (registration.resource_name, registration.endpoint) == (
        "nvidia.com/gpu", "gpushare-gpu.sock"
    )
    first = kubelet.wait_for_list("nvidia.com/gpu", lambda _: True)
    assert kubelet.lists("nvidia.com/gpu")[0] == first
    assert [d.id for d in first.devices] == [d.id for d in daemon.plan.resources[0].devices]
    assert len(first.devices) == 32
    assert all(d.healthy for d in first.devices)
    assert {d.numa_node for d in first.devices} == {0, 1}


def _expected(strategy: str, uuids: list[str]) -> dict[str, object]:
    """The parts of a ContainerAllocateResponse facts §7 prescribes for one strategy."""
    names = ",".join(f"{CDI}={u}" for u in uuids)
    return {
        "envvar": {"envs": {"NVIDIA_VISIBLE_DEVICES": ",".join(uuids)}},
        "volume-mounts": {
            "envs": {"NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices"},
            "mounts": [(f"/var/run/nvidia-container-devices/{u}", "/dev/null") for u in uuids],
        },
        "cdi-annotations": {"envs": {}, "annotation": names},
        "cdi-cri": {"envs": {}, "cdi": [f"{CDI}={u}" for u in uuids]},
    }[strategy]


@pytest.mark.parametrize(
    "strategy",
    [
        pytest.param("envvar", id="envvar"),
        pytest.param("volume-mounts", id="volume-mounts"),
        pytest.param("cdi-annotations", id="cdi-annotations"),
        pytest.param("cdi-cri", id="cdi-cri"),
    ],
)
def test_allocate_per_device_list_strategy(
    start_daemon: StartDaemon, kubelet: FakeKubelet, strategy: str
) -> None:
    """GetPreferredAllocation then Allocate; the response names the parent GPUs as facts §7."""
    start_daemon(device_list_strategy=[strategy])
    kubelet.wait_for_list("nvidia.com/gpu", lambda _: True)
    got = kubelet.allocate("nvidia.com/gpu", 2)
    uuids = list(dict.fromkeys(i.split("::")[0] for i in got.chosen[0]))
    assert len(uuids) == 2, "distributed policy spreads replicas over GPUs"
    response = got.response.container_responses[0]
    expected = _expected(strategy, uuids)
    assert dict(response.envs) == expected["envs"]
    assert [(m.container_path, m.host_path) for m in response.mounts] == expected.get("mounts", [])
    assert [c.name for c in response.cdi_devices] == expected.get("cdi", [])
    if "annotation" in expected:
        [(key, value)] = response.annotations.items()
        assert re.fullmatch(r"cdi\.k8s\.io/nvidia-device-plugin_[0-9a-f-]{36}", key)
        assert value == expected["annotation"]
    else:
        assert dict(response.annotations) == {}


def test_index_ids(start_daemon: StartDaemon, kubelet: FakeKubelet) -> None:
    """deviceIDStrategy index hands GPU indices to the runtime."""
    daemon = start_daemon(device_id_strategy="index")
    kubelet.wait_for_list("nvidia.com/gpu", lambda _: True)
    devices = daemon.plan.resources[0].devices
    got = kubelet.allocate_ids("nvidia.com/gpu", [[devices[5].id, devices[0].id]])
    assert got.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] == (
        f"{devices[5].gpu_index},{devices[0].gpu_index}"
    )


def test_unknown_id_is_refused_and_serving_goes_on(
    start_daemon: StartDaemon, kubelet: FakeKubelet
) -> None:
    """INVALID_ARGUMENT naming resource and ID; the next Allocate is answered."""
    start_daemon()
    kubelet.wait_for_list("nvidia.com/gpu", lambda _: True)
    with pytest.raises(grpc.RpcError) as info:
        kubelet.allocate_ids("nvidia.com/gpu", [["GPU-not-on-this-node::3"]])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nvidia.com/gpu" in info.value.details()
    assert "GPU-not-on-this-node::3" in info.value.details()
    assert kubelet.allocate("nvidia.com/gpu", 1).response.container_responses[0].envs


def test_kubelet_restart_reregisters(
    start_daemon: StartDaemon, kubelet: FakeKubelet, kubelet_dir: Path
) -> None:
    """Sockets deleted and kubelet.sock re-created: registered again, and serving (how fast:
    `python -m benchmarks reregistration`)."""
    start_daemon()
    kubelet.wait_for_list("nvidia.com/gpu", lambda _: True)
    restarted = time.monotonic()
    kubelet.restart()
    assert not (kubelet_dir / "gpushare-gpu.sock").exists()
    kubelet.wait_for(lambda: len(kubelet.registrations) == 2, timeout_s=10.0)
    took = kubelet.registrations[-1].at - restarted
    assert took < 10.0, f"re-registration took {took:.3f}s"
    latest = kubelet.wait_for_list("nvidia.com/gpu", lambda _: True)
    assert len(latest.devices) == 32
    assert kubelet.allocate("nvidia.com/gpu", 1).response.container_responses


@pytest.mark.parametrize(
    ("config", "overrides", "resource", "count"),
    [
        pytest.param("flags-only.yaml", {}, "nvidia.com/gpu", 8, id="flags-only"),
        pytest.param("time-slicing-rename.yaml", {}, "nvidia.com/gpu.shared", 80,
                     id="time-slicing-rename"),
        pytest.param("mps.yaml", {}, "nvidia.com/gpu", 80, id="mps"),
        pytest.param("mps-fail-requests-false.yaml", {}, "nvidia.com/gpu", 16,
                     id="mps-fail-requests-false"),
        pytest.param("mps-cdi-annotations.yaml", {}, "nvidia.com/gpu", 32,
                     id="mps-cdi-annotations"),
    ],
)
def test_nvidia_config_files_served_unchanged(
    start_daemon: StartDaemon, kubelet: FakeKubelet, config: str,
    overrides: dict[str, object], resource: str, count: int,
) -> None:
    """NVIDIA v1 config files give the resources and device counts the compat table lists."""
    start_daemon((COMPAT / config).read_text(), **overrides)
    kubelet.wait_for(lambda: kubelet.resources() == [resource])
    assert len(kubelet.wait_for_list(resource, lambda _: True).devices) == count


def test_sigterm_stops_cleanly_and_removes_sockets(
    tmp_path: Path, kubelet_dir: Path, kubelet: FakeKubelet, sim_node: Path
) -> None:
    """`gpushare run` as a process: registers, then SIGTERM exits 0 leaving no socket of ours."""
    config = tmp_path / "config.yaml"
    config.write_text(TIME_SLICING_X4)
    process = subprocess.Popen(
        gpushare_argv("run", "--config", str(config), "--node", str(sim_node),
                      "--kubelet-dir", str(kubelet_dir)),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=checkout_env(),
    )
    try:
        kubelet.wait_for(
            lambda: kubelet.resources() == ["nvidia.com/gpu"] or process.poll() is not None,
            timeout_s=20,
        )
        assert (kubelet_dir / "gpushare-gpu.sock").exists()
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            print(process.communicate(timeout=10)[0])
    assert process.returncode == 0, output
    assert sorted(p.name for p in kubelet_dir.iterdir()) == ["kubelet.sock"]
    assert "registered nvidia.com/gpu" in output


def test_mps_allocation_and_oversize_request(
    start_daemon: StartDaemon, kubelet: FakeKubelet
) -> None:
    """MPS: one replica gets the pipe directory, limits and mounts; two are refused (facts §3)."""
    daemon = start_daemon((COMPAT / "mps.yaml").read_text())
    kubelet.wait_for_list("nvidia.com/gpu", lambda _: True)
    got = kubelet.allocate("nvidia.com/gpu", 1).response.container_responses[0]
    spec = daemon.plan.resources[0].mps
    assert spec is not None
    assert got.envs["CUDA_MPS_PIPE_DIRECTORY"] == "/mps/gpu/pipe"
    assert got.envs["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "10"
    assert got.envs["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == f"0={spec.pinned_mem_limit_mib[0][1]}M"
    assert [(m.container_path, m.host_path) for m in got.mounts] == [
        ("/mps/gpu/pipe", spec.pipe_dir), ("/dev/shm", spec.shm_dir),
    ]
    ids = [d.id for d in daemon.plan.resources[0].devices[:2]]
    with pytest.raises(grpc.RpcError) as info:
        kubelet.allocate_ids("nvidia.com/gpu", [ids])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == (
        'invalid allocation request for "nvidia.com/gpu": invalid request: '
        "maximum request size for shared resources is 1; found 2"
    )


@pytest.mark.parametrize(
    ("config", "kubelet_subdir", "message", "exit_status"),
    [
        pytest.param(
            TIME_SLICING_X4.replace("replicas: 4", "replicas: 1"), "",
            "config.yaml: sharing.timeSlicing.resources[0].replicas: must be >= 2, got 1", 2,
            id="invalid config names file and field",
        ),
        pytest.param(
            TIME_SLICING_X4, "missing", "missing does not exist", 1,
            id="missing kubelet directory",
        ),
    ],
)
def test_run_refuses_to_start(
    tmp_path: Path, kubelet_dir: Path, sim_node: Path, capsys: pytest.CaptureFixture[str],
    config: str, kubelet_subdir: str, message: str, exit_status: int,
) -> None:
    """`gpushare run` exits 2 (bad config) or 1 with a message naming what is wrong, leaving no
    socket behind."""
    from plugin.cli import main

    path = tmp_path / "config.yaml"
    path.write_text(config)
    target = kubelet_dir / kubelet_subdir if kubelet_subdir else kubelet_dir
    status = main(["run", "--config", str(path), "--node", str(sim_node),
                   "--kubelet-dir", str(target)])
    assert status == exit_status
    assert message in capsys.readouterr().err
    assert list(kubelet_dir.iterdir()) == []


def test_deleted_socket_alone_leads_to_restart_and_registration(
    start_daemon: StartDaemon, kubelet: FakeKubelet, kubelet_dir: Path
) -> None:
    """Our socket removed while kubelet.sock stays: served again and registered again."""
    start_daemon()
    kubelet.wait_for_list("nvidia.com/gpu", lambda _: True)
    (kubelet_dir / "gpushare-gpu.sock").unlink()
    kubelet.wait_for(lambda: len(kubelet.registrations) == 2, timeout_s=10.0)
    assert (kubelet_dir / "gpushare-gpu.sock").exists()
    assert len(kubelet.wait_for_list("nvidia.com/gpu", lambda _: True).devices) == 32
    assert kubelet.allocate("nvidia.com/gpu", 1).response.container_responses
