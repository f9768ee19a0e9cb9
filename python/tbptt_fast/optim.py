"""Optimizers and gradient clipping, defined exactly as ``torch.optim`` defines them.

``SGD`` and ``Adam`` are small configuration objects; the state they need
(momentum buffers, Adam moments and step counter) lives in the backend engine
of the :class:`~tbptt_fast.Trainer` that uses them, so one optimizer object can
configure several trainers without sharing state. The NumPy functions below are
the reference that the native engines are tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["SGD", "Adam", "adam_step", "clip_grad_norm", "sgd_step"]


def _check_number(name: str, value, *, minimum: float = 0.0, below_one: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < minimum or (below_one and value >= 1.0):
        expected = f"in [{minimum}, 1)" if below_one else f">= {minimum}"
        raise ValueError(f"{name} must be a finite number {expected}, got {value}")
    return value


@dataclass(frozen=True)
class SGD:
    """Stochastic gradient descent, as ``torch.optim.SGD`` with ``dampening=0``.

    Per parameter ``p`` with gradient ``g``: ``g += weight_decay * p``; with
    momentum, ``buf = g`` on the first step and ``buf = momentum * buf + g``
    after, then ``g = g + momentum * buf`` (nesterov) or ``g = buf``;
    finally ``p -= lr * g``.
    """

    lr: float = 0.01
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "lr", _check_number("SGD lr", self.lr))
        object.__setattr__(self, "momentum", _check_number("SGD momentum", self.momentum))
        object.__setattr__(
            self, "weight_decay", _check_number("SGD weight_decay", self.weight_decay)
        )
        if not isinstance(self.nesterov, (bool, np.bool_)):
            raise TypeError(f"SGD nesterov must be a bool, got {type(self.nesterov).__name__}")
        if self.nesterov and self.momentum <= 0:
            raise ValueError("SGD nesterov=True requires momentum > 0")

    def config(self) -> dict:
        """The engine-level configuration (see ``reference.Engine``)."""
        return {
            "optimizer": "sgd",
            "lr": self.lr,
            "momentum": self.momentum,
            "nesterov": bool(self.nesterov),
            "beta1": 0.0,
            "beta2": 0.0,
            "eps": 0.0,
            "weight_decay": self.weight_decay,
        }


@dataclass(frozen=True)
class Adam:
    """Adam, as ``torch.optim.Adam`` with default flags (no amsgrad, L2 weight decay).

    ``g += weight_decay * p``; ``m = beta1*m + (1-beta1)*g``;
    ``v = beta2*v + (1-beta2)*g*g``; with ``s`` the optimizer's own step count,
    ``p -= lr / (1 - beta1**s) * m / (sqrt(v) / sqrt(1 - beta2**s) + eps)``.
    """

    lr: float = 0.001
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "lr", _check_number("Adam lr", self.lr))
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise TypeError(f"Adam betas must be a pair (beta1, beta2), got {self.betas!r}")
        b1 = _check_number("Adam betas[0]", self.betas[0], below_one=True)
        b2 = _check_number("Adam betas[1]", self.betas[1], below_one=True)
        object.__setattr__(self, "betas", (b1, b2))
        object.__setattr__(self, "eps", _check_number("Adam eps", self.eps))
        object.__setattr__(
            self, "weight_decay", _check_number("Adam weight_decay", self.weight_decay)
        )

    def config(self) -> dict:
        """The engine-level configuration (see ``reference.Engine``)."""
        return {
            "optimizer": "adam",
            "lr": self.lr,
            "momentum": 0.0,
            "nesterov": False,
            "beta1": self.betas[0],
            "beta2": self.betas[1],
            "eps": self.eps,
            "weight_decay": self.weight_decay,
        }


def clip_grad_norm(grads: list[np.ndarray], max_norm: float) -> float:
    """Scale ``grads`` in place as ``torch.nn.utils.clip_grad_norm_`` does.

    The total norm is the 2-norm of all gradients together; every gradient is
    multiplied by ``min(1, max_norm / (total + 1e-6))``. Returns the total norm.
    """
    total = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            g *= g.dtype.type(coef)
    return total


def sgd_step(params: list[np.ndarray], grads: list[np.ndarray], state: dict, cfg: dict) -> None:
    """One ``torch.optim.SGD`` step, updating ``params`` in place.

    ``state`` is the optimizer state (a dict this function fills: one momentum
    buffer per parameter); ``cfg`` is ``SGD.config()``.
    """
    lr, mom, wd = cfg["lr"], cfg["momentum"], cfg["weight_decay"]
    bufs = state.setdefault("momentum_buffer", [None] * len(params))
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        d = g + wd * p if wd != 0 else g.copy()
        if mom != 0:
            if bufs[i] is None:
                bufs[i] = d.copy()
            else:
                bufs[i] = mom * bufs[i] + d
            d = d + mom * bufs[i] if cfg["nesterov"] else bufs[i]
        p -= (lr * d).astype(p.dtype)


def adam_step(params: list[np.ndarray], grads: list[np.ndarray], state: dict, cfg: dict) -> None:
    """One ``torch.optim.Adam`` step, updating ``params`` in place.

    ``state`` holds ``step`` and the moments ``exp_avg`` / ``exp_avg_sq``.
    """
    b1, b2, eps, lr, wd = cfg["beta1"], cfg["beta2"], cfg["eps"], cfg["lr"], cfg["weight_decay"]
    if "step" not in state:
        state["step"] = 0
        state["exp_avg"] = [np.zeros_like(p) for p in params]
        state["exp_avg_sq"] = [np.zeros_like(p) for p in params]
    state["step"] += 1
    s = state["step"]
    bc1 = 1.0 - b1**s
    bc2_sqrt = math.sqrt(1.0 - b2**s)
    for p, g, m, v in zip(params, grads, state["exp_avg"], state["exp_avg_sq"], strict=True):
        d = g + wd * p if wd != 0 else g
        m += (1.0 - b1) * (d - m)
        v *= b2
        v += (1.0 - b2) * d * d
        denom = np.sqrt(v) / bc2_sqrt + eps
        p -= ((lr / bc1) * m / denom).astype(p.dtype)
