"""The node daemon's parts: composition and reload (`core`), one gRPC server per resource
(`server`), the kubelet link (`kubelet`), Allocate responses (`allocate`, `convert`), the served
snapshot (`state`), file watches (`watch`), the health monitor and the MPS wiring, metrics with
/healthz and /readyz (`metrics`), the node labels file (`labels_file`), both composed in by
`observe`, and signal handling (`signals`)."""
