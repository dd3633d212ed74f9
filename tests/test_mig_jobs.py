"""MIG reconfiguration jobs inside the daemon (in process, simulated DGX A100, kubelet stand-in):
one job at a time, killProcesses, node labels, result listeners, MPS daemons during a drain,
stopping mid-drain, control request checks, an interrupted `gpushare mig apply` rolled forward."""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import cast
from zoneinfo import ZoneInfo

import pynvml
import pytest

from plugin.daemon.config_reader import ConfigReader
from plugin.daemon.control import MAX_CONNECTIONS, call
from plugin.daemon.core import Daemon
from plugin.daemon.mig_engine import MigEngine
from plugin.daemon.mig_history import JOURNAL_FILE, JobRecord
from plugin.daemon.mig_jobs import CONFIG_LABEL, STATE_LABEL, JobRefused, MigJobRunner
from plugin.daemon.mig_schedule import MigScheduler
from plugin.daemon.mig_wiring import add_mig_jobs
from sharing.config_models import MigScheduleEntry
from sharing.nvml import Nvml, load_library, read_inventory
from sharing.nvml.mig_apply import apply_mig, plan_mig
from sharing.nvml.sim import SimNvml, create_state, start_process, stop_process
from tests.checkout import checkout_env
from tests.fakes.gated_sim import GatedSim
from tests.fakes.kubelet import FakeKubelet
from tests.fakes.sockets import short_dir

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "tests" / "data" / "compat" / "mig-parted" / "example-config.yaml"
MIXED = "version: v1\nflags: {migStrategy: mixed}\n"
STUCK = [sys.executable, "-c", "import time; time.sleep(600)"]  # a reader that never answers
OLD, NEW = "nvidia.com/mig-2g.10gb", "nvidia.com/mig-1g.5gb"
GPU7_3G = """\
version: v1
mig-configs:
  gpu7-3g:
    - devices: [7]
      mig-enabled: true
      mig-devices: {"3g.20gb": 2}
"""


class Node:
    """A simulated node, its in-process daemon with MIG jobs, and the daemon's control socket."""

    def __init__(self, tmp_path: Path, kubelet_dir: Path, socket: Path, mps_root: Path) -> None:
        self.tmp_path = tmp_path
        self.state = tmp_path / "node"
        self.state_dir = tmp_path / "jobs"
        self.labels_file = tmp_path / "features.d" / "gfd"
        self.socket = socket
        self.kubelet_dir = kubelet_dir
        self.mps_root = mps_root
        self.daemon: Daemon | None = None
        create_state("dgx-a100", self.state)

    def apply(self, config: str, text: str | None = None) -> None:
        """Set a layout directly, as an operator would before the daemon runs."""
        nvml = Nvml(SimNvml(self.state))
        nvml.init()
        try:
            source = EXAMPLE if text is None else text
            apply_mig(nvml, plan_mig(nvml, source, config), journal_path=self.tmp_path / "j.json")
        finally:
            nvml.shutdown()

    def start(self, config: str = MIXED, lib: object = None) -> Daemon:
        path = self.tmp_path / "config.yaml"
        path.write_text(config)
        lib = lib if lib is not None else load_library(str(self.state))
        self.daemon = Daemon(config_path=path, kubelet_dir=self.kubelet_dir, nvml_lib=lib,
                             env={}, overrides={"mps-root": str(self.mps_root),
                                                "labels-file": str(self.labels_file)},
                             node_labels=True)
        add_mig_jobs(self.daemon, state_dir=self.state_dir, control_socket=self.socket,
                     nvml_lib=lib)
        self.daemon.start()
        return self.daemon

    @property
    def runner(self) -> MigJobRunner:
        assert self.daemon is not None
        return self.daemon.mig_jobs

    def process_on(self, gpu: int) -> int:
        """Start a compute process on GPU `gpu` (its first MIG device when MIG is on)."""
        nvml = Nvml(SimNvml(self.state))
        nvml.init()
        migs = read_inventory(nvml).gpu(gpu).mig_devices
        nvml.shutdown()
        if migs:
            return start_process(self.state, gpu, migs[0].gi_id, migs[0].ci_id)
        return start_process(self.state, gpu)

    def labels(self) -> dict[str, str]:
        """The MIG job labels in the node labels file the daemon writes."""
        lines = self.labels_file.read_text().splitlines()
        pairs = dict(line.split("=", 1) for line in lines)
        return {k: v for k, v in pairs.items() if k.startswith("nvidia.com/mig.config")}

    def mig_jobs_counted(self, result: str) -> float:
        """gpushare_mig_reconfigurations_total{result} as /metrics shows it."""
        assert self.daemon is not None
        text = self.daemon.metrics.exposition().decode()
        line = f'gpushare_mig_reconfigurations_total{{result="{result}"}} '
        return float(next(x for x in text.splitlines() if x.startswith(line)).split()[-1])

    def wait_done(self, job_id: int) -> JobRecord:
        return self.runner.watch(job_id, lambda _line: None, timeout_s=30)


