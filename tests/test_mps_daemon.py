"""MPS control daemons end to end: the stand-in as a real child, the simulated NVML, the kubelet.

Every daemon here runs `mps_daemon/standin.py` (chosen automatically on a simulated node); its
`standin-state.json` shows what gpushare asked for (CUDA_VISIBLE_DEVICES, limits, commands).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from mps_daemon import MpsControlDaemon, MpsDaemonError, MpsSupervisor, checked_dirs, standin_argv
from plugin.daemon.core import Daemon
from sharing.config import load_config
from sharing.devices import ComputeMode, Inventory
from sharing.errors import PlanError
from sharing.mps import MpsPaths
from sharing.nvml import Nvml, load_library, read_inventory
from sharing.plan import build_plan
from sharing.plan_types import MpsSpec, Plan, ResourcePlan, ServeOptions
from tests.checkout import checkout_env, gpushare_argv
from tests.fakes.kubelet import FakeKubelet
from tests.fakes.sockets import short_dir
from tests.test_metrics import samples, value, wait_until

ROOT = Path(__file__).resolve().parents[1]
COMPAT_MPS = ROOT / "tests" / "data" / "compat" / "nvidia-device-plugin" / "mps.yaml"
TWO_MPS = """\
version: v1
sharing:
  mps:
    resources:
      - {{name: nvidia.com/gpu, rename: nvidia.com/mps-a, devices: [0, 1, 2, 3], replicas: {a}}}
      - {{name: nvidia.com/gpu, rename: nvidia.com/mps-b, devices: [4, 5, 6, 7], replicas: 4}}
"""
StartDaemon = Callable[..., Daemon]


def _state(spec: MpsSpec) -> dict:
    """What the stand-in recorded for this resource."""
    return json.loads((Path(spec.log_dir) / "standin-state.json").read_text())


def _wait(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _running(pid: int) -> bool:
    """True while `pid` runs (a zombie, exited but not yet reaped by its parent, does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def sim_node(sim_state: Callable[..., Path]) -> Path:
    """A fresh simulated DGX A100 (8 x A100-SXM4-40GB)."""
    return sim_state("dgx-a100")


@pytest.fixture
def start_daemon(
    tmp_path: Path, kubelet_dir: Path, sim_node: Path, mps_root: Path
) -> Iterator[StartDaemon]:
    """Start a Daemon on the simulated node with an MPS config; stopped (children too) after."""
    daemons: list[Daemon] = []

    def start(config: str, **kwargs: object) -> Daemon:
        path = tmp_path / "config.yaml"
        path.write_text(config)
        daemon = Daemon(
            config_path=path, kubelet_dir=kubelet_dir, nvml_lib=load_library(str(sim_node)),
            env={}, overrides={"mps-root": str(mps_root)}, config_poll_s=3600, inotify=False,
            **kwargs,
        )
        daemons.append(daemon)
        daemon.start()
        return daemon

    yield start
    for daemon in daemons:
        daemon.stop()


def _compute_modes(sim_node: Path) -> list[ComputeMode]:
    nvml = Nvml(load_library(str(sim_node)))
    nvml.init()
    try:
        return [g.compute_mode for g in read_inventory(nvml).gpus]
    finally:
        nvml.shutdown()


def test_daemon_per_resource_with_env_limits_modes_and_permissions(
    start_daemon: StartDaemon, kubelet: FakeKubelet, sim_node: Path, mps_root: Path
) -> None:
    """Compat mps.yaml on dgx-a100: one daemon, only its GPUs visible, 10% and total/10 each."""
    daemon = start_daemon(COMPAT_MPS.read_text())
    resource = daemon.plan.resources[0]
    spec = resource.mps
    assert spec is not None
    state = _state(spec)
    assert state["visible_devices"] == ",".join(spec.gpu_uuids)
    assert state["active_thread_percentage"] == 10
    inventory = daemon.inventory
    assert inventory is not None
    assert state["pinned_mem_limits"] == {
        str(n): f"{gpu.memory_mib // 10}M" for n, gpu in enumerate(inventory.gpus)
    }
    assert _compute_modes(sim_node) == [ComputeMode.EXCLUSIVE_PROCESS] * 8
    modes = {p: stat.S_IMODE(os.stat(p).st_mode) for p in (spec.pipe_dir, spec.log_dir)}
    assert modes == {spec.pipe_dir: 0o755, spec.log_dir: 0o700}
    assert stat.S_IMODE(os.stat(spec.shm_dir).st_mode) == 0o1777
    assert stat.S_IMODE(os.stat(Path(spec.pipe_dir) / "control").st_mode) == 0o600
    pid = int((Path(spec.pipe_dir) / "nvidia-cuda-mps-control.pid").read_text())
    assert pid == daemon.mps_supervisor.daemon(resource.name).pid
    assert kubelet.wait_for_list(resource.name, lambda d: len(d.healthy_ids) == 80)


def test_killed_daemon_marks_devices_unhealthy_then_recovers(
    start_daemon: StartDaemon, kubelet: FakeKubelet
) -> None:
    """SIGKILL of the control daemon: all 80 replicas Unhealthy, then Healthy after a restart;
    the metrics show the daemon down, then up again with one restart counted."""
    daemon = start_daemon(COMPAT_MPS.read_text())
    name = daemon.plan.resources[0].name
    kubelet.wait_for_list(name, lambda d: len(d.healthy_ids) == 80)
    assert _mps_metrics(daemon, name) == (1.0, None)
    old = daemon.mps_supervisor.daemon(name).pid
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: _mps_metrics(daemon, name)[0] == 0.0)  # down for >= the 0.2 s backoff
    kubelet.wait_for(lambda: any(len(d.unhealthy_ids) == 80 for d in kubelet.lists(name)))
    kubelet.wait_for_list(name, lambda d: len(d.healthy_ids) == 80)
    new = daemon.mps_supervisor.daemon(name).pid
    assert new not in (None, old)
    assert _state(daemon.plan.resources[0].mps)["active_thread_percentage"] == 10
    assert _mps_metrics(daemon, name) == (1.0, 1.0)


