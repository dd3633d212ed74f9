"""Sharing strategies (none, time-slicing, MPS) and MIG resource naming; see `registry`."""
