import dataclasses
import functools
import importlib
import logging
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import breadcrumbs_jax as bj
from breadcrumbs_jax import kernel_store
from breadcrumbs_jax.steps import LeafContext, Scale

merge_module = importlib.import_module("breadcrumbs_jax.merge")
METHOD = bj.breadcrumbs(0.8, density=0.3, gamma_top=0.05, weights=(1.0, 0.6))


@pytest.fixture
def store(tmp_path):
    kernel_store.use(tmp_path / "store")
    yield tmp_path / "store"
    kernel_store.use(None)


def signature(shape=(24, 6), dtype=jnp.bfloat16):
    return (jax.ShapeDtypeStruct(shape, dtype), jax.ShapeDtypeStruct((2, *shape), dtype),
            jax.ShapeDtypeStruct((), jnp.uint32), None)


def options(method=METHOD, out_dtype=jnp.bfloat16):
    return dict(method=method, out_axis=None, out_dtype=np.dtype(out_dtype), sharded=False)


def inputs(shape=(24, 6)):
    rng = np.random.default_rng(3)
    base = rng.standard_normal(shape, dtype=np.float32).astype(jnp.bfloat16)
    stack = (base.astype(np.float32) + rng.standard_normal((2, *shape), dtype=np.float32)).astype(jnp.bfloat16)
    return base, stack, jnp.uint32(5), None


class Untraceable:
    """Stands for the kernel where it must not be traced."""

    def trace(self, *args, **kwargs):
        raise AssertionError("traced")


