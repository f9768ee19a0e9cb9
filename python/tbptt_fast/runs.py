"""One ``tbptt-fast train`` run: data to trainer, chunk by chunk, with validation,
checkpoints that hold the run's progress, and the reports.

:class:`Run` trains one configuration (one k2) over the task's streams in chunks
of steps (a multiple of k1). Between chunks it sets the learning rate of the
schedule (``trainer.optimizer.lr``, the contract (optimizer changes)), validates on the held-out
streams with ``Model.evaluate`` (which changes nothing), and writes checkpoints.
Everything that decides the result is a function of the configuration and the
chunk index, so a run resumed from any chunk boundary ends exactly as an
uninterrupted one (see :func:`save_checkpoint`).

Checkpoints: ``latest.ckpt`` is a trainer checkpoint (``Trainer.save``), and
``best.ckpt`` a model checkpoint (``Model.save``), each with the run's record
added in the same atomic write: the manifest's ``"cli"`` entry (the
configuration, the task's vocabulary or data scaler, the progress) and arrays
``cli/losses``, ``cli/update_steps``, ``cli/lrs`` and ``cli/val`` (latest only).
``Trainer.load`` and ``Model.load`` ignore both.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "CLI_VERSION",
    "Failure",
    "Interrupted",
    "Run",
    "RunResult",
    "StopFlag",
    "UsageError",
    "atomic_text",
    "build_task",
    "check_matplotlib",
    "comparison_table",
    "echo_verdict",
    "k2_name",
    "loss_name",
    "loss_of",
    "make_model",
    "make_optimizer",
    "plot_runs",
    "read_run_meta",
    "save_checkpoint",
    "summary_lines",
    "tbptt_name",
    "write_summary",
    "write_sweep",
]

CLI_VERSION = 1
SAVE_SECONDS = 60.0  # latest.ckpt's interval without --save-every
LN2 = math.log(2.0)


class UsageError(Exception):
    """A bad option or file: exit 2 with this one-line message."""


class Failure(Exception):
    """The run could not finish: exit 1 with this one-line message."""


class Interrupted(Exception):
    """Stopped by a signal after the current chunk (the latest checkpoint is written)."""


def build_task(cfg: dict, *, split: str = "train", val_steps: int | None = None, batch=None):
    """The task or data set of a configuration (``split="evaluate"``: fresh task streams)."""
    from .data import DataError, file_digest, load_arrays, load_text
    from .tasks import make_task

    src = cfg["source"]
    batch = batch or cfg["batch"]
    if src["kind"] == "task":
        steps = cfg["steps"]
        vs = val_steps if val_steps is not None else round(cfg["val"] * steps)
        return make_task(
            src["task"],
            steps=steps,
            batch=batch,
            val_steps=vs,
            seed=cfg["seed"],
            delay=src.get("delay", 10),
            length=src.get("length", 20),
            split=split,
        )
    path = src["path"]
    if "sha256" in src:
        try:
            now = file_digest(path)
        except OSError:
            raise DataError(f"{path}: the run's data file cannot be read any more") from None
        if now != src["sha256"]:
            raise DataError(f"{path}: the file changed since the run started (its SHA-256 differs)")
    if src["kind"] == "text":
        return load_text(path, batch, cfg["val"], vocab=src.get("vocab"))
    return load_arrays(
        path,
        batch,
        cfg["val"],
        columns=src.get("columns"),
        target_columns=src.get("target_columns"),
        standardize=src.get("standardize"),
        scaler=src.get("scaler"),
    )


def loss_of(cfg: dict, task) -> str:
    """The run's loss: the task's, which ``--loss`` may only confirm."""
    if cfg["loss"] == "auto" or cfg["loss"] == task.loss:
        return task.loss
    what = "integer classes" if task.loss == "cross_entropy" else "real numbers"
    raise UsageError(f"--loss {cfg['loss']} does not fit this data: its targets are {what}")


def make_model(cfg: dict, task):
    """A new model for the task (an embedding of ``embed`` numbers for token inputs)."""
    import tbptt_fast as tb

    tokens = task.vocab_size is not None
    return tb.Model(
        cfg["cell"],
        input_size=cfg["embed"] if tokens else task.input_size,
        hidden_size=cfg["hidden"],
        output_size=task.output_size,
        num_layers=cfg["layers"],
        dtype=cfg["dtype"],
        seed=cfg["seed"],
        vocab_size=task.vocab_size,
    )


def make_optimizer(cfg: dict):
    """``tb.Adam`` or ``tb.SGD`` with the run's first learning rate."""
    import tbptt_fast as tb

    if cfg["optimizer"] == "sgd":
        return tb.SGD(lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    return tb.Adam(lr=cfg["lr"], weight_decay=cfg["weight_decay"])


def k2_name(k2) -> str:
    return "none" if k2 is None else str(k2)


def tbptt_name(k1, k2) -> str:
    return f"TBPTT(k1={k1}, k2={k2_name(k2)})"


def atomic_text(path: str, text: str) -> None:
    from .checkpoint import write_atomic

    write_atomic(path, text.encode("utf-8"))


def save_checkpoint(obj, path: str, meta: dict, arrays: dict) -> None:
    """``obj.save(path)`` (a Trainer or a Model) plus the run's ``meta`` (the
    manifest's entry "cli") and ``arrays`` (members ``cli/<name>``), in one
    atomic write, so the checkpoint and the run's record never disagree.

    The checkpoint is saved to a temporary file, read back with
    ``checkpoint.read`` and written again with ``checkpoint.write``, which
    adds the format, version and checksums; the loaders ignore what they do
    not know."""
    from . import checkpoint

    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.save.tmp")
    obj.save(tmp)
    try:
        manifest, stored = checkpoint.read(tmp)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    for k in ("format", "version", "arrays"):
        manifest.pop(k, None)
    manifest["cli"] = meta
    stored.update({f"cli/{k}": np.asarray(v) for k, v in arrays.items()})
    checkpoint.write(path, manifest, stored)


def read_run_meta(path: str) -> tuple[dict | None, dict]:
    """A checkpoint's run record: (the manifest's "cli" entry or None, its ``cli/*`` arrays)."""
    from . import checkpoint

    manifest, arrays = checkpoint.read(path)
    meta = manifest.get("cli")
    if meta is not None and not isinstance(meta, dict):
        meta = None
    return meta, {k[4:]: a for k, a in arrays.items() if k.startswith("cli/")}


@dataclass
class RunResult:
    """What one run reports: its per-update losses (and the stream step of each
    update), validation rows ``(update, step, loss, accuracy)``, the train loss
    (the mean of the last 10% of updates), the last and best validation loss,
    the training time, timesteps x streams trained and the files written."""

    k2: int | None
    label: str
    losses: np.ndarray
    steps: np.ndarray
    val: list = field(default_factory=list)
    train_loss: float = float("nan")
    val_loss: float | None = None
    best_val: float | None = None
    best_update: int | None = None
    elapsed: float = 0.0
    timesteps: int = 0  # steps x streams trained
    files: list = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        """The last validation loss, or without validation the train loss."""
        return self.val_loss if self.val_loss is not None else self.train_loss


class Run:
    """Trains one configuration (one k2), chunk by chunk, with validation and checkpoints."""

    def __init__(self, cfg, k2, task, out_dir, label, progress_mode, stop):
        import tbptt_fast as tb

        self.cfg, self.k2, self.task, self.out, self.label = cfg, k2, task, out_dir, label
        self.stop = stop
        self.loss = loss_of(cfg, task)
        self.k1 = cfg["k1"]
        self.epoch_len = task.train.steps
        total = cfg["epochs"] * self.epoch_len
        if cfg["source"]["kind"] != "task" and cfg["steps"] is not None:
            total = min(total, cfg["steps"])
        self.total = total
        target = min(1024, max(64, total // 100))
        self.chunk = self.k1 * max(1, target // self.k1)
        est = max(1, -(-total // self.k1))
        self.val_every = cfg["val_every"] or max(1, est // 10)
        self.save_every = cfg["save_every"]  # None: every SAVE_SECONDS
        self._saved_at = time.monotonic()
        self.lr_step = cfg["lr_step"] or max(1, est // 3)
        self.progress_mode = progress_mode
        self.bayes_val = None
        if task.name == "reber" and task.val is not None:
            from .tasks import reber_bayes_losses

            v = task.val
            self.bayes_val = float(reber_bayes_losses(v.x, v.target)[v.mask].mean())
        # progress
        self.chunks_done = 0
        self.steps_done = 0
        self.updates = 0
        self.elapsed = 0.0
        self.best_val = None
        self.best_update = None
        self.losses: list[float] = []
        self.update_steps: list[int] = []
        self.lrs: list[float] = []
        self.val_rows: list[tuple] = []
        self.resumed_from = None
        self.trainer = None
        self._tb = tb

    # -- plan ---------------------------------------------------------------------
    def chunks(self):
        """(global step at start, epoch, lo, hi, flush) of every chunk, in order."""
        g = 0
        epoch = 0
        while g < self.total:
            lo = g - epoch * self.epoch_len
            hi = min(self.epoch_len, lo + self.chunk, self.total - epoch * self.epoch_len)
            end_epoch = hi == self.epoch_len
            yield g, epoch, lo, hi, end_epoch or g + (hi - lo) >= self.total
            g += hi - lo
            if end_epoch:
                epoch += 1

    def lr_at(self) -> float:
        """The schedule's learning rate for the next chunk (a function of progress only)."""
        lr0 = self.cfg["lr"]
        s = self.cfg["schedule"]
        if s == "step":
            return lr0 * self.cfg["lr_gamma"] ** (self.updates // self.lr_step)
        if s == "cosine":
            return lr0 * 0.5 * (1.0 + math.cos(math.pi * self.steps_done / self.total))
        return lr0

    # -- state ------------------------------------------------------------------------
    def meta(self, finished: bool) -> dict:
        """The run's record in a checkpoint: configuration, task facts, progress."""
        src = dict(self.cfg["source"])
        if self.task.vocab is not None:
            src["vocab"] = self.task.vocab
        if "scaler" in self.task.meta:
            src["scaler"] = self.task.meta["scaler"]
        return {
            "version": CLI_VERSION,
            "config": {**self.cfg, "source": src, "k2": self.k2},
            "task": {
                "name": self.task.name,
                "title": self.task.title,
                "loss": self.loss,
                "vocab": self.task.vocab,
                "baselines": [[b.label, b.loss, b.optimum] for b in self.task.baselines],
            },
            "progress": {
                "chunks_done": self.chunks_done,
                "steps_done": self.steps_done,
                "total_steps": self.total,
                "updates": self.updates,
                "elapsed": self.elapsed,
                "best_val": self.best_val,
                "best_update": self.best_update,
                "finished": finished,
            },
        }

    def history(self) -> dict:
        val = np.asarray(self.val_rows, np.float64).reshape(-1, 4)
        return {
            "losses": np.asarray(self.losses, np.float64),
            "update_steps": np.asarray(self.update_steps, np.int64),
            "lrs": np.asarray(self.lrs, np.float64),
            "val": val,
        }

    def restore(self, meta: dict, arrays: dict, trainer) -> None:
        """Continue from a checkpoint's record and its trainer."""
        p = meta["progress"]
        self.chunks_done = int(p["chunks_done"])
        self.steps_done = int(p["steps_done"])
        self.updates = int(p["updates"])
        self.elapsed = float(p["elapsed"])
        self.best_val = p["best_val"]
        self.best_update = p["best_update"]
        self.losses = arrays["losses"].tolist()
        self.update_steps = arrays["update_steps"].tolist()
        self.lrs = arrays["lrs"].tolist()
        self.val_rows = [tuple(r) for r in arrays["val"].tolist()]
        self.trainer = trainer
        self.resumed_from = self.steps_done

    def save_latest(self, finished: bool = False) -> None:
        """latest.ckpt: the trainer with everything needed to continue, and the logs."""
        path = os.path.join(self.out, "latest.ckpt")
        save_checkpoint(self.trainer, path, self.meta(finished), self.history())
        self.write_logs()
        self._saved_at = time.monotonic()

    def save_best(self) -> None:
        """best.ckpt: the model (architecture and parameters) with the best validation loss."""
        save_checkpoint(
            self.trainer.model, os.path.join(self.out, "best.ckpt"), self.meta(False), {}
        )

    def write_logs(self) -> None:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["update", "step", "loss", "lr"])
        for i, (loss, step, lr) in enumerate(
            zip(self.losses, self.update_steps, self.lrs, strict=True)
        ):
            w.writerow([i + 1, step, repr(float(loss)), repr(float(lr))])
        atomic_text(os.path.join(self.out, "losses.csv"), buf.getvalue())
        if self.val_rows:
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(["update", "step", "loss", "accuracy"])
            for u, s, loss, acc in self.val_rows:
                w.writerow([int(u), int(s), repr(loss), "" if math.isnan(acc) else repr(acc)])
            atomic_text(os.path.join(self.out, "validation.csv"), buf.getvalue())

    # -- running ------------------------------------------------------------------
    def validate(self) -> float:
        """The validation loss (``Model.evaluate``, which changes nothing), recorded."""
        v = self.task.val
        ev = self.trainer.model.evaluate(
            v.x, v.target, v.mask, v.resets, loss=self.loss, backend=self.cfg["backend"]
        )
        acc = float("nan") if ev.accuracy is None else ev.accuracy
        self.val_rows.append((self.updates, self.steps_done, float(ev.loss), acc))
        return float(ev.loss)

    def run(self) -> RunResult:
        """Train the chunks not done yet; raises :class:`Interrupted` after a signal,
        :class:`Failure` when the loss diverges."""
        from .progress import make_progress

        tb = self._tb
        if self.trainer is None:
            self.trainer = tb.Trainer(
                make_model(self.cfg, self.task),
                k1=self.k1,
                k2=self.k2,
                loss=self.loss,
                optimizer=make_optimizer(self.cfg),
                clip_grad_norm=self.cfg["clip"],
                overlap=self.cfg["overlap"],
                backend=self.cfg["backend"],
            )
        trainer = self.trainer
        prog = make_progress(
            self.progress_mode,
            self.total,
            self.task.train.batch,
            self.label,
            start_step=self.steps_done,
        )
        if self.resumed_from:
            prog.message(
                f"{self.label + ' ' if self.label else ''}resuming at step "
                f"{self.steps_done:,} of {self.total:,} (update {self.updates:,})"
            )
        elapsed0, steps0 = self.elapsed, self.steps_done
        try:
            for i, (g, epoch, lo, hi, flush) in enumerate(self.chunks()):
                if i < self.chunks_done:
                    continue
                if lo == 0 and epoch > 0:
                    trainer.reset_state()  # a new pass over the streams
                lr = self.lr_at()
                if trainer.optimizer.lr != lr:
                    trainer.optimizer.lr = lr
                s = self.task.train.window(lo, hi)
                first = trainer.step_count
                t0 = time.perf_counter()
                try:
                    res = trainer.fit(s.x, s.target, s.mask, s.resets, flush=flush)
                except tb.NonFiniteError as e:
                    raise Failure(f"training diverged: {e} (try a lower --lr, or --clip)") from None
                self.elapsed += time.perf_counter() - t0
                n = len(res.losses)
                before = self.updates
                self.losses.extend(res.losses.tolist())
                self.update_steps.extend((g + res.update_steps - first).tolist())
                self.lrs.extend([lr] * n)
                self.updates += n
                self.steps_done = g + (hi - lo)
                self.chunks_done = i + 1
                last = self.steps_done >= self.total
                validated = False
                fields = {"update": f"{self.updates:,}"}
                session = self.elapsed - elapsed0
                if session > 0:
                    fields["rate"] = (self.steps_done - steps0) * self.task.train.batch / session
                if n:
                    recent = self.losses[-max(1, min(len(self.losses), 50)) :]
                    fields["loss"] = f"{float(np.mean(recent)):.4f}"
                if self.task.val is not None and (
                    last or self.updates // self.val_every > before // self.val_every
                ):
                    vl = self.validate()
                    validated = True
                    fields["val"] = f"{vl:.4f}"
                    if self.best_val is None or vl < self.best_val:
                        self.best_val, self.best_update = vl, self.updates
                        if self.out:
                            self.save_best()
                if self.cfg["schedule"] != "constant":
                    fields["lr"] = f"{lr:.3g}"
                if self.out:
                    if self.save_every is None:
                        due = time.monotonic() - self._saved_at >= SAVE_SECONDS
                    else:
                        due = self.updates // self.save_every > before // self.save_every
                    if due or last:
                        self.save_latest(finished=last)
                prog.update(self.steps_done, validated=validated, **fields)
                if self.stop.signum is not None and not last:
                    if self.out:
                        self.save_latest()
                    raise Interrupted(self.steps_done)
        finally:
            prog.close()
        return self.result()

    def result(self) -> RunResult:
        L = np.asarray(self.losses)
        tail = L[-max(1, len(L) // 10) :] if len(L) else L
        files = []
        if self.out:
            files = [
                os.path.join(self.out, f)
                for f in ("latest.ckpt", "best.ckpt", "losses.csv", "validation.csv")
                if os.path.exists(os.path.join(self.out, f))
            ]
        return RunResult(
            k2=self.k2,
            label=self.label,
            losses=L,
            steps=np.asarray(self.update_steps, np.int64),
            val=list(self.val_rows),
            train_loss=float(tail.mean()) if len(tail) else float("nan"),
            val_loss=self.val_rows[-1][2] if self.val_rows else None,
            best_val=self.best_val,
            best_update=self.best_update,
            elapsed=self.elapsed,
            timesteps=self.steps_done * self.task.train.batch,
            files=files,
        )


class StopFlag:
    """Set by SIGINT/SIGTERM: the run stops after its current chunk; a second signal stops at once."""

    def __init__(self):
        self.signum = None

    @contextlib.contextmanager
    def installed(self, say):
        def handler(signum, frame):
            if self.signum is not None:
                raise KeyboardInterrupt
            self.signum = signum
            say("stopping after this chunk of steps (press Ctrl-C again to stop at once)")

        old = {}
        try:
            for s in (signal.SIGINT, signal.SIGTERM):
                old[s] = signal.signal(s, handler)
        except ValueError:  # not the main thread: no handlers, Ctrl-C acts as usual
            pass
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def _fmt_loss(loss: float | None, task_loss: str, vocab_kind: str | None) -> str:
    if loss is None or not math.isfinite(loss):
        return "-"
    if task_loss == "cross_entropy" and vocab_kind == "text":
        return f"{loss:.4f} ({loss / LN2:.3f} bits/char)"
    return f"{loss:.4f}"


def loss_name(task) -> str:
    if task.loss == "mse":
        return "mse"
    return "loss (nats/char)" if task.name == "text" else "loss (nats/symbol)"


def summary_lines(run: Run, r: RunResult) -> list[str]:
    task = run.task
    p = (run.label + " ") if run.label else ""
    kind = task.name if task.name == "text" else None
    rate = r.timesteps / r.elapsed if r.elapsed > 0 else 0.0
    lines = [
        f"{p}done: {len(r.losses):,} updates, {run.steps_done:,} steps x "
        f"{task.train.batch} streams in {r.elapsed:.1f} s ({rate:,.0f} timesteps/s)"
    ]
    line = f"{p}train {loss_name(task)} {_fmt_loss(r.train_loss, task.loss, kind)} (last 10% of updates)"
    if r.val_loss is not None:
        line += f", validation {_fmt_loss(r.val_loss, task.loss, kind)}"
        if r.best_update is not None and r.best_update != r.val[-1][0]:
            line += f" (best {r.best_val:.4f} at update {r.best_update:,})"
    lines.append(line)
    refs = [f"{b.label} {b.loss:.4f}" for b in task.baselines]
    if run.bayes_val is not None and r.val_loss is not None:
        refs.append(
            f"Bayes-optimal on these validation streams {run.bayes_val:.4f}: "
            f"the model is {r.val_loss - run.bayes_val:+.4f} nats/symbol from it"
        )
    if refs:
        lines.append(f"{p}for comparison: " + "; ".join(refs))
    if r.files:
        lines.append(f"{p}outputs: " + ", ".join(r.files))
    return lines


def echo_verdict(task, results: list[RunResult]) -> list[str]:
    """One line per run: did it learn the echo (mse < 0.25), stay at chance (> 0.8), or between."""
    d = task.horizon
    out = []
    for r in results:
        loss = r.final_loss
        reach = "unbounded" if r.k2 is None else r.k2
        short = r.k2 is not None and r.k2 <= d
        if loss < 0.25:
            what = "learned the echo"
        elif loss > 0.8:
            what = "stayed near chance (1.0): " + (
                "no gradient reaches the input it must recall"
                if short
                else "train longer (--steps) or adjust --lr"
            )
        else:
            what = "learned part of it"
        rel = "" if r.k2 is None else (" > " if r.k2 > d else " <= ")
        out.append(f"  k2 = {reach}{rel}{'' if r.k2 is None else d}: {what} (mse {loss:.3f})")
    return out


def comparison_table(task, k1, results: list[RunResult], bayes_val) -> list[str]:
    heads = [tbptt_name(k1, r.k2) for r in results]
    rows = [("train " + loss_name(task), [r.train_loss for r in results])]
    if any(r.val_loss is not None for r in results):
        rows.append(("validation " + loss_name(task), [r.val_loss for r in results]))
    for b in task.baselines:
        rows.append((b.label, [b.loss] * len(results)))
    if bayes_val is not None:
        rows.append(("Bayes-optimal on validation", [bayes_val] * len(results)))
    w0 = max(len(name) for name, _ in rows)
    w = max(12, *(len(h) for h in heads))
    lines = [" " * (w0 + 2) + "  ".join(h.rjust(w) for h in heads)]
    for name, vals in rows:
        cells = ["-" if v is None else f"{v:.4f}" for v in vals]
        lines.append(f"{name.ljust(w0)}  " + "  ".join(c.rjust(w) for c in cells))
    return lines


def check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise Failure(
            "--plot needs matplotlib, which is not installed: pip install 'tbptt-fast[plot]'"
        ) from None


def plot_runs(task, k1, results: list[RunResult], folder: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        x = np.arange(1, len(r.losses) + 1)
        (line,) = ax.plot(x, r.losses, lw=0.6, alpha=0.35)
        if len(r.losses) >= 20:
            w = max(5, len(r.losses) // 50)
            smooth = np.convolve(r.losses, np.ones(w) / w, mode="valid")
            ax.plot(
                x[w - 1 :],
                smooth,
                color=line.get_color(),
                lw=1.5,
                label=f"train, {tbptt_name(k1, r.k2)}",
            )
        if r.val:
            v = np.asarray(r.val)
            ax.plot(
                v[:, 0],
                v[:, 2],
                "o--",
                color=line.get_color(),
                ms=3,
                label=f"validation, k2={k2_name(r.k2)}",
            )
    for b in task.baselines:
        ax.axhline(b.loss, color="gray", ls=":" if not b.optimum else "-", lw=1)
        ax.annotate(
            b.label, (0, b.loss), xycoords=("axes fraction", "data"), fontsize=7, va="bottom"
        )
    ax.set_xlabel("update")
    ax.set_ylabel(loss_name(task))
    ax.set_yscale("log")
    ax.set_title(task.title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(folder, "loss.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    files.append(path)
    if len(results) > 1 and all(r.k2 is not None for r in results):
        fig, ax = plt.subplots(figsize=(6, 4))
        ks = [r.k2 for r in results]
        ax.plot(ks, [r.train_loss for r in results], "o-", label="train (last 10% of updates)")
        if all(r.val_loss is not None for r in results):
            ax.plot(ks, [r.val_loss for r in results], "s--", label="validation")
        for b in task.baselines:
            ax.axhline(b.loss, color="gray", ls=":" if not b.optimum else "-", lw=1, label=b.label)
        if task.horizon:
            ax.axvline(task.horizon, color="red", lw=0.8, label=f"memory horizon {task.horizon}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k2 (steps the gradient reaches back)")
        ax.set_ylabel("final " + loss_name(task))
        ax.set_title(f"{task.title.split(':')[0]}, k1={k1}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(folder, "k2_sweep.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        files.append(path)
    return files


def write_summary(run: Run, r: RunResult) -> None:
    summary = {
        "task": run.task.title,
        "k1": run.k1,
        "k2": r.k2,
        "updates": len(r.losses),
        "steps": run.steps_done,
        "streams": run.task.train.batch,
        "train_loss_last_10pct": r.train_loss,
        "val_loss": r.val_loss,
        "best_val_loss": r.best_val,
        "best_update": r.best_update,
        "seconds": r.elapsed,
        "timesteps_per_s": r.timesteps / r.elapsed if r.elapsed > 0 else None,
        "baselines": {b.label: b.loss for b in run.task.baselines},
    }
    if run.bayes_val is not None:
        summary["bayes_optimal_on_validation"] = run.bayes_val
    atomic_text(os.path.join(run.out, "summary.json"), json.dumps(summary, indent=1) + "\n")


def write_sweep(out: str, cfg: dict, results: list[RunResult]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["k1", "k2", "train_loss", "val_loss", "best_val_loss"])
    for r in results:
        w.writerow([cfg["k1"], k2_name(r.k2), r.train_loss, r.val_loss, r.best_val])
    atomic_text(os.path.join(out, "sweep.csv"), buf.getvalue())
