"""Benchmarks of tbptt_fast against a textbook NumPy loop and PyTorch loops.

``tbptt-fast bench`` (or ``python -m tbptt_fast bench``) calls ``main``; see
``harness`` for the work definition and ``peers`` for the implementations compared.
The peers ship inside the package so the command works on a fresh install.
"""

from .configs import Config
from .harness import run

__all__ = ["Config", "main", "run"]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark command line (``tbptt-fast bench --help``)."""
    from .harness import main as _main

    return _main(argv)