def test_a_stored_kernel_loads_without_tracing_and_gives_the_same_bits(store):
    first = kernel_store.compile_kernel(merge_module._merge_kernel, signature(), options())
    assert len(list(store.glob("*.executable"))) == 1
    loaded = kernel_store.compile_kernel(Untraceable(), signature(), options())
    want = merge_module._merge_kernel(*inputs(), **options())
    for kernel in (first, loaded):
        got = kernel(*inputs())
        assert all(np.array_equal(np.asarray(g), np.asarray(w)) for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def test_the_process_keeps_the_kernels_it_compiled():
    """Without a store too, a kernel compiled once in a process is not traced or compiled again (an
    in-memory merge compiles ahead, outside jit's cache); `clear` and `use` forget them."""
    kernel_store.clear()
    first = kernel_store.compile_kernel(merge_module._merge_kernel, signature(), options())
    assert kernel_store.lower_kernel(merge_module._merge_kernel, signature(), options()).compiled is first
    assert kernel_store.lower_kernel(merge_module._merge_kernel, signature((6, 24)), options()).lowered is not None
    for forget in (kernel_store.clear, lambda: kernel_store.use(None)):
        kernel_store.compile_kernel(merge_module._merge_kernel, signature(), options())
        forget()
        assert kernel_store.lower_kernel(merge_module._merge_kernel, signature(), options()).lowered is not None


def test_key_separates_whatever_decides_the_kernel(monkeypatch):
    key = kernel_store._key(signature(), options())
    assert key == kernel_store._key(signature(), options(bj.breadcrumbs(0.8, density=0.3, gamma_top=0.05, weights=(1.0, 0.6))))
    others = [
        kernel_store._key(signature(), options(bj.breadcrumbs(0.8, density=0.3 + 1e-12, gamma_top=0.05, weights=(1.0, 0.6)))),
        kernel_store._key(signature(), options(bj.breadcrumbs(0.8, density=0.3, gamma_top=0.05, weights=(1.0, 0.6 + 1e-15)))),
        kernel_store._key(signature(), options(out_dtype=jnp.float32)),
        kernel_store._key(signature((6, 24)), options()),
        kernel_store._key(signature(dtype=jnp.float16), options()),
        kernel_store._key(signature(), {**options(), "out_axis": 0}),
    ]
    monkeypatch.setattr(kernel_store, "_source_digest", lambda: "changed source")
    others.append(kernel_store._key(signature(), options()))
    monkeypatch.setattr(kernel_store, "_target", lambda: ("cpu", "cpu", "cpu", "x86_64", "", "flags: sse2"))
    others.append(kernel_store._key(signature(), options()))
    assert len({key, *others}) == 1 + len(others)


def test_a_kernel_compiled_for_the_store_is_a_module_named_by_its_key(store):
    """JAX's persistent cache keys a module by its name too: it cannot give a kernel stored under
    another key (before an upgrade), whose executable, serialized again, would lack its code."""
    names = set()
    for method in (METHOD, bj.breadcrumbs(0.8, density=0.3, gamma_top=0.05, weights=(1.0, 0.7))):
        key = kernel_store._key(signature(), options(method))
        named = jax.jit(kernel_store._named(merge_module._merge_kernel, options(method), key))
        text = named.trace(*signature()).lower().as_text()
        names.add(f"stored_kernel_{key[:16]}")
        assert f"stored_kernel_{key[:16]}" in text
    assert len(names) == 2


def numbers(method, shape=(24, 6)):
    return method.numbers((2, *shape), LeafContext())


def test_settings_of_a_method_share_a_stored_kernel(store):
    """A kernel of a method's structure is stored once for every setting of its numbers: another
    setting loads it without tracing, and its numbers, given as arguments, decide the result."""
    other = bj.breadcrumbs(1.2, beta=0.5, gamma=(0.9, 1), weights=(0.5, 2.0))
    specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), numbers(METHOD))
    args = (*signature(), specs)
    assert kernel_store._key(args, options(METHOD.structure())) == kernel_store._key(args, options(other.structure()))
    assert kernel_store._key(args, options(METHOD.structure())) != kernel_store._key(args[:4], options(METHOD))
    kernel_store.compile_kernel(merge_module._merge_kernel, args, options(METHOD.structure()))
    loaded = kernel_store.compile_kernel(Untraceable(), args, options(other.structure()))
    assert len(list(store.glob("*.executable"))) == 1
    for method in (METHOD, other):
        got = loaded(*inputs(), numbers(method))
        want = merge_module._merge_kernel(*inputs(), numbers(method), **options(method.structure()))
        assert all(np.array_equal(np.asarray(g), np.asarray(w)) for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    assert not np.array_equal(np.asarray(loaded(*inputs(), numbers(METHOD))[0]), np.asarray(got[0]))


def test_key_is_the_same_in_another_process():
    code = (
        "import jax, jax.numpy as jnp, numpy as np, breadcrumbs_jax as bj\n"
        "from breadcrumbs_jax import kernel_store\n"
        "from tests.test_kernel_store import signature, options\n"
        "print(kernel_store._key(signature(), options()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == kernel_store._key(signature(), options())


@dataclasses.dataclass(frozen=True)
class Halve(Scale):
    """A step defined outside the package: its behaviour is not in the package's source."""


def test_kernels_with_steps_from_elsewhere_are_not_stored(store):
    method = dataclasses.replace(METHOD, steps=(*METHOD.steps[:-1], Halve(0.5)))
    assert kernel_store._key(signature(), options(method)) is None
    assert kernel_store._key(signature(), options(method.structure())) is None
    kernel = kernel_store.compile_kernel(merge_module._merge_kernel, signature(), options(method))
    assert not store.exists()
    want = merge_module._merge_kernel(*inputs(), **options(method))
    assert np.array_equal(np.asarray(kernel(*inputs())[0]), np.asarray(want[0]))
    shared = merge_module._merge_kernel(*inputs(), numbers(method), **options(method.structure()))
    assert np.array_equal(np.asarray(shared[0]), np.asarray(want[0]))  # alpha 0.5: no FMA rounding


def test_a_damaged_entry_is_compiled_again_and_replaced(store, caplog):
    kernel_store.compile_kernel(merge_module._merge_kernel, signature(), options())
    (entry,) = store.glob("*.executable")
    good = entry.read_bytes()
    entry.write_bytes(good[: len(good) // 2])
    kernel_store.clear()  # as in a new process: not the executable this one kept
    with caplog.at_level(logging.WARNING, logger="breadcrumbs_jax.kernel_store"):
        kernel = kernel_store.compile_kernel(merge_module._merge_kernel, signature(), options())
    assert "unreadable" in caplog.text and entry.name in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="breadcrumbs_jax.kernel_store"):
        assert kernel_store._read(entry) is not None  # replaced by a whole entry
    assert not caplog.text
    assert [p.name for p in store.iterdir()] == [entry.name]  # no temporary file left
    want = merge_module._merge_kernel(*inputs(), **options())
    assert np.array_equal(np.asarray(kernel(*inputs())[0]), np.asarray(want[0]))


def test_a_kernel_whose_executable_cannot_be_serialized_is_compiled_as_is(store, monkeypatch, caplog):
    def refuse(compiled):
        raise ValueError("Compilation does not support serialization")

    monkeypatch.setattr(kernel_store.serialize_executable, "serialize", refuse)
    with caplog.at_level(logging.WARNING, logger="breadcrumbs_jax.kernel_store"):
        kernel = kernel_store.compile_kernel(merge_module._merge_kernel, signature(), options())
    assert "does not support serialization" in caplog.text and not store.exists()
    want = merge_module._merge_kernel(*inputs(), **options())
    assert np.array_equal(np.asarray(kernel(*inputs())[0]), np.asarray(want[0]))


@pytest.mark.parametrize("method", [
    METHOD, bj.ties(0.9, density=0.2), bj.dare(1.0, p=0.7, seed=3),
    bj.breadcrumbs_ties(1.0, density=0.2, gamma_top=0.02, granularity="row"),
], ids=["breadcrumbs", "ties", "dare", "breadcrumbs_ties-row"])
def test_merge_kernels_compile_with_options_that_keep_the_bits(method):
    """The compiler options change how long XLA compiles, not the result: a leaf that ranks by the
    counting search (bfloat16 differences, runs of ties) merges to the bits of XLA's defaults
    (given explicitly: they override XLA_FLAGS, which conftest.py sets to the same options)."""
    assert kernel_store.compiler_options() == kernel_store._CPU_COMPILER_OPTIONS  # this suite runs on CPU
    rng = np.random.default_rng(11)
    base = (rng.standard_normal((160, 128), dtype=np.float32) * 0.02).astype(jnp.bfloat16)
    noise = rng.standard_normal((2, 160, 128), dtype=np.float32) * 0.002
    args = (base, (base.astype(np.float32) + noise).astype(jnp.bfloat16), jnp.uint32(7), None)
    static = dict(options(method), out_axis=0)
    ours = merge_module._merge_kernel(*args, **static)
    xla_defaults = {"xla_cpu_use_fusion_emitters": True, "xla_backend_optimization_level": 3}
    kernel = functools.partial(merge_module._merge_kernel.__wrapped__, **static)
    defaults = jax.jit(kernel, compiler_options=xla_defaults)(*args)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(defaults), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_importing_the_package_leaves_the_backend_to_the_caller():
    """Kernels pick their compiler options at first use: importing must not start a JAX backend
    (`jax.distributed.initialize` and `XLA_FLAGS` must come first)."""
    code = (
        "import breadcrumbs_jax, breadcrumbs_jax.stream, breadcrumbs_jax.cli\n"
        "from jax._src import xla_bridge\n"
        "print(xla_bridge.backends_are_initialized())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
