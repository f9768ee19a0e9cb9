"""Picks the engine behind a Trainer: numpy (reference), cpu (C++) or cuda.

Importing the package never needs a GPU or even the native module: the
native import is attempted lazily and its failure is reported when a native
backend is asked for.
"""

from __future__ import annotations

from collections.abc import Mapping

from . import reference
from ._config import EngineConfig

BACKENDS = ("numpy", "cpu", "cuda")


def _core():
    from . import _native  # never raises: it records why _core did not import

    return _native.core, _native.import_error


def native_available() -> bool:
    """True when the C++ module ``tbptt_fast._core`` imported."""
    return _core()[0] is not None


def cuda_available() -> bool:
    """True when the native module was built with CUDA and a GPU is visible."""
    core, _ = _core()
    return bool(core is not None and hasattr(core, "cuda_available") and core.cuda_available())


def make_engine(backend: str, config: EngineConfig | Mapping, params: list):
    """An engine for ``backend`` (see ``reference.Engine`` for the interface).

    ``config``: an :class:`EngineConfig`, or its dict form; the native engines
    take the dict form.
    """
    if backend == "numpy":
        return reference.Engine(config, params)
    if isinstance(config, EngineConfig):
        config = config.as_dict()
    core, err = _core()
    if core is None:
        raise RuntimeError(
            f"backend={backend!r} needs the native module tbptt_fast._core, which failed to "
            f"import ({err}); reinstall the package or use backend='numpy'"
        )
    if backend == "cpu":
        return core.Engine(config, params)
    if not hasattr(core, "CudaEngine"):
        raise RuntimeError(
            "backend='cuda' is unavailable: this build of tbptt_fast has no CUDA support "
            "(no CUDA toolchain was found when it was built)"
        )
    if not core.cuda_available():
        raise RuntimeError("backend='cuda' is unavailable: no CUDA GPU is visible")
    return core.CudaEngine(config, params)
