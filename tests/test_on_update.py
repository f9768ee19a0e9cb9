"""fit(on_update=...): a callback after each update that can stop the fit (every backend)."""

from __future__ import annotations

import numpy as np
import pytest

import tbptt_fast as tb

from conftest import assert_same_snapshot, make_data, snapshot

T, B, D, H, O = 14, 2, 2, 3, 2


def _trainer(backend, **kw):
    m = tb.Model("gru", D, H, O, num_layers=2, dtype="float64", seed=3)
    kw.setdefault("optimizer", tb.Adam(lr=0.02))
    return tb.Trainer(m, k1=3, k2=5, backend=backend, **kw)


def _data():
    return make_data(0, T, B, D, O, "mse", mask_p=0.2, reset_p=0.1)


def _assert_same_results(a, b):
    np.testing.assert_array_equal(a.losses, b.losses)
    np.testing.assert_array_equal(a.update_steps, b.update_steps)
    np.testing.assert_array_equal(a.outputs, b.outputs)
    assert len(a.grads) == len(b.grads)
    for ga, gb in zip(a.grads, b.grads, strict=True):
        for k in ga:
            np.testing.assert_array_equal(ga[k], gb[k], err_msg=k)


def test_the_callback_sees_every_update(backend):
    x, y, mask, resets = _data()
    seen = []
    tr = _trainer(backend)
    res = tr.fit(x, y, mask=mask, resets=resets, on_update=seen.append)  # returns None: go on
    assert all(isinstance(info, tb.UpdateInfo) for info in seen)
    assert [info.index for info in seen] == list(range(len(res.losses)))
    assert [info.step for info in seen] == list(res.update_steps) == [3, 6, 9, 12, 14]
    assert [info.loss for info in seen] == list(res.losses)
    # the index counts within the call; the step since the last trainer-level reset
    seen.clear()
    tr.fit(x[:4], y[:4], on_update=seen.append)
    assert [(i.index, i.step) for i in seen] == [(0, 17), (1, 18)]


@pytest.mark.parametrize("stop_after", [0, 2, 4])
def test_stopping_equals_a_fit_on_the_truncated_data(backend, stop_after):
    """Returning False after update u keeps the updates so far, positions the
    stream after that step, and equals fit(x[:t], flush=False), bit for bit."""
    x, y, mask, resets = _data()
    a, b = _trainer(backend), _trainer(backend)
    for tr in (a, b):  # a stream already under way
        tr.fit(x[:5], y[:5], mask=mask[:5], resets=resets[:5], flush=False)
    steps = []

    def stop(info):
        steps.append(info.step)
        return np.False_ if info.index == stop_after else True

    kw = dict(return_grads=True, return_outputs=True)
    got = a.fit(x, y, mask=mask, resets=resets, on_update=stop, **kw)
    t = steps[-1] - 5  # steps of this call that ran
    assert len(got.losses) == stop_after + 1 and got.outputs.shape == (t, B, O)
    want = b.fit(x[:t], y[:t], mask=mask[:t], resets=resets[:t], flush=False, **kw)
    _assert_same_results(got, want)
    assert_same_snapshot(snapshot(a), snapshot(b))
    # and the two go on identically (optimizer state included)
    ra = a.fit(x[t:], y[t:], mask=mask[t:], resets=resets[t:])
    rb = b.fit(x[t:], y[t:], mask=mask[t:], resets=resets[t:])
    np.testing.assert_array_equal(ra.losses, rb.losses)
    assert_same_snapshot(snapshot(a), snapshot(b))


def test_stopping_at_the_flush_update(backend):
    x, y, _, _ = _data()
    a, b = _trainer(backend), _trainer(backend)
    got = a.fit(x, y, on_update=lambda info: info.step != T)
    want = b.fit(x, y)
    np.testing.assert_array_equal(got.losses, want.losses)
    assert_same_snapshot(snapshot(a), snapshot(b))


