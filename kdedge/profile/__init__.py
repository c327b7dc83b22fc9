"""Latency and power/energy measurement on the device (no torch)."""

from __future__ import annotations
