"""gpushare domain: inventory, config, plan, strategies, allocation, health.

No gRPC and no processes here; NVML is reached only through sharing.nvml.
"""
