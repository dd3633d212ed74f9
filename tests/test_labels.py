"""Node labels (facts §8) derived from the plan."""

from __future__ import annotations

import pytest

from sharing.config import apply_overrides, load_config
from sharing.devices import Inventory
from sharing.plan import build_plan
from tests.fakes.inventories import dgx_a100, make_gpu, with_mig

A100 = dgx_a100()


def labels(text: str, inventory: Inventory = A100, **env: str) -> dict[str, str]:
    """The plan's labels as a mapping."""
    return dict(build_plan(inventory, apply_overrides(load_config(text), env, {})).labels)


def of(resource: str, found: dict[str, str]) -> dict[str, str]:
    """The labels of one resource, keyed by their last part."""
    prefix = f"{resource}."
    return {
        k[len(prefix) :]: v
        for k, v in found.items()
        if k.startswith(prefix)
        and k[len(prefix) :] in {"count", "replicas", "sharing-strategy", "product", "memory"}
    }


TS = "version: v1\nsharing:\n  timeSlicing:\n{section}    resources: [{entries}]\n"

CASES = [
    pytest.param(
        "version: v1\n",
        "nvidia.com/gpu",
        {
            "count": "8",
            "replicas": "1",
            "sharing-strategy": "none",
            "product": "NVIDIA-A100-SXM4-40GB",
            "memory": "40960",
        },
        id="unshared",
    ),
    pytest.param(
        TS.format(section="", entries="{name: gpu, replicas: 4}"),
        "nvidia.com/gpu",
        {
            "count": "8",
            "replicas": "4",
            "sharing-strategy": "time-slicing",
            "product": "NVIDIA-A100-SXM4-40GB-SHARED",
            "memory": "40960",
        },
        id="time-slicing keeps the name: -SHARED",
    ),
    pytest.param(
        TS.format(section="    renameByDefault: true\n", entries="{name: gpu, replicas: 4}"),
        "nvidia.com/gpu",
        {
            "count": "8",
            "replicas": "4",
            "sharing-strategy": "time-slicing",
            "product": "NVIDIA-A100-SXM4-40GB",
            "memory": "40960",
        },
        id="renamed: labels keep the original name, no -SHARED",
    ),
    pytest.param(
        "version: v1\nflags: {mpsRoot: /m}\nsharing:\n  mps:\n    resources: "
        "[{name: gpu, replicas: 2}]\n",
        "nvidia.com/gpu",
        {
            "count": "8",
            "replicas": "2",
            "sharing-strategy": "mps",
            "product": "NVIDIA-A100-SXM4-40GB-SHARED",
            "memory": "40960",
        },
        id="mps",
    ),
    pytest.param(
        TS.format(
            section="    renameByDefault: true\n",
            entries="{name: gpu, devices: [0, 1], replicas: 4}, "
            "{name: gpu, devices: [2, 3], replicas: 8}",
        ),
        "nvidia.com/gpu",
        {
            "count": "8",
            "replicas": "mixed",
            "sharing-strategy": "mixed",
            "product": "NVIDIA-A100-SXM4-40GB",
            "memory": "40960",
        },
        id="per-GPU counts and unshared GPUs under one name: mixed",
    ),
    pytest.param(
        TS.format(
            section="    renameByDefault: true\n",
            entries="{name: gpu, devices: all, replicas: 4}",
        ),
        "nvidia.com/gpu.shared",
        {},
        id="uniform: no labels for the advertised name",
    ),
    pytest.param(
        "version: v1\nflags: {mpsRoot: /m}\nsharing:\n  timeSlicing:\n    resources: "
        "[{name: gpu, devices: [0, 1, 2, 3], rename: ts, replicas: 2}]\n  mps:\n"
        "    resources: [{name: gpu, devices: [4, 5, 6, 7], rename: m, replicas: 2}]\n",
        "nvidia.com/gpu",
        {
            "count": "8",
            "replicas": "2",
            "sharing-strategy": "mixed",
            "product": "NVIDIA-A100-SXM4-40GB",
            "memory": "40960",
        },
        id="two strategies: mixed",
    ),
]


@pytest.mark.parametrize(("text", "resource", "expected"), CASES)
def test_resource_labels(text: str, resource: str, expected: dict[str, str]) -> None:
    assert of(resource, labels(text)) == expected


def test_mig_labels_name_the_profile() -> None:
    inventory = with_mig(A100, {0: [("1g.5gb", 0), ("1g.5gb+me", 1)]})
    found = labels("version: v1\nflags: {migStrategy: mixed}\n", inventory)
    assert of("nvidia.com/mig-1g.5gb", found) == {
        "count": "1",
        "replicas": "1",
        "sharing-strategy": "none",
        "product": "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb",
        "memory": "4864",
    }
    assert found["nvidia.com/mig-1g.5gb.me.product"] == "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb.me"
    assert found["nvidia.com/gpu.count"] == "7"
    assert found["nvidia.com/mig.strategy"] == "mixed"


@pytest.mark.parametrize(
    ("text", "inventory", "node"),
    [
        pytest.param(
            "version: v1\n",
            A100,
            {
                "nvidia.com/mig.capable": "true",
                "nvidia.com/mps.capable": "false",
                "nvidia.com/mig.strategy": "none",
            },
            id="A100",
        ),
        pytest.param(
            "version: v1\nflags: {mpsRoot: /m}\nsharing:\n  mps:\n    resources: "
            "[{name: gpu, replicas: 2}]\n",
            Inventory(gpus=(make_gpu(0, name="NVIDIA L4", mig_capable=False),)),
            {
                "nvidia.com/mig.capable": "false",
                "nvidia.com/mps.capable": "true",
                "nvidia.com/mig.strategy": "none",
            },
            id="L4 with MPS",
        ),
    ],
)
def test_node_labels(text: str, inventory: Inventory, node: dict[str, str]) -> None:
    found = labels(text, inventory)
    assert {k: found[k] for k in node} == node


def test_labels_are_valid_kubernetes_label_values() -> None:
    inventory = with_mig(A100, {0: [("1g.5gb+me", 0)]})
    found = labels("version: v1\nflags: {migStrategy: mixed}\n", inventory)
    for value in found.values():
        assert len(value) <= 63
        assert all(c.isalnum() or c in "-_." for c in value), value


MIXED_PLAN = (
    "version: v1\nflags: {mpsRoot: /m}\nsharing:\n  timeSlicing:\n    resources: "
    "[{name: gpu, devices: [0, 1, 2, 3], rename: gpu-ts, replicas: 8}]\n  mps:\n"
    "    resources: [{name: gpu, devices: [4, 5, 6, 7], rename: gpu-mps, replicas: 4}]\n"
)


def test_mixed_plan_labels_say_mixed_and_label_each_advertised_resource() -> None:
    """Time-slicing x8 on GPUs 0-3 and MPS x4 on GPUs 4-7: never one `replicas=4` for both."""
    found = labels(MIXED_PLAN)
    assert of("nvidia.com/gpu", found) == {
        "count": "8",
        "replicas": "mixed",
        "sharing-strategy": "mixed",
        "product": "NVIDIA-A100-SXM4-40GB",
        "memory": "40960",
    }
    assert {k: v for k, v in found.items() if k.startswith("nvidia.com/gpu-")} == {
        "nvidia.com/gpu-mps.count": "4",
        "nvidia.com/gpu-mps.replicas": "4",
        "nvidia.com/gpu-mps.sharing-strategy": "mps",
        "nvidia.com/gpu-ts.count": "4",
        "nvidia.com/gpu-ts.replicas": "8",
        "nvidia.com/gpu-ts.sharing-strategy": "time-slicing",
    }

