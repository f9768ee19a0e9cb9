"""How far back the gradient reaches, what truncation costs, and which k1/k2 to use.

The measurements behind ``tbptt-fast advise``, on a model (fresh or trained)
and data (``x`` [T, B, D] time first, or token ids [T, B]; ``target``, ``mask``,
``resets`` as :meth:`Trainer.fit` takes them):

- :func:`decay_curve`: the gradient-decay curve. For a loss at step ``t``
  alone, the norm of its gradient with respect to the state after step
  ``t - j``, ``j = 0..J``, averaged over positions ``t`` and batch elements,
  divided by the same average at ``j = 0``: how fast the gradient vanishes (or
  explodes) as it flows back, with a fitted decay rate per step and the lag
  at which it falls below a threshold. The *state* is every layer's state
  together: ``h`` for rnn_tanh, rnn_relu and gru, ``h`` and ``c``
  concatenated for lstm and cifg (the cell state is what carries an LSTM's
  long memory, so leaving it out would hide it).
- :func:`truncation_bias`: over segments of the data, the cosine similarity
  and the relative error between the TBPTT(k1, k2) update gradient and the
  untruncated gradient of the same block loss (``k2=None`` from the segment
  start), for each ``k2`` given.
- :func:`throughput`: timesteps per second of an engine at TBPTT(k1, k2).
- :func:`advise`: all three, and a recommendation: the smallest ``k2`` whose
  cosine reaches a threshold (0.95), and the ``k1`` with the best measured
  speed per unit of bias at that ``k2``.

Which engine computes what, and the cost
----------------------------------------
Nothing here implements a cell: every gradient comes from one of the
project's engines.

- The decay curve runs on the NumPy reference engine
  (:class:`tbptt_fast.reference.Engine`), which records the per-step state
  gradient of its window backward through its ``state_grad_hook``. The
  ``P`` positions are stacked side by side in the batch, each with its own
  entering state, and every loss but the one at the window's last step is
  masked out, so ONE forward and ONE backward pass of ``J`` steps over
  ``P * B`` streams give the whole curve. Finding the ``P`` entering states
  takes one forward-only pass over the data up to the last position (on the
  ``backend`` given).
- The truncation bias runs on any backend through the public
  :class:`~tbptt_fast.Trainer`. With frozen weights (the default,
  ``optimizer=None``) the update at the end of a segment of ``n`` steps sees
  the same weights whatever came before it, so it is computed as the single
  update of ``Trainer(k1=n, k2)`` with the losses of every step outside the
  compared block masked out (the contract's window rule makes its window
  ``(n - k2, n]``, that of a regular TBPTT(k1, k2) update at step ``n``).
  Per segment: one forward pass of ``n`` steps and one backward of ``n``
  steps for the untruncated gradient, then for each ``k2`` one forward of
  ``n`` steps and one backward of ``min(k2, n)`` steps. The two overlap rules
  give the same gradient when the weights do not change (they differ only in
  which weights the stored activations were computed with), so a frozen
  measurement has one row per ``k2``, marked ``overlap="both"``.
  With an ``optimizer`` (moving weights) each run really trains through the
  segment with TBPTT(k1, k2) under each overlap rule, and its last update's
  gradient is compared with the untruncated gradient of that block's loss at
  the weights that update saw (recomputed from the segment start): per
  segment, ``k2`` and rule, one forward of ``n`` steps, ``n / k1`` backward
  passes of up to ``k2`` steps, and one forward and one backward of ``n``
  steps for the reference gradient.
- The throughput is the wall time of a ``Trainer.fit`` on the backend.

:class:`Cost` counts what was run (cell steps per stream) and the time.

The readout's gradient is left out of the comparison: every loss reaches
the readout directly, so its gradient is the same for every ``k2`` and
would only dilute the cosine. The comparison is over every other parameter
(the recurrent layers, and the embedding of a token model), in float64.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ._config import EngineConfig
from .model import Model
from .optim import SGD, Adam
from .reference import Engine as ReferenceEngine
from .reference import state_count
from .tasks import Split

__all__ = [
    "Advice",
    "BiasRow",
    "BiasTable",
    "Cost",
    "DecayCurve",
    "advise",
    "decay_curve",
    "default_k2_grid",
    "throughput",
    "truncation_bias",
    "update_gradient",
]

OVERLAPS = ("stored", "recompute")


# ----------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------


@dataclass
class Cost:
    """What a measurement ran, counted in cell steps per stream.

    ``forward_steps``: steps of forward passes (each over the batch's streams;
    the decay curve's stacked positions count once per position);
    ``backward_steps``: steps of backward passes, the same way; ``fits``:
    ``Trainer.fit`` / engine ``run`` calls; ``seconds``: wall time.
    """

    forward_steps: int = 0
    backward_steps: int = 0
    fits: int = 0
    seconds: float = 0.0

    def add(self, other: Cost) -> None:
        self.forward_steps += other.forward_steps
        self.backward_steps += other.backward_steps
        self.fits += other.fits
        self.seconds += other.seconds

    def line(self) -> str:
        return (
            f"{self.forward_steps:,} forward and {self.backward_steps:,} backward cell steps "
            f"per stream in {self.fits:,} engine calls, {self.seconds:.2f} s"
        )


@dataclass
class DecayCurve:
    """The gradient-decay curve (see :func:`decay_curve`).

    Attributes:
        lags: [J+1] int64, ``j = 0..J``.
        norms: [J+1] float64, the mean over (position, element) pairs with a
            target of ``||d l_t / d s_{t-j}||``, the per-pair loss's gradient
            with respect to the state ``s`` after step ``t - j`` (every layer;
            ``(h, c)`` concatenated for lstm and cifg).
        curve: [J+1] float64, ``norms / norms[0]`` (``curve[0] = 1``).
        rate: the fitted decay factor per step: ``curve[j] ~ C * rate**j``, a
            least-squares line through ``log curve[j]``, ``j = 1..J``, over the
            lags where it is positive (NaN with fewer than two). Below 1
            vanishes, above 1 explodes.
        threshold: the level the horizon is measured against.
        horizon: the smallest lag ``j >= 1`` with ``curve[j] < threshold``;
            None if the curve stays above it up to ``J``.
        positions: the steps ``t`` used (0-based indices into the data).
        pairs: the number of (position, element) pairs with a target.
        cost: what it ran.
    """

    lags: np.ndarray
    norms: np.ndarray
    curve: np.ndarray
    rate: float
    threshold: float
    horizon: int | None
    positions: np.ndarray
    pairs: int
    cost: Cost = field(default_factory=Cost)

    def as_dict(self) -> dict:
        return {
            "lags": self.lags.tolist(),
            "norms": self.norms.tolist(),
            "curve": self.curve.tolist(),
            "rate": _json_float(self.rate),
            "threshold": self.threshold,
            "horizon": self.horizon,
            "positions": self.positions.tolist(),
            "pairs": self.pairs,
            "cost": asdict(self.cost),
        }


@dataclass
class BiasRow:
    """The bias of one TBPTT(k1, k2) under one overlap rule, over the segments.

    ``overlap``: "stored", "recompute", or "both" (frozen weights: the rules
    give the same gradient). ``cos_mean``, ``cos_min``: the cosine similarity
    between the truncated and the untruncated gradient (1 = same direction);
    ``rel_mean``, ``rel_max``: ``||g_k2 - g_full|| / ||g_full||``;
    ``segments``: how many segments were compared.
    """

    k1: int
    k2: int | None
    overlap: str
    cos_mean: float
    cos_min: float
    rel_mean: float
    rel_max: float
    segments: int

    @property
    def bias(self) -> float:
        """``1 - cos_mean``: 0 when the truncated gradient points the same way."""
        return 1.0 - self.cos_mean


@dataclass
class BiasTable:
    """What :func:`truncation_bias` returns: one :class:`BiasRow` per (k2, rule).

    ``segment_steps``: n, the steps of each segment; ``starts``: the 0-based
    index of each segment's first step; ``frozen``: True when the weights
    did not move (no optimizer); ``cost``: what it ran.
    """

    k1: int
    rows: list[BiasRow]
    segment_steps: int
    starts: list[int]
    frozen: bool
    cost: Cost = field(default_factory=Cost)

    def row(self, k2: int | None, overlap: str = "both") -> BiasRow:
        """The row of ``k2`` under ``overlap`` (a frozen table answers any rule)."""
        for r in self.rows:
            if r.k2 == k2 and (r.overlap == overlap or r.overlap == "both"):
                return r
        raise KeyError(f"no row for k2={k2}, overlap={overlap!r}")

    def as_dict(self) -> dict:
        return {
            "k1": self.k1,
            "segment_steps": self.segment_steps,
            "starts": self.starts,
            "frozen": self.frozen,
            "rows": [
                {k: (_json_float(v) if isinstance(v, float) else v) for k, v in asdict(r).items()}
                | {"bias": _json_float(r.bias)}
                for r in self.rows
            ],
            "cost": asdict(self.cost),
        }


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------


@dataclass
class _Data(Split):
    """Validated data in the engines' form: x [T, B, D] model dtype (or int64
    ids [T, B]), target [T, B, O] or int64 [T, B], mask [T, B] model dtype (all
    ones when none was given), resets [T, B] uint8 or None."""

    loss: str = "mse"

    def part(self, lo: int, hi: int) -> tuple:
        w = self.window(lo, hi)
        return w.x, w.target, w.mask, w.resets


def _data(model: Model, x, target, mask, resets, loss: str) -> _Data:
    """Validate once, with the trainer's own checks (messages name the argument)."""
    from .trainer import Trainer

    if not isinstance(model, Model):
        raise TypeError(f"model must be a tbptt_fast.Model, got {type(model).__name__}")
    probe = Trainer(model, k1=1, loss=loss, optimizer=SGD(lr=0.0), backend="numpy")
    xa, ta, mf, ru = probe._check_data(x, target, mask, resets, step=False).args
    model._trainers.discard(probe)
    if mf is None:
        mf = np.ones(xa.shape[:2], model.dtype)
    return _Data(xa, ta, mf, ru, loss)


