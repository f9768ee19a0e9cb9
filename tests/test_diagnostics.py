"""tbptt_fast.diagnostics and ``tbptt-fast advise``: the decay curve, the truncation
bias and the recommendation, each against a value derived independently (a
closed form, the reference engine's own k2=None schedule, finite differences,
the delay of the echo task)."""

from __future__ import annotations

import copy
import itertools
import json
import math
import sys

import numpy as np
import pytest

import tbptt_fast as tb
from tbptt_fast import diagnostics as diag
from tbptt_fast.cli import main
from tbptt_fast.tasks import delayed_echo

from conftest import TOL, assert_close

NATIVE = tb.native_available()
BACKEND = "cpu" if NATIVE else "numpy"
try:
    import matplotlib  # noqa: F401

    HAS_MPL = True
except ImportError:
    HAS_MPL = False


def _data(seed, T, B, D, O, loss="mse"):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, B, D))
    if loss == "mse":
        target = rng.standard_normal((T, B, O))
    else:
        target = rng.integers(0, O, (T, B))
    return x, target


def _flat_grad(g: dict) -> np.ndarray:
    return np.concatenate([np.ravel(v) for v in g.values()])


# ----------------------------------------------------------------------------
# The reference engine's state-gradient hook
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cell,k1,k2,overlap",
    [
        ("lstm", 3, 7, "stored"),
        ("gru", 4, 2, "stored"),
        ("cifg", 2, 5, "recompute"),
        ("rnn_tanh", 3, None, "stored"),
    ],
)
def test_hook_changes_no_result(cell, k1, k2, overlap):
    """With the hook set, every loss, gradient and parameter is bit for bit as without."""
    x, target = _data(0, 23, 3, 2, 2)
    resets = np.zeros((23, 3), bool)
    resets[9, 1] = True
    out = []
    for hooked in (False, True):
        model = tb.Model(cell, 2, 5, 2, num_layers=2, dtype="float64", seed=1)
        tr = tb.Trainer(
            model, k1=k1, k2=k2, optimizer=tb.SGD(lr=0.1), overlap=overlap, backend="numpy"
        )
        calls: list = []
        if hooked:
            tr._engine.state_grad_hook = lambda k, s, d, calls=calls: calls.append((k, s))
        res = tr.fit(x, target, resets=resets, return_grads=True)
        if hooked:
            assert calls, "the hook was never called"
        out.append((res, model.state_dict()))
    (a, pa), (b, pb) = out
    assert np.array_equal(a.losses, b.losses)
    for ga, gb in zip(a.grads, b.grads, strict=True):
        for name in ga:
            assert np.array_equal(ga[name], gb[name]), name
    for name in pa:
        assert np.array_equal(pa[name], pb[name]), name


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_hook_reports_the_state_gradient(cell):
    """The hook's gradient w.r.t. the state entering the window (step w = 0) equals
    central finite differences of the update's loss in the initial state."""
    T, B, H = 5, 2, 3
    x, target = _data(3, T, B, 2, 1)
    model = tb.Model(cell, 2, H, 1, dtype="float64", seed=2)
    n_state = 2 if cell == "lstm" else 1
    rng = np.random.default_rng(4)
    init = [rng.standard_normal((B, H)) * 0.5 for _ in range(n_state)]

    def nested(flat):
        return [tuple(flat)] if n_state == 2 else [flat[0]]

    tr = tb.Trainer(model, k1=T, k2=None, optimizer=tb.SGD(lr=0.0), backend="numpy")
    seen = {}
    tr._engine.state_grad_hook = lambda k, s, d: seen.setdefault(s, [a.copy() for a in d])
    tr.fit(x, target, initial_state=nested(init))
    eps = 1e-6
    for i in range(n_state):
        fd = np.zeros((B, H))
        for b in range(B):
            for h in range(H):
                losses = []
                for sign in (1, -1):
                    pert = [a.copy() for a in init]
                    pert[i][b, h] += sign * eps
                    t2 = tb.Trainer(model, k1=T, k2=None, optimizer=tb.SGD(lr=0.0), backend="numpy")
                    losses.append(t2.fit(x, target, initial_state=nested(pert)).losses[0])
                fd[b, h] = (losses[0] - losses[1]) / (2 * eps)
        assert_close(seen[0][i], fd, 1e-7, f"{cell} state part {i}")


