"""The control socket: permissions, newline-delimited JSON exchanges, bounds, bad requests."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from plugin.daemon.control import (
    MAX_CONNECTIONS,
    MAX_REQUEST_BYTES,
    ClientGone,
    ControlError,
    ControlServer,
    ControlUnavailable,
    Emit,
    call,
)
from tests.fakes.sockets import Trickle, short_dir


def _echo(request: dict, emit) -> dict:
    for i in range(int(request.get("events", 0))):
        emit({"event": "progress", "message": f"step {i}"})
    return {"echo": request.get("value")}


def _crash(_request: dict, _emit) -> dict:
    raise RuntimeError("handler bug")


def _refuse(_request: dict, _emit) -> dict:
    raise ControlError("refused: no such config")


def _holder(released: threading.Event, gone: list[str]) -> Callable[[dict, Emit], dict]:
    """A handler that waits for `released` as a job's watcher does: silent, asking every
    0.1 s whether its client is still there; records the clients that went away."""

    def hold(request: dict, emit: Emit) -> dict:
        while not released.wait(0.1):
            try:
                emit.check()
            except ClientGone:
                gone.append(request.get("value"))
                raise
        return {"held": request.get("value")}

    return hold


@pytest.fixture
def base() -> Iterator[Path]:
    with short_dir("gs-ctl-") as path:
        yield path


@pytest.fixture
def server(base: Path) -> Iterator[ControlServer]:
    srv = ControlServer(base / "run" / "control.sock",
                        {"echo": _echo, "crash": _crash, "refuse": _refuse},
                        request_timeout_s=0.5)
    srv.start()
    yield srv
    srv.stop()


def _raw(path: Path, payload: bytes) -> dict:
    """Send raw bytes and read the one answer line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(payload)
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


def test_socket_is_0600_in_a_new_0700_directory(server: ControlServer) -> None:
    """The socket only its owner may use; the directory created for it likewise."""
    assert stat.S_ISSOCK(os.stat(server.path).st_mode)
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(server.path.parent).st_mode) == 0o700
    assert sorted(p.name for p in server.path.parent.iterdir()) == ["control.sock"]


def test_exchange_with_progress_events(server: ControlServer) -> None:
    """Events arrive in order before the answer, which carries ok and the handler's fields."""
    seen: list[dict] = []
    answer = call(server.path, {"op": "echo", "value": "hi", "events": 3}, on_event=seen.append)
    assert answer == {"ok": True, "echo": "hi"}
    assert [e["message"] for e in seen] == ["step 0", "step 1", "step 2"]


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        pytest.param(b"not json\n", "bad request: not a JSON line: Expecting value: line 1 "
                     "column 1 (char 0)", id="not JSON"),
        pytest.param(b"[1, 2]\n", "bad request: a message must be a JSON object, got list",
                     id="not an object"),
        pytest.param(b'{"op": "format-disk"}\n',
                     'bad request: unknown op "format-disk"; known: crash, echo, refuse',
                     id="unknown op"),
        pytest.param(b'{"value": 1}\n', "bad request: unknown op null; known: crash, echo, "
                     "refuse", id="no op"),
        pytest.param(b'{"op": "echo"', "no complete request line in time", id="no newline"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000 + b"\n",
                     "bad request: JSON nested too deeply", id="nested 100,000 deep"),
        pytest.param(b'{"op": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001 + b"\n",
                     "bad request: JSON nested too deeply", id="nested object"),
        pytest.param(b'{"op": "refuse"}\n', "refused: no such config", id="handler refuses"),
        pytest.param(b'{"op": "crash"}\n', "internal error while handling crash: handler bug",
                     id="handler fails"),
    ],
)
def test_bad_requests_get_an_error_and_the_server_stays_up(
    server: ControlServer, payload: bytes, error: str
) -> None:
    """Each bad request is answered ok=false with a clear message; the next one works."""
    answer = _raw(server.path, payload)
    assert answer == {"ok": False, "error": error}
    assert call(server.path, {"op": "echo", "value": 2}) == {"ok": True, "echo": 2}


def test_oversized_request_is_refused(server: ControlServer) -> None:
    """A request line past the limit is refused without reading it all."""
    payload = b'{"op": "echo", "value": "' + b"x" * (MAX_REQUEST_BYTES + 10) + b'"}\n'
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(server.path))
        try:
            sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before we finished writing
        answer = json.loads(sock.makefile("rb").readline())
    assert answer == {"ok": False, "error": f"bad request: message longer than "
                      f"{MAX_REQUEST_BYTES} bytes"}
    assert call(server.path, {"op": "echo", "value": 3})["ok"] is True


def test_stale_socket_is_replaced_and_a_live_one_refused(base: Path) -> None:
    """A socket nobody listens on (a daemon died) is removed; a served one is not taken over."""
    path = base / "control.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens
    first = ControlServer(path, {"echo": _echo})
    first.start()
    try:
        assert call(path, {"op": "echo", "value": 1})["echo"] == 1
        second = ControlServer(path, {"echo": _echo})
        with pytest.raises(OSError, match="another process is serving the control socket"):
            second.start()
        assert call(path, {"op": "echo", "value": 2})["echo"] == 2
    finally:
        first.stop()
    assert not path.exists()


def test_path_that_is_not_a_socket_is_refused(base: Path) -> None:
    """A regular file at the path is never deleted."""
    path = base / "control.sock"
    path.write_text("keep me")
    with pytest.raises(OSError, match="exists and is not a socket"):
        ControlServer(path, {}).start()
    assert path.read_text() == "keep me"


def test_too_long_path_is_a_clear_error(base: Path) -> None:
    """Unix socket paths over 107 bytes are refused up front."""
    path = base / ("d" * 120) / "control.sock"
    with pytest.raises(OSError, match="unix socket paths are limited to 107"):
        ControlServer(path, {}).start()


