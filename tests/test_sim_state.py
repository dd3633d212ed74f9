"""Simulated node descriptions, state directories, locking, caching and control functions."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from sharing.errors import ConfigError
from sharing.nvml.sim import (
    SimError,
    create_state,
    inject_xid,
    inject_xids,
    lose_gpu,
    reset_gpu,
    show,
    start_process,
    stop_process,
)
from sharing.nvml.sim.state import StateStore
from tests.checkout import checkout_env, python_argv

GPU_L4 = '  - {model: L4, bus_id: "00000000:01:00.0"}\n'
GPU_A100 = '  - {model: A100-SXM4-40GB, bus_id: "00000000:07:00.0"'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "name: n\nflags: {}\ngpus:\n" + GPU_L4,
            r"bad\.yaml: flags: Extra inputs are not permitted, got \{\}",
            id="unknown key",
        ),
        pytest.param(
            'name: n\ngpus:\n  - {model: B200, bus_id: "00000000:01:00.0"}\n',
            r"gpus\[0\]\.model: unknown model 'B200' \(known: A100-PCIE-80GB, ",
            id="unknown model",
        ),
        pytest.param(
            "name: n\ngpus:\n" + GPU_L4 + GPU_L4,
            r"gpus\[1\]\.bus_id: duplicate PCI bus id '00000000:01:00.0'",
            id="duplicate bus id",
        ),
        pytest.param(
            "name: n\ngpus:\n" + GPU_A100 + ", mig: {instances: [{profile: 1g.5gb, start: 0}]}}\n",
            r"gpus\[0\]\.mig\.instances: MIG instances need mig\.enabled: true",
            id="instances without MIG mode",
        ),
        pytest.param(
            "name: n\ngpus:\n" + GPU_A100 + ", mig: {enabled: true, instances: "
            "[{profile: 3g.40gb, start: 0}]}}\n",
            r"gpus\[0\]\.mig\.instances\[0\]\.profile: NVIDIA A100-SXM4-40GB has no profile "
            r"'3g\.40gb' \(has: 1g\.5gb, ",
            id="profile of another card",
        ),
        pytest.param(
            "name: n\ngpus:\n" + GPU_A100 + ", mig: {enabled: true, instances: "
            "[{profile: 3g.20gb, start: 0}, {profile: 2g.10gb, start: 2}]}}\n",
            r"gpus\[0\]\.mig\.instances\[1\]: 2g\.10gb at start 2 refused: "
            r"NVML_ERROR_INSUFFICIENT_RESOURCES",
            id="overlapping instances",
        ),
        pytest.param(
            "name: n\ngpus:\n" + GPU_A100 + ", mig: {enabled: true, instances: "
            "[{profile: 3g.20gb, start: 2}]}}\n",
            r"instances\[0\]: 3g\.20gb at start 2 refused: NVML_ERROR_INVALID_ARGUMENT "
            r"\(allowed starts \[0, 4\]",
            id="start not allowed",
        ),
        pytest.param(
            'name: n\ngpus:\n  - {model: L4, bus_id: "00000000:01:00.0", mig: {enabled: true}}\n',
            r"gpus\[0\]\.mig: NVIDIA L4 is not MIG capable",
            id="MIG on L4",
        ),
        pytest.param(
            "name: n\nnvlink_pairs: [[0, 0, 2]]\ngpus:\n" + GPU_L4,
            r"nvlink_pairs\[0\]: needs two different GPU indices",
            id="self link",
        ),
        pytest.param(
            "name: n\nnvswitch: {links_per_switch: [2]}\ngpus:\n" + GPU_L4,
            r"gpus\[0\]: 2 NVLink links configured, NVIDIA L4 has 0",
            id="NVLink on L4",
        ),
        pytest.param(
            "name: n\ngpus:\n" + GPU_A100 + ", processes: [{mig: '1:0'}]}\n",
            r"processes\[0\]\.mig: GPU 0 is not in MIG mode",
            id="process on no MIG",
        ),
        pytest.param(
            "name: n\ninit_error: BROKEN\ngpus:\n" + GPU_L4,
            r"init_error: unknown NVML error name 'BROKEN'",
            id="unknown init error",
        ),
        pytest.param(
            "- just a list\n", r"a node description must be a mapping", id="not a mapping"
        ),
        pytest.param(
            "version: v1\nsharing: {timeSlicing: {resources: [{name: x, replicas: 4}]}}\n",
            r"bad\.yaml: name: Field required$", id="a gpushare config, not a node",
        ),
    ],
)
def test_bad_node_descriptions_name_file_field_and_value(
    tmp_path: Path, text: str, message: str
) -> None:
    node = tmp_path / "bad.yaml"
    node.write_text(text)
    with pytest.raises(ConfigError, match=message):
        create_state(node, tmp_path / "state")
    assert not (tmp_path / "state").exists()


def test_state_directory_is_created_once(sim_state, tmp_path: Path) -> None:
    state = sim_state("laptop")
    with pytest.raises(SimError, match="already a simulated node state directory"):
        create_state("laptop", state)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("x")
    with pytest.raises(SimError, match="exists and is not empty"):
        create_state("laptop", busy)


def test_state_is_cached_until_it_changes(sim_state) -> None:
    state = sim_state("dgx-a100")
    store = StateStore(state)
    first = store.read()
    assert store.read() is first
    inject_xid(state, 0, 79)
    second = store.read()
    assert second is not first
    assert second["events"][-1]["data"] == 79


def test_every_write_changes_the_version(sim_state) -> None:
    state = sim_state("laptop")
    store = StateStore(state)
    versions = {store.version()}
    for _ in range(20):
        pid = start_process(state, 0)
        versions.add(store.version())
        stop_process(state, 0, pid=pid)
        versions.add(store.version())
    assert len(versions) == 41


WRITER = """
import sys
from sharing.nvml.sim import start_process
for _ in range(int(sys.argv[2])):
    start_process(sys.argv[1], int(sys.argv[3]))
