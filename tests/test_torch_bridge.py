"""``tbptt_fast.torch.TBPTT`` (contract: the PyTorch bridge) against pure-PyTorch TBPTT loops.

The loops below are what a PyTorch user writes by hand: the detach loop (carry the
state, cut it where the window starts) for k2 <= k1, and the re-run-the-window loop
(keep the detached state at every window start, re-run the window with grad at
each update) for k2 > k1. Both use the modules' own forward, autograd and any
``torch.optim`` optimizer. Skipped cleanly without torch or the native module.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest

import tbptt_fast as tb

from conftest import TOL, assert_close

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.torch,
    pytest.mark.skipif(not tb.native_available(), reason="native module not built"),
]

from tbptt_fast.torch import TBPTT  # noqa: E402

nn = torch.nn
F = torch.nn.functional
DT = {"float64": torch.float64, "float32": torch.float32}
CELLS = ["rnn_tanh", "rnn_relu", "lstm", "gru"]
D, H, O, B, V = 3, 5, 2, 3, 7


# ----------------------------------------------------------------- modules and data
def make_modules(cell, layers=1, dtype="float64", vocab=None, batch_first=False, d=D, o=O):
    torch.manual_seed(0)
    kw = {"nonlinearity": cell[4:]} if cell.startswith("rnn") else {}
    cls = {"lstm": nn.LSTM, "gru": nn.GRU}.get(cell, nn.RNN)
    rnn = cls(d, H, layers, batch_first=batch_first, **kw).to(DT[dtype])
    head = nn.Linear(H, o).to(DT[dtype])
    emb = nn.Embedding(vocab, d).to(DT[dtype]) if vocab else None
    return rnn, head, emb


def params_of(mods):
    rnn, head, emb = mods
    ps = [*(emb.parameters() if emb is not None else []), *rnn.parameters(), *head.parameters()]
    return list({id(p): p for p in ps}.values())  # a tied parameter once


def snapshot(mods) -> dict:
    """Copies of every parameter, by module-prefixed name."""
    out = {}
    for prefix, m in zip(("rnn", "head", "embedding"), mods, strict=True):
        if m is not None:
            out.update({f"{prefix}.{k}": v.detach().clone() for k, v in m.state_dict().items()})
    return out


def assert_same_params(a, b, dtype, what=""):
    sa, sb = snapshot(a), snapshot(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert_close(sa[k].numpy(), sb[k].numpy(), TOL[dtype], f"{what} {k}")


def make_data(T, loss, dtype="float64", vocab=None, mask_p=0.0, reset_p=0.0, seed=1, d=D, o=O):
    """Time-major torch data: x [T, B, D] (ids [T, B]), target, mask [T, B] or None,
    resets [T, B] bool or None."""
    g = torch.Generator().manual_seed(seed)
    if vocab:
        x = torch.randint(vocab, (T, B), generator=g)
    else:
        x = torch.randn(T, B, d, generator=g, dtype=DT[dtype])
    if loss == "mse":
        target = torch.randn(T, B, o, generator=g, dtype=DT[dtype])
    else:
        target = torch.randint(o, (T, B), generator=g)
    mask = (torch.rand(T, B, generator=g) >= mask_p).to(DT[dtype]) if mask_p else None
    resets = (torch.rand(T, B, generator=g) < reset_p) if reset_p else None
    return x, target, mask, resets


def batch_major(a):
    return None if a is None else a.transpose(0, 1).contiguous()


# ----------------------------------------------------------------- the PyTorch loops
def _detach(st):
    return tuple(s.detach() for s in st) if isinstance(st, tuple) else st.detach()


def _zero_state(rnn, batch):
    z = torch.zeros(rnn.num_layers, batch, rnn.hidden_size, dtype=rnn.weight_hh_l0.dtype)
    return (z, z.clone()) if isinstance(rnn, nn.LSTM) else z


def _reset(st, init, r):
    """The state entering a step: the initial state where ``r`` [B] is set (no gradient across)."""
    if r is None or not bool(r.any()):
        return st
    m = r.view(1, -1, 1)
    if isinstance(st, tuple):
        return tuple(torch.where(m, i, s) for s, i in zip(st, init, strict=True))
    return torch.where(m, init, st)


def _step(mods, x_t, st):
    """One step of the modules: top-layer output [B, H] and the new state."""
    rnn, _, emb = mods
    inp = emb(x_t) if emb is not None else x_t
    inp = inp.unsqueeze(1) if rnn.batch_first else inp.unsqueeze(0)
    out, st = rnn(inp, st)
    return out.squeeze(1 if rnn.batch_first else 0), st


def _pair_loss(y, target, loss):
    if loss == "mse":
        return ((y - target) ** 2).mean(-1)
    return F.cross_entropy(y, target, reduction="none")


def _blocks(t0, T, k1, flush):
    """(t', t) of every update in steps t0+1..t0+T (t0 a multiple of k1)."""
    ends = list(range(t0 + k1, t0 + T + 1, k1))
    if flush and (not ends or ends[-1] != t0 + T):
        ends.append(t0 + T)
    assert flush or ends[-1] == t0 + T, "the loops need whole blocks unless flushed"
    return list(zip([t0, *ends[:-1]], ends, strict=True))


class TorchLoop:
    """Hand-written TBPTT(k1, k2) with the modules and a torch optimizer.

    ``rule="detach"`` (k2 <= k1): each block runs from the carried (detached) state;
    the state is detached where the window starts, ``w = max(t - k2, t')``, and the
    losses at steps <= w reach the readout only. ``rule="recompute"`` (any k1, k2):
    the real forward runs without a graph, keeping the detached state after every
    step; at an update the window ``(w, t]``, ``w = max(0, t - k2, t' - max(0, k2 -
    k1))``, is re-run with grad from the state after w. The update's loss is the mean
    over the block's unmasked pairs; its reported value is the real forward's.
    """

    def __init__(self, mods, opt, k1, k2, loss, rule, init=None):
        assert rule == "recompute" or k2 <= k1
        self.mods, self.opt, self.k1, self.k2, self.loss, self.rule = mods, opt, k1, k2, loss, rule
        self.t = 0
        self.init = init
        self.st = None
        self.hist = []  # recompute: per step (x_t, reset_t)
        self.states = {}  # recompute: step -> detached real state after it

    def fit(self, x, target, mask=None, resets=None, flush=True, clip=None, on_update=None):
        rnn, head, _ = self.mods
        if self.st is None:
            self.init = self.init if self.init is not None else _zero_state(rnn, x.shape[1])
            self.st = self.init
            self.states[0] = self.init
        losses = []
        for tp, t in _blocks(self.t, x.shape[0], self.k1, flush):
            w = max(0, t - self.k2, tp - max(0, self.k2 - self.k1))
            rows = range(tp - self.t, t - self.t)  # this block's rows of x
            pairs = torch.ones(len(rows), x.shape[1], dtype=head.weight.dtype)
            if mask is not None:
                pairs = mask[rows.start : rows.stop].to(head.weight.dtype)
            den = max(1.0, float(pairs.sum()))
            real = []  # per block step: the loss terms [B] of the real forward
            if self.rule == "detach":
                st, ys = self.st, []
                for tau, i in zip(range(tp + 1, t + 1), rows, strict=True):
                    if tau - 1 == w:
                        st = _detach(st)
                    st = _reset(st, self.init, None if resets is None else resets[i])
                    h, st = _step(self.mods, x[i], st)
                    ys.append(head(h if tau > w else h.detach()))
                self.st = _detach(st)
                terms = [_pair_loss(y, target[i], self.loss) for y, i in zip(ys, rows, strict=True)]
                real = [v.detach() for v in terms]
            else:
                with torch.no_grad():
                    st, outs = self.st, {}
                    for tau, i in zip(range(tp + 1, t + 1), rows, strict=True):
                        r = None if resets is None else resets[i]
                        self.hist.append((x[i], r))
                        st = _reset(st, self.init, r)
                        h, st = _step(self.mods, x[i], st)
                        self.states[tau], outs[tau] = st, h
                        real.append(_pair_loss(head(h), target[i], self.loss))
                    self.st = st
                st, terms = self.states[w], []
                for tau in range(min(w, t) + 1, t + 1):
                    x_t, r = self.hist[tau - 1]
                    st = _reset(st, self.init, r)
                    h, st = _step(self.mods, x_t, st)
                    if tau > tp:
                        terms.append((tau, h))
                by_step = dict(terms)
                terms = [
                    _pair_loss(
                        head(by_step[tau] if tau > w else outs[tau].detach()), target[i], self.loss
                    )
                    for tau, i in zip(range(tp + 1, t + 1), rows, strict=True)
                ]
            loss = sum((v * p).sum() for v, p in zip(terms, pairs, strict=True)) / den
            loss_real = sum((v * p).sum() for v, p in zip(real, pairs, strict=True)) / den
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(
                    [p for p in params_of(self.mods) if p.grad is not None], clip
                )
            self.opt.step()
            if on_update is not None:
                on_update()
            losses.append(float(loss_real))
        self.t += x.shape[0]
        return np.array(losses)


def run_both(
    cell,
    k1,
    k2,
    *,
    layers=1,
    dtype="float64",
    loss="mse",
    overlap=None,
    vocab=None,
    opt=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    T=23,
    mask_p=0.0,
    reset_p=0.0,
    batch_first=False,
    clip=None,
    prepare=None,
    calls=1,
    d=D,
    o=O,
):
    """Train a copy of the same modules with the bridge and with the matching loop;
    compare the losses and the final parameters and state."""
    mods = make_modules(cell, layers, dtype, vocab, batch_first, d, o)
    if prepare is not None:
        prepare(mods)
    ref = copy.deepcopy(mods)
    rule = "detach" if k2 <= k1 else "recompute"
    overlap = overlap or ("stored" if k2 <= k1 else "recompute")
    opt_a, opt_b = opt(params_of(mods)), opt(params_of(ref))
    runner = TBPTT(*mods[:2], k1=k1, k2=k2, loss=loss, overlap=overlap, embedding=mods[2])
    loop = TorchLoop(ref, opt_b, k1, k2, loss, rule)
    for c in range(calls):
        x, target, mask, resets = make_data(T, loss, dtype, vocab, mask_p, reset_p, 1 + c, d, o)
        want = loop.fit(x, target, mask, resets, clip=clip)
        if batch_first:
            x, target, mask, resets = map(batch_major, (x, target, mask, resets))
        got = runner.fit(x, target, opt_a, mask=mask, resets=resets, clip_grad_norm=clip)
        assert_close(got.losses, want, TOL[dtype], "losses")
    assert_same_params(mods, ref, dtype)
    st = runner.state
    for a, b in zip(
        st if isinstance(st, tuple) else (st,),
        (loop.st if isinstance(loop.st, tuple) else (loop.st,)),
        strict=True,
    ):
        assert_close(a.numpy(), b.numpy(), TOL[dtype], "state")
    return mods, ref, runner


# ----------------------------------------------------------------- equal to the loops
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("k1,k2", [(4, 4), (5, 3)], ids=["k4_4", "k5_3"])
@pytest.mark.parametrize("cell", CELLS)
def test_detach_loop(cell, k1, k2, layers, dtype):
    run_both(cell, k1, k2, layers=layers, dtype=dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("k1,k2", [(3, 7), (1, 4)], ids=["k3_7", "k1_4"])
@pytest.mark.parametrize("cell", CELLS)
def test_recompute_loop(cell, k1, k2, layers, dtype):
    run_both(cell, k1, k2, layers=layers, dtype=dtype)


OPTIMIZERS = {
    "sgd_nesterov": lambda ps: torch.optim.SGD(
        ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3
    ),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5),
    "two_groups": lambda ps: torch.optim.SGD(
        [{"params": ps[:4]}, {"params": ps[4:], "lr": 0.5}], lr=0.05, momentum=0.9
    ),
}


@pytest.mark.parametrize("k1,k2", [(4, 4), (3, 7)], ids=["k4_4", "k3_7"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_torch_optimizers(name, k1, k2):
    run_both("lstm", k1, k2, opt=OPTIMIZERS[name])


def test_float32_adam_and_clipping():
    run_both("gru", 4, 4, dtype="float32", opt=OPTIMIZERS["adam"], clip=0.5)


@pytest.mark.parametrize("k1,k2", [(4, 4), (3, 7)], ids=["k4_4", "k3_7"])
def test_clip_grad_norm(k1, k2):
    run_both("lstm", k1, k2, layers=2, clip=0.05, opt=OPTIMIZERS["adam"])


def test_frozen_parameter_gets_no_grad_and_stays():
    def freeze(mods):
        mods[0].weight_hh_l0.requires_grad_(False)
        mods[1].bias.requires_grad_(False)

    mods, _, _ = run_both("lstm", 4, 4, prepare=freeze, opt=OPTIMIZERS["adamw"])
    fresh = make_modules("lstm")
    assert mods[0].weight_hh_l0.grad is None and mods[1].bias.grad is None
    assert torch.equal(mods[0].weight_hh_l0, fresh[0].weight_hh_l0)
    assert torch.equal(mods[1].bias, fresh[1].bias)
    assert mods[0].weight_ih_l0.grad is not None
    assert not torch.equal(mods[0].weight_ih_l0, fresh[0].weight_ih_l0)


def test_frozen_after_training_drops_a_stale_grad():
    mods = make_modules("gru")
    opt = torch.optim.SGD(params_of(mods), lr=0.1, momentum=0.9)
    runner = TBPTT(mods[0], mods[1], k1=4)
    x, target, _, _ = make_data(8, "mse")
    runner.fit(x, target, opt)
    w = mods[0].weight_hh_l0
    w.requires_grad_(False)
    before = w.detach().clone()
    runner.fit(x, target, opt)
    assert w.grad is None
    # SGD with momentum would go on moving a parameter whose stale .grad was kept
    assert torch.equal(w, before)


@pytest.mark.parametrize("k1,k2", [(4, 4), (3, 7)], ids=["k4_4", "k3_7"])
def test_scheduler_stepped_in_on_update(k1, k2):
    mods = make_modules("lstm")
    ref = copy.deepcopy(mods)
    opt_a = torch.optim.SGD(params_of(mods), lr=0.2, momentum=0.9)
    opt_b = torch.optim.SGD(params_of(ref), lr=0.2, momentum=0.9)
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, step_size=2, gamma=0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, step_size=2, gamma=0.5)
    overlap = "stored" if k2 <= k1 else "recompute"
    runner = TBPTT(mods[0], mods[1], k1=k1, k2=k2, overlap=overlap)
    loop = TorchLoop(ref, opt_b, k1, k2, "mse", "detach" if k2 <= k1 else "recompute")
    x, target, _, _ = make_data(22, "mse")
    infos = []

    def on_update(info):
        infos.append(info)
        sched_a.step()

    got = runner.fit(x, target, opt_a, on_update=on_update)
    want = loop.fit(x, target, on_update=sched_b.step)
    assert_close(got.losses, want, 1e-10, "losses")
    assert_same_params(mods, ref, "float64")
    assert [i.index for i in infos] == list(range(len(want)))
    assert [i.step for i in infos] == list(got.update_steps)
    assert [i.loss for i in infos] == list(got.losses)
    assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"] < 0.2


@pytest.mark.parametrize("k1,k2", [(4, 4), (3, 7)], ids=["k4_4", "k3_7"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_embedding_token_ids(cell, k1, k2):
    run_both(cell, k1, k2, vocab=V, loss="cross_entropy", mask_p=0.3, opt=OPTIMIZERS["adam"])


def test_embedding_padding_idx_gets_no_gradient():
    def pad(mods):
        emb = nn.Embedding(V, D, padding_idx=2).double()
        mods[2].weight.data.copy_(emb.weight.data)  # the padding row is zero
        mods[2].padding_idx = 2

    mods, _, _ = run_both("lstm", 4, 4, vocab=V, loss="cross_entropy", prepare=pad)
    assert torch.all(mods[2].weight.grad[2] == 0)


def test_tied_embedding_and_head():
    """A tied weight (embedding.weight is head.weight) gets the sum of both gradients."""

    def tie(mods):
        mods[1].weight = mods[2].weight

    # tying needs V == O and D == H
    mods, _, _ = run_both("gru", 4, 4, vocab=V, loss="cross_entropy", prepare=tie, d=H, o=V)
    assert mods[1].weight is mods[2].weight


@pytest.mark.parametrize("k1,k2", [(4, 4), (5, 3), (3, 7)], ids=["k4_4", "k5_3", "k3_7"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_masks_and_resets(loss, k1, k2):
    run_both("lstm", k1, k2, layers=2, loss=loss, mask_p=0.4, reset_p=0.15, calls=2)


def test_all_masked_block_still_steps():
    mods = make_modules("rnn_tanh")
    ref = copy.deepcopy(mods)
    opt_a = torch.optim.SGD(params_of(mods), lr=0.1, momentum=0.9, weight_decay=0.1)
    opt_b = torch.optim.SGD(params_of(ref), lr=0.1, momentum=0.9, weight_decay=0.1)
    x, target, _, _ = make_data(8, "mse")
    mask = torch.zeros(8, B, dtype=torch.float64)
    got = TBPTT(mods[0], mods[1], k1=4).fit(x, target, opt_a, mask=mask)
    want = TorchLoop(ref, opt_b, 4, 4, "mse", "detach").fit(x, target, mask)
    assert list(got.losses) == [0.0, 0.0] == list(want)
    assert_same_params(mods, ref, "float64")


@pytest.mark.parametrize("k1,k2", [(4, 4), (3, 7)], ids=["k4_4", "k3_7"])
@pytest.mark.parametrize("cell", ["lstm", "rnn_relu"])
def test_batch_first(cell, k1, k2):
    run_both(cell, k1, k2, batch_first=True, mask_p=0.3, reset_p=0.1, calls=2)


def test_numpy_data():
    mods = make_modules("lstm")
    ref = copy.deepcopy(mods)
    x, target, mask, resets = make_data(12, "mse", mask_p=0.3, reset_p=0.2)
    args = [a.numpy() for a in (x, target, mask, resets)]
    opt_a = torch.optim.SGD(params_of(mods), lr=0.1)
    opt_b = torch.optim.SGD(params_of(ref), lr=0.1)
    got = TBPTT(mods[0], mods[1], k1=4).fit(args[0], args[1], opt_a, *args[2:])
    want = TBPTT(ref[0], ref[1], k1=4).fit(x, target, opt_b, mask, resets)
    assert np.array_equal(got.losses, want.losses)
    assert_same_params(mods, ref, "float64")


# ----------------------------------------------------------------- equal to tb.Trainer
def _tb_model(mods, cell, layers, dtype, vocab=None):
    rnn, head, emb = mods
    kw = {} if vocab is None else {"vocab_size": vocab}
    model = tb.Model(cell, D, H, O, layers, dtype=dtype, **kw)
    sd = {k: v.detach().clone() for k, v in rnn.state_dict().items()}
    sd["readout.weight"] = head.weight.detach().clone()
    sd["readout.bias"] = head.bias.detach().clone()
    if emb is not None:
        sd["embedding.weight"] = emb.weight.detach().clone()
    model.load_state_dict(sd)
    return model


STORED_CASES = [
    ("lstm", 1, "sgd", None, "mse"),
    ("gru", 2, "adam", None, "mse"),
    ("rnn_tanh", 2, "sgd", None, "cross_entropy"),
    ("lstm", 1, "adam", V, "cross_entropy"),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    "cell,layers,optim,vocab,loss",
    STORED_CASES,
    ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[4]}" + ("-emb" if c[3] else "") for c in STORED_CASES],
)
def test_stored_equals_trainer(cell, layers, optim, vocab, loss, dtype):
    k1, k2 = 3, 7
    mods = make_modules(cell, layers, dtype, vocab)
    model = _tb_model(mods, cell, layers, dtype, vocab)
    if optim == "sgd":
        opt = torch.optim.SGD(params_of(mods), lr=0.1, momentum=0.9)
        tb_opt = tb.SGD(lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.Adam(params_of(mods), lr=1e-2)
        tb_opt = tb.Adam(lr=1e-2)
    runner = TBPTT(mods[0], mods[1], k1=k1, k2=k2, loss=loss, embedding=mods[2])
    trainer = tb.Trainer(model, k1=k1, k2=k2, loss=loss, optimizer=tb_opt, overlap="stored")
    for c in range(2):
        x, target, mask, resets = make_data(20, loss, dtype, vocab, 0.3, 0.1, seed=5 + c)
        got = runner.fit(x, target, opt, mask=mask, resets=resets, flush=c == 1)
        want = trainer.fit(x.numpy(), target.numpy(), mask.numpy(), resets.numpy(), flush=c == 1)
        assert_close(got.losses, want.losses, TOL[dtype], "losses")
        assert list(got.update_steps) == list(want.update_steps)
    sd = model.state_dict()
    names = {f"rnn.{k}": k for k in mods[0].state_dict()}
    names.update({"head.weight": "readout.weight", "head.bias": "readout.bias"})
    names["embedding.weight"] = "embedding.weight"
    for k, v in snapshot(mods).items():
        assert_close(v.numpy(), sd[names[k]], TOL[dtype], k)
    st = runner.state
    st = [st] if isinstance(st, torch.Tensor) else list(st)
    for k, layer in enumerate(trainer.state):
        for a, b in zip(st, layer if isinstance(layer, tuple) else (layer,), strict=True):
            assert_close(a[k].numpy(), b, TOL[dtype], f"state of layer {k}")


# ----------------------------------------------------------------- streaming and sharing
def test_step_and_flush_equal_fit():
    mods = make_modules("lstm", 2)
    ref = copy.deepcopy(mods)
    opt_a = torch.optim.Adam(params_of(mods), lr=1e-2)
    opt_b = torch.optim.Adam(params_of(ref), lr=1e-2)
    a = TBPTT(mods[0], mods[1], k1=3, k2=7, overlap="recompute")
    b = TBPTT(ref[0], ref[1], k1=3, k2=7, overlap="recompute")
    x, target, mask, resets = make_data(11, "mse", mask_p=0.3, reset_p=0.2)
    want = b.fit(x, target, opt_b, mask, resets)
    got, infos = [], []
    for t in range(11):
        loss = a.step(x[t], target[t], opt_a, mask[t], resets[t], on_update=infos.append)
        if loss is not None:
            got.append(loss)
    assert a.pending == 2
    got.append(a.flush(opt_a, on_update=infos.append))
    assert a.flush(opt_a) is None and a.pending == 0
    assert_close(np.array(got), want.losses, 1e-10, "losses")
    assert [i.step for i in infos] == list(want.update_steps)
    assert_same_params(mods, ref, "float64")
    assert a.step_count == b.step_count == 11


def test_changes_between_calls_are_seen():
    """The parameters are shared: an in-place change, a replaced tensor and a
    non-contiguous one between calls all reach the engine."""
    mods = make_modules("rnn_tanh")
    ref = copy.deepcopy(mods)
    opt_a = torch.optim.SGD(params_of(mods), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(params_of(ref), lr=0.1, momentum=0.9)
    runner = TBPTT(mods[0], mods[1], k1=3, k2=7, overlap="recompute")
    loop = TorchLoop(ref, opt_b, 3, 7, "mse", "recompute")
    edits = [
        lambda m: m[0].weight_hh_l0.data.mul_(0.5),
        lambda m: setattr(m[1].weight, "data", m[1].weight.data * 2.0),
        lambda m: setattr(m[0].weight_hh_l0, "data", m[0].weight_hh_l0.data.t().contiguous().t()),
        lambda m: None,
    ]
    for c, edit in enumerate(edits):
        with torch.no_grad():
            edit(mods)
            edit(ref)
        x, target, _, _ = make_data(9, "mse", seed=c)
        got = runner.fit(x, target, opt_a, flush=False)
        want = loop.fit(x, target, flush=False)
        assert_close(got.losses, want, 1e-10, f"losses after edit {c}")
    assert mods[0].weight_hh_l0.is_contiguous()
    assert_same_params(mods, ref, "float64")
    assert runner.step_count == 36


@pytest.mark.parametrize("overlap", ["stored", "recompute"])
def test_change_before_flush_is_seen(overlap):
    """An in-place change between ``fit(flush=False)`` and ``flush`` reaches the flush
    (the reference backend reads its arrays live; long runs, so the engine's own
    copies of W_hh are in use)."""
    mods = make_modules("lstm")
    model = _tb_model(mods, "lstm", 1, "float64")
    opt = torch.optim.SGD(params_of(mods), lr=0.1, momentum=0.9)
    runner = TBPTT(mods[0], mods[1], k1=8, k2=16, overlap=overlap)
    trainer = tb.Trainer(
        model, 8, 16, optimizer=tb.SGD(lr=0.1, momentum=0.9), overlap=overlap, backend="numpy"
    )
    x, target, _, _ = make_data(20, "mse")
    runner.fit(x, target, opt, flush=False)
    trainer.fit(x.numpy(), target.numpy(), flush=False)
    with torch.no_grad():
        mods[0].weight_hh_l0.mul_(0.5)
    sd = model.state_dict()
    sd["weight_hh_l0"] *= 0.5
    model.load_state_dict(sd)
    assert_close(runner.flush(opt), trainer.flush(), 1e-10, "flush loss")
    sd = model.state_dict()
    for k, v in mods[0].state_dict().items():
        assert_close(v.numpy(), sd[k], 1e-10, k)


def test_reset_state_and_state():
    mods = make_modules("lstm", 2)
    ref = copy.deepcopy(mods)
    runner = TBPTT(mods[0], mods[1], k1=4)
    assert runner.state is None
    g = torch.Generator().manual_seed(3)
    init = tuple(torch.randn(2, B, H, generator=g, dtype=torch.float64) for _ in range(2))
    runner.reset_state(init)
    assert all(torch.equal(a, b) for a, b in zip(runner.state, init, strict=True))
    opt_a = torch.optim.SGD(params_of(mods), lr=0.1)
    opt_b = torch.optim.SGD(params_of(ref), lr=0.1)
    loop = TorchLoop(ref, opt_b, 4, 4, "mse", "detach", init=init)
    x, target, _, resets = make_data(12, "mse", reset_p=0.3)
    got = runner.fit(x, target, opt_a, resets=resets)
    want = loop.fit(x, target, resets=resets)
    assert_close(got.losses, want, 1e-10, "losses")
    for a, b in zip(runner.state, loop.st, strict=True):
        assert_close(a.numpy(), b.numpy(), 1e-10, "state")
    # the state continues the modules' own forward
    with torch.no_grad():
        out, _ = mods[0](x[:2], runner.state)
    assert out.shape == (2, B, H)
    runner.reset_state()
    assert runner.step_count == 0 and torch.count_nonzero(runner.state[0]) == 0


def test_on_update_false_stops():
    mods = make_modules("gru")
    runner = TBPTT(mods[0], mods[1], k1=2)
    x, target, _, _ = make_data(10, "mse")
    opt = torch.optim.SGD(params_of(mods), lr=0.1)
    res = runner.fit(x, target, opt, on_update=lambda info: info.index < 1)
    assert list(res.update_steps) == [2, 4] and runner.step_count == 4


# ----------------------------------------------------------------- refused, nothing changed
def _bad_modules():
    f64 = torch.float64
    ok_rnn = lambda **kw: nn.LSTM(D, H, **{"dtype": f64, **kw})  # noqa: E731
    ok_head = lambda: nn.Linear(H, O, dtype=f64)  # noqa: E731
    mixed = nn.Linear(H, O, dtype=torch.float32)
    return [
        ("bidirectional", lambda: (ok_rnn(bidirectional=True), ok_head(), None), ValueError,
         "bidirectional"),
        ("proj_size", lambda: (ok_rnn(proj_size=2), ok_head(), None), ValueError, "proj_size"),
        ("dropout", lambda: (ok_rnn(num_layers=2, dropout=0.2), ok_head(), None), ValueError,
         "dropout"),
        ("no_bias", lambda: (ok_rnn(bias=False), ok_head(), None), ValueError, "bias=False"),
        ("cell", lambda: (nn.LSTMCell(D, H, dtype=f64), ok_head(), None), TypeError,
         "torch.nn.LSTM"),
        ("head_type", lambda: (ok_rnn(), nn.Sequential(ok_head()), None), TypeError,
         "torch.nn.Linear"),
        ("head_size", lambda: (ok_rnn(), nn.Linear(H + 1, O, dtype=f64), None), ValueError,
         "in_features"),
        ("head_bias", lambda: (ok_rnn(), nn.Linear(H, O, bias=False, dtype=f64), None),
         ValueError, "bias"),
        ("emb_sparse", lambda: (ok_rnn(), ok_head(), nn.Embedding(V, D, sparse=True, dtype=f64)),
         ValueError, "sparse"),
        ("emb_dim", lambda: (ok_rnn(), ok_head(), nn.Embedding(V, D + 1, dtype=f64)), ValueError,
         "embedding_dim"),
        ("emb_max_norm", lambda: (ok_rnn(), ok_head(), nn.Embedding(V, D, max_norm=1.0,
         dtype=f64)), ValueError, "max_norm"),
        ("emb_type", lambda: (ok_rnn(), ok_head(), nn.Linear(V, D)), TypeError, "Embedding"),
        ("mixed_dtype", lambda: (ok_rnn(), mixed, None), ValueError, "one dtype"),
        ("half", lambda: (nn.GRU(D, H).half(), nn.Linear(H, O).half(), None), ValueError,
         "float32 or float64"),
        ("meta", lambda: (nn.GRU(D, H, device="meta"), nn.Linear(H, O, device="meta"), None),
         ValueError, "CPU"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", _bad_modules(), ids=lambda c: c[0])
def test_bad_modules_refused(case):
    _, build, exc, words = case
    rnn, head, emb = build()
    with pytest.raises(exc, match=words):
        TBPTT(rnn, head, k1=4, embedding=emb)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device for torch")
def test_cuda_modules_refused_honestly():
    rnn, head = nn.LSTM(D, H).cuda(), nn.Linear(H, O).cuda()
    with pytest.raises(ValueError, match="CUDA bridge is not available yet"):
        TBPTT(rnn, head, k1=4)


def test_bad_arguments_refused():
    rnn, head, _ = make_modules("lstm")
    with pytest.raises(ValueError, match="k1"):
        TBPTT(rnn, head, k1=0)
    with pytest.raises(ValueError, match="loss"):
        TBPTT(rnn, head, k1=4, loss="l1")
    with pytest.raises(ValueError, match="overlap"):
        TBPTT(rnn, head, k1=4, overlap="both")


def _bad_calls(runner, opt):
    x, target, _, _ = make_data(8, "mse")
    other = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    nan_x = x.clone()
    nan_x[5, 1, 2] = float("nan")
    return [
        (lambda: runner.fit(x[..., :2], target, opt), ValueError, r"x must have shape \[T, B, 3\]"),
        (lambda: runner.fit(nan_x, target, opt), ValueError, r"x must be finite.*\[5, 1, 2\]"),
        (lambda: runner.fit(x.long(), target, opt), TypeError, "floating"),
        (lambda: runner.fit(x, target[:, :2], opt), ValueError, "target must have shape"),
        (lambda: runner.fit(x, target, opt, mask=torch.ones(8, 2)), ValueError, "mask"),
        (lambda: runner.fit(x, target, opt, resets=torch.ones(7, B)), ValueError, "resets"),
        (lambda: runner.fit(x[:, :2], target[:, :2], opt), ValueError, "batch size"),
        (lambda: runner.fit(x, target, "sgd"), TypeError, "optimizer"),
        (lambda: runner.fit(x, target, other), ValueError, "none of the modules' parameters"),
        (lambda: runner.fit(x, target, opt, clip_grad_norm=-1.0), ValueError, "clip_grad_norm"),
        (lambda: runner.fit(x, target, opt, on_update=3), TypeError, "on_update"),
        (lambda: runner.step(x[0], target[0, :, :1], opt), ValueError, "target_t"),
    ]


def test_bad_data_refused_with_nothing_changed():
    mods = make_modules("lstm")
    opt = torch.optim.SGD(params_of(mods), lr=0.1, momentum=0.9)
    runner = TBPTT(mods[0], mods[1], k1=3)
    x, target, _, _ = make_data(7, "mse")
    runner.fit(x, target, opt, flush=False)  # a stream in progress, one step pending
    before = snapshot(mods)
    grads = [p.grad.clone() for p in params_of(mods)]
    state, count, pending = runner.state, runner.step_count, runner.pending
    for call, exc, words in _bad_calls(runner, opt):
        with pytest.raises(exc, match=words):
            call()
        for k, v in snapshot(mods).items():
            assert torch.equal(v, before[k]), k
        assert all(torch.equal(p.grad, g) for p, g in zip(params_of(mods), grads, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(runner.state, state, strict=True))
        assert (runner.step_count, runner.pending) == (count, pending)


def test_bad_token_ids_and_nan_parameters_refused():
    mods = make_modules("gru", vocab=V)
    opt = torch.optim.SGD(params_of(mods), lr=0.1)
    runner = TBPTT(mods[0], mods[1], k1=3, embedding=mods[2], loss="cross_entropy")
    x, target, _, _ = make_data(6, "cross_entropy", vocab=V)
    with pytest.raises(TypeError, match="x must be an integer array"):
        runner.fit(x.double(), target, opt)
    bad = x.clone()
    bad[4, 2] = V
    with pytest.raises(ValueError, match=r"x must hold token ids in \[0, 7\).*\[4, 2\]"):
        runner.fit(bad, target, opt)
    with pytest.raises(ValueError, match="target must hold class indices"):
        runner.fit(x, target + O, opt)
    with torch.no_grad():
        mods[0].weight_hh_l0[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"rnn\.weight_hh_l0 must be finite"):
        runner.fit(x, target, opt)
    assert runner.step_count == 0 and runner.state is None


def test_data_too_large_or_overflowing_the_modules_dtype_refused():
    """The bridge's data go through Trainer's checks: a broadcast batch whose copy
    cannot fit in memory, and float64 values that overflow float32 modules, are
    refused naming the argument, with nothing changed."""
    mods = make_modules("gru", dtype="float32")
    opt = torch.optim.SGD(params_of(mods), lr=0.1)
    runner = TBPTT(mods[0], mods[1], k1=3)
    before = snapshot(mods)
    huge_x = torch.zeros(1, 1, D).expand(2, 10**11, D)
    huge_y = torch.zeros(1, 1, O).expand(2, 10**11, O)
    with pytest.raises(MemoryError, match=r"^x: .* \d+ bytes"):
        runner.fit(huge_x, huge_y, opt)
    with pytest.raises(MemoryError, match=r"^x_t: .* \d+ bytes"):
        runner.step(huge_x[0], huge_y[0], opt)
    x, target, _, _ = make_data(6, "mse")  # float64
    x[4, 1, 2] = 1e39
    with pytest.raises(ValueError, match=r"^x must be finite in the model dtype float32.*1e\+39"):
        runner.fit(x, target, opt)
    h0 = torch.zeros(1, B, H, dtype=torch.float64)
    h0[0, 2, 1] = -1e39
    with pytest.raises(ValueError, match=r"^initial_state\[0\] must be finite in the model"):
        runner.reset_state(h0)
    for k, v in snapshot(mods).items():
        assert torch.equal(v, before[k]), k
    assert runner.step_count == 0 and runner.state is None


def test_bfloat16_data_and_state_dicts_are_read_as_float32():
    """bfloat16 has no NumPy dtype (torch's .numpy() raises 'Got unsupported
    ScalarType BFloat16'): data and state dicts in it are widened, exactly."""
    x, target, _, _ = make_data(6, "mse", dtype="float32")
    xb, tb16 = x.to(torch.bfloat16), target.to(torch.bfloat16)
    results = []
    for data in ((xb, tb16), (xb.float(), tb16.float())):
        mods = make_modules("gru", dtype="float32")
        opt = torch.optim.SGD(params_of(mods), lr=0.1)
        results.append(TBPTT(mods[0], mods[1], k1=3).fit(*data, opt).losses)
    np.testing.assert_array_equal(results[0], results[1])
    model = tb.Model("gru", D, H, O, seed=0)
    sd = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in model.state_dict().items()}
    model.load_state_dict(sd)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, sd[k].float().numpy(), err_msg=k)
    out = model.predict(xb, backend="numpy").outputs
    np.testing.assert_array_equal(out, model.predict(xb.float(), backend="numpy").outputs)


def test_import_tbptt_fast_does_not_import_torch():
    code = (
        "import sys, tbptt_fast, tbptt_fast.bench\n"
        "assert 'torch' not in sys.modules, 'import tbptt_fast imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("k1,k2", [(4, 4), (3, 7)], ids=["k4_4", "k3_7"])
def test_bench_row_passes_the_gradient_check(k1, k2):
    from tbptt_fast.bench.checks import check_impl
    from tbptt_fast.bench.configs import Config

    res = check_impl("torch-bridge", Config("gru", 6, 3, k1, k2, out=3))
    assert res["ok"], res["message"]


def test_on_update_exception_propagates():
    mods = make_modules("lstm")
    runner = TBPTT(mods[0], mods[1], k1=2)
    x, target, _, _ = make_data(10, "mse")
    opt = torch.optim.SGD(params_of(mods), lr=0.1)

    def boom(info):
        if info.index == 1:
            raise KeyError("stop here")

    with pytest.raises(KeyError, match="stop here"):
        runner.fit(x, target, opt, on_update=boom)
    assert runner.step_count == 4 and runner.pending == 0
