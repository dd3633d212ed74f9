"""Node labels a plan gives (facts §8), in the form GPU feature discovery uses."""

from __future__ import annotations

from collections.abc import Sequence

from sharing.devices import Inventory
from sharing.plan_types import ResourcePlan

LabelList = tuple[tuple[str, str], ...]


def _product(resource: ResourcePlan, inventory: Inventory) -> tuple[str, int]:
    """Product label value and memory (MiB) of a resource's first physical device."""
    device = resource.devices[0]
    gpu = inventory.gpu(device.gpu_index)
    if device.mig is None:
        return gpu.product, gpu.memory_mib
    profile = device.mig.profile.replace("+", ".")
    return f"{gpu.product}-MIG-{profile}", device.mig.memory_mib


def resource_labels(resources: Sequence[ResourcePlan], inventory: Inventory) -> LabelList:
    """`<res>.count/.replicas/.sharing-strategy/.product/.memory` per original resource name.

    Resources that share an original name (e.g. GPUs 0-3 renamed `gpu.shared`, GPUs 4-7 left
    `gpu`) are labelled together: count of physical devices, the smallest replica count of the
    shared part, its strategy (`mixed` if two strategies), product of the lowest-index device
    with `-SHARED` when some replicas keep the original name.
    """
    by_original: dict[str, list[ResourcePlan]] = {}
    for res in resources:
        if res.devices:
            by_original.setdefault(res.original_name, []).append(res)
    labels: list[tuple[str, str]] = []
    for original in sorted(by_original):
        group = by_original[original]
        first = min(group, key=lambda r: (r.devices[0].gpu_index, r.devices[0].index_id))
        product, memory = _product(first, inventory)
        strategies = sorted({r.strategy for r in group if r.shared})
        if any(r.shared and r.name == original for r in group):
            product += "-SHARED"
        shared = [r for r in group if r.shared] or group
        replicas = min(count for r in shared for _, count in r.replicas)
        labels += [
            (f"{original}.count", str(sum(len(r.replicas) for r in group))),
            (f"{original}.memory", str(memory)),
            (f"{original}.product", product),
            (f"{original}.replicas", str(replicas)),
            (f"{original}.sharing-strategy", _strategy_value(strategies)),
        ]
    return tuple(labels)


def _strategy_value(strategies: list[str]) -> str:
    """`none`, the one shared strategy, or `mixed`."""
    if not strategies:
        return "none"
    return strategies[0] if len(strategies) == 1 else "mixed"


def node_labels(
    resources: Sequence[ResourcePlan], inventory: Inventory, mig_strategy: str
) -> LabelList:
    """Every label of the node: per-resource labels, then MPS/MIG capability and MIG strategy."""
    node = (
        ("nvidia.com/mig.capable", _bool(any(g.mig_capable for g in inventory.gpus))),
        ("nvidia.com/mig.strategy", mig_strategy),
        ("nvidia.com/mps.capable", _bool(any(r.strategy == "mps" for r in resources))),
    )
    return resource_labels(resources, inventory) + node


def _bool(value: bool) -> str:
    """Label form of a boolean."""
    return "true" if value else "false"
