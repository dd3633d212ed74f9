"""Prometheus metrics and the /metrics, /healthz and /readyz endpoints of `gpushare run`.

`Metrics` owns one prometheus-client registry per daemon. Other parts record through its
methods, each a counter increment or a histogram observation (a short uncontended lock, no I/O),
so recording never holds up Allocate. The device and MPS daemon gauges are not recorded at all:
they are read from the daemon's state when Prometheus scrapes.

For code outside this module (the MIG reconfiguration jobs, say):

    daemon.metrics.mig_reconfiguration("success")   # or "failed"

`MetricsServer` serves the three endpoints over HTTP on its own threads:

- `/metrics`: the text exposition format;
- `/healthz`: 200 while every background loop of the daemon runs, else 503 naming the loops;
- `/readyz`: 200 once every resource of the plan is registered with the kubelet, else 503 with
  the reason (`not registered with the kubelet: nvidia.com/gpu`, `kubelet.sock absent`, ...).

At most MAX_CONNECTIONS connections are served at once, each for at most REQUEST_DEADLINE_S in
all: a client sending its request a byte at a time is cut off then, so a few of them cannot
hold every slot and fail the kubelet's liveness probe on /healthz.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from sharing.errors import ConfigError

log = logging.getLogger("gpushare.metrics")

DEFAULT_ADDRESS = ":9402"
MAX_CONNECTIONS = 16  # scrapers and probes served at once
REQUEST_DEADLINE_S = 10.0  # one connection's whole exchange: request read, answer sent
MIG_RESULTS = ("success", "failed")
# Allocate handler time (the response built from the Plan in memory), 50 µs to 1 s.
ALLOCATE_BUCKETS_S = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0
)  # fmt: skip

DeviceCounts = Callable[[], Iterable[tuple[str, int, int]]]  # (resource, healthy, unhealthy)
MpsStates = Callable[[], Mapping[str, bool | None]]  # resource -> daemon answering (None: not yet)
Check = Callable[[], str | None]  # None when fine, else the reason


class AllocateRecorder(NamedTuple):
    """The pre-labelled Allocate metrics of one resource (bound once, used on every call)."""

    allocations: Counter
    seconds: Histogram

    def record(self, containers: int, elapsed_s: float) -> None:
        """Count a successful Allocate of `containers` containers that took `elapsed_s`."""
        self.allocations.inc(containers)
        self.seconds.observe(elapsed_s)


class _StateCollector(Collector):
    """gpushare_devices and gpushare_mps_daemon_up, read from the daemon at scrape time."""

    def __init__(self) -> None:
        self.devices: DeviceCounts = lambda: ()
        self.mps: MpsStates = dict

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The two gauges as they stand now."""
        devices = GaugeMetricFamily(
            "gpushare_devices", "Virtual devices advertised to the kubelet, by health.",
            labels=["resource", "health"],
        )
        for resource, healthy, unhealthy in self.devices():
            devices.add_metric([resource, "healthy"], healthy)
            devices.add_metric([resource, "unhealthy"], unhealthy)
        yield devices
        up = GaugeMetricFamily(
            "gpushare_mps_daemon_up",
            "1 while the MPS control daemon of the resource answers its probe, else 0.",
            labels=["resource"],
        )
        for resource, answering in sorted(self.mps().items()):
            up.add_metric([resource], 1.0 if answering else 0.0)
        yield up


class Metrics:
    """The daemon's metrics in their own registry; every method is safe from any thread."""

    def __init__(self, *, version: str) -> None:
        disable_created_metrics()  # no `_created` series beside every counter
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self._state = _StateCollector()
        registry.register(self._state)
        self._allocations = Counter(
            "gpushare_allocations_total",
            "Containers given devices by Allocate (successful requests only).",
            ["resource"], registry=registry,
        )
        self._allocate_seconds = Histogram(
            "gpushare_allocate_seconds",
            "Time to build an Allocate response, in the handler (the gRPC transport excluded).",
            ["resource"], buckets=ALLOCATE_BUCKETS_S, registry=registry,
        )
        self._xid_events = Counter(
            "gpushare_xid_events_total",
            "NVML XID critical error events received, by GPU index and XID (ignored ones too).",
            ["gpu", "xid"], registry=registry,
        )
        self._reloads = Counter(
            "gpushare_config_reloads_total",
            "Config reloads (file change or SIGHUP), by result: success or failed.",
            ["result"], registry=registry,
        )
        self._last_reload = Gauge(
            "gpushare_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config load (at start or by a reload).",
            registry=registry,
        )
        self._registrations = Counter(
            "gpushare_kubelet_registrations_total",
            "Successful registrations of a resource with the kubelet (again after each restart).",
            ["resource"], registry=registry,
        )
        self._mps_restarts = Counter(
            "gpushare_mps_daemon_restarts_total",
            "MPS control daemon starts after it exited, failed its probe or failed to start.",
            ["resource"], registry=registry,
        )
        self._mig = Counter(
            "gpushare_mig_reconfigurations_total",
            "MIG reconfiguration jobs finished, by result: success or failed.",
            ["result"], registry=registry,
        )
        for result in ("success", "failed"):
            self._reloads.labels(result)
        for result in MIG_RESULTS:
            self._mig.labels(result)
        Info("gpushare_build", "gpushare build information.", registry=registry).info(
            {"version": version, "python": platform.python_version()}
        )
        ProcessCollector(registry=registry)

    # --- sources read at scrape time ----------------------------------------------------------

    def watch_devices(self, counts: DeviceCounts) -> None:
        """Read gpushare_devices from `counts()` at every scrape."""
        self._state.devices = counts

    def watch_mps(self, states: MpsStates) -> None:
        """Read gpushare_mps_daemon_up from `states()` at every scrape."""
        self._state.mps = states

    # --- recording ----------------------------------------------------------------------------

    def allocate_recorder(self, resource: str) -> AllocateRecorder:
        """The Allocate counter and histogram of one resource, labelled once."""
        return AllocateRecorder(
            self._allocations.labels(resource), self._allocate_seconds.labels(resource)
        )

    def xid_event(self, gpu_index: int, xid: int) -> None:
        """Count one XID event of a GPU."""
        self._xid_events.labels(str(gpu_index), str(xid)).inc()

    def config_loaded(self) -> None:
        """The config was loaded at start: the last-success time, not a reload."""
        self._last_reload.set(time.time())

    def config_reload(self, ok: bool) -> None:
        """Count a reload by result; a success also sets the last-success time."""
        self._reloads.labels("success" if ok else "failed").inc()
        if ok:
            self._last_reload.set(time.time())

    def registered(self, resource: str) -> None:
        """Count a registration of `resource` with the kubelet."""
        self._registrations.labels(resource).inc()

    def mps_restarted(self, resource: str) -> None:
        """Count a restart of the MPS control daemon of `resource`."""
        self._mps_restarts.labels(resource).inc()

    def mig_reconfiguration(self, result: str) -> None:
        """Count a finished MIG reconfiguration job: `result` is "success" or "failed".

        Raises:
            ValueError: another result (the label set stays fixed and small).
        """
        if result not in MIG_RESULTS:
            raise ValueError(f"MIG reconfiguration result {result!r}: expected {MIG_RESULTS}")
        self._mig.labels(result).inc()

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


