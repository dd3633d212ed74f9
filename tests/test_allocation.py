"""Preferred allocation (topology, distributed, packed, MIG grouping) and Allocate validation."""

from __future__ import annotations

import re

import pytest

from sharing.allocation import preferred_allocation, validate_allocate
from sharing.config import apply_overrides, load_config
from sharing.devices import Inventory
from sharing.errors import InvalidRequest
from sharing.plan import build_plan
from sharing.plan_types import Plan
from tests.fakes.inventories import dgx_a100, grouped_links, make_gpu, pcie_gpus, with_mig

A100 = dgx_a100()
TWO = pcie_gpus(2)
G0, G1 = (g.uuid for g in TWO.gpus)


def plan_for(inventory: Inventory, text: str, **env: str) -> Plan:
    """build_plan of a config text."""
    return build_plan(inventory, apply_overrides(load_config(text), env, {}))


def replicas_plan(policy: str = "distributed", replicas: int = 4) -> Plan:
    """Two GPUs x `replicas` time-sliced replicas under nvidia.com/gpu."""
    text = (
        "version: v1\nflags:\n  plugin: {sharedDevicesAllocationPolicy: " + policy + "}\n"
        "sharing:\n  timeSlicing:\n    resources: [{name: gpu, replicas: " + str(replicas) + "}]\n"
    )
    return plan_for(TWO, text)


def ids_of(plan: Plan, name: str = "nvidia.com/gpu") -> list[str]:
    """Every device ID of a resource."""
    return [d.id for d in plan.resource(name).devices]


def parents(ids: list[str]) -> list[str]:
    """Physical parent of each ID."""
    return [i.split("::")[0] for i in ids]


# --- replicas ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        pytest.param("distributed", [G0, G1], id="distributed: one per GPU"),
        pytest.param("packed", [G0, G0], id="packed: one GPU"),
    ],
)
def test_two_gpus_four_replicas_size_two(policy: str, expected: list[str]) -> None:
    plan = replicas_plan(policy)
    got = preferred_allocation(plan, "nvidia.com/gpu", ids_of(plan), [], 2)
    assert parents(got) == expected
    assert len(set(got)) == 2


def test_distributed_a_partly_allocated_gpu_loses_ties() -> None:
    plan = replicas_plan("distributed")
    available = [i for i in ids_of(plan) if i != f"{G0}::0"]  # GPU 0 holds one replica elsewhere
    assert parents(preferred_allocation(plan, "nvidia.com/gpu", available, [], 1)) == [G1]


def test_packed_prefers_the_partly_allocated_gpu() -> None:
    plan = replicas_plan("packed")
    available = [i for i in ids_of(plan) if i != f"{G1}::0"]
    assert parents(preferred_allocation(plan, "nvidia.com/gpu", available, [], 2)) == [G1, G1]


def test_distributed_alternates_between_gpus_picked_least() -> None:
    plan = replicas_plan("distributed")
    got = preferred_allocation(plan, "nvidia.com/gpu", ids_of(plan), [], 3)
    assert parents(got) == [G0, G1, G0]
    assert got == [f"{G0}::0", f"{G1}::0", f"{G0}::1"]


def test_packed_spills_to_the_next_gpu_when_full() -> None:
    plan = replicas_plan("packed")
    assert parents(preferred_allocation(plan, "nvidia.com/gpu", ids_of(plan), [], 5)) == [
        G0,
        G0,
        G0,
        G0,
        G1,
    ]


def test_must_include_is_kept_and_counted_as_allocated() -> None:
    plan = replicas_plan("distributed")
    must = [f"{G0}::2"]
    got = preferred_allocation(plan, "nvidia.com/gpu", ids_of(plan), must, 2)
    assert got == [f"{G0}::2", f"{G1}::0"]


def test_must_include_equal_to_size_is_the_answer() -> None:
    plan = replicas_plan()
    must = [f"{G1}::3", f"{G0}::1"]
    assert preferred_allocation(plan, "nvidia.com/gpu", ids_of(plan), must, 2) == must


def test_packed_and_distributed_on_eight_gpus_of_sixty_four_replicas() -> None:
    plan = plan_for(
        A100,
        "version: v1\nsharing:\n  timeSlicing:\n    resources: [{name: gpu, replicas: 64}]\n",
    )
    got = preferred_allocation(plan, "nvidia.com/gpu", ids_of(plan), [], 8)
    assert parents(got) == [g.uuid for g in A100.gpus]


