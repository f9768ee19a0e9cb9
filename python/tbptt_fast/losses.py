"""Per-step losses (contract: the loss): values and their gradients with respect to the outputs."""

from __future__ import annotations

import numpy as np

__all__ = ["LOSSES", "cross_entropy", "mse"]


def mse(y: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean squared error over the output features.

    y, target: [B, O] floating. Returns ``(l, dl_dy)``: l [B] with
    ``l_b = mean_j (y_bj - target_bj)^2`` and dl_dy [B, O] = ``2 (y - target) / O``.
    """
    diff = y - target
    return np.mean(diff * diff, axis=1), (2.0 / y.shape[1]) * diff


def cross_entropy(y: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Softmax cross-entropy with integer class targets.

    y: [B, O] floating logits; target: [B] integers in [0, O). Returns
    ``(l, dl_dy)``: l [B] = ``-log softmax(y_b)[target_b]``, dl_dy [B, O] =
    ``softmax(y) - onehot(target)``.
    """
    shifted = y - np.max(y, axis=1, keepdims=True)
    expd = np.exp(shifted)
    total = np.sum(expd, axis=1, keepdims=True)
    rows = np.arange(y.shape[0])
    l = np.log(total[:, 0]) - shifted[rows, target]
    dl_dy = expd / total
    dl_dy[rows, target] -= 1.0
    return l, dl_dy


LOSSES = {"mse": mse, "cross_entropy": cross_entropy}
