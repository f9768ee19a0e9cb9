"""The native build itself: tbptt_fast._core loads, reports its build, drives the
scipy-openblas32 thread pool (visible to threadpoolctl), maps native errors to
Python exceptions, and its Engine matches reference.Engine through the raw
engine interface (the contract (the tolerances) tolerances), including float64 finite
differences and ring-capacity invariance.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from tbptt_fast import _native, reference
from tbptt_fast.errors import NonFiniteError

REQUIRE_NATIVE = os.environ.get("TBPTT_REQUIRE_NATIVE", "") not in ("", "0")
if _native.core is None:
    if REQUIRE_NATIVE:
        raise ImportError(f"tbptt_fast._core failed to import: {_native.import_error}")
    pytest.skip(f"native module not built ({_native.import_error})", allow_module_level=True)

core = _native.core
TOL = {"float64": 1e-10, "float32": 1e-4}


def make_params(cell, D, H, O, L, dtype, seed=1):
    rng = np.random.default_rng(seed)
    G, s, ps = reference.CELLS[cell].gates, 1 / np.sqrt(H), []
    for layer in range(L):
        d = D if layer == 0 else H
        ps += [
            rng.uniform(-s, s, (G * H, d)),
            rng.uniform(-s, s, (G * H, H)),
            rng.uniform(-s, s, G * H),
            rng.uniform(-s, s, G * H),
        ]
    ps += [rng.uniform(-s, s, (O, H)), rng.uniform(-s, s, O)]
    return [np.ascontiguousarray(p.astype(dtype)) for p in ps]


def make_config(**kw):
    cfg = dict(
        cell="lstm", input_size=4, hidden_size=5, output_size=3, num_layers=2,
        dtype="float64", k1=3, k2=5, loss="mse", overlap="stored", optimizer="sgd",
        lr=0.05, momentum=0.9, nesterov=False, beta1=0.9, beta2=0.999, eps=1e-8,
        weight_decay=0.01, clip=0.0, capacity=0,
    )  # fmt: skip
    cfg.update(kw)
    return cfg


def make_data(cfg, T, B, seed=0, mask_p=0.3, reset_p=0.15):
    rng = np.random.default_rng(seed + 100)
    dt, D, O = cfg["dtype"], cfg["input_size"], cfg["output_size"]
    x = rng.standard_normal((T, B, D)).astype(dt)
    mask = (rng.random((T, B)) >= mask_p).astype(dt)
    resets = (rng.random((T, B)) < reset_p).astype(np.uint8)
    if cfg["loss"] == "mse":
        target = rng.standard_normal((T, B, O)).astype(dt)
    else:
        target = rng.integers(0, O, (T, B)).astype(np.int64)
        target[mask == 0] = 0
    return x, target, mask, resets


def assert_close(a, b, tol, what):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    if a.size == 0:
        return
    err = np.abs(a - b)
    i = np.unravel_index(int(np.argmax(err)), err.shape)
    scale = max(1.0, float(np.max(np.abs(b))))
    assert err[i] <= tol * scale, f"{what}: max error {err[i]:.3e} at {list(i)}"


# ---------------------------------------------------------------------------
# Build, threads, BLAS
# ---------------------------------------------------------------------------


def test_cell_registry_matches_the_reference_table():
    """_core's cell registry and reference.CELLS: the same cells, counts and order."""
    expected = [(name, d.gates, d.states) for name, d in reference.CELLS.items()]
    assert [tuple(c) for c in core.cells()] == expected


def test_core_imports_and_build_info():
    assert _native.import_error is None
    info = core.build_info()
    assert isinstance(core.__version__, str) and core.__version__
    assert info["blas"] == "scipy-openblas32"
    assert isinstance(info["cuda"], bool) and isinstance(info["sanitizers"], bool)
    assert core.cuda_available() in (True, False)
    assert hasattr(core, "CudaEngine") == info["cuda"]


def test_num_threads_round_trip():
    before = _native.get_num_threads()
    try:
        for n in (1, 2, before):
            _native.set_num_threads(n)
            assert _native.get_num_threads() == n
            assert core.get_num_threads() == n
    finally:
        _native.set_num_threads(before)
    with pytest.raises(ValueError):
        _native.set_num_threads(0)