def eventually(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll a condition another thread makes true (every 10 ms)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.fixture
def node(tmp_path: Path, kubelet_dir: Path, mps_root: Path) -> Iterator[Node]:
    with short_dir("gs-mjc-") as sockets:
        made = Node(tmp_path, kubelet_dir, sockets / "control.sock", mps_root)
        yield made
        if made.daemon is not None:
            made.daemon.stop()


def test_one_job_at_a_time_labels_and_listeners(node: Node, kubelet: FakeKubelet) -> None:
    """A second request while a job drains is refused naming it; labels go pending -> success;
    listeners hear the ended job once."""
    node.apply("all-2g.10gb")
    pid = node.process_on(0)
    node.start(MIXED + "migReconfiguration: {drainTimeout: 30s}\n")
    heard: list[JobRecord] = []
    node.runner.add_result_listener(heard.append)
    kubelet.wait_for_list(OLD, lambda x: len(x.healthy_ids) == 24)
    job = node.runner.submit("all-1g.5gb", text=EXAMPLE.read_text(), file_name="example.yaml")
    kubelet.wait_for_list(OLD, lambda x: len(x.unhealthy_ids) == 24)
    assert node.labels() == {CONFIG_LABEL: "all-1g.5gb", STATE_LABEL: "pending"}
    with pytest.raises(JobRefused, match=f"job {job.id} \\(config all-1g.5gb, draining\\) is "
                       "running; one job runs at a time"):
        node.runner.submit("all-disabled", text=EXAMPLE.read_text())
    stop_process(node.state, 0, pid=pid)
    done = node.wait_done(job.id)
    assert done.result == "success"
    kubelet.wait_for_list(NEW, lambda x: len(x.healthy_ids) == 56)
    assert node.labels() == {CONFIG_LABEL: "all-1g.5gb", STATE_LABEL: "success"}
    assert [(r.id, r.result) for r in heard] == [(job.id, "success")]
    assert (node.mig_jobs_counted("success"), node.mig_jobs_counted("failed")) == (1, 0)


def test_a_waiting_client_that_went_away_frees_its_slot_during_a_silent_drain(
    node: Node, kubelet: FakeKubelet
) -> None:
    """`mig reconfigure --wait` closed mid-drain (the drain says nothing for up to its timeout)
    gives its control slot back within seconds: with the other slots taken by idle clients,
    `status` is answered while the job still drains. A waiting client that stays connected
    gets its final answer."""
    node.apply("all-2g.10gb")
    pid = node.process_on(2)
    node.start(MIXED)  # drainTimeout 300 s
    kubelet.wait_for_list(OLD, lambda x: len(x.healthy_ids) == 24)
    request = {"op": "reconfigure", "config": "all-1g.5gb", "wait": True,
               "file_text": EXAMPLE.read_text()}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone:
        gone.settimeout(10)
        gone.connect(str(node.socket))
        gone.sendall(json.dumps(request).encode() + b"\n")
        with gone.makefile("rb") as lines:
            while not json.loads(lines.readline())["message"].startswith("waiting for process"):
                pass  # the last line until the process ends: from here on the drain is silent
        time.sleep(0.2)
    idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(MAX_CONNECTIONS - 1)]
    try:
        for sock in idle:  # each holds a slot until the request timeout (5 s)
            sock.connect(str(node.socket))
        deadline = time.monotonic() + 3.0
        answer = call(node.socket, {"op": "status"})
        while answer.get("ok") is not True and time.monotonic() < deadline:
            time.sleep(0.1)
            answer = call(node.socket, {"op": "status"})
        assert answer.get("ok") is True, answer
        assert answer["current"]["phase"] == "draining"
    finally:
        for sock in idle:
            sock.close()
    stop_process(node.state, 2, pid=pid)
    assert node.wait_done(answer["current"]["id"]).result == "success"

    pid = node.process_on(4)
    events: list[dict] = []
    answers: list[dict] = []
    back = dict(request, config="all-2g.10gb")
    waiter = threading.Thread(target=lambda: answers.append(
        call(node.socket, back, on_event=events.append, timeout_s=None)))
    waiter.start()
    eventually(lambda: len(events) >= 1)
    time.sleep(2.5)  # the handler checks its client while the drain is silent
    stop_process(node.state, 4, pid=pid)
    waiter.join(30)
    [answer] = answers
    assert answer["ok"] is True
    assert (answer["job"]["config"], answer["job"]["result"]) == ("all-2g.10gb", "success")


