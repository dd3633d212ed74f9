"""Registration with the kubelet and the watch that re-registers when the kubelet restarts.

The kubelet deletes every socket in its directory when it starts and creates a new
`kubelet.sock`. KubeletLink watches the directory with inotify (polling every ~50 ms where
inotify is unavailable) and looks at it on every change (a cheap os.stat or two): a re-created
`kubelet.sock` or a missing socket of ours restarts our servers and registers every resource
again; while `kubelet.sock` is absent it waits, saying so in the log.
"""

from __future__ import annotations

import logging
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import grpc

from plugin.api import KUBELET_SOCKET, pb_grpc
from plugin.daemon import convert
from plugin.daemon.watch import DirectoryEvents, PollLoop

log = logging.getLogger("gpushare.kubelet")

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")
KUBELET_STEP_MS = 25  # inotify batching step: a kubelet restart is seen within ~25-50 ms
_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")


class RegistrationError(Exception):
    """The kubelet refused or did not answer a registration."""


def resource_name_problem(name: str) -> str | None:
    """Why `name` is not a valid extended resource name (`domain/name`), or None when it is."""
    domain, slash, rest = name.partition("/")
    if not slash:
        return f"resource name {name!r} has no vendor domain (expected domain/name)"
    if "kubernetes.io" in domain:
        return f"resource name {name!r} is in the kubernetes.io namespace"
    if len(domain) > 253 or not _DNS_SUBDOMAIN.fullmatch(domain):
        return f"resource name {name!r}: domain {domain!r} is not a DNS subdomain"
    if len(rest) > 63 or not _NAME.fullmatch(rest):
        return f"resource name {name!r}: {rest!r} must be <= 63 alphanumerics, '-', '_' or '.'"
    return None


def register(
    kubelet_dir: Path,
    *,
    socket_name: str,
    resource_name: str,
    preferred_allocation: bool = True,
    timeout_s: float = 2.0,
) -> None:
    """Register one resource with the kubelet listening on `<kubelet_dir>/kubelet.sock`.

    Raises:
        RegistrationError: the name is invalid, or the kubelet refused or did not answer.
    """
    problem = resource_name_problem(resource_name)
    if problem:
        raise RegistrationError(problem)
    request = convert.to_pb_register_request(
        socket_name=socket_name,
        resource_name=resource_name,
        preferred_allocation=preferred_allocation,
    )
    address = f"unix://{(kubelet_dir / KUBELET_SOCKET).resolve()}"
    with grpc.insecure_channel(address) as channel:
        try:
            pb_grpc.RegistrationStub(channel).Register(
                request, timeout=timeout_s, wait_for_ready=True
            )
        except grpc.RpcError as err:
            raise RegistrationError(
                f"registering {resource_name} ({socket_name}) with the kubelet failed: "
                f"{err.code().name}: {err.details()}"
            ) from err


