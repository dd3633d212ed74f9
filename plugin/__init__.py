"""gpushare's node side: `cli/` (the `gpushare` commands), `daemon/` (what `gpushare run`
serves), `standin/` (a kubelet stand-in for demos and tests) and `api/` (device plugin v1beta1)."""


def version() -> str:
    """gpushare's installed version (from pyproject.toml), or "0+unknown" in a bare checkout."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as distribution_version

    try:
        return distribution_version("gpushare")
    except PackageNotFoundError:
        return "0+unknown"
