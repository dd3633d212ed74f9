"""Health overlay: propagation to every virtual device, recovery rules, logged transitions."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from sharing.devices import Inventory
from sharing.health import (
    EVENT_DOUBLE_BIT_ECC,
    EVENT_SINGLE_BIT_ECC,
    HealthTracker,
    HealthTransition,
    XidPolicy,
    affected_devices,
    mps_key,
    unhealthy_devices,
)
from sharing.plan_types import Plan
from tests.fakes.health import (
    MIG_GPU,
    MIG_LAYOUT,
    Event,
    mixed_plan,
    node,
    whole_gpu_scope,
    xid,
)
from tests.fakes.inventories import dgx_a100, with_mig

QUIET_S = 300.0
INV = node()
PLAN = mixed_plan(INV)
GPU3 = INV.gpu(3).uuid
GPU7 = INV.gpu(7).uuid
MIGS = INV.gpu(MIG_GPU).mig_devices  # 3g.20gb (GI 1), 2g.10gb (GI 5), 1g.5gb (GI 14)


def tracker(policy: XidPolicy | None = None) -> HealthTracker:
    """A tracker over the mixed plan with the default policy."""
    return HealthTracker(policy or XidPolicy(), QUIET_S, PLAN, INV)


def marked(t: HealthTracker) -> dict[str, set[str]]:
    """Resource -> unhealthy virtual device IDs."""
    return {res: set(ids) for res, ids in unhealthy_devices(PLAN, t.overlay()).items()}


def ids_of(plan: Plan, resource: str, parent: str) -> set[str]:
    """Virtual device IDs of one parent (GPU or MIG UUID) in one resource."""
    res = plan.resource(resource)
    assert res is not None
    return {d.id for d in res.devices if parent in (d.physical_id, d.gpu_uuid)}


def all_on_gpu(plan: Plan, gpu_uuid: str) -> dict[str, set[str]]:
    """Every virtual device on a GPU, by resource."""
    found = {r.name: ids_of(plan, r.name, gpu_uuid) for r in plan.resources}
    return {name: ids for name, ids in found.items() if ids}


def mig_ids(index: int) -> dict[str, set[str]]:
    """The replicas of MIG device `index` on the MIG GPU."""
    mig = MIGS[index]
    resource = f"nvidia.com/mig-{mig.profile}"
    return {resource: ids_of(PLAN, resource, mig.uuid)}


Apply = Callable[[HealthTracker, Inventory], list[HealthTransition]]

PROPAGATION: list[object] = [
    pytest.param(
        lambda t, inv: t.on_event(xid(inv, 3, 79), 0.0),
        all_on_gpu(PLAN, GPU3), id="whole-GPU XID marks every replica of the GPU",
    ),
    pytest.param(
        lambda t, inv: t.on_event(xid(inv, MIG_GPU, 79), 0.0),
        all_on_gpu(PLAN, INV.gpu(MIG_GPU).uuid),
        id="whole-GPU XID marks every MIG device and replica in every resource",
    ),
    pytest.param(
        lambda t, inv: t.on_event(whole_gpu_scope(inv, MIG_GPU, 94), 0.0),
        all_on_gpu(PLAN, INV.gpu(MIG_GPU).uuid), id="GI/CI 0xFFFFFFFF means the whole GPU",
    ),
    pytest.param(
        lambda t, inv: t.on_event(xid(inv, MIG_GPU, 94, gi=MIGS[1].gi_id), 0.0),
        mig_ids(1), id="GI-scoped XID marks only that MIG device and its replicas",
    ),
    pytest.param(
        lambda t, inv: t.on_event(xid(inv, MIG_GPU, 94, gi=MIGS[2].gi_id, ci=0), 0.0),
        mig_ids(2), id="GI+CI-scoped XID marks only that MIG device",
    ),
    pytest.param(
        lambda t, inv: t.on_event(xid(inv, MIG_GPU, 94, gi=12), 0.0),
        all_on_gpu(PLAN, INV.gpu(MIG_GPU).uuid), id="unknown GI falls back to the whole GPU",
    ),
    pytest.param(
        lambda t, inv: t.on_mps_down("nvidia.com/gpu.mps", "control pipe gone", 0.0),
        {"nvidia.com/gpu.mps": ids_of(PLAN, "nvidia.com/gpu.mps", GPU7)},
        id="MPS daemon down marks every device of its resource only",
    ),
    pytest.param(
        lambda t, inv: t.on_probe(GPU3, False, 0.0, "GPU_IS_LOST"),
        all_on_gpu(PLAN, GPU3), id="lost GPU marks everything on it",
    ),
    pytest.param(
        lambda t, inv: t.on_probe(inv.gpu(MIG_GPU).uuid, False, 0.0),
        all_on_gpu(PLAN, INV.gpu(MIG_GPU).uuid), id="lost MIG GPU marks all its MIG devices",
    ),
    pytest.param(
        lambda t, inv: t.on_event(xid(inv, 3, 43), 0.0), {}, id="ignored XID changes nothing",
    ),
    pytest.param(
        lambda t, inv: t.on_event(xid(inv, 3, 0, event_type=EVENT_SINGLE_BIT_ECC), 0.0),
        {}, id="single-bit ECC changes nothing",
    ),
    pytest.param(
        lambda t, inv: t.on_event(xid(inv, 3, 0, event_type=EVENT_DOUBLE_BIT_ECC), 0.0),
        all_on_gpu(PLAN, GPU3), id="double-bit ECC marks the GPU",
    ),
]


@pytest.mark.parametrize(("apply", "expected"), PROPAGATION)
def test_propagation(apply: Apply, expected: dict[str, set[str]]) -> None:
    """Exactly the expected virtual devices are Unhealthy; every other one stays Healthy."""
    t = tracker()
    transitions = apply(t, INV)
    assert marked(t) == expected
    assert sum(tr.affected for tr in transitions) == sum(len(v) for v in expected.values())


def test_mig_scoped_event_with_unknown_ci_falls_back_to_the_gpu() -> None:
    """A GI+CI event whose CI does not exist cannot be placed, so the whole GPU is marked."""
    t = tracker()
    t.on_event(xid(INV, MIG_GPU, 94, gi=MIGS[2].gi_id, ci=3), 0.0)
    assert marked(t) == all_on_gpu(PLAN, INV.gpu(MIG_GPU).uuid)


def test_transition_message_names_xid_reason_and_count() -> None:
    """One log record per transition, with GPU, XID, reason and affected count."""
    t = tracker()
    (tr,) = t.on_event(xid(INV, 3, 79), 0.0)
    assert tr.message == (
        f"gpu 3 ({GPU3}) unhealthy: XID 79 (GPU has fallen off the bus), reset required; "
        "4 virtual devices affected"
    )
    (mig,) = t.on_event(xid(INV, MIG_GPU, 94, gi=MIGS[0].gi_id), 0.0)
    assert mig.message.startswith(f"MIG device {MIGS[0].uuid} on gpu {MIG_GPU} (")
    assert mig.message.endswith("XID 94 (contained ECC error); 2 virtual devices affected")
    (mps,) = t.on_mps_down("nvidia.com/gpu.mps", "exited 1", 0.0)
    assert mps.message == (
        "MPS daemon of nvidia.com/gpu.mps unhealthy: MPS daemon down: exited 1; "
        "2 virtual devices affected"
    )


def test_repeated_events_log_once_and_keep_the_overlay() -> None:
    """A second event of the same kind on a faulted device changes nothing and logs nothing."""
    t = tracker()
    assert len(t.on_event(xid(INV, 3, 79), 0.0)) == 1
    version, overlay = t.version, dict(t.overlay())
    assert t.on_events([xid(INV, 3, 79), xid(INV, 3, 95), xid(INV, 3, 48)], 1.0) == []
    assert (t.version, dict(t.overlay())) == (version, overlay)


def test_escalation_from_recoverable_to_reset_is_one_transition() -> None:
    """A reset-class XID on a device with a recoverable fault adds its reason."""
    t = tracker()
    t.on_event(xid(INV, 3, 94), 0.0)
    (tr,) = t.on_event(xid(INV, 3, 79), 1.0)
    assert not tr.healthy
    assert t.overlay()[GPU3] == "XID 79 (GPU has fallen off the bus), reset required; " + (
        "XID 94 (contained ECC error)"
    )


def test_recoverable_xid_clears_after_quiet_period_and_probe() -> None:
    """Unhealthy until the quiet period has passed and the GPU answered a probe after the XID."""
    t = tracker()
    t.on_event(xid(INV, 3, 94), 10.0)
    t.on_probe(GPU3, True, 5.0)  # a probe from before the XID does not count
    assert t.next_recovery_at() == 10.0 + QUIET_S
    assert t.recovery_candidates(10.0 + QUIET_S - 1) == ()
    assert t.tick(10.0 + QUIET_S) == []
    assert t.recovery_candidates(10.0 + QUIET_S) == (GPU3,)
    t.on_probe(GPU3, True, 10.0 + QUIET_S)
    (tr,) = t.tick(10.0 + QUIET_S)
    assert tr.healthy
    assert tr.message.startswith(f"gpu 3 ({GPU3}) healthy again: XID 94 (contained ECC error) ")
    assert tr.message.endswith("; 4 virtual devices affected")
    assert dict(t.overlay()) == {}
    assert t.next_recovery_at() is None


def test_new_critical_xid_restarts_the_quiet_period() -> None:
    """Another critical XID inside the quiet period pushes recovery out."""
    t = tracker()
    t.on_event(xid(INV, 3, 94), 0.0)
    t.on_event(xid(INV, 3, 74), 200.0)  # also recoverable: same fault, new last event
    t.on_probe(GPU3, True, QUIET_S + 1)
    assert t.tick(QUIET_S + 1) == []
    t.on_probe(GPU3, True, 200.0 + QUIET_S)
    assert len(t.tick(200.0 + QUIET_S)) == 1


def test_recoverable_xid_stays_while_gpu_unanswering() -> None:
    """A GPU that does not answer probes does not recover from a recoverable XID."""
    t = tracker()
    t.on_event(xid(INV, 3, 94), 0.0)
    t.on_probe(GPU3, False, 1.0)
    assert t.tick(QUIET_S + 10) == []
    assert GPU3 in t.overlay()


def test_reset_class_xid_needs_a_reset() -> None:
    """XID 79 survives the quiet period and good probes; lost-then-answering clears it."""
    t = tracker()
    t.on_event(xid(INV, 3, 79), 0.0)
    t.on_probe(GPU3, True, 10 * QUIET_S)
    assert t.tick(10 * QUIET_S) == []
    assert GPU3 in t.overlay()
    lost = t.on_probe(GPU3, False, 10 * QUIET_S + 1, "GPU_IS_LOST")
    assert [tr.healthy for tr in lost] == [False]
    assert t.on_probe(GPU3, False, 10 * QUIET_S + 2) == []  # logged once
    (back,) = t.on_probe(GPU3, True, 10 * QUIET_S + 3)
    assert back.message == (
        f"gpu 3 ({GPU3}) healthy again: GPU lost: GPU_IS_LOST and XID 79 (GPU has fallen off "
        "the bus), reset required cleared: seen again after a reset; 4 virtual devices affected"
    )
    assert dict(t.overlay()) == {}


def test_gpu_reset_clears_reset_faults_of_its_mig_devices() -> None:
    """A reset observed directly clears reset-class faults on the GPU and its MIG devices only."""
    t = tracker()
    t.on_event(xid(INV, MIG_GPU, 95, gi=MIGS[0].gi_id), 0.0)
    t.on_event(xid(INV, MIG_GPU, 94, gi=MIGS[1].gi_id), 0.0)
    t.on_event(xid(INV, 3, 79), 0.0)
    cleared = t.on_gpu_reset(INV.gpu(MIG_GPU).uuid, 1.0)
    assert [tr.key for tr in cleared] == [MIGS[0].uuid]
    assert set(t.overlay()) == {MIGS[1].uuid, GPU3}


def test_partial_clear_is_logged_as_still_unhealthy() -> None:
    """A lost GPU that answers again keeps its recoverable XID until the quiet period ends."""
    t = tracker()
    t.on_event(xid(INV, 3, 94), 0.0)
    t.on_probe(GPU3, False, 1.0, "GPU_IS_LOST")
    (tr,) = t.on_probe(GPU3, True, 2.0)
    assert not tr.healthy
    assert tr.message == (
        f"gpu 3 ({GPU3}) still unhealthy: XID 94 (contained ECC error) (GPU lost: GPU_IS_LOST "
        "cleared: seen again after a reset); 4 virtual devices affected"
    )


def test_mps_up_clears_mps_down() -> None:
    """MPS health follows the daemon both ways."""
    t = tracker()
    t.on_mps_down("nvidia.com/gpu.mps", "exited", 0.0)
    assert t.on_mps_down("nvidia.com/gpu.mps", "still exited", 1.0) == []
    (tr,) = t.on_mps_up("nvidia.com/gpu.mps")
    assert tr.healthy
    assert mps_key("nvidia.com/gpu.mps") not in t.overlay()


def test_set_plan_drops_faults_of_vanished_mig_devices() -> None:
    """A MIG device that no longer exists (layout changed, reset) takes its fault with it."""
    t = tracker()
    t.on_event(xid(INV, MIG_GPU, 94, gi=MIGS[1].gi_id), 0.0)
    t.on_event(xid(INV, 3, 79), 0.0)
    new_inv = with_mig(dgx_a100(), {MIG_GPU: MIG_LAYOUT[:1]})
    cleared = t.set_plan(mixed_plan(new_inv), new_inv)
    assert [(tr.key, tr.healthy) for tr in cleared] == [(MIGS[1].uuid, True)]
    assert set(t.overlay()) == {GPU3}


def test_disabled_policy_marks_nothing() -> None:
    """With health checks off, neither events nor failed probes change health."""
    t = tracker(XidPolicy.from_lists("all", None))
    assert t.on_event(xid(INV, 3, 79), 0.0) == []
    assert t.on_probe(GPU3, False, 0.0) == []
    assert dict(t.overlay()) == {}


def test_affected_devices_counts_every_resource() -> None:
    """The count behind each log line: replicas of the GPU and of its MIG devices."""
    assert affected_devices(PLAN, GPU3) == 4
    assert affected_devices(PLAN, INV.gpu(MIG_GPU).uuid) == 6
    assert affected_devices(PLAN, MIGS[0].uuid) == 2
    assert affected_devices(PLAN, mps_key("nvidia.com/gpu.mps")) == 2
    assert affected_devices(PLAN, "GPU-unknown") == 0


def test_storm_changes_the_overlay_a_bounded_number_of_times() -> None:
    """10 000 critical XIDs across GPUs: at most one transition per device and cause."""
    t = tracker()
    codes = (79, 94, 74, 43, 48)
    events = [xid(INV, n % 8, codes[n % len(codes)]) for n in range(10_000)]
    transitions = t.on_events(events, 0.0)
    assert len(transitions) <= 2 * 8
    assert t.events_seen == 10_000
    assert set(t.overlay()) == {g.uuid for g in INV.gpus}


def test_event_for_unknown_gpu_is_keyed_by_its_uuid() -> None:
    """An event from a GPU not in the inventory is recorded under its UUID and marks nothing."""
    t = tracker()
    (tr,) = t.on_event(Event(9, "GPU-elsewhere", 79), 0.0)
    assert (tr.key, tr.affected) == ("GPU-elsewhere", 0)
    assert marked(t) == {}
