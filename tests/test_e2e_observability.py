"""`gpushare run` as a process on a simulated node with the kubelet stand-in: /metrics scraped and
parsed with prometheus-client's parser, /healthz and /readyz, the labels file, JSON logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sharing.config import load_config
from sharing.nvml import nvml_session, read_inventory
from sharing.nvml.sim import SimNvml, create_state
from sharing.plan import build_plan
from tests.fakes.kubelet import FakeKubelet
from tests.test_metrics import get, samples, value, wait_until
from tests.test_reload import time_slicing

ROOT = Path(__file__).resolve().parents[1]
GPU = "nvidia.com/gpu"
FAMILIES = {
    "gpushare_devices": "gauge",
    "gpushare_allocations": "counter",
    "gpushare_allocate_seconds": "histogram",
    "gpushare_xid_events": "counter",
    "gpushare_config_reloads": "counter",
    "gpushare_config_last_reload_success_timestamp_seconds": "gauge",
    "gpushare_kubelet_registrations": "counter",
    "gpushare_mps_daemon_up": "gauge",
    "gpushare_mps_daemon_restarts": "counter",
    "gpushare_mig_reconfigurations": "counter",
    "gpushare_build_info": "gauge",
}


@dataclass
class RunningDaemon:
    """A `gpushare run` child, its JSON log records (read on a thread) and its metrics port."""

    process: subprocess.Popen[str]
    records: list[dict] = field(default_factory=list)
    bad_lines: list[str] = field(default_factory=list)

    def read_logs(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            try:
                self.records.append(json.loads(line))
            except json.JSONDecodeError:
                self.bad_lines.append(line)

    @property
    def port(self) -> int:
        """The metrics port, from the `serving metrics on http://127.0.0.1:PORT/...` record."""
        marker = "serving metrics on http://127.0.0.1:"
        for record in list(self.records):
            if record["message"].startswith(marker):
                return int(record["message"][len(marker):].split("/", 1)[0])
        raise LookupError("no metrics record yet")

    def has_port(self) -> bool:
        try:
            return self.port > 0
        except LookupError:
            return False


@pytest.fixture
def node(tmp_path: Path) -> Path:
    return create_state("dgx-a100", tmp_path / "node")


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(time_slicing(4))
    return path


@pytest.fixture
def daemon(
    tmp_path: Path, node: Path, config: Path, kubelet_dir: Path
) -> Iterator[RunningDaemon]:
    """`gpushare run` with metrics on a free port, JSON logs at DEBUG, the labels file in tmp;
    the options after the sub-command. No kubelet yet."""
    process = subprocess.Popen(
        [sys.executable, "-m", "plugin.cli", "run", "--log-format", "json", "--log-level",
         "DEBUG", "--config", str(config), "--node", str(node), "--kubelet-dir",
         str(kubelet_dir), "--metrics-address", "127.0.0.1:0",
         "--labels-file", str(tmp_path / "features.d" / "gfd")],
        cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    running = RunningDaemon(process)
    reader = threading.Thread(target=running.read_logs, daemon=True)
    reader.start()
    try:
        wait_until(lambda: running.has_port() or process.poll() is not None, timeout_s=20)
        assert process.poll() is None, running.records
        yield running
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(5)


def expected_labels(node: Path, text: str) -> str:
    """The labels file text for this config: the plan's labels, one `key=value` per line."""
    with nvml_session(SimNvml(node)) as nvml:
        labels = build_plan(read_inventory(nvml), load_config(text)).labels
    return "".join(f"{k}={v}\n" for k, v in sorted(labels))


def test_metrics_health_readiness_xid_labels_and_json_logs(
    daemon: RunningDaemon, node: Path, config: Path, kubelet_dir: Path, tmp_path: Path
) -> None:
    port = daemon.port
    labels_file = tmp_path / "features.d" / "gfd"
    wait_until(lambda: get(port, "/readyz")[1] != "starting: nothing served yet\n")
    assert get(port, "/readyz") == (
        503, f"kubelet.sock absent in {kubelet_dir}: waiting for the kubelet\n"
    )
    assert get(port, "/healthz") == (200, "ok\n")
    assert labels_file.read_text() == expected_labels(node, time_slicing(4))

    with FakeKubelet(kubelet_dir) as kubelet:
        kubelet.wait_for_list(GPU, lambda d: len(d.healthy_ids) == 32, timeout_s=10)
        wait_until(lambda: get(port, "/readyz") == (200, "ok\n"))
        kubelet.allocate(GPU, 1)
        families = {
            f.name: f.type for f in text_string_to_metric_families(get(port, "/metrics")[1])
        }
        assert {name: families.get(name) for name in FAMILIES} == FAMILIES

        subprocess.run(
            [sys.executable, "-m", "plugin.cli", "sim", "inject-xid", "--node", str(node),
             "--gpu", "3", "--xid", "79"],
            cwd=ROOT, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        injected = time.monotonic()
        wait_until(lambda: unhealthy(port) == 4, timeout_s=10)
        assert time.monotonic() - injected < 10.0  # how fast: benchmarks health_propagation
        found = samples(get(port, "/metrics")[1])
        assert value(found, "gpushare_devices", resource=GPU, health="healthy") == 28
        assert value(found, "gpushare_xid_events_total", gpu="3", xid="79") == 1
        assert value(found, "gpushare_allocations_total", resource=GPU) == 1
        assert value(found, "gpushare_kubelet_registrations_total", resource=GPU) == 1
        for result in ("success", "failed"):
            assert value(found, "gpushare_mig_reconfigurations_total", result=result) == 0
            assert value(found, "gpushare_config_reloads_total", result=result) == 0

        config.write_text(time_slicing(8))
        kubelet.wait_for_list(GPU, lambda d: len(d.devices) == 64)
        wait_until(lambda: labels_file.read_text() == expected_labels(node, time_slicing(8)))
        found = samples(get(port, "/metrics")[1])
        assert value(found, "gpushare_config_reloads_total", result="success") == 1

        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(10) == 0
    assert not labels_file.exists()
    assert not list(labels_file.parent.iterdir())  # no temporary file left either

    assert daemon.bad_lines == []
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in daemon.records)
    assert {"DEBUG", "INFO", "WARNING"} <= {r["level"] for r in daemon.records}
    registered = [r for r in daemon.records if r["message"].startswith("registered ")]
    assert registered[0]["resource"] == GPU
    [fault] = [r for r in daemon.records if "XID 79" in r["message"]]
    assert (fault["gpu"], fault["xid"], fault["affected"]) == (3, 79, 4)


def unhealthy(port: int) -> float | None:
    """gpushare_devices{health="unhealthy"} of nvidia.com/gpu, scraped now."""
    found = samples(get(port, "/metrics")[1])
    return value(found, "gpushare_devices", resource=GPU, health="unhealthy")
