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
``params`` are the model's own arrays in canonical order (``param_names``;
with ``vocab_size`` V > 0 the first is ``embedding.weight`` [V, D]); the
engine updates them in place.

- ``reset(initial_state)``: trainer-level reset; ``initial_state`` is None
  (zeros) or a flat layer-major list ``[h_0, (c_0,) h_1, ...]`` of [B, H] arrays.
  The optimizer state is kept.
- ``run(x, target, mask, resets, flush, return_grads, return_outputs,
  on_update=None)`` with x [T, B, D] (with an embedding: int64 ids [T, B]),
  target [T, B, O] (mse) or [T, B] int64 (cross_entropy, 0 where masked),
  mask [T, B] (0/1, model dtype) or None (all ones), resets [T, B] (uint8) or
  None (no resets) returns ``(losses [U], update_steps [U] int64, grads (U
  lists of arrays) or None, outputs [T, B, O] or None)``. ``on_update(index,
  step, loss)`` is called after each update (index within this call);
  returning ``False`` stops the run right after that update (no flush; the
  outputs of steps not run are unspecified), an exception stops it and
  propagates.
- ``flush(return_grads)``: the same tuple for an update on the pending block.
- ``forward(x, resets=None, state=None)`` -> ``(outputs [T, B, O], state)``:
  forward only, never touching the training state; ``state`` (flat, as
  ``reset`` takes; None = zeros) enters step 1 and is what a reset restores.
- ``set_hyperparams(config, fresh_state=False)``: new optimizer values
  (``SGD.config()`` / ``Adam.config()``) from the next update on; the
  optimizer state is kept unless the kind changes or ``fresh_state``.
- ``state()``, ``step_count``, ``pending``, ``stored_steps``,
  ``pull_params()``, ``push_params()``.

A non-finite loss or gradient raises :class:`~tbptt_fast.errors.NonFiniteError`
naming the update step.

Shapes: T steps, B batch, D input, H hidden, G gates (1 rnn, 4 lstm i,f,g,o,
3 gru r,z,n, 3 cifg f,g,o), O outputs, L layers. Row-major, time first.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from ._config import OPTIMIZER_KEYS, EngineConfig
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


def param_names(num_layers: int, embedding: bool = False) -> list[str]:
    """Parameter names in canonical order (PyTorch's names, the contract (the model, token inputs)).

    With ``embedding`` the first is ``embedding.weight`` (``nn.Embedding``'s name).
    """
    names = ["embedding.weight"] if embedding else []
    for k in range(num_layers):
        names += [f"weight_ih_l{k}", f"weight_hh_l{k}", f"bias_ih_l{k}", f"bias_hh_l{k}"]
    return [*names, "readout.weight", "readout.bias"]


def window_start(t: int, t_prev: int, k1: int, k2: int | None) -> int:
    """``w`` of the contract (the schedule): the gradient flows back through steps (w, t].

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
    """One cell of the contract (the model).

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
    x: np.ndarray  # [B, D], the layer-0 input (looked up from ids with an embedding)
    ids: np.ndarray | None  # [B] int64 token ids with an embedding, else None
    reset: np.ndarray  # [B] bool
    layers: list  # L LayerStep
    h_top: np.ndarray  # [B, H] output of the last layer
    y: np.ndarray  # [B, O]
    target: np.ndarray  # [B, O] or [B]
    mask: np.ndarray  # [B] 0/1
    loss: np.ndarray  # [B] per-element loss l_tb (unmasked)


