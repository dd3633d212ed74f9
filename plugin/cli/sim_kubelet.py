"""`gpushare sim kubelet --dir D`: the kubelet stand-in as a command, for trials by hand.

It serves `D/kubelet.sock`, accepts registrations the way the kubelet does, dials each plugin
back, reads its ListAndWatch stream, and prints every registration and every device list it
receives, until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when the command runs: grpc is slow to import for other commands
    from plugin.standin.kubelet import KubeletStandIn

SHOWN_IDS = 4  # unhealthy IDs printed per list before "…"


def register(sub: argparse._SubParsersAction) -> None:
    """Add `sim kubelet`."""
    kubelet = sub.add_parser(
        "kubelet",
        help="run a kubelet stand-in on a directory and print what it receives",
        description="Serve DIR/kubelet.sock like the kubelet: accept registrations, dial each "
        "plugin back, read its device lists and print them, until SIGINT or SIGTERM. Point "
        "`gpushare run --kubelet-dir DIR` at the same directory.",
    )
    kubelet.add_argument(
        "--dir", required=True, type=Path, metavar="DIR",
        help="the device plugin directory to serve (created if missing)",
    )
    kubelet.set_defaults(func=_kubelet)


def _describe(resource: str, devices: tuple) -> str:
    """`nvidia.com/gpu: 32 devices, 28 healthy, 4 unhealthy (GPU-…::0, …)`."""
    unhealthy = [d.id for d in devices if not d.healthy]
    text = f"{resource}: {len(devices)} devices, {len(devices) - len(unhealthy)} healthy"
    if unhealthy:
        shown = ", ".join(unhealthy[:SHOWN_IDS]) + (", …" if len(unhealthy) > SHOWN_IDS else "")
        text += f", {len(unhealthy)} unhealthy ({shown})"
    return text


def _news(standin: KubeletStandIn, registrations: int, lists: dict[str, int]) -> bool:
    """True when a registration or a device list arrived since these counts."""
    return len(standin.registrations) != registrations or any(
        len(standin.lists(r)) != lists.get(r, 0) for r in standin.resources()
    )


def _kubelet(args: argparse.Namespace) -> int:
    from plugin.standin.kubelet import KubeletStandIn

    directory: Path = args.dir
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    standin = KubeletStandIn(directory)
    print(f"kubelet stand-in serving {directory.resolve()}/kubelet.sock; Ctrl-C stops it",
          flush=True)
    registrations, lists = 0, {}  # what was printed: registrations, lists per resource
    try:
        while not stop.is_set():
            try:
                seen = (registrations, dict(lists))
                standin.wait_for(
                    lambda seen=seen: stop.is_set() or _news(standin, *seen), timeout_s=0.2
                )
            except TimeoutError:
                continue
            for reg in standin.registrations[registrations:]:
                print(f"registered {reg.resource_name} (endpoint {reg.endpoint})", flush=True)
            registrations = len(standin.registrations)
            for resource in standin.resources():
                received = standin.lists(resource)
                for item in received[lists.get(resource, 0):]:
                    print(_describe(resource, item.devices), flush=True)
                lists[resource] = len(received)
    finally:
        standin.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print("kubelet stand-in stopped", flush=True)
    return 0
