"""Control of a simulated node (tests, `gpushare sim`): create, inject, lose, reset, processes.

Every change goes through the state directory's lock and atomic rewrite, so a daemon that has
the simulated library open on the same directory sees it on its next call (and an event set
waiting in nvmlEventSetWait within a few milliseconds).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pynvml

from sharing.errors import ConfigError
from sharing.nvml.adapter import code_name
from sharing.nvml.files import write_atomic
from sharing.nvml.host import MIG_MINORS, sysfs_bus_id
from sharing.nvml.nodes import node_file
from sharing.nvml.profiles import CardModel
from sharing.nvml.sim import engine, recovery
from sharing.nvml.sim.spec import COMPUTE_MODES, NodeSpec, load_node_file, parse_node
from sharing.nvml.sim.state import (
    HOST_DIR,
    LOCK_FILE,
    NODE_FILE,
    STATE_FILE,
    SimError,
    State,
    StateStore,
    append_event,
    is_state_dir,
)

FIRST_PID = 50000
_GIS_PER_GPU = 15
_CIS_PER_GI = 8


def create_state(node: str | Path, state_dir: Path) -> Path:
    """Create a state directory for a shipped node name or node YAML file; returns it."""
    source = node_file(node)
    text = source.read_text()
    spec = parse_node(text, str(source))
    state_dir = Path(state_dir)
    if is_state_dir(state_dir):
        raise SimError(f"{state_dir}: already a simulated node state directory")
    if state_dir.exists() and not state_dir.is_dir():
        raise SimError(f"{state_dir}: exists and is not a directory")
    if state_dir.exists() and any(state_dir.iterdir()):
        raise SimError(f"{state_dir}: directory exists and is not empty")
    state = initial_state(spec, str(source))
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / NODE_FILE).write_text(text)
        (state_dir / LOCK_FILE).touch()
        _write_host_files(spec, state_dir / HOST_DIR)
        write_atomic(state_dir / STATE_FILE, json.dumps(state, sort_keys=True).encode())
    except OSError as err:
        raise SimError(f"{state_dir}: cannot create the state directory: {err.strerror}") from err
    return state_dir


def initial_state(spec: NodeSpec, source: str) -> State:
    """The state a node description starts in (MIG instances created by the MIG rules)."""
    state: State = {"version": 1, "gpus": [], "events": [], "next_seq": 1, "next_pid": FIRST_PID}
    for i, gpu_spec in enumerate(spec.gpus):
        mig = gpu_spec.mig
        pending = mig.enabled if mig.pending is None else mig.pending
        gpu = {
            "lost": False,
            "lost_reason": "",
            "recovery_action": recovery.ACTION_NONE,
            "mig_current": int(mig.enabled),
            "mig_pending": int(pending),
            "compute_mode": COMPUTE_MODES[gpu_spec.compute_mode],
            "gis": [],
            "procs": [],
        }
        state["gpus"].append(gpu)
        card = spec.card(i)
        for j, inst in enumerate(mig.instances):
            where = f"{source}: gpus[{i}].mig.instances[{j}]"
            profile = card.profile_by_name(inst.profile)
            if profile is None:
                names = ", ".join(p.name for p in card.profiles)
                raise ConfigError(
                    f"{where}.profile: {card.name} has no profile {inst.profile!r} (has: {names})"
                )
            try:
                gi = engine.create_gi(card, gpu, profile.id, inst.start, profile.size)
                engine.create_ci(card, gpu, gi["id"], max(engine.ci_profiles(card, gi)))
            except pynvml.NVMLError as err:
                raise ConfigError(
                    f"{where}: {inst.profile} at start {inst.start} refused: "
                    f"{code_name(err.value)} (allowed starts "
                    f"{list(profile.starts)}, no overlap)"
                ) from err
        for k, proc in enumerate(gpu_spec.processes):
            where = f"{source}: gpus[{i}].processes[{k}]"
            gi_id, ci_id = _parse_mig(proc.mig, f"{where}.mig") if proc.mig else (None, None)
            _check_target(gpu, i, gi_id, ci_id, error=ConfigError, where=f"{where}.mig")
            _check_fits(card, gpu, i, gi_id, ci_id, proc.used_mib, error=ConfigError, where=where)
            _add_process(state, gpu, gi_id, ci_id, proc.used_mib)
    return state


def _parse_mig(text: str, where: str) -> tuple[int, int]:
    gi, sep, ci = text.partition(":")
    if not (sep and gi.isdigit() and ci.isdigit()):
        raise ConfigError(f"{where}: MIG device must be GI:CI, e.g. 1:0, got {text!r}")
    return int(gi), int(ci)


def _write_host_files(spec: NodeSpec, root: Path) -> None:
    for gpu in spec.gpus:
        sysfs = root / "sys/bus/pci/devices" / sysfs_bus_id(gpu.bus_id)
        sysfs.mkdir(parents=True, exist_ok=True)
        (sysfs / "numa_node").write_text(f"{-1 if gpu.numa_node is None else gpu.numa_node}\n")
    lines = ["config 1", "monitor 2"]
    for i in range(len(spec.gpus)):
        minor = spec.minor(i)
        base = 3 + minor * _GIS_PER_GPU * (_CIS_PER_GI + 1)
        for gi in range(_GIS_PER_GPU):
            at = base + gi * (_CIS_PER_GI + 1)
            lines.append(f"gpu{minor}/gi{gi}/access {at}")
            lines.extend(
                f"gpu{minor}/gi{gi}/ci{ci}/access {at + 1 + ci}" for ci in range(_CIS_PER_GI)
            )
    path = root / MIG_MINORS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


# -- changes ---------------------------------------------------------------------------------------
def _gpu(state: State, gpu: int) -> dict[str, Any]:
    if not 0 <= gpu < len(state["gpus"]):
        raise SimError(f"unknown GPU index {gpu}: this node has GPUs 0-{len(state['gpus']) - 1}")
    return state["gpus"][gpu]


def _check_target(
    gpu_state: dict[str, Any],
    gpu: int,
    gi: int | None,
    ci: int | None,
    error: type[Exception] = SimError,
    where: str = "",
) -> None:
    prefix = f"{where}: " if where else ""
    if gi is None:
        if gpu_state["mig_current"]:
            raise error(f"{prefix}GPU {gpu} is in MIG mode: name a MIG device as GI:CI")
        return
    if not gpu_state["mig_current"]:
        raise error(f"{prefix}GPU {gpu} is not in MIG mode: it has no MIG device {gi}:{ci}")
    existing = [f"{g['id']}:{c['id']}" for g, c in engine.mig_devices(gpu_state)]
    if ci is None and any(g["id"] == gi for g in gpu_state["gis"]):
        return
    if f"{gi}:{ci}" not in existing:
        raise error(
            f"{prefix}GPU {gpu} has no MIG device {gi}:{ci} (has: {', '.join(existing) or 'none'})"
        )


def _check_fits(
    card: CardModel,
    gpu_state: dict[str, Any],
    gpu: int,
    gi: int | None,
    ci: int | None,
    used_mib: int,
    error: type[Exception] = SimError,
    where: str = "",
) -> None:
    """Refuse a process whose memory is negative or more than its GPU / MIG device has free."""
    prefix = f"{where}: " if where else ""
    if used_mib < 0:
        raise error(f"{prefix}a process uses 0 MiB or more, got {used_mib}")
    target = f"GPU {gpu}"
    total = card.memory_mib
    if gi is not None:
        entry = next(g for g in gpu_state["gis"] if g["id"] == gi)
        total = card.profile_by_id(entry["profile_id"]).memory_mib
        target += f" MIG {gi}:{ci}"
    held = sum(p["used_mib"] for p in gpu_state["procs"] if (p["gi"], p["ci"]) == (gi, ci))
    if held + used_mib > total:
        raise error(
            f"{prefix}{target} has {total - held} MiB free of {total} MiB, "
            f"a process of {used_mib} MiB does not fit"
        )


def _check_xid(xid: int) -> None:
    if not 0 < xid < 2**64:
        raise SimError(f"an XID is a positive number, got {xid}")


def _add_process(
    state: State, gpu: dict[str, Any], gi: int | None, ci: int | None, used_mib: int
) -> int:
    pid = state["next_pid"]
    state["next_pid"] = pid + 1
    gpu["procs"].append({"pid": pid, "gi": gi, "ci": ci, "used_mib": used_mib})
    return pid


def inject_event(
    state_dir: Path,
    gpu: int,
    event_type: int,
    data: int,
    gi: int | None = None,
    ci: int | None = None,
) -> int:
    """Append an NVML event (type bit, data) for a GPU or a MIG device; returns its seq."""
    with StateStore(Path(state_dir)).mutate() as state:
        gpu_state = _gpu(state, gpu)
        if gi is not None:
            _check_target(gpu_state, gpu, gi, ci)
        return _emit(state, gpu, event_type, data, gi, ci)


def _emit(
    state: State, gpu: int, event_type: int, data: int, gi: int | None, ci: int | None
) -> int:
    """Append an event and let the driver note it in the GPU's recovery action."""
    recovery.note_event(state["gpus"][gpu], event_type, data)
    return append_event(state, gpu, event_type, data, gi, ci)


