"""the contract (bad input): every bad input gets a clear exception, and nothing changes."""

from __future__ import annotations

import re

import numpy as np
import pytest

import tbptt_fast as tb
from tbptt_fast.errors import NonFiniteError
from tbptt_fast.trainer import NonFiniteError as TrainerNonFiniteError

from conftest import _CUDA, assert_same_snapshot, make_data, snapshot

T, B, D, H, O = 6, 2, 3, 4, 3


def _pair(backend, loss="mse", cell="lstm"):
    """Two identical trainers that have both trained a little (mid-block)."""
    out = []
    for _ in range(2):
        m = tb.Model(cell, D, H, O, num_layers=2, dtype="float64", seed=1)
        tr = tb.Trainer(m, k1=4, k2=6, loss=loss, optimizer=tb.Adam(lr=0.01), backend=backend)
        x, target, _, _ = make_data(0, 5, B, D, O, loss)
        tr.fit(x, target, flush=False)  # one update and one pending step
        out.append(tr)
    return out


def _good(loss="mse"):
    return make_data(1, T, B, D, O, loss)


def _bad_fit_cases():
    x, target, mask, resets = _good()
    x_ce, t_ce, _, _ = _good("cross_entropy")
    nan_x = x.copy()
    nan_x[2, 1, 0] = np.nan
    inf_t = target.copy()
    inf_t[1, 0, 2] = np.inf
    nan_mask = mask.astype(float)
    nan_mask[0, 0] = np.nan
    big = t_ce.copy()
    big[3, 1] = O
    neg = t_ce.copy()
    neg[0, 0] = -1
    h0 = np.zeros((2, B, H))
    return [
        (
            "x-rank",
            "mse",
            dict(x=x[0], target=target),
            ValueError,
            r"x must have shape \[T, B, 3\]",
        ),
        ("x-width", "mse", dict(x=x[..., :2], target=target), ValueError, r"got \[6, 2, 2\]"),
        ("x-int", "mse", dict(x=x.astype(int), target=target), TypeError, "x must be a floating"),
        ("x-nan", "mse", dict(x=nan_x, target=target), ValueError, "x must be finite"),
        ("x-empty", "mse", dict(x=x[:0], target=target[:0]), ValueError, "x must not be empty"),
        (
            "target-shape",
            "mse",
            dict(x=x, target=target[:, :, :2]),
            ValueError,
            r"target must have shape \[6, 2, 3\]",
        ),
        ("target-inf", "mse", dict(x=x, target=inf_t), ValueError, "target must be finite"),
        (
            "target-int-mse",
            "mse",
            dict(x=x, target=t_ce[..., None].repeat(O, 2)),
            TypeError,
            "target must be a floating",
        ),
        (
            "ce-float-target",
            "cross_entropy",
            dict(x=x_ce, target=t_ce.astype(float)),
            TypeError,
            "integer array of class indices",
        ),
        (
            "ce-too-big",
            "cross_entropy",
            dict(x=x_ce, target=big),
            ValueError,
            r"\[0, 3\).*got 3 at index \[3, 1\]",
        ),
        (
            "ce-negative",
            "cross_entropy",
            dict(x=x_ce, target=neg),
            ValueError,
            r"got -1 at index \[0, 0\]",
        ),
        (
            "ce-shape",
            "cross_entropy",
            dict(x=x_ce, target=t_ce[:, :1]),
            ValueError,
            r"target must have shape \[6, 2\]",
        ),
        (
            "mask-shape",
            "mse",
            dict(x=x, target=target, mask=mask[:3]),
            ValueError,
            r"mask must have shape \[6, 2\]",
        ),
        (
            "mask-nan",
            "mse",
            dict(x=x, target=target, mask=nan_mask),
            ValueError,
            "mask must not contain NaN",
        ),
        (
            "mask-str",
            "mse",
            dict(x=x, target=target, mask=np.full((T, B), "a")),
            TypeError,
            "mask must be a bool or numeric",
        ),
        (
            "resets-shape",
            "mse",
            dict(x=x, target=target, resets=resets[:, :1]),
            ValueError,
            r"resets must have shape \[6, 2\]",
        ),
        (
            "init-shape",
            "mse",
            dict(x=x, target=target, initial_state=(h0[:, :, :2], h0)),
            ValueError,
            "initial_state",
        ),
        (
            "init-batch",
            "mse",
            dict(x=x, target=target, initial_state=(h0[:, :1], h0[:, :1])),
            ValueError,
            "initial_state",
        ),
        (
            "init-nan",
            "mse",
            dict(x=x, target=target, initial_state=(h0 + np.nan, h0)),
            ValueError,
            "initial_state.*finite",
        ),
        (
            "init-form",
            "mse",
            dict(x=x, target=target, initial_state=[h0[0]]),
            ValueError,
            "initial_state must be",
        ),
    ]


