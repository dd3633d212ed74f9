"""Plans and events for the health tests, built by hand from test inventories."""

from __future__ import annotations

from dataclasses import dataclass

from sharing.devices import Gpu, Inventory, MigDevice
from sharing.health import EVENT_XID_CRITICAL, WHOLE_GPU_SCOPE
from sharing.plan_types import Plan, ResourcePlan, Strategy, VirtualDevice
from tests.fakes.inventories import dgx_a100, with_mig

MIG_GPU = 2
MIG_LAYOUT = (("3g.20gb", 0), ("2g.10gb", 4), ("1g.5gb", 6))


@dataclass(frozen=True)
class Event:
    """An NVML event with the fields sharing.health reads."""

    gpu_index: int
    gpu_uuid: str
    xid: int
    event_type: str = EVENT_XID_CRITICAL
    gi_id: int | None = None
    ci_id: int | None = None


def node() -> Inventory:
    """dgx-a100 with MIG on GPU 2 (3g.20gb, 2g.10gb, 1g.5gb)."""
    return with_mig(dgx_a100(), {MIG_GPU: MIG_LAYOUT})


def _replicas(parent: Gpu | MigDevice, gpu: Gpu, replicas: int) -> list[VirtualDevice]:
    return [
        VirtualDevice(
            id=f"{parent.uuid}::{n}",
            physical_id=parent.uuid,
            gpu_uuid=gpu.uuid,
            gpu_index=gpu.index,
            replica=n,
            numa_node=gpu.numa_node,
            mig=parent if isinstance(parent, MigDevice) else None,
        )
        for n in range(replicas)
    ]


def gpu_resource(
    inventory: Inventory,
    name: str,
    replicas: int,
    gpus: tuple[int, ...] | None = None,
    strategy: Strategy = "time-slicing",
) -> ResourcePlan:
    """Replicated full GPUs (every non-MIG GPU unless `gpus` says which)."""
    devices: list[VirtualDevice] = []
    for gpu in inventory.gpus:
        if (gpus is None and not gpu.mig_enabled) or (gpus is not None and gpu.index in gpus):
            devices += _replicas(gpu, gpu, replicas)
    return ResourcePlan(name=name, original_name=name, strategy=strategy, devices=tuple(devices))


def mig_resources(inventory: Inventory, replicas: int) -> tuple[ResourcePlan, ...]:
    """One replicated resource per MIG profile (mixed strategy)."""
    by_profile: dict[str, list[VirtualDevice]] = {}
    for gpu in inventory.gpus:
        for mig in gpu.mig_devices:
            by_profile.setdefault(mig.profile, []).extend(_replicas(mig, gpu, replicas))
    return tuple(
        ResourcePlan(
            name=f"nvidia.com/mig-{p}", original_name=f"nvidia.com/mig-{p}",
            strategy="time-slicing", devices=tuple(d),
        )
        for p, d in by_profile.items()
    )


def mixed_plan(inventory: Inventory) -> Plan:
    """`nvidia.com/gpu` x4 on full GPUs, each MIG profile x2, and an MPS resource x2 on GPU 7."""
    full = gpu_resource(inventory, "nvidia.com/gpu", 4, gpus=(0, 1, 3, 4, 5, 6))
    mps = gpu_resource(inventory, "nvidia.com/gpu.mps", 2, gpus=(7,), strategy="mps")
    return Plan(resources=(full, *mig_resources(inventory, 2), mps))


def xid(inventory: Inventory, gpu: int, code: int, gi: int | None = None,
        ci: int | None = None, event_type: str = EVENT_XID_CRITICAL) -> Event:
    """An event for GPU `gpu` of the inventory."""
    uuid = inventory.gpu(gpu).uuid
    return Event(gpu, uuid, code, event_type, gi, ci)


def whole_gpu_scope(inventory: Inventory, gpu: int, code: int) -> Event:
    """An event carrying NVML's 0xFFFFFFFF GI/CI IDs (whole GPU)."""
    return xid(inventory, gpu, code, WHOLE_GPU_SCOPE, WHOLE_GPU_SCOPE)