def inject_xid(
    state_dir: Path, gpu: int, xid: int, gi: int | None = None, ci: int | None = None
) -> int:
    """Emit an XID critical error event; returns its sequence number."""
    _check_xid(xid)
    return inject_event(state_dir, gpu, pynvml.nvmlEventTypeXidCriticalError, xid, gi, ci)


def inject_xids(state_dir: Path, events: Iterable[tuple[int, int, int | None, int | None]]) -> int:
    """Emit many XID events (gpu, xid, gi, ci) in one locked write, a storm; returns the last seq.

    The event log keeps the newest MAX_EVENTS entries, like a bounded driver queue: a reader that
    falls further behind than that misses the oldest.
    """
    seq = 0
    with StateStore(Path(state_dir)).mutate() as state:
        for gpu, xid, gi, ci in events:
            _check_xid(xid)
            gpu_state = _gpu(state, gpu)
            if gi is not None:
                _check_target(gpu_state, gpu, gi, ci)
            seq = _emit(state, gpu, pynvml.nvmlEventTypeXidCriticalError, xid, gi, ci)
    return seq


def lose_gpu(
    state_dir: Path, gpu: int, xid: int | None = 79, reason: str = "GPU has fallen off the bus"
) -> None:
    """Mark a GPU lost (its calls then fail with GPU_IS_LOST) and emit `xid` (79 by default).

    A lost GPU needs a reset: its recovery action becomes GPU_RESET whatever `xid` is.
    """
    if xid is not None:
        _check_xid(xid)
    with StateStore(Path(state_dir)).mutate() as state:
        gpu_state = _gpu(state, gpu)
        gpu_state["lost"] = True
        gpu_state["lost_reason"] = reason
        gpu_state["recovery_action"] = recovery.ACTION_GPU_RESET
        if xid is not None:
            _emit(state, gpu, pynvml.nvmlEventTypeXidCriticalError, xid, None, None)


