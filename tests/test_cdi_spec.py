"""CDI spec values and checks, the bounded generator run, and spec files on disk."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from plugin.daemon.cdi import (
    STANDIN,
    CdiSpecs,
    CdiUpdate,
    defined_devices,
    run_bounded,
    write_atomically,
)
from plugin.daemon.cdi_spec import (
    CdiError,
    NamedDevice,
    SpecValidator,
    build_spec,
    merge_edits,
    parse_toolkit_spec,
    required_version,
    spec_file_name,
)
from sharing.plan_types import VirtualDevice

G0 = "GPU-d31c4163-d895-51f3-ac02-966eaf24af39"
M0 = "MIG-3b5e5f4c-0b8e-5a0a-9d3e-6f2d1c0a9b11"


@pytest.fixture(scope="module")
def validator() -> SpecValidator:
    return SpecValidator.vendored()


def gpu(name: str, uuid: str = G0, minor: int = 0) -> NamedDevice:
    return NamedDevice(name, VirtualDevice(id=uuid, physical_id=uuid, gpu_uuid=uuid,
                                           gpu_index=minor, dev_paths=(f"/dev/nvidia{minor}",)))


def mig(name: str) -> NamedDevice:
    return NamedDevice(name, VirtualDevice(
        id=M0, physical_id=M0, gpu_uuid=G0, gpu_index=0,
        dev_paths=("/dev/nvidia0", "/dev/nvidia-caps/nvidia-cap21",
                   "/dev/nvidia-caps/nvidia-cap22"),
    ))


def good_spec() -> dict[str, Any]:
    spec, _ = build_spec("k8s.device-plugin.nvidia.com/gpu", [gpu(G0), mig(M0)], toolkit=None,
                         dev_root="/", control_nodes=["/dev/nvidiactl"])
    return spec


def test_fallback_spec_is_valid_and_as_documented(validator: SpecValidator) -> None:
    spec = good_spec()
    assert validator.problems(spec) == []
    assert spec == {
        "cdiVersion": "0.3.0",
        "kind": "k8s.device-plugin.nvidia.com/gpu",
        "devices": [
            {"name": G0, "containerEdits": {"env": [f"NVIDIA_VISIBLE_DEVICES={G0}"],
                                            "deviceNodes": [{"path": "/dev/nvidia0"}]}},
            {"name": M0, "containerEdits": {
                "env": [f"NVIDIA_VISIBLE_DEVICES={M0}"],
                "deviceNodes": [{"path": p} for p in mig(M0).device.dev_paths]}},
            {"name": "all", "containerEdits": {
                "env": [f"NVIDIA_VISIBLE_DEVICES={G0},{M0}"],
                "deviceNodes": [{"path": p} for p in mig(M0).device.dev_paths]}},
        ],
        "containerEdits": {"deviceNodes": [{"path": "/dev/nvidiactl"}]},
    }


def test_index_names_and_a_moved_dev_root_need_cdi_0_5(validator: SpecValidator) -> None:
    spec, _ = build_spec("k8s.device-plugin.nvidia.com/gpu", [gpu("0"), mig("0:0")],
                         toolkit=None, dev_root="/run/nvidia/driver")
    assert spec["cdiVersion"] == "0.5.0"
    assert spec["devices"][0]["containerEdits"]["deviceNodes"] == [
        {"path": "/dev/nvidia0", "hostPath": "/run/nvidia/driver/dev/nvidia0"}
    ]
    assert "containerEdits" not in spec, "no control nodes exist: no common edits"
    assert validator.problems(spec) == []


def _with(change: Any) -> dict[str, Any]:
    spec = copy.deepcopy(good_spec())
    change(spec)
    return spec


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        pytest.param(_with(lambda s: s.pop("kind")), "spec: 'kind' is a required property",
                     id="schema: no kind"),
        pytest.param(_with(lambda s: s["devices"][0].pop("containerEdits")),
                     "devices[0]: 'containerEdits' is a required property",
                     id="schema: device without edits"),
        pytest.param(_with(lambda s: s["devices"][0]["containerEdits"]["deviceNodes"].append(
            {"hostPath": "/dev/nvidia9"})), "'path' is a required property",
                     id="schema: device node without path"),
        pytest.param(_with(lambda s: s.update(cdiVersion=5)), "cdiVersion: 5 is not of type",
                     id="schema: version not a string"),
        pytest.param(_with(lambda s: s.update(cdiVersion="0.9.9")),
                     "cdiVersion: unknown version '0.9.9'", id="unknown version"),
        pytest.param(_with(lambda s: s["devices"][0].update(name="0")),
                     "cdiVersion: 0.3.0 is older than the 0.5.0 it needs",
                     id="digit-led name needs 0.5.0"),
        pytest.param(_with(lambda s: s.update(kind="k8s.device-plugin.nvidia.com")),
                     "kind: 'k8s.device-plugin.nvidia.com' is not <vendor>/<class>",
                     id="kind without class"),
        pytest.param(_with(lambda s: s["devices"][0].update(name="GPU/0")),
                     "devices[0].name: invalid device name 'GPU/0'", id="bad device name"),
        pytest.param(_with(lambda s: s["devices"][1].update(name=G0)),
                     f"devices[1].name: '{G0}' appears twice", id="duplicate name"),
        pytest.param(_with(lambda s: s["devices"][0].update(containerEdits={"env": []})),
                     "devices[0].containerEdits: empty", id="empty device edits"),
        pytest.param(_with(lambda s: s["devices"][0]["containerEdits"]["env"].append("=x")),
                     "devices[0].containerEdits.env: '=x' is not NAME=VALUE", id="bad env"),
        pytest.param(_with(lambda s: s["containerEdits"].update(
            hooks=[{"hookName": "onBoot", "path": "/usr/bin/nvidia-cdi-hook"}])),
                     "containerEdits.hooks[0]: invalid hook 'onBoot'", id="bad hook name"),
        pytest.param(_with(lambda s: s["containerEdits"]["deviceNodes"][0].update(
            permissions="rwx")), "permissions: invalid 'rwx'", id="bad permissions"),
        pytest.param(_with(lambda s: s.update(devices=[])), "devices: no devices",
                     id="no devices"),
    ],
)
def test_invalid_specs_are_named(validator: SpecValidator, spec: Any, problem: str) -> None:
    with pytest.raises(CdiError, match="invalid CDI spec: ") as err:
        validator.check(spec)
    assert problem in str(err.value)


@pytest.mark.parametrize(
    ("change", "version"),
    [
        pytest.param(lambda s: None, "0.3.0", id="plain"),
        pytest.param(lambda s: s["containerEdits"].update(
            mounts=[{"hostPath": "/a", "containerPath": "/a", "type": "bind"}]), "0.4.0",
                     id="mount type"),
        pytest.param(lambda s: s["containerEdits"]["deviceNodes"][0].update(hostPath="/h"),
                     "0.5.0", id="hostPath"),
        pytest.param(lambda s: s.update(annotations={"a": "b"}), "0.6.0", id="annotations"),
        pytest.param(lambda s: s.update(kind="example.com/a.b"), "0.6.0", id="dot in class"),
        pytest.param(lambda s: s["containerEdits"].update(additionalGids=[5]), "0.7.0",
                     id="additional GIDs"),
        pytest.param(lambda s: s["containerEdits"].update(
            netDevices=[{"hostInterfaceName": "eth1", "name": "net1"}]), "1.1.0",
                     id="net devices"),
    ],
)
def test_required_version_follows_the_cdi_rules(change: Any, version: str) -> None:
    assert required_version(_with(change)) == version


def test_merge_joins_visible_devices_and_drops_repeats() -> None:
    merged = merge_edits([
        {"env": ["NVIDIA_VISIBLE_DEVICES=0", "A=1"], "deviceNodes": [{"path": "/dev/nvidia0"}]},
        {"env": ["NVIDIA_VISIBLE_DEVICES=1", "A=1"], "deviceNodes": [{"path": "/dev/nvidia0"}]},
    ])
    assert merged == {"env": ["A=1", "NVIDIA_VISIBLE_DEVICES=0,1"],
                      "deviceNodes": [{"path": "/dev/nvidia0"}]}


def test_spec_file_name_follows_the_cdi_convention() -> None:
    assert spec_file_name("k8s.device-plugin.nvidia.com/gpu") == (
        "k8s.device-plugin.nvidia.com-gpu.yaml"
    )


def test_toolkit_edits_are_reused_by_uuid(
    validator: SpecValidator, sim_state: Any
) -> None:
    """The stand-in's spec, parsed: each index-named device gets the edits of its UUID."""
    state = sim_state("dgx-a100")
    out = subprocess.run([sys.executable, str(STANDIN), "--node", str(state), "cdi", "generate",
                          "--format=json", "--device-name-strategy=uuid"],
                         capture_output=True, text=True, check=True).stdout
    toolkit = parse_toolkit_spec(out, validator)
    assert validator.problems(json.loads(out)) == []
    uuid = next(iter(toolkit.devices))
    named = NamedDevice("0", VirtualDevice(id=uuid, physical_id=uuid, gpu_uuid=uuid,
                                           gpu_index=0, dev_paths=("/dev/nvidia0",)))
    spec, not_found = build_spec("k8s.device-plugin.nvidia.com/gpu", [named], toolkit=toolkit,
                                 dev_root="/")
    assert not_found == ()
    assert spec["devices"][0] == {"name": "0", "containerEdits": toolkit.devices[uuid]}
    assert spec["containerEdits"] == toolkit.common
    assert spec["cdiVersion"] == "0.5.0"
    assert validator.problems(spec) == []


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        pytest.param("---\ncdiVersion: 0.5.0\n", "output is not a JSON CDI spec", id="YAML"),
        pytest.param("[1, 2]", "output is not a CDI spec (a JSON list)", id="a list"),
        pytest.param("[" * 100000, "output is not a JSON CDI spec", id="too deep"),
        pytest.param('{"cdiVersion": "0.5.0", "kind": "nvidia.com/gpu", "devices": []}',
                     "output is not a valid CDI spec: devices: no devices", id="no devices"),
    ],
)
def test_bad_generator_output_is_refused(
    validator: SpecValidator, text: str, problem: str
) -> None:
    with pytest.raises(CdiError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        parse_toolkit_spec(text, validator)


def test_run_bounded_returns_output_and_status() -> None:
    run = run_bounded(["/bin/sh", "-c", "echo out; echo err >&2; exit 3"], env={},
                      timeout_s=10, max_bytes=100)
    assert (run.returncode, run.stdout, run.stderr) == (3, "out\n", "err\n")


def test_run_bounded_kills_a_generator_past_its_time(tmp_path: Path) -> None:
    """The program and what it started are killed; the call returns at the deadline."""
    pid_file = tmp_path / "child.pid"
    started = time.monotonic()
    with pytest.raises(CdiError, match=r"timed out after 0.5 s"):
        run_bounded(["/bin/sh", "-c", f"sleep 30 & echo $! > {pid_file}; wait"], env={},
                    timeout_s=0.5, max_bytes=100)
    assert time.monotonic() - started < 5
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists(), "the generator's child was killed too"


def test_run_bounded_stops_a_generator_that_prints_too_much() -> None:
    with pytest.raises(CdiError, match="printed more than 100000 bytes"):
        run_bounded(["/usr/bin/yes"], env={}, timeout_s=10, max_bytes=100_000)


def test_run_bounded_without_the_program() -> None:
    with pytest.raises(FileNotFoundError):
        run_bounded(["/nonexistent/nvidia-ctk"], env={}, timeout_s=1, max_bytes=10)


def test_write_atomically_leaves_only_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cdi" / "k8s.device-plugin.nvidia.com-gpu.yaml"
    write_atomically(path, "one")
    write_atomically(path, "two")
    assert path.read_text() == "two"
    assert os.listdir(path.parent) == [path.name]
    assert path.stat().st_mode & 0o777 == 0o644


def test_defined_devices_reads_yaml_and_json_of_the_kind(tmp_path: Path) -> None:
    (tmp_path / "nvidia.yaml").write_text(
        "cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices:\n- {name: '0', containerEdits: {}}\n")
    (tmp_path / "other.json").write_text(
        '{"kind": "example.com/x", "devices": [{"name": "1"}]}')
    (tmp_path / "broken.yaml").write_text("kind: [unclosed")
    (tmp_path / "notes.txt").write_text("kind: nvidia.com/gpu")
    assert defined_devices([tmp_path, tmp_path / "absent"], "nvidia.com/gpu") == {"0"}


def test_a_stale_json_spec_of_the_same_kind_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two files defining the same devices make the runtime refuse them: say so."""
    specs = CdiSpecs(spec_dir=tmp_path, generator=lambda config: ("/nonexistent",), env={})
    (tmp_path / "k8s.device-plugin.nvidia.com-gpu.json").write_text("{}")
    specs.commit(CdiUpdate(spec=good_spec(), source="device nodes"), strict=True)
    assert "k8s.device-plugin.nvidia.com-gpu.json also defines" in caplog.text


def test_defined_devices_skips_a_fifo_an_alias_bomb_and_a_duplicate_key(tmp_path: Path) -> None:
    """A spec directory is read without waiting on a FIFO or expanding an alias bomb; the good
    spec beside them still counts."""
    (tmp_path / "good.yaml").write_text(
        "cdiVersion: 0.6.0\nkind: nvidia.com/gpu\ndevices:\n- name: gpu0\n- name: gpu1\n"
    )
    os.mkfifo(tmp_path / "fifo.yaml")
    bomb = ["kind: nvidia.com/gpu", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    bomb += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    (tmp_path / "bomb.yaml").write_text("\n".join(bomb) + "\n")
    (tmp_path / "dup.yaml").write_text("kind: nvidia.com/gpu\ndevices: []\ndevices:\n- name: x\n")
    started = time.monotonic()
    assert defined_devices([tmp_path], "nvidia.com/gpu") == {"gpu0", "gpu1"}
    assert time.monotonic() - started < 5
