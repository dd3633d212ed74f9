"""What the daemon shows of itself: metrics, /healthz, /readyz and the node labels file.

`Observability` is composed into the Daemon. It owns the Metrics (always recorded, cheap), the
HTTP server for them when an address is given, the LabelsFile, and the liveness checks of the
daemon's background loops. Readiness: every resource of the plan registered with the kubelet.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from plugin import version
from plugin.daemon.kubelet import KubeletLink
from plugin.daemon.labels_file import LabelsFile
from plugin.daemon.metrics import Metrics, MetricsServer
from plugin.daemon.state import NodeState
from sharing.config import Config
from sharing.config_models import GfdFlags
from sharing.devices import Inventory
from sharing.plan_types import Plan

DEFAULT_LABELS_FILE = GfdFlags.model_fields["output_file"].default


class ObservedDaemon(Protocol):
    """What Observability reads of the Daemon."""

    kubelet_dir: Path
    state: NodeState
    link: KubeletLink
    config: Config | None

    @property
    def host_root(self) -> Path:
        """`/` on a real node, a simulated node's `host/` directory."""

    @property
    def phase(self) -> str:
        """`starting`, `running` or `stopping`."""


class Observability:
    """Metrics and their endpoints, liveness checks and the labels file of one daemon."""

    def __init__(self, daemon: ObservedDaemon, *, metrics_address: str | None) -> None:
        self._daemon = daemon
        self.metrics = Metrics(version=version())
        self.metrics.watch_devices(self.device_counts)
        self.labels = LabelsFile(None)
        self._liveness: dict[str, Callable[[], bool]] = {}
        self.server = (
            MetricsServer(metrics_address, self.metrics, liveness=self.liveness_problem,
                          readiness=self.readiness_problem)
            if metrics_address else None
        )

    def start_server(self) -> None:
        """Serve the endpoints (first thing at start: a taken port fails before anything else).

        Raises:
            OSError: the address cannot be bound.
        """
        if self.server is not None:
            self.server.start()
            server = self.server
            self.add_liveness("metrics-server", lambda: server.alive)

    def stop(self) -> None:
        """Remove the labels file and stop serving (a clean stop); safe to call twice."""
        self.labels.remove()
        if self.server is not None:
            self.server.stop()

    def add_liveness(self, name: str, alive: Callable[[], bool]) -> None:
        """Have /healthz fail, naming `name`, whenever `alive()` is False while running."""
        self._liveness[name] = alive

    def liveness_problem(self) -> str | None:
        """None while every background loop runs, else which ones stopped (for /healthz)."""
        phase = self._daemon.phase
        if phase != "running":
            return "stopping" if phase == "stopping" else None
        dead = [name for name, alive in self._liveness.items() if not alive()]
        return f"loops not running: {', '.join(dead)}" if dead else None

    def readiness_problem(self) -> str | None:
        """None once every resource of the plan is registered, else why not (for /readyz)."""
        daemon = self._daemon
        if daemon.phase != "running":
            return "stopping" if daemon.phase == "stopping" else "starting: nothing served yet"
        if not daemon.link.kubelet_present:
            return f"kubelet.sock absent in {daemon.kubelet_dir}: waiting for the kubelet"
        missing = daemon.link.unregistered(daemon.state.plan.names)
        if missing:
            return f"not registered with the kubelet: {', '.join(missing)}"
        return None

    def device_counts(self) -> list[tuple[str, int, int]]:
        """(resource, healthy, unhealthy) of every served resource, for gpushare_devices."""
        state = self._daemon.state
        counts = []
        for name in state.plan.names:
            _, devices = state.snapshot(name)
            healthy = sum(1 for d in devices or () if d.healthy)
            counts.append((name, healthy, len(devices or ()) - healthy))
        return counts

    def write_labels(self, plan: Plan, _inventory: Inventory) -> None:
        """Rewrite the labels file for an applied Plan (at the path its config names now)."""
        config = self._daemon.config
        output = config.flags.gfd.output_file if config is not None else ""
        root = self._daemon.host_root
        if output == DEFAULT_LABELS_FILE and root != Path("/"):
            # A simulated node keeps its labels under its host/ directory, as its MIG journal
            # and control socket: a trial never writes the host's NFD directory.
            output = str(root / output.lstrip("/"))
            with contextlib.suppress(OSError):  # LabelsFile logs a directory it cannot use
                Path(output).parent.mkdir(parents=True, exist_ok=True)
        self.labels.update(plan.labels, Path(output) if output else None)
