#!/usr/bin/env python3
"""A stand-in for `nvidia-cuda-mps-control` on machines without the NVIDIA driver.

`-f` runs the control daemon in the foreground: it writes `nvidia-cuda-mps-control.pid` into
CUDA_MPS_PIPE_DIRECTORY, listens on the unix socket `control` there (mode 0600) and logs to
`control.log` in CUDA_MPS_LOG_DIRECTORY. Any other invocation is a client: it reads commands on
stdin, sends each to the daemon found through CUDA_MPS_PIPE_DIRECTORY, prints the answers and
exits non-zero on failure (daemon unreachable, unknown command, bad argument).

The daemon also keeps `standin-state.json` in the log directory (its pid, CUDA_VISIBLE_DEVICES,
the default limits, every command received) so tests can check what gpushare asked for.
Standard library only, so the file runs as an executable by itself.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import time

PID_FILE = "nvidia-cuda-mps-control.pid"
SOCKET_NAME = "control"
STATE_FILE = "standin-state.json"
LOG_FILE = "control.log"
_MEM_VALUE = re.compile(r"^\d+[MG]$")


class _Daemon:
    """The foreground control daemon: one command per connection, answered in order."""

    def __init__(self, pipe_dir: str, log_dir: str, visible: str | None) -> None:
        self.pipe_dir = pipe_dir
        self.log_dir = log_dir
        self.visible = visible
        self.devices = len(visible.split(",")) if visible else None
        self.thread_percentage = 100
        self.pinned: dict[str, str] = {}
        self.commands: list[str] = []
        self.running = True

    def log(self, text: str) -> None:
        """Append one line to control.log."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(os.path.join(self.log_dir, LOG_FILE), "a", encoding="utf-8") as f:
            f.write(f"[{stamp}] {text}\n")

    def save(self) -> None:
        """Write the state file atomically."""
        state = {
            "pid": os.getpid(), "visible_devices": self.visible,
            "active_thread_percentage": self.thread_percentage,
            "pinned_mem_limits": self.pinned, "commands": self.commands,
        }
        path = os.path.join(self.log_dir, STATE_FILE)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(state, f)
        os.replace(path + ".tmp", path)

    def _device(self, text: str) -> str:
        if not text.isdigit() or (self.devices is not None and int(text) >= self.devices):
            raise ValueError(f"invalid device {text!r} (visible devices: {self.visible})")
        return text

    def answer(self, line: str) -> str:
        """The output of one command; raises ValueError for a bad or unknown command."""
        words = line.split()
        name, args = words[0], words[1:]
        if name == "quit" and not args:
            self.running = False
            return ""
        if name == "get_server_list" and not args:
            return ""
        if name == "get_default_active_thread_percentage" and not args:
            return f"{self.thread_percentage:.1f}"
        if name == "set_default_active_thread_percentage" and len(args) == 1:
            value = int(args[0])
            if not 1 <= value <= 100:
                raise ValueError(f"invalid percentage {value}")
            self.thread_percentage = value
            return ""
        if name == "set_default_device_pinned_mem_limit" and len(args) == 2:
            if not _MEM_VALUE.match(args[1]):
                raise ValueError(f"invalid memory limit {args[1]!r}")
            self.pinned[self._device(args[0])] = args[1]
            return ""
        if name == "get_default_device_pinned_mem_limit" and len(args) == 1:
            return self.pinned.get(self._device(args[0]), "0M")
        raise ValueError(f"unknown command {line!r}")

    def handle(self, conn: socket.socket) -> None:
        """Read one command from a connection and write `OK`/`ERR` and the output."""
        with conn, conn.makefile("rw", encoding="utf-8") as stream:
            line = stream.readline().strip()
            if not line:
                return
            self.commands.append(line)
            self.log(f"command: {line}")
            try:
                reply = "OK\n" + self.answer(line)
            except ValueError as err:
                reply = f"ERR {err}"
            self.save()
            stream.write(reply + "\n")
            stream.flush()

    def serve(self) -> int:
        """Listen until `quit` or SIGTERM; remove the socket and pid file on the way out."""
        os.chdir(self.pipe_dir)  # bind a relative name: socket paths are limited to ~107 bytes
        if os.path.exists(SOCKET_NAME):
            os.unlink(SOCKET_NAME)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            server.bind(SOCKET_NAME)
        finally:
            os.umask(old_umask)
        os.chmod(SOCKET_NAME, 0o600)
        server.listen(16)
        server.settimeout(0.2)
        with open(PID_FILE, "w", encoding="utf-8") as f:
            f.write(f"{os.getpid()}\n")
        self.log(f"startup: pid {os.getpid()} CUDA_VISIBLE_DEVICES={self.visible}")
        self.save()
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "running", False))
        try:
            while self.running:
                try:
                    conn, _ = server.accept()
                except (TimeoutError, InterruptedError):
                    continue
                conn.settimeout(5)
                self.handle(conn)
        finally:
            server.close()
            for name in (SOCKET_NAME, PID_FILE):
                if os.path.exists(name):
                    os.unlink(name)
            self.log("exit")
        return 0


def _client(pipe_dir: str) -> int:
    """Send each stdin line to the daemon; print answers; 1 on the first failure."""
    path = os.path.join(pipe_dir, SOCKET_NAME)
    for raw in sys.stdin:
        line = raw.strip()
        if not line:
            continue
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(5)
                os.chdir(pipe_dir)
                conn.connect(SOCKET_NAME)
                conn.sendall((line + "\n").encode())
                reply = conn.makefile("r", encoding="utf-8").read()
        except OSError as err:
            print(f"Cannot find MPS control daemon process ({path}: {err})", file=sys.stderr)
            return 1
        status, _, output = reply.partition("\n")
        if status != "OK":
            print(status.removeprefix("ERR ") or "no answer", file=sys.stderr)
            return 1
        if output.strip():
            print(output.strip())
    return 0


def main(argv: list[str]) -> int:
    """`-f`: foreground daemon; no argument: client; `-d` is not supported by the stand-in."""
    pipe_dir = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    log_dir = os.environ.get("CUDA_MPS_LOG_DIRECTORY", "/var/log/nvidia-mps")
    if argv == ["-f"]:
        return _Daemon(pipe_dir, log_dir, os.environ.get("CUDA_VISIBLE_DEVICES")).serve()
    if argv:
        print(f"usage: {os.path.basename(sys.argv[0])} [-f]  (stand-in: no -d)", file=sys.stderr)
        return 2
    return _client(pipe_dir)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