# --- full GPUs -----------------------------------------------------------------------------


def full_plan(inventory: Inventory = A100) -> Plan:
    """Unshared GPUs."""
    return plan_for(inventory, "version: v1\n")


def indices(plan: Plan, ids: list[str]) -> list[int]:
    """GPU indices of full-GPU IDs."""
    res = plan.resource("nvidia.com/gpu")
    return sorted(res.device(i).gpu_index for i in ids)


@pytest.mark.parametrize(
    ("unavailable", "must", "size", "expected"),
    [
        pytest.param([], [], 4, [0, 1, 2, 3], id="4 GPUs from one NVLink group"),
        pytest.param([1], [], 4, [4, 5, 6, 7], id="the group with a busy GPU is skipped"),
        pytest.param([], [6], 4, [4, 5, 6, 7], id="must-include picks its group"),
        pytest.param([0, 1, 2, 6, 7], [], 2, [4, 5], id="NVLink pair over a PCIe pair"),
        pytest.param([], [], 2, [0, 1], id="pair leaves the rest well grouped"),
        pytest.param([0], [], 3, [1, 2, 3], id="fill a broken group, keep the whole one"),
        pytest.param(
            [], [3, 4], 4, [0, 1, 3, 4], id="must-include across groups: most NVLink pairs"
        ),
        pytest.param([], [], 8, [0, 1, 2, 3, 4, 5, 6, 7], id="everything"),
    ],
)
def test_full_gpus_follow_topology(
    unavailable: list[int], must: list[int], size: int, expected: list[int]
) -> None:
    plan = full_plan()
    uuids = [g.uuid for g in A100.gpus]
    available = [u for i, u in enumerate(uuids) if i not in unavailable]
    got = preferred_allocation(plan, "nvidia.com/gpu", available, [uuids[i] for i in must], size)
    assert indices(plan, got) == expected
    assert got[: len(must)] == [uuids[i] for i in must]


def test_full_gpus_without_topology_take_the_lowest_indices() -> None:
    inventory = Inventory(gpus=tuple(make_gpu(i) for i in range(4)))
    plan = full_plan(inventory)
    available = [g.uuid for g in inventory.gpus][::-1]
    assert indices(plan, preferred_allocation(plan, "nvidia.com/gpu", available, [], 2)) == [0, 1]


