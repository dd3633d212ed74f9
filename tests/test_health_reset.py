"""Reset-class faults clear when the GPU was reset: seen again after not answering (rule a), or
the driver's recovery action went from a pending reset to `none` (rule b). Pure tracker tests."""

from __future__ import annotations

import pytest

from sharing.health import HealthTracker, XidPolicy
from tests.fakes.health import MIG_GPU, mixed_plan, node, xid

INV = node()
PLAN = mixed_plan(INV)
GPU3 = INV.gpu(3).uuid
MIGS = INV.gpu(MIG_GPU).mig_devices
QUIET_S = 300.0


def run(steps: str, policy: XidPolicy | None = None) -> HealthTracker:
    """Apply space-separated steps to GPU 3 at times 1, 2, 3, ...

    `xidN` an XID event; `ok` / `lost` a probe that answers / does not; any other word a recovery
    action read by a probe of the answering GPU (`unsupported`: the driver does not report it).
    """
    t = HealthTracker(policy or XidPolicy(), QUIET_S, PLAN, INV)
    for now, step in enumerate(steps.split(), start=1):
        if step.startswith("xid"):
            t.on_event(xid(INV, 3, int(step[3:])), float(now))
        elif step in ("ok", "lost"):
            t.on_probe(GPU3, step == "ok", float(now), "GPU_IS_LOST")
        else:
            t.on_recovery_action(GPU3, None if step == "unsupported" else step, float(now))
    return t


@pytest.mark.parametrize(
    ("steps", "healthy"),
    [
        pytest.param("xid48 gpu_reset none", True, id="XID 48: pending reset, then none"),
        pytest.param("xid95 gpu_reset gpu_reset none", True, id="XID 95: read pending twice"),
        pytest.param("xid79 drain_and_reset none", True, id="drain and reset, then none"),
        pytest.param("xid48 gpu_reset drain_p2p none", True, id="other action between"),
        pytest.param("xid48 gpu_reset xid48 none", True, id="repeat XID after pending"),
        pytest.param("xid48", False, id="nothing read"),
        pytest.param("xid48 gpu_reset", False, id="reset still pending"),
        pytest.param("xid48 none", False, id="none without a pending reset first"),
        pytest.param("xid48 none none", False, id="none twice: no reset seen"),
        pytest.param("gpu_reset xid48 none", False, id="pending read before the fault"),
        pytest.param("xid48 node_reboot none", False, id="node reboot is not a GPU reset"),
        pytest.param("xid48 gpu_reset unsupported", False, id="field gone: no reading"),
        pytest.param("xid48 unsupported unsupported", False, id="driver without the field"),
        pytest.param("xid48 unsupported lost ok", True, id="without the field: rule a"),
        pytest.param("xid48 gpu_reset lost ok", True, id="rule a after a pending read"),
        pytest.param("xid48 gpu_reset lost none", False, id="none read while not answering"),
        pytest.param("xid94 gpu_reset none", False, id="recoverable XID waits its quiet period"),
    ],
)  # fmt: skip
def test_reset_class_recovery(steps: str, healthy: bool) -> None:
    t = run(steps)
    assert (GPU3 not in t.overlay()) is healthy
    assert t.awaiting_reset(GPU3) is (not healthy and "xid94" not in steps)


def test_the_clearing_transition_is_logged_once() -> None:
    t = run("xid48 gpu_reset")
    (tr,) = t.on_recovery_action(GPU3, "none", 10.0)
    assert tr.healthy
    assert tr.message == (
        f"gpu 3 ({GPU3}) healthy again: XID 48 (double-bit ECC error), reset required cleared: "
        "the GPU was reset (recovery action none); 4 virtual devices affected"
    )
    assert t.on_recovery_action(GPU3, "none", 11.0) == []
    assert dict(t.overlay()) == {}


def test_recoverable_fault_stays_when_the_reset_clears_the_reset_class_one() -> None:
    """XID 94 and XID 48 on one GPU: the reset clears 48, 94 waits for its quiet period."""
    t = run("xid94 xid48 gpu_reset")
    (tr,) = t.on_recovery_action(GPU3, "none", 10.0)
    assert not tr.healthy
    assert t.overlay()[GPU3] == "XID 94 (contained ECC error)"
    assert "the GPU was reset (recovery action none)" in tr.message


def test_reset_clears_its_mig_devices_and_not_other_gpus() -> None:
    t = HealthTracker(XidPolicy(), QUIET_S, PLAN, INV)
    gpu = INV.gpu(MIG_GPU).uuid
    t.on_event(xid(INV, MIG_GPU, 95, gi=MIGS[0].gi_id), 0.0)
    t.on_event(xid(INV, 3, 48), 0.0)
    for uuid in (gpu, GPU3):
        t.on_recovery_action(uuid, "gpu_reset", 1.0)
    cleared = t.on_recovery_action(gpu, "none", 2.0)
    assert [tr.key for tr in cleared] == [MIGS[0].uuid]
    assert set(t.overlay()) == {GPU3}
    assert (t.awaiting_reset(gpu), t.awaiting_reset(GPU3)) == (False, True)


def test_disabled_health_checks_ignore_recovery_actions() -> None:
    t = run("xid48 gpu_reset none", XidPolicy(disabled=True))
    assert dict(t.overlay()) == {}
    assert not t.awaiting_reset(GPU3)
