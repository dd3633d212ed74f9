"""`gpushare mig plan|apply|assert|export`: MIG layouts from mig-parted files, checked first.

Reads NVIDIA mig-parted `version: v1` files unchanged. Unlike mig-parted, every selected GPU is
checked (profiles, counts, placements) before any is touched, instances are placed explicitly,
only the GPUs that differ are changed, and every step is journalled so an interrupted apply
converges when run again.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from plugin.cli.mig_client import add_client_commands
from sharing.errors import (
    ConfigError,
    MigApplyRefused,
    MigError,
    MigJournalError,
    MigPlanError,
    NvmlError,
    SharingError,
)
from sharing.mig import MigPlan, export_config
from sharing.mig.parted import MigPartedFile
from sharing.nvml import NODE_HELP, Nvml, load_library, nvml_session
from sharing.nvml.mig_apply import (
    ApplyResult,
    StepEvent,
    apply_mig,
    load_mig_file,
    plan_mig,
)
from sharing.nvml.mig_state import read_node_mig_state

EXIT_OK = 0
EXIT_FAILED = 1  # assert: not applied; apply: a GPU failed or the node refused
EXIT_BAD_INPUT = 2  # bad file, unknown config, infeasible layout, bad journal: nothing touched
DEFAULT_STATE_DIR = Path("/var/lib/gpushare")
JOURNAL_FILE = "mig-journal.json"

DESCRIPTION = """\
Partition MIG GPUs (A100, A30, H100, H200) from NVIDIA mig-parted `version: v1` files.

  gpushare mig plan   -f mig.yaml -c all-balanced     what would change, touching nothing
  gpushare mig apply  -f mig.yaml -c all-balanced     apply it (journalled, resumable)
  gpushare mig assert -f mig.yaml -c all-balanced     exit 0 when applied, 1 with the differences
  gpushare mig export > current.yaml                  the current layout as a mig-parted file
  gpushare mig reconfigure -c all-balanced --wait     the running daemon does it as a job
  gpushare mig status                                 the daemon's jobs and schedule

