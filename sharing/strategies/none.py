"""Strategy `none`: every physical device is one virtual device with its own UUID as ID."""

from __future__ import annotations

from typing import Literal

from sharing.plan_types import ResourcePlan, ServeOptions
from sharing.strategies.base import ResourceGroup, expand


class NoSharing:
    """Full GPUs or MIG devices, unshared."""

    name: Literal["none"] = "none"

    def build_resource(self, group: ResourceGroup, options: ServeOptions) -> ResourcePlan:
        """One virtual device per physical device."""
        return expand(group, options, "none")
