"""The simulated NVML: a pynvml-shaped library over a node description and a state directory.

`SimNvml(state_dir)` is injected into the adapter in place of the `pynvml` module. The control
functions change the node from outside (tests, `gpushare sim`), as hardware faults and other
processes would.
"""

from sharing.nvml.sim.control import (
    create_state,
    inject_event,
    inject_xid,
    inject_xids,
    load_spec,
    lose_gpu,
    reset_gpu,
    start_process,
    stop_process,
)
from sharing.nvml.sim.library import SimNvml
from sharing.nvml.sim.show import show
from sharing.nvml.sim.spec import NodeSpec, load_node_file, mig_device_uuid, parse_node
from sharing.nvml.sim.state import SimError, is_state_dir

__all__ = [
    "NodeSpec",
    "SimError",
    "SimNvml",
    "create_state",
    "inject_event",
    "inject_xid",
    "inject_xids",
    "is_state_dir",
    "load_node_file",
    "load_spec",
    "lose_gpu",
    "mig_device_uuid",
    "parse_node",
    "reset_gpu",
    "show",
    "start_process",
    "stop_process",
]
