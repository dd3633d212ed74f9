"""The control socket: `gpushare mig reconfigure|status` talk to the running daemon over it.

A unix stream socket (mode 0600, so only the daemon's user connects; its directory is created
0700 when missing). The protocol is newline-delimited JSON, one exchange per connection:

    client -> {"op": "<name>", ...}\\n
    daemon -> {"event": ...}\\n   (zero or more progress lines, e.g. while a job runs)
    daemon -> {"ok": true, ...}\\n  or  {"ok": false, "error": "<one line>"}\\n

Every read is bounded: a request line of at most MAX_REQUEST_BYTES, read whole within
REQUEST_TIMEOUT_S (a client trickling bytes is cut off then), at most MAX_CONNECTIONS exchanges
at once. A handler that waits long (a job the client follows) calls `emit.check()` every second
or so: a client that has closed its end then ends the exchange and frees its slot, so clients
that went away cannot lock the others out. A bad request (not JSON, nested too deeply, too big,
unknown op, a handler's ControlError) gets `ok: false` with a clear message; a handler that
fails unexpectedly is logged and answered the same way. The daemon stays up either way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from plugin.daemon.unix_socket import MAX_SOCKET_PATH, bind_private

log = logging.getLogger("gpushare.control")

DEFAULT_CONTROL_SOCKET = "/run/gpushare/control.sock"
MAX_REQUEST_BYTES = 2 * 1024 * 1024  # a request carries a mig-parted file of up to 1 MiB
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
REQUEST_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 16
ACCEPT_POLL_S = 0.2

Message = dict[str, Any]


class ControlError(Exception):
    """A request the daemon refuses; the message is sent to the client as is."""


class ControlUnavailable(ControlError):
    """The client could not reach the daemon, or the daemon went away mid-answer."""


class ClientGone(ConnectionError):
    """The client closed the connection while its request was handled."""


class Emit:
    """A handler's way to its client: `emit(event)` sends a progress line; `emit.check()`
    tells whether the client is still there, for a handler that waits long between lines."""

    def __init__(self, conn: socket.socket) -> None:
        self._conn = conn
        self._poll = select.poll()
        self._poll.register(conn.fileno(), 0)  # only POLLHUP, POLLERR and POLLNVAL are reported

    def __call__(self, event: Message) -> None:
        """Send one event line (within the request timeout).

        Raises:
            OSError: the client went away or stopped reading.
        """
        self._conn.sendall(_encode(event))

    def check(self) -> None:
        """Return at once if the client is connected (a client that only shut down its
        sending side still is: it waits for the answer).

        Raises:
            ClientGone: the client closed the connection.
        """
        if self._poll.poll(0):
            raise ClientGone("the client closed the connection")


Handler = Callable[[Message, Emit], Message]


def _encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def _read_line(sock: socket.socket, limit: int, timeout_s: float) -> bytes:
    """Bytes up to the first newline (excluded), all within `timeout_s` together.

    A client that trickles bytes (one a second, say) cannot hold its slot longer than
    `timeout_s`: the deadline covers the whole line, not each read.

    Raises:
        ControlError: past `limit` bytes, or the connection closed before the newline.
        TimeoutError: no complete line within `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    line = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no complete line in time")
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            raise ControlError("connection closed before a full line arrived")
        end = chunk.find(b"\n")
        line += chunk if end < 0 else chunk[:end]
        if len(line) > limit:
            raise ControlError(f"message longer than {limit} bytes")
        if end >= 0:
            return bytes(line)


def _decode(line: bytes) -> Message:
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ControlError(f"not a JSON line: {err}") from None
    except RecursionError:
        raise ControlError("JSON nested too deeply") from None
    if not isinstance(message, dict):
        raise ControlError(f"a message must be a JSON object, got {type(message).__name__}")
    return message


def check_socket_path(path: Path) -> None:
    """Raise OSError when `path` cannot be a unix socket path (too long for sun_path)."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise OSError(
            f"control socket path {path} is {len(os.fsencode(path))} bytes; "
            f"unix socket paths are limited to {MAX_SOCKET_PATH}"
        )


def _check_directory(directory: Path) -> None:
    """Refuse a socket directory where another user could replace our socket with theirs:
    one writable by group or others, unless sticky (as /tmp: there only the owner of an
    entry may rename or remove it).

    Raises:
        OSError: saying so.
    """
    mode = stat.S_IMODE(os.stat(directory).st_mode)
    if mode & 0o022 and not mode & stat.S_ISVTX:
        raise OSError(
            f"control socket directory {directory} is writable by group or others "
            f"(mode {mode:04o}): another user could replace the socket"
        )


class ControlServer:
    """Serves the control socket on its own threads; a daemon Component (start/stop)."""

    def __init__(
        self, path: Path, handlers: Mapping[str, Handler], *,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.path = Path(path)
        self._handlers = dict(handlers)
        self._timeout_s = request_timeout_s
        self._sock: socket.socket | None = None
        self._inode: int | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def start(self) -> None:
        """Bind the socket (0600; directory 0700 when created) and accept on a thread.

        Raises:
            OSError: the path is too long, not a socket, or another daemon answers on it.
        """
        check_socket_path(self.path)
        if not self.path.parent.exists():
            try:
                self.path.parent.mkdir(mode=0o700, parents=True)
            except OSError as err:
                raise OSError(f"control socket {self.path}: cannot create its directory:"
                              f" {err.strerror or err}") from None
        _check_directory(self.path.parent)
        try:
            self._remove_stale()
        except OSError as err:
            raise self._named(err) from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._bind_private(sock)
        except OSError as err:
            sock.close()
            raise self._named(err) from None
        self._inode = os.stat(self.path).st_ino
        sock.listen(MAX_CONNECTIONS)
        sock.settimeout(ACCEPT_POLL_S)
        self._sock = sock
        self._stop.clear()
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)
        self._thread.start()
        log.info("control socket listening on %s", self.path)

    def _named(self, err: OSError) -> OSError:
        """An OS error with the socket's path in front; one of ours (it names it) as it is."""
        if err.strerror is None:
            return err
        return OSError(f"control socket {self.path}: {err.strerror}")

    def stop(self) -> None:
        """Stop accepting and remove our socket file; safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * ACCEPT_POLL_S + 1)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with contextlib.suppress(OSError):
            if self._inode is not None and os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        self._inode = None

    def _bind_private(self, sock: socket.socket) -> None:
        """Bind where nobody can reach the socket before it is 0600 (unix_socket.bind_private)."""

        def bind(temporary: Path) -> None:
            check_socket_path(temporary)
            sock.bind(str(temporary))

        bind_private(self.path, bind, 0o600)

    def _remove_stale(self) -> None:
        """Remove a socket left by a daemon that died; refuse a live one or a non-socket."""
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise OSError(f"control socket path {self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self.path))
        except OSError:
            os.unlink(self.path)  # nobody listens: left behind by a daemon that died
            return
        finally:
            probe.close()
        raise OSError(f"another process is serving the control socket {self.path}")

    def _accept_loop(self) -> None:
        assert self._sock is not None
        listener = self._sock
        while not self._stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                log.exception("control socket accept failed")
                continue
            if not self._slots.acquire(blocking=False):
                self._refuse(conn, f"busy: {MAX_CONNECTIONS} requests are in progress")
                continue
            threading.Thread(
                target=self._serve_one, args=(conn,), name="control-request", daemon=True
            ).start()

    def _refuse(self, conn: socket.socket, error: str) -> None:
        with contextlib.suppress(OSError), conn:
            conn.settimeout(self._timeout_s)
            conn.sendall(_encode({"ok": False, "error": error}))

    def _serve_one(self, conn: socket.socket) -> None:
        """One exchange: read the request, run its handler, send events and the answer."""
        try:
            with conn:
                try:
                    request = _decode(_read_line(conn, MAX_REQUEST_BYTES, self._timeout_s))
                except TimeoutError:
                    answer: Message = {"ok": False, "error": "no complete request line in time"}
                except ControlError as err:
                    answer = {"ok": False, "error": f"bad request: {err}"}
                else:
                    # A job the client waits for answers when it ends; each line sent keeps the
                    # timeout, so a client that stops reading cannot hold the handler forever.
                    conn.settimeout(self._timeout_s)
                    answer = self._dispatch(request, Emit(conn))
                conn.settimeout(self._timeout_s)
                conn.sendall(_encode(answer))
        except OSError as err:
            log.debug("control client went away: %s", err)
        finally:
            self._slots.release()

    def _dispatch(self, request: Message, emit: Emit) -> Message:
        op = request.get("op")
        handler = self._handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            known = ", ".join(sorted(self._handlers))
            shown = json.dumps(op)[:64]
            return {"ok": False, "error": f"bad request: unknown op {shown}; known: {known}"}
        try:
            answer = handler(request, emit)
        except ControlError as err:
            return {"ok": False, "error": str(err)}
        except OSError:
            raise  # the client went away while events were sent
        except Exception as err:  # noqa: BLE001 (a failed request must not take the daemon down)
            log.exception("control request %s failed", op)
            return {"ok": False, "error": f"internal error while handling {op}: {err}"}
        return {"ok": True, **answer}


def call(
    path: str | Path,
    request: Mapping[str, Any],
    *,
    on_event: Callable[[Message], None] | None = None,
    timeout_s: float | None = 30.0,
) -> Message:
    """Send one request to the daemon and return its final answer (`ok` true or false).

    Progress events go to `on_event`. `timeout_s` bounds each wait for a line (None: no bound).

    Raises:
        ControlUnavailable: no daemon answers on `path`, or it closed before answering.
        ControlError: the answer is not a JSON line or is too long.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    with sock:
        try:
            sock.connect(str(path))
        except OSError as err:
            raise ControlUnavailable(
                f"cannot reach the gpushare daemon at {path}: {err.strerror or err} (is "
                "`gpushare run` running with this --control-socket, and are you its user?)"
            ) from None
        try:
            try:
                sock.sendall(_encode(request))
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused (busy) and closed before we finished: its answer is waiting
            stream = sock.makefile("rb")
            while True:
                line = stream.readline(MAX_RESPONSE_BYTES + 1)
                if not line:
                    raise ControlUnavailable(f"the daemon at {path} closed without answering")
                if len(line) > MAX_RESPONSE_BYTES:
                    raise ControlError(f"answer longer than {MAX_RESPONSE_BYTES} bytes")
                message = _decode(line)
                if "ok" in message:
                    return message
                if on_event is not None:
                    on_event(message)
        except TimeoutError:
            raise ControlUnavailable(f"the daemon at {path} did not answer in time") from None
        except OSError as err:
            raise ControlUnavailable(f"lost the connection to {path}: {err}") from None


__all__ = [
    "DEFAULT_CONTROL_SOCKET",
    "ClientGone",
    "ControlError",
    "ControlServer",
    "ControlUnavailable",
    "Emit",
    "Handler",
    "call",
    "check_socket_path",
]
