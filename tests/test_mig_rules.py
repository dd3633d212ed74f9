"""MIG rules of facts §6.3, table-driven, through the MIG operations over the simulated NVML.

Cases name profiles by shape ("1g", "1g+me", "1g.2slot", "2g", "3g", "4g", "7g") so the 8-slot
table runs unchanged on A100-40GB, H100-80GB and H200-141GB.
"""

from __future__ import annotations

import pynvml
import pytest

from sharing.nvml import (
    CARDS,
    MigBadRequest,
    MigInUse,
    MigNoRoom,
    MigNotSupported,
    create_compute_instance,
    create_gpu_instance,
    create_mig_device,
    destroy_compute_instance,
    destroy_gpu_instance,
    gpu_instances,
    gpu_profiles,
    mig_mode,
    read_inventory,
    set_mig_mode,
)
from sharing.nvml.profiles import gpu_instance_id
from sharing.nvml.sim import engine, reset_gpu, start_process, stop_process

P = pynvml
SHAPES = {
    "1g": P.NVML_GPU_INSTANCE_PROFILE_1_SLICE,
    "1g+me": P.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1,
    "1g.2slot": P.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2,
    "2g": P.NVML_GPU_INSTANCE_PROFILE_2_SLICE,
    "2g+me": P.NVML_GPU_INSTANCE_PROFILE_2_SLICE_REV1,
    "3g": P.NVML_GPU_INSTANCE_PROFILE_3_SLICE,
    "4g": P.NVML_GPU_INSTANCE_PROFILE_4_SLICE,
    "7g": P.NVML_GPU_INSTANCE_PROFILE_7_SLICE,
}
EIGHT_SLOT_NODES = {"dgx-a100": "A100-SXM4-40GB", "hgx-h100": "H100-SXM5-80GB",
                    "h200": "H200-SXM-141GB"}  # fmt: skip

EIGHT_SLOT_CASES = [
    pytest.param([("3g", 0), ("3g", 4)], ("1g", None, MigNoRoom), id="3g+3g fills the GPU"),
    pytest.param([("4g", 0), ("3g", 4)], None, id="4g+3g valid"),
    pytest.param([("4g", 0)], ("4g", None, MigNoRoom), id="4g+4g invalid: max one 4g"),
    pytest.param([("4g", 0)], ("4g", 4, MigBadRequest), id="4g+4g invalid: 4g only at 0"),
    pytest.param([("4g", 0), ("2g", 4), ("1g", 6)], None, id="4g+2g+1g valid"),
    pytest.param([("4g", 0), ("2g", 4)], ("2g", None, MigNoRoom), id="4g+2g+2g invalid"),
    pytest.param([("3g", 4), ("2g", 0), ("2g", 2)], None, id="3g+2g+2g valid"),
    pytest.param([("3g", 4), ("2g", 0), ("1g", 2), ("1g", 3)], None, id="3g+2g+1g+1g valid"),
    pytest.param([("2g", 0), ("2g", 2), ("2g", 4), ("1g", 6)], None, id="2gx3+1g valid"),
    pytest.param([("1g", None)] * 7, ("1g", None, MigNoRoom), id="1gx7 then no eighth"),
    pytest.param([], ("1g", 7, MigBadRequest), id="1g never at slot 7"),
    pytest.param([("1g+me", 0)], ("1g+me", 3, MigNoRoom), id="1g+me max 1"),
    pytest.param([("1g+me", 0), ("1g", 1)], None, id="1g+me beside a 1g"),
    pytest.param([("1g.2slot", 0), ("1g.2slot", 2), ("1g.2slot", 4), ("1g.2slot", 6)],
                 ("1g.2slot", None, MigNoRoom), id="1g two-slot (REV2) max 4"),
    pytest.param([], ("1g.2slot", 1, MigBadRequest), id="1g two-slot at odd start"),
    pytest.param([], ("3g", 2, MigBadRequest), id="wrong start 3g at 2"),
    pytest.param([], ("2g", 1, MigBadRequest), id="wrong start 2g at 1"),
    pytest.param([], ("7g", 1, MigBadRequest), id="wrong start 7g at 1"),
    pytest.param([("3g", 0)], ("2g", 2, MigNoRoom), id="overlap 2g inside 3g"),
    pytest.param([("2g", 2)], ("1g", 3, MigNoRoom), id="overlap 1g inside 2g"),
    pytest.param([("7g", 0)], ("1g", 6, MigNoRoom), id="overlap anything with 7g"),
    pytest.param([("7g", 0)], ("7g", 0, MigNoRoom), id="too many 7g"),
    pytest.param([("3g", 0), ("3g", 4)], ("3g", None, MigNoRoom), id="too many 3g"),
    pytest.param([("2g", 0), ("2g", 2), ("2g", 4)], ("2g", None, MigNoRoom), id="too many 2g"),
    pytest.param([("2g", None), ("1g", None), ("1g", None)], ("3g", None, MigNoRoom),
                 id="driver-chosen 2g,1g,1g then 3g fails"),
    pytest.param([("1g", None), ("1g", None), ("2g", None)], ("3g", None, MigNoRoom),
                 id="driver-chosen 1g,1g,2g then 3g fails"),
    pytest.param([("2g", 0), ("1g", 2), ("1g", 3), ("3g", 4)], None,
                 id="explicit placements 2g,1g,1g then 3g succeeds"),
    pytest.param([("3g", None), ("2g", None), ("1g", None), ("1g", None)], None,
                 id="driver-chosen with the 3g first succeeds"),
]  # fmt: skip

