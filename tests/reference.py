"""Plain-numpy reference implementation of SPEC.md, written independently of the package.

Sorting-based (np.lexsort by (|tau|, flat index)); exact decimals for the counts.
"""

from __future__ import annotations

import decimal
import math

import numpy as np


def counts(n: int, beta, gamma) -> tuple[int, int, int]:
    """(n_bot, n_keep, n_top) per SPEC.md, with the fractions taken as the decimals written."""
    b, g = decimal.Decimal(str(beta)), decimal.Decimal(str(gamma))
    n_top = math.floor(n * (1 - g))
    n_keep = math.floor(n * (g - b))
    return n - n_keep - n_top, n_keep, n_top


def tau(pre: np.ndarray, ft: np.ndarray) -> np.ndarray:
    return ft.astype(np.float32) - pre.astype(np.float32)


def _band_1d(mag: np.ndarray, n_bot: int, n_keep: int) -> np.ndarray:
    order = np.lexsort((np.arange(mag.size), mag))
    keep = np.zeros(mag.size, bool)
    keep[order[n_bot : n_bot + n_keep]] = True
    return keep


def band_mask(t: np.ndarray, beta, gamma, granularity="tensor", out_axis=None) -> np.ndarray:
    """Mask of one task vector leaf (no task axis) for tensor or row granularity."""
    mag = np.abs(t.astype(np.float32))
    if granularity == "row" and t.ndim >= 2:
        moved = np.moveaxis(mag, out_axis, 0)
        rows = moved.reshape(moved.shape[0], -1)
        keep = np.stack([_band_1d(r, *counts(r.size, beta, gamma)[:2]) for r in rows])
        return np.moveaxis(keep.reshape(moved.shape), 0, out_axis)
    n_bot, n_keep, _ = counts(mag.size, beta, gamma)
    return _band_1d(mag.ravel(), n_bot, n_keep).reshape(t.shape)


def global_masks(taus: list[np.ndarray], beta, gamma) -> list[np.ndarray]:
    """Masks of all leaves of one task vector ranked as one group (leaf order, then flat index)."""
    mags = [np.abs(t.astype(np.float32)).ravel() for t in taus]
    flat = np.concatenate(mags) if mags else np.zeros(0, np.float32)
    n_bot, n_keep, _ = counts(flat.size, beta, gamma)
    keep = _band_1d(flat, n_bot, n_keep)
    out, start = [], 0
    for t, m in zip(taus, mags):
        out.append(keep[start : start + m.size].reshape(t.shape))
        start += m.size
    return out


def tsum(xs) -> np.ndarray:
    """Sum over tasks in order t = 0, 1, ... in float32."""
    acc = xs[0].astype(np.float32)
    for x in xs[1:]:
        acc = acc + x.astype(np.float32)
    return acc


def masked_sum(pre, fts, masks, alpha, weights):
    ts = [tau(pre, f) * m * np.float32(w) for f, m, w in zip(fts, masks, weights)]
    return pre.astype(np.float32) + np.float32(alpha) * tsum(ts)


def ties_combine(pre, fts, masks, alpha, weights):
    ts = [tau(pre, f) * m * np.float32(w) for f, m, w in zip(fts, masks, weights)]
    elected = np.sign(tsum(ts))
    agree = [np.where(np.sign(t) == elected, t, 0.0).astype(np.float32) for t in ts]
    num = tsum(agree)
    den = tsum([np.where(a != 0, np.float32(w), np.float32(0)) for a, w in zip(agree, weights)])
    mean = np.where(den != 0, num / np.where(den != 0, den, 1), 0).astype(np.float32)
    return pre.astype(np.float32) + np.float32(alpha) * mean


def linear(pre, fts, weights):
    ts = [tau(pre, f) * np.float32(w) for f, w in zip(fts, weights)]
    return pre.astype(np.float32) + tsum(ts) / np.float32(sum(weights))
