"""gpushare domain: inventory, config, plan, strategies, allocation, health. No gRPC, no processes."""
