"""Stand-ins for CUDA arrays on a machine without a GPU.

``FakeCuda(a)`` exposes a NumPy array's memory through
``__cuda_array_interface__`` (the pointer is a host pointer, which nothing
here dereferences as device memory). ``NumpyDeviceEngine`` wraps a CPU engine
and implements the CUDA engine's ``scan_device`` / ``run_device`` with NumPy,
written from the contract of csrc/cuda/inputs.cuh (first bad element in C
order, nonzero flags, unread labels and targets set to 0, casts), so the
Python side of the device path (routing, validation order and messages, the
specs and the time axis it hands over) is tested end to end without a GPU.
"""

from __future__ import annotations

import numpy as np

from tbptt_fast._device import ELEM_CODES

_CODES = {code: dtype for dtype, code in ELEM_CODES.items()}
_LIVE: dict[int, np.ndarray] = {}  # pointer -> the array it belongs to


class FakeCuda:
    """A NumPy array presented as a CUDA array (v3 interface, explicit strides)."""

    def __init__(self, a, *, strides=True):
        self.a = np.asarray(a)
        _LIVE[self.a.ctypes.data] = self.a
        self._strides = strides

    @property
    def __cuda_array_interface__(self):
        return {
            "shape": self.a.shape,
            "typestr": self.a.dtype.str,
            "data": (self.a.ctypes.data, False),
            "strides": self.a.strides if self._strides else None,
            "version": 3,
            "stream": 1,
        }


def from_spec(spec) -> np.ndarray:
    """The NumPy array a spec (ptr, code, shape, strides, name) describes."""
    ptr, code, shape, strides, _ = spec
    base = _LIVE[ptr]
    assert base.dtype == _CODES[code], (base.dtype, _CODES[code])
    view = np.lib.stride_tricks.as_strided(base, shape=shape, strides=strides)
    # a step's time axis (stride 0, extent 1) is the only reshaping allowed
    assert view.size == base.size
    return view


def numpy_scan(spec, kind, mask_spec, mask_div, num_classes, dtype):
    """``scan_device`` of an engine of ``dtype``: "finite" judges each value
    after the cast to ``dtype``, as the host path does (issue 15). The CUDA
    engine does not yet (it judges the value as read, as a double):
    tests/test_cuda_device_inputs.py pins that with a strict xfail."""
    a = from_spec(spec).reshape(-1)
    read = np.ones(a.shape, bool)
    if mask_spec is not None:
        read = np.repeat(from_spec(mask_spec).reshape(-1) != 0, mask_div)
    if kind == "finite":
        with np.errstate(over="ignore", invalid="ignore"):
            bad = read & ~np.isfinite(a.astype(dtype))
    elif kind == "flag":
        bad = ~np.isfinite(a) if a.dtype.kind == "f" else np.zeros(a.shape, bool)
    else:
        bad = read & ((a < 0) | (a >= num_classes))
    if not bad.any():
        return -1, 0.0, 0
    i = int(np.argmax(bad))
    # integers come back as their 64 bits read as int64 (uint64 wraps), as from the engine
    ivalue = int(a[i : i + 1].astype(np.uint64).view(np.int64)[0]) if a.dtype.kind in "iu" else 0
    return i, float(a[i]), ivalue


class NumpyDeviceEngine:
    """A CPU engine that also takes device-array specs, as the CUDA engine does."""

    def __init__(self, engine, model, loss):
        self._engine, self._model, self._loss = engine, model, loss
        self.calls = []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def scan_device(self, spec, kind, mask_spec, mask_div, num_classes):
        return numpy_scan(spec, kind, mask_spec, mask_div, num_classes, self._model.dtype)

    def run_device(self, x, target, mask, resets, flush, grads, outputs, on_update=None):
        self.calls.append((x, target, mask, resets))
        dt = self._model.dtype
        xa = np.ascontiguousarray(from_spec(x), dtype=dt)
        read = None if mask is None else from_spec(mask) != 0
        t = from_spec(target)
        if self._loss == "mse":
            ta = t.astype(dt) if read is None else np.where(read[..., None], t, 0).astype(dt)
        else:
            ta = t.astype(np.int64) if read is None else np.where(read, t, 0).astype(np.int64)
        ma = None if read is None else read.astype(dt)
        ra = None if resets is None else (from_spec(resets) != 0).astype(np.uint8)
        ta = np.ascontiguousarray(ta)
        return self._engine.run(xa, ta, ma, ra, flush, grads, outputs, on_update)
