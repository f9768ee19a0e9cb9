"""The command line's tasks and data loaders: what they generate, and the Reber optimum.

The Bayes-optimal loss of the embedded Reber stream is checked three ways: the
closed form from the grammar by hand (7 choices of a fair coin in 12 symbols),
and a Monte Carlo estimate made with a predictor written here independently of
``tasks.py`` (it parses the symbols with its own transcription of the grammar).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tbptt_fast.data import DataError, load_arrays, load_text
from tbptt_fast.tasks import (
    REBER_SYMBOLS,
    adding_problem,
    delayed_echo,
    embedded_reber_string,
    make_task,
    reber_bayes_losses,
    reber_optimum,
    reber_stream,
)

# ----------------------------------------------------------------------------
# An independent transcription of the embedded Reber grammar (Fahlman 1991)
# ----------------------------------------------------------------------------

# node -> {symbol: next node}; every node with two symbols picks each with probability 1/2
_INNER = {
    "n1": {"T": "n2", "P": "n3"},
    "n2": {"S": "n2", "X": "n4"},
    "n3": {"T": "n3", "V": "n5"},
    "n4": {"X": "n3", "S": "n6"},
    "n5": {"P": "n4", "V": "n6"},
    "n6": {"E": "close"},
}


def _predictor_losses(stream: str, remember_branch: bool = True) -> np.ndarray:
    """-log p(next symbol | symbols so far) of the exact predictor, for every symbol
    after the first, parsing the stream with the transcription above."""
    out = []
    where, branch = "outer-B", None  # what comes next
    for i, sym in enumerate(stream):
        if where == "outer-B":
            options, nxt = {"B": 1.0}, "branch"
        elif where == "branch":
            options, nxt = {"T": 0.5, "P": 0.5}, "inner-B"
        elif where == "inner-B":
            options, nxt = {"B": 1.0}, "n1"
        elif where == "close":
            options = {branch: 1.0} if remember_branch else {"T": 0.5, "P": 0.5}
            nxt = "outer-E"
        elif where == "outer-E":
            options, nxt = {"E": 1.0}, "outer-B"
        else:
            moves = _INNER[where]
            options = {s: 1.0 / len(moves) for s in moves}
            nxt = moves.get(sym)
        assert sym in options, (
            f"symbol {i} ({sym!r}) is not allowed after {stream[max(0, i - 20) : i]!r}"
        )
        if i > 0:
            out.append(-math.log(options[sym]))
        if where == "branch":
            branch = sym
        where = nxt
    return np.asarray(out)


def test_reber_optimum_matches_the_closed_form():
    # per embedded string: 1 outer choice + the inner string's expected choices (6),
    # over the expected length 12 (B, T|P, the inner string's 8, T|P, E)
    opt = reber_optimum()
    assert opt["bayes"] == pytest.approx(7 * math.log(2) / 12, rel=1e-12)
    assert opt["no_memory"] == pytest.approx(8 * math.log(2) / 12, rel=1e-12)
    assert opt["mean_length"] == pytest.approx(12.0, rel=1e-12)


def test_reber_optimum_matches_monte_carlo():
    """The exact predictor's empirical loss on a long generated stream equals the formula."""
    ids = reber_stream(200_000, 1, seed=7)[:, 0]
    stream = "".join(REBER_SYMBOLS[i] for i in ids)
    losses = _predictor_losses(stream)
    opt = reber_optimum()
    # per-symbol losses are 0 or ln 2: standard error about 0.34 / sqrt(n) (< 1e-3)
    assert abs(losses.mean() - opt["bayes"]) < 4e-3, (losses.mean(), opt["bayes"])
    forgetful = _predictor_losses(stream, remember_branch=False)
    assert abs(forgetful.mean() - opt["no_memory"]) < 4e-3
    # the per-step losses tasks.py computes are the same numbers
    mine = reber_bayes_losses(ids[:-1, None], ids[1:, None])[:, 0]
    np.testing.assert_allclose(mine, losses, atol=1e-12)


def test_reber_strings_follow_the_grammar():
    rng = np.random.default_rng(3)
    for _ in range(200):
        s = embedded_reber_string(rng)
        assert s[0] == "B" and s[-1] == "E" and s[1] == s[-2] and s[1] in "TP"
        _predictor_losses(s)  # asserts every symbol is allowed


def test_reber_task_masks_the_warm_up_string():
    task = make_task("reber", steps=300, batch=3, val_steps=100, seed=1)
    tr = task.train
    assert tr.x.dtype == np.int64 and tr.x.shape == (300, 3)
    np.testing.assert_array_equal(tr.x[1:], tr.target[:-1])
    for b in range(3):
        s = "".join(REBER_SYMBOLS[i] for i in tr.x[:, b])
        first = s.index("E", s.index("E") + 1) + 1  # the first embedded string's length
        assert not tr.mask[: first - 1, b].any() and tr.mask[first - 1 :, b].all()
    assert task.vocab == REBER_SYMBOLS and task.loss == "cross_entropy"
    assert task.optimum.loss == pytest.approx(reber_optimum()["bayes"])
    # validation streams are not the training streams
    assert not np.array_equal(task.val.x[:100], tr.x[:100])


def test_delayed_echo_data():
    x, target, mask = delayed_echo(50, 3, delay=4, seed=1)
    assert x.shape == target.shape == (50, 3, 1) and mask.shape == (50, 3)
    np.testing.assert_array_equal(target[4:], x[:-4])
    assert not mask[:4].any() and mask[4:].all()