def _mps_metrics(daemon: Daemon, resource: str) -> tuple[float | None, float | None]:
    """(gpushare_mps_daemon_up, gpushare_mps_daemon_restarts_total) of a resource, scraped."""
    found = samples(daemon.metrics.exposition().decode())
    return (
        value(found, "gpushare_mps_daemon_up", resource=resource),
        value(found, "gpushare_mps_daemon_restarts_total", resource=resource),
    )


def test_reload_restarts_only_the_changed_daemon(
    start_daemon: StartDaemon, kubelet: FakeKubelet, tmp_path: Path
) -> None:
    """replicas 2 -> 5 on mps-a: its daemon restarts with 20%; mps-b keeps its process."""
    daemon = start_daemon(TWO_MPS.format(a=2))
    supervisor = daemon.mps_supervisor
    pid_a = supervisor.daemon("nvidia.com/mps-a").pid
    pid_b = supervisor.daemon("nvidia.com/mps-b").pid
    spec_b = daemon.plan.resource("nvidia.com/mps-b").mps
    assert _state(spec_b)["visible_devices"] == ",".join(spec_b.gpu_uuids)
    assert sorted(_state(spec_b)["pinned_mem_limits"]) == ["0", "1", "2", "3"]
    (tmp_path / "config.yaml").write_text(TWO_MPS.format(a=5))
    assert daemon.reload()
    spec_a = daemon.plan.resource("nvidia.com/mps-a").mps
    assert spec_a.active_thread_percentage == 20
    _wait(lambda: _state(spec_a)["active_thread_percentage"] == 20
          and _state(spec_a)["pid"] == supervisor.daemon("nvidia.com/mps-a").pid)
    assert _state(spec_a)["pid"] != pid_a
    assert not _alive(pid_a)
    assert supervisor.daemon("nvidia.com/mps-b").pid == pid_b
    kubelet.wait_for_list("nvidia.com/mps-a", lambda d: len(d.healthy_ids) == 20)


def test_stop_sends_quit_and_leaves_nothing(
    start_daemon: StartDaemon, sim_node: Path
) -> None:
    """stop(): `quit` reaches the daemon, the process is gone, socket and pid file removed."""
    daemon = start_daemon(COMPAT_MPS.read_text())
    spec = daemon.plan.resources[0].mps
    pid = daemon.mps_supervisor.daemon(daemon.plan.resources[0].name).pid
    daemon.stop()
    assert _state(spec)["commands"][-1] == "quit"
    assert not _alive(pid)
    assert sorted(os.listdir(spec.pipe_dir)) == []
    assert _compute_modes(sim_node) == [ComputeMode.DEFAULT] * 8, "modes we changed restored"


