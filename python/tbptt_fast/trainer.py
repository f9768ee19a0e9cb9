"""The trainer: TBPTT(k1, k2) over a stream, on any backend (contract: the schedule, the tolerances, the Python surface)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import _validation as V
from ._backend import BACKENDS, make_engine
from ._config import EngineConfig
from ._device import cuda_array, is_torch
from .errors import NonFiniteError
from .model import Model
from .optim import SGD, Adam
from .reference import state_count

__all__ = ["FitResult", "NonFiniteError", "Trainer", "UpdateInfo"]

LOSSES = ("mse", "cross_entropy")
OVERLAPS = ("stored", "recompute")
BUSY = (
    "this trainer is busy in another call (another thread, or a callback of "
    "its own fit): a trainer is not thread-safe, use one per thread"
)


@dataclass
class _Data:
    """One call's validated data: the engine's ``run`` (host arrays) or
    ``run_device`` (CUDA array specs) positional data arguments."""

    args: tuple
    batch: int
    device: bool
    keep: tuple = ()


def _check_optimizer(optimizer) -> None:
    if not isinstance(optimizer, (SGD, Adam)):
        raise TypeError(
            f"optimizer must be tbptt_fast.SGD or tbptt_fast.Adam, got {type(optimizer).__name__}"
        )


def _update_callback(on_update, after):
    """The engines' ``on_update(index, step, loss)`` for a user's callable of an
    :class:`UpdateInfo`; a result of ``False`` (Python's or NumPy's) stops the run.
    ``after()`` runs once the user's callable returned (optimizer changes made
    in it reach the engine before the next update)."""

    def call(index, step, loss) -> bool:
        result = on_update(UpdateInfo(int(index), int(step), float(loss)))
        after()
        return not (result is False or (isinstance(result, np.bool_) and not result))

    return call


def _one_call(method):
    """A Trainer method that uses the engine: one such call at a time."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._exclusive():
            return method(self, *args, **kwargs)

    return locked


class _SameAsK1:
    def __repr__(self) -> str:
        return "k1"


_K1 = _SameAsK1()


