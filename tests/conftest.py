"""Test session setup. Every test sees 8 host (CPU) devices (tests on one device are unaffected:
arrays default to device 0), and everything compiles with the options merge kernels compile with
on CPU (`kernel_store.compiler_options()`: 0.6x the compile time, the same bits). XLA_FLAGS must be
set before JAX starts a backend, so they are set here, at collection time."""

import os

import jax
import pytest

from breadcrumbs_jax.kernel_store import _CPU_COMPILER_OPTIONS  # starts no backend

_FLAGS = {"xla_force_host_platform_device_count": 8, **_CPU_COMPILER_OPTIONS}
for _name, _value in _FLAGS.items():
    if _name not in os.environ.get("XLA_FLAGS", ""):
        _value = str(_value).lower()  # XLA's spelling of booleans
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --{_name}={_value}".strip()


@pytest.fixture(autouse=True, scope="module")
def _release_executables():
    """Free each module's compiled programs when it ends. XLA:CPU maps three memory regions per
    compiled kernel; a process holding every program of the suite passes the kernel's limit on
    mappings (vm.max_map_count, 65530) and the next compile fails (SIGSEGV)."""
    yield
    jax.clear_caches()
