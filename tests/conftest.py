"""Test session setup. Every test sees 8 host (CPU) devices: the flag must be set before jax
is imported, so it is set here, at collection time (tests on one device are unaffected:
arrays default to device 0)."""

import os

_DEVICES = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES}".strip()