def test_adding_problem_data():
    x, target, mask, resets = adding_problem(23, 4, length=5, seed=2)
    assert x.shape == (23, 4, 2) and target.shape == (23, 4, 1)
    np.testing.assert_array_equal(resets[:, 0], np.arange(23) % 5 == 0)
    np.testing.assert_array_equal(mask[:, 0], (np.arange(23) % 5 == 4) & (np.arange(23) < 20))
    for b in range(4):
        for start in range(0, 20, 5):
            seq = x[start : start + 5, b]
            marked = np.flatnonzero(seq[:, 1])
            assert len(marked) == 2 and marked[0] < 2 <= marked[1]  # one in each half
            assert target[start + 4, b, 0] == pytest.approx(seq[marked, 0].sum(), rel=1e-6)
    big = adding_problem(20000, 8, length=10, seed=0)
    sums = big[1][big[2]][:, 0]
    assert np.var(sums) == pytest.approx(1 / 6, rel=0.05)  # the mean predictor's mse


def test_tasks_are_reproducible_from_the_seed():
    a = make_task("echo", steps=100, batch=2, val_steps=10, seed=5)
    b = make_task("echo", steps=100, batch=2, val_steps=10, seed=5)
    c = make_task("echo", steps=100, batch=2, val_steps=10, seed=6)
    np.testing.assert_array_equal(a.train.x, b.train.x)
    assert not np.array_equal(a.train.x, c.train.x)
    ev = make_task("echo", steps=100, batch=2, val_steps=10, seed=5, split="evaluate")
    assert not np.array_equal(ev.val.x, a.val.x)


# ----------------------------------------------------------------------------
# User data
# ----------------------------------------------------------------------------


def test_text_is_split_into_contiguous_streams(tmp_path):
    text = "".join(chr(ord("a") + i % 7) for i in range(1000))
    path = tmp_path / "t.txt"
    path.write_text(text)
    task = load_text(path, batch=4, val=0.1)
    assert task.vocab == "abcdefg" and task.vocab_size == 7
    ids = np.array([task.vocab.index(c) for c in text])
    n = 900 // 4
    np.testing.assert_array_equal(task.train.x[:, 1], ids[n : 2 * n - 1])
    np.testing.assert_array_equal(task.train.target[:, 1], ids[n + 1 : 2 * n])
    # the validation tail continues after the training part
    np.testing.assert_array_equal(task.val.x[:, 0], ids[899 : 899 + task.val.steps])


def test_arrays_next_step_and_explicit_targets(tmp_path):
    x = np.arange(40, dtype=np.float64).reshape(20, 2)
    np.save(tmp_path / "s.npy", x)
    task = load_arrays(tmp_path / "s.npy", batch=2, val=0.0)
    assert task.loss == "mse" and task.train.x.shape == (9, 2, 2)
    np.testing.assert_array_equal(task.train.target[:-1], task.train.x[1:])
    xs = np.random.default_rng(0).standard_normal((30, 3, 2))
    y = np.arange(90).reshape(30, 3) % 4
    np.savez(tmp_path / "c.npz", x=xs, y=y)
    task = load_arrays(tmp_path / "c.npz", batch=99, val=0.2)
    assert task.loss == "cross_entropy" and task.output_size == 4
    assert task.train.x.shape == (24, 3, 2) and task.val.x.shape == (6, 3, 2)


def test_csv_columns_and_standardisation(tmp_path):
    rows = ["t,a,b"] + [f"{i},{i * 2},{i % 3}" for i in range(50)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    task = load_arrays(tmp_path / "d.csv", batch=2, val=0.0, columns="a,2", target_columns="t")
    assert task.input_size == 2 and task.output_size == 1
    flat = task.train.x.reshape(-1, 2)
    np.testing.assert_allclose(flat.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(flat.std(0), 1, atol=1e-5)


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("a.csv", "a,b\n1,2\n3,oops\n", "line 3, column 'b': 'oops' is not a number"),
        ("b.csv", "a,b\n1,2\n3\n", "line 3 has 1 fields, expected 2"),
        ("c.npy", b"not numpy", "is not a .npy or .npz file"),
        ("d.txt", b"\xff\xfe\x00", "is not UTF-8 text"),
        ("e.dat", b"1 2 3", "unknown kind of data file '.dat'"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    load = load_text if name.endswith(".txt") else load_arrays
    with pytest.raises(DataError) as e:
        load(path, 2, 0.1)
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert str(path) in str(e.value)


def test_bad_arrays(tmp_path):
    np.savez(tmp_path / "a.npz", y=np.zeros((5, 1)))
    with pytest.raises(DataError, match="holds no array 'x'"):
        load_arrays(tmp_path / "a.npz", 1, 0.0)
    np.save(tmp_path / "b.npy", np.zeros((5, 2, 3, 4)))
    with pytest.raises(DataError, match=r"x must have shape \[T, D\] or \[T, B, D\]"):
        load_arrays(tmp_path / "b.npy", 1, 0.0)
    np.save(tmp_path / "c.npy", np.array([[1.0, np.nan]] * 5))
    with pytest.raises(DataError, match="NaN"):
        load_arrays(tmp_path / "c.npy", 1, 0.0)
    np.save(tmp_path / "d.npy", np.array([object()] * 5))
    with pytest.raises(DataError, match="pickled"):
        load_arrays(tmp_path / "d.npy", 1, 0.0)