# ----------------------------------------------------------------------------
# The decay curve
# ----------------------------------------------------------------------------


def _relu_scaled_identity(a: float, H: int = 4, D: int = 2):
    """rnn_relu with W_hh = a*I, b_hh = 0 and positive W_ih, b_ih: with positive
    inputs every pre-activation is positive, so h_t = W_ih x_t + b_ih + a h_{t-1}
    and d h_t / d h_{t-1} = a I exactly."""
    model = tb.Model("rnn_relu", D, H, 1, dtype="float64", seed=0)
    sd = model.state_dict()
    sd["weight_hh_l0"] = a * np.eye(H)
    sd["bias_hh_l0"][:] = 0.0
    sd["weight_ih_l0"] = np.abs(sd["weight_ih_l0"]) + 0.1
    sd["bias_ih_l0"] = np.abs(sd["bias_ih_l0"]) + 0.1
    model.load_state_dict(sd)
    return model


@pytest.mark.parametrize("a", [0.8, 1.05])
def test_decay_curve_is_a_to_the_j(a):
    model = _relu_scaled_identity(a)
    rng = np.random.default_rng(1)
    x = rng.uniform(0.1, 1.0, (120, 3, 2))
    target = rng.standard_normal((120, 3, 1))
    J = 30
    c = diag.decay_curve(model, x, target, lags=J, positions=7, threshold=0.01, backend=BACKEND)
    expected = a ** np.arange(J + 1)
    np.testing.assert_allclose(c.curve, expected, rtol=1e-12, atol=0)
    assert math.isclose(c.rate, a, rel_tol=1e-9)
    below = [j for j in range(1, J + 1) if a**j < 0.01]
    assert c.horizon == (below[0] if below else None)
    assert c.pairs == 7 * 3
    assert c.cost.backward_steps == 7 * J


def test_decay_curve_stops_at_a_reset():
    """A reset cuts the gradient: a loss at the end of a sequence of L steps has
    no gradient at lag >= L, and a nonzero one below."""
    L, T, B = 6, 60, 2
    model = tb.Model("lstm", 2, 5, 1, num_layers=2, dtype="float64", seed=3)
    x, target = _data(5, T, B, 2, 1)
    resets = np.zeros((T, B), bool)
    resets[::L] = True
    mask = np.zeros((T, B), bool)
    mask[L - 1 :: L] = True
    c = diag.decay_curve(model, x, target, mask, resets, lags=2 * L, positions=4, backend=BACKEND)
    assert np.all(c.curve[L:] == 0)
    assert np.all(c.curve[:L] > 0)
    assert c.horizon is not None and c.horizon <= L


# ----------------------------------------------------------------------------
# The truncation bias
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cell,k1,k2", [("lstm", 4, None), ("gru", 2, None), ("lstm", 3, 7), ("cifg", 4, 2)]
)
def test_update_gradient_equals_the_reference_schedule(cell, k1, k2, backend):
    """The masked single update equals the last update of the reference engine
    running TBPTT(k1, k2) on the whole sequence (lr 0), k2=None included."""
    T = 24
    x, target = _data(6, T, 3, 2, 2)
    mask = np.random.default_rng(7).random((T, 3)) > 0.2
    model = tb.Model(cell, 2, 5, 2, num_layers=2, dtype="float64", seed=4)
    init = [np.full((3, 5), 0.1)] * (4 if cell in ("lstm", "cifg") else 2)
    init_n = [tuple(init[2 * k : 2 * k + 2]) for k in range(2)] if len(init) == 4 else init
    ref = tb.Trainer(model, k1=k1, k2=k2, optimizer=tb.SGD(lr=0.0), backend="numpy")
    want = ref.fit(x, target, mask, initial_state=init_n, return_grads=True).grads[-1]
    got = diag.update_gradient(
        model, x, target, mask, k1=k1, k2=k2, initial_state=init_n, backend=backend
    )
    for name in want:
        assert_close(got[name], want[name], TOL["float64"], name)