class Stop(Exception):
    pass


def test_an_exception_propagates_and_leaves_the_trainer_consistent(backend):
    x, y, mask, resets = _data()
    a, b = _trainer(backend), _trainer(backend)

    def boom(info):
        if info.step == 9:
            raise Stop("enough")

    with pytest.raises(Stop, match="enough"):
        a.fit(x, y, mask=mask, resets=resets, on_update=boom)
    b.fit(x[:9], y[:9], mask=mask[:9], resets=resets[:9], flush=False)
    assert a.step_count == 9 and a.pending == 0
    assert_same_snapshot(snapshot(a), snapshot(b))
    ra = a.fit(x[9:], y[9:], mask=mask[9:], resets=resets[9:])
    rb = b.fit(x[9:], y[9:], mask=mask[9:], resets=resets[9:])
    np.testing.assert_array_equal(ra.losses, rb.losses)
    assert_same_snapshot(snapshot(a), snapshot(b))


def test_early_stopping_on_a_loss_threshold(backend):
    """The use it is for: stop once a block's loss is below a threshold."""
    x, y, _, _ = _data()
    tr = _trainer(backend, optimizer=tb.SGD(lr=0.0))
    full = _trainer(backend, optimizer=tb.SGD(lr=0.0)).fit(x, y)
    threshold = float(np.sort(full.losses)[2])  # the third smallest
    first = int(np.argmax(full.losses <= threshold))
    res = tr.fit(x, y, on_update=lambda info: info.loss > threshold)
    np.testing.assert_array_equal(res.losses, full.losses[: first + 1])
    assert tr.step_count == full.update_steps[first]


def test_a_non_callable_is_refused_before_anything_changes(backend):
    x, y, _, _ = _data()
    tr = _trainer(backend)
    tr.fit(x[:4], y[:4], flush=False)
    before = snapshot(tr)
    with pytest.raises(TypeError, match="on_update must be callable or None, got int"):
        tr.fit(x, y, on_update=3)
    assert_same_snapshot(snapshot(tr), before)


@pytest.mark.parametrize("replace", [False, True])
def test_optimizer_changes_in_the_callback_apply_from_the_next_update(backend, replace):
    """A change made inside on_update (a field, or another optimizer) is used
    from the next update of the same fit on (a per-update lr schedule), on
    every backend alike: the same as stopping there, changing, and going on."""
    x, y, _, _ = _data()
    a, b = _trainer(backend), _trainer(backend)

    def change(tr):
        if replace:
            tr.optimizer = tb.SGD(lr=0.05, momentum=0.9)
        else:
            tr.optimizer.lr = 0.005

    ra = a.fit(x, y, on_update=lambda info: change(a) if info.step == 3 else None)
    rb1 = b.fit(x[:3], y[:3], flush=False)
    change(b)
    rb2 = b.fit(x[3:], y[3:])
    np.testing.assert_array_equal(ra.losses, np.concatenate([rb1.losses, rb2.losses]))
    assert_same_snapshot(snapshot(a), snapshot(b))
    # and the change did act: without it the later losses differ
    c = _trainer(backend)
    rc = c.fit(x, y)
    assert not np.array_equal(ra.losses[2:], rc.losses[2:])


def test_evaluate_inside_the_callback(backend):
    """Validation-based early stopping: the model can be evaluated (and its
    state_dict read) between two updates of a fit, from its on_update."""
    if backend == "cuda":
        pytest.skip("the CUDA engine refuses calls while its own fit runs (parameters on device)")
    x, y, _, _ = _data()
    tr = _trainer(backend)
    seen = []

    def check(info):
        seen.append(tr.model.evaluate(x, y, backend=backend).loss)
        return len(seen) < 3

    tr.fit(x, y, on_update=check)
    assert len(seen) == 3 and tr.step_count == 9
    assert seen[-1] == tr.model.evaluate(x, y, backend=backend).loss
