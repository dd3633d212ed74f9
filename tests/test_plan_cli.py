"""`gpushare plan` command line: formats, overrides, exit statuses and messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from plugin.cli import main
from sharing.config import OVERRIDES

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from the project root with no override variables set."""
    monkeypatch.chdir(ROOT)
    for override in OVERRIDES:
        monkeypatch.delenv(override.env, raising=False)
    monkeypatch.delenv("CONFIG_FILE", raising=False)


def plan(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of `gpushare plan ARGS`."""
    rc = main(["plan", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_json_is_the_full_plan(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = plan(
        capsys, "--config", "configs/mps.yaml", "--node", "dgx-a100", "--format", "json"
    )
    assert rc == 0
    data = json.loads(out)
    (res,) = data["resources"]
    assert (res["name"], res["strategy"], len(res["devices"])) == ("nvidia.com/gpu", "mps", 32)
    assert res["mps"]["active_thread_percentage"] == 25
    assert res["socket_name"] == "gpushare-gpu.sock"
    assert set(res["replicas"].values()) == {4}
    assert data["labels"]["nvidia.com/gpu.sharing-strategy"] == "mps"
    assert data["options"]["mps_root"] == "/run/nvidia/mps"
    assert len(data["topology"]) == 8


def test_flags_override_the_file(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = plan(
        capsys,
        "--config",
        "configs/mps.yaml",
        "--node",
        "laptop",
        "--mps-root",
        "/srv/mps",
        "--device-list-strategy",
        "cdi-cri,envvar",
    )
    assert rc == 0
    assert "pipe /srv/mps/gpu/pipe" in out
    assert "deviceListStrategy=cdi-cri,envvar" in out


def test_environment_overrides_the_file(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MIG_STRATEGY", "mixed")
    monkeypatch.setenv("CONFIG_FILE", "configs/time-slicing.yaml")
    rc, out, _ = plan(capsys, "--node", "a30x4")
    assert rc == 0
    assert "migStrategy=mixed" in out
    assert "nvidia.com/mig-1g.6gb  [none]" in out


def test_without_a_config_the_defaults_apply(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = plan(capsys, "--node", "laptop")
    assert rc == 0
    assert "nvidia.com/gpu  [none]" in out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "version: v1\nflags:\n  renameByDefault: true\n",
            "flags.renameByDefault: unknown key; did you mean sharing.timeSlicing.renameByDefault?",
            id="unknown key",
        ),
        pytest.param(
            "version: v1\nsharing:\n  mps:\n    resources: [{name: gpu, replicas: 4}]\n",
            "sharing.mps: MPS needs flags.mpsRoot",
            id="plan error",
        ),
    ],
)
def test_config_errors_exit_2_with_the_message(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    rc, out, err = plan(capsys, "--config", str(path), "--node", "laptop")
    assert (rc, out) == (2, "")
    assert message in err
    assert err.startswith("config error: ")


def test_missing_config_file_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = plan(capsys, "--config", "configs/nope.yaml", "--node", "laptop")
    assert rc == 2
    assert "configs/nope.yaml: cannot read the config file" in err


def test_bad_flag_value_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = plan(capsys, "--node", "laptop", "--mig-strategy", "most")
    assert rc == 2
    assert "flag --mig-strategy: flags.migStrategy: must be one of" in err


def test_unknown_node_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = plan(capsys, "--node", "no-such-node")
    assert rc == 1
    assert "cannot read the node: unknown node 'no-such-node'" in err
