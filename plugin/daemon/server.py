"""One DevicePlugin gRPC server per resource, on a unix socket in the kubelet directory.

The servicer is thin: ListAndWatch streams NodeState snapshots, GetPreferredAllocation delegates
to sharing.allocation, Allocate to the resource's ResourceAllocator. Bad requests are
INVALID_ARGUMENT; nothing here calls NVML or touches the disk per request.

Requests arrive as bytes and are parsed here (`device_plugin_handler`), not by grpcio: when
grpcio's own deserialiser fails it answers INTERNAL, logs a traceback, and keeps every such call
alive for good (after its status is sent it starts a second status batch on the finished call;
that batch never completes, so the call, its `_RPCState` and the batch tag stay referenced:
about 15 KB per request, 157 MiB after 10,000). Parsing here answers INVALID_ARGUMENT and keeps
nothing. Requests are bounded too: at most MAX_REQUEST_BYTES on the wire, and the container,
ID-count and ID-length bounds of sharing.allocation. Refusals are logged at most
REFUSALS_LOGGED_PER_WINDOW per minute, the rest counted.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from plugin.api import pb, pb_grpc
from plugin.daemon import convert
from plugin.daemon.allocate import ResourceAllocator
from plugin.daemon.metrics import AllocateRecorder
from plugin.daemon.refusals import RateLimitedLog
from plugin.daemon.state import NodeState
from plugin.daemon.unix_socket import MAX_SOCKET_PATH, bind_private
from sharing.allocation import check_container_count, check_id_lists, preferred_allocation
from sharing.errors import InvalidRequest
from sharing.text import shorten

log = logging.getLogger("gpushare.server")

STREAM_POLL_S = 0.25  # how often an idle ListAndWatch stream checks that it is still wanted
SOCKET_MODE = 0o600
MAX_REQUEST_BYTES = 2 * 1024 * 1024  # a request naming 16,384 IDs of 55 characters is ~1 MB
SERVICE = "v1beta1.DevicePlugin"


class DevicePluginServicer(pb_grpc.DevicePluginServicer):
    """The DevicePlugin service of one resource."""

    def __init__(
        self,
        resource_name: str,
        *,
        state: NodeState,
        allocator: Callable[[str], ResourceAllocator | None],
        recorder: AllocateRecorder | None = None,
    ) -> None:
        self.resource_name = resource_name
        self._state = state
        self._allocator = allocator
        self._recorder = recorder
        self._closed = threading.Event()  # one per start: set for good when that run ends
        self.refusals = RateLimitedLog(
            log, f"refused requests for {resource_name}", extra={"resource": resource_name}
        )

    def open(self) -> None:
        """Accept streams again (a server restarted after close()).

        Streams of the earlier run keep their own, set, event: they end even when this new
        run started before they noticed.
        """
        if self._closed.is_set():
            self._closed = threading.Event()

    def close(self) -> None:
        """End open ListAndWatch streams promptly; log the count of refusals not logged yet."""
        self._closed.set()
        self._state.wake()
        self.refusals.flush()

    def parse(
        self, method: str, message_class: type[Message], raw: bytes,
        context: grpc.ServicerContext,
    ) -> Message:
        """A request parsed from its bytes; malformed bytes are INVALID_ARGUMENT."""
        try:
            return message_class.FromString(raw)
        except DecodeError:
            self._refuse(
                context, method,
                f'invalid {method} request for "{self.resource_name}": {len(raw):,} bytes that '
                f"are not a {message_class.DESCRIPTOR.full_name} message",
            )
            raise  # not reached: _refuse aborts the call

    def GetDevicePluginOptions(  # noqa: N802 (gRPC method name)
        self, request: pb.Empty, context: grpc.ServicerContext
    ) -> pb.DevicePluginOptions:
        """Preferred allocation offered; no PreStartContainer needed."""
        return convert.to_pb_options(preferred_allocation=True)

    def ListAndWatch(  # noqa: N802
        self, request: pb.Empty, context: grpc.ServicerContext
    ) -> Iterator[pb.ListAndWatchResponse]:
        """The full device list first, then again on every change of this resource's list."""
        last = 0
        closed = self._closed
        while not closed.is_set() and context.is_active():
            version, devices = self._state.wait(self.resource_name, last, STREAM_POLL_S, closed)
            if devices is None:
                return
            if version != last:
                last = version
                yield convert.to_pb_device_list(devices)

    def GetPreferredAllocation(  # noqa: N802
        self, request: pb.PreferredAllocationRequest, context: grpc.ServicerContext
    ) -> pb.PreferredAllocationResponse:
        """The preferred device IDs per container, from the Plan in memory."""
        if not request.container_requests:
            self._refuse_empty(context, "GetPreferredAllocation")
        self._check_size(
            context, "GetPreferredAllocation", request.container_requests,
            lambda req: (req.available_deviceIDs, req.must_include_deviceIDs),
        )
        plan = self._state.plan
        try:
            choices = [
                preferred_allocation(
                    plan,
                    self.resource_name,
                    list(req.available_deviceIDs),
                    list(req.must_include_deviceIDs),
                    req.allocation_size,
                )
                for req in request.container_requests
            ]
        except InvalidRequest as err:
            self._refuse(context, "GetPreferredAllocation", str(err))
        return convert.to_pb_preferred_response(choices)

    def Allocate(  # noqa: N802
        self, request: pb.AllocateRequest, context: grpc.ServicerContext
    ) -> pb.AllocateResponse:
        """One ContainerAllocateResponse per container request, in order."""
        started = time.perf_counter()
        if not request.container_requests:
            self._refuse_empty(context, "Allocate")
        self._check_size(
            context, "Allocate", request.container_requests, lambda req: (req.devices_ids,)
        )
        allocator = self._allocator(self.resource_name)
        if allocator is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, f'resource "{self.resource_name}" is gone')
        try:
            allocations = [
                allocator.allocate(list(req.devices_ids)) for req in request.container_requests
            ]
        except InvalidRequest as err:
            self._refuse(context, "Allocate", str(err))
        response = convert.to_pb_allocate_response(allocations)
        if self._recorder is not None:
            self._recorder.record(len(allocations), time.perf_counter() - started)
        return response

    def _refuse_empty(self, context: grpc.ServicerContext, method: str) -> None:
        """Refuse a request without container requests."""
        message = f'invalid {method} request for "{self.resource_name}": no container requests'
        self._refuse(context, method, message)

    def _check_size(
        self, context: grpc.ServicerContext, method: str, containers: Sequence[Message],
        id_lists: Callable[[Any], Sequence[Sequence[str]]],
    ) -> None:
        """Refuse a request past the bounds before its containers or IDs are looked at."""
        try:
            check_container_count(method, self.resource_name, len(containers))
            check_id_lists(
                method, self.resource_name, [ids for c in containers for ids in id_lists(c)]
            )
        except InvalidRequest as err:
            self._refuse(context, method, str(err))

    def _refuse(self, context: grpc.ServicerContext, method: str, message: str) -> None:
        """Abort the call with INVALID_ARGUMENT and this message (it names resource and ID)."""
        message = shorten(message, 1000)
        self.refusals.warning(f"{method} for {self.resource_name} refused: {message}")
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

    def PreStartContainer(  # noqa: N802
        self, request: pb.PreStartContainerRequest, context: grpc.ServicerContext
    ) -> pb.PreStartContainerResponse:
        """Nothing to do before a container starts."""
        return convert.pre_start_response()


