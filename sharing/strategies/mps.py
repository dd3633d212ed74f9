"""Strategy `mps`: replicas like time-slicing, served through one MPS control daemon per resource
with per-client limits (facts §4)."""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from sharing import mps
from sharing.config_models import MpsReplicatedResource
from sharing.errors import PlanError
from sharing.plan_types import MpsSpec, ResourcePlan, ServeOptions
from sharing.strategies.base import Member, ResourceGroup, expand


class MpsSharing:
    """Replicas with an active thread percentage and a pinned memory limit per client."""

    name: Literal["mps"] = "mps"

    def build_resource(self, group: ResourceGroup, options: ServeOptions) -> ResourcePlan:
        """Replicas of every member plus the MpsSpec of the resource's control daemon.

        build_plan has checked mpsRoot and migStrategy for the whole config.

        Raises:
            PlanError: MPS on MIG devices, or with more replicas than MPS clients.
        """
        for member in group.members:
            _check_member(member)
        return replace(expand(group, options, "mps"), mps=_spec(group, options))


def _check_member(member: Member) -> None:
    """One GPU under MPS: not a MIG device, not more replicas than MPS clients."""
    device = member.device
    if device.mig is not None:
        raise PlanError(
            f"{member.entry_path}: MPS is not supported for MIG devices; "
            f"it selects {device.describe()}"
        )
    pinned = _pinned_mib(member)
    if pinned > device.gpu.memory_mib:
        raise PlanError(
            f"{member.entry_path}.pinnedMemoryLimit: {pinned} MiB per client exceeds the "
            f"{device.gpu.memory_mib} MiB of {device.describe()}"
        )
    limit = mps.max_clients(device.gpu.cuda_compute_capability)
    if member.replicas > limit:
        major, minor = device.gpu.cuda_compute_capability
        raise PlanError(
            f"{member.entry_path}.replicas: {member.replicas} MPS clients on {device.describe()} "
            f"exceed the limit of {limit} per GPU (compute capability {major}.{minor})"
        )


def _thread_percentage(member: Member) -> int:
    """The member's per-client thread percentage: the entry's override or 100 / replicas."""
    entry = member.entry
    if isinstance(entry, MpsReplicatedResource) and entry.active_thread_percentage is not None:
        return entry.active_thread_percentage
    return mps.active_thread_percentage(member.replicas)


def _pinned_mib(member: Member) -> int:
    """The member's per-client pinned memory: the entry's override or total / replicas."""
    entry = member.entry
    if isinstance(entry, MpsReplicatedResource) and entry.pinned_memory_limit_mib is not None:
        return entry.pinned_memory_limit_mib
    return mps.pinned_mem_limit_mib(member.device.gpu.memory_mib, member.replicas)


def _spec(group: ResourceGroup, options: ServeOptions) -> MpsSpec:
    """The control daemon's spec. With several entries the thread limit is the smallest one."""
    members = sorted(group.members, key=lambda m: m.device.sort_key)
    paths = mps.MpsPaths(options.mps_root)
    return MpsSpec(
        resource=group.name,
        gpu_indices=tuple(m.device.gpu.index for m in members),
        gpu_uuids=tuple(m.device.gpu.uuid for m in members),
        active_thread_percentage=min(_thread_percentage(m) for m in members),
        pinned_mem_limit_mib=tuple((m.device.gpu.index, _pinned_mib(m)) for m in members),
        max_clients_per_gpu=min(
            mps.max_clients(m.device.gpu.cuda_compute_capability) for m in members
        ),
        pipe_dir=paths.pipe_dir(group.name),
        log_dir=paths.log_dir(group.name),
        shm_dir=paths.shm_dir(),
    )
