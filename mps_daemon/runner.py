"""The process seam of mps_daemon: run a command to completion, or spawn a long-lived one.

argv lists only, never a shell. `SubprocessRunner` is the real implementation; another runner
(for instance one that records argv) can be passed where a test needs to see the commands.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

MAX_OUTPUT = 1 << 20  # bytes of stdout (and of stderr) kept from one command
MAX_OUTPUT_FILE = 4 << 20  # bytes of a daemon's output file before it is moved aside


@dataclass(frozen=True)
class CommandResult:
    """Exit status and output of one finished command."""

    returncode: int
    stdout: str
    stderr: str


class Process(Protocol):
    """A spawned child (subprocess.Popen's shape)."""

    pid: int

    def poll(self) -> int | None:
        """Exit status, or None while it runs."""

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit; raises subprocess.TimeoutExpired after `timeout` seconds."""

    def terminate(self) -> None:
        """Send SIGTERM."""

    def kill(self) -> None:
        """Send SIGKILL."""


class CommandRunner(Protocol):
    """How mps_daemon starts processes."""

    def run(
        self, argv: Sequence[str], *, env: Mapping[str, str], stdin: str | None, timeout_s: float
    ) -> CommandResult:
        """Run to completion; raises OSError when argv[0] cannot be executed."""

    def spawn(self, argv: Sequence[str], *, env: Mapping[str, str], output: Path) -> Process:
        """Start a child in its own session, stdout and stderr appended to `output`."""


class SubprocessRunner:
    """CommandRunner over the subprocess module."""

    def __init__(self, *, max_output: int = MAX_OUTPUT, max_output_file: int = MAX_OUTPUT_FILE
                 ) -> None:
        self._max_output = max_output
        self._max_output_file = max_output_file

    def run(
        self, argv: Sequence[str], *, env: Mapping[str, str], stdin: str | None, timeout_s: float
    ) -> CommandResult:
        """Run to completion, keeping at most `max_output` bytes of stdout and of stderr.

        A timeout is returned as exit status 124; more output than that, as exit status 125
        (the child is killed either way, so a client that hangs or floods never holds us).
        """
        deadline = time.monotonic() + timeout_s
        with subprocess.Popen(  # noqa: S603 - argv list, no shell
            list(argv), env=dict(env), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, close_fds=True,
        ) as child:
            try:
                out, err, problem = self._collect(child, (stdin or "").encode(), deadline)
                if problem is not None and problem[0] == 124:
                    problem = 124, f"timed out after {timeout_s}s"
                if problem is None:
                    try:
                        status = child.wait(timeout=max(0.0, deadline - time.monotonic()))
                        return CommandResult(status, _text(out), _text(err))
                    except subprocess.TimeoutExpired:
                        problem = 124, f"timed out after {timeout_s}s"
            finally:
                if child.poll() is None:
                    child.kill()
                    child.wait()
        return CommandResult(problem[0], _text(out), problem[1])

    def _collect(
        self, child: subprocess.Popen[bytes], data: bytes, deadline: float
    ) -> tuple[bytes, bytes, tuple[int, str] | None]:
        """stdout and stderr until both close, the deadline passes or one grows too large."""
        assert child.stdin is not None
        assert child.stdout is not None
        assert child.stderr is not None
        with contextlib.suppress(BrokenPipeError):
            child.stdin.write(data)  # a few command lines: far below a pipe's buffer
        with contextlib.suppress(BrokenPipeError):
            child.stdin.close()
        kept = {child.stdout.fileno(): bytearray(), child.stderr.fileno(): bytearray()}
        with selectors.DefaultSelector() as selector:
            for fd in kept:
                selector.register(fd, selectors.EVENT_READ)
            while selector.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    return bytes(kept[child.stdout.fileno()]), b"", (124, "timed out")
                for key, _ in selector.select(left):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        selector.unregister(key.fd)
                        continue
                    kept[key.fd] += chunk
                    if len(kept[key.fd]) > self._max_output:
                        return bytes(kept[child.stdout.fileno()][: self._max_output]), b"", (
                            125, f"wrote more than {self._max_output:,} bytes; stopped")
        return bytes(kept[child.stdout.fileno()]), bytes(kept[child.stderr.fileno()]), None

    def spawn(self, argv: Sequence[str], *, env: Mapping[str, str], output: Path) -> Process:
        """Start a child in its own session (signals to our terminal do not reach it).

        `output` is kept to `max_output_file` bytes across starts: a larger one is moved to
        `<output>.1` first (replacing the one before). It is never opened through a link.
        """
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(output).st_size > self._max_output_file:
                os.replace(output, f"{output}.1")
        fd = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        try:
            return subprocess.Popen(  # noqa: S603 - argv list, no shell
                list(argv), env=dict(env), stdin=subprocess.DEVNULL, stdout=fd,
                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
            )
        finally:
            os.close(fd)


def _text(data: bytes) -> str:
    return data.decode(errors="replace")
