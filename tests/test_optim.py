"""Optimizers and clipping: hand-computed steps, then every backend replayed against them."""

from __future__ import annotations

import copy
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


def _replay(params, grads_per_update, opt, clip, fresh_at=()):
    """torch.optim semantics written element by element in plain Python floats.

    ``opt``: one optimizer, or a list with the optimizer (values) of each
    update; the optimizer state starts afresh before the updates in ``fresh_at``.
    """
    opts = opt if isinstance(opt, list) else [opt] * len(grads_per_update)
    flat = {k: v.astype(np.float64).ravel().tolist() for k, v in params.items()}
    buf, m, v, step = {}, {}, {}, 0
    for u, (grads, opt) in enumerate(zip(grads_per_update, opts, strict=True)):
        if u in fresh_at:
            buf, m, v, step = {}, {}, {}, 0
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
                        old = buf.get((k, i))
                        b = d if old is None else opt.momentum * old + d
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


# -- changing the optimizer between calls (contract: optimizer changes) ------------------------------------
FIELD_CASES = [
    (tb.SGD(lr=0.1), "lr", -0.5, ValueError, "SGD lr must be a finite number >= 0"),
    (tb.SGD(lr=0.1), "lr", float("nan"), ValueError, "SGD lr"),
    (tb.SGD(lr=0.1), "lr", "0.1", TypeError, "SGD lr must be a real number"),
    (tb.SGD(lr=0.1), "momentum", -1, ValueError, "SGD momentum"),
    (tb.SGD(lr=0.1), "nesterov", True, ValueError, "nesterov=True requires momentum > 0"),
    (tb.SGD(lr=0.1, momentum=0.9, nesterov=True), "momentum", 0.0, ValueError, "requires momentum"),
    (tb.SGD(lr=0.1), "nesterov", 1, TypeError, "SGD nesterov must be a bool"),
    (tb.SGD(lr=0.1), "weight_decay", float("inf"), ValueError, "SGD weight_decay"),
    (tb.Adam(), "lr", True, TypeError, "Adam lr must be a real number"),
    (tb.Adam(), "betas", (0.9, 1.0), ValueError, r"Adam betas\[1\]"),
    (tb.Adam(), "betas", 0.9, TypeError, "Adam betas must be a pair"),
    (tb.Adam(), "eps", -1e-8, ValueError, "Adam eps"),
    (tb.Adam(), "weight_decay", None, TypeError, "Adam weight_decay"),
    (tb.Adam(), "amsgrad", True, AttributeError, "Adam has no field 'amsgrad'"),
]  # fmt: skip


@pytest.mark.parametrize(("opt", "field", "value", "exc", "msg"), FIELD_CASES)
def test_invalid_field_values_are_refused_at_assignment(opt, field, value, exc, msg):
    before = repr(opt)
    with pytest.raises(exc, match=msg):
        setattr(opt, field, value)
    assert repr(opt) == before


def test_fields_are_properties_with_current_values():
    opt = tb.SGD(lr=0.1, momentum=0.9)
    opt.lr = 0.05
    opt.nesterov = True
    assert isinstance(tb.SGD.lr, property) and isinstance(tb.Adam.betas, property)
    assert repr(opt) == "SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.0)"
    assert opt.config()["lr"] == 0.05 and opt == tb.SGD(0.05, 0.9, True)
    adam = tb.Adam()
    adam.betas = [0.8, 0.9]
    assert adam.betas == (0.8, 0.9) and adam.config()["beta2"] == 0.9


