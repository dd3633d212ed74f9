"""The node daemon's parts: composition and reload (`core`), one gRPC server per resource
(`server`), the kubelet link (`kubelet`), Allocate responses (`allocate`, `convert`), the served
snapshot (`state`), file watches (`watch`), the health monitor and the MPS wiring."""
