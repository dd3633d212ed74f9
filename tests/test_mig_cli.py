"""`gpushare mig plan|apply|assert|export` on simulated nodes: output, exit codes, bad input,
and crash safety (the real command SIGKILLed after each journal write, then run again)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from plugin.cli import main
from sharing.mig.layout import GpuMigState
from sharing.nvml import nvml_session
from sharing.nvml.mig_journal import read_journal
from sharing.nvml.mig_state import read_node_mig_state
from sharing.nvml.sim import SimNvml, start_process

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = Path(__file__).parent / "data" / "compat" / "mig-parted" / "example-config.yaml"


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(["--log-level", "WARNING", "mig", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def _gpus(state: Path) -> list[dict]:
    return json.loads((state / "state.json").read_text())["gpus"]


def _states(state: Path) -> tuple[GpuMigState, ...]:
    with nvml_session(SimNvml(state)) as nvml:
        return read_node_mig_state(nvml)


def _journal(state: Path) -> Path:
    return state / "host" / "var" / "lib" / "gpushare" / "mig-journal.json"


def test_plan_prints_current_desired_and_steps(capsys, sim_state) -> None:
    state = sim_state("dgx-a100")
    status, out, err = _run(capsys, "plan", "-f", str(EXAMPLE), "-c", "custom-config",
                            "--node", str(state))  # fmt: skip
    assert (status, err) == (0, "")
    assert out.startswith(f"config 'custom-config' from {EXAMPLE}: 8 of 8 GPUs selected, "
                          "4 to change, 4 already applied\n")  # fmt: skip
    assert "GPU 0 (NVIDIA A100-SXM4-40GB): already applied (MIG disabled)" in out
    assert "GPU 7 (NVIDIA A100-SXM4-40GB)  [mig-configs.custom-config[4]]\n" \
           "  current: MIG disabled\n  desired: 2g.10gb@0 1g.5gb@2 1g.5gb@3 3g.20gb@4\n" \
           "  steps:\n    1. enable MIG mode (Ampere: takes effect through a GPU reset, which " \
           "needs no processes running)\n    2. create GPU instance 2g.10gb at slots 0-1\n" in out
    assert _gpus(state)[7]["mig_current"] == 0  # plan touched nothing


def test_plan_json(capsys, sim_state) -> None:
    state = sim_state("dgx-a100")
    status, out, _ = _run(capsys, "plan", "-f", str(EXAMPLE), "-c", "all-3g.20gb",
                          "--format", "json", "--node", str(state))  # fmt: skip
    data = json.loads(out)
    assert status == 0
    assert data["changed_gpus"] == list(range(8))
    gpu = data["gpus"][3]
    assert gpu["desired"]["placements"] == [
        {"profile": "3g.20gb", "start": 0, "size": 4},
        {"profile": "3g.20gb", "start": 4, "size": 4},
    ]
    assert [s["action"] for s in gpu["steps"]] == ["set-mig-mode"] + ["create-gi", "create-ci"] * 2


def test_apply_assert_export_round_trip(capsys, sim_state, tmp_path) -> None:
    state = sim_state("dgx-a100")
    args = ("-f", str(EXAMPLE), "-c", "custom-config", "--node", str(state))
    status, out, _ = _run(capsys, "assert", *args)
    assert status == 1
    assert out.splitlines()[0] == "config 'custom-config' is not applied on 4 of 8 GPUs:"
    assert "  GPU 4 (NVIDIA A100-SXM4-40GB): has MIG disabled; config 'custom-config' wants " \
           "7x 1g.5gb" in out.splitlines()
    status, out, _ = _run(capsys, "apply", *args)
    assert status == 0
    assert out.splitlines()[-1] == "config 'custom-config' applied: 4 GPUs changed, 0 failed, " \
                                   "36 NVML changes"  # 15 + 7 + 5 + 9
    assert "GPU 0 (NVIDIA A100-SXM4-40GB): already applied" in out
    assert read_journal(_journal(state)).status == "succeeded"
    assert _run(capsys, "assert", *args)[:2] == (0, "config 'custom-config' is applied on all 8 "
                                                    "GPUs it selects\n")  # fmt: skip
    status, exported, _ = _run(capsys, "export", "--name", "now", "--node", str(state))
    assert status == 0
    (tmp_path / "now.yaml").write_text(exported)
    assert _run(capsys, "assert", "-f", str(tmp_path / "now.yaml"), "--node", str(state))[0] == 0
    assert _run(capsys, "assert", "-f", str(EXAMPLE), "-c", "all-balanced",
                "--node", str(state))[0] == 1  # fmt: skip


def test_second_apply_changes_nothing(capsys, sim_state) -> None:
    state = sim_state("dgx-a100")
    args = ("apply", "-f", str(EXAMPLE), "-c", "all-balanced", "--node", str(state))
    assert _run(capsys, *args)[0] == 0
    before = (state / "state.json").read_bytes()
    status, out, _ = _run(capsys, *args)
    assert status == 0
    assert out.splitlines()[-1] == "config 'all-balanced' applied: 0 GPUs changed, 0 failed, " \
                                   "0 NVML changes"
    assert (state / "state.json").read_bytes() == before


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("command", "file_text", "config", "node", "message"),
    [
        pytest.param("plan", None, "all-1g.5gb", "hgx-h100",
                     f"{EXAMPLE}: config 'all-1g.5gb': GPU 0-7 (NVIDIA H100 80GB HBM3): unknown "
                     "MIG profile '1g.5gb'; valid profiles: 1g.10gb, 1g.10gb+me, 1g.20gb, "
                     "2g.20gb, 3g.40gb, 4g.40gb, 7g.80gb", id="A100 profile on H100"),
        pytest.param("apply", None, "nope", "dgx-a100",
                     f'{EXAMPLE}: no config "nope" in mig-configs (has: all-disabled, all-enabled,'
                     " all-1g.5gb, all-1g.5gb.me, all-1g.10gb, all-2g.10gb, all-3g.20gb, "
                     "all-balanced, custom-config)", id="unknown config name"),
        pytest.param("apply", "version: v1\nmig-configs:\n  c: [{devices: all, mig-enabled: true,"
                     " mig-devices: {4g.20gb: 2}}]\n", None, "dgx-a100",
                     "{file}: config 'c': GPU 0-7 (NVIDIA A100-SXM4-40GB): 4g.20gb + 4g.20gb "
                     "needs slots 0-3 twice; 4g.20gb can only start at slot 0",
                     id="infeasible layout"),
        pytest.param("assert", "version: v1\nmig-configs:\n  c: [{devices: all, mig-enabled: true,"
                     " mig-devices: {2g.5gb: 1}}]\n", None, "dgx-a100",
                     "{file}: config 'c': GPU 0-7 (NVIDIA A100-SXM4-40GB): unknown MIG profile "
                     "'2g.5gb'; valid profiles: 1g.5gb, 1g.5gb+me, 1g.10gb, 2g.10gb, 3g.20gb, "
                     "4g.20gb, 7g.40gb", id="unknown profile"),
        pytest.param("apply", "version: v1\nmig-configs:\n  c: [{devices: all, mig-enabled: false,"
                     " device-filter: '0x20B0-10DE'}]\n", None, "dgx-a100",
                     '{file}: mig-configs.c[0].device-filter: malformed device filter '
                     '"0x20B0-10DE": expected 0x<DEVICE><VENDOR> with 8 hex digits, optionally '
                     ":0x<SUBSYSTEM>, e.g. 0x20B010DE", id="malformed filter"),
        pytest.param("plan", "version: v1\nmig-configs:\n  c: [{devices: all, mig-enabled: false,"
                     " extra: 1}]\n", None, "dgx-a100",
                     "{file}: mig-configs.c[0].extra: unknown key; valid keys: devices, "
                     "device-filter, mig-enabled, mig-devices", id="unknown key"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_exit_2_nothing_touched(
    capsys, sim_state, tmp_path, command, file_text, config, node, message
) -> None:
    state = sim_state(node)
    before = (state / "state.json").read_bytes()
    file = str(EXAMPLE) if file_text is None else _write(tmp_path, "m.yaml", file_text)
    argv = [command, "-f", file, "--node", str(state)] + (["-c", config] if config else [])
    status, out, err = _run(capsys, *argv)
    assert (status, out) == (2, "")
    assert err == f"gpushare mig {command}: {message.replace('{file}', file)}\n"
    assert (state / "state.json").read_bytes() == before
    assert not _journal(state).exists()


@pytest.mark.parametrize(
    ("journal", "message"),
    [
        pytest.param("{oops", "corrupt MIG journal (Expecting property name enclosed in double "
                     "quotes: line 1 column 2 (char 1)); remove it to go on", id="corrupt"),
        pytest.param(None, "MIG journal written on another node (its GPUs GPU-", id="other node"),
    ],
)  # fmt: skip
def test_bad_journal_is_one_line_exit_2_nothing_touched(
    capsys, sim_state, tmp_path, journal, message
) -> None:
    path = tmp_path / "journal.json"
    if journal is None:
        h200 = sim_state("h200")
        assert _run(capsys, "apply", "-f", str(EXAMPLE), "-c", "all-disabled", "--node", str(h200),
                    "--journal", str(path))[0] == 0  # fmt: skip
    else:
        path.write_text(journal)
    state = sim_state("dgx-a100")
    before = (state / "state.json").read_bytes()
    status, out, err = _run(capsys, "apply", "-f", str(EXAMPLE), "-c", "all-1g.5gb",
                            "--journal", str(path), "--node", str(state))  # fmt: skip
    assert (status, out) == (2, "")
    assert err.startswith(f"gpushare mig apply: {path}: {message}")
    assert err.count("\n") == 1
    assert (state / "state.json").read_bytes() == before


def test_processes_refuse_apply_exit_1(capsys, sim_state) -> None:
    state = sim_state("dgx-a100")
    pid = start_process(state, 6)
    before = (state / "state.json").read_bytes()
    status, out, err = _run(capsys, "apply", "-f", str(EXAMPLE), "-c", "all-1g.5gb", "--force",
                            "--node", str(state))  # fmt: skip
    assert (status, out) == (1, "")
    assert err == (f"gpushare mig apply: config 'all-1g.5gb': nothing changed: GPU 6 (NVIDIA "
                   f"A100-SXM4-40GB): 1 compute process(es) running (pids {pid}); a MIG mode "
                   "change needs none, even forced\n")  # fmt: skip
    assert (state / "state.json").read_bytes() == before


def test_fault_flag_needs_a_simulated_node(capsys) -> None:
    status, _, err = _run(capsys, "apply", "-f", str(EXAMPLE), "-c", "all-disabled",
                          "--fault-kill-after-step", "1")  # fmt: skip
    assert status == 2
    assert "simulated nodes (--node) only" in err


def test_help_explains_exit_codes(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["mig", "--help"])
    out = capsys.readouterr().out
    assert "mig-parted" in out
    assert "2 bad input" in out
    assert "--fault-kill-after-step" not in out


# --- crash safety ---------------------------------------------------------------------------

CRASH_BEFORE = """version: v1
mig-configs:
  before:
    - {devices: [0], mig-enabled: true, mig-devices: {1g.5gb: 2}}
    - {devices: [1], mig-enabled: true, mig-devices: {3g.20gb: 2}}
  after:
    - {devices: [0], mig-enabled: true, mig-devices: {1g.5gb: 2, 2g.10gb: 1, 3g.20gb: 1}}
    - {devices: [1], mig-enabled: false}
    - {devices: [2], mig-enabled: true, mig-devices: {4g.20gb: 1}}
