"""Fuzzing every public entry point of the numpy and cpu backends (issue 15).

Model(...), Model.load_state_dict, Trainer(...), fit (data, mask, resets,
initial_state and the flags), step, reset_state(initial_state), Model.predict,
Model.evaluate, tb.sample, SGD/Adam construction and field assignment,
Trainer.save/load and Model.save/load with bad paths, set_num_threads.
Inputs: random shapes (wrong rank, wrong or zero dims), layouts (Fortran,
negative strides, strided slices, read-only, broadcast views, nested lists),
dtypes (ints, bool, float16/32/64, complex, object), NaN/Inf and 1e39 into
float32, huge sizes, and state forms (per-layer list, PyTorch [L, B, H],
wrong batch or rank, tuple vs array, missing layers).

Each call either succeeds with results equal to the numpy reference (on a
contiguous copy of the same data, within the tolerances of conftest.TOL) or
raises ValueError/TypeError/MemoryError whose message names the argument, with
the trainer bitwise unchanged: checked against an untouched twin (parameters,
state, the engine's step count and pending block, and the losses of the next
fit on fixed data). Cases that could crash the native engine run in a
subprocess, so a segfault fails the test instead of killing the run.

Deterministic (``derandomize=True``); ``TBPTT_FUZZ_EXAMPLES=N`` runs N examples
per test instead of 40 (a longer hunt); ``--hypothesis-show-statistics`` shows
how many calls were refused, and with which message, or accepted. Known bugs
are strict xfails, each naming the bug, so that a fix turns them into failures
to remove.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

# hypothesis imports libcst lazily to report a failure; under the suite's
# filterwarnings=error its DeprecationWarning (mypy_extensions.TypedDict) turns
# every failing example into an INTERNALERROR. Import it once, quietly, here.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import libcst.metadata.type_inference_provider  # noqa: F401
    except ImportError:
        pass
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

import tbptt_fast as tb

from conftest import TOL, assert_close, assert_same_snapshot, snapshot

BACKENDS = ["numpy"] + (["cpu"] if tb.native_available() else [])
ERRORS = (ValueError, TypeError, MemoryError)
FUZZ = settings(
    max_examples=int(os.environ.get("TBPTT_FUZZ_EXAMPLES", "40")),
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
D, O = 3, 2

backends = st.sampled_from(BACKENDS)
cells = st.sampled_from(sorted(tb.CELLS))
mdtypes = st.sampled_from(["float32", "float64"])


# ----------------------------------------------------------------- helpers
def _model(cell, dtype, layers=1, H=4, vocab=None):
    return tb.Model(cell, D, H, O, num_layers=layers, dtype=dtype, seed=3, vocab_size=vocab)


def _trainer(cell, dtype, backend, loss="mse", layers=1, **kw):
    kw.setdefault("optimizer", tb.Adam(lr=0.01))
    return tb.Trainer(_model(cell, dtype, layers), k1=3, k2=5, loss=loss, backend=backend, **kw)


def _fixed(T=5, B=2, loss="mse", seed=11):
    r = np.random.default_rng(seed)
    x = r.standard_normal((T, B, D))
    y = r.standard_normal((T, B, O)) if loss == "mse" else r.integers(0, O, (T, B))
    return x, y


def _names(err, *names):
    if currently_in_test_context():  # statistics: --hypothesis-show-statistics
        event(f"refused: {type(err).__name__}: {str(err)[:60]}")
    msg = str(err)
    assert any(re.search(rf"(?<![A-Za-z_]){re.escape(n)}(?![A-Za-z_])", msg) for n in names), (
        f"{type(err).__name__} message does not name {names}: {msg!r}"
    )
    for cxx in ("std::", "vector::", "Unable to cast", "incompatible function arguments"):
        assert cxx not in msg, f"C++/pybind text leaks into the message: {msg!r}"


def _assert_unchanged(trainer, twin, loss="mse"):
    """trainer bitwise equal to the untouched twin, and it trains on identically."""
    assert_same_snapshot(snapshot(trainer), snapshot(twin))
    assert trainer._engine.step_count == twin._engine.step_count
    assert trainer._engine.pending == twin._engine.pending
    x, y = _fixed(loss=loss)
    a, b = trainer.fit(x, y), twin.fit(x, y)
    np.testing.assert_array_equal(a.losses, b.losses)
    assert_same_snapshot(snapshot(trainer), snapshot(twin))


def _warm(*trainers, loss="mse"):
    """bring trainers into a mid-stream state (pending steps, stored history)."""
    x, y = _fixed(T=4, loss=loss, seed=5)
    for t in trainers:
        t.fit(x, y, flush=False)


# ------------------------------------------------------- array strategies
@st.composite
def layouts(draw, arr):
    """the same values in an odd memory layout (or the contiguous array itself)."""
    kind = draw(st.sampled_from(["c", "fortran", "negative", "sliced", "readonly", "0d-broadcast"]))
    if kind == "fortran":
        return np.asfortranarray(arr)
    if kind == "negative" and arr.ndim:
        big = np.ascontiguousarray(arr[::-1])
        return big[::-1]
    if kind == "sliced" and arr.ndim:
        big = np.repeat(arr, 2, axis=-1)
        return big[..., ::2]
    if kind == "readonly":
        a = arr.copy()
        a.flags.writeable = False
        return a
    if kind == "0d-broadcast" and arr.ndim and arr.size and np.all(arr == arr.flat[0]):
        return np.broadcast_to(arr.flat[0], arr.shape)
    return arr


def _poison(arr, what, idx):
    a = np.array(arr, dtype=np.float64)
    if a.size:
        a.flat[idx % a.size] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "big": 1e39}[what]
    return a


@st.composite
def data_arrays(draw, shape, kind):
    """(array, valid-by-construction?) of a random dtype, maybe poisoned or misshapen."""
    r = np.random.default_rng(draw(st.integers(0, 2**16)))
    shape = list(shape)
    bad_shape = draw(st.sampled_from([None] * 16 + ["rank", "dim", "zero"]))
    if bad_shape == "rank":
        shape = shape[:-1] if len(shape) > 1 else [*shape, 1]
    elif bad_shape == "dim":
        i = draw(st.integers(0, len(shape) - 1))
        shape[i] += draw(st.sampled_from([1, 2, 5]))
    elif bad_shape == "zero":
        shape[draw(st.integers(0, len(shape) - 1))] = 0
    good = draw(st.integers(0, 4)) != 0  # mostly valid dtypes, so that calls also succeed
    if kind == "float":
        dt = (
            "float64"
            if good
            else draw(
                st.sampled_from(
                    [
                        "float64",
                        "float32",
                        "float16",
                        "int32",
                        "int64",
                        "bool",
                        "complex128",
                        "object",
                    ]
                )
            )
        )
        base = r.standard_normal(shape)
    elif kind == "class":
        dt = (
            "int64"
            if good
            else draw(
                st.sampled_from(["int64", "int32", "uint8", "int8", "float64", "bool", "object"])
            )
        )
        base = r.integers(0, O, shape)
        if not good and draw(st.booleans()) and base.size:
            base.flat[0] = draw(st.sampled_from([-1, O, 2**40]))
    else:  # flags (mask/resets)
        dt = (
            "bool"
            if good
            else draw(st.sampled_from(["bool", "uint8", "int64", "float32", "float64", "object"]))
        )
        base = r.random(shape) < 0.6
    poison = None
    if kind != "class" and dt.startswith("float") and draw(st.integers(0, 7)) == 0:
        poison = draw(st.sampled_from(["nan", "inf", "-inf", "big"]))
        base = _poison(base, poison, draw(st.integers(0, 100)))
    with np.errstate(all="ignore"):
        arr = base.astype(dt)
    arr = draw(layouts(arr))
    if draw(st.integers(0, 15)) == 0:
        arr = arr.tolist()  # nested lists
    return arr, (bad_shape, dt, poison)


def _legit_big(info, dtype):
    """no poison, or 1e39 kept in a float64 array for a float64 model (a finite value)."""
    return info[2] is None or (info[2] == "big" and info[1] == "float64" and dtype == "float64")


def _masked_out(target, mask):
    """every non-finite (or overflowing) target sits at a masked (step, element): never read."""
    if mask is None:
        return False
    with np.errstate(all="ignore"):
        bad = ~np.isfinite(np.asarray(target, dtype=np.float64).astype(np.float32))
    bad = bad.reshape((*bad.shape[:2], -1)).any(axis=-1)
    return not np.any(bad & (np.asarray(mask, dtype=np.float64) != 0))


def _reference_fit(cell, dtype, loss, x, y, mask, resets, warm):
    ref = _trainer(cell, dtype, "numpy", loss)
    if warm:
        _warm(ref, loss=loss)
    cast = lambda a: None if a is None else np.ascontiguousarray(np.asarray(a))  # noqa: E731
    return ref, ref.fit(cast(x), cast(y), cast(mask), cast(resets))


# --------------------------------------------------------------- fit/step
@FUZZ
@given(data=st.data(), backend=backends, cell=cells, dtype=mdtypes)
def test_fit_fuzz(data, backend, cell, dtype):
    loss = data.draw(st.sampled_from(["mse", "cross_entropy"]))
    T, B = data.draw(st.integers(1, 7)), data.draw(st.integers(1, 3))
    x, xi = data.draw(data_arrays((T, B, D), "float"))
    y, yi = data.draw(
        data_arrays((T, B, O) if loss == "mse" else (T, B), "float" if loss == "mse" else "class")
    )
    mask = resets = None
    if data.draw(st.booleans()):
        mask, _ = data.draw(data_arrays((T, B), "flags"))
    if data.draw(st.booleans()):
        resets, _ = data.draw(data_arrays((T, B), "flags"))
    warm = B == 2 and data.draw(st.booleans())  # _warm streams a batch of 2
    trainer, twin = _trainer(cell, dtype, backend, loss), _trainer(cell, dtype, backend, loss)
    if warm:
        _warm(trainer, twin, loss=loss)
    try:
        res = trainer.fit(x, y, mask, resets)
    except ERRORS as e:
        _names(e, "x", "target", "mask", "resets")
        _assert_unchanged(trainer, twin, loss)
        return
    except tb.NonFiniteError:
        if dtype == "float32" and "big" in (xi[2], yi[2]):
            pytest.fail(f"1e39 into {dtype} raised NonFiniteError mid-fit instead of ValueError")
        if not (_legit_big(xi, dtype) and _legit_big(yi, dtype)):
            raise
        event("NonFiniteError on 1e39 in a float64 model")  # an honest overflow in training
        return
    event("accepted")  # must equal the numpy reference on a contiguous copy
    assert xi[1] not in ("complex128",) and yi[1] != "complex128", (
        f"complex data accepted: {xi} {yi}"
    )
    assert _legit_big(xi, dtype) and (_legit_big(yi, dtype) or _masked_out(y, mask)), (
        f"non-finite/overflowing data accepted: {xi} {yi}"
    )
    ref, rres = _reference_fit(cell, dtype, loss, x, y, mask, resets, warm)
    assert_close(res.losses, rres.losses, TOL[dtype], "losses")
    assert list(res.update_steps) == list(rres.update_steps)
    for k, v in ref.model.state_dict().items():
        assert_close(trainer.model.state_dict()[k], v, TOL[dtype], k)
    assert trainer.step_count == ref.step_count and trainer.pending == ref.pending


@FUZZ
@given(data=st.data(), backend=backends, cell=cells, dtype=mdtypes)
def test_step_fuzz(data, backend, cell, dtype):
    B = 2
    x, xi = data.draw(data_arrays((B, D), "float"))
    y, yi = data.draw(data_arrays((B, O), "float"))
    mask = data.draw(
        st.sampled_from(
            [None, None, None, True, 1, np.ones(B, bool), np.ones(3, bool), "yes", np.ones((B, 1))]
        )
    )
    reset = data.draw(
        st.sampled_from([None, None, None, False, np.zeros(B, bool), [0, 1], np.zeros(5), 2.5])
    )
    trainer, twin = _trainer(cell, dtype, backend), _trainer(cell, dtype, backend)
    _warm(trainer, twin)
    try:
        out = trainer.step(x, y, mask, reset)
    except ERRORS as e:
        _names(e, "x_t", "target_t", "mask_t", "reset_t")
        _assert_unchanged(trainer, twin)
        return
    assert _legit_big(xi, dtype) and _legit_big(yi, dtype), (
        f"non-finite data accepted by step: {xi} {yi}"
    )
    assert "complex128" not in (xi[1], yi[1]), f"complex data accepted by step: {xi} {yi}"
    ref = _trainer(cell, dtype, "numpy")
    _warm(ref)
    c = lambda a: a if a is None or np.isscalar(a) else np.ascontiguousarray(np.asarray(a))  # noqa: E731
    rout = ref.step(c(x), c(y), c(mask), c(reset))
    assert (out is None) == (rout is None)
    if out is not None:
        assert_close(out, rout, TOL[dtype], "step loss")
    assert trainer.pending == ref.pending
    for k, v in ref.model.state_dict().items():
        assert_close(trainer.model.state_dict()[k], v, TOL[dtype], k)


# ----------------------------------------------------------- state forms
@st.composite
def state_forms(draw, cell, layers, B, H, dtype):
    lstm = cell in ("lstm", "cifg")
    r = np.random.default_rng(draw(st.integers(0, 999)))
    kind = draw(
        st.sampled_from(
            [
                "list",
                "torch",
                "wrong_batch",
                "wrong_rank",
                "tuple_vs_array",
                "too_few",
                "nan",
                "big",
                "int",
                "object",
                "layout",
                "none_entry",
            ]
        )
    )
    h = [r.standard_normal((B, H)).astype(dtype) for _ in range(layers)]
    c = [r.standard_normal((B, H)).astype(dtype) for _ in range(layers)]

    def form(hs, cs):
        return [(a, b) for a, b in zip(hs, cs, strict=True)] if lstm else list(hs)

    valid = form(h, c)
    if kind == "list":
        return valid, True
    if kind == "torch":
        ht = np.stack(h)
        return ((ht, np.stack(c)) if lstm else ht), True
    if kind == "layout":
        return form([draw(layouts(a)) for a in h], [draw(layouts(a)) for a in c]), True
    if kind == "wrong_batch":
        return form([a[:1] if B > 1 else np.concatenate([a, a]) for a in h], c), False
    if kind == "wrong_rank":
        return form([a[None] for a in h], c), False
    if kind == "tuple_vs_array":
        return (form(h, [None] * layers) if lstm else [(a, a) for a in h]), False
    if kind == "too_few":
        return valid[:-1], False
    if kind in ("nan", "big"):
        hh = [a.astype(np.float64) for a in h]
        hh[-1][0, 0] = np.nan if kind == "nan" else 1e39
        return form(hh, c), kind == "big" and dtype == "float64"
    if kind == "int":
        return form([np.ones((B, H), int) for _ in h], c), None  # either is fine
    if kind == "object":
        return form([a.astype(object) for a in h], c), None
    return form([None] * layers, c), False


def kind_of(s, B):
    """ "other_batch" when every array of the state form has a leading batch != B."""
    flat = []
    for e in s if isinstance(s, list) else [s]:
        flat += list(e) if isinstance(e, tuple) else [e]
    arrays = [a for a in flat if isinstance(a, np.ndarray) and a.ndim == 2]
    if arrays and len(arrays) == len(flat) and all(a.shape[0] != B for a in arrays):
        return "other_batch"
    return None


@FUZZ
@given(data=st.data(), backend=backends, cell=cells, dtype=mdtypes)
def test_reset_state_and_initial_state_fuzz(data, backend, cell, dtype):
    layers = data.draw(st.integers(1, 2))
    B, H = 2, 4
    s, ok = data.draw(state_forms(cell, layers, B, H, dtype))
    use_fit = data.draw(st.booleans())
    trainer = _trainer(cell, dtype, backend, layers=layers)
    twin = _trainer(cell, dtype, backend, layers=layers)
    _warm(trainer, twin)
    x, y = _fixed(T=4, B=B)
    try:
        if use_fit:
            res = trainer.fit(x, y, initial_state=s)
        else:
            trainer.reset_state(s)
    except ERRORS as e:
        assert ok is not True, f"a valid state form was refused: {e!r}"
        _names(e, "initial_state", "state")
        _assert_unchanged(trainer, twin)
        return
    if kind_of(s, B) == "other_batch" and not use_fit:
        ok = None  # reset_state may start a stream of another batch size (by design)
    assert ok is not False, "an invalid state form was accepted"
    ref = _trainer(cell, dtype, "numpy", layers=layers)
    _warm(ref)
    if use_fit:
        rres = ref.fit(x, y, initial_state=s)
        assert_close(res.losses, rres.losses, TOL[dtype], "losses")
    else:
        ref.reset_state(s)
    for a, b in zip(snapshot(trainer)[1], snapshot(ref)[1], strict=True):
        assert_close(a, b, TOL[dtype], "state")


# ------------------------------------------------------ predict / evaluate
@FUZZ
@given(data=st.data(), backend=backends, cell=cells, dtype=mdtypes)
def test_predict_evaluate_fuzz(data, backend, cell, dtype):
    T, B = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 3))
    x, xi = data.draw(data_arrays((T, B, D), "float"))
    y, yi = data.draw(data_arrays((T, B, O), "float"))
    state = None
    if data.draw(st.booleans()):
        state, _ = data.draw(state_forms(cell, 1, B, 4, dtype))
    model = _model(cell, dtype)
    tb_backend = BACKENDS[-1]  # a trainer on the model must not be disturbed
    trainer = tb.Trainer(model, k1=3, backend=tb_backend)
    twin = tb.Trainer(_model(cell, dtype), k1=3, backend=tb_backend)
    _warm(trainer, twin)
    ev = data.draw(st.booleans())
    try:
        out = (
            model.evaluate(x, y, state=state, backend=backend)
            if ev
            else model.predict(x, state=state, backend=backend)
        )
    except ERRORS as e:
        _names(e, "x", "target", "state", "initial_state")
        _assert_unchanged(trainer, twin)
        return
    assert _legit_big(xi, dtype) and (not ev or _legit_big(yi, dtype)), (
        f"non-finite data accepted: {xi} {yi}"
    )
    assert "complex128" not in (xi[1], yi[1] if ev else None), "complex data accepted"
    c = lambda a: np.ascontiguousarray(np.asarray(a))  # noqa: E731
    if ev:
        r = model.evaluate(c(x), c(y), state=state, backend="numpy")
        assert_close(out.loss, r.loss, TOL[dtype], "evaluate loss")
    else:
        r = model.predict(c(x), state=state, backend="numpy")
        assert_close(out.outputs, r.outputs, TOL[dtype], "outputs")
    _assert_unchanged(trainer, twin)


# ------------------------------------------------------------------ sample
@FUZZ
@given(
    backend=backends,
    prime=st.sampled_from(
        [
            [1, 2],
            [],
            [0],
            [5],
            [-1],
            np.array([1.5]),
            np.array([[1, 2]]),
            "ab",
            np.array([1, 2], np.uint8)[::-1],
        ]
    ),
    n=st.sampled_from([0, 1, 3, -1, 2.5, True, None, "3", np.int64(2)]),
    temperature=st.sampled_from([0, 0.5, 1.0, -1.0, float("nan"), float("inf"), "hot", None]),
    seed=st.sampled_from([0, 7, -1, 2**70, 1.5, None]),
)
def test_sample_fuzz(backend, prime, n, temperature, seed):
    model = tb.Model("gru", 3, 4, 5, vocab_size=5, seed=1)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    try:
        ids = tb.sample(model, prime, n, temperature=temperature, seed=seed, backend=backend)
    except ERRORS as e:
        _names(e, "prime_ids", "n", "temperature", "seed")
    else:
        ref = tb.sample(
            model, np.asarray(prime), n, temperature=temperature, seed=seed, backend="numpy"
        )
        np.testing.assert_array_equal(ids, ref)
        assert len(ids) == n
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("n", "error"), [(10**12, MemoryError), (2**63, ValueError)])
def test_sample_huge_n_names_n(backend, n, error):
    # was numpy's 'Unable to allocate 7.28 TiB ...' / 'Maximum allowed dimension
    # exceeded', naming neither n nor the bytes
    model = tb.Model("gru", 3, 4, 5, vocab_size=5, seed=1)
    before = model.state_dict()
    with pytest.raises(error, match=r"bytes") as ei:
        tb.sample(model, [1, 2], n, temperature=0, backend=backend)
    _names(ei.value, "n")
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


# --------------------------------------------------------- constructors
@pytest.mark.parametrize("value", [np.float32(2.0), np.float64(7.5)])
def test_model_dtype_number_is_refused(value):
    with pytest.raises(ERRORS) as ei:
        tb.Model("gru", 3, 4, 2, dtype=value)
    _names(ei.value, "dtype")


WEIRD = [0, -1, 1.5, 2.0, True, None, "3", 10**30, 2**63, float("nan"), np.int64(2), np.float32(2)]


@FUZZ
@given(
    field=st.sampled_from(
        ["input_size", "hidden_size", "output_size", "num_layers", "vocab_size", "dtype", "cell"]
    ),  # seed: test_model_seed_names_seed
    value=st.sampled_from([*WEIRD, "float16", "complex64", "float", np.float32, "rnn", "LSTM"]),
)
def test_model_constructor_fuzz(field, value):
    if isinstance(value, int) and not isinstance(value, bool) and value > 2**20 and field != "seed":
        return  # huge sizes: test_huge_sizes_in_subprocess
    kw = dict(
        cell="lstm",
        input_size=3,
        hidden_size=4,
        output_size=2,
        num_layers=1,
        dtype="float32",
        seed=0,
    )
    kw[field] = value
    try:
        m = tb.Model(**kw)
    except ERRORS as e:
        _names(e, field)
        return
    if field == "dtype":
        assert str(m.dtype) in ("float32", "float64"), f"dtype={value!r} gave {m.dtype}"
        assert not isinstance(value, np.generic), f"a numpy number dtype={value!r} accepted"
        assert value is not None, "Model(dtype=None) silently accepted"
    if (
        field in ("input_size", "hidden_size", "output_size", "num_layers", "vocab_size")
        and value is not None
    ):
        assert not isinstance(value, (bool, float, str)), f"{field}={value!r} accepted"
        assert int(value) >= 1


@pytest.mark.parametrize("seed", [-1, 1.5, "3", float("nan"), object()])
def test_model_seed_names_seed(seed):
    with pytest.raises(ERRORS) as ei:
        tb.Model("gru", 3, 4, 2, seed=seed)
    _names(ei.value, "seed")


def test_model_unhashable_cell_names_cell():
    with pytest.raises(ERRORS) as ei:
        tb.Model(tb.SGD(), 3, 4, 2)
    _names(ei.value, "cell")


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_grad_norm_huge_int_is_a_number(backend):
    """10**30 is a positive finite number (a float): accepted as 1e30, as torch would."""
    t = tb.Trainer(_model("gru", "float32"), k1=3, clip_grad_norm=10**30, backend=backend)
    assert t.clip_grad_norm == 1e30


@FUZZ
@given(
    data=st.data(),
    backend=backends,
    field=st.sampled_from(
        ["k1", "k2", "loss", "optimizer", "clip_grad_norm", "overlap", "backend", "batch_first"]
    ),
)
def test_trainer_constructor_fuzz(data, backend, field):
    value = data.draw(
        st.sampled_from(
            [*WEIRD, "mse", "cross_entropy", "stored", "recompute", "gpu", tb.SGD(), object()]
        )
    )
    if field in ("k1", "k2") and isinstance(value, int) and value > 2**20:
        return  # huge sizes: test_huge_sizes_in_subprocess
    model = _model("gru", "float32")
    before = {k: v.copy() for k, v in model.state_dict().items()}
    kw = dict(k1=3, k2=5, backend=backend)
    kw[field] = value
    try:
        t = tb.Trainer(model, **kw)
    except ERRORS as e:
        _names(e, field)
    else:
        if field in ("k1", "k2"):
            assert (value is None and field == "k2") or not isinstance(value, (bool, float, str)), (
                f"{field}={value!r}"
            )
        x, y = _fixed()
        if field != "loss" or value == "mse":
            t.fit(x, y)
        return
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


OPT_FIELDS = {
    tb.SGD: ["lr", "momentum", "nesterov", "weight_decay"],
    tb.Adam: ["lr", "betas", "eps", "weight_decay"],
}


@FUZZ
@given(
    cls=st.sampled_from([tb.SGD, tb.Adam]),
    data=st.data(),
    value=st.sampled_from(
        [
            *WEIRD,
            -0.5,
            1.0,
            (0.9, 0.99),
            (1.0, 0.5),
            (0.5,),
            [0.1, 0.2],
            float("-inf"),
            1e300,
            np.array(0.1),
        ]
    ),
    assign=st.booleans(),
)
def test_optimizer_fuzz(cls, data, value, assign):
    field = data.draw(st.sampled_from(OPT_FIELDS[cls]))
    opt = cls()
    cfg = dict(opt.config())
    try:
        if assign:
            setattr(opt, field, value)
        else:
            opt = cls(**{field: value})
    except ERRORS as e:
        _names(e, field)
        assert dict(opt.config()) == cfg, "a refused assignment changed the optimizer"
        return
    got = getattr(opt, field)
    if field != "nesterov":
        vals = np.atleast_1d(np.asarray(got, dtype=float))
        assert np.all(np.isfinite(vals)) and np.all(vals >= 0), (
            f"{field}={value!r} accepted as {got!r}"
        )


# ----------------------------------------------------- load_state_dict
@FUZZ
@given(data=st.data(), cell=cells, dtype=mdtypes)
def test_load_state_dict_fuzz(data, cell, dtype):
    model = _model(cell, dtype)
    sd = model.state_dict()
    key = data.draw(st.sampled_from(sorted(sd)))
    kind = data.draw(
        st.sampled_from(
            ["layout", "dtype", "shape", "nan", "big", "missing", "extra", "list", "notdict"]
        )
    )
    new = {k: v.copy() * 0.5 for k, v in sd.items()}
    valid = True
    if kind == "layout":
        new[key] = data.draw(layouts(new[key]))
    elif kind == "dtype":
        d = data.draw(st.sampled_from(["int64", "bool", "complex128", "object", "float16"]))
        new[key] = new[key].astype(d)
        valid = None
    elif kind == "shape":
        new[key] = new[key][..., :-1] if new[key].ndim else new[key][None]
        valid = False
    elif kind in ("nan", "big"):
        new[key] = _poison(new[key], kind, 0)
        # 1e39 overflows float32: refused naming the entry (NaN loads, as in PyTorch)
        valid = False if kind == "big" and dtype == "float32" else None
    elif kind == "missing":
        del new[key]
        valid = False
    elif kind == "extra":
        new["bogus_l9"] = new[key]
        valid = None
    elif kind == "list":
        new[key] = new[key].tolist()
        valid = None
    else:
        new = list(new.values())
        valid = False
    models = [model] + [_model(cell, dtype) for _ in BACKENDS[1:]]
    trainers = [tb.Trainer(m, k1=3, backend=be) for m, be in zip(models, BACKENDS, strict=True)]
    outcomes = []
    for m in models:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a silent overflow in a cast is a failure
                m.load_state_dict(new)
        except ERRORS as e:
            assert valid is not True, f"valid state dict refused: {e!r}"
            _names(e, key, "state_dict", "bogus_l9")
            for k, v in m.state_dict().items():
                np.testing.assert_array_equal(v, sd[k], err_msg=k)
            outcomes.append(type(e))
        else:
            assert valid is not False, f"bad state dict ({kind} {key}) accepted"
            for k, v in m.state_dict().items():
                assert v.dtype == np.dtype(dtype)
                np.testing.assert_array_equal(v, np.asarray(new[k]).astype(dtype), err_msg=k)
            outcomes.append(None)
    assert len(set(outcomes)) == 1, outcomes
    # every trainer created before the load sees what its model holds
    x, y = _fixed()
    finite = all(np.all(np.isfinite(v)) for v in model.state_dict().values())
    losses = []
    for t in trainers:
        if finite and kind == "big":  # 1e39 in a float64 weight: training may overflow
            try:
                losses.append(t.fit(x, y).losses)
            except tb.NonFiniteError:
                losses.append(None)
        elif finite:
            losses.append(t.fit(x, y).losses)
        else:  # documented: a trainer refuses non-finite parameters before its next step
            with pytest.raises((ValueError, tb.NonFiniteError)):
                t.fit(x, y)
    for lo in losses[1:]:
        assert (lo is None) == (losses[0] is None), "one backend overflowed, the other not"
        if lo is not None:
            assert_close(lo, losses[0], TOL[dtype], "losses after load_state_dict")


@pytest.mark.parametrize("value", [1e39, -3.5e38, np.finfo(np.float64).max])
def test_load_state_dict_overflow_is_refused(value):
    # was numpy's 'overflow encountered in cast' RuntimeWarning, and Inf stored
    model = _model("gru", "float32")
    trainer = tb.Trainer(model, k1=2, backend="numpy")
    before = model.state_dict()
    sd = {k: v.astype(np.float64) for k, v in before.items()}
    sd["weight_hh_l0"][2, 1] = value
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"weight_hh_l0.*float32.*\[2, 1\].*overflows"):
            model.load_state_dict(sd)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    assert model._version == 0
    x, y = _fixed()
    trainer.fit(x, y)  # usable
    # NaN and Inf themselves still load (as in PyTorch); what only nearly
    # overflows (float32's max) loads as is
    sd = {k: v.astype(np.float64) for k, v in model.state_dict().items()}
    sd["readout.bias"][0] = float(np.finfo(np.float32).max)
    sd["readout.bias"][1] = np.inf
    model.load_state_dict(sd)
    assert model.state_dict()["readout.bias"][0] == np.finfo(np.float32).max


# ------------------------------------------------------- save / load paths
@pytest.mark.parametrize("backend", BACKENDS)
def test_save_load_bad_paths(tmp_path, backend):
    trainer = _trainer("lstm", "float32", backend)
    twin = _trainer("lstm", "float32", backend)
    _warm(trainer, twin)
    (tmp_path / "garbage.ckpt").write_bytes(b"\x00not a checkpoint" * 10)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "adir").mkdir()
    bad_save = [
        tmp_path / "no" / "such" / "dir" / "x.ckpt",
        tmp_path / "adir",
    ]
    for p in bad_save:
        with pytest.raises((*ERRORS, OSError)) as ei:
            trainer.save(p)
        if isinstance(ei.value, (ValueError, TypeError)):
            _names(ei.value, "path")
    bad_load = [
        tmp_path / "missing.ckpt",
        tmp_path / "garbage.ckpt",
        tmp_path / "empty.ckpt",
        tmp_path / "adir",
    ]
    for p in bad_load:
        with pytest.raises((*ERRORS, OSError)) as ei:
            tb.Trainer.load(p)
        if isinstance(ei.value, (ValueError, TypeError)):
            _names(ei.value, "path", str(p))
    _assert_unchanged(trainer, twin)
    good = tmp_path / "ok.ckpt"
    trainer.save(good)
    with pytest.raises(ERRORS):
        tb.Trainer.load(good, backend="gpu")
    back = tb.Trainer.load(good)
    x, y = _fixed()
    np.testing.assert_array_equal(back.fit(x, y).losses, trainer.fit(x, y).losses)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", [3, None, 2.5, ["a"]])
@pytest.mark.parametrize("method", ["save", "load", "Model.save", "Model.load"])
def test_save_load_non_path_names_path(backend, path, method):
    trainer = _trainer("gru", "float32", backend)
    twin = _trainer("gru", "float32", backend)
    with pytest.raises(TypeError) as ei:
        {
            "save": trainer.save,
            "load": tb.Trainer.load,
            "Model.save": trainer.model.save,
            "Model.load": tb.Model.load,
        }[method](path)
    _assert_unchanged(trainer, twin)
    _names(ei.value, "path")


# ----------------------------------------------- risky cases: subprocess
RISKY = textwrap.dedent(
    """
    import sys, numpy as np, tbptt_fast as tb
    backend, case = sys.argv[1], sys.argv[2]
    x = np.zeros((6, 2, 3), np.float32); y = np.zeros((6, 2, 2), np.float32)
    def run():
        if case.startswith("k1="):
            k1, k2 = eval(case[3:])
            t = tb.Trainer(tb.Model("lstm", 3, 4, 2), k1=k1, k2=k2, backend=backend)
            for _ in range(2):
                try:
                    t.fit(x, y)
                except (ValueError, TypeError, MemoryError) as e:
                    print("refused", type(e).__name__, e)
            t.reset_state()
            try:
                t.step(x[0], y[0])
            except (ValueError, TypeError, MemoryError) as e:
                print("refused", type(e).__name__, e)
            t.reset_state()
            return t
        if case.startswith("model"):
            kw = eval(case[5:])
            return tb.Model(**{**dict(cell="gru", input_size=3, hidden_size=4, output_size=2), **kw})
        if case == "broadcast_huge_T":
            t = tb.Trainer(tb.Model("gru", 3, 4, 2), k1=4, backend=backend)
            big = np.broadcast_to(np.float32(0), (10**12, 2, 3))
            return t.fit(big, np.broadcast_to(np.float32(0), (10**12, 2, 2)))
        if case == "broadcast_huge_B":
            t = tb.Trainer(tb.Model("gru", 3, 4, 2), k1=4, backend=backend)
            return t.fit(np.broadcast_to(np.float32(0), (2, 10**11, 3)), np.broadcast_to(np.float32(0), (2, 10**11, 2)))
        if case == "predict_huge_B":
            return tb.Model("gru", 3, 4, 2).predict(np.broadcast_to(np.float32(0), (2, 10**11, 3)), backend=backend)
        if case == "predict_huge_T_outputs":  # x passes chunk by chunk; the outputs cannot
            return tb.Model("gru", 3, 4, 2).predict(np.broadcast_to(np.float32(0), (10**12, 1, 3)), backend=backend)
        if case == "evaluate_huge_B":
            return tb.Model("gru", 3, 4, 2).evaluate(
                np.broadcast_to(np.float64(0), (2, 10**11, 3)), np.broadcast_to(np.float32(0), (2, 10**11, 2)), backend=backend)
        if case == "step_huge_B":
            t = tb.Trainer(tb.Model("gru", 3, 4, 2), k1=4, backend=backend)
            return t.step(np.broadcast_to(np.float32(0), (10**11, 3)), np.broadcast_to(np.float32(0), (10**11, 2)))
        if case == "tokens_huge_B":
            return tb.Model("gru", 3, 4, 5, vocab_size=5).predict(np.broadcast_to(np.int8(1), (2, 10**11)), backend=backend)
        if case == "state_huge_B":
            t = tb.Trainer(tb.Model("gru", 3, 4, 2), k1=4, backend=backend)
            return t.reset_state([np.broadcast_to(np.float64(0), (10**11, 4))])
        if case == "fit_batch_memory":  # x is small; the state of its batch is not
            t = tb.Trainer(tb.Model("lstm", 1, 4096, 1), k1=2, backend=backend)
            return t.fit(np.broadcast_to(np.float32(0), (1, 10**7, 1)), np.broadcast_to(np.float32(0), (1, 10**7, 1)))
        if case == "predict_batch_memory":
            return tb.Model("lstm", 1, 4096, 1).predict(np.broadcast_to(np.float32(0), (1, 10**7, 1)), backend=backend)
        if case == "odd_strides":
            base = np.random.default_rng(0).standard_normal((12, 6, 9)).astype(np.float32)
            xs = base[::-2, ::3, 1::3]; ys = base[::2, 1::3, ::-4][..., :2]
            for v in (xs, np.swapaxes(np.asfortranarray(np.swapaxes(xs, 0, 2)), 0, 2)):
                a = tb.Trainer(tb.Model("lstm", 3, 4, 2, seed=1), k1=2, k2=4, backend=backend).fit(v, ys).losses
                b = tb.Trainer(tb.Model("lstm", 3, 4, 2, seed=1), k1=2, k2=4, backend="numpy").fit(
                    np.ascontiguousarray(v), np.ascontiguousarray(ys)).losses
                assert np.allclose(a, b, rtol=1e-4, atol=1e-5), (a, b)
            return "ok"
    try:
        run()
        print("ok")
    except (ValueError, TypeError, MemoryError) as e:
        print("refused", type(e).__name__, e)
    sys.stdout.flush()
    """
)

# cases that must be refused, and the argument the refusal names (a batch of
# 10**11 as a broadcast view was numpy's 'Unable to allocate 2.18 TiB for an
# array with shape (2, 100000000000, 3)', naming neither x nor the bytes)
MUST_REFUSE = {
    "broadcast_huge_B": "x",
    "predict_huge_B": "x",
    "predict_huge_T_outputs": "x",
    "evaluate_huge_B": "x",
    "step_huge_B": "x_t",
    "tokens_huge_B": "x",
    "state_huge_B": "initial_state",
    "fit_batch_memory": "x",
    "predict_batch_memory": "x",
}
HUGE_CASES = [
    "k1=(10**9, None)",
    "k1=(10**9, 10**9)",
    "k1=(2**61, 2**61)",
    "k1=(2**62, None)",
    "k1=(sys.maxsize, sys.maxsize)",
    "k1=(2**63, 2**63)",
    "k1=(2**64 + 1, None)",
    "model dict(num_layers=10**9)",
    "model dict(hidden_size=10**9)",
    "model dict(hidden_size=2**62)",
    "model dict(input_size=2**40)",
    "model dict(cell='lstm', vocab_size=2**40)",
    *MUST_REFUSE,
    "odd_strides",
]


# refused in the Python layer every backend shares, before any engine: one backend
ONE_BACKEND = {"predict_huge_T_outputs", "evaluate_huge_B", "step_huge_B", "tokens_huge_B"}


@pytest.mark.parametrize(
    ("backend", "case"),
    [(b, c) for c in HUGE_CASES for b in (BACKENDS[:1] if c in ONE_BACKEND else BACKENDS)],
)
def test_huge_sizes_in_subprocess(backend, case):
    try:
        p = subprocess.run(
            [sys.executable, "-c", RISKY, backend, case],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{case} on {backend}: not refused within 20 s (allocates without end?)")
    out = p.stdout + p.stderr
    assert p.returncode == 0, (
        f"{case} on {backend}: crashed, returncode {p.returncode}\n{out[-2000:]}"
    )
    name = MUST_REFUSE.get(case)
    if name is not None:
        refusals = [line for line in p.stdout.splitlines() if line.startswith("refused")]
        assert refusals, f"{case} on {backend}: not refused\n{out[-2000:]}"
        assert all(
            re.match(r"refused (MemoryError|ValueError) .*\d+ bytes", line) for line in refusals
        ), f"{case} on {backend}: not a MemoryError/ValueError with the bytes: {refusals}"
    if case.startswith("k1="):
        name = "k1"
    elif case.startswith("model"):
        name = re.findall(r"(\w+)=", case[5:])[-1]
    for line in p.stdout.splitlines():
        if line.startswith("refused"):
            assert re.search(rf"(?<![A-Za-z_]){name}(?![A-Za-z_])", line), (
                f"{case} on {backend}: the message does not name {name}: {line}"
            )
            for cxx in ("std::", "vector::", "Unable to cast", "incompatible function"):
                assert cxx not in line, f"{case} on {backend}: C++ text in the message: {line}"


# ---------------------------------------------------- flags and threads
@FUZZ
@given(
    data=st.data(),
    backend=backends,
    flag=st.sampled_from(["flush", "return_grads", "return_outputs", "on_update"]),
    value=st.sampled_from([True, False, np.True_, 1, 0, 2, "yes", None, np.array([1, 2]), 3.0]),
    with_state=st.booleans(),
)
def test_fit_flags_fuzz(data, backend, flag, value, with_state):
    trainer, twin = _trainer("lstm", "float32", backend), _trainer("lstm", "float32", backend)
    _warm(trainer, twin)
    x, y = _fixed(T=4)
    s = [(np.ones((2, 4), np.float32), np.zeros((2, 4), np.float32))] if with_state else None
    try:
        res = trainer.fit(x, y, initial_state=s, **{flag: value})
    except ERRORS as e:
        _names(e, flag)
        _assert_unchanged(trainer, twin)
        return
    if flag == "on_update":
        assert value is None, f"on_update={value!r} accepted"
    else:
        assert isinstance(value, (bool, np.bool_)), f"{flag}={value!r} accepted"
    ref = _trainer("lstm", "float32", "numpy")
    _warm(ref)
    rres = ref.fit(x, y, initial_state=s, **{flag: value})
    assert_close(res.losses, rres.losses, TOL["float32"], "losses")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="native module not built")
@pytest.mark.parametrize(
    "n",
    [
        "2",
        2.7,
        0,
        -1,
        None,
        True,
        np.array([2]),
        10**6,
        2**31,
        2**70,
    ],
)
def test_set_num_threads_fuzz(n):
    before = tb.get_num_threads()
    try:
        tb.set_num_threads(n)
    except ERRORS as e:
        _names(e, "n")
        assert "incompatible function arguments" not in str(e)
        assert tb.get_num_threads() == before
    else:
        assert isinstance(n, int) and not isinstance(n, bool) and n >= 1
    finally:
        tb.set_num_threads(before)
