"""A node's current MIG layout as a mig-parted `version: v1` file (`gpushare mig export`).

GPUs with the same layout share one entry (GPUs without MIG are listed with MIG disabled, which
they are). Only full MIG devices are counted (a GPU instance
without its full compute instance is not something a mig-parted file can ask for); such GPUs get a
comment, and the file then does not assert until the layout is applied again.
"""

from __future__ import annotations

from collections.abc import Sequence

from sharing.mig.layout import GpuMigState

DEFAULT_NAME = "current"


def export_config(gpus: Sequence[GpuMigState], name: str = DEFAULT_NAME) -> str:
    """The mig-parted text of the GPUs' current layouts, as config `name` (lost GPUs left out)."""
    groups: dict[tuple[bool, tuple[tuple[str, int], ...]], list[int]] = {}
    notes = []
    for gpu in gpus:
        if gpu.lost_reason:
            continue
        if not gpu.mig_capable:
            groups.setdefault((False, ()), []).append(gpu.index)
            continue
        counts = gpu.layout().counts()
        order = [p.name for p in gpu.profiles]
        key = (gpu.mig_current, tuple(sorted(counts.items(), key=lambda kv: order.index(kv[0]))))
        groups.setdefault(key, []).append(gpu.index)
        if gpu.mig_current and not all(gi.full for gi in gpu.instances):
            notes.append(
                f"# {gpu.label}: GPU instances without their full compute instance are not listed"
            )
        if gpu.mig_pending != gpu.mig_current:
            notes.append(f"# {gpu.label}: a MIG mode change is pending a GPU reset")
    lines = ["version: v1", "mig-configs:", f"  {_quoted(name)}:"]
    if not groups:
        lines[-1] += " []"
    for (enabled, counts), indices in sorted(groups.items(), key=lambda kv: kv[1][0]):
        lines.append(f"    - devices: [{', '.join(map(str, indices))}]")
        lines.append(f"      mig-enabled: {'true' if enabled else 'false'}")
        if enabled:
            lines.append("      mig-devices:" + ("" if counts else " {}"))
            lines += [f'        "{profile}": {count}' for profile, count in counts]
    return "\n".join(notes + lines) + "\n"


def _quoted(name: str) -> str:
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
