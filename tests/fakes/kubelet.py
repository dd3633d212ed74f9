"""FakeKubelet for tests: the kubelet stand-in `gpushare demo` uses, over real unix sockets."""

from __future__ import annotations

from plugin.standin.kubelet import Allocation, DeviceList, KubeletStandIn, Registration

FakeKubelet = KubeletStandIn

__all__ = ["Allocation", "DeviceList", "FakeKubelet", "Registration"]
