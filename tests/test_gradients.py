"""Every update's gradient against an independent derivation (float64).

For each update at step t, the contract (the schedule) defines Loss_P as a function of the
parameters; ``independent.block_loss`` writes that function from the contract alone
and central finite differences give its gradient. The recompute rule (and
every k2 <= k1 case) is the exact function on the re-run window; the stored
rule for k2 > k1 is the first-order expansion around the stored activations.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import tbptt_fast as tb

from conftest import make_data
from independent import block_loss, fd_gradient, has_cell_state, record, window_w

# id, cell, layers, k1, k2, T, B, H, loss, overlap, mask_p, reset_p, init
CASES = [
    ("tanh-k1=k2", "rnn_tanh", 1, 3, 3, 7, 2, 3, "mse", "stored", 0.0, 0.0, False),
    (
        "relu-k1>k2-ce-mask",
        "rnn_relu",
        2,
        4,
        2,
        9,
        3,
        2,
        "cross_entropy",
        "stored",
        0.3,
        0.0,
        False,
    ),
    ("lstm-k1<k2-stored-resets", "lstm", 1, 2, 5, 9, 2, 3, "mse", "stored", 0.0, 0.2, False),
    ("lstm-k1<k2-recompute", "lstm", 2, 2, 5, 9, 2, 2, "mse", "recompute", 0.2, 0.2, False),
    (
        "gru-k1<k2-stored-3layers",
        "gru",
        3,
        3,
        7,
        10,
        1,
        2,
        "cross_entropy",
        "stored",
        0.0,
        0.15,
        True,
    ),
    ("gru-recompute-k2>T", "gru", 1, 2, 20, 7, 2, 3, "mse", "recompute", 0.0, 0.0, False),
    ("tanh-unbounded-stored", "rnn_tanh", 2, 3, None, 8, 2, 2, "mse", "stored", 0.0, 0.1, False),
    (
        "lstm-unbounded-recompute-ce",
        "lstm",
        1,
        3,
        None,
        8,
        2,
        2,
        "cross_entropy",
        "recompute",
        0.2,
        0.0,
        False,
    ),
    ("lstm-H1-B1", "lstm", 1, 2, 3, 6, 1, 1, "mse", "stored", 0.0, 0.0, False),
    ("tanh-(1,n)", "rnn_tanh", 1, 1, None, 5, 2, 2, "mse", "stored", 0.0, 0.0, False),
    ("lstm-(k1,1)", "lstm", 2, 3, 1, 7, 2, 2, "cross_entropy", "stored", 0.0, 0.0, False),
    ("gru-T-not-multiple", "gru", 2, 4, 4, 10, 2, 2, "mse", "stored", 0.0, 0.0, False),
    ("relu-k1<k2", "rnn_relu", 1, 2, 3, 8, 2, 3, "mse", "stored", 0.0, 0.0, False),
    ("lstm-init-state-k1<k2", "lstm", 2, 2, 4, 8, 2, 2, "mse", "stored", 0.0, 0.1, True),
    ("gru-k1>k2-recompute", "gru", 1, 5, 2, 11, 2, 2, "mse", "recompute", 0.0, 0.1, False),
    ("tanh-(T,T)", "rnn_tanh", 2, 6, 6, 6, 3, 2, "cross_entropy", "recompute", 0.0, 0.0, False),
    ("cifg-k1<k2-stored-resets", "cifg", 2, 2, 5, 9, 2, 3, "mse", "stored", 0.1, 0.2, False),
    (
        "cifg-k1<k2-recompute-ce-init",
        "cifg",
        1,
        2,
        4,
        8,
        2,
        2,
        "cross_entropy",
        "recompute",
        0.0,
        0.15,
        True,
    ),
    ("cifg-k1>k2-H1-B1", "cifg", 1, 4, 2, 9, 1, 1, "mse", "stored", 0.0, 0.0, False),
]


def _run_case(backend, case, lr=0.05, mask_override=None):
    _, cell, L, k1, k2, T, B, H, loss, overlap, mask_p, reset_p, use_init = case
    D, O = 2, 3
    x, target, mask, resets = make_data(hash(case[0]) % 1000, T, B, D, O, loss, mask_p, reset_p)
    if mask_override is not None:
        mask = mask_override
    model = tb.Model(cell, D, H, O, num_layers=L, dtype="float64", seed=3)
    trainer = tb.Trainer(
        model,
        k1=k1,
        k2=k2,
        loss=loss,
        optimizer=tb.SGD(lr=lr, momentum=0.5),
        overlap=overlap,
        backend=backend,
    )
    init = None
    if use_init:
        rng = np.random.default_rng(7)
        shape = (B, H)
        init = [
            (rng.normal(size=shape), rng.normal(size=shape))
            if has_cell_state(cell)
            else rng.normal(size=shape)
            for _ in range(L)
        ]
    rec = record(trainer, x, target, mask, resets, init=init)
    return rec, (k1, k2, loss, overlap)


def _loss_of(theta, rec, now, t, t_prev, w, loss, rule):
    return block_loss(rec, theta, now, t, t_prev, w, loss, rule)


def _check_updates(rec, k1, k2, loss, overlap, tol=1e-6):
    assert rec.updates, "no update happened"
    for t, t_prev, reported_loss, grads, theta_now in rec.updates:
        w = window_w(t, t_prev, k1, k2)
        rule = "exact" if overlap == "recompute" or (k2 is not None and k2 <= k1) else "stored"
        # the reported loss is the forward pass's Loss_P (stored activations)
        fwd = block_loss(rec, theta_now, theta_now, t, t_prev, w, loss, "stored")
        assert abs(reported_loss - fwd) <= 1e-10 * max(1, abs(fwd)), (t, reported_loss, fwd)
        fd = fd_gradient(
            functools.partial(
                _loss_of, rec=rec, now=theta_now, t=t, t_prev=t_prev, w=w, loss=loss, rule=rule
            ),
            theta_now,
        )
        for name, (idx, expected) in fd.items():
            got = grads[name].ravel()[idx]
            scale = max(1.0, float(np.max(np.abs(expected))))
            err = np.max(np.abs(got - expected))
            assert err <= tol * scale, (
                f"update at step {t} (t'={t_prev}, w={w}, rule={rule}): {name} "
                f"max error {err:.3e}\n got {got}\n fd  {expected}"
            )


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gradient_matches_derivation(backend, case):
    rec, (k1, k2, loss, overlap) = _run_case(backend, case)
    _check_updates(rec, k1, k2, loss, overlap)


def test_all_masked_block_is_a_zero_gradient_update(backend):
    case = ("gru-masked", "gru", 1, 3, 3, 9, 2, 2, "mse", "stored", 0.0, 0.0, False)
    mask = np.ones((9, 2), bool)
    mask[3:6] = False  # the second block has no target at all
    rec, (k1, k2, loss, overlap) = _run_case(backend, case, mask_override=mask)
    steps = [u[0] for u in rec.updates]
    assert steps == [3, 6, 9]
    _, _, l2, g2, theta = rec.updates[1]
    assert l2 == 0.0
    assert all(np.all(g == 0) for g in g2.values())
    # momentum still moves the parameters on that update (the optimizer steps)
    after = rec.params[7]
    assert any(not np.array_equal(after[k], theta[k]) for k in theta)
    _check_updates(rec, k1, k2, loss, overlap)


def test_rules_agree_without_learning_and_differ_with_it(backend):
    x, target, _, _ = make_data(5, 12, 2, 2, 2, "mse")

    def grads(overlap, lr):
        m = tb.Model("lstm", 2, 3, 2, dtype="float64", seed=1)
        tr = tb.Trainer(m, k1=2, k2=6, optimizer=tb.SGD(lr=lr), overlap=overlap, backend=backend)
        return tr.fit(x, target, return_grads=True).grads

    for lr, same in ((0.0, True), (0.5, False)):
        a, b = grads("stored", lr), grads("recompute", lr)
        diff = max(np.max(np.abs(ga[k] - gb[k])) for ga, gb in zip(a, b, strict=True) for k in ga)
        if same:
            assert diff <= 1e-12, diff
        else:
            assert diff > 1e-6, diff
    # the first update's window lies inside its block: equal whatever the lr
    a, b = grads("stored", 0.5), grads("recompute", 0.5)
    assert max(np.max(np.abs(a[0][k] - b[0][k])) for k in a[0]) <= 1e-12


@pytest.mark.parametrize("cell", tb.CELLS)
def test_outputs_follow_spec_gate_order(backend, cell):
    """The forward pass of every cell against the literal transcription of the contract."""
    from independent import forward, zero_state

    T, B, D, H, O, L = 5, 3, 2, 4, 2, 2
    x, target, _, resets = make_data(11, T, B, D, O, "mse", reset_p=0.2)
    m = tb.Model(cell, D, H, O, num_layers=L, dtype="float64", seed=4)
    theta = m.state_dict()
    tr = tb.Trainer(m, k1=100, optimizer=tb.SGD(lr=0.0), backend=backend)
    res = tr.fit(x, target, resets=resets, return_outputs=True, flush=False)
    steps = forward(cell, theta, x, zero_state(cell, L, B, H), zero_state(cell, L, B, H), resets, L)
    expected = np.stack([s[3] for s in steps])
    np.testing.assert_allclose(res.outputs, expected, rtol=1e-10, atol=1e-10, err_msg=cell)
