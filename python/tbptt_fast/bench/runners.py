"""The implementations a row compares: tbptt_fast backends and the peers, behind one interface.

Each implementation is built from ``(Config, params, lr)`` and has ``fit(x, target,
return_grads=False) -> (losses, grads)``; ``IMPLS`` names them, with the configurations they
apply to and the overlap rule their gradients must match.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

import tbptt_fast as tb

from .configs import Config
from .peers import textbook, torch_loops


def native_ok() -> bool:
    """True when tbptt_fast's native module (backend "cpu") is importable."""
    return tb.native_available()


class TbRunner:
    """tbptt_fast ``Trainer`` with SGD and ``loss`` (mse or cross_entropy) on one
    backend/overlap rule."""

    def __init__(
        self, cfg: Config, params: dict, backend: str, overlap: str, lr: float, loss: str = "mse"
    ):
        model = tb.Model(
            cfg.cell, cfg.hidden, cfg.hidden, cfg.out, cfg.layers, dtype=cfg.dtype, seed=0
        )
        model.load_state_dict(params)  # copies, cast to the model's dtype
        self.trainer = tb.Trainer(
            model,
            k1=cfg.k1,
            k2=cfg.k2,
            loss=loss,
            optimizer=tb.SGD(lr=lr),
            overlap=overlap,
            backend=backend,
        )

    def fit(self, x, target, return_grads=False):
        res = self.trainer.fit(x, target, return_grads=return_grads)
        return res.losses, res.grads


class TorchBridgeRunner:
    """``tbptt_fast.torch.TBPTT`` over ``nn.LSTM/GRU/RNN`` + ``nn.Linear`` with
    ``torch.optim.SGD`` and the row's loss (overlap "stored"): the engine computes each
    update's gradient, PyTorch's optimizer steps."""

    def __init__(self, cfg: Config, params: dict, lr: float):
        torch = torch_loops.import_torch()
        from ..torch import TBPTT

        self.rnn, self.readout = torch_loops.sequence_modules(cfg.cell, params, cfg.dtype)
        self.runner = TBPTT(
            self.rnn, self.readout, k1=cfg.k1, k2=cfg.k2, loss=getattr(cfg, "loss", "mse")
        )
        self.opt = torch.optim.SGD([*self.rnn.parameters(), *self.readout.parameters()], lr=lr)
        self.names = [
            *(n for n, _ in self.rnn.named_parameters()),
            "readout.weight",
            "readout.bias",
        ]

    def fit(self, x, target, return_grads=False):
        grads = []
        params = [*self.rnn.parameters(), *self.readout.parameters()]

        def keep(_info):
            grads.append(
                {n: p.grad.numpy().copy() for n, p in zip(self.names, params, strict=True)}
            )

        res = self.runner.fit(x, target, self.opt, on_update=keep if return_grads else None)
        return res.losses, (grads if return_grads else None)


@dataclasses.dataclass
class Impl:
    """An implementation: how to build it, when it applies, and which rule it follows."""

    build: Callable[[Config, dict, float], object]
    applies: Callable[[Config], bool]
    overlap: str  # the tbptt_fast overlap rule it must match
    family: str  # "tbptt_fast" | "textbook" | "torch"


def _peer(cls):
    def build(cfg, params, lr):
        return cls(cfg.cell, params, cfg.k1, cfg.k2, lr=lr, dtype=cfg.dtype)

    return build


IMPLS = {
    "numpy": Impl(
        lambda c, p, lr: TbRunner(c, p, "numpy", "stored", lr),
        lambda c: True,
        "stored",
        "tbptt_fast",
    ),
    "cpu": Impl(
        lambda c, p, lr: TbRunner(c, p, "cpu", "stored", lr),
        lambda c: True,
        "stored",
        "tbptt_fast",
    ),
    "cpu-recompute": Impl(
        lambda c, p, lr: TbRunner(c, p, "cpu", "recompute", lr),
        lambda c: c.k1 < c.k2,
        "recompute",
        "tbptt_fast",
    ),
    "torch-bridge": Impl(
        TorchBridgeRunner,
        lambda c: c.cell in torch_loops.TORCH_CELLS,
        "stored",
        "tbptt_fast",
    ),
    "textbook": Impl(_peer(textbook.TextbookTBPTT), lambda c: True, "stored", "textbook"),
    "torch-seq": Impl(_peer(torch_loops.TorchSeq), lambda c: c.k1 == c.k2, "stored", "torch"),
    "torch-cell": Impl(_peer(torch_loops.TorchCell), lambda c: c.k1 == c.k2, "stored", "torch"),
    "torch-recompute": Impl(
        _peer(torch_loops.TorchRecompute),
        lambda c: c.k1 < c.k2,
        "recompute",
        "torch",
    ),
}


ALL_IMPLS = tuple(IMPLS)
TORCH_IMPLS = tuple(n for n, impl in IMPLS.items() if impl.family == "torch")


def unavailable_reason(name: str) -> str | None:
    """Why implementation ``name`` cannot run on this machine, or None if it can."""
    if name not in IMPLS:
        return f"unknown implementation {name!r}; choose from {', '.join(ALL_IMPLS)}"
    if (name.startswith("cpu") or name == "torch-bridge") and not native_ok():
        return "the native module tbptt_fast._core is not built (backend 'cpu')"
    if IMPLS[name].family == "torch" or name == "torch-bridge":
        try:
            torch_loops.import_torch()
        except ImportError as exc:
            return str(exc)
    return None


def make_params(cfg: Config, seed: int = 0) -> dict:
    """The initial parameters of a row: ``tb.Model(...).state_dict()`` (PyTorch layout)."""
    model = tb.Model(
        cfg.cell, cfg.hidden, cfg.hidden, cfg.out, cfg.layers, dtype=cfg.dtype, seed=seed
    )
    return model.state_dict()  # fresh copies


def make_data(cfg: Config, steps: int, seed: int = 1):
    """x ``[steps, B, H]`` and target ``[steps, B, O]`` of the row's dtype."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((steps, cfg.batch, cfg.hidden)).astype(cfg.dtype)
    target = (0.5 * rng.standard_normal((steps, cfg.batch, cfg.out))).astype(cfg.dtype)
    return x, target
