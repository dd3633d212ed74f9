#!/usr/bin/env python3
"""A misbehaving `nvidia-cuda-mps-control`, for the supervisor's robustness tests.

Run as `hostile_mps.py MODE [-f]`. With `-f` it is the control daemon; without, the client.

- `silent`: the daemon writes its pid file, listens on `control` and accepts connections but
  never answers, and ignores SIGTERM; the client connects and waits for an answer forever.
- `flood`: the client writes FLOOD_BYTES to stdout without end of line, then exits 0.
- `crash`: the daemon prints one line and exits 1 at once (a crash loop).
- `brief`: the stand-in (mps_daemon/standin.py), except that its daemon dies BRIEF_S after it
  starts: it answers, then exits (a flapping daemon).

Standard library only, so the file runs by itself.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

PID_FILE = "nvidia-cuda-mps-control.pid"
FLOOD_BYTES = 64 << 20
BRIEF_S = 1.0


def _silent_daemon(pipe_dir: str) -> int:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.chdir(pipe_dir)
    if os.path.exists("control"):
        os.unlink("control")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind("control")
    server.listen(64)
    with open(PID_FILE, "w", encoding="utf-8") as f:
        f.write(f"{os.getpid()}\n")
    held = []
    while True:
        conn, _ = server.accept()
        held.append(conn)  # accepted, never answered


def _silent_client(pipe_dir: str) -> int:
    os.chdir(pipe_dir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect("control")
        conn.sendall(sys.stdin.read().encode())
        while True:
            conn.recv(1)
            time.sleep(3600)


def main(argv: list[str]) -> int:
    mode, daemon = argv[0], argv[1:] == ["-f"]
    pipe_dir = os.environ["CUDA_MPS_PIPE_DIRECTORY"]
    if mode == "silent":
        return _silent_daemon(pipe_dir) if daemon else _silent_client(pipe_dir)
    if mode == "flood" and not daemon:
        chunk = b"x" * (1 << 20)
        for _ in range(FLOOD_BYTES // len(chunk)):
            sys.stdout.buffer.write(chunk)
        return 0
    if mode == "brief":
        here = os.path.dirname(os.path.abspath(__file__))
        sys.path.insert(0, os.path.join(here, "..", "..", "mps_daemon"))
        import standin  # the file alone, not the package (which loads all of gpushare)

        if daemon:
            signal.signal(signal.SIGALRM, lambda *_: os._exit(1))
            signal.setitimer(signal.ITIMER_REAL, BRIEF_S)
        return standin.main(argv[1:])
    if mode == "crash" and daemon:
        print("hostile_mps: crashing at start", flush=True)
        return 1
    print(f"hostile_mps: {mode} {argv[1:]} not supported", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
