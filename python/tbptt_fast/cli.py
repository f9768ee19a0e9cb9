"""The command line: ``tbptt-fast train`` and ``tbptt-fast bench``."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from .model import CELLS

__all__ = ["delayed_echo", "main"]


def delayed_echo(steps: int, batch: int, delay: int, seed: int = 0):
    """The built-in task: reproduce the input ``delay`` steps later.

    Returns ``x`` [T, B, 1] float32 (standard normal), ``target`` [T, B, 1]
    (``target[t] = x[t - delay]``) and ``mask`` [T, B] bool (False for the
    first ``delay`` steps, which have nothing to echo). A window of k2 > delay
    steps is needed to learn it.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((steps, batch, 1)).astype(np.float32)
    target = np.zeros_like(x)
    target[delay:] = x[:-delay]
    mask = np.ones((steps, batch), bool)
    mask[:delay] = False
    return x, target, mask


def _train(args) -> int:
    import tbptt_fast as tb

    if args.threads:
        tb.set_num_threads(args.threads)
    x, target, mask = delayed_echo(args.steps, args.batch, args.delay, args.seed)
    model = tb.Model(args.cell, 1, args.hidden, 1, num_layers=args.layers, seed=args.seed)
    k2 = None if args.k2 == 0 else args.k2
    trainer = tb.Trainer(
        model,
        k1=args.k1,
        k2=args.k1 if k2 == -1 else k2,
        loss="mse",
        optimizer=tb.Adam(lr=args.lr),
        clip_grad_norm=1.0,
        overlap=args.overlap,
        backend=args.backend,
    )
    print(
        f"delayed echo (delay {args.delay}), {args.cell} H={args.hidden} L={args.layers}, "
        f"TBPTT(k1={trainer.k1}, k2={trainer.k2}), overlap={args.overlap}, "
        f"backend={args.backend}, T={args.steps}, B={args.batch}"
    )
    start = time.perf_counter()
    losses, steps = [], []
    chunk = max(args.k1, 1000 // args.k1 * args.k1)
    for lo in range(0, args.steps, chunk):
        hi = min(args.steps, lo + chunk)
        res = trainer.fit(x[lo:hi], target[lo:hi], mask=mask[lo:hi], flush=hi == args.steps)
        for loss, t in zip(res.losses, res.update_steps, strict=True):
            losses.append(loss)
            steps.append(t)
            if args.log_every and len(losses) % args.log_every == 0:
                print(f"update {len(losses):6d}  step {t:7d}  loss {loss:.5f}")
    elapsed = time.perf_counter() - start
    tail = float(np.mean(losses[-max(1, len(losses) // 10) :]))
    first = float(np.mean(losses[: max(1, len(losses) // 10)]))
    print(
        f"done: {len(losses)} updates in {elapsed:.2f} s "
        f"({args.steps * args.batch / elapsed:,.0f} timesteps*batch/s); "
        f"loss {first:.4f} (first 10%) -> {tail:.4f} (last 10%); "
        f"predicting zero scores 1.0"
    )
    print("learned the echo" if tail < 0.1 else "did not learn the echo (yet)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tbptt-fast`` / ``python -m tbptt_fast``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        from .bench import main as bench_main

        return int(bench_main(argv[1:]) or 0)
    parser = argparse.ArgumentParser(prog="tbptt-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", help="benchmarks against pure-Python and PyTorch (see --help)")
    tr = sub.add_parser("train", help="train on the built-in delayed-echo task")
    tr.add_argument("--cell", default="lstm", choices=CELLS)
    tr.add_argument("--hidden", type=int, default=32)
    tr.add_argument("--layers", type=int, default=1)
    tr.add_argument("--k1", type=int, default=8)
    tr.add_argument("--k2", type=int, default=16, help="-1: same as k1, 0: unbounded")
    tr.add_argument("--delay", type=int, default=10)
    tr.add_argument("--steps", type=int, default=20000)
    tr.add_argument("--batch", type=int, default=16)
    tr.add_argument("--lr", type=float, default=0.01)
    tr.add_argument("--overlap", default="stored", choices=["stored", "recompute"])
    tr.add_argument("--backend", default="cpu", choices=["numpy", "cpu", "cuda"])
    tr.add_argument("--threads", type=int, default=0, help="0: leave the default")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--log-every", type=int, default=100, help="print every Nth update's loss")
    args = parser.parse_args(argv)
    return _train(args)