def test_mig_parted_files_are_parsed_outside_the_daemon_process(
    node: Node, kubelet: FakeKubelet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the YAML parser of the daemon's process disabled, requests still get the parser's
    errors and a job runs to success (planned and verified): the mig-parted file is parsed in
    the config reader's child, and the daemon's threads only plan."""
    node.start(MIXED)
    kubelet.wait_for(lambda: kubelet.resources() == ["nvidia.com/gpu"])

    def parsed_here(*_args: object, **_kwargs: object) -> object:
        raise AssertionError("a mig-parted file was parsed in the daemon's own process")

    monkeypatch.setattr("sharing.mig.parted.parse_yaml", parsed_here)
    text = EXAMPLE.read_text()
    bad = call(node.socket, {"op": "reconfigure", "config": "x", "file_text": "version: v2\n",
                             "file_name": "/etc/mig.yaml"})
    assert bad == {"ok": False, "error": '/etc/mig.yaml: version: must be "v1", got "v2"'}
    unknown = call(node.socket, {"op": "reconfigure", "config": "nope", "file_text": text})
    assert unknown["error"].startswith('<request>: no config "nope" in mig-configs (has: ')
    done = call(node.socket, {"op": "reconfigure", "config": "all-1g.5gb", "file_text": text,
                              "wait": True}, timeout_s=60)
    assert (done["ok"], done["job"]["result"]) == (True, "success"), done
    kubelet.wait_for_list(NEW, lambda x: len(x.healthy_ids) == 56)


def test_a_mig_parted_file_its_reader_cannot_parse_in_time_is_refused_and_serving_goes_on(
    node: Node, kubelet: FakeKubelet
) -> None:
    """The reader's child is past its time limit (here: one that never answers): the request is
    refused with one line naming the file, nothing is drained, and the daemon answers on."""
    node.start(MIXED)
    kubelet.wait_for(lambda: kubelet.resources() == ["nvidia.com/gpu"])
    node.runner.engine.close()
    node.runner.engine = MigEngine(ConfigReader(command=STUCK, timeout_s=0.5))
    answer = call(node.socket, {"op": "reconfigure", "config": "all-1g.5gb",
                                "file_text": EXAMPLE.read_text(), "file_name": "/etc/mig.yaml"})
    assert answer == {"ok": False, "error": "/etc/mig.yaml: reading the mig-parted file took "
                      "longer than 0.5s or stopped its reader; nothing was applied"}
    status = call(node.socket, {"op": "status"})
    assert status["current"] is None
    assert status["jobs"][-1]["reason"] == f"refused: {answer['error']}"
    assert len(kubelet.latest("nvidia.com/gpu").healthy_ids) == 8  # type: ignore[union-attr]


def test_refused_request_leaves_labels(node: Node, kubelet: FakeKubelet) -> None:
    """A refused plan is in the history, but the labels still describe the last real job."""
    node.start(MIXED)
    kubelet.wait_for(lambda: kubelet.resources() == ["nvidia.com/gpu"])
    first = node.runner.submit("all-1g.5gb", text=EXAMPLE.read_text())
    assert node.wait_done(first.id).result == "success"
    with pytest.raises(JobRefused, match='no config "nope"'):
        node.runner.submit("nope", text=EXAMPLE.read_text())
    assert [(j.config, j.result, j.refused) for j in node.runner.store.jobs()] == [
        ("all-1g.5gb", "success", False), ("nope", "failed", True)
    ]
    assert node.labels() == {CONFIG_LABEL: "all-1g.5gb", STATE_LABEL: "success"}


def test_drain_timeout_labels_failed(node: Node, kubelet: FakeKubelet) -> None:
    """A job that fails its drain sets the state label to failed; the devices are Healthy."""
    node.apply("all-2g.10gb")
    node.process_on(3)
    node.start(MIXED + "migReconfiguration: {drainTimeout: 200ms}\n")
    kubelet.wait_for_list(OLD, lambda x: len(x.healthy_ids) == 24)
    job = node.runner.submit("all-1g.5gb", text=EXAMPLE.read_text())
    done = node.wait_done(job.id)
    assert done.result == "failed"
    assert "processes still running after 0.2 s: GPU 3: pid" in done.reason
    assert node.labels() == {CONFIG_LABEL: "all-1g.5gb", STATE_LABEL: "failed"}
    assert (node.mig_jobs_counted("success"), node.mig_jobs_counted("failed")) == (0, 1)
    kubelet.wait_for_list(OLD, lambda x: len(x.healthy_ids) == 24)  # the stream is async


def test_kill_processes_after_the_drain_timeout(node: Node, kubelet: FakeKubelet) -> None:
    """With killProcesses the processes still there at the timeout are ended; the job goes on."""
    node.apply("all-2g.10gb")
    node.process_on(1)
    node.process_on(5)
    node.start(MIXED + "migReconfiguration: {drainTimeout: 100ms, killProcesses: true}\n")
    kubelet.wait_for_list(OLD, lambda x: len(x.healthy_ids) == 24)
    job = node.runner.submit("all-1g.5gb", text=EXAMPLE.read_text())
    assert node.wait_done(job.id).result == "success"
    nvml = Nvml(SimNvml(node.state))
    nvml.init()
    assert all(not g.processes for g in read_inventory(nvml).gpus)
    nvml.shutdown()
    kubelet.wait_for_list(NEW, lambda x: len(x.healthy_ids) == 56)


def test_only_the_changed_gpu_is_drained(node: Node, kubelet: FakeKubelet) -> None:
    """A config that changes GPU 7 only marks GPU 7's devices; a process on GPU 0 is ignored."""
    node.process_on(0)
    node.start("version: v1\n")
    kubelet.wait_for_list("nvidia.com/gpu", lambda x: len(x.healthy_ids) == 8)
    pid = node.process_on(7)
    job = node.runner.submit("gpu7-3g", text=GPU7_3G)
    gpu7 = node.daemon.inventory.gpu(7).uuid
    kubelet.wait_for_list("nvidia.com/gpu", lambda x: x.unhealthy_ids == [gpu7])
    stop_process(node.state, 7, pid=pid)
    done = node.wait_done(job.id)
    assert done.result == "success", done.reason
    assert [(g.index, g.outcome) for g in done.gpus] == [(7, "reconfigured")]


def test_mps_daemon_of_a_changed_gpu_stops_during_the_drain(
    node: Node, kubelet: FakeKubelet
) -> None:
    """gpushare's MPS daemon serving a GPU the job changes is stopped while draining (its MPS
    server would count as a compute process) and runs again once the new Plan is served."""
    node.start("version: v1\nsharing: {mps: {resources: [{name: nvidia.com/gpu, replicas: 2}]}}\n")
    supervisor = node.daemon.mps_supervisor
    kubelet.wait_for_list("nvidia.com/gpu", lambda x: len(x.healthy_ids) == 16)
    assert supervisor.daemon("nvidia.com/gpu") is not None
    pid = node.process_on(7)
    job = node.runner.submit("gpu7-3g", text=GPU7_3G)
    kubelet.wait_for_list("nvidia.com/gpu", lambda x: len(x.unhealthy_ids) == 16)
    eventually(lambda: supervisor.daemon("nvidia.com/gpu") is None)
    stop_process(node.state, 7, pid=pid)
    assert node.wait_done(job.id).result == "success"
    kubelet.wait_for_list("nvidia.com/gpu", lambda x: len(x.healthy_ids) == 16, timeout_s=15)
    assert supervisor.healthy() == {"nvidia.com/gpu": True}  # Healthy only once MPS runs


def test_daemon_stop_during_the_drain(node: Node, kubelet: FakeKubelet) -> None:
    """Stopping the daemon ends a draining job as failed, nothing touched, nothing left active."""
    node.apply("all-2g.10gb")
    node.process_on(2)
    daemon = node.start(MIXED)
    kubelet.wait_for_list(OLD, lambda x: len(x.healthy_ids) == 24)
    job = node.runner.submit("all-1g.5gb", text=EXAMPLE.read_text())
    kubelet.wait_for_list(OLD, lambda x: len(x.unhealthy_ids) == 24)
    runner = node.runner
    daemon.stop()
    node.daemon = None
    [record] = runner.store.jobs()
    assert (record.id, record.result) == (job.id, "failed")
    assert record.reason == "drain: the daemon is stopping; nothing was changed"
    assert not runner.store.active_path.exists()
    assert not runner.store.journal_path.exists()


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        pytest.param({"op": "reconfigure"}, "bad request: config is required", id="no config"),
        pytest.param({"op": "reconfigure", "config": ""},
                     "bad request: config must be a non-empty string", id="empty config"),
        pytest.param({"op": "reconfigure", "config": 7},
                     "bad request: config must be a non-empty string", id="config not a string"),
        pytest.param({"op": "reconfigure", "config": "a", "wait": "yes"},
                     "bad request: wait must be true or false", id="wait not a bool"),
        pytest.param({"op": "reconfigure", "config": "a", "force": True},
                     "bad request: unknown field force (allowed: config, file_name, file_text, "
                     "op, wait)", id="unknown field"),
        pytest.param({"op": "reconfigure", "config": "x" * 200},
                     "bad request: config is longer than 128 characters", id="long config"),
        pytest.param({"op": "reconfigure", "config": "a"},
                     "no mig-parted file: pass -f FILE or set migReconfiguration.configFile",
                     id="no file anywhere"),
        pytest.param({"op": "reconfigure", "config": "a", "file_text": "version: v2\n"},
                     'version: must be "v1"', id="bad mig-parted text"),
        pytest.param({"op": "status", "verbose": True},
                     "bad request: unknown field verbose (allowed: op)", id="status field"),
    ],
)
def test_control_requests_are_checked(
    node: Node, kubelet: FakeKubelet, request_: dict, error: str
) -> None:
    """A malformed request gets ok=false and one line; the daemon still answers status."""
    node.start(MIXED)
    answer = call(node.socket, request_)
    assert answer["ok"] is False
    assert error in answer["error"]
    assert "\n" not in answer["error"]
    assert call(node.socket, {"op": "status"})["ok"] is True


