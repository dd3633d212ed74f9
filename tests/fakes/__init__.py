"""Test stand-ins built from real parts: a kubelet over real unix sockets, inventory builders."""