Every selected GPU is checked against its own profile list (a profile name means different
things on different cards) and placed before anything is touched; GPUs already in the layout
are never touched; an interrupted apply converges when run again.
Exit status: 0 done; 1 not applied (assert) or a GPU failed / the node refused (apply);
2 bad input (file, config name, infeasible layout, journal), nothing touched.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `mig` sub-command and its own sub-commands."""
    mig = subparsers.add_parser(
        "mig",
        help="plan, apply, check and export MIG layouts (mig-parted v1 files)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = mig.add_subparsers(dest="mig_command", metavar="MIG_COMMAND", required=True)
    _add_plan(sub)
    _add_apply(sub)
    _add_assert_and_export(sub)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    plan = sub.add_parser(
        "plan",
        help="show per GPU the current and desired layout and the steps; touch nothing",
        description="Plan a config of a mig-parted file on this node: per GPU the current "
        "layout, the desired one (explicit placements) and the ordered steps. Exit 0 when "
        "the config fits every selected GPU, 2 with the reason when it does not.",
    )
    _file_args(plan)
    plan.add_argument("--format", choices=["table", "json"], default="table",
                      help="table (default) or json, for scripts")
    plan.set_defaults(func=_plan)


def _add_apply(sub: argparse._SubParsersAction) -> None:
    apply = sub.add_parser(
        "apply",
        help="apply a config: checked first, only differing GPUs, journalled",
        description="Apply a config of a mig-parted file. Every selected GPU is checked first "
        "and nothing is touched if any fails; GPUs with compute processes are refused "
        "unless --force; MIG mode changes only where it differs; GPUs already right are "
        "skipped; GPU instances are created at explicit placements with their full compute "
        "instances and read back. Every step is journalled: run it again after an "
        "interruption and it converges. Exit 0 applied, 1 a GPU failed or the node refused, "
        "2 bad input (nothing touched).",
    )
    _file_args(apply)
    apply.add_argument("--force", action="store_true",
                       help="apply to GPUs with compute processes running (NVML still refuses "
                       "to destroy instances in use)")  # fmt: skip
    apply.add_argument("--journal", type=Path, metavar="PATH",
                       help=f"journal file (default {DEFAULT_STATE_DIR / JOURNAL_FILE}; on a "
                       "simulated node, the same path under its host/ directory)")  # fmt: skip
    # Fault injection for crash-safety tests, honoured on simulated nodes only: SIGKILL this
    # process right after its K-th journal write.
    apply.add_argument("--fault-kill-after-step", type=int, metavar="K", help=argparse.SUPPRESS)
    apply.set_defaults(func=_apply)


def _add_assert_and_export(sub: argparse._SubParsersAction) -> None:
    check = sub.add_parser(
        "assert",
        help="exit 0 when a config is applied, 1 with the differences per GPU",
        description="Check that every GPU a config selects has its layout (MIG mode and the "
        "count of each profile, each a full MIG device). Exit 0 when applied, 1 listing per "
        "GPU what it has and what the config wants, 2 on bad input.",
    )
    _file_args(check)
    check.set_defaults(func=_assert)
    export = sub.add_parser(
        "export",
        help="print the current layout as a mig-parted v1 file",
        description="Print every GPU's current layout as a mig-parted `version: v1` file with"
        " one config (GPUs without MIG as mig-enabled: false; lost GPUs left out); `mig assert`"
        " accepts it.",
    )
    export.add_argument("--name", default="current", help="config name (default: current)")
    _node_arg(export)
    export.set_defaults(func=_export)
    add_client_commands(sub)  # reconfigure, status: requests to the running daemon


def _node_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--node", metavar="N|STATE_DIR", help=NODE_HELP)


def _file_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--file", required=True, type=Path, metavar="FILE",
                        help="mig-parted version: v1 file")  # fmt: skip
    parser.add_argument("-c", "--config", metavar="NAME",
                        help="config name in the file (not needed when it has one)")  # fmt: skip
    _node_arg(parser)


def _fail(command: str, err: object, code: int = EXIT_BAD_INPUT) -> int:
    """One line on stderr: `gpushare mig <command>: <reason>`."""
    print(f"gpushare mig {command}: {' '.join(str(err).split())}", file=sys.stderr)
    return code


def _read_file(args: argparse.Namespace) -> MigPartedFile:
    parsed = load_mig_file(args.file)
    parsed.select(args.config)  # an unknown config name fails before the node is read
    return parsed


def _plan_node(args: argparse.Namespace, command: str) -> MigPlan | int:
    """The plan of the chosen config on this node, or the exit status of a one-line error."""
    try:
        parsed = _read_file(args)
        with nvml_session(load_library(args.node)) as nvml:
            return plan_mig(nvml, parsed, args.config)
    except (ConfigError, MigPlanError) as err:
        return _fail(command, err)
    except SharingError as err:
        return _fail(command, f"cannot read the node: {err}", EXIT_FAILED)


def _plan(args: argparse.Namespace) -> int:
    plan = _plan_node(args, "plan")
    if isinstance(plan, int):
        return plan
    if args.format == "json":
        print(json.dumps(plan_json(plan), indent=2))
    else:
        print(render_plan(plan), end="")
    return EXIT_OK


def _assert(args: argparse.Namespace) -> int:
    plan = _plan_node(args, "assert")
    if isinstance(plan, int):
        return plan
    differences = plan.differences()
    selected = sum(1 for g in plan.gpus if g.request is not None)
    if not differences:
        print(f"config {plan.config!r} is applied on all {selected} GPUs it selects")
        return EXIT_OK
    print(f"config {plan.config!r} is not applied on {len(differences)} of {selected} GPUs:")
    for line in differences:
        print(f"  {line}")
    return EXIT_FAILED


def _export(args: argparse.Namespace) -> int:
    try:
        with nvml_session(load_library(args.node)) as nvml:
            states = read_node_mig_state(nvml)
    except SharingError as err:
        return _fail("export", f"cannot read the node: {err}", EXIT_FAILED)
    print(export_config(states, args.name), end="")
    return EXIT_OK


def _apply(args: argparse.Namespace) -> int:
    kill_after = args.fault_kill_after_step
    if kill_after is not None and args.node is None:
        return _fail("apply", "--fault-kill-after-step is for simulated nodes (--node) only")
    try:
        parsed = _read_file(args)
        lib = load_library(args.node)
        with nvml_session(lib) as nvml:
            journal = args.journal or journal_path_for(nvml)
            plan = plan_mig(nvml, parsed, args.config)
            result = apply_mig(nvml, plan, journal_path=journal, force=args.force,
                               on_step=_killer(kill_after))  # fmt: skip
    except (ConfigError, MigPlanError, MigJournalError) as err:
        return _fail("apply", err)
    except MigApplyRefused as err:
        return _fail("apply", err, EXIT_FAILED)
    except (MigError, NvmlError) as err:
        return _fail("apply", err, EXIT_FAILED)
    print(render_result(result), end="")
    return EXIT_OK if result.ok else EXIT_FAILED


def journal_path_for(nvml: Nvml) -> Path:
    """The default journal: /var/lib/gpushare/mig-journal.json under the node's host root."""
    return nvml.host.root / DEFAULT_STATE_DIR.relative_to("/") / JOURNAL_FILE


