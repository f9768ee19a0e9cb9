"""Model.predict and Model.evaluate (contract: forward-only use) on every backend."""

from __future__ import annotations

import re
import tracemalloc

import numpy as np
import pytest

import tbptt_fast as tb
from tbptt_fast import inference

from conftest import TOL, assert_close, assert_same_snapshot, make_data, snapshot
from independent import has_cell_state, step_loss

D, H, O, L = 3, 4, 3, 2


def _flat(state):
    return [a for e in state for a in (e if isinstance(e, tuple) else (e,))]


def _random_state(cell, B, seed=5):
    rng = np.random.default_rng(seed)
    return [
        (rng.normal(size=(B, H)), rng.normal(size=(B, H)))
        if has_cell_state(cell)
        else rng.normal(size=(B, H))
        for _ in range(L)
    ]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 4 steps, so short sequences cross several chunk boundaries."""
    monkeypatch.setattr(inference, "CHUNK", 4)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("cell", tb.CELLS)
def test_predict_equals_the_training_forward(backend, cell, dtype, small_chunks):
    """Outputs and final state equal fit(return_outputs=True) before its first
    update, across chunk boundaries, with resets and a given initial state."""
    T, B = 13, 3
    x, y, _, resets = make_data(1, T, B, D, O, "mse", reset_p=0.15)
    resets[5, :] = True  # a chunk (steps 4..7) where every element resets, after its start
    model = tb.Model(cell, D, H, O, num_layers=L, dtype=dtype, seed=2)
    init = _random_state(cell, B)
    pred = model.predict(x, state=init, resets=resets, backend=backend)
    tr = tb.Trainer(model, k1=T + 1, optimizer=tb.SGD(lr=0.5), backend=backend)
    res = tr.fit(x, y, resets=resets, initial_state=init, flush=False, return_outputs=True)
    assert pred.outputs.dtype == np.dtype(dtype) and pred.outputs.shape == (T, B, O)
    assert_close(pred.outputs, res.outputs, TOL[dtype], "outputs")
    for a, b in zip(_flat(pred.state), _flat(tr.state), strict=True):
        assert a.dtype == np.dtype(dtype)
        assert_close(a, b, TOL[dtype], "state")
    assert [type(e) for e in pred.state] == [type(e) for e in tr.state]


def test_chunks_do_not_change_the_result(backend, monkeypatch):
    """The same stream in chunks of 3 and in one chunk, with resets everywhere."""
    T, B = 17, 4
    x, _, _, resets = make_data(2, T, B, D, O, "mse", reset_p=0.3)
    resets[:, 0] = False  # one element never resets
    model = tb.Model("lstm", D, H, O, num_layers=L, dtype="float64", seed=3)
    init = _random_state("lstm", B)
    whole = model.predict(x, state=init, resets=resets, backend=backend)
    monkeypatch.setattr(inference, "CHUNK", 3)
    parts = model.predict(x, state=init, resets=resets, backend=backend)
    assert_close(parts.outputs, whole.outputs, 1e-13, "outputs")
    for a, b in zip(_flat(parts.state), _flat(whole.state), strict=True):
        assert_close(a, b, 1e-13, "state")


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_evaluate_is_the_mean_loss_of_section_2(backend, loss, small_chunks):
    T, B = 11, 3
    x, target, mask, resets = make_data(3, T, B, D, O, loss, mask_p=0.3, reset_p=0.1)
    if loss == "mse":
        target[~mask] = np.nan  # unread
    else:
        target[~mask] = -100  # unread
    model = tb.Model("gru", D, H, O, num_layers=L, dtype="float64", seed=4)
    init = _random_state("gru", B)
    ev = model.evaluate(x, target, mask=mask, resets=resets, state=init, loss=loss, backend=backend)
    pred = model.predict(x, state=init, resets=resets, backend=backend)
    per = np.stack(
        [step_loss(loss, pred.outputs[t], np.where(mask[t], target[t].T, 0).T) for t in range(T)]
    )
    assert ev.count == int(mask.sum())
    assert isinstance(ev.loss, float) and isinstance(ev.count, int)
    assert_close(ev.loss, per[mask].sum() / mask.sum(), 1e-12, "loss")
    if loss == "mse":
        assert ev.accuracy is None
    else:
        hits = np.argmax(pred.outputs, axis=-1) == target
        assert ev.accuracy == pytest.approx(hits[mask].mean(), abs=1e-15)
    for a, b in zip(_flat(ev.state), _flat(pred.state), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_evaluate_with_nothing_unmasked(backend, loss):
    x, target, _, _ = make_data(4, 5, 2, D, O, loss)
    model = tb.Model("rnn_tanh", D, H, O, dtype="float64")
    ev = model.evaluate(x, target, mask=np.zeros((5, 2)), loss=loss, backend=backend)
    assert (ev.loss, ev.count) == (0.0, 0)
    assert ev.accuracy == (None if loss == "mse" else 0.0)


def test_evaluate_between_fits_changes_no_trainer(backend):
    """A trainer's state, step count, pending block, parameters and its next fit
    (optimizer state included) are bitwise what they would be without evaluate."""
    x, y, mask, resets = make_data(5, 14, 2, D, O, "mse", mask_p=0.2, reset_p=0.1)

    def trainer():
        m = tb.Model("lstm", D, H, O, num_layers=L, dtype="float32", seed=6)
        return tb.Trainer(m, k1=3, k2=5, optimizer=tb.Adam(lr=0.01), backend=backend)

    a, b = trainer(), trainer()
    for tr in (a, b):
        tr.fit(x[:8], y[:8], mask=mask[:8], resets=resets[:8], flush=False)
    before = snapshot(a)
    assert before[3] == 2  # a pending block
    a.model.evaluate(x, y, mask=mask, resets=resets, backend=backend)
    a.model.predict(x[:3], state=a.state, backend=backend)
    if backend != "numpy":
        a.model.predict(x[:3], backend="numpy")
    assert_same_snapshot(snapshot(a), before)
    ra = a.fit(x[8:], y[8:], mask=mask[8:], resets=resets[8:], return_outputs=True)
    rb = b.fit(x[8:], y[8:], mask=mask[8:], resets=resets[8:], return_outputs=True)
    np.testing.assert_array_equal(ra.losses, rb.losses)
    np.testing.assert_array_equal(ra.outputs, rb.outputs)
    assert_same_snapshot(snapshot(a), snapshot(b))


def test_forward_engine_sees_the_current_parameters(backend):
    """The cached forward engine follows training and load_state_dict."""
    x, y, _, _ = make_data(6, 9, 2, D, O, "mse")
    model = tb.Model("cifg", D, H, O, num_layers=L, dtype="float64", seed=7)
    first = model.predict(x, backend=backend).outputs
    tr = tb.Trainer(model, k1=3, optimizer=tb.SGD(lr=0.5), backend=backend)
    tr.fit(x, y)
    twin = tb.Model("cifg", D, H, O, num_layers=L, dtype="float64", seed=0)
    twin.load_state_dict(model.state_dict())
    trained = model.predict(x, backend=backend).outputs
    assert np.max(np.abs(trained - first)) > 1e-3
    np.testing.assert_array_equal(trained, twin.predict(x, backend=backend).outputs)
    model.load_state_dict(
        tb.Model("cifg", D, H, O, num_layers=L, dtype="float64", seed=7).state_dict()
    )
    np.testing.assert_array_equal(model.predict(x, backend=backend).outputs, first)
    assert set(model._forward_engines) == {backend}  # one engine per backend, reused


def test_batch_first_is_the_transposed_run(backend):
    x, y, mask, resets = make_data(7, 9, 3, D, O, "cross_entropy", mask_p=0.2, reset_p=0.2)
    model = tb.Model("lstm", D, H, O, dtype="float32", seed=8)
    tm = model.predict(x, resets=resets, backend=backend)
    bf = model.predict(x.swapaxes(0, 1), resets=resets.T, backend=backend, batch_first=True)
    assert bf.outputs.shape == (3, 9, O)
    np.testing.assert_array_equal(bf.outputs, tm.outputs.swapaxes(0, 1))
    kw = dict(loss="cross_entropy", backend=backend)
    e1 = model.evaluate(x, y, mask=mask, resets=resets, **kw)
    e2 = model.evaluate(x.swapaxes(0, 1), y.T, mask=mask.T, resets=resets.T, batch_first=True, **kw)
    assert (e1.loss, e1.count, e1.accuracy) == (e2.loss, e2.count, e2.accuracy)


def test_evaluate_memory_does_not_grow_with_t():
    """Peak NumPy memory of evaluate (outside its inputs) is the same for a
    4-chunk and a 16-chunk sequence; predict's grows by its outputs only."""
    model = tb.Model("lstm", D, 8, O, dtype="float64", seed=9)
    backend = "cpu" if tb.native_available() else "numpy"
    peaks = []
    for chunks in (4, 16):
        T = chunks * inference.CHUNK
        x, y, mask, resets = make_data(8, T, 2, D, O, "mse", mask_p=0.1, reset_p=0.01)
        model.evaluate(x[:2], y[:2], backend=backend)  # the engine exists before measuring
        tracemalloc.start()
        try:
            model.evaluate(x, y, mask=mask, resets=resets, backend=backend)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    assert peaks[1] < 1.2 * peaks[0], peaks


