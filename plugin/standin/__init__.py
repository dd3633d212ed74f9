"""Stand-ins for what a node has and a test machine lacks: the kubelet (`kubelet`) and a
ConfigMap volume's `..data` swap (`configmap`), used by `gpushare demo`, `gpushare sim kubelet`,
the benchmarks and the tests."""
