"""From config entries to resource groups: resolve `devices`, check overlaps, apply names.

Each `sharing.<strategy>.resources[i]` entry selects devices of its resource (`all`, the first N,
or a list of references); selected devices become replicas under the advertised name (`rename`,
else `<name>.shared` with renameByDefault, else the name itself). Devices no entry selects stay
unshared under their original name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sharing.config_models import Config, Mps, ReplicatedResource, TimeSlicing, resource_name
from sharing.devices import Gpu, Inventory
from sharing.errors import PlanError
from sharing.plan_types import Strategy
from sharing.strategies.base import Member, PhysicalDevice, ResourceGroup

SHARED_SUFFIX = ".shared"


@dataclass(frozen=True)
class Entry:
    """One `sharing.<strategy>.resources[i]` entry with where it sits and what it advertises."""

    path: str
    section_path: str
    strategy: Strategy
    section: TimeSlicing | Mps
    entry: ReplicatedResource

    @property
    def advertised(self) -> str:
        """Advertised name: rename, else `<name>.shared` with renameByDefault, else name."""
        if self.entry.rename:
            return self.entry.rename
        if self.section.rename_by_default:
            try:
                return resource_name(self.entry.name + SHARED_SUFFIX)
            except ValueError as err:
                raise PlanError(f"{self.path}.name: with renameByDefault, {err}") from None
        return self.entry.name


def entries(config: Config) -> list[Entry]:
    """Every sharing entry of the config, time-slicing first."""
    out: list[Entry] = []
    sections: list[tuple[str, Strategy, TimeSlicing | Mps | None]] = [
        ("sharing.timeSlicing", "time-slicing", config.sharing.time_slicing),
        ("sharing.mps", "mps", config.sharing.mps),
    ]
    for section_path, strategy, section in sections:
        if section is None:
            continue
        for i, entry in enumerate(section.resources):
            path = f"{section_path}.resources[{i}]"
            out.append(Entry(path, section_path, strategy, section, entry))
    return out


class _Resolver:
    """Resolves device references of entries against the node's advertisable devices."""

    def __init__(
        self, inventory: Inventory, physical: Sequence[tuple[str, PhysicalDevice]]
    ) -> None:
        self.inventory = inventory
        self.physical = physical
        self.name_of = {d.uuid: name for name, d in physical}
        self.by_index = {g.index: g for g in inventory.gpus}

    def members(self, name: str) -> list[PhysicalDevice]:
        """Devices advertised under an original name, in index order."""
        return [d for n, d in self.physical if n == name]

    def select(self, entry: Entry) -> list[PhysicalDevice]:
        """The devices an entry selects, in index order, without duplicates."""
        devices = entry.entry.devices
        pool = self.members(entry.entry.name)
        if devices == "all":
            return pool
        if isinstance(devices, int):
            if devices > len(pool):
                raise PlanError(
                    f"{entry.path}.devices: asks for {devices} devices but this node has "
                    f'{len(pool)} "{entry.entry.name}" devices'
                )
            return pool[:devices]
        chosen: dict[str, PhysicalDevice] = {}
        for pos, ref in enumerate(devices):
            where = f"{entry.path}.devices[{pos}]"
            for device in self._resolve(ref, entry.entry.name, where):
                chosen.setdefault(device.uuid, device)
        return sorted(chosen.values(), key=lambda d: d.sort_key)

    def _resolve(self, ref: str, name: str, where: str) -> list[PhysicalDevice]:
        """The devices of resource `name` that one reference means."""
        if ref.isdigit():
            return self._gpu_devices(self._gpu_at(int(ref), where).uuid, name, where)
        if ":" in ref and not ref.startswith(("GPU-", "MIG-")):
            gpu_text, mig_text = ref.split(":", 1)
            gpu = self._gpu_at(int(gpu_text), where)
            mig = next((m for m in gpu.mig_devices if m.index == int(mig_text)), None)
            if mig is None or not gpu.mig_enabled:
                have = ", ".join(f"{gpu.index}:{m.index}" for m in gpu.mig_devices)
                detail = (
                    f"its MIG devices are {have}"
                    if have and gpu.mig_enabled
                    else ("it has no MIG devices")
                )
                raise PlanError(f"{where}: GPU {gpu.index} has no MIG device {ref} ({detail})")
            return [self._member(PhysicalDevice(gpu, mig), name, where)]
        if ref.startswith("GPU-"):
            if self.inventory.gpu_by_uuid(ref) is None:
                raise PlanError(f"{where}: no GPU with UUID {ref} on this node")
            return self._gpu_devices(ref, name, where)
        return [self._member(self._mig_by_uuid(ref, where), name, where)]

    def _gpu_at(self, index: int, where: str) -> Gpu:
        """The GPU with an index, or a PlanError listing the node's indices."""
        gpu = self.by_index.get(index)
        if gpu is None:
            raise PlanError(
                f"{where}: no GPU with index {index} on this node "
                f"({_known_indices(sorted(self.by_index))})"
            )
        return gpu

    def _gpu_devices(self, gpu_uuid: str, name: str, where: str) -> list[PhysicalDevice]:
        """A GPU reference: the GPU itself, or its MIG devices of resource `name`."""
        found = [d for n, d in self.physical if d.gpu.uuid == gpu_uuid and n == name]
        if not found:
            gpu = self.inventory.gpu(self._index_of(gpu_uuid))
            names = sorted({n for n, d in self.physical if d.gpu.uuid == gpu_uuid})
            served = f"it is advertised as {', '.join(names)}" if names else "it has no devices"
            raise PlanError(
                f'{where}: GPU {gpu.index} ({gpu_uuid}) has no "{name}" devices ({served})'
            )
        return found

    def _index_of(self, gpu_uuid: str) -> int:
        """Index of a GPU known by UUID."""
        return next(g.index for g in self.inventory.gpus if g.uuid == gpu_uuid)

    def _mig_by_uuid(self, ref: str, where: str) -> PhysicalDevice:
        """A MIG device by UUID, or by the legacy `MIG-GPU-<uuid>/<gi>/<ci>` form."""
        for gpu in self.inventory.gpus:
            for mig in gpu.mig_devices:
                legacy = f"MIG-{gpu.uuid}/{mig.gi_id}/{mig.ci_id}"
                if ref in (mig.uuid, legacy):
                    return PhysicalDevice(gpu, mig)
        raise PlanError(f"{where}: no MIG device with UUID {ref} on this node")

    def _member(self, device: PhysicalDevice, name: str, where: str) -> PhysicalDevice:
        """The device if it belongs to resource `name`, else a PlanError saying where it is."""
        actual = self.name_of.get(device.uuid)
        if actual != name:
            served = f'it is advertised as "{actual}"' if actual else "it is not advertised"
            raise PlanError(f'{where}: {device.describe()} is not a "{name}" device ({served})')
        return device