def parse_address(text: str) -> tuple[str, int]:
    """(host, port) of `HOST:PORT`, `:PORT` (every interface) or `[IPv6]:PORT`.

    Raises:
        ConfigError: not of that form, or the port is not 0-65535.
    """
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        colon = ""  # an IPv6 address needs brackets
    if not colon or not port.isdigit() or int(port) > 65535 or len(text) > 300:
        raise ConfigError(
            f"metrics address {text[:100]!r}: expected HOST:PORT, e.g. :9402, 127.0.0.1:9402 "
            "or [::1]:9402 (empty disables)"
        )
    return host, int(port)


class _Server(ThreadingHTTPServer):
    """A thread per connection, at most MAX_CONNECTIONS at once (more are closed at once)."""

    daemon_threads = True
    request_queue_size = MAX_CONNECTIONS

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *,
        deadline_s: float = REQUEST_DEADLINE_S,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._deadline_s = deadline_s
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve on a new thread while a slot is free; otherwise close the connection."""
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve one connection, cut off at the deadline, then free its slot."""
        cutoff = threading.Timer(self._deadline_s, _cut_off, args=(request,))
        cutoff.daemon = True
        cutoff.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            cutoff.cancel()
            self._slots.release()


def _cut_off(connection: socket.socket) -> None:
    """End a connection past its deadline: the handler's read or write returns at once."""
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)


class MetricsServer:
    """HTTP server for /metrics, /healthz and /readyz on its own threads."""

    def __init__(
        self, address: str, metrics: Metrics, *, liveness: Check, readiness: Check,
        request_deadline_s: float = REQUEST_DEADLINE_S,
    ) -> None:
        self.address = address
        self._deadline_s = request_deadline_s
        self._host, self._port = parse_address(address)
        self._metrics = metrics
        self._liveness = liveness
        self._readiness = readiness
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def bound(self) -> tuple[str, int]:
        """The (host, port) listened on (the real port when 0 was asked)."""
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def alive(self) -> bool:
        """True while the server thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Bind and serve on a thread.

        Raises:
            OSError: the address cannot be bound; the message names it and the option.
        """
        try:
            self._server = _Server((self._host, self._port), self._handler_class(),
                                   deadline_s=self._deadline_s)
        except OSError as err:
            raise OSError(
                f"cannot serve metrics on {self.address}: {err.strerror or err} "
                "(--metrics-address or METRICS_ADDRESS; empty disables)"
            ) from err
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
            name="gpushare-metrics", daemon=True,
        )
        self._thread.start()
        host, port = self.bound
        shown = f"[{host}]" if ":" in host else host
        log.info("serving metrics on http://%s:%d/metrics (and /healthz, /readyz)", shown, port)

    def stop(self) -> None:
        """Stop serving and close the socket; safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 5  # seconds a client may take to send its request
            server_version = "gpushare"

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                owner._answer(self, body=True)

            def do_HEAD(self) -> None:  # noqa: N802
                owner._answer(self, body=False)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                log.debug("%s %s", self.address_string(), format % args)

        return Handler

    def _answer(self, request: BaseHTTPRequestHandler, *, body: bool) -> None:
        path = request.path.split("?", 1)[0]
        if path == "/metrics":
            status, kind, payload = 200, CONTENT_TYPE_LATEST, self._metrics.exposition()
        elif path in ("/healthz", "/readyz"):
            check = self._liveness if path == "/healthz" else self._readiness
            problem = check()
            status = 200 if problem is None else 503
            text = "ok" if problem is None else problem
            kind, payload = "text/plain; charset=utf-8", f"{text}\n".encode()
        else:
            status, kind = 404, "text/plain; charset=utf-8"
            payload = b"not found: try /metrics, /healthz or /readyz\n"
        request.send_response(status)
        request.send_header("Content-Type", kind)
        request.send_header("Content-Length", str(len(payload)))
        request.end_headers()
        if body:
            request.wfile.write(payload)
