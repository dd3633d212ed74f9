"""MIG reconfiguration jobs end to end: `gpushare run` as its own process on a simulated DGX A100,
the kubelet stand-in over real unix sockets, `gpushare mig reconfigure|status` as processes.

The node starts as all-2g.10gb (24 `nvidia.com/mig-2g.10gb` devices); jobs take it to all-1g.5gb
(56 `nvidia.com/mig-1g.5gb`). The daemon is never restarted, except where a test kills it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from plugin.daemon.mig_history import JOURNAL_FILE
from sharing.nvml import Nvml, read_inventory
from sharing.nvml.mig_apply import apply_mig, plan_mig
from sharing.nvml.sim import SimNvml, create_state, start_process, stop_process
from tests.fakes.kubelet import FakeKubelet
from tests.fakes.sockets import short_dir

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "tests" / "data" / "compat" / "mig-parted" / "example-config.yaml"
OLD, NEW = "nvidia.com/mig-2g.10gb", "nvidia.com/mig-1g.5gb"
MIXED = "version: v1\nflags: {migStrategy: mixed}\n"


def child_env() -> dict[str, str]:
    """The environment of a child gpushare, read when it is spawned (conftest's settings in)."""
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def gpushare(
    *args: str, timeout_s: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a gpushare command as its own process (`env`: variables added to its environment)."""
    return subprocess.run([sys.executable, "-m", "plugin.cli", *args], cwd=ROOT,
                          env={**child_env(), **(env or {})}, capture_output=True, text=True,
                          timeout=timeout_s)


def apply_layout(state: Path, config: str, journal: Path) -> None:
    """Put the simulated node in a layout of the example file (as an operator would have)."""
    nvml = Nvml(SimNvml(state))
    nvml.init()
    try:
        result = apply_mig(nvml, plan_mig(nvml, EXAMPLE, config), journal_path=journal)
        assert result.ok
    finally:
        nvml.shutdown()


class Node:
    """A simulated node served by a `gpushare run` process, and its kubelet stand-in."""

    def __init__(self, base: Path, kubelet_dir: Path, kubelet: FakeKubelet) -> None:
        self.state = base / "node"
        self.config = base / "config.yaml"
        self.state_dir = base / "state"
        self.socket = base / "control.sock"
        self.labels_file = base / "features.d" / "gfd"
        self.kubelet_dir = kubelet_dir
        self.kubelet = kubelet
        self.process: subprocess.Popen[str] | None = None
        create_state("dgx-a100", self.state)
        apply_layout(self.state, "all-2g.10gb", base / "setup-journal.json")

    @property
    def journal(self) -> Path:
        return self.state_dir / JOURNAL_FILE

    def start(self, config: str = MIXED) -> subprocess.Popen[str]:
        self.config.write_text(config)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "plugin.cli", "run", "--node", str(self.state),
             "--config", str(self.config), "--kubelet-dir", str(self.kubelet_dir),
             "--control-socket", str(self.socket), "--state-dir", str(self.state_dir),
             "--labels-file", str(self.labels_file)],
            cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        return self.process

    def stop(self) -> str:
        """SIGTERM the daemon; its output."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        output, _ = self.process.communicate(timeout=20)
        return output

    def reconfigure(self, *args: str) -> subprocess.CompletedProcess[str]:
        return gpushare("mig", "reconfigure", "--control-socket", str(self.socket), *args)

    def status(self) -> dict:
        done = gpushare("mig", "status", "--control-socket", str(self.socket), "--format", "json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def mig_labels(self) -> list[str]:
        """The MIG job lines of the node labels file the daemon writes."""
        lines = self.labels_file.read_text().splitlines()
        return [x for x in lines if x.startswith("nvidia.com/mig.config")]

    def asserts(self, config: str) -> subprocess.CompletedProcess[str]:
        return gpushare("mig", "assert", "-f", str(EXAMPLE), "-c", config,
                        "--node", str(self.state))

    def wait_serving(self, resource: str, count: int) -> None:
        """Until `resource` streams `count` Healthy devices (the daemon must stay up)."""
        assert self.process is not None
        process = self.process

        def ready() -> bool:
            latest = self.kubelet.latest(resource)
            return process.poll() is not None or (
                resource in self.kubelet.streaming() and latest is not None
                and len(latest.healthy_ids) == count
            )

        self.kubelet.wait_for(ready, timeout_s=30)
        assert process.poll() is None, self.stop()


@pytest.fixture
def node(tmp_path: Path, kubelet_dir: Path, kubelet: FakeKubelet) -> Iterator[Node]:
    with short_dir("gs-mj-") as base:
        made = Node(tmp_path, kubelet_dir, kubelet)
        made.socket = base / "control.sock"
        yield made
        if made.process is not None and made.process.poll() is None:
            made.stop()


def swapped(kubelet: FakeKubelet) -> None:
    """The old resource's devices all went Unhealthy before the new resource's first list,
    and the old resource's server stopped."""
    unhealthy = [x for x in kubelet.lists(OLD) if len(x.unhealthy_ids) == 24]
    assert unhealthy, "the old MIG devices never turned Unhealthy"
    first_new = kubelet.lists(NEW)[0]
    assert unhealthy[0].at < first_new.at
    kubelet.wait_for(lambda: OLD not in kubelet.streaming(), timeout_s=10)


def test_reconfigure_wait_swaps_resources_without_restart(node: Node) -> None:
    """`mig reconfigure --wait`: old MIG devices Unhealthy, then the new ones in ListAndWatch,
    the same daemon process throughout; status and the layout agree."""
    daemon = node.start()
    node.wait_serving(OLD, 24)
    done = node.reconfigure("-c", "all-1g.5gb", "-f", str(EXAMPLE), "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "job 1 success: applied all-1g.5gb" in done.stdout
    assert "GPU 7: reconfigured (1g.5gb@0 1g.5gb@1" in done.stdout
    node.wait_serving(NEW, 56)
    swapped(node.kubelet)
    assert daemon.poll() is None  # same pid: never restarted
    assert [r.resource_name for r in node.kubelet.registrations] == [OLD, NEW]
    [job] = node.status()["jobs"]
    assert (job["config"], job["source"], job["result"]) == ("all-1g.5gb", "request", "success")
    assert {g["outcome"] for g in job["gpus"]} == {"reconfigured"}
    assert node.asserts("all-1g.5gb").returncode == 0
    assert node.mig_labels() == ["nvidia.com/mig.config=all-1g.5gb",
                                 "nvidia.com/mig.config.state=success"]


def test_cron_schedule_fires_a_job(node: Node) -> None:
    """A schedule entry added by a config reload fires at its time and swaps the resources."""
    daemon = node.start()
    node.wait_serving(OLD, 24)
    at = datetime.now() + timedelta(seconds=3)
    node.config.write_text(MIXED + f"""\
migReconfiguration:
  configFile: {EXAMPLE}
  schedule:
    - {{cron: "{at.second} {at.minute} {at.hour} * * *", config: all-1g.5gb}}
""")
    node.wait_serving(NEW, 56)
    assert datetime.now() >= at - timedelta(seconds=1)
    swapped(node.kubelet)
    assert daemon.poll() is None
    status = node.status()
    [job] = status["jobs"]
    assert (job["source"], job["result"], job["file"]) == ("schedule", "success", str(EXAMPLE))
    assert status["schedule"][0]["config"] == "all-1g.5gb"
    assert node.asserts("all-1g.5gb").returncode == 0


def test_drain_timeout_fails_and_leaves_everything(node: Node) -> None:
    """A process on GPU 0 outlasts the drain timeout: the job fails, the layout is untouched,
    the devices are Healthy again and nothing new is advertised."""
    nvml = Nvml(SimNvml(node.state))
    nvml.init()
    mig = read_inventory(nvml).gpu(0).mig_devices[0]
    nvml.shutdown()
    pid = start_process(node.state, 0, mig.gi_id, mig.ci_id)
    daemon = node.start(MIXED + "migReconfiguration: {drainTimeout: 1s}\n")
    node.wait_serving(OLD, 24)
    started = time.monotonic()
    done = node.reconfigure("-c", "all-1g.5gb", "-f", str(EXAMPLE), "--wait")
    assert done.returncode == 1, done.stdout + done.stderr
    assert time.monotonic() - started >= 1.0
    assert (f"job 1 failed: drain: processes still running after 1 s: GPU 0: pid {pid}; "
            "nothing was changed") in done.stdout
    assert [len(x.unhealthy_ids) for x in node.kubelet.lists(OLD)][-2:] == [24, 0]
    node.wait_serving(OLD, 24)
    assert NEW not in node.kubelet.resources()
    assert daemon.poll() is None
    assert node.asserts("all-2g.10gb").returncode == 0
    [job] = node.status()["jobs"]
    assert job["result"] == "failed"
    assert {g["outcome"] for g in job["gpus"]} == {"untouched"}
    assert node.mig_labels() == ["nvidia.com/mig.config=all-1g.5gb",
                                 "nvidia.com/mig.config.state=failed"]


FOREIGN_JOURNAL = "foreign"
CORRUPT_JOURNAL = "corrupt"
INFEASIBLE = """\
version: v1
mig-configs:
  two-4g:
    - devices: [2]
      mig-enabled: true
      mig-devices: {"4g.20gb": 2}
"""


def _prepare(node: Node, case: str, tmp_path: Path) -> list[str]:
    """Set up one bad-input case; the reconfigure arguments that trigger it."""
    if case == CORRUPT_JOURNAL:
        node.state_dir.mkdir(parents=True, exist_ok=True)
        node.journal.write_text('{"kind": "gpushare-mig-journal", "version": 1, "sta')
    elif case == FOREIGN_JOURNAL:
        other = tmp_path / "h100"
        create_state("hgx-h100", other)
        node.state_dir.mkdir(parents=True, exist_ok=True)
        done = gpushare("mig", "apply", "-f", str(EXAMPLE), "-c", "all-disabled",
                        "--node", str(other), "--journal", str(node.journal))
        assert done.returncode == 0, done.stderr
    elif case == "infeasible":
        path = tmp_path / "infeasible.yaml"
        path.write_text(INFEASIBLE)
        return ["-c", "two-4g", "-f", str(path)]
    elif case == "unknown config":
        return ["-c", "all-7g.40gb", "-f", str(EXAMPLE)]
    return ["-c", "all-1g.5gb", "-f", str(EXAMPLE)]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        pytest.param("unknown config", 'no config "all-7g.40gb" in mig-configs',
                     id="unknown config name"),
        pytest.param("infeasible", "GPU 2 (NVIDIA A100-SXM4-40GB): 4g.20gb",
                     id="infeasible layout"),
        pytest.param(CORRUPT_JOURNAL, "corrupt MIG journal", id="corrupt journal"),
        pytest.param(FOREIGN_JOURNAL, "MIG journal written on another node",
                     id="journal from another node"),
    ],
)
def test_bad_requests_are_refused_touching_nothing(
    node: Node, tmp_path: Path, case: str, message: str
) -> None:
    """Each bad request: exit 2 with one line naming the cause; no device ever Unhealthy, the
    layout as it was, the daemon still serving."""
    args = _prepare(node, case, tmp_path)
    daemon = node.start()
    node.wait_serving(OLD, 24)
    done = node.reconfigure(*args, "--wait")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith("gpushare mig reconfigure: ")
    assert message in line
    assert all(not x.unhealthy_ids for x in node.kubelet.lists(OLD))
    assert node.kubelet.resources() == [OLD]
    assert daemon.poll() is None
    assert node.asserts("all-2g.10gb").returncode == 0
    [job] = node.status()["jobs"]
    assert job["result"] == "failed"
    assert message in job["reason"]


def _journal_steps(path: Path) -> int:
    """Steps recorded so far by an apply that is still running (0 otherwise)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return 0
    return len(data["steps"]) if data.get("status") == "running" else 0


def test_daemon_killed_mid_job_rolls_forward_at_start(node: Node) -> None:
    """SIGKILL while the job applies; the next daemon finishes the layout before it serves."""
    node.start()
    node.wait_serving(OLD, 24)
    request = subprocess.Popen(
        [sys.executable, "-m", "plugin.cli", "mig", "reconfigure", "--control-socket",
         str(node.socket), "-c", "all-1g.5gb", "-f", str(EXAMPLE), "--wait"],
        cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    wait_until(lambda: _journal_steps(node.journal) >= 20, timeout_s=30)
    assert node.process is not None
    node.process.kill()
    node.process.wait(10)
    request.communicate(timeout=10)
    assert _journal_steps(node.journal) >= 20, "the apply was not interrupted"
    assert node.asserts("all-1g.5gb").returncode == 1  # half applied
    node.kubelet.restart()  # a new daemon, as a restarted pod: the kubelet sees it register
    node.start()
    node.wait_serving(NEW, 56)
    assert node.asserts("all-1g.5gb").returncode == 0
    [job] = node.status()["jobs"]
    assert job["result"] == "success", job
    assert "rolled forward across a daemon restart" in job["reason"]
    assert node.mig_labels() == ["nvidia.com/mig.config=all-1g.5gb",
                                 "nvidia.com/mig.config.state=success"]
    assert {g["outcome"] for g in job["gpus"]} == {"reconfigured"}


def wait_until(predicate: Callable[[], bool], timeout_s: float) -> None:
    """Poll (every 2 ms) until `predicate()` holds."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout_s} s")
        time.sleep(0.002)


def _start_request(node: Node, config: str) -> subprocess.Popen[str]:
    """`gpushare mig reconfigure --wait` as a process that runs on while the test acts."""
    return subprocess.Popen(
        [sys.executable, "-m", "plugin.cli", "mig", "reconfigure", "--control-socket",
         str(node.socket), "-c", config, "-f", str(EXAMPLE), "--wait"],
        cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_sigterm_while_draining_fails_the_job_and_the_next_start_serves_as_before(
    node: Node,
) -> None:
    """SIGTERM while the job drains: the daemon ends within seconds, the job is recorded failed
    with nothing changed, and the next daemon serves the old layout Healthy, no job resumed."""
    nvml = Nvml(SimNvml(node.state))
    nvml.init()
    mig = read_inventory(nvml).gpu(4).mig_devices[0]
    nvml.shutdown()
    start_process(node.state, 4, mig.gi_id, mig.ci_id)
    node.start(MIXED + "migReconfiguration: {drainTimeout: 60s}\n")
    node.wait_serving(OLD, 24)
    request = _start_request(node, "all-1g.5gb")
    node.kubelet.wait_for_list(OLD, lambda x: len(x.unhealthy_ids) == 24, timeout_s=30)
    started = time.monotonic()
    output = node.stop()
    assert time.monotonic() - started < 10, output
    assert node.process is not None
    assert node.process.returncode == 0, output
    answer, _ = request.communicate(timeout=10)
    assert "drain: the daemon is stopping; nothing was changed" in answer, answer
    assert node.asserts("all-2g.10gb").returncode == 0
    node.kubelet.restart()
    node.start(MIXED)
    node.wait_serving(OLD, 24)
    [job] = node.status()["jobs"]
    assert (job["result"], job["reason"]) == (
        "failed", "drain: the daemon is stopping; nothing was changed")
    assert NEW not in node.kubelet.resources()
    assert node.mig_labels() == ["nvidia.com/mig.config=all-1g.5gb",
                                 "nvidia.com/mig.config.state=failed"]


def test_sigterm_while_applying_stops_at_a_step_and_the_next_start_converges(
    node: Node,
) -> None:
    """SIGTERM while the job applies: the daemon ends after the step in progress (journalled,
    nothing orphaned) without waiting for the whole node, and the next daemon rolls the apply
    forward before serving, records the job's real outcome and serves the new MIG devices."""
    node.start()
    node.wait_serving(OLD, 24)
    request = _start_request(node, "all-1g.5gb")
    wait_until(lambda: _journal_steps(node.journal) >= 20, timeout_s=30)
    output = node.stop()
    assert node.process is not None
    assert node.process.returncode == 0, output
    request.communicate(timeout=10)
    assert "the apply stopped after its last journalled step" in output, output
    left = _journal_steps(node.journal)
    assert 20 <= left < 160, left  # stopped part-way: the whole node takes 160 steps
    assert node.asserts("all-1g.5gb").returncode == 1
    node.kubelet.restart()
    node.start()
    node.wait_serving(NEW, 56)
    assert node.asserts("all-1g.5gb").returncode == 0
    [job] = node.status()["jobs"]
    assert job["result"] == "success", job
    assert "rolled forward across a daemon restart" in job["reason"]
    assert {g["outcome"] for g in job["gpus"]} == {"reconfigured"}
    assert node.mig_labels() == ["nvidia.com/mig.config=all-1g.5gb",
                                 "nvidia.com/mig.config.state=success"]


def test_config_reload_removing_mig_reconfiguration_mid_job(node: Node) -> None:
    """The config is rewritten without `migReconfiguration` while a job drains: the schedule is
    gone at once, the job keeps the file text and drain timeout it started with and ends
    normally, and the node is served as the job left it."""
    nvml = Nvml(SimNvml(node.state))
    nvml.init()
    mig = read_inventory(nvml).gpu(6).mig_devices[0]
    nvml.shutdown()
    pid = start_process(node.state, 6, mig.gi_id, mig.ci_id)
    daemon = node.start(MIXED + f"""migReconfiguration:
  configFile: {EXAMPLE}
  drainTimeout: 60s
  schedule: [{{cron: "0 3 1 1 *", config: all-3g.20gb}}]
""")
    node.wait_serving(OLD, 24)
    started = node.reconfigure("-c", "all-1g.5gb")
    assert started.returncode == 0, started.stdout + started.stderr
    node.kubelet.wait_for_list(OLD, lambda x: len(x.unhealthy_ids) == 24, timeout_s=30)
    node.config.write_text(MIXED + "migReconfiguration: {drainTimeout: 1s}\n")
    wait_until(lambda: node.status()["schedule"] == [], timeout_s=15)
    status = node.status()
    assert status["current"]["phase"] == "draining"
    assert status["drain_timeout_s"] == 1.0
    time.sleep(1.5)  # past the new timeout: the job keeps the 60 s it started with
    assert node.status()["current"]["phase"] == "draining"
    stop_process(node.state, 6, pid=pid)
    node.wait_serving(NEW, 56)
    [job] = node.status()["jobs"]
    assert (job["result"], job["file"]) == ("success", str(EXAMPLE))
    assert daemon.poll() is None


def test_sigkill_while_draining_is_recorded_failed_at_the_next_start(node: Node) -> None:
    """SIGKILL while the job drains (no chance to clean up): the next daemon records the job
    failed with nothing changed, serves the old devices Healthy and can run the next job, whose
    id is new (the history keeps both); `mig status` lists them newest first."""
    nvml = Nvml(SimNvml(node.state))
    nvml.init()
    mig = read_inventory(nvml).gpu(1).mig_devices[0]
    nvml.shutdown()
    pid = start_process(node.state, 1, mig.gi_id, mig.ci_id)
    node.start(MIXED + "migReconfiguration: {drainTimeout: 60s}\n")
    node.wait_serving(OLD, 24)
    request = _start_request(node, "all-1g.5gb")
    node.kubelet.wait_for_list(OLD, lambda x: len(x.unhealthy_ids) == 24, timeout_s=30)
    assert node.process is not None
    node.process.kill()
    node.process.wait(10)
    request.communicate(timeout=10)
    node.kubelet.restart()
    node.start(MIXED)
    node.wait_serving(OLD, 24)
    [job] = node.status()["jobs"]
    assert (job["result"], job["reason"]) == (
        "failed", "the daemon stopped while the job was draining; nothing was changed")
    assert node.asserts("all-2g.10gb").returncode == 0
    stop_process(node.state, 1, pid=pid)
    done = node.reconfigure("-c", "all-1g.5gb", "-f", str(EXAMPLE), "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    node.wait_serving(NEW, 56)
    table = gpushare("mig", "status", "--control-socket", str(node.socket), env={"TZ": "UTC"})
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[:3] == ["config file: (none; requests must pass -f FILE)",
                         "drain timeout: 300 s, kill processes: no", "schedule: (none)"]
    assert len(lines) == 7, table.stdout
    head, newest, oldest = lines[4:]
    assert head.split() == ["JOB", "CONFIG", "SOURCE", "STARTED", "TOOK", "RESULT", "GPUS",
                            "REASON"]
    assert re.fullmatch(r"2 +all-1g\.5gb +request +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC +"
                        r"[\d.]+ s +success +0-7 reconfigured +applied all-1g\.5gb", newest), newest
    assert re.fullmatch(r"1 +all-1g\.5gb +request +.* UTC +[\d.]+ s +failed +0-7 untouched +"
                        r"the daemon stopped while the job was draining; nothing was changed",
                        oldest), oldest

    # With the daemon stopped, the history it left is read from its state directory, unchanged.
    node.stop()
    history = node.state_dir / "mig-jobs.json"
    before = history.read_bytes()
    down = gpushare("mig", "status", "--control-socket", str(node.socket))
    assert down.returncode == 1
    assert "`--state-dir DIR` shows the history it left" in down.stderr, down.stderr
    offline = gpushare("mig", "status", "--state-dir", str(node.state_dir), env={"TZ": "UTC"})
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout.splitlines() == [
        f"job history from {node.state_dir} (read from disk: no daemon was asked; a job shown"
        " running was interrupted and the next start finishes it)", *lines[3:]]
    assert history.read_bytes() == before
    as_json = json.loads(gpushare("mig", "status", "--state-dir", str(node.state_dir),
                                  "--format", "json").stdout)
    assert [j["result"] for j in as_json["jobs"]] == ["failed", "success"]


def test_a_tz_naming_no_time_zone_is_one_line_at_start(tmp_path: Path, kubelet_dir: Path) -> None:
    """TZ set to no time zone (the schedule's cron times are read in it): `gpushare run` stops at
    start with one line naming TZ and its value, exit 2, instead of a traceback."""
    state = tmp_path / "node"
    create_state("dgx-a100", state)
    with short_dir("gs-tz-") as base:
        done = subprocess.run(
            [sys.executable, "-m", "plugin.cli", "run", "--node", str(state), "--kubelet-dir",
             str(kubelet_dir), "--control-socket", str(base / "c.sock"), "--state-dir",
             str(tmp_path / "state"), "--labels-file", str(tmp_path / "gfd")],
            cwd=ROOT, env={**child_env(), "TZ": "Mars/Olympus"}, capture_output=True, text=True,
            timeout=60,
        )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == (
        "gpushare run: TZ='Mars/Olympus' is not a time zone: set an IANA name such as "
        "Europe/Berlin or UTC, or unset it for /etc/localtime (the MIG schedule's cron times "
        "are read in it)")
    assert "Traceback" not in done.stderr
