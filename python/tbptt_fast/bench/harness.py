"""Benchmark harness: tbptt_fast against a textbook NumPy loop and PyTorch loops.

Every row of a benchmark is one configuration (cell, H = D, B, k1, k2, threads) and one
implementation. Before timing, each implementation is checked against tbptt_fast's NumPy
reference (see ``checks.check_impl``); a mismatch aborts that row. Timed samples are interleaved
across implementations (A B C A B C ...) so that drift cancels in ratios, and each records
how much CPU other processes used meanwhile; a sample taken while the machine was busy is
retried (a bounded number of times).

Work definition, identical for every implementation of a row:

- throughput: timesteps x batch per second;
- FLOPs per timestep: a forward step costs ``F = L * 2*B*(D+H)*G*H`` (G = 1/4/3 for
  rnn_tanh/lstm/gru) plus the readout ``R = 2*B*H*O``; one training step counts
  ``F * (1 + 2*k2/k1) + 3*R`` (forward once, backward over a k2 window every k1 steps at
  twice the forward's cost; for k1 == k2 this is the usual "3 x forward");
- fraction of peak: GFLOP/s divided by a 2048^3 float32 GEMM measured in the same run,
  with the same thread count, through the OpenBLAS that tbptt_fast's native engine uses
  (scipy-openblas32).

Modules: ``configs`` (what a row is, presets), ``runners`` (the implementations),
``checks`` (gradient checks), ``timing`` (machine load, GEMM peak, timed samples),
``report`` (ratios, table, JSON, plot); this module runs a matrix (``run``) and is the
command line (``main``).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable

from .configs import PRESETS, Config, make_matrix, parse_ints, parse_ks
from .peers import torch_loops
from .report import add_ratios, report
from .runners import ALL_IMPLS, IMPLS
from .timing import gemm_peak, machine_info, time_config, wait_for_quiet


def run(
    configs: list[Config],
    impls: list[str],
    *,
    repeats: int = 3,
    sample_s: float = 0.25,
    max_retries: int = 2,
    busy_limit: float = 0.15,
    check: bool = True,
    lr: float = 0.01,
    wait_quiet: float = 0.0,
    log: Callable[[str], None] = print,
) -> dict:
    """Run a benchmark matrix; returns ``{"machine", "gemm", "rows"}``.

    ``gemm`` maps the thread count (as a string in JSON) to the GEMM peak measurement.
    """
    if any(IMPLS.get(n) and IMPLS[n].family == "torch" for n in impls):
        try:
            torch_loops.import_torch()
        except ImportError as exc:
            log(f"note: {exc}")
    gemm = {}
    for t in sorted({c.threads for c in configs}):
        wait_for_quiet(wait_quiet, busy_limit, log)
        gemm[t] = gemm_peak(t)
        log(f"GEMM 2048^3 float32, {t} thread(s): {gemm[t]['gflops']:.1f} GFLOP/s")
    rows = []
    start = time.perf_counter()
    for i, cfg in enumerate(configs):
        log(f"[{i + 1}/{len(configs)}] {cfg.label}")
        wait_for_quiet(wait_quiet, busy_limit, log)
        got = time_config(
            cfg,
            impls,
            repeats=repeats,
            sample_s=sample_s,
            max_retries=max_retries,
            busy_limit=busy_limit,
            check=check,
            lr=lr,
            log=log,
        )
        for r in got:
            if r["status"] == "ok":
                log(
                    f"    {r['impl']:16s} {r['throughput']:>14,.0f} timesteps*B/s  "
                    f"{r['gflops']:7.2f} GFLOP/s  busy {100 * r['busy_max']:.0f}%"
                )
            else:
                log(f"    {r['impl']:16s} {r['status']}: {r['message']}")
        rows.extend(got)
    for t in gemm:  # again at the end: the peak is the best of both measurements
        wait_for_quiet(wait_quiet, busy_limit, log)
        again = gemm_peak(t)
        if again["gflops"] > gemm[t]["gflops"]:
            gemm[t] = again
        log(f"GEMM peak, {t} thread(s): {gemm[t]['gflops']:.1f} GFLOP/s (best of start and end)")
    add_ratios(rows, gemm)
    log(f"done in {time.perf_counter() - start:.0f} s")
    return {
        "machine": machine_info(),
        "gemm": {str(k): v for k, v in gemm.items()},
        "rows": rows,
    }


def build_parser(prog: str = "tbptt-fast bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Time tbptt_fast against a textbook NumPy loop and PyTorch loops "
        "(the same TBPTT(k1, k2), SGD, mse, float32). The default is a quick preset.",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tiny", action="store_true", help="a few seconds (for tests)")
    g.add_argument("--quick", action="store_true", help="the default, under 2 minutes")
    g.add_argument("--full", action="store_true", help="every configuration a target names")
    p.add_argument("--cells", help="comma list, e.g. lstm,gru,rnn_tanh (custom matrix)")
    p.add_argument("--hidden", type=parse_ints, help="comma list of H (= D)")
    p.add_argument("--batch", type=parse_ints, help="comma list of B")
    p.add_argument("--k", type=parse_ks, help="comma list of k1:k2, e.g. 16:16,16:64")
    p.add_argument("--threads", type=parse_ints, help="comma list of thread counts")
    p.add_argument("--out-size", type=int, default=16, help="readout size O (default 16)")
    p.add_argument(
        "--impls", default=",".join(ALL_IMPLS), help=f"comma list from {','.join(ALL_IMPLS)}"
    )
    p.add_argument("--repeats", type=int, help="timed samples per implementation")
    p.add_argument("--sample-seconds", type=float, help="target length of one sample")
    p.add_argument("--max-retries", type=int, help="retries of a sample on a busy machine")
    p.add_argument(
        "--busy-limit",
        type=float,
        default=0.15,
        help="retry a sample when other processes used more than this fraction of the CPUs",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="before each configuration wait up to this many seconds for a quiet machine",
    )
    p.add_argument("--no-check", action="store_true", help="skip the gradient checks")
    p.add_argument("--json", help="write the results as JSON to this path")
    p.add_argument("--plot", help="write a PNG bar chart (needs matplotlib) to this path")
    return p


def configs_from_args(args) -> tuple[list[Config], dict]:
    """The matrix and run options chosen on the command line."""
    preset = PRESETS["tiny" if args.tiny else "full" if args.full else "quick"]
    configs = list(preset["configs"])
    custom = any(v is not None for v in (args.cells, args.hidden, args.batch, args.k))
    if custom:
        configs = make_matrix(
            (args.cells or "lstm").split(","),
            args.hidden or [64],
            args.batch or [8],
            args.k or [(16, 16)],
            args.threads or [1],
            out=args.out_size,
        )
    elif args.threads:
        configs = [dataclasses.replace(c, threads=t) for c in configs for t in args.threads]
    if args.out_size != 16 and not custom:
        configs = [dataclasses.replace(c, out=args.out_size) for c in configs]
    configs = list(dict.fromkeys(configs))
    opts = {
        "repeats": args.repeats or preset["repeats"],
        "sample_s": args.sample_seconds or preset["sample_s"],
        "max_retries": preset["max_retries"] if args.max_retries is None else args.max_retries,
    }
    return configs, opts


def _log(msg: str) -> None:
    print(msg, flush=True)


def run_from_args(args: argparse.Namespace, log: Callable[[str], None] = _log) -> dict | None:
    """Run the matrix chosen on a command line of ``build_parser``; returns ``run``'s result,
    or None (after printing why) when an implementation name is unknown."""
    configs, opts = configs_from_args(args)
    impls = [n.strip() for n in args.impls.split(",") if n.strip()]
    bad = [n for n in impls if n not in IMPLS]
    if bad:
        print(f"unknown implementation(s) {bad}; choose from {', '.join(ALL_IMPLS)}")
        return None
    return run(
        configs,
        impls,
        busy_limit=args.busy_limit,
        check=not args.no_check,
        wait_quiet=args.wait_quiet,
        log=log,
        **opts,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tbptt-fast bench`` (``python -m tbptt_fast bench``)."""
    args = build_parser().parse_args(argv)
    result = run_from_args(args)
    if result is None:
        return 2
    report(result, args.json, args.plot, _log)
    return 0
