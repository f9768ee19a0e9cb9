"""Invariants of the schedule (contract: the schedule) that hold on every backend."""

from __future__ import annotations

import numpy as np
import pytest

import tbptt_fast as tb

from conftest import TOL, assert_close, make_data
from independent import fd_gradient, forward, has_cell_state, step_loss, zero_state


def _trainer(backend, cell="lstm", k1=3, k2=5, dtype="float64", L=2, H=3, D=2, O=2, **kw):
    kw.setdefault("optimizer", tb.SGD(lr=0.1, momentum=0.9))
    model = tb.Model(cell, D, H, O, num_layers=L, dtype=dtype, seed=2)
    return tb.Trainer(model, k1=k1, k2=k2, backend=backend, **kw)


def _assert_same_params(a, b, tol, what=""):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    for k in sa:
        assert_close(sa[k], sb[k], tol, f"{what} {k}")


def _flat_state(tr):
    return [a for e in tr.state for a in (e if isinstance(e, tuple) else (e,))]


@pytest.mark.parametrize("overlap", ["stored", "recompute"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_streaming_equals_fit(backend, overlap, loss):
    T = 11
    x, target, mask, resets = make_data(0, T, 3, 2, 2, loss, mask_p=0.2, reset_p=0.1)
    a = _trainer(backend, loss=loss, overlap=overlap)
    b = _trainer(backend, loss=loss, overlap=overlap)
    res = a.fit(x, target, mask=mask, resets=resets)
    losses = []
    for s in range(T):
        out = b.step(x[s], target[s], mask_t=mask[s], reset_t=resets[s])
        if out is not None:
            losses.append(out)
    assert b.pending == T % 3
    last = b.flush()
    assert last is not None and b.pending == 0
    losses.append(last)
    assert b.flush() is None  # nothing pending: nothing happens
    assert_close(losses, res.losses, 1e-12, "losses")
    assert list(res.update_steps) == [3, 6, 9, 11]
    _assert_same_params(a, b, 1e-12)
    for u, v in zip(_flat_state(a), _flat_state(b), strict=True):
        assert_close(u, v, 1e-12, "state")


def test_fit_in_two_calls_equals_one(backend):
    T = 13
    x, target, mask, resets = make_data(1, T, 2, 2, 2, "mse", mask_p=0.1, reset_p=0.1)
    a = _trainer(backend, k1=4, k2=6)
    b = _trainer(backend, k1=4, k2=6)
    whole = a.fit(x, target, mask=mask, resets=resets)
    first = b.fit(x[:6], target[:6], mask=mask[:6], resets=resets[:6], flush=False)
    assert b.pending == 2 and b.step_count == 6
    second = b.fit(x[6:], target[6:], mask=mask[6:], resets=resets[6:])
    assert list(first.update_steps) + list(second.update_steps) == list(whole.update_steps)
    assert_close(np.concatenate([first.losses, second.losses]), whole.losses, 1e-12)
    _assert_same_params(a, b, 1e-12)


def test_full_bptt_is_one_update_with_the_whole_gradient(backend):
    """TBPTT(T, T) == TBPTT(T, None) == full BPTT: one update, gradient of the mean loss."""
    T, B, D, H, O, L = 6, 2, 2, 2, 2, 1
    x, target, _, _ = make_data(2, T, B, D, O, "mse")
    for k2 in (T, None, 2 * T):
        tr = _trainer(backend, cell="gru", k1=T, k2=k2, L=L, H=H)
        theta = tr.model.state_dict()
        res = tr.fit(x, target, return_grads=True)
        assert list(res.update_steps) == [T]

        def full_loss(th):
            init = zero_state("gru", L, B, H)
            steps = forward("gru", th, x, init, init, np.zeros((T, B), bool), L)
            return np.mean([step_loss("mse", s[3], target[i]) for i, s in enumerate(steps)])

        fd = fd_gradient(full_loss, theta)
        for name, (idx, expected) in fd.items():
            assert_close(res.grads[0][name].ravel()[idx], expected, 1e-6, name)


def test_tbptt_kk_equals_hand_written_chunked_loop(backend):
    """TBPTT(k, k): carry the state, cut every k steps; SGD on the chunk mean loss."""
    T, B, D, H, O, L, k, lr = 10, 2, 2, 2, 2, 2, 4, 0.3
    x, target, _, _ = make_data(3, T, B, D, O, "mse")
    tr = _trainer(backend, cell="rnn_tanh", k1=k, k2=k, L=L, H=H, optimizer=tb.SGD(lr=lr))
    theta = tr.model.state_dict()
    res = tr.fit(x, target)
    state = zero_state("rnn_tanh", L, B, H)
    no_reset = np.zeros((T, B), bool)
    expected_losses = []
    for lo in range(0, T, k):
        hi = min(T, lo + k)

        def chunk_loss(th, lo=lo, hi=hi, state=state):
            steps = forward("rnn_tanh", th, x[lo:hi], state, state, no_reset[lo:hi], L)
            return np.mean([step_loss("mse", s[3], target[lo + i]) for i, s in enumerate(steps)])

        expected_losses.append(chunk_loss(theta))
        grads = fd_gradient(chunk_loss, theta, max_per_param=10**6)
        steps = forward("rnn_tanh", theta, x[lo:hi], state, state, no_reset[lo:hi], L)
        state = steps[-1][2]  # carried on, a constant for the next chunk
        theta = {n: theta[n] - lr * grads[n][1].reshape(theta[n].shape) for n in theta}
    assert_close(res.losses, expected_losses, 1e-10, "losses")
    got = tr.model.state_dict()
    for n in theta:
        assert_close(got[n], theta[n], 1e-7, n)


@pytest.mark.parametrize(("k1", "k2"), [(3, 7), (7, 3), (4, 4), (1, 5)])
def test_memory_is_bounded_by_the_window(backend, k1, k2):
    tr = _trainer(backend, cell="gru", k1=k1, k2=k2, L=1, optimizer=tb.SGD(lr=0.0))
    x, target, _, _ = make_data(4, 5, 2, 2, 2, "mse")
    most = 0
    for _ in range(12):
        tr.fit(x, target, flush=False)
        most = max(most, tr._engine.stored_steps)
    assert 0 < most <= max(k1, k2)
    unbounded = _trainer(backend, cell="gru", k1=k1, k2=None, L=1)
    for _ in range(4):
        unbounded.fit(x, target, flush=False)
    assert unbounded._engine.stored_steps == 20  # everything since the reset


def test_resets_do_not_restart_the_step_count(backend):
    x, target, _, _ = make_data(5, 10, 2, 2, 2, "mse")
    resets = np.zeros((10, 2), bool)
    resets[4] = True
    tr = _trainer(backend, k1=3, k2=3)
    res = tr.fit(x, target, resets=resets)
    assert list(res.update_steps) == [3, 6, 9, 10]


def test_reset_on_every_element_equals_a_fresh_start(backend):
    """A reset of all elements at step s gives the same forward as starting there."""
    x, target, _, _ = make_data(6, 8, 2, 2, 2, "mse")
    resets = np.zeros((8, 2), bool)
    resets[5] = True
    a = _trainer(backend, k1=100, optimizer=tb.SGD(lr=0.0))
    ya = a.fit(x, target, resets=resets, return_outputs=True, flush=False).outputs
    b = _trainer(backend, k1=100, optimizer=tb.SGD(lr=0.0))
    yb = b.fit(x[5:], target[5:], return_outputs=True, flush=False).outputs
    assert_close(ya[5:], yb, 1e-12)


def test_reset_state_discards_the_block_and_keeps_the_optimizer(backend):
    x, target, _, _ = make_data(7, 8, 2, 2, 2, "mse")
    a = _trainer(backend, k1=3, optimizer=tb.Adam(lr=0.05))
    b = _trainer(backend, k1=3, optimizer=tb.Adam(lr=0.05))
    a.fit(x[:5], target[:5], flush=False)  # one update, 2 steps pending
    b.fit(x[:3], target[:3], flush=False)  # the same update
    a.reset_state()
    assert a.step_count == 0 and a.pending == 0
    assert all(np.all(v == 0) for v in _flat_state(a)) and a.state[0][0].shape == (2, 3)
    assert _trainer(backend).state is None  # no batch size known yet
    b.reset_state()
    ra, rb = a.fit(x, target), b.fit(x, target)
    assert_close(ra.losses, rb.losses, 1e-12)
    _assert_same_params(a, b, 1e-12)
    # a fresh optimizer would differ (Adam's step counter and moments were kept)
    c = _trainer(backend, k1=3, optimizer=tb.Adam(lr=0.05))
    c.model.load_state_dict(_trainer(backend).model.state_dict())
    c.fit(x[:3], target[:3], flush=False)
    c2 = _trainer(backend, k1=3, optimizer=tb.Adam(lr=0.05))
    c2.model.load_state_dict(c.model.state_dict())
    c2.fit(x, target)
    assert not np.allclose(
        c2.model.state_dict()["weight_hh_l0"], b.model.state_dict()["weight_hh_l0"]
    )


@pytest.mark.parametrize("cell", ["lstm", "gru", "cifg"])
def test_initial_state_forms_agree_and_restart_the_count(backend, cell):
    L, B, H = 2, 2, 3
    rng = np.random.default_rng(8)
    h0 = rng.normal(size=(L, B, H))
    c0 = rng.normal(size=(L, B, H))
    paired = has_cell_state(cell)
    torch_form = (h0, c0) if paired else h0
    per_layer = [(h0[k], c0[k]) if paired else h0[k] for k in range(L)]
    x, target, _, resets = make_data(9, 7, B, 2, 2, "mse", reset_p=0.3)
    outs = []
    for init in (torch_form, per_layer):
        tr = _trainer(backend, cell=cell, k1=3, L=L, H=H)
        tr.fit(x[:2], target[:2], flush=False)  # a pending block the reset discards
        res = tr.fit(x, target, resets=resets, initial_state=init, return_outputs=True)
        assert list(res.update_steps) == [3, 6, 7]
        outs.append(res.outputs)
    assert_close(outs[0], outs[1], 1e-12)
    # the initial state is what resets restore: a reset at step 1 changes nothing
    tr = _trainer(backend, cell=cell, k1=3, L=L, H=H, optimizer=tb.SGD(lr=0.0))
    r1 = np.zeros((7, B), bool)
    r1[0] = True
    y = tr.fit(x, target, resets=r1, initial_state=torch_form, return_outputs=True).outputs
    tr2 = _trainer(backend, cell=cell, k1=3, L=L, H=H, optimizer=tb.SGD(lr=0.0))
    y2 = tr2.fit(x, target, initial_state=torch_form, return_outputs=True).outputs
    assert_close(y, y2, 1e-12)


def test_state_carries_across_fits(backend):
    x, target, _, _ = make_data(10, 6, 2, 2, 2, "mse")
    a = _trainer(backend, k1=100, optimizer=tb.SGD(lr=0.0))
    whole = a.fit(x, target, return_outputs=True, flush=False).outputs
    b = _trainer(backend, k1=100, optimizer=tb.SGD(lr=0.0))
    b.fit(x[:3], target[:3], flush=False)
    rest = b.fit(x[3:], target[3:], return_outputs=True, flush=False).outputs
    assert_close(rest, whole[3:], 1e-12)


def test_numeric_mask_means_nonzero_and_masked_targets_are_not_read(backend):
    x, target, mask, _ = make_data(11, 6, 3, 2, 4, "cross_entropy", mask_p=0.4)
    numeric = np.where(mask, 2.5, 0.0)
    poisoned = np.where(mask, target, -100)
    a = _trainer(backend, loss="cross_entropy", O=4)
    b = _trainer(backend, loss="cross_entropy", O=4)
    ra = a.fit(x, target, mask=mask)
    rb = b.fit(x, poisoned, mask=numeric)
    assert_close(ra.losses, rb.losses, 1e-12)
    _assert_same_params(a, b, 1e-12)


@pytest.mark.parametrize("cell", tb.CELLS)
def test_float32_follows_float64(backend, cell):
    x, target, mask, resets = make_data(12, 9, 3, 2, 2, "mse", mask_p=0.2, reset_p=0.1)
    res = {}
    for dtype in ("float32", "float64"):
        tr = _trainer(backend, cell=cell, k1=3, k2=5, dtype=dtype, optimizer=tb.SGD(lr=0.05))
        res[dtype] = (tr.fit(x, target, mask=mask, resets=resets, return_grads=True), tr)
    (r32, t32), (r64, _) = res["float32"], res["float64"]
    assert t32.model.state_dict()["weight_hh_l0"].dtype == np.float32
    assert r32.grads[0]["weight_hh_l0"].dtype == np.float32
    assert_close(r32.losses, r64.losses, 1e-5)
    for g32, g64 in zip(r32.grads, r64.grads, strict=True):
        for k in g64:
            assert_close(g32[k], g64[k], TOL["float32"], k)


def test_batch_size_change_needs_a_reset(backend):
    tr = _trainer(backend)
    x, target, _, _ = make_data(13, 4, 2, 2, 2, "mse")
    tr.fit(x, target)
    x3, t3, _, _ = make_data(13, 4, 3, 2, 2, "mse")
    with pytest.raises(ValueError, match="batch size"):
        tr.fit(x3, t3)
    tr.reset_state()
    tr.fit(x3, t3)
    assert tr.state[0][0].shape == (3, 3)