def test_killed_mig_apply_is_rolled_forward_by_the_daemon(
    node: Node, kubelet: FakeKubelet
) -> None:
    """`gpushare mig apply` killed after 9 journal writes into the daemon's journal: the daemon
    finishes it before serving and records it as a job of source restart."""
    node.state_dir.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "plugin.cli", "mig", "apply", "-f", str(EXAMPLE), "-c",
         "all-3g.20gb", "--node", str(node.state), "--journal",
         str(node.state_dir / JOURNAL_FILE), "--fault-kill-after-step", "9"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == -9, done.stderr
    node.start(MIXED)
    kubelet.wait_for_list("nvidia.com/mig-3g.20gb", lambda x: len(x.healthy_ids) == 16)
    [job] = node.runner.store.jobs()
    assert (job.source, job.result, job.config) == ("restart", "success", "all-3g.20gb")
    assert job.reason == "rolled forward the interrupted apply of all-3g.20gb"


def test_history_is_bounded_persisted_and_survives_corruption(tmp_path: Path) -> None:
    """The store keeps the last N jobs across reopenings; an unreadable file is set aside."""
    from plugin.daemon.mig_history import JobStore

    store = JobStore(tmp_path / "s", keep=3)
    store.open()
    for _ in range(5):
        store.save(JobRecord(store.new_id(), "c", "request", "f", 1.0).finished("success", "ok"))
    again = JobStore(tmp_path / "s", keep=3)
    again.open()
    assert [j.id for j in again.jobs()] == [3, 4, 5]
    assert again.new_id() == 6
    again.save(JobRecord(9, "c", "request", "f", 1.0).finished("failed", "from an active file"))
    assert again.new_id() == 10  # an id a previous daemon handed out is never reused
    again.history_path.write_text("{not json")
    third = JobStore(tmp_path / "s", keep=3)
    third.open()
    assert third.jobs() == ()
    assert (tmp_path / "s" / "mig-jobs.json.corrupt").read_text() == "{not json"




