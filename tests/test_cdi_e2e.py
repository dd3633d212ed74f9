"""CDI end to end: every CDI name an Allocate answer holds resolves in the spec directory.

The daemon runs on a simulated node over real unix sockets with the kubelet stand-in; the CDI
names of each answer are resolved the way a CDI-enabled runtime does (tests/fakes/cdi_cache.py:
every spec file loaded and validated against the CDI schema, conflicts refused). nvidia-ctk is
the stand-in plugin/standin/nvidia_ctk.py (the default on a simulated node, or given by path).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from plugin.daemon.allocate import runtime_id
from plugin.daemon.cdi import STANDIN
from plugin.daemon.cdi_spec import KIND_PLUGIN, KIND_TOOLKIT, CdiError
from plugin.daemon.core import Daemon
from sharing.plan_types import Plan, VirtualDevice
from tests.checkout import checkout_env, gpushare_argv
from tests.fakes.cdi_cache import CdiCache, device_nodes
from tests.fakes.kubelet import FakeKubelet

ROOT = Path(__file__).resolve().parents[1]
SPEC_FILE = "k8s.device-plugin.nvidia.com-gpu.yaml"
FULL = "version: v1\n"
REPLICAS = (
    "version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
    "      - {name: nvidia.com/gpu, replicas: 4}\n"
)
MIG = "version: v1\nflags: {migStrategy: mixed}\n"
FALLBACK_LINE = "driver libraries come from the NVIDIA runtime hook"

StartDaemon = Callable[..., Daemon]


@pytest.fixture
def cdi_dir(tmp_path: Path) -> Path:
    """The CDI spec directory the daemon writes into (created by the daemon)."""
    return tmp_path / "cdi"


@pytest.fixture
def start_daemon(
    tmp_path: Path, kubelet_dir: Path, cdi_dir: Path, sim_state: Callable[..., Path]
) -> Iterator[StartDaemon]:
    """Start a Daemon on a fresh simulated node with a config text and flag overrides."""
    from sharing.nvml import load_library

    daemons: list[Daemon] = []

    def start(node: str, config: str, *, toolkit_dirs: list[Path] | None = None,
              state: Path | None = None, **overrides: object) -> Daemon:
        path = tmp_path / "config.yaml"
        path.write_text(config)
        daemon = Daemon(
            config_path=path, kubelet_dir=kubelet_dir,
            nvml_lib=load_library(str(state or sim_state(node))), env=dict(os.environ),
            overrides={k.replace("_", "-"): v for k, v in overrides.items()},
            cdi_spec_dir=cdi_dir, cdi_toolkit_dirs=toolkit_dirs,
        )
        daemons.append(daemon)
        daemon.start()
        return daemon

    yield start
    for daemon in daemons:
        daemon.stop()


def cdi_names(response: Any, strategy: str) -> list[list[str]]:
    """The CDI names of each container answer, from the annotation or from cdi_devices."""
    out = []
    for answer in response.container_responses:
        assert "NVIDIA_VISIBLE_DEVICES" not in answer.envs
        if strategy == "cdi-cri":
            assert not answer.annotations
            out.append([d.name for d in answer.cdi_devices])
        else:
            assert not answer.cdi_devices
            [(_, value)] = answer.annotations.items()
            out.append(value.split(","))
    return out


def physical(plan: Plan, resource: str, ids: list[str]) -> list[VirtualDevice]:
    """The plan's devices behind advertised IDs, one per physical parent."""
    res = plan.resource(resource)
    assert res is not None
    devices = [res.device(i) for i in ids]
    return list({d.physical_id: d for d in devices if d is not None}.values())


def allocate_and_resolve(
    daemon: Daemon, kubelet: FakeKubelet, cache_dir: Path, strategy: str, kind: str = KIND_PLUGIN
) -> int:
    """Allocate 1 and 2 devices of every resource; each CDI name must resolve to its device.

    Returns how many names were resolved.
    """
    plan = daemon.plan
    resolved = 0
    for res in plan.resources:
        count_of = len(res.devices)
        kubelet.wait_for_list(res.name, lambda d, n=count_of: len(d.devices) == n)
        for count in sorted({1, min(2, len(res.devices))}):
            got = kubelet.allocate(res.name, count)
            cache = CdiCache.load(cache_dir)
            assert not cache.invalid
            for ids, names in zip(got.chosen, cdi_names(got.response, strategy), strict=True):
                devices = physical(plan, res.name, ids)
                assert names == [f"{kind}={runtime_id(d, plan.options)}" for d in devices]
                for device, entry in zip(devices, cache.resolve(names), strict=True):
                    assert set(device.dev_paths) <= device_nodes(entry), entry
                resolved += len(names)
    return resolved


