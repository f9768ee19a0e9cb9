"""Loader for the native module ``tbptt_fast._core``.

The C++ engine links against the ``scipy-openblas32`` wheel's
``libscipy_openblas.so``. That library is not on the loader's search path, so
it is preloaded here with ``RTLD_GLOBAL`` (by absolute path) before
``_core`` is imported; ``_core`` also carries an RPATH to the wheel as a
fallback. Loading it by its real filename lets ``threadpoolctl`` find and
control this OpenBLAS.

Exposes ``core`` (the module, or None), ``import_error`` (why it failed, or
None), ``set_num_threads(n)`` and ``get_num_threads()``.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os

import numpy as np

core = None
import_error: str | None = None
_blas: ctypes.CDLL | None = None


def _openblas_path() -> str | None:
    spec = importlib.util.find_spec("scipy_openblas32")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        lib_dir = os.path.join(root, "lib")
        if os.path.isdir(lib_dir):
            for name in sorted(os.listdir(lib_dir)):
                if name.startswith("libscipy_openblas") and ".so" in name:
                    return os.path.join(lib_dir, name)
    return None


def _load() -> None:
    global core, import_error, _blas
    problems = []
    try:
        path = _openblas_path()
        if path is None:
            problems.append("the scipy-openblas32 package was not found")
        else:
            _blas = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:  # pragma: no cover - broken installation
        problems.append(f"could not load OpenBLAS: {e}")
    try:
        from . import _core

        core = _core
    except ImportError as e:
        core = None
        problems.append(f"{type(e).__name__}: {e}")
        import_error = "; ".join(problems)


_load()


def set_num_threads(n: int) -> None:
    """Set the native CPU engine's thread count (its OpenBLAS setting; see tbptt_fast.set_num_threads)."""
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be an int >= 1, got {type(n).__name__}")
    n = int(n)
    if not 1 <= n <= 2**31 - 1:
        raise ValueError(f"n must be in [1, 2**31 - 1], got {n}")
    if core is not None:
        core.set_num_threads(n)
    elif _blas is not None:
        _blas.scipy_openblas_set_num_threads(ctypes.c_int(n))
    else:
        raise RuntimeError(f"the native module is unavailable ({import_error})")


def get_num_threads() -> int:
    """The native CPU engine's thread count (its OpenBLAS setting)."""
    if core is not None:
        return int(core.get_num_threads())
    if _blas is not None:
        return int(_blas.scipy_openblas_get_num_threads())
    raise RuntimeError(f"the native module is unavailable ({import_error})")