MPS_ON_ALL = "version: v1\nsharing: {mps: {resources: [{name: nvidia.com/gpu, replicas: 2}]}}\n"


def test_reload_during_the_drain_keeps_the_mps_daemon_stopped(
    node: Node, kubelet: FakeKubelet
) -> None:
    """A config reload (or SIGHUP) while a job drains does not start an MPS daemon on the GPU
    being drained, not even under a new resource name: its MPS server would be a compute
    process there again."""
    node.start(MPS_ON_ALL)
    supervisor = node.daemon.mps_supervisor
    kubelet.wait_for_list("nvidia.com/gpu", lambda x: len(x.healthy_ids) == 16)
    pid = node.process_on(7)
    job = node.runner.submit("gpu7-3g", text=GPU7_3G)
    eventually(lambda: supervisor.daemon("nvidia.com/gpu") is None)
    assert node.daemon.reload()
    (node.tmp_path / "config.yaml").write_text(MPS_ON_ALL.replace(
        "replicas: 2", "replicas: 2, rename: nvidia.com/gpu.shared"))
    assert node.daemon.reload()
    assert node.daemon.plan.resource("nvidia.com/gpu.shared") is not None
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert supervisor.healthy() == {}, "MPS daemon started mid-drain"
        time.sleep(0.02)
    stop_process(node.state, 7, pid=pid)
    assert node.wait_done(job.id).result == "success"
    kubelet.wait_for_list("nvidia.com/gpu.shared", lambda x: len(x.healthy_ids) == 16,
                          timeout_s=15)
    eventually(lambda: supervisor.daemon("nvidia.com/gpu.shared") is not None)


