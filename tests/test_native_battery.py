"""Randomised battery: every native backend against the NumPy reference (contract: the tolerances).

Hypothesis draws configurations (seeded, so a run is reproducible) and the
native engine must agree with ``backend="numpy"`` on losses, update steps,
per-update gradients, outputs, final parameters and final state.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tbptt_fast as tb
from tbptt_fast.reference import state_count

from conftest import TOL, assert_close, make_data


@st.composite
def configs(draw):
    k1 = draw(st.integers(1, 6))
    return dict(
        cell=draw(st.sampled_from(tb.CELLS)),
        L=draw(st.integers(1, 3)),
        D=draw(st.integers(1, 4)),
        H=draw(st.sampled_from([1, 2, 3, 5, 8])),
        O=draw(st.integers(1, 4)),
        B=draw(st.integers(1, 4)),
        T=draw(st.integers(1, 14)),
        k1=k1,
        k2=draw(st.one_of(st.none(), st.integers(1, 9))),
        loss=draw(st.sampled_from(["mse", "cross_entropy"])),
        overlap=draw(st.sampled_from(["stored", "recompute"])),
        dtype=draw(st.sampled_from(["float32", "float64"])),
        mask_p=draw(st.sampled_from([0.0, 0.3, 1.0])),
        reset_p=draw(st.sampled_from([0.0, 0.2])),
        opt=draw(st.sampled_from(["sgd", "momentum", "nesterov", "adam"])),
        clip=draw(st.sampled_from([None, 0.1, 10.0])),
        init=draw(st.booleans()),
        split=draw(st.integers(0, 14)),
        flush=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
        omit=draw(st.booleans()),  # pass mask/resets as None when they say nothing
    )


@st.composite
def large_configs(draw):
    """Sizes that take the engine's fast paths: widths that are multiples of 16
    (its own AVX-512 kernel), k1 and runs of >= 8 steps (packed or transposed
    W_hh), batch up to 33 (33 falls back to OpenBLAS), and 1 or 2 threads."""
    c = draw(configs())
    k1 = draw(st.integers(8, 12))
    return {
        **c,
        "L": draw(st.integers(1, 2)),
        "D": draw(st.sampled_from([3, 16, 24])),
        "H": draw(st.sampled_from([16, 24, 32, 48])),
        "O": draw(st.sampled_from([2, 16])),
        "B": draw(st.sampled_from([1, 5, 8, 17, 32, 33])),
        "T": draw(st.integers(8, 30)),
        "k1": k1,
        "k2": draw(st.one_of(st.none(), st.integers(4, 20))),
        "split": draw(st.sampled_from([0, 9, 20])),
        "threads": draw(st.sampled_from([1, 2])),
    }


def _optimizer(name):
    return {
        "sgd": tb.SGD(lr=0.1),
        "momentum": tb.SGD(lr=0.05, momentum=0.9, weight_decay=0.01),
        "nesterov": tb.SGD(lr=0.05, momentum=0.5, nesterov=True),
        "adam": tb.Adam(lr=0.01, weight_decay=0.001),
    }[name]


def _train(backend, c):
    if c["loss"] == "cross_entropy" and c["O"] < 2:
        c = {**c, "O": 2}
    x, target, mask, resets = make_data(
        c["seed"], c["T"], c["B"], c["D"], c["O"], c["loss"], c["mask_p"], c["reset_p"]
    )
    model = tb.Model(c["cell"], c["D"], c["H"], c["O"], c["L"], dtype=c["dtype"], seed=c["seed"])
    tr = tb.Trainer(
        model,
        k1=c["k1"],
        k2=c["k2"],
        loss=c["loss"],
        optimizer=_optimizer(c["opt"]),
        clip_grad_norm=c["clip"],
        overlap=c["overlap"],
        backend=backend,
    )
    init = None
    if c["init"]:
        rng = np.random.default_rng(c["seed"] + 1)
        h0 = rng.normal(size=(c["L"], c["B"], c["H"]))
        init = (h0, rng.normal(size=h0.shape)) if state_count(c["cell"]) == 2 else h0
    if c["omit"] and mask.all():
        mask = None
    if c["omit"] and not resets.any():
        resets = None
    cut = min(c["split"], c["T"] - 1)
    results = []
    for lo, hi, last in ((0, cut, False), (cut, c["T"], True)):
        if hi <= lo:
            continue
        results.append(
            tr.fit(
                x[lo:hi],
                target[lo:hi],
                mask=None if mask is None else mask[lo:hi],
                resets=None if resets is None else resets[lo:hi],
                initial_state=init if lo == 0 else None,
                flush=c["flush"] if last else False,
                return_grads=True,
                return_outputs=True,
            )
        )
    return tr, results


def _flat(state):
    return [a for e in state for a in (e if isinstance(e, tuple) else (e,))]


def _compare(backend, c):
    ref, ref_res = _train("numpy", c)
    got, got_res = _train(backend, c)
    tol = TOL[c["dtype"]]
    for a, b in zip(got_res, ref_res, strict=True):
        np.testing.assert_array_equal(a.update_steps, b.update_steps)
        assert_close(a.losses, b.losses, tol, "losses")
        assert_close(a.outputs, b.outputs, tol, "outputs")
        for u, (ga, gb) in enumerate(zip(a.grads, b.grads, strict=True)):
            for k in gb:
                assert_close(ga[k], gb[k], tol, f"update {u} grad {k}")
    for k, v in ref.model.state_dict().items():
        assert_close(got.model.state_dict()[k], v, tol, f"param {k}")
    for a, b in zip(_flat(got.state), _flat(ref.state), strict=True):
        assert_close(a, b, tol, "state")
    assert got.step_count == ref.step_count and got.pending == ref.pending


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(c=configs())
def test_native_matches_reference(native_backend, c):
    _compare(native_backend, c)


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(c=large_configs())
def test_native_matches_reference_on_fast_paths(native_backend, c):
    before = tb.get_num_threads()
    try:
        tb.set_num_threads(c["threads"])
        _compare(native_backend, c)
    finally:
        tb.set_num_threads(before)


@pytest.mark.parametrize("k1,k2", [(2, 5), (5, 2), (3, None)])
def test_ring_capacity_does_not_change_results(native_backend, k1, k2):
    """A ring of the default capacity equals one twice as large: bit for bit on
    the CPU (a window that wraps is gathered into one product); within float64
    rounding on CUDA, whose products run once per ring segment, so a larger
    ring splits the sums differently."""
    from tbptt_fast._backend import make_engine

    x, target, mask, resets = make_data(3, 17, 2, 3, 2, "mse", 0.2, 0.1)
    outs = []
    for factor in (0, 2):
        model = tb.Model("lstm", 3, 4, 2, 2, dtype="float64", seed=3)
        tr = tb.Trainer(model, k1=k1, k2=k2, optimizer=tb.SGD(lr=0.1), backend=native_backend)
        if factor:
            cfg = {**tr._config, "capacity": factor * max(k1, k2 or 1) + 3}
            tr._engine = make_engine(native_backend, cfg, model.param_list())
        outs.append((tr.fit(x, target, mask=mask, resets=resets, return_grads=True), model))
    (a, ma), (b, mb) = outs
    if native_backend == "cuda":
        assert_close(b.losses, a.losses, 1e-13, "losses")
        for k, v in ma.state_dict().items():
            assert_close(mb.state_dict()[k], v, 1e-13, k)
        return
    np.testing.assert_array_equal(a.losses, b.losses)
    for k, v in ma.state_dict().items():
        np.testing.assert_array_equal(mb.state_dict()[k], v)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_relu"])
@pytest.mark.parametrize(
    ("k1", "k2", "overlap"),
    [
        (3, None, "stored"),
        (7, None, "recompute"),
        (5, 40, "stored"),
        (40, 5, "recompute"),
        (1, 9, "recompute"),
    ],
)
def test_long_streams_wrap_the_ring(native_backend, cell, k1, k2, overlap):
    """Hundreds of steps over several fit calls: the ring wraps (or grows) many times."""
    T, B, D, H, O = 300, 3, 4, 6, 2
    x, target, mask, resets = make_data(17, T, B, D, O, "mse", mask_p=0.2, reset_p=0.03)
    out = []
    for backend in ("numpy", native_backend):
        model = tb.Model(cell, D, H, O, num_layers=2, dtype="float64", seed=1)
        tr = tb.Trainer(
            model,
            k1=k1,
            k2=k2,
            optimizer=tb.Adam(lr=0.01),
            clip_grad_norm=1.0,
            overlap=overlap,
            backend=backend,
        )
        losses = [
            tr.fit(
                x[i : i + 50],
                target[i : i + 50],
                mask=mask[i : i + 50],
                resets=resets[i : i + 50],
                flush=i == 250,
            ).losses
            for i in range(0, T, 50)
        ]
        out.append((np.concatenate(losses), model.state_dict()))
    (ref_l, ref_p), (got_l, got_p) = out
    assert_close(got_l, ref_l, TOL["float64"], "losses")
    for k, v in ref_p.items():
        assert_close(got_p[k], v, TOL["float64"], k)


def test_omitted_mask_and_resets_equal_explicit_ones(native_backend):
    """mask=None / resets=None reach the engine as "not given" and mean all ones / none."""
    x, target, _, _ = make_data(21, 9, 3, 4, 2, "mse")
    outs = []
    for explicit in (False, True):
        model = tb.Model("gru", 4, 16, 2, dtype="float32", seed=2)
        tr = tb.Trainer(model, k1=4, k2=6, backend=native_backend)
        kw = dict(mask=np.ones((9, 3)), resets=np.zeros((9, 3))) if explicit else {}
        outs.append(tr.fit(x, target, return_outputs=True, return_grads=True, **kw))
    assert_close(outs[0].outputs, outs[1].outputs, 1e-6, "outputs")
    assert_close(outs[0].losses, outs[1].losses, 1e-6, "losses")
