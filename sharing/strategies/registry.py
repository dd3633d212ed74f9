"""The strategy for a name."""

from __future__ import annotations

from sharing.plan_types import Strategy
from sharing.strategies.base import SharingStrategy
from sharing.strategies.mps import MpsSharing
from sharing.strategies.none import NoSharing
from sharing.strategies.timeslicing import TimeSlicing

_STRATEGIES: dict[str, SharingStrategy] = {
    "none": NoSharing(),
    "time-slicing": TimeSlicing(),
    "mps": MpsSharing(),
}


def strategy_for(name: Strategy) -> SharingStrategy:
    """The strategy object for `none`, `time-slicing` or `mps`."""
    try:
        return _STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown sharing strategy {name!r}") from None