def advertised(plan: Plan) -> dict[str, VirtualDevice]:
    """CDI device name -> physical device, for every physical device of the plan."""
    return {runtime_id(d, plan.options): d for r in plan.resources for d in r.devices}


@pytest.mark.parametrize("strategy", ["cdi-annotations", "cdi-cri"])
@pytest.mark.parametrize("id_strategy", ["uuid", "index"])
@pytest.mark.parametrize(
    ("node", "config"),
    [
        pytest.param("dgx-a100", FULL, id="full GPUs"),
        pytest.param("dgx-a100", REPLICAS, id="replicas"),
        pytest.param("mixed", MIG, id="MIG devices and full GPUs"),
    ],
)
def test_every_allocated_cdi_name_resolves(
    start_daemon: StartDaemon, kubelet: FakeKubelet, cdi_dir: Path,
    node: str, config: str, strategy: str, id_strategy: str,
) -> None:
    """Each name resolves to the allocated device (its nodes), `all` to every device."""
    daemon = start_daemon(node, config, device_list_strategy=[strategy],
                          device_id_strategy=id_strategy)
    assert allocate_and_resolve(daemon, kubelet, cdi_dir, strategy) >= 2
    assert sorted(p.name for p in cdi_dir.iterdir()) == [SPEC_FILE]
    cache = CdiCache.load(cdi_dir)
    expected = advertised(daemon.plan)
    spec = cache.specs[SPEC_FILE]
    assert [d["name"] for d in spec["devices"]] == [*expected, "all"]
    [everything] = cache.resolve([f"{KIND_PLUGIN}=all"])
    assert device_nodes(everything) >= {p for d in expected.values() for p in d.dev_paths}
    daemon.stop()
    assert list(cdi_dir.iterdir()) == [], "the spec is removed on a clean stop"


def _mig_reshape(state: Path, gpu: int, profiles: list[str]) -> None:
    """Repartition one simulated GPU, as a MIG job would, through the NVML adapter."""
    from sharing.nvml import create_mig_device, destroy_all, nvml_session
    from sharing.nvml.sim import SimNvml

    with nvml_session(SimNvml(state)) as nvml:
        destroy_all(nvml, gpu)
        for profile in profiles:
            create_mig_device(nvml, gpu, profile)


def test_spec_follows_reloads(
    start_daemon: StartDaemon, kubelet: FakeKubelet, cdi_dir: Path, tmp_path: Path,
    sim_state: Callable[..., Path],
) -> None:
    """Config and MIG layout changes rewrite the spec; leaving CDI removes it."""
    state = sim_state("mixed")
    config = tmp_path / "config.yaml"
    daemon = start_daemon("mixed", "version: v1\nflags: {plugin: {deviceListStrategy: cdi-cri}}\n",
                          state=state)
    spec = CdiCache.load(cdi_dir).specs[SPEC_FILE]
    assert [d["name"] for d in spec["devices"]] == [*advertised(daemon.plan), "all"]
    assert len(spec["devices"]) == 5, "4 full GPUs and all"

    config.write_text("version: v1\nflags:\n  migStrategy: mixed\n"
                      "  plugin: {deviceListStrategy: cdi-cri, deviceIDStrategy: index}\n")
    assert daemon.reload()
    names = [d["name"] for d in CdiCache.load(cdi_dir).specs[SPEC_FILE]["devices"]]
    assert names == [*advertised(daemon.plan), "all"]
    assert {"0:0", "0:3", "1:1", "2", "3"} <= set(names)
    assert "0" not in names
    allocate_and_resolve(daemon, kubelet, cdi_dir, "cdi-cri")

    _mig_reshape(state, 1, ["1g.10gb", "1g.10gb", "2g.20gb"])
    assert daemon.reload()
    cache = CdiCache.load(cdi_dir)
    new = {n: d for n, d in advertised(daemon.plan).items() if n.startswith("1:")}
    assert sorted(new) == ["1:0", "1:1", "1:2"]
    for name, device in new.items():
        [entry] = cache.resolve([f"{KIND_PLUGIN}={name}"])
        assert set(device.dev_paths) <= device_nodes(entry)
        assert "env" not in entry["containerEdits"], "edits from nvidia-ctk, run again"
    allocate_and_resolve(daemon, kubelet, cdi_dir, "cdi-cri")

    config.write_text("version: v1\nflags: {migStrategy: mixed}\n")
    assert daemon.reload()
    assert not (cdi_dir / SPEC_FILE).exists()


