"""Stand-ins for what a node has and a test machine lacks: the kubelet (`kubelet`), used by
`gpushare demo`, the benchmarks and the tests."""
