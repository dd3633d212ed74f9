"""The only place that builds v1beta1 protobuf messages, from gpushare values."""

from __future__ import annotations

from collections.abc import Sequence

from plugin.api import API_VERSION, HEALTHY, UNHEALTHY, pb
from plugin.daemon.allocate import ContainerAllocation
from plugin.daemon.state import Snapshot


def to_pb_options(*, preferred_allocation: bool = True) -> pb.DevicePluginOptions:
    """Options every gpushare server offers: preferred allocation, no PreStartContainer."""
    return pb.DevicePluginOptions(
        pre_start_required=False,
        get_preferred_allocation_available=preferred_allocation,
    )


def to_pb_register_request(
    *, socket_name: str, resource_name: str, preferred_allocation: bool = True
) -> pb.RegisterRequest:
    """The RegisterRequest the kubelet expects: version, bare socket file name, resource name."""
    return pb.RegisterRequest(
        version=API_VERSION,
        endpoint=socket_name,
        resource_name=resource_name,
        options=to_pb_options(preferred_allocation=preferred_allocation),
    )


def to_pb_device_list(devices: Snapshot) -> pb.ListAndWatchResponse:
    """The full device list of one resource, with health and NUMA node when known."""
    out = pb.ListAndWatchResponse()
    for device in devices:
        item = out.devices.add(ID=device.id, health=HEALTHY if device.healthy else UNHEALTHY)
        if device.numa_node is not None:
            item.topology.nodes.add(ID=device.numa_node)
    return out


def to_pb_container_response(allocation: ContainerAllocation) -> pb.ContainerAllocateResponse:
    """One ContainerAllocateResponse."""
    out = pb.ContainerAllocateResponse()
    out.envs.update(allocation.envs)
    out.annotations.update(allocation.annotations)
    for mount in allocation.mounts:
        out.mounts.add(
            container_path=mount.container_path,
            host_path=mount.host_path,
            read_only=mount.read_only,
        )
    for spec in allocation.devices:
        out.devices.add(
            container_path=spec.container_path,
            host_path=spec.host_path,
            permissions=spec.permissions,
        )
    for name in allocation.cdi_devices:
        out.cdi_devices.add(name=name)
    return out


def to_pb_allocate_response(allocations: Sequence[ContainerAllocation]) -> pb.AllocateResponse:
    """One ContainerAllocateResponse per container request, in request order."""
    return pb.AllocateResponse(
        container_responses=[to_pb_container_response(a) for a in allocations]
    )


def to_pb_preferred_response(choices: Sequence[Sequence[str]]) -> pb.PreferredAllocationResponse:
    """One ContainerPreferredAllocationResponse per container request, in request order."""
    return pb.PreferredAllocationResponse(
        container_responses=[
            pb.ContainerPreferredAllocationResponse(deviceIDs=list(ids)) for ids in choices
        ]
    )


def to_pb_preferred_request(
    requests: Sequence[tuple[Sequence[str], Sequence[str], int]],
) -> pb.PreferredAllocationRequest:
    """A PreferredAllocationRequest from (available, must_include, size) per container."""
    return pb.PreferredAllocationRequest(
        container_requests=[
            pb.ContainerPreferredAllocationRequest(
                available_deviceIDs=list(available),
                must_include_deviceIDs=list(must),
                allocation_size=size,
            )
            for available, must, size in requests
        ]
    )


def to_pb_allocate_request(containers: Sequence[Sequence[str]]) -> pb.AllocateRequest:
    """An AllocateRequest with one ContainerAllocateRequest per list of device IDs."""
    return pb.AllocateRequest(
        container_requests=[
            pb.ContainerAllocateRequest(devices_ids=list(ids)) for ids in containers
        ]
    )


def empty() -> pb.Empty:
    """The Empty message."""
    return pb.Empty()


def pre_start_response() -> pb.PreStartContainerResponse:
    """The (empty) PreStartContainerResponse."""
    return pb.PreStartContainerResponse()