def _script(path: Path, body: str) -> Path:
    """An executable program (a test's stand-in binary) at `path`."""
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def test_toolkit_path_with_the_stand_in(
    start_daemon: StartDaemon, kubelet: FakeKubelet, cdi_dir: Path, tmp_path: Path,
    sim_state: Callable[..., Path],
) -> None:
    """--nvidia-ctk-path: its edits are reused for gpushare's names, host paths on the host."""
    state = sim_state("dgx-a100")
    ctr_root = tmp_path / "driver-root"  # the host's driver root as gpushare's container sees it
    ctr_root.mkdir()
    calls = tmp_path / "argv.log"
    ctk = _script(tmp_path / "nvidia-ctk",
                  f'echo "$@" >> {calls}\nexec {sys.executable} {STANDIN} --node {state} "$@"')
    daemon = start_daemon("dgx-a100", REPLICAS, state=state, device_list_strategy=["cdi-cri"],
                          nvidia_ctk_path=str(ctk), container_driver_root=str(ctr_root),
                          nvidia_driver_root="/run/nvidia/driver")
    assert calls.read_text().split() == [
        "cdi", "generate", "--format=json", "--device-name-strategy=uuid",
        f"--driver-root={ctr_root}",
    ]
    allocate_and_resolve(daemon, kubelet, cdi_dir, "cdi-cri")
    spec = CdiCache.load(cdi_dir).specs[SPEC_FILE]
    mounts = {m["containerPath"]: m["hostPath"] for m in spec["containerEdits"]["mounts"]}
    lib = "/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15"
    assert mounts[lib] == "/run/nvidia/driver" + lib
    first = spec["devices"][0]["containerEdits"]
    assert {"path": "/dev/nvidia0", "hostPath": "/run/nvidia/driver/dev/nvidia0"} in (
        first["deviceNodes"]
    )
    assert any(n["path"].startswith("/dev/dri/") for n in first["deviceNodes"])
    assert "create-symlinks" in first["hooks"][0]["args"]
    assert not any(str(ctr_root) in str(v) for v in mounts.values())


def _not_executable(path: Path) -> Path:
    """A program file without its execute bits."""
    path.write_text("#!/bin/sh\n")
    path.chmod(0o644)
    return path


GENERATORS = [
    pytest.param(lambda d, s: d / "absent" / "nvidia-ctk", "is not installed", id="missing"),
    pytest.param(lambda d, s: _script(d / "ctk", f"exec {sys.executable} {STANDIN} \"$@\""),
                 "exited with status 1: time=", id="fails (no NVML)"),
    pytest.param(lambda d, s: _script(d / "ctk", "echo cdi generate: no such command"),
                 "output is not a JSON CDI spec", id="prints no JSON"),
    pytest.param(lambda d, s: _script(
        d / "ctk", """echo '{"cdiVersion": "0.5.0", "kind": "nvidia.com/gpu", """
                   """"devices": [{"name": "GPU-1"}]}'"""),
                 "'containerEdits' is a required property", id="prints an invalid spec"),
    pytest.param(lambda d, s: _not_executable(d / "ctk"), "Permission denied",
                 id="not executable"),
]


@pytest.mark.parametrize(("make_generator", "reason"), GENERATORS)
def test_without_a_working_generator_one_log_line_and_the_fallback_spec(
    start_daemon: StartDaemon, kubelet: FakeKubelet, cdi_dir: Path, tmp_path: Path,
    caplog: pytest.LogCaptureFixture, make_generator: Callable[[Path, Path], Path], reason: str,
) -> None:
    """Device nodes and NVIDIA_VISIBLE_DEVICES per device; said once, not at every reload."""
    caplog.set_level(logging.INFO, logger="gpushare.cdi")
    ctk = make_generator(tmp_path, tmp_path)
    daemon = start_daemon("mixed", MIG, device_list_strategy=["cdi-annotations"],
                          nvidia_ctk_path=str(ctk))
    allocate_and_resolve(daemon, kubelet, cdi_dir, "cdi-annotations")
    assert daemon.reload()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert reason in warnings[0]
    assert FALLBACK_LINE in warnings[0]
    spec = CdiCache.load(cdi_dir).specs[SPEC_FILE]
    expected = advertised(daemon.plan)
    for entry in spec["devices"][:-1]:
        device = expected[entry["name"]]
        assert entry["containerEdits"] == {
            "env": [f"NVIDIA_VISIBLE_DEVICES={entry['name']}"],
            "deviceNodes": [{"path": p} for p in device.dev_paths],
        }
    assert spec["devices"][-1]["containerEdits"]["env"] == [
        "NVIDIA_VISIBLE_DEVICES=" + ",".join(expected)
    ]


