"""`gpushare run` (the node daemon) and `gpushare demo` (the daemon on a simulated node)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from mps_daemon import COMPUTE_MODE_POLICIES, MANAGE_COMPUTE_MODE
from plugin.api import DEFAULT_KUBELET_DIR
from plugin.cli.affinity import parse_cpu_list, pin_process
from plugin.cli.config_file import add_override_arguments, config_path, overrides_from_args
from plugin.cli.logs import describe_os_error
from plugin.daemon.cdi import CDI_SPEC_DIR_ENV, DEFAULT_SPEC_DIR
from plugin.daemon.control import DEFAULT_CONTROL_SOCKET
from plugin.daemon.metrics import DEFAULT_ADDRESS
from plugin.daemon.mig_history import DEFAULT_STATE_DIR
from sharing.errors import ConfigError, PlanError, SharingError
from sharing.text import shorten

log = logging.getLogger("gpushare.daemon")

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONFIG = 2
MPS_COMPUTE_MODE_ENV = "MPS_COMPUTE_MODE"
METRICS_ADDRESS_ENV = "METRICS_ADDRESS"
MAX_PATH_CHARS = 4096  # PATH_MAX
MAX_ERROR_CHARS = 2000  # of a start error (a config error lists up to three problems)


RUN_DESCRIPTION = """\
Serve the node's GPUs to the kubelet: one device plugin server per resource on
<kubelet-dir>/gpushare-<resource>.sock, registered with the kubelet and registered again
whenever the kubelet restarts. Editing the config file (or SIGHUP) applies the change without
a restart; a file that does not validate changes nothing and the error is logged. A reload
never delays serving or stopping: the file is read in a child process with time and memory
limits. SIGTERM or SIGINT stop cleanly and remove the sockets and the node labels file.