def _changing_trainer(backend, opt, **kw):
    model = tb.Model("lstm", 2, 3, 2, num_layers=1, dtype="float64", seed=9)
    return model.state_dict(), tb.Trainer(model, k1=3, k2=5, optimizer=opt, backend=backend, **kw)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_changed_values_apply_at_the_next_update_with_the_state_kept(backend, kind):
    """Values changed between fit calls and in the middle of a block (between
    two steps): each update uses the values current at it, and momentum /
    Adam moments and step count carry on (checked against a replay by hand)."""
    x, target, _, _ = make_data(1, 14, 2, 2, 2, "mse")
    opt = tb.SGD(lr=0.2, momentum=0.9) if kind == "sgd" else tb.Adam(lr=0.05)
    start, tr = _changing_trainer(backend, opt)
    res1 = tr.fit(x[:7], target[:7], flush=False, return_grads=True)  # updates at 3, 6
    seen = [copy.copy(opt)] * 2
    tr.optimizer.lr = 0.5 * tr.optimizer.lr
    if kind == "sgd":
        tr.optimizer.momentum = 0.5
    else:
        tr.optimizer.betas = (0.8, 0.9)
    res2 = tr.fit(x[7:8], target[7:8], flush=False, return_grads=True)  # step 8: no update
    tr.optimizer.weight_decay = 0.1  # between two steps of one block: the update at 9 sees it
    res3 = tr.fit(x[8:], target[8:], return_grads=True)  # updates at 9, 12, 14 (flush)
    seen += [copy.copy(opt)] * 3
    assert list(res1.update_steps) + list(res3.update_steps) == [3, 6, 9, 12, 14]
    assert not res2.grads
    expected = _replay(start, res1.grads + res3.grads, seen, None)
    got = tr.model.state_dict()
    for k in expected:
        assert_close(got[k], expected[k], 1e-12, k)


def test_a_new_optimizer_object_starts_afresh(backend):
    x, target, _, _ = make_data(2, 12, 2, 2, 2, "mse")
    first = tb.SGD(lr=0.1, momentum=0.9)
    start, tr = _changing_trainer(backend, first)
    res1 = tr.fit(x[:6], target[:6], return_grads=True)
    tr.optimizer = tr.optimizer  # the same object: nothing restarts
    res2 = tr.fit(x[6:9], target[6:9], return_grads=True)
    second = tb.SGD(lr=0.1, momentum=0.9)  # equal values, but a new object: fresh momentum
    tr.optimizer = second
    assert tr.optimizer is second and "SGD(lr=0.1, momentum=0.9" in repr(tr)
    res3 = tr.fit(x[9:], target[9:], return_grads=True)
    third = tb.Adam(lr=0.01)
    tr.optimizer = third
    assert "optimizer=Adam(lr=0.01" in repr(tr)
    res4 = tr.fit(x[:6], target[:6], return_grads=True)
    grads = res1.grads + res2.grads + res3.grads + res4.grads
    assert len(grads) == 6
    expected = _replay(start, grads, [first] * 3 + [second] + [third] * 2, None, fresh_at=(3, 4))
    got = tr.model.state_dict()
    for k in expected:
        assert_close(got[k], expected[k], 1e-12, k)


def test_optimizer_assignment_is_validated(backend):
    _, tr = _changing_trainer(backend, tb.SGD(lr=0.1))
    before = tr.optimizer
    with pytest.raises(TypeError, match=r"optimizer must be tbptt_fast\.SGD or tbptt_fast\.Adam"):
        tr.optimizer = {"lr": 0.1}
    assert tr.optimizer is before


def test_a_change_before_training_equals_constructing_with_it(backend):
    """Bitwise: the engine reads the new value, nothing else differs."""
    x, target, _, _ = make_data(3, 9, 2, 2, 2, "mse")
    _, a = _changing_trainer(backend, tb.Adam(lr=0.3))
    a.optimizer.lr = 0.02
    _, b = _changing_trainer(backend, tb.Adam(lr=0.02))
    ra, rb = a.fit(x, target), b.fit(x, target)
    np.testing.assert_array_equal(ra.losses, rb.losses)
    for k, v in a.model.state_dict().items():
        np.testing.assert_array_equal(v, b.model.state_dict()[k], err_msg=k)
