"""PyTorch peers: the TBPTT loops a PyTorch user writes, with plain SGD and mse.

- ``TorchSeq``     (k1 == k2): ``nn.LSTM/GRU/RNN`` + ``nn.Linear`` over each block of k
  steps, carrying the state and detaching it after every update.
- ``TorchCell``    (k1 == k2): the same with ``nn.LSTMCell/GRUCell/RNNCell`` stepped from
  Python.
- ``TorchRecompute`` (k1 <= k2, including TBPTT(1, k2)): overlapping windows done
  correctly. The real forward runs without a graph and keeps the detached state at every
  step that will open a future window; every k1 steps the forward is re-run with grad from
  the state at ``t - k2`` over the stored inputs, the loss is the mean over the block's last
  k1 outputs (``Loss_P``, as in ``tbptt_fast.reference``), then backward and one SGD step.
  This is tbptt_fast's ``overlap="recompute"``.

Parameters load from a ``tb.Model.state_dict()`` (PyTorch names,
``tbptt_fast.reference.param_names``). torch is imported lazily (``import_torch``), so this
module imports without it.

Shapes: x ``[T, B, D]`` and target ``[T, B, O]`` NumPy arrays (time first).
"""

from __future__ import annotations

import numpy as np


def import_torch():
    """Return the torch module, or raise ImportError with a readable message."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("torch is not installed: the PyTorch peers are skipped") from exc
    return torch


_SEQ = {"rnn_tanh": "RNN", "lstm": "LSTM", "gru": "GRU"}
_CELL = {"rnn_tanh": "RNNCell", "lstm": "LSTMCell", "gru": "GRUCell"}

#: The cells the PyTorch peers (and ``sequence_modules``) cover.
TORCH_CELLS = tuple(_SEQ)


def sequence_modules(cell, params, dtype="float32"):
    """``(rnn, readout)``: ``nn.LSTM/GRU/RNN`` and ``nn.Linear`` holding copies of
    ``params`` (a ``tb.Model.state_dict()``), in the torch dtype of ``dtype``."""
    torch = import_torch()
    tdtype = getattr(torch, np.dtype(dtype).name)
    num_layers = sum(1 for k in params if k.startswith("weight_ih_l"))
    d = params["weight_ih_l0"].shape[1]
    hidden = params["weight_hh_l0"].shape[1]
    out = params["readout.weight"].shape[0]
    extra = {"nonlinearity": "tanh"} if cell == "rnn_tanh" else {}
    rnn = getattr(torch.nn, _SEQ[cell])(d, hidden, num_layers, **extra)
    sd = {k: torch.as_tensor(np.array(v)) for k, v in params.items() if "_l" in k}
    rnn.to(tdtype).load_state_dict(sd)
    readout = torch.nn.Linear(hidden, out).to(tdtype)
    readout.load_state_dict(
        {
            "weight": torch.as_tensor(np.array(params["readout.weight"])),
            "bias": torch.as_tensor(np.array(params["readout.bias"])),
        }
    )
    return rnn, readout


class _TorchPeer:
    """Common parts: building the modules, SGD, state handling, numpy <-> torch."""

    def __init__(self, cell, params, k1, k2=None, lr=0.01, dtype="float32", per_step=False):
        torch = import_torch()
        self.torch = torch
        self.cell = cell
        self.k1 = int(k1)
        self.k2 = int(k2 if k2 is not None else k1)
        self.lr = lr
        self.dtype = getattr(torch, np.dtype(dtype).name)  # float32 | float64
        num_layers = sum(1 for k in params if k.startswith("weight_ih_l"))
        d = params["weight_ih_l0"].shape[1]
        hidden = params["weight_hh_l0"].shape[1]
        out = params["readout.weight"].shape[0]
        nn = torch.nn
        extra = {"nonlinearity": "tanh"} if cell == "rnn_tanh" else {}
        if per_step:
            self.cells = nn.ModuleList(
                getattr(nn, _CELL[cell])(d if i == 0 else hidden, hidden, **extra)
                for i in range(num_layers)
            )
            sd = {}
            for i in range(num_layers):
                for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    sd[f"{i}.{kind}"] = torch.as_tensor(np.asarray(params[f"{kind}_l{i}"]))
            self.cells.to(self.dtype).load_state_dict(sd)
            self.rnn_params = list(self.cells.parameters())
        else:
            self.rnn = getattr(nn, _SEQ[cell])(d, hidden, num_layers, **extra)
            sd = {k: torch.as_tensor(np.asarray(v)) for k, v in params.items() if "_l" in k}
            self.rnn.to(self.dtype).load_state_dict(sd)
            self.rnn_params = list(self.rnn.parameters())
        self.readout = nn.Linear(hidden, out).to(self.dtype)
        self.readout.load_state_dict(
            {
                "weight": torch.as_tensor(np.asarray(params["readout.weight"])),
                "bias": torch.as_tensor(np.asarray(params["readout.bias"])),
            }
        )
        self.opt = torch.optim.SGD([*self.rnn_params, *self.readout.parameters()], lr=lr)
        self.num_layers, self.hidden = num_layers, hidden
        self.state = None

    def _zero_state(self, batch, per_layer):
        z = self.torch.zeros
        if per_layer:
            shape = (batch, self.hidden)
            if self.cell == "lstm":
                return [(z(shape, dtype=self.dtype), z(shape, dtype=self.dtype))] * self.num_layers
            return [z(shape, dtype=self.dtype)] * self.num_layers
        shape = (self.num_layers, batch, self.hidden)
        if self.cell == "lstm":
            return (z(shape, dtype=self.dtype), z(shape, dtype=self.dtype))
        return z(shape, dtype=self.dtype)

    @staticmethod
    def _detach(state):
        if isinstance(state, tuple):
            return tuple(s.detach() for s in state)
        if isinstance(state, list):
            return [_TorchPeer._detach(s) for s in state]
        return state.detach()

    def _grads(self):
        """Current .grad of every parameter as {PyTorch name: numpy array}."""
        out = {}
        if hasattr(self, "cells"):
            for i, c in enumerate(self.cells):
                for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    out[f"{kind}_l{i}"] = getattr(c, kind).grad.detach().numpy().copy()
        else:
            for name, p in self.rnn.named_parameters():
                out[name] = p.grad.detach().numpy().copy()
        out["readout.weight"] = self.readout.weight.grad.detach().numpy().copy()
        out["readout.bias"] = self.readout.bias.grad.detach().numpy().copy()
        return out

    def _step(self, loss, return_grads):
        self.opt.zero_grad(set_to_none=False)
        loss.backward()
        grads = self._grads() if return_grads else None
        self.opt.step()
        return grads


class TorchSeq(_TorchPeer):
    """``nn.LSTM/GRU/RNN`` + ``nn.Linear``: carry the state, detach every k steps (k1 == k2)."""

    def __init__(self, cell, params, k1, k2=None, lr=0.01, dtype="float32", loss="mse"):
        super().__init__(cell, params, k1, k2, lr, dtype)
        if self.k1 != self.k2:
            raise ValueError("TorchSeq implements TBPTT(k, k) only")
        self.loss = loss  # "mse", or "cross_entropy" with integer class targets [T, B]

    def fit(self, x, target, return_grads=False):
        """Train over x ``[T, B, D]``; returns (losses ``[U]``, grads list or None)."""
        torch = self.torch
        ce = self.loss == "cross_entropy"
        x = torch.as_tensor(x, dtype=self.dtype)
        target = torch.as_tensor(target, dtype=torch.int64 if ce else self.dtype)
        if self.state is None:
            self.state = self._zero_state(x.shape[1], per_layer=False)
        losses, grads = [], []
        for s in range(0, x.shape[0], self.k1):
            out, state = self.rnn(x[s : s + self.k1], self.state)
            y, t = self.readout(out), target[s : s + self.k1]
            if ce:
                loss = torch.nn.functional.cross_entropy(y.reshape(-1, y.shape[-1]), t.reshape(-1))
            else:
                loss = torch.nn.functional.mse_loss(y, t)
            g = self._step(loss, return_grads)
            self.state = self._detach(state)
            losses.append(loss.item())
            if return_grads:
                grads.append(g)
        return np.array(losses), (grads if return_grads else None)


class TorchCell(_TorchPeer):
    """``nn.LSTMCell/GRUCell/RNNCell`` stepped from Python; detach every k steps (k1 == k2)."""

    def __init__(self, cell, params, k1, k2=None, lr=0.01, dtype="float32"):
        super().__init__(cell, params, k1, k2, lr, dtype, per_step=True)
        if self.k1 != self.k2:
            raise ValueError("TorchCell implements TBPTT(k, k) only")

    def _cell_step(self, x_t):
        inp = x_t
        for i, c in enumerate(self.cells):
            self.state[i] = c(inp, self.state[i])
            inp = self.state[i][0] if self.cell == "lstm" else self.state[i]
        return self.readout(inp)

    def fit(self, x, target, return_grads=False):
        """Train over x ``[T, B, D]``; returns (losses ``[U]``, grads list or None)."""
        torch = self.torch
        x = torch.as_tensor(x, dtype=self.dtype)
        target = torch.as_tensor(target, dtype=self.dtype)
        if self.state is None:
            self.state = self._zero_state(x.shape[1], per_layer=True)
        losses, grads = [], []
        for s in range(0, x.shape[0], self.k1):
            ys = [self._cell_step(x_t) for x_t in x[s : s + self.k1]]
            loss = torch.nn.functional.mse_loss(torch.stack(ys), target[s : s + self.k1])
            g = self._step(loss, return_grads)
            self.state = self._detach(self.state)
            losses.append(loss.item())
            if return_grads:
                grads.append(g)
        return np.array(losses), (grads if return_grads else None)


class TorchRecompute(_TorchPeer):
    """Overlapping TBPTT(k1, k2), k1 <= k2, by re-running the window forward at each update.

    Keeps the last k2 inputs and the detached real-forward state at each step ``s`` with
    ``s + k2`` an update step (the start of a future window). Equals tbptt_fast's
    ``overlap="recompute"`` for fit calls whose lengths are multiples of k1.
    """

    def __init__(self, cell, params, k1, k2=None, lr=0.01, dtype="float32"):
        super().__init__(cell, params, k1, k2, lr, dtype)
        if self.k1 > self.k2:
            raise ValueError("TorchRecompute implements k1 <= k2")
        self.t = 0  # steps so far
        self.x_hist = None  # the last <= k2 inputs of earlier fit calls, [n, B, D]
        self.boundary = {}  # step s -> detached real state after step s

    def fit(self, x, target, return_grads=False):
        """Train over x ``[T, B, D]`` (T a multiple of k1); returns (losses, grads or None)."""
        torch = self.torch
        k1, k2 = self.k1, self.k2
        if x.shape[0] % k1:
            raise ValueError("TorchRecompute.fit needs T to be a multiple of k1")
        x = torch.as_tensor(x, dtype=self.dtype)
        target = torch.as_tensor(target, dtype=self.dtype)
        if self.state is None:
            self.state = self._zero_state(x.shape[1], per_layer=False)
            self.boundary[0] = self.state
        t0 = self.t  # step count before this call; x[i] is step t0 + i + 1
        hist = self.x_hist
        losses, grads = [], []
        for s in range(0, x.shape[0], k1):
            # the real forward of the block, without a graph, split where a window opens
            start = t0 + s  # steps done before this block
            cuts = sorted({start + j for j in range(1, k1) if (start + j + k2) % k1 == 0})
            outs, prev = [], start
            with torch.no_grad():
                for c in [*cuts, start + k1]:
                    out, self.state = self.rnn(x[prev - t0 : c - t0], self.state)
                    outs.append(out)
                    self.boundary[c] = self.state
                    prev = c
                y_real = self.readout(torch.cat(outs))
                loss_real = torch.nn.functional.mse_loss(y_real, target[s : s + k1])
            t = start + k1
            w = max(0, t - k2)
            if w - t0 >= 0:
                xw = x[w - t0 : t - t0]
            else:  # the window reaches into the previous fit call
                xw = torch.cat([hist[hist.shape[0] - (t0 - w) :], x[: t - t0]])
            out, _ = self.rnn(xw, self.boundary[w])
            loss = torch.nn.functional.mse_loss(self.readout(out[-k1:]), target[s : s + k1])
            g = self._step(loss, return_grads)
            for old in [b for b in self.boundary if b < t + k1 - k2]:
                del self.boundary[old]
            losses.append(loss_real.item())
            if return_grads:
                grads.append(g)
        self.t = t0 + x.shape[0]
        keep = min(k2, self.t)
        if x.shape[0] >= keep:
            self.x_hist = x[x.shape[0] - keep :].clone()
        else:
            self.x_hist = torch.cat([hist, x])[-keep:].clone()
        return np.array(losses), (grads if return_grads else None)
