"""gpushare benchmarks: `./scripts/bench` prints a table and writes JSON."""