def test_reload_during_the_apply_serves_no_half_made_device_healthy(
    node: Node, kubelet: FakeKubelet
) -> None:
    """A reload (config edit, SIGHUP) while the job is half-way through the node may list the
    instances made so far, but none Healthy until the job has verified its layout: the kubelet
    must not place pods on GPUs still being repartitioned."""
    node.apply("all-2g.10gb")
    lib = GatedSim(node.state)
    lib.pause_at(7, 2)  # GPUs 0-6 done, GPU 7 has one 1g.5gb
    node.start(MIXED, lib=lib)
    kubelet.wait_for_list(OLD, lambda x: len(x.healthy_ids) == 24)
    job = node.runner.submit("all-1g.5gb", text=EXAMPLE.read_text())
    assert lib.paused.wait(15)
    try:
        assert node.daemon.reload()
        half = kubelet.wait_for_list(NEW, lambda x: len(x.devices) == 7 * 7 + 1)
        assert half.healthy_ids == []
    finally:
        lib.release()
    assert node.wait_done(job.id).result == "success"
    kubelet.wait_for_list(NEW, lambda x: len(x.healthy_ids) == 56)


def test_apply_failing_on_one_gpu_names_it_and_serves_what_is_there(
    node: Node, kubelet: FakeKubelet
) -> None:
    """The driver refuses GPU 3's second instance: the other GPUs are reconfigured, GPU 3 is
    reported failed with its index and the NVML error, and the kubelet gets GPU 3's devices as
    they really are (one 1g.5gb), none that do not exist."""
    node.apply("all-2g.10gb")
    lib = GatedSim(node.state)
    lib.fail_at(3, 2, pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES)
    node.start(MIXED, lib=lib)
    kubelet.wait_for_list(OLD, lambda x: len(x.healthy_ids) == 24)
    job = node.runner.submit("all-1g.5gb", text=EXAMPLE.read_text())
    done = node.wait_done(job.id)
    assert done.result == "failed"
    assert "GPU 3" in done.reason, done.reason
    assert "NVML_ERROR_INSUFFICIENT_RESOURCES" in done.reason, done.reason
    outcomes = {g.index: g.outcome for g in done.gpus}
    assert outcomes == {**{i: "reconfigured" for i in range(8) if i != 3}, 3: "failed"}
    [failed] = [g for g in done.gpus if g.index == 3]
    assert "NVML_ERROR_INSUFFICIENT_RESOURCES" in failed.detail
    served = kubelet.wait_for_list(NEW, lambda x: len(x.healthy_ids) == 50)
    assert len(served.devices) == 50
    inventory = node.daemon.inventory
    assert len(inventory.gpu(3).mig_devices) == 1
    kubelet.wait_for(lambda: OLD not in kubelet.streaming(), timeout_s=10)
    assert node.labels() == {CONFIG_LABEL: "all-1g.5gb", STATE_LABEL: "failed"}


def _cron_in(seconds: float) -> str:
    """A six-field cron expression for the local time `seconds` from now."""
    at = datetime.now() + timedelta(seconds=seconds)
    return f"{at.second} {at.minute} {at.hour} * * *"


def test_schedule_fire_while_a_job_runs_is_skipped_and_recorded(
    node: Node, kubelet: FakeKubelet
) -> None:
    """A schedule entry firing while a requested job drains does not start a job: `mig status`
    shows the skipped fire, naming the running job, once however often the entry fires during
    it, and the running job goes on unharmed (its active-job file stays, labels pending)."""
    node.apply("all-2g.10gb")
    pid = node.process_on(0)
    node.start(MIXED + f"""migReconfiguration:
  configFile: {EXAMPLE}
  drainTimeout: 30s
  schedule: [{{cron: "{_cron_in(2)}", config: all-3g.20gb}}]
""")
    kubelet.wait_for_list(OLD, lambda x: len(x.healthy_ids) == 24)
    job = node.runner.submit("all-1g.5gb", text=EXAMPLE.read_text())
    store = node.runner.store
    eventually(lambda: any(j.source == "schedule" for j in store.jobs()), timeout_s=15)
    [skipped] = [j for j in store.jobs() if j.source == "schedule"]
    assert (skipped.config, skipped.result, skipped.refused) == ("all-3g.20gb", "failed", True)
    assert skipped.reason.startswith(f"schedule skipped: job {job.id} (config all-1g.5gb, "
                                     "draining) is running"), skipped.reason
    assert store.active_path.exists()
    assert node.labels() == {CONFIG_LABEL: "all-1g.5gb", STATE_LABEL: "pending"}
    with pytest.raises(JobRefused, match=f"job {job.id} .* is running"):
        node.runner.submit("all-3g.20gb", source="schedule")  # the entry fires again
    assert [j.id for j in store.jobs() if j.source == "schedule"] == [skipped.id]
    stop_process(node.state, 0, pid=pid)
    assert node.wait_done(job.id).result == "success"
    kubelet.wait_for_list(NEW, lambda x: len(x.healthy_ids) == 56)
    assert node.labels() == {CONFIG_LABEL: "all-1g.5gb", STATE_LABEL: "success"}


