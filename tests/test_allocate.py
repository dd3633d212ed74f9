"""Allocate responses from a Plan and the flags, for every strategy (facts §7)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from plugin.daemon.allocate import (
    ContainerAllocation,
    DeviceNodeSpec,
    MountSpec,
    ResourceAllocator,
    build_allocators,
    existing_control_nodes,
)
from plugin.daemon.convert import to_pb_container_response
from sharing.errors import InvalidRequest
from sharing.plan_types import MpsSpec, ResourcePlan, ServeOptions, VirtualDevice

G0, G1, G2 = (f"GPU-0000000{i}-aaaa-4000-8000-00000000000{i}" for i in range(3))
MIG = "MIG-11111111-2222-4000-8000-000000000001"


def replicas(count: int = 2, gpus: int = 3) -> tuple[VirtualDevice, ...]:
    """`count` replicas of each of `gpus` GPUs."""
    return tuple(
        VirtualDevice(
            id=f"{uuid}::{n}",
            physical_id=uuid,
            gpu_uuid=uuid,
            gpu_index=i,
            replica=n,
            numa_node=i // 2,
            index_id=str(i),
            dev_paths=(f"/dev/nvidia{i}",),
        )
        for i, uuid in enumerate((G0, G1, G2)[:gpus])
        for n in range(count)
    )


def shared(**kwargs: object) -> ResourcePlan:
    """A time-sliced nvidia.com/gpu with 2 replicas of 3 GPUs."""
    base = ResourcePlan(
        name="nvidia.com/gpu", original_name="nvidia.com/gpu", strategy="time-slicing",
        devices=replicas(), replicas=((G0, 2), (G1, 2), (G2, 2)),
    )
    return replace(base, **kwargs)


def mig_resource() -> ResourcePlan:
    """One unshared MIG device 1 on GPU 3."""
    device = VirtualDevice(
        id=MIG, physical_id=MIG, gpu_uuid=G2, gpu_index=3, index_id="3:1",
        dev_paths=(
            "/dev/nvidia3", "/dev/nvidia-caps/nvidia-cap30", "/dev/nvidia-caps/nvidia-cap31"
        ),
    )
    return ResourcePlan(
        name="nvidia.com/mig-1g.5gb", original_name="nvidia.com/mig-1g.5gb", strategy="none",
        devices=(device,),
    )


def allocate(resource: ResourcePlan, ids: list[str], **options: object) -> ContainerAllocation:
    """Allocate with a fixed response id so annotation keys are predictable."""
    allocator = ResourceAllocator(resource, ServeOptions(**options), response_id=lambda: "R1")
    return allocator.allocate(ids)


CDI = "k8s.device-plugin.nvidia.com/gpu"


@pytest.mark.parametrize(
    ("ids", "options", "expected"),
    [
        pytest.param(
            [f"{G0}::0", f"{G0}::1", f"{G1}::1"], {},
            ContainerAllocation(envs={"NVIDIA_VISIBLE_DEVICES": f"{G0},{G1}"}),
            id="envvar uuid strips replicas and duplicates",
        ),
        pytest.param(
            [f"{G1}::0", f"{G0}::1"], {"device_id_strategy": "index"},
            ContainerAllocation(envs={"NVIDIA_VISIBLE_DEVICES": "1,0"}),
            id="envvar index keeps request order",
        ),
        pytest.param(
            [f"{G0}::0", f"{G2}::1"], {"device_list_strategy": ("volume-mounts",)},
            ContainerAllocation(
                envs={"NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices"},
                mounts=(
                    MountSpec(f"/var/run/nvidia-container-devices/{G0}", "/dev/null"),
                    MountSpec(f"/var/run/nvidia-container-devices/{G2}", "/dev/null"),
                ),
            ),
            id="volume-mounts one mount per device",
        ),
        pytest.param(
            [f"{G0}::0", f"{G1}::0"], {"device_list_strategy": ("cdi-annotations",)},
            ContainerAllocation(
                annotations={"cdi.k8s.io/nvidia-device-plugin_R1": f"{CDI}={G0},{CDI}={G1}"}
            ),
            id="cdi-annotations alone sets no NVIDIA_VISIBLE_DEVICES",
        ),
        pytest.param(
            [f"{G0}::0"], {"device_list_strategy": ("cdi-annotations",),
                           "cdi_annotation_prefix": "custom.cdi/", "device_id_strategy": "index"},
            ContainerAllocation(annotations={"custom.cdi/nvidia-device-plugin_R1": f"{CDI}=0"}),
            id="cdi-annotations with prefix and index IDs",
        ),
        pytest.param(
            [f"{G1}::1", f"{G1}::0"], {"device_list_strategy": ("cdi-cri",)},
            ContainerAllocation(cdi_devices=(f"{CDI}={G1}",)),
            id="cdi-cri names in cdi_devices",
        ),
        pytest.param(
            [f"{G0}::0"], {"device_list_strategy": ("envvar", "cdi-cri")},
            ContainerAllocation(envs={"NVIDIA_VISIBLE_DEVICES": G0}, cdi_devices=(f"{CDI}={G0}",)),
            id="envvar plus cdi-cri",
        ),
    ],
)
def test_device_list_strategies(
    ids: list[str], options: dict[str, object], expected: ContainerAllocation
) -> None:
    """Each deviceListStrategy and deviceIDStrategy names the physical devices as facts §7 says."""
    assert allocate(shared(), ids, **options) == expected


def test_mig_device_index_id_and_nodes() -> None:
    """A MIG device is `<gpu>:<mig>` under index IDs and passes its parent and cap nodes."""
    got = allocate(mig_resource(), [MIG], device_id_strategy="index", pass_device_specs=True)
    assert got.envs == {"NVIDIA_VISIBLE_DEVICES": "3:1"}
    assert [d.container_path for d in got.devices] == [
        "/dev/nvidia3", "/dev/nvidia-caps/nvidia-cap30", "/dev/nvidia-caps/nvidia-cap31",
    ]


def test_pass_device_specs_uses_control_nodes_found_once(tmp_path: Path) -> None:
    """Control nodes are looked up when the plan is applied; a later change is not seen."""
    (tmp_path / "dev").mkdir()
    for name in ("nvidiactl", "nvidia-uvm"):
        (tmp_path / "dev" / name).touch()
    options = ServeOptions(pass_device_specs=True, nvidia_dev_root=str(tmp_path))
    allocator = build_allocators([shared()], options)["nvidia.com/gpu"]
    (tmp_path / "dev" / "nvidia-uvm").unlink()
    (tmp_path / "dev" / "nvidia-modeset").touch()
    got = allocator.allocate([f"{G0}::0", f"{G0}::1", f"{G1}::0"])
    assert got.devices == (
        DeviceNodeSpec("/dev/nvidiactl", f"{tmp_path}/dev/nvidiactl", "rw"),
        DeviceNodeSpec("/dev/nvidia-uvm", f"{tmp_path}/dev/nvidia-uvm", "rw"),
        DeviceNodeSpec("/dev/nvidia0", f"{tmp_path}/dev/nvidia0", "rw"),
        DeviceNodeSpec("/dev/nvidia1", f"{tmp_path}/dev/nvidia1", "rw"),
    )


def test_existing_control_nodes(tmp_path: Path) -> None:
    """Only the control nodes present under the device root are listed."""
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "nvidia-uvm-tools").touch()
    assert existing_control_nodes(str(tmp_path)) == ("/dev/nvidia-uvm-tools",)


def test_no_device_specs_without_pass_device_specs() -> None:
    """passDeviceSpecs off: no device specs at all."""
    assert allocate(shared(), [f"{G0}::0"]).devices == ()


def mps_resource() -> ResourcePlan:
    """An MPS resource over GPUs 0-2 with 2 replicas each."""
    spec = MpsSpec(
        resource="nvidia.com/gpu", gpu_indices=(0, 1, 2), gpu_uuids=(G0, G1, G2),
        active_thread_percentage=50, pinned_mem_limit_mib=((0, 20480), (1, 20480), (2, 10240)),
        max_clients_per_gpu=48, pipe_dir="/run/nvidia/mps/gpu/pipe",
        log_dir="/run/nvidia/mps/gpu/log", shm_dir="/run/nvidia/mps/shm",
    )
    return shared(strategy="mps", mps=spec, fail_requests_greater_than_one=False)


def test_mps_envs_and_mounts() -> None:
    """MPS adds the pipe directory, thread percentage, per-GPU pinned limits and the mounts."""
    got = allocate(mps_resource(), [f"{G2}::0", f"{G1}::1"])
    assert got.envs == {
        "NVIDIA_VISIBLE_DEVICES": f"{G2},{G1}",
        "CUDA_MPS_PIPE_DIRECTORY": "/mps/gpu/pipe",
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "50",
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=20480M,1=10240M",
    }
    assert got.mounts == (
        MountSpec("/mps/gpu/pipe", "/run/nvidia/mps/gpu/pipe"),
        MountSpec("/dev/shm", "/run/nvidia/mps/shm"),
    )


@pytest.mark.parametrize(
    ("resource", "ids", "message"),
    [
        pytest.param(shared(), ["GPU-nope::0"], r'"nvidia.com/gpu": unknown device "GPU-nope::0"',
                     id="unknown ID names resource and ID"),
        pytest.param(shared(), [], r'"nvidia.com/gpu": no devices requested', id="empty request"),
        pytest.param(
            shared(fail_requests_greater_than_one=True), [f"{G0}::0", f"{G1}::0"],
            re.escape('invalid allocation request for "nvidia.com/gpu": invalid request: '
                      "maximum request size for shared resources is 1; found 2"),
            id="oversize shared request",
        ),
    ],
)
def test_invalid_requests(resource: ResourcePlan, ids: list[str], message: str) -> None:
    """Bad requests raise InvalidRequest naming the resource and the ID."""
    with pytest.raises(InvalidRequest, match=message):
        allocate(resource, ids)


def test_random_annotation_id_by_default() -> None:
    """Without an injected id, each response gets its own annotation key."""
    allocator = ResourceAllocator(shared(), ServeOptions(device_list_strategy=("cdi-annotations",)))
    keys = {next(iter(allocator.allocate([f"{G0}::0"]).annotations)) for _ in range(3)}
    assert len(keys) == 3
    assert all(re.fullmatch(r"cdi\.k8s\.io/nvidia-device-plugin_[0-9a-f-]{36}", k) for k in keys)


def test_protobuf_conversion_keeps_every_field() -> None:
    """The protobuf response carries envs, mounts, specs, annotations and CDI devices."""
    allocation = ContainerAllocation(
        envs={"A": "1"}, mounts=(MountSpec("/c", "/h", True),),
        devices=(DeviceNodeSpec("/dev/x", "/root/dev/x"),), annotations={"k": "v"},
        cdi_devices=("vendor/class=a",),
    )
    msg = to_pb_container_response(allocation)
    assert dict(msg.envs) == {"A": "1"}
    mounts = [(m.container_path, m.host_path, m.read_only) for m in msg.mounts]
    assert mounts == [("/c", "/h", True)]
    assert [(d.container_path, d.host_path, d.permissions) for d in msg.devices] == [
        ("/dev/x", "/root/dev/x", "rw")
    ]
    assert dict(msg.annotations) == {"k": "v"}
    assert [c.name for c in msg.cdi_devices] == ["vendor/class=a"]