def device_plugin_handler(servicer: DevicePluginServicer) -> grpc.GenericRpcHandler:
    """The DevicePlugin service with handlers that take the request bytes and parse them."""
    methods: dict[str, tuple[type[Message], type[Message]]] = {
        "GetDevicePluginOptions": (pb.Empty, pb.DevicePluginOptions),
        "GetPreferredAllocation": (pb.PreferredAllocationRequest, pb.PreferredAllocationResponse),
        "Allocate": (pb.AllocateRequest, pb.AllocateResponse),
        "PreStartContainer": (pb.PreStartContainerRequest, pb.PreStartContainerResponse),
    }
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for name, (request_class, response_class) in methods.items():
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            _parsing(servicer, name, request_class),
            request_deserializer=None,
            response_serializer=response_class.SerializeToString,
        )
    handlers["ListAndWatch"] = grpc.unary_stream_rpc_method_handler(
        _parsing(servicer, "ListAndWatch", pb.Empty),
        request_deserializer=None,
        response_serializer=pb.ListAndWatchResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


def _parsing(
    servicer: DevicePluginServicer, method: str, request_class: type[Message]
) -> Callable[[bytes, grpc.ServicerContext], object]:
    """A handler taking the request's bytes: parse, then call the servicer's method."""
    behaviour = getattr(servicer, method)

    def handle(raw: bytes, context: grpc.ServicerContext) -> object:
        return behaviour(servicer.parse(method, request_class, raw, context), context)

    return handle


def wait_until_serving(socket_path: Path, timeout_s: float) -> None:
    """Dial the socket until the DevicePlugin service answers.

    Raises:
        TimeoutError: nothing answered within `timeout_s`.
    """
    with grpc.insecure_channel(f"unix://{socket_path.resolve()}") as channel:
        try:
            pb_grpc.DevicePluginStub(channel).GetDevicePluginOptions(
                convert.empty(), timeout=timeout_s, wait_for_ready=True
            )
        except grpc.RpcError as err:
            raise TimeoutError(
                f"no DevicePlugin server answered on {socket_path} in {timeout_s}s: "
                f"{err.code().name}"
            ) from err


class PluginServer:
    """A DevicePlugin gRPC server for one resource on `<kubelet-dir>/<socket name>`."""

    def __init__(
        self, servicer: DevicePluginServicer, socket_path: Path, *, max_workers: int = 8
    ) -> None:
        self.servicer = servicer
        # The directory made absolute, the name kept: a link planted at the socket's own path
        # is replaced, never followed (resolving it made start() unlink the link's target).
        self.socket_path = Path(socket_path).parent.resolve() / Path(socket_path).name
        self._max_workers = max_workers
        self._server: grpc.Server | None = None
        self._lock = threading.Lock()

    @property
    def resource_name(self) -> str:
        """The resource this server serves."""
        return self.servicer.resource_name

    @property
    def running(self) -> bool:
        """True between start() and stop()."""
        return self._server is not None

    def start(self, ready_timeout_s: float = 5.0) -> None:
        """Bind (removing a stale socket), start, restrict the socket to its owner, dial it.

        Raises:
            OSError: the socket cannot be bound.
            TimeoutError: the server did not answer in time.
        """
        with self._lock:
            if self._server is not None:
                return
            self.socket_path.unlink(missing_ok=True)
            self.servicer.open()
            server = grpc.server(
                futures.ThreadPoolExecutor(
                    max_workers=self._max_workers,
                    thread_name_prefix=f"plugin-{self.socket_path.stem}",
                ),
                options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES)],
            )
            server.add_generic_rpc_handlers((device_plugin_handler(self.servicer),))
            self._bind_private(server)
            server.start()
            self._server = server
        wait_until_serving(self.socket_path, ready_timeout_s)

    def _bind_private(self, server: grpc.Server) -> None:
        """Bind in a fresh 0700 directory, make the socket 0600, then rename it into place.

        So the socket never exists at its path with a wider mode, whatever the umask (bound in
        place it was 0777 under umask 0 until the chmod, and any local user could connect).
        """
        size = len(os.fsencode(self.socket_path))
        if size > MAX_SOCKET_PATH:  # the short temporary path would bind; nobody could dial it
            raise OSError(f"cannot bind {self.socket_path}: the path is {size} bytes; unix "
                          f"socket paths are limited to {MAX_SOCKET_PATH}")

        def bind(temporary: Path) -> None:
            try:
                bound = server.add_insecure_port(f"unix://{temporary}")
            except RuntimeError as err:
                raise OSError(f"cannot bind {self.socket_path}: {err}") from err
            if bound == 0:
                raise OSError(f"cannot bind {self.socket_path}")

        try:
            bind_private(self.socket_path, bind, SOCKET_MODE)
        except OSError as err:
            if str(err).startswith("cannot bind"):
                raise
            raise OSError(f"cannot bind {self.socket_path}: {err.strerror or err}") from err

    def stop(self, grace_s: float = 0.2) -> None:
        """Stop serving and remove the socket; safe to call twice."""
        with self._lock:
            server, self._server = self._server, None
        if server is None:
            return
        self.servicer.close()
        # Wait for the listener to shut down before removing our socket (gRPC unlinks the
        # path it bound, the temporary one, which is gone already).
        server.stop(grace_s).wait(grace_s + 2.0)
        self.socket_path.unlink(missing_ok=True)


def create_server(
    resource_name: str,
    socket_path: Path,
    *,
    state: NodeState,
    allocator: Callable[[str], ResourceAllocator | None],
    recorder: AllocateRecorder | None = None,
) -> PluginServer:
    """A PluginServer for one resource (not started); Allocate is recorded in `recorder`."""
    servicer = DevicePluginServicer(
        resource_name, state=state, allocator=allocator, recorder=recorder
    )
    return PluginServer(servicer, socket_path)
