"""Planning a MIG config against a node: select GPUs, resolve profiles, place, diff. Pure.

`plan_config(config, gpus)` answers, for every GPU of the node, what it has, what the config wants
it to have (explicit placements) and the steps between, or raises one `MigPlanError` that names
every GPU the config cannot be applied to and why, before anything is touched. `plan_requests`
does the same from already-resolved requests (a journal being resumed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sharing.errors import MigPlanError
from sharing.mig.diff import Step, diff
from sharing.mig.layout import GpuMigState, Layout, LayoutRequest
from sharing.mig.names import profile_names, resolve
from sharing.mig.parted import MigConfig, MigEntry
from sharing.mig.solver import Unplaceable, place
from sharing.ranges import index_ranges


@dataclass(frozen=True)
class GpuPlan:
    """One GPU: where the config selects it, what it has, what it should have, and the steps.

    `request` and `desired` are None for a GPU the config does not select (left untouched).
    """

    index: int
    uuid: str
    label: str
    current: str  # the current state in words (GpuMigState.describe)
    entry: str | None  # the selecting entry's key path
    request: LayoutRequest | None
    desired: Layout | None
    steps: tuple[Step, ...]

    @property
    def changed(self) -> bool:
        """Whether applying touches this GPU."""
        return bool(self.steps)


@dataclass(frozen=True)
class MigPlan:
    """A config planned against one node: per GPU current, desired and steps.

    `node` is the node's identity: its GPU UUIDs by index. Steps are what the node needs at the
    moment it was read; applying re-reads each GPU and recomputes them.
    """

    config: str
    source: str
    node: tuple[str, ...]
    gpus: tuple[GpuPlan, ...]

    @property
    def changed_gpus(self) -> tuple[int, ...]:
        """Indices of the GPUs applying would touch."""
        return tuple(g.index for g in self.gpus if g.changed)

    @property
    def requests(self) -> dict[int, LayoutRequest]:
        """GPU index -> what the config asks of it, for every selected GPU."""
        return {g.index: g.request for g in self.gpus if g.request is not None}

    @property
    def steps(self) -> tuple[Step, ...]:
        """Every step, GPU by GPU."""
        return tuple(s for g in self.gpus for s in g.steps)

    def differences(self) -> tuple[str, ...]:
        """Per GPU that differs from the config: what it has and what the config wants."""
        return tuple(
            f"{g.label}: has {g.current}; config {self.config!r} wants {g.request.describe()}"
            for g in self.gpus
            if g.changed and g.request is not None
        )


def plan_config(config: MigConfig, gpus: Sequence[GpuMigState]) -> MigPlan:
    """Plan a named mig-parted config on a node.

    Raises:
        MigPlanError: an entry names a GPU the node lacks, entries overlap, a profile is
            unknown to a GPU, or a layout does not fit; every failing GPU is named.
    """
    selected, problems = _select(config, gpus)
    requests: dict[int, LayoutRequest] = {}
    for gpu in gpus:
        entry = selected.get(gpu.index)
        if entry is None:
            continue
        try:
            requests[gpu.index] = _resolve(entry, gpu)
        except Unplaceable as err:
            problems.append((gpu, str(err)))
    if problems:
        raise MigPlanError(_message(config.source, config.name, problems))
    where = {i: e.where for i, e in selected.items()}
    return plan_requests(config.name, config.source, gpus, requests, where)


def plan_requests(
    name: str,
    source: str,
    gpus: Sequence[GpuMigState],
    requests: Mapping[int, LayoutRequest],
    where: Mapping[int, str] | None = None,
) -> MigPlan:
    """Place and diff resolved requests (GPU index -> request) on a node.

    Raises:
        MigPlanError: a request does not fit its GPU, or names a GPU the node lacks.
    """
    by_index = {g.index: g for g in gpus}
    problems: list[tuple[GpuMigState | None, str]] = []
    missing = sorted(set(requests) - set(by_index))
    if missing:
        problems.append((None, f"GPU {missing[0]} does not exist (the node has {len(gpus)} GPUs)"))
    plans = []
    for gpu in gpus:
        request = requests.get(gpu.index)
        desired: Layout | None = None
        steps: tuple[Step, ...] = ()
        if request is not None:
            try:
                desired = desired_layout(gpu, request)
            except Unplaceable as err:
                problems.append((gpu, str(err)))
                continue
            steps = diff(gpu, desired)
        entry = (where or {}).get(gpu.index, "journal" if request is not None else None)
        plans.append(
            GpuPlan(gpu.index, gpu.uuid, gpu.label, gpu.describe(), entry, request, desired, steps)
        )
    if problems:
        raise MigPlanError(_message(source, name, problems))
    return MigPlan(name, source, tuple(g.uuid for g in gpus), tuple(plans))


def desired_layout(gpu: GpuMigState, request: LayoutRequest) -> Layout:
    """The placements for a request on this GPU, keeping what it already has where possible.

    Raises:
        Unplaceable: the GPU is lost or not MIG capable, a profile is unknown to it, or the
            profiles do not fit.
    """
    if gpu.lost_reason:
        raise Unplaceable(f"the GPU is lost ({gpu.lost_reason})")
    if not request.mig_enabled:
        return Layout(False)
    if not gpu.mig_capable:
        raise Unplaceable("not MIG capable")
    by_name = {p.name: p for p in gpu.profiles}
    unknown = [name for name, _ in request.counts if name not in by_name]
    if unknown:
        raise Unplaceable(
            f"unknown MIG profile {unknown[0]!r}; valid profiles: {profile_names(gpu.profiles)}"
        )
    keep = [gi.placement for gi in gpu.instances] if gpu.mig_current else []
    placements = place([(by_name[name], n) for name, n in request.counts], keep)
    return Layout(True, placements)


def _select(
    config: MigConfig, gpus: Sequence[GpuMigState]
) -> tuple[dict[int, MigEntry], list[tuple[GpuMigState | None, str]]]:
    """GPU index -> the entry that selects it; problems for bad indices and overlaps."""
    selected: dict[int, MigEntry] = {}
    problems: list[tuple[GpuMigState | None, str]] = []
    indices = {g.index for g in gpus}
    for entry in config.entries:
        for index in entry.devices or ():
            if index not in indices:
                problems.append(
                    (
                        None,
                        f"{entry.where}.devices: GPU {index} does not exist "
                        f"(the node has {len(gpus)} GPUs)",
                    )
                )
        for gpu in gpus:
            if not entry.selects(gpu.index, gpu.pci_device_id, gpu.pci_subsystem_id):
                continue
            if gpu.index in selected:
                problems.append(
                    (gpu, f"selected by both {selected[gpu.index].where} and {entry.where}")
                )
                continue
            selected[gpu.index] = entry
    return selected, problems


def _resolve(entry: MigEntry, gpu: GpuMigState) -> LayoutRequest:
    """The entry's request with profile names resolved in this GPU's own profile list."""
    if gpu.lost_reason:
        raise Unplaceable(f"the GPU is lost ({gpu.lost_reason})")
    if not entry.mig_enabled:
        return LayoutRequest(False)
    if not gpu.mig_capable:
        raise Unplaceable("not MIG capable")
    counts: dict[str, int] = {}
    for name, count in entry.mig_devices:
        profile = resolve(name, gpu.profiles)
        if profile is None:
            raise Unplaceable(
                f"unknown MIG profile {name.text!r}; valid profiles: {profile_names(gpu.profiles)}"
            )
        if name.partial_compute:
            raise Unplaceable(
                f"{name.text}: a compute instance smaller than its GPU instance is "
                f"not supported; gpushare creates full MIG devices ({name.name})"
            )
        counts[profile.name] = counts.get(profile.name, 0) + count
    return LayoutRequest(True, tuple(counts.items()))


def _message(source: str, name: str, problems: list[tuple[GpuMigState | None, str]]) -> str:
    """One line: `<file>: config "x": GPU 0-7 (NVIDIA H100 80GB HBM3): <reason>; ...`."""
    groups: dict[tuple[str, str], list[int]] = {}
    loose: list[str] = []
    for gpu, reason in problems:
        if gpu is None:
            if reason not in loose:
                loose.append(reason)
            continue
        groups.setdefault((gpu.name, reason), []).append(gpu.index)
    parts = list(loose)
    for (model, reason), indices in groups.items():
        label = f"GPU {index_ranges(indices)}" + (f" ({model})" if model else "")
        parts.append(f"{label}: {reason}")
    return f"{source}: config {name!r}: " + "; ".join(parts)


