"""NodeState snapshots follow the health rule of sharing.health for every device."""

from __future__ import annotations

import pytest

from plugin.daemon.state import NodeState, build_snapshot
from sharing.config import load_config
from sharing.health import mps_key, unhealthy_reason
from sharing.plan import build_plan
from sharing.plan_types import Plan
from tests.fakes.inventories import dgx_a100, with_mig

CONFIG = """\
version: v1
flags:
  migStrategy: mixed
sharing:
  timeSlicing:
    resources:
      - name: nvidia.com/mig-1g.5gb
        replicas: 3
"""


@pytest.fixture(scope="module")
def plan() -> Plan:
    inventory = with_mig(dgx_a100(), {0: [("1g.5gb", 0), ("1g.5gb", 1), ("3g.20gb", 4)]})
    return build_plan(inventory, load_config(CONFIG))


def _overlays(plan: Plan) -> list[dict[str, str]]:
    mig = next(r for r in plan.resources if r.name == "nvidia.com/mig-1g.5gb").devices[0]
    gpu = next(r for r in plan.resources if r.name == "nvidia.com/gpu").devices[3]
    return [
        {},
        {mig.gpu_uuid: "xid 79"},
        {mig.physical_id: "xid 94 on one MIG device"},
        {gpu.physical_id: "lost"},
        {mps_key("nvidia.com/mig-3g.20gb"): "daemon down"},
        {mig.physical_id: "a", gpu.gpu_uuid: "b", mps_key("nvidia.com/gpu"): "c"},
    ]


@pytest.mark.parametrize("case", range(6), ids=lambda i: f"overlay {i}")
def test_snapshot_health_is_the_health_rule(plan: Plan, case: int) -> None:
    overlay = _overlays(plan)[case]
    for resource in plan.resources:
        snapshot = build_snapshot(resource, overlay)
        expected = [unhealthy_reason(resource.name, d, overlay) is None for d in resource.devices]
        assert [d.healthy for d in snapshot] == expected
        assert [d.id for d in snapshot] == [d.id for d in resource.devices]


def test_an_overlay_change_moves_only_the_resources_it_touches(plan: Plan) -> None:
    state = NodeState(plan)
    before = {r.name: state.snapshot(r.name)[0] for r in plan.resources}
    mig = next(r for r in plan.resources if r.name == "nvidia.com/mig-1g.5gb").devices[0]
    state.set_overlay({mig.physical_id: "xid 94"})
    after = {r.name: state.snapshot(r.name)[0] for r in plan.resources}
    moved = {name for name in before if before[name] != after[name]}
    assert moved == {"nvidia.com/mig-1g.5gb"}
