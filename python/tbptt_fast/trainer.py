"""The trainer: TBPTT(k1, k2) over a stream, on any backend (SPEC sections 3, 4 and 7)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _validation as V
from ._backend import BACKENDS, make_engine
from ._config import EngineConfig
from ._device import cuda_array, is_torch
from .errors import NonFiniteError
from .model import Model
from .optim import SGD, Adam
from .reference import param_names, state_count

__all__ = ["FitResult", "NonFiniteError", "Trainer"]

LOSSES = ("mse", "cross_entropy")
OVERLAPS = ("stored", "recompute")


@dataclass
class _Data:
    """One call's validated data: the engine's ``run`` (host arrays) or
    ``run_device`` (CUDA array specs) positional data arguments."""

    args: tuple
    batch: int
    device: bool
    keep: tuple = ()


class _SameAsK1:
    def __repr__(self) -> str:
        return "k1"


_K1 = _SameAsK1()


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
            forward pass (model dtype); else None.
    """

    losses: np.ndarray
    update_steps: np.ndarray
    grads: list[dict[str, np.ndarray]] | None = None
    outputs: np.ndarray | None = None


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
        clip_grad_norm: None, or a max global 2-norm (> 0), as
            ``torch.nn.utils.clip_grad_norm_``.
        overlap: "stored" (backward through the stored activations with the
            current weights) or "recompute" (re-run the window's forward with
            the current weights); they differ only when k2 > k1.
        backend: "cpu" (default, C++), "numpy" (the reference) or "cuda".
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
    ):
        if not isinstance(model, Model):
            raise TypeError(f"model must be a tbptt_fast.Model, got {type(model).__name__}")
        self.k1 = V.check_k("k1", k1)
        self.k2 = self.k1 if k2 is _K1 else V.check_k("k2", k2, allow_none=True)
        self.loss = V.check_choice("loss", loss, LOSSES)
        self.overlap = V.check_choice("overlap", overlap, OVERLAPS)
        self.backend = V.check_choice("backend", backend, BACKENDS)
        if optimizer is None:
            optimizer = SGD(lr=0.01)
        if not isinstance(optimizer, (SGD, Adam)):
            raise TypeError(
                f"optimizer must be tbptt_fast.SGD or tbptt_fast.Adam, got {type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        if clip_grad_norm is not None:
            if isinstance(clip_grad_norm, bool) or not isinstance(
                clip_grad_norm, (int, float, np.integer, np.floating)
            ):
                raise TypeError(
                    f"clip_grad_norm must be a positive number or None, "
                    f"got {type(clip_grad_norm).__name__}"
                )
            if not (np.isfinite(clip_grad_norm) and clip_grad_norm > 0):
                raise ValueError(
                    f"clip_grad_norm must be a positive finite number or None, got {clip_grad_norm}"
                )
            clip_grad_norm = float(clip_grad_norm)
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
        model._trainers.add(self)

    # -- validation ---------------------------------------------------------------
    def _check_params(self) -> None:
        """Refuse non-finite parameters (checked again only after load_state_dict)."""
        if self._checked_version == self.model._version:
            return
        for name, p in zip(
            param_names(self.model.num_layers), self.model.param_list(), strict=True
        ):
            if not np.all(np.isfinite(p)):
                raise ValueError(f"parameter {name} must be finite, found NaN or Inf")
        self._checked_version = self.model._version

    def _check_data(self, x, target, mask, resets, *, step: bool) -> _Data:
        """Validate and convert one call's data for the engine."""
        m = self.model
        if step:
            xs, lead = ("x_t", "target_t", "mask_t", "reset_t"), ("B",)
        else:
            xs, lead = ("x", "target", "mask", "resets"), ("T", "B")
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
            args = V.device_data(
                m, self.loss, xs, values, views, step=step, scan=self._engine.scan_device
            )
            # the views keep their memory alive (a DLPack capsule may be its only owner)
            return _Data(args, views[0].shape[-2], device=True, keep=tuple(views))
        x_name, t_name, m_name, r_name = xs
        xa = V.float_array(x_name, x, (*(None,) * len(lead), m.input_size), (*lead, "D"), m.dtype)
        lead_shape = xa.shape[: len(lead)]
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
        # None stays None (all ones / no resets): nothing of size T is allocated
        mask_f = None if mask_b is None else np.ascontiguousarray(mask_b, dtype=m.dtype)
        resets_u8 = None if reset_b is None else np.ascontiguousarray(reset_b, dtype=np.uint8)
        # the validators return C-contiguous arrays
        return _Data((xa, ta, mask_f, resets_u8), xa.shape[1], device=False)

    def _run_data(self, data: _Data, flush: bool, return_grads: bool, return_outputs: bool):
        run = self._engine.run_device if data.device else self._engine.run
        return self._run(run, *data.args, flush, return_grads, return_outputs)

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
    ) -> FitResult:
        """Train on a sequence, carrying the state, step count and pending block on.

        Args:
            x: [T, B, D] floating input (cast to the model dtype).
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
        data = self._check_data(x, target, mask, resets, step=False)
        batch = data.batch
        init = None
        if initial_state is not None:
            init = V.initial_state(initial_state, self.model, batch)
        else:
            self._check_batch(batch, "x")
        self._check_params()
        if init is not None:
            self._engine.reset(init)
        self._batch = self._last_batch = batch
        losses, steps, grads, outputs = self._run_data(
            data, bool(flush), bool(return_grads), bool(return_outputs)
        )
        return FitResult(
            losses=np.asarray(losses, dtype=np.float64),
            update_steps=np.asarray(steps, dtype=np.int64),
            grads=self._named(grads) if return_grads else None,
            outputs=outputs if return_outputs else None,
        )

    def step(self, x_t, target_t, mask_t=None, reset_t=None) -> float | None:
        """Streaming: run one step; returns the update's loss if one happened, else None.

        x_t [B, D]; target_t [B, O] (mse) or [B] integers (cross_entropy);
        mask_t, reset_t optional [B] bool/numeric. As in :meth:`fit`, the
        cuda backend also takes CUDA arrays.
        """
        data = self._check_data(x_t, target_t, mask_t, reset_t, step=True)
        self._check_batch(data.batch, "x_t")
        self._check_params()
        self._batch = self._last_batch = data.batch
        losses, _, _, _ = self._run_data(data, False, False, False)
        return float(losses[0]) if len(losses) else None

    def flush(self) -> float | None:
        """Update on the pending partial block; returns its loss, or None if nothing was pending."""
        self._check_params()
        losses, _, _, _ = self._run(self._engine.flush, False)
        return float(losses[0]) if len(losses) else None

    def reset_state(self, initial_state=None) -> None:
        """Trainer-level reset: step count 0, pending block and history discarded,
        state back to ``initial_state`` (zeros if None). The optimizer state is kept."""
        init = None
        if initial_state is not None:
            init = V.initial_state(initial_state, self.model, None)
        self._engine.reset(init)
        self._batch = None if init is None else init[0].shape[0]
        if init is not None:
            self._last_batch = self._batch

    @property
    def state(self):
        """The forward state: a list with one entry per layer, ``h`` [B, H] or
        ``(h, c)`` for lstm and cifg (copies). After ``reset_state()`` without
        an initial state it is zeros of the last batch size seen; None before
        any batch size is known (a new trainer that has not stepped)."""
        n = state_count(self.model.cell)
        flat = self._engine.state()
        if flat is None:
            if self._last_batch is None:
                return None
            shape = (self._last_batch, self.model.hidden_size)
            flat = [np.zeros(shape, self.model.dtype) for _ in range(n * self.model.num_layers)]
        if n == 2:
            return [(flat[2 * k], flat[2 * k + 1]) for k in range(self.model.num_layers)]
        return list(flat)

    @property
    def step_count(self) -> int:
        """Steps since the last trainer-level reset."""
        return int(self._engine.step_count)

    @property
    def pending(self) -> int:
        """Steps since the previous update (the pending block's length)."""
        return int(self._engine.pending)

    def _named(self, grads):
        names = param_names(self.model.num_layers)
        return [dict(zip(names, g, strict=True)) for g in grads]

    def __repr__(self) -> str:
        return (
            f"Trainer({self.model!r}, k1={self.k1}, k2={self.k2}, loss={self.loss!r}, "
            f"optimizer={self.optimizer!r}, clip_grad_norm={self.clip_grad_norm}, "
            f"overlap={self.overlap!r}, backend={self.backend!r})"
        )
