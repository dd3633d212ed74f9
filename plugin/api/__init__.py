"""Kubelet device plugin API v1beta1: the .proto and its generated modules (./scripts/gen-proto)."""

from plugin.api import deviceplugin_pb2 as pb
from plugin.api import deviceplugin_pb2_grpc as pb_grpc

API_VERSION = "v1beta1"
HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
KUBELET_SOCKET = "kubelet.sock"
DEFAULT_KUBELET_DIR = "/var/lib/kubelet/device-plugins"

__all__ = [
    "API_VERSION",
    "DEFAULT_KUBELET_DIR",
    "HEALTHY",
    "KUBELET_SOCKET",
    "UNHEALTHY",
    "pb",
    "pb_grpc",
]