def test_sigterm_of_gpushare_run_quits_the_mps_daemon(
    tmp_path: Path, kubelet_dir: Path, kubelet: FakeKubelet, sim_node: Path, mps_root: Path
) -> None:
    """`gpushare run --node <sim>` runs the stand-in; SIGTERM ends it with `quit`, none left."""
    config = tmp_path / "config.yaml"
    config.write_text(COMPAT_MPS.read_text())
    process = subprocess.Popen(
        gpushare_argv("run", "--config", str(config), "--node", str(sim_node),
                      "--kubelet-dir", str(kubelet_dir), "--mps-root", str(mps_root)),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=checkout_env(),
    )
    pid_file = MpsPaths(str(mps_root)).pipe_dir("nvidia.com/gpu") + "/nvidia-cuda-mps-control.pid"
    try:
        kubelet.wait_for_list("nvidia.com/gpu", lambda d: len(d.healthy_ids) == 80, timeout_s=20)
        pid = int(Path(pid_file).read_text())
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)
    assert process.returncode == 0, output
    assert not _alive(pid)
    assert not Path(pid_file).exists()
    log_dir = MpsPaths(str(mps_root)).log_dir("nvidia.com/gpu")
    assert json.loads((Path(log_dir) / "standin-state.json").read_text())["commands"][-1] == "quit"


def test_missing_control_program_marks_devices_unhealthy_daemon_stays_up(
    start_daemon: StartDaemon, kubelet: FakeKubelet, caplog: pytest.LogCaptureFixture
) -> None:
    """No control program: one clear error, every device Unhealthy, the daemon still serves."""
    caplog.set_level(logging.DEBUG, logger="gpushare.mps")
    missing = "/nonexistent/nvidia-cuda-mps-control"
    daemon = start_daemon(COMPAT_MPS.read_text(), mps_control=missing)
    name = daemon.plan.resources[0].name
    kubelet.wait_for_list(name, lambda d: len(d.unhealthy_ids) == 80)
    _wait(lambda: sum("still down" in r.message for r in caplog.records) >= 2)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "is the NVIDIA driver installed?" in errors[0].getMessage()
    assert daemon.mps_supervisor.healthy() == {name: False}
    assert kubelet.resources() == [name]
    assert daemon.socket_names() == {name: "gpushare-gpu.sock"}


def _spec(root: str, resource: str = "nvidia.com/gpu") -> MpsSpec:
    paths = MpsPaths(root)
    return MpsSpec(
        resource=resource, gpu_indices=(0,), gpu_uuids=("GPU-0",), active_thread_percentage=50,
        pinned_mem_limit_mib=((0, 1024),), max_clients_per_gpu=48,
        pipe_dir=paths.pipe_dir(resource), log_dir=paths.log_dir(resource),
        shm_dir=paths.shm_dir(),
    )


@pytest.mark.parametrize(
    ("root", "resource", "message"),
    [
        pytest.param("mps", "nvidia.com/gpu", "mpsRoot must be an absolute path, got 'mps'",
                     id="relative mpsRoot"),
        pytest.param("", "nvidia.com/gpu", "mpsRoot must be an absolute path", id="empty mpsRoot"),
        pytest.param(None, "nvidia.com/..", "outside mpsRoot", id="resource name escapes"),
        pytest.param(None, "nvidia.com/shm", "inside the shared memory directory",
                     id="pipe directory inside the clients' /dev/shm"),
    ],
)
def test_paths_must_stay_inside_an_absolute_mps_root(
    mps_root: Path, root: str | None, resource: str, message: str
) -> None:
    """A relative mpsRoot, or a resource whose directories resolve outside it, is refused."""
    base = str(mps_root) if root is None else root
    with pytest.raises(MpsDaemonError, match=message):
        checked_dirs(_spec(base, resource), base)


def test_symlink_out_of_mps_root_is_refused(mps_root: Path, tmp_path: Path) -> None:
    """A resource directory that is a symlink elsewhere is refused before anything is created."""
    (mps_root / "gpu").symlink_to(tmp_path)
    daemon = MpsControlDaemon(_spec(str(mps_root)), control_binary=standin_argv(),
                              mps_root=str(mps_root))
    with pytest.raises(MpsDaemonError, match="outside mpsRoot"):
        daemon.start()
    assert list(tmp_path.iterdir()) == []


def _start_refused(mps_root: Path, message: str) -> None:
    daemon = MpsControlDaemon(_spec(str(mps_root)), control_binary=standin_argv(),
                              mps_root=str(mps_root))
    try:
        with pytest.raises(MpsDaemonError, match=message):
            daemon.start()
    finally:
        daemon.stop()  # a start that wrongly succeeded leaves no daemon behind


def test_link_planted_inside_mps_root_is_not_followed(mps_root: Path) -> None:
    """`<root>/shm` planted as a link to another directory under the root: refused, and the
    target keeps its mode (it was made world-writable, 1777, through the link)."""
    private = mps_root / "private"
    private.mkdir(mode=0o700)
    (mps_root / "shm").symlink_to(private)
    _start_refused(mps_root, "shm is a link or not a directory")
    assert stat.S_IMODE(private.stat().st_mode) == 0o700


