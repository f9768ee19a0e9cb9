"""The NumPy reference of TBPTT(k1, k2): the yardstick every backend is tested against.

Readable rather than fast. The cells are one table, :data:`CELLS` (name ->
:class:`CellDef`: gate and state counts, one step forward and backward), in the
order of the native registry. The engine implements the interface that the
native engines (``tbptt_fast._core.Engine``, ``CudaEngine``) share; the public
:class:`~tbptt_fast.Trainer` validates every argument and then calls one of them.

Engine interface
----------------
``Engine(config, params)``: ``config`` is an :class:`~tbptt_fast._config.EngineConfig`
(the native engines take its ``as_dict()``; the reference takes either form).
``params`` are the model's own arrays in canonical order (``param_names``);
the engine updates them in place.

- ``reset(initial_state)``: trainer-level reset; ``initial_state`` is None
  (zeros) or a flat layer-major list ``[h_0, (c_0,) h_1, ...]`` of [B, H] arrays.
  The optimizer state is kept.
- ``run(x, target, mask, resets, flush, return_grads, return_outputs)`` with
  x [T, B, D], target [T, B, O] (mse) or [T, B] int64 (cross_entropy, 0 where
  masked), mask [T, B] (0/1, model dtype) or None (all ones), resets [T, B]
  (uint8) or None (no resets) returns
  ``(losses [U], update_steps [U] int64, grads (U lists of arrays) or None,
  outputs [T, B, O] or None)``.
- ``flush(return_grads)``: the same tuple for an update on the pending block.
- ``state()``, ``step_count``, ``pending``, ``stored_steps``,
  ``pull_params()``, ``push_params()``.

A non-finite loss or gradient raises :class:`~tbptt_fast.errors.NonFiniteError`
naming the update step.

Shapes: T steps, B batch, D input, H hidden, G gates (1 rnn, 4 lstm i,f,g,o,
3 gru r,z,n, 3 cifg f,g,o), O outputs, L layers. Row-major, time first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from ._config import EngineConfig
from .errors import NonFiniteError
from .losses import LOSSES
from .optim import adam_step, clip_grad_norm, sgd_step

__all__ = [
    "CELLS",
    "GATES",
    "CellDef",
    "Engine",
    "cell_backward",
    "cell_forward",
    "param_names",
    "state_count",
    "window_start",
]


def param_names(num_layers: int) -> list[str]:
    """Parameter names in canonical order (PyTorch's names, SPEC section 1)."""
    names = []
    for k in range(num_layers):
        names += [f"weight_ih_l{k}", f"weight_hh_l{k}", f"bias_ih_l{k}", f"bias_hh_l{k}"]
    return [*names, "readout.weight", "readout.bias"]


def window_start(t: int, t_prev: int, k1: int, k2: int | None) -> int:
    """``w`` of SPEC section 3: the gradient flows back through steps (w, t].

    ``t`` is the step of this update, ``t_prev`` that of the previous one (0 if
    none); ``k2=None`` is unbounded (w = 0).
    """
    if k2 is None:
        return 0
    return max(0, t - k2, t_prev - max(0, k2 - k1))


def _sigmoid(z):
    # tanh form: no overflow warning for large |z|
    return 0.5 * (np.tanh(0.5 * z) + 1.0)


# ----------------------------------------------------------------------------
# Cells: one step of one layer. A cell never loops over time.
#
# forward(a, u, state) -> (new_state, cache): a [B, G*H] is the input projection
#   ``x W_ih^T + b_ih``, u [B, G*H] the recurrent one ``h W_hh^T + b_hh``, state
#   ``(h,)`` or ``(h, c)``, each [B, H]; the cache holds what the backward pass
#   needs (post-activation gates, and for gru the hidden-side term u_n).
# backward(cache, state, d_state) -> (dA, dU, d_direct): state is the state that
#   entered the step, d_state the gradient w.r.t. the state it produced; dA, dU
#   [B, G*H] are the gradients w.r.t. a (and so b_ih) and u (and so b_hh), and
#   d_direct the part of the gradient w.r.t. the entering state that does not
#   pass through W_hh.
# ----------------------------------------------------------------------------


def _rnn_tanh_forward(a, u, state):
    h_new = np.tanh(a + u)
    return (h_new,), {"h": h_new}


def _rnn_tanh_backward(cache, state, d_state):
    dh = d_state[0]
    dA = dh * (1 - cache["h"] ** 2)
    return dA, dA, (np.zeros_like(dh),)


def _rnn_relu_forward(a, u, state):
    h_new = np.maximum(a + u, 0)
    return (h_new,), {"h": h_new}


def _rnn_relu_backward(cache, state, d_state):
    dh = d_state[0]
    dA = dh * (cache["h"] > 0)
    return dA, dA, (np.zeros_like(dh),)


def _lstm_forward(a, u, state):
    H = state[0].shape[1]
    z = a + u
    i = _sigmoid(z[:, 0:H])
    f = _sigmoid(z[:, H : 2 * H])
    g = np.tanh(z[:, 2 * H : 3 * H])
    o = _sigmoid(z[:, 3 * H : 4 * H])
    c_new = f * state[1] + i * g
    tanh_c = np.tanh(c_new)
    h_new = o * tanh_c
    return (h_new, c_new), {"i": i, "f": f, "g": g, "o": o, "tanh_c": tanh_c}


def _lstm_backward(cache, state, d_state):
    dh = d_state[0]
    i, f, g, o, tanh_c = cache["i"], cache["f"], cache["g"], cache["o"], cache["tanh_c"]
    dc = d_state[1] + dh * o * (1 - tanh_c**2)
    d_i = dc * g * i * (1 - i)
    d_f = dc * state[1] * f * (1 - f)
    d_g = dc * i * (1 - g**2)
    d_o = dh * tanh_c * o * (1 - o)
    dA = np.concatenate([d_i, d_f, d_g, d_o], axis=1)
    return dA, dA, (np.zeros_like(dh), dc * f)


def _gru_forward(a, u, state):
    h = state[0]
    H = h.shape[1]
    r = _sigmoid(a[:, 0:H] + u[:, 0:H])
    z = _sigmoid(a[:, H : 2 * H] + u[:, H : 2 * H])
    u_n = u[:, 2 * H : 3 * H]
    n = np.tanh(a[:, 2 * H : 3 * H] + r * u_n)
    h_new = (1 - z) * n + z * h
    return (h_new,), {"r": r, "z": z, "n": n, "u_n": u_n}


def _gru_backward(cache, state, d_state):
    dh = d_state[0]
    r, z, n, u_n = cache["r"], cache["z"], cache["n"], cache["u_n"]
    h = state[0]
    d_n = dh * (1 - z) * (1 - n**2)  # w.r.t. the pre-activation of n
    d_z = dh * (h - n) * z * (1 - z)
    d_r = d_n * u_n * r * (1 - r)
    dA = np.concatenate([d_r, d_z, d_n], axis=1)
    dU = np.concatenate([d_r, d_z, d_n * r], axis=1)
    return dA, dU, (dh * z,)


def _cifg_forward(a, u, state):
    # the input gate is coupled to the forget gate: i = 1 - f
    H = state[0].shape[1]
    z = a + u
    f = _sigmoid(z[:, 0:H])
    g = np.tanh(z[:, H : 2 * H])
    o = _sigmoid(z[:, 2 * H : 3 * H])
    c_new = f * state[1] + (1 - f) * g
    tanh_c = np.tanh(c_new)
    h_new = o * tanh_c
    return (h_new, c_new), {"f": f, "g": g, "o": o, "tanh_c": tanh_c}


def _cifg_backward(cache, state, d_state):
    dh = d_state[0]
    f, g, o, tanh_c = cache["f"], cache["g"], cache["o"], cache["tanh_c"]
    dc = d_state[1] + dh * o * (1 - tanh_c**2)
    d_f = dc * (state[1] - g) * f * (1 - f)  # dc'/df = c - g
    d_g = dc * (1 - f) * (1 - g**2)
    d_o = dh * tanh_c * o * (1 - o)
    dA = np.concatenate([d_f, d_g, d_o], axis=1)
    return dA, dA, (np.zeros_like(dh), dc * f)


@dataclass(frozen=True)
class CellDef:
    """One cell of SPEC section 1.

    gates: G, gate blocks per hidden unit (in the parameters' row order);
    states: 1 (state ``(h,)``) or 2 (``(h, c)``); forward and backward: one
    step of one layer, with the signatures described above.
    """

    gates: int
    states: int
    forward: Callable
    backward: Callable


# The cell registry, in the native registry's order (tbptt_fast._core.cells()).
CELLS: dict[str, CellDef] = {
    "rnn_tanh": CellDef(1, 1, _rnn_tanh_forward, _rnn_tanh_backward),
    "rnn_relu": CellDef(1, 1, _rnn_relu_forward, _rnn_relu_backward),
    "lstm": CellDef(4, 2, _lstm_forward, _lstm_backward),  # i, f, g, o
    "gru": CellDef(3, 1, _gru_forward, _gru_backward),  # r, z, n
    "cifg": CellDef(3, 2, _cifg_forward, _cifg_backward),  # f, g, o
}

GATES = {name: d.gates for name, d in CELLS.items()}  # name -> G (the benchmarks read it)

#: The cells whose state is ``(h, c)``, for messages.
PAIRED = tuple(name for name, d in CELLS.items() if d.states == 2)


def _cell(cell: str) -> CellDef:
    try:
        return CELLS[cell]
    except KeyError:
        raise ValueError(f"unknown cell {cell!r}") from None


def state_count(cell: str) -> int:
    """Arrays per layer in the state: 1 (``h``) or 2 (``(h, c)``)."""
    return _cell(cell).states


def cell_forward(cell: str, a: np.ndarray, state: tuple, w_hh: np.ndarray, b_hh: np.ndarray):
    """One step of one layer.

    a: [B, G*H] input projection ``x W_ih^T + b_ih``; state: ``(h,)`` or
    ``(h, c)`` (lstm, cifg), each [B, H]; w_hh [G*H, H]; b_hh [G*H].
    Returns ``(new_state, cache)``; the cache holds what the backward pass needs
    (post-activation gates, and for gru the hidden-side candidate term u_n).
    """
    d = _cell(cell)
    return d.forward(a, state[0] @ w_hh.T + b_hh, state)


def cell_backward(cell: str, cache: dict, state: tuple, d_state: tuple):
    """Backward of one step of one layer, from its cache.

    state: the state that entered the step (``(h,)`` or ``(h, c)``);
    d_state: gradient w.r.t. the state the step produced (same structure).
    Returns ``(dA, dU, d_direct)``: dA [B, G*H] the gradient w.r.t. the input
    projection ``a`` (and so ``b_ih``), dU [B, G*H] w.r.t. ``u = h W_hh^T + b_hh``,
    and d_direct the part of the gradient w.r.t. the entering state that does
    not pass through ``W_hh`` (the caller adds ``dU @ W_hh`` to its ``h`` part).
    """
    return _cell(cell).backward(cache, state, d_state)


# ----------------------------------------------------------------------------
# The stored history: one record per step.
# ----------------------------------------------------------------------------


@dataclass
class LayerStep:
    """One layer at one step: its input [B, D_l], the state that entered the
    step (after resets) and the cell's cache."""

    inp: np.ndarray
    state_in: tuple
    cache: dict


@dataclass
class Step:
    """Everything kept about one step s of the real forward pass."""

    s: int
    x: np.ndarray  # [B, D]
    reset: np.ndarray  # [B] bool
    layers: list  # L LayerStep
    h_top: np.ndarray  # [B, H] output of the last layer
    y: np.ndarray  # [B, O]
    target: np.ndarray  # [B, O] or [B]
    mask: np.ndarray  # [B] 0/1
    loss: np.ndarray  # [B] per-element loss l_tb (unmasked)


class Engine:
    """NumPy TBPTT(k1, k2) engine; see the module docstring for the interface."""

    def __init__(self, config: EngineConfig | Mapping, params: list[np.ndarray]):
        cfg = config if isinstance(config, EngineConfig) else EngineConfig.from_dict(config)
        self.cfg = cfg
        self.cell_def = _cell(cfg.cell)
        self.L = cfg.num_layers
        self.H = cfg.hidden_size
        self.k1 = cfg.k1
        self.k2 = None if cfg.unbounded else cfg.k2
        self.loss_fn = LOSSES[cfg.loss]
        self.recompute = cfg.overlap == "recompute"
        self.dtype = np.dtype(cfg.dtype)
        self.step_fn = sgd_step if cfg.optimizer == "sgd" else adam_step
        self.opt_cfg = cfg.as_dict()  # the optimizer steps read their keys from it
        self.params = params
        self.opt_state: dict = {}
        self.reset(None)

    # -- parameters -----------------------------------------------------------
    def _layer(self, k: int):
        return self.params[4 * k : 4 * k + 4]  # w_ih, w_hh, b_ih, b_hh

    def pull_params(self) -> None:
        """Parameters already live in the model's arrays."""

    def push_params(self) -> None:
        """Parameters already live in the model's arrays."""

    # -- state ----------------------------------------------------------------
    def reset(self, initial_state: list[np.ndarray] | None) -> None:
        """Trainer-level reset: forget the stream, keep the optimizer state."""
        self.t = 0  # steps since the reset
        self.t_prev = 0  # step of the previous update
        self.history: list[Step] = []
        n = self.cell_def.states
        if initial_state is None:
            self.init = None
        else:
            self.init = [
                tuple(np.array(a, dtype=self.dtype) for a in initial_state[n * k : n * k + n])
                for k in range(self.L)
            ]
        self.cur = None if self.init is None else [tuple(a.copy() for a in s) for s in self.init]

    def _initial(self, B: int) -> list[tuple]:
        if self.init is not None:
            return self.init
        return [
            tuple(np.zeros((B, self.H), self.dtype) for _ in range(self.cell_def.states))
            for _ in range(self.L)
        ]

    def state(self) -> list[np.ndarray] | None:
        """Copies of the forward state, flat layer-major, or None before any step."""
        if self.cur is None:
            return None
        return [a.copy() for s in self.cur for a in s]

    @property
    def step_count(self) -> int:
        return self.t

    @property
    def pending(self) -> int:
        return self.t - self.t_prev

    @property
    def stored_steps(self) -> int:
        return len(self.history)

    # -- forward ---------------------------------------------------------------
    def _forward_layers(self, x, reset, state_before, initial):
        """Run all layers for one step. Returns (layers, new_state, h_top)."""
        layers, new_state, inp = [], [], x
        for k in range(self.L):
            w_ih, w_hh, b_ih, b_hh = self._layer(k)
            state_in = tuple(
                np.where(reset[:, None], init_a, a)
                for a, init_a in zip(state_before[k], initial[k], strict=True)
            )
            u = state_in[0] @ w_hh.T + b_hh
            out, cache = self.cell_def.forward(inp @ w_ih.T + b_ih, u, state_in)
            layers.append(LayerStep(inp, state_in, cache))
            new_state.append(out)
            inp = out[0]
        return layers, new_state, inp

    def _step(self, x, target, mask, reset) -> Step:
        B = x.shape[0]
        initial = self._initial(B)
        if self.cur is None:
            self.cur = [tuple(a.copy() for a in s) for s in initial]
        layers, self.cur, h_top = self._forward_layers(x, reset, self.cur, initial)
        w_out, b_out = self.params[-2], self.params[-1]
        y = h_top @ w_out.T + b_out
        loss, _ = self.loss_fn(y, target)
        self.t += 1
        rec = Step(self.t, x, reset, layers, h_top, y, target, mask, loss)
        self.history.append(rec)
        return rec

    def _trim(self) -> None:
        """Drop the records no future update can need (SPEC: ring of max(k1, k2))."""
        if self.k2 is None:
            return
        # every later update has w >= max(t - k2, t' - max(0, k2 - k1)), and needs the block (t', t]
        keep_after = min(
            self.t_prev, max(self.t - self.k2, self.t_prev - max(0, self.k2 - self.k1))
        )
        self.history = [r for r in self.history if r.s > keep_after]

    # -- update ----------------------------------------------------------------
    def _recompute_window(self, window: list[Step]) -> list[tuple]:
        """Re-run the forward over the window with the current weights, from the
        stored state that entered its first step. Returns per step (layers, h_top)."""
        initial = self._initial(window[0].x.shape[0])
        out = []
        state = [lay.state_in for lay in window[0].layers]  # resets already applied
        no_reset = np.zeros_like(window[0].reset)
        for j, rec in enumerate(window):
            reset = no_reset if j == 0 else rec.reset
            layers, state, h_top = self._forward_layers(rec.x, reset, state, initial)
            out.append((layers, h_top))
        return out

    def _gradient(self) -> tuple[float, list[np.ndarray]]:
        """Loss_P and its gradient for an update at step t (SPEC section 3)."""
        t, t_prev = self.t, self.t_prev
        w = window_start(t, t_prev, self.k1, self.k2)
        by_step = {r.s: r for r in self.history}
        block = [by_step[s] for s in range(t_prev + 1, t + 1)]
        window = [by_step[s] for s in range(w + 1, t + 1)]
        count = max(1.0, float(sum(np.sum(r.mask) for r in block)))
        loss = float(sum(np.sum(r.mask * r.loss) for r in block)) / count

        grads = [np.zeros_like(p) for p in self.params]
        w_out = self.params[-2]

        # The trajectory the gradient flows through: stored, or recomputed now.
        if self.recompute:
            trajectory = self._recompute_window(window)
        else:
            trajectory = [(r.layers, r.h_top) for r in window]
        h_top_of = {r.s: r.h_top for r in block}  # stored; steps <= w keep it
        for r, (_, h_top) in zip(window, trajectory, strict=True):
            h_top_of[r.s] = h_top

        # Readout, and the gradient entering the top layer at each window step.
        dh_from_above = {r.s: np.zeros_like(r.h_top) for r in window}
        for r in block:
            h_top = h_top_of[r.s]
            y = h_top @ w_out.T + self.params[-1]
            _, dl_dy = self.loss_fn(y, r.target)
            dy = (r.mask[:, None] * dl_dy / count).astype(self.dtype)
            grads[-2] += dy.T @ h_top
            grads[-1] += dy.sum(axis=0)
            if r.s > w:
                dh_from_above[r.s] += dy @ w_out

        # Layer by layer, top down; within a layer, backwards through time.
        for k in reversed(range(self.L)):
            w_ih, w_hh, _, _ = self._layer(k)
            g_wih, g_whh, g_bih, g_bhh = grads[4 * k : 4 * k + 4]
            d_state = None
            d_inp = {}
            for r, (layers, _) in reversed(list(zip(window, trajectory, strict=True))):
                lay = layers[k]
                dh = dh_from_above[r.s]
                if d_state is None:
                    d_state = tuple(np.zeros_like(a) for a in lay.state_in)
                d_out = (d_state[0] + dh, *d_state[1:])
                dA, dU, d_direct = self.cell_def.backward(lay.cache, lay.state_in, d_out)
                g_wih += dA.T @ lay.inp
                g_bih += dA.sum(axis=0)
                g_whh += dU.T @ lay.state_in[0]
                g_bhh += dU.sum(axis=0)
                d_inp[r.s] = dA @ w_ih
                d_prev = (d_direct[0] + dU @ w_hh, *d_direct[1:])
                # no gradient crosses a reset: the initial state is a constant
                keep = ~r.reset[:, None]
                d_state = tuple(np.where(keep, d, 0) for d in d_prev)
            dh_from_above = d_inp
        return loss, grads

    def _update(self, return_grads: bool):
        t = self.t
        loss, grads = self._gradient()
        self.t_prev = t  # the block is consumed, whatever happens below
        kept = "; parameters and optimizer state are as before that update"
        if not np.isfinite(loss):
            raise NonFiniteError(f"non-finite loss in the update at step {t}{kept}")
        if not all(np.all(np.isfinite(g)) for g in grads):
            raise NonFiniteError(f"non-finite gradient in the update at step {t}{kept}")
        reported = [g.copy() for g in grads] if return_grads else None
        if self.cfg.clip > 0:
            clip_grad_norm(grads, self.cfg.clip)
        self.step_fn(self.params, grads, self.opt_state, self.opt_cfg)
        self._trim()
        return loss, t, reported

    # -- public entry points -----------------------------------------------------
    def run(self, x, target, mask, resets, flush, return_grads, return_outputs):
        """Run T steps, updating every k1 steps (and on flush at the end)."""
        # overflow becomes Inf/NaN and is reported as a non-finite loss or gradient
        with np.errstate(all="ignore"):
            return self._run(x, target, mask, resets, flush, return_grads, return_outputs)

    def _run(self, x, target, mask, resets, flush, return_grads, return_outputs):
        losses, steps, grads, outputs = [], [], [], []
        B = x.shape[1]
        for s in range(x.shape[0]):
            mask_s = np.ones(B, self.dtype) if mask is None else mask[s]
            reset_s = np.zeros(B, bool) if resets is None else resets[s].astype(bool)
            rec = self._step(x[s], target[s], mask_s, reset_s)
            if return_outputs:
                outputs.append(rec.y)
            if self.pending == self.k1:
                loss, t, g = self._update(return_grads)
                losses.append(loss)
                steps.append(t)
                grads.append(g)
            else:
                self._trim()
        if flush and self.pending > 0:
            loss, t, g = self._update(return_grads)
            losses.append(loss)
            steps.append(t)
            grads.append(g)
        return (
            np.array(losses, dtype=self.dtype),
            np.array(steps, dtype=np.int64),
            grads if return_grads else None,
            np.stack(outputs) if return_outputs else None,
        )

    def flush(self, return_grads: bool):
        """An update on the pending partial block (nothing pending: no update)."""
        if self.pending == 0:
            return (
                np.zeros(0, self.dtype),
                np.zeros(0, np.int64),
                [] if return_grads else None,
                None,
            )
        with np.errstate(all="ignore"):
            loss, t, g = self._update(return_grads)
        return (
            np.array([loss], self.dtype),
            np.array([t], np.int64),
            [g] if return_grads else None,
            None,
        )
