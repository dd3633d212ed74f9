"""gpushare's NVML edge: the one adapter over pynvml (or the simulated NVML), the inventory
reader, MIG operations and NVML events.

The library object is chosen once (`load_library`) and injected: `Nvml(lib)` is the only place
that calls it. How host files fit in: NUMA nodes and MIG capability minors are not NVML answers;
the adapter reads them from sysfs/procfs under a root directory, `/` for the real `pynvml` and the
state directory's `host/` for a simulated node (`host_root_for(lib)`), with the same code.
"""

from sharing.nvml.adapter import (
    Nvml,
    code_name,
    host_root_for,
    numa_reader_for,
    nvml_session,
    translate,
)
from sharing.nvml.events import EventWatcher, XidEvent
from sharing.nvml.host import HostFiles
from sharing.nvml.inventory import read_inventory
from sharing.nvml.library import load_library
from sharing.nvml.mig import (
    GpuInstance,
    MigBadRequest,
    MigInUse,
    MigMode,
    MigNoRoom,
    MigNotSupported,
    MigRefused,
    compute_mode,
    create_compute_instance,
    create_gpu_instance,
    create_mig_device,
    destroy_all,
    destroy_compute_instance,
    destroy_gpu_instance,
    gpu_instances,
    gpu_profiles,
    mig_mode,
    set_compute_mode,
    set_mig_mode,
)
from sharing.nvml.nodes import NODE_HELP, NODES_DIR, find_nodes_dir, shipped_nodes
from sharing.nvml.profiles import CARDS, CardModel, MigProfile, canonical_name, memory_gb

__all__ = [
    "CARDS",
    "NODES_DIR",
    "find_nodes_dir",
    "NODE_HELP",
    "CardModel",
    "EventWatcher",
    "GpuInstance",
    "HostFiles",
    "MigBadRequest",
    "MigInUse",
    "MigMode",
    "MigNoRoom",
    "MigNotSupported",
    "MigProfile",
    "MigRefused",
    "Nvml",
    "XidEvent",
    "canonical_name",
    "code_name",
    "compute_mode",
    "create_compute_instance",
    "create_gpu_instance",
    "create_mig_device",
    "destroy_all",
    "destroy_compute_instance",
    "destroy_gpu_instance",
    "gpu_instances",
    "gpu_profiles",
    "host_root_for",
    "load_library",
    "memory_gb",
    "mig_mode",
    "numa_reader_for",
    "nvml_session",
    "read_inventory",
    "set_compute_mode",
    "set_mig_mode",
    "shipped_nodes",
    "translate",
]
