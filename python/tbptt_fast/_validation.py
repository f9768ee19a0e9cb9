"""The one validation layer (contract: bad input) every backend goes through.

Every check names the argument, says what was expected and what was received,
and runs before anything changes. Engines trust what passes here.
"""

from __future__ import annotations

import numpy as np

from .model import _memory_bytes, _to_numpy
from .reference import PAIRED, state_count


def check_k(name: str, value, *, allow_none: bool = False) -> int | None:
    """An int >= 1 (``None`` too where allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        what = "an int >= 1 or None" if allow_none else "an int >= 1"
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if value >= 2**63:  # what the engines' 64-bit step counts hold
        raise ValueError(f"{name} must be < 2**63, got {value}")
    return int(value)


def check_bytes(name: str, shape, itemsize: int, what: str) -> None:
    """Refuse, before it is allocated, an array of ``shape`` and ``itemsize``
    that argument ``name`` asks for (``what``: what the array is, for the
    message): a ValueError when its size does not fit in 64 bits, a
    MemoryError when it is larger than this machine's memory. Sizes are
    counted with Python ints (no overflow)."""
    nbytes = int(itemsize)
    for n in shape:
        nbytes *= int(n)
    if nbytes >= 2**63:
        raise ValueError(
            f"{name}: {what} of shape {_fmt(shape)} would need {nbytes} bytes, "
            "which does not fit in 64 bits"
        )
    limit = _memory_bytes()
    if nbytes > limit:
        raise MemoryError(
            f"{name}: {what} of shape {_fmt(shape)} needs {nbytes} bytes, more than this "
            f"machine's memory ({limit} bytes)"
        )


def check_batch(name: str, model, batch: int, backend: str) -> None:
    """Refuse a batch whose state and one step's activations alone (the least
    any engine holds: the state in and out, the gates of every layer and the
    readout) are more than this machine's memory, before an engine allocates
    them. Host backends only: the cuda engine checks against the GPU's memory.
    ``name``: the argument the batch size comes from."""
    if backend not in ("numpy", "cpu"):
        return
    S, G = state_count(model.cell), model.gates
    per = model.num_layers * (2 * S + G) * model.hidden_size + model.output_size
    nbytes = int(batch) * per * np.dtype(model.dtype).itemsize
    limit = _memory_bytes()
    if nbytes > limit:
        raise MemoryError(
            f"{name} has batch size {batch}: the state and one step's activations of that "
            f"batch need {nbytes} bytes, more than this machine's memory ({limit} bytes)"
        )


def _check_copy(name: str, a: np.ndarray, dtype) -> None:
    """:func:`check_bytes` for the C-contiguous ``dtype`` copy of ``a`` that a
    validator makes, when it makes one (a broadcast view of a huge shape is
    cheap to pass; its copy is not)."""
    dtype = np.dtype(dtype)
    if a.dtype != dtype or not a.flags.c_contiguous:
        check_bytes(name, a.shape, dtype.itemsize, f"its contiguous {dtype} copy")


def finite_params(model) -> None:
    """Refuse a model with a NaN or Inf parameter, naming it."""
    for name, p in zip(model.param_names(), model.param_list(), strict=True):
        if not np.all(np.isfinite(p)):
            raise ValueError(f"parameter {name} must be finite, found NaN or Inf")


def check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _fmt(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _check_shape(name: str, a: np.ndarray, expected: tuple, labels: tuple) -> None:
    """expected: ints or None (free); labels: names shown for free axes."""
    shown = [lab if e is None else e for e, lab in zip(expected, labels, strict=True)]
    if a.ndim != len(expected) or any(
        e is not None and e != s for e, s in zip(expected, a.shape, strict=False)
    ):
        raise ValueError(f"{name} must have shape {_fmt(shown)}, got {_fmt(a.shape)}")


def _shifted(index, offset) -> list[int]:
    """``index`` (a tuple of ints) plus ``offset`` on its leading axes, as a list."""
    index = [int(i) for i in index]
    for axis, o in enumerate(offset or ()):
        index[axis] += int(o)
    return index


def float_layout(name, a: np.ndarray, expected, labels) -> None:
    """The type and shape checks of :func:`float_array` alone (nothing is read)."""
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {a.dtype}")
    _check_shape(name, a, expected, labels)
    if 0 in a.shape:
        raise ValueError(f"{name} must not be empty, got shape {_fmt(a.shape)}")


def float_array(
    name, value, expected, labels, dtype, *, finite_where=None, offset=None
) -> np.ndarray:
    """A floating array of the expected shape, cast to ``dtype``, C-contiguous.

    ``finite_where`` (bool, broadcastable) restricts the NaN/Inf check to the
    entries that will be read. ``offset`` (ints, one per leading axis) is
    added to the index a message reports, for a slice of a larger array.
    """
    a = _to_numpy(value)
    float_layout(name, a, expected, labels)
    _check_copy(name, a, dtype)
    # checked after the cast: a value too large for ``dtype`` becomes Inf there
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(a, dtype=dtype)
    # in slices along the first axis, so a long sequence needs no full-size temporary
    step = max(1, (1 << 20) // max(1, out[0].size))
    for lo in range(0, out.shape[0], step):
        ok = np.isfinite(out[lo : lo + step])
        if finite_where is not None:
            ok |= ~finite_where[lo : lo + step]
        if not ok.all():
            bad = tuple(int(i) for i in np.argwhere(~ok)[0])
            bad = (bad[0] + lo, *bad[1:])
            where = f"at index {_shifted(bad, offset)}"
            if np.isfinite(a[bad]):
                raise ValueError(
                    f"{name} must be finite in the model dtype {np.dtype(dtype)}, "
                    f"found {a[bad]} {where}, which overflows to Inf in that dtype"
                )
            raise ValueError(f"{name} must be finite, found {a[bad]} {where}")
    return out


def integer_layout(name, a: np.ndarray, expected, labels, what: str) -> None:
    """An integer (not bool) array of the expected shape; ``what`` ends the
    dtype message (e.g. "of class indices for cross_entropy")."""
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array {what}, got dtype {a.dtype}")
    _check_shape(name, a, expected, labels)


def token_ids(name, value, expected, labels, vocab_size: int, *, offset=None) -> np.ndarray:
    """Integer token ids in [0, vocab_size) of the expected shape, as C-contiguous int64
    (the contract (token inputs): a non-integer array is a TypeError, an id out of range a ValueError)."""
    a = _to_numpy(value)
    integer_layout(name, a, expected, labels, f"of token ids in [0, {vocab_size})")
    if 0 in a.shape:
        raise ValueError(f"{name} must not be empty, got shape {_fmt(a.shape)}")
    _check_copy(name, a, np.int64)  # also bounds the range check's temporaries
    bad = (a < 0) | (a >= vocab_size)
    if np.any(bad):
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name} must hold token ids in [0, {vocab_size}), "
            f"got {a[idx]} at index {_shifted(idx, offset)}"
        )
    return np.ascontiguousarray(a, dtype=np.int64)


def time_major(a: np.ndarray | None) -> np.ndarray | None:
    """A batch-first [B, T, ...] array as a C-contiguous time-major [T, B, ...] one."""
    return None if a is None else np.ascontiguousarray(np.swapaxes(a, 0, 1))


def flag_layout(name, a: np.ndarray, shape, labels) -> None:
    """The type and shape checks of :func:`flag_array` alone (nothing is read)."""
    if not (a.dtype == np.bool_ or np.issubdtype(a.dtype, np.number)):
        raise TypeError(f"{name} must be a bool or numeric array, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.complexfloating):
        raise TypeError(f"{name} must be a bool or real numeric array, got dtype {a.dtype}")
    _check_shape(name, a, shape, labels)


def flag_array(name, value, shape, labels) -> np.ndarray | None:
    """A bool or numeric [T, B] (or [B]) array; nonzero means true. None stays None."""
    if value is None:
        return None
    a = _to_numpy(value)
    flag_layout(name, a, shape, labels)
    check_bytes(name, a.shape, 1, "its bool copy")
    if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must not contain NaN or Inf")
    return a != 0


CLASS_WHAT = "of class indices for cross_entropy"


def class_target(name, value, shape, labels, num_classes, read, *, offset=None) -> np.ndarray:
    """Integer class indices in [0, O) where ``read`` (None: everywhere); returned as
    int64, 0 where not read. ``offset`` as :func:`float_array`."""
    a = _to_numpy(value)
    integer_layout(name, a, shape, labels, CLASS_WHAT)
    _check_copy(name, a, np.int64)
    bad = (a < 0) | (a >= num_classes)
    if read is not None:
        bad &= read
    if np.any(bad):
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name} must hold class indices in [0, {num_classes}) where mask is set, "
            f"got {a[idx]} at index {_shifted(idx, offset)}"
        )
    if read is not None:
        a = np.where(read, a, 0)
    return np.ascontiguousarray(a, dtype=np.int64)


def initial_state(value, model, batch: int | None, name: str = "initial_state") -> list:
    """Parse ``initial_state`` into the flat layer-major list the engines take.

    Accepts a list with one entry per layer (``h`` [B, H], or ``(h, c)`` for
    the cells with a cell state, lstm and cifg), or PyTorch's form: ``h0``
    [L, B, H], or ``(h0, c0)`` for those cells.
    ``batch``, when given, is the batch size the state must have; ``name``
    the argument's name in messages.
    """
    L, H, paired = model.num_layers, model.hidden_size, state_count(model.cell) == 2
    torch_form = None
    if (
        paired
        and isinstance(value, (tuple, list))
        and len(value) == 2
        and not any(isinstance(v, (tuple, list)) for v in value)
    ):
        parts = [_to_numpy(v) for v in value]
        if all(p.ndim == 3 for p in parts):
            torch_form = parts
    elif not paired and not isinstance(value, (list, tuple)):
        torch_form = [_to_numpy(value)]
    if torch_form is not None:
        arrays = []
        for j, part in enumerate(torch_form):
            sub = f"{name}[{j}]" if paired else name
            _check_shape(sub, part, (L, batch, H), ("L", "B", "H"))
            arrays.append(part)
        flat_named = []
        for k in range(L):
            for j, part in enumerate(arrays):
                sub = f"{name}[{j}]" if paired else name
                flat_named.append((f"{sub}[{k}]", part[k]))
    else:
        if not isinstance(value, (list, tuple)) or len(value) != L:
            form = "(h0, c0) with each [L, B, H]" if paired else "h0 [L, B, H]"
            per = "(h, c)" if paired else "h [B, H]"
            raise ValueError(
                f"{name} must be a list of {L} per-layer entries {per}, or PyTorch's {form}"
            )
        flat_named = []
        for k, entry in enumerate(value):
            if paired:
                if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                    raise ValueError(
                        f"{name}[{k}] must be a pair (h, c) for cells with a cell state "
                        f"({', '.join(PAIRED)})"
                    )
                flat_named += [(f"{name}[{k}][0]", entry[0]), (f"{name}[{k}][1]", entry[1])]
            else:
                flat_named.append((f"{name}[{k}]", entry))
    out = []
    for sub, a in flat_named:
        b = batch if batch is not None else (out[0].shape[0] if out else None)
        out.append(float_array(sub, a, (b, H), ("B", "H"), model.dtype))
    return out


def nested_state(flat: list[np.ndarray], model) -> list:
    """The flat layer-major state list of the engines in the form of ``Trainer.state``:
    one entry per layer, ``h`` [B, H] or ``(h, c)`` for lstm and cifg."""
    if state_count(model.cell) == 2:
        return [(flat[2 * k], flat[2 * k + 1]) for k in range(model.num_layers)]
    return list(flat)


def device_data(
    model, loss, names, values, views, *, step: bool, scan, batch_first: bool = False
) -> tuple:
    """Validate one call's CUDA arrays (see ``_device.py``) as the host path does.

    ``names``/``values``/``views``: x, target, mask, resets (views from
    ``_device.cuda_array``, None for an argument that is None). Shapes and
    dtypes are checked here; values on the device by ``scan`` (the CUDA
    engine's ``scan_device``), in the host path's order and with its messages.
    ``scan``'s "finite" must judge each value after the cast to the model
    dtype, as the host path does (a finite value it reports overflows there).
    Returns the engine's ``run_device`` data arguments ``(x, target, mask,
    resets)``, with a time axis added for ``step``; ``batch_first`` data
    ([B, T, ...], checked and reported in that order) become time-major views
    of the same memory.
    """
    x_name, t_name, m_name, r_name = names
    given = next(n for n, v in zip(names, views, strict=True) if v is not None)
    for name, value, view in zip(names, values, views, strict=True):
        if view is None and (value is not None or name in (x_name, t_name)):
            what = "None" if value is None else f"a host array ({type(value).__name__})"
            raise TypeError(
                f"{name} is {what} but {given} is a CUDA array; pass {x_name}, {t_name} and "
                f"any {m_name} / {r_name} as arrays on the same CUDA device"
            )
    x, t, m, r = views
    lead = ("B",) if step else (("B", "T") if batch_first else ("T", "B"))
    if x.dtype.kind != "f":
        raise TypeError(f"{x_name} must be a floating-point array, got dtype {x.dtype}")
    _check_shape(x_name, x, (*(None,) * len(lead), model.input_size), (*lead, "D"))
    if 0 in x.shape:
        raise ValueError(f"{x_name} must not be empty, got shape {_fmt(x.shape)}")

    def first_bad(name, view, kind, mask=None, mask_div=1, num_classes=0):
        """(index of the first bad element or None, its value, its integer value)"""
        mspec = None if mask is None else mask.spec(m_name)
        bad, value, ivalue = scan(view.spec(name), kind, mspec, mask_div, num_classes)
        idx = None if bad < 0 else [int(i) for i in np.unravel_index(bad, view.shape)]
        return idx, value, ivalue

    def not_finite(name, value, idx):
        # the engine checks in the model dtype: a finite value reported bad
        # overflows there (float64 1e39 into float32), as on the host path
        if np.isfinite(value):
            return ValueError(
                f"{name} must be finite in the model dtype {np.dtype(model.dtype)}, found "
                f"{value} at index {idx}, which overflows to Inf in that dtype"
            )
        return ValueError(f"{name} must be finite, found {value} at index {idx}")

    idx, value, _ = first_bad(x_name, x, "finite")
    if idx is not None:
        raise not_finite(x_name, value, idx)
    lead_shape = x.shape[: len(lead)]
    for name, view in ((m_name, m), (r_name, r)):
        if view is None:
            continue
        _check_shape(name, view, lead_shape, lead)
        idx, _, _ = first_bad(name, view, "flag")
        if idx is not None:
            raise ValueError(f"{name} must not contain NaN or Inf")
    if loss == "mse":
        if t.dtype.kind != "f":
            raise TypeError(f"{t_name} must be a floating-point array, got dtype {t.dtype}")
        _check_shape(t_name, t, (*lead_shape, model.output_size), (*lead, "O"))
        idx, value, _ = first_bad(t_name, t, "finite", m, mask_div=model.output_size)
        if idx is not None:
            raise not_finite(t_name, value, idx)
    else:
        if t.dtype.kind not in "iu":
            raise TypeError(
                f"{t_name} must be an integer array of class indices for cross_entropy, "
                f"got dtype {t.dtype}"
            )
        _check_shape(t_name, t, lead_shape, lead)
        O = model.output_size
        idx, _, ivalue = first_bad(t_name, t, "class", m, num_classes=O)
        if idx is not None:
            if t.dtype == np.uint64:
                ivalue %= 2**64  # the engine returns the element's 64 bits as int64
            raise ValueError(
                f"{t_name} must hold class indices in [0, {O}) where mask is set, "
                f"got {ivalue} at index {idx}"
            )
    if step:
        x, t = x.with_time_axis(), t.with_time_axis()
        m = None if m is None else m.with_time_axis()
        r = None if r is None else r.with_time_axis()
    elif batch_first:
        x, t = x.swap_time_batch(), t.swap_time_batch()
        m = None if m is None else m.swap_time_batch()
        r = None if r is None else r.swap_time_batch()
    return (
        x.spec(x_name),
        t.spec(t_name),
        None if m is None else m.spec(m_name),
        None if r is None else r.spec(r_name),
    )