def _killer(after: int | None) -> Any:
    """The on_step hook of --fault-kill-after-step: SIGKILL this process after write `after`."""
    if after is None:
        return None

    def hook(event: StepEvent) -> None:
        if event.number >= after:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


# --- rendering -------------------------------------------------------------------------------


def render_plan(plan: MigPlan) -> str:
    """The plan as text: a summary line, then one block per GPU."""
    changed = plan.changed_gpus
    selected = [g for g in plan.gpus if g.request is not None]
    lines = [
        f"config {plan.config!r} from {plan.source}: {len(selected)} of {len(plan.gpus)} GPUs "
        f"selected, {len(changed)} to change, {len(selected) - len(changed)} already applied",
        "",
    ]
    for gpu in plan.gpus:
        if gpu.request is None:
            lines.append(f"{gpu.label}: not selected, left as it is ({gpu.current})")
            continue
        if not gpu.changed:
            lines.append(f"{gpu.label}: already applied ({gpu.current})")
            continue
        assert gpu.desired is not None
        lines += [
            f"{gpu.label}  [{gpu.entry}]",
            f"  current: {gpu.current}",
            f"  desired: {gpu.desired.describe()}",
            "  steps:",
            *(f"    {n}. {s.describe().split(': ', 1)[1]}" for n, s in enumerate(gpu.steps, 1)),
        ]
    return "\n".join(lines) + "\n"


def plan_json(plan: MigPlan) -> dict[str, Any]:
    """The plan as JSON-ready data."""
    return {
        "config": plan.config,
        "source": plan.source,
        "changed_gpus": list(plan.changed_gpus),
        "gpus": [
            {
                "index": g.index,
                "uuid": g.uuid,
                "label": g.label,
                "selected_by": g.entry,
                "current": g.current,
                "desired": None if g.desired is None else {
                    "mig_enabled": g.desired.mig_enabled,
                    "placements": [
                        {"profile": p.profile, "start": p.start, "size": p.size}
                        for p in g.desired.placements
                    ],
                },
                "steps": [s.to_json() | {"text": s.describe()} for s in g.steps],
            }
            for g in plan.gpus
        ],
    }  # fmt: skip


def render_result(result: ApplyResult) -> str:
    """Per GPU what apply did, then a summary."""
    lines = []
    if result.resumed is not None:
        lines.append(f"an interrupted apply of config {result.resumed!r} was found in the "
                     "journal; the GPUs were read again and converged")  # fmt: skip
    for gpu in result.gpus:
        if gpu.result == "applied":
            lines.append(f"{gpu.label}: applied in {gpu.steps} steps: {gpu.layout}")
        elif gpu.result == "failed":
            lines.append(f"{gpu.label}: FAILED after {gpu.steps} steps: {gpu.reason}")
        elif gpu.result == "unchanged":
            lines.append(f"{gpu.label}: already applied")
    applied, failed = len(result.changed_gpus), len(result.failed_gpus)
    state = "applied" if result.ok else "NOT fully applied"
    lines.append(f"config {result.config!r} {state}: {applied} GPUs changed, {failed} failed, "
                 f"{result.mutations} NVML changes")  # fmt: skip
    return "\n".join(lines) + "\n"
