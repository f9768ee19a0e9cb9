"""Against PyTorch (optional): torch.nn.LSTM/GRU/RNN + torch.nn.Linear, trained the usual way.

Skipped cleanly when torch is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest

import tbptt_fast as tb

from conftest import assert_close, make_data

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

# The cells PyTorch has a module for (it has no cifg): cell -> (D, H, L) -> module.
TORCH_RNNS = {
    "rnn_tanh": lambda D, H, L: torch.nn.RNN(D, H, L, nonlinearity="tanh", dtype=torch.float64),
    "rnn_relu": lambda D, H, L: torch.nn.RNN(D, H, L, nonlinearity="relu", dtype=torch.float64),
    "lstm": lambda D, H, L: torch.nn.LSTM(D, H, L, dtype=torch.float64),
    "gru": lambda D, H, L: torch.nn.GRU(D, H, L, dtype=torch.float64),
}
CELLS = [c for c in tb.CELLS if c in TORCH_RNNS]


def _torch_model(cell, D, H, O, L, sd):
    rnn = TORCH_RNNS[cell](D, H, L)
    lin = torch.nn.Linear(H, O, dtype=torch.float64)
    rnn.load_state_dict(
        {k: torch.from_numpy(v) for k, v in sd.items() if not k.startswith("readout")}
    )
    lin.load_state_dict(
        {k[8:]: torch.from_numpy(v) for k, v in sd.items() if k.startswith("readout")}
    )
    return rnn, lin


def _block_loss(y, target, mask, loss):
    m = torch.from_numpy(mask.astype(np.float64))
    if loss == "mse":
        per = ((y - torch.from_numpy(target)) ** 2).mean(-1)
    else:
        logp = torch.log_softmax(y, -1)
        per = -logp.gather(-1, torch.from_numpy(target)[..., None])[..., 0]
    return (per * m).sum() / max(1.0, float(m.sum()))


def _detach(h):
    return tuple(a.detach() for a in h) if isinstance(h, tuple) else h.detach()


def _grads(rnn, lin):
    g = {k: p.grad.numpy().copy() for k, p in rnn.named_parameters()}
    g["readout.weight"] = lin.weight.grad.numpy().copy()
    g["readout.bias"] = lin.bias.grad.numpy().copy()
    return g


def _params(rnn, lin):
    p = {k: v.detach().numpy().copy() for k, v in rnn.named_parameters()}
    p["readout.weight"] = lin.weight.detach().numpy().copy()
    p["readout.bias"] = lin.bias.detach().numpy().copy()
    return p


def _compare(res, model, losses, grads, params):
    assert_close(res.losses, losses, 1e-10, "losses")
    assert len(res.grads) == len(grads)
    for u, (a, b) in enumerate(zip(res.grads, grads, strict=True)):
        for k in b:
            assert_close(a[k], b[k], 1e-10, f"update {u} grad {k}")
    got = model.state_dict()
    for k in params:
        assert_close(got[k], params[k], 1e-10, f"param {k}")


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_detach_every_k_loop(backend, cell, loss):
    """TBPTT(k, k): the usual PyTorch loop (carry the state, detach every k steps)."""
    T, B, D, H, O, L, k = 10, 3, 2, 4, 3, 2, 4
    x, target, mask, _ = make_data(0, T, B, D, O, loss, mask_p=0.2)
    model = tb.Model(cell, D, H, O, num_layers=L, dtype="float64", seed=0)
    rnn, lin = _torch_model(cell, D, H, O, L, model.state_dict())
    opt = torch.optim.SGD([*rnn.parameters(), *lin.parameters()], lr=0.1, momentum=0.9)
    h, losses, grads = None, [], []
    for lo in range(0, T, k):
        hi = min(T, lo + k)
        out, h = rnn(torch.from_numpy(x[lo:hi]), h)
        block = _block_loss(lin(out), target[lo:hi], mask[lo:hi], loss)
        opt.zero_grad()
        block.backward()
        losses.append(block.item())
        grads.append(_grads(rnn, lin))
        opt.step()
        h = _detach(h)
    tr = tb.Trainer(model, k1=k, loss=loss, optimizer=tb.SGD(lr=0.1, momentum=0.9), backend=backend)
    res = tr.fit(x, target, mask=mask, return_grads=True)
    _compare(res, model, losses, grads, _params(rnn, lin))


@pytest.mark.parametrize(("k1", "k2"), [(2, 5), (1, 4), (3, 3)])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_overlapping_windows_recompute(backend, cell, k1, k2):
    """k1 < k2 done correctly in PyTorch: re-run the forward from the stored
    detached state at step w over the stored inputs; Adam and clipping too."""
    T, B, D, H, O, L = 11, 2, 3, 3, 2, 2
    x, target, mask, _ = make_data(1, T, B, D, O, "mse", mask_p=0.1)
    model = tb.Model(cell, D, H, O, num_layers=L, dtype="float64", seed=1)
    rnn, lin = _torch_model(cell, D, H, O, L, model.state_dict())
    opt = torch.optim.Adam([*rnn.parameters(), *lin.parameters()], lr=0.05, weight_decay=0.01)
    zeros = torch.zeros(L, B, H, dtype=torch.float64)
    states = {0: (zeros, zeros) if cell == "lstm" else zeros}
    ys, losses, grads, t_prev = {}, [], [], 0
    for t in range(1, T + 1):
        with torch.no_grad():  # the real forward pass, at the weights of its time
            out, states[t] = rnn(torch.from_numpy(x[t - 1 : t]), states[t - 1])
            ys[t] = lin(out)[0]
        if t - t_prev == k1 or t == T:
            w = max(0, t - k2, t_prev - max(0, k2 - k1))
            out, _ = rnn(torch.from_numpy(x[w:t]), states[w])
            block = _block_loss(lin(out[t_prev - w :]), target[t_prev:t], mask[t_prev:t], "mse")
            with torch.no_grad():
                real = torch.stack([ys[s] for s in range(t_prev + 1, t + 1)])
                losses.append(_block_loss(real, target[t_prev:t], mask[t_prev:t], "mse").item())
            opt.zero_grad()
            block.backward()
            grads.append(_grads(rnn, lin))
            torch.nn.utils.clip_grad_norm_([*rnn.parameters(), *lin.parameters()], 0.5)
            opt.step()
            t_prev = t
    tr = tb.Trainer(
        model,
        k1=k1,
        k2=k2,
        optimizer=tb.Adam(lr=0.05, weight_decay=0.01),
        clip_grad_norm=0.5,
        overlap="recompute",
        backend=backend,
    )
    res = tr.fit(x, target, mask=mask, return_grads=True)
    _compare(res, model, losses, grads, _params(rnn, lin))


def test_loads_a_torch_state_dict_and_initial_state(backend):
    T, B, D, H, O, L = 5, 2, 3, 4, 2, 2
    rnn = torch.nn.LSTM(D, H, L, dtype=torch.float64)
    lin = torch.nn.Linear(H, O, dtype=torch.float64)
    sd = {**rnn.state_dict(), **{f"readout.{k}": v for k, v in lin.state_dict().items()}}
    model = tb.Model("lstm", D, H, O, num_layers=L, dtype="float64")
    model.load_state_dict(sd)  # torch tensors, as they come
    for k, v in sd.items():
        np.testing.assert_array_equal(model.state_dict()[k], v.numpy())
    x, target, _, _ = make_data(2, T, B, D, O, "mse")
    h0 = torch.randn(L, B, H, dtype=torch.float64)
    c0 = torch.randn(L, B, H, dtype=torch.float64)
    with torch.no_grad():
        out, (hT, cT) = rnn(torch.from_numpy(x), (h0, c0))
        y = lin(out).numpy()
    tr = tb.Trainer(model, k1=100, optimizer=tb.SGD(lr=0.0), backend=backend)
    res = tr.fit(x, target, initial_state=(h0, c0), return_outputs=True, flush=False)
    assert_close(res.outputs, y, 1e-10, "outputs")
    for k in range(L):
        assert_close(tr.state[k][0], hT[k].numpy(), 1e-10, "h")
        assert_close(tr.state[k][1], cT[k].numpy(), 1e-10, "c")


# -- token models (contract: token inputs): nn.Embedding + nn.LSTM/GRU/RNN + nn.Linear ----------------
def _torch_token_model(cell, V, D, H, O, L, sd):
    emb = torch.nn.Embedding(V, D, dtype=torch.float64)
    emb.load_state_dict({"weight": torch.from_numpy(sd["embedding.weight"])})
    rnn, lin = _torch_model(
        cell, D, H, O, L, {k: v for k, v in sd.items() if k != "embedding.weight"}
    )
    return emb, rnn, lin


def _token_grads(emb, rnn, lin):
    return {"embedding.weight": emb.weight.grad.numpy().copy(), **_grads(rnn, lin)}


def _token_params(emb, rnn, lin):
    return {"embedding.weight": emb.weight.detach().numpy().copy(), **_params(rnn, lin)}


@pytest.mark.parametrize(("k1", "k2"), [(4, 4), (4, 2)])
@pytest.mark.parametrize("cell", CELLS)
def test_embedding_detach_loop(backend, cell, k1, k2):
    """k2 <= k1: per block, the first k1 - k2 steps run without a graph through
    the recurrent layers (their losses reach the readout only), the state is
    detached, and the last k2 steps backpropagate into the embedding."""
    T, B, V, D, H, O, L = 11, 3, 6, 2, 3, 4, 2
    _, target, mask, _ = make_data(3, T, B, D, O, "cross_entropy", mask_p=0.2)
    ids = np.random.default_rng(4).integers(0, V, size=(T, B))
    model = tb.Model(cell, D, H, O, num_layers=L, dtype="float64", seed=2, vocab_size=V)
    emb, rnn, lin = _torch_token_model(cell, V, D, H, O, L, model.state_dict())
    params = [*emb.parameters(), *rnn.parameters(), *lin.parameters()]
    opt = torch.optim.SGD(params, lr=0.2, momentum=0.9)
    h, losses, grads = None, [], []
    for lo in range(0, T, k1):
        hi = min(T, lo + k1)
        w = max(lo, hi - k2)
        outs = []
        if w > lo:
            with torch.no_grad():
                out, h = rnn(emb(torch.from_numpy(ids[lo:w])), h)
            outs.append(out)
        h = _detach(h) if h is not None else None
        out, h = rnn(emb(torch.from_numpy(ids[w:hi])), h)
        outs.append(out)
        block = _block_loss(lin(torch.cat(outs)), target[lo:hi], mask[lo:hi], "cross_entropy")
        opt.zero_grad()
        block.backward()
        losses.append(block.item())
        grads.append(_token_grads(emb, rnn, lin))
        opt.step()
        h = _detach(h)
    tr = tb.Trainer(
        model,
        k1=k1,
        k2=k2,
        loss="cross_entropy",
        optimizer=tb.SGD(lr=0.2, momentum=0.9),
        backend=backend,
    )
    res = tr.fit(ids, target, mask=mask, return_grads=True)
    _compare(res, model, losses, grads, _token_params(emb, rnn, lin))


@pytest.mark.parametrize(("k1", "k2"), [(2, 5), (1, 3)])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_embedding_recompute_loop(backend, cell, k1, k2):
    """k2 > k1 with overlap="recompute": re-run the window from the stored
    detached state, looking the ids up again with the current embedding."""
    T, B, V, D, H, O, L = 10, 2, 5, 3, 3, 2, 2
    _, target, mask, _ = make_data(5, T, B, D, O, "mse", mask_p=0.1)
    ids = np.random.default_rng(6).integers(0, V, size=(T, B))
    model = tb.Model(cell, D, H, O, num_layers=L, dtype="float64", seed=3, vocab_size=V)
    emb, rnn, lin = _torch_token_model(cell, V, D, H, O, L, model.state_dict())
    opt = torch.optim.Adam([*emb.parameters(), *rnn.parameters(), *lin.parameters()], lr=0.05)
    zeros = torch.zeros(L, B, H, dtype=torch.float64)
    states = {0: (zeros, zeros) if cell == "lstm" else zeros}
    ys, losses, grads, t_prev = {}, [], [], 0
    for t in range(1, T + 1):
        with torch.no_grad():  # the real forward pass, at the weights of its time
            out, states[t] = rnn(emb(torch.from_numpy(ids[t - 1 : t])), states[t - 1])
            ys[t] = lin(out)[0]
        if t - t_prev == k1 or t == T:
            w = max(0, t - k2, t_prev - max(0, k2 - k1))
            out, _ = rnn(emb(torch.from_numpy(ids[w:t])), states[w])
            block = _block_loss(lin(out[t_prev - w :]), target[t_prev:t], mask[t_prev:t], "mse")
            with torch.no_grad():
                real = torch.stack([ys[s] for s in range(t_prev + 1, t + 1)])
                losses.append(_block_loss(real, target[t_prev:t], mask[t_prev:t], "mse").item())
            opt.zero_grad()
            block.backward()
            grads.append(_token_grads(emb, rnn, lin))
            opt.step()
            t_prev = t
    tr = tb.Trainer(
        model, k1=k1, k2=k2, optimizer=tb.Adam(lr=0.05), overlap="recompute", backend=backend
    )
    res = tr.fit(ids, target, mask=mask, return_grads=True)
    _compare(res, model, losses, grads, _token_params(emb, rnn, lin))


# -- the optimizer changed between calls (contract: optimizer changes) --------------------------------------
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_lr_change_equals_a_param_group_change(backend, kind):
    """lr halved (and, for SGD, momentum changed) after two updates, as setting
    the param_group's values in PyTorch: the optimizer state carries on."""
    T, B, D, H, O, L, k = 12, 2, 2, 3, 2, 1, 3
    x, target, _, _ = make_data(7, T, B, D, O, "mse")
    model = tb.Model("lstm", D, H, O, num_layers=L, dtype="float64", seed=4)
    rnn, lin = _torch_model("lstm", D, H, O, L, model.state_dict())
    params = [*rnn.parameters(), *lin.parameters()]
    if kind == "sgd":
        opt = torch.optim.SGD(params, lr=0.2, momentum=0.9)
        ours = tb.SGD(lr=0.2, momentum=0.9)
    else:
        opt = torch.optim.Adam(params, lr=0.05, betas=(0.8, 0.99))
        ours = tb.Adam(lr=0.05, betas=(0.8, 0.99))
    h, losses = None, []
    for u, lo in enumerate(range(0, T, k)):
        if u == 2:
            for group in opt.param_groups:
                group["lr"] *= 0.5
                if kind == "sgd":
                    group["momentum"] = 0.5
                else:
                    group["betas"] = (0.7, 0.95)
        out, h = rnn(torch.from_numpy(x[lo : lo + k]), h)
        block = _block_loss(lin(out), target[lo : lo + k], np.ones((k, B), bool), "mse")
        opt.zero_grad()
        block.backward()
        losses.append(block.item())
        opt.step()
        h = _detach(h)
    tr = tb.Trainer(model, k1=k, optimizer=ours, backend=backend)
    first = tr.fit(x[: 2 * k], target[: 2 * k])
    tr.optimizer.lr = 0.5 * tr.optimizer.lr
    if kind == "sgd":
        tr.optimizer.momentum = 0.5
    else:
        tr.optimizer.betas = (0.7, 0.95)
    second = tr.fit(x[2 * k :], target[2 * k :])
    assert_close(np.concatenate([first.losses, second.losses]), losses, 1e-10, "losses")
    got = model.state_dict()
    for name, v in _params(rnn, lin).items():
        assert_close(got[name], v, 1e-10, name)
