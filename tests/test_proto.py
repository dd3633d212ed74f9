"""The committed v1beta1 modules are fresh, and the method paths on the wire are the kubelet's."""

from __future__ import annotations

import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from plugin.api import deviceplugin_pb2_grpc, pb

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("deviceplugin_pb2.py", "deviceplugin_pb2_grpc.py")


def test_committed_modules_match_regenerated(tmp_path: Path) -> None:
    """Regenerating from the .proto gives byte-identical modules (else: ./scripts/gen-proto)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            ".",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            "plugin/api/deviceplugin.proto",
        ],
        cwd=ROOT,
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "plugin" / "api" / name).read_bytes()
        committed = (ROOT / "plugin" / "api" / name).read_bytes()
        assert committed == fresh, f"plugin/api/{name} is stale: run ./scripts/gen-proto"


@pytest.mark.parametrize(
    ("message", "fields"),
    [
        pytest.param("DevicePluginOptions", {"pre_start_required": 1,
                     "get_preferred_allocation_available": 2}, id="DevicePluginOptions"),
        pytest.param("RegisterRequest", {"version": 1, "endpoint": 2, "resource_name": 3,
                     "options": 4}, id="RegisterRequest"),
        pytest.param("ListAndWatchResponse", {"devices": 1}, id="ListAndWatchResponse"),
        pytest.param("Device", {"ID": 1, "health": 2, "topology": 3}, id="Device"),
        pytest.param("TopologyInfo", {"nodes": 1}, id="TopologyInfo"),
        pytest.param("NUMANode", {"ID": 1}, id="NUMANode"),
        pytest.param("PreStartContainerRequest", {"devices_ids": 1}, id="PreStartContainerRequest"),
        pytest.param("PreferredAllocationRequest", {"container_requests": 1},
                     id="PreferredAllocationRequest"),
        pytest.param("ContainerPreferredAllocationRequest", {"available_deviceIDs": 1,
                     "must_include_deviceIDs": 2, "allocation_size": 3},
                     id="ContainerPreferredAllocationRequest"),
        pytest.param("PreferredAllocationResponse", {"container_responses": 1},
                     id="PreferredAllocationResponse"),
        pytest.param("ContainerPreferredAllocationResponse", {"deviceIDs": 1},
                     id="ContainerPreferredAllocationResponse"),
        pytest.param("AllocateRequest", {"container_requests": 1}, id="AllocateRequest"),
        pytest.param("ContainerAllocateRequest", {"devices_ids": 1}, id="ContainerAllocateRequest"),
        pytest.param("AllocateResponse", {"container_responses": 1}, id="AllocateResponse"),
        pytest.param("ContainerAllocateResponse", {"envs": 1, "mounts": 2, "devices": 3,
                     "annotations": 4, "cdi_devices": 5}, id="ContainerAllocateResponse"),
        pytest.param("Mount", {"container_path": 1, "host_path": 2, "read_only": 3}, id="Mount"),
        pytest.param("DeviceSpec", {"container_path": 1, "host_path": 2, "permissions": 3},
                     id="DeviceSpec"),
        pytest.param("CDIDevice", {"name": 1}, id="CDIDevice"),
    ],
)
def test_field_numbers_are_the_wire_contract(message: str, fields: dict[str, int]) -> None:
    """Every message has exactly the kubelet's fields and field numbers."""
    descriptor = pb.DESCRIPTOR.message_types_by_name[message]
    assert descriptor.full_name == f"v1beta1.{message}"
    assert {f.name: f.number for f in descriptor.fields} == fields


class _Recorder(grpc.GenericRpcHandler):
    """Records the method path of every call a server receives, then answers UNIMPLEMENTED."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> None:
        self.methods.append(handler_call_details.method)
        return None


def test_method_paths_on_the_wire(tmp_path: Path) -> None:
    """The generated stubs send the kubelet's full method names over a real unix socket."""
    recorder = _Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[recorder])
    address = f"unix://{tmp_path / 'wire.sock'}"
    server.add_insecure_port(address)
    server.start()
    try:
        with grpc.insecure_channel(address) as channel:
            registration = deviceplugin_pb2_grpc.RegistrationStub(channel)
            plugin = deviceplugin_pb2_grpc.DevicePluginStub(channel)
            calls = [
                lambda: registration.Register(pb.RegisterRequest(), timeout=5),
                lambda: plugin.GetDevicePluginOptions(pb.Empty(), timeout=5),
                lambda: next(plugin.ListAndWatch(pb.Empty(), timeout=5)),
                lambda: plugin.GetPreferredAllocation(pb.PreferredAllocationRequest(), timeout=5),
                lambda: plugin.Allocate(pb.AllocateRequest(), timeout=5),
                lambda: plugin.PreStartContainer(pb.PreStartContainerRequest(), timeout=5),
            ]
            for call in calls:
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(None)
    assert recorder.methods == [
        "/v1beta1.Registration/Register",
        "/v1beta1.DevicePlugin/GetDevicePluginOptions",
        "/v1beta1.DevicePlugin/ListAndWatch",
        "/v1beta1.DevicePlugin/GetPreferredAllocation",
        "/v1beta1.DevicePlugin/Allocate",
        "/v1beta1.DevicePlugin/PreStartContainer",
    ]
