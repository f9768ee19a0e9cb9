"""Trainer(batch_first=True): data [B, T, ...], the same run as time-first data."""

from __future__ import annotations

import numpy as np
import pytest

import tbptt_fast as tb

from conftest import make_data
from fake_cuda import FakeCuda, NumpyDeviceEngine

T, B, D, H, O = 11, 3, 2, 3, 4


def _pair(backend, loss, vocab_size=None, **kw):
    out = []
    for batch_first in (False, True):
        m = tb.Model("lstm", D, H, O, num_layers=2, dtype="float32", seed=1, vocab_size=vocab_size)
        out.append(
            tb.Trainer(
                m,
                k1=3,
                k2=5,
                loss=loss,
                optimizer=tb.SGD(lr=0.1, momentum=0.9),
                backend=backend,
                batch_first=batch_first,
                **kw,
            )
        )
    return out


def _bf(a):
    return None if a is None else np.swapaxes(a, 0, 1)


def _assert_same(tm, bf, r_tm, r_bf):
    np.testing.assert_array_equal(r_tm.losses, r_bf.losses)
    np.testing.assert_array_equal(r_tm.update_steps, r_bf.update_steps)
    np.testing.assert_array_equal(r_bf.outputs, _bf(r_tm.outputs))
    for ga, gb in zip(r_tm.grads, r_bf.grads, strict=True):
        for k in ga:
            np.testing.assert_array_equal(ga[k], gb[k], err_msg=k)
    for k, v in tm.model.state_dict().items():
        np.testing.assert_array_equal(v, bf.model.state_dict()[k], err_msg=k)
    flat = [a for e in tm.state for a in (e if isinstance(e, tuple) else (e,))]
    flat_b = [a for e in bf.state for a in (e if isinstance(e, tuple) else (e,))]
    for a, b in zip(flat, flat_b, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_batch_first_equals_the_transposed_time_first_run(backend, loss):
    x, y, mask, resets = make_data(2, T, B, D, O, loss, mask_p=0.2, reset_p=0.15)
    tm, bf = _pair(backend, loss)
    kw = dict(return_grads=True, return_outputs=True)
    r_tm = tm.fit(x, y, mask=mask, resets=resets, **kw)
    r_bf = bf.fit(_bf(x), _bf(y), mask=_bf(mask), resets=_bf(resets), **kw)
    assert r_bf.outputs.shape == (B, T, O)
    _assert_same(tm, bf, r_tm, r_bf)
    # step() is unaffected: x_t [B, D] either way; initial_state as ever
    for t in range(4):
        assert tm.step(x[t], y[t]) == bf.step(x[t], y[t])
    h0 = np.full((2, B, H), 0.5, np.float32)
    r_tm = tm.fit(x, y, initial_state=(h0, h0), **kw)
    r_bf = bf.fit(_bf(x), _bf(y), initial_state=(h0, h0), **kw)
    _assert_same(tm, bf, r_tm, r_bf)


def test_batch_first_token_model(backend):
    V = 5
    ids = np.random.default_rng(3).integers(0, V, size=(T, B))
    _, y, _, _ = make_data(3, T, B, D, O, "cross_entropy")
    tm, bf = _pair(backend, "cross_entropy", vocab_size=V)
    kw = dict(return_grads=True, return_outputs=True)
    _assert_same(tm, bf, tm.fit(ids, y, **kw), bf.fit(ids.T, y.T, **kw))
    assert tm.step(ids[0], y[0]) == bf.step(ids[0], y[0])


def test_messages_use_the_batch_first_order():
    _, bf = _pair("numpy", "mse")
    x, y, _, _ = make_data(4, T, B, D, O, "mse")
    x, y = _bf(x), _bf(y)
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, 2\], got \[3, 11, 5\]"):
        bf.fit(np.zeros((B, T, 5)), y)
    with pytest.raises(ValueError, match=r"target must have shape \[3, 11, 4\], got \[11, 3, 4\]"):
        bf.fit(x, _bf(y))
    with pytest.raises(ValueError, match=r"mask must have shape \[3, 11\], got \[11, 3\]"):
        bf.fit(x, y, mask=np.ones((T, B)))
    bad = x.copy()
    bad[1, 7, 0] = np.inf
    with pytest.raises(ValueError, match=r"x must be finite, found inf at index \[1, 7, 0\]"):
        bf.fit(bad, y)
    with pytest.raises(TypeError, match="batch_first must be a bool"):
        tb.Trainer(bf.model, k1=2, batch_first=1)
    assert bf.step_count == 0
    assert repr(bf).endswith("backend='numpy', batch_first=True)")


@pytest.mark.skipif(not tb.native_available(), reason="native module not built")
def test_batch_first_device_arrays_are_read_in_place():
    """The device path (the CUDA engine played by NumPy): batch-first CUDA
    arrays are handed over as time-major views of the same memory."""
    x, y, mask, resets = make_data(5, T, B, D, O, "mse", mask_p=0.2, reset_p=0.1)
    host, dev = _pair("cpu", "mse")
    dev.backend = "cuda"
    dev._engine = NumpyDeviceEngine(dev._engine, dev.model, dev.loss)
    kw = dict(return_grads=True, return_outputs=True)
    r_tm = host.fit(x, y, mask=mask, resets=resets, **kw)
    xb = np.ascontiguousarray(_bf(x))
    r_bf = dev.fit(
        FakeCuda(xb), FakeCuda(np.ascontiguousarray(_bf(y))), FakeCuda(_bf(mask)),
        FakeCuda(_bf(resets)), **kw,
    )  # fmt: skip
    _assert_same(host, dev, r_tm, r_bf)
    xs = dev._engine.calls[-1][0]
    assert xs[2] == (T, B, D) and xs[3] == (xb.strides[1], xb.strides[0], xb.strides[2])
    bad = xb.copy()
    bad[2, 6, 1] = np.nan
    with pytest.raises(ValueError, match=r"x must be finite, found nan at index \[2, 6, 1\]"):
        dev.fit(FakeCuda(bad), FakeCuda(np.ascontiguousarray(_bf(y))))
