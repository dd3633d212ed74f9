"""Allocation policies for GetPreferredAllocation and request checks for Allocate (facts §3).

Everything here works on the Plan alone: no NVML, no disk. Full GPUs are chosen by topology
(the set with the highest sum of pairwise link scores), replicas by the `distributed` or `packed`
greedy policy, and MIG devices grouped by their parent GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from math import comb

from sharing.errors import InvalidRequest
from sharing.message_budget import MAX_DEVICES_PER_RESOURCE
from sharing.plan_types import Plan, ResourcePlan, VirtualDevice
from sharing.text import short_repr

# Bounds of one kubelet request: no resource has more IDs than MAX_DEVICES_PER_RESOURCE, and
# gpushare's longest ID has 55 characters.
MAX_CONTAINERS_PER_REQUEST = 256
MAX_IDS_PER_CONTAINER = MAX_DEVICES_PER_RESOURCE
MAX_ID_CHARS = 256

# Above this many candidate sets, full-GPU selection switches from exhaustive search to greedy.
MAX_EXHAUSTIVE_SETS = 5000

FAIL_GREATER_THAN_ONE = (
    'invalid allocation request for "{resource}": invalid request: '
    "maximum request size for shared resources is 1; found {n}"
)


def check_container_count(method: str, resource_name: str, containers: int) -> None:
    """Refuse a request with more container requests than MAX_CONTAINERS_PER_REQUEST.

    Raises:
        InvalidRequest: naming the resource, the count and the bound.
    """
    if containers > MAX_CONTAINERS_PER_REQUEST:
        raise InvalidRequest(
            f'invalid {method} request for "{resource_name}": {containers:,} container '
            f"requests; at most {MAX_CONTAINERS_PER_REQUEST}"
        )


def check_id_lists(method: str, resource_name: str, id_lists: Sequence[Sequence[str]]) -> None:
    """Refuse ID lists past the bounds before any ID is looked up.

    Raises:
        InvalidRequest: too many IDs in one list, or an ID longer than MAX_ID_CHARS; the message
            names the resource and the bound.
    """
    where = f'invalid {method} request for "{resource_name}"'
    for ids in id_lists:
        if len(ids) > MAX_IDS_PER_CONTAINER:
            raise InvalidRequest(
                f"{where}: {len(ids):,} device IDs in one container request; "
                f"at most {MAX_IDS_PER_CONTAINER:,}"
            )
        for device_id in ids:
            if len(device_id) > MAX_ID_CHARS:
                raise InvalidRequest(
                    f"{where}: device ID {short_repr(device_id)} is {len(device_id):,} "
                    f"characters; at most {MAX_ID_CHARS}"
                )


def validate_allocate(resource: ResourcePlan, ids: Sequence[str]) -> None:
    """Check one container's Allocate request against the resource.

    Raises:
        InvalidRequest: no IDs, an ID unknown to the resource, an ID repeated, or more than one
            replica requested while failRequestsGreaterThanOne is on.
    """
    name = resource.name
    if not ids:
        raise InvalidRequest(f'invalid allocation request for "{name}": no devices requested')
    seen: set[str] = set()
    for device_id in ids:
        if resource.device(device_id) is None:
            raise InvalidRequest(
                f'invalid allocation request for "{name}": unknown device {short_repr(device_id)}'
            )
        if device_id in seen:
            raise InvalidRequest(
                f'invalid allocation request for "{name}": device {short_repr(device_id)} '
                "requested twice"
            )
        seen.add(device_id)
    if resource.shared and resource.fail_requests_greater_than_one and len(ids) > 1:
        raise InvalidRequest(FAIL_GREATER_THAN_ONE.format(resource=name, n=len(ids)))


def preferred_allocation(
    plan: Plan,
    resource_name: str,
    available: Sequence[str],
    must_include: Sequence[str],
    size: int,
) -> list[str]:
    """The device IDs gpushare prefers for one container request of `size` devices.

    Must-include IDs come first, then the chosen ones. The policy depends on the resource:
    topology-aligned for full GPUs, MIG devices grouped by parent GPU, and the plan's
    shared-devices policy (`distributed` or `packed`) for replicas.

    Raises:
        InvalidRequest: unknown resource or ID, a must-include ID that is not available, or a
            size that cannot be met.
    """
    resource = plan.resource(resource_name)
    if resource is None:
        raise InvalidRequest(f'unknown resource "{resource_name}"')
    avail = _checked(resource, available, "available")
    must = _checked(resource, must_include, "must-include")
    avail_ids = {d.id for d in avail}
    missing = next((d.id for d in must if d.id not in avail_ids), None)
    if missing is not None:
        raise InvalidRequest(
            f'preferred allocation for "{resource.name}": must-include device '
            f"{short_repr(missing)} is not among the available devices"
        )
    _check_size(resource_name, avail, must, size)
    must_ids = {d.id for d in must}
    pool = [d for d in avail if d.id not in must_ids]
    need = size - len(must)
    if need == 0:
        return [d.id for d in must]
    if resource.shared:
        policy = plan.options.shared_devices_allocation_policy
        chosen = _pick_replicas(resource, pool, need, packed=policy == "packed")
    elif any(d.mig is not None for d in pool):
        chosen = _pick_mig(pool, must, need)
    else:
        chosen = _pick_gpus(plan.topology, pool, must, need)
    return [d.id for d in must] + [d.id for d in chosen]


def _checked(resource: ResourcePlan, ids: Sequence[str], what: str) -> list[VirtualDevice]:
    """Resolve IDs to devices, dropping duplicates; unknown IDs are errors."""
    lookup = resource.device
    devices = [lookup(device_id) for device_id in dict.fromkeys(ids)]
    if None in devices:
        unknown = next(i for i in ids if lookup(i) is None)
        raise InvalidRequest(
            f'preferred allocation for "{resource.name}": unknown {what} device '
            f"{short_repr(unknown)}"
        )
    return devices  # type: ignore[return-value]


def _check_size(
    name: str, avail: list[VirtualDevice], must: list[VirtualDevice], size: int
) -> None:
    """Reject sizes that cannot be met."""
    if size < 1:
        raise InvalidRequest(f'preferred allocation for "{name}": size must be >= 1, got {size}')
    if len(must) > size:
        raise InvalidRequest(
            f'preferred allocation for "{name}": {len(must)} must-include devices '
            f"exceed the requested size {size}"
        )
    total = len(avail)  # must-include devices are among them
    if size > total:
        raise InvalidRequest(
            f'preferred allocation for "{name}": cannot allocate {size} devices, '
            f"only {total} available"
        )


def _pick_replicas(
    resource: ResourcePlan, pool: list[VirtualDevice], need: int, *, packed: bool
) -> list[VirtualDevice]:
    """Greedy replica choice: fewest (distributed) or most (packed) replicas already in use.

    A replica is in use when it is not free: held by another pod (not available) or
    must-include in this request. Ties go to the parent picked least in this call, then to
    plan order; within a parent the lowest replica index comes first.
    """
    free: dict[str, list[VirtualDevice]] = {}
    for device in pool:
        free.setdefault(device.physical_id, []).append(device)
    used = {pid: len(resource.devices_of(pid)) - len(devs) for pid, devs in free.items()}
    order = {pid: i for i, pid in enumerate(resource.physical_ids)}
    picked = dict.fromkeys(free, 0)
    sign = -1 if packed else 1
    chosen: list[VirtualDevice] = []
    for _ in range(need):
        pid = min(
            (p for p, devs in free.items() if devs),
            key=lambda p: (sign * used[p], picked[p], order[p]),
        )
        devices = free[pid]
        lowest = min(range(len(devices)), key=lambda i: devices[i].replica or 0)
        chosen.append(devices.pop(lowest))
        used[pid] += 1
        picked[pid] += 1
    return chosen


def _pick_mig(
    pool: list[VirtualDevice], must: list[VirtualDevice], need: int
) -> list[VirtualDevice]:
    """MIG devices grouped by parent GPU: must-include parents first, then the best-fitting GPU."""
    groups: dict[int, list[VirtualDevice]] = {}
    for device in pool:
        groups.setdefault(device.gpu_index, []).append(device)
    must_parents = {d.gpu_index for d in must}
    chosen: list[VirtualDevice] = []
    while len(chosen) < need:
        left = need - len(chosen)
        gpu = min(
            groups,
            key=lambda g: (
                g not in must_parents,
                len(groups[g]) < left,  # a GPU that can hold the rest wins
                len(groups[g]) if len(groups[g]) >= left else -len(groups[g]),
                g,
            ),
        )
        chosen.extend(groups.pop(gpu)[:left])
    return chosen


def _pick_gpus(
    topology: tuple[tuple[int, ...], ...],
    pool: list[VirtualDevice],
    must: list[VirtualDevice],
    need: int,
) -> list[VirtualDevice]:
    """Full GPUs: the set (with the must-include ones) joined by the strongest links."""
    pool = sorted(pool, key=lambda d: d.gpu_index)
    if comb(len(pool), need) <= MAX_EXHAUSTIVE_SETS:
        return _best_set(topology, pool, must, need)
    return _greedy_set(topology, pool, must, need)


def _score(topology: tuple[tuple[int, ...], ...], indices: Sequence[int]) -> int:
    """Sum of pairwise link scores among GPU indices (0 without topology)."""
    if not topology:
        return 0
    return sum(topology[a][b] for a, b in combinations(indices, 2))


def _links(topology: tuple[tuple[int, ...], ...], gpu: int, others: Sequence[int]) -> int:
    """Sum of link scores from one GPU to others (0 without topology)."""
    if not topology:
        return 0
    return sum(topology[gpu][o] for o in others if o != gpu)


def _same_numa_pairs(devices: Sequence[VirtualDevice]) -> int:
    """Pairs of devices on one NUMA node: the tie-break when links score alike (NVSwitch)."""
    return sum(
        1
        for a, b in combinations(devices, 2)
        if a.numa_node is not None and a.numa_node == b.numa_node
    )


def _best_set(
    topology: tuple[tuple[int, ...], ...],
    pool: list[VirtualDevice],
    must: list[VirtualDevice],
    need: int,
) -> list[VirtualDevice]:
    """Exhaustive search: highest link score, then NUMA locality, then best-grouped remainder,
    then lowest indices."""
    must_idx = [d.gpu_index for d in must]
    best: tuple[int, int, int] | None = None
    best_set: tuple[VirtualDevice, ...] = ()
    for cand in combinations(pool, need):
        picked = {d.id for d in cand}
        rest = [d.gpu_index for d in pool if d.id not in picked]
        key = (
            _score(topology, must_idx + [d.gpu_index for d in cand]),
            _same_numa_pairs([*must, *cand]),
            _score(topology, rest),
        )
        if best is None or key > best:
            best, best_set = key, cand
    return list(best_set)


def _greedy_set(
    topology: tuple[tuple[int, ...], ...],
    pool: list[VirtualDevice],
    must: list[VirtualDevice],
    need: int,
) -> list[VirtualDevice]:
    """Greedy growth for large nodes: add the GPU with the strongest links to the set so far."""
    current = [d.gpu_index for d in must]
    left = list(pool)
    chosen: list[VirtualDevice] = []
    while len(chosen) < need:
        anchor = current or [d.gpu_index for d in left]
        device = max(left, key=lambda d: (_links(topology, d.gpu_index, anchor), -d.gpu_index))
        left.remove(device)
        chosen.append(device)
        current.append(device.gpu_index)
    return chosen
