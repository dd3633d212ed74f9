"""ListAndWatch message budget: sizes computed from the wire format, and plans that exceed it."""

from __future__ import annotations

import random

import pytest

from plugin.daemon import convert
from plugin.daemon.state import DeviceState
from sharing import message_budget as mb
from sharing.config import load_config
from sharing.errors import PlanError
from sharing.plan import build_plan
from tests.fakes.inventories import dgx_a100, pcie_gpus, with_mig


def ts(replicas: int) -> str:
    """Time-slicing of every nvidia.com/gpu device."""
    return f"version: v1\nsharing:\n  timeSlicing:\n    resources:\n" \
        f"    - {{name: gpu, replicas: {replicas}}}\n"


def encoded_size(devices: list[DeviceState]) -> int:
    """Bytes of the ListAndWatchResponse the daemon sends for these devices."""
    return convert.to_pb_device_list(tuple(devices)).ByteSize()


def test_entry_size_matches_protobuf_for_every_shape() -> None:
    """Healthy or not, NUMA none/0/1/127/128/300, IDs of 1..200 characters: exact sizes."""
    rng = random.Random(7)
    devices = []
    for _ in range(300):
        numa = rng.choice([None, 0, 1, 127, 128, 300])
        devices.append(DeviceState("x" * rng.randint(1, 200), rng.random() < 0.5, numa))
    expected = sum(
        mb.device_entry_bytes(len(d.id), healthy=d.healthy, numa_node=d.numa_node)
        for d in devices
    )
    assert expected == encoded_size(devices)


def test_the_largest_message_is_the_documented_figure_and_far_below_4_mib() -> None:
    """16,384 IDs of 55 characters, all Unhealthy, NUMA set: 1,245,184 bytes."""
    devices = [DeviceState("M" * mb.LONGEST_ID_CHARS, False, mb.WORST_NUMA)] * (
        mb.MAX_DEVICES_PER_RESOURCE
    )
    assert encoded_size(devices) == mb.LARGEST_MESSAGE_BYTES == 1_245_184
    assert mb.LARGEST_MESSAGE_BYTES < mb.KUBELET_MAX_MESSAGE_BYTES / 3


def test_replica_id_lengths_without_building_ids() -> None:
    """Lengths of `<uuid>::0` … `<uuid>::n-1` for counts around each power of ten."""
    for replicas in (1, 9, 10, 11, 99, 100, 101, 1024):
        built = [len(f"{'G' * 40}::{n}") for n in range(replicas)]
        assert list(mb.replica_id_lengths(40, replicas)) == built


def test_a_plan_at_the_limit_is_served_and_its_message_fits() -> None:
    """16 GPUs x 1024 replicas = 16,384 IDs: accepted, real message under the documented size."""
    plan = build_plan(pcie_gpus(16), load_config(ts(1024)))
    [resource] = plan.resources
    assert len(resource.devices) == mb.MAX_DEVICES_PER_RESOURCE
    devices = [DeviceState(d.id, False, d.numa_node) for d in resource.devices]
    assert encoded_size(devices) <= mb.LARGEST_MESSAGE_BYTES


@pytest.mark.parametrize(
    ("inventory", "config", "message"),
    [
        pytest.param(
            pcie_gpus(17), ts(1024),
            'sharing.timeSlicing.resources[0]: "nvidia.com/gpu" would have 17,408 devices '
            "(17 devices x 1024 replicas), a ListAndWatch message of up to 1,147,466 bytes; "
            "at most 16,384 devices and 1,245,184 bytes per resource are allowed (the kubelet "
            "drops a plugin whose message exceeds 4,194,304 bytes)",
            id="17 GPUs x 1024 replicas",
        ),
        pytest.param(
            with_mig(dgx_a100(), {i: [("1g.5gb", s) for s in range(7)] for i in range(8)}),
            "version: v1\nflags: {migStrategy: single}\n" + ts(300).split("\n", 1)[1],
            'sharing.timeSlicing.resources[0]: "nvidia.com/gpu" would have 16,800 devices '
            "(56 devices x 300 replicas), a ListAndWatch message of up to",
            id="56 MIG devices x 300 replicas",
        ),
    ],
)
def test_a_plan_over_the_message_budget_is_refused_with_its_figure(
    inventory: object, config: str, message: str
) -> None:
    """The error names the entry, the device count and the message size it would need."""
    with pytest.raises(PlanError) as caught:
        build_plan(inventory, load_config(config))  # type: ignore[arg-type]
    assert str(caught.value).startswith(message)


def test_the_refused_figure_is_the_real_message_size() -> None:
    """The bytes named in the refusal are what protobuf would have sent (all Unhealthy)."""
    inventory = pcie_gpus(17)
    with pytest.raises(PlanError) as caught:
        build_plan(inventory, load_config(ts(1024)))
    figure = int(str(caught.value).split("up to ")[1].split(" bytes")[0].replace(",", ""))
    devices = [
        DeviceState(f"{gpu.uuid}::{n}", False, mb.WORST_NUMA)
        for gpu in inventory.gpus for n in range(1024)
    ]
    assert figure == encoded_size(devices)