def test_threadpoolctl_sees_and_controls_our_openblas():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    ours = [
        i
        for i in threadpoolctl.threadpool_info()
        if i["internal_api"] == "openblas" and "scipy_openblas32" in i["filepath"]
    ]
    assert len(ours) == 1, threadpoolctl.threadpool_info()
    assert ours[0]["num_threads"] == _native.get_num_threads()
    before = _native.get_num_threads()
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        assert _native.get_num_threads() == 1
    assert _native.get_num_threads() == before


# ---------------------------------------------------------------------------
# Errors become Python exceptions
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,match",
    [
        ({"cell": "lstmx"}, "cell"),
        ({"k1": 0}, "k1"),
        ({"loss": "hinge"}, "loss"),
        ({"overlap": "both"}, "overlap"),
        ({"dtype": "float16"}, "dtype"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"capacity": 2}, "capacity"),
    ],
)
def test_bad_config_raises_value_error(change, match):
    cfg = make_config(**change)
    params = make_params("lstm", 4, 5, 3, 2, "float64")
    with pytest.raises(ValueError, match=match):
        core.Engine(cfg, params)


def test_bad_params_raise_value_error():
    cfg = make_config()
    params = make_params("lstm", 4, 5, 3, 2, "float64")
    with pytest.raises(ValueError, match="params must hold"):
        core.Engine(cfg, params[:-1])
    bad = list(params)
    bad[1] = bad[1][:, :4].copy()
    with pytest.raises(ValueError, match=r"weight_hh_l0 must have shape \[20, 5\], got \[20, 4\]"):
        core.Engine(cfg, bad)
    bad = list(params)
    bad[0] = bad[0].astype(np.float32)
    with pytest.raises(ValueError, match="weight_ih_l0 must have dtype"):
        core.Engine(cfg, bad)
    bad = list(params)
    bad[0] = np.asfortranarray(bad[0])
    with pytest.raises(ValueError, match="C-contiguous"):
        core.Engine(cfg, bad)


def test_bad_run_inputs_raise_value_error():
    cfg = make_config(loss="cross_entropy")
    eng = core.Engine(cfg, make_params("lstm", 4, 5, 3, 2, "float64"))
    x, target, mask, resets = make_data(cfg, 6, 2)
    with pytest.raises(ValueError, match=r"x must have shape \[\*, \*, 4\]"):
        eng.run(x[..., :3].copy(), target, mask, resets, False, False, False)
    with pytest.raises(ValueError, match="x must have dtype"):
        eng.run(x.astype(np.float32), target, mask, resets, False, False, False)
    # label values are validated in Python (_validation.class_target), not here
    assert eng.step_count == 0
    eng.run(x, target, mask, resets, False, False, False)
    x3, t3, m3, r3 = make_data(cfg, 6, 3)
    with pytest.raises(ValueError, match="batch size changed"):
        eng.run(x3, t3, m3, r3, False, False, False)
    eng.reset(None)
    eng.run(x3, t3, m3, r3, False, False, False)  # fine after a reset


NON_FINITE_AT_4 = (
    r"^non-finite (loss|gradient) in the update at step 4; "
    r"parameters and optimizer state are as before that update$"
)


@pytest.mark.parametrize("what", ["param", "x"])
def test_non_finite_raises_the_typed_error_and_keeps_params(what):
    cfg = make_config(k1=2, k2=2, momentum=0.0, weight_decay=0.0)
    params = make_params("lstm", 4, 5, 3, 2, "float64")
    eng = core.Engine(cfg, params)
    x, target, mask, resets = make_data(cfg, 5, 2, mask_p=0.0)
    eng.run(x[:2], target[:2], mask[:2], resets[:2], False, False, False)  # update at 2
    if what == "param":
        params[1][0, 0] = np.inf
    else:
        x[3, 0, 0] = np.nan
    before = [p.copy() for p in params]
    with pytest.raises(NonFiniteError, match=NON_FINITE_AT_4):
        eng.run(x[2:], target[2:], mask[2:], resets[2:], False, False, False)
    for a, b in zip(params, before, strict=True):
        np.testing.assert_array_equal(a, b)
    assert eng.pending == 0 and eng.step_count == 4  # the block was consumed


# ---------------------------------------------------------------------------
# Engine vs reference.Engine, raw interface
# ---------------------------------------------------------------------------


