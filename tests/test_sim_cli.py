"""`gpushare sim` sub-commands: output, state changes and exit status 2 on bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from plugin.cli import main
from sharing.nvml.sim.state import StateStore


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run `gpushare ARGV` in-process; (exit status, stdout, stderr)."""
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_nodes_lists_shipped_descriptions(capsys) -> None:
    status, out, _ = run(capsys, "sim", "nodes")
    assert status == 0
    assert [line.split()[0] for line in out.splitlines()] == [
        "a30x4", "dgx-a100", "h200", "hgx-h100", "laptop", "mixed",
    ]  # fmt: skip


def test_create_inject_process_reset_show(capsys, tmp_path: Path) -> None:
    state = tmp_path / "node"
    assert run(capsys, "sim", "create", "mixed", "--state", str(state))[0] == 0
    node = ("--node", str(state))
    status, out, _ = run(capsys, "sim", "inject-xid", *node, "--gpu", "0", "--mig", "2:0",
                         "--xid", "94")  # fmt: skip
    assert (status, out) == (0, "event #1: XID 94 on GPU 0 MIG 2:0\n")
    status, out, _ = run(capsys, "sim", "proc", "start", *node, "--gpu", "1", "--mig", "1:0")
    assert (status, out) == (0, "started process 50000\n")
    assert run(capsys, "sim", "proc", "stop", *node, "--gpu", "1", "--mig", "1:0")[1] == (
        "stopped process 50000\n"
    )
    assert run(capsys, "sim", "lose", *node, "--gpu", "3")[0] == 0
    assert StateStore(state).read()["gpus"][3]["lost"]
    assert run(capsys, "sim", "reset", *node, "--gpu", "3")[0] == 0
    assert not StateStore(state).read()["gpus"][3]["lost"]
    status, out, _ = run(capsys, "sim", "show", *node)
    assert status == 0
    assert "GI 2  CI 0  3g.40gb" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["inject-xid", "--gpu", "7", "--xid", "79"],
                     "unknown GPU index 7: this node has GPUs 0-3", id="unknown GPU index"),
        pytest.param(["inject-xid", "--gpu", "0", "--mig", "1-0", "--xid", "79"],
                     "--mig must be GI:CI (two numbers), e.g. 1:0, got '1-0'", id="bad GI:CI"),
        pytest.param(["proc", "start", "--gpu", "0", "--mig", "5:0"],
                     "GPU 0 has no MIG device 5:0", id="unknown MIG device"),
        pytest.param(["proc", "start", "--gpu", "1"], "GPU 1 is in MIG mode",
                     id="process without MIG device"),
        pytest.param(["proc", "stop", "--gpu", "2"], "no process on GPU 2", id="nothing to stop"),
        pytest.param(["proc", "start", "--gpu", "2", "--used-mib", "-5"],
                     "a process uses 0 MiB or more, got -5", id="negative memory"),
        pytest.param(["proc", "start", "--gpu", "1", "--mig", "1:0", "--used-mib", "99999"],
                     "GPU 1 MIG 1:0 has 39936 MiB free of 39936 MiB", id="too much memory"),
        pytest.param(["inject-xid", "--gpu", "0", "--xid", "-5"],
                     "an XID is a positive number, got -5", id="negative XID"),
    ],
)  # fmt: skip
def test_bad_requests_exit_2_with_a_clear_message(capsys, sim_state, argv, message) -> None:
    state = sim_state("mixed")
    command, rest = argv[:1], argv[1:]
    if argv[0] == "proc":
        command, rest = argv[:2], argv[2:]
    status, _, err = run(capsys, "sim", *command, "--node", str(state), *rest)
    assert status == 2
    assert err.startswith(f"gpushare sim: error: {message}")


def test_not_a_state_directory(capsys, tmp_path: Path) -> None:
    status, _, err = run(capsys, "sim", "show", "--node", str(tmp_path))
    assert status == 2
    assert "is not a simulated node state directory; make one with `gpushare sim create" in err


def test_create_unknown_node_lists_shipped_names(capsys, tmp_path: Path) -> None:
    status, _, err = run(capsys, "sim", "create", "dgx-b200", "--state", str(tmp_path / "s"))
    assert status == 2
    assert "unknown node 'dgx-b200'" in err
    assert "a30x4, dgx-a100, h200, hgx-h100, laptop, mixed" in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [pytest.param(["sim", "--help"], "gpushare sim create dgx-a100 --state", id="sim"),
     pytest.param(["sim", "inject-xid", "--help"], "--mig GI:CI", id="inject-xid"),
     pytest.param(["sim", "proc", "--help"], "required on a GPU in MIG mode", id="proc"),
     pytest.param(["sim", "proc", "--help"], "start a process, or stop one", id="proc action"),
     pytest.param(["sim", "lose", "--help"], "Make a GPU fall off the bus", id="lose"),
     pytest.param(["sim", "reset", "--help"], "Reset a GPU: clears lost", id="reset"),
     pytest.param(["sim", "show", "--help"], "Print the simulated node's GPUs", id="show"),
     pytest.param(["sim", "nodes", "--help"], "List the shipped node descriptions", id="nodes")],
)  # fmt: skip
def test_help_texts(capsys, argv, expected: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    assert expected in capsys.readouterr().out


@pytest.mark.parametrize(
    ("state", "message"),
    [pytest.param("file", "exists and is not a directory", id="a file"),
     pytest.param("file/node", "cannot create the state directory: Not a directory",
                  id="under a file")],
)  # fmt: skip
def test_create_where_no_directory_can_be(capsys, tmp_path: Path, state: str, message) -> None:
    (tmp_path / "file").write_text("not a directory")
    status, out, err = run(capsys, "sim", "create", "laptop", "--state", str(tmp_path / state))
    assert (status, out) == (2, "")
    assert err.startswith("gpushare sim: error: ")
    assert message in err
    assert len(err.splitlines()) == 1