def test_client_without_daemon(base: Path) -> None:
    """No daemon: a one-line error naming the socket."""
    with pytest.raises(ControlUnavailable, match=f"cannot reach the gpushare daemon at {base}"):
        call(base / "none.sock", {"op": "status"})


def test_stop_removes_only_our_socket_and_is_idempotent(server: ControlServer) -> None:
    """stop() twice is fine; the socket file is gone and clients get ControlUnavailable."""
    server.stop()
    server.stop()
    assert not server.path.exists()
    with pytest.raises(ControlUnavailable):
        call(server.path, {"op": "echo"})


def test_parallel_requests(server: ControlServer) -> None:
    """Several clients at once each get their own answer."""
    answers: dict[int, dict] = {}

    def ask(i: int) -> None:
        answers[i] = call(server.path, {"op": "echo", "value": i, "events": 2})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert answers == {i: {"ok": True, "echo": i} for i in range(8)}


def test_directory_others_can_replace_the_socket_in_is_refused(base: Path) -> None:
    """A group- or world-writable directory without the sticky bit lets another user swap
    the socket; refused. A sticky one (as /tmp) is fine."""
    shared = base / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(OSError, match=r"writable by group or others \(mode 0777\)"):
        ControlServer(shared / "control.sock", {}).start()
    assert list(shared.iterdir()) == []
    shared.chmod(0o1777)
    server = ControlServer(shared / "control.sock", {"echo": _echo})
    server.start()
    try:
        assert _raw(shared / "control.sock", b'{"op": "echo"}\n')["ok"]
    finally:
        server.stop()


def test_a_client_trickling_bytes_is_cut_off_at_the_request_timeout(
    server: ControlServer,
) -> None:
    """A byte every 0.1 s never completes a line: the 0.5 s timeout counts from the first
    byte, not from the last one, so the client is answered and dropped after about 0.5 s."""
    client = Trickle(server.path)
    client.thread.join(10)
    assert client.answer == {"ok": False, "error": "no complete request line in time"}
    assert client.answered_after is not None
    assert client.answered_after < 3.0


def test_trickling_clients_in_every_slot_do_not_lock_out_the_others(
    server: ControlServer,
) -> None:
    """MAX_CONNECTIONS clients trickling bytes hold every slot only until their timeout: a
    request a moment later is served, not refused as busy."""
    clients = [Trickle(server.path) for _ in range(MAX_CONNECTIONS)]
    time.sleep(0.3)
    deadline = time.monotonic() + 10.0
    answer = call(server.path, {"op": "echo", "value": "after"})
    while answer.get("ok") is not True and time.monotonic() < deadline:
        time.sleep(0.1)
        answer = call(server.path, {"op": "echo", "value": "after"})
    assert answer == {"ok": True, "echo": "after"}
    for client in clients:
        client.thread.join(10)
        assert client.answer == {"ok": False, "error": "no complete request line in time"}


def test_a_client_refused_as_busy_reads_why_even_with_a_large_request(base: Path) -> None:
    """With every slot taken, the daemon answers `busy` and closes at once; a client still
    sending a large request (a mig-parted file) reports that answer, not a broken pipe."""
    srv = ControlServer(base / "control.sock", {"echo": _echo}, request_timeout_s=5.0)
    srv.start()
    idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in idle:
            sock.connect(str(srv.path))
        time.sleep(0.3)  # every slot is taken by a connection that sends nothing
        answer = call(srv.path, {"op": "echo", "value": "x" * (1 << 20)})
        assert answer == {"ok": False,
                          "error": f"busy: {MAX_CONNECTIONS} requests are in progress"}
    finally:
        for sock in idle:
            sock.close()
        srv.stop()


def test_waiting_clients_that_went_away_free_their_slots(base: Path) -> None:
    """MAX_CONNECTIONS clients send a request whose handler waits silently (as for a long
    drain) and close: each slot comes back within a few seconds, not when the wait ends, so
    another request is served while the handlers would still wait. A client that stays
    connected, or only shuts down its sending side, gets its final answer."""
    released, gone = threading.Event(), []
    srv = ControlServer(base / "control.sock", {"hold": _holder(released, gone), "echo": _echo})
    srv.start()
    try:
        for i in range(MAX_CONNECTIONS):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(str(srv.path))
                sock.sendall(json.dumps({"op": "hold", "value": i}).encode() + b"\n")
        deadline = time.monotonic() + 5.0
        answer = call(srv.path, {"op": "echo", "value": "after"})
        while answer.get("ok") is not True and time.monotonic() < deadline:
            time.sleep(0.1)
            answer = call(srv.path, {"op": "echo", "value": "after"})
        assert answer == {"ok": True, "echo": "after"}
        assert not released.is_set()
        deadline = time.monotonic() + 5.0
        while len(gone) < MAX_CONNECTIONS and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(gone) == list(range(MAX_CONNECTIONS))

        stays = {}
        waiter = threading.Thread(
            target=lambda: stays.update(call(srv.path, {"op": "hold", "value": "stays"})))
        waiter.start()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as half:
            half.settimeout(5)
            half.connect(str(srv.path))
            half.sendall(b'{"op": "hold", "value": "half"}\n')
            half.shutdown(socket.SHUT_WR)
            time.sleep(0.5)  # several checks pass while both wait
            released.set()
            waiter.join(5)
            assert json.loads(half.makefile("rb").readline()) == {"ok": True, "held": "half"}
        assert stays == {"ok": True, "held": "stays"}
        assert len(gone) == MAX_CONNECTIONS
    finally:
        released.set()
        srv.stop()