def _flat_zeros(model: Model, batch: int) -> list[np.ndarray]:
    n = state_count(model.cell) * model.num_layers
    return [np.zeros((batch, model.hidden_size), model.dtype) for _ in range(n)]


def _entering_states(model: Model, data: _Data, starts, backend: str, cost: Cost) -> dict:
    """``{s: flat state entering step s}`` for each 0-based step ``s`` in ``starts``,
    from one forward-only pass from zeros (a reset restores zeros, as in training)."""
    from .inference import forward_engine

    engine = forward_engine(model, backend)
    zeros = _flat_zeros(model, data.batch)
    out, carry, pos = {}, zeros, 0
    for s in sorted(set(int(v) for v in starts)):
        if s > pos:
            r = None if data.resets is None else np.ascontiguousarray(data.resets[pos:s])
            _, carry = engine.forward(np.ascontiguousarray(data.x[pos:s]), r, carry, zeros)
            cost.forward_steps += s - pos
            cost.fits += 1
            pos = s
        out[s] = [np.array(a, copy=True) for a in carry]
    return out


def _nested(model: Model, flat: list[np.ndarray]) -> list:
    if state_count(model.cell) == 2:
        return [(flat[2 * k], flat[2 * k + 1]) for k in range(model.num_layers)]
    return list(flat)


def _json_float(v: float):
    return None if v is None or not math.isfinite(v) else float(v)


# ----------------------------------------------------------------------------
# The gradient-decay curve
# ----------------------------------------------------------------------------