def run_both(cfg, T=17, B=3, chunks=(7, 10), init=False, flush_between=False, seed=0):
    D, H, O, L = (cfg[k] for k in ("input_size", "hidden_size", "output_size", "num_layers"))
    p_ref = make_params(cfg["cell"], D, H, O, L, cfg["dtype"])
    p_cpu = [p.copy() for p in p_ref]
    ref, cpu = reference.Engine(cfg, p_ref), core.Engine(cfg, p_cpu)
    if init:
        rng = np.random.default_rng(5)
        n = L * reference.state_count(cfg["cell"])
        st = [rng.standard_normal((B, H)).astype(cfg["dtype"]) for _ in range(n)]
        ref.reset(st)
        cpu.reset(st)
    x, target, mask, resets = make_data(cfg, T, B, seed)
    tol, pos = TOL[cfg["dtype"]], 0
    for i, n in enumerate(chunks):
        sl, pos = slice(pos, pos + n), pos + n
        last = i == len(chunks) - 1
        a = cpu.run(x[sl], target[sl], mask[sl], resets[sl], last, True, True)
        b = ref.run(x[sl], target[sl], mask[sl], resets[sl], last, True, True)
        np.testing.assert_array_equal(a[1], b[1])
        assert a[0].dtype == b[0].dtype == np.dtype(cfg["dtype"])
        assert_close(a[0], b[0], tol, "losses")
        assert_close(a[3], b[3], tol, "outputs")
        assert len(a[2]) == len(b[2])
        for u, (ga, gb) in enumerate(zip(a[2], b[2], strict=True)):
            for k, (ea, eb) in enumerate(zip(ga, gb, strict=True)):
                assert_close(ea, eb, tol, f"update {u} grad {k}")
        if flush_between and not last:
            fa, fb = cpu.flush(True), ref.flush(True)
            np.testing.assert_array_equal(fa[1], fb[1])
            assert_close(fa[0], fb[0], tol, "flush loss")
    for k, (pa, pb) in enumerate(zip(p_cpu, p_ref, strict=True)):
        assert_close(pa, pb, tol, f"param {k}")
    for sa, sb in zip(cpu.state(), ref.state(), strict=True):
        assert_close(sa, sb, tol, "state")
    assert (cpu.step_count, cpu.pending) == (ref.step_count, ref.pending)
    return cpu


CASES = [
    pytest.param(cell, ov, loss, k1, k2, id=f"{cell}-{ov}-{loss}-k{k1}.{k2}")
    for cell, ov, loss, (k1, k2) in itertools.product(
        reference.CELLS,
        ["stored", "recompute"],
        ["mse", "cross_entropy"],
        [(3, 5), (5, 3), (4, 4), (1, 6), (3, 0), (6, 1)],
    )
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("cell,overlap,loss,k1,k2", CASES)
def test_engine_matches_reference(cell, overlap, loss, k1, k2, dtype):
    cfg = make_config(cell=cell, overlap=overlap, loss=loss, k1=k1, k2=k2, dtype=dtype)
    run_both(cfg)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    "kw,run_kw",
    [
        ({"optimizer": "adam", "momentum": 0.0}, {}),
        ({"clip": 0.05}, {}),
        ({"nesterov": True}, {}),
        ({"momentum": 0.0, "weight_decay": 0.0}, {}),
        ({"num_layers": 1}, {}),
        ({"num_layers": 3, "cell": "gru"}, {}),
        ({}, {"init": True}),
        ({"cell": "gru", "overlap": "recompute", "k1": 2, "k2": 7}, {"init": True}),
        ({}, {"flush_between": True, "chunks": (5, 5, 7)}),
        ({"hidden_size": 1, "input_size": 1, "output_size": 1}, {"B": 1}),
        ({"k1": 40, "k2": 40}, {"T": 40, "chunks": (40,)}),
        ({"k2": 0, "overlap": "recompute"}, {"T": 30, "chunks": (11, 19)}),
        ({"capacity": 20, "k2": 7}, {}),
    ],
    ids=lambda v: str(v).replace(" ", ""),
)
def test_engine_matches_reference_options(kw, run_kw, dtype):
    run_both(make_config(dtype=dtype, **kw), **run_kw)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "cell,H,B,threads",
    [("lstm", 16, 5, 1), ("lstm", 48, 13, 1), ("lstm", 32, 32, 1), ("lstm", 16, 33, 1),
     ("gru", 48, 8, 1), ("gru", 32, 19, 1), ("rnn_tanh", 48, 7, 1), ("rnn_relu", 32, 32, 1),
     ("lstm", 128, 32, 2), ("gru", 144, 24, 2), ("lstm", 80, 40, 2),
     ("cifg", 48, 8, 1), ("cifg", 32, 33, 1), ("cifg", 80, 40, 2)],
)  # fmt: skip
def test_engine_matches_reference_kernel_sizes(cell, H, B, threads, dtype):
    # Sizes that take the CPU engine's own per-step GEMM kernel with packed or
    # transposed W_hh (batch <= 32, widths a multiple of 16, row and 16-column
    # remainder tiles; k1 and run lengths >= 8, short runs keep W_hh as is) or
    # fall back to OpenBLAS (B > 32), with 2 layers; with 2 threads the batch
    # groups, product parts and pointwise row blocks run on the engine's pool.
    cfg = make_config(
        cell=cell, input_size=24, hidden_size=H, output_size=5, dtype=dtype, k1=8, k2=10
    )
    before = _native.get_num_threads()
    try:
        _native.set_num_threads(threads)
        run_both(cfg, T=29, B=B, chunks=(5, 24))
    finally:
        _native.set_num_threads(before)