"""
# GPU 0: 2 GIs + 2 CIs created (two 1g.5gb kept); GPU 1: 2 CIs, 2 GIs destroyed, mode off;
# GPU 2: mode on, 1 GI + 1 CI created. 12 steps, each journalled as started and done.
CRASH_STEPS = 12


def _crash_node(sim_state, tmp_path: Path) -> tuple[Path, str]:
    state = sim_state("dgx-a100")
    file = _write(tmp_path, "crash.yaml", CRASH_BEFORE)
    assert main(["--log-level", "WARNING", "mig", "apply", "-f", file, "-c", "before",
                 "--node", str(state)]) == 0  # fmt: skip
    return state, file


def test_crash_scenario_has_the_expected_steps(capsys, sim_state, tmp_path) -> None:
    state, file = _crash_node(sim_state, tmp_path)
    capsys.readouterr()
    status, out, _ = _run(capsys, "plan", "-f", file, "-c", "after", "--format", "json",
                          "--node", str(state))  # fmt: skip
    assert status == 0
    assert sum(len(g["steps"]) for g in json.loads(out)["gpus"]) == CRASH_STEPS


@pytest.mark.parametrize("kill_after", range(1, 2 * CRASH_STEPS + 1))
def test_killed_apply_converges_when_run_again(capsys, sim_state, tmp_path, kill_after) -> None:
    state, file = _crash_node(sim_state, tmp_path)
    killed = subprocess.run(
        [sys.executable, "-m", "plugin.cli", "--log-level", "WARNING", "mig", "apply",
         "-f", file, "-c", "after", "--node", str(state),
         "--fault-kill-after-step", str(kill_after)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    record = read_journal(_journal(state))
    assert record.interrupted
    assert len(record.steps) == (kill_after + 1) // 2
    assert record.steps[-1][1] == ("started" if kill_after % 2 else "done")
    capsys.readouterr()
    status, out, _ = _run(capsys, "apply", "-f", file, "-c", "after", "--node", str(state))
    assert status == 0, out
    assert out.startswith("an interrupted apply of config 'after' was found in the journal")
    assert read_journal(_journal(state)).status == "succeeded"
    states = _states(state)
    assert [s.describe() for s in states[:3]] == [
        "MIG enabled: 1g.5gb@0 1g.5gb@1 2g.10gb@2 3g.20gb@4",
        "MIG disabled",
        "MIG enabled: 4g.20gb@0",
    ]
    assert all(gi.full for s in states for gi in s.instances)  # no orphaned GI or CI
    assert _run(capsys, "assert", "-f", file, "-c", "after", "--node", str(state))[0] == 0

