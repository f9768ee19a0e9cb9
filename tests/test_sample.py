"""tb.sample: generating ids from a token model."""

from __future__ import annotations

import numpy as np
import pytest

import tbptt_fast as tb

V = 6


def _model(cell="lstm", dtype="float64", **kw):
    kw.setdefault("output_size", V)
    return tb.Model(cell, 3, 8, num_layers=2, dtype=dtype, seed=4, vocab_size=V, **kw)


def _loop(model, prime, n, temperature, seed, backend):
    """The definition, one predict call per generated id."""
    rng = np.random.default_rng(seed)
    pred = model.predict(np.asarray(prime)[:, None], backend=backend)
    out = []
    for _ in range(n):
        y = pred.outputs[-1, 0].astype(np.float64)
        if temperature == 0:
            nxt = int(np.argmax(y))
        else:
            p = np.exp(y / temperature - np.max(y / temperature))
            nxt = int(rng.choice(V, p=p / p.sum()))
        out.append(nxt)
        pred = model.predict(np.array([[nxt]]), state=pred.state, backend=backend)
    return np.array(out, np.int64)


def _trained(cell):
    """A model that has learnt to continue the cycle 0, 1, ..., V-1, 0, ..."""
    model = _model(cell)
    stream = (np.arange(201)[:, None] + np.arange(4)[None]) % V
    backend = "cpu" if tb.native_available() else "numpy"
    tr = tb.Trainer(model, k1=8, loss="cross_entropy", optimizer=tb.Adam(lr=0.05), backend=backend)
    tr.fit(stream[:-1], stream[1:])
    return model


@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("cell", ["gru", "cifg"])
def test_sample_equals_an_explicit_loop(backend, cell, temperature):
    model = _trained(cell)
    got = tb.sample(model, [1, 2, 3], 12, temperature=temperature, seed=5, backend=backend)
    assert got.dtype == np.int64 and got.shape == (12,)
    np.testing.assert_array_equal(got, _loop(model, [1, 2, 3], 12, temperature, 5, backend))
    if temperature == 0:
        np.testing.assert_array_equal(got, np.arange(4, 16) % V)  # greedy continues the cycle


def test_sample_is_deterministic_for_a_seed(backend):
    model = _model(dtype="float32")
    a = tb.sample(model, np.array([0, 3]), 30, seed=7, backend=backend)
    b = tb.sample(model, np.array([0, 3]), 30, seed=7, backend=backend)
    c = tb.sample(model, np.array([0, 3]), 30, seed=8, backend=backend)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= 0 and a.max() < V
    assert tb.sample(model, [1], 0, backend=backend).shape == (0,)


def test_sample_changes_nothing(backend):
    model = _model()
    tr = tb.Trainer(model, k1=3, loss="cross_entropy", backend=backend)
    ids = np.random.default_rng(0).integers(0, V, size=(5, 2))
    tr.fit(ids, ids, flush=False)
    before = (model.state_dict(), tr.step_count, tr.pending, [a.copy() for a in tr.state[0]])
    tb.sample(model, [1, 2], 5, backend=backend)
    after = (model.state_dict(), tr.step_count, tr.pending, tr.state[0])
    for k in before[0]:
        np.testing.assert_array_equal(before[0][k], after[0][k])
    assert before[1:3] == after[1:3]
    for a, b in zip(before[3], after[3], strict=True):
        np.testing.assert_array_equal(a, b)


BAD = [
    ("not-a-model", dict(model="lstm"), TypeError, "model must be a tbptt_fast.Model"),
    ("no-vocab", dict(model=tb.Model("lstm", 3, 4, V)), ValueError, "needs a token model"),
    ("output>vocab", dict(model=_model(output_size=V + 1)), ValueError, "output_size must be <= vocab_size"),
    ("prime-2d", dict(prime_ids=np.zeros((2, 1), int)), ValueError, r"prime_ids must have shape \[T\]"),
    ("prime-float", dict(prime_ids=[1.0, 2.0]), TypeError, "prime_ids must be an integer array"),
    ("prime-range", dict(prime_ids=[1, V]), ValueError, r"prime_ids must hold token ids in \[0, 6\)"),
    ("prime-empty", dict(prime_ids=np.zeros(0, int)), ValueError, "prime_ids must not be empty"),
    ("n-negative", dict(n=-1), ValueError, "n must be >= 0"),
    ("n-float", dict(n=2.0), TypeError, "n must be an int"),
    ("temperature", dict(temperature=-0.1), ValueError, "temperature must be a finite number >= 0"),
    ("temperature-nan", dict(temperature=float("nan")), ValueError, "temperature"),
    ("temperature-str", dict(temperature="hot"), TypeError, "temperature must be a number"),
    ("seed", dict(seed=-3), ValueError, "seed must be >= 0"),
    ("backend", dict(backend="gpu"), ValueError, "backend must be one of"),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_arguments_are_refused(case):
    _, kw, exc, msg = case
    args = dict(model=_model(), prime_ids=[1, 2], n=3, backend="numpy")
    args.update(kw)
    with pytest.raises(exc, match=msg):
        tb.sample(**args)
