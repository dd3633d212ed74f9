"""Metrics, /healthz and /readyz of a daemon in this process, over real HTTP and unix sockets."""

from __future__ import annotations

import platform
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from plugin.daemon.core import Daemon
from plugin.daemon.health_monitor import HealthMonitor
from plugin.daemon.metrics import Metrics, MetricsServer, parse_address
from sharing.errors import ConfigError
from tests.fakes.kubelet import FakeKubelet
from tests.test_reload import make_daemon, time_slicing

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """Every sample of a text exposition, keyed by (sample name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float | None:
    """One sample's value, or None when absent."""
    return found.get((name, frozenset(labels.items())))


def get(port: int, path: str) -> tuple[int, str]:
    """(status, body) of a GET on 127.0.0.1:port."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(":9402", ("", 9402), id="every interface"),
        pytest.param("127.0.0.1:0", ("127.0.0.1", 0), id="any free port"),
        pytest.param("[::1]:9402", ("::1", 9402), id="IPv6 in brackets"),
        pytest.param("metrics.local:80", ("metrics.local", 80), id="host name"),
    ],
)
def test_address_forms(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("9402", id="no colon"),
        pytest.param("host:", id="no port"),
        pytest.param(":65536", id="port out of range"),
        pytest.param("::1:9402", id="IPv6 without brackets"),
        pytest.param(":http", id="port not a number"),
    ],
)
def test_bad_address_is_refused_naming_the_form(text: str) -> None:
    with pytest.raises(ConfigError, match=r"expected HOST:PORT, e\.g\. :9402"):
        parse_address(text)


def test_mig_reconfigurations_counted_by_result_and_zero_before_any_job() -> None:
    metrics = Metrics(version="1.2.3")
    before = samples(metrics.exposition().decode())
    assert value(before, "gpushare_mig_reconfigurations_total", result="success") == 0
    assert value(before, "gpushare_mig_reconfigurations_total", result="failed") == 0
    metrics.mig_reconfiguration("failed")
    metrics.mig_reconfiguration("success")
    metrics.mig_reconfiguration("success")
    after = samples(metrics.exposition().decode())
    assert value(after, "gpushare_mig_reconfigurations_total", result="success") == 2
    assert value(after, "gpushare_mig_reconfigurations_total", result="failed") == 1
    build = {"version": "1.2.3", "python": platform.python_version()}
    assert value(after, "gpushare_build_info", **build) == 1


def test_unknown_mig_result_is_refused() -> None:
    with pytest.raises(ValueError, match="'skipped'"):
        Metrics(version="0").mig_reconfiguration("skipped")


@pytest.fixture
def endpoints() -> Iterator[Callable[..., tuple[MetricsServer, list[str | None]]]]:
    """Factory: a MetricsServer on a free port whose checks answer what the test sets."""
    servers: list[MetricsServer] = []

    def start(address: str = "127.0.0.1:0") -> tuple[MetricsServer, list[str | None]]:
        problems: list[str | None] = [None, None]  # liveness, readiness
        server = MetricsServer(address, Metrics(version="0"), liveness=lambda: problems[0],
                               readiness=lambda: problems[1])
        server.start()
        servers.append(server)
        return server, problems

    yield start
    for server in servers:
        server.stop()


def test_health_endpoints_answer_200_or_503_with_the_reason(endpoints: Callable) -> None:
    server, problems = endpoints()
    port = server.bound[1]
    assert get(port, "/healthz") == (200, "ok\n")
    assert get(port, "/readyz") == (200, "ok\n")
    problems[:] = ["loops not running: kubelet-watch", "not registered with the kubelet: x/y"]
    assert get(port, "/healthz") == (503, "loops not running: kubelet-watch\n")
    assert get(port, "/readyz") == (503, "not registered with the kubelet: x/y\n")
    assert get(port, "/nothing")[0] == 404
    status, text = get(port, "/metrics?x=1")
    assert status == 200
    assert "gpushare_build_info" in text


def test_taken_port_fails_naming_address_and_option(endpoints: Callable) -> None:
    server, _ = endpoints()
    taken = r"cannot serve metrics on 127\.0\.0\.1:\d+: .*--metrics-address"
    with pytest.raises(OSError, match=taken):
        endpoints(f"127.0.0.1:{server.bound[1]}")


def test_stop_closes_the_port(endpoints: Callable) -> None:
    server, _ = endpoints()
    port = server.bound[1]
    server.stop()
    server.stop()
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 1):
        pass


# --- a daemon in this process ---------------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(time_slicing(4))
    return path


@pytest.fixture
def daemon(config: Path, kubelet_dir: Path, tmp_path: Path) -> Iterator[Daemon]:
    """A daemon with metrics on a free port, started before any kubelet is there."""
    daemon = make_daemon(config, kubelet_dir, tmp_path, metrics_address="127.0.0.1:0")
    daemon.start()
    yield daemon
    daemon.stop()


def port_of(daemon: Daemon) -> int:
    assert daemon.observe.server is not None
    return daemon.observe.server.bound[1]


def test_readyz_503_until_registered_then_200_then_503_while_the_kubelet_is_away(
    daemon: Daemon, kubelet_dir: Path
) -> None:
    port = port_of(daemon)
    status, reason = get(port, "/readyz")
    assert status == 503
    assert reason in (
        f"kubelet.sock absent in {kubelet_dir}: waiting for the kubelet\n",
        "not registered with the kubelet: nvidia.com/gpu\n",
    )
    assert get(port, "/healthz") == (200, "ok\n")
    kubelet = FakeKubelet(kubelet_dir)
    try:
        kubelet.wait_for_list("nvidia.com/gpu", lambda _: True)
        assert daemon.link.wait_registered(2.0)
        assert get(port, "/readyz") == (200, "ok\n")
        kubelet.stop()  # kubelet.sock goes with it
        wait_until(lambda: get(port, "/readyz")[0] == 503)
        assert get(port, "/readyz")[1] == (
            f"kubelet.sock absent in {kubelet_dir}: waiting for the kubelet\n"
        )
        kubelet.start()
        wait_until(lambda: get(port, "/readyz") == (200, "ok\n"))
    finally:
        kubelet.stop()


def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll `predicate` every 20 ms until it holds (an HTTP answer cannot be waited on)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_healthz_names_a_loop_that_stopped(daemon: Daemon) -> None:
    port = port_of(daemon)
    assert get(port, "/healthz") == (200, "ok\n")
    [monitor] = [c for c in daemon.components if isinstance(c, HealthMonitor)]
    monitor.stop()
    assert get(port, "/healthz") == (503, "loops not running: health-monitor\n")


def test_allocate_reload_and_registration_are_counted(
    config: Path, kubelet_dir: Path, tmp_path: Path
) -> None:
    # The config watch is kept idle: each write is reloaded once, by the explicit calls (the
    # watch's own reload, on the reload thread, would race them and count again).
    daemon = make_daemon(config, kubelet_dir, tmp_path, metrics_address="127.0.0.1:0",
                         config_poll_s=3600.0, inotify=False)
    daemon.start()
    try:
        _count_allocate_reload_and_registration(daemon, config, kubelet_dir)
    finally:
        daemon.stop()


def _count_allocate_reload_and_registration(
    daemon: Daemon, config: Path, kubelet_dir: Path
) -> None:
    port = port_of(daemon)
    with FakeKubelet(kubelet_dir) as kubelet:
        kubelet.wait_for_list("nvidia.com/gpu", lambda _: True)
        kubelet.allocate("nvidia.com/gpu", 2, container_count=2)
        start = samples(get(port, "/metrics")[1])
        config.write_text("version: v1\nsharing: {timeSlicing: {resources: [{name: gpu}]}}\n")
        assert not daemon.reload()
        config.write_text(time_slicing(3))
        assert daemon.reload()
        found = samples(get(port, "/metrics")[1])
    gpu = {"resource": "nvidia.com/gpu"}
    assert value(found, "gpushare_allocations_total", **gpu) == 2
    assert value(found, "gpushare_allocate_seconds_count", **gpu) == 1
    assert 0 < value(found, "gpushare_allocate_seconds_sum", **gpu) < 1
    assert value(found, "gpushare_kubelet_registrations_total", **gpu) == 1
    assert value(found, "gpushare_config_reloads_total", result="failed") == 1
    assert value(found, "gpushare_config_reloads_total", result="success") == 1
    stamp = "gpushare_config_last_reload_success_timestamp_seconds"
    assert value(found, stamp) > value(start, stamp) > 0
    assert value(found, "gpushare_devices", health="healthy", **gpu) == 24
    assert value(found, "gpushare_devices", health="unhealthy", **gpu) == 0


def test_refused_allocate_is_not_counted(daemon: Daemon, kubelet_dir: Path) -> None:
    with FakeKubelet(kubelet_dir) as kubelet:
        kubelet.wait_for_list("nvidia.com/gpu", lambda _: True)
        with pytest.raises(grpc.RpcError):
            kubelet.allocate_ids("nvidia.com/gpu", [["GPU-nope::0"]])
    found = samples(daemon.metrics.exposition().decode())
    assert value(found, "gpushare_allocations_total", resource="nvidia.com/gpu") == 0


def test_connections_beyond_the_limit_are_closed_and_service_recovers(
    endpoints: Callable,
) -> None:
    from plugin.daemon.metrics import MAX_CONNECTIONS

    server, _ = endpoints()
    port = server.bound[1]
    idle = [socket.create_connection(("127.0.0.1", port), 5) for _ in range(MAX_CONNECTIONS)]
    try:
        wait_until(lambda: closed_on(port))  # once the idle ones hold every slot
    finally:
        for connection in idle:
            connection.close()
    # The slots come free as the server's threads see the idle connections end, one by one: a
    # GET until then may still be closed unanswered.
    wait_until(lambda: healthz_ok(port))


def closed_on(port: int) -> bool:
    """True when a GET gets its connection closed without an answer."""
    try:
        get(port, "/healthz")
    except (ConnectionError, urllib.error.URLError):
        return True
    return False


def healthz_ok(port: int) -> bool:
    """True when /healthz answers 200 ok; False when it fails or the connection is closed."""
    try:
        return get(port, "/healthz") == (200, "ok\n")
    except (ConnectionError, urllib.error.URLError):
        return False


def test_clients_trickling_requests_in_every_slot_are_cut_off_at_the_deadline() -> None:
    """MAX_CONNECTIONS clients sending a header a byte at a time (each byte within the read
    timeout) held every slot for as long as they liked, so /healthz, the kubelet's liveness
    probe, went unanswered; with a 1 s deadline per connection it is answered again soon."""
    import threading

    from plugin.daemon.metrics import MAX_CONNECTIONS

    server = MetricsServer("127.0.0.1:0", Metrics(version="0"), liveness=lambda: None,
                           readiness=lambda: None, request_deadline_s=1.0)
    server.start()
    port = server.bound[1]
    stop = threading.Event()
    cut_off: list[float] = []
    began = time.monotonic()

    def trickle() -> None:
        with socket.create_connection(("127.0.0.1", port), 5) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
            while not stop.wait(0.2):
                try:
                    sock.sendall(b"a")
                except OSError:
                    cut_off.append(time.monotonic() - began)
                    return

    clients = [threading.Thread(target=trickle, daemon=True) for _ in range(MAX_CONNECTIONS)]
    try:
        for client in clients:
            client.start()
        time.sleep(0.5)  # the trickling clients hold every slot
        wait_until(lambda: healthz_ok(port), timeout_s=5.0)
        wait_until(lambda: len(cut_off) == MAX_CONNECTIONS, timeout_s=5.0)
    finally:
        stop.set()
        for client in clients:
            client.join(5)
        server.stop()
    assert max(cut_off) < 5.0, cut_off
