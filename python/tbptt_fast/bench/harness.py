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
``report`` (ratios, table, JSON, plot); this module runs a matrix (``run``), times the
cross-entropy rows (``time_ce_config``: the tbptt_fast backends and PyTorch's detach loop,
since the other peers implement mse only) and is the command line (``main``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable

import numpy as np

from .checks import check_plan, updates_err
from .configs import PRESETS, Config, make_matrix, parse_ints, parse_ks, scaling_configs
from .peers import torch_loops
from .report import add_ratios, report
from .runners import ALL_IMPLS, IMPLS, TbRunner, make_params, unavailable_reason
from .timing import (
    gemm_peak,
    machine_info,
    sample_runners,
    set_threads,
    time_config,
    wait_for_quiet,
)

# ------------------------------------------------------------------ cross-entropy rows


CE = "cross_entropy"

#: name -> (build(cfg, params, lr), applies(cfg), the overlap rule its gradients match)
CE_IMPLS = {
    "numpy": (
        lambda c, p, lr: TbRunner(c, p, "numpy", "stored", lr, CE),
        lambda c: True,
        "stored",
    ),
    "cpu": (lambda c, p, lr: TbRunner(c, p, "cpu", "stored", lr, CE), lambda c: True, "stored"),
    "cpu-recompute": (
        lambda c, p, lr: TbRunner(c, p, "cpu", "recompute", lr, CE),
        lambda c: c.k1 < c.k2,
        "recompute",
    ),
    "torch-seq": (
        lambda c, p, lr: torch_loops.TorchSeq(c.cell, p, c.k1, c.k2, lr=lr, dtype=c.dtype, loss=CE),
        lambda c: c.k1 == c.k2 and c.cell in torch_loops.TORCH_CELLS,
        "stored",
    ),
}


def ce_data(cfg: Config, steps: int, seed: int = 1):
    """x ``[steps, B, H]`` of the row's dtype and class targets ``[steps, B]`` in [0, O)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((steps, cfg.batch, cfg.hidden)).astype(cfg.dtype)
    return x, rng.integers(0, cfg.out, size=(steps, cfg.batch))


def check_ce(name: str, cfg: Config, lr: float = 0.01) -> dict:
    """``checks.check_impl`` for cross-entropy: every update's gradient against the
    NumPy reference in float64 on a small model (1e-8), the first in float32 at the
    row's size (1e-4)."""
    build, _, overlap = CE_IMPLS[name]
    out = {"ok": True, "err64": None, "err32": None, "message": "ok"}
    for tag, c, steps, tol in check_plan(cfg):
        params = make_params(c)
        x, target = ce_data(c, steps, seed=2)
        _, ref = TbRunner(c, params, "numpy", overlap, lr, CE).fit(x, target, True)
        _, got = build(c, params, lr).fit(x, target, True)
        err = updates_err(got, ref)
        out["err64" if tag == "float64" else "err32"] = err
        if not err <= tol:
            out.update(
                ok=False,
                message=f"{name} disagrees with tbptt_fast numpy (cross-entropy, "
                f"overlap={overlap!r}) in {tag}: max relative gradient error {err:.3g} > {tol:g}",
            )
            return out
    return out


def time_ce_config(
    cfg: Config,
    names: list[str],
    *,
    repeats: int,
    sample_s: float,
    max_retries: int,
    busy_limit: float,
    check: bool,
    lr: float,
    log: Callable[[str], None],
) -> list[dict]:
    """``timing.time_config`` for a cross-entropy row: the same checks, interleaved
    samples and retries, with the implementations of :data:`CE_IMPLS`."""
    set_threads(cfg.threads)
    rows = {}
    for name in names:
        row = {**cfg.key(), "impl": name, "status": "ok", "message": ""}
        rows[name] = row
        reason = unavailable_reason(name)
        if reason is None and name not in CE_IMPLS:
            reason = "times mse only"
        elif reason is None and not CE_IMPLS[name][1](cfg):
            reason = "does not apply to this (k1, k2)"
        if reason:
            row.update(status="skipped", message=reason)
            continue
        if check and name != "numpy":
            res = check_ce(name, cfg, lr)
            row.update(check_err64=res["err64"], check_err32=res["err32"])
            if not res["ok"]:
                row.update(status="check_failed", message=res["message"])
                log(f"    CHECK FAILED: {res['message']}")
    live = [n for n in names if rows[n]["status"] == "ok"]
    if not live:
        return list(rows.values())
    set_threads(cfg.threads)
    warm = max(2 * max(cfg.k1, cfg.k2), cfg.k1)
    warm = -(-warm // cfg.k1) * cfg.k1
    x, target = ce_data(cfg, max(warm, -(-4096 // cfg.k1) * cfg.k1))
    params = make_params(cfg)
    runners = {name: CE_IMPLS[name][0](cfg, params, lr) for name in live}
    sample_runners(cfg, runners, rows, x, target, warm, sample_s, repeats, max_retries, busy_limit)
    return list(rows.values())


# ------------------------------------------------------------------ the matrix


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
    budget_s: float | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run a benchmark matrix; returns ``{"machine", "gemm", "rows"}``.

    ``gemm`` maps the thread count (as a string in JSON) to the GEMM peak measurement.
    After ``budget_s`` seconds (None: never) busy samples are no longer retried and
    nothing waits for a quiet machine, so a run on a loaded machine still ends in time.
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
        if budget_s is not None and time.perf_counter() - start > budget_s and max_retries:
            log(f"over the {budget_s:.0f} s budget: busy samples are no longer retried")
            max_retries, wait_quiet = 0, 0.0
        log(f"[{i + 1}/{len(configs)}] {cfg.label}")
        wait_for_quiet(wait_quiet, busy_limit, log)
        timer = time_ce_config if cfg.loss == "cross_entropy" else time_config
        got = timer(
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
    g.add_argument(
        "--quick",
        action="store_true",
        help="the default: about a minute on 2 cores, under 2 minutes on a busy machine",
    )
    g.add_argument("--full", action="store_true", help="every configuration a target names")
    g.add_argument(
        "--scaling",
        action="store_true",
        help="the cpu engine at 1, 2, 4, ... threads up to this machine's CPUs (LSTM H=64, "
        "256, 1024; implies --impls cpu unless given)",
    )
    p.add_argument("--cells", help="comma list, e.g. lstm,gru,rnn_tanh (custom matrix)")
    p.add_argument("--hidden", type=parse_ints, help="comma list of H (= D)")
    p.add_argument("--batch", type=parse_ints, help="comma list of B")
    p.add_argument("--k", type=parse_ks, help="comma list of k1:k2, e.g. 16:16,16:64")
    p.add_argument(
        "--loss",
        help="comma list from mse,cross_entropy (custom matrix; default mse)",
    )
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
    p.add_argument(
        "--plot",
        help="write a PNG bar chart to this path (needs matplotlib: pip install 'tbptt-fast[plot]')",
    )
    return p


def configs_from_args(args) -> tuple[list[Config], dict]:
    """The matrix and run options chosen on the command line."""
    name = "tiny" if args.tiny else "full" if args.full else "quick"
    name = "scaling" if getattr(args, "scaling", False) else name
    preset = PRESETS[name]
    configs = list(preset["configs"] or scaling_configs())
    custom = any(v is not None for v in (args.cells, args.hidden, args.batch, args.k, args.loss))
    if custom:
        configs = [
            c
            for loss in (args.loss or "mse").split(",")
            for c in make_matrix(
                (args.cells or "lstm").split(","),
                args.hidden or [64],
                args.batch or [8],
                args.k or [(16, 16)],
                args.threads or [1],
                out=args.out_size,
                loss=loss.strip(),
            )
        ]
    elif args.threads:
        configs = [dataclasses.replace(c, threads=t) for c in configs for t in args.threads]
    if args.out_size != 16 and not custom:
        configs = [dataclasses.replace(c, out=args.out_size) for c in configs]
    configs = list(dict.fromkeys(configs))
    opts = {
        "repeats": args.repeats or preset["repeats"],
        "sample_s": args.sample_seconds or preset["sample_s"],
        "max_retries": preset["max_retries"] if args.max_retries is None else args.max_retries,
        "budget_s": preset.get("budget_s"),
    }
    return configs, opts


def _log(msg: str) -> None:
    print(msg, flush=True)


def run_from_args(args: argparse.Namespace, log: Callable[[str], None] = _log) -> dict | None:
    """Run the matrix chosen on a command line of ``build_parser``; returns ``run``'s result,
    or None (after printing why) when an implementation name is unknown."""
    configs, opts = configs_from_args(args)
    if getattr(args, "scaling", False) and args.impls == ",".join(ALL_IMPLS):
        args.impls = "cpu"
    impls = [n.strip() for n in args.impls.split(",") if n.strip()]
    bad = [n for n in impls if n not in IMPLS]
    if bad:
        print(f"unknown implementation(s) {bad}; choose from {', '.join(ALL_IMPLS)}")
        return None
    losses = {c.loss for c in configs} - {"mse", "cross_entropy"}
    if losses:
        print(f"unknown loss(es) {sorted(losses)}; choose from mse,cross_entropy")
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
    """Entry point of ``tbptt-fast bench`` (``python -m tbptt_fast bench``).

    Exit codes: 0 success, 1 ``--plot`` without matplotlib (checked before anything
    runs), 2 a usage error."""
    args = build_parser().parse_args(argv)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(
                "tbptt-fast bench: error: --plot needs matplotlib, which is not installed: "
                "pip install 'tbptt-fast[plot]'",
                file=sys.stderr,
            )
            return 1
    result = run_from_args(args)
    if result is None:
        return 2
    report(result, args.json, args.plot, _log)
    return 0
