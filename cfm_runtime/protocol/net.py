"""Addresses: which binds stay on this machine (the edge's HTTP API and the center both ask)."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """True for loopback addresses (127.0.0.0/8, ::1) and `localhost`; False for any other name or address."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
