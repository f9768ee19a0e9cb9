"""Using a model forward only: ``Model.predict`` and ``Model.evaluate`` (contract: forward-only use).

Both run the engines' ``forward`` (which never touches any training state)
over the sequence in chunks of :data:`CHUNK` steps, carrying the state from
one chunk to the next. Data are checked for type and shape before the first
chunk and for their values chunk by chunk, so ``evaluate`` holds one chunk's
inputs and outputs at a time and ``predict`` only its outputs.

Each model keeps one forward engine per backend. The cpu and numpy engines
read the model's own parameter arrays, which trainers and ``load_state_dict``
update in place; a cuda engine is handed the current parameters before each
call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import _validation as V
from ._backend import BACKENDS, make_engine
from ._config import EngineConfig
from .losses import LOSSES
from .model import _to_numpy
from .optim import SGD

__all__ = ["CHUNK", "EvalResult", "PredictResult", "evaluate", "forward_engine", "predict"]

#: Steps per forward call: evaluate's memory is proportional to this, not to T.
CHUNK = 512

#: The forward engine's TBPTT configuration (it never trains; k1 = k2 = 64 only
#: sizes its ring).
_FORWARD_K = 64


@dataclass
class PredictResult:
    """What :meth:`Model.predict` returns.

    Attributes:
        outputs: [T, B, O] readout outputs, model dtype ([B, T, O] with ``batch_first``).
        state: the final state, as ``Trainer.state``: per layer ``h`` [B, H]
            or ``(h, c)`` for lstm and cifg.
    """

    outputs: np.ndarray = field(repr=False)
    state: list = field(repr=False)


@dataclass
class EvalResult:
    """What :meth:`Model.evaluate` returns.

    Attributes:
        loss: mean per-pair loss (contract: the loss) over the unmasked pairs,
            summed in float64; 0.0 if there is none.
        count: the number of unmasked pairs.
        accuracy: cross_entropy: the share of unmasked pairs whose argmax
            output is the target (0.0 if there is none); mse: None.
        state: the final state, as :attr:`PredictResult.state`.
    """

    loss: float
    count: int
    accuracy: float | None
    state: list = field(repr=False)


def forward_engine(model, backend: str):
    """The model's forward engine for ``backend``, with the current parameters.

    Made once per (model, backend) and kept on the model. Parameters trained on
    a cuda trainer are fetched first; non-finite parameters are refused.
    """
    engines = model.__dict__.setdefault("_forward_engines", {})
    model._sync_from_devices()  # a cuda trainer's parameters, into the model's arrays
    V.finite_params(model)
    engine = engines.get(backend)
    if engine is None:
        config = EngineConfig.from_trainer_parts(
            model, _FORWARD_K, _FORWARD_K, "mse", "stored", None, SGD(lr=0.0)
        )
        engine = make_engine(backend, config, model.param_list())
        engines[backend] = engine
    else:
        engine.push_params()  # cuda: copy the model's arrays to the device (else nothing)
    return engine


def forward_chunk(engine, x, resets, carry, init, first: bool):
    """One chunk of the stream: ``(outputs [n, B, O], state)``.

    x: [n, B, D] (or int64 ids [n, B]) time-major, C-contiguous; resets [n, B]
    bool or None; carry: the flat state entering the chunk; init: the flat
    state a reset restores (None = zeros); first: the chunk starts the stream
    (then carry is init).
    """
    if first:
        return engine.forward(x, _u8(resets), init)
    if init is None:  # a reset restores zeros, not the carried state
        init = [np.zeros_like(a) for a in carry]
    return engine.forward(x, _u8(resets), carry, init)


def _u8(flags):
    return None if flags is None else np.ascontiguousarray(flags, dtype=np.uint8)


class _Stream:
    """A validated forward call: x, resets and state, sliced into time-major chunks."""

    def __init__(self, model, x, resets, state, backend, batch_first):
        self.model = model
        self.backend = V.check_choice("backend", backend, BACKENDS)
        self.batch_first = V.check_bool("batch_first", batch_first)
        self.lead = ("B", "T") if self.batch_first else ("T", "B")
        self.x = _to_numpy(x)
        if model.vocab_size is not None:
            what = f"of token ids in [0, {model.vocab_size})"
            V.integer_layout("x", self.x, (None, None), self.lead, what)
            if 0 in self.x.shape:
                raise ValueError(f"x must not be empty, got shape {list(self.x.shape)}")
        else:
            V.float_layout("x", self.x, (None, None, model.input_size), (*self.lead, "D"))
        self.shape = self.x.shape[:2]  # in the caller's order
        self.T, self.B = self.shape[::-1] if self.batch_first else self.shape
        V.check_batch("x", model, self.B, self.backend)
        self.resets = self.layout_flags("resets", resets)
        self.init = None if state is None else V.initial_state(state, model, self.B, "state")

    def layout_flags(self, name, value):
        if value is None:
            return None
        a = _to_numpy(value)
        V.flag_layout(name, a, self.shape, self.lead)
        return a

    def part(self, a, lo, hi):
        """Steps [lo, hi) of a caller's array, in the caller's layout, and the index
        offset of that slice (for messages)."""
        if self.batch_first:
            return a[:, lo:hi], (0, lo)
        return a[lo:hi], (lo,)

    def time_major(self, a):
        return V.time_major(a) if self.batch_first else a

    def chunk_shape(self, lo, hi):
        return (self.B, hi - lo) if self.batch_first else (hi - lo, self.B)

    def flags(self, name, a, lo, hi):
        """A chunk of a [T, B] flag array, validated, in the caller's layout (bool)."""
        if a is None:
            return None
        part, _ = self.part(a, lo, hi)
        return V.flag_array(name, part, self.chunk_shape(lo, hi), self.lead)

    def run(self, consume):
        """Forward over every chunk; ``consume(lo, hi, y)`` gets each chunk's
        outputs [n, B, O] (time-major). Returns the final state (nested form)."""
        m = self.model
        engine = forward_engine(m, self.backend)
        carry = self.init
        for lo in range(0, self.T, CHUNK):
            hi = min(self.T, lo + CHUNK)
            part, offset = self.part(self.x, lo, hi)
            if m.vocab_size is not None:
                x = V.token_ids("x", part, part.shape, self.lead, m.vocab_size, offset=offset)
            else:
                x = V.float_array("x", part, part.shape, (*self.lead, "D"), m.dtype, offset=offset)
            resets = self.flags("resets", self.resets, lo, hi)
            y, carry = forward_chunk(
                engine,
                self.time_major(x),
                self.time_major(resets),
                carry,
                self.init,
                first=lo == 0,
            )
            consume(lo, hi, y)
        return V.nested_state(carry, m)


