"""plan_mig / apply_mig / resume_mig on simulated nodes, through the real adapter.

The simulated NVML is wrapped by a MutationCounter at the pynvml boundary, so "touches nothing"
and "touches only GPU 5" are counted NVML calls, not inferences.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest

from sharing.errors import MigConfigError, MigError, MigJournalError, MigPlanError
from sharing.mig import export_config, parse_mig_parted
from sharing.nvml import Nvml, create_gpu_instance, read_inventory
from sharing.nvml.mig_apply import (
    MigApplyRefused,
    StepEvent,
    apply_mig,
    plan_mig,
    resume_mig,
)
from sharing.nvml.mig_journal import journal_lock, read_journal
from sharing.nvml.mig_state import read_node_mig_state
from sharing.nvml.sim import SimNvml, create_state, start_process
from tests.fakes.nvml_counter import MutationCounter

DATA = Path(__file__).parent / "data" / "compat" / "mig-parted"
EXAMPLE = DATA / "example-config.yaml"

# Per config of the compat example on 8x A100-SXM4-40GB (../shared/compat/README.md):
# GPU index -> {profile: count}; None means MIG disabled.
_BALANCED = {"1g.5gb": 2, "2g.10gb": 1, "3g.20gb": 1}
EXPECTED = {
    "all-disabled": dict.fromkeys(range(8)),
    "all-enabled": {i: {} for i in range(8)},
    "all-1g.5gb": {i: {"1g.5gb": 7} for i in range(8)},
    "all-1g.5gb.me": {i: {"1g.5gb+me": 1} for i in range(8)},
    "all-1g.10gb": {i: {"1g.10gb": 4} for i in range(8)},
    "all-2g.10gb": {i: {"2g.10gb": 3} for i in range(8)},
    "all-3g.20gb": {i: {"3g.20gb": 2} for i in range(8)},
    "all-balanced": {i: _BALANCED for i in range(8)},
    "custom-config": {0: None, 1: None, 2: None, 3: None, 4: {"1g.5gb": 7},
                      5: {"2g.10gb": 3}, 6: {"3g.20gb": 2}, 7: _BALANCED},
}  # fmt: skip


@pytest.fixture
def node(tmp_path: Path):
    """Factory: (Nvml over a counting wrapper, counter, state dir) for a fresh simulated node."""
    opened = []

    def make(name: str = "dgx-a100") -> tuple[Nvml, MutationCounter, Path]:
        state = create_state(name, tmp_path / f"{name}-{len(opened)}")
        counter = MutationCounter(SimNvml(state))
        nvml = Nvml(counter)
        nvml.init()
        opened.append(nvml)
        return nvml, counter, state

    yield make
    for nvml in opened:
        nvml.shutdown()


def _layout(nvml: Nvml) -> dict[int, dict[str, int] | None]:
    """What the inventory reader sees: per GPU its MIG devices by profile, None if MIG off."""
    inventory = read_inventory(nvml)
    return {
        g.index: dict(Counter(m.profile for m in g.mig_devices)) if g.mig_enabled else None
        for g in inventory.gpus
    }


@pytest.mark.parametrize("config", list(EXPECTED))
def test_every_example_config_plans_applies_and_asserts(node, tmp_path, config: str) -> None:
    nvml, counter, _ = node()
    plan = plan_mig(nvml, EXAMPLE, config)
    result = apply_mig(nvml, plan, journal_path=tmp_path / "journal.json")
    assert result.ok, result.gpus
    assert result.mutations == len(counter.mutations)
    assert (result.mutations > 0) == (config != "all-disabled")  # the node starts MIG-disabled
    assert _layout(nvml) == EXPECTED[config]
    assert plan_mig(nvml, EXAMPLE, config).changed_gpus == ()
    exported = export_config(read_node_mig_state(nvml))
    assert plan_mig(nvml, exported, None).differences() == ()


def test_all_1g_5gb_gives_56_devices(node, tmp_path) -> None:
    nvml, _, _ = node()
    apply_mig(nvml, plan_mig(nvml, EXAMPLE, "all-1g.5gb"), journal_path=tmp_path / "j.json")
    devices = [m for g in read_inventory(nvml).gpus for m in g.mig_devices]
    assert len(devices) == 56
    assert {m.profile for m in devices} == {"1g.5gb"}


def test_configs_in_sequence_each_converge(node, tmp_path) -> None:
    """Every transition between example configs (destroys included) ends asserting."""
    nvml, _, _ = node()
    order = ["all-balanced", "custom-config", "all-3g.20gb", "all-1g.5gb.me", "all-disabled",
             "all-1g.10gb", "all-enabled"]
    for config in order:
        result = apply_mig(nvml, plan_mig(nvml, EXAMPLE, config), journal_path=tmp_path / "j")
        assert result.ok, (config, result.gpus)
        assert _layout(nvml) == EXPECTED[config], config


def test_second_apply_makes_no_nvml_mutation(node, tmp_path) -> None:
    nvml, counter, _ = node()
    apply_mig(nvml, plan_mig(nvml, EXAMPLE, "custom-config"), journal_path=tmp_path / "j")
    before = len(counter.mutations)
    result = apply_mig(nvml, plan_mig(nvml, EXAMPLE, "custom-config"), journal_path=tmp_path / "j")
    assert len(counter.mutations) == before
    assert result.ok
    assert {g.result for g in result.gpus} == {"unchanged"}


def test_a_config_changing_one_gpu_touches_only_that_gpu(node, tmp_path, caplog) -> None:
    """Only GPU 5 changes, and every log line of the apply names GPU 5 (text and `gpu` field)."""
    nvml, counter, state = node()
    text = EXAMPLE.read_text().replace(
        '    - devices: [5]\n      mig-enabled: true\n      mig-devices:\n        "2g.10gb": 3',
        '    - devices: [5]\n      mig-enabled: true\n      mig-devices:\n        "1g.5gb": 7',
    )
    assert text != EXAMPLE.read_text()
    apply_mig(nvml, plan_mig(nvml, EXAMPLE, "custom-config"), journal_path=tmp_path / "j")
    gpus_before = json.loads((state / "state.json").read_text())["gpus"]
    counter.mutations.clear()
    plan = plan_mig(nvml, text, "custom-config")
    assert plan.changed_gpus == (5,)
    caplog.set_level(logging.INFO, logger="gpushare.mig.apply")
    result = apply_mig(nvml, plan, journal_path=tmp_path / "j")
    assert result.changed_gpus == (5,)
    lines = [(r.getMessage(), getattr(r, "gpu", None)) for r in caplog.records]
    assert len(lines) > 2
    assert all(text.startswith("GPU 5") and gpu == 5 for text, gpu in lines), lines
    assert set(counter.gpus()) == {5}
    gpus_after = json.loads((state / "state.json").read_text())["gpus"]
    assert [g for i, g in enumerate(gpus_after) if i != 5] == \
        [g for i, g in enumerate(gpus_before) if i != 5]
    assert _layout(nvml)[5] == {"1g.5gb": 7}


def test_instances_that_match_are_kept(node, tmp_path) -> None:
    """all-balanced -> custom-config: GPU 7 is skipped; GPU 5 keeps its 2g.10gb at 0."""
    nvml, counter, _ = node()
    apply_mig(nvml, plan_mig(nvml, EXAMPLE, "all-balanced"), journal_path=tmp_path / "j")
    before = {gi.gi_id for gi in read_node_mig_state(nvml)[5].instances if gi.start == 0}
    counter.mutations.clear()
    plan = plan_mig(nvml, EXAMPLE, "custom-config")
    assert 7 not in plan.changed_gpus
    steps5 = [s.describe() for s in plan.gpus[5].steps]
    assert not any("2g.10gb at slots 0-1" in s for s in steps5), steps5
    apply_mig(nvml, plan, journal_path=tmp_path / "j")
    after = {gi.gi_id for gi in read_node_mig_state(nvml)[5].instances if gi.start == 0}
    assert before == after
    assert 7 not in counter.gpus()


def test_device_filter_selects_by_pci_id_on_a_mixed_node(node, tmp_path) -> None:
    nvml, counter, _ = node("mixed")
    text = ("version: v1\nmig-configs:\n  a100:\n    - devices: all\n"
            "      device-filter: ['0x20B510DE']\n      mig-enabled: true\n"
            "      mig-devices: {1g.10gb: 7}\n")  # fmt: skip
    plan = plan_mig(nvml, text, "a100")
    assert [g.request is not None for g in plan.gpus] == [True, True, False, False]
    apply_mig(nvml, plan, journal_path=tmp_path / "j")
    assert set(counter.gpus()) == {0, 1}
    assert _layout(nvml) == {0: {"1g.10gb": 7}, 1: {"1g.10gb": 7}, 2: None, 3: None}
    exported = export_config(read_node_mig_state(nvml))
    assert "    - devices: [2, 3]\n      mig-enabled: false\n" in exported  # the L4s
    assert plan_mig(nvml, exported, None).changed_gpus == ()


def test_mig_on_gpus_without_mig_is_refused_by_name(node) -> None:
    nvml, counter, _ = node("mixed")
    text = "version: v1\nmig-configs:\n  c: [{devices: all, mig-enabled: true, mig-devices: {}}]\n"
    with pytest.raises(MigPlanError) as info:
        plan_mig(nvml, text, None)
    assert str(info.value) == "<mig-parted file>: config 'c': GPU 2-3 (NVIDIA L4): not MIG capable"
    assert counter.mutations == []


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        pytest.param("version: v1\nmig-configs:\n  c: [{devices: [8], mig-enabled: false}]\n",
                     MigPlanError, r"mig-configs.c\[0\].devices: GPU 8 does not exist \(the node "
                     r"has 8 GPUs\)", id="index the node lacks"),
        pytest.param("version: v1\nmig-configs:\n  c:\n    - {devices: [0, 1], mig-enabled: false}"
                     "\n    - {devices: [1], mig-enabled: false}\n", MigPlanError,
                     r"GPU 1 \(NVIDIA A100-SXM4-40GB\): selected by both mig-configs.c\[0\] and "
                     r"mig-configs.c\[1\]", id="overlapping entries"),
        pytest.param("version: v1\nmig-configs:\n  c: [{devices: all, mig-enabled: true, "
                     "mig-devices: {1c.3g.20gb: 1}}]\n", MigPlanError,
                     r"1c.3g.20gb: a compute instance smaller than its GPU instance is not "
                     r"supported", id="partial compute instance"),
        pytest.param("version: v1\nmig-configs:\n  c: [{devices: all, mig-enabled: true, "
                     "mig-devices: {7g.40gb: 1, 1g.5gb: 1}}]\n", MigPlanError,
                     r"GPU 0-7 \(NVIDIA A100-SXM4-40GB\): 7g.40gb \+ 1g.5gb needs 9 slots",
                     id="infeasible on every GPU, grouped"),
        pytest.param("version: v1\nmig-configs:\n  c: [{devices: all, mig-enabled: true}]\n",
                     MigConfigError, r"mig-devices: required", id="invalid file"),
    ],
)  # fmt: skip
def test_bad_input_touches_nothing(node, text: str, error: type, message: str) -> None:
    nvml, counter, _ = node()
    with pytest.raises(error, match=message) as info:
        plan_mig(nvml, text, None)
    assert "\n" not in str(info.value)
    assert counter.mutations == []


def test_processes_refuse_the_gpu_unless_forced(node, tmp_path) -> None:
    nvml, counter, state = node()
    apply_mig(nvml, plan_mig(nvml, EXAMPLE, "all-balanced"), journal_path=tmp_path / "j")
    gi_3g = next(gi for gi in read_node_mig_state(nvml)[1].instances if gi.profile == "3g.20gb")
    pid = start_process(state, 1, gi_3g.gi_id, 0)
    counter.mutations.clear()
    # GPU 1 keeps its 3g.20gb (where the process runs) and its 2g.10gb, and swaps 1g+1g for 2g.
    text = ("version: v1\nmig-configs:\n  c: [{devices: [1], mig-enabled: true, "
            "mig-devices: {3g.20gb: 1, 2g.10gb: 2}}]\n")  # fmt: skip
    plan = plan_mig(nvml, text, None)
    with pytest.raises(MigApplyRefused, match=rf"GPU 1 \(NVIDIA A100-SXM4-40GB\): 1 compute "
                       rf"process\(es\) running \(pids {pid}\); stop them, or force the apply"):
        apply_mig(nvml, plan, journal_path=tmp_path / "j")
    assert counter.mutations == []
    result = apply_mig(nvml, plan, journal_path=tmp_path / "j", force=True)
    assert result.ok, result.gpus
    assert set(counter.gpus()) == {1}
    after = read_node_mig_state(nvml)[1]
    assert gi_3g in after.instances  # same GI id, placement and compute instance
    assert after.processes == (pid,)


def test_a_mode_change_with_processes_is_refused_even_forced(node, tmp_path) -> None:
    nvml, counter, state = node()
    pid = start_process(state, 3)
    plan = plan_mig(nvml, EXAMPLE, "all-1g.5gb")
    with pytest.raises(MigApplyRefused, match=rf"GPU 3 .*pids {pid}\); a MIG mode change needs "
                       "none, even forced"):
        apply_mig(nvml, plan, journal_path=tmp_path / "j", force=True)
    assert counter.mutations == []
    assert not (tmp_path / "j").exists()


def test_a_process_appearing_mid_apply_fails_only_its_gpu(node, tmp_path) -> None:
    """Ampere keeps the mode change pending while a process runs: that GPU fails, others go on."""
    nvml, _, state = node()

    def race(event: StepEvent) -> None:
        if event.phase == "started" and event.step.gpu == 2 and event.step.action == "set-mig-mode":
            start_process(state, 2)

    result = apply_mig(nvml, plan_mig(nvml, EXAMPLE, "all-3g.20gb"),
                       journal_path=tmp_path / "j", on_step=race)  # fmt: skip
    assert result.failed_gpus == (2,)
    failed = result.gpus[2]
    assert "MIG mode change pending a GPU reset" in failed.reason
    assert failed.layout == "MIG disabled (enable pending a GPU reset)"
    assert result.changed_gpus == (0, 1, 3, 4, 5, 6, 7)
    record = read_journal(tmp_path / "j")
    assert record.status == "failed"
    assert [s for s in record.steps if s[1] == "failed"][0][0].gpu == 2


def test_journal_records_every_step(node, tmp_path) -> None:
    nvml, counter, _ = node()
    events: list[StepEvent] = []
    apply_mig(nvml, plan_mig(nvml, EXAMPLE, "custom-config"), journal_path=tmp_path / "j",
              on_step=events.append)  # fmt: skip
    record = read_journal(tmp_path / "j", tuple(s.uuid for s in read_node_mig_state(nvml)))
    assert record.status == "succeeded"
    assert record.config == "custom-config"
    assert len(record.steps) == len(counter.mutations) == len(events) // 2
    assert {state for _, state, _ in record.steps} == {"done"}
    assert [e.phase for e in events[:2]] == ["started", "done"]
    assert [e.number for e in events] == list(range(1, len(events) + 1))
    assert record.requests[4].counts == (("1g.5gb", 7),)
    assert (tmp_path / "j").stat().st_mode & 0o777 == 0o600


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("stop_at", [1, 2, 17, 40])
def test_interrupted_apply_resumes_without_orphans(node, tmp_path, stop_at: int) -> None:
    nvml, _, _ = node()
    apply_mig(nvml, plan_mig(nvml, EXAMPLE, "all-1g.5gb"), journal_path=tmp_path / "j")

    def stop(event: StepEvent) -> None:
        if event.number == stop_at:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        apply_mig(nvml, plan_mig(nvml, EXAMPLE, "all-balanced"), journal_path=tmp_path / "j",
                  on_step=stop)  # fmt: skip
    assert read_journal(tmp_path / "j").interrupted
    result = resume_mig(nvml, journal_path=tmp_path / "j")
    assert result is not None
    assert result.ok
    assert result.resumed == "all-balanced"
    assert _layout(nvml) == EXPECTED["all-balanced"]
    states = read_node_mig_state(nvml)
    assert all(gi.full for s in states for gi in s.instances)
    assert resume_mig(nvml, journal_path=tmp_path / "j") is None


def test_gpu_instance_without_compute_instance_is_completed(node, tmp_path) -> None:
    nvml, _, _ = node()
    apply_mig(nvml, plan_mig(nvml, EXAMPLE, "all-enabled"), journal_path=tmp_path / "j")
    create_gpu_instance(nvml, 0, "3g.20gb", 4)  # as left by a kill between GI and CI
    create_gpu_instance(nvml, 0, "1g.5gb", 0)  # a stray GI the config does not want
    plan = plan_mig(nvml, EXAMPLE, "all-3g.20gb")
    steps = [s.describe() for s in plan.gpus[0].steps]
    assert steps == [
        "GPU 0: destroy GPU instance 7 (1g.5gb at slot 0)",
        "GPU 0: create the full compute instance of 3g.20gb at slots 4-7",
        "GPU 0: create GPU instance 3g.20gb at slots 0-3",
        "GPU 0: create the full compute instance of 3g.20gb at slots 0-3",
    ]
    assert apply_mig(nvml, plan, journal_path=tmp_path / "j").ok
    assert _layout(nvml)[0] == {"3g.20gb": 2}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(b"{not json", r"corrupt MIG journal \(Expecting property name", id="garbage"),
        pytest.param(b'{"kind": "something else"}', r"corrupt MIG journal \(not a gpushare MIG "
                     r"journal\)", id="not a journal"),
        pytest.param(b'{"kind": "gpushare-mig-journal", "version": 1}',
                     r"corrupt MIG journal \(missing 'status'\)", id="truncated"),
        pytest.param(b'{"kind": "gpushare-mig-journal", "version": 7}',
                     r"unknown journal version 7", id="future version"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000,
                     r"corrupt MIG journal \(nested too deeply\)", id="nested 100,000 deep"),
    ],
)  # fmt: skip
def test_corrupt_journal_is_one_line_and_touches_nothing(node, tmp_path, content, message) -> None:
    nvml, counter, _ = node()
    (tmp_path / "j").write_bytes(content)
    plan = plan_mig(nvml, EXAMPLE, "all-1g.5gb")
    with pytest.raises(MigJournalError, match=message) as info:
        apply_mig(nvml, plan, journal_path=tmp_path / "j")
    assert str(info.value).startswith(f"{tmp_path / 'j'}: ")
    assert "\n" not in str(info.value)
    assert counter.mutations == []
    assert (tmp_path / "j").read_bytes() == content


def test_journal_from_another_node_is_refused(node, tmp_path) -> None:
    h100, _, _ = node("hgx-h100")
    apply_mig(h100, plan_mig(h100, EXAMPLE, "all-disabled"), journal_path=tmp_path / "j")
    nvml, counter, _ = node()
    with pytest.raises(MigJournalError, match=r"MIG journal written on another node \(its GPUs "
                       r"GPU-.*; refusing it: remove it if the GPUs were replaced"):
        apply_mig(nvml, plan_mig(nvml, EXAMPLE, "all-1g.5gb"), journal_path=tmp_path / "j")
    assert counter.mutations == []


def test_plan_from_another_node_is_refused(node, tmp_path) -> None:
    h100, _, _ = node("hgx-h100")
    nvml, counter, _ = node()
    plan = plan_mig(h100, EXAMPLE, "all-disabled")
    with pytest.raises(MigPlanError, match="the plan was made on another node"):
        apply_mig(nvml, plan, journal_path=tmp_path / "j")
    assert counter.mutations == []


def test_hopper_changes_mode_without_reset(node, tmp_path) -> None:
    nvml, _, _ = node("hgx-h100")
    text = EXAMPLE.read_text().replace('"1g.5gb"', '"1g.10gb"')
    plan = plan_mig(nvml, text, "all-1g.5gb")
    assert "Ampere" not in plan.gpus[0].steps[0].describe()
    assert apply_mig(nvml, plan, journal_path=tmp_path / "j").ok
    assert _layout(nvml)[0] == {"1g.10gb": 7}


def test_unreadable_file_is_a_config_error(node, tmp_path) -> None:
    nvml, _, _ = node()
    with pytest.raises(MigConfigError, match=r"cannot read the mig-parted file"):
        plan_mig(nvml, tmp_path / "missing.yaml", None)
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe")
    with pytest.raises(MigConfigError, match=r"not a text file \(not UTF-8 at byte 0"):
        plan_mig(nvml, tmp_path / "bin.yaml", None)


def test_export_lists_groups_and_round_trips(node, tmp_path) -> None:
    nvml, _, _ = node()
    apply_mig(nvml, plan_mig(nvml, EXAMPLE, "custom-config"), journal_path=tmp_path / "j")
    text = export_config(read_node_mig_state(nvml), "now")
    parsed = parse_mig_parted(text)
    entries = parsed.select("now").entries
    assert [e.devices for e in entries] == [(0, 1, 2, 3), (4,), (5,), (6,), (7,)]
    assert plan_mig(nvml, parsed, "now").changed_gpus == ()


def test_failed_gpu_error_is_a_mig_error(node, tmp_path) -> None:
    """A stray process on a GI the layout destroys: forced apply fails that GPU with IN_USE."""
    nvml, _, state = node()
    apply_mig(nvml, plan_mig(nvml, EXAMPLE, "all-1g.5gb"), journal_path=tmp_path / "j")
    gi = read_node_mig_state(nvml)[0].instances[0]
    start_process(state, 0, gi.gi_id, 0)
    result = apply_mig(nvml, plan_mig(nvml, EXAMPLE, "all-1g.5gb.me"),
                       journal_path=tmp_path / "j", force=True)  # fmt: skip
    assert result.failed_gpus == (0,)
    assert "in use" in result.gpus[0].reason
    assert issubclass(MigApplyRefused, MigError)


def test_one_apply_at_a_time_per_journal(node, tmp_path) -> None:
    nvml, counter, _ = node()
    plan = plan_mig(nvml, EXAMPLE, "all-3g.20gb")
    with journal_lock(tmp_path / "j"), pytest.raises(
        MigApplyRefused, match=r"another MIG apply is running on this node \(it holds j.lock\)"
    ):
        apply_mig(nvml, plan, journal_path=tmp_path / "j")
    assert counter.mutations == []
    assert apply_mig(nvml, plan, journal_path=tmp_path / "j").ok
