"""build_plan: what the node serves, derived purely from an Inventory and a Config.

`build_plan` (inventory, config) -> Plan is pure: no I/O, no clock, no environment. The Plan's
value types live in `sharing.plan_types`.
"""

from __future__ import annotations

from sharing import message_budget as mb
from sharing.config_models import Config
from sharing.devices import Inventory
from sharing.errors import PlanError
from sharing.labels import node_labels
from sharing.mps import SHM_DIR_NAME
from sharing.plan_types import Plan, ResourcePlan, ServeOptions
from sharing.strategies.base import ResourceGroup
from sharing.strategies.mig import physical_devices
from sharing.strategies.registry import strategy_for
from sharing.strategies.selection import build_groups


def serve_options(config: Config) -> ServeOptions:
    """ServeOptions from a config's (already overridden) flags."""
    flags = config.flags
    plugin = flags.plugin
    return ServeOptions(
        device_list_strategy=plugin.device_list_strategy,  # type: ignore[arg-type]
        device_id_strategy=plugin.device_id_strategy,
        pass_device_specs=plugin.pass_device_specs,
        cdi_annotation_prefix=plugin.cdi_annotation_prefix,
        cdi_kind=plugin.cdi_kind,
        nvidia_dev_root=flags.dev_root,
        container_driver_root=plugin.container_driver_root,
        shared_devices_allocation_policy=plugin.shared_devices_allocation_policy,
        mig_strategy=flags.mig_strategy,
        mps_root=flags.mps_root,
    )


def build_plan(inventory: Inventory, config: Config) -> Plan:
    """The Plan a node serves: resources and virtual devices from the inventory and the config.

    Pure: no I/O. Resources come in name order.

    Raises:
        PlanError: the config cannot be applied to this node (unknown device reference, MIG
            single preconditions, MPS on MIG devices or with migStrategy mixed, MPS without
            mpsRoot, too many MPS clients, overlapping entries, clashing names, more devices
            in one resource than its ListAndWatch message may carry).
    """
    options = serve_options(config)
    _check_mps_flags(config, options)
    physical = physical_devices(inventory, options.mig_strategy, config.resources)
    groups = build_groups(config, inventory, physical)
    for group in groups:
        check_message_budget(group)
    resources = sorted(
        (strategy_for(g.strategy).build_resource(g, options) for g in groups),
        key=lambda r: r.name,
    )
    _check_suffixes(resources)
    _check_mps_dirs(resources)
    return Plan(
        resources=tuple(resources),
        options=options,
        labels=node_labels(resources, inventory, options.mig_strategy),
        topology=inventory.link_scores,
    )


def _check_mps_flags(config: Config, options: ServeOptions) -> None:
    """MPS needs mpsRoot and a migStrategy other than mixed, whatever devices the node has.

    Raises:
        PlanError: naming the flag, its value and what is allowed.
    """
    if config.sharing.mps is None:
        return
    if options.mig_strategy == "mixed":
        raise PlanError(
            'sharing.mps: MPS cannot be used with flags.migStrategy "mixed"; '
            'use migStrategy "none" or "single"'
        )
    if not options.mps_root:
        raise PlanError(
            "sharing.mps: MPS needs flags.mpsRoot (or MPS_ROOT / --mps-root), "
            "e.g. /run/nvidia/mps; it is not set"
        )
    if not options.mps_root.startswith("/"):
        raise PlanError(
            "sharing.mps: flags.mpsRoot (or MPS_ROOT / --mps-root) must be an absolute path, "
            f"got {options.mps_root!r}"
        )


def _check_mps_dirs(resources: list[ResourcePlan]) -> None:
    """An MPS resource named `shm` would put its pipe directory inside `<mpsRoot>/shm`, the
    world-writable directory clients get as /dev/shm, where any client could plant it.

    Raises:
        PlanError: naming the resource and the directory it would share.
    """
    for res in resources:
        if res.mps is not None and res.suffix == SHM_DIR_NAME:
            raise PlanError(
                f'MPS resource "{res.name}" would keep its pipe directory {res.mps.pipe_dir} '
                f"inside the shared memory directory {res.mps.shm_dir}, which every client "
                "can write; rename the resource"
            )


def check_message_budget(group: ResourceGroup) -> None:
    """Refuse a resource with more devices than one ListAndWatch message may carry.

    Counted before any device is built, so a huge replica count costs nothing.

    Raises:
        PlanError: naming the config entry, the device count and the message size it needs.
    """
    shared = group.strategy != "none"
    count = sum(m.replicas if shared else 1 for m in group.members)
    size = 0
    for member in group.members:
        numa = mb.WORST_NUMA if member.device.gpu.numa_node is not None else None
        ids = len(member.device.uuid)
        lengths = mb.replica_id_lengths(ids, member.replicas) if shared else [ids]
        size += sum(mb.device_entry_bytes(n, numa_node=numa) for n in lengths)
    if count <= mb.MAX_DEVICES_PER_RESOURCE and size <= mb.LARGEST_MESSAGE_BYTES:
        return
    paths = list(dict.fromkeys(m.entry_path for m in group.members if m.entry_path))
    where = ", ".join(paths) or group.section_path or "resources"
    counts = sorted({m.replicas for m in group.members})
    how = (f" ({len(group.members)} devices x {counts[0]} replicas)"
           if shared and len(counts) == 1 else "")
    raise PlanError(
        f'{where}: "{group.name}" would have {count:,} devices{how}, a ListAndWatch message of '
        f"up to {size:,} bytes; at most {mb.MAX_DEVICES_PER_RESOURCE:,} devices and "
        f"{mb.LARGEST_MESSAGE_BYTES:,} bytes per resource are allowed (the kubelet drops a "
        f"plugin whose message exceeds {mb.KUBELET_MAX_MESSAGE_BYTES:,} bytes)"
    )


def _check_suffixes(resources: list[ResourcePlan]) -> None:
    """Socket names come from the name after the domain, so those must be unique."""
    seen: dict[str, str] = {}
    for res in resources:
        other = seen.setdefault(res.suffix, res.name)
        if other != res.name:
            raise PlanError(
                f'resources "{other}" and "{res.name}" would share the socket {res.socket_name}; '
                "rename one of them"
            )