CASES = _bad_fit_cases()


@pytest.mark.parametrize(
    ("name", "loss", "kwargs", "exc", "match"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_fit_input_changes_nothing(backend, name, loss, kwargs, exc, match):
    del name
    tr, twin = _pair(backend, loss)
    before = snapshot(tr)
    with pytest.raises(exc, match=match):
        tr.fit(**kwargs)
    assert_same_snapshot(snapshot(tr), before)
    # and the optimizer state too: training on continues exactly like the twin's
    x, target, _, _ = _good(loss)
    ra, rb = tr.fit(x, target), twin.fit(x, target)
    np.testing.assert_array_equal(ra.losses, rb.losses)
    for k, v in twin.model.state_dict().items():
        np.testing.assert_array_equal(tr.model.state_dict()[k], v)


def test_bad_step_input_changes_nothing(backend):
    tr, _ = _pair(backend)
    before = snapshot(tr)
    x, target, _, _ = _good()
    with pytest.raises(ValueError, match=r"x_t must have shape \[B, 3\]"):
        tr.step(x[0, :, :2], target[0])
    with pytest.raises(ValueError, match=r"target_t must have shape \[2, 3\]"):
        tr.step(x[0], target[0, :, :1])
    with pytest.raises(ValueError, match="batch size"):
        tr.step(x[0, :1], target[0, :1])
    assert_same_snapshot(snapshot(tr), before)


def test_non_finite_parameters_are_refused(backend):
    tr, _ = _pair(backend)
    sd = tr.model.state_dict()
    sd["weight_hh_l1"][0, 0] = np.nan
    tr.model.load_state_dict(sd)
    before = snapshot(tr)
    x, target, _, _ = _good()
    with pytest.raises(ValueError, match="parameter weight_hh_l1 must be finite"):
        tr.fit(x, target)
    assert_same_snapshot(snapshot(tr), before)
    with pytest.raises(ValueError, match="weight_hh_l1"):
        tb.Trainer(tr.model, k1=2, backend=backend)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(k1=0), ValueError, "k1 must be >= 1"),
        (dict(k1=2, k2=0), ValueError, "k2 must be >= 1"),
        (dict(k1=2.0), TypeError, "k1 must be an int"),
        (dict(k1=True), TypeError, "k1 must be an int"),
        (dict(k1=2, loss="l1"), ValueError, "loss must be one of"),
        (dict(k1=2, overlap="both"), ValueError, "overlap must be one of"),
        (dict(k1=2, backend="tpu"), ValueError, "backend must be one of"),
        (dict(k1=2, optimizer="sgd"), TypeError, "optimizer must be"),
        (dict(k1=2, clip_grad_norm=0.0), ValueError, "clip_grad_norm"),
    ],
)
def test_bad_trainer_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        tb.Trainer(tb.Model("gru", 2, 3, 1), **kwargs)


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="cell must be one of"):
        tb.Model("transformer", 2, 3, 1)
    with pytest.raises(ValueError, match="dtype must be"):
        tb.Model("gru", 2, 3, 1, dtype="float16")
    with pytest.raises(ValueError, match="hidden_size must be >= 1"):
        tb.Model("gru", 2, 0, 1)
    with pytest.raises(TypeError, match="model must be"):
        tb.Trainer("lstm", k1=2)