A30_CASES = [
    pytest.param([("1g", None)] * 4, ("1g", None, MigNoRoom), id="1gx4 then no fifth"),
    pytest.param([("2g", 0), ("2g", 2)], ("1g", None, MigNoRoom), id="2g+2g fills"),
    pytest.param([("2g", 0), ("1g", 2), ("1g", 3)], None, id="2g+1g+1g valid"),
    pytest.param([("4g", 0)], ("1g", None, MigNoRoom), id="4g fills"),
    pytest.param([], ("4g", 2, MigBadRequest), id="4g only at 0"),
    pytest.param([], ("2g", 1, MigBadRequest), id="2g at odd start"),
    pytest.param([], ("1g", 4, MigBadRequest), id="no slot 4 on A30"),
    pytest.param([("2g+me", 0)], ("2g+me", 2, MigNoRoom), id="2g+me max 1"),
    pytest.param([("1g+me", 0)], ("1g+me", 1, MigNoRoom), id="1g+me max 1"),
    pytest.param([("2g+me", 0), ("2g", 2)], None, id="2g+me beside 2g"),
    pytest.param([("2g", 0)], ("1g", 1, MigNoRoom), id="overlap 1g inside 2g"),
    pytest.param([], ("3g", None, MigBadRequest), id="no 3g profile on A30"),
]  # fmt: skip


def _name(model: str, shape: str) -> str:
    profile = CARDS[model].profile_by_index(SHAPES[shape])
    return profile.name if profile is not None else f"{shape}.none"


def _run(nvml, model: str, gpu: int, steps, then) -> None:
    for shape, start in steps:
        create_mig_device(nvml, gpu, _name(model, shape), start)
    if then is not None:
        shape, start, error = then
        with pytest.raises(error):
            create_gpu_instance(nvml, gpu, _name(model, shape), start)
    layout = sorted((g.profile, g.start) for g in gpu_instances(nvml, gpu))
    devices = read_inventory(nvml).gpus[gpu].mig_devices
    assert sorted((m.profile, m.placement_start) for m in devices) == layout
    assert len(layout) == len(steps)
    for device in devices:
        slots = CARDS[model].mig_slots
        assert device.gi_id == gpu_instance_id(slots, device.placement_start, device.placement_size)


@pytest.mark.parametrize("node", list(EIGHT_SLOT_NODES))
@pytest.mark.parametrize(("steps", "then"), EIGHT_SLOT_CASES)
def test_eight_slot_rules(sim_nvml, node: str, steps, then) -> None:
    nvml, _ = sim_nvml(node)
    set_mig_mode(nvml, 0, True)
    _run(nvml, EIGHT_SLOT_NODES[node], 0, steps, then)


@pytest.mark.parametrize(("steps", "then"), A30_CASES)
def test_a30_rules(sim_nvml, steps, then) -> None:
    nvml, _ = sim_nvml("a30x4")
    _run(nvml, "A30", 1, steps, then)


