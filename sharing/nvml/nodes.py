"""Where simulated node descriptions live and how a `--node NAME|PATH` value is resolved."""

from __future__ import annotations

import sys
from pathlib import Path

from sharing.errors import ConfigError

_CHECKOUT_NODES = Path(__file__).resolve().parents[2] / "configs" / "nodes"
_INSTALLED_NODES = Path(sys.prefix) / "share" / "gpushare" / "configs" / "nodes"
# A checkout (or editable install) reads configs/nodes in place; `pip install .` puts them
# under <prefix>/share/gpushare (pyproject's data-files).
NODES_DIR = _CHECKOUT_NODES if _CHECKOUT_NODES.is_dir() else _INSTALLED_NODES
NODE_HELP = (
    "simulated node: a shipped node name (see `gpushare sim nodes`), a node YAML file, or a "
    "state directory made by `gpushare sim create`; without it, the real NVML"
)


def shipped_nodes() -> list[str]:
    """Names of the node descriptions shipped in configs/nodes."""
    return sorted(p.stem for p in NODES_DIR.glob("*.yaml"))


def node_file(node: str | Path) -> Path:
    """The YAML file of a shipped node name or a node YAML path; ConfigError otherwise."""
    text = str(node)
    if text in shipped_nodes():
        return NODES_DIR / f"{text}.yaml"
    path = Path(node)
    if path.is_file():
        return path
    raise ConfigError(
        f"unknown node {text!r}: not a shipped node name ({', '.join(shipped_nodes())}), "
        "a node YAML file, or a state directory"
    )
