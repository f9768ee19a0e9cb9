"""C++ engine benchmarks: backend "cpu" against the NumPy reference, plus GEMM peak and memory.

Prints a table and writes JSON. The matrix: cells rnn_tanh, lstm, gru; D = H in
{64, 256, 1024}; B in {8, 32}; TBPTT(16,16), (64,64), (16,64), (1,16); backends numpy
and cpu; 1 and 2 threads. Each row's sample length is set from a warm-up run so slow
rows (numpy at H=1024) stay within the time budget. Work definition and noise handling:
see ``tbptt_fast.bench.harness``. Prints the project's targets table too (``targets.py``).

The memory row runs ``fit`` in a subprocess at T = 2,000 and T = 200,000 (same k1, k2, B,
H) and reports the peak RSS and its growth over the RSS just before ``fit`` (after the
inputs are allocated): bounded memory means the growth does not depend on T.

    python benchmarks/bench_engine.py --quick --json benchmarks/results/engine.json
    python benchmarks/bench_engine.py                   # the whole matrix (long)
    python benchmarks/bench_engine.py --cells lstm --hidden 1024 --batch 32 --k 64:64
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap

from targets import report_with_targets

from tbptt_fast.bench import harness
from tbptt_fast.bench.configs import make_matrix, parse_ints, parse_ks
from tbptt_fast.bench.runners import native_ok

MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, sys, numpy as np, tbptt_fast as tb
    backend, cell, H, B, k1, k2, T = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, B, H), dtype=np.float32)
    target = rng.standard_normal((T, B, 16), dtype=np.float32)
    model = tb.Model(cell, H, H, 16, seed=0)
    trainer = tb.Trainer(model, k1=k1, k2=k2, optimizer=tb.SGD(lr=0.001), backend=backend)
    trainer.fit(x[:k1], target[:k1])  # load the engine before the baseline
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * resource.getpagesize()
    try:  # reset the peak (VmHWM) so that earlier transients (imports) do not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    trainer.fit(x, target)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    print(before, peak, x.nbytes + target.nbytes)
    """
)


def memory_rows(backend: str, cell: str, hidden: int, batch: int, k1: int, k2: int, log):
    """Peak RSS of ``fit`` in a fresh process at T = 2,000 and T = 200,000."""
    rows = []
    for steps in (2_000, 200_000):
        args = [backend, cell, str(hidden), str(batch), str(k1), str(k2), str(steps)]
        proc = subprocess.run(
            [sys.executable, "-c", MEMORY_SCRIPT, *args],
            capture_output=True,
            text=True,
            env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
        )
        if proc.returncode != 0:
            rows.append({"backend": backend, "T": steps, "error": proc.stderr.strip()[-400:]})
            log(f"memory T={steps}: failed: {proc.stderr.strip()[-400:]}")
            continue
        before, peak, inputs = map(int, proc.stdout.split()[-3:])
        row = {
            "backend": backend,
            "cell": cell,
            "hidden": hidden,
            "batch": batch,
            "k1": k1,
            "k2": k2,
            "T": steps,
            "input_bytes": inputs,
            "rss_before_fit": before,
            "peak_rss": peak,
            "growth": peak - before,
        }
        rows.append(row)
        log(
            f"memory {backend} T={steps:>7,}: peak RSS {peak / 2**20:8.1f} MiB, inputs "
            f"{inputs / 2**20:7.1f} MiB, growth during fit {(peak - before) / 2**20:6.1f} MiB"
        )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few minutes: a subset of the matrix")
    p.add_argument("--cells", default="rnn_tanh,lstm,gru")
    p.add_argument("--hidden", type=parse_ints, default=[64, 256, 1024])
    p.add_argument("--batch", type=parse_ints, default=[8, 32])
    p.add_argument("--k", type=parse_ks, default=[(16, 16), (64, 64), (16, 64), (1, 16)])
    p.add_argument("--threads", type=parse_ints, default=[1, 2])
    p.add_argument("--backends", default="numpy,cpu", help="comma list of numpy,cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sample-seconds", type=float, default=0.4)
    p.add_argument("--max-retries", type=int, default=2)
    p.add_argument("--busy-limit", type=float, default=0.15)
    p.add_argument("--wait-quiet", type=float, default=0.0, help="see tbptt-fast bench")
    p.add_argument("--no-check", action="store_true", help="skip the cpu vs numpy check")
    p.add_argument("--no-memory", action="store_true", help="skip the memory row")
    p.add_argument("--json", help="write the results to this path")
    args = p.parse_args(argv)

    def log(msg):
        print(msg, flush=True)

    if args.quick:
        configs = make_matrix(
            ["lstm"], [64, 256], [8, 32], [(16, 16), (16, 64), (1, 16)], [1, 2]
        ) + make_matrix(["gru", "rnn_tanh"], [64, 256], [32], [(16, 16)], [1])
        args.repeats, args.sample_seconds = 2, 0.25
    else:
        configs = make_matrix(args.cells.split(","), args.hidden, args.batch, args.k, args.threads)
    backends = args.backends.split(",")
    result = harness.run(
        configs,
        backends,
        repeats=args.repeats,
        sample_s=args.sample_seconds,
        max_retries=args.max_retries,
        busy_limit=args.busy_limit,
        check=not args.no_check,
        wait_quiet=args.wait_quiet,
        log=log,
    )
    if not args.no_memory:
        backend = "cpu" if native_ok() and "cpu" in backends else "numpy"
        result["memory"] = memory_rows(backend, "lstm", 64, 8, 16, 64, log)
    log("")
    log("GEMM peak (2048^3 float32): " + ", ".join(
        f"{t} thread(s) {g['gflops']:.1f} GFLOP/s" for t, g in result["gemm"].items()
    ))  # fmt: skip
    report_with_targets(result, args.json, None, log)
    if result.get("memory"):
        log("")
        log(format_memory(result["memory"]))
    return 0


def format_memory(rows) -> str:
    """The memory rows as a Markdown table (MiB)."""
    lines = [
        "| backend | config | T | inputs MiB | RSS before fit MiB | peak RSS MiB | growth MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    mib = 2**20
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['backend']} | | {r['T']:,} | failed: {r['error']} ||||")
            continue
        cfg = f"{r['cell']} H={r['hidden']} B={r['batch']} ({r['k1']},{r['k2']})"
        lines.append(
            f"| {r['backend']} | {cfg} | {r['T']:,} | {r['input_bytes'] / mib:.1f} | "
            f"{r['rss_before_fit'] / mib:.1f} | {r['peak_rss'] / mib:.1f} | "
            f"{r['growth'] / mib:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