Metrics for Prometheus are served on --metrics-address (default :9402) at /metrics, with
/healthz (the daemon's loops run) and /readyz (every resource registered with the kubelet).
The node labels (`gpushare plan` shows them) are kept in --labels-file for
node-feature-discovery.

Exit status: 0 after a clean stop, 2 for an invalid config at start, 1 for other errors.

Config precedence: command-line flag > environment variable > file > default.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `run` and `demo` sub-commands."""
    run = subparsers.add_parser(
        "run",
        help="serve the node's GPUs to the kubelet (the daemon)",
        description=RUN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "--config",
        metavar="FILE",
        help="config file: NVIDIA device plugin `version: v1` format plus gpushare extensions"
        " (default: $CONFIG_FILE; without either, every default and no sharing)",
    )
    run.add_argument(
        "--node",
        metavar="NAME|PATH",
        help="serve a simulated node: a name from configs/nodes/ (e.g. dgx-a100), a node file,"
        " or a simulator state directory (default: this machine's GPUs through NVML)",
    )
    run.add_argument(
        "--kubelet-dir",
        metavar="DIR",
        type=Path,
        default=Path(DEFAULT_KUBELET_DIR),
        help=f"the kubelet's device plugin directory (default {DEFAULT_KUBELET_DIR})",
    )
    run.add_argument(
        "--create-kubelet-dir",
        action="store_true",
        help="create --kubelet-dir when it does not exist (for trials; a real kubelet creates it)",
    )
    run.add_argument(
        "--metrics-address",
        metavar="HOST:PORT",
        help=f"serve /metrics, /healthz and /readyz here (default: $METRICS_ADDRESS, else"
        f" {DEFAULT_ADDRESS}; :PORT listens on every interface; empty disables)",
    )
    run.add_argument(
        "--mps-control",
        metavar="PATH",
        help="the MPS control program run for each MPS resource (default: nvidia-cuda-mps-control"
        " from PATH; with --node, the stand-in mps_daemon/standin.py)",
    )
    run.add_argument(
        "--cdi-spec-dir",
        metavar="DIR",
        type=Path,
        help="where gpushare writes the CDI spec of the device names it hands out with"
        " deviceListStrategy cdi-annotations/cdi-cri (k8s.device-plugin.nvidia.com-gpu.yaml,"
        " removed on stop); must be the host's CDI directory"
        f" (default: ${CDI_SPEC_DIR_ENV}, else {DEFAULT_SPEC_DIR}; with --node, under the"
        " simulated node's host/)",
    )
    run.add_argument(
        "--mps-compute-mode",
        choices=COMPUTE_MODE_POLICIES,
        default=None,
        help="manage (default): put each MPS resource's GPUs in EXCLUSIVE_PROCESS compute mode"
        " while its control daemon runs and restore the old mode on stop; leave: never change"
        " compute modes, for nodes where the operator sets them (and shared test GPUs)"
        f" [env {MPS_COMPUTE_MODE_ENV}]",
    )
    run.add_argument(
        "--cpu-affinity",
        metavar="CPUS",
        type=parse_cpu_list,
        help="run every thread of the daemon on these CPUs (a Linux CPU list: 1, 0,2, 2-3);"
        " keeping gRPC's per-call thread hand-offs on one CPU lowers the time per Allocate"
        " (default: the CPUs the process was started with)",
    )
    run.add_argument(
        "--control-socket",
        metavar="PATH",
        help="unix socket (mode 0600; its directory is created 0700) on which `gpushare mig"
        f" reconfigure|status` reach the daemon (default {DEFAULT_CONTROL_SOCKET}; with --node"
        " DIR, DIR/host/run/gpushare/control.sock; an empty value turns it off)",
    )
    run.add_argument(
        "--state-dir",
        metavar="DIR",
        type=Path,
        help="where MIG reconfiguration jobs keep their journal and history (default"
        f" {DEFAULT_STATE_DIR}; with --node DIR, DIR/host/var/lib/gpushare; created 0700)",
    )
    add_override_arguments(run)
    run.set_defaults(func=run_command)
    _register_demo(subparsers)


def _register_demo(subparsers: argparse._SubParsersAction) -> None:
    """Add the `demo` sub-command."""
    demo = subparsers.add_parser(
        "demo",
        help="walk through registration, an allocation and a fault on a simulated node",
        description="Run the daemon on a simulated node with a kubelet stand-in in a temporary"
        " directory and print what the kubelet sees: the registered resources, an allocation"
        " and its response, an injected fault and its propagation. Exits 0.",
    )
    demo.add_argument("--node", default="dgx-a100", metavar="NAME|PATH",
                      help="simulated node (default dgx-a100)")
    demo.add_argument("--config", metavar="FILE", type=Path,
                      help="config file (default: time-slicing with 4 replicas per GPU)")
    demo.add_argument("--keep", action="store_true",
                      help="keep the temporary directory (sockets, simulator state, config)")
    demo.add_argument("--mig", action="store_true",
                      help="the MIG walkthrough instead: reconfiguration jobs requested, blocked"
                      " by a workload and fired by a schedule, swapping the advertised MIG"
                      " resources without a restart")
    demo.set_defaults(func=demo_command)


def run_command(args: argparse.Namespace) -> int:
    """Start the daemon and serve until SIGTERM/SIGINT."""
    from plugin.daemon.core import Daemon
    from sharing import nvml

    # Never create anything group- or world-writable, whatever umask we inherit: parents that
    # mkdir(parents=True) creates (of mpsRoot, the state, CDI and socket directories) get
    # 0777 & ~umask, and under umask 0 anyone could swap what we put in them.
    inherited = os.umask(0o022)
    os.umask(inherited | 0o022)
    env = dict(os.environ)
    path = config_path(args.config, env)
    metrics = args.metrics_address
    if metrics is None:
        metrics = env.get(METRICS_ADDRESS_ENV, DEFAULT_ADDRESS)
    cdi_given = args.cdi_spec_dir or env.get(CDI_SPEC_DIR_ENV)
    cdi_spec_dir = Path(cdi_given or DEFAULT_SPEC_DIR)
    try:
        check_path_lengths({
            "--config (or $CONFIG_FILE)": path, "--node": args.node,
            "--kubelet-dir": args.kubelet_dir, "--state-dir": args.state_dir,
            "--cdi-spec-dir (or $CDI_SPEC_DIR)": cdi_spec_dir, "--mps-control": args.mps_control,
        })
        if args.cpu_affinity:
            pin_process(args.cpu_affinity)
        if args.create_kubelet_dir and not args.kubelet_dir.is_dir():
            args.kubelet_dir.mkdir(mode=0o750, parents=True)
            log.info("created the kubelet directory %s", args.kubelet_dir)
        nvml_lib = nvml.load_library(args.node)
        if not cdi_given:
            cdi_spec_dir = _default_cdi_spec_dir(nvml_lib)
        daemon = Daemon(
            config_path=Path(path) if path else None,
            kubelet_dir=args.kubelet_dir,
            nvml_lib=nvml_lib,
            env=env,
            overrides=overrides_from_args(args),
            mps_control=args.mps_control,
            cdi_spec_dir=cdi_spec_dir,
            mps_compute_mode=mps_compute_mode(args.mps_compute_mode, env),
            metrics_address=metrics or None,
            node_labels=True,
        )
        _add_mig_jobs(daemon, args, nvml_lib)
        return daemon.run_forever()
    except (ConfigError, PlanError) as err:
        print(f"gpushare run: {shorten(str(err), MAX_ERROR_CHARS)}", file=sys.stderr)
        return EXIT_CONFIG
    except SharingError as err:
        print(f"gpushare run: {shorten(str(err), MAX_ERROR_CHARS)}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as err:
        print(f"gpushare run: {shorten(describe_os_error(err), MAX_ERROR_CHARS)}",
              file=sys.stderr)
        return EXIT_ERROR


def check_path_lengths(paths: Mapping[str, object]) -> None:
    """ConfigError naming the first option whose path is longer than PATH_MAX.

    Such a path can only fail, and each message naming it would carry it whole.
    """
    for option, value in paths.items():
        if value is not None and len(str(value)) > MAX_PATH_CHARS:
            raise ConfigError(f"{option}: a path of {len(str(value)):,} characters; at most "
                              f"{MAX_PATH_CHARS:,} (PATH_MAX), got {shorten(str(value))!r}")


def mps_compute_mode(flag: str | None, env: Mapping[str, str]) -> str:
    """--mps-compute-mode, else $MPS_COMPUTE_MODE, else manage.

    Raises:
        ConfigError: the environment variable holds another value.
    """
    if flag:
        return flag
    value = env.get(MPS_COMPUTE_MODE_ENV, "").strip()
    if not value:
        return MANAGE_COMPUTE_MODE
    if value not in COMPUTE_MODE_POLICIES:
        raise ConfigError(f"{MPS_COMPUTE_MODE_ENV}: must be manage or leave, got {value[:64]!r}")
    return value


def _default_cdi_spec_dir(nvml_lib: object) -> Path:
    """/var/run/cdi; for a simulated node the same path under its host/ directory (a simulator
    never writes the host's files)."""
    from sharing.nvml.sim import SimNvml
    from sharing.nvml.sim.state import HOST_DIR

    if not isinstance(nvml_lib, SimNvml):
        return DEFAULT_SPEC_DIR
    return Path(nvml_lib.state_dir) / HOST_DIR / str(DEFAULT_SPEC_DIR).lstrip("/")


def _add_mig_jobs(daemon: object, args: argparse.Namespace, nvml_lib: object) -> None:
    """MIG reconfiguration jobs: --state-dir, --control-socket (an empty value: no socket)."""
    from plugin.daemon.mig_wiring import add_mig_jobs, default_locations

    socket = args.control_socket
    default_state, default_socket = default_locations(nvml_lib)
    add_mig_jobs(
        daemon,
        state_dir=args.state_dir or default_state,
        control_socket=Path(socket or default_socket) if socket != "" else None,
        nvml_lib=nvml_lib,
        default_state_dir=args.state_dir is None,
        default_socket=socket is None,
    )


def demo_command(args: argparse.Namespace) -> int:
    """Run the demo walkthrough."""
    if args.mig:
        if args.config is not None:
            print("gpushare demo: --mig brings its own config; drop --config", file=sys.stderr)
            return EXIT_USAGE
        from plugin.cli.demo_mig import run_mig_demo

        return run_mig_demo(node=args.node, keep=args.keep)
    from plugin.cli.demo import run_demo

    return run_demo(node=args.node, config=args.config, keep=args.keep)
