"""The NumPy reference of TBPTT(k1, k2): the yardstick every backend is tested against.

Readable rather than fast. It implements the engine interface that the native
engines (``tbptt_fast._core.Engine``, ``CudaEngine``) share; the public
:class:`~tbptt_fast.Trainer` validates every argument and then calls one of them.

Engine interface
----------------
``Engine(config, params)``: ``config`` is a dict with ``cell``, ``input_size``
(D), ``hidden_size`` (H), ``output_size`` (O), ``num_layers`` (L), ``dtype``,
``k1``, ``k2`` (0 = unbounded), ``loss``, ``overlap``, the optimizer keys of
``SGD.config()`` / ``Adam.config()``, ``clip`` (<= 0: no clipping) and
``capacity`` (ring size override, 0 = default; the reference ignores it).
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

Shapes: T steps, B batch, D input, H hidden, G gates (1 rnn, 4 lstm i,f,g,o,
3 gru r,z,n), O outputs, L layers. Row-major, time first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .losses import LOSSES
from .optim import adam_step, clip_grad_norm, sgd_step

__all__ = ["GATES", "Engine", "cell_backward", "cell_forward", "param_names", "window_start"]

GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}


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
# ----------------------------------------------------------------------------


def cell_forward(cell: str, a: np.ndarray, state: tuple, w_hh: np.ndarray, b_hh: np.ndarray):
    """One step of one layer.

    a: [B, G*H] input projection ``x W_ih^T + b_ih``; state: ``(h,)`` or
    ``(h, c)`` for lstm, each [B, H]; w_hh [G*H, H]; b_hh [G*H].
    Returns ``(new_state, cache)``; the cache holds what the backward pass needs
    (post-activation gates, and for gru the hidden-side candidate term u_n).
    """
    h = state[0]
    u = h @ w_hh.T + b_hh
    H = h.shape[1]
    if cell == "rnn_tanh":
        h_new = np.tanh(a + u)
        return (h_new,), {"h": h_new}
    if cell == "rnn_relu":
        h_new = np.maximum(a + u, 0)
        return (h_new,), {"h": h_new}
    if cell == "lstm":
        z = a + u
        i = _sigmoid(z[:, 0:H])
        f = _sigmoid(z[:, H : 2 * H])
        g = np.tanh(z[:, 2 * H : 3 * H])
        o = _sigmoid(z[:, 3 * H : 4 * H])
        c_new = f * state[1] + i * g
        tanh_c = np.tanh(c_new)
        h_new = o * tanh_c
        return (h_new, c_new), {"i": i, "f": f, "g": g, "o": o, "tanh_c": tanh_c}
    if cell == "gru":
        r = _sigmoid(a[:, 0:H] + u[:, 0:H])
        z = _sigmoid(a[:, H : 2 * H] + u[:, H : 2 * H])
        u_n = u[:, 2 * H : 3 * H]
        n = np.tanh(a[:, 2 * H : 3 * H] + r * u_n)
        h_new = (1 - z) * n + z * h
        return (h_new,), {"r": r, "z": z, "n": n, "u_n": u_n}
    raise ValueError(f"unknown cell {cell!r}")


def cell_backward(cell: str, cache: dict, state: tuple, d_state: tuple):
    """Backward of one step of one layer, from its cache.

    state: the state that entered the step (``(h,)`` or ``(h, c)``);
    d_state: gradient w.r.t. the state the step produced (same structure).
    Returns ``(dA, dU, d_direct)``: dA [B, G*H] the gradient w.r.t. the input
    projection ``a`` (and so ``b_ih``), dU [B, G*H] w.r.t. ``u = h W_hh^T + b_hh``,
    and d_direct the part of the gradient w.r.t. the entering state that does
    not pass through ``W_hh`` (the caller adds ``dU @ W_hh`` to its ``h`` part).
    """
    dh = d_state[0]
    if cell == "rnn_tanh":
        dA = dh * (1 - cache["h"] ** 2)
        return dA, dA, (np.zeros_like(dh),)
    if cell == "rnn_relu":
        dA = dh * (cache["h"] > 0)
        return dA, dA, (np.zeros_like(dh),)
    if cell == "lstm":
        i, f, g, o, tanh_c = cache["i"], cache["f"], cache["g"], cache["o"], cache["tanh_c"]
        dc = d_state[1] + dh * o * (1 - tanh_c**2)
        d_i = dc * g * i * (1 - i)
        d_f = dc * state[1] * f * (1 - f)
        d_g = dc * i * (1 - g**2)
        d_o = dh * tanh_c * o * (1 - o)
        dA = np.concatenate([d_i, d_f, d_g, d_o], axis=1)
        return dA, dA, (np.zeros_like(dh), dc * f)
    if cell == "gru":
        r, z, n, u_n = cache["r"], cache["z"], cache["n"], cache["u_n"]
        h = state[0]
        d_n = dh * (1 - z) * (1 - n**2)  # w.r.t. the pre-activation of n
        d_z = dh * (h - n) * z * (1 - z)
        d_r = d_n * u_n * r * (1 - r)
        dA = np.concatenate([d_r, d_z, d_n], axis=1)
        dU = np.concatenate([d_r, d_z, d_n * r], axis=1)
        return dA, dU, (dh * z,)
    raise ValueError(f"unknown cell {cell!r}")


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

    def __init__(self, config: dict, params: list[np.ndarray]):
        self.cfg = dict(config)
        self.cell = config["cell"]
        self.L = int(config["num_layers"])
        self.k1 = int(config["k1"])
        self.k2 = None if int(config["k2"]) == 0 else int(config["k2"])
        self.loss_fn = LOSSES[config["loss"]]
        self.recompute = config["overlap"] == "recompute"
        self.dtype = np.dtype(config["dtype"])
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
        n = 2 if self.cell == "lstm" else 1
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
        n = 2 if self.cell == "lstm" else 1
        H = self.cfg["hidden_size"]
        return [tuple(np.zeros((B, H), self.dtype) for _ in range(n)) for _ in range(self.L)]

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
            out, cache = cell_forward(self.cell, inp @ w_ih.T + b_ih, state_in, w_hh, b_hh)
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
                dA, dU, d_direct = cell_backward(self.cell, lay.cache, lay.state_in, d_out)
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
        if not np.isfinite(loss):
            raise RuntimeError(f"non-finite loss in the update at step {t}")
        if not all(np.all(np.isfinite(g)) for g in grads):
            raise RuntimeError(f"non-finite gradient in the update at step {t}")
        reported = [g.copy() for g in grads] if return_grads else None
        if self.cfg["clip"] > 0:
            clip_grad_norm(grads, self.cfg["clip"])
        step = sgd_step if self.cfg["optimizer"] == "sgd" else adam_step
        step(self.params, grads, self.opt_state, self.cfg)
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