def test_bias_at_k2_none_is_exactly_zero(backend):
    model = tb.Model("lstm", 2, 6, 2, seed=0)  # float32: exact all the same
    x, target = _data(8, 200, 4, 2, 2)
    t = diag.truncation_bias(
        model, x, target, k1=2, k2s=[3, 8, None], segments=3, segment_steps=40, backend=backend
    )
    row = t.row(None)
    assert row.cos_mean == 1.0 and row.cos_min == 1.0
    assert row.rel_mean == 0.0 and row.rel_max == 0.0
    assert row.segments == 3
    assert t.row(3).rel_mean > 0  # a truncated window differs
    assert t.frozen and t.segment_steps == 40


def _contracting(cell="rnn_tanh", rho=0.6, H=6):
    model = tb.Model(cell, 3, H, 2, dtype="float64", seed=5)
    sd = model.state_dict()
    w = sd["weight_hh_l0"]
    sd["weight_hh_l0"] = w * (rho / np.linalg.norm(w, 2))
    model.load_state_dict(sd)
    return model


def test_bias_falls_as_k2_grows():
    """With contracting dynamics (||W_hh|| = 0.6 < 1, |tanh'| <= 1) the part of the
    gradient beyond the window shrinks geometrically with k2."""
    model = _contracting()
    x, target = _data(9, 400, 4, 3, 2)
    k2s = [1, 2, 3, 4, 6, 8, 12, 16]
    t = diag.truncation_bias(
        model, x, target, k1=1, k2s=k2s, segments=4, segment_steps=48, backend=BACKEND
    )
    rel = [t.row(k).rel_mean for k in k2s]
    cos = [t.row(k).cos_mean for k in k2s]
    assert all(a > b for a, b in itertools.pairwise(rel)), rel
    assert all(a <= b for a, b in itertools.pairwise(cos)), cos
    # geometric: beyond the window the norm is bounded by 0.6^k2 (times a constant)
    assert rel[-1] < 1e-2 * rel[0]


def test_moving_weights_tell_the_overlap_rules_apart():
    """With moving weights, recompute at k2=None is the untruncated gradient (to
    rounding), stored is not: its window's activations ran under older weights."""
    model = _contracting(cell="gru", rho=0.9)
    x, target = _data(10, 200, 3, 3, 2)
    t = diag.truncation_bias(
        model,
        x,
        target,
        k1=4,
        k2s=[4, None],
        segments=2,
        segment_steps=32,
        optimizer=tb.SGD(lr=0.5),
        backend=BACKEND,
    )
    assert not t.frozen
    assert {(r.k2, r.overlap) for r in t.rows} == {
        (k, o) for k in (4, None) for o in ("stored", "recompute")
    }
    assert t.row(None, "recompute").rel_max < 1e-9
    assert t.row(None, "stored").rel_mean > 1e-6
    # k2 <= k1: the two rules are the same rule
    assert t.row(4, "stored").rel_mean == pytest.approx(t.row(4, "recompute").rel_mean, rel=1e-9)


# ----------------------------------------------------------------------------
# The recommendation
# ----------------------------------------------------------------------------