def test_directory_of_another_user_in_mps_root_is_not_adopted(mps_root: Path) -> None:
    """A pipe directory created beforehand by another user (who could then swap the daemon's
    sockets) is refused, and left as it was."""
    pipe = Path(_spec(str(mps_root)).pipe_dir)
    pipe.mkdir(parents=True)
    pipe.chmod(0o777)
    os.chown(pipe, 65534, 65534)
    _start_refused(mps_root, "pipe is owned by uid 65534, not by us")
    assert stat.S_IMODE(pipe.stat().st_mode) == 0o777
    assert list(pipe.iterdir()) == []


def test_mps_root_writable_by_others_is_refused(mps_root: Path) -> None:
    """Anyone who can write mpsRoot could replace a resource directory after our checks."""
    mps_root.chmod(0o777)
    _start_refused(mps_root, "writable by group or others \\(mode 0777\\)")
    assert list(mps_root.iterdir()) == []


def test_mps_root_other_users_cannot_search_is_named_in_a_warning(
    mps_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """MPS servers run as their client's user: a 0700 mpsRoot keeps a non-root client's server
    from its pipe directory (it exits, the client fails). The start says which directory."""
    mps_root.chmod(0o700)
    daemon = MpsControlDaemon(_spec(str(mps_root)), control_binary=standin_argv(),
                              mps_root=str(mps_root))
    with caplog.at_level(logging.WARNING, logger="gpushare.mps"):
        daemon.start()
        daemon.stop()
        daemon.start()  # a restart: said once already
    daemon.stop()
    assert [r.getMessage() for r in caplog.records] == [
        f"mpsRoot {mps_root}: {mps_root} is not searchable by other users (mode 0700); the MPS "
        "server of a client that is not root runs as that user and cannot reach its pipe "
        "directory"
    ]


def test_plan_rejects_an_mps_resource_named_shm(inventory_of: Callable[..., Inventory]) -> None:
    """`shm` would put the pipe directory inside `<mpsRoot>/shm`, the clients' /dev/shm."""
    config = load_config("version: v1\nflags: {mpsRoot: /run/mps}\nsharing:\n  mps:\n"
                         "    resources:\n    - {name: nvidia.com/gpu, rename: shm, replicas: 2}\n")
    with pytest.raises(PlanError, match='MPS resource "nvidia.com/shm" would keep its pipe '
                                        "directory /run/mps/shm/pipe inside the shared memory"):
        build_plan(inventory_of("dgx-a100"), config)


def test_plan_rejects_a_relative_mps_root(inventory_of: Callable[..., Inventory]) -> None:
    """build_plan refuses mpsRoot `run/mps`: the error names the flag and the value."""
    config = load_config("version: v1\nflags: {mpsRoot: run/mps}\n"
                         + COMPAT_MPS.read_text().split("\n", 1)[1])
    with pytest.raises(PlanError, match=r"flags.mpsRoot \(or MPS_ROOT / --mps-root\) must be "
                                        "an absolute path, got 'run/mps'"):
        build_plan(inventory_of("dgx-a100"), config)


def test_wrong_probe_answer_is_down_then_restarted(
    mps_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A daemon answering another thread percentage is reported down, restarted, then up; each
    of the supervisor's lines names the resource in its text and in its `resource` field."""
    caplog.set_level(logging.INFO, logger="gpushare.mps")
    events: list[tuple[str, ...]] = []
    supervisor = MpsSupervisor(
        control_binary=standin_argv(), down=lambda r, why: events.append(("down", r, why)),
        up=lambda r: events.append(("up", r)), probe_interval_s=0.05, backoff_s=0.05,
    )
    spec = _spec(str(mps_root))
    plan = Plan(resources=(ResourcePlan(name=spec.resource, original_name=spec.resource,
                                        strategy="mps", devices=(), mps=spec),),
                options=ServeOptions(mps_root=str(mps_root)))
    supervisor.update(plan)
    supervisor.start()
    try:
        assert events == [("up", spec.resource)]
        daemon = supervisor.daemon(spec.resource)
        daemon.command(["set_default_active_thread_percentage 7"])
        _wait(lambda: len(events) >= 3)
        assert events[1][:2] == ("down", spec.resource)
        assert "active thread percentage is '7.0', expected 50" in events[1][2]
        assert events[2] == ("up", spec.resource)
    finally:
        supervisor.stop()
    assert not _alive(daemon_pid := _state(spec)["pid"]), daemon_pid
    said = [r for r in caplog.records if r.name.startswith("gpushare.mps")]
    assert {"started", "answers", "down", "stopped"} <= {
        word.rstrip(":") for r in said for word in r.getMessage().split()}
    for record in said:
        assert record.getMessage().startswith(f"{spec.resource}: "), record.getMessage()
        assert getattr(record, "resource", None) == spec.resource, record.getMessage()


def test_vanished_resource_daemon_stopped_and_its_gpus_restored(
    start_daemon: StartDaemon, tmp_path: Path, sim_node: Path
) -> None:
    """mps-b leaves the config: its daemon quits, GPUs 4-7 go back to DEFAULT, mps-a stays."""
    daemon = start_daemon(TWO_MPS.format(a=2))
    supervisor = daemon.mps_supervisor
    pid_a = supervisor.daemon("nvidia.com/mps-a").pid
    spec_b = daemon.plan.resource("nvidia.com/mps-b").mps
    pid_b = supervisor.daemon("nvidia.com/mps-b").pid
    (tmp_path / "config.yaml").write_text(TWO_MPS.format(a=2).rsplit("\n", 2)[0] + "\n")
    assert daemon.reload()
    _wait(lambda: supervisor.daemon("nvidia.com/mps-b") is None)
    assert not _alive(pid_b)
    assert _state(spec_b)["commands"][-1] == "quit"
    assert supervisor.daemon("nvidia.com/mps-a").pid == pid_a
    modes = _compute_modes(sim_node)
    assert modes == [ComputeMode.EXCLUSIVE_PROCESS] * 4 + [ComputeMode.DEFAULT] * 4


def test_mps_daemon_never_imports_plugin() -> None:
    """Dependency direction: plugin -> mps_daemon -> sharing."""
    import ast

    for path in sorted((ROOT / "mps_daemon").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "plugin" or n.startswith("plugin.") for n in names), path


HOSTILE = Path(__file__).resolve().parent / "fakes" / "hostile_mps.py"


def _hostile(mode: str) -> tuple[str, ...]:
    """argv prefix of the misbehaving control program (tests/fakes/hostile_mps.py)."""
    return (sys.executable, str(HOSTILE), mode)


def _spawn_leftover(argv: list[str], pipe_dir: str) -> subprocess.Popen[bytes]:
    """A process left running by an earlier gpushare (its own session, like our children)."""
    env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": pipe_dir}
    return subprocess.Popen(argv, env=env, start_new_session=True)


def test_daemon_left_by_a_killed_run_that_ignores_quit_is_stopped_before_ours_starts(
    mps_root: Path,
) -> None:
    """gpushare was SIGKILLed; its control daemon still runs, takes no `quit` and ignores
    SIGTERM. The next start stops it (quit, SIGTERM, SIGKILL) before starting its own, so no
    daemon is left running for nobody."""
    spec = _spec(str(mps_root))
    Path(spec.pipe_dir).mkdir(parents=True)
    pid_file = Path(spec.pipe_dir) / "nvidia-cuda-mps-control.pid"
    old = _spawn_leftover([*_hostile("silent"), "-f"], spec.pipe_dir)
    try:
        _wait(pid_file.exists)
        daemon = MpsControlDaemon(spec, control_binary=standin_argv(), mps_root=str(mps_root),
                                  command_timeout_s=0.5, stop_timeout_s=0.5)
        daemon.start()
        try:
            assert old.poll() == -signal.SIGKILL
            daemon.probe()
            assert int(pid_file.read_text()) == daemon.pid
        finally:
            daemon.stop()
    finally:
        old.kill()
        old.wait()


def test_pid_file_naming_another_program_is_never_signalled(mps_root: Path) -> None:
    """A stale pid file whose pid is now another program (pid reuse): left alone."""
    spec = _spec(str(mps_root))
    Path(spec.pipe_dir).mkdir(parents=True)
    other = _spawn_leftover([sys.executable, "-c", "import time; time.sleep(60)"], "/elsewhere")
    try:
        (Path(spec.pipe_dir) / "nvidia-cuda-mps-control.pid").write_text(f"{other.pid}\n")
        daemon = MpsControlDaemon(spec, control_binary=standin_argv(), mps_root=str(mps_root),
                                  command_timeout_s=0.5, stop_timeout_s=0.5)
        daemon.start()
        daemon.stop()
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def _plan(spec: MpsSpec, root: Path) -> Plan:
    return Plan(resources=(ResourcePlan(name=spec.resource, original_name=spec.resource,
                                        strategy="mps", devices=(), mps=spec),),
                options=ServeOptions(mps_root=str(root)))


def test_flapping_daemon_backoff_keeps_growing(
    mps_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A daemon that answers, then dies at once, again and again: each restart waits longer
    (it was restarted every backoff_s forever: a start reset the backoff)."""
    supervisor = MpsSupervisor(
        control_binary=_hostile("brief"), down=lambda r, why: None, up=lambda r: None,
        tick_s=0.01, probe_interval_s=0.05, backoff_s=0.05, max_backoff_s=10.0, stable_s=30.0,
    )
    supervisor.update(_plan(_spec(str(mps_root)), mps_root))
    caplog.set_level(logging.INFO, logger="gpushare.mps")
    supervisor.start()
    try:
        _wait(lambda: len([r for r in caplog.records if r.levelno == logging.ERROR]) >= 4,
              timeout_s=40)
    finally:
        supervisor.stop()
    delays = [float(r.getMessage().rsplit("first try in ", 1)[1].rstrip("s)"))
              for r in caplog.records if r.levelno == logging.ERROR]
    # 0.05, 0.1, 0.2, 0.4 s (shown as %.1f); more when a start in between failed outright
    assert delays == sorted(delays), delays
    assert delays[3] >= 0.4, delays


def test_crash_loop_is_reported_once_and_its_output_file_stays_bounded(
    mps_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A control daemon that exits at start, in a loop: one ERROR, restarts spaced by the
    backoff, and its output file is moved aside once larger than the limit, not grown."""
    spec = _spec(str(mps_root))
    output = Path(spec.log_dir) / "control-daemon.out"
    output.parent.mkdir(parents=True)
    output.write_bytes(b"old\n" * (2 << 20))  # 8 MiB left from earlier runs
    down: list[str] = []
    supervisor = MpsSupervisor(
        control_binary=_hostile("crash"), down=lambda r, why: down.append(why),
        up=lambda r: None, tick_s=0.01, backoff_s=0.05, max_backoff_s=0.2,
    )
    supervisor.update(_plan(spec, mps_root))
    caplog.set_level(logging.DEBUG, logger="gpushare.mps")
    supervisor.start()
    try:
        _wait(lambda: output.read_bytes().count(b"crashing at start") >= 3, timeout_s=20)
    finally:
        supervisor.stop()
    assert len(down) == 1, down
    assert "exited with status 1" in down[0]
    assert "hostile_mps: crashing at start" in down[0]
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    assert output.stat().st_size < 4096
    assert Path(f"{output}.1").stat().st_size == 8 << 20


def test_client_that_floods_stdout_is_stopped_at_the_limit(mps_root: Path) -> None:
    """A control client writing 64 MiB: cut at 1 MiB and reported, not read into memory."""
    daemon = MpsControlDaemon(_spec(str(mps_root)), control_binary=_hostile("flood"),
                              mps_root=str(mps_root))
    with pytest.raises(MpsDaemonError, match="wrote more than 1,048,576 bytes; stopped"):
        daemon.command(["get_server_list"])


def test_daemon_that_never_answers_cannot_hold_start_probe_or_stop(mps_root: Path) -> None:
    """The control daemon accepts connections and never answers: every command times out, the
    start fails in bounded time, and stop ends it (SIGTERM ignored: SIGKILL)."""
    spec = _spec(str(mps_root))
    daemon = MpsControlDaemon(spec, control_binary=_hostile("silent"), mps_root=str(mps_root),
                              ready_timeout_s=1.0, command_timeout_s=0.5, stop_timeout_s=0.5)
    began = time.monotonic()
    with pytest.raises(MpsDaemonError, match="did not answer within 1.0s: .*timed out after 0.5s"):
        daemon.start()
    assert time.monotonic() - began < 6
    pid = int((Path(spec.pipe_dir) / "nvidia-cuda-mps-control.pid").read_text())
    assert not _alive(pid)


def test_start_abandoned_before_the_daemon_answers_ends_it_without_a_warning(
    mps_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stop that comes while the control daemon has not answered yet (a start in progress):
    the start gives up, the child is ended, and no WARNING says `quit` failed: it could not
    have answered it, and a crash loop stopped at such a moment must still log one ERROR."""
    spec = _spec(str(mps_root))
    cancel = threading.Event()
    daemon = MpsControlDaemon(spec, control_binary=_hostile("silent"), mps_root=str(mps_root),
                              ready_timeout_s=60.0, command_timeout_s=0.5, stop_timeout_s=0.5,
                              cancel=cancel)
    pid_file = Path(spec.pipe_dir) / "nvidia-cuda-mps-control.pid"
    threading.Timer(0.0, lambda: (_wait(pid_file.exists, timeout_s=30), cancel.set())).start()
    caplog.set_level(logging.INFO, logger="gpushare.mps")
    with pytest.raises(MpsDaemonError, match="start abandoned"):
        daemon.start()
    pid = int(pid_file.read_text())
    assert not _alive(pid)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert any("had not answered yet; terminating it" in r.getMessage() for r in caplog.records)


def test_stop_with_wedged_daemons_takes_one_timeout_not_one_per_daemon(mps_root: Path) -> None:
    """Six control daemons stop answering (SIGSTOP: connections queue, nothing answers,
    SIGTERM waits): stop() ends them all in about one daemon's `quit` timeout + SIGTERM wait
    (1 s + 1 s), not six in a row (12 s), which could outlast the pod's grace period."""
    specs = [_spec(str(mps_root), f"nvidia.com/mps-{n}") for n in range(6)]
    supervisor = MpsSupervisor(
        control_binary=standin_argv(), down=lambda r, why: None, up=lambda r: None,
        probe_interval_s=3600, daemon_timeouts={"command_timeout_s": 1.0, "stop_timeout_s": 1.0},
    )
    supervisor.update(Plan(
        resources=tuple(ResourcePlan(name=s.resource, original_name=s.resource, strategy="mps",
                                     devices=(), mps=s) for s in specs),
        options=ServeOptions(mps_root=str(mps_root))))
    supervisor.start()
    pids = [supervisor.daemon(s.resource).pid for s in specs]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    began = time.monotonic()
    supervisor.stop()
    took = time.monotonic() - began
    assert not any(_alive(pid) for pid in pids)
    assert took < 6.0, f"stop took {took:.1f}s"


def test_stop_while_a_start_waits_for_an_answer_returns_promptly(mps_root: Path) -> None:
    """A restart in progress waits up to its ready timeout (here 30 s) for a daemon that never
    answers; stop() abandons it at once, ends the process and reports no failure."""
    spec = _spec(str(mps_root))
    down: list[str] = []
    supervisor = MpsSupervisor(
        control_binary=_hostile("silent"), down=lambda r, why: down.append(why),
        up=lambda r: None,
        daemon_timeouts={"ready_timeout_s": 30.0, "command_timeout_s": 0.3,
                         "stop_timeout_s": 0.3},
    )
    supervisor.start()
    supervisor.update(_plan(spec, mps_root))
    pid_file = Path(spec.pipe_dir) / "nvidia-cuda-mps-control.pid"
    _wait(pid_file.exists)
    pid = int(pid_file.read_text())
    began = time.monotonic()
    supervisor.stop()
    took = time.monotonic() - began
    assert took < 5, f"stop took {took:.1f}s"
    assert not _alive(pid)
    assert down == []


def test_sigkill_of_gpushare_run_then_restart_leaves_one_daemon(
    tmp_path: Path, kubelet_dir: Path, kubelet: FakeKubelet, sim_node: Path, mps_root: Path
) -> None:
    """`gpushare run` is SIGKILLed: its control daemon (own session) survives it. The next
    run stops that one before starting its own: one daemon answers, none is left behind."""
    config = tmp_path / "config.yaml"
    config.write_text(COMPAT_MPS.read_text())
    argv = gpushare_argv("run", "--config", str(config), "--node", str(sim_node),
                         "--kubelet-dir", str(kubelet_dir), "--mps-root", str(mps_root))
    pid_file = Path(MpsPaths(str(mps_root)).pipe_dir("nvidia.com/gpu"),
                    "nvidia-cuda-mps-control.pid")
    runs: list[subprocess.Popen[str]] = []
    pids: list[int] = []
    try:
        for _ in range(2):
            runs.append(subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, text=True,
                                         env=checkout_env()))
            _wait(lambda: pid_file.exists() and pid_file.read_text().strip().isdigit()
                  and int(pid_file.read_text()) not in pids, timeout_s=20)
            pids.append(int(pid_file.read_text()))
            if len(runs) == 1:
                runs[0].kill()
                runs[0].wait(timeout=10)
                assert _running(pids[0]), "the control daemon outlives a SIGKILLed gpushare"
        _wait(lambda: not _running(pids[0]))
        assert _running(pids[1])
        kubelet.wait_for_list("nvidia.com/gpu", lambda d: len(d.healthy_ids) == 80, timeout_s=20)
        runs[1].send_signal(signal.SIGTERM)
        assert runs[1].wait(timeout=15) == 0
        assert not _running(pids[1])
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.wait(timeout=10)
        for pid in pids:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)



def test_mps_logs_larger_than_the_limit_are_moved_aside_at_start(mps_root: Path) -> None:
    """MPS never trims control.log or server.log: above 16 MiB each is moved to `.1` when its
    daemon (re)starts; a small one is kept."""
    spec = _spec(str(mps_root))
    logs = Path(spec.log_dir)
    logs.mkdir(parents=True)
    (logs / "control.log").write_bytes(b"c" * (17 << 20))
    (logs / "server.log").write_text("small\n")
    daemon = MpsControlDaemon(spec, control_binary=standin_argv(), mps_root=str(mps_root))
    daemon.start()
    daemon.stop()
    assert (logs / "control.log.1").stat().st_size == 17 << 20
    assert (logs / "control.log").stat().st_size < 4096  # this run's lines only
    assert (logs / "server.log").read_text() == "small\n"
    assert not (logs / "server.log.1").exists()


def test_gpushare_run_under_umask_0_creates_nothing_others_can_write(
    tmp_path: Path, kubelet_dir: Path, kubelet: FakeKubelet, sim_node: Path
) -> None:
    """Parents that mkdir(parents=True) creates get 0777 & ~umask: under an inherited umask 0
    the missing parents of mpsRoot and of the state directory were world-writable, so another
    user could swap the directories inside. `gpushare run` masks group and other write."""
    config = tmp_path / "config.yaml"
    config.write_text(COMPAT_MPS.read_text())
    with short_dir("gs-um-") as base:
        base.chmod(0o755)
        mps_root = base / "a" / "mps"
        state_dir = base / "b" / "state"
        old = os.umask(0)
        try:
            process = subprocess.Popen(
                gpushare_argv("run", "--config", str(config), "--node", str(sim_node),
                              "--kubelet-dir", str(kubelet_dir), "--mps-root", str(mps_root),
                              "--state-dir", str(state_dir), "--control-socket",
                              str(base / "c" / "control.sock")),
                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                env=checkout_env(),
            )
        finally:
            os.umask(old)
        try:
            kubelet.wait_for_list("nvidia.com/gpu", lambda d: len(d.healthy_ids) == 80,
                                  timeout_s=20)
            modes = {str(p.relative_to(base)): stat.S_IMODE(p.stat().st_mode)
                     for p in sorted(base.rglob("*")) if p.is_dir()}
            process.send_signal(signal.SIGTERM)
            output, _ = process.communicate(timeout=15)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=10)
    assert process.returncode == 0, output
    writable = {path: f"{mode:04o}" for path, mode in modes.items()
                if mode & 0o022 and path != "a/mps/shm"}
    assert writable == {}, writable
    assert modes["a/mps/shm"] == 0o1777


THREE_MPS = """\
version: v1
sharing:
  mps:
    resources:
      - {name: nvidia.com/gpu, rename: nvidia.com/mps-a, devices: [0, 1], replicas: 2}
      - {name: nvidia.com/gpu, rename: nvidia.com/mps-b, devices: [2, 3], replicas: 2}
      - {name: nvidia.com/gpu, rename: nvidia.com/mps-c, devices: [4, 5], replicas: 2}
"""


def test_sigterm_while_mps_daemons_hang_at_start_stops_promptly(
    tmp_path: Path, kubelet_dir: Path, kubelet: FakeKubelet, sim_node: Path, mps_root: Path
) -> None:
    """Three MPS resources whose control daemons never answer: each start waits out its
    ready and command timeouts (about 12 s), one after another. A SIGTERM meanwhile makes the
    start in progress give up and the others not begin, so gpushare exits in seconds rather
    than after all three (and a pod's grace period)."""
    control = tmp_path / "silent-mps-control"
    control.write_text(f"#!{sys.executable}\nimport runpy, sys\n"
                       f"sys.argv = [{str(HOSTILE)!r}, 'silent', *sys.argv[1:]]\n"
                       f"runpy.run_path({str(HOSTILE)!r}, run_name='__main__')\n")
    control.chmod(0o755)
    config = tmp_path / "config.yaml"
    config.write_text(THREE_MPS)
    process = subprocess.Popen(
        gpushare_argv("run", "--config", str(config), "--node", str(sim_node),
                      "--kubelet-dir", str(kubelet_dir), "--mps-root", str(mps_root),
                      "--mps-control", str(control)),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=checkout_env(),
    )
    first = Path(MpsPaths(str(mps_root)).pipe_dir("nvidia.com/mps-a"),
                 "nvidia-cuda-mps-control.pid")
    try:
        _wait(first.exists, timeout_s=20)
        pid = int(first.read_text())
        began = time.monotonic()
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
        took = time.monotonic() - began
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)
    assert process.returncode == 0, output
    assert took < 15, f"gpushare took {took:.1f}s to stop:\n{output}"
    assert not _running(pid)
    assert "nvidia.com/mps-c: MPS control daemon started" not in output
