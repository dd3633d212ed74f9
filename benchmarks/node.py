"""A gpushare daemon in its own process on a simulated node, with a kubelet stand-in here.

The benchmark process plays the kubelet: it serves kubelet.sock, is dialled back, reads the
ListAndWatch streams and calls Allocate over the plugin's unix socket, as the kubelet would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from plugin.api import pb_grpc
from plugin.standin.kubelet import KubeletStandIn
from sharing.nvml import sim

REPO = Path(__file__).resolve().parent.parent


class DaemonUnderTest:
    """`gpushare run` on a fresh simulated node, driven by a kubelet stand-in."""

    metrics_address = ""  # set before spawn() to serve metrics (off by default: no port clash)

    def __init__(
        self,
        node: str,
        config_text: str,
        *,
        stand_in: bool = True,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.extra_env = dict(env or {})  # added to this process's environment for the daemon
        self.extra_args = args  # more `gpushare run` arguments
        self.node = node
        self.root = Path(tempfile.mkdtemp(prefix="gpb-", dir="/tmp"))
        self.kubelet_dir = self.root / "k"
        self.kubelet_dir.mkdir()
        self.state_dir = sim.create_state(node, self.root / "node")
        self.config_path = self.root / "config.yaml"
        self.config_path.write_text(config_text)
        self.log_path = self.root / "daemon.log"
        self.kubelet = KubeletStandIn(self.kubelet_dir) if stand_in else None
        self.proc: subprocess.Popen[bytes] | None = None
        self._channels: list[grpc.Channel] = []

    def spawn(self) -> float:
        """Start the daemon process; returns the time.monotonic() just before the spawn."""
        argv = [
            sys.executable, "-m", "plugin.cli", "--log-level", "WARNING", "run",
            "--node", str(self.state_dir),
            "--config", str(self.config_path),
            "--kubelet-dir", str(self.kubelet_dir),
            "--metrics-address", self.metrics_address,
            "--labels-file", str(self.root / "gfd"),
            *self.extra_args,
        ]  # fmt: skip
        # The checkout first, whatever PYTHONPATH held after it (the dependencies may live there).
        kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *kept]), **self.extra_env}
        log = self.log_path.open("ab")
        started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env, cwd=REPO)
        log.close()
        return started

    def wait_registered(self, resources: list[str], timeout_s: float = 20.0) -> float:
        """Wait until every resource has registered at least once; returns the last time."""
        assert self.kubelet is not None
        try:
            self.kubelet.wait_for(
                lambda: all(self.kubelet.registrations_of(r) for r in resources)  # type: ignore[union-attr]
                and all(self.kubelet.latest(r) for r in resources),  # type: ignore[union-attr]
                timeout_s,
            )
        except TimeoutError:
            raise RuntimeError(
                f"daemon did not register {resources}; its log:\n{self.log_path.read_text()}"
            ) from None
        return max(self.kubelet.registrations_of(r)[-1].at for r in resources)

    def serve(self, resources: list[str]) -> KubeletStandIn:
        """Spawn the daemon, wait for every resource to register; returns the stand-in."""
        self.spawn()
        self.wait_registered(resources)
        assert self.kubelet is not None
        return self.kubelet

    def socket(self, resource_suffix: str) -> Path:
        """The plugin server's socket of a resource (`gpu` for nvidia.com/gpu)."""
        return self.kubelet_dir / f"gpushare-{resource_suffix}.sock"

    def stub(self, resource_suffix: str) -> pb_grpc.DevicePluginStub:
        """A client of the plugin server, like the kubelet's connection to it."""
        channel = grpc.insecure_channel(f"unix://{self.socket(resource_suffix)}")
        self._channels.append(channel)
        return pb_grpc.DevicePluginStub(channel)

    @property
    def pid(self) -> int:
        """PID of the daemon process."""
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        """Stop the daemon (SIGTERM), the stand-in, and remove the temporary directory."""
        for channel in self._channels:
            channel.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.kubelet is not None:
            self.kubelet.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> DaemonUnderTest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