def build_groups(
    config: Config, inventory: Inventory, physical: Sequence[tuple[str, PhysicalDevice]]
) -> list[ResourceGroup]:
    """Resource groups of the node: shared ones from the entries, then the unshared rest.

    Raises:
        PlanError: an unknown or foreign device reference, two entries selecting one device,
            one name advertised by different strategies or resources, or a shared name that
            unselected devices would also be advertised under.
    """
    resolver = _Resolver(inventory, physical)
    claimed: dict[str, Entry] = {}
    shared: dict[str, list[tuple[Entry, PhysicalDevice]]] = {}
    all_entries = entries(config)
    names = [entry.advertised for entry in all_entries]  # checks every name, even unused ones
    for entry, name in zip(all_entries, names, strict=True):
        for device in resolver.select(entry):
            if device.uuid in claimed:
                raise PlanError(
                    f"{claimed[device.uuid].path} and {entry.path} both select "
                    f"{device.describe()}; a device can be shared by one entry only"
                )
            claimed[device.uuid] = entry
            shared.setdefault(name, []).append((entry, device))
    groups = [_shared_group(name, picks) for name, picks in shared.items()]
    unshared: dict[str, list[PhysicalDevice]] = {}
    for name, device in physical:
        if device.uuid not in claimed:
            unshared.setdefault(name, []).append(device)
    for name, devices in unshared.items():
        if name in shared:
            _conflict(name, shared[name][0][0], devices)
        groups.append(ResourceGroup(name, name, "none", tuple(Member(d) for d in devices)))
    return groups


def _shared_group(name: str, picks: list[tuple[Entry, PhysicalDevice]]) -> ResourceGroup:
    """One shared resource from the entries that advertise `name`."""
    first = picks[0][0]
    for entry, _ in picks:
        if entry.strategy != first.strategy or entry.entry.name != first.entry.name:
            raise PlanError(
                f'{first.path} ({first.strategy}, "{first.entry.name}") and {entry.path} '
                f'({entry.strategy}, "{entry.entry.name}") both advertise "{name}"; '
                "give one of them another name with rename"
            )
    members = tuple(
        Member(device, entry.entry.replicas, entry.entry, entry.path) for entry, device in picks
    )
    return ResourceGroup(
        name=name,
        original_name=first.entry.name,
        strategy=first.strategy,
        members=members,
        fail_requests_greater_than_one=_fail_requests(name, [e for e, _ in picks]),
        section_path=first.section_path,
    )


def _fail_requests(name: str, group: list[Entry]) -> bool:
    """failRequestsGreaterThanOne of a resource: the entries' value, else the section's."""
    values: dict[bool, str] = {}
    for entry in group:
        own = entry.entry.fail_requests_greater_than_one
        value = entry.section.fail_requests_greater_than_one if own is None else own
        values.setdefault(value, entry.path)
    if len(values) > 1:
        raise PlanError(
            f'{values[True]} and {values[False]} both serve "{name}" but disagree on '
            "failRequestsGreaterThanOne; set the same value on both"
        )
    return next(iter(values))


def _conflict(name: str, entry: Entry, rest: list[PhysicalDevice]) -> None:
    """A shared name that unselected devices would also be advertised under."""
    listed = ", ".join(d.describe() for d in rest[:3]) + (" …" if len(rest) > 3 else "")
    raise PlanError(
        f'{entry.path}: advertises "{name}" with {entry.strategy} replicas, but {len(rest)} '
        f"devices it does not select ({listed}) would be advertised unshared under the same "
        "name; set rename (or renameByDefault) or select every device of the resource"
    )


def _known_indices(indices: list[int]) -> str:
    """`indices 0-7`, `index 0 only` or `no GPUs`."""
    if not indices:
        return "it has no GPUs"
    if len(indices) == 1:
        return f"index {indices[0]} only"
    return f"indices {_ranges(indices)}"


def _ranges(indices: list[int]) -> str:
    """`0-7` or `0-3, 6` for sorted integers."""
    parts: list[str] = []
    for value in indices:
        if parts and value == _last(parts) + 1:
            start = parts[-1].split("-")[0]
            parts[-1] = f"{start}-{value}"
        else:
            parts.append(str(value))
    return ", ".join(parts)


def _last(parts: list[str]) -> int:
    """The last number of the last range."""
    return int(parts[-1].rsplit("-", 1)[-1])
