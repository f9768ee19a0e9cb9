"""The implementations tbptt_fast is compared with: a textbook NumPy loop and PyTorch loops.

``torch_loops`` imports torch only when one of its classes is built.
"""

from .textbook import TextbookTBPTT
from .torch_loops import TorchCell, TorchRecompute, TorchSeq

__all__ = ["TextbookTBPTT", "TorchCell", "TorchRecompute", "TorchSeq"]