"""


def test_concurrent_writers_lose_no_update(sim_state) -> None:
    state = sim_state("dgx-a100")
    writers = [
        subprocess.Popen(python_argv(WRITER, str(state), "25", str(gpu)),
                         env=checkout_env(), cwd=state)
        for gpu in range(4)
    ]
    assert [w.wait(timeout=60) for w in writers] == [0, 0, 0, 0]
    gpus = StateStore(state).read()["gpus"]
    pids = [p["pid"] for gpu in gpus for p in gpu["procs"]]
    assert [len(gpus[i]["procs"]) for i in range(4)] == [25, 25, 25, 25]
    assert len(set(pids)) == 100


@pytest.mark.parametrize(
    ("action", "message"),
    [
        pytest.param(
            lambda s: inject_xid(s, 8, 79),
            r"unknown GPU index 8: this node has GPUs 0-3",
            id="unknown GPU",
        ),
        pytest.param(
            lambda s: inject_xid(s, 0, 79, gi=9, ci=0),
            r"GPU 0 has no MIG device 9:0 \(has: 2:0, 4:0, 7:0, 8:0\)",
            id="unknown GI:CI",
        ),
        pytest.param(
            lambda s: start_process(s, 0),
            r"GPU 0 is in MIG mode: name a MIG device",
            id="process on a MIG GPU without GI:CI",
        ),
        pytest.param(
            lambda s: start_process(s, 2, gi=1, ci=0),
            r"GPU 2 is not in MIG mode",
            id="process on MIG device of an L4",
        ),
        pytest.param(
            lambda s: start_process(s, 1, gi=1), r"needs both GI and CI", id="GI without CI"
        ),
        pytest.param(lambda s: stop_process(s, 3), r"no process on GPU 3", id="nothing to stop"),
    ],
)
def test_control_errors_are_clear(sim_state, action, message: str) -> None:
    with pytest.raises(SimError, match=message):
        action(sim_state("mixed"))


def test_lost_gpu_takes_no_processes_until_reset(sim_state) -> None:
    state = sim_state("dgx-a100")
    lose_gpu(state, 1)
    with pytest.raises(SimError, match="GPU 1 is lost"):
        start_process(state, 1)
    reset_gpu(state, 1)
    assert start_process(state, 1) > 0


def test_reset_wipes_layout_and_processes_and_emits_nothing(sim_state) -> None:
    state = sim_state("mixed")
    start_process(state, 0, gi=2, ci=0)
    events = len(StateStore(state).read()["events"])
    reset_gpu(state, 0)
    gpu = StateStore(state).read()["gpus"][0]
    assert (gpu["gis"], gpu["procs"], gpu["mig_current"]) == ([], [], 1)
    assert len(StateStore(state).read()["events"]) == events


def test_show_summarises_the_node(sim_state) -> None:
    state = sim_state("a30x4")
    inject_xid(state, 0, 31, gi=3, ci=0)
    lose_gpu(state, 3)
    text = show(state)
    assert text.startswith("node a30x4 (")
    assert "GPU 2  NVIDIA A30" in text
    assert "MIG off (pending on, reset needed)" in text
    assert "GI 3  CI 0  1g.6gb" in text
    assert "LOST (GPU has fallen off the bus)" in text
    assert "#1 GPU 0 MIG 3:0 XID 31; #2 GPU 3 XID 79" in text


@pytest.mark.parametrize(
    ("action", "message"),
    [
        pytest.param(lambda s: start_process(s, 2, used_mib=-5),
                     r"a process uses 0 MiB or more, got -5", id="negative memory"),
        pytest.param(lambda s: start_process(s, 2, used_mib=23035),
                     r"GPU 2 has 23034 MiB free of 23034 MiB, a process of 23035 MiB does not fit",
                     id="more than the GPU has"),
        pytest.param(lambda s: start_process(s, 0, gi=7, ci=0, used_mib=9729),
                     r"GPU 0 MIG 7:0 has 9728 MiB free of 9728 MiB", id="more than the MIG device"),
        pytest.param(lambda s: [start_process(s, 3, used_mib=20000) for _ in range(2)],
                     r"GPU 3 has 3034 MiB free of 23034 MiB", id="more than is left"),
        pytest.param(lambda s: inject_xid(s, 0, -5), r"an XID is a positive number, got -5",
                     id="negative XID"),
        pytest.param(lambda s: inject_xid(s, 0, 0), r"an XID is a positive number, got 0",
                     id="XID 0"),
        pytest.param(lambda s: inject_xids(s, [(0, 79, None, None), (1, -1, None, None)]),
                     r"got -1", id="negative XID in a storm"),
        pytest.param(lambda s: lose_gpu(s, 0, xid=2**64), r"got 18446744073709551616",
                     id="XID beyond the event data field"),
    ],
)  # fmt: skip
def test_values_nvml_cannot_report_are_refused(sim_state, action, message: str) -> None:
    state = sim_state("mixed")
    before = StateStore(state).read()
    with pytest.raises(SimError, match=message):
        action(state)
    after = StateStore(state).read()
    assert after["events"] == before["events"]
    assert [g["procs"] for g in after["gpus"]][:3] == [g["procs"] for g in before["gpus"]][:3]


def test_node_file_process_that_does_not_fit_is_a_config_error(tmp_path: Path) -> None:
    node = tmp_path / "n.yaml"
    node.write_text(
        "name: n\ngpus:\n  - {model: L4, bus_id: '00000000:01:00.0', "
        "processes: [{used_mib: 30000}]}\n"
    )
    with pytest.raises(ConfigError, match=r"gpus\[0\]\.processes\[0\].*does not fit"):
        create_state(node, tmp_path / "s")
