"""NVML events of the simulated library: event sets over the state directory's event log.

Events (injected XIDs, ECC errors, MIG config changes) are appended to state.json with sequence
numbers. An event set remembers the last sequence it has seen (at creation: the newest event, so
only later events arrive, as on hardware); `nvmlEventSetWait` polls the state file every few
milliseconds until an event for a registered GPU and type arrives or the timeout passes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pynvml

from sharing.nvml.profiles import CardModel
from sharing.nvml.sim import handles
from sharing.nvml.sim.base import SimBase
from sharing.nvml.sim.engine import fail

POLL_S = 0.005
_ECC = pynvml.nvmlEventTypeSingleBitEccError | pynvml.nvmlEventTypeDoubleBitEccError


@dataclass
class _EventSet:
    last_seq: int
    masks: dict[int, int] = field(default_factory=dict)  # GPU index -> registered event types


class SimEvents(SimBase):
    """Event part of the simulated NVML."""

    def _supported_events(self, card: CardModel) -> int:
        """The card's mask as read on real hardware; else XID, ECC and MIG change by capability."""
        if card.supported_event_types is not None:
            return card.supported_event_types
        supported = pynvml.nvmlEventTypeXidCriticalError
        if card.ecc:
            supported |= _ECC
        if card.mig_capable:
            supported |= pynvml.nvmlEventMigConfigChange
        return supported

    def nvmlDeviceGetSupportedEventTypes(self, handle: object) -> int:
        """Bit mask of the event types a GPU can report."""
        return self._supported_events(self._gpu_only(handle).card)

    def nvmlEventSetCreate(self) -> object:
        """A new, empty event set that will see events from now on."""
        state = self._state()
        number = self._next_event_set
        self._next_event_set += 1
        self._event_sets[number] = _EventSet(last_seq=state["next_seq"] - 1)
        return handles.event_set(number)

    def _event_set(self, eventSet: object) -> _EventSet:
        number = handles.decode_event_set(eventSet)
        found = self._event_sets.get(number)
        if found is None:
            fail(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return found

    def nvmlDeviceRegisterEvents(self, handle: object, eventTypes: int, eventSet: object) -> None:
        """Register event types of one GPU (NOT_SUPPORTED for a type it cannot report)."""
        t = self._gpu_only(handle)
        event_set = self._event_set(eventSet)
        if eventTypes & ~self._supported_events(t.card):
            fail(pynvml.NVML_ERROR_NOT_SUPPORTED)
        event_set.masks[t.index] = event_set.masks.get(t.index, 0) | eventTypes

    def nvmlEventSetWait_v2(self, eventSet: object, timeoutms: int) -> pynvml.c_nvmlEventData_t:
        """The next registered event, or NVMLError_Timeout after `timeoutms`."""
        event_set = self._event_set(eventSet)
        deadline = time.monotonic() + timeoutms / 1000
        while True:
            found = self._next_event(event_set)
            if found is not None:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                fail(pynvml.NVML_ERROR_TIMEOUT)
            time.sleep(min(POLL_S, remaining))

    def nvmlEventSetWait(self, eventSet: object, timeoutms: int) -> pynvml.c_nvmlEventData_t:
        """Same as nvmlEventSetWait_v2."""
        return self.nvmlEventSetWait_v2(eventSet, timeoutms)

    def _next_event(self, event_set: _EventSet) -> pynvml.c_nvmlEventData_t | None:
        for event in self._state()["events"]:
            if event["seq"] <= event_set.last_seq:
                continue
            event_set.last_seq = event["seq"]
            if event["type"] & event_set.masks.get(event["gpu"], 0):
                return pynvml.c_nvmlEventData_t(
                    handles.device(event["gpu"]),
                    event["type"],
                    event["data"],
                    event["gi"],
                    event["ci"],
                )
        return None

    def nvmlEventSetFree(self, eventSet: object) -> None:
        """Free an event set."""
        number = handles.decode_event_set(eventSet)
        self._event_set(eventSet)
        del self._event_sets[number]
