"""The tasks: scikit-learn's 8x8 digits under one fixed image transformation each.

Every task keeps the ten digit classes; what differs is the input domain (a rotation, a
flip, an inversion, a fixed pixel permutation, ...), as the eight vision data sets of the
paper differ in domain. The data ship with scikit-learn: nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import MergeError

Transform = Callable[[np.ndarray], np.ndarray]  # [N, 8, 8] in [0, 1] -> same


def _permute(seed: int) -> Transform:
    perm = np.random.default_rng(seed).permutation(64)
    return lambda x: x.reshape(len(x), 64)[:, perm].reshape(x.shape)


_CHECKER = (np.add.outer(np.arange(8), np.arange(8)) % 2).astype(bool)

TRANSFORMS: dict[str, Transform] = {
    "rot90": lambda x: np.rot90(x, 1, axes=(1, 2)),
    "rot180": lambda x: np.rot90(x, 2, axes=(1, 2)),
    "rot270": lambda x: np.rot90(x, 3, axes=(1, 2)),
    "flip_lr": lambda x: x[:, :, ::-1],
    "flip_ud": lambda x: x[:, ::-1, :],
    "transpose": lambda x: x.transpose(0, 2, 1),
    "invert": lambda x: 1.0 - x,
    "checker": lambda x: np.where(_CHECKER, 1.0 - x, x),
    "shift": lambda x: np.roll(x, (3, 3), axis=(1, 2)),
    "swap": lambda x: np.concatenate([x[:, 4:], x[:, :4]], axis=1),
    "permute": _permute(1234),
    "permute2": _permute(4321),
}
"""Every available task; the transformations are fixed (the same in every run and seed)."""

DEFAULT_TASKS: tuple[str, ...] = (
    "rot90", "rot180", "flip_lr", "flip_ud", "transpose", "invert", "checker", "permute",
)


def check_tasks(names: Sequence[str]) -> tuple[str, ...]:
    unknown = [n for n in names if n not in TRANSFORMS]
    if unknown:
        raise MergeError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TRANSFORMS)}")
    if len(set(names)) != len(names):
        raise MergeError(f"tasks repeat: {', '.join(names)}")
    return tuple(names)


@dataclasses.dataclass(frozen=True)
class Split:
    """Images [N, 8, 8] float32 in [0, 1] and labels [N] int32."""

    x: np.ndarray
    y: np.ndarray


@dataclasses.dataclass(frozen=True)
class Digits:
    train: Split
    val: Split
    test: Split


def digits(seed: int, val: float = 0.2, test: float = 0.2) -> Digits:
    """The 1,797 digits, split (stratified by class, shuffled by `seed`) into train/val/test."""
    from sklearn.datasets import load_digits  # imported here: 2 s that every CLI command would pay
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8)
    y = y.astype(np.int32)
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=test, stratify=y, random_state=seed)
    x_tr, x_val, y_tr, y_val = train_test_split(
        x_rest, y_rest, test_size=val / (1 - test), stratify=y_rest, random_state=seed
    )
    return Digits(Split(x_tr, y_tr), Split(x_val, y_val), Split(x_test, y_test))


def task_inputs(names: Sequence[str], x: np.ndarray) -> np.ndarray:
    """[T, N, 64] float32: the images under each task's transformation, flattened."""
    return np.stack([
        np.ascontiguousarray(TRANSFORMS[n](x), dtype=np.float32).reshape(len(x), 64) for n in names
    ])