def test_large_nodes_use_greedy_growth_inside_one_group() -> None:
    groups = [range(k * 8, k * 8 + 8) for k in range(4)]
    inventory = Inventory(
        gpus=tuple(make_gpu(i, numa_node=i // 8) for i in range(32)),
        link_scores=grouped_links(groups),
    )
    plan = full_plan(inventory)
    available = [g.uuid for g in inventory.gpus if g.index != 0]
    got = preferred_allocation(plan, "nvidia.com/gpu", available, [], 8)
    assert len({i // 8 for i in indices(plan, got)}) == 1


# --- MIG devices ---------------------------------------------------------------------------

MIG = with_mig(
    A100,
    {0: [("1g.5gb", s) for s in range(7)], 1: [("1g.5gb", 6)], 2: [("1g.5gb", 0), ("1g.5gb", 1)]},
)


def mig_plan() -> Plan:
    """MIG mixed: 7 x 1g.5gb on GPU 0, one on GPU 1, two on GPU 2."""
    return plan_for(MIG, "version: v1\nflags: {migStrategy: mixed}\n")


@pytest.mark.parametrize(
    ("size", "must", "gpus"),
    [
        pytest.param(1, [], [1], id="one device: the GPU it fills exactly"),
        pytest.param(2, [], [2, 2], id="two devices: one GPU holding both"),
        pytest.param(5, [], [0] * 5, id="five devices: the GPU with enough"),
        pytest.param(2, ["0:3"], [0, 0], id="must-include keeps its GPU"),
        pytest.param(9, [], [0] * 7 + [2, 2], id="more than one GPU holds"),
    ],
)
def test_mig_devices_grouped_by_parent(size: int, must: list[str], gpus: list[int]) -> None:
    plan = mig_plan()
    res = plan.resource("nvidia.com/mig-1g.5gb")
    by_index = {d.index_id: d.id for d in res.devices}
    got = preferred_allocation(
        plan, res.name, ids_of(plan, res.name), [by_index[m] for m in must], size
    )
    assert sorted(res.device(i).gpu_index for i in got) == sorted(gpus)


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resource", "available", "must", "size", "message"),
    [
        pytest.param(
            "nvidia.com/gpu",
            8,
            [],
            9,
            'preferred allocation for "nvidia.com/gpu": '
            "cannot allocate 9 devices, only 8 available",
            id="size above available",
        ),
        pytest.param(
            "nvidia.com/gpu",
            8,
            [],
            0,
            'preferred allocation for "nvidia.com/gpu": size must be >= 1, got 0',
            id="size zero",
        ),
        pytest.param(
            "nvidia.com/gpu",
            8,
            [0, 1, 2],
            2,
            "preferred allocation for "
            '"nvidia.com/gpu": 3 must-include devices exceed the requested size 2',
            id="must-include above size",
        ),
        pytest.param(
            "nvidia.com/tpu", 8, [], 1, 'unknown resource "nvidia.com/tpu"', id="unknown resource"
        ),
    ],
)
def test_impossible_requests(
    resource: str, available: int, must: list[int], size: int, message: str
) -> None:
    plan = full_plan()
    uuids = [g.uuid for g in A100.gpus]
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        preferred_allocation(plan, resource, uuids[:available], [uuids[i] for i in must], size)


def test_unknown_ids_are_named() -> None:
    plan = full_plan()
    with pytest.raises(
        InvalidRequest,
        match=re.escape(
            'preferred allocation for "nvidia.com/gpu": unknown available device "GPU-nope"'
        ),
    ):
        preferred_allocation(plan, "nvidia.com/gpu", ["GPU-nope"], [], 1)
    with pytest.raises(InvalidRequest, match='unknown must-include device "GPU-x::0"'):
        preferred_allocation(plan, "nvidia.com/gpu", [A100.gpus[0].uuid], ["GPU-x::0"], 1)


# --- Allocate validation -------------------------------------------------------------------


def mps_plan(fail: str) -> Plan:
    """GPUs shared through MPS x4 with failRequestsGreaterThanOne as given."""
    return plan_for(
        TWO,
        "version: v1\nsharing:\n  mps:\n    failRequestsGreaterThanOne: " + fail + "\n"
        "    resources: [{name: gpu, replicas: 4}]\n",
        MPS_ROOT="/run/nvidia/mps",
    )


def test_fail_requests_greater_than_one_message_is_exact() -> None:
    res = mps_plan("true").resource("nvidia.com/gpu")
    with pytest.raises(InvalidRequest) as info:
        validate_allocate(res, [f"{G0}::0", f"{G0}::1", f"{G1}::0"])
    assert str(info.value) == (
        'invalid allocation request for "nvidia.com/gpu": invalid request: maximum request '
        "size for shared resources is 1; found 3"
    )
    validate_allocate(res, [f"{G0}::3"])


def test_two_replicas_accepted_when_fail_requests_is_off() -> None:
    validate_allocate(mps_plan("false").resource("nvidia.com/gpu"), [f"{G0}::0", f"{G1}::0"])


def test_unshared_resources_accept_several_devices() -> None:
    res = full_plan().resource("nvidia.com/gpu")
    validate_allocate(res, [g.uuid for g in A100.gpus[:4]])


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        pytest.param(
            ["GPU-nope::0"],
            'invalid allocation request for "nvidia.com/gpu": unknown device "GPU-nope::0"',
            id="unknown ID",
        ),
        pytest.param(
            [f"{G0}::9"],
            f'invalid allocation request for "nvidia.com/gpu": unknown device "{G0}::9"',
            id="replica out of range",
        ),
        pytest.param(
            [],
            'invalid allocation request for "nvidia.com/gpu": no devices requested',
            id="empty request",
        ),
        pytest.param(
            [f"{G0}::0", f"{G0}::0"],
            f'invalid allocation request for "nvidia.com/gpu": device "{G0}::0" requested twice',
            id="duplicate",
        ),
    ],
)
def test_allocate_rejects_bad_ids(ids: list[str], message: str) -> None:
    res = mps_plan("false").resource("nvidia.com/gpu")
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        validate_allocate(res, ids)


def test_nvswitch_ties_are_broken_by_numa_node() -> None:
    inventory = Inventory(
        gpus=tuple(make_gpu(i, numa_node=i % 2) for i in range(8)),
        link_scores=grouped_links([range(8)]),  # every pair joined by 12 NVLinks
    )
    plan = full_plan(inventory)
    available = [g.uuid for g in inventory.gpus if g.index != 0]
    got = preferred_allocation(plan, "nvidia.com/gpu", available, [], 4)
    assert indices(plan, got) == [1, 3, 5, 7]
