"""A kubelet stand-in: a real Registration server that then drives plugins as the kubelet does.

It serves `kubelet.sock` in a directory, validates each RegisterRequest as the kubelet does,
dials the plugin back (GetDevicePluginOptions, then a ListAndWatch stream on its own thread,
recording every list with its time), and allocates the kubelet's way: GetPreferredAllocation
when offered, then Allocate. `restart()` behaves like a kubelet start: every socket in the
directory is deleted and a new `kubelet.sock` is created. Used by `gpushare demo` and the tests.
"""

from __future__ import annotations

import logging
import stat
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from plugin.api import API_VERSION, HEALTHY, KUBELET_SOCKET, pb, pb_grpc
from plugin.daemon import convert
from plugin.daemon.kubelet import resource_name_problem
from plugin.daemon.state import DeviceState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registration:
    """One accepted RegisterRequest, with the options the plugin answered when dialled back."""

    at: float  # time.monotonic()
    resource_name: str
    endpoint: str
    preferred_allocation: bool


@dataclass(frozen=True)
class DeviceList:
    """One ListAndWatch message as received."""

    at: float
    devices: tuple[DeviceState, ...]

    @property
    def healthy_ids(self) -> list[str]:
        """IDs of the Healthy devices, in list order."""
        return [d.id for d in self.devices if d.healthy]

    @property
    def unhealthy_ids(self) -> list[str]:
        """IDs of the Unhealthy devices, in list order."""
        return [d.id for d in self.devices if not d.healthy]


@dataclass
class Allocation:
    """What one allocation round gave: the IDs chosen per container and the plugin's answer."""

    chosen: list[list[str]]
    response: pb.AllocateResponse


@dataclass
class _Plugin:
    registration: Registration
    channel: grpc.Channel
    stub: pb_grpc.DevicePluginStub
    stream: grpc.Future | None = None
    lists: list[DeviceList] = field(default_factory=list)
    ended: bool = False  # its ListAndWatch stream ended (the plugin stopped serving)


def _from_pb(message: pb.ListAndWatchResponse) -> tuple[DeviceState, ...]:
    return tuple(
        DeviceState(
            d.ID,
            d.health == HEALTHY,
            d.topology.nodes[0].ID if d.topology.nodes else None,
        )
        for d in message.devices
    )


