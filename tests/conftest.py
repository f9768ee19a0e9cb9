"""Shared fixtures: the backend parametrisation and tolerance-aware comparisons."""

from __future__ import annotations

import os

import numpy as np
import pytest

import tbptt_fast as tb

# CI sets this so that a broken native build fails instead of skipping.
REQUIRE_NATIVE = os.environ.get("TBPTT_REQUIRE_NATIVE", "") not in ("", "0")

_NATIVE = tb.native_available()
_CUDA = tb.cuda_available()

CPU = pytest.param(
    "cpu",
    marks=pytest.mark.skipif(
        not _NATIVE and not REQUIRE_NATIVE, reason="native module tbptt_fast._core not built"
    ),
)
CUDA = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not _CUDA, reason="no CUDA GPU")]
)
BACKENDS = ["numpy", CPU, CUDA]
NATIVE_BACKENDS = [CPU, CUDA]

# the contract (the tolerances)
TOL = {"float64": 1e-10, "float32": 1e-4}


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(params=NATIVE_BACKENDS)
def native_backend(request):
    return request.param


def assert_close(a, b, tol, what=""):
    """the contract (the tolerances): max|a - b| <= tol * max(1, max|b|); reports the worst entry."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    if a.size == 0:
        return
    err = np.abs(a - b)
    scale = max(1.0, float(np.max(np.abs(b))))
    worst = np.unravel_index(int(np.argmax(err)), err.shape)
    assert err[worst] <= tol * scale, (
        f"{what}: max error {err[worst]:.3e} at index {list(worst)} "
        f"(got {a[worst]!r}, expected {b[worst]!r}); allowed {tol * scale:.3e}"
    )


def make_data(seed, T, B, D, O, loss, mask_p=0.0, reset_p=0.0):
    """Random x [T, B, D] float64, target, mask [T, B] bool, resets [T, B] bool."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(T, B, D))
    if loss == "mse":
        target = rng.normal(size=(T, B, O))
    else:
        target = rng.integers(0, O, size=(T, B))
    mask = rng.random((T, B)) >= mask_p
    resets = rng.random((T, B)) < reset_p
    return x, target, mask, resets


def snapshot(trainer):
    """Everything a failed call must leave unchanged (optimizer state is checked
    by continuing to train against a twin)."""
    st = trainer.state
    flat = (
        None
        if st is None
        else [np.copy(a) for e in st for a in (e if isinstance(e, tuple) else (e,))]
    )
    return trainer.model.state_dict(), flat, trainer.step_count, trainer.pending


def assert_same_snapshot(a, b):
    sd_a, st_a, n_a, p_a = a
    sd_b, st_b, n_b, p_b = b
    assert n_a == n_b and p_a == p_b
    for k in sd_a:
        np.testing.assert_array_equal(sd_a[k], sd_b[k], err_msg=k)
    assert (st_a is None) == (st_b is None)
    if st_a is not None:
        for x, y in zip(st_a, st_b, strict=True):
            np.testing.assert_array_equal(x, y)
