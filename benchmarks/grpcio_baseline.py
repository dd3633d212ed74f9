"""`python -m benchmarks.grpcio_baseline --socket PATH`: the Go baseline's twin on grpcio.

The same minimal device plugin as benchmarks/go/cmd/baseline (N healthy IDs, the first IDs
offered preferred, Allocate answering one environment variable) on grpcio's sync server as
gpushare sets it up. Its cost per call is what any grpcio plugin pays before doing any work:
the floor under gpushare's figures.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import FrameType

import grpc

from plugin.api import HEALTHY, pb, pb_grpc

MAX_DEVICES = 100_000


class MinimalPlugin(pb_grpc.DevicePluginServicer):
    """The DevicePlugin service with no logic beyond checking IDs."""

    def __init__(self, gpus: int, replicas: int, stop: threading.Event) -> None:
        self.ids = [
            f"GPU-{g:08x}-0000-0000-0000-{g:012x}::{r}"
            for g in range(gpus)
            for r in range(replicas)
        ]
        self.known = set(self.ids)
        self.stop = stop

    def GetDevicePluginOptions(  # noqa: N802 (gRPC method name)
        self, request: pb.Empty, context: grpc.ServicerContext
    ) -> pb.DevicePluginOptions:
        """Preferred allocation offered."""
        return pb.DevicePluginOptions(get_preferred_allocation_available=True)

    def ListAndWatch(  # noqa: N802
        self, request: pb.Empty, context: grpc.ServicerContext
    ) -> Iterator[pb.ListAndWatchResponse]:
        """The list once, then nothing until the stream or the server ends."""
        yield pb.ListAndWatchResponse(devices=[pb.Device(ID=i, health=HEALTHY) for i in self.ids])
        while context.is_active() and not self.stop.wait(0.25):
            pass

    def GetPreferredAllocation(  # noqa: N802
        self, request: pb.PreferredAllocationRequest, context: grpc.ServicerContext
    ) -> pb.PreferredAllocationResponse:
        """Must-include IDs first, then the first available ones."""
        responses = []
        for req in request.container_requests:
            chosen = list(req.must_include_deviceIDs)
            for device in req.available_deviceIDs:
                if len(chosen) >= req.allocation_size:
                    break
                if device not in chosen:
                    chosen.append(device)
            responses.append(pb.ContainerPreferredAllocationResponse(deviceIDs=chosen))
        return pb.PreferredAllocationResponse(container_responses=responses)

    def Allocate(  # noqa: N802
        self, request: pb.AllocateRequest, context: grpc.ServicerContext
    ) -> pb.AllocateResponse:
        """One environment variable naming the IDs, per container."""
        if not request.container_requests:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no container requests")
        responses = []
        for req in request.container_requests:
            unknown = [d for d in req.devices_ids if d not in self.known]
            if unknown:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown device {unknown[0]!r}")
            envs = {"NVIDIA_VISIBLE_DEVICES": ",".join(req.devices_ids)}
            responses.append(pb.ContainerAllocateResponse(envs=envs))
        return pb.AllocateResponse(container_responses=responses)


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.grpcio_baseline",
                                     description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("--socket", type=Path, required=True, help="unix socket to serve on")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs (default 8)")
    parser.add_argument("--replicas", type=int, default=8, help="IDs per GPU (default 8)")
    args = parser.parse_args(argv)
    if not 1 <= args.gpus * args.replicas <= MAX_DEVICES or min(args.gpus, args.replicas) < 1:
        parser.error(f"--gpus x --replicas must be 1..{MAX_DEVICES}")
    stop = threading.Event()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    plugin = MinimalPlugin(args.gpus, args.replicas, stop)
    pb_grpc.add_DevicePluginServicer_to_server(plugin, server)
    args.socket.unlink(missing_ok=True)
    if server.add_insecure_port(f"unix://{args.socket}") == 0:
        print(f"grpcio_baseline: cannot bind {args.socket}", file=sys.stderr)
        return 1
    os.chmod(args.socket, 0o600)
    server.start()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(0.5):
        pass
    server.stop(0.2).wait(2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