def test_schedule_log_names_its_time_zone_and_next_runs(caplog: pytest.LogCaptureFixture) -> None:
    """The cron times are local times: the log line naming the entries says in which zone and
    when each fires next; emptying the schedule is logged too."""
    scheduler = MigScheduler(cast(MigJobRunner, None), timezone=ZoneInfo("Asia/Tokyo"))
    entries = (MigScheduleEntry(cron="0 20 * * 1-5", config="all-1g.5gb"),)
    with caplog.at_level(logging.INFO, logger="gpushare.mig.schedule"):
        scheduler.set_entries(entries)
        scheduler.set_entries(())
    first, second = (r.getMessage() for r in caplog.records)
    assert re.fullmatch(r"MIG schedule in time zone Asia/Tokyo: 0 20 \* \* 1-5 -> all-1g\.5gb "
                        r"\(next \d{4}-\d\d-\d\dT20:00:00\+09:00\)", first), first
    assert second == "MIG schedule in time zone Asia/Tokyo: no entries"


def test_unchanged_gpus_never_blip_and_the_sends_are_few(node: Node, kubelet: FakeKubelet) -> None:
    """A job changing GPU 7 only: every list of nvidia.com/gpu keeps GPUs 0-6 Healthy; the
    kubelet gets GPU 7 Unhealthy, then the list without it, then the new resource, all Healthy."""
    node.start(MIXED)
    kubelet.wait_for_list("nvidia.com/gpu", lambda x: len(x.healthy_ids) == 8)
    others = {g.uuid for g in node.daemon.inventory.gpus if g.index != 7}
    gpu7 = node.daemon.inventory.gpu(7).uuid
    job = node.runner.submit("gpu7-3g", text=GPU7_3G)
    assert node.wait_done(job.id).result == "success"
    kubelet.wait_for_list("nvidia.com/mig-3g.20gb", lambda x: len(x.healthy_ids) == 2)
    time.sleep(0.3)  # room for a late extra send
    sends = kubelet.lists("nvidia.com/gpu")
    assert all(others <= set(x.healthy_ids) for x in sends)
    assert [(sorted(x.healthy_ids) == sorted(others), x.unhealthy_ids) for x in sends] == [
        (False, []), (True, [gpu7]), (True, [])]
    new = kubelet.lists("nvidia.com/mig-3g.20gb")
    assert [(len(x.healthy_ids), len(x.unhealthy_ids)) for x in new] == [(2, 0)]


def test_mps_daemon_comes_back_when_the_drain_fails(node: Node, kubelet: FakeKubelet) -> None:
    """A drain that times out restarts the MPS daemon it stopped, and the devices are Healthy."""
    node.start(MPS_ON_ALL + "migReconfiguration: {drainTimeout: 300ms}\n")
    supervisor = node.daemon.mps_supervisor
    kubelet.wait_for_list("nvidia.com/gpu", lambda x: len(x.healthy_ids) == 16)
    node.process_on(7)
    job = node.runner.submit("gpu7-3g", text=GPU7_3G)
    done = node.wait_done(job.id)
    assert done.result == "failed"
    assert "GPU 7: pid" in done.reason
    eventually(lambda: supervisor.daemon("nvidia.com/gpu") is not None)
    assert node.daemon.mps_held == frozenset()
    kubelet.wait_for_list("nvidia.com/gpu", lambda x: len(x.healthy_ids) == 16, timeout_s=15)


def test_job_ending_while_the_config_file_is_broken_serves_the_new_devices(
    node: Node, kubelet: FakeKubelet
) -> None:
    """The config file is broken (a reload failed and the last good config serves) when a job
    ends: the job still serves the node as it now is, with the config in effect, and succeeds;
    the MIG devices it destroyed are not advertised (no phantom devices)."""
    node.apply("all-2g.10gb")
    pid = node.process_on(0)
    node.start(MIXED + "migReconfiguration: {drainTimeout: 30s}\n")
    kubelet.wait_for_list(OLD, lambda x: len(x.healthy_ids) == 24)
    job = node.runner.submit("all-1g.5gb", text=EXAMPLE.read_text())
    kubelet.wait_for_list(OLD, lambda x: len(x.unhealthy_ids) == 24)
    failures = node.daemon.reload_failures
    (node.tmp_path / "config.yaml").write_text("version: v1\nflags: {migStrategy: maybe}\n")
    eventually(lambda: node.daemon.reload_failures > failures)
    stop_process(node.state, 0, pid=pid)
    done = node.wait_done(job.id)
    assert (done.result, done.reason) == ("success", "applied all-1g.5gb")
    kubelet.wait_for_list(NEW, lambda x: len(x.healthy_ids) == 56)
    kubelet.wait_for(lambda: OLD not in kubelet.streaming(), timeout_s=10)
    assert node.daemon.plan.resource(OLD) is None


