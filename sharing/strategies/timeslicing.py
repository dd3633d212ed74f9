"""Strategy `time-slicing`: each physical device (full GPU or MIG device) gives N replicas
`<uuid>::0` … `<uuid>::N-1`; the replica count may differ per device (one per config entry)."""

from __future__ import annotations

from typing import Literal

from sharing.plan_types import ResourcePlan, ServeOptions
from sharing.strategies.base import ResourceGroup, expand


class TimeSlicing:
    """Replicas without limits; failRequestsGreaterThanOne defaults to false."""

    name: Literal["time-slicing"] = "time-slicing"

    def build_resource(self, group: ResourceGroup, options: ServeOptions) -> ResourcePlan:
        """Replicas of every member."""
        return expand(group, options, "time-slicing")