def _identity(path: Path) -> tuple[tuple[int, int] | None, str]:
    """(inode, ctime) of the kubelet's socket, or None and why there is none to dial.

    A directory, FIFO or file in its place (or a symlink loop) counts as no kubelet: dialing it
    would only wait out the registration deadline each time, and delay a stop that long.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return None, "absent"
    except OSError as err:
        return None, f"unreadable ({err.strerror or err})"
    if not stat.S_ISSOCK(st.st_mode):
        return None, "not a socket"
    return (st.st_ino, st.st_ctime_ns), ""


class KubeletLink:
    """Keeps every served resource registered with the kubelet, across kubelet restarts."""

    def __init__(
        self,
        kubelet_dir: Path,
        *,
        sockets: Callable[[], Mapping[str, str]],
        restart_servers: Callable[[Sequence[str]], None],
        poll_s: float = 0.05,
        retry_s: float = 0.5,
        max_retry_s: float = 30.0,
        register_timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        inotify: bool = True,
        on_registered: Callable[[str], None] | None = None,
    ) -> None:
        self.kubelet_dir = kubelet_dir
        self._sockets = sockets
        self._restart_servers = restart_servers
        self._retry_s = retry_s
        self._max_retry_s = max_retry_s
        self._register_timeout_s = register_timeout_s
        self._clock = clock
        self._pending: set[str] = set()
        self._registered: set[str] = set()  # registered, and not asked to register again since
        self._retry_at: dict[str, float] = {}
        self._failures: dict[str, tuple[int, str]] = {}  # name -> (failed attempts, last error)
        self._lock = threading.Condition()
        self._on_registered = on_registered
        self._loop = PollLoop("kubelet-watch", self.poll_once, poll_s=poll_s, delay_first=False)
        self._events = DirectoryEvents(
            kubelet_dir, self._loop, poll_s=poll_s, step_ms=KUBELET_STEP_MS, inotify=inotify
        )
        self._kubelet: tuple[int, int] | None = None
        self._kubelet_lost = False
        self._lost_problem = ""  # why kubelet.sock cannot be dialed, as last logged
        self._restart_reason = ""  # the last restart reason logged, so a repeat is not
        self.registrations = 0

    def request(self, names: Iterable[str]) -> None:
        """Register these resources as soon as the kubelet is there."""
        names = list(names)
        with self._lock:
            self._pending.update(names)
            self._registered.difference_update(names)
            for name in names:  # new circumstances: try now, backoff from the start
                self._retry_at.pop(name, None)
                self._failures.pop(name, None)
        if names and self._events.using_inotify:  # polling finds them soon anyway
            self._loop.wake()

    def forget(self, names: Iterable[str]) -> None:
        """Stop trying to register these resources (they are no longer served)."""
        names = list(names)
        with self._lock:
            self._pending.difference_update(names)
            self._registered.difference_update(names)
            for name in names:
                self._retry_at.pop(name, None)
                self._failures.pop(name, None)
            self._lock.notify_all()

    def wait_registered(self, timeout_s: float) -> bool:
        """Wait until every served resource is registered; False when time ran out."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._pending, timeout=timeout_s)

    def unregistered(self, names: Iterable[str]) -> list[str]:
        """Those of `names` not registered with the kubelet now (in the order given)."""
        with self._lock:
            return [n for n in names if n not in self._registered]

    @property
    def kubelet_present(self) -> bool:
        """False from the moment `kubelet.sock` was seen missing until it is seen again."""
        return not self._kubelet_lost

    @property
    def alive(self) -> bool:
        """True while the watch threads run."""
        return self._events.alive

    def start(self) -> None:
        """Start the watch threads; every resource then served is registered."""
        self.request(self._sockets())
        self._events.start()

    def stop(self) -> None:
        """Stop the watch threads; safe to call twice."""
        self._events.stop()

    def poll_once(self) -> None:
        """One look at the kubelet directory: restart and re-register when needed."""
        current, problem = _identity(self.kubelet_dir / KUBELET_SOCKET)
        if current is None:
            if not self._kubelet_lost or problem != self._lost_problem:
                log.info("%s %s in %s: waiting for the kubelet", KUBELET_SOCKET, problem,
                         self.kubelet_dir)
                self._kubelet_lost = True
                self._lost_problem = problem
            return
        missing = self._missing_resources()
        recreated = self._kubelet is not None and (self._kubelet_lost or current != self._kubelet)
        if self._kubelet_lost:
            log.info("%s is there: registering with the kubelet", KUBELET_SOCKET)
        if missing or recreated:
            self._log_restart(missing, recreated)
            if missing:
                self._restart_servers(missing)
            self.request(self._sockets())
        else:
            self._restart_reason = ""
        self._kubelet = current
        self._kubelet_lost = False
        self._register_pending()

    def _missing_resources(self) -> list[str]:
        """Resources whose socket file is gone, ignoring those a reload stopped meanwhile."""
        missing = [n for n, s in self._sockets().items() if not (self.kubelet_dir / s).exists()]
        if missing:  # read again: the served set may have changed since the first read
            served = self._sockets()
            missing = [
                n for n in missing if n in served and not (self.kubelet_dir / served[n]).exists()
            ]
        return missing

    def _log_restart(self, missing: Sequence[str], recreated: bool) -> None:
        """Say once what was seen; a repeat (a server that keeps failing to start) is debug."""
        if missing:
            reason = f"sockets of {', '.join(missing)} removed"
            action = "restarting those servers and registering again"
        else:
            reason = f"{KUBELET_SOCKET} re-created"
            action = "registering again"
        level = logging.DEBUG if reason == self._restart_reason else logging.INFO
        log.log(level, "kubelet restart seen (%s): %s", reason, action)
        self._restart_reason = reason

    def _register_pending(self) -> None:
        # The served sockets are read after the pending set: a resource a reload added and
        # requested meanwhile is found here, not forgotten for want of its socket.
        now = self._clock()
        with self._lock:
            due = sorted(n for n in self._pending if self._retry_at.get(n, 0.0) <= now)
        sockets = dict(self._sockets()) if due else {}
        for name in due:
            if name not in sockets:
                self.forget([name])
                continue
            try:
                register(self.kubelet_dir, socket_name=sockets[name], resource_name=name,
                         timeout_s=self._register_timeout_s)
            except RegistrationError as err:
                self._failed(name, str(err))
                continue
            with self._lock:
                failed, _ = self._failures.pop(name, (0, ""))
                self._pending.discard(name)
                self._registered.add(name)
                self._retry_at.pop(name, None)
                self.registrations += 1
                self._lock.notify_all()
            if self._on_registered is not None:
                self._on_registered(name)
            after = f" after {failed} failed attempts" if failed else ""
            log.info("registered %s (%s) with the kubelet%s", name, sockets[name], after,
                     extra={"resource": name})

    def _failed(self, name: str, error: str) -> None:
        """Schedule the next attempt with exponential backoff; log a new error once."""
        with self._lock:
            if name not in self._pending:  # forgotten meanwhile
                return
            count, last = self._failures.get(name, (0, ""))
            count += 1
            delay = min(self._retry_s * 2 ** (count - 1), self._max_retry_s)
            self._failures[name] = (count, error)
            self._retry_at[name] = self._clock() + delay
        level = logging.DEBUG if error == last else logging.WARNING
        log.log(level, "%s; retrying with backoff (next try in %.1fs)", error, delay)
