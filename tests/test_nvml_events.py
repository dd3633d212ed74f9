"""NVML events through the adapter's EventWatcher, including from another process."""

from __future__ import annotations

import subprocess
import time

import pynvml
import pytest

from sharing.nvml import XidEvent
from sharing.nvml.sim import inject_event, inject_xid, lose_gpu
from tests.checkout import checkout_env, gpushare_argv, python_argv

INJECT_AND_PRINT_TIME = """
import sys, time
from sharing.nvml.sim import inject_xid
inject_xid(sys.argv[1], 6, 48)
print(repr(time.time()))
"""


def test_xid_event_arrives_with_gpu_identity(sim_nvml) -> None:
    nvml, state = sim_nvml("dgx-a100")
    with nvml.event_watcher(range(8)) as watcher:
        assert watcher.gpu_indices == tuple(range(8))
        inject_xid(state, 3, 79)
        event = watcher.wait(1000)
    uuid = nvml.call("nvmlDeviceGetUUID", nvml.handle(3))
    assert event == XidEvent(gpu_index=3, gpu_uuid=uuid, xid=79, event_type="xid")


@pytest.mark.parametrize(
    ("event_type", "name"),
    [
        pytest.param(pynvml.nvmlEventTypeDoubleBitEccError, "ecc_double", id="double-bit ECC"),
        pytest.param(pynvml.nvmlEventTypeSingleBitEccError, "ecc_single", id="single-bit ECC"),
    ],
)
def test_ecc_events(sim_nvml, event_type: int, name: str) -> None:
    nvml, state = sim_nvml("hgx-h100")
    with nvml.event_watcher([1]) as watcher:
        inject_event(state, 1, event_type, 0)
        event = watcher.wait(1000)
    assert event is not None
    assert (event.gpu_index, event.event_type) == (1, name)


def test_mig_event_carries_gi_and_ci(sim_nvml) -> None:
    nvml, state = sim_nvml("mixed")
    with nvml.event_watcher([0, 1]) as watcher:
        inject_xid(state, 0, 31, gi=2, ci=0)
        event = watcher.wait(1000)
    assert event is not None
    assert (event.gpu_index, event.xid, event.gi_id, event.ci_id) == (0, 31, 2, 0)


def test_timeout_returns_none(sim_nvml) -> None:
    nvml, _ = sim_nvml("laptop")
    with nvml.event_watcher([0]) as watcher:
        start = time.monotonic()
        assert watcher.wait(30) is None
        assert time.monotonic() - start >= 0.03


def test_only_new_events_of_registered_gpus_arrive(sim_nvml) -> None:
    nvml, state = sim_nvml("dgx-a100")
    inject_xid(state, 0, 13)
    with nvml.event_watcher([0]) as watcher:
        inject_xid(state, 1, 79)
        assert watcher.wait(20) is None
        inject_xid(state, 0, 94)
        event = watcher.wait(1000)
        assert event is not None
        assert event.xid == 94


def test_gpu_without_ecc_registers_xid_only(sim_nvml) -> None:
    nvml, state = sim_nvml("laptop")
    with nvml.event_watcher([0]) as watcher:
        assert watcher.failed == {}
        inject_event(state, 0, pynvml.nvmlEventTypeDoubleBitEccError, 0)
        assert watcher.wait(20) is None
        inject_xid(state, 0, 43)
        event = watcher.wait(1000)
        assert event is not None
        assert event.xid == 43


def test_lost_gpu_cannot_be_registered_and_losing_emits_xid_79(sim_nvml) -> None:
    nvml, state = sim_nvml("dgx-a100")
    with nvml.event_watcher([2, 3]) as watcher:
        lose_gpu(state, 3)
        event = watcher.wait(1000)
        assert event is not None
        assert (event.gpu_index, event.xid) == (3, 79)
    with nvml.event_watcher([2, 3]) as watcher:
        assert watcher.gpu_indices == (2,)
        assert "GPU_IS_LOST" in watcher.failed[3]


def test_close_is_idempotent(sim_nvml) -> None:
    nvml, _ = sim_nvml("laptop")
    watcher = nvml.event_watcher([0])
    watcher.close()
    watcher.close()


def test_event_from_another_process_arrives_within_100_ms(sim_nvml) -> None:
    nvml, state = sim_nvml("dgx-a100")
    with nvml.event_watcher(range(8)) as watcher:
        child = subprocess.Popen(
            python_argv(INJECT_AND_PRINT_TIME, str(state)),
            env=checkout_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        event = watcher.wait(10_000)
        received = time.time()
        out, _ = child.communicate(timeout=30)
    assert child.returncode == 0
    assert event is not None
    assert (event.gpu_index, event.xid) == (6, 48)
    assert received - float(out) < 0.1


def test_cli_injection_reaches_a_waiting_watcher(sim_nvml) -> None:
    nvml, state = sim_nvml("mixed")
    with nvml.event_watcher([1]) as watcher:
        argv = gpushare_argv("sim", "inject-xid", "--node", str(state),
                             "--gpu", "1", "--mig", "2:0", "--xid", "63")
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False,
                              env=checkout_env(), cwd=state)
        assert done.returncode == 0, done.stderr
        event = watcher.wait(1000)
    assert event is not None
    assert (event.gpu_index, event.xid, event.gi_id, event.ci_id) == (1, 63, 2, 0)


def test_gpu_instance_event_without_compute_instance(sim_nvml) -> None:
    nvml, state = sim_nvml("mixed")
    with nvml.event_watcher([1]) as watcher:
        inject_xid(state, 1, 43, gi=2)
        event = watcher.wait(1000)
    assert event is not None
    assert (event.gi_id, event.ci_id) == (2, None)
