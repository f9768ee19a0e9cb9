"""Generating token ids from a token model (``Model(..., vocab_size=V)``)."""

from __future__ import annotations

import math

import numpy as np

from . import _validation as V
from .inference import forward_engine, predict
from .model import Model

__all__ = ["sample"]


def _count(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int >= 0, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def sample(
    model: Model,
    prime_ids,
    n: int,
    temperature: float = 1.0,
    seed: int = 0,
    backend: str = "cpu",
) -> np.ndarray:
    """Generate ``n`` token ids after ``prime_ids`` from a token model.

    The model reads ``prime_ids`` as one stream (batch 1) from a zero state
    (:meth:`Model.predict`); then, ``n`` times, it picks the next id from its
    last output ``y`` [O] and reads that id, carrying the state. At
    ``temperature=0`` the pick is the argmax of ``y`` (greedy); otherwise an
    id is drawn from ``softmax(y / temperature)`` with
    ``numpy.random.default_rng(seed)``, so a seed gives the same ids every
    time. Nothing of the model or of any trainer changes.

    Args:
        model: a :class:`Model` with ``vocab_size`` V and ``output_size`` <= V
            (its outputs are scores over the next id).
        prime_ids: 1-D integer ids [T] in [0, V), T >= 1.
        n: the number of ids to generate (int >= 0).
        temperature: float >= 0.
        seed: the seed of the generator (int >= 0).
        backend: "cpu" (default), "numpy" or "cuda".

    Returns:
        int64 [n]: the generated ids.
    """
    if not isinstance(model, Model):
        raise TypeError(f"model must be a tbptt_fast.Model, got {type(model).__name__}")
    if model.vocab_size is None:
        raise ValueError("sample needs a token model: make the Model with vocab_size=V")
    if model.output_size > model.vocab_size:
        raise ValueError(
            f"sample feeds the generated ids back as input, so output_size must be <= vocab_size, "
            f"got output_size={model.output_size}, vocab_size={model.vocab_size}"
        )
    V.check_choice("backend", backend, ("numpy", "cpu", "cuda"))
    prime = V.token_ids("prime_ids", prime_ids, (None,), ("T",), model.vocab_size)
    n = _count("n", n)
    V.check_bytes("n", (n,), np.dtype(np.int64).itemsize, "the generated ids (int64)")
    if isinstance(temperature, (bool, np.bool_)) or not isinstance(
        temperature, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"temperature must be a number >= 0, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    seed = _count("seed", seed)

    rng = np.random.default_rng(seed)
    primed = predict(model, prime[:, None], backend=backend)
    logits = primed.outputs[-1, 0]
    state = [a for layer in primed.state for a in (layer if isinstance(layer, tuple) else (layer,))]
    engine = forward_engine(model, backend)
    out = np.empty(n, np.int64)
    with np.errstate(all="ignore"):
        for i in range(n):
            y = logits.astype(np.float64)
            if temperature == 0:
                nxt = int(np.argmax(y))
            else:
                z = y / temperature
                p = np.exp(z - np.max(z))
                nxt = int(rng.choice(p.size, p=p / p.sum()))
            out[i] = nxt
            if i + 1 < n:
                ys, state = engine.forward(np.array([[nxt]], np.int64), None, state)
                logits = ys[0, 0]
    return out
