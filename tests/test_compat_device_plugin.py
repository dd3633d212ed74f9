"""NVIDIA device plugin config files, read unchanged, on the simulated dgx-a100 node.

Each file must give the resources and counts the compatibility table states (8 full GPUs).
The daemon's environment sets MPS_ROOT, as the NVIDIA Helm chart does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from plugin.cli.config_file import load_config_file
from plugin.daemon.allocate import ResourceAllocator
from sharing.allocation import preferred_allocation
from sharing.devices import Inventory
from sharing.errors import InvalidRequest
from sharing.plan import build_plan
from sharing.plan_types import Plan

COMPAT = Path(__file__).parent / "data" / "compat" / "nvidia-device-plugin"
ENV = {"MPS_ROOT": "/run/nvidia/mps"}


@pytest.fixture
def dgx(inventory_of: Callable[..., Inventory]) -> Inventory:
    """The simulated dgx-a100: 8x A100-SXM4-40GB."""
    return inventory_of("dgx-a100")


def plan_of(name: str, inventory: Inventory) -> Plan:
    """The plan a compat file gives on the node."""
    return build_plan(inventory, load_config_file(COMPAT / name, env=ENV, overrides={}))


@pytest.mark.parametrize(
    ("name", "resource", "count", "strategy"),
    [
        pytest.param("flags-only.yaml", "nvidia.com/gpu", 8, "none", id="flags-only"),
        pytest.param(
            "time-slicing-rename.yaml",
            "nvidia.com/gpu.shared",
            80,
            "time-slicing",
            id="time-slicing-rename",
        ),
        pytest.param("mps.yaml", "nvidia.com/gpu", 80, "mps", id="mps"),
        pytest.param(
            "mps-fail-requests-false.yaml",
            "nvidia.com/gpu",
            16,
            "mps",
            id="mps-fail-requests-false",
        ),
        pytest.param(
            "mps-cdi-annotations.yaml", "nvidia.com/gpu", 32, "mps", id="mps-cdi-annotations"
        ),
    ],
)
def test_each_file_gives_its_resource(
    dgx: Inventory, name: str, resource: str, count: int, strategy: str
) -> None:
    plan = plan_of(name, dgx)
    assert plan.names == (resource,)
    res = plan.resources[0]
    assert (len(res.devices), res.strategy) == (count, strategy)


def test_flags_only_serves_gpu_uuids(dgx: Inventory) -> None:
    res = plan_of("flags-only.yaml", dgx).resource("nvidia.com/gpu")
    uuids = [g.uuid for g in dgx.gpus]
    assert [d.id for d in res.devices] == uuids
    allocation = ResourceAllocator(res, plan_of("flags-only.yaml", dgx).options).allocate(uuids[:2])
    assert allocation.envs["NVIDIA_VISIBLE_DEVICES"] == ",".join(uuids[:2])


def test_time_slicing_rename_serves_ten_replicas_per_gpu(dgx: Inventory) -> None:
    res = plan_of("time-slicing-rename.yaml", dgx).resource("nvidia.com/gpu.shared")
    assert [d.id for d in res.devices] == [f"{g.uuid}::{n}" for g in dgx.gpus for n in range(10)]


def test_mps_limits_each_client_to_a_tenth(dgx: Inventory) -> None:
    plan = plan_of("mps.yaml", dgx)
    res = plan.resource("nvidia.com/gpu")
    assert [r.name for r in plan.resources if r.mps is not None] == ["nvidia.com/gpu"]
    spec = res.mps
    assert spec.active_thread_percentage == 10
    assert spec.pinned_mem_limit_mib == tuple((g.index, g.memory_mib // 10) for g in dgx.gpus)
    assert res.fail_requests_greater_than_one is True
    with pytest.raises(InvalidRequest, match="maximum request size for shared resources is 1"):
        ResourceAllocator(res, plan.options).allocate([res.devices[0].id, res.devices[1].id])


def test_mps_fail_requests_false_accepts_two_replicas(dgx: Inventory) -> None:
    plan = plan_of("mps-fail-requests-false.yaml", dgx)
    res = plan.resource("nvidia.com/gpu")
    assert res.fail_requests_greater_than_one is False
    allocation = ResourceAllocator(res, plan.options).allocate(
        [res.devices[0].id, res.devices[2].id]
    )
    assert allocation.envs["NVIDIA_VISIBLE_DEVICES"] == ",".join(g.uuid for g in dgx.gpus[:2])


def test_mps_cdi_annotations_answers_with_an_annotation(dgx: Inventory) -> None:
    plan = plan_of("mps-cdi-annotations.yaml", dgx)
    res = plan.resource("nvidia.com/gpu")
    allocation = ResourceAllocator(res, plan.options).allocate([res.devices[0].id])
    assert "NVIDIA_VISIBLE_DEVICES" not in allocation.envs
    (value,) = allocation.annotations.values()
    assert value == f"k8s.device-plugin.nvidia.com/gpu={dgx.gpus[0].uuid}"


def test_four_full_gpus_come_from_one_nvlink_dense_group(dgx: Inventory) -> None:
    plan = plan_of("flags-only.yaml", dgx)
    uuids = [g.uuid for g in dgx.gpus]
    got = preferred_allocation(plan, "nvidia.com/gpu", uuids[1:], [], 4)
    chosen = [dgx.gpu_by_uuid(u) for u in got]
    assert len({g.numa_node for g in chosen}) == 1
    assert all(plan.topology[a.index][b.index] >= 1200 for a in chosen for b in chosen if a != b)
