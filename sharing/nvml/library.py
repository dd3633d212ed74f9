"""Choosing the NVML library object: the real `pynvml` module or a simulated node."""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

from sharing.nvml.nodes import node_file
from sharing.nvml.sim import SimNvml, create_state, is_state_dir, load_node_file


def load_library(node: str | Path | None) -> Any:
    """The NVML library for `--node`: None -> real pynvml; a state directory -> that node;
    a shipped node name or node YAML file -> a fresh private state in a temporary directory.

    Raises:
        ConfigError: an unknown node name or an invalid node description.
    """
    if node is None:
        import pynvml

        return pynvml
    path = Path(node)
    if path.is_dir() and is_state_dir(path):
        return SimNvml(path)
    source = node_file(node)
    spec = load_node_file(source)
    state_dir = Path(tempfile.mkdtemp(prefix=f"gpushare-sim-{spec.name}-"))
    try:
        create_state(source, state_dir)
        lib = SimNvml(state_dir)
    except BaseException:
        shutil.rmtree(state_dir, ignore_errors=True)
        raise
    weakref.finalize(lib, shutil.rmtree, state_dir, ignore_errors=True)
    return lib
