"""The package's own exception types."""

from __future__ import annotations

__all__ = ["NonFiniteError"]


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN/Inf during training.

    The message names the step of the failed update and says that the
    parameters and the optimizer state are as they were before that update,
    e.g. "non-finite loss in the update at step 7; parameters and optimizer
    state are as before that update". Every engine raises it: the reference
    here, the native engines from C++.
    """
