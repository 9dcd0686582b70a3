"""Test session setup. Every test sees 8 host (CPU) devices: the flag must be set before jax
is imported, so it is set here, at collection time (tests on one device are unaffected:
arrays default to device 0)."""

import os

_DEVICES = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES}".strip()


import jax  # noqa: E402  (after XLA_FLAGS is set)
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_executables():
    """Free each module's compiled programs when it ends. XLA:CPU maps three memory regions per
    compiled kernel; a process holding every program of the suite passes the kernel's limit on
    mappings (vm.max_map_count, 65530) and the next compile fails (SIGSEGV)."""
    yield
    jax.clear_caches()
