"""Optimizers and gradient clipping, defined exactly as ``torch.optim`` defines them.

``SGD`` and ``Adam`` are small configuration objects whose fields are
validated properties: they may be changed at any time (a bad value is refused
at the assignment), and a :class:`~tbptt_fast.Trainer` hands the current values
to its engine before each call. The state they need (momentum buffers, Adam
moments and step counter) lives in the backend engine of the trainer that uses
them, so one optimizer object can configure several trainers without sharing
state. The NumPy functions below are the reference that the native engines are
tested against.
"""

from __future__ import annotations

import abc
import math

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


def _field(name: str, doc: str):
    """A validated optimizer field: ``obj._check_<name>(value)`` runs at every
    assignment (a bad value raises and changes nothing); a change bumps the
    object's ``_version``, which tells the trainers that use it to push the new
    values to their engines."""
    attr = "_" + name

    def get(self):
        return getattr(self, attr)

    def set(self, value):
        value = getattr(self, "_check_" + name)(value)
        object.__setattr__(self, attr, value)
        object.__setattr__(self, "_version", self._version + 1)

    return property(get, set, doc=doc)


class _Optimizer(abc.ABC):
    """What SGD and Adam share: validated fields, ``config()``, equality, repr.

    Changing a field of an optimizer a trainer uses takes effect at that
    trainer's next update, with its optimizer state (momentum buffers, Adam
    moments and step count) kept, as changing a PyTorch ``param_group``'s value.
    """

    _FIELDS: tuple = ()
    _version = 0

    def __setattr__(self, name, value):
        if name not in self._FIELDS:
            raise AttributeError(
                f"{type(self).__name__} has no field {name!r}; its fields are {list(self._FIELDS)}"
            )
        super().__setattr__(name, value)

    @abc.abstractmethod
    def config(self) -> dict:
        """The engine's optimizer keys and values (each optimizer defines them)."""

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self.config() == other.config()

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._FIELDS)
        return f"{type(self).__name__}({fields})"


class SGD(_Optimizer):
    """Stochastic gradient descent, as ``torch.optim.SGD`` with ``dampening=0``.

    Per parameter ``p`` with gradient ``g``: ``g += weight_decay * p``; with
    momentum, ``buf = g`` on the first step and ``buf = momentum * buf + g``
    after, then ``g = g + momentum * buf`` (nesterov) or ``g = buf``;
    finally ``p -= lr * g``.

    The fields (``lr``, ``momentum``, ``nesterov``, ``weight_decay``) may be
    assigned at any time; an invalid value raises ``ValueError``/``TypeError``
    at the assignment and changes nothing.
    """

    _FIELDS = ("lr", "momentum", "nesterov", "weight_decay")

    lr = _field("lr", "Learning rate (float >= 0).")
    momentum = _field("momentum", "Momentum factor (float >= 0); > 0 when nesterov is set.")
    nesterov = _field("nesterov", "Nesterov momentum (bool; needs momentum > 0).")
    weight_decay = _field("weight_decay", "L2 penalty added to the gradient (float >= 0).")

    def __init__(
        self,
        lr: float = 0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ):
        object.__setattr__(self, "_nesterov", False)  # so that momentum's check can read it
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov
        self.weight_decay = weight_decay
        object.__setattr__(self, "_version", 0)

    def _check_lr(self, value) -> float:
        return _check_number("SGD lr", value)

    def _check_momentum(self, value) -> float:
        value = _check_number("SGD momentum", value)
        if self._nesterov and value <= 0:
            raise ValueError("SGD nesterov=True requires momentum > 0")
        return value

    def _check_nesterov(self, value) -> bool:
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"SGD nesterov must be a bool, got {type(value).__name__}")
        if value and self._momentum <= 0:
            raise ValueError("SGD nesterov=True requires momentum > 0")
        return bool(value)

    def _check_weight_decay(self, value) -> float:
        return _check_number("SGD weight_decay", value)

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


class Adam(_Optimizer):
    """Adam, as ``torch.optim.Adam`` with default flags (no amsgrad, L2 weight decay).

    ``g += weight_decay * p``; ``m = beta1*m + (1-beta1)*g``;
    ``v = beta2*v + (1-beta2)*g*g``; with ``s`` the optimizer's own step count,
    ``p -= lr / (1 - beta1**s) * m / (sqrt(v) / sqrt(1 - beta2**s) + eps)``.

    The fields (``lr``, ``betas``, ``eps``, ``weight_decay``) may be assigned
    at any time; an invalid value raises ``ValueError``/``TypeError`` at the
    assignment and changes nothing.
    """

    _FIELDS = ("lr", "betas", "eps", "weight_decay")

    lr = _field("lr", "Learning rate (float >= 0).")
    betas = _field("betas", "(beta1, beta2), each in [0, 1).")
    eps = _field("eps", "Added to the denominator (float > 0).")
    weight_decay = _field("weight_decay", "L2 penalty added to the gradient (float >= 0).")

    def __init__(
        self,
        lr: float = 0.001,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        self.lr = lr
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay
        object.__setattr__(self, "_version", 0)

    def _check_lr(self, value) -> float:
        return _check_number("Adam lr", value)

    def _check_betas(self, value) -> tuple[float, float]:
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise TypeError(f"Adam betas must be a pair (beta1, beta2), got {value!r}")
        b1 = _check_number("Adam betas[0]", value[0], below_one=True)
        b2 = _check_number("Adam betas[1]", value[1], below_one=True)
        return (b1, b2)

    def _check_eps(self, value) -> float:
        eps = _check_number("Adam eps", value)
        if eps == 0.0:
            raise ValueError(
                "Adam eps must be > 0, got 0.0: with eps = 0 a parameter whose gradient "
                "is zero (e.g. a block with every target masked) gets 0/0 = NaN"
            )
        return eps

    def _check_weight_decay(self, value) -> float:
        return _check_number("Adam weight_decay", value)

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
