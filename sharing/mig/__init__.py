"""The MIG domain, pure: mig-parted files, profile names, placement, layout diff, export.

Nothing here calls NVML: the NVML edge (`sharing.nvml.mig_state`, `sharing.nvml.mig_apply`)
reads each GPU into a `GpuMigState`, and these functions turn a mig-parted config plus those states
into a `MigPlan` (per GPU: current, desired placements, ordered steps) or a precise refusal.
"""

from sharing.mig.diff import Step, diff
from sharing.mig.export import export_config
from sharing.mig.layout import (
    ComputeInstanceState,
    GpuInstanceState,
    GpuMigState,
    Layout,
    LayoutRequest,
    Placement,
)
from sharing.mig.names import ProfileName, parse_profile_name, resolve
from sharing.mig.parted import DeviceFilter, MigConfig, MigEntry, MigPartedFile, parse_mig_parted
from sharing.mig.plan import GpuPlan, MigPlan, desired_layout, plan_config, plan_requests
from sharing.mig.solver import Unplaceable, fits, place, slot_count

__all__ = [
    "ComputeInstanceState",
    "DeviceFilter",
    "GpuInstanceState",
    "GpuMigState",
    "GpuPlan",
    "Layout",
    "LayoutRequest",
    "MigConfig",
    "MigEntry",
    "MigPartedFile",
    "MigPlan",
    "Placement",
    "ProfileName",
    "Step",
    "Unplaceable",
    "desired_layout",
    "diff",
    "export_config",
    "fits",
    "parse_mig_parted",
    "parse_profile_name",
    "place",
    "plan_config",
    "plan_requests",
    "resolve",
    "slot_count",
]