def decay_curve(
    model: Model,
    x,
    target,
    mask=None,
    resets=None,
    *,
    loss: str = "mse",
    lags: int = 64,
    positions: int = 16,
    threshold: float = 0.01,
    backend: str = "cpu",
) -> DecayCurve:
    """The gradient-decay curve: how the gradient of one step's loss shrinks (or
    grows) as it flows back through the state.

    For ``P = positions`` steps ``t`` spread evenly over the data's steps with
    a target (at least ``J - 1`` steps in), and every batch element ``b`` with
    a target at ``t``, the norm of the gradient of the per-pair loss
    ``l_tb`` with respect to the state after step ``t - j``, ``j = 0..J``
    (``J = min(lags, T)``), averaged over those pairs and divided by its value
    at ``j = 0``. The state is every layer's, with ``h`` and ``c``
    concatenated for lstm and cifg. A reset at or before ``t`` (after ``t-j``)
    cuts the gradient: the curve of that pair is 0 from there on.

    Args:
        model: the :class:`Model` (not changed).
        x, target, mask, resets: the data, as :meth:`Trainer.fit` takes them
            (time first: x [T, B, D] or ids [T, B]; target [T, B, O] or
            classes [T, B]; mask, resets [T, B] or None).
        loss: "mse" or "cross_entropy".
        lags: J, the largest lag (int >= 1).
        positions: P, the number of steps ``t`` (int >= 1).
        threshold: the level of ``curve`` that defines the horizon (> 0).
        backend: the engine of the forward pass that finds the states entering
            each window ("cpu", "numpy" or "cuda"); the curve itself is always
            computed by the NumPy reference engine.

    Returns:
        :class:`DecayCurve` (float64 arrays of J+1 values).

    Cost: one forward-only pass over the data up to the last position, then
    one forward and one backward pass of J steps of the reference engine over
    ``P * B`` streams at once (``P * J`` forward and ``P * J`` backward steps
    per stream).
    """
    lags = _positive_int("lags", lags)
    positions = _positive_int("positions", positions)
    threshold = _positive_float("threshold", threshold)
    data = _data(model, x, target, mask, resets, loss)
    t0 = time.perf_counter()
    cost = Cost()
    T, B = data.steps, data.batch
    J = min(lags, T)
    has_target = data.mask.any(axis=1)
    candidates = np.flatnonzero(has_target[J - 1 :]) + (J - 1)
    if len(candidates) == 0:
        raise ValueError(f"the data have no step with a target at or after step {J} (lags={J})")
    pick = np.unique(np.linspace(0, len(candidates) - 1, positions).round().astype(int))
    ts = candidates[pick]
    starts = ts - J + 1  # the first step of each window
    entering = _entering_states(model, data, starts, backend, cost)

    # The P windows side by side in the batch: element p * B + b.
    P = len(ts)
    xw = np.concatenate([data.x[s : s + J] for s in starts], axis=1)
    tw = np.concatenate([data.target[s : s + J] for s in starts], axis=1)
    mw = np.zeros((J, P * B), model.dtype)
    mw[-1] = np.concatenate([data.mask[t] for t in ts])
    if data.resets is not None:
        rw = np.concatenate([data.resets[s : s + J] for s in starts], axis=1)
        cut = rw.any(axis=0)  # a reset inside the window: see below
    else:
        rw, cut = None, np.zeros(P * B, bool)
    # The state entering each window; where a reset lies inside the window it
    # is zeros instead (the state a reset restores): the loss at t depends only
    # on the steps after the last reset, and no gradient crosses it, so this
    # changes nothing the curve measures.
    init = []
    for i in range(len(_flat_zeros(model, 1))):
        a = np.concatenate([entering[s][i] for s in starts], axis=0)
        a[cut] = 0
        init.append(np.ascontiguousarray(a, dtype=model.dtype))

    config = EngineConfig.from_trainer_parts(model, J, None, loss, "stored", None, SGD(lr=0.0))
    engine = ReferenceEngine(config, [p.copy() for p in model.param_list()])
    engine.reset(init)
    sq = np.zeros((J + 1, P * B), np.float64)  # squared norms, per lag and element

    def record(layer: int, step: int, d_state: tuple) -> None:
        for a in d_state:
            sq[J - step] += np.sum(np.asarray(a, np.float64) ** 2, axis=1)

    engine.state_grad_hook = record
    engine.run(
        np.ascontiguousarray(xw),
        np.ascontiguousarray(tw),
        np.ascontiguousarray(mw),
        None if rw is None else np.ascontiguousarray(rw),
        True,
        False,
        False,
    )
    cost.forward_steps += P * J
    cost.backward_steps += P * J
    cost.fits += 1
    keep = mw[-1] != 0
    count = int(keep.sum())
    # the block loss is the mean over its pairs: times count, per-pair gradients
    norms = np.sqrt(sq[:, keep]).mean(axis=1) * count
    with np.errstate(divide="ignore", invalid="ignore"):
        curve = norms / norms[0] if norms[0] > 0 else np.full_like(norms, np.nan)
    lag = np.arange(J + 1)
    ok = (lag >= 1) & np.isfinite(curve) & (curve > 0)
    if ok.sum() >= 2:
        slope = np.polyfit(lag[ok], np.log(curve[ok]), 1)[0]
        rate = float(np.exp(slope))
    else:
        rate = float("nan")
    below = np.flatnonzero((lag >= 1) & (curve < threshold))
    horizon = int(below[0]) if len(below) else None
    cost.seconds = time.perf_counter() - t0
    return DecayCurve(
        lags=lag.astype(np.int64),
        norms=norms.astype(np.float64),
        curve=curve.astype(np.float64),
        rate=rate,
        threshold=float(threshold),
        horizon=horizon,
        positions=ts.astype(np.int64),
        pairs=count,
        cost=cost,
    )


# ----------------------------------------------------------------------------
# The truncation bias
# ----------------------------------------------------------------------------


def default_k2_grid(max_k2: int) -> list[int]:
    """Every k2 from 1 to 24 (so a horizon is found to the step), then about 15%
    apart up to ``max_k2``, which is included."""
    max_k2 = _positive_int("max_k2", max_k2)
    grid = list(range(1, min(24, max_k2) + 1))
    while grid[-1] < max_k2:
        grid.append(min(max_k2, max(grid[-1] + 1, round(grid[-1] * 1.15))))
    return grid


def _compared(grads: dict, model: Model) -> np.ndarray:
    """Every gradient but the readout's, flattened, float64."""
    return np.concatenate(
        [np.ravel(grads[n]).astype(np.float64) for n in model.param_names() if "readout" not in n]
    )


