"""The command line's built-in tasks, generated from a seed, each with a known horizon or optimum.

Every task is a set of B parallel streams, time first, ready for ``Trainer.fit``:

- **echo** (delayed echo): ``x_t`` standard normal, the target is ``x_{t-d}``,
  the input ``d`` steps ago (mse; no target for the first ``d`` steps). The
  memory horizon is ``d``: the gradient must reach back ``d`` steps, so only a
  window ``k2 > d`` learns it. Predicting zero, the best without memory,
  scores an mse of 1.
- **adding** (Hochreiter & Schmidhuber 1997): sequences of ``n`` steps laid
  end to end, each step ``(value, marker)`` with values uniform in [0, 1] and
  exactly two markers, one in each half; at the last step of a sequence the
  target is the sum of the two marked values (mse; no other step has a
  target). A reset starts each sequence, so the horizon is ``n``. Predicting
  the mean (1) scores ``Var(u1 + u2) = 1/6``.
- **reber** (the embedded Reber grammar as one endless stream of strings):
  predict the next symbol (cross-entropy, token inputs; the first string of
  each stream is a warm-up without targets). Every choice of the
  generator is a fair coin, so the Bayes-optimal loss per symbol, computed
  exactly from the grammar by :func:`reber_optimum`, is ``7 ln 2 / 12``
  nats: 7 choices in 12 symbols on average. The symbol before the final ``E``
  repeats the second symbol of the string, about 10 symbols back: a predictor
  without that memory is stuck at ``8 ln 2 / 12``.

Validation streams are generated from the same seed through another branch of
``numpy.random.SeedSequence``, so they are held out from training; a third
branch gives ``tbptt-fast evaluate`` fresh streams.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "REBER_GRAMMAR",
    "REBER_SYMBOLS",
    "TASKS",
    "Baseline",
    "Split",
    "TaskData",
    "adding_problem",
    "delayed_echo",
    "embedded_reber_chain",
    "embedded_reber_string",
    "make_task",
    "reber_bayes_losses",
    "reber_optimum",
    "reber_stream",
    "seeds",
]

TASKS = ("echo", "adding", "reber")


@dataclass
class Split:
    """One split of a task: B streams of T steps, time first, as ``Trainer.fit`` takes them.

    ``x``: [T, B, D] float32, or integer ids [T, B] for a token task; ``target``:
    [T, B, O] float32 (mse) or integer classes [T, B] (cross_entropy); ``mask``,
    ``resets``: [T, B] bool or None.
    """

    x: np.ndarray
    target: np.ndarray
    mask: np.ndarray | None = None
    resets: np.ndarray | None = None

    @property
    def steps(self) -> int:
        return int(self.x.shape[0])

    @property
    def batch(self) -> int:
        return int(self.x.shape[1])

    def window(self, lo: int, hi: int) -> Split:
        """Steps ``lo .. hi-1`` of every stream."""
        return Split(
            self.x[lo:hi],
            self.target[lo:hi],
            None if self.mask is None else self.mask[lo:hi],
            None if self.resets is None else self.resets[lo:hi],
        )


@dataclass
class Baseline:
    """A reference loss a model is measured against, e.g. chance or the optimum."""

    label: str  # e.g. "predicting zero (no memory)"
    loss: float
    optimum: bool = False  # True: the best any model can do


@dataclass
class TaskData:
    """A task or a data set, ready to train on: the splits and what to compare with.

    Attributes:
        name: "echo", "adding", "reber", "text" or "data".
        title: one line for people, e.g. "delayed echo (delay 10)".
        loss: "mse" or "cross_entropy".
        input_size: D (the embedding's input for a token task is chosen by the model).
        output_size: O (the number of classes for cross_entropy).
        vocab_size: V for token inputs (integer ids), else None.
        train, val: the training and the held-out splits (``val`` None if none).
        baselines: reference losses (chance, optimum) in the loss's units.
        horizon: how many steps back the target depends on (None: unknown).
        vocab: the characters or symbols of the ids (text and reber), else None.
        meta: JSON-able facts a checkpoint keeps (e.g. a data scaler).
    """

    name: str
    title: str
    loss: str
    input_size: int
    output_size: int
    vocab_size: int | None
    train: Split
    val: Split | None
    baselines: list[Baseline] = field(default_factory=list)
    horizon: int | None = None
    vocab: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def optimum(self) -> Baseline | None:
        return next((b for b in self.baselines if b.optimum), None)

    @property
    def chance(self) -> Baseline | None:
        return next((b for b in self.baselines if not b.optimum), None)


def seeds(seed: int) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
    """Independent generators for the training, validation and evaluation streams."""
    return tuple(np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))


def _rng(seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


# ----------------------------------------------------------------------------
# Delayed echo
# ----------------------------------------------------------------------------


def delayed_echo(steps: int, batch: int, delay: int, seed=0):
    """The delayed echo: reproduce the input ``delay`` steps later.

    Returns ``x`` [T, B, 1] float32 (standard normal), ``target`` [T, B, 1]
    (``target[t] = x[t - delay]``) and ``mask`` [T, B] bool (False for the
    first ``delay`` steps, which have nothing to echo). ``seed``: an int or a
    ``numpy.random.Generator``.
    """
    x = _rng(seed).standard_normal((steps, batch, 1)).astype(np.float32)
    target = np.zeros_like(x)
    target[delay:] = x[: steps - delay]
    mask = np.ones((steps, batch), bool)
    mask[:delay] = False
    return x, target, mask


# ----------------------------------------------------------------------------
# The adding problem
# ----------------------------------------------------------------------------


def adding_problem(steps: int, batch: int, length: int, seed=0):
    """The adding problem (Hochreiter & Schmidhuber 1997) as streams of sequences.

    Each stream holds sequences of ``length`` steps end to end (a last partial
    sequence has no target). Step ``t`` of a sequence is ``(value, marker)``:
    ``value`` uniform in [0, 1], ``marker`` 1 at two steps, one drawn from the
    first half and one from the second half, else 0. The target, at the last
    step of each sequence only, is the sum of the two marked values.

    Returns ``x`` [T, B, 2] float32, ``target`` [T, B, 1] float32, ``mask``
    [T, B] bool (the last step of each whole sequence) and ``resets`` [T, B]
    bool (the first step of each sequence).
    """
    if length < 2:
        raise ValueError(f"the adding problem needs sequences of >= 2 steps, got {length}")
    rng = _rng(seed)
    n = -(-steps // length)  # sequences per stream, the last one maybe partial
    values = rng.uniform(0.0, 1.0, size=(n, length, batch))
    half = length // 2
    first = rng.integers(0, half, size=(n, batch))
    second = rng.integers(half, length, size=(n, batch))
    markers = np.zeros((n, length, batch))
    seq, col = np.meshgrid(np.arange(n), np.arange(batch), indexing="ij")
    markers[seq, first, col] = 1.0
    markers[seq, second, col] = 1.0
    total = values[seq, first, col] + values[seq, second, col]  # [n, B]
    x = np.stack([values, markers], axis=-1).reshape(n * length, batch, 2)[:steps]
    target = np.zeros((n, length, batch, 1))
    target[:, -1, :, 0] = total
    target = target.reshape(n * length, batch, 1)[:steps]
    pos = np.arange(steps) % length
    whole = np.arange(steps) < (steps // length) * length
    mask = np.repeat(((pos == length - 1) & whole)[:, None], batch, axis=1)
    resets = np.repeat((pos == 0)[:, None], batch, axis=1)
    return x.astype(np.float32), target.astype(np.float32), mask, resets


# ----------------------------------------------------------------------------
# The embedded Reber grammar
# ----------------------------------------------------------------------------

#: The symbols, in the order of their ids.
REBER_SYMBOLS = "BTPSXVE"

#: The Reber grammar (Reber 1967; the form used by Fahlman 1991 and Hochreiter &
#: Schmidhuber 1997): state -> the (symbol, next state) pairs it may emit, each
#: with probability 1/2. A string is "B", then the walk from state 1 to state 6,
#: then "E".
REBER_GRAMMAR = {
    1: (("T", 2), ("P", 3)),
    2: (("S", 2), ("X", 4)),
    3: (("T", 3), ("V", 5)),
    4: (("X", 3), ("S", 6)),
    5: (("P", 4), ("V", 6)),
}


def _reber_string(rng: np.random.Generator) -> str:
    out, state = ["B"], 1
    while state != 6:
        choices = REBER_GRAMMAR[state]
        symbol, state = choices[int(rng.integers(len(choices)))]
        out.append(symbol)
    out.append("E")
    return "".join(out)


def embedded_reber_string(rng: np.random.Generator) -> str:
    """One embedded Reber string: ``B``, ``T`` or ``P``, a Reber string, the same ``T``/``P``, ``E``."""
    branch = "TP"[int(rng.integers(2))]
    return "B" + branch + _reber_string(rng) + branch + "E"


def reber_stream(steps: int, batch: int, seed=0) -> np.ndarray:
    """B streams of embedded Reber strings end to end: ids [steps, B] (int64) of
    :data:`REBER_SYMBOLS`; each stream starts at the beginning of a string."""
    rng = _rng(seed)
    lookup = {s: i for i, s in enumerate(REBER_SYMBOLS)}
    out = np.empty((steps, batch), np.int64)
    for b in range(batch):
        parts, n = [], 0
        while n < steps:
            s = embedded_reber_string(rng)
            parts.append(s)
            n += len(s)
        out[:, b] = [lookup[c] for c in "".join(parts)[:steps]]
    return out


def embedded_reber_chain():
    """The generator of the stream as a Markov chain whose states emit the symbols.

    Returns ``(states, emit)``: ``emit[s]`` lists ``(probability, symbol, next
    state)``. A state is what the generator knows before the next symbol:
    ``"start"`` (emits B), ``"branch"`` (T or P), then ``(branch, q)`` through
    the inner string (``q`` = "B", the grammar's states 1..5, then 6 which
    emits E, then "close" which emits the branch's symbol again), and ``"end"``
    (the final E), after which the next string starts.
    """
    emit = {"start": [(1.0, "B", "branch")], "branch": []}
    for br in "TP":
        emit["branch"].append((0.5, br, (br, "B")))
        emit[(br, "B")] = [(1.0, "B", (br, 1))]
        for q, choices in REBER_GRAMMAR.items():
            emit[(br, q)] = [(1.0 / len(choices), sym, (br, nxt)) for sym, nxt in choices]
        emit[(br, 6)] = [(1.0, "E", (br, "close"))]
        emit[(br, "close")] = [(1.0, br, "end")]
    emit["end"] = [(1.0, "E", "start")]
    return list(emit), emit


def reber_optimum() -> dict[str, float]:
    """The best possible next-symbol losses on the embedded Reber stream (nats per symbol).

    Every state of :func:`embedded_reber_chain` emits distinct symbols, so the
    symbols seen so far determine the state and the Bayes-optimal prediction
    of the next symbol is the state's emission distribution. The long-run loss
    per symbol is therefore ``sum_s pi(s) H(s)``, with ``pi`` the chain's
    stationary distribution and ``H(s)`` the entropy of state ``s``'s
    emissions. Returns:

    - ``"bayes"``: that optimum (``7 ln 2 / 12`` = 0.4043);
    - ``"no_memory"``: the optimum of a predictor that has forgotten which of
      T/P opened the string (the states of the two branches merged, their
      predictions mixed by ``pi``): ``8 ln 2 / 12`` = 0.4621;
    - ``"mean_length"``: the mean length of an embedded string (12).
    """
    states, emit = embedded_reber_chain()
    index = {s: i for i, s in enumerate(states)}
    n = len(states)
    P = np.zeros((n, n))
    for s, out in emit.items():
        symbols = [sym for _, sym, _ in out]
        assert len(set(symbols)) == len(symbols), f"state {s} emits a symbol twice"
        assert math.isclose(sum(p for p, _, _ in out), 1.0)
        for p, _, nxt in out:
            P[index[s], index[nxt]] += p
    # pi P = pi, sum(pi) = 1
    A = np.vstack([P.T - np.eye(n), np.ones((1, n))])
    rhs = np.zeros(n + 1)
    rhs[-1] = 1.0
    pi = np.linalg.lstsq(A, rhs, rcond=None)[0]

    def entropy(dist: dict[str, float]) -> float:
        return -sum(p * math.log(p) for p in dist.values() if p > 0)

    bayes = sum(pi[index[s]] * entropy({sym: p for p, sym, _ in emit[s]}) for s in states)
    merged: dict[object, tuple[float, dict[str, float]]] = {}
    for s in states:
        key = s[1] if isinstance(s, tuple) else s  # forget the branch
        w, dist = merged.get(key, (0.0, {}))
        ws = pi[index[s]]
        for p, sym, _ in emit[s]:
            dist[sym] = dist.get(sym, 0.0) + ws * p
        merged[key] = (w + ws, dist)
    no_memory = sum(w * entropy({k: v / w for k, v in d.items()}) for w, d in merged.values())
    return {"bayes": float(bayes), "no_memory": float(no_memory), "mean_length": float(1 / pi[0])}


def reber_bayes_losses(x: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The Bayes-optimal loss of each prediction on given Reber streams.

    ``x``, ``target``: ids [T, B] with ``target[t] = x[t+1]``, each stream
    starting at the beginning of a string (as :func:`reber_stream` makes
    them). Returns [T, B] float64: ``-log p(target[t] | x[0..t])`` under the
    generator, found by following :func:`embedded_reber_chain` through the
    symbols. Its mean over a long stream tends to ``reber_optimum()["bayes"]``;
    on the streams a model was evaluated on it is the optimum for exactly those
    symbols. A symbol the grammar does not allow there is a ``ValueError``.
    """
    states, emit = embedded_reber_chain()
    index = {s: i for i, s in enumerate(states)}
    n, V = len(states), len(REBER_SYMBOLS)
    nxt = np.full((n, V), -1, np.int64)
    logp = np.full((n, V), -np.inf)
    for s, out in emit.items():
        for p, sym, to in out:
            nxt[index[s], REBER_SYMBOLS.index(sym)] = index[to]
            logp[index[s], REBER_SYMBOLS.index(sym)] = math.log(p)
    x = np.asarray(x)
    target = np.asarray(target)
    state = np.full(x.shape[1], index["start"])
    out = np.empty(x.shape, np.float64)
    for t in range(x.shape[0]):
        state = nxt[state, x[t]]
        if (state < 0).any():
            raise ValueError(f"step {t} is not an embedded Reber stream")
        out[t] = -logp[state, target[t]]
    if not np.isfinite(out).all():
        raise ValueError("a target is not a symbol the grammar allows there")
    return out


# ----------------------------------------------------------------------------
# Building a task
# ----------------------------------------------------------------------------


def _echo(steps, batch, rng, delay):
    x, target, mask = delayed_echo(steps, batch, delay, rng)
    return Split(x, target, mask)


def _adding(steps, batch, rng, length):
    return Split(*adding_problem(steps, batch, length, rng))


def _reber(steps, batch, rng):
    ids = reber_stream(steps + 1, batch, rng)
    # No target before the first string ends: a model's zero initial state is
    # not a state of the generator, and its warm-up would blur the comparison
    # with the optimum. An embedded string ends at its second E.
    ends = np.cumsum(ids == REBER_SYMBOLS.index("E"), axis=0)
    mask = ends[:-1] >= 2
    return Split(ids[:-1], ids[1:], mask)


def make_task(
    name: str,
    *,
    steps: int,
    batch: int,
    val_steps: int,
    seed: int = 0,
    delay: int = 10,
    length: int = 20,
    split: str = "train",
) -> TaskData:
    """A built-in task: training streams of ``steps`` steps and validation streams
    of ``val_steps`` steps (none if 0), ``batch`` streams each, from ``seed``.

    ``split="evaluate"`` puts fresh streams (a third generator) in ``val``
    instead, for ``tbptt-fast evaluate``; ``train`` then holds one step.
    """
    if name not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {name!r}")
    train_rng, val_rng, eval_rng = seeds(seed)
    if split == "evaluate":
        steps, val_rng = 1, eval_rng
    if name == "echo":
        if delay < 1:
            raise ValueError(f"--delay must be >= 1, got {delay}")
        make = lambda T, rng: _echo(T, batch, rng, delay)  # noqa: E731
        baselines = [Baseline("predicting zero (no memory)", 1.0)]
        task = dict(
            title=f"delayed echo (delay {delay}): the target is the input {delay} steps ago",
            loss="mse",
            input_size=1,
            output_size=1,
            vocab_size=None,
            horizon=delay,
            meta={"delay": delay},
        )
    elif name == "adding":
        if length < 2:
            raise ValueError(f"--length must be >= 2, got {length}")
        make = lambda T, rng: _adding(T, batch, rng, length)  # noqa: E731
        baselines = [Baseline("predicting the mean, 1 (no memory)", 1.0 / 6.0)]
        task = dict(
            title=(
                f"adding problem (sequences of {length} steps): the sum of the two marked "
                "values, at each sequence's last step"
            ),
            loss="mse",
            input_size=2,
            output_size=1,
            vocab_size=None,
            horizon=length,
            meta={"length": length},
        )
    else:
        opt = reber_optimum()
        make = lambda T, rng: _reber(T, batch, rng)  # noqa: E731
        baselines = [
            Baseline("without memory of the string's 2nd symbol", opt["no_memory"]),
            Baseline("Bayes-optimal", opt["bayes"], optimum=True),
        ]
        task = dict(
            title="embedded Reber grammar: predict the next symbol of an endless stream of strings",
            loss="cross_entropy",
            input_size=len(REBER_SYMBOLS),
            output_size=len(REBER_SYMBOLS),
            vocab_size=len(REBER_SYMBOLS),
            horizon=None,
            vocab=REBER_SYMBOLS,
            meta={},
        )
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    train = make(steps, train_rng)
    val = make(val_steps, val_rng) if val_steps > 0 else None
    return TaskData(name=name, train=train, val=val, baselines=baselines, **task)
