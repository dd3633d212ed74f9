"""MIG strategies `none`, `single` and `mixed`: which physical devices a node has to advertise,
and under which original resource name (facts §6.1). Custom names come from `resources:`."""

from __future__ import annotations

from collections.abc import Sequence

from sharing.config_models import DEFAULT_PREFIX, NamedPattern, Resources
from sharing.devices import Gpu, Inventory
from sharing.errors import PlanError
from sharing.strategies.base import PhysicalDevice

DEFAULT_GPU_RESOURCE = f"{DEFAULT_PREFIX}/gpu"


def mig_resource_name(profile: str) -> str:
    """`nvidia.com/mig-<profile>` with `+` replaced by `.` (e.g. `mig-1g.5gb.me`)."""
    return f"{DEFAULT_PREFIX}/mig-{profile.replace('+', '.')}"


def _named(patterns: Sequence[NamedPattern], text: str, default: str) -> str:
    """The name of the first pattern matching `text`, else the default name."""
    for pattern in patterns:
        if pattern.matches(text):
            return pattern.name
    return default


def physical_devices(
    inventory: Inventory, mig_strategy: str, resources: Resources
) -> list[tuple[str, PhysicalDevice]]:
    """(original resource name, device) for every device the node advertises, in index order.

    Raises:
        PlanError: migStrategy single on a node that breaks its preconditions.
    """
    gpus = sorted(inventory.gpus, key=lambda g: g.index)
    if mig_strategy == "single":
        check_single(gpus)
    out: list[tuple[str, PhysicalDevice]] = []
    for gpu in gpus:
        gpu_name = _named(resources.gpus, gpu.name, DEFAULT_GPU_RESOURCE)
        if mig_strategy == "none" or not gpu.mig_enabled:
            out.append((gpu_name, PhysicalDevice(gpu)))
            continue
        for mig in sorted(gpu.mig_devices, key=lambda m: m.index):
            if mig_strategy == "single":
                name = gpu_name
            else:
                name = _named(resources.mig, mig.profile, mig_resource_name(mig.profile))
            out.append((name, PhysicalDevice(gpu, mig)))
    return out


def check_single(gpus: Sequence[Gpu]) -> None:
    """migStrategy single: MIG GPUs all have MIG devices, of one profile, and no full GPUs.

    Raises:
        PlanError: naming the GPUs that break the rule.
    """
    mig_gpus = [g for g in gpus if g.mig_enabled]
    if not mig_gpus:
        return
    full = [g for g in gpus if not g.mig_enabled]
    if full:
        raise PlanError(
            f"migStrategy single: GPUs {_indices(mig_gpus)} have MIG enabled and GPUs "
            f"{_indices(full)} do not; enable MIG on every GPU or use migStrategy mixed"
        )
    empty = [g for g in mig_gpus if not g.mig_devices]
    if empty:
        raise PlanError(
            f"migStrategy single: GPUs {_indices(empty)} have MIG enabled but no MIG devices; "
            "create MIG devices on them or disable MIG"
        )
    profiles: dict[str, list[Gpu]] = {}
    for gpu in mig_gpus:
        for mig in gpu.mig_devices:
            holders = profiles.setdefault(mig.profile, [])
            if gpu not in holders:
                holders.append(gpu)
    if len(profiles) > 1:
        found = "; ".join(f"{p} on GPUs {_indices(gs)}" for p, gs in sorted(profiles.items()))
        raise PlanError(
            f"migStrategy single needs one MIG profile on the whole node, found {found}; "
            "use migStrategy mixed"
        )


def _indices(gpus: Sequence[Gpu]) -> str:
    """GPU indices as `0, 1, 2`."""
    return ", ".join(str(g.index) for g in gpus)
