"""Where simulated node descriptions live and how a `--node NAME|PATH` value is resolved."""

from __future__ import annotations

import sys
from pathlib import Path

from sharing.errors import ConfigError


def find_nodes_dir(checkout: Path, prefix: Path) -> Path:
    """Where the shipped node files are: the checkout's configs/nodes, else the installed copy.

    A checkout (or editable install) reads configs/nodes in place; `pip install .` puts the
    files under <prefix>/share/gpushare/configs/nodes (pyproject's data-files).
    """
    in_checkout = checkout / "configs" / "nodes"
    if in_checkout.is_dir():
        return in_checkout
    return prefix / "share" / "gpushare" / "configs" / "nodes"


NODES_DIR = find_nodes_dir(Path(__file__).resolve().parents[2], Path(sys.prefix))
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
