"""`gpushare plan`: print what `gpushare run` would serve on a node, without serving it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any

from plugin.cli.config_file import (
    add_override_arguments,
    build_plan_from,
    config_path,
    load_config_file,
    overrides_from_args,
)
from plugin.cli.logs import describe_os_error
from sharing.config import Config, apply_overrides, default_config
from sharing.devices import Inventory
from sharing.errors import ConfigError, PlanError, SharingError
from sharing.plan_types import Plan, ResourcePlan
from sharing.ranges import index_ranges

EXIT_CONFIG = 2
EXIT_NODE = 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `plan` sub-command."""
    parser = subparsers.add_parser(
        "plan",
        help="print the resources, virtual devices, MPS limits and labels a config gives",
        description="Print what `gpushare run` would serve on this node (or a simulated "
        "node) with a config: per resource the strategy, physical parents, virtual devices, "
        "MPS limits, and the node labels. Exit status 2 for a bad config, 1 when the node "
        "cannot be read.",
    )
    parser.add_argument("--config", metavar="FILE", help="config file (default: $CONFIG_FILE)")
    parser.add_argument(
        "--node",
        metavar="NAME|PATH",
        help="simulated node: a name from configs/nodes/ (e.g. dgx-a100), a node file, or a"
        " simulator state directory (default: this machine's GPUs through NVML)",
    )
    parser.add_argument("--format", choices=["table", "json"], default="table",
                        help="table (default) or json, for scripts")
    add_override_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the plan and print it; 2 on a config or plan error, 1 when the node can't be read."""
    env: Mapping[str, str] = os.environ
    try:
        config = _load(args, env)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        inventory = read_node(args.node)
    except (SharingError, OSError, ValueError, LookupError) as err:
        reason = describe_os_error(err) if isinstance(err, OSError) else err
        print(f"cannot read the node: {reason}", file=sys.stderr)
        return EXIT_NODE
    try:
        plan = build_plan_from(inventory, config, config_path(args.config, env))
    except PlanError as err:
        print(f"config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    if args.format == "json":
        print(json.dumps(plan_json(plan), indent=2))
    else:
        print(render_table(plan, inventory), end="")
    return 0


def _load(args: argparse.Namespace, env: Mapping[str, str]) -> Config:
    """The config the command line names, with env and flags applied."""
    overrides = overrides_from_args(args)
    path = config_path(args.config, env)
    if path is None:
        return apply_overrides(default_config(), env, overrides)
    return load_config_file(path, env=env, overrides=overrides)


def read_node(node: str | None) -> Inventory:
    """The inventory of a simulated node, or of the real GPUs when `node` is None."""
    from sharing import nvml

    lib = nvml.load_library(node)
    with nvml.nvml_session(lib) as adapter:
        return nvml.read_inventory(adapter)


# --- rendering -------------------------------------------------------------------------------


def parents(resource: ResourcePlan) -> str:
    """Physical parents with replica counts: `GPU 0-3 x4; GPU 4-7 x8` or `MIG 0:0-6, 1:0-6`."""
    counts = dict(resource.replicas)
    runs: list[tuple[int, list[str]]] = []
    for pid in resource.physical_ids:
        count = counts.get(pid, 1)
        index_id = resource.devices_of(pid)[0].index_id
        if runs and runs[-1][0] == count:
            runs[-1][1].append(index_id)
        else:
            runs.append((count, [index_id]))
    parts = []
    for count, ids in runs:
        suffix = f" x{count}" if resource.shared else ""
        parts.append(_describe_ids(ids) + suffix)
    return "; ".join(parts)


def _describe_ids(index_ids: list[str]) -> str:
    """`GPU 0-7` for GPU indices, `MIG 0:0-6, 1:0-2` for MIG indices."""
    if all(":" not in i for i in index_ids):
        return "GPU " + index_ranges([int(i) for i in index_ids])
    by_gpu: dict[int, list[int]] = {}
    for index_id in index_ids:
        gpu, mig = index_id.split(":")
        by_gpu.setdefault(int(gpu), []).append(int(mig))
    return "MIG " + ", ".join(f"{g}:{index_ranges(m)}" for g, m in by_gpu.items())


def abridged_ids(resource: ResourcePlan) -> str:
    """`first … last (count)` for long lists, every ID for short ones."""
    ids = [d.id for d in resource.devices]
    if len(ids) <= 2:
        return ", ".join(ids)
    return f"{ids[0]} … {ids[-1]} ({len(ids)})"


def _mps_lines(resource: ResourcePlan) -> list[str]:
    """The MPS limits of a resource, if it has any."""
    spec = resource.mps
    if spec is None:
        return []
    by_mib: dict[int, list[int]] = {}
    for index, mib in spec.pinned_mem_limit_mib:
        by_mib.setdefault(mib, []).append(index)
    if len(by_mib) == 1:
        memory = f"{next(iter(by_mib))} MiB"
    else:
        memory = ", ".join(f"{mib} MiB on GPU {index_ranges(i)}" for mib, i in by_mib.items())
    return [
        f"  mps:      per client {spec.active_thread_percentage}% of threads, pinned memory "
        f"{memory}; at most {spec.max_clients_per_gpu} clients per GPU",
        f"  mps dirs: pipe {spec.pipe_dir}, log {spec.log_dir}, shm {spec.shm_dir}",
    ]


def render_table(plan: Plan, inventory: Inventory) -> str:
    """The plan as text: a header, one block per resource, then the node labels."""
    opts = plan.options
    lines = [
        f"node: {len(inventory.gpus)} GPU{'' if len(inventory.gpus) == 1 else 's'} "
        f"({', '.join(sorted({g.name for g in inventory.gpus})) or 'none'})",
        f"flags: migStrategy={opts.mig_strategy} "
        f"deviceListStrategy={','.join(opts.device_list_strategy)} "
        f"deviceIDStrategy={opts.device_id_strategy} "
        f"allocation={opts.shared_devices_allocation_policy}",
        "",
    ]
    if not plan.resources:
        lines += ["no resources to advertise", ""]
    for res in plan.resources:
        header = f"{res.name}  [{res.strategy}]"
        if res.name != res.original_name:
            header += f"  (renamed from {res.original_name})"
        fail = "yes" if res.fail_requests_greater_than_one else "no"
        lines += [
            header,
            f"  parents:  {parents(res)}",
            f"  devices:  {len(res.devices)}"
            + (f"  (requests > 1 fail: {fail})" if res.shared else ""),
            f"  ids:      {abridged_ids(res)}",
            *_mps_lines(res),
            "",
        ]
    lines.append("labels:")
    lines += [f"  {key}={value}" for key, value in plan.labels]
    return "\n".join(lines) + "\n"


def plan_json(plan: Plan) -> Any:
    """The whole plan as JSON-ready data: public fields, labels and replicas as mappings."""
    data = _jsonable(plan)
    data["labels"] = dict(plan.labels)
    for res, item in zip(plan.resources, data["resources"], strict=True):
        item["replicas"] = dict(res.replicas)
        item["socket_name"] = res.socket_name
    return data


def _jsonable(value: Any) -> Any:
    """Dataclasses to dicts of their public fields, tuples to lists."""
    if is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _jsonable(getattr(value, f.name))
            for f in fields(value)
            if not f.name.startswith("_")
        }
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value
