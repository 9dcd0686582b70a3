"""Leaf paths: one readable string per PyTree leaf, used in rules, reports and errors.

A Flax nnx `State` holds each array in a Variable whose key path ends in the attribute
``.value``; that last component is dropped, so ``nnx.split(model, nnx.Param)[1]`` and its
`nnx.to_pure_dict` have the same paths (``l1/kernel``).
"""

from __future__ import annotations

from typing import Any

import jax

SEP = "/"


def key_name(key: Any) -> str:
    """One path component as text (dict key, sequence index, attribute name)."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(keypath: tuple) -> str:
    """`('params', 'Dense_0', 'kernel')`-style key path -> ``params/Dense_0/kernel``.

    A final ``.value`` attribute (how Flax nnx Variables flatten) is dropped, so an nnx State
    and its `nnx.to_pure_dict` have the same paths."""
    if keypath and isinstance(keypath[-1], jax.tree_util.GetAttrKey) and keypath[-1].name == "value":
        keypath = keypath[:-1]
    return SEP.join(key_name(k) for k in keypath)


def flatten(tree: Any) -> tuple[list[str], list[Any], Any]:
    """Flatten a PyTree into (paths, leaves, treedef); None subtrees are empty, as in JAX."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [path_str(p) for p, _ in with_path], [leaf for _, leaf in with_path], treedef