def test_load_state_dict_is_checked_and_atomic():
    m = tb.Model("lstm", 2, 3, 1)
    sd = m.state_dict()
    bad = dict(sd)
    bad["weight_ih_l0"] = np.zeros((12, 5))
    bad["readout.bias"] = np.ones(1)
    with pytest.raises(ValueError, match=r"weight_ih_l0.*shape \[12, 2\]"):
        m.load_state_dict(bad)
    np.testing.assert_array_equal(m.state_dict()["readout.bias"], sd["readout.bias"])
    with pytest.raises(ValueError, match="missing"):
        m.load_state_dict({k: v for k, v in sd.items() if k != "readout.bias"})


@pytest.mark.skipif(_CUDA, reason="a GPU is present")
def test_cuda_without_gpu_is_a_clear_runtime_error():
    with pytest.raises(RuntimeError, match="cuda"):
        tb.Trainer(tb.Model("gru", 2, 3, 1), k1=2, backend="cuda")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_non_finite_training_stops_and_keeps_the_parameters(backend, dtype):
    huge = 1e30 if dtype == "float32" else 1e200
    x, target, _, _ = make_data(2, 12, B, D, O, "mse")
    x *= 10

    def trainer():
        m = tb.Model("rnn_relu", D, H, O, dtype=dtype, seed=0)
        return tb.Trainer(m, k1=3, optimizer=tb.SGD(lr=huge), backend=backend)

    tr = trainer()
    with pytest.raises(
        tb.NonFiniteError,
        match=r"^non-finite (loss|gradient) in the update at step \d+; "
        r"parameters and optimizer state are as before that update$",
    ) as e:
        tr.fit(x, target)
    t_bad = int(re.search(r"at step (\d+)", str(e.value)).group(1))
    assert t_bad in (3, 6, 9, 12)
    # the parameters are those after the last good update, as a twin that stops there has them
    twin = trainer()
    if t_bad > 3:
        twin.fit(x[: t_bad - 3], target[: t_bad - 3])
    for k, v in twin.model.state_dict().items():
        np.testing.assert_array_equal(tr.model.state_dict()[k], v, err_msg=k)
    assert issubclass(tb.NonFiniteError, RuntimeError)
    assert tb.NonFiniteError is NonFiniteError is TrainerNonFiniteError


def test_reference_engine_raises_the_typed_error_with_the_complete_message():
    """Engines raise NonFiniteError themselves; the trainer passes it on unchanged."""
    from tbptt_fast import reference

    m = tb.Model("cifg", D, H, O, dtype="float64", seed=0)
    cfg = tb.Trainer(m, k1=3, backend="numpy")._engine_config
    params = [p.copy() for p in m.param_list()]
    params[1][0, 0] = np.inf  # weight_hh_l0: the trainer would refuse it, the engine does not
    before = [p.copy() for p in params]
    engine = reference.Engine(cfg, params)
    x, target, _, _ = make_data(3, 4, B, D, O, "mse")
    with pytest.raises(NonFiniteError) as e:
        engine.run(x, target, None, None, False, False, False)
    assert str(e.value) == (
        "non-finite loss in the update at step 3; "
        "parameters and optimizer state are as before that update"
    )
    for a, b in zip(params, before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_cifg_initial_state_takes_a_pair_per_layer():
    m = tb.Model("cifg", D, H, O, num_layers=2, dtype="float64")
    tr = tb.Trainer(m, k1=2, backend="numpy")
    h = np.zeros((B, H))
    with pytest.raises(
        ValueError,
        match=r"initial_state\[0\] must be a pair \(h, c\) for cells with a cell state "
        r"\(lstm, cifg\)",
    ):
        tr.reset_state([h, h])
    tr.reset_state([(h, h + 1), (h, h)])
    assert [tuple(a[0, 0] for a in s) for s in tr.state] == [(0.0, 1.0), (0.0, 0.0)]
