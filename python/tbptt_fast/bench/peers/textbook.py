"""A textbook TBPTT(k1, k2) trainer in plain NumPy: the baseline a user would write.

One Python-level step at a time: the forward pass appends each step's activations to a
history list; every ``k1`` steps the gradient of the block's loss is backpropagated over
the last ``k2`` stored steps (the window of ``tbptt_fast.reference.window_start``;
``overlap="stored"``: cached activations of the real forward pass, current weights in
every product), then one plain SGD step. Readable on purpose, not tuned: this is what the
benchmarks compare against.

Shapes: x ``[T, B, D]``, target ``[T, B, O]``, hidden ``[B, H]``; parameters use the
PyTorch names and layout (``tbptt_fast.reference.param_names``). Loss: mse only.
"""

from __future__ import annotations

import numpy as np

GATES = {"rnn_tanh": 1, "lstm": 4, "gru": 3}


def sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


class TextbookTBPTT:
    """TBPTT(k1, k2) with the stored rule and plain SGD, written step by step.

    Args:
        cell: ``"rnn_tanh"``, ``"lstm"`` or ``"gru"``.
        params: ``{name: array}`` in PyTorch layout (e.g. ``tb.Model.state_dict()``);
            copied, so the caller's arrays are not changed.
        k1, k2: update every ``k1`` steps, backpropagate over the last ``k2`` steps.
        lr: SGD learning rate.
        dtype: ``"float32"`` or ``"float64"``.
    """

    def __init__(self, cell, params, k1, k2=None, lr=0.01, dtype="float32"):
        if cell not in GATES:
            raise ValueError(f"cell must be one of {sorted(GATES)}, got {cell!r}")
        self.cell = cell
        self.k1 = int(k1)
        self.k2 = int(k2 if k2 is not None else k1)
        self.lr = lr
        self.dtype = np.dtype(dtype)
        self.p = {k: np.array(v, dtype=self.dtype) for k, v in params.items()}
        self.num_layers = sum(1 for k in self.p if k.startswith("weight_ih_l"))
        self.hidden_size = self.p["weight_hh_l0"].shape[1]
        self.history = []  # one entry per step: {"layers": [cache...], "y", "target"}
        self.state = None  # per layer: (h, c) for lstm, (h,) otherwise
        self.t = 0  # steps since the start
        self.t_prev = 0  # step of the previous update

    # ------------------------------------------------------------------ forward
    def cell_forward(self, layer, x, state):
        """One cell step. x ``[B, D_l]``; returns (new_state, cache for the backward)."""
        p = self.p
        a = x @ p[f"weight_ih_l{layer}"].T + p[f"bias_ih_l{layer}"]
        u = state[0] @ p[f"weight_hh_l{layer}"].T + p[f"bias_hh_l{layer}"]
        cache = {"x": x, "h_prev": state[0]}
        if self.cell == "rnn_tanh":
            h = np.tanh(a + u)
            cache["h"] = h
            return (h,), cache
        if self.cell == "lstm":
            i, f, g, o = np.split(a + u, 4, axis=1)
            i, f, g, o = sigmoid(i), sigmoid(f), np.tanh(g), sigmoid(o)
            c = f * state[1] + i * g
            h = o * np.tanh(c)
            cache.update(i=i, f=f, g=g, o=o, c_prev=state[1], c=c)
            return (h, c), cache
        # gru
        a_r, a_z, a_n = np.split(a, 3, axis=1)
        u_r, u_z, u_n = np.split(u, 3, axis=1)
        r = sigmoid(a_r + u_r)
        z = sigmoid(a_z + u_z)
        n = np.tanh(a_n + r * u_n)
        h = (1 - z) * n + z * state[0]
        cache.update(r=r, z=z, n=n, u_n=u_n)
        return (h,), cache

    def step(self, x_t, target_t):
        """Forward one step, x_t ``[B, D]``, target_t ``[B, O]``; store it in the history."""
        if self.state is None:
            zeros = np.zeros((x_t.shape[0], self.hidden_size), self.dtype)
            self.state = [(zeros, zeros) if self.cell == "lstm" else (zeros,)] * self.num_layers
        inp = x_t
        caches = []
        for layer in range(self.num_layers):
            self.state[layer], cache = self.cell_forward(layer, inp, self.state[layer])
            caches.append(cache)
            inp = self.state[layer][0]
        y = inp @ self.p["readout.weight"].T + self.p["readout.bias"]
        self.history.append({"layers": caches, "h_top": inp, "y": y, "target": target_t})
        self.t += 1

    # ----------------------------------------------------------------- backward
    def cell_backward(self, layer, cache, dh, dc, grads):
        """Backward of one cell step; returns (d input, d h_prev, d c_prev)."""
        p = self.p
        if self.cell == "rnn_tanh":
            da = du = dh * (1 - cache["h"] ** 2)
            dc_prev = None
        elif self.cell == "lstm":
            i, f, g, o, c = cache["i"], cache["f"], cache["g"], cache["o"], cache["c"]
            tc = np.tanh(c)
            dc = dc + dh * o * (1 - tc**2)
            di, df, dg, do = dc * g, dc * cache["c_prev"], dc * i, dh * tc
            da = np.concatenate(
                [di * i * (1 - i), df * f * (1 - f), dg * (1 - g**2), do * o * (1 - o)], axis=1
            )
            du = da
            dc_prev = dc * f
        else:  # gru
            r, z, n = cache["r"], cache["z"], cache["n"]
            dn = dh * (1 - z) * (1 - n**2)
            dz = dh * (cache["h_prev"] - n) * z * (1 - z)
            dr = dn * cache["u_n"] * r * (1 - r)
            da = np.concatenate([dr, dz, dn], axis=1)
            du = np.concatenate([dr, dz, dn * r], axis=1)
            dc_prev = None
        grads[f"weight_ih_l{layer}"] += da.T @ cache["x"]
        grads[f"bias_ih_l{layer}"] += da.sum(axis=0)
        grads[f"weight_hh_l{layer}"] += du.T @ cache["h_prev"]
        grads[f"bias_hh_l{layer}"] += du.sum(axis=0)
        dh_prev = du @ p[f"weight_hh_l{layer}"]
        if self.cell == "gru":
            dh_prev += dh * cache["z"]
        return da @ p[f"weight_ih_l{layer}"], dh_prev, dc_prev

    def update(self):
        """Gradient of the pending block's loss over the window, then one SGD step.

        Returns (loss, grads) with grads ``{name: array}`` before the step.
        """
        t, t_prev, k1, k2 = self.t, self.t_prev, self.k1, self.k2
        w = max(0, t - k2, t_prev - max(0, k2 - k1))  # tbptt_fast.reference.window_start
        block = range(t_prev + 1, t + 1)
        first = t - len(self.history) + 1  # step number of history[0]
        grads = {k: np.zeros_like(v) for k, v in self.p.items()}
        count = len(block) * self.history[-1]["y"].shape[0]
        loss = 0.0
        dh_top = {}  # step -> d loss / d h_top
        for s in block:
            rec = self.history[s - first]
            diff = rec["y"] - rec["target"]
            loss += float(np.sum(np.mean(diff**2, axis=1))) / count
            dy = 2 * diff / (diff.shape[1] * count)
            grads["readout.weight"] += dy.T @ rec["h_top"]
            grads["readout.bias"] += dy.sum(axis=0)
            if s > w:
                dh_top[s] = dy @ self.p["readout.weight"]
        # backward through time over the window (w, t], newest step first
        dh_next = [None] * self.num_layers
        dc_next = [None] * self.num_layers
        for s in range(t, w, -1):
            rec = self.history[s - first]
            dh = dh_top.get(s)
            for layer in reversed(range(self.num_layers)):
                total = dh
                if dh_next[layer] is not None:
                    total = dh_next[layer] if total is None else total + dh_next[layer]
                if total is None:  # no gradient reaches here yet
                    dh = None
                    continue
                dc = dc_next[layer] if dc_next[layer] is not None else 0.0
                cache = rec["layers"][layer]
                dh, dh_next[layer], dc_next[layer] = self.cell_backward(
                    layer, cache, total, dc, grads
                )
        for k, g in grads.items():
            self.p[k] -= self.lr * g
        self.t_prev = t
        keep = max(k1, k2)
        if len(self.history) > keep:
            del self.history[: len(self.history) - keep]
        return loss, grads

    def fit(self, x, target, return_grads=False):
        """Train over x ``[T, B, D]`` with target ``[T, B, O]``; flush a partial block.

        Returns (losses ``[U]``, list of U gradient dicts or None).
        """
        x = np.asarray(x, self.dtype)
        target = np.asarray(target, self.dtype)
        losses, grads = [], []
        for s in range(x.shape[0]):
            self.step(x[s], target[s])
            if self.t - self.t_prev == self.k1:
                loss, g = self.update()
                losses.append(loss)
                if return_grads:
                    grads.append(g)
        if self.t > self.t_prev:
            loss, g = self.update()
            losses.append(loss)
            if return_grads:
                grads.append(g)
        return np.array(losses), (grads if return_grads else None)
