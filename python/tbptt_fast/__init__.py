"""tbptt_fast: truncated backpropagation through time, TBPTT(k1, k2), for RNN, LSTM, GRU and CIFG.

>>> import tbptt_fast as tb
>>> model = tb.Model("lstm", input_size=3, hidden_size=8, output_size=2)
>>> trainer = tb.Trainer(model, k1=4, k2=8, optimizer=tb.SGD(lr=0.1), backend="numpy")
"""

from ._backend import cuda_available, native_available
from .errors import NonFiniteError
from .generate import sample
from .inference import EvalResult, PredictResult
from .model import CELLS, Model
from .optim import SGD, Adam
from .trainer import FitResult, Trainer, UpdateInfo

__version__ = "0.1.0"


def set_num_threads(n: int) -> None:
    """Set the number of threads the native CPU engine uses (an int >= 1).

    The engine runs its own thread pool over work cut from the shapes alone,
    so results are bit-identical for any ``n``; the setting is shared with the
    engine's OpenBLAS (threadpoolctl sees and sets the same number), which the
    engine holds at one thread while it runs.
    """
    from . import _native

    _native.set_num_threads(n)


def get_num_threads() -> int:
    """The number of threads the native CPU engine uses (see :func:`set_num_threads`)."""
    from . import _native

    return _native.get_num_threads()


__all__ = [
    "CELLS",
    "SGD",
    "Adam",
    "EvalResult",
    "FitResult",
    "Model",
    "NonFiniteError",
    "PredictResult",
    "Trainer",
    "UpdateInfo",
    "__version__",
    "cuda_available",
    "get_num_threads",
    "native_available",
    "sample",
    "set_num_threads",
]
