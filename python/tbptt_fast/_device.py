"""Arrays that live on a CUDA device: CuPy, PyTorch, Numba, JAX, ...

:func:`cuda_array` recognises an object that exposes its device memory through
``__cuda_array_interface__`` (versions 2 and 3) or DLPack (``__dlpack__`` with
a CUDA ``__dlpack_device__``) and describes it as a :class:`CudaArray`:
pointer, shape, strides in bytes and dtype. Nothing is copied: the CUDA
engine reads that memory in place (``csrc/cuda/inputs.cuh``). Host arrays and
CPU tensors are not CUDA arrays (``None``); they take the NumPy path.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

# Element type codes shared with csrc/tbptt/engine_api.h (ElemType).
ELEM_CODES = {
    np.dtype(np.float16): 0,
    np.dtype(np.float32): 1,
    np.dtype(np.float64): 2,
    np.dtype(np.bool_): 3,
    np.dtype(np.int8): 4,
    np.dtype(np.int16): 5,
    np.dtype(np.int32): 6,
    np.dtype(np.int64): 7,
    np.dtype(np.uint8): 8,
    np.dtype(np.uint16): 9,
    np.dtype(np.uint32): 10,
    np.dtype(np.uint64): 11,
}

# DLPack device types (dlpack.h, DLDeviceType) that are CUDA device memory.
_DL_CUDA, _DL_CUDA_MANAGED = 2, 13


@dataclass(frozen=True)
class CudaArray:
    """A borrowed view of CUDA device memory.

    Attributes:
        ptr: device address of element [0, ..., 0] (int).
        shape: extents (tuple of int); strides: bytes between neighbours on
            each axis (tuple of int, may be 0 or negative).
        dtype: NumPy dtype of the elements.
        owner: the object that keeps the memory alive (the array, or its
            DLPack capsule); held for as long as this view is used.
    """

    ptr: int
    shape: tuple
    strides: tuple
    dtype: np.dtype
    owner: object

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def with_time_axis(self) -> CudaArray:
        """The same memory as a [1, ...] array (one step of a stream)."""
        return CudaArray(self.ptr, (1, *self.shape), (0, *self.strides), self.dtype, self.owner)

    def swap_time_batch(self) -> CudaArray:
        """The same memory with the first two axes swapped ([B, T, ...] as [T, B, ...])."""
        shape = (self.shape[1], self.shape[0], *self.shape[2:])
        strides = (self.strides[1], self.strides[0], *self.strides[2:])
        return CudaArray(self.ptr, shape, strides, self.dtype, self.owner)

    def spec(self, name: str) -> tuple:
        """What the native engine takes: (ptr, element code, shape, strides, name)."""
        return (self.ptr, ELEM_CODES[self.dtype], self.shape, self.strides, name)


def _c_strides(shape, itemsize: int) -> tuple:
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= max(int(n), 1)
    return tuple(reversed(strides))


def _supported(dtype: np.dtype, name: str) -> np.dtype:
    dtype = dtype.newbyteorder("=") if dtype.byteorder == "<" else dtype
    if dtype not in ELEM_CODES:
        raise TypeError(
            f"{name}: a CUDA array of dtype {dtype} is not supported "
            "(use float16/32/64, bool or an integer type)"
        )
    return dtype


def from_interface(iface: dict, owner, name: str = "array") -> CudaArray:
    """Parse a ``__cuda_array_interface__`` dict (numba's specification, v2/v3)."""
    if not isinstance(iface, dict):
        raise TypeError(f"{name}: __cuda_array_interface__ must be a dict")
    for key in ("shape", "typestr", "data"):
        if key not in iface:
            raise TypeError(f"{name}: __cuda_array_interface__ has no {key!r}")
    if iface.get("mask") is not None:
        raise TypeError(f"{name}: masked CUDA arrays are not supported")
    shape = tuple(int(n) for n in iface["shape"])
    try:
        dtype = np.dtype(iface["typestr"])
    except TypeError as e:
        raise TypeError(f"{name}: unknown typestr {iface['typestr']!r}") from e
    if dtype.byteorder == ">":
        raise TypeError(f"{name}: big-endian CUDA arrays are not supported")
    dtype = _supported(dtype, name)
    ptr = int(iface["data"][0] or 0)
    strides = iface.get("strides")
    strides = _c_strides(shape, dtype.itemsize) if strides is None else tuple(map(int, strides))
    if len(strides) != len(shape):
        raise TypeError(f"{name}: __cuda_array_interface__ strides do not match its shape")
    return CudaArray(ptr, shape, strides, dtype, owner)


# DLPack's C structs (dlpack.h, ABI version 0.x "dltensor" capsules).
class _DLDevice(ctypes.Structure):
    _fields_ = (("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32))


class _DLDataType(ctypes.Structure):
    _fields_ = (("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16))


class _DLTensor(ctypes.Structure):
    _fields_ = (
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    )


class _DLManagedTensor(ctypes.Structure):
    _fields_ = (
        ("dl_tensor", _DLTensor),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
    )


_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = (ctypes.py_object, ctypes.c_char_p)
_capsule_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_valid.restype = ctypes.c_int
_capsule_valid.argtypes = (ctypes.py_object, ctypes.c_char_p)

# DLDataType code -> NumPy kind (kDLInt, kDLUInt, kDLFloat, kDLBool).
_DL_KINDS = {0: "i", 1: "u", 2: "f", 6: "b"}


def from_dlpack_capsule(capsule, name: str = "array") -> tuple[CudaArray, tuple[int, int]]:
    """Parse an unconsumed ``"dltensor"`` capsule without consuming it.

    Returns the view and the (device_type, device_id) pair. The capsule stays
    the view's owner: when it is collected, its producer frees the tensor.
    """
    if not _capsule_valid(capsule, b"dltensor"):
        raise TypeError(f"{name}: __dlpack__() did not return an unconsumed 'dltensor' capsule")
    managed = _DLManagedTensor.from_address(_capsule_pointer(capsule, b"dltensor"))
    t = managed.dl_tensor
    kind = _DL_KINDS.get(t.dtype.code)
    if kind is None or t.dtype.lanes != 1:
        raise TypeError(
            f"{name}: DLPack dtype (code {t.dtype.code}, {t.dtype.bits} bits, "
            f"{t.dtype.lanes} lanes) is not supported (use float16/32/64, bool or an integer type)"
        )
    dtype = np.dtype(np.bool_) if kind == "b" else np.dtype(f"{kind}{t.dtype.bits // 8}")
    dtype = _supported(dtype, name)
    shape = tuple(int(t.shape[i]) for i in range(t.ndim))
    if t.strides:
        strides = tuple(int(t.strides[i]) * dtype.itemsize for i in range(t.ndim))
    else:
        strides = _c_strides(shape, dtype.itemsize)
    ptr = (t.data or 0) + int(t.byte_offset)
    device = (int(t.device.device_type), int(t.device.device_id))
    return CudaArray(ptr, shape, strides, dtype, capsule), device


def cuda_array(value, name: str = "array") -> CudaArray | None:
    """``value`` as a :class:`CudaArray` when it lives in CUDA device memory, else None.

    ``__cuda_array_interface__`` is preferred (CuPy, PyTorch, Numba); then
    DLPack when ``__dlpack_device__()`` says CUDA (JAX and others). PyTorch
    tensors that require grad are read through ``.detach()``.
    """
    if isinstance(value, (np.ndarray, np.generic, list, tuple, int, float)) or value is None:
        return None
    if is_torch(value):
        value = value.detach()
    try:
        iface = value.__cuda_array_interface__
    except AttributeError:  # absent, or a CPU torch tensor
        iface = None
    if iface is not None:
        return from_interface(iface, value, name)
    dev = getattr(value, "__dlpack_device__", None)
    if dev is None:
        return None
    device_type, _ = dev()
    if device_type not in (_DL_CUDA, _DL_CUDA_MANAGED):
        return None  # host memory, or another device: the host path copies or refuses it
    view, _ = from_dlpack_capsule(value.__dlpack__(), name)
    return view


def is_torch(value) -> bool:
    """Whether ``value`` looks like a PyTorch tensor."""
    return hasattr(value, "detach") and hasattr(value, "requires_grad") and hasattr(value, "cpu")