class UpdateInfo(NamedTuple):
    """What ``fit``'s ``on_update`` callback receives after each update.

    Attributes:
        index: the update's index within this ``fit`` call (0, 1, ...).
        step: the step ``t`` of the update (counted from the last trainer-level reset).
        loss: the update's ``Loss_P`` (float), as in ``FitResult.losses``.
    """

    index: int
    step: int
    loss: float


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        losses: [U] float64, ``Loss_P`` of each update, as computed in the forward pass.
        update_steps: [U] int64, the step ``t`` of each update (counted from the
            last trainer-level reset).
        grads: with ``return_grads=True``, a list of U dicts ``{name: array}``
            (model dtype), each update's gradient before clipping; else None.
        outputs: with ``return_outputs=True``, [T, B, O] readout outputs of the
            forward pass (model dtype; [B, T, O] for a ``batch_first`` trainer);
            only the steps run when ``on_update`` stopped the fit; else None.
    """

    losses: np.ndarray
    update_steps: np.ndarray
    grads: list[dict[str, np.ndarray]] | None = None
    outputs: np.ndarray | None = None


def reset_stream(owner, initial_state, shape) -> None:
    """Reset ``owner._engine`` to ``initial_state`` (validated against ``shape``:
    a Model, or anything with its cell, num_layers, hidden_size and dtype; None
    is zeros) and the stream's batch bookkeeping: ``owner._batch`` becomes the
    initial state's batch (None without one), ``owner._last_batch`` keeps the
    last batch size known. Shared by Trainer and the PyTorch bridge."""
    init = None
    if initial_state is not None:
        init = V.initial_state(initial_state, shape, None)
    owner._engine.reset(init)
    owner._batch = None if init is None else init[0].shape[0]
    if init is not None:
        owner._last_batch = owner._batch


class Trainer:
    """Trains a :class:`Model` with truncated backpropagation through time, TBPTT(k1, k2).

    Every ``k1`` steps (and on a flush) it backpropagates the loss of the steps
    since the previous update through the last ``k2`` steps, clips, and takes
    one optimizer step; the forward state carries on (stateful TBPTT).

    Args:
        model: the :class:`Model` to train; its parameters are updated in place.
        k1: steps between updates (int >= 1).
        k2: steps the gradient flows back through (int >= 1); defaults to ``k1``;
            ``None`` is unbounded (back to the last trainer-level reset).
        loss: "mse" or "cross_entropy".
        optimizer: :class:`SGD` or :class:`Adam`; default ``SGD(lr=0.01)``.
            Its fields may be changed between calls (``trainer.optimizer.lr =
            ...``): the next update uses the new values and the optimizer state
            (momentum, Adam moments and step count) is kept. Assigning another
            optimizer object (``trainer.optimizer = tb.Adam(...)``) starts from
            a fresh optimizer state.
        clip_grad_norm: None, or a max global 2-norm (> 0), as
            ``torch.nn.utils.clip_grad_norm_``.
        overlap: "stored" (backward through the stored activations with the
            current weights) or "recompute" (re-run the window's forward with
            the current weights); they differ only when k2 > k1.
        backend: "cpu" (default, C++), "numpy" (the reference) or "cuda".
        batch_first: ``fit``'s data are [B, T, ...] instead of [T, B, ...]
            (x, target, mask, resets; the returned outputs [B, T, O] too);
            ``step`` is unaffected.
        max_history: with ``k2=None`` only: the most steps of history the
            trainer may hold (None: no cap). With ``k2=None`` memory and the
            cost of each update grow with the stream (every update
            backpropagates to the last trainer-level reset); a ``fit`` or
            ``step`` that would pass the cap is refused with a ValueError
            before anything runs (call ``reset_state()`` to start afresh).
    """

    def __init__(
        self,
        model: Model,
        k1: int,
        k2: int | None = _K1,
        loss: str = "mse",
        optimizer: SGD | Adam | None = None,
        clip_grad_norm: float | None = None,
        overlap: str = "stored",
        backend: str = "cpu",
        batch_first: bool = False,
        max_history: int | None = None,
    ):
        if not isinstance(model, Model):
            raise TypeError(f"model must be a tbptt_fast.Model, got {type(model).__name__}")
        self.k1 = V.check_k("k1", k1)
        self.k2 = self.k1 if k2 is _K1 else V.check_k("k2", k2, allow_none=True)
        self.loss = V.check_choice("loss", loss, LOSSES)
        self.overlap = V.check_choice("overlap", overlap, OVERLAPS)
        self.backend = V.check_choice("backend", backend, BACKENDS)
        self.batch_first = V.check_bool("batch_first", batch_first)
        self.max_history = None if max_history is None else V.check_k("max_history", max_history)
        if self.max_history is not None and self.k2 is not None:
            raise ValueError("max_history applies to k2=None only (a bounded k2 needs no cap)")
        if optimizer is None:
            optimizer = SGD(lr=0.01)
        _check_optimizer(optimizer)
        self._optimizer = optimizer
        self._synced = (optimizer, optimizer._version)  # what the engine holds
        self._fresh_optimizer = False  # another optimizer object was assigned
        if clip_grad_norm is not None:
            if isinstance(clip_grad_norm, bool) or not isinstance(
                clip_grad_norm, (int, float, np.integer, np.floating)
            ):
                raise TypeError(
                    f"clip_grad_norm must be a positive number or None, "
                    f"got {type(clip_grad_norm).__name__}"
                )
            try:
                value = float(clip_grad_norm)  # a huge Python int is not a NumPy number
            except OverflowError:
                value = math.inf
            if not (math.isfinite(value) and value > 0):
                raise ValueError(
                    f"clip_grad_norm must be a positive finite number or None, got {clip_grad_norm}"
                )
            clip_grad_norm = value
        self.clip_grad_norm = clip_grad_norm
        self.model = model
        self._engine_config = EngineConfig.from_trainer_parts(
            model, self.k1, self.k2, self.loss, self.overlap, clip_grad_norm, optimizer
        )
        self._checked_version = None
        self._check_params()
        self._engine = make_engine(self.backend, self._engine_config, model.param_list())
        self._batch = None  # batch size of the stream, once known
        self._last_batch = None  # the last batch size seen, kept across resets
        self._busy = threading.Lock()  # held by every call that uses the engine
        self._owner = None  # the thread holding it (threading.get_ident())
        model._trainers.add(self)

    # -- one call at a time ----------------------------------------------------------
    @contextlib.contextmanager
    def _exclusive(self):
        """Held for the whole of a call that uses the engine: a second thread (or
        a re-entrant call from ``on_update``) gets a clear error, never a race
        (the native engines' own check says the same)."""
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(BUSY)
        self._owner = threading.get_ident()
        try:
            yield
        finally:
            self._owner = None
            self._busy.release()

    @contextlib.contextmanager
    def _reading(self):
        """For the properties that read the engine (``state``, ``step_count``,
        ``pending``): the thread running a call may read (its ``on_update``
        callbacks, where the engine is paused); another thread gets the same
        clear error as a call, instead of reading what the engine writes
        without the GIL (a data race ThreadSanitizer reports)."""
        if self._owner == threading.get_ident():
            yield
            return
        with self._exclusive():
            yield

    # -- validation ---------------------------------------------------------------
    def _check_params(self) -> None:
        """Refuse non-finite parameters (checked again only after load_state_dict)."""
        if self._checked_version == self.model._version:
            return
        V.finite_params(self.model)
        self._checked_version = self.model._version

    # -- the optimizer --------------------------------------------------------------
    @property
    def optimizer(self) -> SGD | Adam:
        """The optimizer (:class:`SGD` or :class:`Adam`).

        Changing its fields (``trainer.optimizer.lr = 0.5 * trainer.optimizer.lr``)
        takes effect at the next update with the optimizer state (momentum
        buffers, Adam moments and step count) kept, as changing a PyTorch
        ``param_group``'s values. Assigning another optimizer object
        (``trainer.optimizer = tb.Adam(lr=1e-3)``) takes effect at the next
        update with a fresh optimizer state. The values reach the engine before
        the next update, also when changed inside ``fit``'s ``on_update``
        callback (a learning-rate schedule stepped per update).
        """
        return self._optimizer

    @optimizer.setter
    def optimizer(self, optimizer: SGD | Adam) -> None:
        _check_optimizer(optimizer)
        if optimizer is not self._optimizer:
            self._optimizer = optimizer
            self._fresh_optimizer = True

    def _sync_optimizer(self) -> None:
        """Hand the optimizer's current values to the engine, if they changed
        (with a fresh optimizer state after another optimizer was assigned)."""
        opt, fresh = self._optimizer, self._fresh_optimizer
        if not fresh and self._synced == (opt, opt._version):
            return
        cfg = opt.config()
        self._engine.set_hyperparams(cfg, fresh)
        self._engine_config = dataclasses.replace(self._engine_config, **cfg)
        self._synced = (opt, opt._version)
        self._fresh_optimizer = False

    # -- validation ---------------------------------------------------------------
    def _check_data(self, x, target, mask, resets, *, step: bool) -> _Data:
        """Validate and convert one call's data for the engine."""
        m = self.model
        batch_first = self.batch_first and not step
        if step:
            xs, lead = ("x_t", "target_t", "mask_t", "reset_t"), ("B",)
        else:
            xs, lead = ("x", "target", "mask", "resets"), ("B", "T") if batch_first else ("T", "B")
        values = (x, target, mask, resets)
        # host backends copy PyTorch tensors from any device, as before (_to_numpy)
        views = [
            None if self.backend != "cuda" and is_torch(v) else cuda_array(v, n)
            for v, n in zip(values, xs, strict=True)
        ]
        if any(v is not None for v in views):
            name = next(n for n, v in zip(xs, views, strict=True) if v is not None)
            if self.backend != "cuda":
                raise TypeError(
                    f"{name} is a CUDA array but backend={self.backend!r} reads host memory: "
                    "use backend='cuda', or copy it to the host first (e.g. CuPy's .get())"
                )
            if m.vocab_size is not None:
                raise TypeError(
                    f"{name} is a CUDA array, but the token ids of a model with vocab_size "
                    "are read from the host: pass NumPy arrays (e.g. CuPy's .get())"
                )
            args = V.device_data(
                m,
                self.loss,
                xs,
                values,
                views,
                step=step,
                scan=self._engine.scan_device,
                batch_first=batch_first,
            )
            batch = views[0].shape[0] if batch_first else views[0].shape[-2]  # x: [.., B, D]
            # the views keep their memory alive (a DLPack capsule may be its only owner)
            return _Data(args, batch, device=True, keep=tuple(views))
        x_name, t_name, m_name, r_name = xs
        if m.vocab_size is not None:
            xa = V.token_ids(x_name, x, (None,) * len(lead), lead, m.vocab_size)
        else:
            xa = V.float_array(
                x_name, x, (*(None,) * len(lead), m.input_size), (*lead, "D"), m.dtype
            )
        lead_shape = xa.shape[: len(lead)]
        V.check_batch(x_name, m, lead_shape[0 if batch_first or step else 1], self.backend)
        mask_b = V.flag_array(m_name, mask, lead_shape, lead)
        reset_b = V.flag_array(r_name, resets, lead_shape, lead)
        if self.loss == "mse":
            read = None if mask_b is None else mask_b[..., None]  # targets where mask is 0: unread
            ta = V.float_array(
                t_name,
                target,
                (*lead_shape, m.output_size),
                (*lead, "O"),
                m.dtype,
                finite_where=read,
            )
            if read is not None and not mask_b.all():  # unread targets may hold NaN
                ta = np.where(read, ta, 0).astype(m.dtype)
        else:
            ta = V.class_target(t_name, target, lead_shape, lead, m.output_size, mask_b)
        if step:  # add the time axis
            xa, ta = xa[None], ta[None]
            mask_b = None if mask_b is None else mask_b[None]
            reset_b = None if reset_b is None else reset_b[None]
        elif batch_first:  # to the engines' time-major layout
            xa, ta, mask_b, reset_b = (V.time_major(a) for a in (xa, ta, mask_b, reset_b))
        # None stays None (all ones / no resets): nothing of size T is allocated
        mask_f = None if mask_b is None else np.ascontiguousarray(mask_b, dtype=m.dtype)
        resets_u8 = None if reset_b is None else np.ascontiguousarray(reset_b, dtype=np.uint8)
        # the validators return C-contiguous arrays
        return _Data((xa, ta, mask_f, resets_u8), xa.shape[1], device=False)

    def _run_data(
        self, data: _Data, flush: bool, return_grads: bool, return_outputs: bool, on_update=None
    ):
        run = self._engine.run_device if data.device else self._engine.run
        return self._run(run, *data.args, flush, return_grads, return_outputs, on_update)

    def _check_history(self, steps: int, reset: bool) -> None:
        """k2=None with max_history: refuse a call of ``steps`` steps whose
        history would pass the cap."""
        if self.max_history is None:
            return
        held = (0 if reset else self.step_count) + steps
        if held > self.max_history:
            raise ValueError(
                f"k2=None: this call would hold {held} steps of history, more than "
                f"max_history={self.max_history}; call reset_state() to start afresh "
                "(or use a bounded k2)"
            )

    def _check_batch(self, batch: int, name: str) -> None:
        if self._batch is not None and batch != self._batch:
            raise ValueError(
                f"{name} has batch size {batch} but the stream has {self._batch}; "
                "call reset_state() (or pass initial_state) before changing the batch size"
            )

    @property
    def _config(self) -> dict:
        """The engine configuration in the native engines' dict form (a fresh copy)."""
        return self._engine_config.as_dict()

    def _run(self, fn, *args):
        # every engine raises NonFiniteError (a RuntimeError) with the complete message
        return fn(*args)

    # -- public API ---------------------------------------------------------------
    @_one_call
    def fit(
        self,
        x,
        target,
        mask=None,
        resets=None,
        initial_state=None,
        flush: bool = True,
        return_grads: bool = False,
        return_outputs: bool = False,
        on_update: Callable[[UpdateInfo], object] | None = None,
    ) -> FitResult:
        """Train on a sequence, carrying the state, step count and pending block on.

        Args:
            x: [T, B, D] floating input (cast to the model dtype); for a model
                with ``vocab_size``, integer token ids [T, B] in [0, vocab_size).
                With ``batch_first=True`` (the trainer's), every data argument
                is batch first: x [B, T, ...], target [B, T, ...], mask and
                resets [B, T]; the outputs are returned [B, T, O].
            target: mse: [T, B, O] floating; cross_entropy: [T, B] integer class
                indices in [0, O) (not read where mask is 0).
            mask: optional [T, B] bool/numeric, nonzero = has a target.
            resets: optional [T, B] bool/numeric, nonzero = the state entering
                that step of that element is replaced by the initial state.
            initial_state: optional; a trainer-level reset to this state first
                (per layer ``h`` [B, H] or ``(h, c)``, or PyTorch's ``h0``
                [L, B, H] / ``(h0, c0)``). Discards a pending block.
            flush: update on the pending partial block at the end (default True).
            return_grads, return_outputs: also return each update's gradient
                (before clipping) / the readout outputs [T, B, O].
            on_update: optional callable, called after each update (and its
                optimizer step) with an :class:`UpdateInfo` ``(index, step,
                loss)``. Returning ``False`` stops the fit right after that
                update: the updates so far are kept, the stream is positioned
                after that step (as a fit on the data up to it with
                ``flush=False``), and the result holds the updates so far (and
                the outputs of the steps run). An exception it raises stops the
                fit the same way and propagates.

        Data arrays are NumPy arrays (or anything ``numpy.asarray`` takes) on
        every backend. With ``backend="cuda"`` they may instead all be CUDA
        arrays (CuPy, PyTorch CUDA tensors, anything with
        ``__cuda_array_interface__`` or CUDA DLPack), of any strides and any
        float / int / bool dtype as above: they are validated and read in place
        on the GPU, without a copy through the host. Results stay NumPy arrays.

        Everything is validated before the first step; on a validation error
        nothing changes. A non-finite loss or gradient raises
        :class:`NonFiniteError` naming the update step.
        """
        # every argument, flags included, is checked before anything changes
        flush = V.check_bool("flush", flush)
        return_grads = V.check_bool("return_grads", return_grads)
        return_outputs = V.check_bool("return_outputs", return_outputs)
        data = self._check_data(x, target, mask, resets, step=False)
        batch = data.batch
        if self.max_history is not None:
            steps = (
                int(x.shape[1 if self.batch_first else 0])
                if data.device
                else data.args[0].shape[0]  # host data are time-major here
            )
            self._check_history(steps, reset=initial_state is not None)
        init = None
        if initial_state is not None:
            init = V.initial_state(initial_state, self.model, batch)
        else:
            self._check_batch(batch, "x")
        if on_update is not None and not callable(on_update):
            raise TypeError(f"on_update must be callable or None, got {type(on_update).__name__}")
        self._check_params()
        self._sync_optimizer()
        if init is not None:
            self._engine.reset(init)
        self._batch = self._last_batch = batch
        first = self.step_count
        losses, steps, grads, outputs = self._run_data(
            data,
            bool(flush),
            bool(return_grads),
            bool(return_outputs),
            None if on_update is None else _update_callback(on_update, self._sync_optimizer),
        )
        if return_outputs:
            outputs = outputs[: self.step_count - first]  # fewer when on_update stopped it
            if self.batch_first:
                outputs = np.swapaxes(outputs, 0, 1)
        return FitResult(
            losses=np.asarray(losses, dtype=np.float64),
            update_steps=np.asarray(steps, dtype=np.int64),
            grads=self._named(grads) if return_grads else None,
            outputs=outputs if return_outputs else None,
        )

    @_one_call
    def step(self, x_t, target_t, mask_t=None, reset_t=None) -> float | None:
        """Streaming: run one step; returns the update's loss if one happened, else None.

        x_t [B, D] (integer ids [B] with ``vocab_size``); target_t [B, O] (mse)
        or [B] integers (cross_entropy); mask_t, reset_t optional [B]
        bool/numeric. As in :meth:`fit`, the cuda backend also takes CUDA arrays.
        """
        data = self._check_data(x_t, target_t, mask_t, reset_t, step=True)
        self._check_batch(data.batch, "x_t")
        self._check_history(1, reset=False)
        self._check_params()
        self._sync_optimizer()
        self._batch = self._last_batch = data.batch
        losses, _, _, _ = self._run_data(data, False, False, False)
        return float(losses[0]) if len(losses) else None

    @_one_call
    def flush(self) -> float | None:
        """Update on the pending partial block; returns its loss, or None if nothing was pending."""
        self._check_params()
        self._sync_optimizer()
        losses, _, _, _ = self._run(self._engine.flush, False)
        return float(losses[0]) if len(losses) else None

    @_one_call
    def reset_state(self, initial_state=None) -> None:
        """Trainer-level reset: step count 0, pending block and history discarded,
        state back to ``initial_state`` (zeros if None). The optimizer state is kept."""
        reset_stream(self, initial_state, self.model)

    @property
    def state(self):
        """The forward state: a list with one entry per layer, ``h`` [B, H] or
        ``(h, c)`` for lstm and cifg (copies). After ``reset_state()`` without
        an initial state it is zeros of the last batch size seen; None before
        any batch size is known (a new trainer that has not stepped)."""
        with self._reading():
            flat = self._engine.state()
        if flat is None:
            if self._last_batch is None:
                return None
            n = state_count(self.model.cell)
            shape = (self._last_batch, self.model.hidden_size)
            flat = [np.zeros(shape, self.model.dtype) for _ in range(n * self.model.num_layers)]
        return V.nested_state(flat, self.model)

    @property
    def step_count(self) -> int:
        """Steps since the last trainer-level reset."""
        with self._reading():
            return int(self._engine.step_count)

    @property
    def pending(self) -> int:
        """Steps since the previous update (the pending block's length)."""
        with self._reading():
            return int(self._engine.pending)

    def _named(self, grads):
        names = self.model.param_names()
        return [dict(zip(names, g, strict=True)) for g in grads]

    def __repr__(self) -> str:
        return (
            f"Trainer({self.model!r}, k1={self.k1}, k2={self.k2}, loss={self.loss!r}, "
            f"optimizer={self.optimizer!r}, clip_grad_norm={self.clip_grad_norm}, "
            f"overlap={self.overlap!r}, backend={self.backend!r}"
            f"{', batch_first=True' if self.batch_first else ''})"
        )

    # -- copying ----------------------------------------------------------------------
    def __reduce__(self):
        """Pickling, ``copy.deepcopy`` and ``copy.copy`` go through the checkpoint
        format: the copy is an independent trainer with its own model (a copy of
        this one's), optimizer and engine state, continuing exactly as this one
        would; this trainer is untouched."""
        from .checkpoint import dumps_trainer

        with self._exclusive():
            data = dumps_trainer(self)
        return (_trainer_from_checkpoint, (data, self.backend))

    # -- checkpoints ----------------------------------------------------------------
    @_one_call
    def save(self, path) -> None:
        """Save everything needed to continue training to ``path`` (contract: checkpoints).

        The checkpoint (see :mod:`tbptt_fast.checkpoint`) holds the model, the
        optimizer and its state, the configuration, the step count, the pending
        block, the stored history the next windows reach into, the state and
        the initial state used for resets. ``fit(a)``, ``save``, ``load``,
        ``fit(b)`` equals ``fit(a)``, ``fit(b)``. The write is atomic: the
        file at ``path`` is replaced only once the new one is complete.
        """
        from .checkpoint import save_trainer

        save_trainer(self, path)

    @classmethod
    def load(cls, path, backend: str | None = None) -> Trainer:
        """The trainer saved at ``path`` by :meth:`save`, with a new model.

        Args:
            path: a trainer checkpoint.
            backend: "numpy", "cpu" or "cuda"; None (default) is the backend it
                was saved from. A checkpoint loads on every backend.

        Raises:
            ValueError: naming the path, for a truncated, corrupted, foreign or
                newer-format file, or a model checkpoint (use ``Model.load``).
        """
        from .checkpoint import load_trainer

        return load_trainer(path, backend)


def _trainer_from_checkpoint(data: bytes, backend: str) -> Trainer:
    """Unpickling a :class:`Trainer` (see ``Trainer.__reduce__``)."""
    from .checkpoint import loads_trainer

    return loads_trainer(data, backend)