def predict(model, x, state=None, resets=None, backend="cpu", batch_first=False) -> PredictResult:
    """See :meth:`Model.predict`."""
    stream = _Stream(model, x, resets, state, backend, batch_first)
    O = model.output_size
    shape = (stream.B, stream.T, O) if stream.batch_first else (stream.T, stream.B, O)
    V.check_bytes("x", shape, np.dtype(model.dtype).itemsize, "the outputs")
    outputs = np.empty(shape, model.dtype)

    def keep(lo, hi, y):
        if stream.batch_first:
            outputs[:, lo:hi] = np.swapaxes(y, 0, 1)
        else:
            outputs[lo:hi] = y

    final = stream.run(keep)
    return PredictResult(outputs, final)


def evaluate(
    model,
    x,
    target,
    mask=None,
    resets=None,
    state=None,
    loss="mse",
    backend="cpu",
    batch_first=False,
) -> EvalResult:
    """See :meth:`Model.evaluate`."""
    loss = V.check_choice("loss", loss, tuple(LOSSES))
    stream = _Stream(model, x, resets, state, backend, batch_first)
    lead, O = stream.lead, model.output_size
    ta = _to_numpy(target)
    if loss == "mse":
        V.float_layout("target", ta, (*stream.shape, O), (*lead, "O"))
    else:
        V.integer_layout("target", ta, stream.shape, lead, V.CLASS_WHAT)
    ma = stream.layout_flags("mask", mask)
    total, count, correct = 0.0, 0, 0

    def score(lo, hi, y):
        nonlocal total, count, correct
        part, offset = stream.part(ta, lo, hi)
        read = stream.flags("mask", ma, lo, hi)  # caller's layout, bool, or None
        if loss == "mse":
            where = None if read is None else read[..., None]
            t = V.float_array(
                "target",
                part,
                part.shape,
                (*lead, "O"),
                np.float64,
                finite_where=where,
                offset=offset,
            )
        else:
            t = V.class_target("target", part, part.shape, lead, O, read, offset=offset)
        t = stream.time_major(t)
        keep = np.ones(y.shape[:2], bool) if read is None else stream.time_major(read)
        y64 = y.reshape(-1, O).astype(np.float64)
        if loss == "mse":
            t = np.where(keep[..., None], t, 0.0)  # unread targets may hold NaN
            per_pair, _ = LOSSES["mse"](y64, t.reshape(-1, O))
        else:
            per_pair, _ = LOSSES["cross_entropy"](y64, t.reshape(-1))
            hit = np.argmax(y64, axis=1) == t.reshape(-1)
            correct += int(np.count_nonzero(hit[keep.reshape(-1)]))
        total += float(np.sum(per_pair[keep.reshape(-1)], dtype=np.float64))
        count += int(np.count_nonzero(keep))

    with np.errstate(all="ignore"):
        final = stream.run(score)
    mean = total / count if count else 0.0
    accuracy = None if loss == "mse" else (correct / count if count else 0.0)
    return EvalResult(float(mean), count, accuracy, final)