def test_token_model_predict_and_evaluate(backend):
    V, T, B = 6, 8, 2
    model = tb.Model("gru", D, H, V, dtype="float64", seed=1, vocab_size=V)
    ids = np.random.default_rng(0).integers(0, V, size=(T, B))
    pred = model.predict(ids.astype(np.int32), backend=backend)
    tr = tb.Trainer(model, k1=T + 1, loss="cross_entropy", backend=backend)
    res = tr.fit(ids, ids, flush=False, return_outputs=True)
    assert_close(pred.outputs, res.outputs, 1e-10, "outputs")
    ev = model.evaluate(ids, ids, loss="cross_entropy", backend=backend)
    assert ev.count == T * B


# -- bad input: refused, naming the argument ---------------------------------------------------
BAD = [
    ("x-shape", dict(x=np.zeros((4, 2, 5))), ValueError, r"x must have shape \[T, B, 3\], got \[4, 2, 5\]"),
    ("x-int", dict(x=np.zeros((4, 2, 3), int)), TypeError, "x must be a floating-point array"),
    ("x-empty", dict(x=np.zeros((0, 2, 3))), ValueError, "x must not be empty"),
    ("x-nan-late", dict(nan_at=(9, 1, 2)), ValueError, r"x must be finite, found nan at index \[9, 1, 2\]"),
    ("resets-shape", dict(resets=np.zeros((4, 3))), ValueError, r"resets must have shape \[11, 2\], got \[4, 3\]"),
    ("state", dict(state=[np.zeros((3, H))]), ValueError, "state must be a list of 2"),
    ("backend", dict(backend="tpu"), ValueError, "backend must be one of"),
    ("batch_first", dict(batch_first="yes"), TypeError, "batch_first must be a bool"),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_predict_refuses_bad_input(case, small_chunks):
    _, kw, exc, msg = case
    kw = dict(kw)
    model = tb.Model("lstm", D, H, O, num_layers=L, dtype="float64")
    x = np.zeros((11, 2, D))
    if "nan_at" in kw:
        x[kw.pop("nan_at")] = np.nan
    kw.setdefault("x", x)
    kw.setdefault("backend", "numpy")
    with pytest.raises(exc, match=msg):
        model.predict(**kw)


@pytest.mark.parametrize("batch_first", [False, True])
def test_evaluate_refuses_bad_targets(small_chunks, batch_first):
    model = tb.Model("rnn_relu", D, H, O, dtype="float64")
    x, y, _, _ = make_data(9, 10, 2, D, O, "cross_entropy")
    y[7, 1] = O

    def ev(x, y, **kw):
        if batch_first:
            x = x.swapaxes(0, 1)
            y = y.swapaxes(0, 1)
            kw = {k: v.T for k, v in kw.items()}
        return model.evaluate(
            x, y, loss="cross_entropy", batch_first=batch_first, backend="numpy", **kw
        )

    at = "[1, 7]" if batch_first else "[7, 1]"
    with pytest.raises(
        ValueError, match=rf"target must hold class indices in \[0, 3\).*at index {re.escape(at)}"
    ):
        ev(x, y)
    mask = np.ones((10, 2), bool)
    mask[7, 1] = False
    assert ev(x, y, mask=mask).count == 19  # not read where masked
    with pytest.raises(TypeError, match="target must be an integer array of class indices"):
        ev(x, y.astype(float))
    with pytest.raises(ValueError, match="mask must have shape"):
        ev(x, y, mask=np.ones((10, 3)))
    with pytest.raises(ValueError, match="loss must be one of"):
        model.evaluate(x, y, loss="hinge", backend="numpy")
    with pytest.raises(ValueError, match=r"target must be finite, found inf at index \[8, 0, 1\]"):
        t = np.zeros((10, 2, O))
        t[8, 0, 1] = np.inf
        model.evaluate(x, t, backend="numpy")


def test_non_finite_parameters_are_refused():
    model = tb.Model("lstm", D, H, O, dtype="float64")
    sd = model.state_dict()
    sd["weight_hh_l0"][0, 0] = np.nan
    model.load_state_dict(sd)
    with pytest.raises(ValueError, match="parameter weight_hh_l0 must be finite"):
        model.predict(np.zeros((3, 2, D)), backend="numpy")


def test_state_takes_pytorch_form(backend):
    x, _, _, resets = make_data(10, 6, 2, D, O, "mse", reset_p=0.2)
    model = tb.Model("lstm", D, H, O, num_layers=L, dtype="float64", seed=1)
    init = _random_state("lstm", 2)
    h0 = np.stack([h for h, _ in init])
    c0 = np.stack([c for _, c in init])
    a = model.predict(x, state=init, resets=resets, backend=backend)
    b = model.predict(x, state=(h0, c0), resets=resets, backend=backend)
    np.testing.assert_array_equal(a.outputs, b.outputs)
    with pytest.raises(ValueError, match=r"state\[0\] must have shape \[2, 2, 4\]"):
        model.predict(x, state=(h0[:, :1], c0), backend=backend)
