"""Reading the config file for a reload, and mig-parted files for MIG jobs, in a separate
process, in bounded time and memory.

A reload or a MIG job must never delay serving or stopping, whatever the file holds. Parsing is
bounded in sharing.yaml_text, but it runs C code (libyaml, pydantic-core) that holds the GIL,
so the serving threads would still wait on it. Here it runs in a long-lived child process
(`python -m plugin.daemon.config_reader`) with its own GIL, a lower CPU priority and an
address-space limit. The daemon sends one JSON line per read and gets back either the result or
the error message:

- `{path, env, overrides}` (kind `config`, the default): the validated config as `model_dump`,
  validated again on arrival;
- `{kind: "mig", text, source, config}`: config `config` of a mig-parted file's text, parsed
  and validated (`sharing.mig.parse_mig_parted`) and sent back as `config_to_json`, whose shape
  is checked again on arrival; the daemon thread then only plans it against the node.

A read that takes longer than READ_TIMEOUT_S (the request is written within that time too), a
newer reload (`cancel()`) or stop (`close()`) kills the child; a new one is started for the
next read. The child is started by the first read (about 0.1 s), so a daemon that never reloads
never runs one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from sharing.config import OVERRIDES, Config
from sharing.errors import ConfigError, MigConfigError
from sharing.mig.parted import MigConfig, config_from_json
from sharing.text import shorten

log = logging.getLogger("gpushare.daemon")

READ_TIMEOUT_S = 5.0
CHILD_MEMORY_BYTES = 512 << 20  # address space of the child (about 40 MB after its imports)
MAX_REPLY_BYTES = 4 << 20
CHILD_NICENESS = 10
_ROOT = Path(__file__).resolve().parents[2]  # the directory holding the `plugin` package


class ReadCancelled(Exception):
    """The read was abandoned: a newer reload or stop() came first."""


def reader_command() -> list[str]:
    """The child's command line: this module run by the daemon's own interpreter."""
    return [sys.executable, "-m", "plugin.daemon.config_reader"]


class ConfigReader:
    """Reads config files in a child process; one read at a time, any number of threads."""

    def __init__(
        self, *, command: Sequence[str] | None = None, timeout_s: float = READ_TIMEOUT_S
    ) -> None:
        self._command = list(command or reader_command())
        self._timeout_s = timeout_s
        self._lock = threading.Lock()  # one read at a time
        self._state = threading.Lock()  # guards the fields below
        self._child: subprocess.Popen[bytes] | None = None
        self._reading = False
        self._cancellable = False  # the read in flight may be abandoned by cancel()
        self._cancelled = False
        self._closed = False

    def read(
        self, path: Path, *, env: Mapping[str, str], overrides: Mapping[str, object],
        cancellable: bool = False,
    ) -> Config:
        """The config at `path` with env and overrides applied, read and validated in the child.

        Only a `cancellable` read is abandoned by cancel(); close() ends any.

        Raises:
            ConfigError: the file is invalid, or the child ran out of time or memory.
            ReadCancelled: cancel() or close() ended the read.
            OSError: the child cannot be started.
        """
        request = {
            "path": str(path),
            "env": {o.env: env[o.env] for o in OVERRIDES if o.env in env},
            "overrides": dict(overrides),
        }
        reply = self._ask(request, str(path), "reading the config", ConfigError, cancellable)
        try:
            return Config.model_validate(reply.get("config"))
        except ValidationError as err:  # our own child's dump: not expected
            raise ConfigError(f"{shorten(str(path), 160)}: the config reader's answer does not "
                              f"validate ({err.error_count()} problems)") from None

    def read_mig(self, text: str, *, source: str, config: str | None) -> MigConfig:
        """Config `config` of a mig-parted file's `text` (`source` names it in errors), parsed
        and validated in the child; never abandoned by cancel(), ended by close().

        Raises:
            MigConfigError: the file is invalid or has no such config (the parser's message),
                or the child ran out of time or memory.
            ReadCancelled: close() ended the read.
            OSError: the child cannot be started.
        """
        request = {"kind": "mig", "text": text, "source": source, "config": config}
        reply = self._ask(request, source, "reading the mig-parted file", MigConfigError, False)
        try:
            return config_from_json(reply.get("mig_config"))
        except ValueError as err:  # our own child's answer: not expected
            raise MigConfigError(f"{shorten(source, 160)}: the config reader's answer does not "
                                 f"validate: {shorten(str(err), 200)}") from None

    def cancel(self) -> None:
        """Abandon the read in flight if it is cancellable (the child is killed); later reads
        go on."""
        with self._state:
            if self._reading and self._cancellable:
                self._cancelled = True
                self._kill_locked()

    def close(self) -> None:
        """Kill the child and refuse further reads; safe to call twice."""
        with self._state:
            self._closed = True
            self._cancelled = self._reading
            self._kill_locked()

    # --- internals ----------------------------------------------------------------------------

    def _ask(
        self, request: Mapping[str, Any], name: str, doing: str, error: type[ConfigError],
        cancellable: bool,
    ) -> dict[str, Any]:
        """Send one request to the child and return its reply; the child's error, a timeout or
        a garbled reply are raised as `error`, naming `name` (`doing` says what took too long).
        """
        with self._lock:
            child = self._begin(cancellable)
            try:
                reply = self._exchange(
                    child, json.dumps(request).encode() + b"\n", name, doing, error
                )
            finally:
                with self._state:
                    self._reading = False
        if not isinstance(reply, dict) or "error" in reply:
            raise error(shorten(str(reply.get("error") if isinstance(reply, dict) else
                                    reply), 1000))
        return reply

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = {"PYTHONPATH": str(_ROOT), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        return subprocess.Popen(  # our own interpreter and module, an argument list, no shell
            self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, env=env, close_fds=True,
        )

    def _begin(self, cancellable: bool) -> subprocess.Popen[bytes]:
        with self._state:
            if self._closed:
                raise ReadCancelled("the daemon is stopping")
            if self._child is None or self._child.poll() is not None:
                self._child = self._spawn()
            self._reading, self._cancellable, self._cancelled = True, cancellable, False
            return self._child

    def _exchange(
        self, child: subprocess.Popen[bytes], request: bytes, name: str, doing: str,
        error: type[ConfigError],
    ) -> Any:
        stdin, stdout = child.stdin, child.stdout
        assert stdin is not None
        assert stdout is not None
        deadline = time.monotonic() + self._timeout_s
        line = self._read_line(stdout, deadline) if _write_all(stdin, request, deadline) else None
        name = shorten(name, 160)
        if line is None:
            with self._state:
                cancelled = self._cancelled
                if self._child is child:
                    self._child = None
            _end(child)
            if cancelled:
                raise ReadCancelled(f"reading {name} was abandoned")
            raise error(
                f"{name}: {doing} took longer than {self._timeout_s:g}s or stopped "
                "its reader; nothing was applied"
            )
        try:
            return json.loads(line)
        except ValueError as err:
            with self._state:
                if self._child is child:
                    self._child = None
            _end(child)
            raise error(f"{name}: the config reader answered garbage: {err}") from None

    def _read_line(self, stream: IO[bytes], deadline: float) -> bytes | None:
        """One reply line, or None on timeout, end of stream or an oversized reply."""
        chunks: list[bytes] = []
        size = 0
        with selectors.DefaultSelector() as selector:
            selector.register(stream, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    return None
                chunk = os.read(stream.fileno(), 65536)
                if not chunk:
                    return None
                chunks.append(chunk)
                size += len(chunk)
                if chunk.endswith(b"\n"):
                    return b"".join(chunks)
                if size > MAX_REPLY_BYTES:
                    return None

    def _kill_locked(self) -> None:
        """Kill the child. A thread reading from it sees the end of its output and cleans up;
        with no read in flight the pipes are closed here."""
        child, self._child = self._child, None
        if child is None:
            return
        if self._reading:
            with contextlib.suppress(OSError):
                child.kill()
        else:
            _end(child)


def _write_all(stream: IO[bytes], data: bytes, deadline: float) -> bool:
    """Write `data` to the child's stdin by `deadline` (a child that stops reading cannot
    block the caller); False when it could not (time out, or the child died)."""
    fd = stream.fileno()
    os.set_blocking(fd, False)
    view = memoryview(data)
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_WRITE)
        while view:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                return False
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                continue
            except OSError:
                return False  # the child died; its stdout is closed too
    return True


def _end(child: subprocess.Popen[bytes]) -> None:
    """Kill a child, close its pipes and reap it."""
    with contextlib.suppress(OSError):
        child.kill()
    for stream in (child.stdin, child.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=1.0)


# --- the child ------------------------------------------------------------------------------


def _answer(request: Mapping[str, Any]) -> dict[str, object]:
    """Answer one request: a config file (the default kind) or a mig-parted file's config."""
    if request.get("kind", "config") == "mig":
        return _answer_mig(request)
    return _answer_config(request)


