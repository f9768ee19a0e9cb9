"""The model: a stack of recurrent layers and a linear readout, with PyTorch's parameter layout."""

from __future__ import annotations

import math
import os
import weakref

import numpy as np

from . import reference
from ._device import cuda_array, is_torch
from .reference import param_names

__all__ = ["CELLS", "DTYPES", "Model"]

CELLS = tuple(reference.CELLS)  # the cell registry's names, in its order
DTYPES = ("float32", "float64")


def _positive_int(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


_NUMPY_FLOATS = ("torch.float16", "torch.float32", "torch.float64")


def _to_numpy(value) -> np.ndarray:
    """A NumPy view of an array-like, including torch tensors (on any device).

    Other CUDA arrays (CuPy, ``__cuda_array_interface__``, CUDA DLPack) are a
    TypeError: what reads this wants host memory.
    """
    if is_torch(value):
        t = value.detach().cpu()
        if t.is_floating_point() and str(t.dtype) not in _NUMPY_FLOATS:
            # bfloat16 and the float8 types have no NumPy dtype (``.numpy()``
            # raises "Got unsupported ScalarType"): widened to float32, exactly
            t = t.float()
        return t.numpy()
    if not isinstance(value, np.ndarray) and cuda_array(value) is not None:
        raise TypeError(
            f"got a CUDA array ({type(value).__name__}) where a host array is read: "
            "copy it to the host first (e.g. CuPy's .get())"
        )
    return np.asarray(value)


def _memory_bytes() -> int:
    """This machine's physical memory in bytes (2**48 where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 2**48


class Model:
    """A stack of ``num_layers`` recurrent layers followed by a linear readout.

    Parameters (names and shapes as ``torch.nn.LSTM/GRU/RNN`` + ``torch.nn.Linear``,
    G = 1 rnn_tanh/rnn_relu, 4 lstm (i, f, g, o), 3 gru (r, z, n), 3 cifg (f, g, o)):
    ``weight_ih_l{k}`` [G*H, D_k] (D_0 = input_size, else H), ``weight_hh_l{k}``
    [G*H, H], ``bias_ih_l{k}``, ``bias_hh_l{k}`` [G*H], ``readout.weight`` [O, H],
    ``readout.bias`` [O]. All are drawn uniform in [-1/sqrt(H), 1/sqrt(H)] from
    ``numpy.random.default_rng(seed)`` in that order, then cast to ``dtype``.

    With ``vocab_size=V`` the model reads token ids: ``embedding.weight``
    [V, input_size] (``torch.nn.Embedding``'s layout and name) comes first in
    the parameter order, drawn standard normal (as PyTorch) as the generator's
    first draw, and layer 0 reads ``x_t = embedding.weight[ids_t]``. Then ``x``
    is integer ids [T, B] ([B] for ``Trainer.step``) in [0, V) in every call.

    Args:
        cell: one of :data:`CELLS`: "rnn_tanh", "rnn_relu", "lstm", "gru" or
            "cifg" (the LSTM with coupled input and forget gates: ``c' = f*c +
            (1-f)*g``, ``h' = o*tanh(c')``; its state is ``(h, c)`` like lstm's).
        input_size, hidden_size, output_size, num_layers: D, H, O, L (ints >= 1).
        dtype: "float32" (default) or "float64"; every computation uses it.
        seed: seed of the initialisation.
        vocab_size: None (default: ``x`` is floating [T, B, input_size]) or
            V >= 1, the number of token ids (an embedding before layer 0).
    """

    def __init__(
        self,
        cell: str,
        input_size: int,
        hidden_size: int,
        output_size: int,
        num_layers: int = 1,
        dtype: str = "float32",
        seed: int = 0,
        vocab_size: int | None = None,
    ):
        if not isinstance(cell, str):
            raise TypeError(
                f"cell must be a string, one of {list(CELLS)}, got {type(cell).__name__}"
            )
        if cell not in reference.CELLS:
            raise ValueError(f"cell must be one of {list(CELLS)}, got {cell!r}")
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int >= 0, got {type(seed).__name__}")
        if seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed}")
        self.cell = cell
        self.input_size = _positive_int("input_size", input_size)
        self.hidden_size = _positive_int("hidden_size", hidden_size)
        self.output_size = _positive_int("output_size", output_size)
        self.num_layers = _positive_int("num_layers", num_layers)
        self.vocab_size = None if vocab_size is None else _positive_int("vocab_size", vocab_size)
        if dtype is None or isinstance(dtype, (bool, int, float, complex, np.generic)):
            # np.dtype(None) would be float64, and a NumPy scalar converts to its type
            raise TypeError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        try:
            dt = np.dtype(dtype)
        except TypeError:
            dt = None
        if dt is None or dt.name not in DTYPES:
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        self.dtype = dt.name
        self._check_size(dt.itemsize)
        rng = np.random.default_rng(seed)
        bound = 1.0 / math.sqrt(self.hidden_size)
        self._params = {}
        for name, shape in self.shapes().items():
            if name == "embedding.weight":  # nn.Embedding's init, the first draw
                value = rng.standard_normal(size=shape)
            else:
                value = rng.uniform(-bound, bound, size=shape)
            self._params[name] = np.ascontiguousarray(value.astype(self.dtype))
        self._version = 0  # bumped by load_state_dict; trainers re-check finiteness then
        self._trainers = weakref.WeakSet()  # trainers whose device copies must follow
        self._forward_engines = {}  # backend -> the engine of predict / evaluate

    def _check_size(self, itemsize: int) -> None:
        """Refuse, before anything is allocated, parameters larger than this
        machine's memory (counted without building the per-layer table)."""
        G, H, D, O, L = (
            self.gates,
            self.hidden_size,
            self.input_size,
            self.output_size,
            self.num_layers,
        )
        count = G * H * (D + H + 2) + (L - 1) * G * H * (2 * H + 2) + O * (H + 1)
        count += (self.vocab_size or 0) * D
        limit = _memory_bytes()
        if count * itemsize > limit:
            raise ValueError(
                f"the model's parameters need {count} values ({count * itemsize} bytes), more "
                f"than this machine's memory ({limit} bytes): num_layers={L}, "
                f"hidden_size={H}, input_size={D}, output_size={O}, vocab_size={self.vocab_size}"
            )

    # -- copying: the parameters and the configuration; not the trainers using the
    # model nor the cached forward engines (a copy starts without them)
    def __getstate__(self) -> dict:
        self._sync_from_devices()  # a cuda trainer's parameters, into the model's arrays
        state = dict(self.__dict__)
        state.pop("_trainers", None)
        state.pop("_forward_engines", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        # fresh arrays of the canonical dtype object (an unpickled dtype is equal
        # but not identical to it, and the native engines compare by identity)
        params = {}
        for name, a in self._params.items():
            out = np.empty(np.shape(a), dtype=self.dtype)
            np.copyto(out, a)
            params[name] = out
        self._params = params
        self._trainers = weakref.WeakSet()
        self._forward_engines = {}

    @property
    def gates(self) -> int:
        """G: gates per hidden unit (1, 4 or 3)."""
        return reference.CELLS[self.cell].gates

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter name -> shape, in canonical order."""
        G, H = self.gates, self.hidden_size
        shapes = {}
        if self.vocab_size is not None:
            shapes["embedding.weight"] = (self.vocab_size, self.input_size)
        for k in range(self.num_layers):
            d = self.input_size if k == 0 else H
            shapes[f"weight_ih_l{k}"] = (G * H, d)
            shapes[f"weight_hh_l{k}"] = (G * H, H)
            shapes[f"bias_ih_l{k}"] = (G * H,)
            shapes[f"bias_hh_l{k}"] = (G * H,)
        shapes["readout.weight"] = (self.output_size, H)
        shapes["readout.bias"] = (self.output_size,)
        assert list(shapes) == self.param_names()
        return shapes

    def param_names(self) -> list[str]:
        """Parameter names in canonical order (``embedding.weight`` first, if any)."""
        return param_names(self.num_layers, embedding=self.vocab_size is not None)

    def param_list(self) -> list[np.ndarray]:
        """The live parameter arrays in canonical order (engines update them in place)."""
        return [self._params[n] for n in self.param_names()]

    def _sync_from_devices(self) -> None:
        # host engines update the model's arrays in place: only device copies are fetched
        # (which also lets predict / evaluate / state_dict run inside a cpu trainer's on_update)
        for trainer in list(self._trainers):
            if trainer.backend == "cuda":
                trainer._engine.pull_params()

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the current parameters: ``{name: np.ndarray}`` in canonical order."""
        self._sync_from_devices()
        return {name: p.copy() for name, p in self._params.items()}

    def load_state_dict(self, state_dict) -> None:
        """Load parameters from a mapping of name -> array (NumPy or torch tensors).

        Names and shapes must match :meth:`shapes` exactly; floating values are
        cast to the model's dtype. A ``torch.nn.LSTM``'s state dict plus a
        ``torch.nn.Linear``'s under the prefix ``readout.`` loads as is.
        Raises ``ValueError``/``TypeError`` naming the entry; on error nothing
        is changed. A finite value that overflows to Inf in the model dtype
        (float64 ``1e39`` into float32) is a ``ValueError`` naming the entry;
        NaN and Inf themselves are not refused here (as in PyTorch): a trainer
        refuses non-finite parameters before its next step.
        """
        if not hasattr(state_dict, "keys"):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        expected = self.shapes()
        missing = [n for n in expected if n not in state_dict]
        unexpected = [n for n in state_dict.keys() if n not in expected]
        if missing or unexpected:
            raise ValueError(
                f"state_dict keys do not match: missing {missing}, unexpected {unexpected}"
            )
        new = {}
        for name, shape in expected.items():
            a = _to_numpy(state_dict[name])
            if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
                raise TypeError(f"state_dict[{name!r}] must be a real array, got {a.dtype}")
            if a.shape != shape:
                raise ValueError(
                    f"state_dict[{name!r}] must have shape {list(shape)}, got {list(a.shape)}"
                )
            with np.errstate(over="ignore", invalid="ignore"):
                cast = a.astype(self.dtype)
            # a finite value too large for the model dtype would become Inf there
            overflow = ~np.isfinite(cast) & np.isfinite(a)
            if overflow.any():
                idx = [int(i) for i in np.argwhere(overflow)[0]]
                raise ValueError(
                    f"state_dict[{name!r}] must be finite in the model dtype {self.dtype}, "
                    f"found {a[tuple(idx)]} at index {idx}, which overflows to Inf in that dtype"
                )
            new[name] = cast
        for name, a in new.items():
            np.copyto(self._params[name], a)  # in place: engines hold these arrays
        self._version += 1
        for trainer in list(self._trainers):
            trainer._engine.push_params()

    def predict(self, x, state=None, resets=None, backend: str = "cpu", batch_first: bool = False):
        """The model's readout outputs on a sequence, forward only (contract: forward-only use).

        Args:
            x: [T, B, D] floating input (cast to the model dtype), or integer
                ids [T, B] in [0, vocab_size) for a token model; [B, T, ...]
                with ``batch_first``.
            state: the state entering the first step, in either form of
                ``Trainer.fit``'s ``initial_state``; None is zeros. A reset
                restores it.
            resets: optional [T, B] ([B, T] with ``batch_first``) bool/numeric;
                nonzero = the state entering that step of that element is
                replaced by ``state``.
            backend: "cpu" (default), "numpy" or "cuda".
            batch_first: data (and the returned outputs) batch first.

        Returns:
            :class:`PredictResult`: ``outputs`` [T, B, O] in the model dtype
            ([B, T, O] with ``batch_first``) and ``state``, the final state in
            the form of ``Trainer.state`` (per layer ``h`` [B, H] or ``(h, c)``).

        Nothing changes: parameters and every trainer's state, step count,
        pending block and optimizer state are untouched. Bad input raises
        ``ValueError``/``TypeError`` naming the argument.
        """
        from .inference import predict

        return predict(self, x, state, resets, backend, batch_first)

    def evaluate(
        self,
        x,
        target,
        mask=None,
        resets=None,
        state=None,
        loss: str = "mse",
        backend: str = "cpu",
        batch_first: bool = False,
    ):
        """The mean per-pair loss on a sequence, forward only, streamed (contract: forward-only use).

        Args:
            x, state, resets, backend, batch_first: as :meth:`predict`.
            target: mse: [T, B, O] floating; cross_entropy: [T, B] integer class
                indices in [0, O) (not read where mask is 0); [B, T, ...] with
                ``batch_first``.
            mask: optional [T, B] bool/numeric, nonzero = has a target.
            loss: "mse" or "cross_entropy".

        Returns:
            :class:`EvalResult`: ``loss`` (float, the mean of the per-pair loss
            of the contract (the loss) over unmasked pairs, summed in float64; 0.0 if
            none), ``count`` (int, the unmasked pairs), ``accuracy`` (float,
            cross_entropy only: the share of unmasked pairs whose argmax is the
            target, 0.0 if none; None for mse) and ``state`` (the final state).

        The sequence is run in chunks of steps, so the memory used does not grow
        with T. Nothing changes (as :meth:`predict`).
        """
        from .inference import evaluate

        return evaluate(self, x, target, mask, resets, state, loss, backend, batch_first)

    def __repr__(self) -> str:
        vocab = "" if self.vocab_size is None else f", vocab_size={self.vocab_size}"
        return (
            f"Model({self.cell!r}, input_size={self.input_size}, hidden_size={self.hidden_size}, "
            f"output_size={self.output_size}, num_layers={self.num_layers}, dtype={self.dtype!r}"
            f"{vocab})"
        )

    # -- checkpoints ----------------------------------------------------------------
    def save(self, path) -> None:
        """Save the architecture and the current parameters to ``path`` (contract: checkpoints).

        The write is atomic; the format is described in :mod:`tbptt_fast.checkpoint`.
        """
        from .checkpoint import save_model

        save_model(self, path)

    @classmethod
    def load(cls, path) -> Model:
        """The model saved at ``path`` by :meth:`save` or ``Trainer.save``.

        Raises:
            ValueError: naming the path, for a truncated, corrupted, foreign or
                newer-format file.
        """
        from .checkpoint import load_model

        return load_model(path)
