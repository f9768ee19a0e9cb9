"""Optimizers and clipping: hand-computed steps, then every backend replayed against them."""

from __future__ import annotations

import math

import numpy as np
import pytest

import tbptt_fast as tb
from tbptt_fast.optim import adam_step, clip_grad_norm, sgd_step

from conftest import assert_close, make_data


def test_sgd_momentum_by_hand():
    # p = 1, g = 0.5 twice, lr 0.1, momentum 0.9: buf 0.5 then 0.95
    p = [np.array([1.0])]
    st: dict = {}
    cfg = tb.SGD(lr=0.1, momentum=0.9).config()
    sgd_step(p, [np.array([0.5])], st, cfg)
    assert p[0][0] == pytest.approx(0.95, abs=1e-15)
    sgd_step(p, [np.array([0.5])], st, cfg)
    assert p[0][0] == pytest.approx(0.95 - 0.1 * 0.95, abs=1e-15)


def test_sgd_nesterov_and_weight_decay_by_hand():
    # g' = g + wd p = 0.5 + 0.1 = 0.6; buf = 0.6; step = g' + m buf = 0.6 + 0.54
    p = [np.array([1.0])]
    sgd_step(p, [np.array([0.5])], {}, tb.SGD(0.1, 0.9, True, 0.1).config())
    assert p[0][0] == pytest.approx(1.0 - 0.1 * (0.6 + 0.9 * 0.6), abs=1e-15)


def test_adam_by_hand():
    # first step: m_hat = g, v_hat = g^2, so p -= lr * g / (|g| + eps)
    p = [np.array([1.0, -2.0])]
    st: dict = {}
    cfg = tb.Adam(lr=0.1, eps=1e-8).config()
    adam_step(p, [np.array([0.5, -4.0])], st, cfg)
    np.testing.assert_allclose(
        p[0], [1.0 - 0.1 * 0.5 / (0.5 + 1e-8), -2.0 + 0.1 * 4.0 / (4.0 + 1e-8)]
    )
    # second step with g = 0 for the first entry: m = 0.9*0.1*0.5... by the formula
    adam_step(p, [np.array([0.0, -4.0])], st, cfg)
    m = 0.9 * (0.1 * 0.5)
    v = 0.999 * (0.001 * 0.25)
    expected = (
        1.0
        - 0.1 * 0.5 / (0.5 + 1e-8)
        - 0.1 / (1 - 0.81) * m / (math.sqrt(v) / math.sqrt(1 - 0.999**2) + 1e-8)
    )
    assert p[0][0] == pytest.approx(expected, abs=1e-14)


def test_clip_by_hand():
    g = [np.array([3.0]), np.array([4.0])]  # total norm 5
    total = clip_grad_norm(g, 1.0)
    assert total == pytest.approx(5.0)
    np.testing.assert_allclose([g[0][0], g[1][0]], [3 / (5 + 1e-6), 4 / (5 + 1e-6)])
    g = [np.array([0.3]), np.array([0.4])]
    clip_grad_norm(g, 1.0)  # below the limit: unchanged
    assert (g[0][0], g[1][0]) == (0.3, 0.4)


def _replay(params, grads_per_update, opt, clip):
    """torch.optim semantics written element by element in plain Python floats."""
    flat = {k: v.astype(np.float64).ravel().tolist() for k, v in params.items()}
    buf, m, v, step = {}, {}, {}, 0
    for grads in grads_per_update:
        g = {k: a.astype(np.float64).ravel().tolist() for k, a in grads.items()}
        if clip is not None:
            total = math.sqrt(sum(e * e for a in g.values() for e in a))
            coef = clip / (total + 1e-6)
            if coef < 1:
                g = {k: [e * coef for e in a] for k, a in g.items()}
        step += 1
        for k in flat:
            for i, p in enumerate(flat[k]):
                d = g[k][i] + opt.weight_decay * p
                if isinstance(opt, tb.SGD):
                    if opt.momentum:
                        b = d if step == 1 else opt.momentum * buf[k, i] + d
                        buf[k, i] = b
                        d = d + opt.momentum * b if opt.nesterov else b
                    flat[k][i] = p - opt.lr * d
                else:
                    b1, b2 = opt.betas
                    m[k, i] = b1 * m.get((k, i), 0.0) + (1 - b1) * d
                    v[k, i] = b2 * v.get((k, i), 0.0) + (1 - b2) * d * d
                    denom = math.sqrt(v[k, i]) / math.sqrt(1 - b2**step) + opt.eps
                    flat[k][i] = p - opt.lr / (1 - b1**step) * m[k, i] / denom
    return {k: np.array(a).reshape(params[k].shape) for k, a in flat.items()}


OPTIMIZERS = [
    ("sgd", tb.SGD(lr=0.2), None),
    ("sgd-momentum-wd", tb.SGD(lr=0.1, momentum=0.9, weight_decay=0.01), None),
    ("sgd-nesterov-clip", tb.SGD(lr=0.1, momentum=0.5, nesterov=True), 0.05),
    ("adam", tb.Adam(lr=0.01), None),
    ("adam-wd-clip", tb.Adam(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1), 0.1),
]


@pytest.mark.parametrize(("name", "opt", "clip"), OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_trainer_applies_the_optimizer_exactly(backend, name, opt, clip):
    del name
    x, target, mask, _ = make_data(0, 10, 2, 2, 3, "cross_entropy", mask_p=0.2)
    model = tb.Model("gru", 2, 3, 3, num_layers=2, dtype="float64", seed=5)
    start = model.state_dict()
    tr = tb.Trainer(
        model, k1=3, k2=4, loss="cross_entropy", optimizer=opt, clip_grad_norm=clip, backend=backend
    )
    res = tr.fit(x, target, mask=mask, return_grads=True)
    assert len(res.grads) == 4
    if clip is not None:  # the reported gradients are before clipping: some exceed the limit
        norms = [math.sqrt(sum(float(np.sum(g * g)) for g in u.values())) for u in res.grads]
        assert max(norms) > clip
    expected = _replay(start, res.grads, opt, clip)
    got = model.state_dict()
    for k in expected:
        assert_close(got[k], expected[k], 1e-10, k)


def test_optimizer_config_is_validated():
    with pytest.raises(ValueError, match="SGD lr"):
        tb.SGD(lr=-1.0)
    with pytest.raises(ValueError, match="nesterov"):
        tb.SGD(lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"Adam betas\[1\]"):
        tb.Adam(betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="Adam lr"):
        tb.Adam(lr="fast")
