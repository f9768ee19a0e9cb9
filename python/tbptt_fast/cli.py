"""The command line: ``tbptt-fast train | evaluate | generate | advise | bench``.

``train`` runs TBPTT(k1, k2) on a built-in task (:mod:`tbptt_fast.tasks`) or on
the user's data (:mod:`tbptt_fast.data`), showing progress
(:mod:`tbptt_fast.progress`), validating on held-out streams with
``Model.evaluate``, changing the learning rate between chunks of steps through
``trainer.optimizer.lr``, and with ``--out DIR`` writing the latest and the best
checkpoint there; ``--resume DIR`` continues such a run exactly where its
latest checkpoint stopped. Several ``--k2`` values run one training each and
compare them. ``evaluate`` scores a checkpoint, ``generate`` samples text,
``advise`` measures gradient decay and truncation bias and recommends k1 and k2
(:mod:`tbptt_fast.diagnostics`).

Exit codes: 0 success, 1 a failure while running (e.g. the loss diverged),
2 a usage error (a bad option, a bad file), 130 stopped by Ctrl-C or SIGTERM
(after writing the latest checkpoint). Errors are one line unless ``--debug``.

The run's files in ``--out DIR`` (a sweep over several k2 puts each run in
``DIR/k2-<k2>/``): ``run.json`` (the options, written first), ``latest.ckpt``
(a trainer checkpoint) and ``best.ckpt`` (a model checkpoint), written
atomically, whose manifest's ``"cli"`` entry and ``cli/*`` arrays hold the
run's progress and history (:mod:`tbptt_fast.runs`), so ``--resume`` needs
nothing else; ``losses.csv``, ``validation.csv``, ``summary.json``, and with
``--plot`` ``loss.png`` (and ``k2_sweep.png``).

This module turns the options into a run's configuration (a JSON-able dict:
the options with every default filled in) and runs the commands;
:mod:`tbptt_fast.runs` trains and reports.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .model import CELLS
from .runs import (
    CLI_VERSION,
    LN2,
    Failure,
    Interrupted,
    Run,
    StopFlag,
    UsageError,
    atomic_text,
    build_task,
    check_matplotlib,
    comparison_table,
    echo_verdict,
    k2_name,
    loss_of,
    plot_runs,
    read_run_meta,
    summary_lines,
    tbptt_name,
    write_summary,
    write_sweep,
)

__all__ = ["main"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# Per-source defaults: (steps, batch, hidden, k1, k2, lr, embed). None: derived (see _resolve).
DEFAULTS = {
    "echo": dict(steps=20000, batch=16, hidden=32, k1=None, k2=None, lr=0.01, embed=None),
    "adding": dict(steps=40000, batch=16, hidden=32, k1=None, k2=None, lr=0.01, embed=None),
    "reber": dict(steps=20000, batch=16, hidden=32, k1=8, k2=[32], lr=0.005, embed=8),
    "text": dict(steps=None, batch=16, hidden=128, k1=32, k2=[64], lr=0.01, embed=32),
    "data": dict(steps=None, batch=8, hidden=32, k1=16, k2=None, lr=0.003, embed=16),
}
COMMON = dict(
    cell="lstm",
    layers=1,
    dtype="float32",
    seed=0,
    epochs=1,
    val=0.1,
    overlap="stored",
    loss="auto",
    optimizer="adam",
    momentum=0.0,
    weight_decay=0.0,
    schedule="cosine",
    lr_gamma=0.5,
    clip=1.0,
    delay=10,
    length=20,
)
# Options --resume takes beside DIR: how to show the run, not what it computes.
RESUME_OPTIONS = ("threads", "progress", "plot", "debug", "resume")


# ----------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (main turns it into the exit code)
        raise UsageError(f"{message} (see '{self.prog} --help')")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=30)


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return v


def _nonneg(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}")
    return v


def _number(lo: float, hi: float | None = None, *, lo_open=False, hi_open=True):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo)
        if hi is not None:
            ok = ok and (v < hi if hi_open else v <= hi)
        if not ok:
            rng = f"{'(' if lo_open else '['}{lo:g}, {'inf' if hi is None else f'{hi:g}'}"
            rng += ")" if hi is None or hi_open else "]"
            raise argparse.ArgumentTypeError(f"expected a number in {rng}, got {text!r}")
        return v

    return parse


def _k2_list(text: str) -> list[int | None]:
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if item in ("none", "inf", "full"):
            out.append(None)
            continue
        try:
            v = int(item)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected ints >= 1 or 'none', comma-separated, got {text!r}"
            ) from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"k2 must be >= 1 or 'none', got {item!r}")
        out.append(v)
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"k2 values repeat in {text!r}")
    return out


def _clip(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    return _number(0.0, lo_open=True)(text)


def _data_options(p: argparse.ArgumentParser, *, evaluate: bool) -> None:
    g = p.add_argument_group("what to train on" if not evaluate else "what to evaluate on")
    src = g.add_mutually_exclusive_group()
    src.add_argument(
        "--task",
        choices=("echo", "adding", "reber"),
        help="a built-in task generated from --seed"
        + (" (default: the checkpoint's own data)" if evaluate else " (default: echo)")
        + ": echo = the input --delay steps ago; adding = the adding problem; reber = the "
        "next symbol of the embedded Reber grammar",
    )
    src.add_argument(
        "--text",
        metavar="FILE",
        help="character-level language modelling on a UTF-8 text file",
    )
    src.add_argument(
        "--data",
        metavar="FILE",
        help="your arrays: .npy/.npz (x [T, D] or [T, B, D], optional y, mask, resets) "
        "or .csv (one row per step); without targets, next-step prediction",
    )
    g.add_argument(
        "--delay", type=_positive, metavar="N", help="echo: the delay d in steps (default 10)"
    )
    g.add_argument(
        "--length",
        type=_positive,
        metavar="N",
        help="adding: steps per sequence, the memory horizon (default 20)",
    )
    g.add_argument(
        "--columns", metavar="COLS", help="CSV: input columns, names or 0-based indices (a,b,c)"
    )
    g.add_argument(
        "--target-columns",
        metavar="COLS",
        help="CSV: target columns (default: next-step prediction of the inputs)",
    )
    g.add_argument(
        "--standardize",
        action=argparse.BooleanOptionalAction,
        help="scale inputs and targets to mean 0, std 1 on the training part "
        "(default: on for CSV, off for .npy/.npz)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tbptt-fast",
        description="Truncated backpropagation through time, TBPTT(k1, k2), from the command\n"
        "line. Run 'tbptt-fast train' for a demonstration of what k2 changes.",
        formatter_class=_Formatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # -- train ---------------------------------------------------------------------
    tr = sub.add_parser(
        "train",
        help="train on a built-in task, a text file or your arrays",
        description="Train a recurrent network with TBPTT(k1, k2): update every k1 steps,\n"
        "backpropagating through the last k2. With no options: the delayed echo trained\n"
        "twice, with k2 below and above the delay, side by side.",
        epilog="examples:\n"
        "  tbptt-fast train                                  # the k2 demonstration\n"
        "  tbptt-fast train --task reber --out runs/reber    # the embedded Reber grammar\n"
        "  tbptt-fast train --text book.txt --out runs/book  # a character-level model\n"
        "  tbptt-fast train --task echo --k2 4,8,16,32 --plot  # a sweep over k2\n"
        "  tbptt-fast train --resume runs/book               # continue a stopped run",
        formatter_class=_Formatter,
    )
    _data_options(tr, evaluate=False)
    g = tr.add_argument_group("the stream")
    g.add_argument(
        "--steps",
        type=_positive,
        metavar="N",
        help="timesteps per stream: the length of a task's generated training streams "
        "(echo/reber 20000, adding 40000), or for --text/--data a limit on all epochs "
        "together (default: none)",
    )
    g.add_argument(
        "--epochs", type=_positive, metavar="N", help="passes over the training streams (default 1)"
    )
    g.add_argument(
        "--batch",
        type=_positive,
        metavar="B",
        help="parallel streams B (default: tasks 16, text 16, data 8; [T, B, D] arrays keep their B)",
    )
    g.add_argument(
        "--val",
        type=_number(0.0, 1.0),
        metavar="SHARE",
        help="validation share: tasks generate held-out streams this long relative to "
        "the training ones, text and data hold out this share of their end (default 0.1; 0: none)",
    )
    g.add_argument(
        "--val-every",
        type=_positive,
        metavar="UPDATES",
        help="validate every this many updates (default: 10 times per run, and at the end)",
    )
    g = tr.add_argument_group("the model")
    g.add_argument("--cell", choices=CELLS, help="recurrent cell (default lstm)")
    g.add_argument("--layers", type=_positive, metavar="L", help="stacked layers (default 1)")
    g.add_argument(
        "--hidden",
        type=_positive,
        metavar="H",
        help="hidden size H (default: tasks 32, text 128, data 32)",
    )
    g.add_argument(
        "--embed",
        type=_positive,
        metavar="E",
        help="embedding size of token inputs: text, reber, integer data (default: 32, 8, 16)",
    )
    g.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        help="the parameters' and the computation's type (default float32)",
    )
    g.add_argument(
        "--seed",
        type=_nonneg,
        metavar="N",
        help="seed of the initialisation and the tasks' data (default 0)",
    )
    g = tr.add_argument_group("TBPTT(k1, k2)")
    g.add_argument(
        "--k1",
        type=_positive,
        metavar="K1",
        help="update every k1 steps (default: echo delay/2, adding --length, reber 8, "
        "text 32, data 16)",
    )
    g.add_argument(
        "--k2",
        type=_k2_list,
        metavar="K2[,K2...]",
        help="backpropagate through the last k2 steps; 'none' reaches back to the start "
        "of the stream (its cost grows with it); several values train once each and "
        "compare them (default: echo delay/2,2*delay, adding --length, reber 32, text 64, "
        "data k1)",
    )
    g.add_argument(
        "--overlap",
        choices=("stored", "recompute"),
        help="with k2 > k1: backpropagate through the stored activations, or recompute "
        "the window with the current weights (default stored)",
    )
    g = tr.add_argument_group("optimization")
    g.add_argument(
        "--loss",
        choices=("auto", "mse", "cross_entropy"),
        help="the loss (default auto: mse for real-valued targets, cross_entropy for "
        "classes, symbols and text)",
    )
    g.add_argument(
        "--optimizer", choices=("adam", "sgd"), help="Adam or SGD, as PyTorch's (default adam)"
    )
    g.add_argument(
        "--lr",
        type=_number(0.0, lo_open=True),
        metavar="LR",
        help="learning rate (default: echo, adding and text 0.01, reber 0.005, data 0.003)",
    )
    g.add_argument(
        "--momentum", type=_number(0.0, 1.0), metavar="M", help="sgd momentum (default 0)"
    )
    g.add_argument(
        "--weight-decay", type=_number(0.0), metavar="WD", help="L2 weight decay (default 0)"
    )
    g.add_argument(
        "--schedule",
        choices=("constant", "step", "cosine"),
        help="learning-rate schedule, applied between chunks of steps: step = times "
        "--lr-gamma every --lr-step updates, cosine = from --lr down to 0 over the run "
        "(default cosine)",
    )
    g.add_argument(
        "--lr-step",
        type=_positive,
        metavar="UPDATES",
        help="step schedule: updates between decays (default: a third of the run)",
    )
    g.add_argument(
        "--lr-gamma",
        type=_number(0.0, 1.0, lo_open=True, hi_open=False),
        metavar="G",
        help="step schedule: the factor of each decay (default 0.5)",
    )
    g.add_argument(
        "--clip",
        type=_clip,
        metavar="NORM",
        help="clip the gradient's global norm to NORM; 'none' to turn off (default 1.0)",
    )
    g = tr.add_argument_group("running")
    g.add_argument(
        "--backend",
        choices=("cpu", "numpy", "cuda"),
        help="cpu (the C++ engine; the default), numpy (the reference) or cuda",
    )
    g.add_argument(
        "--threads",
        type=_positive,
        metavar="N",
        help="threads of the cpu engine (default: its own)",
    )
    g.add_argument(
        "--out",
        metavar="DIR",
        help="write checkpoints (latest.ckpt, best.ckpt), losses and the summary here",
    )
    g.add_argument(
        "--save-every",
        type=_positive,
        metavar="UPDATES",
        help="with --out: write latest.ckpt every this many updates (default: every "
        "minute), and always on Ctrl-C and at the end",
    )
    g.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR (from --out) from its latest checkpoint; the "
        "result equals an uninterrupted run. Takes no other training options",
    )
    g.add_argument(
        "--plot",
        action="store_true",
        help="plot the loss per update to loss.png (and, for several k2, the final loss "
        "against k2 to k2_sweep.png) in --out DIR or the current folder; needs matplotlib",
    )
    g.add_argument(
        "--progress",
        choices=("auto", "bar", "plain", "none"),
        default="auto",
        help="auto: a bar in a terminal (rich or tqdm when installed), plain lines otherwise",
    )
    g.add_argument(
        "--debug", action="store_true", help="show tracebacks instead of one-line errors"
    )
    g.add_argument(
        "--distributed",
        action="store_true",
        help="data parallel over MPI: run under 'mpiexec -n N'; the --batch streams are split "
        "across the N processes, the result equals one process (needs tbptt-fast[mpi]; one "
        "k2, no --resume; --out gets latest.ckpt, a distributed checkpoint, and model.ckpt)",
    )

    # -- evaluate ------------------------------------------------------------------
    ev = sub.add_parser(
        "evaluate",
        help="score a checkpoint on a task or data (loss, bits per character, accuracy)",
        description="Score a checkpoint (from 'train --out', or Model.save). Without\n"
        "--task/--text/--data: fresh streams of the task it was trained on, or the\n"
        "validation part of its text or data file.",
        formatter_class=_Formatter,
    )
    ev.add_argument("checkpoint", metavar="CKPT", help="a .ckpt file, e.g. runs/reber/best.ckpt")
    _data_options(ev, evaluate=True)
    ev.add_argument(
        "--steps",
        type=_positive,
        metavar="N",
        help="tasks: steps per fresh stream (default: as the run's validation streams, or 2000)",
    )
    ev.add_argument(
        "--batch",
        type=_positive,
        metavar="B",
        help="streams (default: as in training, or 16 for tasks)",
    )
    ev.add_argument(
        "--seed",
        type=_nonneg,
        metavar="N",
        help="tasks: seed of the fresh streams (default: the run's; streams apart from "
        "its training and validation ones)",
    )
    ev.add_argument(
        "--backend", choices=("cpu", "numpy", "cuda"), help="the engine that runs it (default cpu)"
    )
    ev.add_argument("--threads", type=_positive, metavar="N", help="threads of the cpu engine")
    ev.add_argument("--debug", action="store_true", help="show tracebacks")

    # -- generate ------------------------------------------------------------------
    ge = sub.add_parser(
        "generate",
        help="sample text (or Reber strings) from a checkpoint of a token model",
        description="Prime a text model (trained with 'train --text') with --prime and\n"
        "sample -n characters after it.",
        formatter_class=_Formatter,
    )
    ge.add_argument("checkpoint", metavar="CKPT", help="a checkpoint of a --text run")
    ge.add_argument(
        "--prime",
        metavar="TEXT",
        help="the text to start from (default: the first character of the vocabulary)",
    )
    ge.add_argument("-n", type=_nonneg, default=200, help="characters to generate (default 200)")
    ge.add_argument(
        "--temperature",
        type=_number(0.0),
        default=0.8,
        metavar="T",
        help="0: always the likeliest character; higher: more varied (default 0.8)",
    )
    ge.add_argument(
        "--seed", type=_nonneg, metavar="N", default=0, help="seed of the sampling (default 0)"
    )
    ge.add_argument(
        "--text",
        metavar="FILE",
        help="the training text, for a checkpoint that does not hold its vocabulary "
        "(one saved by Model.save)",
    )
    ge.add_argument(
        "--backend", choices=("cpu", "numpy", "cuda"), help="the engine that runs it (default cpu)"
    )
    ge.add_argument("--debug", action="store_true", help="show tracebacks")

    _advise_parser(sub)
    sub.add_parser(
        "bench",
        help="benchmarks against a NumPy loop and PyTorch (see 'tbptt-fast bench --help')",
        add_help=False,
    )
    return parser


# ----------------------------------------------------------------------------
# The run's configuration
# ----------------------------------------------------------------------------


def _default_backend() -> str:
    from ._backend import native_available

    return "cpu" if native_available() else "numpy"


def _source_of(args) -> dict:
    """What the run trains on, as JSON (files by absolute path and SHA-256)."""
    from .data import DataError, file_digest

    def digest(path):
        try:
            return file_digest(path)
        except FileNotFoundError:
            raise DataError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise DataError(f"{path}: is a folder, not a file") from None
        except OSError as e:
            raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None

    if args.text is not None:
        return {"kind": "text", "path": os.path.abspath(args.text), "sha256": digest(args.text)}
    if args.data is not None:
        return {
            "kind": "data",
            "path": os.path.abspath(args.data),
            "sha256": digest(args.data),
            "columns": args.columns,
            "target_columns": args.target_columns,
            "standardize": args.standardize,
        }
    task = args.task or "echo"
    src = {"kind": "task", "task": task}
    if task == "echo":
        src["delay"] = args.delay or COMMON["delay"]
    if task == "adding":
        src["length"] = args.length or COMMON["length"]
    return src


def _check_source_options(args, source: dict) -> None:
    kind = source["kind"]
    task = source.get("task")
    for opt, ok in (
        ("delay", task == "echo"),
        ("length", task == "adding"),
        ("columns", kind == "data"),
        ("target_columns", kind == "data"),
        ("standardize", kind == "data"),
    ):
        if getattr(args, opt, None) is not None and not ok:
            where = {"delay": "--task echo", "length": "--task adding"}.get(opt, "--data")
            raise UsageError(f"--{opt.replace('_', '-')} applies to {where} only")


def _resolve(args) -> dict:
    """The run's complete configuration (JSON-able): the options, defaults filled in."""
    source = _source_of(args)
    _check_source_options(args, source)
    key = source.get("task", source["kind"])
    d = {**COMMON, **DEFAULTS[key]}

    def pick(name):
        v = getattr(args, name, None)
        return d.get(name) if v is None else v

    cfg = {name: pick(name) for name in (*COMMON, *DEFAULTS[key])}
    for name in ("delay", "length"):
        cfg.pop(name, None)
    cfg["source"] = source
    if key == "echo":
        delay = source["delay"]
        cfg["k1"] = args.k1 or max(1, delay // 2)
        cfg["k2"] = args.k2 or list(dict.fromkeys([max(1, delay // 2), 2 * delay]))
    elif key == "adding":
        cfg["k1"] = args.k1 or source["length"]
        cfg["k2"] = args.k2 or [source["length"]]
    else:
        cfg["k2"] = args.k2 or d["k2"] or [cfg["k1"]]
    cfg["val_every"] = args.val_every
    cfg["save_every"] = args.save_every
    cfg["lr_step"] = args.lr_step
    cfg["backend"] = args.backend or _default_backend()
    if cfg["optimizer"] == "adam" and args.momentum is not None:
        raise UsageError("--momentum applies to --optimizer sgd only")
    if cfg["schedule"] != "step" and (args.lr_step is not None or args.lr_gamma is not None):
        raise UsageError("--lr-step and --lr-gamma apply to --schedule step only")
    if args.steps is not None and key in ("text", "data") and args.steps < 1:
        raise UsageError("--steps must be >= 1")
    return cfg


# ----------------------------------------------------------------------------
# Checkpoints with the run's progress
# ----------------------------------------------------------------------------


# ----------------------------------------------------------------------------
# One training run
# ----------------------------------------------------------------------------


# ----------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------


# ----------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------


def _given(args) -> list[str]:
    """The train options given on the command line (their defaults are None)."""
    skip = {"command", "progress"}
    out = [k for k, v in vars(args).items() if k not in skip and v not in (None, False)]
    if args.progress != "auto":
        out.append("progress")
    return out


def _set_threads(n) -> None:
    if n:
        import tbptt_fast as tb

        if tb.native_available():
            tb.set_num_threads(n)


def _train(args) -> int:
    if getattr(args, "distributed", False):
        from .distributed import cli_train

        return cli_train(args, _train_run)
    return _train_run(args)


def _train_run(args, distributed=None) -> int:
    """``train``; ``distributed(run, out)``, when given, sets up a run's trainer
    over MPI (``run.trainer``) and returns the folder the run itself writes to."""
    stop = StopFlag()
    if args.plot:
        check_matplotlib()
    _set_threads(args.threads)
    if args.resume:
        extra = [k for k in _given(args) if k not in RESUME_OPTIONS]
        if extra:
            names = ", ".join("--" + k.replace("_", "-") for k in extra)
            raise UsageError(f"--resume takes the run's options from {args.resume}; drop {names}")
        out = args.resume
        path = os.path.join(out, "run.json")
        try:
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        except FileNotFoundError:
            raise UsageError(f"{out}: no run to resume here ({path} is missing)") from None
        except (OSError, ValueError) as e:
            raise UsageError(f"{path}: cannot be read ({e})") from None
        if not isinstance(cfg, dict) or cfg.get("version") != CLI_VERSION:
            raise UsageError(f"{path}: not a run of this version of tbptt-fast")
        cfg = cfg["config"]
    else:
        cfg = _resolve(args)
        out = args.out
        if out:
            if os.path.exists(os.path.join(out, "run.json")):
                raise UsageError(
                    f"{out} already holds a run: continue it with --resume {out}, or choose "
                    "another --out"
                )
            try:
                os.makedirs(out, exist_ok=True)
            except OSError as e:
                raise UsageError(
                    f"--out {out}: cannot create the folder ({e.strerror or e})"
                ) from None
    k2s = cfg["k2"]
    if cfg["backend"] == "cuda":
        import tbptt_fast as tb

        if not tb.cuda_available():
            raise Failure("--backend cuda: no usable CUDA GPU here (try --backend cpu)")
    task = build_task(cfg)
    loss_of(cfg, task)
    if cfg["val"] > 0 and task.val is None:
        raise UsageError("--val: the data are too short to hold out a validation part")
    if out and not args.resume:
        atomic_text(
            os.path.join(out, "run.json"),
            json.dumps({"version": CLI_VERSION, "config": cfg}, indent=1) + "\n",
        )
    print(task.title)
    sweep = len(k2s) > 1
    if sweep:
        print(
            f"training {cfg['cell']} (hidden {cfg['hidden']}) {len(k2s)} times, the same "
            f"data and initial weights, with "
            + ", ".join(tbptt_name(cfg["k1"], k) for k in k2s)
            + (
                f": only a window longer than the delay ({task.horizon} steps) can learn the echo"
                if task.name == "echo"
                else ""
            )
        )
    runs, results = [], []
    with stop.installed(lambda text: print(text, flush=True)):
        for k2 in k2s:
            run_dir = out
            if out and sweep:
                run_dir = os.path.join(out, f"k2-{k2_name(k2)}")
                os.makedirs(run_dir, exist_ok=True)
            if stop.signum is not None:  # stopped between two runs of a sweep
                where = f"; continue with: tbptt-fast train --resume {out}" if out else ""
                print(f"interrupted before the run with k2={k2_name(k2)}{where}", flush=True)
                return EXIT_INTERRUPTED
            label = f"[k2={k2_name(k2)}]" if sweep else ""
            run = Run(cfg, k2, task, run_dir, label, args.progress, stop)
            if distributed is not None:
                run.out = run_dir = distributed(run, run_dir)
            latest = os.path.join(run_dir, "latest.ckpt") if run_dir else None
            if args.resume and latest and os.path.exists(latest):
                _resume_into(run, latest)
            if not sweep or args.resume is None or run.chunks_done == 0:
                print(
                    f"{label + ' ' if label else ''}{cfg['cell']}, {cfg['layers']} layer(s), hidden "
                    f"{cfg['hidden']}, {tbptt_name(cfg['k1'], k2)}, overlap {cfg['overlap']}, "
                    f"{cfg['optimizer']} lr {cfg['lr']:g} ({cfg['schedule']}), backend "
                    f"{cfg['backend']}: {run.total:,} steps x {task.train.batch} streams",
                    flush=True,
                )
            try:
                r = run.run()
            except Interrupted:
                where = f"; continue with: tbptt-fast train --resume {out}" if out else ""
                print(f"interrupted at step {run.steps_done:,} of {run.total:,}{where}", flush=True)
                return EXIT_INTERRUPTED
            runs.append(run)
            results.append(r)
            for line in summary_lines(run, r):
                print(line)
            if out and run_dir:
                write_summary(run, r)
    if sweep:
        print()
        print(f"{task.title.split(':')[0]}: the same run with {len(k2s)} windows")
        for line in comparison_table(task, cfg["k1"], results, runs[0].bayes_val):
            print("  " + line)
        if task.name == "echo":
            for line in echo_verdict(task, results):
                print(line)
            good = [r for r in results if r.final_loss < 0.25]
            bad = [r for r in results if r.final_loss > 0.8]
            if good and bad:
                print(
                    "Only a window that reaches back past the delay learns it: the gradient of "
                    f"a loss at step t must reach the input at step t - {task.horizon}."
                )
    elif task.name == "echo":
        for line in echo_verdict(task, results):
            print(line)
    if out and sweep:
        write_sweep(out, cfg, results)
    if args.plot:
        folder = out or "."
        files = plot_runs(task, cfg["k1"], results, folder)
        print("plots: " + ", ".join(files))
    return EXIT_OK


def _resume_into(run: Run, latest: str) -> None:
    import tbptt_fast as tb

    meta, arrays = read_run_meta(latest)
    if meta is None or meta.get("version") != CLI_VERSION:
        raise UsageError(f"{latest}: not a checkpoint of a 'tbptt-fast train' run")
    saved = meta["config"]
    if saved.get("k2") != run.k2 or saved.get("k1") != run.cfg["k1"]:
        raise UsageError(f"{latest}: its k1/k2 differ from the run's run.json")
    trainer = tb.Trainer.load(latest, backend=run.cfg["backend"])
    run.restore(meta, arrays, trainer)


# ----------------------------------------------------------------------------
# evaluate and generate
# ----------------------------------------------------------------------------


def _load_model(path: str):
    import tbptt_fast as tb

    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file")
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a folder; name a checkpoint in it, e.g. {path}/best.ckpt")
    try:
        model = tb.Model.load(path)
        meta, _ = read_run_meta(path)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return model, meta


_SOURCE_KEYS = (
    "kind",
    "task",
    "delay",
    "length",
    "path",
    "sha256",
    "columns",
    "target_columns",
    "standardize",
)


def _same_source(a: dict, b: dict) -> bool:
    """The same task or file with the same options (vocabulary and scaler aside)."""
    return all(a.get(k) == b.get(k) for k in _SOURCE_KEYS)


def _eval_config(args, saved: dict | None) -> dict:
    """The configuration whose data ``evaluate`` scores the model on."""
    explicit = any(v is not None for v in (args.task, args.text, args.data))
    if not explicit:
        if saved is None:
            raise UsageError(
                f"{args.checkpoint}: holds no record of its data; name it with --task, "
                "--text or --data"
            )
        cfg = dict(saved)
        _check_source_options(args, cfg["source"])
        if cfg["source"]["kind"] == "task":  # the saved task's options, unless given
            cfg["source"] = {**cfg["source"], **_source_of(_with_task(args, cfg["source"]))}
        return cfg
    keys = {*COMMON, "steps", "batch", "embed", "hidden", "k1", "k2", "val_every", "save_every"}
    keys |= {"lr_step", "backend", "momentum", "lr_gamma", "lr", "epochs"}
    ns = argparse.Namespace(**dict.fromkeys(keys))
    for k in (
        "task",
        "text",
        "data",
        "delay",
        "length",
        "columns",
        "target_columns",
        "standardize",
    ):
        setattr(ns, k, getattr(args, k, None))
    cfg = _resolve(ns)
    if saved is not None:
        cfg["seed"] = saved.get("seed", 0)
        old = saved["source"]
        if _same_source(old, cfg["source"]):
            cfg.update(source=old, val=saved["val"], steps=saved["steps"], batch=saved["batch"])
        else:
            for k in ("vocab", "scaler"):  # what the model was trained with
                if k in old and old["kind"] == cfg["source"]["kind"]:
                    cfg["source"][k] = old[k]
            cfg["val"] = 0.0  # another file: all of it
    elif cfg["source"]["kind"] != "task":
        cfg["val"] = 0.0
    return cfg


def _with_task(args, source: dict):
    ns = argparse.Namespace(**vars(args))
    ns.task = source["task"]
    ns.delay = args.delay or source.get("delay")
    ns.length = args.length or source.get("length")
    return ns


def _evaluate(args) -> int:
    _set_threads(args.threads)
    model, meta = _load_model(args.checkpoint)
    saved = (meta or {}).get("config")
    backend = args.backend or _default_backend()
    cfg = _eval_config(args, saved)
    if args.batch:
        cfg["batch"] = args.batch
    src = cfg["source"]
    if src["kind"] == "task":
        vs = args.steps or round(cfg["val"] * cfg["steps"]) or 2000
        if args.seed is not None:
            cfg["seed"] = args.seed
        task = build_task(cfg, split="evaluate", val_steps=vs)
        split = task.val
        where = (
            f"{split.batch} fresh streams of {split.steps:,} steps (seed {cfg['seed']}, "
            "apart from the training and validation streams)"
        )
    else:
        if args.steps is not None or args.seed is not None:
            raise UsageError("--steps and --seed apply to the built-in tasks only")
        task = build_task(cfg)
        if cfg["val"] > 0 and task.val is not None:
            split = task.val
            where = f"the validation part (the last {cfg['val']:g}) of {src['path']}"
        else:
            split = task.train
            where = f"all of {src['path']}"
    _check_fit(args.checkpoint, model, task)
    loss = task.loss
    ev = model.evaluate(split.x, split.target, split.mask, split.resets, loss=loss, backend=backend)
    print(f"{args.checkpoint}: {model!r}")
    print(task.title)
    print(f"evaluated on {where}")
    if loss == "mse":
        line = f"mse {ev.loss:.4f} over {ev.count:,} targets"
    else:
        unit = "char" if task.name == "text" else "symbol"
        line = (
            f"loss {ev.loss:.4f} nats/{unit} = {ev.loss / LN2:.3f} bits/{unit}, "
            f"accuracy {100 * ev.accuracy:.1f}% over {ev.count:,} predictions"
        )
    print(line)
    refs = [f"{b.label} {b.loss:.4f}" for b in task.baselines]
    if task.name == "reber":
        from .tasks import reber_bayes_losses

        bayes = float(reber_bayes_losses(split.x, split.target)[split.mask].mean())
        refs.append(
            f"Bayes-optimal on these streams {bayes:.4f} (the model is {ev.loss - bayes:+.4f})"
        )
    if refs:
        print("for comparison: " + "; ".join(refs))
    return EXIT_OK


def _check_fit(path: str, model, task) -> None:
    tokens = task.vocab_size is not None
    if tokens != (model.vocab_size is not None):
        what = "token ids" if tokens else "real-valued inputs"
        raise UsageError(f"{path}: the model does not read {what}, which these data have")
    if tokens and task.vocab_size > model.vocab_size:
        raise UsageError(
            f"{path}: the data have {task.vocab_size} distinct tokens, the model {model.vocab_size}"
        )
    if not tokens and task.input_size != model.input_size:
        raise UsageError(
            f"{path}: the model reads {model.input_size} input features, the data have "
            f"{task.input_size}"
        )
    if task.loss == "mse" and task.output_size != model.output_size:
        raise UsageError(
            f"{path}: the model has {model.output_size} outputs, the data {task.output_size} targets"
        )
    if task.loss == "cross_entropy" and task.output_size > model.output_size:
        raise UsageError(
            f"{path}: the data have {task.output_size} classes, the model {model.output_size} outputs"
        )


def _generate(args) -> int:
    import tbptt_fast as tb

    model, meta = _load_model(args.checkpoint)
    vocab = (meta or {}).get("task", {}).get("vocab")
    if args.text is not None:
        from .data import _read_text

        vocab = "".join(sorted(set(_read_text(args.text))))
    if model.vocab_size is None:
        raise UsageError(f"{args.checkpoint}: not a text model (it reads real-valued inputs)")
    if not vocab:
        raise UsageError(
            f"{args.checkpoint}: holds no vocabulary; pass --text FILE, the text it was trained on"
        )
    if len(vocab) != model.vocab_size or model.output_size > len(vocab):
        raise UsageError(
            f"{args.checkpoint}: the model has {model.vocab_size} tokens, the vocabulary "
            f"{len(vocab)} characters"
        )
    prime = args.prime if args.prime is not None else vocab[0]
    if not prime:
        raise UsageError("--prime must not be empty")
    from .data import DataError, text_ids

    try:
        ids = text_ids(prime, vocab, "--prime")
    except DataError as e:
        raise UsageError(str(e)) from None
    out = tb.sample(
        model,
        ids,
        args.n,
        temperature=args.temperature,
        seed=args.seed,
        backend=args.backend or _default_backend(),
    )
    sys.stdout.write(prime + "".join(vocab[i] for i in out) + "\n")
    return EXIT_OK


# ----------------------------------------------------------------------------
# advise
# ----------------------------------------------------------------------------

# A fresh model's options; with a checkpoint they are refused (it has its own).
_FRESH_MODEL = ("cell", "layers", "hidden", "embed", "dtype")


def _advise_parser(sub) -> None:
    ad = sub.add_parser(
        "advise",
        help="measure gradient decay and truncation bias, and recommend k1 and k2",
        description="Measure, for a model (a checkpoint, or a fresh one) on a task or data,\n"
        "how the gradient of a loss decays with the lag, and how far the TBPTT(k1, k2)\n"
        "update gradient is from the untruncated one for a range of k2; then recommend\n"
        "the smallest k2 whose cosine with the untruncated gradient reaches --threshold,\n"
        "and the k1 with the best measured speed per unit of bias at that k2.",
        epilog="examples:\n"
        "  tbptt-fast train --task echo --delay 8 --k2 16 --out runs/echo\n"
        "  tbptt-fast advise runs/echo/best.ckpt --plot echo.png\n"
        "  tbptt-fast advise --task reber --json advice.json   # a fresh model\n"
        "  tbptt-fast advise --text book.txt --steps 2000",
        formatter_class=_Formatter,
    )
    ad.add_argument(
        "checkpoint",
        nargs="?",
        metavar="CKPT",
        help="a trained model (.ckpt from 'train --out', or Model.save); without it, a "
        "fresh model of --cell/--hidden/... (default: the train command's)",
    )
    _data_options(ad, evaluate=True)
    g = ad.add_argument_group("the data and a fresh model")
    g.add_argument(
        "--steps",
        type=_positive,
        metavar="N",
        help="steps per stream to measure on: a task's generated length, or the first N "
        "steps of a file (default 4096)",
    )
    g.add_argument("--batch", type=_positive, metavar="B", help="streams (default: as in train)")
    g.add_argument(
        "--seed", type=_nonneg, metavar="N", help="seed of a task's streams and a fresh model"
    )
    g.add_argument("--cell", choices=CELLS, help="fresh model: the cell (default lstm)")
    g.add_argument("--layers", type=_positive, metavar="L", help="fresh model: layers")
    g.add_argument("--hidden", type=_positive, metavar="H", help="fresh model: hidden size")
    g.add_argument("--embed", type=_positive, metavar="E", help="fresh model: embedding size")
    g.add_argument("--dtype", choices=("float32", "float64"), help="fresh model: dtype")
    g = ad.add_argument_group("the measurements")
    g.add_argument(
        "--lags",
        type=_positive,
        default=64,
        metavar="J",
        help="decay curve: the largest lag (default 64)",
    )
    g.add_argument(
        "--positions",
        type=_positive,
        default=16,
        metavar="P",
        help="decay curve: steps t averaged over (default 16)",
    )
    g.add_argument(
        "--decay-threshold",
        type=_number(0.0, lo_open=True),
        default=0.01,
        metavar="R",
        help="decay curve: the ratio whose lag is reported (default 0.01)",
    )
    g.add_argument(
        "--k1",
        type=_positive,
        default=1,
        metavar="K1",
        help="the k1 of the k2 sweep (default 1: every loss sees exactly k2 steps)",
    )
    g.add_argument(
        "--k2",
        type=_k2_list,
        metavar="K2[,K2...]",
        help="the windows to measure, 'none' included (default: the powers of two up to "
        "min(128, steps/2) and none, then every k2 between the two around --threshold)",
    )
    g.add_argument(
        "--k1-candidates",
        type=_k2_list,
        metavar="K1[,K1...]",
        help="the k1 values timed at the chosen k2 (default 1, 2, 4, ... up to k2, and k2)",
    )
    g.add_argument(
        "--segments",
        type=_positive,
        default=8,
        metavar="S",
        help="truncation bias: segments compared (default 8)",
    )
    g.add_argument(
        "--segment-steps",
        type=_positive,
        metavar="N",
        help="truncation bias: steps per segment (default 2 * largest k2 + k1)",
    )
    g.add_argument(
        "--threshold",
        type=_number(0.0, 1.0, lo_open=True, hi_open=False),
        default=0.95,
        metavar="COS",
        help="the cosine the recommended window must reach (default 0.95)",
    )
    g.add_argument(
        "--lr",
        type=_number(0.0, lo_open=True),
        metavar="LR",
        help="also measure with moving weights (training at this learning rate through "
        "each segment), for both overlap rules (default: frozen weights only)",
    )
    g.add_argument(
        "--optimizer",
        choices=("adam", "sgd"),
        default="sgd",
        help="with --lr: the optimizer (default sgd)",
    )
    g.add_argument(
        "--overlap",
        choices=("stored", "recompute"),
        default="stored",
        help="with --lr: the rule the recommendation is checked under (default stored)",
    )
    g = ad.add_argument_group("running and output")
    g.add_argument(
        "--backend",
        choices=("cpu", "numpy", "cuda"),
        help="the engine of the bias runs and the timing (default cpu); the decay curve "
        "always uses the numpy reference",
    )
    g.add_argument("--threads", type=_positive, metavar="N", help="threads of the cpu engine")
    g.add_argument("--json", metavar="FILE", help="write the measurements as JSON ('-': stdout)")
    g.add_argument(
        "--plot",
        nargs="?",
        const="advise.png",
        metavar="PNG",
        help="a PNG of both curves (default name advise.png); needs matplotlib",
    )
    g.add_argument("--debug", action="store_true", help="show tracebacks")


def _advise_config(args) -> tuple:
    """(model or None for a fresh one, cfg): the data's configuration, as train's."""
    model = None
    if args.checkpoint:
        given = [k for k in _FRESH_MODEL if getattr(args, k) is not None]
        if given:
            names = ", ".join("--" + k for k in given)
            raise UsageError(f"{names}: the checkpoint has its own model (drop them or CKPT)")
        model, meta = _load_model(args.checkpoint)
        cfg = _eval_config(args, (meta or {}).get("config"))
    else:
        keys = {*COMMON, "steps", "batch", "embed", "hidden", "k1", "k2", "val_every"}
        keys |= {"save_every", "lr_step", "backend", "momentum", "lr_gamma", "lr", "epochs"}
        ns = argparse.Namespace(**dict.fromkeys(keys))
        for k in (
            *("task", "text", "data", "delay", "length", "columns", "target_columns"),
            *("standardize", "seed", *_FRESH_MODEL),
        ):
            setattr(ns, k, getattr(args, k, None))
        cfg = _resolve(ns)
    cfg["val"] = 0.0
    cfg["steps"] = args.steps or 4096
    if args.batch:
        cfg["batch"] = args.batch
    if args.seed is not None:
        cfg["seed"] = args.seed
    return model, cfg


def _advise(args) -> int:
    import tbptt_fast as tb

    from . import diagnostics as diag
    from .runs import make_model

    if args.plot:
        check_matplotlib()
    _set_threads(args.threads)
    backend = args.backend or _default_backend()
    if backend == "cuda" and not tb.cuda_available():
        raise Failure("--backend cuda: no usable CUDA GPU here (try --backend cpu)")
    model, cfg = _advise_config(args)
    task = build_task(cfg, val_steps=0)
    if model is None:
        model = make_model(cfg, task)
        origin = f"a fresh model (seed {cfg['seed']})"
    else:
        _check_fit(args.checkpoint, model, task)
        origin = args.checkpoint
    split = task.train.window(0, args.steps or 4096)
    optimizer = None
    if args.lr is not None:
        optimizer = tb.Adam(lr=args.lr) if args.optimizer == "adam" else tb.SGD(lr=args.lr)
    elif args.optimizer != "sgd" or args.overlap != "stored":
        raise UsageError("--optimizer and --overlap apply with --lr only")
    k1s = args.k1_candidates
    if k1s is not None and None in k1s:
        raise UsageError("--k1-candidates: k1 must be an int >= 1")
    quiet = args.json == "-"
    say = (lambda *a: None) if quiet else print
    say(task.title)
    say(f"{origin}: {model!r}")
    say(
        f"measured on {split.batch} streams x {split.steps:,} steps, backend {backend} "
        "(decay curve: numpy reference)"
    )
    say()
    advice = diag.advise(
        model,
        split.x,
        split.target,
        split.mask,
        split.resets,
        loss=task.loss,
        threshold=args.threshold,
        k1_base=args.k1,
        k2s=args.k2,
        k1s=k1s,
        lags=args.lags,
        positions=args.positions,
        decay_threshold=args.decay_threshold,
        segments=args.segments,
        segment_steps=args.segment_steps,
        optimizer=optimizer,
        overlap=args.overlap,
        backend=backend,
    )
    for line in advice.lines():
        say(line)
    if args.json:
        doc = {"task": task.title, "model": repr(model), **advice.as_dict()}
        text = json.dumps(doc, indent=1) + "\n"
        if args.json == "-":
            sys.stdout.write(text)
        else:
            atomic_text(args.json, text)
            say(f"json: {args.json}")
    if args.plot:
        path = diag.plot(advice, args.plot, title=f"{task.title.split(':')[0]}, {model!r}")
        say(f"plot: {path}")
    return EXIT_OK


# ----------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tbptt-fast`` / ``python -m tbptt_fast``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else [os.fspath(a) for a in argv]
    if argv and argv[0] == "bench":
        from .bench import main as bench_main

        return int(bench_main(argv[1:]) or 0)
    debug = "--debug" in argv
    prog = "tbptt-fast" + (
        f" {argv[0]}" if argv and argv[0] in ("train", "evaluate", "generate", "advise") else ""
    )
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help
            return int(e.code or 0)
        command = {
            "train": _train,
            "evaluate": _evaluate,
            "generate": _generate,
            "advise": _advise,
        }[args.command]
        return command(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        from .data import DataError

        if debug:
            import traceback

            traceback.print_exc()
        usage = isinstance(e, (UsageError, DataError))
        msg = " ".join(str(e).split()) or type(e).__name__
        if not usage and not isinstance(e, Failure):
            msg = f"{type(e).__name__}: {msg}"
            if not debug:
                msg += " (run with --debug for the traceback)"
        print(f"{prog}: error: {msg}", file=sys.stderr)
        code = EXIT_USAGE if usage else EXIT_FAILURE
        if "--distributed" in argv:  # a failure on this rank only would leave the others waiting
            from .distributed import abort_unless_agreed

            abort_unless_agreed(e, code)
        return code