def _compare(g: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(cosine, relative error) of ``g`` against ``ref``. The cosine is computed as
    ``1 - ||u - v||^2 / 2`` of the unit vectors, exact for equal inputs and
    accurate near 1 (where ``u . v`` loses the digits that matter)."""
    ng, nr = float(np.linalg.norm(g)), float(np.linalg.norm(ref))
    if nr == 0.0:
        return (1.0, 0.0) if ng == 0.0 else (0.0, math.inf)
    if ng == 0.0:
        return 0.0, 1.0
    d = g / ng - ref / nr
    cos = 1.0 - 0.5 * float(np.dot(d, d))
    return cos, float(np.linalg.norm(g - ref)) / nr


def _segments(data: _Data, n: int, k1: int, count: int) -> list[tuple[int, int]]:
    """``(first, last)`` 0-based steps of up to ``count`` segments of about ``n``
    steps (a multiple of k1), spread over the data, whose last block (their last
    ``k1`` steps) has a target. If the data have steps where every stream
    resets, a segment starts at one (then the state entering it is the zeros a
    reset restores, and it may be longer than ``n``)."""
    T = data.steps
    if n > T:
        raise ValueError(f"a segment of {n} steps does not fit in data of {T} steps")

    def has_target(e: int) -> bool:
        return bool(data.mask[e - k1 + 1 : e + 1].any())

    ends = [e for e in range(n - 1, T) if has_target(e)]
    if not ends:
        raise ValueError(f"no segment of {n} steps ends with a block of {k1} steps with a target")
    common = None if data.resets is None else np.flatnonzero(data.resets.all(axis=1))
    out: list[tuple[int, int]] = []
    for i in np.unique(np.linspace(0, len(ends) - 1, count).round().astype(int)):
        e = ends[i]
        s = e - n + 1
        if common is not None and len(common):
            before = common[common <= s]
            if len(before) == 0:
                continue
            s = int(before[-1])
            e = s + ((e - s + 1) // k1) * k1 - 1
            if not has_target(e):
                continue
        if (s, e) not in out:
            out.append((s, e))
    if not out:
        raise ValueError("no segment fits the data's resets (every stream resetting at its start)")
    return out


def _trainer(model, k1, k2, loss, optimizer, overlap, backend):
    from .trainer import Trainer

    return Trainer(
        model, k1=k1, k2=k2, loss=loss, optimizer=optimizer, overlap=overlap, backend=backend
    )


def _block_gradient(model, data, s, e, k1, k2, backend, cost, enter) -> dict:
    """:func:`update_gradient` on steps s..e of validated data, from ``enter[s]``."""
    x, t, m, r = data.part(s, e + 1)
    cost.forward_steps += e - s + 1
    cost.backward_steps += e - s + 1 if k2 is None else min(k2, e - s + 1)
    cost.fits += 1
    return _update_gradient(model, x, t, m, r, data.loss, k1, k2, _nested(model, enter[s]), backend)


def _update_gradient(model, x, target, mask, resets, loss, k1, k2, initial_state, backend):
    n = x.shape[0]
    mb = np.zeros(x.shape[:2], model.dtype) if mask is None else np.array(mask, model.dtype)
    if mask is None:
        mb[n - k1 :] = 1
    else:
        mb[: n - k1] = 0
    trainer = _trainer(model, n, k2, loss, SGD(lr=0.0), "stored", backend)
    try:
        res = trainer.fit(x, target, mb, resets, initial_state=initial_state, return_grads=True)
    finally:
        model._trainers.discard(trainer)
    return res.grads[-1]


def update_gradient(
    model: Model,
    x,
    target,
    mask=None,
    resets=None,
    *,
    loss: str = "mse",
    k1: int,
    k2: int | None,
    initial_state=None,
    backend: str = "cpu",
) -> dict[str, np.ndarray]:
    """The gradient of the TBPTT(k1, k2) update at the last step of a sequence, with
    frozen weights: the gradient of the loss of its block (the last ``k1``
    steps) through its window (the last ``k2`` steps; ``k2=None``: every step).

    The sequence (x [n, B, ...] and the rest, as :meth:`Trainer.fit` takes
    them) starts at a trainer-level reset to ``initial_state`` (None: zeros),
    and ``n`` must be a multiple of ``k1`` (then the update at step ``n`` is a
    regular one, whose window the contract puts at ``(n - k2, n]``). With the
    weights unchanged by the updates before it, that update's gradient is the
    single update of ``Trainer(k1=n, k2)`` with every loss before the block
    masked out: this computes it so, in one forward pass of ``n`` steps and
    one backward pass of ``min(k2, n)`` steps on ``backend``. Returns
    ``{name: array}`` in the model dtype, as ``FitResult.grads`` entries.
    """
    k1 = _positive_int("k1", k1)
    n = int(np.shape(x)[0])
    if n % k1:
        raise ValueError(f"x must have a multiple of k1 = {k1} steps, got {n}")
    return _update_gradient(model, x, target, mask, resets, loss, k1, k2, initial_state, backend)


def truncation_bias(
    model: Model,
    x,
    target,
    mask=None,
    resets=None,
    *,
    loss: str = "mse",
    k1: int = 1,
    k2s=None,
    segments: int = 8,
    segment_steps: int | None = None,
    optimizer: SGD | Adam | None = None,
    overlaps=OVERLAPS,
    backend: str = "cpu",
) -> BiasTable:
    """The truncation bias of TBPTT(k1, k2) for each ``k2`` in ``k2s``.

    Over ``segments`` segments of ``n = segment_steps`` steps spread over the
    data (each ending with a block that has a target), the trainer starts at
    the segment's first step with the state the model has there (one
    forward-only pass from zeros), and the gradient of its update at the
    segment's last step (the loss of the block of the last ``k1`` steps) is
    compared with the untruncated gradient of the same block loss, ``k2=None``
    from the segment start: the cosine similarity and ``||g - g_full|| /
    ||g_full||``, over every parameter but the readout (whose gradient does
    not depend on k2), in float64.

    Args:
        model: the :class:`Model` (not changed).
        x, target, mask, resets, loss: the data, as :func:`decay_curve`.
        k1: the block length of the compared update (int >= 1).
        k2s: the windows to measure (ints >= 1, or None for unbounded);
            default :func:`default_k2_grid` up to ``min(128, T // 2)``, and None.
        segments: the number of segments (int >= 1).
        segment_steps: n (a multiple of k1 is kept); default ``2 * max(k2s) +
            k1`` (at least ``4 * k1``), at most T.
        optimizer: None (default): frozen weights, the bias of the window
            alone (one row per k2, overlap "both"). An :class:`SGD` or
            :class:`Adam` (copied; its state starts fresh in every run): the
            weights move through the segment as in training, and each rule in
            ``overlaps`` gets its own row; the reference gradient is then the
            untruncated one at the weights of the compared update.
        overlaps: the rules measured with moving weights.
        backend: "cpu", "numpy" or "cuda", for every run.

    Returns:
        :class:`BiasTable`. With frozen weights the row of ``k2=None`` is exactly
        cosine 1, error 0 (the same computation twice, bit for bit).

    Cost: see the module docstring.

    With data resets at steps where not every stream resets, a reset inside
    a segment restores the segment's entering state instead of zeros (the
    trainer's initial state); both gradients see the same trajectory.
    """
    k1 = _positive_int("k1", k1)
    segments = _positive_int("segments", segments)
    data = _data(model, x, target, mask, resets, loss)
    T = data.steps
    if k2s is None:
        k2s = [*default_k2_grid(max(1, min(128, T // 2))), None]
    k2s = list(k2s)
    for k2 in k2s:
        if k2 is not None:
            _positive_int("k2", k2)
    finite = [k for k in k2s if k is not None]
    if segment_steps is None:
        n = max(2 * max(finite, default=k1) + k1, 4 * k1)
        n = min(n, T)
    else:
        n = min(_positive_int("segment_steps", segment_steps), T)
    n = max(k1, (n // k1) * k1)
    frozen = optimizer is None
    if not frozen and not isinstance(optimizer, (SGD, Adam)):
        raise TypeError(
            f"optimizer must be None, tbptt_fast.SGD or tbptt_fast.Adam, "
            f"got {type(optimizer).__name__}"
        )
    overlaps = list(overlaps)
    for o in overlaps:
        if o not in OVERLAPS:
            raise ValueError(f"overlaps must hold 'stored' and/or 'recompute', got {o!r}")
    t0 = time.perf_counter()
    cost = Cost()
    spans = _segments(data, n, k1, segments)
    enter = _entering_states(model, data, [s for s, _ in spans], backend, cost)
    frozen_model = copy.deepcopy(model)
    stats: dict = {}
    for s, e in spans:
        if frozen:
            args = (data, s, e, k1)
            full = _block_gradient(frozen_model, *args, None, backend, cost, enter)
            full = _compared(full, model)
            for k2 in k2s:
                g = _block_gradient(frozen_model, *args, k2, backend, cost, enter)
                stats.setdefault((k2, "both"), []).append(_compare(_compared(g, model), full))
        else:
            for overlap in overlaps:
                for k2 in k2s:
                    g, full = _moving(
                        model, data, (s, e), k1, k2, optimizer, overlap, backend, cost, enter
                    )
                    stats.setdefault((k2, overlap), []).append(_compare(g, full))
    rows = []
    for (k2, overlap), pairs in stats.items():
        cos = np.array([c for c, _ in pairs])
        rel = np.array([r for _, r in pairs])
        rows.append(
            BiasRow(
                k1=k1,
                k2=k2,
                overlap=overlap,
                cos_mean=float(cos.mean()),
                cos_min=float(cos.min()),
                rel_mean=float(rel.mean()),
                rel_max=float(rel.max()),
                segments=len(pairs),
            )
        )
    cost.seconds = time.perf_counter() - t0
    return BiasTable(
        k1=k1,
        rows=rows,
        segment_steps=n,
        starts=[s for s, _ in spans],
        frozen=frozen,
        cost=cost,
    )


def _moving(model, data, span, k1, k2, optimizer, overlap, backend, cost, enter):
    """Train a copy through the segment with TBPTT(k1, k2) under ``overlap``; return
    its last update's gradient and the untruncated gradient of that block's loss
    at the weights that update saw (recomputed from the segment start)."""
    s, e = span
    n = e - s + 1
    x, t, m, r = data.part(s, e + 1)
    work = copy.deepcopy(model)
    before = [work.state_dict()]  # the weights entering each update

    def snap(info):
        before.append(work.state_dict())

    trainer = _trainer(work, k1, k2, data.loss, copy.deepcopy(optimizer), overlap, backend)
    res = trainer.fit(
        x, t, m, r, initial_state=_nested(model, enter[s]), return_grads=True, on_update=snap
    )
    updates = len(res.grads)
    cost.forward_steps += n
    cost.backward_steps += sum(n if k2 is None else min(k2, int(u)) for u in res.update_steps)
    cost.fits += 1
    at = copy.deepcopy(model)
    at.load_state_dict(before[updates - 1])
    full = _block_gradient(at, data, s, e, k1, None, backend, cost, enter)
    return _compared(res.grads[-1], model), _compared(full, model)


# ----------------------------------------------------------------------------
# Throughput
# ----------------------------------------------------------------------------


def throughput(
    model: Model,
    x,
    target,
    mask=None,
    resets=None,
    *,
    loss: str = "mse",
    k1: int,
    k2: int | None,
    backend: str = "cpu",
    steps: int = 2048,
    seconds: float = 0.1,
    repeats: int = 3,
) -> tuple[float, int]:
    """Timesteps per second (steps times streams) of ``Trainer.fit`` with TBPTT(k1, k2).

    One untimed fit of up to 64 steps (warm-up, and a first estimate), then
    ``repeats`` timed fits of the first ``n`` steps of the data, ``n`` chosen
    so that one takes about ``seconds`` (at most ``steps`` and T, at least
    ``min(T, 2 * k1)``); the best of them counts. The updates are SGD steps of
    learning rate 0 (the model is not changed; the optimizer costs what an
    SGD step costs). Returns ``(timesteps_per_s, n)``.
    """
    data = _data(model, x, target, mask, resets, loss)
    cap = min(_positive_int("steps", steps), data.steps)
    work = copy.deepcopy(model)
    trainer = _trainer(work, k1, k2, loss, SGD(lr=0.0), "stored", backend)
    n0 = min(cap, max(64, 2 * k1))
    t0 = time.perf_counter()
    trainer.fit(*data.part(0, n0))
    per_step = (time.perf_counter() - t0) / n0
    n = int(min(cap, max(min(data.steps, 2 * k1), seconds / max(per_step, 1e-9))))
    best = math.inf
    for _ in range(_positive_int("repeats", repeats)):
        trainer.reset_state()
        t0 = time.perf_counter()
        trainer.fit(*data.part(0, n))
        best = min(best, time.perf_counter() - t0)
    return n * data.batch / max(best, 1e-9), n


# ----------------------------------------------------------------------------
# The recommendation
# ----------------------------------------------------------------------------


@dataclass
class Advice:
    """What :func:`advise` returns.

    Attributes:
        k1, k2: the recommendation (``k2`` None when no k2 of the grid reaches
            the threshold: then no bounded window is recommended).
        threshold: the cosine a window must reach.
        decay: the :class:`DecayCurve`.
        bias: the k2 sweep at ``k1_base`` (:class:`BiasTable`).
        moving: the sweep with moving weights for both overlap rules, or None.
        candidates: the k1 candidates at ``k2``: dicts with ``k1``, ``cos``,
            ``rel``, ``bias`` (1 - cos), ``timesteps_per_s``, ``score``
            (timesteps/s per unit of bias) and ``eligible`` (cos >= threshold).
        reasons: lines stating the numbers behind the choice.
        cost: everything run, together.
    """

    k1: int | None
    k2: int | None
    threshold: float
    decay: DecayCurve
    bias: BiasTable
    moving: BiasTable | None
    candidates: list[dict]
    reasons: list[str]
    overlap: str = "stored"
    backend: str = "cpu"
    cost: Cost = field(default_factory=Cost)
    costs: dict = field(default_factory=dict)
    alternatives: list[dict] = field(default_factory=list)
    alternative: dict | None = None

    def as_dict(self) -> dict:
        return {
            "recommendation": {"k1": self.k1, "k2": self.k2, "overlap": self.overlap},
            "costs": {k: asdict(v) for k, v in self.costs.items()},
            "threshold": self.threshold,
            "backend": self.backend,
            "decay": self.decay.as_dict(),
            "bias": self.bias.as_dict(),
            "moving": None if self.moving is None else self.moving.as_dict(),
            "k1_candidates": [
                {k: (_json_float(v) if isinstance(v, float) else v) for k, v in c.items()}
                for c in self.candidates
            ],
            "alternatives": [
                {k: (_json_float(v) if isinstance(v, float) else v) for k, v in c.items()}
                for c in self.alternatives
            ],
            "faster_alternative": None
            if self.alternative is None
            else {"k1": self.alternative["k1"], "k2": self.alternative["k2"]},
            "reasons": self.reasons,
            "cost": asdict(self.cost),
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=1)

    def lines(self) -> list[str]:
        """The report as text: the two curves as tables, then the recommendation."""
        d = self.decay
        out = [
            f"gradient decay (reference engine, {len(d.positions)} positions x streams = "
            f"{d.pairs} losses): ||d loss_t / d state_(t-j)||, relative to j = 0",
            "  lag j   " + "  ".join(f"{j:>7d}" for j in _show_lags(d)),
            "  ratio   " + "  ".join(f"{d.curve[j]:7.2g}" for j in _show_lags(d)),
            f"  fitted decay per step {_fmt(d.rate, '.3f')}; falls below {d.threshold:g} at lag "
            + (f"{d.horizon}" if d.horizon is not None else f"> {d.lags[-1]} (not within J)"),
            "",
            f"truncation bias at k1 = {self.bias.k1} ({len(self.bias.starts)} segments of "
            f"{self.bias.segment_steps} steps, "
            + ("frozen weights: the overlap rules agree" if self.bias.frozen else "moving weights")
            + "): TBPTT(k1, k2) update gradient vs k2 = none",
            "     k2   cos mean   cos min   rel.err mean   rel.err max",
        ]
        rows = sorted(self.bias.rows, key=_k2_key)
        shown = [r for r in rows if _shown(r.k2, self.k2)]
        for r in shown:
            mark = "  <- k2" if r.k2 == self.k2 and self.k2 is not None else ""
            out.append(
                f"  {_k2(r.k2):>5}   {r.cos_mean:8.4f}  {r.cos_min:8.4f}   {r.rel_mean:12.4f}"
                f"  {r.rel_max:12.4f}{mark}"
            )
        if len(shown) < len(rows):
            out.append(f"  ({len(rows) - len(shown)} more rows of k2 in the JSON output)")
        if self.moving is not None:
            m = self.moving
            out += [
                "",
                f"with moving weights (k1 = {m.k1}, both overlap rules, {len(m.starts)} segments):",
                "     k2   overlap      cos mean   rel.err mean",
            ]
            for r in sorted(m.rows, key=lambda r: (_k2_key(r), r.overlap)):
                out.append(
                    f"  {_k2(r.k2):>5}   {r.overlap:<10}  {r.cos_mean:9.4f}   {r.rel_mean:12.4f}"
                )
        if self.candidates:
            out += [
                "",
                f"k1 at k2 = {_k2(self.k2)} (throughput of the {self.backend} engine, "
                "score = timesteps/s per unit of bias, 1 - cos):",
                "     k1   cos mean   timesteps/s       score   ",
            ]
            for c in self.candidates:
                mark = "  <- k1" if c["k1"] == self.k1 else ""
                flag = "" if c["eligible"] else f"  (cos < {self.threshold:g})"
                out.append(
                    f"  {c['k1']:>5}   {c['cos']:8.4f}  {c['timesteps_per_s']:12,.0f}"
                    f"  {c['score']:10.3g}{flag}{mark}"
                )
        if self.alternatives:
            out += [
                "",
                f"the faster k1 with a window k1 - {self.bias.k1} longer (every loss keeps "
                "its history):",
                "     k1     k2   cos mean   timesteps/s",
            ]
            for c in self.alternatives:
                flag = "" if c["eligible"] else f"  (cos < {self.threshold:g})"
                out.append(
                    f"  {c['k1']:>5}  {c['k2']:>5}   {c['cos']:8.4f}  "
                    f"{c['timesteps_per_s']:12,.0f}{flag}"
                )
        out += ["", *self.reasons, f"cost: {self.cost.line()}"]
        out += [f"  {name}: {c.line()}" for name, c in self.costs.items()]
        return out


def _show_lags(d: DecayCurve) -> list[int]:
    J = int(d.lags[-1])
    pick = {0, 1, 2, 4, 8, 16, 32, 64, 128, 256, J}
    if d.horizon is not None:
        pick.add(d.horizon)
    return sorted(j for j in pick if j <= J)


def _shown(k2, chosen) -> bool:
    """The text table's rows: every k2 up to twice the chosen one (at least 16),
    then the powers of two, and k2 = none."""
    if k2 is None:
        return True
    return k2 <= max(16, 2 * (chosen or 0)) or (k2 & (k2 - 1)) == 0


def _k2(k2) -> str:
    return "none" if k2 is None else str(k2)


def _k2_key(r) -> float:
    return math.inf if r.k2 is None else r.k2


def _fmt(v: float, spec: str) -> str:
    return "n/a" if v is None or not math.isfinite(v) else format(v, spec)


def advise(
    model: Model,
    x,
    target,
    mask=None,
    resets=None,
    *,
    loss: str = "mse",
    threshold: float = 0.95,
    k1_base: int = 1,
    k2s=None,
    k1s=None,
    lags: int = 64,
    positions: int = 16,
    decay_threshold: float = 0.01,
    segments: int = 8,
    segment_steps: int | None = None,
    optimizer: SGD | Adam | None = None,
    overlap: str = "stored",
    backend: str = "cpu",
    throughput_steps: int = 2048,
) -> Advice:
    """Measure the two curves and recommend TBPTT(k1, k2).

    1. :func:`decay_curve` (``lags``, ``positions``, ``decay_threshold``).
    2. :func:`truncation_bias` at ``k1 = k1_base`` (default 1: every loss sees
       exactly k2 steps, the bias of the window alone) over ``k2s``, frozen
       weights; with an ``optimizer`` also with moving weights for both
       overlap rules, at the same k1 and the k2 values around the choice.
    3. ``k2``: the smallest k2 of the grid whose mean cosine reaches
       ``threshold`` (under ``overlap`` when the weights move; None when none
       does).
    4. ``k1``: for each candidate (``k1s``; default 1, 2, 4, ... up to k2, and
       k2) the bias at (k1, k2) and the measured :func:`throughput` of the
       ``backend``; among those that keep the cosine at or above the
       threshold, the best timesteps per second per unit of bias (``1 -
       cos``, floored at 1e-6).
    5. For each faster candidate k1, TBPTT(k1, k2 + k1 - k1_base) is measured
       too (its block's first losses then see as much history as at
       ``k1_base``); the fastest that keeps the threshold is reported as
       ``alternative`` when it beats the recommendation's speed.

    Args are those of the functions above. Returns :class:`Advice`, whose
    ``lines()`` is the report ``tbptt-fast advise`` prints.
    """
    threshold = _positive_float("threshold", threshold)
    if not threshold <= 1:
        raise ValueError(f"threshold must be a cosine in (0, 1], got {threshold}")
    if overlap not in OVERLAPS:
        raise ValueError(f"overlap must be 'stored' or 'recompute', got {overlap!r}")
    data = (x, target, mask, resets)
    cost = Cost()
    decay = decay_curve(
        model,
        *data,
        loss=loss,
        lags=lags,
        positions=positions,
        threshold=decay_threshold,
        backend=backend,
    )
    cost.add(decay.cost)
    costs = {"decay curve": decay.cost}

    def sweep(grid, n=None) -> BiasTable:
        return truncation_bias(
            model,
            *data,
            loss=loss,
            k1=k1_base,
            k2s=grid,
            segments=segments,
            segment_steps=n if n is not None else segment_steps,
            backend=backend,
        )

    if k2s is None:
        # powers of two, then every k2 between the last two around the threshold
        T = int(np.shape(x)[0])
        top = max(1, min(128, T // 2))
        bias = sweep([*sorted({1 << i for i in range(8) if (1 << i) <= top} | {top}), None])
        coarse = sorted((r for r in bias.rows if r.k2 is not None), key=lambda r: r.k2)
        hit = next((i for i, r in enumerate(coarse) if r.cos_mean >= threshold), None)
        if hit is not None and hit > 0 and coarse[hit].k2 - coarse[hit - 1].k2 > 1:
            fine = sweep(list(range(coarse[hit - 1].k2 + 1, coarse[hit].k2)), bias.segment_steps)
            bias.rows += fine.rows
            bias.cost.add(fine.cost)
    else:
        bias = sweep(k2s)
    cost.add(bias.cost)
    costs["k2 sweep"] = bias.cost
    finite = sorted((r for r in bias.rows if r.k2 is not None), key=lambda r: r.k2)
    chosen = next((r for r in finite if r.cos_mean >= threshold), None)
    reasons = []
    moving = None
    if chosen is None:
        top = finite[-1] if finite else None
        reasons.append(
            f"no k2 up to {_k2(top.k2 if top else None)} reaches cos >= {threshold:g} at "
            f"k1 = {k1_base}"
            + (f" (k2 = {top.k2}: cos {top.cos_mean:.4f})" if top else "")
            + ": use k2 = none (unbounded), or measure longer windows with --k2"
        )
        return Advice(
            k1=None,
            k2=None,
            threshold=threshold,
            decay=decay,
            bias=bias,
            moving=None,
            candidates=[],
            reasons=reasons,
            overlap=overlap,
            backend=backend,
            cost=cost,
            costs=costs,
        )
    k2 = chosen.k2
    below = [r for r in finite if r.k2 < k2]
    reasons.append(
        f"k2 = {k2}: the smallest window whose update gradient keeps cos >= {threshold:g} with "
        f"the untruncated one (cos {chosen.cos_mean:.4f}, min {chosen.cos_min:.4f} over "
        f"{chosen.segments} segments, relative error {chosen.rel_mean:.3f})"
        + (f"; k2 = {below[-1].k2} gives cos {below[-1].cos_mean:.4f}" if below else "")
    )
    if decay.horizon is not None:
        reasons.append(
            f"the gradient of a loss falls below {decay.threshold:g} of its size at lag "
            f"{decay.horizon} (decay {_fmt(decay.rate, '.3f')} per step)"
        )
    if optimizer is not None:
        near = [*sorted({max(1, k2 // 2), k2, 2 * k2}), None]
        moving = truncation_bias(
            model,
            *data,
            loss=loss,
            k1=k1_base,
            k2s=near,
            segments=segments,
            segment_steps=bias.segment_steps,
            optimizer=optimizer,
            backend=backend,
        )
        cost.add(moving.cost)
        costs["moving weights"] = moving.cost
        row = moving.row(k2, overlap)
        reasons.append(
            f"with moving weights ({type(optimizer).__name__} lr {optimizer.lr:g}) and "
            f"overlap={overlap}, k2 = {k2} keeps cos {row.cos_mean:.4f}"
        )
    if k1s is None:
        k1s = sorted({1 << i for i in range(0, 16) if (1 << i) <= k2} | {k2})
    else:
        k1s = sorted({_positive_int("k1", k) for k in k1s})
    timing = Cost()

    def measure(k1: int, k2x: int, row: BiasRow | None = None) -> dict:
        """Bias (unless given) and throughput of TBPTT(k1, k2x)."""
        if row is None:
            tb = truncation_bias(
                model,
                *data,
                loss=loss,
                k1=k1,
                k2s=[k2x],
                segments=segments,
                segment_steps=max(bias.segment_steps, 2 * k2x + k1),
                backend=backend,
            )
            cost.add(tb.cost)
            timing.add(tb.cost)
            row = tb.rows[0]
        t0 = time.perf_counter()
        speed, n = throughput(
            model, *data, loss=loss, k1=k1, k2=k2x, backend=backend, steps=throughput_steps
        )
        n0 = min(n, max(64, 2 * k1))
        timed = Cost(
            forward_steps=n0 + 3 * n,  # one untimed and three timed fits
            backward_steps=(n0 // k1 + 3 * (n // k1)) * k2x,
            fits=4,
            seconds=time.perf_counter() - t0,
        )
        cost.add(timed)
        timing.add(timed)
        return {
            "k1": k1,
            "k2": k2x,
            "cos": row.cos_mean,
            "rel": row.rel_mean,
            "bias": 1.0 - row.cos_mean,
            "timesteps_per_s": speed,
            "score": speed / max(1.0 - row.cos_mean, 1e-6),
            "eligible": bool(row.cos_mean >= threshold),
        }

    candidates = [measure(k1, k2, chosen if k1 == k1_base else None) for k1 in k1s]
    eligible = [c for c in candidates if c["eligible"]] or candidates
    best = max(eligible, key=lambda c: c["score"])
    reasons.append(
        f"k1 = {best['k1']}: {best['timesteps_per_s']:,.0f} timesteps/s at cos "
        f"{best['cos']:.4f}, the best speed per unit of bias among the k1 that keep "
        f"cos >= {threshold:g} ({best['score']:.3g} timesteps/s per unit of 1 - cos)"
    )
    # A larger k1 leaves the first losses of its block k1 - 1 fewer steps of
    # history; a window that much longer gives them back. Measured, not assumed.
    alternatives = []
    for c in candidates:
        if c["k1"] > best["k1"] and c["timesteps_per_s"] > best["timesteps_per_s"]:
            alt = measure(c["k1"], k2 + c["k1"] - k1_base)
            alternatives.append(alt)
    faster = [a for a in alternatives if a["eligible"]]
    alternative = None
    if faster:
        alternative = max(faster, key=lambda a: a["timesteps_per_s"])
        if alternative["timesteps_per_s"] > best["timesteps_per_s"]:
            reasons.append(
                f"faster at the same bound: TBPTT(k1={alternative['k1']}, "
                f"k2={alternative['k2']}) runs {alternative['timesteps_per_s']:,.0f} "
                f"timesteps/s at cos {alternative['cos']:.4f} (a window k1 - {k1_base} "
                "steps longer gives the block's first losses their history back)"
            )
        else:
            alternative = None
    costs["k1 candidates"] = timing
    reasons.insert(0, f"recommendation: TBPTT(k1={best['k1']}, k2={k2})")
    return Advice(
        k1=best["k1"],
        k2=k2,
        threshold=threshold,
        decay=decay,
        bias=bias,
        moving=moving,
        candidates=candidates,
        reasons=reasons,
        overlap=overlap,
        backend=backend,
        cost=cost,
        costs=costs,
        alternatives=alternatives,
        alternative=alternative,
    )


# ----------------------------------------------------------------------------
# The plot
# ----------------------------------------------------------------------------


def plot(advice: Advice, path, title: str | None = None) -> str:
    """A PNG of both curves: the decay curve (log scale, fitted rate, threshold
    and horizon) and the cosine against k2 (threshold, the chosen k2, the
    relative error on a second axis). Needs matplotlib. Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d, b = advice.decay, advice.bias
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    lag, curve = d.lags[1:], d.curve[1:]
    pos = curve > 0
    ax1.semilogy(lag[pos], curve[pos], "o-", ms=3, label="measured")
    if math.isfinite(d.rate) and pos.sum() >= 2:
        fit = np.polyfit(lag[pos], np.log(curve[pos]), 1)
        ax1.semilogy(lag, np.exp(np.polyval(fit, lag)), "--", lw=1, label=f"fit: {d.rate:.3f}^j")
    ax1.axhline(d.threshold, color="grey", lw=0.8, ls=":", label=f"threshold {d.threshold:g}")
    if d.horizon is not None:
        ax1.axvline(d.horizon, color="C3", lw=0.8, ls=":", label=f"lag {d.horizon}")
    ax1.set_xlabel("lag j (steps back)")
    ax1.set_ylabel("||d loss_t / d state_(t-j)||, relative to j = 0")
    ax1.set_title("gradient decay")
    ax1.legend(fontsize=8)
    rows = sorted((r for r in b.rows if r.k2 is not None), key=lambda r: r.k2)
    ks = [r.k2 for r in rows]
    ax2.plot(ks, [r.cos_mean for r in rows], "o-", ms=3, label=f"cos (mean), k1 = {b.k1}")
    ax2.fill_between(ks, [r.cos_min for r in rows], [r.cos_mean for r in rows], alpha=0.2)
    if advice.moving is not None:
        for ov, style in (("stored", "s"), ("recompute", "^")):
            mr = sorted(
                (r for r in advice.moving.rows if r.k2 is not None and r.overlap == ov),
                key=lambda r: r.k2,
            )
            if mr:
                ax2.plot(
                    [r.k2 for r in mr],
                    [r.cos_mean for r in mr],
                    style,
                    ms=5,
                    label=f"cos, moving weights, {ov}",
                )
    ax2.axhline(advice.threshold, color="grey", lw=0.8, ls=":", label=f"cos {advice.threshold:g}")
    if advice.k2 is not None:
        ax2.axvline(
            advice.k2,
            color="C3",
            lw=0.8,
            ls=":",
            label=f"recommended TBPTT(k1={advice.k1}, k2={advice.k2})",
        )
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("k2 (window, steps)")
    ax2.set_ylabel("cosine with the untruncated gradient")
    ax2.set_title("truncation bias")
    ax3 = ax2.twinx()
    ax3.plot(ks, [r.rel_mean for r in rows], "-", color="C1", lw=0.8, alpha=0.7)
    ax3.set_ylabel("relative error (orange)", color="C1")
    ax2.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# ----------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------


def _positive_int(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int >= 1, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value}")
    return int(value)


def _positive_float(name: str, value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"{name} must be a number > 0, got {type(value).__name__}")
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return v
