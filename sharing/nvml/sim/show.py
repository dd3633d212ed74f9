"""A readable summary of a simulated node's current state (`gpushare sim show`)."""

from __future__ import annotations

from pathlib import Path

import pynvml

from sharing.nvml.recovery import recovery_action_name
from sharing.nvml.sim import recovery
from sharing.nvml.sim.control import load_spec
from sharing.nvml.sim.spec import COMPUTE_MODES, mig_device_uuid
from sharing.nvml.sim.state import NO_ID, StateStore

_MODE_NAMES = {value: name for name, value in COMPUTE_MODES.items()}
_EVENT_NAMES = {
    pynvml.nvmlEventTypeXidCriticalError: "XID",
    pynvml.nvmlEventTypeDoubleBitEccError: "ECC double-bit",
    pynvml.nvmlEventTypeSingleBitEccError: "ECC single-bit",
    pynvml.nvmlEventMigConfigChange: "MIG config change",
}


def _mig_mode(gpu: dict) -> str:
    names = {0: "off", 1: "on"}
    current, pending = gpu["mig_current"], gpu["mig_pending"]
    text = names[current]
    return text if current == pending else f"{text} (pending {names[pending]}, reset needed)"


def _pids(procs: list[dict]) -> str:
    return ", ".join(str(p["pid"]) for p in procs) or "-"


def show(state_dir: Path) -> str:
    """Multi-line description of the node: GPUs, MIG devices, processes, recent events."""
    spec = load_spec(state_dir)
    state = StateStore(Path(state_dir)).read()
    cuda = spec.cuda_driver_version
    lines = [
        f"node {spec.name} ({state_dir}): {len(spec.gpus)} GPUs, driver "
        f"{spec.driver_version}, CUDA {cuda // 1000}.{cuda % 1000 // 10}"
    ]
    for i, (gpu_spec, gpu) in enumerate(zip(spec.gpus, state["gpus"], strict=True)):
        card = spec.card(i)
        lost = f"  LOST ({gpu['lost_reason']})" if gpu["lost"] else ""
        mig = f"  MIG {_mig_mode(gpu)}" if card.mig_capable else ""
        action = recovery_action_name(recovery.action_of(gpu))
        if not spec.recovery_action_field:
            action = f"not reported by the driver (would be {action})"
        lines.append(
            f"GPU {i}  {card.name}  {spec.gpu_uuid(i)}  bus {gpu_spec.bus_id}  NUMA "
            f"{'-' if gpu_spec.numa_node is None else gpu_spec.numa_node}{mig}  compute "
            f"{_MODE_NAMES.get(gpu['compute_mode'], gpu['compute_mode'])}  processes: "
            f"{_pids([p for p in gpu['procs'] if p['gi'] is None])}  recovery action "
            f"{action}{lost}"
        )
        for gi in gpu["gis"]:
            profile = card.profile_by_id(gi["profile_id"])
            end = gi["start"] + profile.size - 1
            slots = str(gi["start"]) if end == gi["start"] else f"{gi['start']}-{end}"
            if not gi["cis"]:
                lines.append(f"    GI {gi['id']:<2} {profile.name:<10} slots {slots}  (no CI)")
            for ci in gi["cis"]:
                procs = [p for p in gpu["procs"] if (p["gi"], p["ci"]) == (gi["id"], ci["id"])]
                lines.append(
                    f"    GI {gi['id']:<2} CI {ci['id']}  {profile.name:<10} slots {slots}  "
                    f"{mig_device_uuid(spec.gpu_uuid(i), gi['id'], ci['id'])}  processes: "
                    f"{_pids(procs)}"
                )
    lines.append(_events_line(state["events"]))
    return "\n".join(lines)


def _events_line(events: list[dict]) -> str:
    shown = [e for e in events if e["type"] != pynvml.nvmlEventMigConfigChange][-5:]
    if not shown:
        return "events: none"
    parts = []
    for e in shown:
        where = f"GPU {e['gpu']}"
        if e["gi"] != NO_ID:
            where += f" MIG {e['gi']}:{'-' if e['ci'] == NO_ID else e['ci']}"
        parts.append(
            f"#{e['seq']} {where} {_EVENT_NAMES.get(e['type'], hex(e['type']))} {e['data']}"
        )
    return "recent events: " + "; ".join(parts)
