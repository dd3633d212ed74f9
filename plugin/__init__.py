"""gpushare node daemon: gRPC device plugin servers, kubelet lifecycle, composition, CLI."""
