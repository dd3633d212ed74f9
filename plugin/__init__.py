"""gpushare's node side: `cli/` (the `gpushare` commands), `daemon/` (what `gpushare run`
serves), `standin/` (a kubelet stand-in for demos and tests) and `api/` (device plugin v1beta1)."""
