"""Progress of a training run: a bar in a terminal, plain lines otherwise.

:func:`make_progress` picks the display: ``rich`` or ``tqdm`` when installed
and stdout is a terminal (neither is a dependency), else a one-line status
of our own in a terminal, and plain lines (one per tenth of the run and per
validation) when stdout is a file or a pipe, so logs stay readable.
"""

from __future__ import annotations

import math
import sys
import time

__all__ = ["Progress", "format_duration", "make_progress"]


def format_duration(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Plain lines: at every tenth of the run and at every validation.

    ``total``: timesteps per stream to run; ``batch``: streams (throughput is
    timesteps x streams per second); ``label``: a prefix for each line.
    """

    def __init__(self, total: int, batch: int, label: str = "", stream=None, start_step: int = 0):
        self.total = max(1, int(total))
        self.batch = batch
        self.label = label
        self.stream = sys.stdout if stream is None else stream
        self.start_step = start_step
        self.done = start_step
        self.t0 = time.perf_counter()
        self.last_tenth = (10 * start_step) // self.total
        self.fields: dict[str, str] = {}
        self.train_rate: float | None = None

    # -- what the run reports --------------------------------------------------
    def rate(self) -> float:
        """Timesteps x streams per second: as the run reports it (its training
        time), else since this display started."""
        if self.train_rate is not None:
            return self.train_rate
        el = time.perf_counter() - self.t0
        return (self.done - self.start_step) * self.batch / el if el > 0 else 0.0

    def eta(self) -> float:
        el = time.perf_counter() - self.t0
        ran = self.done - self.start_step
        return (self.total - self.done) * el / ran if ran > 0 else float("nan")

    def status(self) -> str:
        pct = 100.0 * self.done / self.total
        width = len(f"{self.total:,}")
        parts = [f"step {self.done:>{width},}/{self.total:,} ({pct:3.0f}%)"]
        parts += [f"{k} {v}" for k, v in self._ordered()]
        parts.append(f"{self.rate():,.0f} timesteps/s")
        parts.append(f"ETA {format_duration(self.eta())}")
        return (self.label + " " if self.label else "") + "  ".join(parts)

    def update(self, done: int, *, validated: bool = False, **fields) -> None:
        """After a chunk: ``done`` timesteps per stream so far; ``fields`` (e.g.
        ``loss="0.1234"``) are shown from now on; ``rate`` (a keyword among them,
        a float) is the throughput to show."""
        self._take(done, fields)
        tenth = (10 * done) // self.total
        if validated or tenth > self.last_tenth:
            self.last_tenth = tenth
            self._line(self.status())

    ORDER = ("update", "loss", "val", "lr")

    def _ordered(self) -> list[tuple[str, str]]:
        """The fields, the usual ones first in :attr:`ORDER`."""
        rank = {k: i for i, k in enumerate(self.ORDER)}
        return sorted(self.fields.items(), key=lambda kv: rank.get(kv[0], len(rank)))

    def _take(self, done: int, fields: dict) -> None:
        self.done = done
        rate = fields.pop("rate", None)
        if rate is not None:
            self.train_rate = float(rate)
        self.fields.update({k: v for k, v in fields.items() if v is not None})

    def message(self, text: str) -> None:
        """A line of its own (e.g. a checkpoint written)."""
        self._line(text)

    def close(self) -> None:
        pass

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


class _StatusLine(Progress):
    """A terminal without rich or tqdm: one line rewritten in place."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._shown = 0.0
        self._width = 0

    def update(self, done: int, *, validated: bool = False, **fields) -> None:
        self._take(done, fields)
        now = time.perf_counter()
        if validated or now - self._shown > 0.1 or done >= self.total:
            self._shown = now
            filled = int(20 * done / self.total)
            self._write("[" + "#" * filled + "." * (20 - filled) + "] " + self.status())

    def _write(self, text: str) -> None:
        pad = max(0, self._width - len(text))
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self._width = len(text)

    def message(self, text: str) -> None:
        self._write(text)
        self.stream.write("\n")
        self._width = 0
        self.update(self.done, validated=True)

    def close(self) -> None:
        self.update(self.done, validated=True)
        self.stream.write("\n")
        self.stream.flush()


class _Silent(Progress):
    """``--progress none``: messages only."""

    def update(self, done: int, *, validated: bool = False, **fields) -> None:
        self._take(done, fields)


class _Tqdm(Progress):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from tqdm import tqdm

        self._bar = tqdm(
            total=self.total,
            initial=self.start_step,
            desc=self.label or None,
            unit="step",
            file=self.stream,
            dynamic_ncols=True,
        )

    def update(self, done: int, *, validated: bool = False, **fields) -> None:
        self._bar.update(done - self.done)
        self._take(done, fields)
        shown = dict(self._ordered())
        shown["timesteps/s"] = f"{self.rate():,.0f}"
        self._bar.set_postfix(shown, refresh=False)

    def message(self, text: str) -> None:
        self._bar.write(text, file=self.stream)

    def close(self) -> None:
        self._bar.close()


class _Rich(Progress):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        self._console = Console(file=self.stream)
        self._bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=self._console,
        )
        self._bar.start()
        self._task = self._bar.add_task(
            self.label or "train", total=self.total, completed=self.start_step, info=""
        )

    def update(self, done: int, *, validated: bool = False, **fields) -> None:
        self._take(done, fields)
        info = "  ".join(f"{k} {v}" for k, v in self._ordered())
        info += f"  {self.rate():,.0f} timesteps/s"
        self._bar.update(self._task, completed=done, info=info)

    def message(self, text: str) -> None:
        self._console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        self._bar.stop()


def make_progress(
    mode: str, total: int, batch: int, label: str = "", stream=None, start_step: int = 0
) -> Progress:
    """The display for ``mode``: "auto" (a bar in a terminal, plain lines
    otherwise), "bar", "plain" or "none" (nothing but :meth:`Progress.message`)."""
    stream = sys.stdout if stream is None else stream
    args = (total, batch, label, stream, start_step)
    if mode == "none":
        return _Silent(*args)
    tty = mode == "bar" or (mode == "auto" and getattr(stream, "isatty", lambda: False)())
    if not tty:
        return Progress(*args)
    for cls, module in ((_Rich, "rich"), (_Tqdm, "tqdm")):
        try:
            __import__(module)
        except ImportError:
            continue
        return cls(*args)
    return _StatusLine(*args)
