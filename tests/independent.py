"""An independent, literal transcription of the contract (README) used to derive expected values.

Nothing here imports the package's numerics: the cells are written from the contract
section 1, the losses from section 2, the window rule from section 3 and the
embedding of token models from section 9, in a form that also accepts complex
numbers (for complex-step derivatives). The tests compare every backend
against what these functions derive.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def relu(z):
    return z * (np.real(z) > 0)


def cell_step(cell, a, u, state):
    """the contract (the model): a = x W_ih^T + b_ih, u = h W_hh^T + b_hh, both [B, G*H]."""
    H = state[0].shape[1]
    if cell == "rnn_tanh":
        return (np.tanh(a + u),)
    if cell == "rnn_relu":
        return (relu(a + u),)
    if cell == "lstm":
        s = a + u
        i, f = sigmoid(s[:, :H]), sigmoid(s[:, H : 2 * H])
        g, o = np.tanh(s[:, 2 * H : 3 * H]), sigmoid(s[:, 3 * H :])
        c = f * state[1] + i * g
        return (o * np.tanh(c), c)
    if cell == "gru":
        r = sigmoid(a[:, :H] + u[:, :H])
        z = sigmoid(a[:, H : 2 * H] + u[:, H : 2 * H])
        n = np.tanh(a[:, 2 * H :] + r * u[:, 2 * H :])
        return ((1 - z) * n + z * state[0],)
    if cell == "cifg":
        s = a + u
        f, g, o = sigmoid(s[:, :H]), np.tanh(s[:, H : 2 * H]), sigmoid(s[:, 2 * H :])
        c = f * state[1] + (1 - f) * g
        return (o * np.tanh(c), c)
    raise AssertionError(cell)


def has_cell_state(cell):
    """the contract (the schedule): the state is (h, c) for lstm and cifg, else h."""
    return cell in ("lstm", "cifg")


def step_loss(loss, y, target):
    """the contract (the loss), per batch element: [B]."""
    if loss == "mse":
        return np.mean((y - target) ** 2, axis=1)
    rows = np.arange(y.shape[0])
    return np.log(np.sum(np.exp(y), axis=1)) - y[rows, target]


def window_w(t, t_prev, k1, k2):
    """the contract (the schedule)."""
    if k2 is None:
        return 0
    return max(0, t - k2, t_prev - max(0, k2 - k1))


def is_ids(x) -> bool:
    """the contract (token inputs): a token model's x holds integer ids."""
    return np.issubdtype(np.asarray(x).dtype, np.integer)


def layer0_input(theta, x_s):
    """Layer 0's input at one step: x_s [B, D], or the embedding rows of ids x_s [B]."""
    return theta["embedding.weight"][x_s] if is_ids(x_s) else x_s


def layer_params(theta, k):
    return (
        theta[f"weight_ih_l{k}"],
        theta[f"weight_hh_l{k}"],
        theta[f"bias_ih_l{k}"],
        theta[f"bias_hh_l{k}"],
    )


def zero_state(cell, L, B, H):
    n = 2 if has_cell_state(cell) else 1
    return [tuple(np.zeros((B, H)) for _ in range(n)) for _ in range(L)]


def with_resets(state, init, reset):
    """The state entering a step: per element, the initial state where reset."""
    return [
        tuple(np.where(reset[:, None], i0, s) for s, i0 in zip(layer, init0, strict=True))
        for layer, init0 in zip(state, init, strict=True)
    ]


def forward(cell, theta, x, state, init, resets, L):
    """Run a whole sequence. Returns per step (inputs per layer, state_in per
    layer, state_out per layer, y). ``state`` enters step 0 before its reset."""
    out = []
    for s in range(x.shape[0]):
        state = with_resets(state, init, resets[s])
        inp, new, inputs = layer0_input(theta, x[s]), [], []
        for k in range(L):
            w_ih, w_hh, b_ih, b_hh = layer_params(theta, k)
            inputs.append(inp)
            nxt = cell_step(cell, inp @ w_ih.T + b_ih, state[k][0] @ w_hh.T + b_hh, state[k])
            new.append(nxt)
            inp = nxt[0]
        y = inp @ theta["readout.weight"].T + theta["readout.bias"]
        out.append((inputs, state, new, y))
        state = new
    return out


@dataclass
class Recording:
    """A stream driven one step at a time, with everything the derivations need.

    Index s is 1-based (the step count); ``params[s]`` are the parameters the
    step ran with, ``state_in[s]`` the state entering it after resets,
    ``inputs[s][k]`` layer k's input, ``state_out[s]`` its result.
    """

    cell: str
    L: int
    init: list
    x: np.ndarray
    target: np.ndarray
    mask: np.ndarray
    resets: np.ndarray
    params: dict = field(default_factory=dict)
    state_in: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)
    state_out: dict = field(default_factory=dict)
    updates: list = field(default_factory=list)  # (t, t_prev, loss, grads, params_at_update)