def reset_gpu(state_dir: Path, gpu: int) -> None:
    """Reset a GPU: clears lost and the recovery action, applies pending MIG mode, wipes GIs/CIs."""
    with StateStore(Path(state_dir)).mutate() as state:
        engine.reset(_gpu(state, gpu))


def start_process(
    state_dir: Path, gpu: int, gi: int | None = None, ci: int | None = None, used_mib: int = 256
) -> int:
    """Start a fake compute process on a GPU or on MIG device GI:CI; returns its pid."""
    if (gi is None) != (ci is None):
        raise SimError("a MIG device needs both GI and CI ids")
    with StateStore(Path(state_dir)).mutate() as state:
        gpu_state = _gpu(state, gpu)
        if gpu_state["lost"]:
            raise SimError(f"GPU {gpu} is lost: reset it first")
        _check_target(gpu_state, gpu, gi, ci)
        _check_fits(load_spec(state_dir).card(gpu), gpu_state, gpu, gi, ci, used_mib)
        return _add_process(state, gpu_state, gi, ci, used_mib)


def stop_process(
    state_dir: Path, gpu: int, gi: int | None = None, ci: int | None = None, pid: int | None = None
) -> int:
    """Stop a fake process (the given pid, else the newest one on that GPU / MIG device)."""
    with StateStore(Path(state_dir)).mutate() as state:
        procs = _gpu(state, gpu)["procs"]
        matching = [
            p
            for p in procs
            if (pid is None or p["pid"] == pid) and (gi is None or (p["gi"], p["ci"]) == (gi, ci))
        ]
        if not matching:
            where = f"GPU {gpu}" + (f" MIG {gi}:{ci}" if gi is not None else "")
            raise SimError(f"no process{'' if pid is None else f' {pid}'} on {where}")
        procs.remove(matching[-1])
        return matching[-1]["pid"]


def load_spec(state_dir: Path) -> NodeSpec:
    """The node description of a state directory."""
    return load_node_file(Path(state_dir) / NODE_FILE)
