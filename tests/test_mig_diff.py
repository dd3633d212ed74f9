"""Layout diff and export on hand-built GPU states (pure: no NVML)."""

from __future__ import annotations

import dataclasses

import pytest

from sharing.mig import (
    ComputeInstanceState,
    GpuInstanceState,
    GpuMigState,
    Layout,
    Placement,
    Step,
    diff,
    export_config,
    parse_mig_parted,
)
from sharing.nvml.profiles import CARDS

A100 = CARDS["A100-SXM4-40GB"]
H100 = CARDS["H100-SXM5-80GB"]


def _gi(gi_id: int, profile: str, start: int, cis: tuple[int, ...] | None = None):
    p = A100.profile_by_name(profile)
    slices = (p.slices,) if cis is None else cis
    return GpuInstanceState(gi_id, profile, p.slices, start, p.size,
                            tuple(ComputeInstanceState(i, s) for i, s in enumerate(slices)))


def _gpu(current: bool, pending: bool | None = None, *instances: GpuInstanceState,
         card=A100, processes: tuple[int, ...] = ()) -> GpuMigState:
    return GpuMigState(
        0, "GPU-0", card.name, card.pci_device_id, mig_capable=True, mig_current=current,
        mig_pending=current if pending is None else pending,
        mode_change_needs_reset=card.arch == "ampere", profiles=card.profiles,
        instances=instances, processes=processes,
    )  # fmt: skip


def _steps(state: GpuMigState, layout: Layout) -> list[str]:
    return [s.describe().removeprefix("GPU 0: ") for s in diff(state, layout)]


def test_disable_destroys_compute_then_gpu_instances_then_changes_mode() -> None:
    state = _gpu(True, None, _gi(9, "3g.20gb", 4), _gi(3, "2g.10gb", 0))
    assert _steps(state, Layout(False)) == [
        "destroy compute instance 0 of GPU instance 3 (2g.10gb)",
        "destroy GPU instance 3 (2g.10gb at slots 0-1)",
        "destroy compute instance 0 of GPU instance 9 (3g.20gb)",
        "destroy GPU instance 9 (3g.20gb at slots 4-7)",
        "disable MIG mode (Ampere: takes effect through a GPU reset, which needs no processes "
        "running)",
    ]


def test_matching_instances_are_kept_and_partial_ones_get_a_full_compute_instance() -> None:
    state = _gpu(True, None, _gi(2, "3g.20gb", 4, cis=(1, 1, 1)), _gi(3, "2g.10gb", 0),
                 _gi(9, "1g.5gb", 2))  # fmt: skip
    layout = Layout(True, (Placement(0, 2, "2g.10gb"), Placement(2, 2, "2g.10gb"),
                           Placement(4, 4, "3g.20gb")))  # fmt: skip
    assert _steps(state, layout) == [
        "destroy compute instance 0 of GPU instance 9 (1g.5gb)",
        "destroy GPU instance 9 (1g.5gb at slot 2)",
        "destroy compute instance 0 of GPU instance 2 (3g.20gb)",
        "destroy compute instance 1 of GPU instance 2 (3g.20gb)",
        "destroy compute instance 2 of GPU instance 2 (3g.20gb)",
        "create the full compute instance of 3g.20gb at slots 4-7",
        "create GPU instance 2g.10gb at slots 2-3",
        "create the full compute instance of 2g.10gb at slots 2-3",
    ]


@pytest.mark.parametrize(
    ("state", "layout", "first"),
    [
        pytest.param(_gpu(False, True), Layout(False), "disable MIG mode (Ampere",
                     id="pending enable is cancelled"),
        pytest.param(_gpu(True, False), Layout(True), "enable MIG mode (Ampere",
                     id="pending disable is cancelled"),
        pytest.param(_gpu(False, card=H100), Layout(True), "enable MIG mode",
                     id="Hopper: no reset"),
    ],
)  # fmt: skip
def test_mode_changes(state: GpuMigState, layout: Layout, first: str) -> None:
    steps = _steps(state, layout)
    assert steps[0].startswith(first)
    assert ("Ampere" in steps[0]) == (state.name != H100.name)


def test_already_right_means_no_steps() -> None:
    state = _gpu(True, None, _gi(1, "3g.20gb", 0), _gi(2, "3g.20gb", 4))
    assert diff(state, Layout(True, (Placement(0, 4, "3g.20gb"), Placement(4, 4, "3g.20gb")))) \
        == ()
    assert diff(_gpu(False), Layout(False)) == ()


def test_step_json_round_trip_and_refusal() -> None:
    step = Step(3, "create-gi", "1g.5gb", 6, 1)
    assert Step.from_json(step.to_json()) == step
    with pytest.raises(ValueError, match="unknown MIG step action 'explode'"):
        Step.from_json({**step.to_json(), "action": "explode"})
    with pytest.raises(ValueError, match="not a MIG step"):
        Step.from_json({"gpu": 1, "bogus": 2})


def test_describe_notes_incomplete_instances_and_pending_mode() -> None:
    state = _gpu(True, False, _gi(9, "1g.5gb", 2, cis=()), _gi(2, "3g.20gb", 4, cis=(1, 2)))
    assert state.describe() == (
        "MIG enabled (disable pending a GPU reset): 1g.5gb@2 (GPU instance 9 without compute "
        "instance) 3g.20gb@4 (GPU instance 2 with compute instances 1c+2c)"
    )


def test_export_groups_gpus_and_notes_what_it_cannot_express() -> None:
    gpus = [
        _gpu(True, None, _gi(1, "3g.20gb", 0), _gi(2, "3g.20gb", 4)),
        _gpu(False),
        _gpu(True, None, _gi(9, "1g.5gb", 2, cis=())),
    ]
    gpus.append(gpus[0])
    gpus = [dataclasses.replace(g, index=i) for i, g in enumerate(gpus)]
    text = export_config(gpus, "snap")
    assert text.splitlines()[0] == ("# GPU 2 (NVIDIA A100-SXM4-40GB): GPU instances without their "
                                    "full compute instance are not listed")  # fmt: skip
    entries = parse_mig_parted(text).select("snap").entries
    assert [(e.devices, e.mig_enabled, [(p.name, n) for p, n in e.mig_devices])
            for e in entries] == [
        ((0, 3), True, [("3g.20gb", 2)]),
        ((1,), False, []),
        ((2,), True, []),
    ]  # fmt: skip
