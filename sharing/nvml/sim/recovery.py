"""The GPU recovery action the simulated driver reports (NVML_FI_DEV_GET_GPU_RECOVERY_ACTION).

Each GPU's state holds `recovery_action` (an NVML_GPU_RECOVERY_ACTION_* value). An event after
which the hardware needs a reset sets it to GPU_RESET, as does losing the GPU; a reset sets it
back to NONE. `nvmlDeviceGetFieldValues` reads it through `fill_field_value`. A node description
may declare a driver without the field (`recovery_action_field: false`): every read then answers
NVML_ERROR_NOT_SUPPORTED in the value's own `nvmlReturn`, as older drivers do.
"""

from __future__ import annotations

import time
from typing import Any

import pynvml

from sharing.nvml.recovery import ACTION_GPU_RESET, ACTION_NONE, FIELD_RECOVERY_ACTION

# The one list of XIDs after which the simulated hardware asks for a GPU reset. It follows the
# NVIDIA XID catalog (48 double-bit ECC error, 79 GPU has fallen off the bus, 95 uncontained ECC
# error: each recovers only by resetting the GPU). It is hardware behaviour, so a node description
# cannot change it; the plugin's own reset-class XIDs are a separate setting.
RESET_REQUIRED_XIDS = frozenset({48, 79, 95})


def needs_reset(event_type: int, data: int) -> bool:
    """Whether the hardware needs a GPU reset after this NVML event (type bit, data)."""
    if event_type == pynvml.nvmlEventTypeDoubleBitEccError:
        return True  # the driver logs a double-bit ECC error as XID 48
    return event_type == pynvml.nvmlEventTypeXidCriticalError and data in RESET_REQUIRED_XIDS


def note_event(gpu: dict[str, Any], event_type: int, data: int) -> None:
    """What the driver does with its recovery action when it reports an event on this GPU."""
    if needs_reset(event_type, data):
        gpu["recovery_action"] = ACTION_GPU_RESET


def action_of(gpu: dict[str, Any]) -> int:
    """The GPU's recovery action (NONE for a state written before the field existed)."""
    return int(gpu.get("recovery_action", ACTION_NONE))


def set_field_id(value: pynvml.c_nvmlFieldValue_t, field: Any) -> None:
    """Fill fieldId (and scopeId) from a field ID or a (field ID, scope ID) pair, as pynvml does."""
    try:
        value.fieldId, value.scopeId = field
    except TypeError:
        value.fieldId = field


def fill_field_value(
    value: pynvml.c_nvmlFieldValue_t, gpu: dict[str, Any], *, supported: bool, is_mig: bool
) -> None:
    """Answer one requested field of a device: the recovery action, or NOT_SUPPORTED."""
    value.timestamp = time.time_ns() // 1000
    value.latencyUsec = 0
    if value.fieldId != FIELD_RECOVERY_ACTION or not supported or is_mig:
        value.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
        return
    value.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
    value.value.uiVal = action_of(gpu)
    value.nvmlReturn = pynvml.NVML_SUCCESS