class Engine:
    """NumPy TBPTT(k1, k2) engine; see the module docstring for the interface."""

    #: Optional diagnostics hook, None (the default: nothing is recorded and no
    #: result changes). When set, the backward pass of every update calls
    #: ``state_grad_hook(layer, step, d_state)`` for each layer ``k`` (top
    #: layer first) and each step ``s`` of its window, latest first, and last
    #: for ``s = w``: ``d_state`` is the gradient of the block loss with respect
    #: to the state of layer ``k`` after step ``s`` (the state the step
    #: produced, before any reset of step ``s + 1``), a tuple ``(h,)`` or
    #: ``(h, c)`` of [B, H] arrays, model dtype; it is the complete gradient
    #: (through the steps after ``s`` of this layer and the layers above, and
    #: the readout). At ``s = w`` (the constant state entering the window) it
    #: is zero where step ``w + 1`` resets. The arrays are the engine's own:
    #: read or copy them, never write. :mod:`tbptt_fast.diagnostics` uses it
    #: for the gradient-decay curve.
    state_grad_hook: Callable[[int, int, tuple], None] | None = None

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
        self.embedding = cfg.vocab_size > 0
        self.offset = 1 if self.embedding else 0  # index of weight_ih_l0 in params
        self.params = params  # [embedding.weight,] 4 per layer, readout.weight, readout.bias
        self.opt_state: dict = {}
        self.reset(None)

    # -- parameters -----------------------------------------------------------
    def _layer(self, k: int):
        first = 4 * k + self.offset
        return self.params[first : first + 4]  # w_ih, w_hh, b_ih, b_hh

    def _layer_input(self, x):
        """Layer 0's input at one step: x [B, D], or the embedding rows of ids [B]."""
        return self.params[0][x] if self.embedding else x

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
        ids = x if self.embedding else None
        x = self._layer_input(x)
        layers, self.cur, h_top = self._forward_layers(x, reset, self.cur, initial)
        w_out, b_out = self.params[-2], self.params[-1]
        y = h_top @ w_out.T + b_out
        loss, _ = self.loss_fn(y, target)
        self.t += 1
        rec = Step(self.t, x, ids, reset, layers, h_top, y, target, mask, loss)
        self.history.append(rec)
        return rec

    def _trim(self) -> None:
        """Drop the records no future update can need (ring of max(k1, k2))."""
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
        stored state that entered its first step (an embedding is looked up again,
        with the current weights). Returns per step (layers, h_top)."""
        initial = self._initial(window[0].x.shape[0])
        out = []
        state = [lay.state_in for lay in window[0].layers]  # resets already applied
        no_reset = np.zeros_like(window[0].reset)
        for j, rec in enumerate(window):
            reset = no_reset if j == 0 else rec.reset
            x = rec.x if rec.ids is None else self._layer_input(rec.ids)
            layers, state, h_top = self._forward_layers(x, reset, state, initial)
            out.append((layers, h_top))
        return out

    def _gradient(self) -> tuple[float, list[np.ndarray]]:
        """Loss_P and its gradient for an update at step t (contract: the schedule)."""
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
            first = 4 * k + self.offset
            g_wih, g_whh, g_bih, g_bhh = grads[first : first + 4]
            d_state = None
            d_inp = {}
            for r, (layers, _) in reversed(list(zip(window, trajectory, strict=True))):
                lay = layers[k]
                dh = dh_from_above[r.s]
                if d_state is None:
                    d_state = tuple(np.zeros_like(a) for a in lay.state_in)
                d_out = (d_state[0] + dh, *d_state[1:])
                if self.state_grad_hook is not None:
                    self.state_grad_hook(k, r.s, d_out)
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
            if self.state_grad_hook is not None and d_state is not None:
                self.state_grad_hook(k, w, d_state)
            dh_from_above = d_inp
        if self.embedding:
            # the layer-0 input gradient, summed into the rows that were looked up
            for r in window:
                np.add.at(grads[0], r.ids, dh_from_above[r.s])
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
        # the optimizer step changes the parameters and its state in place: an
        # interrupt (KeyboardInterrupt) inside it puts both back as they were
        params_before = [p.copy() for p in self.params]
        opt_before = copy.deepcopy(self.opt_state)
        try:
            self.step_fn(self.params, grads, self.opt_state, self.opt_cfg)
        except BaseException:
            for p, b in zip(self.params, params_before, strict=True):
                np.copyto(p, b)
            self.opt_state = opt_before
            raise
        return loss, t, reported  # the caller trims the history

    def _mark(self) -> tuple:
        """What :meth:`_rollback` restores: the stream position (steps, the
        previous update, the forward state, the stored history)."""
        return self.t, self.t_prev, self.cur, list(self.history)

    def _rollback(self, mark: tuple) -> None:
        self.t, self.t_prev, self.cur, self.history = mark

    def _atomic(self, mark: tuple, fn, *args):
        """``fn(*args)`` (a step and/or an update); an exception other than
        NonFiniteError (an interrupt) puts the stream back at ``mark``, the
        update's parameters and optimizer state back too (see :meth:`_update`):
        the trainer stays positioned after the last completed step."""
        try:
            return fn(*args)
        except NonFiniteError:
            raise  # the step is kept and the block consumed, as documented
        except BaseException:
            self._rollback(mark)
            raise

    # -- public entry points -----------------------------------------------------
    def run(self, x, target, mask, resets, flush, return_grads, return_outputs, on_update=None):
        """Run T steps, updating every k1 steps (and on flush at the end).

        ``on_update(index, step, loss)`` runs after each update; ``False`` stops the run.
        """
        # overflow becomes Inf/NaN and is reported as a non-finite loss or gradient
        with np.errstate(all="ignore"):
            return self._run(
                x, target, mask, resets, flush, return_grads, return_outputs, on_update
            )

    def _run(self, x, target, mask, resets, flush, return_grads, return_outputs, on_update):
        losses, steps, grads, outputs = [], [], [], []
        B = x.shape[1]

        def update(mark) -> bool:
            """One update; False when on_update asks to stop."""
            loss, t, g = self._atomic(mark, self._update, return_grads)
            self._trim()
            losses.append(loss)
            steps.append(t)
            grads.append(g)
            if on_update is None:
                return True
            return on_update(len(losses) - 1, t, loss) is not False

        for s in range(x.shape[0]):
            mask_s = np.ones(B, self.dtype) if mask is None else mask[s]
            reset_s = np.zeros(B, bool) if resets is None else resets[s].astype(bool)
            mark = self._mark()
            rec = self._atomic(mark, self._step, x[s], target[s], mask_s, reset_s)
            if self.pending == self.k1:
                # an interrupt in the update undoes this step too: the next
                # fit runs it again and updates there, as an uninterrupted one
                if not update(mark):
                    if return_outputs:
                        outputs.append(rec.y)
                    flush = False  # stop right after this update
                    break
            else:
                self._trim()
            if return_outputs:
                outputs.append(rec.y)
        if flush and self.pending > 0:
            update(self._mark())
        return (
            np.array(losses, dtype=self.dtype),
            np.array(steps, dtype=np.int64),
            grads if return_grads else None,
            np.stack(outputs) if return_outputs else None,
        )

    def forward(self, x, resets=None, state=None, reset_state=None):
        """Forward only: the readout outputs and the final state; the training
        state (forward state, step count, pending block, history) is untouched.

        x [T, B, D] (with an embedding: int64 ids [T, B]); resets [T, B] or None;
        state: None (zeros) or a flat layer-major list ``[h_0, (c_0,) h_1, ...]``
        of [B, H] arrays, the state entering step 1; reset_state: what a reset
        restores, in the same form (None: ``state``, as training's initial state).
        Returns ``(outputs [T, B, O], state)``, the state in the same flat form.
        """
        B, n = x.shape[1], self.cell_def.states

        def layered(flat):
            if flat is None:
                return [
                    tuple(np.zeros((B, self.H), self.dtype) for _ in range(n))
                    for _ in range(self.L)
                ]
            return [
                tuple(np.array(a, dtype=self.dtype) for a in flat[n * k : n * k + n])
                for k in range(self.L)
            ]

        entering = layered(state)
        initial = entering if reset_state is None else layered(reset_state)
        w_out, b_out = self.params[-2], self.params[-1]
        cur, outputs = entering, []
        no_reset = np.zeros(B, bool)
        with np.errstate(all="ignore"):
            for s in range(x.shape[0]):
                reset = no_reset if resets is None else resets[s].astype(bool)
                inp = self._layer_input(x[s])
                _, cur, h_top = self._forward_layers(inp, reset, cur, initial)
                outputs.append(h_top @ w_out.T + b_out)
        return np.stack(outputs), [a.copy() for layer in cur for a in layer]

    def set_hyperparams(self, config: Mapping, fresh_state: bool = False) -> None:
        """New optimizer values (every key of ``SGD.config()`` / ``Adam.config()``),
        read by the next update. The optimizer state is kept, unless the kind
        of optimizer changes or ``fresh_state`` is set."""
        new = {k: config[k] for k in OPTIMIZER_KEYS}
        if fresh_state or new["optimizer"] != self.cfg.optimizer:
            self.opt_state = {}
        self.cfg = dataclasses.replace(self.cfg, **new)
        self.opt_cfg = self.cfg.as_dict()
        self.step_fn = sgd_step if self.cfg.optimizer == "sgd" else adam_step

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
            loss, t, g = self._atomic(self._mark(), self._update, return_grads)
            self._trim()
        return (
            np.array([loss], self.dtype),
            np.array([t], np.int64),
            [g] if return_grads else None,
            None,
        )

    # -- checkpoints ---------------------------------------------------------------
    # snapshot() / restore() use the native engines' layout (EngineSnapshot in
    # csrc/tbptt/engine_api.h), so a checkpoint moves between backends.
    def _cache_keys(self) -> list[str]:
        """The cell's cache keys: its G gate blocks in gate order (the native
        ``gates_{l}``), then the one further cached value, if any (``aux_{l}``)."""
        G, S = self.cell_def.gates, self.cell_def.states
        z = np.zeros((1, G), self.dtype)  # one element, H = 1
        _, cache = self.cell_def.forward(
            z, z, tuple(np.zeros((1, 1), self.dtype) for _ in range(S))
        )
        keys = list(cache)
        assert len(keys) in (G, G + 1), keys
        return keys

    def _snapshot_layout(self, n: int, batch: int, has_state: bool, has_init: bool) -> dict:
        """name -> (shape, dtype) of the arrays of a snapshot (optimizer arrays aside)."""
        dt, i64, u8 = self.dtype, np.dtype(np.int64), np.dtype(np.uint8)
        H, S, G, O = self.H, self.cell_def.states, self.cell_def.gates, self.cfg.output_size
        out = {}
        for i in range(self.L * S):
            if has_state:
                out[f"state_{i}"] = ((batch, H), dt)
            if has_init:
                out[f"init_{i}"] = ((batch, H), dt)
        if n == 0:
            return out
        out["x"] = ((n, batch, self.cfg.input_size), dt)
        if self.embedding:
            out["ids"] = ((n, batch), i64)
        out["mask"] = ((n, batch), dt)
        out["resets"] = ((n, batch), u8)
        if self.cfg.loss == "cross_entropy":
            out["label"] = ((n, batch), i64)
        else:
            out["target"] = ((n, batch, O), dt)
        out["dy"] = ((n, batch, O), dt)
        aux = len(self._cache_keys()) > G
        for l in range(self.L):
            out[f"gates_{l}"] = ((n, batch, G * H), dt)
            out[f"h_in_{l}"] = ((n, batch, H), dt)
            if S == 2:
                out[f"c_in_{l}"] = ((n, batch, H), dt)
            if aux:
                out[f"aux_{l}"] = ((n, batch, H), dt)
            if G > 1:
                out[f"h_out_{l}"] = ((n, batch, H), dt)
        return out

    def _history_steps(self, count: int) -> int:
        """n: the steps of history a snapshot holds after ``count`` steps (as the
        native ring: min(count, max(k1, k2)), or count when unbounded)."""
        return count if self.k2 is None else min(count, max(self.k1, self.k2))

    def _wants_momentum(self) -> bool:
        return self.cfg.optimizer == "sgd" and (
            self.cfg.momentum != 0 or "momentum_buffer" in self.opt_state
        )

    def snapshot(self) -> dict:
        """The complete training state, in the native engines' backend-independent
        layout (``EngineSnapshot`` in csrc/tbptt/engine_api.h), for checkpoints.

        Scalars: ``step_count``, ``pending``, ``last_update`` (t'), ``batch`` (0:
        none), ``history_steps`` n, ``has_state``, ``has_init``, ``pending_loss``
        and ``pending_count`` (the masked loss sum and mask count of the pending
        block), ``adam_step``; ``arrays``: ``state_{i}``, ``init_{i}`` [B, H]
        (flat layer-major), ``opt_m`` / ``opt_v`` (the optimizer state of all
        parameters concatenated in canonical order: momentum buffer or Adam
        moments), and the history of the last n steps, oldest first: ``x``,
        ``ids`` (with an embedding), ``mask``, ``resets``, ``target`` or
        ``label``, ``dy``, and per layer ``gates_{l}``, ``h_in_{l}``,
        ``c_in_{l}``, ``aux_{l}``, ``h_out_{l}``. n is what the native ring
        holds, min(step_count, max(k1, k2)); this engine keeps only the steps a
        future update reads, so older steps are zeros, and so is ``dy`` of the
        steps already consumed (no engine reads either).
        """
        dt, t, tp = self.dtype, self.t, self.t_prev
        n = self._history_steps(t)
        has_state, has_init = self.cur is not None, self.init is not None
        if has_state:
            batch = self.cur[0][0].shape[0]
        elif has_init:
            batch = self.init[0][0].shape[0]
        else:
            batch = self.history[-1].x.shape[0] if self.history else 0
        layout = self._snapshot_layout(n, batch, has_state, has_init)
        arrays = {name: np.zeros(shape, d) for name, (shape, d) in layout.items()}
        flat_state = [a for s in self.cur for a in s] if has_state else []
        flat_init = [a for s in self.init for a in s] if has_init else []
        for i, a in enumerate(flat_state):
            arrays[f"state_{i}"][...] = a
        for i, a in enumerate(flat_init):
            arrays[f"init_{i}"][...] = a

        def flat(parts):
            return np.concatenate(
                [(np.zeros(p.size, dt) if a is None else np.ravel(a)) for a, p in parts]
            ).astype(dt)

        adam_steps = 0
        if self.cfg.optimizer == "adam":
            st = self.opt_state
            adam_steps = int(st.get("step", 0))
            m = st.get("exp_avg", [None] * len(self.params))
            v = st.get("exp_avg_sq", [None] * len(self.params))
            arrays["opt_m"] = flat(zip(m, self.params, strict=True))
            arrays["opt_v"] = flat(zip(v, self.params, strict=True))
        elif self._wants_momentum():
            bufs = self.opt_state.get("momentum_buffer", [None] * len(self.params))
            arrays["opt_m"] = flat(zip(bufs, self.params, strict=True))

        by_step = {r.s: r for r in self.history}
        block = [by_step[s] for s in range(tp + 1, t + 1)]
        # the sums _gradient forms, in its order and precision
        pending_loss = float(sum(np.sum(r.mask * r.loss) for r in block))
        pending_count = float(sum(np.sum(r.mask) for r in block))
        keys = self._cache_keys()
        G = self.cell_def.gates
        target_name = "label" if self.cfg.loss == "cross_entropy" else "target"
        for j in range(n):
            r = by_step.get(t - n + 1 + j)
            if r is None:
                continue  # not kept: no future update reads it
            arrays["x"][j] = r.x
            if self.embedding:
                arrays["ids"][j] = r.ids
            arrays["mask"][j] = r.mask
            arrays["resets"][j] = r.reset
            arrays[target_name][j] = r.target
            if r.s > tp:  # dLoss/dy of the forward pass, 0 where masked
                _, dl_dy = self.loss_fn(r.y, r.target)
                arrays["dy"][j] = np.where(np.asarray(r.mask)[:, None] != 0, dl_dy, 0)
            for l, lay in enumerate(r.layers):
                arrays[f"gates_{l}"][j] = np.concatenate([lay.cache[k] for k in keys[:G]], axis=1)
                arrays[f"h_in_{l}"][j] = lay.state_in[0]
                if self.cell_def.states == 2:
                    arrays[f"c_in_{l}"][j] = lay.state_in[1]
                if len(keys) > G:
                    arrays[f"aux_{l}"][j] = lay.cache[keys[G]]
                if G > 1:
                    arrays[f"h_out_{l}"][j] = r.layers[l + 1].inp if l + 1 < self.L else r.h_top
        return {
            "step_count": t,
            "pending": t - tp,
            "last_update": tp,
            "batch": batch,
            "history_steps": n,
            "has_state": has_state,
            "has_init": has_init,
            "pending_loss": pending_loss,
            "pending_count": pending_count,
            "adam_step": adam_steps,
            "arrays": arrays,
        }

    def restore(self, snap: Mapping) -> None:
        """Restore a :meth:`snapshot` of this engine or of a native one (same layout).

        Everything is checked first: what does not fit this engine's
        configuration raises ``ValueError`` and changes nothing. The history's
        post-activation gates, states and cached values become the step
        records; the readout outputs of the restored steps are recomputed with
        the current weights (the same as at forward time for the pending block:
        no update ran since), and the pending block's loss is carried as the
        snapshot's ``pending_loss``, so that the next update reports exactly
        the loss the uninterrupted run reports.
        """

        def bad(what: str) -> ValueError:
            return ValueError(f"checkpoint: {what}")

        def count(key: str) -> int:
            v = snap[key]
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 0:
                raise bad(f"{key} must be an int >= 0, got {v!r}")
            return int(v)

        missing = [
            k
            for k in (
                *("step_count", "last_update", "pending", "batch", "history_steps"),
                *("has_state", "has_init", "pending_loss", "pending_count", "adam_step", "arrays"),
            )
            if k not in snap
        ]
        if missing:
            raise bad(f"missing fields {missing}")
        t, tp, pending = count("step_count"), count("last_update"), count("pending")
        batch, n, adam_steps = count("batch"), count("history_steps"), count("adam_step")
        has_state, has_init = bool(snap["has_state"]), bool(snap["has_init"])
        if tp > t or pending != t - tp:
            raise bad(f"inconsistent step count {t}, previous update {tp}, pending {pending}")
        if pending >= self.k1:
            raise bad(f"pending block of {pending} steps, must be below k1 = {self.k1}")
        if n != self._history_steps(t):
            raise bad(f"history of {n} steps, expected {self._history_steps(t)}")
        if (has_state or has_init or n > 0) and batch < 1:
            raise bad("a state or history needs a batch size >= 1")
        arrays = snap["arrays"]
        layout = self._snapshot_layout(n, batch, has_state, has_init)
        P = sum(p.size for p in self.params)
        adam = self.cfg.optimizer == "adam"
        if adam:
            layout["opt_m"] = layout["opt_v"] = ((P,), self.dtype)
        elif self.cfg.momentum != 0:
            layout["opt_m"] = ((P,), self.dtype)
        got = {}
        for name, (shape, d) in layout.items():
            if name not in arrays:
                raise bad(f"missing array '{name}'")
            a = np.asarray(arrays[name])
            if a.shape != tuple(shape) or a.dtype != d:
                raise bad(
                    f"array '{name}' is {a.dtype} {list(a.shape)}, expected {d} {list(shape)}"
                )
            got[name] = a
        O = self.cfg.output_size
        if n > 0:
            if not np.all((got["mask"] == 0) | (got["mask"] == 1)):
                raise bad("mask values must be 0 or 1")
            if "label" in got and not np.all((got["label"] >= 0) & (got["label"] < O)):
                raise bad(f"labels must be in [0, {O})")
            V = self.params[0].shape[0] if self.embedding else 0
            if self.embedding and not np.all((got["ids"] >= 0) & (got["ids"] < V)):
                raise bad(f"ids must be in [0, {V})")
        # the pending block: the last `pending` steps of the history
        if pending > n:
            raise bad(f"pending block of {pending} steps, but a history of {n}")
        masks = got["mask"][n - pending :] if n > 0 else np.zeros((0, batch), self.dtype)
        count_now = float(sum(np.sum(m) for m in masks))
        if count_now != float(snap["pending_count"]):
            raise bad(
                f"pending_count {snap['pending_count']} does not match the masks ({count_now})"
            )

        # Commit.
        S, G, L, dt = self.cell_def.states, self.cell_def.gates, self.L, self.dtype
        keys = self._cache_keys()

        def layers_of(prefix: str) -> list[tuple] | None:
            if not (has_state if prefix == "state" else has_init):
                return None
            return [tuple(got[f"{prefix}_{S * k + i}"].copy() for i in range(S)) for k in range(L)]

        self.t, self.t_prev = t, tp
        self.init = layers_of("init")
        self.cur = layers_of("state")
        if adam:
            self.opt_state = {}
            if adam_steps > 0:
                m, v = self._unflatten(got["opt_m"]), self._unflatten(got["opt_v"])
                self.opt_state = {"step": adam_steps, "exp_avg": m, "exp_avg_sq": v}
        elif "opt_m" in got:
            # all zeros: no step has run yet (a first step sets buf = g, as zeros + g does)
            m = got["opt_m"]
            self.opt_state = {} if not np.any(m) else {"momentum_buffer": self._unflatten(m)}
        else:
            self.opt_state = {}
        w_out, b_out = self.params[-2], self.params[-1]
        carried = False
        self.history = []
        for j in range(n):
            s = t - n + 1 + j
            layers, inp = [], got["x"][j].copy()
            for l in range(L):
                g = got[f"gates_{l}"][j].copy()
                H = self.H
                cache = {k: g[:, i * H : (i + 1) * H] for i, k in enumerate(keys[:G])}
                if G == 1:
                    cache = {keys[0]: g}
                if len(keys) > G:
                    cache[keys[G]] = got[f"aux_{l}"][j].copy()
                state_in = (got[f"h_in_{l}"][j].copy(),)
                if S == 2:
                    state_in = (*state_in, got[f"c_in_{l}"][j].copy())
                layers.append(LayerStep(inp, state_in, cache))
                inp = got[f"h_out_{l}"][j].copy() if G > 1 else g
            mask = got["mask"][j].copy()
            target = (got["label"] if "label" in got else got["target"])[j].copy()
            loss = np.zeros(batch, dt)
            if s > tp and not carried and np.any(mask == 1):
                # the block's loss so far, carried by one unmasked pair
                loss[int(np.argmax(mask == 1))] = dt.type(snap["pending_loss"])
                carried = True
            self.history.append(
                Step(
                    s=s,
                    x=got["x"][j].copy(),
                    ids=got["ids"][j].copy() if self.embedding else None,
                    reset=got["resets"][j] != 0,
                    layers=layers,
                    h_top=inp,
                    y=inp @ w_out.T + b_out,
                    target=target,
                    mask=mask,
                    loss=loss,
                )
            )
        self._trim()

    def _unflatten(self, flat: np.ndarray) -> list[np.ndarray]:
        """A flat optimizer array, split per parameter (canonical order)."""
        out, lo = [], 0
        for p in self.params:
            out.append(flat[lo : lo + p.size].reshape(p.shape).copy())
            lo += p.size
        return out