EIGHT_SLOT_IDS = {
    "7g": {0: 0},
    "4g": {0: 1},
    "3g": {0: 1, 4: 2},
    "2g": {0: 3, 2: 4, 4: 5},
    "1g.2slot": {0: 3, 2: 4, 4: 5, 6: 6},
    "1g": {s: 7 + s for s in range(7)},
}
A30_IDS = {"4g": {0: 0}, "2g": {0: 1, 2: 2}, "1g": {s: 3 + s for s in range(4)}}


@pytest.mark.parametrize(
    ("node", "model", "gpu", "expected"),
    [pytest.param("dgx-a100", "A100-SXM4-40GB", 0, EIGHT_SLOT_IDS, id="8-slot"),
     pytest.param("a30x4", "A30", 1, A30_IDS, id="A30")],
)  # fmt: skip
def test_gpu_instance_ids_follow_slot_ranges(sim_nvml, node, model, gpu, expected) -> None:
    nvml, _ = sim_nvml(node)
    set_mig_mode(nvml, gpu, True)
    for shape, by_start in expected.items():
        for start, gi_id in by_start.items():
            created = create_gpu_instance(nvml, gpu, _name(model, shape), start)
            assert created.gi_id == gi_id, f"{shape} at {start}"
            destroy_gpu_instance(nvml, gpu, created.gi_id)


def test_adapter_profiles_match_the_card_table(sim_nvml) -> None:
    nvml, _ = sim_nvml("dgx-a100")
    read = {(p.name, p.id, p.size, p.max_count, p.starts) for p in gpu_profiles(nvml, 0)}
    table = CARDS["A100-SXM4-40GB"].profiles
    assert read == {(p.name, p.id, p.size, p.max_count, p.starts) for p in table}


def test_destroy_gpu_instance_with_compute_instance_is_in_use(sim_nvml) -> None:
    nvml, _ = sim_nvml("mixed")
    with pytest.raises(MigInUse, match="GPU 1: destroy GPU instance 1: in use"):
        destroy_gpu_instance(nvml, 1, 1)
    destroy_compute_instance(nvml, 1, 1, 0)
    destroy_gpu_instance(nvml, 1, 1)
    assert [g.gi_id for g in gpu_instances(nvml, 1)] == [2]


def test_destroy_with_running_process_is_in_use(sim_nvml) -> None:
    nvml, state = sim_nvml("mixed")
    pid = start_process(state, 1, gi=2, ci=0)
    with pytest.raises(MigInUse):
        destroy_compute_instance(nvml, 1, 2, 0)
    gi = nvml.call("nvmlDeviceGetGpuInstanceById", nvml.handle(1), 2)
    with pytest.raises(pynvml.NVMLError_InUse):
        nvml.lib.nvmlGpuInstanceDestroy(gi)
    stop_process(state, 1, pid=pid)
    destroy_compute_instance(nvml, 1, 2, 0)
    destroy_gpu_instance(nvml, 1, 2)


def test_mig_uuids_are_stable_for_gpu_gi_ci(sim_nvml) -> None:
    nvml, _ = sim_nvml("mixed")
    before = read_inventory(nvml).gpus[1].mig_devices[1]
    destroy_compute_instance(nvml, 1, before.gi_id, 0)
    destroy_gpu_instance(nvml, 1, before.gi_id)
    assert len(read_inventory(nvml).gpus[1].mig_devices) == 1
    create_gpu_instance(nvml, 1, "3g.40gb", 4)
    assert create_compute_instance(nvml, 1, before.gi_id) == 0
    assert read_inventory(nvml).gpus[1].mig_devices[1] == before


def test_ampere_mode_change_is_pending_while_processes_run(sim_nvml) -> None:
    nvml, state = sim_nvml("dgx-a100")
    pid = start_process(state, 0)
    mode = set_mig_mode(nvml, 0, True)
    assert (mode.current, mode.pending, mode.needs_reset) == (False, True, True)
    assert mode.activation_status == pynvml.NVML_ERROR_IN_USE
    gpu = read_inventory(nvml).gpus[0]
    assert (gpu.mig_enabled, gpu.mig_pending) == (False, True)
    stop_process(state, 0, pid=pid)
    assert mig_mode(nvml, 0).needs_reset
    reset_gpu(state, 0)
    assert mig_mode(nvml, 0) == type(mode)(current=True, pending=True)


