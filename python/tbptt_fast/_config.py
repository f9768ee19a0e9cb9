"""The engine configuration: one object, written once, read by every engine.

A :class:`~tbptt_fast.Trainer` validates its arguments and builds one
:class:`EngineConfig`. The reference engine reads its fields; the native
engines (``tbptt_fast._core.Engine``, ``CudaEngine``) take :meth:`EngineConfig.as_dict`,
whose keys are the field names (``config_from_dict`` in ``csrc/bindings.cpp``
reads them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["OPTIMIZER_KEYS", "EngineConfig"]

#: The keys of ``SGD.config()`` / ``Adam.config()``: what ``set_hyperparams`` takes.
OPTIMIZER_KEYS = (
    "optimizer",
    "lr",
    "momentum",
    "nesterov",
    "beta1",
    "beta2",
    "eps",
    "weight_decay",
)


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine needs to know, besides the parameter arrays.

    Sizes: D ``input_size``, H ``hidden_size``, O ``output_size``, L ``num_layers``.
    ``k2 = 0`` is unbounded; ``clip <= 0`` is no clipping; ``capacity`` overrides
    the ring size in steps (0 = max(k1, k2); the reference ignores it). The
    optimizer fields are those of ``SGD.config()`` / ``Adam.config()``.
    ``vocab_size`` V > 0 puts an embedding ``[V, D]`` before layer 0: it is
    then the first parameter, and ``x`` is int64 ids ``[T, B]``.
    """

    cell: str
    input_size: int
    hidden_size: int
    output_size: int
    num_layers: int
    dtype: str  # "float32" or "float64"
    k1: int
    k2: int  # 0 = unbounded
    loss: str  # "mse" or "cross_entropy"
    overlap: str  # "stored" or "recompute"
    clip: float  # <= 0: no clipping
    capacity: int  # 0 = default
    optimizer: str  # "sgd" or "adam"
    lr: float
    momentum: float
    nesterov: bool
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    vocab_size: int = 0  # 0: no embedding, x is [T, B, D] floats

    @classmethod
    def from_trainer_parts(
        cls, model, k1: int, k2: int | None, loss: str, overlap: str, clip, optimizer
    ) -> EngineConfig:
        """The configuration of a trainer whose arguments are already validated.

        ``k2=None`` is unbounded; ``clip=None`` is no clipping; ``optimizer``
        is an ``SGD`` or ``Adam``.
        """
        return cls(
            cell=model.cell,
            input_size=model.input_size,
            hidden_size=model.hidden_size,
            output_size=model.output_size,
            num_layers=model.num_layers,
            dtype=model.dtype,
            k1=k1,
            k2=0 if k2 is None else k2,
            loss=loss,
            overlap=overlap,
            clip=-1.0 if clip is None else float(clip),
            capacity=0,
            **optimizer.config(),
            vocab_size=model.vocab_size or 0,
        )

    @classmethod
    def from_dict(cls, config: Mapping) -> EngineConfig:
        """From the dict form (:meth:`as_dict`): every key without a default, and no other."""
        fields = dataclasses.fields(cls)
        names = [f.name for f in fields]
        missing = [
            f.name for f in fields if f.name not in config and f.default is dataclasses.MISSING
        ]
        unknown = [k for k in config if k not in names]
        if missing or unknown:
            raise ValueError(
                f"engine config keys do not match: missing {missing}, unexpected {unknown}"
            )
        return cls(**config)

    @property
    def unbounded(self) -> bool:
        """True when the window reaches back to the last trainer-level reset (k2 = 0)."""
        return self.k2 == 0

    def as_dict(self) -> dict:
        """The dict the native engines take: one key per field, in field order."""
        return dataclasses.asdict(self)
