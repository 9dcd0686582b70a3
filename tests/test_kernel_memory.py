"""The per-leaf kernel's scratch memory, as XLA's compiled memory analysis states it.

The fine-tuned leaves reach the kernel as one [T, ...] stack, so the task vectors are an
elementwise expression that every pass recomputes: a Breadcrumbs merge needs under half a
float32 copy of the leaf of scratch per task (block counts and statistics); it needed about 6 per
task when the task vectors were stored."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import breadcrumbs_jax as bj
from breadcrumbs_jax.merge import _merge_kernel, merge_leaf, plan_for, stack_models

SHAPE = (1024, 512)
LEAF = 4 * np.prod(SHAPE)  # bytes of one float32 copy of the leaf


def scratch(method, tasks: int, dtype=jnp.bfloat16) -> float:
    base = jax.ShapeDtypeStruct(SHAPE, dtype)
    stack = jax.ShapeDtypeStruct((tasks, *SHAPE), dtype)
    compiled = _merge_kernel.lower(
        base, stack, jnp.uint32(0), None, method=method, out_axis=1, out_dtype=np.dtype(dtype)
    ).compile()
    return compiled.memory_analysis().temp_size_in_bytes / LEAF


@pytest.mark.parametrize("tasks", [2, 8])
@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_breadcrumbs_scratch_is_under_half_a_leaf_per_task(tasks, granularity):
    method = bj.breadcrumbs(1.0, density=0.1, gamma_top=0.01, granularity=granularity)
    assert scratch(method, tasks) < 0.5 * tasks


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_task_arithmetic_needs_no_scratch(dtype):
    assert scratch(bj.task_arithmetic(1.0), 8, dtype) < 0.1


def test_a_stack_and_a_list_of_leaves_merge_to_the_same_bits():
    rng = np.random.default_rng(0)
    base = {"w": rng.standard_normal((40, 24)).astype(np.float32)}
    fts = [{"w": base["w"] + rng.standard_normal((40, 24)).astype(np.float32)} for _ in range(3)]
    method = bj.breadcrumbs(1.0, density=0.2, gamma_top=0.05)
    (plan,) = plan_for(base, method)
    listed, _ = merge_leaf(plan, base["w"], [f["w"] for f in fts])
    stacked, _ = merge_leaf(plan, base["w"], stack_models([f["w"] for f in fts]))
    assert np.array_equal(np.asarray(listed).view(np.uint32), np.asarray(stacked).view(np.uint32))


def test_a_stack_of_the_wrong_size_names_the_leaf():
    base = np.zeros((4, 3), np.float32)
    (plan,) = plan_for({"w": base}, bj.task_arithmetic(1.0))
    with pytest.raises(bj.MergeError, match="w"):
        merge_leaf(plan, base, np.zeros((2, 4, 3), np.float32), names=("a", "b", "c"))
