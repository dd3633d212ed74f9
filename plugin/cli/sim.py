"""`gpushare sim`: create and drive a simulated node that other gpushare processes share.

A state directory made by `gpushare sim create` is one simulated machine: `gpushare run --node DIR`
serves it, and the commands here change it underneath (XIDs, lost GPUs, resets, processes) as
hardware faults and workloads would. A running daemon sees each change within 100 ms.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from plugin.cli import sim_kubelet
from sharing.errors import SharingError

EXIT_USAGE = 2

DESCRIPTION = """\
Simulated nodes for trying gpushare without GPUs. Create a state directory from a shipped node
(`gpushare sim nodes` lists them) or a node YAML file, point `gpushare run|plan|demo --node DIR`
at it, and change it with the commands below while the daemon runs:

  gpushare sim create dgx-a100 --state /tmp/node
  gpushare sim kubelet --dir /tmp/kubelet      (a kubelet stand-in, in one terminal)
  gpushare run --node /tmp/node --kubelet-dir /tmp/kubelet ...   (in another terminal)
  gpushare sim inject-xid --node /tmp/node --gpu 3 --xid 79
  gpushare sim proc start --node /tmp/node --gpu 0
  gpushare sim show --node /tmp/node
"""


def _node_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--node",
        required=True,
        type=Path,
        metavar="DIR",
        help="state directory made by `gpushare sim create`",
    )


def _gpu_arg(parser: argparse.ArgumentParser, mig_help: str | None = None) -> None:
    parser.add_argument("--gpu", required=True, type=int, metavar="I", help="GPU index")
    if mig_help:
        parser.add_argument("--mig", metavar="GI:CI", help=mig_help)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `sim` sub-command and its own sub-commands."""
    sim = subparsers.add_parser(
        "sim",
        help="create and drive a simulated node (no GPU needed)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = sim.add_subparsers(dest="sim_command", metavar="SIM_COMMAND", required=True)
    _command(sub, "nodes", "list the shipped node descriptions").set_defaults(func=_nodes)
    _add_create(sub)
    _add_faults(sub)
    _add_proc_and_show(sub)
    sim_kubelet.register(sub)


def _command(
    sub: argparse._SubParsersAction, name: str, summary: str, details: str = ""
) -> argparse.ArgumentParser:
    """A sub-command whose --help starts with its one-line summary (and any details)."""
    description = f"{summary[0].upper()}{summary[1:]}." + (f" {details}" if details else "")
    return sub.add_parser(name, help=summary, description=description)


def _add_create(sub: argparse._SubParsersAction) -> None:
    create = sub.add_parser(
        "create",
        help="create a state directory from a node description",
        description="Create a simulated node's state directory from a "
        "shipped node name or a node YAML file.",
    )
    create.add_argument("node", metavar="NODE", help="shipped node name or node YAML file")
    create.add_argument(
        "--state",
        required=True,
        type=Path,
        metavar="DIR",
        help="state directory to create (must not exist or be empty)",
    )
    create.set_defaults(func=_create)


def _add_faults(sub: argparse._SubParsersAction) -> None:
    xid = sub.add_parser(
        "inject-xid",
        help="emit an XID event on a GPU or MIG device",
        description="Emit an NVML XID critical error event; daemons waiting on "
        "NVML events receive it within 100 ms.",
    )
    _node_arg(xid)
    _gpu_arg(xid, "MIG device of the event (GPU instance:compute instance), e.g. 1:0")
    xid.add_argument("--xid", required=True, type=int, metavar="N", help="XID number, e.g. 79")
    xid.set_defaults(func=_inject_xid)

    lose = _command(
        sub,
        "lose",
        "make a GPU fall off the bus (GPU_IS_LOST, XID 79)",
        "Its NVML calls then fail with GPU_IS_LOST and an XID 79 event is emitted; "
        "`gpushare sim reset` brings it back.",
    )
    _node_arg(lose)
    _gpu_arg(lose)
    lose.set_defaults(func=_lose)

    reset = _command(
        sub,
        "reset",
        "reset a GPU: clears lost, applies pending MIG mode, wipes MIG instances and processes",
    )
    _node_arg(reset)
    _gpu_arg(reset)
    reset.set_defaults(func=_reset)


def _add_proc_and_show(sub: argparse._SubParsersAction) -> None:
    proc = _command(
        sub,
        "proc",
        "start or stop a fake compute process",
        "A process holds memory on a GPU or MIG device: it keeps a GI from being destroyed "
        "and, on Ampere, leaves a MIG mode change pending until a reset.",
    )
    proc.add_argument(
        "action",
        choices=["start", "stop"],
        help="start a process, or stop one (the newest there unless --pid names it)",
    )
    _node_arg(proc)
    _gpu_arg(proc, "MIG device to run on (required on a GPU in MIG mode), e.g. 1:0")
    proc.add_argument("--pid", type=int, help="process to stop (default: the newest one there)")
    proc.add_argument(
        "--used-mib", type=int, default=256, metavar="MIB", help="memory it uses (default 256)"
    )
    proc.set_defaults(func=_proc)

    show = _command(sub, "show", "print the simulated node's GPUs, MIG devices, events")
    _node_arg(show)
    show.set_defaults(func=_show)


def _fail(message: str) -> int:
    print(f"gpushare sim: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _parse_mig(text: str | None) -> tuple[int | None, int | None]:
    if text is None:
        return None, None
    gi, sep, ci = text.partition(":")
    if not (sep and gi.isdigit() and ci.isdigit()):
        raise SharingError(f"--mig must be GI:CI (two numbers), e.g. 1:0, got {text!r}")
    return int(gi), int(ci)


def _state_dir(path: Path) -> Path:
    from sharing.nvml.sim import is_state_dir

    if not is_state_dir(path):
        raise SharingError(
            f"{path} is not a simulated node state directory; make one with "
            "`gpushare sim create NODE --state DIR`"
        )
    return path


def _guarded(action: Callable[[], None]) -> int:
    try:
        action()
    except SharingError as err:
        return _fail(str(err))
    return 0


def _nodes(args: argparse.Namespace) -> int:
    from sharing.nvml import NODES_DIR, shipped_nodes
    from sharing.nvml.sim import load_node_file

    for name in shipped_nodes():
        print(f"{name:<10} {load_node_file(NODES_DIR / f'{name}.yaml').description}")
    return 0


def _create(args: argparse.Namespace) -> int:
    from sharing.nvml.sim import create_state

    def action() -> None:
        path = create_state(args.node, args.state)
        print(f"created simulated node {args.node} in {path}")

    return _guarded(action)


def _inject_xid(args: argparse.Namespace) -> int:
    from sharing.nvml.sim import inject_xid

    def action() -> None:
        gi, ci = _parse_mig(args.mig)
        seq = inject_xid(_state_dir(args.node), args.gpu, args.xid, gi, ci)
        where = f"GPU {args.gpu}" + (f" MIG {args.mig}" if args.mig else "")
        print(f"event #{seq}: XID {args.xid} on {where}")

    return _guarded(action)


def _lose(args: argparse.Namespace) -> int:
    from sharing.nvml.sim import lose_gpu

    def action() -> None:
        lose_gpu(_state_dir(args.node), args.gpu)
        print(f"GPU {args.gpu} is lost (XID 79 emitted)")

    return _guarded(action)


def _reset(args: argparse.Namespace) -> int:
    from sharing.nvml.sim import reset_gpu

    def action() -> None:
        reset_gpu(_state_dir(args.node), args.gpu)
        print(f"GPU {args.gpu} reset")

    return _guarded(action)


def _proc(args: argparse.Namespace) -> int:
    from sharing.nvml.sim import start_process, stop_process

    def action() -> None:
        gi, ci = _parse_mig(args.mig)
        state = _state_dir(args.node)
        if args.action == "start":
            pid = start_process(state, args.gpu, gi, ci, used_mib=args.used_mib)
            print(f"started process {pid}")
        else:
            pid = stop_process(state, args.gpu, gi, ci, pid=args.pid)
            print(f"stopped process {pid}")

    return _guarded(action)


def _show(args: argparse.Namespace) -> int:
    from sharing.nvml.sim import show

    return _guarded(lambda: print(show(_state_dir(args.node))))
