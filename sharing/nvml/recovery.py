"""The GPU recovery action field of NVML: its field ID, values and names.

Recent drivers tell what a GPU needs after a fault through `nvmlDeviceGetFieldValues(handle,
[NVML_FI_DEV_GET_GPU_RECOVERY_ACTION])`: none, a GPU reset, a node reboot, draining peer-to-peer
traffic, draining then resetting, and so on. Older drivers answer that one value with
NVML_ERROR_NOT_SUPPORTED. gpushare names the values by their constant's suffix in lower case.
"""

from __future__ import annotations

import pynvml

FIELD_RECOVERY_ACTION: int = getattr(pynvml, "NVML_FI_DEV_GET_GPU_RECOVERY_ACTION", 230)
ACTION_NONE: int = getattr(pynvml, "NVML_GPU_RECOVERY_ACTION_NONE", 0)
ACTION_GPU_RESET: int = getattr(pynvml, "NVML_GPU_RECOVERY_ACTION_GPU_RESET", 1)
_PREFIX = "NVML_GPU_RECOVERY_ACTION_"
_KNOWN = {0: "none", 1: "gpu_reset", 2: "node_reboot", 3: "drain_p2p", 4: "drain_and_reset"}
_NAMES = _KNOWN | {
    getattr(pynvml, name): name.removeprefix(_PREFIX).lower()
    for name in dir(pynvml)
    if name.startswith(_PREFIX)
}  # the values an older pynvml lacks, then every one this pynvml defines


def recovery_action_name(action: int) -> str:
    """`none`, `gpu_reset`, `drain_and_reset`, ... for an NVML_GPU_RECOVERY_ACTION_* value."""
    return _NAMES.get(action, f"recovery action {action}")