class KubeletStandIn(pb_grpc.RegistrationServicer):
    """A Registration server on `<dir>/kubelet.sock` plus the kubelet's calls to plugins."""

    def __init__(
        self, kubelet_dir: Path, *, dial_timeout_s: float = 5.0, autostart: bool = True
    ) -> None:
        self.kubelet_dir = Path(kubelet_dir).resolve()
        self.registrations: list[Registration] = []
        self.rejections: list[str] = []
        self._plugins: dict[str, _Plugin] = {}
        self._history: dict[str, list[DeviceList]] = {}
        self._cond = threading.Condition()
        self._server: grpc.Server | None = None
        self._dial_timeout_s = dial_timeout_s
        if autostart:
            self.start()

    # --- the Registration service -------------------------------------------------------------

    def Register(  # noqa: N802 (gRPC method name)
        self, request: pb.RegisterRequest, context: grpc.ServicerContext
    ) -> pb.Empty:
        """Validate like the kubelet, dial the plugin back and open its ListAndWatch stream."""
        problem = self._problem(request)
        if problem:
            with self._cond:
                self.rejections.append(problem)
                self._cond.notify_all()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        channel = grpc.insecure_channel(f"unix://{self.kubelet_dir / request.endpoint}")
        stub = pb_grpc.DevicePluginStub(channel)
        try:
            options = stub.GetDevicePluginOptions(
                convert.empty(), timeout=self._dial_timeout_s, wait_for_ready=True
            )
        except grpc.RpcError as err:
            channel.close()
            context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot dial {request.endpoint}: {err}")
        registration = Registration(
            time.monotonic(),
            request.resource_name,
            request.endpoint,
            options.get_preferred_allocation_available,
        )
        plugin = _Plugin(registration, channel, stub)
        with self._cond:
            old = self._plugins.pop(request.resource_name, None)
            self._plugins[request.resource_name] = plugin
            self.registrations.append(registration)
            self._cond.notify_all()
        if old is not None:
            old.channel.close()
        threading.Thread(
            target=self._watch, args=(plugin,), name=f"standin-{request.endpoint}", daemon=True
        ).start()
        return convert.empty()

    def _problem(self, request: pb.RegisterRequest) -> str | None:
        """Why the kubelet would refuse this registration, or None."""
        if request.version != API_VERSION:
            return f"unsupported API version {request.version!r}, expected {API_VERSION!r}"
        endpoint = request.endpoint
        if not endpoint or "/" in endpoint:
            return f"endpoint {endpoint!r} must be a bare socket file name in the directory"
        if not (self.kubelet_dir / endpoint).exists():
            return f"endpoint {endpoint!r} does not exist in {self.kubelet_dir}"
        return resource_name_problem(request.resource_name)

    def _watch(self, plugin: _Plugin) -> None:
        """Read the plugin's ListAndWatch stream until it ends, recording every list."""
        name = plugin.registration.resource_name
        try:
            for message in plugin.stub.ListAndWatch(convert.empty()):
                received = DeviceList(time.monotonic(), _from_pb(message))
                with self._cond:
                    plugin.lists.append(received)
                    self._history.setdefault(name, []).append(received)
                    self._cond.notify_all()
        except grpc.RpcError as err:
            log.debug("ListAndWatch of %s ended: %s", name, err.code().name)
        except ValueError:  # the channel was closed (a newer registration) before the call
            log.debug("ListAndWatch of %s not opened: channel closed", name)
        with self._cond:
            plugin.ended = True
            self._cond.notify_all()

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> KubeletStandIn:
        """Serve `kubelet.sock` (replacing a stale one); does nothing when already serving."""
        if self._server is not None:
            return self
        socket = self.kubelet_dir / KUBELET_SOCKET
        socket.unlink(missing_ok=True)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_RegistrationServicer_to_server(self, server)
        server.add_insecure_port(f"unix://{socket}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        """Stop serving and close every plugin connection; safe to call twice."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(0).wait(5)
        with self._cond:
            plugins, self._plugins = list(self._plugins.values()), {}
        for plugin in plugins:
            plugin.channel.close()

    def restart(self) -> None:
        """What a starting kubelet does: delete every socket in the directory, serve anew."""
        self.stop()
        for path in self.kubelet_dir.iterdir():
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink(missing_ok=True)
        self.start()

    def __enter__(self) -> KubeletStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what the kubelet knows ---------------------------------------------------------------

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
        """Wait until `predicate()` holds (checked on every event).

        Raises:
            TimeoutError: it did not hold within `timeout_s`.
        """
        with self._cond:
            if not self._cond.wait_for(predicate, timeout=timeout_s):
                raise TimeoutError(f"condition not met within {timeout_s}s")

    def resources(self) -> list[str]:
        """Registered resource names, in registration order."""
        with self._cond:
            return list(self._plugins)

    def streaming(self) -> list[str]:
        """Resources whose plugin's ListAndWatch stream is open, in registration order."""
        with self._cond:
            return [name for name, plugin in self._plugins.items() if not plugin.ended]

    def registrations_of(self, resource_name: str) -> list[Registration]:
        """Every registration of this resource, oldest first."""
        with self._cond:
            return [r for r in self.registrations if r.resource_name == resource_name]

    def lists(self, resource_name: str) -> list[DeviceList]:
        """Every device list received for this resource across registrations, oldest first."""
        with self._cond:
            return list(self._history.get(resource_name, []))

    def latest(self, resource_name: str) -> DeviceList | None:
        """The last device list received from the current plugin of this resource."""
        with self._cond:
            plugin = self._plugins.get(resource_name)
            return plugin.lists[-1] if plugin and plugin.lists else None

    def wait_for_list(
        self, resource_name: str, predicate: Callable[[DeviceList], bool], timeout_s: float = 5.0
    ) -> DeviceList:
        """Wait for a current device list of the resource that satisfies `predicate`."""

        def ready() -> bool:
            latest = self.latest(resource_name)
            return latest is not None and predicate(latest)

        self.wait_for(ready, timeout_s)
        latest = self.latest(resource_name)
        assert latest is not None
        return latest

    # --- what the kubelet does for a pod ------------------------------------------------------

    def _stub(self, resource_name: str) -> tuple[pb_grpc.DevicePluginStub, Registration]:
        with self._cond:
            plugin = self._plugins.get(resource_name)
        if plugin is None:
            raise KeyError(f"{resource_name} is not registered")
        return plugin.stub, plugin.registration

    def allocate(self, resource_name: str, count: int, container_count: int = 1) -> Allocation:
        """Pick `count` healthy devices per container (preferred when offered), then Allocate."""
        stub, registration = self._stub(resource_name)
        latest = self.latest(resource_name)
        available = latest.healthy_ids if latest else []
        chosen: list[list[str]] = []
        for _ in range(container_count):
            if registration.preferred_allocation:
                answer = stub.GetPreferredAllocation(
                    convert.to_pb_preferred_request([(available, [], count)]), timeout=5
                )
                ids = list(answer.container_responses[0].deviceIDs)
            else:
                ids = available[:count]
            chosen.append(ids)
            available = [i for i in available if i not in ids]
        return Allocation(chosen, self.allocate_ids(resource_name, chosen))

    def allocate_ids(
        self, resource_name: str, containers: Sequence[Sequence[str]]
    ) -> pb.AllocateResponse:
        """Call Allocate with exactly these IDs per container (raises grpc.RpcError on refusal)."""
        stub, _ = self._stub(resource_name)
        return stub.Allocate(convert.to_pb_allocate_request(containers), timeout=5)
