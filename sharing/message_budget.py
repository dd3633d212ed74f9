"""The size of a resource's ListAndWatch message, and the limit that keeps it far below 4 MiB.

The kubelet reads plugin messages with gRPC's default 4 MiB limit: a larger ListAndWatch message
ends the stream, the kubelet deregisters the plugin and marks all its devices Unhealthy (facts
§1). So a plan may give one resource at most MAX_DEVICES_PER_RESOURCE device IDs. With the
longest IDs gpushare makes (a legacy MIG ID `MIG-GPU-<uuid>/<gi>/<ci>` with a `::<replica>`
suffix, 55 characters), every device Unhealthy and a NUMA node set, that message is
LARGEST_MESSAGE_BYTES = 1,245,184 bytes (1.19 MiB), under a third of the limit.

Sizes are computed from the protobuf wire format of `v1beta1.ListAndWatchResponse` (facts §1)
without protobuf: every field is tag (1 byte here) + length varint + bytes.
"""

from __future__ import annotations

from collections.abc import Iterable

KUBELET_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_DEVICES_PER_RESOURCE = 16_384
LONGEST_ID_CHARS = len("MIG-GPU-") + 36 + len("/14/7") + len("::1023")  # 55
_WORST_HEALTH = "Unhealthy"
WORST_NUMA = 127  # NUMA node IDs are small; 1..127 take one varint byte, 0 takes none


def _varint_bytes(value: int) -> int:
    """Bytes of an unsigned varint."""
    size = 1
    while value >= 0x80:
        value >>= 7
        size += 1
    return size


def _field_bytes(payload: int) -> int:
    """Bytes of one length-delimited field with a one-byte tag."""
    return 1 + _varint_bytes(payload) + payload


def device_entry_bytes(id_chars: int, *, healthy: bool = False, numa_node: int | None = 0) -> int:
    """Bytes one Device adds to a ListAndWatchResponse (ASCII ID of `id_chars` characters)."""
    device = _field_bytes(id_chars) if id_chars else 0
    device += _field_bytes(len("Healthy" if healthy else _WORST_HEALTH))
    if numa_node is not None:
        numa = 1 + _varint_bytes(numa_node) if numa_node else 0  # NUMANode{ID}
        device += _field_bytes(_field_bytes(numa))  # topology{nodes[NUMANode]}
    return _field_bytes(device)


def list_message_bytes(id_lengths: Iterable[int], *, numa: bool = True) -> int:
    """The largest ListAndWatchResponse for devices with these ID lengths (all Unhealthy)."""
    numa_node = WORST_NUMA if numa else None
    return sum(device_entry_bytes(n, numa_node=numa_node) for n in id_lengths)


def replica_id_lengths(physical_id_chars: int, replicas: int) -> Iterable[int]:
    """Lengths of `<physical>::0` … `<physical>::<replicas-1>`, without building the IDs."""
    digits, low = 1, 0
    while low < replicas:
        high = min(replicas, 10**digits)
        yield from (physical_id_chars + 2 + digits for _ in range(high - low))
        low, digits = high, digits + 1


LARGEST_MESSAGE_BYTES = list_message_bytes([LONGEST_ID_CHARS] * MAX_DEVICES_PER_RESOURCE)