def test_a_layout_the_config_cannot_serve_leaves_no_phantom_device_healthy(
    node: Node, kubelet: FakeKubelet
) -> None:
    """migStrategy single and a job to a mixed layout: the new node cannot be served with this
    config. The job fails saying why, the destroyed devices stay Unhealthy at the kubelet (not
    advertised Healthy as if they still existed) until a config that serves the node is loaded."""
    node.apply("all-1g.5gb")
    node.start("version: v1\nflags: {migStrategy: single}\n")
    kubelet.wait_for_list("nvidia.com/gpu", lambda x: len(x.healthy_ids) == 56)
    job = node.runner.submit("all-balanced", text=EXAMPLE.read_text())
    done = node.wait_done(job.id)
    assert done.result == "failed"
    assert done.reason.startswith("the new layout cannot be served with the config in effect: "
                                  ), done.reason
    assert "migStrategy single" in done.reason, done.reason
    assert done.reason.endswith("the devices it replaced stay Unhealthy until a config that "
                                "serves the node is loaded"), done.reason
    assert {g.outcome for g in done.gpus} == {"reconfigured"}
    time.sleep(0.3)  # room for a wrong Healthy list to arrive
    sends = kubelet.lists("nvidia.com/gpu")
    drained = next(i for i, x in enumerate(sends) if len(x.unhealthy_ids) == 56)
    assert [len(x.healthy_ids) for x in sends[drained:]] == [0] * (len(sends) - drained)
    (node.tmp_path / "config.yaml").write_text(MIXED)
    kubelet.wait_for_list("nvidia.com/mig-3g.20gb", lambda x: len(x.healthy_ids) == 8,
                          timeout_s=15)
    kubelet.wait_for(lambda: "nvidia.com/gpu" not in kubelet.streaming(), timeout_s=15)


def test_a_schedule_fire_refused_before_planning_is_in_the_history(
    node: Node, kubelet: FakeKubelet
) -> None:
    """The schedule fires but configFile is gone: the refusal is in `mig status` (nobody waits
    for a scheduled job's answer), naming the file; nothing is touched."""
    missing = node.tmp_path / "moved-away.yaml"
    node.start(MIXED + f"""migReconfiguration:
  configFile: {missing}
  schedule: [{{cron: "{_cron_in(2)}", config: all-1g.5gb}}]
""")
    kubelet.wait_for(lambda: kubelet.resources() == ["nvidia.com/gpu"])
    store = node.runner.store
    eventually(lambda: bool(store.jobs()), timeout_s=15)
    [job] = store.jobs()
    assert (job.source, job.config, job.result, job.refused) == (
        "schedule", "all-1g.5gb", "failed", True)
    assert job.file == str(missing)
    assert job.reason.startswith(f"refused: {missing}: "), job.reason
    assert node.labels() == {}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(None, "no MIG job history (no job has run with this state directory)",
                     id="none"),
        pytest.param("{not json", "not JSON", id="not JSON"),
        pytest.param('{"version": 9, "jobs": [], "next_id": 1}', "not a version 1 job history",
                     id="other version"),
        pytest.param('{"version": 1, "jobs": [{"id": 1}], "next_id": 2}', "not a job record",
                     id="not a record"),
    ],
)
def test_mig_status_from_a_state_directory_names_what_it_cannot_read(
    tmp_path: Path, content: str | None, expected: str
) -> None:
    """`mig status --state-dir DIR`: one line naming the history file, exit 1, and the file
    (a corrupt one too) left where it is: reading never moves it aside as a daemon would."""
    history = tmp_path / "mig-jobs.json"
    if content is not None:
        history.write_text(content)
    done = subprocess.run(
        [sys.executable, "-m", "plugin.cli", "mig", "status", "--state-dir", str(tmp_path)],
        cwd=ROOT, env=checkout_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith(f"gpushare mig status: {history}: "), line
    assert expected in line, line
    assert (history.read_text() if content is not None else None) == content
    both = subprocess.run(
        [sys.executable, "-m", "plugin.cli", "mig", "status", "--state-dir", str(tmp_path),
         "--node", str(tmp_path)],
        cwd=ROOT, env=checkout_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert both.returncode == 2
    assert "does not go with --node or --control-socket" in both.stderr