@pytest.mark.parametrize("id_strategy", ["uuid", "index"])
@pytest.mark.parametrize(
    ("node", "config"),
    [pytest.param("dgx-a100", REPLICAS, id="replicas"), pytest.param("mixed", MIG, id="MIG")],
)
def test_cdi_kind_of_the_toolkit_names_its_devices(
    start_daemon: StartDaemon, kubelet: FakeKubelet, cdi_dir: Path, tmp_path: Path,
    sim_state: Callable[..., Path], node: str, config: str, id_strategy: str,
) -> None:
    """cdiKind nvidia.com/gpu: names resolve in the toolkit's spec; gpushare writes none."""
    state = sim_state(node)
    etc_cdi = tmp_path / "etc-cdi"
    subprocess.run([sys.executable, str(STANDIN), "--node", str(state), "cdi", "generate",
                    f"--output={etc_cdi / 'nvidia.yaml'}"], check=True, capture_output=True)
    daemon = start_daemon(node, config, state=state, toolkit_dirs=[etc_cdi, cdi_dir],
                          device_list_strategy=["cdi-cri"], device_id_strategy=id_strategy,
                          cdi_kind=KIND_TOOLKIT)
    allocate_and_resolve(daemon, kubelet, etc_cdi, "cdi-cri", kind=KIND_TOOLKIT)
    assert not cdi_dir.exists()


def test_cdi_kind_of_the_toolkit_refuses_to_start_without_the_names(
    start_daemon: StartDaemon, kubelet_dir: Path, tmp_path: Path, sim_state: Callable[..., Path],
) -> None:
    """Names the toolkit's spec lacks (it names by index, gpushare by UUID): start fails."""
    state = sim_state("dgx-a100")
    etc_cdi = tmp_path / "etc-cdi"
    subprocess.run([sys.executable, str(STANDIN), "--node", str(state), "cdi", "generate",
                    "--device-name-strategy=index", f"--output={etc_cdi / 'nvidia.yaml'}"],
                   check=True, capture_output=True)
    with pytest.raises(CdiError, match=r"cdiKind nvidia.com/gpu: no CDI spec in .*etc-cdi.* "
                                       r"defines GPU-[0-9a-f-]+, .* and 3 more"):
        start_daemon("dgx-a100", FULL, state=state, toolkit_dirs=[etc_cdi],
                     device_list_strategy=["cdi-cri"], cdi_kind=KIND_TOOLKIT)
    assert sorted(p.name for p in kubelet_dir.iterdir()) == [], "nothing left serving"


def test_unwritable_spec_dir_fails_the_start_and_is_logged_on_reload(
    start_daemon: StartDaemon, cdi_dir: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """At start the daemon refuses to hand out names that cannot resolve; later it logs."""
    cdi_dir.write_text("a file where the directory should be")
    with pytest.raises(CdiError, match=f"cannot write the CDI spec {cdi_dir / SPEC_FILE}"):
        start_daemon("dgx-a100", FULL, device_list_strategy=["cdi-cri"])
    cdi_dir.unlink()
    daemon = start_daemon("dgx-a100", FULL, device_list_strategy=["cdi-cri"])
    (cdi_dir / SPEC_FILE).unlink()
    cdi_dir.rmdir()
    cdi_dir.write_text("again a file")
    assert daemon.reload()
    assert "cannot write the CDI spec" in caplog.text
    assert len(daemon.plan.resources[0].devices) == 8, "still serving"


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_gpushare_run_writes_the_spec_and_removes_it_on_sigterm(
    tmp_path: Path, kubelet_dir: Path, kubelet: FakeKubelet, cdi_dir: Path,
    sim_state: Callable[..., Path], how: str,
) -> None:
    """`gpushare run --cdi-spec-dir` (or $CDI_SPEC_DIR): the spec is there while it serves."""
    argv = gpushare_argv("run", "--node", str(sim_state("dgx-a100")),
                         "--kubelet-dir", str(kubelet_dir), "--device-list-strategy", "cdi-cri")
    env = checkout_env()
    env.pop("CONFIG_FILE", None)
    if how == "flag":
        argv += ["--cdi-spec-dir", str(cdi_dir)]
    else:
        env["CDI_SPEC_DIR"] = str(cdi_dir)
    process = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env)
    try:
        kubelet.wait_for(
            lambda: kubelet.resources() == ["nvidia.com/gpu"] or process.poll() is not None,
            timeout_s=20,
        )
        kubelet.wait_for_list("nvidia.com/gpu", lambda d: len(d.devices) == 8)
        got = kubelet.allocate("nvidia.com/gpu", 2).response
        CdiCache.load(cdi_dir).resolve(cdi_names(got, "cdi-cri")[0])
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)
    assert process.returncode == 0, output
    assert f"CDI spec {cdi_dir / SPEC_FILE} written: 8 devices and `all`" in output
    assert "(edits from nvidia-ctk)" in output
    assert list(cdi_dir.iterdir()) == []