@pytest.mark.parametrize("k1,k2,overlap", [(2, 5, "stored"), (3, 7, "recompute"), (5, 2, "stored")])
def test_ring_capacity_is_bit_identical(k1, k2, overlap):
    """A ring that wraps at other places gives exactly the same numbers."""
    outs = []
    for capacity in (0, max(k1, k2) + 3, 4 * max(k1, k2) + 1):
        cfg = make_config(k1=k1, k2=k2, overlap=overlap, capacity=capacity)
        params = make_params("lstm", 4, 5, 3, 2, "float64")
        eng = core.Engine(cfg, params)
        x, target, mask, resets = make_data(cfg, 29, 2)
        res = eng.run(x, target, mask, resets, True, True, True)
        outs.append((res, params))
    (a, pa), *rest = outs
    for b, pb in rest:
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[3], b[3])
        for ga, gb in zip(a[2], b[2], strict=True):
            for ea, eb in zip(ga, gb, strict=True):
                np.testing.assert_array_equal(ea, eb)
        for ea, eb in zip(pa, pb, strict=True):
            np.testing.assert_array_equal(ea, eb)


# every cell but rnn_relu, whose kink at 0 central differences may straddle
@pytest.mark.parametrize("cell", [c for c in reference.CELLS if c != "rnn_relu"])
def test_gradient_matches_finite_differences(cell):
    """Full BPTT on a tiny float64 model: returned gradient == central differences."""
    T, B = 5, 2
    cfg = make_config(cell=cell, k1=T, k2=T, lr=0.0, momentum=0.0, weight_decay=0.0)
    params = make_params(cell, 4, 5, 3, 2, "float64")
    x, target, mask, resets = make_data(cfg, T, B, reset_p=0.2)

    def loss_and_grads():
        eng = core.Engine(cfg, params)
        losses, _, grads, _ = eng.run(x, target, mask, resets, True, True, False)
        return float(losses[0]), grads[0]

    _, grads = loss_and_grads()
    rng = np.random.default_rng(0)
    eps = 1e-6
    for k, p in enumerate(params):
        for idx in rng.choice(p.size, size=min(3, p.size), replace=False):
            old = p.flat[idx]
            p.flat[idx] = old + eps
            up, _ = loss_and_grads()
            p.flat[idx] = old - eps
            down, _ = loss_and_grads()
            p.flat[idx] = old
            fd = (up - down) / (2 * eps)
            assert abs(fd - grads[k].flat[idx]) <= 1e-7 * max(1.0, abs(fd)), (k, idx)


def test_stored_steps_bounded_and_flush_empty():
    cfg = make_config(k1=4, k2=6)
    eng = core.Engine(cfg, make_params("lstm", 4, 5, 3, 2, "float64"))
    assert eng.state() is None and eng.stored_steps == 0
    x, target, mask, resets = make_data(cfg, 50, 2)
    for s in range(50):
        eng.run(
            x[s : s + 1], target[s : s + 1], mask[s : s + 1], resets[s : s + 1], False, False, False
        )
        assert eng.stored_steps <= 6
    eng.flush(False)
    losses, steps, grads, outputs = eng.flush(True)
    assert losses.shape == (0,) and steps.shape == (0,) and grads == [] and outputs is None
    assert len(eng.state()) == 4 and eng.state()[0].shape == (2, 5)
