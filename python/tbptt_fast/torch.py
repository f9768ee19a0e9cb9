"""Train a PyTorch model with this engine: ``nn.LSTM/GRU/RNN`` + ``nn.Linear`` (contract: the PyTorch bridge).

>>> import torch
>>> from tbptt_fast.torch import TBPTT
>>> rnn, head = torch.nn.LSTM(3, 16), torch.nn.Linear(16, 2)
>>> runner = TBPTT(rnn, head, k1=8, k2=16, loss="mse")
>>> opt = torch.optim.Adam([*rnn.parameters(), *head.parameters()], lr=1e-3)
>>> res = runner.fit(torch.randn(64, 4, 3), torch.randn(64, 4, 2), opt)

The runner drives the C++ engine over the modules' own parameter memory (NumPy
views of the CPU tensors, no copies): the engine runs the forward pass and, at
every update of the TBPTT(k1, k2) schedule (contract: the schedule), computes the
gradient; the runner writes it into each parameter's ``.grad``, optionally clips
it with ``torch.nn.utils.clip_grad_norm_``, and calls ``optimizer.step()``, so
any ``torch.optim`` optimizer (and any scheduler, stepped in ``on_update``)
works. Only this module imports torch; ``import tbptt_fast`` never does.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import numpy as np

try:
    import torch
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "tbptt_fast.torch needs PyTorch: pip install 'tbptt-fast[torch]' (or pip install torch)"
    ) from exc

from . import _validation as V
from ._backend import make_engine
from ._config import EngineConfig
from .reference import state_count
from .trainer import LOSSES, OVERLAPS, FitResult, UpdateInfo, reset_stream

__all__ = ["TBPTT", "FitResult", "UpdateInfo"]

#: ``nn.RNNBase.mode`` -> the engine's cell name.
_CELLS = {"RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu", "LSTM": "lstm", "GRU": "gru"}
_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


class _SameAsK1:
    def __repr__(self) -> str:
        return "k1"


_K1 = _SameAsK1()


def _describe(module) -> str:
    return type(module).__name__


def _check_rnn(rnn) -> str:
    """The cell name of a supported ``nn.LSTM/GRU/RNN``; refuses everything else."""
    if not isinstance(rnn, torch.nn.RNNBase) or rnn.mode not in _CELLS:
        raise TypeError(
            f"rnn must be a torch.nn.LSTM, torch.nn.GRU or torch.nn.RNN (tanh or relu), "
            f"got {_describe(rnn)}; cells (nn.LSTMCell, ...) and custom modules are not "
            "supported: build the same network from nn.LSTM/GRU/RNN"
        )
    if rnn.bidirectional:
        raise ValueError(
            "rnn has bidirectional=True: TBPTT runs forward in time over a stream, so only "
            "unidirectional layers are supported; make the module with bidirectional=False"
        )
    if getattr(rnn, "proj_size", 0):
        raise ValueError(
            f"rnn has proj_size={rnn.proj_size}: LSTM projections are not supported; "
            "make the module with proj_size=0"
        )
    if rnn.dropout > 0 and rnn.num_layers > 1:
        raise ValueError(
            f"rnn has dropout={rnn.dropout} between layers: inter-layer dropout is not "
            "supported; make the module with dropout=0"
        )
    if not rnn.bias:
        raise ValueError(
            "rnn has bias=False: the engine needs bias_ih_l{k} and bias_hh_l{k}; make the "
            "module with bias=True (to train without biases, zero them and freeze them: "
            "p.data.zero_(); p.requires_grad_(False))"
        )
    return _CELLS[rnn.mode]


def _check_head(head, hidden: int) -> None:
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(
            f"head must be a torch.nn.Linear(hidden_size, output_size) (the readout "
            f"y_t = h_t W^T + b), got {_describe(head)}; deeper heads are not supported"
        )
    if head.bias is None:
        raise ValueError(
            "head has bias=False: the readout needs a bias; make it with bias=True (to train "
            "without one, zero it and freeze it: head.bias.data.zero_(); "
            "head.bias.requires_grad_(False))"
        )
    if head.in_features != hidden:
        raise ValueError(
            f"head.in_features must equal rnn.hidden_size = {hidden}, got {head.in_features}"
        )


def _check_embedding(embedding, input_size: int) -> None:
    if not isinstance(embedding, torch.nn.Embedding):
        raise TypeError(
            f"embedding must be None or a torch.nn.Embedding(vocab_size, rnn.input_size), "
            f"got {_describe(embedding)}"
        )
    if embedding.sparse:
        raise ValueError(
            "embedding has sparse=True: the engine computes a dense [V, D] gradient; make "
            "it with sparse=False"
        )
    if embedding.max_norm is not None:
        raise ValueError(
            f"embedding has max_norm={embedding.max_norm}: renormalising rows during the "
            "forward pass is not supported; make it with max_norm=None"
        )
    if embedding.scale_grad_by_freq:
        raise ValueError(
            "embedding has scale_grad_by_freq=True: not supported; make it with "
            "scale_grad_by_freq=False"
        )
    if embedding.embedding_dim != input_size:
        raise ValueError(
            f"embedding.embedding_dim must equal rnn.input_size = {input_size}, "
            f"got {embedding.embedding_dim}"
        )


def _param(module, attr: str, name: str):
    p = getattr(module, attr, None)
    if not isinstance(p, torch.nn.Parameter):
        raise TypeError(
            f"{name} must be a plain torch.nn.Parameter, got {type(p).__name__} (a "
            "parametrised or weight-normed module computes its weights; remove the "
            "parametrisation first)"
        )
    if isinstance(p, torch.nn.parameter.UninitializedParameter):
        raise ValueError(f"{name} is not initialised yet (a lazy module): run it once first")
    return p


def _bool_false(result) -> bool:
    return result is False or (isinstance(result, np.bool_) and not result)


class TBPTT:
    """TBPTT(k1, k2) training of a PyTorch ``nn.LSTM/GRU/RNN`` + ``nn.Linear`` by the C++ engine.

    Every ``k1`` steps (and on a flush) the engine backpropagates the loss of
    the steps since the previous update through the last ``k2`` steps (the contract:
    the schedule); the runner then writes that gradient into each parameter's
    ``.grad`` (replacing it; parameters with ``requires_grad=False`` get
    ``None``), clips it if asked (``torch.nn.utils.clip_grad_norm_`` over the
    parameters with a gradient), calls ``optimizer.step()`` and then
    ``on_update(info)``. The forward state carries on (stateful TBPTT).

    The engine reads the parameters where they live (the CPU tensors' memory),
    so it always sees their current values, including changes made between
    calls (``rnn.weight_hh_l0.data.mul_(0.5)``). A parameter that is replaced
    (``p.data = new``) is picked up at the next call; one that is not
    contiguous is made contiguous (``p.data = p.data.contiguous()``: the same
    ``Parameter`` object, so optimizer state keyed on it is kept).

    Args:
        rnn: ``torch.nn.LSTM``, ``nn.GRU`` or ``nn.RNN`` (nonlinearity tanh or
            relu), ``bias=True``, unidirectional, ``proj_size=0``, no dropout
            between layers; ``batch_first`` either way (then ``fit``'s data are
            [B, T, ...]). Parameters float32 or float64, all of one dtype, on the CPU.
        head: ``torch.nn.Linear(rnn.hidden_size, O)`` with bias: the readout.
        k1: steps between updates (int >= 1).
        k2: steps the gradient flows back through (int >= 1); defaults to
            ``k1``; ``None`` is unbounded (back to the last reset).
        loss: "mse" (targets [.., O] floating) or "cross_entropy" (targets
            integer class indices in [0, O)).
        overlap: "stored" (default: the backward pass uses the stored
            activations with the current weights) or "recompute" (the window's
            forward is re-run with the current weights: the exact gradient, as
            the re-run-the-window PyTorch loop); they differ only when k2 > k1.
        embedding: None, or ``torch.nn.Embedding(V, rnn.input_size)``
            (``sparse=False``, no ``max_norm``): then ``x`` is integer token ids
            [T, B] in [0, V); a ``padding_idx`` row gets no gradient, as in PyTorch.

    Raises:
        TypeError / ValueError: an unsupported module or option, naming it and
            what to use instead; ValueError for CUDA modules (the CUDA bridge
            is not available yet: move the modules to the CPU).
    """

    def __init__(
        self,
        rnn,
        head,
        k1: int,
        k2: int | None = _K1,
        loss: str = "mse",
        overlap: str = "stored",
        embedding=None,
    ):
        self.k1 = V.check_k("k1", k1)
        self.k2 = self.k1 if k2 is _K1 else V.check_k("k2", k2, allow_none=True)
        self.loss = V.check_choice("loss", loss, LOSSES)
        self.overlap = V.check_choice("overlap", overlap, OVERLAPS)
        self.rnn, self.head, self.embedding = rnn, head, embedding
        self._engine = None
        self._key = None
        self._bind()
        self._batch = None  # batch size of the stream, once known
        self._last_batch = None  # the last batch size seen, kept across resets

    # -- binding the modules' parameters to an engine ------------------------------
    def _named_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(name, Parameter) in the engine's canonical order (a tied parameter repeats)."""
        out = []
        if self.embedding is not None:
            out.append(("embedding.weight", _param(self.embedding, "weight", "embedding.weight")))
        for k in range(self.rnn.num_layers):
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                attr = f"{kind}_l{k}"
                out.append((f"rnn.{attr}", _param(self.rnn, attr, f"rnn.{attr}")))
        out.append(("head.weight", _param(self.head, "weight", "head.weight")))
        out.append(("head.bias", _param(self.head, "bias", "head.bias")))
        return out

    @staticmethod
    def _layout_key(params) -> tuple:
        return tuple(
            (id(p), p.data_ptr(), p.dtype, p.device, tuple(p.shape), p.is_contiguous())
            for p in params
        )

    def _sync(self) -> None:
        """Before every call: re-bind if a parameter was replaced, moved or re-laid out."""
        params = [p for _, p in self._named_params()]
        if self._layout_key(params) != self._key:
            self._bind()

    def _bind(self) -> None:
        """Validate the modules and (re)build the engine over their parameters.

        A re-bind keeps the training state (step count, pending block, history,
        state, initial state) by moving the old engine's snapshot over.
        """
        cell = _check_rnn(self.rnn)
        hidden, input_size = self.rnn.hidden_size, self.rnn.input_size
        _check_head(self.head, hidden)
        vocab = 0
        if self.embedding is not None:
            _check_embedding(self.embedding, input_size)
            vocab = self.embedding.num_embeddings
        named = self._named_params()
        dtypes = {p.dtype for _, p in named}
        if len(dtypes) > 1:
            found = ", ".join(f"{n}: {str(p.dtype).replace('torch.', '')}" for n, p in named)
            raise ValueError(
                f"the modules' parameters must all have one dtype, float32 or float64; "
                f"found {found}; convert them with .float() or .double()"
            )
        dtype = next(iter(dtypes))
        if dtype not in _DTYPES:
            raise ValueError(
                f"the modules' parameters must be float32 or float64, got "
                f"{str(dtype).replace('torch.', '')}; convert them with .float() or .double()"
            )
        for name, p in named:
            if p.device.type == "cuda":
                raise ValueError(
                    f"{name} is on {p.device}: the CUDA bridge is not available yet; move the "
                    "modules to the CPU (rnn.cpu(), head.cpu(), embedding.cpu()) and pass CPU "
                    "data, or train a tb.Model with tb.Trainer(..., backend='cuda')"
                )
            if p.device.type != "cpu":
                raise ValueError(f"{name} is on {p.device}: move the modules to the CPU")
            if p.layout != torch.strided:
                raise ValueError(f"{name} must be a dense (strided) tensor, got {p.layout}")
        dt = _DTYPES[dtype]
        config = EngineConfig(
            cell=cell,
            input_size=input_size,
            hidden_size=hidden,
            output_size=self.head.out_features,
            num_layers=self.rnn.num_layers,
            dtype=dt,
            k1=self.k1,
            k2=0 if self.k2 is None else self.k2,
            loss=self.loss,
            overlap=self.overlap,
            clip=-1.0,  # clip_grad_norm_ is applied here, over torch's .grad
            capacity=0,
            optimizer="external",  # the engine computes gradients; torch steps
            lr=0.0,
            momentum=0.0,
            nesterov=False,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            vocab_size=vocab,
        )
        old = self._engine
        if old is not None and config != self._config:
            raise ValueError(
                "the modules changed shape or dtype since this TBPTT was made (now "
                f"{dt}, hidden_size={hidden}, output_size={self.head.out_features}); "
                "make a new TBPTT for them"
            )
        with torch.no_grad():
            for _, p in named:
                if not p.is_contiguous():
                    p.data = p.data.contiguous()  # the same Parameter: optimizer state kept
        params = [p for _, p in named]
        arrays = [p.detach().numpy() for p in params]  # views of the parameters' memory
        engine = make_engine("cpu", config, arrays)
        if old is not None:
            engine.restore(old.snapshot())
        self._engine, self._config = engine, config
        self._names = [n for n, _ in named]
        self._params = params
        # unique parameters and the engine slots whose gradients they sum (tied weights)
        slots: dict[int, tuple[torch.nn.Parameter, list[int]]] = {}
        for i, p in enumerate(params):
            slots.setdefault(id(p), (p, []))[1].append(i)
        self._slots = list(slots.values())
        self._bufs = [None] * len(self._slots)  # (.grad tensor, its NumPy view) per slot
        self._padding_idx = None if self.embedding is None else self.embedding.padding_idx
        self._shape = SimpleNamespace(
            cell=cell, num_layers=self.rnn.num_layers, hidden_size=hidden, dtype=dt
        )
        self._key = self._layout_key(params)

    # -- checks ----------------------------------------------------------------------
    def _check_finite(self) -> None:
        for p, idx in self._slots:
            if not bool(torch.isfinite(p).all()):
                raise ValueError(
                    f"parameter {self._names[idx[0]]} must be finite, found NaN or Inf"
                )

    def _check_optimizer(self, optimizer) -> None:
        if not callable(getattr(optimizer, "step", None)):
            raise TypeError(
                f"optimizer must be a torch.optim optimizer (anything with .step()), "
                f"got {type(optimizer).__name__}"
            )
        groups = getattr(optimizer, "param_groups", None)
        if groups is not None:
            held = {id(p) for g in groups for p in g["params"]}
            if not any(id(p) in held for p, _ in self._slots):
                raise ValueError(
                    "optimizer holds none of the modules' parameters; make it from "
                    "[*rnn.parameters(), *head.parameters()] (and embedding's)"
                )

    @staticmethod
    def _check_clip(clip_grad_norm) -> float | None:
        if clip_grad_norm is None:
            return None
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
        return float(clip_grad_norm)

    @staticmethod
    def _check_callback(on_update) -> None:
        if on_update is not None and not callable(on_update):
            raise TypeError(f"on_update must be callable or None, got {type(on_update).__name__}")

    def _check_data(self, x, target, mask, resets, *, step: bool):
        """Validate and convert one call's data: (x, target, mask, resets) time-major
        C-contiguous arrays of the engine's dtypes (time axis added for ``step``)."""
        dt = self._config.dtype
        batch_first = self.rnn.batch_first and not step
        if step:
            names, lead = ("x_t", "target_t", "mask_t", "reset_t"), ("B",)
        else:
            names, lead = (
                ("x", "target", "mask", "resets"),
                ("B", "T")
                if batch_first
                else (
                    "T",
                    "B",
                ),
            )
        x_name, t_name, m_name, r_name = names
        free = (None,) * len(lead)
        if self._config.vocab_size:
            xa = V.token_ids(x_name, x, free, lead, self._config.vocab_size)
        else:
            xa = V.float_array(x_name, x, (*free, self._config.input_size), (*lead, "D"), dt)
        lead_shape = xa.shape[: len(lead)]
        mask_b = V.flag_array(m_name, mask, lead_shape, lead)
        reset_b = V.flag_array(r_name, resets, lead_shape, lead)
        out = self._config.output_size
        if self.loss == "mse":
            read = None if mask_b is None else mask_b[..., None]
            ta = V.float_array(
                t_name, target, (*lead_shape, out), (*lead, "O"), dt, finite_where=read
            )
            if read is not None and not mask_b.all():  # unread targets may hold NaN
                ta = np.where(read, ta, 0).astype(dt)
        else:
            ta = V.class_target(t_name, target, lead_shape, lead, out, mask_b)
        mask_f = None if mask_b is None else mask_b.astype(dt)
        resets_u8 = None if reset_b is None else reset_b.astype(np.uint8)
        arrays = [xa, ta, mask_f, resets_u8]
        if step:
            arrays = [None if a is None else a[None] for a in arrays]
        elif batch_first:
            arrays = [V.time_major(a) for a in arrays]
        return tuple(None if a is None else np.ascontiguousarray(a) for a in arrays)

    def _check_batch(self, batch: int, name: str) -> None:
        if self._batch is not None and batch != self._batch:
            raise ValueError(
                f"{name} has batch size {batch} but the stream has {self._batch}; "
                "call reset_state() before changing the batch size"
            )

    # -- one update: gradient -> .grad -> clip -> optimizer.step() -> on_update --------
    def _apply(self, grads, optimizer, clip: float | None) -> None:
        """Write one update's gradient (arrays in canonical order) into ``.grad`` and step.

        Each ``.grad`` is a tensor of the runner's own, reused from update to
        update while it is still the parameter's ``.grad`` (a copy into it is
        all an update costs); a ``.grad`` set to None or replaced by the user is
        replaced by a new one.
        """
        with_grad = []
        for j, (p, idx) in enumerate(self._slots):
            if not p.requires_grad:
                p.grad = None
                continue
            buf = self._bufs[j]
            if buf is None or p.grad is not buf[0]:
                t = torch.empty_like(p, memory_format=torch.contiguous_format)
                p.grad = t
                buf = self._bufs[j] = (t, t.numpy())
            np.copyto(buf[1], grads[idx[0]])
            if idx[0] == 0 and self._padding_idx is not None:
                buf[1][self._padding_idx] = 0  # PyTorch: the padding row gets no gradient
            for i in idx[1:]:  # a tied parameter: the sum of its uses
                np.add(buf[1], grads[i], out=buf[1])
            with_grad.append(p)
        if clip is not None and with_grad:
            torch.nn.utils.clip_grad_norm_(with_grad, clip)
        optimizer.step()

    def _callback(self, optimizer, clip, on_update):
        engine = self._engine

        def call(index, step, loss) -> bool:
            self._apply(engine.grads(), optimizer, clip)
            if on_update is None:
                return True
            return not _bool_false(on_update(UpdateInfo(int(index), int(step), float(loss))))

        return call

    # -- public API ------------------------------------------------------------------
    def fit(
        self,
        x,
        target,
        optimizer,
        mask=None,
        resets=None,
        flush: bool = True,
        clip_grad_norm: float | None = None,
        on_update: Callable[[UpdateInfo], object] | None = None,
    ) -> FitResult:
        """Train on a sequence, carrying the state, step count and pending block on.

        Args:
            x: [T, B, D] floating (cast to the parameters' dtype), or with an
                embedding integer ids [T, B] in [0, V); [B, T, ...] for a
                ``batch_first`` rnn. Torch tensors (any device) or NumPy arrays.
            target: mse: [T, B, O] floating; cross_entropy: [T, B] integer class
                indices in [0, O) (not read where mask is 0).
            optimizer: a ``torch.optim`` optimizer over (some of) the modules'
                parameters; ``optimizer.step()`` runs at every update.
            mask: optional [T, B] bool/numeric, nonzero = has a target.
            resets: optional [T, B] bool/numeric, nonzero = the state entering
                that step of that element is the initial state (no gradient across).
            flush: update on the pending partial block at the end (default True).
            clip_grad_norm: None, or a max global 2-norm (> 0) for
                ``torch.nn.utils.clip_grad_norm_`` over the parameters with a gradient.
            on_update: optional callable of an :class:`UpdateInfo` (index within
                this call, step, loss), called after each ``optimizer.step()``
                (step a scheduler here); returning ``False`` stops the fit
                after that update (the stream is then positioned after it).

        Returns:
            :class:`FitResult`: ``losses`` [U] float64 (each update's ``Loss_P``)
            and ``update_steps`` [U] int64.

        Everything is validated before the first step; on a validation error
        nothing changes (parameters, state, step count). A non-finite loss or
        gradient raises :class:`tbptt_fast.NonFiniteError` before that
        update's ``optimizer.step()``.
        """
        clip = self._check_clip(clip_grad_norm)
        self._check_callback(on_update)
        self._sync()
        self._check_optimizer(optimizer)
        xa, ta, ma, ra = self._check_data(x, target, mask, resets, step=False)
        self._check_batch(xa.shape[1], "x")
        self._check_finite()
        self._batch = self._last_batch = xa.shape[1]
        losses, steps, _, _ = self._engine.run(
            xa, ta, ma, ra, bool(flush), False, False, self._callback(optimizer, clip, on_update)
        )
        return FitResult(
            losses=np.asarray(losses, dtype=np.float64),
            update_steps=np.asarray(steps, dtype=np.int64),
        )

    def step(
        self,
        x_t,
        target_t,
        optimizer,
        mask_t=None,
        reset_t=None,
        clip_grad_norm: float | None = None,
        on_update: Callable[[UpdateInfo], object] | None = None,
    ) -> float | None:
        """Streaming: run one step; returns the update's loss if one happened, else None.

        x_t [B, D] floating (or [B] ids with an embedding); target_t [B, O]
        (mse) or [B] integers (cross_entropy); mask_t, reset_t optional [B]
        bool/numeric. ``batch_first`` does not apply to one step. The rest as
        :meth:`fit`.
        """
        clip = self._check_clip(clip_grad_norm)
        self._check_callback(on_update)
        self._sync()
        self._check_optimizer(optimizer)
        xa, ta, ma, ra = self._check_data(x_t, target_t, mask_t, reset_t, step=True)
        self._check_batch(xa.shape[1], "x_t")
        self._check_finite()
        self._batch = self._last_batch = xa.shape[1]
        losses, _, _, _ = self._engine.run(
            xa, ta, ma, ra, False, False, False, self._callback(optimizer, clip, on_update)
        )
        return float(losses[0]) if len(losses) else None

    def flush(
        self,
        optimizer,
        clip_grad_norm: float | None = None,
        on_update: Callable[[UpdateInfo], object] | None = None,
    ) -> float | None:
        """Update on the pending partial block (gradient, clip, ``optimizer.step()``,
        ``on_update``); returns its loss, or None if nothing was pending."""
        clip = self._check_clip(clip_grad_norm)
        self._check_callback(on_update)
        self._sync()
        self._check_optimizer(optimizer)
        self._check_finite()
        losses, steps, grads, _ = self._engine.flush(True)  # re-reads the parameters
        if not len(losses):
            return None
        self._apply(grads[0], optimizer, clip)
        if on_update is not None:
            on_update(UpdateInfo(0, int(steps[0]), float(losses[0])))
        return float(losses[0])

    def reset_state(self, initial_state=None) -> None:
        """Start a new stream: step count 0, pending block and history discarded,
        state back to ``initial_state`` (zeros if None). The optimizer is not touched.

        ``initial_state``: PyTorch's form, ``h0`` [L, B, H] or ``(h0, c0)`` for
        an LSTM (tensors or arrays), or a list with one entry per layer, ``h``
        [B, H] or ``(h, c)``. It is also the state that ``resets`` restore.
        """
        self._sync()
        reset_stream(self, initial_state, self._shape)

    @property
    def state(self):
        """The forward state in PyTorch's form (CPU tensors, copies): ``h`` [L, B, H], or
        ``(h, c)`` for an LSTM, as ``rnn(x, state)`` takes it. Zeros of the last batch
        size after ``reset_state()``; None before the first step."""
        flat = self._engine.state()
        L, H = self._shape.num_layers, self._shape.hidden_size
        n = state_count(self._shape.cell)
        if flat is None:
            if self._last_batch is None:
                return None
            flat = [np.zeros((self._last_batch, H), self._shape.dtype)] * (n * L)
        parts = [torch.from_numpy(np.stack(flat[j::n])) for j in range(n)]
        return tuple(parts) if n == 2 else parts[0]

    @property
    def step_count(self) -> int:
        """Steps since the last reset."""
        return int(self._engine.step_count)

    @property
    def pending(self) -> int:
        """Steps since the previous update (the pending block's length)."""
        return int(self._engine.pending)

    def __repr__(self) -> str:
        emb = "" if self.embedding is None else f", embedding={self.embedding!r}"
        return (
            f"TBPTT({self.rnn!r}, {self.head!r}, k1={self.k1}, k2={self.k2}, "
            f"loss={self.loss!r}, overlap={self.overlap!r}{emb})"
        )