def test_ampere_mode_change_without_processes_applies_at_once(sim_nvml) -> None:
    nvml, _ = sim_nvml("dgx-a100")
    mode = set_mig_mode(nvml, 2, True)
    assert (mode.current, mode.pending, mode.activation_status) == (True, True, 0)


def test_a30_node_ships_a_pending_mode_that_reset_applies(sim_nvml) -> None:
    nvml, state = sim_nvml("a30x4")
    assert mig_mode(nvml, 2).needs_reset
    reset_gpu(state, 2)
    gpu = read_inventory(nvml).gpus[2]
    assert (gpu.mig_enabled, gpu.mig_pending, gpu.processes) == (True, True, ())


def test_hopper_refuses_mode_change_while_processes_run(sim_nvml) -> None:
    nvml, state = sim_nvml("hgx-h100")
    start_process(state, 0)
    with pytest.raises(MigInUse, match="GPU 0: enable MIG mode"):
        set_mig_mode(nvml, 0, True)
    assert not mig_mode(nvml, 0).pending
    assert set_mig_mode(nvml, 1, True).current


def test_mode_change_wipes_the_layout(sim_nvml) -> None:
    nvml, _ = sim_nvml("mixed")
    set_mig_mode(nvml, 1, False)
    set_mig_mode(nvml, 1, True)
    assert gpu_instances(nvml, 1) == ()


@pytest.mark.parametrize(
    ("node", "gpu", "profile"),
    [pytest.param("mixed", 2, "1g.10gb", id="L4 is not MIG capable"),
     pytest.param("a30x4", 3, "1g.6gb", id="A30 with MIG mode off")],
)  # fmt: skip
def test_mig_operations_need_mig_mode(sim_nvml, node, gpu, profile) -> None:
    nvml, _ = sim_nvml(node)
    with pytest.raises((MigNotSupported, MigBadRequest)):
        create_gpu_instance(nvml, gpu, profile, 0)


def test_set_mig_mode_on_non_mig_gpu_is_not_supported(sim_nvml) -> None:
    nvml, _ = sim_nvml("mixed")
    with pytest.raises(MigNotSupported, match="GPU 3"):
        set_mig_mode(nvml, 3, True)


def test_requesting_the_current_mode_is_a_no_op_even_with_processes(sim_nvml) -> None:
    nvml, state = sim_nvml("hgx-h100")
    start_process(state, 0)
    mode = set_mig_mode(nvml, 0, False)
    assert (mode.current, mode.pending, mode.activation_status) == (False, False, 0)


ENGINE_ERRORS = {
    MigNoRoom: pynvml.NVMLError_InsufficientResources,
    MigBadRequest: pynvml.NVMLError_InvalidArgument,
}
EIGHT_SLOT_MODELS = [model for model, card in CARDS.items() if card.mig_slots == 8]


@pytest.mark.parametrize("model", EIGHT_SLOT_MODELS)
@pytest.mark.parametrize(("steps", "then"), EIGHT_SLOT_CASES)
def test_eight_slot_rules_hold_on_every_eight_slot_card(model: str, steps, then) -> None:
    card = CARDS[model]
    gpu = {"mig_current": 1, "gis": [], "procs": []}
    for shape, start in steps:
        engine.create_gi(card, gpu, card.profile_by_index(SHAPES[shape]).id, start)
    if then is not None:
        shape, start, error = then
        with pytest.raises(ENGINE_ERRORS[error]):
            engine.create_gi(card, gpu, card.profile_by_index(SHAPES[shape]).id, start)
    assert len(gpu["gis"]) == len(steps)
    taken = [
        slot
        for gi in gpu["gis"]
        for slot in card.profile_by_id(gi["profile_id"]).slots(gi["start"])
    ]
    assert len(taken) == len(set(taken))
    for gi in gpu["gis"]:
        size = card.profile_by_id(gi["profile_id"]).size
        assert gi["id"] == gpu_instance_id(8, gi["start"], size)
