"""Token inputs (contract: token inputs): Model(..., vocab_size=V), the embedding and its gradient."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import tbptt_fast as tb

from conftest import CPU, TOL, assert_close, make_data
from independent import block_loss, fd_gradient, has_cell_state, record, window_w

V, D, O = 7, 2, 3


def _ids(seed, T, B, vocab=V):
    return np.random.default_rng(seed).integers(0, vocab, size=(T, B))


def test_embedding_comes_first_and_is_the_first_draw():
    m = tb.Model("lstm", D, 4, O, num_layers=2, dtype="float64", seed=11, vocab_size=V)
    names = list(m.state_dict())
    assert names[0] == "embedding.weight" and names[1] == "weight_ih_l0"
    assert m.shapes()["embedding.weight"] == (V, D)
    rng = np.random.default_rng(11)
    np.testing.assert_array_equal(m.state_dict()["embedding.weight"], rng.standard_normal((V, D)))
    bound = 1 / np.sqrt(4)
    np.testing.assert_array_equal(
        m.state_dict()["weight_ih_l0"], rng.uniform(-bound, bound, (16, D))
    )
    assert "vocab_size=7" in repr(m)
    plain = tb.Model("lstm", D, 4, O, seed=11)
    assert "embedding.weight" not in plain.state_dict() and plain.vocab_size is None
    with pytest.raises(ValueError, match="vocab_size must be >= 1"):
        tb.Model("lstm", D, 4, O, vocab_size=0)
    with pytest.raises(TypeError, match="vocab_size must be an int"):
        tb.Model("lstm", D, 4, O, vocab_size=2.0)


# -- the reference's embedding gradient against finite differences ----------------------------
# id, cell, layers, k1, k2, T, B, H, loss, overlap, mask_p, reset_p, init
CASES = [
    ("lstm-k1<k2-stored-mask-resets", "lstm", 2, 2, 5, 9, 2, 3, "mse", "stored", 0.2, 0.2, False),
    ("lstm-k1<k2-recompute-ce", "lstm", 1, 2, 5, 9, 2, 2, "cross_entropy", "recompute", 0.2, 0.2, True),
    ("gru-k1=k2", "gru", 1, 3, 3, 8, 3, 2, "mse", "stored", 0.0, 0.1, False),
    ("tanh-k1>k2-ce", "rnn_tanh", 2, 4, 2, 9, 2, 2, "cross_entropy", "stored", 0.3, 0.0, False),
    ("cifg-k1<k2-recompute-init", "cifg", 1, 3, 7, 10, 2, 2, "mse", "recompute", 0.0, 0.15, True),
    ("relu-k1>k2-recompute", "rnn_relu", 1, 5, 2, 11, 2, 3, "mse", "recompute", 0.1, 0.1, False),
    ("gru-unbounded-stored", "gru", 2, 3, None, 8, 2, 2, "mse", "stored", 0.0, 0.1, False),
]  # fmt: skip


def _record(backend, case):
    _, cell, L, k1, k2, T, B, H, loss, overlap, mask_p, reset_p, use_init = case
    seed = CASES.index(case)
    _, target, mask, resets = make_data(seed, T, B, D, O, loss, mask_p, reset_p)
    ids = _ids(seed + 50, T, B, vocab=4)  # few ids: rows are used repeatedly
    model = tb.Model(cell, D, H, O, num_layers=L, dtype="float64", seed=3, vocab_size=5)
    trainer = tb.Trainer(
        model,
        k1=k1,
        k2=k2,
        loss=loss,
        optimizer=tb.SGD(lr=0.05, momentum=0.5),
        overlap=overlap,
        backend=backend,
    )
    init = None
    if use_init:
        rng = np.random.default_rng(7)
        init = [
            (rng.normal(size=(B, H)), rng.normal(size=(B, H)))
            if has_cell_state(cell)
            else rng.normal(size=(B, H))
            for _ in range(L)
        ]
    return record(trainer, ids, target, mask, resets, init=init), (k1, k2, loss, overlap)


@pytest.mark.parametrize("backend", ["numpy", CPU])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_embedding_gradient_matches_finite_differences(backend, case):
    """Every update's gradient, embedding.weight included (rows never looked up
    too: their gradient is zero), against central differences of Loss_P."""
    rec, (k1, k2, loss, overlap) = _record(backend, case)
    assert rec.updates
    for t, t_prev, reported, grads, theta in rec.updates:
        w = window_w(t, t_prev, k1, k2)
        rule = "exact" if overlap == "recompute" or (k2 is not None and k2 <= k1) else "stored"
        fwd = block_loss(rec, theta, theta, t, t_prev, w, loss, "stored")
        assert abs(reported - fwd) <= 1e-10 * max(1, abs(fwd))
        fn = functools.partial(
            block_loss, rec=rec, theta_now=theta, t=t, t_prev=t_prev, w=w, loss=loss, rule=rule
        )
        fd = fd_gradient(lambda th, fn=fn: fn(theta=th), theta)
        for name, (idx, expected) in fd.items():
            got = grads[name].ravel()[idx]
            err = np.max(np.abs(got - expected))
            assert err <= 1e-6 * max(1.0, float(np.max(np.abs(expected)))), (
                f"update at {t} (w={w}, {rule}): {name} error {err:.3e}\n{got}\n{expected}"
            )
        assert not np.any(grads["embedding.weight"][4]), "row 4 is never looked up"


# -- cpu against the reference ------------------------------------------------------------------
@pytest.mark.parametrize("overlap", ["stored", "recompute"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("cell", tb.CELLS)
def test_native_equals_reference(native_backend, cell, dtype, overlap):
    T, B = 17, 3
    _, target, mask, resets = make_data(2, T, B, D, V, "cross_entropy", mask_p=0.2, reset_p=0.1)
    ids = _ids(3, T, B)
    out = {}
    for backend in ("numpy", native_backend):
        m = tb.Model(cell, D, 4, V, num_layers=2, dtype=dtype, seed=5, vocab_size=V)
        tr = tb.Trainer(
            m,
            k1=3,
            k2=7,
            loss="cross_entropy",
            optimizer=tb.Adam(lr=0.02),
            clip_grad_norm=1.0,
            overlap=overlap,
            backend=backend,
        )
        res = tr.fit(ids, target, mask=mask, resets=resets, return_grads=True, return_outputs=True)
        out[backend] = (res, m.state_dict(), tr.state)
    (ra, pa, sa), (rb, pb, sb) = out["numpy"], out[native_backend]
    tol = TOL[dtype]
    assert_close(rb.losses, ra.losses, tol, "losses")
    assert_close(rb.outputs, ra.outputs, tol, "outputs")
    for u, (ga, gb) in enumerate(zip(ra.grads, rb.grads, strict=True)):
        for k in ga:
            assert_close(gb[k], ga[k], tol, f"update {u} grad {k}")
    for k in pa:
        assert_close(pb[k], pa[k], tol, f"param {k}")
    flat = [a for e in sa for a in (e if isinstance(e, tuple) else (e,))]
    flat_b = [a for e in sb for a in (e if isinstance(e, tuple) else (e,))]
    for a, b in zip(flat_b, flat, strict=True):
        assert_close(a, b, tol, "state")


@pytest.mark.skipif(not tb.native_available(), reason="native module not built")
@pytest.mark.parametrize("overlap", ["stored", "recompute"])
def test_cpu_is_deterministic_across_thread_counts(overlap):
    T, B = 40, 16
    _, target, _, resets = make_data(4, T, B, D, V, "cross_entropy", reset_p=0.05)
    ids = _ids(5, T, B)
    threads = tb.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            tb.set_num_threads(n)
            m = tb.Model("lstm", 8, 64, V, dtype="float32", seed=6, vocab_size=V)
            tr = tb.Trainer(m, k1=4, k2=9, loss="cross_entropy", overlap=overlap, backend="cpu")
            res = tr.fit(ids, target, resets=resets, return_grads=True)
            results.append((res, m.state_dict()))
    finally:
        tb.set_num_threads(threads)
    (r1, p1), (r2, p2) = results
    np.testing.assert_array_equal(r1.losses, r2.losses)
    for g1, g2 in zip(r1.grads, r2.grads, strict=True):
        np.testing.assert_array_equal(g1["embedding.weight"], g2["embedding.weight"])
    for k in p1:
        np.testing.assert_array_equal(p1[k], p2[k], err_msg=k)


def test_streaming_equals_fit(backend):
    T, B = 10, 2
    _, target, mask, _ = make_data(6, T, B, D, O, "mse", mask_p=0.2)
    ids = _ids(7, T, B)

    def trainer():
        m = tb.Model("gru", D, 3, O, dtype="float64", seed=8, vocab_size=V)
        return tb.Trainer(m, k1=3, k2=4, optimizer=tb.SGD(lr=0.1, momentum=0.9), backend=backend)

    a, b = trainer(), trainer()
    res = a.fit(ids, target, mask=mask)
    losses = [b.step(ids[t], target[t], mask_t=mask[t]) for t in range(T)]
    losses = [v for v in losses if v is not None] + [b.flush()]
    assert_close(losses, res.losses, 1e-12, "losses")
    for k, v in a.model.state_dict().items():
        assert_close(b.model.state_dict()[k], v, 1e-12, k)


def test_ids_are_validated(backend):
    m = tb.Model("lstm", D, 3, O, dtype="float64", vocab_size=V)
    tr = tb.Trainer(m, k1=2, backend=backend)
    _, y, _, _ = make_data(8, 4, 2, D, O, "mse")
    ids = _ids(9, 4, 2)
    with pytest.raises(TypeError, match=r"x must be an integer array of token ids in \[0, 7\)"):
        tr.fit(ids.astype(np.float64), y)
    with pytest.raises(TypeError, match="x must be an integer array"):
        tr.fit(ids > 3, y)
    bad = ids.copy()
    bad[2, 1] = V
    with pytest.raises(
        ValueError, match=r"x must hold token ids in \[0, 7\), got 7 at index \[2, 1\]"
    ):
        tr.fit(bad, y)
    bad[2, 1] = -1
    with pytest.raises(ValueError, match="x must hold token ids"):
        tr.fit(bad, y)
    with pytest.raises(ValueError, match=r"x must have shape \[T, B\], got \[4, 2, 1\]"):
        tr.fit(ids[..., None], y)
    with pytest.raises(ValueError, match=r"x_t must hold token ids .* at index \[0\]"):
        tr.step(np.array([V, 0]), y[0])
    with pytest.raises(TypeError, match="x_t must be an integer array"):
        tr.step(np.zeros((2, D)), y[0])
    assert tr.step_count == 0 and tr.state is None
    with pytest.raises(ValueError, match=r"x must hold token ids .* at index \[2, 1\]"):
        m.predict(bad, backend=backend)
    with pytest.raises(TypeError, match="x must be an integer array"):
        m.evaluate(ids.astype(np.float32), y, backend=backend)
