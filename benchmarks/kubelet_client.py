"""Calling a device plugin as the kubelet does, from Go when Go is here, from Python otherwise.

The Go module in benchmarks/go holds `kubeletclient` (the kubelet device manager's way of
dialling a plugin and admitting a container: GetPreferredAllocation, then Allocate with the
preferred IDs) and `baseline` (a minimal Go device plugin, the yardstick). `go_tools()` builds
both into benchmarks/go/bin (git-ignored) when a source is newer than the binaries. Without Go,
`python_client` makes the same calls with grpcio, and there is no baseline to compare with.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from plugin.api import HEALTHY, pb_grpc
from plugin.daemon import convert

GO_DIR = Path(__file__).resolve().parent / "go"
BIN_DIR = GO_DIR / "bin"
CLIENT = "kubeletclient"
BASELINE = "baseline"  # the Go binary
BUILD_TIMEOUT_S = 900  # a first build downloads and compiles grpc-go
RUN_TIMEOUT_S = 600
MAX_CALLS = 1_000_000


@dataclass(frozen=True)
class Samples:
    """One client run against one plugin: per-call wall times in milliseconds."""

    preferred: list[float]
    allocate: list[float]
    empty: list[float]

    @property
    def admission(self) -> list[float]:
        """GetPreferredAllocation + Allocate of each container: what admitting a pod costs."""
        return [p + a for p, a in zip(self.preferred, self.allocate, strict=True)]


@dataclass(frozen=True)
class GoTools:
    """The built Go binaries."""

    client: Path
    baseline: Path


def _newest_source_mtime() -> float:
    sources = [GO_DIR / "go.mod", GO_DIR / "go.sum", *GO_DIR.glob("cmd/**/*.go")]
    return max(p.stat().st_mtime for p in sources)


def go_tools(go: str | None = None, bin_dir: Path = BIN_DIR) -> GoTools | str:
    """The Go client and baseline, built if needed; a reason (str) when they cannot be had.

    `go` is the go command (default: `go` from PATH); the binaries go to `bin_dir` and are
    built again when a source, go.mod or go.sum is newer than one of them.
    """
    go = go or shutil.which("go")
    if go is None:
        return "go not on PATH"
    tools = GoTools(bin_dir / CLIENT, bin_dir / BASELINE)
    if _fresh(tools):
        return tools
    bin_dir.mkdir(parents=True, exist_ok=True)
    # Test workers may ask at the same time: one builds, the others wait and find it built.
    with open(bin_dir / ".build.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _fresh(tools):
            return tools
        return _build(go, bin_dir, tools)


def _fresh(tools: GoTools) -> bool:
    built = [tools.client, tools.baseline]
    return all(p.exists() for p in built) and min(
        p.stat().st_mtime for p in built
    ) >= _newest_source_mtime()


def _build(go: str, bin_dir: Path, tools: GoTools) -> GoTools | str:
    try:
        subprocess.run(
            [go, "build", "-o", f"{bin_dir}/", "./cmd/..."],
            cwd=GO_DIR, check=True, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
        )  # fmt: skip
    except subprocess.CalledProcessError as err:
        lines = (err.stderr or err.stdout or "").strip().splitlines() or ["no output"]
        return f"go build in {GO_DIR} failed: {lines[-1]}"
    except subprocess.TimeoutExpired:
        return f"go build in {GO_DIR} took longer than {BUILD_TIMEOUT_S} s"
    except OSError as err:
        return f"cannot run {go}: {err}"
    return tools


def _taskset() -> str:
    """util-linux taskset, which sets a CPU affinity and then runs the program."""
    found = shutil.which("taskset")
    if found is None:
        raise RuntimeError("taskset (util-linux) is needed to place the client on CPUs")
    return found


def _check_counts(calls: int, warmup: int) -> None:
    if not 1 <= calls <= MAX_CALLS or not 0 <= warmup <= MAX_CALLS:
        raise ValueError(f"calls must be 1..{MAX_CALLS} and warmup 0..{MAX_CALLS}")


def go_client(
    tools: GoTools,
    socket: Path,
    calls: int,
    *,
    warmup: int = 200,
    size: int = 1,
    cpus: set[int] | None = None,
    dial_timeout_s: float = 10.0,
) -> Samples:
    """Run the Go client against the plugin on `socket` (on `cpus` when given); it gives up
    when the socket does not answer within `dial_timeout_s`.

    Raises:
        RuntimeError: the client failed; the message has its error output.
    """
    _check_counts(calls, warmup)
    argv = [str(tools.client), "-socket", str(socket), "-calls", str(calls),
            "-warmup", str(warmup), "-size", str(size),
            "-dial-timeout", f"{dial_timeout_s}s"]  # fmt: skip
    if cpus:
        argv = [_taskset(), "-c", ",".join(map(str, sorted(cpus))), *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{CLIENT} against {socket} failed: {done.stderr.strip()}")
    out = json.loads(done.stdout)
    return Samples(out["preferred_ms"], out["allocate_ms"], out["empty_ms"])


def python_client(socket: Path, calls: int, *, warmup: int = 200, size: int = 1) -> Samples:
    """The same calls as the Go client, made with grpcio from this process."""
    _check_counts(calls, warmup)
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        stub = pb_grpc.DevicePluginStub(channel)
        stream = stub.ListAndWatch(convert.empty())
        try:
            first = next(stream)
            available = [d.ID for d in first.devices if d.health == HEALTHY]
            preferred, allocate, empty = [], [], []
            for n in range(warmup + calls):
                request = convert.to_pb_preferred_request([(available, [], size)])
                t0 = time.perf_counter_ns()
                answer = stub.GetPreferredAllocation(request)
                t1 = time.perf_counter_ns()
                ids = list(answer.container_responses[0].deviceIDs)
                allocate_request = convert.to_pb_allocate_request([ids])
                t2 = time.perf_counter_ns()
                stub.Allocate(allocate_request)
                t3 = time.perf_counter_ns()
                if n >= warmup:
                    preferred.append((t1 - t0) / 1e6)
                    allocate.append((t3 - t2) / 1e6)
            for n in range(warmup + calls):
                t0 = time.perf_counter_ns()
                stub.GetDevicePluginOptions(convert.empty())
                if n >= warmup:
                    empty.append((time.perf_counter_ns() - t0) / 1e6)
        finally:
            stream.cancel()
    return Samples(preferred, allocate, empty)


class BaselinePlugin:
    """A minimal device plugin in its own process, serving `gpus` x `replicas` healthy IDs.

    `go_baseline` and `grpcio_baseline` make the two kinds: the same plugin in Go and on grpcio.
    """

    def __init__(self, name: str, argv: list[str], *, gpus: int = 8, replicas: int = 8) -> None:
        self.name = name
        self.root = Path(tempfile.mkdtemp(prefix="gpb-base-", dir="/tmp"))
        self.socket = self.root / "baseline.sock"
        self.log_path = self.root / "baseline.log"
        self._argv = [*argv, "--socket", str(self.socket),
                      "--gpus", str(gpus), "--replicas", str(replicas)]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        """Start it and wait until its socket answers."""
        repo = GO_DIR.parent.parent
        kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), *kept])}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self._argv, stdout=log, stderr=log, env=env, cwd=repo)
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(f"unix://{self.socket}") as channel:
            stub = pb_grpc.DevicePluginStub(channel)
            while True:
                try:
                    stub.GetDevicePluginOptions(convert.empty(), timeout=1, wait_for_ready=True)
                    return
                except grpc.RpcError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        log = self.log_path.read_text(errors="replace")[-2000:]
                        self.stop()
                        raise RuntimeError(
                            f"{self.name} did not start on {self.socket}; its output:\n{log}"
                        ) from None

    @property
    def pid(self) -> int:
        """PID of the baseline process."""
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        """Stop it (SIGTERM) and remove its directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> BaselinePlugin:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def go_baseline(tools: GoTools, *, gpus: int = 8, replicas: int = 8) -> BaselinePlugin:
    """The Go baseline plugin (benchmarks/go/cmd/baseline), not started."""
    return BaselinePlugin("Go baseline", [str(tools.baseline)], gpus=gpus, replicas=replicas)


def grpcio_baseline(*, gpus: int = 8, replicas: int = 8) -> BaselinePlugin:
    """The same plugin on grpcio's sync server (benchmarks/grpcio_baseline.py), not started."""
    argv = [sys.executable, "-m", "benchmarks.grpcio_baseline"]
    return BaselinePlugin("grpcio baseline", argv, gpus=gpus, replicas=replicas)