def record(trainer, x, target, mask, resets, init=None, flush=True) -> Recording:
    """Drive ``trainer`` one step per ``fit`` call; check its forward state against
    :func:`forward` at every step; record what the derivations need."""
    m = trainer.model
    T, B = x.shape[:2]
    if init is None:
        init_l = zero_state(m.cell, m.num_layers, B, m.hidden_size)
    else:
        init_l = [
            tuple(np.asarray(a, float) for a in (e if isinstance(e, tuple) else (e,))) for e in init
        ]
    rec = Recording(m.cell, m.num_layers, init_l, x, target, mask, resets)
    state = init_l
    t_prev = 0
    for s in range(1, T + 1):
        theta = {k: v.astype(np.float64) for k, v in m.state_dict().items()}
        rec.params[s] = theta
        (inputs, st_in, st_out, _) = forward(
            m.cell, theta, x[s - 1 : s], state, init_l, resets[s - 1 : s], m.num_layers
        )[0]
        kw = {"initial_state": init} if (s == 1 and init is not None) else {}
        res = trainer.fit(
            x[s - 1 : s],
            target[s - 1 : s],
            mask=mask[s - 1 : s],
            resets=resets[s - 1 : s],
            flush=flush and s == T,
            return_grads=True,
            **kw,
        )
        got = trainer.state
        got = [e if isinstance(e, tuple) else (e,) for e in got]
        tol = 1e-9 if m.dtype == "float64" else 1e-4
        for k in range(m.num_layers):
            for a, b in zip(got[k], st_out[k], strict=True):
                np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=f"state, step {s}")
        rec.state_in[s], rec.inputs[s], rec.state_out[s] = st_in, inputs, st_out
        state = st_out
        for loss, t, g in zip(res.losses, res.update_steps, res.grads, strict=True):
            rec.updates.append((int(t), t_prev, float(loss), g, theta))
            t_prev = int(t)
    return rec


def block_loss(rec: Recording, theta, theta_now, t, t_prev, w, loss, rule):
    """Loss_P of the update at t as a function of the parameters ``theta``.

    rule="exact": the forward over (w, t] is re-run with ``theta`` from the
    stored state entering step w+1 (the recompute rule; for k2 <= k1 also the
    stored rule); a token model looks its ids up in ``theta``'s embedding.
    rule="stored": each step is the first-order expansion of the cell around
    its stored activations (computed with the weights of its time), in which
    every product uses ``theta``: its gradient at the current weights is, by
    construction, the stored rule of the contract (the schedule). A token model's layer-0
    input is then the stored one moved by the change of the embedding rows
    from ``theta_now`` (so its gradient is the layer-0 input gradient,
    summed into the rows used: the contract (token inputs)). ``theta_now`` are the
    parameters at the update (where the gradient is taken).
    """
    h_top = {}
    state = rec.state_in[w + 1] if w + 1 <= t else None
    for s in range(w + 1, t + 1):
        if s > w + 1:
            state = with_resets(state, rec.init, rec.resets[s - 1].astype(bool))
        x_s = rec.x[s - 1]
        if not is_ids(x_s):
            inp = x_s
        elif rule == "exact":
            inp = layer0_input(theta, x_s)
        else:
            moved = layer0_input(theta, x_s) - layer0_input(theta_now, x_s)
            inp = rec.inputs[s][0] + moved
        new = []
        for k in range(rec.L):
            w_ih, w_hh, b_ih, b_hh = layer_params(theta, k)
            a = inp @ w_ih.T + b_ih
            u = state[k][0] @ w_hh.T + b_hh
            if rule == "exact":
                nxt = cell_step(rec.cell, a, u, state[k])
            else:
                old = layer_params(rec.params[s], k)
                cur = layer_params(theta_now, k)
                inp_st, st_st = rec.inputs[s][k], rec.state_in[s][k]
                a_st = inp_st @ old[0].T + old[2]
                u_st = st_st[0] @ old[1].T + old[3]
                da = a - (inp_st @ cur[0].T + cur[2])
                du = u - (st_st[0] @ cur[1].T + cur[3])
                d_state = [sv - ss for sv, ss in zip(state[k], st_st, strict=True)]
                eps = 1e-30  # complex step: an exact directional derivative
                moved = cell_step(
                    rec.cell,
                    a_st + 1j * eps * da,
                    u_st + 1j * eps * du,
                    tuple(ss + 1j * eps * d for ss, d in zip(st_st, d_state, strict=True)),
                )
                nxt = tuple(
                    so + mv.imag / eps for so, mv in zip(rec.state_out[s][k], moved, strict=True)
                )
            new.append(nxt)
            inp = nxt[0]
        state = new
        h_top[s] = inp
    total, count = 0.0, 0.0
    for s in range(t_prev + 1, t + 1):
        h = h_top[s] if s > w else rec.state_out[s][rec.L - 1][0]
        y = h @ theta["readout.weight"].T + theta["readout.bias"]
        m = rec.mask[s - 1].astype(float)
        total = total + np.sum(m * step_loss(loss, y, rec.target[s - 1]))
        count += np.sum(m)
    return total / max(1.0, count)


def fd_gradient(fn, theta, max_per_param=40, h=1e-6, seed=0):
    """Central differences of ``fn(theta)`` in float64, on at most
    ``max_per_param`` random coordinates of each parameter.
    Returns {name: (flat indices, derivatives)}."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, p in theta.items():
        n = p.size
        idx = np.arange(n) if n <= max_per_param else rng.choice(n, max_per_param, replace=False)
        ders = []
        for i in idx:
            plus = {k: v.copy() for k, v in theta.items()}
            minus = {k: v.copy() for k, v in theta.items()}
            plus[name].flat[i] += h
            minus[name].flat[i] -= h
            ders.append((fn(plus) - fn(minus)) / (2 * h))
        out[name] = (idx, np.array(ders))
    return out
