"""What a benchmark row is: ``Config``, its work in FLOPs, the presets and matrices.

The work definition (throughput, FLOPs per timestep, fraction of peak) is stated in
``tbptt_fast.bench.harness``.
"""

from __future__ import annotations

import dataclasses
import os

from ..reference import GATES


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmark configuration; the input size D equals the hidden size H.

    ``loss``: "mse" (targets [T, B, O]) or "cross_entropy" (O classes, targets
    [T, B] integers): the two losses of the contract; both are timed.
    """

    cell: str
    hidden: int
    batch: int
    k1: int
    k2: int
    threads: int = 1
    dtype: str = "float32"
    out: int = 16
    layers: int = 1
    loss: str = "mse"

    @property
    def label(self) -> str:
        return label_of(dataclasses.asdict(self))

    def key(self) -> dict:
        return dataclasses.asdict(self)


def label_of(row: dict) -> str:
    """A configuration's label, e.g. ``lstm H=64 B=8 (16,16) t=1`` (``... ce O=64``
    for cross-entropy), from a Config's fields or a result row."""
    text = f"{row['cell']} H={row['hidden']} B={row['batch']} ({row['k1']},{row['k2']}) t={row['threads']}"
    if row.get("loss", "mse") == "cross_entropy":
        text += f" ce O={row['out']}"
    return text


def flops_per_step(cfg: Config) -> float:
    """FLOPs of one training timestep (all B elements), as defined in ``harness``."""
    g, h, b = GATES[cfg.cell], cfg.hidden, cfg.batch
    fwd = cfg.layers * 2.0 * b * (h + h) * g * h
    readout = 2.0 * b * h * cfg.out
    return fwd * (1.0 + 2.0 * cfg.k2 / cfg.k1) + 3.0 * readout


def make_matrix(cells, hidden, batch, ks, threads, **kw) -> list[Config]:
    """Cartesian product of the lists (ks: list of (k1, k2)); skips B/H duplicates."""
    out = []
    for t in threads:
        for cell in cells:
            for h in hidden:
                for b in batch:
                    for k1, k2 in ks:
                        out.append(Config(cell, h, b, k1, k2, t, **kw))
    return out


PRESETS = {
    # a few seconds: for the tests
    "tiny": dict(
        configs=[
            Config("lstm", 8, 2, 4, 4),
            Config("gru", 8, 2, 2, 4),
            Config("lstm", 8, 2, 4, 4, out=5, loss="cross_entropy"),
        ],
        repeats=1,
        sample_s=0.02,
        max_retries=0,
    ),
    # the default: about a minute on a 2-core machine; after budget_s seconds samples
    # taken while the machine was busy are no longer retried, so it ends within 2 minutes
    "quick": dict(
        configs=[
            Config("lstm", 64, 8, 16, 16, 1),
            Config("gru", 64, 8, 16, 16, 1),
            Config("rnn_tanh", 64, 8, 16, 16, 1),
            Config("lstm", 256, 32, 16, 16, 2),
            Config("lstm", 256, 32, 16, 64, 2),
            # a character-level language model's shape: 64 classes, cross-entropy
            Config("lstm", 128, 16, 16, 16, 1, out=64, loss="cross_entropy"),
        ],
        repeats=3,
        sample_s=0.25,
        max_retries=2,
        budget_s=75.0,
    ),
    # every configuration that a target names, for all three cells, 1 and 2 threads,
    # and cross-entropy rows
    # engine threads 1, 2, 4, ... up to the CPUs this process may use (cpu rows)
    "scaling": dict(configs=None, repeats=3, sample_s=0.5, max_retries=2),
    "full": dict(
        configs=[
            Config(cell, h, b, k1, k2, t)
            for t in (1, 2)
            for cell in ("lstm", "gru", "rnn_tanh")
            for (h, b, k1, k2) in [
                (64, 8, 16, 16),
                (64, 32, 16, 16),
                (256, 32, 16, 16),
                (256, 32, 16, 64),
                (256, 32, 1, 16),
                (1024, 32, 64, 64),
            ]
        ]
        + [
            Config(cell, 128, 16, k1, k2, t, out=64, loss="cross_entropy")
            for t in (1, 2)
            for cell in ("lstm", "gru")
            for (k1, k2) in [(16, 16), (16, 64)]
        ],
        repeats=5,
        sample_s=0.5,
        max_retries=3,
    ),
}


def thread_sweep(n: int | None = None) -> list[int]:
    """1, 2, 4, ... up to ``n`` (default: the CPUs this process may use), and ``n`` itself."""
    if n is None:
        try:
            n = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            n = os.cpu_count() or 1
    out, t = [], 1
    while t < n:
        out.append(t)
        t *= 2
    return [*out, n]


def scaling_configs(n: int | None = None) -> list[Config]:
    """The thread-scaling rows: a batch-group shape (H=64), a column-part
    shape (H=256) and a large one (H=1024), LSTM B=32, threads 1..n."""
    return [
        Config("lstm", h, 32, k1, k2, t)
        for (h, k1, k2) in [(64, 16, 16), (256, 16, 64), (1024, 64, 64)]
        for t in thread_sweep(n)
    ]


def parse_ks(text: str) -> list[tuple[int, int]]:
    """``"16:16,16:64,1:16"`` -> ``[(16, 16), (16, 64), (1, 16)]``."""
    out = []
    for part in text.split(","):
        k1, _, k2 = part.partition(":")
        out.append((int(k1), int(k2 or k1)))
    return out


def parse_ints(text: str) -> list[int]:
    """``"8,32"`` -> ``[8, 32]``."""
    return [int(v) for v in text.split(",")]