def _answer_mig(request: Mapping[str, Any]) -> dict[str, object]:
    """Parse a mig-parted file's text and pick one config; the reply to send back."""
    from sharing.mig.parted import config_to_json, parse_mig_parted

    source = str(request.get("source", "<mig-parted file>"))
    text, config = request.get("text"), request.get("config")
    if not isinstance(text, str) or not (config is None or isinstance(config, str)):
        return {"error": "bad request to the config reader: text and config must be strings"}
    try:
        return {"mig_config": config_to_json(parse_mig_parted(text, source=source)
                                             .select(config))}
    except MigConfigError as err:
        return {"error": str(err)}
    except Exception as err:  # noqa: BLE001 - the reply must say what happened, in one line
        return _failed(source, "mig-parted file", err)


def _answer_config(request: Mapping[str, Any]) -> dict[str, object]:
    """Read one config file; the reply to send back."""
    from plugin.cli.config_file import load_config_file

    path = str(request.get("path", ""))
    try:
        config = load_config_file(
            path, env=request.get("env", {}), overrides=request.get("overrides", {})
        )
    except ConfigError as err:
        return {"error": str(err)}
    except Exception as err:  # noqa: BLE001 - the reply must say what happened, in one line
        return _failed(path, "config", err)
    return {"config": config.model_dump(mode="json", by_alias=True, exclude_unset=True)}


def _failed(name: str, what: str, err: Exception) -> dict[str, object]:
    """The reply for a read that failed past its own checks: out of memory, or a bug."""
    if isinstance(err, MemoryError):
        return {"error": f"{shorten(name, 160)}: reading the {what} needed more than "
                         f"{CHILD_MEMORY_BYTES >> 20} MiB; nothing was applied"}
    return {"error": f"{shorten(name, 160)}: unexpected error reading the {what}: "
                     f"{type(err).__name__}: {shorten(str(err), 200)}"}


def main() -> int:
    """Serve read requests on stdin until it closes."""
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY_BYTES, CHILD_MEMORY_BYTES))
    with contextlib.suppress(OSError):
        os.nice(CHILD_NICENESS)  # serving comes first when CPUs are busy
    for line in sys.stdin.buffer:
        try:
            reply = _answer(json.loads(line))
        except ValueError as err:
            reply = {"error": f"bad request to the config reader: {err}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
