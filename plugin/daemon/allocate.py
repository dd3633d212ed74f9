"""The ContainerAllocateResponse content for one resource, from the Plan and the flags (facts §7).

Everything is computed from memory: the per-resource constant parts (control device nodes that
exist, MPS environment and mounts) are fixed when a plan is applied, never per request.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from sharing.allocation import validate_allocate
from sharing.mps import MpsPaths, pinned_mem_env
from sharing.plan_types import ResourcePlan, ServeOptions, VirtualDevice

CONTROL_DEVICE_NODES = (
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
)
VISIBLE_DEVICES_ENV = "NVIDIA_VISIBLE_DEVICES"
VOLUME_MOUNTS_ROOT = "/var/run/nvidia-container-devices"
VOLUME_MOUNTS_HOST_PATH = "/dev/null"
CDI_ANNOTATION_NAME = "nvidia-device-plugin_"
MPS_CONTAINER_ROOT = "/mps"
MPS_CONTAINER_SHM = "/dev/shm"


@dataclass(frozen=True)
class MountSpec:
    """A bind mount into the container."""

    container_path: str
    host_path: str
    read_only: bool = False


@dataclass(frozen=True)
class DeviceNodeSpec:
    """A device node made available in the container."""

    container_path: str
    host_path: str
    permissions: str = "rw"


@dataclass(frozen=True)
class ContainerAllocation:
    """What one container gets for its devices: the fields of a ContainerAllocateResponse."""

    envs: Mapping[str, str] = field(default_factory=dict)
    mounts: tuple[MountSpec, ...] = ()
    devices: tuple[DeviceNodeSpec, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)
    cdi_devices: tuple[str, ...] = ()


def existing_control_nodes(dev_root: str) -> tuple[str, ...]:
    """The control device nodes (nvidiactl, nvidia-uvm, …) that exist under `dev_root`."""
    return tuple(p for p in CONTROL_DEVICE_NODES if os.path.exists(host_path(dev_root, p)))


def host_path(dev_root: str, path: str) -> str:
    """The host path of a device node (`/dev/nvidia0`) under the driver's device root."""
    return posixpath.join(dev_root or "/", path.lstrip("/"))


def runtime_id(device: VirtualDevice, options: ServeOptions) -> str:
    """The ID handed to the container runtime (and named in CDI) under the deviceIDStrategy."""
    if options.device_id_strategy == "index":
        return device.index_id
    return device.physical_id


def mps_container_pipe_dir(resource_name: str) -> str:
    """Where a container of this MPS resource finds the control daemon's pipes."""
    return MpsPaths(MPS_CONTAINER_ROOT).pipe_dir(resource_name)


class ResourceAllocator:
    """Builds ContainerAllocations for one resource; constant parts are computed once here."""

    def __init__(
        self,
        resource: ResourcePlan,
        options: ServeOptions,
        *,
        control_nodes: Sequence[str] = (),
        response_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    ) -> None:
        self.resource = resource
        self.options = options
        self._strategies = frozenset(options.device_list_strategy)
        self._response_id = response_id
        self._control_specs = tuple(
            DeviceNodeSpec(p, host_path(options.nvidia_dev_root, p)) for p in control_nodes
        )
        self._mps_envs: dict[str, str] = {}
        self._mps_mounts: tuple[MountSpec, ...] = ()
        self._mps_limits: dict[int, int] = {}
        if resource.mps is not None:
            spec = resource.mps
            pipe = mps_container_pipe_dir(resource.name)
            self._mps_envs = {
                "CUDA_MPS_PIPE_DIRECTORY": pipe,
                "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(spec.active_thread_percentage),
            }
            self._mps_mounts = (
                MountSpec(pipe, spec.pipe_dir),
                MountSpec(MPS_CONTAINER_SHM, spec.shm_dir),
            )
            self._mps_limits = dict(spec.pinned_mem_limit_mib)

    def allocate(self, ids: Sequence[str]) -> ContainerAllocation:
        """The allocation for one container request.

        Raises:
            InvalidRequest: unknown ID, repeated ID, or too many replicas (message names the
                resource and the ID).
        """
        validate_allocate(self.resource, ids)
        devices = self._physical_devices(ids)
        ids_out = [runtime_id(d, self.options) for d in devices]
        envs, mounts, annotations, cdi = self._device_list(ids_out)
        if self.resource.mps is not None:
            envs.update(self._mps_envs)
            envs["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = self._pinned_limits(devices)
            mounts.extend(self._mps_mounts)
        return ContainerAllocation(
            envs=envs,
            mounts=tuple(mounts),
            devices=self._device_specs(devices),
            annotations=annotations,
            cdi_devices=cdi,
        )

    def _device_list(
        self, runtime_ids: Sequence[str]
    ) -> tuple[dict[str, str], list[MountSpec], dict[str, str], tuple[str, ...]]:
        """Envs, mounts, annotations and CDI devices naming the devices, per deviceListStrategy."""
        envs: dict[str, str] = {}
        mounts: list[MountSpec] = []
        annotations: dict[str, str] = {}
        cdi: tuple[str, ...] = ()
        if "envvar" in self._strategies:
            envs[VISIBLE_DEVICES_ENV] = ",".join(runtime_ids)
        if "volume-mounts" in self._strategies:
            envs[VISIBLE_DEVICES_ENV] = VOLUME_MOUNTS_ROOT
            mounts.extend(
                MountSpec(posixpath.join(VOLUME_MOUNTS_ROOT, i), VOLUME_MOUNTS_HOST_PATH)
                for i in runtime_ids
            )
        cdi_names = [f"{self.options.cdi_kind}={i}" for i in runtime_ids]
        if "cdi-annotations" in self._strategies:
            key = f"{self.options.cdi_annotation_prefix}{CDI_ANNOTATION_NAME}{self._response_id()}"
            annotations[key] = ",".join(cdi_names)
        if "cdi-cri" in self._strategies:
            cdi = tuple(cdi_names)
        return envs, mounts, annotations, cdi

    def _physical_devices(self, ids: Sequence[str]) -> list[VirtualDevice]:
        """One device per physical parent, replica suffixes dropped, request order kept."""
        seen: dict[str, VirtualDevice] = {}
        for device_id in ids:
            device = self.resource.device(device_id)
            if device is not None:
                seen.setdefault(device.physical_id, device)
        return list(seen.values())

    def _device_specs(self, devices: Sequence[VirtualDevice]) -> tuple[DeviceNodeSpec, ...]:
        """Control nodes plus each device's own nodes, when passDeviceSpecs is on."""
        if not self.options.pass_device_specs:
            return ()
        specs = dict.fromkeys(self._control_specs)
        for device in devices:
            for path in device.dev_paths:
                host = host_path(self.options.nvidia_dev_root, path)
                specs.setdefault(DeviceNodeSpec(path, host))
        return tuple(specs)

    def _pinned_limits(self, devices: Sequence[VirtualDevice]) -> str:
        """`<ordinal>=<MiB>M,...` for the allocation's GPUs, numbered as the container sees them."""
        indices = sorted({d.gpu_index for d in devices})
        return pinned_mem_env(
            tuple(
                (ordinal, self._mps_limits[index])
                for ordinal, index in enumerate(indices)
                if index in self._mps_limits
            )
        )


def build_allocators(
    resources: Sequence[ResourcePlan], options: ServeOptions
) -> dict[str, ResourceAllocator]:
    """One allocator per resource; checks once which control device nodes exist."""
    control = existing_control_nodes(options.nvidia_dev_root) if options.pass_device_specs else ()
    return {
        r.name: ResourceAllocator(r, options, control_nodes=control) for r in resources
    }