def test_echo_recommendation_lands_at_the_delay():
    """After training to fit the delayed echo (delay d), the recommended k2 lies in
    [d, d + max(2, d / 4)]: the gradient must reach the input d steps back."""
    d = 6
    x, target, mask = delayed_echo(6000, 16, d, seed=0)
    model = tb.Model("lstm", 1, 16, 1, seed=0)
    tr = tb.Trainer(model, k1=4, k2=16, optimizer=tb.Adam(lr=0.01), backend=BACKEND)
    for _ in range(2):
        tr.reset_state()
        tr.fit(x, target, mask)
    xv, tv, mv = delayed_echo(1500, 16, d, seed=1)
    assert model.evaluate(xv, tv, mv, backend=BACKEND).loss < 0.1, "the model did not fit"
    before = model.state_dict()
    adv = diag.advise(
        model, xv, tv, mv, lags=24, positions=8, segments=6, backend=BACKEND, throughput_steps=256
    )
    assert d <= adv.k2 <= d + max(2, d // 4), "\n".join(adv.lines())
    assert adv.k1 is not None and 1 <= adv.k1 <= adv.k2
    chosen = next(c for c in adv.candidates if c["k1"] == adv.k1)
    assert chosen["eligible"] and chosen["cos"] >= 0.95
    assert adv.bias.row(adv.k2).cos_mean >= 0.95
    assert all(r.cos_mean < 0.95 for r in adv.bias.rows if r.k2 is not None and r.k2 < adv.k2)
    text = "\n".join(adv.lines())
    assert f"TBPTT(k1={adv.k1}, k2={adv.k2})" in text
    json.loads(adv.to_json())
    for name, v in model.state_dict().items():  # nothing changed the model
        assert np.array_equal(v, before[name]), name


# ----------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------

FAST = ["--lags", "12", "--positions", "3", "--segments", "2", "--steps", "400"]


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib not installed")
@pytest.mark.parametrize(
    "source",
    [
        ["--task", "echo", "--delay", "3"],
        ["--task", "adding", "--length", "6"],
        ["--task", "reber"],
    ],
    ids=["echo", "adding", "reber"],
)
def test_cli_advise_tasks(tmp_path, capsys, source):
    png, js = tmp_path / "a.png", tmp_path / "a.json"
    rc = main(["advise", *source, *FAST, "--hidden", "8", "--plot", str(png), "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "recommendation: TBPTT(k1=" in out or "no k2 up to" in out
    assert png.stat().st_size > 1000
    doc = json.loads(js.read_text())
    assert set(doc["recommendation"]) == {"k1", "k2", "overlap"}
    assert doc["decay"]["curve"][0] == 1.0
    assert {"decay curve", "k2 sweep"} <= set(doc["costs"])


def test_cli_advise_text_and_checkpoint(tmp_path, capsys):
    text = tmp_path / "book.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    model = tb.Model("gru", 4, 8, 30, vocab_size=30, seed=0)
    ckpt = tmp_path / "m.ckpt"
    model.save(ckpt)
    # a Model.save checkpoint holds no data: name it
    rc = main(["advise", str(ckpt), "--text", str(text), *FAST, "--json", "-"])
    out = capsys.readouterr().out
    assert rc == 0
    doc = json.loads(out)
    assert doc["model"].startswith("Model('gru'")
    assert doc["bias"]["rows"][-1]["k2"] is None
    assert doc["bias"]["rows"][-1]["cos_mean"] == 1.0
    rc = main(["advise", str(ckpt), *FAST])
    assert rc == 2 and "holds no record of its data" in capsys.readouterr().err
    rc = main(["advise", str(ckpt), "--text", str(text), "--hidden", "4"])
    assert rc == 2 and "--hidden" in capsys.readouterr().err


def test_cli_advise_plot_needs_matplotlib(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc = main(["advise", "--task", "echo", "--plot", "x.png"])
    err = capsys.readouterr().err
    assert rc == 1 and "matplotlib" in err


def test_cli_advise_moving_weights(capsys):
    rc = main(
        [
            *("advise", "--task", "echo", "--delay", "3", *FAST, "--hidden", "8"),
            *("--lr", "0.05", "--k2", "1,2,4,8,none"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "with moving weights" in out and "recompute" in out


def test_arguments_are_checked():
    model = tb.Model("lstm", 2, 4, 2)
    x, target = _data(0, 50, 2, 2, 2)
    with pytest.raises(ValueError, match="lags"):
        diag.decay_curve(model, x, target, lags=0)
    with pytest.raises(ValueError, match="x must have shape"):
        diag.decay_curve(model, x[..., :1], target)
    with pytest.raises(ValueError, match="multiple of k1"):
        diag.update_gradient(model, x[:7], target[:7], k1=2, k2=None)
    with pytest.raises(TypeError, match="optimizer"):
        diag.truncation_bias(model, x, target, optimizer="sgd")
    with pytest.raises(ValueError, match="threshold"):
        diag.advise(model, x, target, threshold=1.5)
    copy.deepcopy(model)
