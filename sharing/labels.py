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


MIXED = "mixed"
MAX_NAME_LEN = 63  # the part of a label key after the prefix


def resource_labels(resources: Sequence[ResourcePlan], inventory: Inventory) -> LabelList:
    """`<res>.count/.replicas/.sharing-strategy/.product/.memory` per original resource name.

    Resources that share an original name (e.g. GPUs 0-3 renamed `gpu.shared`, GPUs 4-7 left
    `gpu`) are labelled together: the count of physical devices; a replica count and a strategy
    only when every device under the name has the same one, `mixed` otherwise (an unshared GPU
    counts as strategy `none`, 1 replica); the product of the lowest-index device, with
    `-SHARED` when some replicas keep the original name. When a name is mixed, each advertised
    resource under another name also gets its own `.count/.replicas/.sharing-strategy`.
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
        if any(r.shared and r.name == original for r in group):
            product += "-SHARED"
        sharing = _sharing_labels(original, group)
        labels += [*sharing, (f"{original}.memory", str(memory)), (f"{original}.product", product)]
        if any(value == MIXED for _, value in sharing):
            for res in sorted(group, key=lambda r: r.name):
                if res.name != original and _key_fits(res.name, ".sharing-strategy"):
                    labels += _sharing_labels(res.name, [res])
    first_seen: dict[str, str] = {}
    for key, value in labels:  # an advertised name equal to another original name: first wins
        first_seen.setdefault(key, value)
    return tuple(sorted(first_seen.items()))


def _sharing_labels(name: str, group: Sequence[ResourcePlan]) -> LabelList:
    """`.count`, `.replicas` and `.sharing-strategy` of the devices under `name`."""
    counts = {count for r in group for _, count in r.replicas}
    strategies = {r.strategy for r in group}
    return (
        (f"{name}.count", str(sum(len(r.replicas) for r in group))),
        (f"{name}.replicas", str(counts.pop()) if len(counts) == 1 else MIXED),
        (f"{name}.sharing-strategy", strategies.pop() if len(strategies) == 1 else MIXED),
    )


def _key_fits(name: str, suffix: str) -> bool:
    """True when `<name><suffix>` is a valid label key (the part after `/` <= 63 characters)."""
    return len(name.rsplit("/", 1)[-1] + suffix) <= MAX_NAME_LEN


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
